"""Which bank a command works on, and which learner checkpoint is current (core of `regrad bank`).

``select_bank`` is the one answer to "which bank": ``--bank`` when given (a directory or an
object-store URI), else the workspace's bank for its current learner checkpoint, else its only
bank. The CLI parses options, calls these functions and renders the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regrad_cli.errors import ConfigError, NoBankError


@dataclass
class BankChoice:
    """A bank location, the workspace it belongs to (None when there is none) and its storage
    options (from the workspace's configuration and environment)."""

    location: "Path | str"
    workspace: Any = None
    storage_options: dict = field(default_factory=dict)
    explicit: bool = False  # named with --bank

    def open(self, read_only: bool = True):
        from bank_format import GradientBank

        return GradientBank.open(self.location, read_only=read_only, storage_options=self.storage_options)


def checkpoint_dir(choice: str) -> Path:
    """The directory of a learner checkpoint choice: 'bundled' or a directory (a meta-train output
    directory means its ``best/``). Not for 'init', which has no directory."""
    from regrad_cli.workspace.config import BUNDLED_CHECKPOINT
    from regrad_cli.workspace.engine import bundled_checkpoint_dir

    path = bundled_checkpoint_dir() if choice == BUNDLED_CHECKPOINT else Path(choice).expanduser()
    if (path / "best" / "learner.json").exists():
        path = path / "best"
    return path


def current_checkpoint_id(ws, required: bool = True) -> str | None:
    """The id of the workspace's learner checkpoint, read from its files (no model is loaded).

    None (or NoBankError when ``required``) when it cannot be told without the model: an 'init'
    learner, the bundled checkpoint with another model, or a missing directory."""
    from regrad_cli.workspace.config import BUNDLED_CHECKPOINT, BUNDLED_MODEL
    from regrad_cli.learner.lora import Learner

    choice = ws.config.learner.checkpoint
    path = None
    if choice != "init" and not (choice == BUNDLED_CHECKPOINT and ws.config.model.id != BUNDLED_MODEL):
        path = checkpoint_dir(choice)
    if path is not None and (path / "learner.json").exists():
        return Learner.load(path).checkpoint_id()
    if required:
        raise NoBankError(f"cannot tell which bank under {ws.banks_location} is current (learner checkpoint "
                          f"{choice!r} has no files to read); pass --bank DIR or URI")
    return None


def workspace_banks(ws) -> list["Path | str"]:
    """Every bank of the workspace: all of them for a local location, the current checkpoint's
    for an object store (which regrad does not list)."""
    from bank_format import GradientBank

    loc = Path(str(ws.bank_path("0" * 16))).parent if not ws.banks_remote else None
    if loc is None:
        cid = current_checkpoint_id(ws, required=False)
        path = ws.bank_path(cid) if cid else None
        return [path] if path and GradientBank.exists(path, ws.bank_storage_options()) else []
    return sorted(p for p in loc.glob("bank-*") if p.is_dir() and GradientBank.exists(p)) if loc.exists() else []


def select_bank(workspace: "str | Path | None", bank: str | None) -> BankChoice:
    """The bank to work on: ``bank`` (``--bank``), else the workspace's current checkpoint's, else
    its only one. The workspace (when there is one) gives the storage options."""
    from regrad_cli.workspace.config import RegradConfig, Workspace

    if bank is not None:
        try:
            ws = Workspace.open(workspace, create=False)
            opts = ws.bank_storage_options()
        except ConfigError:
            ws, opts = None, Workspace(Path("."), RegradConfig()).bank_storage_options()
        return BankChoice(bank, ws, opts, explicit=True)  # GradientBank.open tells a path from a URI
    ws = Workspace.open(workspace, create=False)
    opts = ws.bank_storage_options()
    if ws.banks_remote:
        return BankChoice(ws.bank_path(current_checkpoint_id(ws)), ws, opts)
    banks = workspace_banks(ws)
    cid = current_checkpoint_id(ws, required=False)
    if cid is not None and ws.bank_path(cid) in banks:
        return BankChoice(ws.bank_path(cid), ws, opts)
    if len(banks) == 1:
        return BankChoice(banks[0], ws, opts)
    if not banks:
        raise NoBankError(f"workspace {ws.root} has no gradient bank yet: run `regrad build-bank`")
    raise NoBankError(f"workspace {ws.root} has several banks ({', '.join(Path(b).name for b in banks)}); "
                      "pass --bank DIR")
