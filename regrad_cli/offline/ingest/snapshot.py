"""The documents table as an ingest found it (``Snapshot``): every row's bookkeeping columns and
its Lance row address, held as Arrow columns sorted by source (not as a Python dict per row:
600 000 rows cost tens of MB, not a GB), with an id -> row index map.

Ingest compares a file's new rows with it, copies the unchanged rows of a changed file by their
row addresses, and knows from them which fragments hold a file's old rows. Row addresses stay
valid for the whole run: the run's commits only add fragments and deletion files, never rewrite
the fragments that were there (the workspace lock keeps `bank rm`'s purge out)."""

from __future__ import annotations

from typing import Iterator

from regrad_cli.offline.ingest.unchanged import RowsDigest


class Snapshot:
    """Rows of the documents table at the start of an ingest (``Snapshot.read(store)``)."""

    def __init__(self, table=None):
        import pyarrow as pa
        import pyarrow.compute as pc

        if table is None or table.num_rows == 0:
            self.n = 0
            self._cols: dict = {}
            self._ranges: dict[str, tuple[int, int]] = {}
            self._index: dict[str, int] = {}
            return
        table = table.sort_by("source").combine_chunks()
        self.n = table.num_rows
        cols = {}
        for name in table.column_names:
            col = table.column(name).chunk(0) if table.column(name).num_chunks else table.column(name)
            if name in ("source", "path", "title", "metadata") and pa.types.is_string(col.type):
                col = pc.dictionary_encode(col)  # a few distinct values repeated on many rows
            cols[name] = col
        self._cols = cols
        ends = pc.run_end_encode(table.column("source").combine_chunks())
        self._ranges = {}
        start = 0
        for src, end in zip(ends.values.to_pylist(), ends.run_ends.to_pylist()):
            self._ranges[src] = (start, end)
            start = end
        self._index = {rid: i for i, rid in enumerate(table.column("id").to_pylist())}

    @classmethod
    def read(cls, store) -> "Snapshot":
        """The store's table now (empty when nothing was ingested); IngestError if damaged."""
        return cls(store.light_rows())

    def __len__(self) -> int:
        return self.n

    # Lookups --------------------------------------------------------------------------------
    def index_of(self, rid: str) -> int:
        """The row index of document ``rid``, or -1."""
        return self._index.get(rid, -1)

    def get(self, i: int, column: str):
        return self._cols[column][i].as_py()

    def addr(self, i: int) -> int:
        return self._cols["_rowaddr"][i].as_py()

    def column(self, name: str, start: int, stop: int) -> list:
        """Values of ``name`` for rows ``[start, stop)``."""
        return self._cols[name].slice(start, stop - start).to_pylist() if stop > start else []

    def fragments(self, start: int, stop: int) -> list[int]:
        """The Lance fragment ids holding rows ``[start, stop)``."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if stop <= start:
            return []
        addrs = self._cols["_rowaddr"].slice(start, stop - start).cast(pa.uint64())
        return sorted(pc.unique(pc.shift_right(addrs, pa.scalar(32, pa.uint64()))).to_pylist())

    def source_range(self, source: str) -> tuple[int, int]:
        """Row indices ``[start, stop)`` of ``source``'s rows (empty when it has none)."""
        return self._ranges.get(source, (0, 0))

    def sources(self) -> Iterator[str]:
        return iter(self._ranges)

    def paths(self, source: str) -> list[str]:
        """The distinct paths of ``source``'s rows."""
        import pyarrow.compute as pc

        start, stop = self.source_range(source)
        if stop <= start:
            return []
        col = self._cols["path"].slice(start, stop - start)
        return [p for p in pc.unique(col.dictionary_decode() if hasattr(col, "dictionary_decode") else col)
                .to_pylist() if p]

    def count(self, source: str) -> int:
        start, stop = self.source_range(source)
        return stop - start

    def ids(self, source: str, batch: int = 8192) -> Iterator[str]:
        start, stop = self.source_range(source)
        for a in range(start, stop, batch):
            yield from self._cols["id"].slice(a, min(batch, stop - a)).to_pylist()

    def rows_digest(self, source: str, batch: int = 8192) -> str:
        """RowsDigest of ``source``'s rows, read in batches."""
        d = RowsDigest()
        start, stop = self.source_range(source)
        for a in range(start, stop, batch):
            n = min(batch, stop - a)
            ids = self._cols["id"].slice(a, n).to_pylist()
            hashes = self._cols["content_hash"].slice(a, n).to_pylist()
            paths = self._cols["path"].slice(a, n).to_pylist()
            for rid, h, p in zip(ids, hashes, paths):
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
