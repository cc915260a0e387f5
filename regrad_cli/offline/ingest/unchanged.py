"""Unchanged sources told without chunking them (``UnchangedSources``): an unchanged ingest
loads no tokenizer."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from regrad_cli.files import read_bounded

log = logging.getLogger("regrad.ingest")


class DocsDigest:
    """The digest of a file's documents as read (ids, titles, texts, metadata), fed one document
    at a time so that the documents are never all held."""

    def __init__(self, source: str):
        self._h = hashlib.sha256(source.encode("utf-8") + b"\0")

    def add(self, d) -> None:
        self._h.update(json.dumps([d.base_id, d.suffix_always, d.title, d.text, d.metadata], sort_keys=True,
                                  default=str).encode("utf-8"))

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class RowsDigest:
    """An order-free digest of a set of rows' (id, content hash, path): the sum of their sha256
    values (mod 2**256) and their count. Rows come in any order, from the table or from a
    file being written, without being collected and sorted."""

    def __init__(self):
        self.total = 0
        self.count = 0

    def add(self, rid: str, content_hash: str, path: str | None) -> None:
        key = json.dumps([rid, content_hash, path or ""]).encode("utf-8")
        self.total = (self.total + int.from_bytes(hashlib.sha256(key).digest(), "big")) % (1 << 256)
        self.count += 1

    def value(self) -> str:
        return f"{self.count}:{self.total:064x}"


class UnchangedSources:
    """Tells an unchanged source without chunking it (chunking needs the model's tokenizer).

    ``WORKSPACE/ingest-digests.json`` maps each source to a digest of its documents as read (ids,
    titles, texts, metadata) and the chunking settings, with a digest of the (id, content hash,
    path) of the rows they gave. A source whose digest is the same *and* whose rows in the table
    still give that rows digest is unchanged; anything else (a missing or damaged file, other
    rows, an entry of an older regrad) is chunked as usual, so the file is a shortcut, never a
    source of truth."""

    NAME = "ingest-digests.json"
    MAX_BYTES = 256 << 20  # a few hundred bytes a source: far more files than one ingest holds

    def __init__(self, ws, settings: tuple):
        self.path = Path(ws.root) / self.NAME
        self.settings = list(settings)
        try:
            # Bounded: a link to /dev/zero in a copied workspace must not be read forever.
            data = json.loads(read_bounded(self.path, self.MAX_BYTES).decode("utf-8"))
            self.entries = data["sources"] if data.get("settings") == self.settings else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            self.entries = {}
        if not isinstance(self.entries, dict):
            self.entries = {}
        self.changed = False

    def candidate(self, source: str) -> bool:
        """Whether ``source`` has an entry worth checking (else it is chunked straight away)."""
        entry = self.entries.get(source)
        return isinstance(entry, dict) and isinstance(entry.get("rows_digest"), str)

    def matches(self, source: str, docs_digest: str, rows_digest: str) -> bool:
        """Whether the file read as ``docs_digest`` is what gave the table rows ``rows_digest``."""
        entry = self.entries.get(source)
        return (isinstance(entry, dict) and entry.get("digest") == docs_digest
                and entry.get("rows_digest") == rows_digest)

    def record(self, source: str, docs_digest: str, rows_digest: str) -> None:
        self.entries[source] = {"digest": docs_digest, "rows_digest": rows_digest}
        self.changed = True

    def save(self) -> None:
        from regrad_cli.files import atomic_write_text

        if not self.changed:
            return
        try:
            atomic_write_text(self.path, json.dumps({"settings": self.settings, "sources": self.entries}))
        except OSError as exc:  # only a shortcut: the next ingest chunks again
            log.warning("cannot write %s: %s", self.path, exc)
