"""Unchanged sources told without chunking them (``UnchangedSources``): an unchanged ingest
loads no tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("regrad.ingest")


class UnchangedSources:
    """Tells an unchanged source without chunking it (chunking needs the model's tokenizer).

    ``WORKSPACE/ingest-digests.json`` maps each source to a digest of its documents as read (ids,
    titles, texts, metadata) and the chunking settings, with the (id, content hash, path) of the
    rows they gave. A source whose digest is the same *and* whose rows in the table are still
    exactly those is unchanged; anything else (a missing or damaged file, other rows) is chunked
    as usual, so the file is a shortcut, never a source of truth."""

    NAME = "ingest-digests.json"

    def __init__(self, ws, settings: tuple):
        import json

        self.path = Path(ws.root) / self.NAME
        self.settings = list(settings)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries = data["sources"] if data.get("settings") == self.settings else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.entries = {}
        if not isinstance(self.entries, dict):
            self.entries = {}
        self.changed = False

    @staticmethod
    def digest(f, docs) -> str:
        import hashlib
        import json

        h = hashlib.sha256(f.source.encode("utf-8") + b"\0")
        for d in docs:
            h.update(json.dumps([d.base_id, d.suffix_always, d.title, d.text, d.metadata], sort_keys=True,
                                default=str).encode("utf-8"))
        return h.hexdigest()

    @staticmethod
    def _keys(rows) -> list:
        return sorted([r["id"], r["content_hash"], r.get("path") or ""] for r in rows)

    def unchanged(self, f, docs, table_rows, seen_ids, summary) -> bool:
        """Whether ``f`` (read as ``docs``) is unchanged since its rows ``table_rows`` were
        written; if so its ids are taken in ``seen_ids`` and its rows counted unchanged."""
        entry = self.entries.get(f.source)
        if not isinstance(entry, dict) or not table_rows or entry.get("digest") != self.digest(f, docs):
            return False
        if entry.get("rows") != self._keys(table_rows) or any(r.get("path") != f.path for r in table_rows):
            return False  # the table changed since, or the file moved: chunk it
        if any(r["id"] in seen_ids for r in table_rows):
            return False  # an id taken earlier in this run: the usual path reports it
        for r in table_rows:
            seen_ids[r["id"]] = f.display
        summary.unchanged += len(table_rows)
        return True

    def record(self, f, docs, rows) -> None:
        self.entries[f.source] = {"digest": self.digest(f, docs), "rows": self._keys(rows)}
        self.changed = True

    def save(self) -> None:
        import json

        from regrad_cli.files import atomic_write_text

        if not self.changed:
            return
        try:
            atomic_write_text(self.path, json.dumps({"settings": self.settings, "sources": self.entries}))
        except OSError as exc:  # only a shortcut: the next ingest chunks again
            log.warning("cannot write %s: %s", self.path, exc)
