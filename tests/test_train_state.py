"""state.pt (regrad_cli/learning/train_state.py): versioned, small, resumable, refused when damaged.

Every run here is the tiny Llama for a few meta-steps without dev checks (seconds): a run stopped
after step 3 holds step 2 in state.pt (saved every 2 steps) and is resumed to step 4.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from regrad_cli.errors import RegradError
from regrad_cli.learner.lora import Learner
from regrad_cli.learning import train_state
from regrad_cli.learning.metatrain import MetaTrainConfig, meta_train
from regrad_cli.learning.train_state import STATE_FORMAT, STATE_VERSION, read_state

from conftest import FakeEmbedder, FakeTokenizer, make_tiny_llama
from reliability_helpers import run_cli
from test_metatrain import ITEMS


class _Stop(Exception):
    pass


def _data(tmp_path):
    path = tmp_path / "d.jsonl"
    if not path.exists():
        with open(path, "w") as fh:
            for i, it in enumerate(ITEMS * 3):
                fh.write(json.dumps({"id": f"{it.id}-{i}", "question": it.question, "answers": it.answers,
                                     "documents": it.documents}) + "\n")
    return path


def _run(tmp_path, name, *, stop_after=None, resume=False, init=None, **kw):
    """Four meta-steps into tmp_path/name (state.pt every 2 steps); ``stop_after``: stop there."""
    model = make_tiny_llama(seed=0)
    learner = Learner.load(init).attach(model) if init else None
    cfg = MetaTrainConfig(**{**dict(train=[f"jsonl:{_data(tmp_path)}"], out=str(tmp_path / name), k=2, steps=4,
                                    meta_batch=2, eval_every=2, save_every_s=0, max_doc_tokens=48, b_std=0.05,
                                    energy_docs=0, combine="score"), **kw})

    def progress(step, total, rec):
        if step == stop_after:
            raise _Stop

    if stop_after is not None:
        with pytest.raises(_Stop):
            meta_train(cfg, model, FakeTokenizer(), FakeEmbedder(), learner=learner, progress=progress)
        return None
    meta_train(cfg, model, FakeTokenizer(), FakeEmbedder(), learner=learner, resume=resume)
    return Learner.load(tmp_path / name / "last")


def _assert_same(a: Learner, b: Learner, atol: float = 0.0):
    for sa, sb in zip(a.state_dict().items(), b.state_dict().items()):
        assert sa[0] == sb[0]
        torch.testing.assert_close(sa[1], sb[1], rtol=0, atol=atol, msg=sa[0])


def test_state_records_its_format_and_resumes_exactly(tmp_path):
    straight = _run(tmp_path, "a")
    _run(tmp_path, "b", stop_after=3)
    raw = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert raw["format"] == f"{STATE_FORMAT}/{STATE_VERSION}" and raw["step"] == 2
    assert raw["phi"]["stored"] and any(k.startswith("phi.") for k in raw["learner"])
    # The tiny model's tensors are all below MOMENTS_MIN_VALUES: float32 moments, an exact resume.
    _assert_same(straight, _run(tmp_path, "b", resume=True))


def test_unversioned_state_of_earlier_releases_resumes(tmp_path):
    """A state.pt as regrad wrote it before the format had a version (keys learner, opt, sched,
    step, best_f1 and history; every tensor float32, phi included) is read through migration
    m001_versioned and continues the run exactly."""
    straight = _run(tmp_path, "a")
    _run(tmp_path, "b", stop_after=3)
    path = tmp_path / "b" / "state.pt"
    raw = torch.load(path, weights_only=True)
    legacy = {k: raw[k] for k in ("learner", "opt", "sched", "step", "best_f1", "history")}
    assert all(v.dtype == torch.float32 for e in legacy["opt"]["state"].values() for k, v in e.items() if k != "step")
    torch.save(legacy, path)
    state = read_state(path)
    assert state["format"] == f"{STATE_FORMAT}/1.0" and state["phi"]["stored"]
    assert "m001_versioned" in train_state.STATE_MIGRATIONS.names
    _assert_same(straight, _run(tmp_path, "b", resume=True))
    # The next save wrote the current format.
    assert torch.load(path, weights_only=True)["format"] == f"{STATE_FORMAT}/{STATE_VERSION}"


def test_frozen_phi_is_not_stored_but_checked_on_resume(tmp_path):
    """--freeze-phi: state.pt leaves phi out and records its sha256; a resume from the same init
    continues exactly, one from another init is refused with one line."""
    init = Learner.for_model(make_tiny_llama(seed=0)).init_(seed=0, b_std=0.05, alpha_init=0.5)
    init.save(tmp_path / "init")
    kw = dict(freeze_phi=True, init_checkpoint=str(tmp_path / "init"))
    straight = _run(tmp_path, "a", **kw)
    _run(tmp_path, "b", stop_after=3, **kw)
    raw = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert not raw["phi"]["stored"] and not any(k.startswith("phi.") for k in raw["learner"])
    assert raw["phi"]["sha256"] == train_state.phi_sha256(init) and raw["phi"]["init"] == str(tmp_path / "init")
    _assert_same(straight, _run(tmp_path, "b", resume=True, **kw))
    for n in straight.names:
        assert torch.equal(straight.tensor(n), init.tensor(n))

    other = Learner.for_model(make_tiny_llama(seed=0)).init_(seed=1, b_std=0.05, alpha_init=0.5)
    other.save(tmp_path / "other")
    _run(tmp_path, "c", stop_after=3, **kw)
    with pytest.raises(RegradError, match=r"phi \(frozen, not stored\) came from --init .*init.*same --init"):
        _run(tmp_path, "c", resume=True, **{**kw, "init_checkpoint": str(tmp_path / "other")})


# How far a resume from bfloat16 moments may land from the uninterrupted run: this share of the
# distance the two steps after the resume moved each tensor (measured: at most 0.37 %; bfloat16
# keeps 8 bits of mantissa, so each moment is off by at most 0.4 %).
BF16_RESUME_SHARE = 0.02


def test_bfloat16_moments_resume_close_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """Every Adam moment stored in bfloat16 (the threshold lowered to 0: the tiny model's tensors
    are all small): the resumed run ends within BF16_RESUME_SHARE of the uninterrupted one,
    measured against what steps 3 and 4 moved, and not exactly on it (the moments were rounded)."""
    monkeypatch.setattr(train_state, "MOMENTS_MIN_VALUES", 0)
    straight = _run(tmp_path, "a")
    _run(tmp_path, "b", stop_after=3)
    raw = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert {v.dtype for e in raw["opt"]["state"].values() for k, v in e.items() if k != "step"} == {torch.bfloat16}
    at_2 = raw["learner"]
    resumed = _run(tmp_path, "b", resume=True).state_dict()
    worst = 0.0
    for name, want in straight.state_dict().items():
        moved = float((want - at_2[name]).abs().max())
        off = float((resumed[name] - want).abs().max())
        assert moved > 0 and off <= BF16_RESUME_SHARE * moved, (name, off, moved)
        worst = max(worst, off / moved)
    assert worst > 0  # the moments were rounded, and it shows


def test_moments_of_large_tensors_are_bfloat16(tmp_path):
    learner = Learner.for_model(make_tiny_llama(seed=0)).init_(seed=0)
    params = [learner.phi[k] for k in learner.phi.keys()] + [torch.nn.Parameter(torch.zeros(64, 32))]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train_state.write_state(tmp_path / "state.pt", learner=learner, opt=opt, sched=sched, step=1, best_f1=-1.0,
                            history={"train": [], "dev": []})
    raw = torch.load(tmp_path / "state.pt", weights_only=True)
    dtypes = {e["exp_avg"].numel(): e["exp_avg"].dtype for e in raw["opt"]["state"].values()}
    assert dtypes[64 * 32] == torch.bfloat16
    assert all(d == torch.float32 for n, d in dtypes.items() if n < train_state.MOMENTS_MIN_VALUES)
    assert not list(tmp_path.glob("*.tmp"))  # written through files.atomic_path


class _Hostile:
    def __reduce__(self):
        return (print, ("this must never run",))


def _damaged_states(tmp_path):
    good = {"format": f"{STATE_FORMAT}/1.0", "step": 2, "best_f1": -1.0, "history": {"train": [], "dev": []},
            "learner": {}, "phi": {"stored": True}, "opt": {}, "sched": {}}
    newer = {**good, "format": f"{STATE_FORMAT}/{STATE_VERSION.major + 1}.0"}
    cases = {
        "truncated": (None, "cannot read"),
        "not a dict": ([1, 2, 3], "holds a list, not a dict"),
        "newer major": (newer, f"format {STATE_VERSION.major + 1}.0 is newer than this regrad understands"),
        "another format": ({**good, "format": "something-else/1.0"}, "is not a meta-training state"),
        "no keys": ({"step": 1}, "is not a meta-training state"),
        "bad step": ({**good, "step": "two"}, "is damaged: 'step'"),
        "code": (None, "cannot read"),
        "code saved by torch": ({"step": _Hostile()}, "which regrad never unpickles"),
    }
    for name, (obj, says) in cases.items():
        path = tmp_path / name.replace(" ", "-") / "state.pt"
        path.parent.mkdir()
        if name == "truncated":
            torch.save(good, path)
            path.write_bytes(path.read_bytes()[:200])
        elif name == "code":
            path.write_bytes(pickle.dumps({"step": _Hostile()}))
        else:
            torch.save(obj, path)
        yield name, path, says


def test_damaged_state_is_one_error_line_through_the_cli(tmp_path, capsys, monkeypatch):
    """`regrad meta-train --resume` on a truncated, foreign, hostile or newer state.pt: exit 1 and
    one line naming the file, before any data loads; nothing pickled runs."""
    for name, path, says in _damaged_states(tmp_path):
        code, out, err = run_cli(["meta-train", "--train", "synthetic:1:2", "--model", "fake:llama",
                                  "--out", path.parent, "--resume"], capsys, monkeypatch)
        assert code == 1, (name, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and str(path) in lines[0], (name, err)
        assert says in lines[0], (name, lines[0])
        assert "this must never run" not in out + err


GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.mark.parametrize("folder", ["metatrain_state_v0", "metatrain_state_v1_0"])
def test_golden_states_resume_to_the_uninterrupted_run(tmp_path, folder, caplog):
    """state.pt of every format (tests/golden/README.md: v0 written before the format had a
    version, by commit 8d1f911) resumes to where today's uninterrupted run ends."""
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("make_golden_metatrain_state",
                                                  GOLDEN / "make_golden_metatrain_state.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    run = tmp_path / "run"
    shutil.copytree(GOLDEN / folder, run)
    data = f"jsonl:{run / 'd.jsonl'}"
    golden_log = read_state(run / "state.pt")["history"]["train"]
    caplog.set_level("INFO", logger="regrad")
    for out, resume in ((tmp_path / "straight", False), (run, True)):
        meta_train(MetaTrainConfig(train=[data], out=str(out), **maker.CONFIG), make_tiny_llama(seed=0),
                   FakeTokenizer(), FakeEmbedder(), resume=resume)
    # Not bit for bit: the golden steps 1-2 may have run on another CPU than today's, and by code
    # whose answer loss ran the LM head over every prompt token (today: only at answer tokens,
    # the same losses up to float rounding, tests/test_generation.py).
    _assert_same(Learner.load(tmp_path / "straight" / "last"), Learner.load(run / "last"), atol=1e-4)
    assert "resumed from step 2" in caplog.text
    # The golden log continued: its two steps, then the two the resumed run took.
    train = json.loads((run / "log.json").read_text())["train"]
    assert train[:2] == golden_log and [r["step"] for r in train] == [1, 2, 3, 4]


def test_snapshot_writes_the_learner_of_a_live_run(tmp_path, capsys, monkeypatch):
    """`regrad learner snapshot RUN --out DIR`: the learner of RUN/state.pt (phi frozen, so rebuilt
    from the run's --init) as a checkpoint, equal to what the run itself saves at that step."""
    init = Learner.for_model(make_tiny_llama(seed=0)).init_(seed=0, b_std=0.05, alpha_init=0.5)
    init.save(tmp_path / "init")
    kw = dict(freeze_phi=True, init_checkpoint=str(tmp_path / "init"), steps=2)
    finished = _run(tmp_path, "a", **kw)  # state.pt and last/ both at step 2
    code, out, err = run_cli(["learner", "snapshot", tmp_path / "a", "--out", tmp_path / "snap", "--json"],
                             capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["step"] == 2
    snap = Learner.load(tmp_path / "snap")
    _assert_same(finished, snap)
    assert json.loads((tmp_path / "snap" / "learner.json").read_text())["trained"]["snapshot_of"] == str(tmp_path / "a")
    # Never over a checkpoint; a directory without state.pt, or a damaged one, is one line.
    code, _, err = run_cli(["learner", "snapshot", tmp_path / "a", "--out", tmp_path / "snap"], capsys, monkeypatch)
    assert code == 1 and "already holds" in err
    code, _, err = run_cli(["learner", "snapshot", tmp_path, "--out", tmp_path / "s2"], capsys, monkeypatch)
    assert code == 1 and "does not exist" in err
    (tmp_path / "a" / "state.pt").write_bytes(b"\x80\x04garbage")
    code, _, err = run_cli(["learner", "snapshot", tmp_path / "a", "--out", tmp_path / "s3"], capsys, monkeypatch)
    assert code == 1 and "cannot read" in err and "Traceback" not in err


def test_stop_after_saves_the_state_and_resume_continues(tmp_path):
    """meta_train(stop_after=N) (`--stop-after N`): N steps of this session, then stopped as
    SIGTERM stops it: state.pt saved, no last/; --resume continues for N more."""
    cfg = MetaTrainConfig(train=[f"jsonl:{_data(tmp_path)}"], out=str(tmp_path / "run"), k=2, steps=5, meta_batch=2,
                          eval_every=100, save_every_s=0, max_doc_tokens=48, b_std=0.05, energy_docs=0)
    summary = meta_train(cfg, make_tiny_llama(seed=0), FakeTokenizer(), FakeEmbedder(), stop_after=2)
    assert summary["stopped_at"] == 2 and summary["stopped_by"] == "--stop-after"
    assert read_state(tmp_path / "run" / "state.pt")["step"] == 2 and not (tmp_path / "run" / "last").exists()
    summary = meta_train(cfg, make_tiny_llama(seed=0), FakeTokenizer(), FakeEmbedder(), resume=True, stop_after=2)
    assert summary["stopped_at"] == 4
    assert [r["step"] for r in json.loads((tmp_path / "run" / "log.json").read_text())["train"]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_stops_after_the_step_with_the_state_saved_and_resume_finishes(tmp_path):
    """`regrad meta-train` sent SIGTERM (a scheduler's stop, `timeout`, a session's end) finishes
    its step, saves state.pt and exits 143 without a last/ checkpoint; --resume then finishes."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "regrad_cli", "-v", "meta-train", "--model", "fake:llama", "--train", "synthetic:1:4",
           "--out", str(out), "--k", "2", "--meta-batch", "2", "--eval-every", "100000", "--save-every-s", "100000",
           "--max-doc-tokens", "48"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--steps", "100000"], stderr=subprocess.PIPE, text=True, env=env,
                            stdout=subprocess.DEVNULL)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "step 2/100000" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=600)[1]
    err = "".join(seen) + rest
    assert proc.returncode == 143, err[-2000:]
    assert "stopped after step" in err and "--resume continues" in err
    from regrad_cli.learning.train_state import read_state
    state = read_state(out / "state.pt")
    stopped = state["step"]
    assert 2 <= stopped < 100000 and [r["step"] for r in state["history"]["train"]] == list(range(1, stopped + 1))
    assert json.loads((out / "log.json").read_text())["train"][-1]["step"] == stopped
    assert not (out / "last").exists()
    done = subprocess.run([*cmd, "--steps", str(stopped + 1), "--resume"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "last" / "learner.json").exists()
    assert json.loads((out / "log.json").read_text())["train"][-1]["step"] == stopped + 1
