"""Energy shares of the LoRA tensors and the stored subset: measured, recorded, stored, applied."""

from __future__ import annotations

import json
from contextlib import contextmanager
import shutil

import numpy as np
import pytest
import torch

from regrad_cli.learner.energy import (
    META_KEY,
    energy_record,
    measure,
    select_tensors,
    tensor_energy,
    write_record,
)
from regrad_cli.workspace.engine import Engine
from regrad_cli.errors import RegradError
from regrad_cli.learner.lora import Learner

from conftest import FakeEmbedder, FakeTokenizer, make_tiny_engine

TEXTS = [
    "the zarn river flows past kelb mill every spring and floods the meadow",
    "vesper moths have blue wings and live in the dunmoor hills near the coast",
    "tollvane cheese is aged in limestone caves for nine months before sale",
]


@contextmanager
def recorded_steps(learner):
    """Every non-None side-path state the learner is pointed at inside the block (copies)."""
    applied = []
    real_use = learner.use

    def spy(weights):
        if weights is not None:
            applied.append({n: t.detach().clone() for n, t in weights.items()})
        return real_use(weights)

    learner.use = spy
    try:
        yield applied
    finally:
        learner.use = real_use


def _engine() -> Engine:
    return make_tiny_engine()


def _brute_force_energy(engine: Engine, norm: str) -> dict:
    """sum_d ||alpha (.) N(g_d)||^2 per tensor from one document at a time, normalised to shares."""
    from regrad_cli.learner.gradients import document_gradients

    learner = engine.learner
    total = {n: 0.0 for n in learner.names}
    for text in TEXTS:
        (g,), _ = document_gradients(engine.model, learner, engine.tokenizer, [text], max_tokens=64)
        g = {n: t.double() for n, t in g.items()}
        doc_norm = sum(float(t.pow(2).sum()) for t in g.values()) ** 0.5
        for n, t in g.items():
            a = learner.alpha(n).detach().double()
            if norm == "doc":
                t = t / doc_norm
            elif norm == "tensor":
                t = t / float(t.pow(2).sum()) ** 0.5
            total[n] += float((a * t).pow(2).sum())
    s = sum(total.values())
    return {n: v / s for n, v in total.items()}


@pytest.mark.parametrize("norm", ["none", "doc", "tensor"])
def test_tensor_energy_matches_one_document_at_a_time(norm):
    engine = _engine()
    with torch.no_grad():  # unequal step sizes, so that alpha matters
        for i, n in enumerate(engine.learner.names):
            engine.learner.log_alpha[n.replace(".", "__")].fill_(np.log(0.5 + i % 3))
    shares = tensor_energy(engine, texts=TEXTS, max_tokens=64, batch_size=2, norm=norm)
    assert list(shares) == engine.learner.names
    assert sum(shares.values()) == pytest.approx(1.0)
    want = _brute_force_energy(engine, norm)
    for n in shares:
        assert shares[n] == pytest.approx(want[n], rel=1e-4, abs=1e-9), n


def test_tensor_energy_follows_the_step_size():
    engine = _engine()
    name = engine.learner.names[0]
    before = tensor_energy(engine, texts=TEXTS, max_tokens=64)[name]
    with torch.no_grad():
        engine.learner.log_alpha[name.replace(".", "__")].sub_(np.log(100.0))  # alpha / 100
    after, grad_share = tensor_energy(engine, texts=TEXTS, max_tokens=64, with_grad_share=True)
    assert after[name] < before / 1000  # energy scales with alpha^2
    assert grad_share[name] > after[name]  # the raw gradient share does not see alpha


def test_select_tensors_threshold_and_fallbacks():
    engine = _engine()
    learner = engine.learner
    assert select_tensors(learner) == learner.names  # no record: everything
    energy = {n: (0.0 if n.endswith(".A") else 1.0) for n in learner.names}
    learner.meta[META_KEY] = energy_record(energy, threshold=1e-4)
    b_names = [n for n in learner.names if n.endswith(".B")]
    assert select_tensors(learner) == b_names
    assert [n for n, _ in engine.stored_tensors()] == b_names
    assert select_tensors(learner, threshold=0.0) == b_names  # "above": a zero share is never kept
    learner.meta[META_KEY] = energy_record({n: 0.0 for n in learner.names}, threshold=0.5)
    assert select_tensors(learner) == learner.names  # never an empty bank
    with pytest.raises(RegradError, match="threshold"):
        select_tensors(learner, threshold=1.5)
    learner.meta[META_KEY] = energy_record({b_names[0]: 1.0}, threshold=0.1)
    with pytest.raises(RegradError, match="no entry for tensor"):
        select_tensors(learner)


def test_measure_and_write_record_keep_the_checkpoint_id(tmp_path):
    engine = _engine()
    cid = engine.learner.save(tmp_path / "ck")
    result = measure(engine, TEXTS, max_tokens=64, threshold=1e-3)
    rec = result["record"]
    assert rec["threshold"] == 1e-3 and rec["n_docs"] == 3 and rec["norm"] == "none"
    assert set(rec["energy"]) == set(rec["grad_share"]) == set(engine.learner.names)
    sub = result["subset"]
    assert sub["tensors_total"] == len(engine.learner.names)
    assert 0 <= sub["energy_dropped"] <= 1e-3 * len(sub["dropped"])
    write_record(tmp_path / "ck", rec)
    again = Learner.load(tmp_path / "ck")
    assert again.checkpoint_id() == cid and again.meta[META_KEY] == json.loads(json.dumps(rec))


