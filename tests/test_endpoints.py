"""Endpoints from a configuration file (issue 32): a copied regrad.toml cannot send a bank off the
machine without the user's word, and every remote location is named on stderr."""

from __future__ import annotations

import socket

import pytest

from reliability_helpers import run_cli


def _hostile_ws(tmp_path, port: int, *, documents=None):
    """A workspace whose regrad.toml points its bank at an endpoint on loopback. ``documents``
    (capsys, monkeypatch): ingest one document first, so that commands get as far as the bank."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "regrad.toml").write_text(
        'format_version = "1.1"\n[model]\nid = "fake:llama"\n[embedder]\nid = "fake:hash-32"\n')
    if documents is not None:
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        (corpus / "d0.md").write_text("The zarn river flows north.\n")
        code, _, err = run_cli(["ingest", corpus, "--workspace", ws], *documents)
        assert code == 0, err
    import tomllib

    import tomli_w

    cfg = tomllib.loads((ws / "regrad.toml").read_text())
    cfg.setdefault("bank", {}).update({"uri": "s3://x/y", "storage_options": {
        "aws_endpoint": f"http://127.0.0.1:{port}", "allow_http": "true"}})
    (ws / "regrad.toml").write_text(tomli_w.dumps(cfg))
    return ws


@pytest.mark.parametrize("args", [["build-bank"], ["bank", "stats"], ["bank", "rm", "d0"],
                                  ["query", "q?", "--mode", "context"]])
def test_a_config_endpoint_is_refused_without_confirmation(tmp_path, capsys, monkeypatch, args):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.01)
    port = listener.getsockname()[1]
    try:
        ws = _hostile_ws(tmp_path, port, documents=(capsys, monkeypatch))
        code, out, err = run_cli([*args, "--workspace", ws], capsys, monkeypatch)
        assert code == 1, (out, err)
        assert "--allow-endpoint" in err and "REGRAD_ALLOW_ENDPOINT" in err and len(err.strip().splitlines()) == 1
        assert "s3://x/y" in err or f"127.0.0.1:{port}" in err, err
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing was sent to the endpoint
    finally:
        listener.close()


def test_a_confirmed_endpoint_is_named_on_stderr(tmp_path, capsys, monkeypatch):
    from regrad_cli.workspace import endpoints
    from regrad_cli.workspace.config import Workspace

    ws = Workspace.open(_hostile_ws(tmp_path, 9), create=False)
    monkeypatch.setattr(endpoints, "_named", set())
    monkeypatch.setenv("REGRAD_ALLOW_ENDPOINT", "1")
    assert ws.banks_location == "s3://x/y"
    assert ws.bank_storage_options()["aws_endpoint"] == "http://127.0.0.1:9"
    err = capsys.readouterr().err
    assert "remote bank location s3://x/y" in err and "aws_endpoint = http://127.0.0.1:9" in err
    # From the environment (the user's own setting): used without confirmation, still named.
    monkeypatch.delenv("REGRAD_ALLOW_ENDPOINT")
    monkeypatch.setenv("REGRAD_BANK_URI", "s3://mine/banks")
    monkeypatch.setenv("REGRAD_BANK_STORAGE_OPTIONS", '{"aws_endpoint": "http://minio.local:9000"}')
    ws.config.bank.storage_options = {}
    assert ws.banks_location == "s3://mine/banks"
    assert ws.bank_storage_options()["aws_endpoint"] == "http://minio.local:9000"
    err = capsys.readouterr().err
    assert "s3://mine/banks (from REGRAD_BANK_URI)" in err and "minio.local" in err


def test_the_root_option_confirms(tmp_path, capsys, monkeypatch):
    ws = _hostile_ws(tmp_path, 9)
    from regrad_cli.workspace import endpoints

    monkeypatch.setattr(endpoints, "_named", set())
    code, out, err = run_cli(["--allow-endpoint", "bank", "stats", "--workspace", ws, "--bank", tmp_path / "none"],
                             capsys, monkeypatch)
    assert "aws_endpoint = http://127.0.0.1:9" in err and "--allow-endpoint COMMAND" not in err, err
