"""`regrad build-bank`: compute and store every new document's gradient."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from regrad_cli.cli import app
from regrad_cli.cli.common import DeviceOpt, JsonOpt, WorkspaceOpt, print_json, progress_bar


@app.command("build-bank")
def build_bank_cmd(
    codec: Annotated[Optional[str], typer.Option("--codec", help="fp32, fp16, int8 or int4 (default: workspace config, int4).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Documents per forward/backward pass.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Build at most N documents this run.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="Learner checkpoint: 'bundled', 'init' or a directory.")] = None,
    device: DeviceOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
):
    """Compute the gradient of every ingested document that has no bank row yet."""
    from bank_format import CODECS, CodecSpec
    from regrad_cli.build import build_bank
    from regrad_cli.config import Workspace
    from regrad_cli.engine import Engine
    from regrad_cli.errors import ConfigError

    ws = Workspace.open(workspace, create=False)
    if codec is not None and codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r} (use {', '.join(CODECS)})")
    bcfg = ws.config.bank
    spec = CodecSpec(name=codec or bcfg.codec, zstd_level=bcfg.zstd_level, group_size=bcfg.group_size)
    engine = Engine.load(ws, checkpoint=checkpoint, device=device)
    with progress_bar("build-bank", enabled=not json_out) as update:
        summary = build_bank(ws, engine, codec=spec, batch_size=batch_size, limit=limit,
                             progress=lambda d, n, r: update(d, n, f"{r:.2f} docs/s"))
    out = summary.to_dict()
    if json_out:
        print_json(out)
        return
    typer.echo(f"built {out['built']}, skipped {out['skipped']} (already banked), "
               f"removed {out['removed_stale']} stale, failed {len(out['failed'])}; "
               f"{out['rows']} rows in {out['bank']} ({out['docs_per_s']:.2f} docs/s)")
    for f in out["failed"]:
        typer.echo(f"failed: {f['doc_id']}: {f['error']}", err=True)
