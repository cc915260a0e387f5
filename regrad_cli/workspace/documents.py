"""The workspace's LanceDB ``documents`` table: one row per chunk of an ingested document.

Schema (``DOCUMENTS_VERSION`` 1.0)::

    id            string     stable document id (see regrad_cli.offline.ingest for the rule)
    source        string     where the chunk came from, relative and posix ("corpus/a.md")
    path          string     absolute path of the file at ingest time (used by --prune only)
    title         string
    text          string     the chunk, stripped of surrounding whitespace
    content_hash  string     sha256 hex of ``text`` (UTF-8); gradient banks key on it
    chunk         int32      chunk index within its document
    n_tokens      int32      tokens of ``text`` under the workspace's language-model tokenizer
    embedding     fixed_size_list<float32>[dim]   L2-normalised sentence embedding
    ingested_at   timestamp[us, UTC]
    metadata      string     JSON object (extra keys of a JSON/JSONL record, else "{}")

The schema metadata holds ``regrad.documents_format`` and ``regrad.embedder`` (a JSON object
``{"id": ..., "dim": ...}``): the embedder fingerprint lives in the table itself, so it can never
disagree with the vectors it describes.

Ingest writes with :meth:`DocumentStore.write_fragments` (new rows as uncommitted Lance data
files, a batch at a time) and :meth:`DocumentStore.commit_rows` (those fragments and the deletion
of the rows they replace, in one commit); :meth:`DocumentStore.replace_sources` does the same for
rows given at once, with one ``merge_insert``. Either way Lance publishes a single new table
version, so a crash during a write leaves the previous version (and everything in it) intact. Every writer of a workspace's documents (ingest, ``bank rm``)
holds :func:`workspace_lock`; Lance maintenance (purge, quoting, the committed-table check) is
``bank_format.lance_ops``, shared with the gradient bank.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from bank_format.lance_ops import committed as _committed
from bank_format.lance_ops import sql_in as _in_filter
from bank_format.lance_ops import sql_str
from regrad_cli.errors import IngestError, RegradError
from regrad_cli.versions import Migrations, Version

log = logging.getLogger("regrad.documents")

TABLE_NAME = "documents"
# The documents table's format: the schema metadata key regrad.documents_format, "1" for 1.0 (the
# first format), "MAJOR.MINOR" after it. A newer major is refused, a newer minor read; an older
# table would be brought to DOCUMENTS_VERSION by DOCUMENTS_MIGRATIONS (none yet: 1.0 is the first).
DOCUMENTS_VERSION = Version(1, 0)
DOCUMENTS_MIGRATIONS = Migrations("documents table")
_FORMAT_KEY = b"regrad.documents_format"
_EMBEDDER_KEY = b"regrad.embedder"
# Columns without the (large) embedding, for bookkeeping reads.
LIGHT_COLUMNS = ["id", "source", "path", "title", "content_hash", "chunk", "n_tokens", "metadata"]
# Bounded IN (...) lists keep filter strings small.
_IN_BATCH = 500


def documents_schema(dim: int, fingerprint: dict):
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("path", pa.string()),
            pa.field("title", pa.string()),
            pa.field("text", pa.string()),
            pa.field("content_hash", pa.string()),
            pa.field("chunk", pa.int32()),
            pa.field("n_tokens", pa.int32()),
            pa.field("embedding", pa.list_(pa.float32(), int(dim))),
            pa.field("ingested_at", pa.timestamp("us", tz="UTC")),
            pa.field("metadata", pa.string()),
        ],
        metadata={
            _FORMAT_KEY: str(DOCUMENTS_VERSION.tag()).encode(),
            _EMBEDDER_KEY: json.dumps({"id": fingerprint["id"], "dim": int(dim)}).encode(),
        },
    )


__all__ = ["DocumentStore", "documents_schema", "sql_str", "workspace_lock", "is_within"]


@contextmanager
def workspace_lock(ws, timeout: float = 5.0, what: str = "writing") -> Iterator[None]:
    """The lock every writer of a workspace's documents (and tombstones) holds."""
    from filelock import FileLock, Timeout

    from bank_format.links import check_lock_file

    ws.root.mkdir(parents=True, exist_ok=True)
    check_lock_file(ws.root / "ingest.lock")
    lock = FileLock(str(ws.root / "ingest.lock"))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise IngestError(f"another regrad process is {what} the documents of {ws.root} "
                          "(`regrad ingest` or `regrad bank rm`); wait for it to finish") from None
    try:
        yield
    finally:
        lock.release()


