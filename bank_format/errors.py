"""The one error tree of ``bank_format``.

Every error raised on purpose derives from ``BankFormatError``, so a caller (the regrad CLI, or
any other tool reading a bank) can catch one type and print its message; anything else escaping
this package is a bug.
"""

from __future__ import annotations

from typing import Any


class BankFormatError(Exception):
    """Root error: a bank, blob or metadata is missing, malformed, unknown or misused."""


class BankMismatchError(BankFormatError):
    """An opened bank's fingerprints differ from what the caller expected.

    ``differences`` holds ``(field, expected, found)`` triples; the message lists each one with
    both values, so a user can see which of model, learner, embedder, layout or codec changed.
    """

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]] | None = None):
        super().__init__(message)
        self.differences = list(differences or [])

    def __reduce__(self):
        return (type(self), (str(self), self.differences))


class CorruptBlobError(BankFormatError):
    """A blob or a stored row failed its integrity checks.

    ``doc_id`` names the row when the blob came from a bank, and is None for a bare blob.
    """

    def __init__(self, message: str, doc_id: str | None = None):
        if doc_id is not None and doc_id not in message:
            message = f"document {doc_id!r}: {message}"
        super().__init__(message)
        self.doc_id = doc_id

    def __reduce__(self):
        return (type(self), (str(self), self.doc_id))
