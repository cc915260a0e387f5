"""Tombstones: the documents unlearned by ``regrad bank rm`` (regrad_cli.offline.unlearn), which
ingest skips and build-bank never computes or commits."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from regrad_cli.errors import RegradError
from regrad_cli.files import atomic_write_text, read_bounded
from regrad_cli.versions import Migrations, Version

# tombstones.json's "format": 1 for 1.0 (the first format), "MAJOR.MINOR" after it. A newer major is
# refused, a newer minor read; an older file is brought to TOMBSTONES_VERSION by TOMBSTONES_MIGRATIONS
# in memory (none yet: 1.0 is the first).
TOMBSTONES_VERSION = Version(1, 0)
TOMBSTONES_MIGRATIONS = Migrations("tombstones")
# About a million removed ids: a larger file (or a link to a device) is refused, not read.
MAX_BYTES = 128 << 20


class Tombstones:
    """Documents unlearned by ``regrad bank rm`` (``WORKSPACE/tombstones.json``).

    ``{"format": 1, "ids": {doc_id: state}, "sources": {source: state}}`` (format: see
    TOMBSTONES_VERSION), state "pending" while
    a removal is under way and "done" once its rows and documents are gone and purged. Written
    atomically (temporary file, fsync, rename); the caller holds :func:`workspace_lock`.
    """

    NAME = "tombstones.json"

    def __init__(self, ws):
        self.path = Path(ws.root) / self.NAME

    def load(self) -> dict:
        try:
            raw = read_bounded(self.path, MAX_BYTES)
        except FileNotFoundError:
            return {"format": TOMBSTONES_VERSION.tag(), "ids": {}, "sources": {}}
        except OSError as exc:
            raise RegradError(f"cannot read {self.path}: {exc}") from exc
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        tag = data.get("format") if isinstance(data, dict) else None
        try:
            found = Version.parse(tag, str(self.path)) if isinstance(tag, (int, str)) and tag is not True else None
        except RegradError:
            found = None
        if found is not None and found >= Version(1, 0):
            # A newer major is refused here; an older file is upgraded (and written as current).
            data, _ = TOMBSTONES_MIGRATIONS.upgrade(data, found, TOMBSTONES_VERSION, str(self.path))
            if found < TOMBSTONES_VERSION:
                data["format"] = TOMBSTONES_VERSION.tag()
        ok = (found is not None and found >= Version(1, 0)
              and all(isinstance(data.get(k), dict) for k in ("ids", "sources"))
              and all(isinstance(k, str) and v in ("pending", "done")
                      for part in ("ids", "sources") for k, v in data[part].items()))
        if not ok:
            raise RegradError(f"{self.path} is damaged: it lists unlearned documents, so regrad will not "
                              "guess; restore it from a backup (or delete it to forget every removal)")
        return data

    def _save(self, data: dict) -> None:
        try:
            atomic_write_text(self.path, json.dumps(data, sort_keys=True), fsync=True)
        except OSError as exc:
            raise RegradError(f"cannot write {self.path}: {exc}") from exc

    def ids(self) -> set[str]:
        return set(self.load()["ids"])

    def sources(self) -> set[str]:
        return set(self.load()["sources"])

    def pending(self) -> tuple[set[str], set[str]]:
        data = self.load()
        return ({k for k, v in data["ids"].items() if v == "pending"},
                {k for k, v in data["sources"].items() if v == "pending"})

    def mark(self, ids: Iterable[str], sources: Iterable[str], state: str) -> None:
        data = self.load()
        for k in ids:
            data["ids"][k] = state
        for k in sources:
            data["sources"][k] = state
        data["updated_at"] = datetime.now(timezone.utc).isoformat()
        self._save(data)

    def readmit(self, ids: Iterable[str] = (), sources: Iterable[str] = ()) -> int:
        """Forget the removal of these documents (ingest --readmit); returns how many."""
        data = self.load()
        n = sum(data["ids"].pop(k, None) is not None for k in set(ids))
        n += sum(data["sources"].pop(k, None) is not None for k in set(sources))
        if n:
            self._save(data)
        return n


def forbidden_ids(ws):
    """A callable for GradientBank.append/commit_fragments: the workspace's tombstoned doc ids,
    read at call time (under the bank's writer lock)."""
    return lambda: Tombstones(ws).ids()
