"""`regrad serve`: answer questions over HTTP with one loaded model and dynamic batching."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from regrad_cli.cli.common import DeviceOpt, WorkspaceOpt

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_cmd(
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default; anything else needs --token).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8765,
    token: Annotated[Optional[str], typer.Option("--token", envvar="REGRAD_SERVE_TOKEN", show_envvar=True,
                                                 help="Bearer token required on every route but /healthz.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, max=256, help="Most requests answered in one generation call.")] = 16,
    batch_window_ms: Annotated[float, typer.Option("--batch-window-ms", min=0.0, max=10000.0,
                                                   help="How long a batch waits for another request to join; each arrival restarts the wait, up to 10 windows in all.")] = 10.0,
    max_body_kb: Annotated[int, typer.Option("--max-body-kb", min=1, help="Largest request body accepted (KiB).")] = 1024,
    client_timeout_s: Annotated[float, typer.Option("--client-timeout-s", min=0.5, max=3600.0,
                                                     help="A client's request headers must arrive within this many seconds of connecting (its body within 3 times as long), else the connection is closed.")] = 10.0,
    max_connections: Annotated[int, typer.Option("--max-connections", min=8, max=100000,
                                                 help="Most open connections (lowered to fit the open-file limit); beyond it the oldest stalled one is closed.")] = 1000,
    access_log: Annotated[bool, typer.Option("--access-log", help="One line per request on stderr: client, method, path, status, milliseconds.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail a request on a corrupt gradient row instead of skipping the row.")] = False,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="Learner checkpoint: 'bundled', 'init' or a directory.")] = None,
    device: DeviceOpt = None,
    workspace: WorkspaceOpt = None,
):
    """Answer questions over HTTP: regrad's routes and OpenAI's chat completions (docs/serving.md).

    Routes: /v1/query, /v1/query:batch, /v1/chat/completions, /v1/models, /v1/bank/stats,
    /healthz, /metrics. Prints a "ready" line on stderr once /healthz answers 200."""
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.errors import RegradError
    from regrad_cli.online.serve import ServeSettings, serve

    if host not in _LOOPBACK and not token:
        raise RegradError(f"--host {host} exposes the server beyond this machine: give --token (or "
                          "REGRAD_SERVE_TOKEN) so that every request must carry it")
    ws = Workspace.open(workspace, create=False)
    settings = ServeSettings(host=host, port=port, token=token or None, max_batch=max_batch,
                             batch_window_ms=batch_window_ms, max_body_bytes=max_body_kb * 1024,
                             header_timeout_s=client_timeout_s, body_timeout_s=3 * client_timeout_s,
                             max_connections=max_connections,
                             ready_line=True, access_log=access_log)
    typer.echo(f"regrad serve: loading {ws.root}; listening on http://{host}:{port} "
               f"(ready when GET /healthz answers 200){'; bearer token required' if token else ''}", err=True)
    serve(ws, settings, checkpoint=checkpoint, device=device, strict=strict)
