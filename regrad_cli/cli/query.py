"""`regrad query`: answer questions with temporarily applied document gradients."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from regrad_cli.cli import app
from regrad_cli.cli.common import DeviceOpt, JsonOpt, WorkspaceOpt, print_json, ws_help


@app.command("query")
def query_cmd(
    question: Annotated[Optional[str], typer.Argument(help="The question, or '-' to read one question per line from stdin.")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", help=ws_help("Documents to retrieve", "query.top_k"))] = None,
    mode: Annotated[str, typer.Option("--mode", help="param | param+context | context | closed-book.")] = "param",
    gamma: Annotated[Optional[float], typer.Option("--gamma", help=ws_help("Test-time step scale", "query.gamma"))] = None,
    combine: Annotated[Optional[str], typer.Option("--combine", help="sum | mean | score (default: what the learner was meta-trained with; 'sum' for an untrained one).")] = None,
    retriever: Annotated[Optional[str], typer.Option("--retriever", help=ws_help("dense | bm25 | hybrid", "query.retriever"))] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help=ws_help("Generation limit", "query.max_new_tokens"))] = None,
    show_docs: Annotated[bool, typer.Option("--show-docs", help="Include the retrieved passages.")] = False,
    batch: Annotated[Optional[Path], typer.Option("--batch", help='JSONL file of {"id":..., "question":...} records.')] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on a corrupt gradient row instead of skipping it.")] = False,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="Learner checkpoint: 'bundled', 'init' or a directory.")] = None,
    device: DeviceOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
):
    """Answer a question: retrieve, apply gradients for one step, generate, restore."""
    from regrad_cli.config import Workspace
    from regrad_cli.errors import RegradError
    from regrad_cli.query import QueryEngine

    if batch is None and question is None:
        raise RegradError("give a QUESTION, '-' for stdin, or --batch FILE.jsonl")
    ws = Workspace.open(workspace, create=False)
    q = ws.config.query
    opts = dict(mode=mode, top_k=top_k if top_k is not None else q.top_k,
                gamma=gamma if gamma is not None else q.gamma, combine=combine,
                retriever=retriever or q.retriever,
                max_new_tokens=max_new_tokens or q.max_new_tokens, show_docs=show_docs)
    records = _records(question, batch)
    engine = QueryEngine(ws, checkpoint=checkpoint, device=device, strict=strict,
                         need_bank=mode in ("param", "param+context"))
    pipeline = batch is not None or question == "-"
    failures = 0
    for rec_id, text in records:
        try:
            res = engine.answer(text, **opts)
        except RegradError as exc:
            if not pipeline:
                raise
            failures += 1
            typer.echo(f"Error: {exc}", err=True)
            print_json({"id": rec_id, "question": text, "error": str(exc)})
            continue
        if rec_id is not None:
            res = {"id": rec_id, **res}
        if json_out or pipeline:
            print_json(res)
        else:
            _render(res, show_docs)
    if failures:
        raise typer.Exit(1)


def _records(question, batch):
    if batch is not None:
        from regrad_cli.errors import RegradError

        try:
            lines = batch.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise RegradError(f"cannot read {batch}: {exc}") from exc
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                yield rec.get("id", i), str(rec["question"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise RegradError(f"{batch}:{i}: malformed record ({exc})") from exc
        return
    if question == "-":
        for line in sys.stdin:
            if line.strip():
                yield None, line.strip()
        return
    yield None, question


def _render(res: dict, show_docs: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(res["answer"] or "[dim](no answer)[/dim]", markup=not res["answer"], highlight=False)
    if res["retrieved"] and (show_docs or console.is_terminal):
        err = Console(stderr=True)
        table = Table("doc_id", "score", "applied", "source", title=f"retrieved ({res['mode']})")
        for r in res["retrieved"]:
            table.add_row(r["doc_id"], f"{r['score']:.3f}", "yes" if r.get("applied") else "no", r["source"])
        err.print(table)
        if show_docs:
            for r in res["retrieved"]:
                err.print(f"[bold]{r['doc_id']}[/bold]: {r.get('text', '')}", highlight=False)
    for s in res.get("skipped", []):
        Console(stderr=True).print(f"[yellow]skipped corrupt row {s['doc_id']}: {s['reason']}[/yellow]")