def test_a_subset_bank_applies_exactly_that_subset(tmp_path):
    """build-bank stores only the selected tensors (the rest recorded as omitted) and a query moves
    exactly those: every other tensor stays phi, bit for bit."""
    from bank_format import GradientBank
    from regrad_cli.offline.build import build_bank
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.offline.ingest import ingest
    from regrad_cli.online.query import QueryEngine

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXTS):
        (corpus / f"{i}.txt").write_text(text)
    ws = Workspace.open(tmp_path / "ws")
    ingest(ws, [corpus], embedder=FakeEmbedder(), tokenizer=FakeTokenizer())
    engine = _engine()
    learner = engine.learner
    # Keep the B tensors of the first two layers only.
    keep = [n for n in learner.names if n.endswith(".B")][:2 * len(learner.spec.modules)]
    learner.meta[META_KEY] = energy_record({n: (1.0 if n in keep else 0.0) for n in learner.names}, 1e-4)
    ws.config.bank.codec = "fp32"
    build_bank(ws, engine)
    bank = GradientBank.open(ws.bank_path(learner.checkpoint_id()))
    assert [t.name for t in bank.meta.layout] == keep
    assert {t.name for t in bank.meta.omitted} == set(learner.names) - set(keep)
    stats = bank.stats()
    assert stats["fp32_bytes_per_doc"] == 4 * learner.n_values

    with recorded_steps(learner) as applied:
        QueryEngine(ws, engine=engine, embedder=FakeEmbedder()).answer(
            "where does the zarn river flow?", mode="param", top_k=2, max_new_tokens=2)
    assert applied, "the query applied no weights"
    step = applied[0]
    phi = learner.phi_dict()
    for n in learner.names:
        same = torch.equal(step[n].reshape(phi[n].shape), phi[n].detach())
        assert same == (n not in keep), f"{n}: {'changed' if not same else 'unchanged'}"


def test_a_subset_bank_of_a_doc_norm_learner_stores_rows_normalised_over_the_whole_gradient(tmp_path):
    """A 'doc'-normalising learner with tensors left out: build-bank divides each row by the norm of
    the document's WHOLE gradient (bank key row_norm, format 1.2) and the query does not normalise
    again, so the stored tensors move exactly as with the full gradient; the rest stay phi."""
    from bank_format import GradientBank
    from regrad_cli.learner import adapt
    from regrad_cli.offline.build import build_bank
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.workspace.documents import DocumentStore
    from regrad_cli.learner.gradients import document_gradients
    from regrad_cli.offline.ingest import ingest
    from regrad_cli.online.query import QueryEngine

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXTS):
        (corpus / f"{i}.txt").write_text(text)
    ws = Workspace.open(tmp_path / "ws")
    ingest(ws, [corpus], embedder=FakeEmbedder(), tokenizer=FakeTokenizer())
    engine = _engine()
    learner = engine.learner
    learner.meta["norm"] = "doc"
    keep = [n for n in learner.names if n.endswith(".B")]
    learner.meta[META_KEY] = energy_record({n: (1.0 if n in keep else 0.0) for n in learner.names}, 1e-4)
    ws.config.bank.codec = "fp32"
    ws.config.bank.compute_dtype = "float32"  # compared with float32 gradients below
    build_bank(ws, engine)
    bank = GradientBank.open(ws.bank_path(learner.checkpoint_id()))
    assert bank.meta.row_norm == "doc" and bank.meta.format_version == "1.2"

    # Each stored row is g_stored / ||g_whole||: its stored part has norm below 1, not 1.
    text_of = {d["id"]: d["text"] for d in DocumentStore(ws).all(columns=["id", "text"])}
    rows = bank.fetch(list(text_of))
    whole = {}
    for doc_id, arrays in rows.items():
        (g,), _ = document_gradients(engine.model, learner, engine.tokenizer, [text_of[doc_id]],
                                     ws.config.bank.max_doc_tokens)
        whole[doc_id] = g
        norm = sum(float(t.double().pow(2).sum()) for t in g.values()) ** 0.5
        for n, a in zip(keep, arrays):
            np.testing.assert_allclose(a, g[n].numpy() / norm, rtol=1e-5, atol=1e-9)

    with recorded_steps(learner) as applied:
        res = QueryEngine(ws, engine=engine, embedder=FakeEmbedder()).answer(
            "where does the zarn river flow?", mode="param", top_k=2, max_new_tokens=2)
    step = applied[0]
    used = [(h["doc_id"], h["weight"]) for h in res["retrieved"] if h["applied"]]
    grads = {n: torch.stack([whole[d][n] for d, _ in used]) for n in learner.names}
    w = torch.tensor([wt for _, wt in used], dtype=torch.float32)
    expected = adapt.step(learner.phi_dict(), learner.alpha_dict(), adapt.combine(grads, w, norm="doc"))
    phi = learner.phi_dict()
    for n in learner.names:
        got = step[n].reshape(phi[n].shape)
        if n in keep:
            torch.testing.assert_close(got, expected[n].detach(), rtol=1e-4, atol=1e-7)
        else:
            assert torch.equal(got, phi[n].detach()), n


@pytest.mark.real
def test_cli_learner_energy_writes_the_record(tmp_path, monkeypatch, capsys):
    from regrad_cli.workspace.checkpoints import bundled_checkpoint_dir
    from reliability_helpers import run_cli

    ck = tmp_path / "ck"
    shutil.copytree(bundled_checkpoint_dir(), ck)
    before = Learner.load(ck).checkpoint_id()
    code, out, err = run_cli(["learner", "energy", "--checkpoint", ck, "--docs", "2", "--threshold",
                              "0.001", "--write", "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert result["record"]["n_docs"] == 2 and result["record"]["threshold"] == 0.001
    loaded = Learner.load(ck)
    assert loaded.checkpoint_id() == before
    assert loaded.meta[META_KEY]["energy"] == pytest.approx(result["record"]["energy"])
