"""What a workspace holds and how current its gradients are (``regrad status``, ``regrad docs ls``).

Nothing here loads a model: the documents table, the bank's keys and the learner checkpoint's
files are read. A document is *pending* when the bank has no row for its current text (new or
changed since the last build); a bank row is *stale* when its document is gone or has changed.
``regrad build-bank`` computes the pending ones and drops the stale ones.
"""

from __future__ import annotations



def freshness(store, bank) -> dict:
    """{"pending": documents without a row for their current text, "stale": rows whose document
    is gone or changed} between a DocumentStore and a GradientBank (None: every document pending)."""
    docs = set()
    if store.exists:
        t = store.arrow(["id", "content_hash"])
        docs = set(zip(t.column("id").to_pylist(), t.column("content_hash").to_pylist()))
    rows = bank.keys() if bank is not None else set()
    return {"pending": len(docs - rows), "stale": len(rows - docs)}


def document_id_base(doc_id: str) -> str:
    """The document a chunk id belongs to: "notes/a.md#2" -> "notes/a.md"."""
    base, sep, chunk = doc_id.rpartition("#")
    return base if sep and chunk.isdigit() else doc_id


def list_documents(ws, source: str | None = None) -> list[dict]:
    """One entry per document (a file or a record), in source order: {"source", "document",
    "chunks": [chunk ids], "tokens"}. ``source`` keeps those whose source is it or lies under it."""
    from regrad_cli.workspace.documents import DocumentStore

    store = DocumentStore(ws)
    if not store.exists:
        return []
    rows = store.all(columns=["id", "source", "chunk", "n_tokens"])
    if source is not None:
        want = source.rstrip("/")
        have = {r["source"] for r in rows}
        rows = [r for r in rows if r["source"] == want or r["source"].startswith(want + "/")]
        if not rows and have:  # a path as typed, not as recorded: refused as `bank rm --source` is
            from regrad_cli.errors import RegradError
            from regrad_cli.workspace.documents import unknown_source_hint

            raise RegradError(f"no document from source {source!r} in {ws.root}; {unknown_source_hint(source, have)}")
    docs: dict[tuple[str, str], dict] = {}
    for r in sorted(rows, key=lambda r: (r["source"], document_id_base(r["id"]), r["chunk"] or 0)):
        d = docs.setdefault((r["source"], document_id_base(r["id"])),
                            {"source": r["source"], "document": document_id_base(r["id"]), "chunks": [], "tokens": 0})
        d["chunks"].append(r["id"])
        d["tokens"] += int(r["n_tokens"] or 0)
    return list(docs.values())


def workspace_status(ws) -> dict:
    """Counts and fingerprints of a workspace, read without loading any model."""
    from regrad_cli.workspace.banks import current_checkpoint_id, open_bank, workspace_banks
    from regrad_cli.workspace.checkpoints import current_doc_loss
    from regrad_cli.workspace.documents import DocumentStore
    from regrad_cli.workspace.tombstones import Tombstones

    store = DocumentStore(ws)
    n_chunks = store.count() if store.exists else 0
    sources = len(store.sources()) if store.exists else 0
    ids = store.arrow(["id"]).column("id").to_pylist() if store.exists else []
    cid = current_checkpoint_id(ws, required=False)
    opts = ws.bank_storage_options()
    if cid is not None:
        bank = open_bank(ws.bank_path(cid), opts, missing_ok=True)
    else:
        # The learner's id cannot be told without the model (an untrained 'init' learner): the
        # workspace's only bank is the one (as `regrad bank` picks it).
        banks = workspace_banks(ws)
        bank = open_bank(banks[0], opts) if len(banks) == 1 else None
    fresh = freshness(store, bank)
    tomb = Tombstones(ws).load()
    emb = store.embedder_fingerprint if store.exists else None
    return {
        "workspace": str(ws.root),
        "sources": sources,
        "documents": len({document_id_base(d) for d in ids}),
        "chunks": n_chunks,
        "rows": bank.count() if bank is not None else 0,
        "pending": fresh["pending"],
        "stale": fresh["stale"],
        # Chunks `bank rm` removed: a removal by --source records every chunk id too, so a file
        # is counted by its chunks however it was removed (not once more for its source).
        "unlearned": len(tomb["ids"]),
        "default_mode": ws.config.query.mode,
        "model": ws.config.model.id,
        "embedder": (emb or {}).get("id") or ws.config.embedder.id,
        "learner": {"checkpoint": ws.config.learner.checkpoint, "checkpoint_id": cid,
                    "doc_loss": current_doc_loss(ws)},
        "bank": None if bank is None else {
            "path": str(bank.path), "codec": bank.meta.codec.name, "format_version": bank.meta.format_version,
            "learner_checkpoint_id": bank.meta.learner.get("checkpoint_id"),
            "model": bank.meta.model.get("id"), "model_sha256": bank.meta.model.get("weights_sha256"),
            "embedder": bank.meta.embedder.get("id")},
        "next": _next_step(n_chunks, bank, fresh),
    }


def _next_step(chunks: int, bank, fresh: dict) -> str | None:
    if chunks == 0:
        return "regrad ingest PATH"
    if bank is None or fresh["pending"] or fresh["stale"]:
        return "regrad build-bank"
    return None


def id_suggestions(ws, given: str, limit: int = 10) -> list[str]:
    """Document ids of the workspace that start with ``given`` (what `bank rm` names on a miss)."""
    from regrad_cli.workspace.documents import DocumentStore

    store = DocumentStore(ws)
    if not store.exists:
        return []
    ids = sorted(d for d in store.arrow(["id"]).column("id").to_pylist() if d.startswith(given))
    return ids[:limit]


__all__ = ["freshness", "list_documents", "workspace_status", "id_suggestions", "document_id_base"]
