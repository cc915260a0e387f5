"""meta-train --precision (bf16 autocast of a step's model passes) and training/gpu_check.py.

CPUs run bf16 autocast too, so the bf16 path is checked here against float32 on the tiny random
Llama; the CUDA path (training/gpu.sh) runs the same code on another device and is not tested
here.

Measured on the tiny model (3 steps with the locality KL and a dev check; the plain learner
second order, and a key map with the float8 factor cache): bf16 moved each step's losses and the
dev NLLs by at most 1.2e-4 relative, and the cosine between the two runs' updates was at least
0.98 per tensor. The tests allow 1e-3 (8 times the largest measured; bf16 rounds each product
operand by up to 2^-9 = 2e-3, and a loss averages many such products) and 0.9.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from regrad_cli.learner.lora import Learner
from regrad_cli.learning.metatrain import MetaTrainConfig, meta_train
from regrad_cli.learning.train_state import read_state

from conftest import REPO, FakeEmbedder, FakeTokenizer, make_tiny_llama
from test_train_state import _data

LOSS_RTOL = 1e-3
UPDATE_COS = 0.9
GENERAL = (files("regrad_cli") / "data" / "general_text.txt").read_text(encoding="utf-8")


def _train(tmp_path, name, *, key_map=False, steps=3, resume=False, stop_after=None, **kw):
    """A few meta-steps of the tiny Llama with a locality KL and a dev check at the end; returns
    (learner tensors before, after, log.json, the summary)."""
    from regrad_cli.learner.transform import KeyMap

    model = make_tiny_llama(seed=0)
    learner = Learner.for_model(model).init_(seed=0, b_std=0.05, alpha_init=0.5)
    if key_map:
        learner.transform = KeyMap.identity(learner)
        kw = dict(first_order=True, freeze_phi=True, transform_lr=1e-2, factor_cache_gb=0.1,
                  factor_cache_dtype="float8", **kw)
    data = f"jsonl:{_data(tmp_path)}"
    cfg = MetaTrainConfig(**{**dict(train=[data], dev=[data], out=str(tmp_path / name), k=2, steps=steps,
                                    meta_batch=2, eval_every=steps, dev_limit=4, max_new_tokens=4, save_every_s=0,
                                    max_doc_tokens=48, energy_docs=0, locality=1.0), **kw})
    learner.attach(model)
    before = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    summary = meta_train(cfg, model, FakeTokenizer(), FakeEmbedder(), learner=learner, general_text=GENERAL,
                         resume=resume, stop_after=stop_after)
    after = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    return before, after, json.loads((tmp_path / name / "log.json").read_text()), summary


def _without_times(records):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]


def test_float32_is_the_run_without_the_option(tmp_path, monkeypatch):
    """float32 (the default) and auto on a CPU without native bf16 run no autocast: the same
    tensors and log, bit for bit, as a run that does not name a precision."""
    import regrad_cli.learner.gradients as gradients

    monkeypatch.setattr(gradients, "fast_bf16", lambda device: False)
    _, plain, log_plain, _ = _train(tmp_path, "plain", steps=2)
    for precision in ("float32", "auto"):
        _, other, log, summary = _train(tmp_path, precision, steps=2, precision=precision)
        assert all(torch.equal(plain[k], other[k]) for k in plain)
        assert _without_times(log["train"]) == _without_times(log_plain["train"])
        assert log["config"]["precision"] == precision and summary["precision"] == "float32"
    assert log_plain["config"]["precision"] == "float32"
    assert "precision" not in log_plain["train"][-1]


@pytest.mark.parametrize("key_map", [False, True], ids=["second-order", "key-map-float8-cache"])
def test_bfloat16_autocast_follows_float32(tmp_path, key_map, caplog):
    """bf16 autocast changes every loss a little (so it ran) and no update's direction; the
    log says which steps ran in bf16. Under autocast the prefix cache (float32 only) is off."""
    extra = {} if key_map else {"prefix_cache_gb": 0.1}
    start, f32, log_a, _ = _train(tmp_path, "f32", key_map=key_map, **extra)
    caplog.set_level("WARNING", logger="regrad")
    _, bf16, log_b, summary = _train(tmp_path, "bf16", key_map=key_map, precision="bfloat16", **extra)
    assert log_b["config"]["precision"] == "bfloat16" and summary["precision"] == "bfloat16"
    assert all(r["precision"] == "bfloat16" for r in log_b["train"]) and len(log_b["train"]) == 3
    if not key_map:
        assert "prefix_cache" in log_a["train"][-1] and "prefix_cache" not in log_b["train"][-1]
        assert "--prefix-cache-gb is off under bfloat16 autocast" in caplog.text
    pairs = [(ra[k], rb[k]) for ra, rb in zip(log_a["train"], log_b["train"]) for k in ("loss", "nll", "doc_nll")]
    pairs += [(da[m]["nll"], db[m]["nll"]) for da, db in zip(log_a["dev"], log_b["dev"]) for m in ("param", "param+context")]
    assert any(a != b for a, b in pairs)
    for a, b in pairs:
        assert abs(b - a) <= LOSS_RTOL * abs(a), (a, b)
    moved = 0
    for name, t0 in start.items():
        ua, ub = (f32[name] - t0).flatten().double(), (bf16[name] - t0).flatten().double()
        if ua.norm() > 0:
            moved += 1
            assert float(ua @ ub) / float(ua.norm() * ub.norm()) > UPDATE_COS, name
    assert moved >= 9  # alpha of every tensor and T; with a key map its K and V, else phi


def test_a_run_continued_in_bfloat16_records_the_switch(tmp_path):
    """A state written before --precision existed (no such key in its config) continued in bf16:
    log.json's config_changes records float32 -> bfloat16 at that step (the default it ran in)."""
    _train(tmp_path, "run", steps=2)
    state = read_state(tmp_path / "run" / "state.pt")
    del state["history"]["config"]["precision"]
    torch.save(state, tmp_path / "run" / "state.pt")
    _, _, log, _ = _train(tmp_path, "run", steps=3, resume=True, precision="bfloat16")
    (change,) = log["config_changes"]
    assert change["step"] == 2 and change["changed"]["precision"] == ["float32", "bfloat16"]
    assert "precision" not in log["train"][1] and log["train"][2]["precision"] == "bfloat16"


