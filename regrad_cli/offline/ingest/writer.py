"""The incremental writer: rows of whole sources, embedded when new, written in one merge_insert."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from regrad_cli.errors import IngestError, RegradError
from regrad_cli.offline.ingest.chunking import Chunk
from regrad_cli.offline.ingest.discovery import _File
from regrad_cli.offline.ingest.readers import _Doc
from regrad_cli.offline.ingest.summary import IngestSummary

# Rows buffered before one merge_insert: few table versions for a big corpus, and a failure
# loses at most this much not-yet-written work (never anything already in the table).
FLUSH_ROWS = 512


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _doc_rows(doc: _Doc, f: _File, chunks: list[Chunk]) -> list[dict]:
    meta = json.dumps(doc.metadata, ensure_ascii=False, sort_keys=True, default=str)
    rows = []
    for k, ch in enumerate(chunks):
        rid = f"{doc.base_id}#{k}" if doc.suffix_always or len(chunks) > 1 else doc.base_id
        rows.append(
            {
                "id": rid, "source": f.source, "path": f.path, "title": doc.title, "text": ch.text,
                "content_hash": _sha256(ch.text), "chunk": k, "n_tokens": ch.n_tokens,
                "metadata": meta,
            }
        )
    return rows


_COMPARED = ("source", "title", "content_hash", "chunk", "n_tokens", "metadata")


class _Writer:
    """Buffers rows of whole sources, embeds what is new, writes them with one merge_insert."""

    def __init__(self, store, embedder, batch_size: int, summary: IngestSummary):
        self.store = store
        self.embedder = embedder
        self.batch_size = max(1, int(batch_size))
        self.summary = summary
        self.rows: list[dict] = []
        self.sources: set[str] = set()
        self.wrote = False

    def add(self, source: str, rows: list[dict]) -> None:
        self.rows.extend(rows)
        self.sources.add(source)
        if len(self.rows) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.sources:
            return
        import numpy as np

        todo = [r for r in self.rows if r.get("embedding") is None]
        for i in range(0, len(todo), self.batch_size):
            batch = todo[i : i + self.batch_size]
            try:
                vecs = np.asarray(self.embedder.embed([r["text"] for r in batch]), dtype=np.float32)
            except RegradError:
                raise
            except Exception as exc:  # noqa: BLE001 - the embedder is a third-party model
                raise IngestError(
                    f"embedding failed on a batch from {batch[0]['source']}: {exc} "
                    f"(documents written before this batch are kept; re-run to continue)"
                ) from exc
            for r, v in zip(batch, vecs):
                r["embedding"] = v
        if self.rows:
            dim = int(np.asarray(self.rows[0]["embedding"]).shape[-1])
            fp = self.store.embedder_fingerprint
            if fp is None:
                self.store.create(dim, {"id": _embedder_name(self.embedder), "dim": dim})
            elif fp["dim"] != dim:
                raise IngestError(
                    f"embedder {_embedder_name(self.embedder)!r} gives {dim}-dim vectors but the "
                    f"documents table holds {fp['dim']}-dim vectors from {fp['id']!r}"
                )
        now = datetime.now(timezone.utc)
        for r in self.rows:
            r["ingested_at"] = now
            r["embedding"] = np.asarray(r["embedding"], dtype=np.float32).tolist()
        if self.store.table() is not None:
            self.store.replace_sources(self.rows, self.sources)
            self.wrote = True
        self.rows, self.sources = [], set()


def _embedder_name(embedder) -> str:
    name = getattr(embedder, "name", None)
    return str(name) if name else str(embedder.fingerprint["id"])


def _stage_source(source, rows, by_id, old_rows, store, writer: _Writer, summary: IngestSummary) -> None:
    """Count one source's new rows against the table and queue it for writing if it changed."""
    new_ids = {r["id"] for r in rows}
    changed = len(old_rows) != len(rows)
    counts = {"added": 0, "updated": 0, "unchanged": 0}
    for r in rows:
        old = by_id.get(r["id"])
        if old is None:
            counts["added"] += 1
            changed = True
        elif any(old.get(k) != r[k] for k in _COMPARED):
            counts["updated"] += 1
            changed = True
        else:
            counts["unchanged"] += 1
            if old.get("path") != r["path"]:
                changed = True  # same content found at a new place: record the new path
    summary.added += counts["added"]
    summary.updated += counts["updated"]
    summary.unchanged += counts["unchanged"]
    if not changed:
        return
    summary.removed += sum(1 for r in old_rows if r["id"] not in new_ids)
    # Reuse the stored vector of any text this source already had (same hash = same vector).
    reusable = {r["content_hash"]: r["id"] for r in old_rows}
    reusable.update({by_id[r["id"]]["content_hash"]: r["id"] for r in rows if r["id"] in by_id})
    want = {reusable[r["content_hash"]] for r in rows if r["content_hash"] in reusable}
    vectors = {}
    if want:
        got = store.get(want, ["content_hash", "embedding"])
        vectors = {g["content_hash"]: g["embedding"] for g in got.values()}
    for r in rows:
        r["embedding"] = vectors.get(r["content_hash"])
    writer.add(source, rows)
