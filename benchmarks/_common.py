"""Shared plumbing of the benchmark scripts: paths, seeds, machine facts, timing, output.

Every script prints a human table and, as its LAST line, one JSON object with its key figures, so
``python benchmarks/X.py --quick | tail -1 | jq`` works. Heavy imports stay inside functions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
# The scripts run as `python benchmarks/X.py`: put the repository root on sys.path so that
# `bank_format` and `regrad_cli` import from this checkout even when the installed (editable)
# package does not map them.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEMO_CORPUS = ROOT / "regrad_cli" / "data" / "demo" / "corpus"
DEMO_QUESTIONS = ROOT / "regrad_cli" / "data" / "demo" / "questions.jsonl"
SEED = 0


def parser(description: str, *, checkpoint: bool = False, workspace: bool = False) -> argparse.ArgumentParser:
    """The options every benchmark takes; ``checkpoint`` adds --checkpoint (the learner),
    ``workspace`` adds --workspace (a demo workspace with its bank; see ``on_demo_workspace``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes: a minute or two on 2 CPU cores")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--seed", type=int, default=SEED, help="seed of every random choice (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice, one per core). On a machine "
                        "shared with other torch jobs, 1 avoids OpenMP threads waiting on each other")
    if checkpoint:
        p.add_argument("--checkpoint", default=None, help="learner: 'bundled' (default), 'init' or a directory")
    if workspace:
        p.add_argument("--workspace", type=Path, default=None,
                       help="an ingested demo workspace with its bank built (default: build one in /tmp, not timed)")
    return p


def setup(args) -> None:
    """Seeds, torch's thread count when --threads is given, and SIGTERM as an exception."""
    import signal

    # `timeout` and job control send SIGTERM, which would kill Python without running `finally`
    # blocks: the temporary workspaces and banks under /tmp would stay behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seed_all(args.seed)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def seed_all(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # retrieval_scale runs without torch
        pass


def machine() -> dict:
    """The facts a reader needs to judge a figure: cores, memory, CPU model, load, versions."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "ram_gb": mem_gb,
        "cpu": cpu,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


def max_rss_mb() -> float:
    """Peak RSS of this process since it started (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """Peak resident memory of this process during a block, sampled every ``interval`` s.

    ru_maxrss only ever grows, so it cannot tell one phase from the next; a sampler can. Needs
    psutil (a dependency of the dev extras); without it the peak is NaN.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb = float("nan")
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


@contextmanager
def timer() -> Iterator[dict]:
    box = {"s": 0.0}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - t0


def pct(values: Sequence[float], q: float) -> float:
    """Percentile with linear interpolation (q in [0, 100])."""
    import numpy as np

    return float(np.percentile(list(values), q)) if values else float("nan")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def rnd(x: Any, nd: int = 4) -> Any:
    if isinstance(x, float):
        return round(x, nd) if x == x else None  # NaN -> null in JSON
    if isinstance(x, dict):
        return {k: rnd(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rnd(v, nd) for v in x]
    return x


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return "-" if v is None else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    sys.stdout.flush()


RESULTS_DIR = ROOT / "docs" / "benchmarks"


def provenance() -> dict:
    """What produced a result: the command, the code version, the software and the machine."""
    import subprocess
    from datetime import datetime, timezone
    from importlib import metadata

    versions = {}
    for dist in ("regrad", "torch", "transformers", "numpy", "lancedb", "pylance", "pyarrow", "zstandard"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "benchmarks", "bank_format", "regrad_cli"],
                                    cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    load = os.getloadavg()
    return {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "versions": versions,
        "machine": machine(),
        "load_avg_at_end": {"1m": round(load[0], 2), "5m": round(load[1], 2), "15m": round(load[2], 2)},
    }


def emit(result: dict, out: Path | None, args=None, name: str | None = None) -> None:
    """The last line of stdout: one JSON object, with its provenance.

    Written to ``out``; with ``args`` and no ``out``, to docs/benchmarks/NAME.json (NAME: the
    benchmark's name, plus ``-quick`` for --quick runs), so that every figure has its file."""
    result = rnd({**result, "provenance": provenance()})
    line = json.dumps(result, sort_keys=False)
    if out is None and args is not None:
        base = name or result.get("benchmark", Path(sys.argv[0]).stem)
        out = RESULTS_DIR / f"{base}{'-quick' if getattr(args, 'quick', False) else ''}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out}")
    print(line, flush=True)


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout stays the table plus the final JSON line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    """A directory under /tmp, removed afterwards (also on errors and Ctrl-C)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


# regrad pieces ---------------------------------------------------------------------------------
def corpus_texts() -> list[tuple[str, str]]:
    """(file name, text) of every demo corpus document, sorted by name."""
    return [(p.name, p.read_text(encoding="utf-8")) for p in sorted(DEMO_CORPUS.glob("*.md"))]


def demo_questions():
    from regrad_cli.learning.datasets import load_dataset

    return load_dataset(f"jsonl:{DEMO_QUESTIONS}")


def make_corpus_copies(dest: Path, copies: int) -> Path:
    """The demo corpus ``copies`` times under ``dest`` (copy i>0 gets a distinct first line, so
    its content hash and therefore its bank row differ): a larger corpus of realistic documents."""
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        sub = dest / f"copy{i:02d}"
        sub.mkdir(exist_ok=True)
        for name, text in corpus_texts():
            (sub / name).write_text(text if i == 0 else f"(Copy {i}.)\n{text}", encoding="utf-8")
    return dest


def ingest_workspace(ws_dir: Path, corpus: Path, embedder=None, tokenizer=None):
    """A fresh workspace at ``ws_dir`` (default config) with ``corpus`` ingested via the Python API."""
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.offline.ingest import ingest

    ws = Workspace.open(ws_dir)
    ws.use_bank_env = False  # never the user's $REGRAD_BANK_URI: benchmarks move and delete banks
    summary = ingest(ws, [corpus], embedder=embedder, tokenizer=tokenizer)
    if not summary.ok:
        raise SystemExit(f"ingest of {corpus} failed: {summary.to_dict()}")
    return ws


def on_demo_workspace(workspace: Path | None, prefix: str, run) -> None:
    """``run(ws_dir)`` on ``workspace``, or on a throwaway workspace holding the demo corpus and
    its bank (built untimed)."""
    if workspace is not None:
        run(workspace)
        return
    with temp_dir(prefix) as tmp:
        from regrad_cli.offline.build import build_bank

        log("ingesting the demo corpus and building its bank (not timed)")
        ws = ingest_workspace(tmp / "ws", DEMO_CORPUS)
        build_bank(ws, load_engine(None, ws))
        run(tmp / "ws")


def load_engine(checkpoint: str | None = None, ws=None):
    from regrad_cli.workspace.engine import Engine

    return Engine.load(ws, checkpoint=checkpoint)


def checkpoint_info(engine) -> dict:
    """Which learner was measured, and whether it is meta-trained (bundled/dir) or the raw init."""
    learner = engine.learner
    import torch

    alphas = torch.cat([learner.alpha(n).detach().reshape(-1) for n in learner.names])
    return {
        "checkpoint_id": learner.checkpoint_id()[:16],
        "trained": bool(learner.meta.get("trained")),
        "combine": learner.trained_combine,
        "alpha_min": float(alphas.min()),
        "alpha_median": float(alphas.median()),
        "alpha_max": float(alphas.max()),
    }
