"""Tombstones: the documents unlearned by ``regrad bank rm`` (regrad_cli.offline.unlearn), which
ingest skips and build-bank never computes or commits."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from regrad_cli.errors import RegradError
from regrad_cli.files import atomic_write_text


class Tombstones:
    """Documents unlearned by ``regrad bank rm`` (``WORKSPACE/tombstones.json``).

    ``{"format": 1, "ids": {doc_id: state}, "sources": {source: state}}``, state "pending" while
    a removal is under way and "done" once its rows and documents are gone and purged. Written
    atomically (temporary file, fsync, rename); the caller holds :func:`workspace_lock`.
    """

    NAME = "tombstones.json"

    def __init__(self, ws):
        self.path = Path(ws.root) / self.NAME

    def load(self) -> dict:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {"format": 1, "ids": {}, "sources": {}}
        except OSError as exc:
            raise RegradError(f"cannot read {self.path}: {exc}") from exc
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        ok = (isinstance(data, dict) and data.get("format") == 1
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
