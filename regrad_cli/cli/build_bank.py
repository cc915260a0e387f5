"""`regrad build-bank`: compute and store every new document's gradient."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from regrad_cli.cli.common import DeviceOpt, JsonOpt, WorkspaceOpt, print_json, progress_bar, safe_text, ws_help


def up_to_date(ws, checkpoint: str | None) -> dict | None:
    """The summary of a build with nothing to do (every document has a current row, no row is
    stale), told from the documents table, the bank and the learner's files without loading a
    model; None when there is work, or when that cannot be told without the model. A workspace
    without documents is refused here too."""
    from regrad_cli.workspace.banks import current_checkpoint_id, open_bank
    from regrad_cli.workspace.documents import DocumentStore
    from regrad_cli.errors import RegradError
    from regrad_cli.workspace.status import freshness

    store = DocumentStore(ws)
    if store.count() == 0:
        raise RegradError(f"workspace {ws.root} has no documents: run `regrad ingest PATH` first")
    cid = current_checkpoint_id(ws, required=False) if checkpoint is None else None
    if cid is None:
        return None
    path = ws.bank_path(cid)
    bank = open_bank(path, ws.bank_storage_options(), missing_ok=True)
    if bank is None:
        return None
    fresh = freshness(store, bank)
    if fresh["pending"] or fresh["stale"]:
        return None
    rows = bank.count()
    return {"built": 0, "skipped": store.count(), "removed_stale": 0, "failed": [], "docs_per_s": 0.0,
            "bank": str(path), "rows": rows, "checkpoint_id": cid, "compute_dtype": ""}


def build_bank_cmd(
    codec: Annotated[Optional[str], typer.Option("--codec", help=ws_help("fp32, fp16, int8, int8g, int4 or int4s (group size: bank.group_size)", "bank.codec"))] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help=ws_help("Documents per forward/backward pass", "bank.batch_size"))] = None,
    compute_dtype: Annotated[Optional[str], typer.Option("--compute-dtype", help=ws_help("Precision of the gradient passes: auto (bf16 where the hardware has native bf16, else float32), float32 or bfloat16", "bank.compute_dtype"))] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Build at most N documents this run.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="Learner checkpoint: 'bundled', 'init' or a directory.")] = None,
    engine_name: Annotated[str, typer.Option("--engine", help="'local' (one process, default) or 'ray' (a Ray Data actor pool, one atomic commit).")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Join this Ray cluster (e.g. ray://head:10001 or 'auto'); default: start a local one.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Ray actors (each loads the model once).")] = 2,
    cpus_per_worker: Annotated[float, typer.Option("--cpus-per-worker", help="CPUs per Ray actor (also its torch threads).")] = 1.0,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", help="GPUs per Ray actor (e.g. 1, or 0.5 to share one).")] = 0.0,
    force: Annotated[bool, typer.Option("--force", help="Also remove the gradients of more than a few documents that are gone from the workspace.")] = False,
    device: DeviceOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
):
    """Compute the gradient of every ingested document that has no bank row yet."""
    from bank_format import CODECS, CodecSpec
    from regrad_cli.errors import ConfigError
    from regrad_cli.workspace.config import Workspace

    ws = Workspace.open(workspace, create=False)
    if codec is not None and codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r} (use {', '.join(CODECS)})")
    bcfg = ws.config.bank
    spec = CodecSpec(name=codec or bcfg.codec, zstd_level=bcfg.zstd_level, group_size=bcfg.group_size)
    from regrad_cli.learner.gradients import check_compute_dtype

    if compute_dtype is not None:  # before the model loads
        check_compute_dtype(compute_dtype)
    if engine_name not in ("local", "ray"):
        raise ConfigError(f"unknown engine {engine_name!r} (use local or ray)")
    if engine_name == "local" and (ray_address or gpus_per_worker):
        raise ConfigError("--ray-address and --gpus-per-worker need --engine ray")
    if engine_name == "ray" and device is None and gpus_per_worker > 0:
        device = "cuda"
    done = up_to_date(ws, checkpoint)  # before any model loads: nothing to do costs nothing
    if done is not None:
        if json_out:
            print_json(done)
        else:
            typer.echo(f"up to date: {done['skipped']} documents have their gradient in {done['bank']} "
                       f"({done['rows']} rows); nothing to build")
        return
    from regrad_cli.offline.build import build_bank  # torch: only when there is work
    from regrad_cli.workspace.engine import Engine

    engine = Engine.load(ws, checkpoint=checkpoint, device="cpu" if engine_name == "ray" else device)
    with progress_bar("build-bank", enabled=not json_out) as update:
        report = lambda d, n, r: update(d, n, f"{r:.2f} docs/s")  # noqa: E731
        if engine_name == "ray":
            from regrad_cli.offline.ray_build import EngineLoader, build_bank_ray

            summary = build_bank_ray(ws, engine, loader=EngineLoader.for_workspace(ws, checkpoint, device),
                                     codec=spec, batch_size=batch_size, limit=limit, workers=workers,
                                     cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                     address=ray_address, progress=report, force=force,
                                     compute_dtype=compute_dtype)
        else:
            summary = build_bank(ws, engine, codec=spec, batch_size=batch_size, limit=limit, progress=report,
                                 force=force, compute_dtype=compute_dtype)
    out = summary.to_dict()
    if json_out:
        print_json(out)
    else:
        _render(out)
    if out["failed"] and not out["built"]:
        from regrad_cli.errors import RegradError

        raise RegradError(f"every document to build failed ({len(out['failed'])}); nothing was added "
                          f"to the bank")


def _render(out: dict) -> None:
    typer.echo(f"built {out['built']}, skipped {out['skipped']} (already banked), "
               f"removed {out['removed_stale']} stale, failed {len(out['failed'])}; "
               f"{out['rows']} rows in {out['bank']} ({out['docs_per_s']:.2f} docs/s, "
               f"{out['compute_dtype'] or 'no'} gradient passes)")
    for f in out["failed"]:
        typer.echo(f"failed: {safe_text(f['doc_id'])}: {safe_text(f['error'])}", err=True)
