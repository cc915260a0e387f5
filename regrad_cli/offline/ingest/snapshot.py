"""The documents table as an ingest found it (``Snapshot``): every row's bookkeeping columns and
its Lance row address, held as Arrow columns (repeated strings dictionary-encoded) and numpy
arrays, not as a Python object per row: 600 000 rows cost about 100 MB, not a GB.

Rows are addressed by their index in source order (a source's rows are ``source_range``); ids
are found through a sorted array of their hashes. Ingest compares a file's new rows with the
snapshot, copies the unchanged rows of a changed file by their row addresses, and learns from
them which fragments hold a file's old rows. Row addresses stay valid for the whole run: its
commits only add fragments and deletion files, never rewrite the fragments that were there (the
workspace lock keeps `bank rm`'s purge out)."""

from __future__ import annotations

from typing import Iterator

from regrad_cli.offline.ingest.unchanged import RowsDigest

# Columns whose few distinct values repeat on many rows.
_ENCODED = ("source", "path", "title", "metadata")


def _encode(batch):
    """A record batch with its repeated string columns dictionary-encoded."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = []
    for n, c in zip(batch.schema.names, batch.columns):
        if n in _ENCODED and (pa.types.is_string(c.type) or pa.types.is_large_string(c.type)):
            c = pc.dictionary_encode(pc.fill_null(c, ""))  # a null (a table from elsewhere) reads as ""
        cols.append(c)
    return pa.RecordBatch.from_arrays(cols, names=batch.schema.names)


class Snapshot:
    """Rows of the documents table at the start of an ingest (``Snapshot.read(store)``)."""

    def __init__(self, batches=None):
        import numpy as np
        import pyarrow as pa

        batches = [b for b in (batches or []) if b.num_rows]
        self.n = sum(b.num_rows for b in batches)
        self._ranges: dict[str, tuple[int, int]] = {}
        if not self.n:
            self._cols: dict = {}
            self._perm = self._addr = self._hashes = self._hash_rows = np.zeros(0, dtype=np.int64)
            return
        names = batches[0].schema.names
        self._cols = {n: pa.chunked_array([b.column(n) for b in batches]) for n in names if n != "_rowaddr"}
        self._addr = np.concatenate([b.column("_rowaddr").to_numpy() for b in batches]).astype(np.uint64)
        # Source order: a global code per source, then a stable sort of the rows by it.
        code_of: dict[str, int] = {}
        codes = np.empty(self.n, dtype=np.int32)
        start = 0
        for b in batches:
            col = b.column("source")
            local = np.array([code_of.setdefault(s, len(code_of)) for s in col.dictionary.to_pylist()],
                             dtype=np.int32)
            codes[start:start + b.num_rows] = local[col.indices.to_numpy(zero_copy_only=False)]
            start += b.num_rows
        self._perm = np.argsort(codes, kind="stable")
        counts = np.bincount(codes, minlength=len(code_of))
        ends = np.cumsum(counts)
        for source, c in code_of.items():
            self._ranges[source] = (int(ends[c] - counts[c]), int(ends[c]))
        del codes
        # Ids: their hashes (Python's, fixed within a process) sorted, with the row each is of.
        hashes = np.empty(self.n, dtype=np.int64)
        pos = np.empty(self.n, dtype=np.int64)  # physical row -> index in source order
        pos[self._perm] = np.arange(self.n)
        start = 0
        for b in batches:
            ids = b.column("id").to_pylist()
            hashes[start:start + len(ids)] = [hash(i) for i in ids]
            start += len(ids)
        order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[order]
        self._hash_rows = pos[order]

    @classmethod
    def read(cls, store) -> "Snapshot":
        """The store's table now (empty when nothing was ingested); IngestError if damaged."""
        return cls(store.light_rows(convert=_encode))

    def __len__(self) -> int:
        return self.n

    # Lookups --------------------------------------------------------------------------------
    def index_of(self, rid: str) -> int:
        """The row index of document ``rid``, or -1."""
        import numpy as np

        if not self.n:
            return -1
        h = hash(rid)
        k = int(np.searchsorted(self._hashes, h))
        while k < self.n and self._hashes[k] == h:
            i = int(self._hash_rows[k])
            if self.get(i, "id") == rid:
                return i
            k += 1
        return -1

    def get(self, i: int, column: str):
        return self._cols[column][int(self._perm[i])].as_py()

    def addr(self, i: int) -> int:
        return int(self._addr[self._perm[i]])

    def column(self, name: str, start: int, stop: int) -> list:
        """Values of ``name`` for rows ``[start, stop)``."""
        import pyarrow as pa

        if stop <= start:
            return []
        return self._cols[name].take(pa.array(self._perm[start:stop])).to_pylist()

    def fragments(self, start: int, stop: int) -> list[int]:
        """The Lance fragment ids holding rows ``[start, stop)``."""
        import numpy as np

        if stop <= start:
            return []
        return [int(f) for f in np.unique(self._addr[self._perm[start:stop]] >> np.uint64(32))]

    def source_range(self, source: str) -> tuple[int, int]:
        """Row indices ``[start, stop)`` of ``source``'s rows (empty when it has none)."""
        return self._ranges.get(source, (0, 0))

    def sources(self) -> Iterator[str]:
        return iter(self._ranges)

    def count(self, source: str) -> int:
        start, stop = self.source_range(source)
        return stop - start

    def paths(self, source: str) -> list[str]:
        """The distinct paths of ``source``'s rows."""
        start, stop = self.source_range(source)
        seen: dict[str, None] = {}
        for a in range(start, stop, 65536):
            for p in self.column("path", a, min(stop, a + 65536)):
                if p:
                    seen.setdefault(p)
        return list(seen)

    def rows_digest(self, source: str, batch: int = 8192) -> str:
        """RowsDigest of ``source``'s rows, read in batches."""
        d = RowsDigest()
        start, stop = self.source_range(source)
        for a in range(start, stop, batch):
            b = min(stop, a + batch)
            for rid, h, p in zip(self.column("id", a, b), self.column("content_hash", a, b), self.column("path", a, b)):
                d.add(rid, h, p)
        return d.value()