def _readable(method):
    """A damaged table (a data file missing or cut short, a manifest that does not parse) is one
    IngestError naming the table, not Lance's RuntimeError with its stack."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except RegradError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise IngestError(f"the documents table in {self.db_path} cannot be read ({first[:400]}); "
                              f"it is damaged: restore it from a backup, or delete {self.db_path} "
                              f"and run `regrad ingest` again") from None
    return wrapper


def _rows_table(rows: list[dict], schema):
    """An Arrow table of ``rows`` built column by column; the embedding column from one float32
    array (rows may hold arrays or lists), not from a Python float per value."""
    import numpy as np
    import pyarrow as pa

    columns = []
    for f in schema:
        if f.name == "embedding" and pa.types.is_fixed_size_list(f.type):
            dim = f.type.list_size
            flat = np.zeros(len(rows) * dim, dtype=np.float32)
            for i, r in enumerate(rows):
                flat[i * dim:(i + 1) * dim] = np.asarray(r["embedding"], dtype=np.float32).reshape(dim)
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, type=f.type.value_type), dim))
        else:
            columns.append(pa.array([r.get(f.name) for r in rows], type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _batches(values: list, n: int = _IN_BATCH):
    for i in range(0, len(values), n):
        yield values[i : i + n]


class DocumentStore:
    """Read and write the ``documents`` table of a workspace (``DocumentStore(ws)``)."""

    def __init__(self, ws_or_db_path: Any):
        db_path = getattr(ws_or_db_path, "db_path", ws_or_db_path)
        self.db_path = Path(db_path)
        self._db = None
        self._table = None

    # Opening ------------------------------------------------------------------------------
    def _connect(self):
        if self._db is None:
            import lancedb

            self._db = lancedb.connect(str(self.db_path))
        return self._db

    def table(self, required: bool = False):
        """The LanceDB table, or None when nothing was ingested yet (IngestError if required)."""
        if self._table is None and _committed(self.db_path / f"{TABLE_NAME}.lance"):
            try:
                self._table = self._connect().open_table(TABLE_NAME)
            except (ValueError, OSError, RuntimeError) as exc:  # RuntimeError: a damaged manifest
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise IngestError(f"cannot open the documents table in {self.db_path} ({first[:400]}); "
                                  f"it is damaged: restore it from a backup, or delete {self.db_path} "
                                  f"and run `regrad ingest` again") from None
            self.check_format(self._table.schema)
        if self._table is None and required:
            raise IngestError(f"no documents in {self.db_path.parent}: run `regrad ingest PATH` first")
        return self._table

    def check_format(self, schema) -> None:
        """Refuse a documents table (its Arrow schema) of a format this regrad cannot read."""
        meta = schema.metadata or {}
        where = f"{self.db_path}/{TABLE_NAME}.lance"
        raw = meta.get(_FORMAT_KEY, b"1").decode("utf-8", "replace")
        try:
            found = Version.parse(raw, where)
            if found < Version(1, 0):
                raise RegradError(f"{where}: documents format {raw!r} never existed")
            DOCUMENTS_MIGRATIONS.upgrade({"metadata": meta}, found, DOCUMENTS_VERSION, where)
        except RegradError as exc:
            raise IngestError(f"{exc} (this regrad reads documents format {DOCUMENTS_VERSION}): upgrade "
                              "regrad or re-ingest into a new workspace") from None

    @property
    def exists(self) -> bool:
        return self.table() is not None

    @property
    def embedder_fingerprint(self) -> dict | None:
        """``{"id": ..., "dim": ...}`` of the embedder that made the stored vectors, or None."""
        table = self.table()
        if table is None:
            return None
        raw = (table.schema.metadata or {}).get(_EMBEDDER_KEY)
        if raw is None:
            dim = table.schema.field("embedding").type.list_size
            return {"id": None, "dim": dim}
        try:
            fp = json.loads(raw)
        except ValueError:
            fp = None
        if not (isinstance(fp, dict) and isinstance(fp.get("dim"), int) and not isinstance(fp["dim"], bool)
                and isinstance(fp.get("id"), (str, type(None)))):
            raise IngestError(
                f"{self.db_path}/{TABLE_NAME}.lance has a damaged {_EMBEDDER_KEY.decode()} entry "
                f"({raw[:80]!r}): re-ingest into a new workspace"
            )
        return fp

    @property
    @_readable
    def version(self) -> int | None:
        table = self.table()
        return None if table is None else table.version

    # Reading ------------------------------------------------------------------------------
    @_readable
    def count(self) -> int:
        table = self.table()
        return 0 if table is None else table.count_rows()

    @_readable
    def arrow(self, columns: list[str] | None = None, where: str | None = None):
        """The rows as a pyarrow Table (all columns unless ``columns``), optionally filtered."""
        import pyarrow as pa

        table = self.table()
        if table is None:
            return pa.table({c: pa.array([], pa.string()) for c in (columns or ["id"])})
        query = table.search()
        if where:
            query = query.where(where)
        if columns:
            query = query.select(list(columns))
        return query.limit(None).to_arrow()

    @_readable
    def ids(self) -> set[str]:
        """Every document id, read with pylance alone (no lancedb import: ``bank rm`` tells an
        unknown id from them in a fraction of the time lancedb takes to load)."""
        uri = self.db_path / f"{TABLE_NAME}.lance"
        if not _committed(uri):
            return set()
        import lance

        return set(lance.dataset(str(uri)).to_table(columns=["id"]).column("id").to_pylist())

    @_readable
    def source_names(self) -> set[str]:
        """Every source, read with pylance alone (as :meth:`ids`)."""
        uri = self.db_path / f"{TABLE_NAME}.lance"
        if not _committed(uri):
            return set()
        import lance
        import pyarrow.compute as pc

        return set(pc.unique(lance.dataset(str(uri)).to_table(columns=["source"]).column("source")).to_pylist())

    def all(self, columns: list[str] | None = None) -> list[dict]:
        """Every row as a dict (pass ``columns`` to skip the embeddings)."""
        return self.arrow(columns).to_pylist()

    @_readable
    def get(self, ids: Iterable[str], columns: list[str] | None = None) -> dict[str, dict]:
        """id -> row for the given ids (missing ids are absent from the result)."""
        ids = list(dict.fromkeys(ids))
        if columns is not None and "id" not in columns:
            columns = ["id", *columns]
        out: dict[str, dict] = {}
        if self.table() is None:
            return out
        for batch in _batches(ids):
            for row in self.arrow(columns, where=_in_filter("id", batch)).to_pylist():
                out[row["id"]] = row
        return out

    def texts(self, ids: Iterable[str]) -> dict[str, str]:
        """id -> text."""
        return {k: r["text"] for k, r in self.get(ids, ["text"]).items()}

    @_readable
    def keys(self) -> dict[str, str]:
        """id -> content_hash for every row."""
        t = self.arrow(["id", "content_hash"])
        if t.num_rows == 0:
            return {}
        return dict(zip(t.column("id").to_pylist(), t.column("content_hash").to_pylist()))

    @_readable
    def sources(self) -> list[str]:
        """Sorted distinct sources."""
        if self.table() is None:
            return []
        return sorted(set(self.arrow(["source"]).column("source").to_pylist()))

    # Search -------------------------------------------------------------------------------
    @_readable
    def search_vector(self, vector, k: int) -> list[tuple[str, float]]:
        """Top-k (id, cosine similarity), best first (exact search)."""
        import numpy as np

        table = self.table(required=True)
        vec = np.asarray(vector, dtype=np.float32).reshape(-1)
        rows = (
            table.search(vec, vector_column_name="embedding")
            .distance_type("cosine")
            .select(["id", "_distance"])
            .limit(int(k))
            .to_list()
        )
        return [(r["id"], 1.0 - float(r["_distance"])) for r in rows]

    @_readable
    def search_text(self, query: str, k: int) -> list[tuple[str, float]]:
        """Top-k (id, BM25 score), best first, via LanceDB's native full-text index.

        The index is built on first use; rows written after it are still searched (Lance scans
        unindexed rows), so a stale index is correct, only slower: ``ensure_fts_index`` refreshes.
        """
        table = self.table(required=True)
        if not query.strip():
            return []
        if not self._fts_index():
            self.ensure_fts_index()
        rows = table.search(query, query_type="fts", fts_columns="text").select(["id", "_score"]).limit(int(k)).to_list()
        return [(r["id"], float(r["_score"])) for r in rows]

    @_readable
    def _fts_index(self):
        table = self.table()
        if table is None:
            return None
        for idx in table.list_indices():
            if str(idx.index_type).upper().endswith("FTS") and list(idx.columns) == ["text"]:
                return idx
        return None

    @_readable
    def ensure_fts_index(self) -> bool:
        """Create (or rebuild, when rows were written after it) the full-text index on ``text``.

        Returns True when an index was (re)built. Rebuilding writes a new table version, so an
        up-to-date index is left alone.
        """
        table = self.table()
        if table is None or table.count_rows() == 0:
            return False
        idx = self._fts_index()
        if idx is not None:
            stats = table.index_stats(idx.name)
            if stats is not None and stats.num_unindexed_rows == 0 and stats.num_indexed_rows == table.count_rows():
                return False
        from lancedb.index import FTS

        self.check_links()
        # Native Lance FTS (not tantivy): lives inside the table, versioned with it. The column
        # goes in create_index's first argument when a config is given (lancedb >= 0.25).
        table.create_index("text", config=FTS(), replace=True)
        return True

    # Writing ------------------------------------------------------------------------------
    def check_links(self) -> None:
        """Refuse to write or delete in a documents database holding a symbolic link (Lance's
        cleanup would follow it out of the workspace: bank_format.links)."""
        from bank_format.links import refuse_links

        refuse_links(self.db_path, f"the documents database {self.db_path}")

    def create(self, dim: int, fingerprint: dict):
        """Create the empty table for vectors of ``dim`` from the embedder ``fingerprint``."""
        self.check_links()
        if self.table() is not None:
            return self._table
        try:
            self.db_path.mkdir(parents=True, exist_ok=True)
            self._table = self._connect().create_table(TABLE_NAME, schema=documents_schema(dim, fingerprint))
        except (ValueError, OSError) as exc:
            raise IngestError(f"cannot create the documents table in {self.db_path}: {exc}") from exc
        return self._table

    @_readable
    def replace_sources(self, rows: list[dict], sources: Iterable[str]) -> None:
        """Make ``rows`` the complete content of ``sources``, in one atomic commit.

        One ``merge_insert`` on ``id``: matching rows are updated, new ones inserted, and rows of
        these sources that ``rows`` no longer contains are deleted. Lance writes the new data
        files first and publishes them with a single manifest commit, so a failure at any point
        leaves the table exactly as it was.
        """
        import pyarrow as pa

        table = self.table(required=True)
        sources = sorted(set(sources))
        if not sources:
            return
        self.check_links()
        data = _rows_table(rows, table.schema)
        where = " OR ".join(f"({_in_filter('source', b)})" for b in _batches(sources))
        try:
            (
                table.merge_insert("id")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(where)
                .execute(data)
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise IngestError(f"cannot write the documents table in {self.db_path}: {exc}") from exc

    # Streaming writes (ingest): fragments written as rows come, published by one commit -------
    @property
    def _uri(self) -> str:
        return str(self.db_path / f"{TABLE_NAME}.lance")

    @_readable
    def light_rows(self, convert=None, batch_rows: int = 65536) -> list | None:
        """Every row's ``LIGHT_COLUMNS`` and Lance row address (``_rowaddr``), read with pylance
        in record batches, each passed through ``convert`` as it comes (so the table is never
        held in its plain form); None when nothing was ingested yet."""
        if self.table() is None:
            return None
        import lance

        batches = lance.dataset(self._uri).to_batches(columns=LIGHT_COLUMNS, with_row_address=True,
                                                      batch_size=batch_rows)
        return [convert(b) if convert is not None else b for b in batches]

    def write_fragments(self, rows: list[dict]) -> list:
        """Write ``rows`` as new Lance data files and return their fragment metadata, for
        :meth:`commit_rows`. Nothing is visible to readers until that commit; files of a run
        that never commits stay unreferenced and are never read."""
        import lance
        import lance.fragment

        if not rows:
            return []
        self.table(required=True)
        self.check_links()
        try:
            ds = lance.dataset(self._uri)
            data = _rows_table(rows, ds.schema)
            return lance.fragment.write_fragments(data, ds, schema=ds.schema, mode="append")
        except RegradError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise IngestError(f"cannot write the documents table in {self.db_path}: {exc}") from exc

    def commit_rows(self, fragments: list, delete: dict[int, tuple[set, set]]) -> None:
        """Publish ``fragments`` (from :meth:`write_fragments`) and delete rows in one Lance
        commit, so that readers see all of it or none of it. ``delete`` maps a fragment id to the
        (sources, ids) whose rows go from that fragment. The caller holds :func:`workspace_lock`."""
        import lance

        if not fragments and not delete:
            return
        self.check_links()
        try:
            ds = lance.dataset(self._uri)
            updated, removed = [], []
            for fid in sorted(delete):
                sources, ids = delete[fid]
                frag = ds.get_fragment(fid)
                if frag is None or not (sources or ids):
                    continue
                pred = " OR ".join([f"({_in_filter('source', b)})" for b in _batches(sorted(sources))]
                                   + [f"({_in_filter('id', b)})" for b in _batches(sorted(ids))])
                matched = frag.count_rows(pred)
                if not matched:
                    continue
                if matched == frag.count_rows():
                    removed.append(fid)
                    continue
                left = frag.delete(pred)
                if left is None:  # never for a partial match; refuse rather than guess
                    raise IngestError(f"cannot delete from fragment {fid} of the documents table in {self.db_path}")
                updated.append(left)
            op = lance.LanceOperation.Update(removed_fragment_ids=removed, updated_fragments=updated,
                                             new_fragments=list(fragments))
            lance.LanceDataset.commit(self._uri, op, read_version=ds.version)
        except RegradError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise IngestError(f"cannot write the documents table in {self.db_path}: {exc}") from exc
        self._table = None  # lancedb's handle would not see the new version

    def copy_rows(self, addrs: list[int]) -> list:
        """Write the rows at these row addresses again, unchanged, as new uncommitted fragments
        (the unchanged rows of a changed file, which its commit deletes with the rest)."""
        import lance
        import lance.fragment

        if not addrs:
            return []
        self.check_links()
        try:
            ds = lance.dataset(self._uri)
            data = ds._take_rows(list(addrs), ignore_deletions=True)
            if data.num_rows != len(addrs):
                raise IngestError(f"the documents table in {self.db_path} lost rows while ingest ran")
            return lance.fragment.write_fragments(data.select(ds.schema.names).cast(ds.schema), ds,
                                                  schema=ds.schema, mode="append")
        except RegradError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise IngestError(f"cannot write the documents table in {self.db_path}: {exc}") from exc

    def take_embeddings(self, addrs: list[int]):
        """The stored vectors at these row addresses (a float32 array), or None where they
        cannot all be read (the caller embeds the texts again)."""
        import lance
        import numpy as np

        if not addrs:
            return np.zeros((0, 0), dtype=np.float32)
        try:
            t = lance.dataset(self._uri)._take_rows(list(addrs), columns=["embedding"], ignore_deletions=True)
        except (OSError, ValueError, RuntimeError):
            return None
        if t.num_rows != len(addrs):
            return None
        col = t.column("embedding").combine_chunks()
        return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(addrs), -1)

    @_readable
    def delete_sources(self, sources: Iterable[str]) -> int:
        """Delete every row of these sources; returns the number of rows deleted."""
        table = self.table()
        sources = sorted(set(sources))
        if table is None or not sources:
            return 0
        where = " OR ".join(f"({_in_filter('source', b)})" for b in _batches(sources))
        n = table.count_rows(where)
        if n:  # a delete matching nothing would still commit a new version
            self.check_links()
            try:
                table.delete(where)
            except (OSError, ValueError, RuntimeError) as exc:
                raise IngestError(f"cannot delete from the documents table in {self.db_path}: {exc}") from exc
        return n


    @_readable
    def delete(self, ids: Iterable[str] = (), sources: Iterable[str] = (), *, purge: bool = True) -> int:
        """Unlearn documents: delete rows by id and/or source, then rewrite the affected fragments
        and drop every old version, so the texts leave the disk (also from the FTS index, which
        is rebuilt). Returns the number of rows deleted. The purge also runs when nothing
        matches (``purge``): a removal interrupted after its delete is finished by a re-run.
        The caller holds :func:`workspace_lock`."""
        from bank_format import lance_ops

        table = self.table()
        ids, sources = sorted(set(ids)), sorted(set(sources))
        if table is None or (not ids and not sources and not purge):
            return 0
        clauses = [f"({_in_filter('id', b)})" for b in _batches(ids)] + \
                  [f"({_in_filter('source', b)})" for b in _batches(sources)]
        n = table.count_rows(" OR ".join(clauses)) if clauses else 0
        if not n and not purge:
            return 0
        uri = self.db_path / f"{TABLE_NAME}.lance"
        self.check_links()
        try:
            if n:
                table.delete(" OR ".join(clauses))
                if table.count_rows() and self._fts_index() is not None:
                    self.ensure_fts_index()
            import lance

            with lance_ops.writer_lock(uri):
                # orphans_now: the workspace lock is held, so no ingest has files in flight.
                lance_ops.purge_dataset(lance.dataset(str(uri)), all_deletions=True, orphans_now=True,
                                        what=f"the documents table {uri}", reopen=lambda: lance.dataset(str(uri)))
        except RegradError:
            raise
        except Exception as exc:  # lance raises OSError, ValueError, RuntimeError, BankFormatError
            raise IngestError(f"cannot delete from the documents table in {self.db_path}: {exc}") from exc
        self._table = None
        return n


def is_within(path: str, root: str) -> bool:
    """True when ``path`` is ``root`` or lies under it (string test: both absolute, normalised)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def unknown_source_hint(given: str, have: Iterable[str]) -> str:
    """What to say about a source path no document came from: the recorded sources that contain
    its last part (``guild.md`` or ``./corpus/guild.md`` for ``corpus/guild.md``), else where to
    find them. Sources are paths relative to the ingested folder's parent, as `regrad docs ls`
    shows them; `docs ls --source` and `bank rm --source` both say this."""
    name = given.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    like = sorted(s for s in have if name and name in s)
    if like:
        return f"sources like it: {', '.join(like[:8])}{', ...' if len(like) > 8 else ''}"
    return "`regrad docs ls` lists the sources (paths as ingest recorded them)"
