"""Shared CLI plumbing: workspace option, JSON output, a rich progress bar on stderr."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

WorkspaceOpt = Annotated[
    Optional[Path],
    typer.Option("--workspace", "-w", help="Workspace directory (default: $REGRAD_WORKSPACE or ./.regrad)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: workspace config).")]


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def err_console():
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int | None = None, enabled: bool = True):
    """Yields update(n_done, total, **fields); draws on stderr only when it is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda *a, **k: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err_console(), transient=False) as prog:
        task = prog.add_task(description, total=total, info="")

        def update(done: int, total_: int | None = None, info: str = "") -> None:
            prog.update(task, completed=done, total=total_ if total_ is not None else total, info=info)

        yield update
