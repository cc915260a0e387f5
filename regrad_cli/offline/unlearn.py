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


def _check_named(ws, store, banks, ids: set, srcs: set, tombs) -> None:
    """RegradError for a named id or source that no document, bank row or earlier removal has
    (see ``_raise_unknown``); before anything is removed, under the locks."""
    if srcs:
        have = set(store.sources()) if store is not None and store.exists else set()
        missing = {s for s in srcs - have if not any(b.doc_ids(where_sources=[s]) for b in banks)}
        _raise_unknown_source(ws, missing, have, tombs)
    if not ids:
        return
    all_ids: set[str] = set()
    if store is not None and store.exists:
        all_ids |= set(store.arrow(["id"]).column("id").to_pylist())
    for b in banks:
        all_ids |= b.doc_ids()
    _raise_unknown(ws, ids, all_ids, tombs)


def _check_named_early(ws, locations, opts, ids: set, srcs: set, tombs, with_documents: bool) -> None:
    """``_check_named`` before lancedb (seconds to import) or a model is loaded: the ids are
    read with pylance alone (``DocumentStore.ids``, ``GradientBank.read_doc_ids``), so a typo
    fails at once. Where something cannot be read that way (a bank on an object store, a damaged
    table) it says nothing, and ``_check_named`` decides under the locks, as before.

    It takes no lock: it only reads, and each read sees one committed version (Lance publishes a
    version in one manifest write). A writer running meanwhile can only make it refuse an id
    that is being ingested at that moment (rerun), or accept one that a concurrent `bank rm` is
    removing; the check under the locks then decides, and re-removing is harmless. A purge that
    deletes files under the read is a read error, and then this check steps aside."""
    from bank_format import BankFormatError, GradientBank, is_remote

    from regrad_cli.workspace.documents import DocumentStore

    if not (ids or srcs) or not (locations or with_documents) or any(is_remote(str(loc)) for loc in locations):
        return
    if not all(GradientBank.exists(loc) for loc in locations):
        return  # a --bank that is not there: remove_documents says so
    all_ids: set[str] = set()
    sources: set[str] = set()
    try:
        if with_documents:
            all_ids |= DocumentStore(ws).ids() if ids else set()
            sources |= DocumentStore(ws).source_names() if srcs else set()
        for loc in locations if ids else ():
            all_ids |= GradientBank.read_doc_ids(loc, opts)
    except (RegradError, BankFormatError, OSError) as exc:
        log.debug("early id check skipped: %s", exc)
        return
    if srcs and not locations:  # the banks' sources are read under the locks (no bank here)
        _raise_unknown_source(ws, srcs - sources, sources, tombs)
    _raise_unknown(ws, ids, all_ids, tombs)


def _raise_unknown_source(ws, missing: set, have: set, tombs) -> None:
    """RegradError for a named source that has no document, no bank row and no earlier removal,
    naming the sources that look like it (sources are paths relative to the folder's parent,
    as `regrad docs ls` shows them)."""
    known: set = set()
    if tombs is not None:
        from regrad_cli.workspace.status import document_id_base

        # A file whose every chunk was unlearned by id (`bank rm corpus/a.md#0`) counts as
        # removed, as the id itself does: naming its source again is "nothing left to remove".
        known = tombs.sources() | {document_id_base(i) for i in tombs.ids()}
    unknown = sorted(missing - known)
    if not unknown:
        return
    from regrad_cli.workspace.documents import unknown_source_hint

    given = unknown[0]
    where = ws.root if ws is not None else "the bank"
    msg = f"no document from source {given!r} in {where}"
    if len(unknown) > 1:
        msg += f" (nor from {len(unknown) - 1} more of the sources given)"
    raise RegradError(f"{msg}; {unknown_source_hint(given, have)}; nothing was removed")