def _gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "training" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_compares_tensors_alone_and_together():
    """Relative L2 of the final values and the cosine of the updates, per tensor and for the
    whole learner ('*'); tensors below min_values (the one-value step sizes) only within it."""
    start = {"w": torch.ones(100), "alpha": torch.zeros(())}
    a = {"w": start["w"] + 0.1, "alpha": torch.tensor(0.01)}
    b = {"w": start["w"] - 0.1, "alpha": torch.tensor(0.01)}
    cmp = _gpu_check().compare(start, a, b, min_values=64)
    assert cmp["judged"] == ["w", "*"]
    w = cmp["tensors"]["w"]
    assert w["update_cos"] == pytest.approx(-1.0) and w["rel_l2_final"] == pytest.approx(0.2 / 1.1)
    assert cmp["tensors"]["alpha"]["update_cos"] == pytest.approx(1.0)
    assert cmp["tensors"]["*"]["values"] == 101


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_gpu_script_refuses_without_cuda():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(REPO / "training" / "gpu.sh")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU here" in lines[0] and "nothing done" in lines[0]


@pytest.mark.slow
def test_gpu_check_runs_a_tiny_run_on_cpu_in_both_precisions(tmp_path):
    """training/gpu_check.py as training/gpu.sh runs it, with cpu:bfloat16 in place of
    cuda:bfloat16 and a tiny fake:llama run in place of training/long: within tolerance, the
    JSON written; a copy that fails stops the check with exit 1."""
    # TMPDIR: the copies the failing check keeps for inspection stay inside tmp_path.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    run = [sys.executable, "-m", "regrad_cli", "meta-train", "--model", "fake:llama", "--train", "synthetic:1:4",
           "--k", "2", "--meta-batch", "2", "--max-doc-tokens", "48", "--locality", "1"]
    made = subprocess.run([*run, "--out", str(tmp_path / "run"), "--steps", "2", "--eval-every", "100000"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    check = [sys.executable, str(REPO / "training" / "gpu_check.py"), "--state", str(tmp_path / "run" / "state.pt"),
             "--a", "cpu:float32"]
    done = subprocess.run([*check, "--b", "cpu:bfloat16", "--out", str(tmp_path / "ok.json"), "--", *run,
                           "--steps", "100", "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "ok.json").read_text())
    assert result["ok"] and result["start_step"] == 2 and [s["step"] for s in result["steps"]] == [3, 4, 5]
    assert result["runs"]["b"]["precision"] == "bfloat16" and "--stop-after" in result["runs"]["b"]["command"]
    assert 0 < result["worst"]["loss_rel_diff"] <= LOSS_RTOL and result["worst"]["update_cos"] > UPDATE_COS
    failed = subprocess.run([*check, "--b", "cpu:float16", "--out", str(tmp_path / "bad.json"), "--", *run,
                             "--steps", "100", "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert failed.returncode == 1 and "gpu_check: FAILED" in failed.stderr
    assert json.loads((tmp_path / "bad.json").read_text())["ok"] is False
    assert len(list(tmp_path.glob("regrad-gpu-check-*"))) == 1  # kept: the failed one only
