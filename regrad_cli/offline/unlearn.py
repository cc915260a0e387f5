"""Unlearning: ``regrad bank rm`` as one transaction, and the tombstones that make it stick.

``remove_documents`` holds the workspace lock (no ingest meanwhile) and each bank's writer lock,
and works in an order that a crash at any point cannot undo:

1. the documents to remove are resolved (named ids, and every document and bank row of the named
   sources) and written to the tombstones as "pending", before anything is deleted;
2. their rows are deleted from every bank of the workspace (and the ``--bank`` one) and each bank
   is purged (fragments rewritten, old versions removed: the bytes leave the disk);
3. their texts are deleted from the documents table, which is purged the same way;
4. the tombstones are marked "done".

Each step also takes up whatever an interrupted run left "pending", and purges even when nothing
is left to delete, so re-running any ``bank rm`` finishes the removal. ingest skips tombstoned
documents (``--readmit`` brings them back on purpose) and build-bank never computes or commits
their rows: a build planned before the removal checks the tombstones under the bank's writer
lock, just before each commit.
"""

from __future__ import annotations

import logging
from typing import Iterable

from regrad_cli.errors import RegradError
from regrad_cli.workspace.tombstones import Tombstones

log = logging.getLogger("regrad")


def remove_documents(workspace=None, bank: str | None = None, doc_ids: Iterable[str] = (),
                     sources: Iterable[str] = (), *, keep_documents: bool = False) -> dict:
    """Unlearn documents (see the module docstring) from the workspace at ``workspace`` and every
    bank of it, and from the bank ``bank`` (``--bank``), with the workspace when there is one.

    With ``keep_documents`` only the bank rows go (a repair: build-bank computes them again), and
    nothing is tombstoned; otherwise ``bank``'s rows go and those of every bank of the workspace. Returns {"removed_rows", "removed_documents", "rows", "banks", "purge",
    "documents_kept"}.
    """
    from contextlib import ExitStack

    from regrad_cli.workspace.banks import open_bank, select_bank, workspace_banks
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.workspace.documents import DocumentStore, workspace_lock
    from regrad_cli.errors import NoBankError

    ids, srcs = set(doc_ids or ()), set(sources or ())
    if bank is not None:
        choice = select_bank(workspace, bank)
        ws, opts, locations = choice.workspace, choice.storage_options, [choice.location]
        if ws is not None and not keep_documents:  # unlearning: the workspace's other banks too
            locations += [b for b in workspace_banks(ws) if str(b) != str(choice.location)]
    else:
        ws = Workspace.open(workspace, create=False)
        # Every bank of the workspace (old checkpoints' too: each holds the gradients).
        opts, locations = ws.bank_storage_options(), workspace_banks(ws)
    tombs = Tombstones(ws) if ws is not None and not keep_documents else None
    p_ids, p_srcs = tombs.pending() if tombs is not None else (set(), set())
    if not ids and not srcs and not p_ids and not p_srcs:
        raise RegradError("name DOC_ID... or --source PATH")
    banks = [b for b in (open_bank(loc, opts, read_only=False, missing_ok=True) for loc in locations) if b is not None]
    if bank is not None and not banks:
        raise NoBankError(f"no bank at {bank}")
    if keep_documents and not banks:
        raise NoBankError(f"workspace {ws.root} has no gradient bank: nothing to remove with --keep-documents")
    store = DocumentStore(ws) if ws is not None and not keep_documents else None

    with ExitStack() as stack:
        if store is not None:
            stack.enter_context(workspace_lock(ws, timeout=60, what="unlearning"))
        for b in banks:
            stack.enter_context(b.locked())
        if tombs is not None:  # again, under the lock: what an interrupted run left
            p_ids, p_srcs = tombs.pending()
        # 1. resolve and tombstone first
        if srcs:
            if store is not None and store.exists:
                t = store.arrow(["id", "source"])
                ids |= {d for d, s in zip(t.column("id").to_pylist(), t.column("source").to_pylist()) if s in srcs}
            for b in banks:
                ids |= b.doc_ids(where_sources=sorted(srcs))
        if tombs is not None:
            tombs.mark(ids, srcs, "pending")
            ids |= p_ids
            srcs |= p_srcs
        # 2. bank rows, then purge (also when nothing is left: an earlier run may have stopped
        # between its delete and its purge)
        removed_rows, purges = 0, []
        for b in banks:
            removed_rows += b.delete(doc_ids=sorted(ids), where_sources=sorted(srcs))
            purges.append(b.purge())
        # 3. documents, then purge
        removed_docs = store.delete(ids=ids, sources=srcs, purge=True) if store is not None else 0
        # 4. done
        if tombs is not None:
            tombs.mark(ids, srcs, "done")
        rows = sum(b.count() for b in banks)
    log.info("bank rm: %d rows from %d banks, %d documents", removed_rows, len(banks), removed_docs)
    return {"removed_rows": removed_rows, "removed_documents": removed_docs, "rows": rows,
            "banks": [str(b.path) for b in banks], "purge": purges[0] if len(purges) == 1 else purges,
            "documents_kept": ws is None and not keep_documents}