def _raise_unknown(ws, ids: set, all_ids: set, tombs) -> None:
    """RegradError for a named id that is neither in ``all_ids`` nor tombstoned, naming the ids
    that start with it (a file's chunks are "PATH#0", "PATH#1"...) and --source."""
    known = set(tombs.ids()) if tombs is not None else set()
    unknown = sorted(ids - known - all_ids)
    if not unknown:
        return
    given = unknown[0]
    starts = sorted(d for d in all_ids if d.startswith(given))
    where = ws.root if ws is not None else "the bank"
    msg = f"no document {given!r} in {where}"
    if len(unknown) > 1:
        msg += f" (nor {len(unknown) - 1} more of the ids given)"
    if starts:
        msg += (f"; ids that start with it: {', '.join(starts[:8])}{', ...' if len(starts) > 8 else ''}"
                f"; to remove a whole file: `regrad bank rm --source {given.split('#')[0]}`")
    else:
        msg += "; `regrad docs ls` lists the document ids, `--source PATH` removes a whole file"
    raise RegradError(msg + "; nothing was removed")


def _delete(banks, store, ids: set, srcs: set, *, purge: bool) -> tuple[int, int, list]:
    """Steps 2 and 3 of a removal, under the caller's locks: the bank rows of ``ids`` and
    ``srcs`` from every bank, then their documents (bank rows first: a crash between the two
    leaves documents without gradients, which queries report, never gradients without documents).
    With ``purge`` old versions are removed too (the bytes leave the disk, even when nothing is
    left to delete: an earlier run may have stopped between its delete and its purge)."""
    removed_rows, purges = 0, []
    for b in banks:
        removed_rows += b.delete(doc_ids=sorted(ids), where_sources=sorted(srcs))
        if purge:
            purges.append(b.purge())
    removed_docs = store.delete(ids=ids, sources=srcs, purge=purge) if store is not None else 0
    return removed_rows, removed_docs, purges


def prune_sources(ws, store, sources: Iterable[str]) -> tuple[int, int]:
    """(documents, bank rows) removed for ``sources``, files that no longer exist (`ingest
    --prune`): the same deletion as `bank rm` (bank rows, then documents, each bank under its
    writer lock; the caller holds the workspace lock), without tombstones: the file may come back."""
    from contextlib import ExitStack

    from regrad_cli.workspace.banks import open_bank, refuse_linked_banks_dir, workspace_banks

    srcs = set(sources)
    if not srcs:
        return 0, 0
    refuse_linked_banks_dir(ws)
    opts = ws.bank_storage_options()
    banks = [b for b in (open_bank(loc, opts, read_only=False, missing_ok=True) for loc in workspace_banks(ws))
             if b is not None]
    with ExitStack() as stack:
        for b in banks:
            stack.enter_context(b.locked())
        rows, docs, _ = _delete(banks, store, set(), srcs, purge=False)
    log.info("prune: %d documents and %d bank rows of %d sources", docs, rows, len(srcs))
    return docs, rows


def remove_documents(workspace=None, bank: str | None = None, doc_ids: Iterable[str] = (),
                     sources: Iterable[str] = (), *, keep_documents: bool = False) -> dict:
    """Unlearn documents (see the module docstring) from the workspace at ``workspace`` and every
    bank of it, and from the bank ``bank`` (``--bank``), with the workspace when there is one.

    With ``keep_documents`` only the bank rows go (a repair: build-bank computes them again), and
    nothing is tombstoned; otherwise ``bank``'s rows go and those of every bank of the workspace. Returns {"removed_rows", "removed_documents", "rows", "banks", "purge",
    "documents_kept"}.
    """
    from contextlib import ExitStack

    from regrad_cli.workspace.banks import open_bank, refuse_linked_banks_dir, select_bank, workspace_banks
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
    _check_named_early(ws, locations, opts, ids, srcs, tombs, with_documents=ws is not None and not keep_documents)
    if ws is not None and any(str(loc) != str(bank) for loc in locations):  # the workspace's own banks
        refuse_linked_banks_dir(ws)
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
        _check_named(ws, store, banks, ids, srcs, tombs)
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
        # 2. bank rows, then purge; 3. documents, then purge
        removed_rows, removed_docs, purges = _delete(banks, store, ids, srcs, purge=True)
        # 4. done
        if tombs is not None:
            tombs.mark(ids, srcs, "done")
        rows = sum(b.count() for b in banks)
    log.info("bank rm: %d rows from %d banks, %d documents", removed_rows, len(banks), removed_docs)
    return {"removed_rows": removed_rows, "removed_documents": removed_docs, "rows": rows,
            "banks": [str(b.path) for b in banks], "purge": purges[0] if len(purges) == 1 else purges,
            "documents_kept": ws is None and not keep_documents}
