"""`regrad serve` sheds stalled clients (issue 32): 300 connections that send part of their headers
and wait, under a 256-descriptor limit, neither keep /healthz from answering nor fill stderr.

Before: every stalled connection was held forever; at the descriptor limit each accept failed
with EMFILE (a traceback per try on stderr, 205 MB in 60 s) and /healthz timed out.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from reliability_helpers import run_cli

REPO = Path(__file__).resolve().parent.parent
N_STALLED = 300
FD_LIMIT = 256
TIMEOUT_S = 2.0  # --client-timeout-s of the server under test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str = "/healthz", timeout: float = 10.0) -> int:
    """Status of GET path over a fresh connection (0 when no answer came)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(64)
        return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else 0
    except OSError:
        return 0


def _stall(port: int) -> socket.socket | None:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never finish
        s.setblocking(False)
        return s
    except OSError:
        return None


def _closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_stalled_connections_are_shed_and_healthz_answers(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("A document about alpha.")
    ws = tmp_path / "ws"
    code, _, err = run_cli(["ingest", corpus, "--workspace", ws, "--model", "fake:llama",
                            "--embedder", "fake:hash-32"], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["build-bank", "--workspace", ws, "--checkpoint", "init"], capsys, monkeypatch)
    assert code == 0, err
    port = _free_port()
    # The test process holds the stalled sockets: it needs more descriptors than the server.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < N_STALLED + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))

    # `ulimit -n 256` for the server (set in the child before it starts regrad).
    limited = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT})); "
               f"sys.argv = ['regrad'] + sys.argv[1:]; runpy.run_module('regrad_cli', run_name='__main__')")
    stderr_path = tmp_path / "serve.stderr"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", limited, "serve", "--workspace", str(ws),
                                 "--checkpoint", "init", "--port", str(port),
                                 "--client-timeout-s", str(TIMEOUT_S)],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    stalled: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 300
        while _get(port, timeout=2) != 200:
            assert proc.poll() is None, stderr_path.read_text()[-2000:]
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.5)
        stalled = [s for s in (_stall(port) for _ in range(N_STALLED)) if s is not None]
        assert len(stalled) > FD_LIMIT  # more than the server could ever hold at once
        # While they are held, /healthz answers (a newcomer pushes out the oldest stalled one).
        for _ in range(3):
            assert _get(port) == 200
        # Past the deadline every stalled connection has been closed by the server.
        time.sleep(2 * TIMEOUT_S + 1.5)
        still_open = [s for s in stalled if not _closed_by_server(s)]
        assert not still_open, f"{len(still_open)} stalled connections still open"
        assert _get(port) == 200
        assert proc.poll() is None
    finally:
        for s in stalled:
            s.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    err = stderr_path.read_bytes()
    assert b"Traceback" not in err, err.decode(errors="replace")[:6000]
    assert len(err) < 16_384, f"stderr grew to {len(err)} bytes: {err[-2000:]!r}"


@contextmanager
def _loading_server():
    """A real uvicorn server in this process, its worker still "loading" (/healthz answers 503),
    with header and body deadlines of 0.5 s: (server, settings)."""
    import threading

    from regrad_cli.online.serve import BackgroundServer, BatchWorker, ServeSettings

    release = threading.Event()
    settings = ServeSettings(header_timeout_s=0.5, body_timeout_s=0.5)
    worker = BatchWorker(lambda: release.wait(30), settings)
    server = BackgroundServer(worker)
    server.thread.start()
    try:
        while not server.server.started:
            time.sleep(0.02)
        yield server, settings
    finally:
        release.set()
        server.stop(30)


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_the_protocol_sheds_a_stalled_request(phase):
    """In process: the header and body deadlines of the protocol regrad serve runs."""
    import httpx

    with _loading_server() as (server, settings):
        s = socket.create_connection(("127.0.0.1", settings.port), timeout=10)
        if phase == "headers":
            s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: x\r\n")
        else:
            s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        s.settimeout(10)
        assert s.recv(1) == b""  # closed by the server, not by our timeout (which would raise)
        s.close()
        with httpx.Client(base_url=server.url, timeout=10) as c:
            assert c.get("/healthz").status_code == 503  # still answering (loading)


def test_a_client_that_never_reads_its_answers_is_dropped():
    """In process: a client that pipelines requests and never reads the answers held its
    connection (and descriptor) forever: the answers waited in the server's send buffer, no
    deadline covered them, and a shed connection was only closed, which waits for them. 300 such
    clients under `ulimit -n 256` kept /healthz unreachable (EMFILE on every accept). The
    connection is now aborted once its answer has waited unsent for the body deadline."""
    from regrad_cli.online.shedding import _Shedding

    with _loading_server() as (server, settings):
        shed_before = _Shedding.shed_count
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", settings.port))
        s.setblocking(False)
        request = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"  # tens of KB per answer
        for _ in range(5000):
            try:
                s.send(request)
            except BlockingIOError:
                break
        connections = server.server.server_state.connections
        deadline = time.monotonic() + 15
        while connections and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not connections, "the connection of a client that never reads is still held"
        assert _Shedding.shed_count > shed_before
        s.close()
