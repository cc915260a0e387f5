"""`regrad ingest`: read text files into the workspace's ``documents`` table, incrementally.

Inputs are files and directories (walked recursively, in sorted order, following symlinks that
stay inside the folder given, never entering a directory twice, so symlink loops end). In a directory only ``.txt``, ``.md``,
``.markdown``, ``.json``, ``.jsonl`` and ``.jsonl.gz`` files are read, and hidden entries (names
starting with ".", e.g. ``.git`` or the default ``.regrad`` workspace) are passed over silently; a
file named on the command line is read as text whatever its extension. A JSON file holds one
record, a list of records, or ``{"documents": [...]}``; JSONL holds one record per line. A record
needs ``text``; ``id`` and ``title`` are optional and every other key is kept as metadata.

Document ids (stable: the same input ingested twice gives the same ids, from any directory):

* ``source`` is the file's path relative to the *parent* of the command-line argument it was
  found under, in posix form: ``regrad ingest notes/`` gives ``notes/a.md``, ``notes/sub/b.txt``;
  ``regrad ingest notes/a.md`` gives ``a.md``. (So ingest a folder the same way each time; two
  folders with the same name ingested from different places share sources and ids.)
* a text or Markdown file: ``<source>#<chunk>``, e.g. ``notes/a.md#0`` (always suffixed);
* a JSON/JSONL record with an ``id``: that id, plus ``#<chunk>`` only when the record is split
  into several chunks; without an ``id``: ``<source>@<n>`` (n = the 1-based line in JSONL, the
  1-based position in JSON) with the same chunk rule. A repeated id is skipped (first one wins),
  so is an id already held by a document of another file that still exists, and an id with
  control characters.

Chunking is by tokens of the workspace language model's tokenizer: windows of at most
``chunking.max_tokens`` tokens, cut preferably at a paragraph end, else a sentence end, else a line
end, else between words (searched in the window's second half); consecutive chunks share up to
``chunking.overlap`` tokens. A document that fits is one chunk.

Incremental: a file whose documents (and the rows they gave) are as recorded in
``WORKSPACE/ingest-digests.json`` is read once, not chunked. Any other file is read document by
document, chunked, and each row compared with the table as the ingest found it (content hash,
title, metadata, chunk layout, path). An unchanged source costs no write at all; a changed one is
written with its new rows replacing all its old ones in one atomic commit; only new or changed
texts are embedded. Memory follows one document and a batch of rows, not the file (``writer``). ``prune`` deletes the documents of files under the given paths that no longer exist
(never under a path where nothing was found, and more than ``FEW_PRUNED`` only with ``force``).
Documents unlearned by ``regrad bank rm`` are skipped unless ``readmit``.

The package: ``discovery`` (finding files), ``readers`` (formats, bounded reading, a document at
a time), ``chunking``, ``snapshot`` (the table's bookkeeping columns, as the ingest found them),
``unchanged`` (the digests), ``writer`` (rows streamed into fragments, one commit per group of
whole files); this module runs them under the workspace lock.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from regrad_cli.errors import ConfigError, IngestError
from regrad_cli.offline.ingest.chunking import Chunk, chunk_text
from regrad_cli.offline.ingest.discovery import (RECORD_EXTENSIONS, SUPPORTED_EXTENSIONS, TEXT_EXTENSIONS, _stat_reason,
                                        discover)
from regrad_cli.offline.ingest.readers import BINARY_SNIFF_BYTES, _Skip, iter_docs
from regrad_cli.offline.ingest.snapshot import Snapshot, TakenIds
from regrad_cli.offline.ingest.summary import IngestSummary
from regrad_cli.offline.ingest.unchanged import DocsDigest, UnchangedSources
from regrad_cli.offline.ingest.writer import _doc_rows, _embedder_name, _Writer

__all__ = ["ingest", "IngestSummary", "Chunk", "chunk_text", "discover", "DEFAULT_MAX_FILE_MB",
           "TEXT_EXTENSIONS", "RECORD_EXTENSIONS", "SUPPORTED_EXTENSIONS", "BINARY_SNIFF_BYTES"]

log = logging.getLogger("regrad.ingest")

DEFAULT_MAX_FILE_MB = 20.0

ProgressFn = Callable[..., None]


# Documents of files that no longer exist a prune may delete without ``force``.
FEW_PRUNED = 10


def ingest(
    ws,
    paths: list[Path],
    *,
    prune: bool = False,
    embedder=None,
    tokenizer=None,
    progress: ProgressFn | None = None,
    max_file_mb: float = DEFAULT_MAX_FILE_MB,
    force: bool = False,
    readmit: bool = False,
) -> IngestSummary:
    """Ingest ``paths`` into the workspace ``ws``; returns what changed. Never prints.

    ``embedder`` (``.embed(texts)``, ``.name``/``.fingerprint``) and ``tokenizer`` (a Hugging Face
    style callable) default to the workspace's; ``progress(done, total, info)`` is called per file.
    ``force`` lets ``prune`` delete more than ``FEW_PRUNED`` documents; ``readmit`` ingests again
    documents that ``regrad bank rm`` unlearned (otherwise they are skipped).
    """
    from regrad_cli.workspace.documents import DocumentStore, workspace_lock
    from regrad_cli.workspace.tombstones import Tombstones

    max_tokens, overlap, limit = _settings(ws, max_file_mb)
    summary = IngestSummary()
    if embedder is None:
        from regrad_cli.lm.models import Embedder

        embedder = Embedder(ws.config.embedder.id, batch_size=ws.config.embedder.batch_size)

    with workspace_lock(ws, timeout=5, what="writing"):
        store = DocumentStore(ws)
        _check_embedder(ws, store, embedder)
        tombstones = Tombstones(ws)
        tomb = tombstones.load()
        readmitted: tuple[set, set] = (set(), set())

        def readmit_first() -> None:  # before a commit: a crash leaves them readmitted, unwritten
            if readmitted[0] or readmitted[1]:
                tombstones.readmit(*readmitted)
                readmitted[0].clear()
                readmitted[1].clear()

        files = discover(paths, summary, exclude=str(ws.root))
        snap = Snapshot.read(store)
        writer = _Writer(store, embedder, ws.config.embedder.batch_size, summary, snap, before_commit=readmit_first)
        run = _Run(ws, snap, writer, tomb, readmit, readmitted, limit, max_tokens, overlap, tokenizer, summary,
                   UnchangedSources(ws, (max_tokens, overlap, ws.config.model.id)))
        total = len(files)
        if progress:
            progress(0, total, "")
        for i, f in enumerate(files):
            run.file(f)
            if progress:
                progress(i + 1, total, f.display)
        writer.flush()
        readmit_first()
        run.quick.save()
        if prune:
            summary.pruned = _prune(ws, paths, files, snap, run.seen_sources, store, force, summary)
        _finish(store, writer, summary)
        return summary


class _Run:
    """One ingest's pass over its files: each file is told unchanged from its digest, or read
    document by document, chunked and streamed into the writer."""

    def __init__(self, ws, snap, writer, tomb, readmit, readmitted, limit, max_tokens, overlap, tokenizer,
                 summary: IngestSummary, quick: UnchangedSources):
        self.ws, self.snap, self.writer, self.tomb = ws, snap, writer, tomb
        self.readmit, self.readmitted, self.limit = readmit, readmitted, limit
        self.max_tokens, self.overlap, self.tokenizer = max_tokens, overlap, tokenizer
        self.summary, self.quick = summary, quick
        self.taken = TakenIds(snap)  # ids found in this run, and in which file
        self.seen_sources: set[str] = set()

    def file(self, f) -> None:
        summary = self.summary
        if f.source in self.tomb["sources"] and not self.readmit:
            summary.skip(f.display, "unlearned by `regrad bank rm --source`; `regrad ingest --readmit` "
                                    "ingests it again")
            return
        if self.quick.candidate(f.source) and len(self.snap) and self.snap.count(f.source) and self._unchanged(f):
            return
        if self.tokenizer is None:
            from regrad_cli.lm.models import load_tokenizer

            self.tokenizer = load_tokenizer(self.ws.config.model.id)
        self._stream(f)

    def _unchanged(self, f) -> bool:
        """Whether ``f`` is unchanged since its rows were written (read once without chunking:
        its documents' digest); if so its ids are taken and its rows counted unchanged. A file
        that cannot be read is reported here."""
        notes = IngestSummary()  # its record-level reports count only if the file is unchanged
        digest = DocsDigest(f.source)
        try:
            for doc in iter_docs(f, self.limit, notes):
                digest.add(doc)
        except (_Skip, OSError) as exc:
            self._merge(notes)
            self.summary.skip(f.display, str(exc) if isinstance(exc, _Skip) else _stat_reason(f.path, exc))
            return True
        snap = self.snap
        if not self.quick.matches(f.source, digest.hexdigest(), snap.rows_digest(f.source)):
            return False
        if snap.paths(f.source) != [f.path]:
            return False  # the file moved: its rows get the new path
        if self.taken.any_taken(f.source):
            return False  # an id taken earlier in this run: the usual path reports it
        self.taken.take_source(f.source, self.taken.file(f.display))
        self.writer.done_sources.add(f.source)  # a second file of this source only adds rows
        self._merge(notes)
        self.summary.unchanged += snap.count(f.source)
        self.seen_sources.add(f.source)  # nothing to do, and no tokenizer to load for it
        return True

    def _merge(self, notes: IngestSummary) -> None:
        self.summary.skipped += notes.skipped
        self.summary.warnings += notes.warnings

    def _stream(self, f) -> None:
        """Chunk ``f`` document by document into the writer; a file skipped half way leaves
        nothing behind (its rows and the ids it took are dropped)."""
        summary, writer = self.summary, self.writer
        n_skipped = len(summary.skipped)
        digest = DocsDigest(f.source)
        mine: list[str] = []  # ids this file took, given back if it is skipped half way
        file_no = self.taken.file(f.display)
        readmitted: tuple[set, set] = (set(), set())
        writer.begin(f)
        n_rows = 0
        try:
            for doc in iter_docs(f, self.limit, summary):
                digest.add(doc)
                rows = self._doc_rows(doc, f, readmitted)
                for r in rows:
                    self.taken.take(r["id"], file_no)
                    mine.append(r["id"])
                    writer.add(r)
                n_rows += len(rows)
        except (_Skip, OSError) as exc:
            writer.abort()
            for rid in mine:
                self.taken.release(rid)
            summary.skip(f.display, str(exc) if isinstance(exc, _Skip) else _stat_reason(f.path, exc))
            return
        if not n_rows:  # every document skipped: the file's old rows stay as they are
            writer.abort()
            return
        rows_digest = writer.end()
        self.readmitted[0].update(readmitted[0])
        self.readmitted[1].update(readmitted[1])
        self.seen_sources.add(f.source)
        if len(summary.skipped) == n_skipped:  # a skipped document is reported every time
            self.quick.record(f.source, digest.hexdigest(), rows_digest)

    def _doc_rows(self, doc, f, readmitted: tuple[set, set]) -> list[dict]:
        """The rows of one document, or none (with a reason) when its id is taken: earlier in
        this run, by another file in the table, or by an unlearned document."""
        summary, snap, taken, tomb = self.summary, self.snap, self.taken, self.tomb
        doc_rows = _doc_rows(doc, f, chunk_text(doc.text, self.tokenizer, self.max_tokens, self.overlap))
        clash = next(((r["id"], w) for r in doc_rows if (w := taken.where(r["id"])) is not None), None)
        if clash is not None:
            summary.skip(doc.where, f"duplicate id {clash[0]!r} (first in {clash[1]})")
            return []
        # An explicit id must not take over a document that came from another file (one that
        # still exists: a file that moved may take its records along).
        for r in doc_rows:
            i = snap.index_of(r["id"])
            if i < 0 or snap.get(i, "source") == f.source:
                continue
            other_path = snap.get(i, "path")
            if not other_path or os.path.exists(other_path):
                other = snap.get(i, "source")
                summary.skip(doc.where, f"id {doc_rows[0]['id']!r} is already used by a document from {other!r}; "
                                        "ids must be unique across files (remove that file with --prune first)")
                return []
        unlearned = [r["id"] for r in doc_rows if r["id"] in tomb["ids"]]
        if unlearned and not self.readmit:
            summary.skip(doc.where, f"document {unlearned[0]!r} was unlearned by `regrad bank rm`; "
                                    "`regrad ingest --readmit` ingests it again")
            return []
        readmitted[0].update(unlearned)
        if f.source in tomb["sources"]:
            readmitted[1].add(f.source)
        return doc_rows


def _settings(ws, max_file_mb: float) -> tuple[int, int, int]:
    """(chunk tokens, overlap, file size limit in bytes), checked."""
    chunking = ws.config.chunking
    max_tokens, overlap = int(chunking.max_tokens), int(chunking.overlap)
    if max_tokens < 1 or overlap < 0 or overlap >= max_tokens:
        raise ConfigError(
            f"chunking.max_tokens must be >= 1 and 0 <= chunking.overlap < max_tokens "
            f"(got {max_tokens} and {overlap})"
        )
    if max_file_mb <= 0:
        raise ConfigError(f"--max-file-mb must be positive (got {max_file_mb})")
    return max_tokens, overlap, int(max_file_mb * 1e6)


def _check_embedder(ws, store, embedder) -> None:
    """A workspace's documents are all embedded by one embedder: refuse another."""
    fp = store.embedder_fingerprint
    name = _embedder_name(embedder)
    if fp is not None and fp.get("id") not in (None, name):
        raise IngestError(
            f"the workspace {ws.root} was ingested with embedder {fp['id']!r} (dim {fp['dim']}), "
            f"not {name!r}: use --embedder {fp['id']} or a new --workspace"
        )


def _finish(store, writer, summary: IngestSummary) -> None:
    """Rebuild the full-text index after a change, count the documents, log the summary."""
    if writer.wrote or summary.pruned:
        try:
            store.ensure_fts_index()
        except (OSError, ValueError, RuntimeError) as exc:  # search still works without it
            summary.warnings.append(f"full-text index not rebuilt: {exc}")
    summary.documents = store.count()
    log.info("ingest: %d added, %d updated, %d unchanged, %d removed, %d pruned, %d skipped; %d documents",
             summary.added, summary.updated, summary.unchanged, summary.removed, summary.pruned,
             len(summary.skipped), summary.documents)


def _prune(ws, paths, files, snap, seen_sources, store, force: bool, summary: IngestSummary) -> int:
    """Delete the documents of files under ``paths`` that no longer exist, and their gradient
    rows from every bank of the workspace (``unlearn.prune_sources``: as `bank rm` deletes). A
    path that is missing, not a directory or holds no file at all (an unmounted disk, say) prunes
    nothing."""
    from regrad_cli.workspace.documents import is_within

    roots = []
    for p in paths:
        root = os.path.abspath(os.fspath(p))
        if not any(is_within(f.path, root) for f in files):
            summary.warnings.append(f"--prune: nothing found under {p} (missing, empty or unmounted?): "
                                    "its documents are kept")
            continue
        roots.append(root)
    stale = {
        source for source in snap.sources() if source not in seen_sources
        and any(any(is_within(p, root) for root in roots) and not os.path.exists(p) for p in snap.paths(source))
    }
    n = sum(snap.count(s) for s in stale)
    if n > FEW_PRUNED and not force:
        raise IngestError(f"--prune would delete {n} documents of {len(stale)} files that no longer exist "
                          f"(e.g. {sorted(stale)[0]!r}); run again with --force if that is meant "
                          "(the new files were ingested)")
    from regrad_cli.offline.unlearn import prune_sources

    docs, rows = prune_sources(ws, store, stale)
    summary.pruned_rows = rows
    return docs
