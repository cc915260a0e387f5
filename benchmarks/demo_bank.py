"""The demo bank as the command line builds it: `regrad bank stats --json` of a fresh workspace.

Runs the real CLI in a fresh workspace under /tmp (removed afterwards): `regrad ingest` of the
demo corpus, `regrad build-bank` with the workspace's defaults (codec, group size, batch size,
learner checkpoint and its stored tensors), then `regrad bank stats --json`. The key figure is
``ratio_vs_fp32``: 4 bytes x every value of the learner's gradient / mean bytes per stored row
(the issue's check: >= 16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _common import DEMO_CORPUS, ROOT, emit, log, parser, setup, temp_dir, timer


def regrad(args: list[str], env: dict) -> str:
    cmd = [sys.executable, "-m", "regrad_cli", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"`regrad {' '.join(args)}` failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--codec", default=None, help="build-bank --codec (default: the workspace default)")
    p.add_argument("--checkpoint", default=None,
                   help="build-bank --checkpoint: another learner (e.g. a `regrad learner snapshot` of a run); "
                        "a key-map learner's bank stores only the tensors its step uses")
    p.add_argument("--name", default=None, help="result file name (default: demo_bank[_CODEC])")
    args = p.parse_args()
    setup(args)
    with temp_dir("regrad-bench-demo-bank-") as tmp:
        env = dict(os.environ, REGRAD_WORKSPACE=str(tmp / "ws"), PYTHONPATH=str(ROOT))
        env.pop("REGRAD_BANK_URI", None)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        log("regrad ingest (demo corpus)")
        regrad(["ingest", str(DEMO_CORPUS), "--json"], env)
        log("regrad build-bank")
        with timer() as t:
            build = json.loads(regrad(["build-bank", "--json"] + (["--codec", args.codec] if args.codec else [])
                                      + (["--checkpoint", args.checkpoint] if args.checkpoint else []), env))
        log("regrad bank stats --json")
        stats = json.loads(regrad(["bank", "stats", "--json", "--bank", build["bank"]], env))
    print(json.dumps({k: stats.get(k) for k in ("rows", "bytes_per_doc", "fp32_bytes_per_doc", "ratio_vs_fp32",
                                                "ratio_vs_fp32_stored", "codec", "format_version", "layout")}, indent=2))
    emit({
        "benchmark": "demo_bank",
        "ratio_vs_fp32": stats.get("ratio_vs_fp32"),
        "ratio_vs_fp32_stored": stats.get("ratio_vs_fp32_stored"),
        "bank_stats": {k: v for k, v in stats.items() if k != "path"},
        "build_bank": {k: v for k, v in build.items() if k != "bank"},
        "build_wall_s": t["s"],
        "checkpoint": args.checkpoint,
    }, args.out, args, name=args.name or "demo_bank" + (f"_{args.codec}" if args.codec else ""))


if __name__ == "__main__":
    sys.exit(main())
