"""Helpers for tests/test_reliability.py: a tiny-model engine, a corpus, a worker process to kill.

Run as a script it is the *worker*: ``python reliability_helpers.py WORKSPACE CORPUS [--ingest]
[--build] [--batch-size N]`` ingests CORPUS and/or builds the bank with the tiny random Llama, the
byte tokenizer and the fake embedder of conftest.py, printing one line per progress event
(``ready``, ``ingest i/n``, ``build i/n``, ``done``) so a test can kill it at a chosen moment.
The engine is the same, bit for bit, in the worker and in the test process (same seeds), so both
write to the same bank (one bank per learner checkpoint id).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

WORDS = ("zarn kelb vesper dunmoor tollvane pellworth tashkel glimmer orrin meadow river moth cheese "
         "engine station limestone spring coast hills wings caves months weather bridge mill").split()
# Byte tokenizer: one token per byte, so 64-token chunks split the longer documents in several.
CHUNKING = {"chunking.max_tokens": 64, "chunking.overlap": 8}


def doc_text(i: int, version: int = 0) -> str:
    """A deterministic document; every third one is long enough for several chunks."""
    rng = random.Random(f"{i}-{version}")
    n = 30 if i % 3 == 0 else 8
    return f"document {i} version {version}: " + " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def write_corpus(root: Path, n: int, version: int = 0, start: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (root / f"doc{i:03d}.txt").write_text(doc_text(i, version), encoding="utf-8")
    return root


def make_engine(seed: int = 0):
    """The tiny Llama with a seeded learner, as an Engine (conftest.make_tiny_engine); a plain
    function so that Ray workers can import and call it."""
    from conftest import make_tiny_engine

    return make_tiny_engine(seed)


def open_ws(root: Path):
    from regrad_cli.workspace.config import Workspace

    return Workspace.open(root, overrides=CHUNKING)


def do_ingest(ws, corpus: Path, progress=None, flush_rows: int | None = None):
    from conftest import FakeEmbedder, FakeTokenizer
    import regrad_cli.offline.ingest.writer as writer_mod
    from regrad_cli.offline.ingest import ingest

    if flush_rows is not None:
        writer_mod.FLUSH_ROWS = flush_rows  # many small commits: more moments to be killed in
    return ingest(ws, [corpus], embedder=FakeEmbedder(), tokenizer=FakeTokenizer(),
                             progress=progress)


def do_build(ws, engine, batch_size: int = 2, progress=None):
    from regrad_cli.offline.build import build_bank

    return build_bank(ws, engine, batch_size=batch_size, progress=progress)


def bank_of(ws, engine):
    from bank_format import GradientBank

    return GradientBank.open(ws.bank_path(engine.learner.checkpoint_id()), read_only=True)


# The worker ---------------------------------------------------------------------------------------
def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def worker_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("workspace", type=Path)
    p.add_argument("corpus", type=Path)
    p.add_argument("--ingest", action="store_true")
    p.add_argument("--build", action="store_true")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--flush-rows", type=int, default=3)
    p.add_argument("--pause", type=float, default=0.0, help="sleep after each build batch (s)")
    p.add_argument("--ray", type=int, default=0, help="build with the Ray engine and this many workers")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    a = p.parse_args(argv)
    ws = open_ws(a.workspace)
    engine = make_engine()
    _say("ready")
    if a.ingest:
        do_ingest(ws, a.corpus, progress=lambda i, n, *_: _say(f"ingest {i}/{n}"), flush_rows=a.flush_rows)

    def built(d, n, _rate):
        _say(f"build {d}/{n}")
        if a.pause and d:
            time.sleep(a.pause)

    if a.build and a.ray:
        from regrad_cli.offline.ray_build import build_bank_ray

        s = build_bank_ray(ws, engine, loader=make_engine, batch_size=a.batch_size, workers=a.ray,
                           address=a.ray_address, progress=built)
        _say("summary " + json.dumps(s.to_dict()))
    elif a.build:
        s = do_build(ws, engine, a.batch_size, progress=built)
        _say("summary " + json.dumps(s.to_dict()))
    _say("done")
    return 0


def worker_cmd(ws_root: Path, corpus: Path, *flags: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), str(ws_root), str(corpus), *flags]


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])  # Ray workers too
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = "1"
    return env


class Worker:
    """A worker subprocess whose stdout lines are collected by a thread."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_events(self, n: int, timeout: float = 300.0) -> bool:
        """Wait until ``n`` progress lines arrived (True) or the worker ended (False)."""
        deadline = time.time() + timeout
        with self._cond:
            while len(self.lines) < n:
                if self.proc.poll() is not None and not self._reader.is_alive():
                    return False
                left = deadline - time.time()
                if left <= 0:
                    raise TimeoutError(f"worker gave {len(self.lines)} lines in {timeout} s: {self.lines}")
                self._cond.wait(min(left, 0.5))
        return True

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    def finish(self, timeout: float = 300.0) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            self.kill()
        self._reader.join(5)
        return self.proc.returncode, err


def run_cli(args, capsys, monkeypatch):
    """Run ``regrad ARGS`` in this process; (exit code, stdout, stderr). Fails on a traceback."""
    from regrad_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["regrad", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    return code, out, err


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