class TakenIds:
    """Which file of this run took each document id (a repeated id is skipped, first one wins).

    Ids already in the table are marked in an array beside the snapshot (4 bytes a row, so an
    unchanged file of 600 000 records adds no Python object); only ids new to the table are
    kept in a dict. A file is named by its number in ``files``."""

    def __init__(self, snap: Snapshot):
        import numpy as np

        self.snap = snap
        self.by_row = np.full(len(snap), -1, dtype=np.int32)
        self.new: dict[str, int] = {}
        self.files: list[str] = []

    def file(self, display: str) -> int:
        """Number a file of this run (call once per file)."""
        self.files.append(display)
        return len(self.files) - 1

    def where(self, rid: str) -> str | None:
        """The file that took ``rid`` in this run, or None."""
        i = self.snap.index_of(rid)
        n = int(self.by_row[i]) if i >= 0 else self.new.get(rid, -1)
        return self.files[n] if n >= 0 else None

    def take(self, rid: str, file_no: int) -> None:
        i = self.snap.index_of(rid)
        if i >= 0:
            self.by_row[i] = file_no
        else:
            self.new[rid] = file_no

    def release(self, rid: str) -> None:
        i = self.snap.index_of(rid)
        if i >= 0:
            self.by_row[i] = -1
        else:
            self.new.pop(rid, None)

    def any_taken(self, source: str) -> bool:
        start, stop = self.snap.source_range(source)
        return bool((self.by_row[start:stop] >= 0).any())

    def take_source(self, source: str, file_no: int) -> None:
        start, stop = self.snap.source_range(source)
        self.by_row[start:stop] = file_no
