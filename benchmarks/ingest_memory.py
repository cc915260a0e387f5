"""Peak memory of `regrad ingest` on hostile file shapes, against the same process's baseline.

Each shape is one file under the default `--max-file-mb` (20): 600 000 tiny JSONL records
(12.6 MB), one 19 MB JSONL record, a 19 MB text file of one line without a newline, a 19 MB
JSONL file of one line that is not JSON (skipped), a 19 MB Markdown file of many paragraphs, and
600 000 JSONL lines that are not records (skipped, the reasons capped). Each is ingested into a
fresh workspace by a fresh child process that first loads the models (the tokenizer and the
embedder, as `regrad ingest` does) and lancedb; the child reports its resident memory just before
the ingest (the baseline) and its peak (VmHWM, reset after loading where the kernel allows), and
the difference is the figure. The tiny-records file is then ingested a second time, unchanged,
by another fresh child (what a second `regrad ingest` costs: the table's bookkeeping is read).

By default the models are the fake ones (`fake:llama`'s byte tokenizer, one token per byte, so
the most chunks per MB; `fake:hash-32`): what the issue measured, and quick. `--model` and
`--embedder` take the bundled ones (`bundled`, `bundled`) instead. `--quick` makes every shape
10x smaller. `--as-mb N` runs each child under RLIMIT_AS = its address space at the baseline +
N MB (what tests/test_ingest_memory.py does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, emit, log, parser, print_table, temp_dir

MB = 10**6
WORDS = ("The observatory on Velmora Ridge was founded in 1887 and its first director was Ada Quell. "
         "Her notebooks describe the comet of that winter in careful detail. ")


def write_shape(name: str, path: Path, scale: float) -> Path:
    """Write the file of shape ``name`` under ``path`` (a directory); returns the file."""
    size = int(19 * MB * scale)
    path.mkdir(parents=True, exist_ok=True)
    if name in ("tiny-records", "bad-records"):
        out = path / f"{name}.jsonl"
        n = int(600_000 * scale)
        with open(out, "w", encoding="utf-8") as fh:
            for i in range(n):
                # 21 bytes a line: 600 000 lines are 12.6 MB.
                fh.write(f'{{"text": "n{i:07d}"}}\n' if name == "tiny-records" else f'["n{i:010d}"]\n')
        return out
    text = (WORDS * (size // len(WORDS) + 1))
    if name == "one-record":
        out = path / "one-record.jsonl"
        head, tail = '{"id": "big", "text": "', '"}\n'
        out.write_text(head + text[: size - len(head) - len(tail)] + tail, encoding="utf-8")
    elif name == "one-line-text":
        out = path / "one-line.txt"
        out.write_text(text[:size], encoding="utf-8")
    elif name == "one-line-not-json":
        out = path / "one-line.jsonl"
        out.write_bytes(b"a" * size)
    elif name == "paragraphs":
        out = path / "paragraphs.md"
        para = WORDS * 2 + "\n\n"
        out.write_text("# Many paragraphs\n\n" + (para * (size // len(para) + 1))[: size - 20], encoding="utf-8")
    else:
        raise SystemExit(f"unknown shape {name!r}")
    return out


SHAPES = ("tiny-records", "one-record", "one-line-text", "one-line-not-json", "paragraphs", "bad-records")

_CHILD = r"""
import json, os, resource, sys, time
sys.path[:0] = [sys.argv[1]]
root, corpus, ws_dir, model, embedder, as_mb = sys.argv[1:7]

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

from regrad_cli.lm import models
from regrad_cli.offline.ingest import ingest
from regrad_cli.workspace.config import Workspace
import lance, lancedb  # noqa: F401 - loaded before the baseline, as in any ingest

ws = Workspace.open(ws_dir, overrides={"model.id": model, "embedder.id": embedder})
loaded = models.load_checked(model, embedder, ws.config.embedder.batch_size)
try:
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
except OSError:
    pass
base = status("VmRSS")
if int(as_mb):
    limit = status("VmSize") + int(as_mb) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
t = time.perf_counter()
s = ingest(ws, [corpus])
wall = time.perf_counter() - t
print(json.dumps({"baseline_rss_mb": base / 2**20, "peak_rss_mb": status("VmHWM") / 2**20,
                  "above_baseline_mb": (status("VmHWM") - base) / 2**20, "wall_s": wall,
                  "added": s.added, "unchanged": s.unchanged, "skipped": len(s.skipped),
                  "first_reasons": [r["reason"] for r in s.skipped[:3]], "documents": s.documents}))
"""


def measure(file: Path, workspace: Path, model: str, embedder: str, as_mb: int = 0, timeout: float = 3600) -> dict:
    """Ingest ``file`` (or a folder) into ``workspace`` in a fresh child process; its
    measurement. A child that fails raises RuntimeError with its stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("REGRAD_BANK_URI", None)
    r = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(file), str(workspace), model, embedder,
                        str(as_mb)], capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"ingest of {file.name} failed ({r.returncode}): {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="fake:llama", help="model whose tokenizer chunks (default fake:llama)")
    p.add_argument("--embedder", default="fake:hash-32", help="embedder (default fake:hash-32)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}")
    p.add_argument("--as-mb", type=int, default=0, help="RLIMIT_AS headroom above the baseline (0: none)")
    args = p.parse_args()
    scale = 0.1 if args.quick else 1.0
    results = {}
    with temp_dir("regrad-bench-ingest-memory-") as tmp:
        for name in args.shapes.split(","):
            f = write_shape(name, tmp / name, scale)
            log(f"{name}: {f.stat().st_size / MB:.1f} MB")
            t = time.perf_counter()
            runs = [measure(f, tmp / f"ws-{name}", args.model, args.embedder, args.as_mb)]
            if name == "tiny-records":
                runs.append(measure(f, tmp / f"ws-{name}", args.model, args.embedder, args.as_mb))
            results[name] = {"file_mb": f.stat().st_size / MB, "first": runs[0],
                             **({"again_unchanged": runs[1]} if len(runs) > 1 else {}),
                             "child_wall_s": time.perf_counter() - t}
    rows = []
    for name, r in results.items():
        for label, m in (("first", r["first"]), ("again", r.get("again_unchanged"))):
            if m:
                rows.append([name if label == "first" else "  (again, unchanged)", r["file_mb"], m["baseline_rss_mb"],
                             m["peak_rss_mb"], m["above_baseline_mb"], m["wall_s"], m["added"] or m["unchanged"],
                             m["skipped"]])
    print_table(f"ingest peak RSS ({args.model}, {args.embedder}; MB = 2^20 bytes except file sizes)",
                ["shape", "file MB", "baseline", "peak", "above", "s", "docs", "skipped"], rows)
    emit({"benchmark": "ingest_memory", "model": args.model, "embedder": args.embedder, "scale": scale,
          "as_mb": args.as_mb,
          "max_above_baseline_mb": max(m["above_baseline_mb"] for r in results.values()
                                       for m in (r["first"], r.get("again_unchanged")) if m),
          "shapes": results}, args.out, args)


if __name__ == "__main__":
    sys.exit(main())
