"""build-bank and query on a tiny random Llama: exact restore, real application, refusals, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regrad_cli.learner.adapt import applied
from regrad_cli.offline.build import build_bank
from regrad_cli.workspace.config import Workspace
from regrad_cli.workspace.engine import Engine
from regrad_cli.errors import NoBankError, RegradError
from regrad_cli.offline.ingest import ingest
from regrad_cli.online.pipeline import step_from_rows
from regrad_cli.lm.prompting import prompt_ids
from regrad_cli.online.query import QueryEngine, Request

from conftest import FakeEmbedder, FakeTokenizer, make_tiny_engine, param_hash

DOCS = {
    "a.txt": "the zarn river flows past kelb mill every spring and floods the meadow",
    "b.txt": "vesper moths have blue wings and live in the dunmoor hills near the coast",
    "c.txt": "tollvane cheese is aged in limestone caves for nine months before sale",
    "d.txt": "the pellworth engine was built by tashkel pryde in eighteen ninety one",
    "e.txt": "glimmerscript files end in glim and were designed for weather stations",
}


def _engine(seed: int = 0) -> Engine:
    return make_tiny_engine(seed)


@pytest.fixture
def workspace(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in DOCS.items():
        (corpus / name).write_text(text)
    ws = Workspace.open(tmp_path / "ws")
    ingest(ws, [corpus], embedder=FakeEmbedder(), tokenizer=FakeTokenizer())
    return ws, corpus


def test_build_then_rebuild_builds_nothing(workspace):
    ws, _ = workspace
    engine = _engine()
    before = param_hash(engine)
    first = build_bank(ws, engine, batch_size=2)
    assert first.built == len(DOCS) and first.rows == len(DOCS) and not first.failed
    again = build_bank(ws, engine)
    assert again.built == 0 and again.skipped == len(DOCS)
    assert param_hash(engine) == before  # base weights and phi bit-identical after a build


def test_stored_gradients_equal_fresh_gradients(workspace):
    from bank_format import GradientBank
    from regrad_cli.learner.gradients import document_gradients

    ws, _ = workspace
    engine = _engine()
    ws.config.bank.codec = "fp32"
    ws.config.bank.compute_dtype = "float32"  # bf16 passes are close, not equal (test_compute_dtype.py)
    build_bank(ws, engine)
    bank = GradientBank.open(ws.bank_path(engine.learner.checkpoint_id()))
    from regrad_cli.workspace.documents import DocumentStore

    doc = DocumentStore(ws).all(columns=["id", "text"])[0]
    stored = bank.fetch([doc["id"]])[doc["id"]]
    fresh, _ = document_gradients(engine.model, engine.learner, engine.tokenizer, [doc["text"]])
    for (name, _), t in zip(engine.stored_tensors(), stored):
        np.testing.assert_allclose(t, fresh[0][name].numpy(), rtol=1e-5, atol=1e-8)


def test_resume_after_simulated_kill(workspace, monkeypatch):
    ws, _ = workspace
    engine = _engine()
    import regrad_cli.learner.gradients as gradients

    real = gradients.document_gradients
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed in the middle of the second batch
        return real(*a, **k)

    monkeypatch.setattr(gradients, "document_gradients", dying)
    with pytest.raises(KeyboardInterrupt):
        build_bank(ws, engine, batch_size=2)
    monkeypatch.setattr(gradients, "document_gradients", real)
    from bank_format import GradientBank

    bank = GradientBank.open(ws.bank_path(engine.learner.checkpoint_id()))
    assert bank.count() == 2  # the first batch, whole; nothing of the second
    summary = build_bank(ws, engine, batch_size=2)
    assert summary.built == len(DOCS) - 2 and summary.rows == len(DOCS)
    report = bank.verify()
    assert report["ok"] == len(DOCS) and not report["bad"] and not report["duplicates"]


def test_changed_document_replaces_its_stale_row(workspace):
    ws, corpus = workspace
    engine = _engine()
    build_bank(ws, engine)
    (corpus / "a.txt").write_text("the zarn river now flows past orrin bridge instead")
    ingest(ws, [corpus], embedder=FakeEmbedder(), tokenizer=FakeTokenizer())
    summary = build_bank(ws, engine)
    assert summary.built == 1 and summary.removed_stale == 1 and summary.rows == len(DOCS)


@pytest.mark.slow
def test_hundred_queries_leave_every_parameter_bit_identical(workspace):
    ws, _ = workspace
    engine = _engine()
    build_bank(ws, engine)
    qe = QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    before = param_hash(engine)
    modes = ["param", "param+context", "context", "closed-book"]
    for i in range(100):
        res = qe.answer(f"question {i} about the zarn river and vesper moths", mode=modes[i % 4],
                        top_k=1 + i % 3, max_new_tokens=3, gamma=1.0 + i % 2)
        assert res["mode"] == modes[i % 4]
    assert param_hash(engine) == before


def test_param_mode_really_applies_gradients(workspace):
    ws, _ = workspace
    engine = _engine()
    build_bank(ws, engine)
    qe = QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    question = "where does the zarn river flow"
    ids = torch.tensor([prompt_ids(engine.tokenizer, question)])
    with torch.no_grad():
        base = engine.model(input_ids=ids).logits[0, -1]
        qvec = qe.embedder.embed([question])[0]
        hits = qe.retrieve(question, qvec, 2)
        rows, bad = qe.corpus.gradients([h.doc_id for h in hits])
        assert len(rows) == 2 and not bad
        weights, _ = step_from_rows(engine.learner, [rows[h.doc_id] for h in hits], [h.cosine for h in hits], "sum")
        with applied(engine.learner, weights):
            adapted = engine.model(input_ids=ids).logits[0, -1]
        restored = engine.model(input_ids=ids).logits[0, -1]
    assert not torch.allclose(base, adapted, atol=1e-4)
    assert torch.equal(base, restored)


def test_restore_when_generation_raises(workspace, monkeypatch):
    ws, _ = workspace
    engine = _engine()
    build_bank(ws, engine)
    qe = QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    before = param_hash(engine)
    phi = engine.learner.phi_dict()
    import regrad_cli.online.pipeline as query_mod

    def boom(*a, **k):
        # Generation sees the adapted weights, not phi, before it fails.
        wrapper = next(iter(engine.learner._wrappers.values()))
        assert wrapper.A is not phi[next(iter(engine.learner._wrappers)) + ".A"]
        raise RuntimeError("generation failed")

    monkeypatch.setattr(query_mod, "generate", boom)
    with pytest.raises(RuntimeError, match="generation failed"):
        qe.answer("zarn river", mode="param", top_k=2)
    wrapper_name, wrapper = next(iter(engine.learner._wrappers.items()))
    assert wrapper.A is phi[wrapper_name + ".A"]
    assert param_hash(engine) == before


def test_closed_book_without_bank_and_refusal_with_param(workspace):
    ws, _ = workspace
    engine = _engine()
    qe = QueryEngine(ws, engine=engine, embedder=FakeEmbedder(), need_bank=False)
    assert isinstance(qe.answer("anything", mode="closed-book", max_new_tokens=2)["answer"], str)
    with pytest.raises(NoBankError, match="regrad build-bank"):
        QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    # In a batch, only the requests that need the bank fail.
    out = qe.answer_many([Request("anything", mode="closed-book", max_new_tokens=2),
                          Request("anything", mode="param", max_new_tokens=2)], return_exceptions=True)
    assert isinstance(out[0], dict) and isinstance(out[1], NoBankError)
    with pytest.raises(NoBankError):
        qe.answer_many([Request("anything", mode="param", max_new_tokens=2)])


def test_bank_of_another_checkpoint_is_never_used(workspace):
    ws, _ = workspace
    build_bank(ws, _engine(seed=0))
    other = _engine(seed=1)
    with pytest.raises(NoBankError, match="other learner checkpoints"):
        QueryEngine(ws, engine=other, embedder=FakeEmbedder())


def test_bank_of_another_model_is_refused(workspace):
    from bank_format import BankMismatchError

    ws, _ = workspace
    engine = _engine()
    build_bank(ws, engine)
    engine.lm.fingerprint = {"id": "tiny-llama", "weights_sha256": "different"}
    with pytest.raises(BankMismatchError) as err:
        QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    assert "different" in str(err.value) and "tiny" in str(err.value)


def test_corrupt_row_is_never_applied(workspace):
    from bank_format import GradientBank

    ws, _ = workspace
    engine = _engine()
    build_bank(ws, engine)
    bank = GradientBank.open(ws.bank_path(engine.learner.checkpoint_id()))
    qe = QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    question = "zarn river kelb mill"
    retrieved = qe.retrieve(question, qe.embedder.embed([question])[0], 2)
    victim = retrieved[0].doc_id
    # Rewrite the victim's row with a flipped byte in its blob (checksum kept: now wrong).
    import lance

    ds = lance.dataset(str(next(bank.path.glob("*.lance"))))
    row = ds.to_table(filter=f"doc_id = '{victim}'").to_pylist()[0]
    blob = bytearray(row["blob"])
    blob[len(blob) // 2] ^= 0xFF
    row["blob"] = bytes(blob)
    ds.delete(f"doc_id = '{victim}'")
    import pyarrow as pa

    ds = lance.write_dataset(pa.Table.from_pylist([row], schema=ds.schema), ds.uri, mode="append")
    qe = QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    res = qe.answer(question, top_k=2, max_new_tokens=2)
    assert [s["doc_id"] for s in res["skipped"]] == [victim]
    assert {r["doc_id"]: r["applied"] for r in res["retrieved"]}[victim] is False
    strict = QueryEngine(ws, engine=engine, embedder=FakeEmbedder(), strict=True)
    with pytest.raises(RegradError, match="corrupt"):
        strict.answer(question, top_k=2, max_new_tokens=2)


def test_retrievers(workspace):
    ws, _ = workspace
    engine = _engine()
    build_bank(ws, engine)
    qe = QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    q = "tollvane cheese limestone caves"
    vec = qe.embedder.embed([q])[0]
    for retriever in ("dense", "bm25", "hybrid"):
        hits = qe.retrieve(q, vec, 2, retriever)
        # BM25 returns only documents sharing a term with the question.
        assert 1 <= len(hits) <= 2 and hits[0].doc_id.endswith("c.txt#0"), retriever
