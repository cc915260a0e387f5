"""Streaming answers (issue 31): the text a stream may send while an answer is generated
(prompting.answer_so_far), the per-step tokens generation hands out (generate's on_tokens, on
both decoding paths), and the pipeline's on_text, which must leave every answer and every weight
exactly as a run without it. The HTTP side (OpenAI's client) is in tests/test_openai_compat.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regrad_cli.lm.fakes import byte_tokenizer, tiny_model
from regrad_cli.lm.generation import generate, generate_hf
from regrad_cli.lm.prompting import answer_so_far, extract_answer

from conftest import FakeEmbedder, FakeTokenizer, make_tiny_engine, param_hash

# Pieces a tokenizer might emit, chosen to hit every rule of extract_answer: the "Answer:" prefix
# in its spellings, periods, spaces, line breaks, a cut multi-byte character.
PIECES = ["the", "The", " ", "  ", "final", "answer", "Answer", "ANSWER", "is", ":", "-", ".", "..", "\n",
          "\r", "\t", "Paris", " 1913", "a", "n", "s", "w", "e", "r", "\ufffd", "é", "x"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12))
def test_answer_so_far_only_grows_into_the_answer(pieces):
    final = extract_answer("".join(pieces))
    before = ""
    for k in range(len(pieces) + 1):
        now = answer_so_far("".join(pieces[:k]))
        assert now.startswith(before), (pieces[:k], before, now)
        assert final.startswith(now), (pieces, now, final)
        before = now


@pytest.mark.parametrize("text,sent", [
    ("Par", "Par"), ("Paris. ", "Paris"), ("the", ""), ("The answer", ""), ("The answer is: 19", "19"),
    ("Answer - Corwen Ald", "Corwen Ald"), ("answer it", "answer it"), ("\n\n Paris\nRome", "Paris"),
    ("caf\ufffd", "caf"),
])
def test_answer_so_far_holds_back_what_may_change(text, sent):
    assert answer_so_far(text) == sent


def _model():
    """The fake llama with weights large enough that greedy continuations vary."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.mark.parametrize("path", ["loop", "hf"])
def test_on_tokens_hands_out_every_rows_tokens_as_they_come(path, one_thread):
    model, tok = _model(), byte_tokenizer()
    prompts = [tok(p, add_special_tokens=False).input_ids for p in ("who", "the lens is", "x y z")]
    got: list[list[int]] = [[] for _ in prompts]
    steps = []

    def on_tokens(rows, tokens):
        steps.append(len(rows))
        for i, t in zip(rows, tokens):
            got[i].append(t)

    stats: dict = {}
    plain = generate(model, tok, prompts, 10, stats=stats)
    run = generate if path == "loop" else generate_hf
    assert run(model, tok, prompts, 10, on_tokens=on_tokens) == plain  # it only watches
    assert len(steps) == stats["steps"] > 1
    for i, tokens in enumerate(stats["tokens"]):
        assert got[i][: len(tokens)] == tokens  # hf: a finished row gets padding after its tokens


def _workspace(tmp_path):
    from regrad_cli.offline.build import build_bank
    from regrad_cli.offline.ingest import ingest
    from regrad_cli.online.query import QueryEngine
    from regrad_cli.workspace.config import Workspace

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(["vesper moths have blue wings", "tollvane cheese is aged in caves",
                              "the zarn river floods the meadow"]):
        (corpus / f"d{i}.txt").write_text(text)
    ws = Workspace.open(tmp_path / "ws")
    ingest(ws, [corpus], embedder=FakeEmbedder(), tokenizer=FakeTokenizer())
    engine = make_tiny_engine()
    build_bank(ws, engine)
    return QueryEngine(ws, engine=engine, embedder=FakeEmbedder()), engine


def test_streamed_rows_answer_exactly_as_without_a_stream(tmp_path):
    """One batch of rows in several modes (each with its own step), some streamed: the same
    answers and weights as without streaming, each stream's texts growing into its answer, and
    the base weights and phi bit for bit as before."""
    from dataclasses import replace

    from regrad_cli.online.pipeline import Request

    qe, engine = _workspace(tmp_path)
    before = param_hash(engine)
    reqs = [Request("what colour are vesper moth wings", mode="param", top_k=2, max_new_tokens=8),
            Request("how long is tollvane cheese aged", mode="param+context", top_k=1, max_new_tokens=8),
            Request("what floods the meadow", mode="param", top_k=3, gamma=2.0, max_new_tokens=8),
            Request("what has blue wings", mode="closed-book", max_new_tokens=8)]
    want = qe.answer_many(reqs)
    streams: dict[int, list[str]] = {0: [], 2: [], 3: []}
    streamed = [replace(r, on_text=streams[i].append) if i in streams else r for i, r in enumerate(reqs)]
    got = qe.answer_many(streamed)
    assert param_hash(engine) == before
    key = lambda res: (res["answer"], [(d["doc_id"], d["weight"]) for d in res["retrieved"]])  # noqa: E731
    assert [key(r) for r in got] == [key(r) for r in want]
    for i, texts in streams.items():
        answer = got[i]["answer"]
        assert len(answer) > 1 and texts[-1] == answer
        assert len(texts) > 1 and all(b.startswith(a) and b != a for a, b in zip(texts, texts[1:])), texts


def test_a_failing_listener_stops_its_stream_only(tmp_path):
    from regrad_cli.online.pipeline import Request

    qe, _ = _workspace(tmp_path)
    seen: list[str] = []

    def broken(_text):
        raise RuntimeError("the client went away")

    reqs = [Request("what colour are vesper moth wings", mode="param", max_new_tokens=6, on_text=broken),
            Request("what floods the meadow", mode="param", max_new_tokens=6, on_text=seen.append)]
    got = qe.answer_many(reqs)
    plain = qe.answer_many([Request(r.question, mode="param", max_new_tokens=6) for r in reqs])
    assert [r["answer"] for r in got] == [r["answer"] for r in plain]
    assert seen[-1] == got[1]["answer"]
