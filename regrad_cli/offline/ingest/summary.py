"""What an ingest did: ``IngestSummary`` (counts of documents, skipped paths, warnings)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class IngestSummary:
    """What an ingest did. Counts are of documents (table rows, i.e. chunks)."""

    added: int = 0  # new ids
    updated: int = 0  # existing ids whose text, title or metadata changed
    unchanged: int = 0
    removed: int = 0  # old chunks of a changed source that its new version no longer has
    pruned: int = 0  # documents of files that no longer exist (--prune)
    pruned_rows: int = 0  # their gradient rows, deleted from the workspace's banks with them
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    warnings: list[str] = field(default_factory=list)
    documents: int = 0  # rows in the table afterwards

    @property
    def ok(self) -> bool:
        """False when nothing at all was ingested, found unchanged or pruned."""
        return bool(self.added or self.updated or self.unchanged or self.pruned)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed or self.pruned)

    def to_dict(self) -> dict:
        return asdict(self)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})
