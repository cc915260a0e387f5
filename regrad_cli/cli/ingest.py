"""`regrad ingest`: files and folders into the workspace's documents table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from regrad_cli.cli.common import JsonOpt, WorkspaceOpt, err_console, print_json, progress_bar, ws_help


def ingest_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Files or directories (.txt .md .json .jsonl .jsonl.gz).", show_default=False)],
    prune: Annotated[bool, typer.Option("--prune", help="Delete documents of files under PATH that no longer exist.")] = False,
    chunk_tokens: Annotated[Optional[int], typer.Option("--chunk-tokens", min=1, help=ws_help("Max tokens per chunk", "chunking.max_tokens"))] = None,
    chunk_overlap: Annotated[Optional[int], typer.Option("--chunk-overlap", min=0, help=ws_help("Tokens shared by consecutive chunks", "chunking.overlap"))] = None,
    model: Annotated[Optional[str], typer.Option("--model", help=ws_help("Language model whose tokenizer sizes the chunks: a Hugging Face id, a directory or fake:FAMILY", "model.id"))] = None,
    embedder: Annotated[Optional[str], typer.Option("--embedder", help=ws_help("Sentence embedder: a sentence-transformers id, a directory or fake:hash-DIM", "embedder.id"))] = None,
    max_file_mb: Annotated[float, typer.Option("--max-file-mb", help="Skip files larger than this many MB (decompressed, for .jsonl.gz).")] = 20.0,
    force: Annotated[bool, typer.Option("--force", help="Let --prune delete more than a few documents.")] = False,
    readmit: Annotated[bool, typer.Option("--readmit", help="Ingest again documents unlearned by `regrad bank rm` (otherwise skipped).")] = False,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
):
    """Ingest text files into the workspace (incremental: unchanged files cost nothing)."""
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.errors import IngestError
    from regrad_cli.offline.ingest import ingest

    loaded: dict = {}
    ws = Workspace.open(workspace, overrides={
        "chunking.max_tokens": chunk_tokens, "chunking.overlap": chunk_overlap,
        "model.id": model, "embedder.id": embedder,
    }, check=lambda config: loaded.update(check_models(config)))
    with progress_bar("ingest", enabled=not json_out) as update:
        summary = ingest(ws, list(paths), prune=prune, progress=update, max_file_mb=max_file_mb,
                         force=force, readmit=readmit, **loaded)
    if json_out:
        print_json(summary.to_dict())
    else:
        _render(summary, ws.root)
    if not summary.ok:
        # Raised, not typer.Exit(1): main() runs the app with standalone_mode=False, where click
        # returns an Exit's code instead of exiting with it; a RegradError always exits 1.
        if summary.skipped:
            raise IngestError(f"nothing could be ingested ({len(summary.skipped)} path(s) skipped)")
        where = ", ".join(str(p) for p in paths)
        raise IngestError(f"no files found under {where} (missing, empty or unmounted?): nothing was "
                          f"ingested{' and nothing pruned' if prune else ''}")


def check_models(config) -> dict:
    """A new workspace's model (its tokenizer, which ingest uses) and embedder, loaded before its
    regrad.toml is written: an id that does not load is never saved. Returns them for the ingest."""
    from regrad_cli.lm import models

    return models.load_checked(config.model.id, config.embedder.id, config.embedder.batch_size)


def _render(summary, root: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"regrad ingest → {root}", show_header=True)
    table.add_column("documents", justify="left")
    table.add_column("count", justify="right")
    for name in ("added", "updated", "unchanged", "removed", "pruned"):
        table.add_row(name, str(getattr(summary, name)))
    if summary.pruned_rows:
        table.add_row("pruned gradient rows", str(summary.pruned_rows))
    table.add_row("skipped paths", str(len(summary.skipped)))
    table.add_row("total in workspace", str(summary.documents), style="bold")
    Console().print(table)
    err = err_console()
    for item in summary.skipped:
        err.print(f"skipped {item['path']}: {item['reason']}", markup=False, highlight=False, soft_wrap=True)
    for warning in summary.warnings:
        err.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
