"""Shared CLI plumbing: workspace option, JSON output, a rich progress bar on stderr, and the one
source of option defaults (the config dataclasses: ``ws_default``/``ws_help``, ``defaults_of``)."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from contextlib import contextmanager
from dataclasses import MISSING, fields
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

WorkspaceOpt = Annotated[
    Optional[Path],
    typer.Option("--workspace", "-w", help="Workspace directory (default: $REGRAD_WORKSPACE or ./.regrad)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
# DeviceOpt is defined below ws_help, which its help uses.


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def safe_text(text, keep_newlines: bool = False) -> str:
    """Text from a document, bank or dataset made safe for a terminal: control characters (escape
    sequences included) shown as \\x.. escapes; line breaks kept with ``keep_newlines``. Print it
    with markup=False (or as a rich Text)."""
    keep = (" ", "\n") if keep_newlines else (" ",)
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in str(text))


def err_console():
    from rich.console import Console

    return Console(stderr=True)


# Set by `-q/--quiet` (regrad_cli.cli._root): no progress on stderr.
QUIET = False


@contextmanager
def progress_bar(description: str, total: int | None = None, enabled: bool = True):
    """Yields update(n_done, total, info=""). On a terminal: a rich progress bar on stderr.
    Otherwise (a pipe, a log file): plain lines, one per tenth of the work and one at the end,
    with the rate and the time left. Nothing with ``enabled`` False or -q."""
    if not enabled or QUIET:
        yield lambda *a, **k: None
        return
    if not sys.stderr.isatty():
        yield PlainProgress(description, total)
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


class PlainProgress:
    """Progress as plain stderr lines ("build-bank: 20/200 (10%), 3.1/s, about 58 s left"): one
    each time another tenth of the total is done, and one when all of it is."""

    def __init__(self, description: str, total: int | None = None):
        import time

        self.description, self.total = description, total
        self._t0 = time.monotonic()
        self._next = None
        self._last = -1

    def __call__(self, done: int, total: int | None = None, info: str = "") -> None:
        import time

        total = total if total is not None else self.total
        if not total or done <= 0 or done == self._last:
            return
        step = max(1, -(-total // 10))
        if self._next is None:
            self._next = step
        if done < self._next and done < total:
            return
        while self._next <= done:
            self._next += step
        self._last = done
        elapsed = time.monotonic() - self._t0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = f", about {(total - done) / rate:.0f} s left" if rate > 0 and done < total else ""
        sys.stderr.write(f"{self.description}: {done}/{total} ({100 * done // total}%), {rate:.2f}/s{left}\n")
        sys.stderr.flush()


# One source of defaults -----------------------------------------------------------------------
# An option either overrides a workspace setting (its CLI default is None: regrad.toml decides,
# and the help names the setting and its default, from RegradConfig) or maps onto a field of a
# command's config dataclass (its CLI default IS that field's default, via defaults_of).
def ws_default(setting: str):
    """Default of a regrad.toml setting ("query.top_k"), from RegradConfig."""
    from regrad_cli.workspace.config import RegradConfig

    section, _, key = setting.partition(".")
    return getattr(getattr(RegradConfig(), section), key)


def ws_help(text: str, setting: str) -> str:
    """Help for an option that overrides a regrad.toml setting: the text, then where its default
    comes from and what it is."""
    # "query.top_k", not "[query] top_k": rich would take the brackets for markup.
    return f"{text.rstrip('.')} (default: {setting} in regrad.toml, {ws_default(setting)})."


@lru_cache(maxsize=None)
def defaults_of(target: str) -> dict[str, Any]:
    """{field: default} of the dataclass ``"module:Class"`` (fields without one are left out).

    Read from the module's source, not imported: command modules such as regrad_cli.learning.metatrain
    import torch, and ``regrad --help`` must stay light. A class the module only re-exports
    (``from x import Class``) is followed to its definition. Only literal defaults are read
    (numbers, strings, booleans, None, tuples/lists of them); others are left out."""
    module, _, cls_name = target.partition(":")
    path, is_package = _module_file(module)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls_name:
            out = {}
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
                    try:
                        out[stmt.target.id] = ast.literal_eval(stmt.value)
                    except ValueError:
                        pass  # field(default_factory=...) and other expressions
            return out
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(a.name == cls_name and a.asname in (None, cls_name)
                                                    for a in node.names):
            package = module if is_package else module.rpartition(".")[0]
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            return defaults_of(f"{source}:{cls_name}")
    raise LookupError(f"no class {cls_name} in {module}")


def _module_file(module: str) -> tuple[Path, bool]:
    """(source file, is a package) of a module, found without importing it or its packages:
    importlib.util.find_spec("a.b.c") would import a.b, and a package's __init__ may import torch."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        raise LookupError(f"no module {module}")
    path = Path(spec.origin)
    for name in rest:
        folder = path.parent
        if (folder / name / "__init__.py").exists():
            path = folder / name / "__init__.py"
        elif (folder / f"{name}.py").exists():
            path = folder / f"{name}.py"
        else:
            raise LookupError(f"no module {module}")
    return path, path.name == "__init__.py"


def dataclass_defaults(cls) -> dict[str, Any]:
    """{field: default} of an imported dataclass (what ``defaults_of`` must agree with)."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


DeviceOpt = Annotated[Optional[str], typer.Option("--device", help=ws_help("cpu or cuda", "model.device"))]
