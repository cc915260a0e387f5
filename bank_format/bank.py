"""GradientBank: reader and writer of a Gradient Bank directory (docs/bank-format.md, 1, 3, 7, 8).

A bank is a LanceDB database directory with one table, ``gradients``; the bank metadata is the
table's Arrow schema metadata. lancedb does the appends, searches and index builds; pylance (the
``lance`` module, which lancedb's ``to_lance()`` also uses) does the scans, deletes, compaction and
cleanup, because only it exposes the options unlearning needs (section 8).

lancedb and lance are imported inside the methods: ``import bank_format`` stays light.

Why one module of ~950 lines: it is the one class ``GradientBank``, whose opening, writing,
maintenance and reading all go through the same private checks of untrusted rows and blobs
(``_check_row``, ``_prepare_row``), the same Lance error wrapper and the same writer lock; split
by responsibility, the parts would be mixins reaching into each other's privates. What is shared
with other tables (locks, purge, quoting) already lives in ``lance_ops``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from . import lance_ops, links
from .errors import BankFormatError, BankMismatchError, CorruptBlobError
from .lance_ops import LOCK_NAME, LOCK_TIMEOUT_S, sql_str as _sql_str  # noqa: F401 - re-exported
from .location import lance_errors, location, table_dir, table_uri
from .rows import check_row, repeated, rows_table
from .schema import (
    FORMAT_VERSION,
    META_KEY,
    TABLE_NAME,
    BankMeta,
    arrow_schema,
    check_table_schema,
)

log = logging.getLogger("bank_format")

# A bank may declare at most this many values per document (1 GiB as fp32): checked on open,
# before any blob is decoded against the layout (docs/reliability.md, threat model).
MAX_LAYOUT_VALUES = 1 << 28
# Rows per read when every blob is visited (verify, stats). They are read with fragment.take()
# in chunks of this many rows, not with a scan: measured with pylance 14, a scan's memory grows
# with the fragment (about 2x its bytes: 1.3 GB for a 600 MB fragment), while chunked take stays
# near 120 MB whatever the fragment size.
SCAN_BATCH_ROWS = 8
# Rows per batch inside compaction.
PURGE_BATCH_ROWS = 16
# Measured with pylance 14: the peak memory of compaction (and of a scan) grows with the bytes of
# the fragments it rewrites, about 1.5-2x, whatever batch_size or io_buffer_size say, because a
# fragment's blob column is read in large pages. So what bounds memory is fragment size:
# compaction never writes a fragment bigger than this (rows per fragment derived from the mean
# row size), and callers should append in batches no bigger than this either.
COMPACT_TARGET_BYTES = 256 * 1024 * 1024
# doc ids per filtered scan in fetch: keeps the SQL predicate short.
_FETCH_CHUNK = 256
# A bank of at most this many rows and without a vector index is searched and fetched through an
# in-memory snapshot of its small columns (doc ids, hashes, sources, embeddings: 48 MiB of
# embeddings at dim 384, and never more than MEMORY_SEARCH_BYTES in all), read once per committed
# version: a search is then one matrix-vector product and a fetch a positional take, instead of
# a LanceDB query each (docs/performance.md "Query latency": retrieval on the demo bank went from
# 22 ms to under 2 ms). Bigger or indexed banks are searched by LanceDB.
MEMORY_SEARCH_ROWS = 32768
MEMORY_SEARCH_BYTES = 64 << 20  # and at most this much of those columns held in memory

_CHECK_COLUMNS = ["doc_id", "content_hash", "codec", "checksum", "blob"]
# create_index names -> lancedb.index config classes
_INDEX_TYPES = {
    "IVF_FLAT": "IvfFlat", "IVF_PQ": "IvfPq", "IVF_SQ": "IvfSq", "IVF_RQ": "IvfRq",
    "IVF_HNSW_FLAT": "IvfHnswFlat", "IVF_HNSW_SQ": "IvfHnswSq", "IVF_HNSW_PQ": "IvfHnswPq",
}


class GradientBank:
    """One Gradient Bank on disk. Make one with ``create`` or ``open``, not the constructor."""

    def __init__(self, path: "Path | str", meta: BankMeta, db: Any, table: Any, read_only: str | None,
                 storage_options: Mapping[str, str] | None = None):
        self._path = path
        self._storage = dict(storage_options or {})
        self._meta = meta
        self._db = db
        self._table = table
        self._read_only = read_only  # None, or the reason writes are refused
        self._snap: _Snapshot | None = None  # in-memory search snapshot of one version (small banks)

    # -- opening ------------------------------------------------------------------------------

    @property
    def path(self) -> "Path | str":
        """The bank's directory (a ``Path``), or its URI (a ``str``) for an object-store bank."""
        return self._path

    @property
    def uri(self) -> str:
        """The bank's location as a string (directory path or object-store URI)."""
        return str(self._path)

    @property
    def remote(self) -> bool:
        return isinstance(self._path, str)

    @property
    def storage_options(self) -> dict:
        return dict(self._storage)

    @property
    def meta(self) -> BankMeta:
        return self._meta

    @property
    def read_only(self) -> bool:
        return self._read_only is not None

    def __repr__(self) -> str:
        return f"GradientBank({str(self._path)!r}, codec={self._meta.codec.name})"

    @staticmethod
    def exists(path: str | os.PathLike, storage_options: Mapping[str, str] | None = None) -> bool:
        """True when ``path`` holds a bank's table (it may still turn out damaged on open).

        A table counts once it has a committed version: a process killed inside ``create`` can
        leave the table directory without one, and ``create`` must then be able to run again."""
        loc = location(path)
        if isinstance(loc, str):
            import lance

            try:
                lance.dataset(table_uri(loc), storage_options=dict(storage_options or {}) or None)
                return True
            except Exception:  # no committed version there (lance raises ValueError/OSError)
                return False
        return lance_ops.committed(table_dir(loc))

    @staticmethod
    def read_doc_ids(path: str | os.PathLike, storage_options: Mapping[str, str] | None = None) -> set[str]:
        """The doc ids of the bank at ``path``, read with pylance alone: no lancedb import and
        no metadata check (``bank rm`` tells an unknown id from them before opening anything).
        An empty set where there is no bank yet; BankFormatError where its table cannot be read."""
        import lance

        loc = location(path)
        if isinstance(loc, Path) and not lance_ops.committed(table_dir(loc)):
            return set()
        with lance_errors(f"cannot read bank at {loc}"):
            ds = lance.dataset(table_uri(loc), storage_options=dict(storage_options or {}) or None)
            return set(ds.to_table(columns=["doc_id"]).column("doc_id").to_pylist())

    @staticmethod
    def _connect(path: "Path | str", storage_options: Mapping[str, str] | None = None):
        import lancedb

        # Interval 0: every call checks for the latest committed version, so a bank open in one
        # process sees rows appended by another; each call still reads one version (a snapshot).
        return lancedb.connect(str(path), read_consistency_interval=timedelta(0),
                               storage_options=dict(storage_options or {}) or None)

    @classmethod
    def create(cls, path: str | os.PathLike, meta: BankMeta,
               storage_options: Mapping[str, str] | None = None) -> "GradientBank":
        """Create an empty bank in directory ``path``; refuse if a bank is already there."""
        if not isinstance(meta, BankMeta):
            raise BankFormatError(f"meta must be a BankMeta, got {type(meta).__name__}")
        if meta.format_version != FORMAT_VERSION:
            raise BankFormatError(
                f"this regrad writes bank format {FORMAT_VERSION}, not {meta.format_version}"
            )
        meta = BankMeta.from_json(meta.to_json())  # exactly what a reader will see
        path = location(path)
        with cls._new_bank(path, storage_options):
            with lance_errors(f"cannot create bank at {path}"):
                db = cls._connect(path, storage_options)
                table = db.create_table(TABLE_NAME, schema=arrow_schema(meta.dim, meta), mode="create")
        log.info("created bank at %s (codec %s)", path, meta.codec.name)
        return cls(path, meta, db, table, None, storage_options)

    @classmethod
    @contextlib.contextmanager
    def _new_bank(cls, loc: "Path | str", storage_options: Mapping[str, str] | None) -> Iterator[None]:
        """Held while a bank is created at ``loc``: its directory made, the writer lock taken, and
        no bank there yet."""
        if isinstance(loc, Path):
            with lance_errors(f"cannot create bank directory {loc}"):
                loc.mkdir(parents=True, exist_ok=True)
            links.refuse_links(loc, f"bank directory {loc}")
        with cls._lock(loc):
            if cls.exists(loc, storage_options):
                raise BankFormatError(
                    f"a bank already exists at {loc}; open it, or delete the directory to start over"
                )
            yield

    @classmethod
    def create_from_fragments(cls, path: str | os.PathLike, meta: BankMeta, fragments: Sequence[str],
                              keys: Sequence[tuple[str, str]] | None = None,
                              storage_options: Mapping[str, str] | None = None) -> "GradientBank":
        """Create a bank whose first version holds its metadata AND the rows of ``fragments``
        (written by ``FragmentWriter`` for this location and ``meta``): one atomic commit, so a
        build that dies before it leaves no bank at all. Refuses if a bank is already there."""
        import lance

        from .fragments import parse_fragments

        if not isinstance(meta, BankMeta):
            raise BankFormatError(f"meta must be a BankMeta, got {type(meta).__name__}")
        meta = BankMeta.from_json(meta.to_json())
        loc = location(path)
        frags = parse_fragments(fragments)
        dup = repeated(keys or ())
        if dup:
            raise BankFormatError(f"the fragments repeat (doc_id, content_hash) keys: {dup[:5]}")
        with cls._new_bank(loc, storage_options):
            with lance_errors(f"cannot create bank at {loc}"):
                found = fragment_keys(loc, frags, storage_options)
                if keys is not None and sorted(found) != sorted(tuple(k) for k in keys):
                    raise BankFormatError(
                        f"the fragments to commit to {loc} hold other rows than the build wrote "
                        f"({len(found)} read back, {len(keys)} expected); nothing was committed")
                dup = repeated(found)
                if dup:
                    raise BankFormatError(f"the fragments repeat (doc_id, content_hash) keys: {dup[:5]}")
                lance.LanceDataset.commit(
                    table_uri(loc), lance.LanceOperation.Overwrite(arrow_schema(meta.dim, meta), frags),
                    storage_options=dict(storage_options or {}) or None)
        log.info("created bank at %s with %d rows in one commit", loc, sum(f.num_rows for f in frags))
        return cls.open(loc, storage_options=storage_options)

    @classmethod
    def open(
        cls, path: str | os.PathLike, expect: Mapping[str, Any] | None = None, *, read_only: bool = False,
        storage_options: Mapping[str, str] | None = None,
    ) -> "GradientBank":
        """Open the bank at ``path``, checking its version, schema and (if given) fingerprints.

        ``expect`` may hold "model", "learner", "embedder", "layout", "codec"; only what is given
        is compared, and every difference is reported in one ``BankMismatchError``.
        ``path`` may be an object-store URI (``s3://...``); ``storage_options`` then go to Lance
        (credentials, endpoint, region; the AWS_* environment variables work too).
        """
        path = location(path)
        if not cls.exists(path, storage_options):
            raise BankFormatError(f"no bank at {path}")
        with lance_errors(f"cannot open bank at {path}"):
            db = cls._connect(path, storage_options)
            table = db.open_table(TABLE_NAME)
            schema = table.schema
        raw = (schema.metadata or {}).get(META_KEY.encode())
        if raw is None:
            raise BankFormatError(
                f"{path} holds a LanceDB table {TABLE_NAME!r} but no {META_KEY!r} metadata: "
                f"not a regrad bank"
            )
        try:
            meta = BankMeta.from_json(raw)
        except BankFormatError as e:
            raise BankFormatError(f"bank at {path}: {e}") from None
        check_table_schema(schema, meta, f"bank at {path}")
        n_values = sum(t.numel for t in meta.layout)
        if n_values > MAX_LAYOUT_VALUES:
            raise BankFormatError(
                f"bank at {path} declares {n_values} gradient values per document, more than the "
                f"{MAX_LAYOUT_VALUES} this regrad reads: refused (damaged or hostile metadata)"
            )
        if expect:
            diffs = meta.differences(expect)
            if diffs:
                lines = "\n".join(f"  {f}: expected {e!r}, found {g!r}" for f, e, g in diffs)
                raise BankMismatchError(
                    f"bank at {path} was built for a different setup:\n{lines}\n"
                    f"Rebuild the bank, or use the model/learner/embedder it was built with.",
                    diffs,
                )
        reason = None
        if meta.is_newer_minor:
            reason = (
                f"bank at {path} has format {meta.format_version}, newer than this regrad's "
                f"{FORMAT_VERSION}: it can be read but not written; upgrade regrad to write to it"
            )
        elif read_only:
            reason = f"bank at {path} was opened read-only"
        return cls(path, meta, db, table, reason, storage_options)

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _lock(path: "Path | str"):
        return lance_ops.writer_lock(path)

    def locked(self):
        """Hold this bank's writer lock (re-entrant in one thread): a check and the writes that
        depend on it, made under one hold, cannot interleave with another writer or maintainer."""
        return self._lock(self._path)

    @staticmethod
    def build_lease(path: "str | os.PathLike"):
        """The lease a build of the bank at ``path`` holds for its whole run (a re-entrant
        ``filelock.FileLock``): while it is held, maintenance keeps unreferenced data files."""
        return lance_ops.build_lease(location(path))

    def _writing(self):
        if self._read_only is not None:
            raise BankFormatError(self._read_only)
        if isinstance(self._path, Path):  # never write or delete through a link (bank_format.links)
            links.refuse_links(self._path, f"bank at {self._path}")
        return self._lock(self._path)

    def dataset(self):
        """The latest committed version as a lance dataset (pylance): one consistent snapshot, for
        reads this class does not offer (versions, fragments, raw scans)."""
        import lance

        with lance_errors(f"cannot read bank at {self._path}"):
            return lance.dataset(table_uri(self._path), storage_options=self._storage or None)

    # -- writing ------------------------------------------------------------------------------

    def rows_table(self, rows: Sequence[Mapping[str, Any]]) -> Any:
        """Validate and encode ``rows`` into the Arrow table that ``append`` writes (no I/O;
        ``rows.rows_table``)."""
        return rows_table(self._meta, rows)

    def append(self, rows: Sequence[Mapping[str, Any]],
               forbidden: Callable[[], "set[str]"] | None = None) -> int:
        """Validate, encode and append ``rows`` as ONE commit; return the number written.

        Rows as in ``rows_table``. ``forbidden()``, called under the writer lock just before the
        commit, names doc ids that must not enter the bank (documents unlearned meanwhile):
        their rows are left out.
        """
        if self._read_only is not None:
            raise BankFormatError(self._read_only)
        data = self.rows_table(rows)
        if data is None:
            return 0
        with self._writing(), lance_errors(f"cannot append to bank at {self._path}"):
            if forbidden is not None:
                import pyarrow as pa
                import pyarrow.compute as pc

                banned = set(forbidden())
                if banned:
                    keep = pc.invert(pc.is_in(data.column("doc_id"), value_set=pa.array(sorted(banned), pa.string())))
                    data = data.filter(keep)
                    if data.num_rows == 0:
                        return 0
            self._table.add(data)
        log.debug("appended %d rows to %s", data.num_rows, self._path)
        return data.num_rows

    def fragment_writer(self) -> Any:
        """A picklable ``FragmentWriter`` for this bank: workers write fragments, the driver
        commits them all with ``commit_fragments`` (see bank_format/fragments.py)."""
        from .fragments import FragmentWriter

        if self._read_only is not None:
            raise BankFormatError(self._read_only)
        if isinstance(self._path, Path):
            links.refuse_links(self._path, f"bank at {self._path}")
        with lance_errors(f"cannot read bank at {self._path}"):
            version = self.dataset().data_storage_version
        return FragmentWriter(self._path, self._meta, self._storage, version)

    def commit_fragments(self, fragments: Sequence[str], keys: Sequence[tuple[str, str]] | None = None,
                         forbidden: Callable[[], "set[str]"] | None = None) -> int:
        """Make fragments written by ``FragmentWriter.write`` visible in ONE atomic commit (an
        Append: the schema and bank metadata are carried over unchanged); return the rows added.

        Under the writer lock, every data file of the fragments is read back first (a fragment
        whose files are gone, say removed by a maintenance run, refuses the whole commit), and
        their (doc_id, content_hash) keys must equal ``keys`` when given. A key already in the
        bank (say, from a build that ran alongside) refuses the whole commit, so no row is ever
        doubled. ``forbidden()`` (called under the lock) names doc ids unlearned meanwhile:
        their rows are deleted and purged right after the commit, within the same lock hold.
        """
        import lance

        from .fragments import parse_fragments

        if self._read_only is not None:
            raise BankFormatError(self._read_only)
        frags = parse_fragments(fragments)
        if not frags:
            return 0
        n = sum(f.num_rows for f in frags)
        with self._writing(), lance_errors(f"cannot commit to bank at {self._path}"):
            ds = self.dataset()
            found = fragment_keys(self._path, frags, self._storage)
            if keys is not None:
                dup = repeated(keys)
                if dup:
                    raise BankFormatError(f"the fragments repeat (doc_id, content_hash) keys: {dup[:5]}")
                if sorted(found) != sorted(tuple(k) for k in keys):
                    raise BankFormatError(
                        f"the fragments to commit to {self._path} hold other rows than the build "
                        f"wrote ({len(found)} read back, {len(keys)} expected); nothing was committed"
                    )
            new = set(found)
            t = ds.to_table(columns=["doc_id", "content_hash"])
            have = set(zip(t.column("doc_id").to_pylist(), t.column("content_hash").to_pylist()))
            clash = sorted(have & new)
            if clash:
                raise BankFormatError(
                    f"{len(clash)} of the rows to commit are already in bank {self._path} (another "
                    f"build ran alongside?), e.g. {clash[0]}; nothing was committed"
                )
            lance.LanceDataset.commit(table_uri(self._path), lance.LanceOperation.Append(frags),
                                      read_version=ds.version, storage_options=self._storage or None)
            banned = set(forbidden()) if forbidden is not None else set()
            gone = sorted({d for d, _ in new} & banned)
            if gone:
                log.info("unlearned while this build ran: removing %d rows again", len(gone))
                n -= self.delete(doc_ids=gone)
                self.purge()
        log.info("committed %d fragments (%d rows) to %s", len(frags), n, self._path)
        return n

    def delete(
        self,
        doc_ids: Sequence[str] | None = None,
        *,
        where_sources: Sequence[str] | None = None,
        keep_keys: set[tuple[str, str]] | None = None,
    ) -> int:
        """Delete rows whose doc_id is in ``doc_ids``, or whose source is in ``where_sources``,
        or whose (doc_id, content_hash) is not in ``keep_keys``; return the number deleted.

        One commit. The rows stay on disk (marked deleted) until ``purge()``.
        """
        if doc_ids is None and where_sources is None and keep_keys is None:
            raise BankFormatError("delete needs doc_ids, where_sources or keep_keys")
        if isinstance(doc_ids, str) or isinstance(where_sources, str):
            raise BankFormatError("doc_ids and where_sources must be lists of strings, not a string")
        ids = set(doc_ids or ())
        sources = set(where_sources or ())
        keep = None if keep_keys is None else {tuple(k) for k in keep_keys}
        with self._writing(), lance_errors(f"cannot delete from bank at {self._path}"):
            ds = self.dataset()
            t = ds.to_table(columns=["doc_id", "content_hash", "source"], with_row_id=True)
            doc, hsh, src = (t.column(c).to_pylist() for c in ("doc_id", "content_hash", "source"))
            rowid = t.column("_rowid").to_pylist()
            chosen = [
                r
                for r, d, h, s in zip(rowid, doc, hsh, src)
                if d in ids or (s is not None and s in sources) or (keep is not None and (d, h) not in keep)
            ]
            if not chosen:
                return 0
            # By row id, at the version just read (we hold the writer lock): the predicate Lance
            # records in _transactions/ then holds numbers, not the document ids being unlearned.
            ds.delete(f"_rowid IN ({','.join(map(str, chosen))})")
        log.info("deleted %d rows from %s", len(chosen), self._path)
        return len(chosen)

    def _compact(self, *, all_deletions: bool) -> dict:
        # Unreferenced data files may belong to a build in flight (a Ray build's workers write
        # them before the commit): they are deleted now only when no build holds the lease,
        # else only past lance_ops.ORPHAN_GRACE. Referenced files of old versions always go.
        with self._writing(), lance_ops.no_build_in_flight(self._path) as idle, \
                lance_errors(f"cannot compact bank at {self._path}"):
            ds = self.dataset()
            options: dict[str, Any] = {
                "batch_size": PURGE_BATCH_ROWS,
                "num_threads": 1,  # one rewrite task at a time, not one per core
                "target_rows_per_fragment": _target_rows(ds),
                "max_bytes_per_file": COMPACT_TARGET_BYTES,
            }
            return lance_ops.purge_dataset(
                ds, all_deletions=all_deletions, orphans_now=idle, what=f"bank at {self._path}",
                compact_options=options, reopen=self.dataset,
                after_compaction=self._rebuild_indices if all_deletions else None)

    def _rebuild_indices(self) -> None:
        # An ANN index keeps its own copy of the vectors (IVF_FLAT stores them normalised) or
        # codes of them: after a delete, those of deleted rows would survive compaction. So the
        # index is trained again from the remaining rows, with the same index type.
        for idx in self._table.list_indices():
            if "embedding" not in idx.columns:
                continue
            log.info("rebuilding %s index on embedding after purge", idx.index_type)
            try:
                self._build_index(idx.index_type, None)
            except Exception as e:  # e.g. too few rows left to train it: searches go exact
                log.warning("could not rebuild index %s (%s); dropping it", idx.name, e)
                self._table.drop_index(idx.name)

    def _build_index(self, class_name: str, num_partitions: int | None, **params: Any) -> None:
        import lancedb.index

        config_cls = getattr(lancedb.index, class_name, None)
        if config_cls is None or not class_name.startswith("Ivf"):
            raise BankFormatError(f"unsupported index type {class_name!r}; use one of {sorted(_INDEX_TYPES)}")
        n = self._table.count_rows()
        config = config_cls(distance_type="cosine", num_partitions=num_partitions or _default_partitions(n), **params)
        # With a config, lancedb reads the first argument as the column name (0.40).
        self._table.create_index("embedding", config=config, replace=True)

    def purge(self) -> dict:
        """Remove deleted rows' bytes from disk for good ("unlearning"): compaction rewriting every
        fragment with deletions, then removal of every older version. Needs exclusive use."""
        return self._compact(all_deletions=True)

    def compact(self) -> dict:
        """Merge the small fragments left by many appends and remove older versions.

        Memory follows fragment size, which compaction keeps near ``COMPACT_TARGET_BYTES``.
        Needs exclusive use, like ``purge``."""
        return self._compact(all_deletions=False)

    def create_index(self, index_type: str = "IVF_FLAT", *, num_partitions: int | None = None, **params: Any) -> None:
        """Build an ANN index on ``embedding`` (cosine) for large banks; ``search`` then uses it.

        ``index_type`` is one of IVF_FLAT (default: exact vectors, coarse partitions), IVF_PQ,
        IVF_SQ, IVF_RQ, IVF_HNSW_FLAT, IVF_HNSW_SQ, IVF_HNSW_PQ; ``params`` go to the matching
        ``lancedb.index`` config. ``purge`` rebuilds the index so deleted vectors leave it too.
        """
        if index_type not in _INDEX_TYPES:
            raise BankFormatError(f"unknown index type {index_type!r}; use one of {sorted(_INDEX_TYPES)}")
        with self._writing(), lance_errors(f"cannot index bank at {self._path}"):
            self._build_index(_INDEX_TYPES[index_type], num_partitions, **params)

    # -- reading ------------------------------------------------------------------------------

    def version(self) -> int:
        """The latest committed dataset version (each append, delete or commit adds one)."""
        with lance_errors(f"cannot read bank at {self._path}"):
            return self.dataset().version

    def count(self) -> int:
        with lance_errors(f"cannot read bank at {self._path}"):
            return self.dataset().count_rows()

    def keys(self) -> set[tuple[str, str]]:
        """All (doc_id, content_hash) pairs; reads only those two columns."""
        with lance_errors(f"cannot read bank at {self._path}"):
            t = self.dataset().to_table(columns=["doc_id", "content_hash"])
        return set(zip(t.column("doc_id").to_pylist(), t.column("content_hash").to_pylist()))

    def doc_ids(self, where_sources: Sequence[str] | None = None) -> set[str]:
        """The doc ids in the bank (those whose source is in ``where_sources``, when given)."""
        with lance_errors(f"cannot read bank at {self._path}"):
            t = self.dataset().to_table(columns=["doc_id", "source"])
        ids, srcs = t.column("doc_id").to_pylist(), t.column("source").to_pylist()
        if where_sources is None:
            return set(ids)
        want = set(where_sources)
        return {d for d, s in zip(ids, srcs) if s in want}

    def _check_vector(self, vector: Any) -> np.ndarray:
        try:
            q = np.asarray(vector, dtype=np.float32)
        except (TypeError, ValueError):
            raise BankFormatError("search vector is not a vector of numbers") from None
        if q.shape != (self._meta.dim,):
            raise BankFormatError(f"search vector has shape {q.shape}, the bank's embedder has dim {self._meta.dim}")
        if not np.isfinite(q).all() or not np.any(q):
            raise BankFormatError("search vector must be finite with a non-zero norm")
        return q

    def search_query(self, vector: Any, k: int, *, nprobes: int | None = None):
        """The LanceDB query ``search`` runs (not run yet): the ``k`` nearest rows by cosine, their
        doc_id, content_hash, source and ``_distance``; ``nprobes`` partitions of an ANN index
        are searched (default ``SEARCH_NPROBES``; ignored by a search without an index, which is
        exact)."""
        q = self._check_vector(vector)
        return (
            self._table.search(q, vector_column_name="embedding")
            .distance_type("cosine")
            .select(["doc_id", "content_hash", "source", "_distance"])
            .limit(k)
            .nprobes(SEARCH_NPROBES if nprobes is None else nprobes)
        )

    def search(self, vector: Any, k: int) -> list[dict]:
        """The ``k`` rows nearest to ``vector`` by cosine similarity, best first.

        Returns dicts with doc_id, content_hash, source and score (cosine similarity, higher is
        better). Reads only those columns and the embeddings, never blobs. Exact unless an ANN
        index exists. A small bank without an index (``MEMORY_SEARCH_ROWS``) is searched in
        memory, on a snapshot of the latest committed version (re-read when a writer commits).
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise BankFormatError(f"k must be a non-negative integer, got {k!r}")
        if k == 0:
            return []
        q = self._check_vector(vector)
        snap = self._snapshot()
        if snap is not None:
            return snap.search(q, k)
        query = self.search_query(q, k)
        with lance_errors(f"cannot search bank at {self._path}"):
            t = query.to_arrow()
        cols = {c: t.column(c).to_pylist() for c in ("doc_id", "content_hash", "source", "_distance")}
        return [
            {"doc_id": d, "content_hash": h, "source": s, "score": 1.0 - float(dist)}
            for d, h, s, dist in zip(cols["doc_id"], cols["content_hash"], cols["source"], cols["_distance"])
        ]

    def _snapshot(self) -> "_Snapshot | None":
        """The in-memory snapshot of the latest version, or None when the bank is too big for one
        or has a vector index (then LanceDB searches). Opening the latest version to compare
        versions costs a fraction of a millisecond; the columns are re-read only on a change."""
        with lance_errors(f"cannot read bank at {self._path}"):
            ds = self.dataset()
            snap = self._snap
            if snap is not None and snap.version == ds.version:
                return snap if snap.usable else None
            self._snap = snap = _Snapshot.read(ds, self._meta.dim)
        return snap if snap.usable else None

    def _fetch(self, doc_ids: Sequence[str]) -> tuple[dict, dict[str, str], list[str]]:
        if isinstance(doc_ids, str):
            raise BankFormatError("doc_ids must be a list of strings, not a string")
        ids = list(dict.fromkeys(doc_ids))
        for d in ids:
            if not isinstance(d, str):
                raise BankFormatError(f"doc ids must be strings, got {d!r}")
        rows: dict[str, dict] = {}
        snap = self._snapshot() if ids else None
        if snap is not None:
            # Positional take on the snapshot's own version: the rows its search returned.
            where = {d: snap.latest[d] for d in ids if d in snap.latest}
            if where:
                order = sorted(set(where.values()))
                with lance_errors(f"cannot read bank at {self._path}"):
                    t = snap.ds.take(order, columns=_CHECK_COLUMNS)
                by_pos = dict(zip(order, t.to_pylist()))
                rows = {d: by_pos[i] for d, i in where.items()}
        elif ids:
            ds = self.dataset()  # one snapshot for every chunk
            for i in range(0, len(ids), _FETCH_CHUNK):
                chunk = ids[i : i + _FETCH_CHUNK]
                pred = f"doc_id IN ({', '.join(_sql_str(d) for d in chunk)})"
                with lance_errors(f"cannot read bank at {self._path}"):
                    t = ds.to_table(columns=_CHECK_COLUMNS + ["created_at"], filter=pred)
                for r in t.to_pylist():
                    old = rows.get(r["doc_id"])
                    if old is not None:
                        log.warning("bank %s holds several rows for doc_id %r; using the latest",
                                    self._path, r["doc_id"])
                    if old is None or r["created_at"] >= old["created_at"]:
                        rows[r["doc_id"]] = r
        decoded: dict[str, list[np.ndarray]] = {}
        corrupt: dict[str, str] = {}
        missing: list[str] = []
        for d in ids:
            r = rows.get(d)
            if r is None:
                missing.append(d)
                continue
            try:
                decoded[d] = check_row(self._meta, d, r["blob"], r["checksum"], r["codec"])
            except CorruptBlobError as e:
                corrupt[d] = str(e)
        return decoded, corrupt, missing

    def fetch_checked(self, doc_ids: Sequence[str]) -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
        """Decode the blobs of ``doc_ids``; return (decoded, bad) where ``bad`` maps each doc id
        that is missing or corrupt to the reason. Never raises for a bad row.

        When several rows share a doc_id, the most recently appended one is used.
        """
        decoded, corrupt, missing = self._fetch(doc_ids)
        bad = dict(corrupt)
        bad.update({d: f"no row with doc_id {d!r} in bank {self._path}" for d in missing})
        return decoded, bad

    def fetch(self, doc_ids: Sequence[str], *, strict: bool = True) -> dict[str, list[np.ndarray]]:
        """Decoded tensors (float32, layout order) of each doc id, checksums verified.

        strict=True: a corrupt row raises ``CorruptBlobError`` (``.doc_id`` set) and a missing
        doc id raises ``BankFormatError``. strict=False: bad or missing ids are left out of the
        result and logged as warnings on the "bank_format" logger; ``fetch_checked`` returns
        them as data instead.
        """
        decoded, corrupt, missing = self._fetch(doc_ids)
        if strict and corrupt:
            d, reason = next(iter(corrupt.items()))
            more = f" (and {len(corrupt) - 1} more corrupt rows)" if len(corrupt) > 1 else ""
            raise CorruptBlobError(reason + more, doc_id=d)
        if strict and missing:
            raise BankFormatError(
                f"no row for doc_id {missing[0]!r}"
                + (f" and {len(missing) - 1} more ids" if len(missing) > 1 else "")
                + f" in bank {self._path}"
            )
        for reason in corrupt.values():
            log.warning("fetch skips a corrupt row: %s", reason)
        for d in missing:
            log.warning("fetch: no row for doc_id %r in bank %s", d, self._path)
        return decoded

    def verify(self, progress: Callable[[int, int], None] | None = None) -> dict:
        """Check every row: checksum, codec, decode against the layout; list duplicate keys.

        Reads one fragment at a time, ``SCAN_BATCH_ROWS`` rows per batch. A fragment whose files
        cannot be read is reported (with its doc ids when that column still reads) and the others
        are still checked. Returns {"rows", "ok", "bad": [{"doc_id", "reason", ...}],
        "duplicates": [{"doc_id", "content_hash", "count"}], "fragments", "version"}.
        """
        ds = self.dataset()
        with lance_errors(f"cannot list the fragments of bank at {self._path}"):
            fragments = ds.get_fragments()
            version = ds.version
        total = sum(_fragment_rows(f) or 0 for f in fragments)
        rows = ok = 0
        bad: list[dict] = []
        keys: Counter = Counter()
        for frag in fragments:
            seen = 0
            try:
                for batch in _chunks(frag, _CHECK_COLUMNS):
                    cols = [batch.column(c).to_pylist() for c in _CHECK_COLUMNS]
                    for doc_id, chash, codec, checksum, blob in zip(*cols):
                        seen += 1
                        rows += 1
                        keys[(doc_id, chash)] += 1
                        try:
                            check_row(self._meta, doc_id, blob, checksum, codec)
                            ok += 1
                        except CorruptBlobError as e:
                            bad.append({"doc_id": doc_id, "fragment": frag.fragment_id, "reason": str(e)})
                    if progress is not None:
                        progress(rows, total)
            except BankFormatError:
                raise
            except Exception as e:
                files = [f.path for f in frag.metadata.files]
                reason = (
                    f"fragment {frag.fragment_id} (files {files}) cannot be read: "
                    f"{type(e).__name__}: {e}"
                )
                try:
                    ids = frag.to_table(columns=["doc_id"]).column("doc_id").to_pylist()[seen:]
                except Exception:
                    ids = None
                if ids:
                    rows += len(ids)
                    bad.extend({"doc_id": d, "fragment": frag.fragment_id, "reason": reason} for d in ids)
                else:
                    n = _fragment_rows(frag)
                    rows += max(0, (n or 0) - seen)
                    bad.append({"doc_id": None, "fragment": frag.fragment_id, "rows": n, "reason": reason})
                log.warning("verify: %s", reason)
        duplicates = [
            {"doc_id": d, "content_hash": h, "count": c} for (d, h), c in sorted(keys.items()) if c > 1
        ]
        return {"rows": rows, "ok": ok, "bad": bad, "duplicates": duplicates,
                "fragments": len(fragments), "version": version}

    def stats(self) -> dict:
        """Sizes, codec and fingerprints of the bank (reads the doc_id and blob columns)."""
        import pyarrow.compute as pc

        ds = self.dataset()
        lengths: list[int] = []
        with lance_errors(f"cannot read bank at {self._path}"):
            for batch in (b for frag in ds.get_fragments() for b in _chunks(frag, ["blob"])):
                lengths.extend(pc.binary_length(batch.column("blob")).to_pylist())
            documents = len(set(ds.to_table(columns=["doc_id"]).column("doc_id").to_pylist()))
            n_versions = len(ds.versions())
            version = ds.version
        bytes_on_disk = 0
        if isinstance(self._path, str):  # object store: the data files of the current version
            bytes_on_disk = sum(f.file_size_bytes or 0 for frag in ds.get_fragments() for f in frag.metadata.files)
        for root, _dirs, files in os.walk(self._path) if isinstance(self._path, Path) else ():
            for name in files:
                with contextlib.suppress(OSError):
                    bytes_on_disk += os.path.getsize(os.path.join(root, name))
        meta = self._meta
        n_values = sum(t.numel for t in meta.layout)
        # Format 1.1: against fp32 of the learner's whole gradient (stored + omitted tensors).
        full_values = meta.full_layout_values
        mean = statistics.fmean(lengths) if lengths else 0.0
        return {
            "path": str(self._path),
            "rows": len(lengths),
            "documents": documents,
            "bytes_on_disk": bytes_on_disk,
            "bytes_per_doc": mean,
            "median_bytes_per_doc": statistics.median(lengths) if lengths else 0.0,
            "fp32_bytes_per_doc": 4 * full_values,
            "ratio_vs_fp32": (4 * full_values / mean) if mean else None,
            "ratio_vs_fp32_stored": (4 * n_values / mean) if mean else None,
            "codec": meta.codec.to_dict(),
            "format_version": meta.format_version,
            "row_norm": meta.row_norm,
            "producer": meta.producer,
            "created_at": meta.created_at,
            "version": version,
            "versions": n_versions,
            "fingerprints": {"model": meta.model, "learner": meta.learner, "embedder": meta.embedder},
            "layout": {"n_tensors": len(meta.layout), "n_values": n_values,
                       "omitted_tensors": len(meta.omitted), "omitted_values": full_values - n_values},
        }


def fragment_keys(loc: "Path | str", frags: Sequence[Any], storage_options: Mapping[str, str] | None = None
                  ) -> list[tuple[str, str]]:
    """Read back the (doc_id, content_hash) of uncommitted fragments from their data files:
    BankFormatError when a file is missing, unreadable or holds another row count."""
    import lance.file

    keys: list[tuple[str, str]] = []
    opts = dict(storage_options or {}) or None
    for frag in frags:
        got = None
        for f in frag.files:
            uri = f"{table_uri(loc)}/data/{f.path}"
            try:
                reader = lance.file.LanceFileReader(uri, storage_options=opts)
                names = reader.metadata().schema.names
                if got is None and "doc_id" in names and "content_hash" in names:
                    t = lance.file.LanceFileReader(uri, storage_options=opts,
                                                   columns=["doc_id", "content_hash"]).read_all().to_table()
                    got = list(zip(t.column("doc_id").to_pylist(), t.column("content_hash").to_pylist()))
            except Exception as e:
                raise BankFormatError(
                    f"fragment data file {uri} cannot be read ({type(e).__name__}: {e}): removed by a "
                    f"maintenance run, or damaged? Nothing was committed; run the build again"
                ) from None
        if got is None or len(got) != frag.physical_rows:
            raise BankFormatError(f"a fragment written for {loc} does not hold its {frag.physical_rows} "
                                  f"rows' keys; nothing was committed")
        keys.extend(got)
    return keys


def _chunks(frag, columns: list[str]) -> Iterator[Any]:
    """The live rows of one fragment, SCAN_BATCH_ROWS at a time, read by offset (bounded memory)."""
    n = frag.count_rows()
    for start in range(0, n, SCAN_BATCH_ROWS):
        yield frag.take(list(range(start, min(n, start + SCAN_BATCH_ROWS))), columns=columns)


def _fragment_rows(frag) -> int | None:
    with contextlib.suppress(Exception):
        return frag.count_rows()
    return None


def _target_rows(ds) -> int:
    """Rows per compacted fragment so that a fragment holds about COMPACT_TARGET_BYTES."""
    rows = data_bytes = 0
    for frag in ds.get_fragments():
        rows += frag.metadata.physical_rows or 0
        data_bytes += sum(f.file_size_bytes or 0 for f in frag.metadata.files)
    per_row = max(1, data_bytes // rows) if rows else 1
    return int(min(1 << 20, max(1, COMPACT_TARGET_BYTES // per_row)))


class _Snapshot:
    """One committed version's small columns, for exact in-memory search and positional fetch."""

    def __init__(self, version: int, ds: Any, usable: bool):
        self.version, self.ds, self.usable = version, ds, usable
        self.doc_ids: list = []
        self.hashes: list = []
        self.sources: list = []
        self.emb = np.zeros((0, 0), dtype=np.float32)
        self.norms = np.zeros(0, dtype=np.float32)
        self.latest: dict[str, int] = {}  # doc_id -> position of its latest row (created_at)

    @classmethod
    def read(cls, ds: Any, dim: int) -> "_Snapshot":
        """The snapshot of ``ds``'s version; unusable (LanceDB searches) for a bank with an index,
        more than ``MEMORY_SEARCH_ROWS`` rows, or more than ``MEMORY_SEARCH_BYTES`` in these
        columns (read in small batches and abandoned past the budget: a hostile bank with huge
        ids or sources costs at most the budget and one batch)."""
        import pyarrow as pa

        n = ds.count_rows()
        indices = getattr(ds, "describe_indices", None) or ds.list_indices  # pylance < 14: list_indices
        if n > MEMORY_SEARCH_ROWS or 4 * n * dim > MEMORY_SEARCH_BYTES or indices():
            return cls(ds.version, ds, usable=False)
        columns = ["doc_id", "content_hash", "source", "embedding", "created_at"]
        batches, budget = [], MEMORY_SEARCH_BYTES
        for batch in ds.to_batches(columns=columns, batch_size=64):
            budget -= batch.nbytes
            if budget < 0:
                return cls(ds.version, ds, usable=False)
            batches.append(batch)
        snap = cls(ds.version, ds, usable=True)
        if not batches:
            return snap
        t = pa.Table.from_batches(batches)
        snap.doc_ids = t.column("doc_id").to_pylist()
        snap.hashes = t.column("content_hash").to_pylist()
        snap.sources = t.column("source").to_pylist()
        emb = t.column("embedding").combine_chunks()
        values = emb.flatten().to_numpy(zero_copy_only=False) if len(emb) else np.zeros(0, np.float32)
        if values.size != len(emb) * dim:  # null embeddings: let LanceDB handle such a bank
            return cls(ds.version, ds, usable=False)
        snap.emb = np.ascontiguousarray(values, dtype=np.float32).reshape(len(emb), dim)
        snap.norms = np.linalg.norm(snap.emb, axis=1).astype(np.float32)
        created = t.column("created_at").to_pylist()
        for i, d in enumerate(snap.doc_ids):
            j = snap.latest.get(d)
            if j is None or created[i] >= created[j]:  # the latest; a tie goes to the later row
                snap.latest[d] = i
        return snap

    def search(self, q: np.ndarray, k: int) -> list[dict]:
        """Exact cosine top-k, best first; ties keep row order; rows whose cosine is not a
        number (a zero or non-finite embedding) come last."""
        if not self.doc_ids:
            return []
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = (self.emb @ q) / (self.norms * np.float32(np.linalg.norm(q)))
        cos = np.where(np.isfinite(cos), cos, -np.inf).astype(np.float32)
        top = np.argsort(-cos, kind="stable")[:k]
        return [{"doc_id": self.doc_ids[i], "content_hash": self.hashes[i], "source": self.sources[i],
                 "score": float(cos[i])} for i in top]


def _default_partitions(n_rows: int) -> int:
    # IVF: about 2 sqrt(n) partitions, at least 1, and never more partitions than rows. Measured
    # with SEARCH_NPROBES on 384-dim banks (benchmarks/retrieval_scale.py, docs/performance.md):
    # at 1M rows 2 sqrt(n) searched in 6.3 ms p50 against 8.9 ms with sqrt(n), recall@1 0.93 and
    # 0.90; at 100k rows 4.2 against 5.4 ms, recall@1 1.0 both.
    return max(1, min(n_rows, int(2 * math.sqrt(max(n_rows, 1)))))


# Partitions an indexed search scans. Set explicitly: lancedb 0.40's default scanned more and took
# 3x as long at 1M rows (17.9 against 6.3 ms p50) for the same results on the benchmark.
SEARCH_NPROBES = 20
