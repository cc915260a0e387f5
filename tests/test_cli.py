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
    from typer.testing import CliRunner

    from regrad_cli.cli import app

    out = CliRunner().invoke(app, ["bank", "--help"]).output
    for cmd in ("stats", "verify", "rm", "compact"):
        assert cmd in out


def test_errors_are_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    # In this process (main(), as the console script runs it): the subprocess tests above and
    # below cover the interpreter start-up.
    from reliability_helpers import run_cli

    monkeypatch.setenv("REGRAD_WORKSPACE", str(tmp_path / "none"))
    for args in (["query", "hello"], ["build-bank"], ["bank", "stats"], ["bank", "verify"]):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 1, (args, err)
        assert "Traceback" not in err and err.startswith("Error: "), (args, err)
        assert len(err.strip().splitlines()) == 1, (args, err)


def test_version():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.startswith("regrad ")
