"""Which bank a command works on (core of `regrad bank`).

``select_bank`` is the one answer to "which bank": ``--bank`` when given (a directory or an
object-store URI), else the workspace's bank for its current learner checkpoint, else its only
bank. The CLI parses options, calls these functions and renders the result.

The bank contract is here too: what a bank records about the model, learner and embedder it was
built with (``bank_meta``), what it must match to be used (``expected_fingerprints``, checked by
``open_checkpoint_bank``) and how its rows are normalised (``row_norm``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regrad_cli.errors import ConfigError, NoBankError, RegradError
from regrad_cli.workspace.checkpoints import current_checkpoint_id

if TYPE_CHECKING:
    from bank_format import BankMeta, CodecSpec


@dataclass
class BankChoice:
    """A bank location, the workspace it belongs to (None when there is none) and its storage
    options (from the workspace's configuration and environment)."""

    location: "Path | str"
    workspace: Any = None
    storage_options: dict = field(default_factory=dict)
    explicit: bool = False  # named with --bank

    def open(self, read_only: bool = True):
        if not read_only and not self.explicit and self.workspace is not None:
            refuse_linked_banks_dir(self.workspace)
        return open_bank(self.location, self.storage_options, read_only=read_only)


def refuse_linked_banks_dir(ws) -> None:
    """RegradError when the workspace keeps its banks in WORKSPACE/banks and that folder is a
    symbolic link: every write and cleanup would reach whatever it points at (a copied workspace
    whose ``banks -> /other/workspace/banks`` made `bank compact`, `bank rm` and `build-bank`
    rewrite and purge the other workspace's bank). Reading through it stays allowed, as for a
    bank holding a link (bank_format.links); ``--bank`` and ``[bank] uri`` are the user's own."""
    import os

    banks = Path(ws.banks_dir)
    if ws.banks_location != banks or not banks.is_symlink():
        return
    raise RegradError(
        f"the workspace's bank folder {banks} is a symbolic link -> {os.readlink(banks)}: refused to "
        f"write or delete there (a copied workspace can point it at another workspace's banks); "
        f"move the banks into the workspace, or set [bank] uri to keep them elsewhere")


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


# The bank contract ---------------------------------------------------------------------------------
def bank_meta(engine, embedder_fp: dict, codec: CodecSpec) -> BankMeta:
    """The metadata of a new bank for ``engine`` (its learner's stored tensors) and this embedder."""
    from bank_format import BankMeta, TensorSpec
    from regrad_cli.workspace.engine import producer

    fps = engine.fingerprints(embedder_fp)
    layout = [TensorSpec(n, tuple(s)) for n, s in engine.stored_tensors()]
    stored = {t.name for t in layout}  # the rest are recorded as omitted (bank format 1.1)
    omitted = [TensorSpec(n, tuple(s)) for n, s in engine.learner.layout if n not in stored]
    return BankMeta(producer=producer(), model=fps["model"], learner=fps["learner"],
                    embedder=fps["embedder"], layout=layout, codec=codec, omitted=omitted,
                    row_norm=row_norm(engine))


def row_norm(engine) -> str | None:
    """The normalisation every row is stored with (bank key ``row_norm``, format 1.2).

    'doc' when the learner normalises each document's whole gradient ('doc') and the bank leaves
    tensors out: the query cannot take the norm of tensors it does not have, and normalising the
    stored ones alone would scale the step by ||g|| / ||g_stored|| (about 4.5 % for the shipped
    learner at threshold 1e-4). So the build divides each row by its whole gradient's norm and the
    query does not normalise again. None otherwise: rows are the raw gradients."""
    omits = len(engine.stored_tensors()) < len(engine.learner.layout)
    return "doc" if omits and engine.learner.trained_norm == "doc" else None


def expected_fingerprints(engine, embedder_fp: dict) -> dict:
    """What a bank must match to be used with ``engine``: model, checkpoint, embedder, and the
    tensor layout (names and shapes) the learner stores."""
    from bank_format import TensorSpec

    fps = engine.fingerprints(embedder_fp)
    return {"model": fps["model"], "learner": {"checkpoint_id": fps["learner"]["checkpoint_id"]},
            "embedder": fps["embedder"],
            "layout": [TensorSpec(n, tuple(s)) for n, s in engine.stored_tensors()]}


def open_bank(location, storage_options: dict, *, read_only: bool = True, expect: dict | None = None,
              missing_ok: bool = False):
    """The bank at ``location`` (a directory or an object-store URI), checked against ``expect``
    when given: the one way regrad opens a bank. None when there is none and ``missing_ok``."""
    from bank_format import GradientBank

    if missing_ok and not GradientBank.exists(location, storage_options):
        return None
    return GradientBank.open(location, expect=expect, read_only=read_only, storage_options=storage_options)


def open_checkpoint_bank(ws, engine, embedder_fp: dict, *, read_only: bool):
    """The workspace's bank for ``engine``'s learner checkpoint, opened against the contract
    (``expected_fingerprints``); None when that bank does not exist yet."""
    if not read_only:
        refuse_linked_banks_dir(ws)
    return open_bank(ws.bank_path(engine.learner.checkpoint_id()), ws.bank_storage_options(), read_only=read_only,
                     expect=expected_fingerprints(engine, embedder_fp), missing_ok=True)
