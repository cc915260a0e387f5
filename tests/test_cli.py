"""The command line's shape: commands listed, fast start-up, plain errors."""

import subprocess
import sys


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "regrad_cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_help_lists_every_command_without_importing_torch():
    code = ("import sys; from regrad_cli.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); print(r.output); "
            "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers', 'lancedb') if m in sys.modules]; "
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    for cmd in ("ingest", "meta-train", "build-bank", "query", "eval", "bank"):
        assert cmd in out
    assert "HEAVY []" in out


def test_bank_subcommands_listed():
    out = _run("bank", "--help").stdout
    for cmd in ("stats", "verify", "rm", "compact"):
        assert cmd in out


def test_errors_are_one_line_without_traceback(tmp_path):
    import os

    env = {**os.environ, "REGRAD_WORKSPACE": str(tmp_path / "none")}
    for args in (["query", "hello"], ["build-bank"], ["bank", "stats"], ["bank", "verify"]):
        r = _run(*args, env=env)
        assert r.returncode == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.startswith("Error: "), (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_version():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.startswith("regrad ")
