"""The incremental writer: a file's rows, compared one by one with the table as the ingest found
it (``Snapshot``), the new and changed ones embedded and written as Lance fragments in batches of
``BATCH_ROWS``, then published with the deletion of the rows the file no longer has in one commit.

Memory follows ``BATCH_ROWS`` (and the largest document), not the file: a file of 600 000 records
is never held whole. A commit holds whole files only, so each file's documents are all old or
all new; several small files share a commit (until ``FLUSH_ROWS`` rows are pending) so that a
corpus of many files does not make a table version per file. A file skipped half way (found too
large, say) or a run that dies leaves its fragments unreferenced: never read, and deleted by the
next purge (`regrad bank rm`)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from regrad_cli.errors import IngestError, RegradError
from regrad_cli.offline.ingest.chunking import Chunk
from regrad_cli.offline.ingest.discovery import _File
from regrad_cli.offline.ingest.readers import _Doc
from regrad_cli.offline.ingest.summary import IngestSummary
from regrad_cli.offline.ingest.unchanged import RowsDigest

# Rows embedded and written as one fragment: what a file costs in memory at a time.
BATCH_ROWS = 4096
# Rows of whole files pending before a commit: few table versions for a corpus of small files,
# and a failure loses at most this much not-yet-committed work (never anything committed).
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


# Compared with the table's row of the same id: any difference rewrites the row.
_COMPARED = ("source", "title", "content_hash", "chunk", "n_tokens", "metadata")


class _FileWrite:
    """What one file changes: rows to write, fragments written, the table rows it keeps."""

    def __init__(self, f: _File, snap, first_time: bool):
        import numpy as np

        self.source, self.path = f.source, f.path
        # A source met twice in one run (two folders of one name): the first file decided the
        # fate of its old rows; the second only adds.
        self.start, self.stop = snap.source_range(f.source) if first_time else (0, 0)
        self.same = np.zeros(self.stop - self.start, dtype=bool)  # unchanged, path included
        self.matched = np.zeros(self.stop - self.start, dtype=bool)  # its id is in the new version
        self.moved: list[int] = []  # rows of other sources whose id this file takes over
        self.rows: list[dict] = []  # to write, not yet in a fragment
        self.frags: list = []
        self.n_written = 0
        self.counts = {"added": 0, "updated": 0, "unchanged": 0}
        self.digest = RowsDigest()
        self.by_hash: dict[str, int] | None = None  # content hash -> row of this source (lazy)


class _Writer:
    """Streams rows of one file at a time (``begin``, ``add``..., ``end`` or ``abort``) into
    fragments, and commits whole files (``flush``).

    A changed file replaces all its rows (its old rows are deleted by source, which is quick for
    Lance and needs no list of them); its unchanged rows are copied from the table as they are,
    without embedding them again. An unchanged file writes nothing."""

    def __init__(self, store, embedder, batch_size: int, summary: IngestSummary, snap,
                 before_commit=None):
        self.store = store
        self.embedder = embedder
        self.batch_size = max(1, int(batch_size))
        self.summary = summary
        self.snap = snap
        self.before_commit = before_commit
        self.cur: _FileWrite | None = None
        self.done_sources: set[str] = set()
        # Whole files waiting for the next commit.
        self.rows: list[dict] = []
        self.frags: list = []
        self.delete: dict[int, tuple[set, set]] = {}  # fragment id -> (sources, ids) to delete
        self.pending = 0
        self.wrote = False

    # One file ------------------------------------------------------------------------------
    def begin(self, f: _File) -> None:
        self.cur = _FileWrite(f, self.snap, f.source not in self.done_sources)

    def add(self, row: dict) -> None:
        """Compare ``row`` (of the current file) with the table; queue it unless unchanged."""
        cur, snap = self.cur, self.snap
        i = snap.index_of(row["id"])
        local = cur.start <= i < cur.stop
        if i >= 0 and not local and snap.get(i, "source") == cur.source:
            i = -1  # an old row of a source met earlier in this run: already decided
        cur.digest.add(row["id"], row["content_hash"], row["path"])
        if i < 0:
            cur.counts["added"] += 1
            row["_reuse"] = self._same_text(row["content_hash"])
            self._queue(row)
            return
        same = all(snap.get(i, k) == row[k] for k in _COMPARED)
        cur.counts["unchanged" if same else "updated"] += 1
        if local:
            cur.matched[i - cur.start] = True
        else:
            cur.moved.append(i)
        if same and local and snap.get(i, "path") == row["path"]:
            cur.same[i - cur.start] = True  # copied as it is if the file changed
            return
        # Same text at a new place, or a changed row: written again, with the stored vector of
        # any text this source (or this id) already had.
        row["_reuse"] = i if snap.get(i, "content_hash") == row["content_hash"] else \
            self._same_text(row["content_hash"])
        self._queue(row)

    def _same_text(self, content_hash: str) -> int:
        cur = self.cur
        if cur.stop <= cur.start:
            return -1
        if cur.by_hash is None:
            cur.by_hash = {}
            for j, h in enumerate(self.snap.column("content_hash", cur.start, cur.stop)):
                cur.by_hash.setdefault(h, cur.start + j)
        return cur.by_hash.get(content_hash, -1)

    def _queue(self, row: dict) -> None:
        cur = self.cur
        cur.rows.append(row)
        cur.n_written += 1
        if len(cur.rows) >= BATCH_ROWS:
            cur.frags += self._write(cur.rows)
            cur.rows = []

    def abort(self) -> None:
        """Drop the current file (skipped): nothing of it is committed; its fragments, if any
        were written, stay unreferenced."""
        self.cur = None

    def end(self) -> str:
        """The current file is complete: queue it for the next commit (committing when enough is
        pending), count it, and return the digest of the rows it now has in the table."""
        cur, self.cur = self.cur, None
        for k, v in cur.counts.items():
            setattr(self.summary, k, getattr(self.summary, k) + v)
        self.done_sources.add(cur.source)
        n_old = cur.stop - cur.start
        removed = int((~cur.matched).sum())
        if cur.n_written or removed or cur.moved:
            self.summary.removed += removed
            snap = self.snap
            same = (cur.start + cur.same.nonzero()[0]).tolist()
            for a in range(0, len(same), BATCH_ROWS):
                cur.frags += self.store.copy_rows([snap.addr(i) for i in same[a:a + BATCH_ROWS]])
            if n_old:
                for fid in snap.fragments(cur.start, cur.stop):
                    self.delete.setdefault(fid, (set(), set()))[0].add(cur.source)
            for i in cur.moved:
                self.delete.setdefault(snap.addr(i) >> 32, (set(), set()))[1].add(snap.get(i, "id"))
            self.rows += cur.rows
            self.frags += cur.frags
            self.pending += cur.n_written + n_old + len(cur.moved)
            if len(self.rows) >= BATCH_ROWS:
                self.frags += self._write(self.rows)
                self.rows = []
            if self.pending >= FLUSH_ROWS:
                self.flush()
        return cur.digest.value()

    # Commits -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Commit every complete file queued so far (one Lance commit)."""
        if not self.pending:
            return
        if self.before_commit is not None:
            self.before_commit()
        self.frags += self._write(self.rows)
        if self.frags or self.delete:
            self.store.commit_rows(self.frags, self.delete)
            self.wrote = True
        self.rows, self.frags, self.delete, self.pending = [], [], {}, 0

    def _write(self, rows: list[dict]) -> list:
        """Embed ``rows`` (reusing stored vectors where the text is the same) and write them as
        uncommitted fragments."""
        import numpy as np

        if not rows:
            return []
        reuse = [r for r in rows if r.get("_reuse", -1) >= 0]
        if reuse:
            vecs = self.store.take_embeddings([self.snap.addr(r["_reuse"]) for r in reuse])
            if vecs is not None:
                for r, v in zip(reuse, vecs):
                    r["embedding"] = v
        todo = [r for r in rows if r.get("embedding") is None]
        for i in range(0, len(todo), self.batch_size):
            batch = todo[i : i + self.batch_size]
            try:
                vecs = np.asarray(self.embedder.embed([r["text"] for r in batch]), dtype=np.float32)
            except RegradError:
                raise
            except Exception as exc:  # noqa: BLE001 - the embedder is a third-party model
                raise IngestError(
                    f"embedding failed on a batch from {batch[0]['source']}: {exc} "
                    f"(documents committed before this batch are kept; re-run to continue)"
                ) from exc
            for r, v in zip(batch, vecs):
                r["embedding"] = v
        dim = int(np.asarray(rows[0]["embedding"]).shape[-1])
        fp = self.store.embedder_fingerprint
        if fp is None:
            self.store.create(dim, {"id": _embedder_name(self.embedder), "dim": dim})
        elif fp["dim"] != dim:
            raise IngestError(
                f"embedder {_embedder_name(self.embedder)!r} gives {dim}-dim vectors but the "
                f"documents table holds {fp['dim']}-dim vectors from {fp['id']!r}"
            )
        now = datetime.now(timezone.utc)
        for r in rows:
            r["ingested_at"] = now
        return self.store.write_fragments(rows)


def _embedder_name(embedder) -> str:
    name = getattr(embedder, "name", None)
    return str(name) if name else str(embedder.fingerprint["id"])
