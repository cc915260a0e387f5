"""`regrad status` and `regrad docs ls`: what the workspace holds, read without loading a model."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from regrad_cli.cli.common import JsonOpt, WorkspaceOpt, print_json, safe_text

docs_app = typer.Typer(help="List the workspace's documents and their chunk ids.", no_args_is_help=True)


def status_cmd(workspace: WorkspaceOpt = None, json_out: JsonOpt = False):
    """Documents, chunks, bank rows, pending and stale gradients, fingerprints (no model loads)."""
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.workspace.status import workspace_status

    s = workspace_status(Workspace.open(workspace, create=False))
    if json_out:
        print_json(s)
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table(show_header=False, title=Text(f"regrad workspace {safe_text(s['workspace'])}"))
    t.add_column()
    t.add_column(overflow="fold")  # paths are folded onto the next line, never cut short with '…'
    bank = s["bank"] or {}
    rows = [
        ("documents (files and records)", s["documents"]), ("chunks", s["chunks"]),
        ("gradient rows", s["rows"]),
        ("pending (no gradient for the current text)", s["pending"]),
        ("stale (rows of removed or changed documents)", s["stale"]),
        ("unlearned chunks (bank rm)", s["unlearned"]),
        ("default mode", s["default_mode"]),
        ("model", s["model"]), ("embedder", s["embedder"]),
        ("learner checkpoint", _learner_line(s)),
        ("bank", f"{bank.get('path')} ({bank.get('codec')}, format {bank.get('format_version')})" if bank else "none"),
    ]
    for k, v in rows:
        t.add_row(k, Text(safe_text(v)))
    Console().print(t)
    if s["next"]:
        typer.echo(f"next: {s['next']}", err=True)


@docs_app.command("ls")
def ls_cmd(
    source: Annotated[Optional[str], typer.Option("--source", help="Only the documents of this source path, as docs ls shows it (a file, or a folder: everything under it); a path no document came from exits 1, naming the sources like it.")] = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
):
    """One line per document: its source, its id and its chunk ids (what `bank rm` takes)."""
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.workspace.status import list_documents

    docs = list_documents(Workspace.open(workspace, create=False), source)
    if json_out:
        print_json({"documents": docs})
        return
    for d in docs:
        typer.echo(f"{safe_text(d['document'])}\t{len(d['chunks'])} chunk(s), {d['tokens']} tokens\t"
                   f"{' '.join(safe_text(c) for c in d['chunks'])}")
    if not docs:
        typer.echo("no documents" + (f" under {safe_text(source)}" if source else "") + " (`regrad ingest PATH` adds some)",
                   err=True)


def _learner_line(s: dict) -> str:
    """The learner a query will use: the shipped checkpoint exists for the bundled model only,
    so with another model 'bundled' means an untrained learner (as the guide says)."""
    from regrad_cli.lm.models import BUNDLED_MODEL

    choice, cid = s["learner"]["checkpoint"], s["learner"]["checkpoint_id"]
    if choice == "bundled" and s["model"] != BUNDLED_MODEL:
        return f"bundled: none ships for {s['model']}, so an untrained learner (`regrad meta-train` trains one)"
    loss = s["learner"].get("doc_loss")
    other = f", document loss {loss}" if loss not in (None, "plain") else ""
    if cid is None:
        return f"{choice} (untrained: its id is told when the model loads)" if choice == "init" else \
            f"{choice} (its id is told when the model loads{other})"
    return f"init (untrained, {cid[:16]})" if choice == "init" else f"{choice} ({cid[:16]}{other})"

