"""Gradient passes in bf16 (build-bank's compute dtype): resolution, closeness to fp32, the bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regrad_cli.offline.build import build_bank
from regrad_cli.workspace.config import Workspace
from regrad_cli.errors import ConfigError
from regrad_cli.learner.gradients import document_gradients, fast_bf16, resolve_compute_dtype
from regrad_cli.offline.ingest import ingest

from conftest import FakeEmbedder, FakeTokenizer, make_tiny_engine, param_hash

TEXTS = ["the zarn river flows past kelb mill every spring and floods the meadow",
         "vesper moths have blue wings and live in the dunmoor hills near the coast",
         "tollvane cheese is aged in limestone caves for nine months before sale"]


def _flat(g: dict) -> torch.Tensor:
    return torch.cat([g[n].reshape(-1) for n in sorted(g)])


def test_resolution():
    engine = make_tiny_engine()
    assert resolve_compute_dtype("float32", engine.model) == "float32"
    assert resolve_compute_dtype("bfloat16", engine.model) == "bfloat16"
    assert resolve_compute_dtype("auto", engine.model) == ("bfloat16" if fast_bf16("cpu") else "float32")
    with pytest.raises(ConfigError, match="unknown compute dtype 'fp8'.*auto, float32, bfloat16"):
        resolve_compute_dtype("fp8", engine.model)
    engine.model.to(torch.bfloat16)  # a model loaded in bf16 computes in bf16, whatever is asked
    assert resolve_compute_dtype("float32", engine.model) == "bfloat16"


def test_bf16_gradients_are_close_to_fp32_but_not_equal():
    engine = make_tiny_engine()
    before = param_hash(engine)
    g32, n32 = document_gradients(engine.model, engine.learner, FakeTokenizer(), TEXTS, compute_dtype="float32")
    g16, n16 = document_gradients(engine.model, engine.learner, FakeTokenizer(), TEXTS, compute_dtype="bfloat16")
    assert n32 == n16
    for a, b in zip(g32, g16):
        assert all(t.dtype == torch.float32 for t in b.values())  # stored as float32 either way
        x, y = _flat(a), _flat(b)
        assert not torch.equal(x, y)  # the passes really ran in bf16
        cos = float(x @ y / (x.norm() * y.norm()))
        assert cos > 0.99, cos
        assert float((x - y).norm() / x.norm()) < 0.1
    assert param_hash(engine) == before
    assert not torch.is_autocast_enabled("cpu")  # the autocast context is closed again


def _workspace(tmp_path, name):
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i, t in enumerate(TEXTS):
        (corpus / f"{i}.txt").write_text(t)
    ws = Workspace.open(tmp_path / name)
    ws.config.bank.codec = "fp32"
    ingest(ws, [corpus], embedder=FakeEmbedder(), tokenizer=FakeTokenizer())
    return ws


def test_build_records_and_uses_its_compute_dtype(tmp_path):
    from bank_format import GradientBank

    engine = make_tiny_engine()
    rows = {}
    for dtype in ("float32", "bfloat16"):
        ws = _workspace(tmp_path, dtype)
        summary = build_bank(ws, engine, compute_dtype=dtype)
        assert summary.compute_dtype == dtype and summary.to_dict()["compute_dtype"] == dtype
        assert summary.built == len(TEXTS) and not summary.failed
        bank = GradientBank.open(ws.bank_path(engine.learner.checkpoint_id()))
        rows[dtype] = {k: np.concatenate([t.reshape(-1) for t in v]) for k, v in bank.fetch(bank.doc_ids()).items()}
    assert rows["float32"].keys() == rows["bfloat16"].keys()
    for k, x in rows["float32"].items():
        y = rows["bfloat16"][k]
        assert not np.array_equal(x, y)
        assert np.linalg.norm(x - y) / np.linalg.norm(x) < 0.1
    # The workspace's setting is the default; 'auto' resolves for this machine.
    ws = _workspace(tmp_path, "auto")
    assert ws.config.bank.compute_dtype == "auto"
    assert build_bank(ws, engine).compute_dtype == resolve_compute_dtype("auto", engine.model)


def test_eval_workspaces_compute_in_float32(tmp_path):
    from regrad_cli.learning.evaluation.config import EvalConfig
    from regrad_cli.learning.evaluation.workspace import fresh_workspace

    ws = fresh_workspace(tmp_path / "ev", EvalConfig(datasets=["demo"]), make_tiny_engine(), injected=True)
    assert ws.config.bank.compute_dtype == "float32"


def test_cli_refuses_an_unknown_compute_dtype(tmp_path, capsys, monkeypatch):
    from reliability_helpers import run_cli

    ws = _workspace(tmp_path, "cli")
    code, _, err = run_cli(["build-bank", "--compute-dtype", "fp8", "--workspace", str(ws.root)], capsys, monkeypatch)
    assert code == 1
    assert err.startswith("Error: unknown compute dtype 'fp8' (use auto, float32, bfloat16)"), err


def test_ray_build_refuses_an_unknown_compute_dtype_before_starting_ray(tmp_path):
    from regrad_cli.offline.ray_build import build_bank_ray

    ws = _workspace(tmp_path, "ray")
    with pytest.raises(ConfigError, match="unknown compute dtype 'fp8'"):
        build_bank_ray(ws, make_tiny_engine(), compute_dtype="fp8")
    assert not ws.banks_dir.exists() or not any(ws.banks_dir.glob("bank-*"))  # nothing written
