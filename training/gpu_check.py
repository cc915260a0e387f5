"""Check that a meta-training run continues the same on another device or precision.

Copies RUN's ``state.pt`` into two temporary run folders and continues each for ``--steps``
meta-steps with the same command, once as ``--a`` (default cpu:float32, the reference) and once as
``--b`` (default cuda:bfloat16); then compares the per-step losses the two logs recorded and the
learner tensors the two states hold (each tensor's relative L2 difference, and the cosine between
the two updates). Writes the comparison as JSON and exits 1 when it is out of tolerance.

    python training/gpu_check.py --state training/long/state.pt --out gpu_check.json -- training/long/run.sh

COMMAND is the run's own command (``training/long/run.sh``, or ``regrad meta-train ... --resume``):
it must continue the run in ``--out`` and take options appended to it. Each copy runs COMMAND
``--out COPY --device D --precision P --stop-after STEPS --eval-every 1000000`` (the last: no dev
check inside the compared steps). The two runs draw the same batches (the data position depends
only on seed and step) and start from the same state: any difference is the device's and the
precision's. Used by ``training/gpu.sh``; ``tests/test_precision.py`` runs it on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Defaults (docs/meta-training.md, "On a GPU"): wide enough for bf16 rounding, narrow enough to
# catch a broken pass (another state, a lost factor, a NaN). Tensors with fewer values than
# --min-values (the step sizes and the temperature: one value each, whose "cosine" is only a
# sign) are judged only as part of the whole learner, all tensors laid end to end.
LOSS_RTOL = 0.05
FINAL_RTOL = 0.05
UPDATE_COS = 0.9
MIN_VALUES = 64


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [options] -- COMMAND [ARGS...]")
    p.add_argument("--state", type=Path, default=Path("training/long/state.pt"), help="the run's state.pt")
    p.add_argument("--steps", type=int, default=3, help="meta-steps each copy takes")
    p.add_argument("--a", default="cpu:float32", help="reference DEVICE:PRECISION")
    p.add_argument("--b", default="cuda:bfloat16", help="compared DEVICE:PRECISION")
    p.add_argument("--out", type=Path, required=True, help="where the comparison JSON goes")
    p.add_argument("--loss-rtol", type=float, default=LOSS_RTOL, help="largest relative loss difference per step")
    p.add_argument("--final-rtol", type=float, default=FINAL_RTOL,
                   help="largest relative L2 difference of the final learner tensors")
    p.add_argument("--update-cos", type=float, default=UPDATE_COS,
                   help="smallest cosine between the two runs' updates (final - start)")
    p.add_argument("--min-values", type=int, default=MIN_VALUES,
                   help="tensors with fewer values are judged only within the whole learner")
    p.add_argument("--keep", action="store_true", help="keep the two run copies (their folder is printed)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = p.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.command:
        p.error("give the run's command after --")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def run_copies(args, work: Path) -> dict:
    """Both copies at once (one may run on the CPU while the other runs on the GPU); their
    output goes to LABEL.log beside each copy."""
    procs = {}
    for label in ("a", "b"):
        device, _, precision = getattr(args, label).partition(":")
        folder = work / label
        folder.mkdir()
        shutil.copy2(args.state, folder / "state.pt")
        cmd = [*args.command, "--out", str(folder), "--device", device, "--precision", precision or "float32",
               "--stop-after", str(args.steps), "--eval-every", "1000000"]
        log = open(work / f"{label}.log", "w")
        procs[label] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, cmd, time.time())
    runs = {}
    for label, (proc, log, cmd, t0) in procs.items():
        rc = proc.wait()
        log.close()
        device, _, precision = getattr(args, label).partition(":")
        runs[label] = {"device": device, "precision": precision or "float32", "command": cmd, "returncode": rc,
                       "wall_s": round(time.time() - t0, 1)}
    return runs


def compare(start: dict, a: dict, b: dict, min_values: int) -> dict:
    """Per learner tensor, and for all of them laid end to end ("*"): the relative L2 difference
    of the final values (b against a), and the cosine between the two updates (final - start).
    ``judged``: the tensors the tolerances apply to (``min_values`` values or more), and "*"."""
    import torch

    out, flat = {}, {"a": [], "b": [], "0": []}
    for name, ta in a.items():
        ta, tb, t0 = ta.double().flatten(), b[name].double().flatten(), start[name].double().flatten()
        out[name] = _pair(ta, tb, t0)
        for key, t in (("a", ta), ("b", tb), ("0", t0)):
            flat[key].append(t)
    judged = [n for n, r in out.items() if r["values"] >= min_values]
    if out:
        out["*"] = _pair(*(torch.cat(flat[k]) for k in ("a", "b", "0")))
        judged.append("*")
    return {"tensors": out, "judged": judged}


def _pair(ta, tb, t0) -> dict:
    ua, ub = ta - t0, tb - t0
    return {"values": ta.numel(), "rel_l2_final": _rel(tb - ta, ta), "update_norm_a": float(ua.norm()),
            "rel_l2_update": _rel(ub - ua, ua), "update_cos": _cos(ua, ub)}


def _rel(diff, ref) -> float:
    n = float(ref.norm())
    return float(diff.norm()) / n if n > 0 else float(diff.norm())


def _cos(u, v) -> float:
    nu, nv = float(u.norm()), float(v.norm())
    return float(u @ v) / (nu * nv) if nu > 0 and nv > 0 else (1.0 if nu == nv == 0 else 0.0)


def step_records(folder: Path, start_step: int) -> list[dict]:
    log = json.loads((folder / "log.json").read_text())
    return [r for r in log["train"] if r["step"] > start_step]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from regrad_cli.learning.train_state import read_state

    start = read_state(args.state)
    work = Path(tempfile.mkdtemp(prefix="regrad-gpu-check-"))
    try:
        runs = run_copies(args, work)
        result = {"state": str(args.state), "start_step": start["step"], "steps": args.steps, "runs": runs,
                  "tolerances": {"loss_rtol": args.loss_rtol, "final_rtol": args.final_rtol,
                                 "update_cos": args.update_cos, "min_values": args.min_values}}
        failures = [f"{label} ({r['device']}, {r['precision']}) exited {r['returncode']}: see {work / label}.log"
                    for label, r in runs.items() if r["returncode"] != 0]
        if not failures:
            failures = _judge(args, start, work, result)
        result["ok"] = not failures
        result["failures"] = failures
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        if failures:
            for label in ("a", "b"):
                if runs[label]["returncode"] != 0:
                    tail = (work / f"{label}.log").read_text(errors="replace").splitlines()[-15:]
                    print(f"--- {label}.log (last lines) ---", *tail, sep="\n", file=sys.stderr)
            print(f"gpu_check: FAILED ({'; '.join(failures)}); details in {args.out}", file=sys.stderr)
            args.keep = True
            return 1
        worst = result["worst"]
        print(f"gpu_check: ok over {args.steps} steps from step {start['step']}: losses within "
              f"{worst['loss_rel_diff']:.2e} (tolerance {args.loss_rtol}), final tensors within "
              f"{worst['rel_l2_final']:.2e} ({args.final_rtol}), update cosine at least {worst['update_cos']:.4f} "
              f"({args.update_cos}); {args.out}")
        return 0
    finally:
        if args.keep:
            print(f"gpu_check: the run copies are in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _judge(args, start: dict, work: Path, result: dict) -> list[str]:
    """Fill ``result`` with the per-step and per-tensor comparison; the failures, if any."""
    from regrad_cli.learning.train_state import read_state

    recs = {label: step_records(work / label, start["step"]) for label in ("a", "b")}
    failures = []
    if [r["step"] for r in recs["a"]] != [r["step"] for r in recs["b"]] or len(recs["a"]) != args.steps:
        return [f"the copies logged steps {[r['step'] for r in recs['a']]} and {[r['step'] for r in recs['b']]}, "
                f"not {args.steps} each"]
    steps = []
    for ra, rb in zip(recs["a"], recs["b"]):
        row = {"step": ra["step"]}
        for key in ("loss", "nll", "doc_nll", "kl"):
            row[key] = [ra.get(key), rb.get(key)]
        row["loss_rel_diff"] = abs(rb["loss"] - ra["loss"]) / max(abs(ra["loss"]), 1e-12)
        if not math.isfinite(rb["loss"]) or not row["loss_rel_diff"] <= args.loss_rtol:
            failures.append(f"step {ra['step']}: loss {ra['loss']:.6g} against {rb['loss']:.6g}")
        steps.append(row)
    a, b = (read_state(work / label / "state.pt")["learner"] for label in ("a", "b"))
    cmp = compare(start["learner"], a, b, args.min_values)
    judged = [cmp["tensors"][n] for n in cmp["judged"]]
    for name in cmp["judged"]:
        r, what = cmp["tensors"][name], "the whole learner" if name == "*" else name
        if not r["rel_l2_final"] <= args.final_rtol:
            failures.append(f"{what}: final values differ by {r['rel_l2_final']:.3g} (relative L2)")
        # A tensor that did not move in the reference has no direction to compare.
        if r["update_norm_a"] > 0 and not r["update_cos"] >= args.update_cos:
            failures.append(f"{what}: update cosine {r['update_cos']:.3f}")
    result.update(steps=steps, **cmp, worst={
        "loss_rel_diff": max(s["loss_rel_diff"] for s in steps),
        "rel_l2_final": max(r["rel_l2_final"] for r in judged),
        "update_cos": min(r["update_cos"] for r in judged if r["update_norm_a"] > 0)})
    return failures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
