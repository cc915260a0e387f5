"""Format readers: a text, Markdown, JSON or JSONL(.gz) file into documents (``_Doc``).

Every reader treats its file as untrusted: sizes are checked while reading (a compressed file
counts its decompressed bytes, read in bounded blocks, so a gzip bomb stops at the per-file
limit), lines are split in linear time, and anything unreadable becomes a ``_Skip`` with a reason.

``iter_docs`` yields a file's documents one at a time: a JSONL file is never held whole (as
text, records or documents), so ingest memory follows the largest record, not the file. A
``_Skip`` can come after some documents were yielded (a JSONL file found too large half way):
the caller then drops what it made of them. Skipped records and warnings are listed one by one up
to ``MAX_NOTES`` per file, then counted in one line (a file of a million bad lines is not a
million lines of report).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from regrad_cli.offline.ingest.discovery import _File

if TYPE_CHECKING:
    from regrad_cli.offline.ingest.summary import IngestSummary

BINARY_SNIFF_BYTES = 8192
# Decompressed (or read) bytes per block when a JSONL file is streamed.
READ_BLOCK = 1 << 20


class _Skip(Exception):
    """A file (or record) that cannot be ingested; the message is the reason."""


# Skipped records (and, separately, warnings) listed one by one per file; the rest are counted.
MAX_NOTES = 100


@dataclass(slots=True)
class _Doc:
    base_id: str
    suffix_always: bool  # text files: "#k" even for one chunk
    title: str
    text: str
    metadata: dict
    where: str  # for messages


class _Notes:
    """A file's record-level skips and warnings, at most ``MAX_NOTES`` of each listed."""

    def __init__(self, display: str, summary: IngestSummary):
        self.display, self.summary = display, summary
        self.skips = self.warns = 0

    def skip(self, where: str, reason: str) -> None:
        self.skips += 1
        if self.skips <= MAX_NOTES:
            self.summary.skip(where, reason)

    def warn(self, text: str) -> None:
        self.warns += 1
        if self.warns <= MAX_NOTES:
            self.summary.warnings.append(text)

    def close(self) -> None:
        if self.skips > MAX_NOTES:
            self.summary.skip(self.display, f"{self.skips - MAX_NOTES} more records skipped "
                                            f"(the first {MAX_NOTES} are listed)")
        if self.warns > MAX_NOTES:
            self.summary.warnings.append(f"{self.display}: {self.warns - MAX_NOTES} more warnings "
                                         f"(the first {MAX_NOTES} are listed)")


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.1f}".rstrip("0").rstrip(".")


def _is_binary(head: bytes) -> bool:
    return b"\x00" in head[:BINARY_SNIFF_BYTES]


def _decode(data: bytes, where: str, warnings: list[str]) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        warnings.append(
            f"{where}: not valid UTF-8 (first bad byte at offset {exc.start}); undecodable bytes replaced"
        )
        return data.decode("utf-8-sig", errors="replace")


def _open_stream(path: str, gz: bool):
    fh = open(path, "rb")
    return gzip.GzipFile(fileobj=fh, mode="rb") if gz else fh


def _read_limited(fh, limit: int, what: str) -> bytes:
    data = fh.read(limit + 1)
    if len(data) > limit:
        raise _Skip(f"too large ({what} > {_mb(limit)} MB)")
    return data


_TITLE_RE = re.compile(r"\A\s*#[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
# The title is looked for in the first characters only: the pattern backtracks quadratically on
# a heading of many "#" and spaces (8 000 characters took 2.5 s; a 19 MB line would never end).
TITLE_SCAN_CHARS = 1024


def _read_whole_text(f: _File, limit: int, notes: _Notes) -> str:
    """A plain (not compressed) file's text, at most ``limit`` bytes: skipped when binary or empty."""
    with _open_stream(f.path, gz=False) as fh:
        head = fh.read(BINARY_SNIFF_BYTES)
        if _is_binary(head):
            raise _Skip("binary")
        data = head + _read_limited(fh, limit - len(head), "file")
    warnings: list[str] = []
    text = _decode(data, f.display, warnings)
    del data
    for w in warnings:
        notes.warn(w)
    if not text.strip():
        raise _Skip("empty")
    return text


def _text_docs(f: _File, limit: int, notes: _Notes) -> Iterator[_Doc]:
    text = _read_whole_text(f, limit, notes)
    title = Path(f.path).stem
    if f.path.lower().endswith((".md", ".markdown")):
        m = _TITLE_RE.match(text[:TITLE_SCAN_CHARS])
        if m:
            title = m.group(1).strip()
    yield _Doc(f.source, True, title, text, {}, f.display)


def _json_limit(exc: Exception) -> str:
    """What json.loads hit besides a syntax error: its nesting or integer-length limit."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(";")[0]


def _record_doc(rec: Any, f: _File, n: int, where: str) -> _Doc:
    if not isinstance(rec, dict):
        raise _Skip(f"record is a {type(rec).__name__}, not an object")
    text = rec.get("text")
    if not isinstance(text, str):
        raise _Skip("record has no \"text\" string")
    if not text.strip():
        raise _Skip("empty text")
    rid = rec.get("id")
    if rid is not None and not isinstance(rid, (str, int)):
        raise _Skip("\"id\" must be a string or an integer")
    if isinstance(rid, str) and any(unicodedata.category(c) in ("Cc", "Cs") for c in rid):
        # The bank refuses some (NUL), terminals act on others (escape sequences).
        raise _Skip("\"id\" contains control characters")
    title = rec.get("title")
    title = "" if title is None else str(title)
    meta = {k: v for k, v in rec.items() if k not in ("text", "id", "title")}
    base = str(rid) if rid is not None and str(rid) != "" else f"{f.source}@{n}"
    return _Doc(base, False, title, text, meta, where)


def _json_docs(f: _File, limit: int, notes: _Notes) -> Iterator[_Doc]:
    # One JSON value is parsed whole (no streaming JSON parser in the standard library): its
    # objects cost a few times the file's size, which --max-file-mb bounds.
    text = _read_whole_text(f, limit, notes)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Skip(f"invalid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # nested too deep, or an integer too long
        raise _Skip(f"invalid JSON ({_json_limit(exc)})") from None
    del text
    if isinstance(obj, dict) and isinstance(obj.get("documents"), list):
        records = obj["documents"]
    elif isinstance(obj, dict) and "text" in obj:
        records = [obj]
    elif isinstance(obj, list):
        records = obj
    else:
        raise _Skip('no documents (expected a record with "text", a list of records, or {"documents": [...]})')
    del obj
    found = False
    for i in range(len(records)):
        where = f"{f.display}[{i + 1}]"
        try:
            doc = _record_doc(records[i], f, i + 1, where)
        except _Skip as exc:
            notes.skip(where, str(exc))
            continue
        records[i] = None  # the document holds what is needed of it
        found = True
        yield doc
    if not found:
        raise _Skip("no valid records")


def _jsonl_docs(f: _File, limit: int, notes: _Notes) -> Iterator[_Doc]:
    gz = f.path.lower().endswith(".gz")
    found = False
    try:
        with _open_stream(f.path, gz=gz) as fh:
            head = fh.read(BINARY_SNIFF_BYTES)
            if _is_binary(head):
                raise _Skip("binary")
            # Streamed line by line: the whole file is never held, as text or as documents.
            for lineno, raw in enumerate(_lines(head, fh, limit, gz), start=1):
                if not raw.strip():
                    continue
                where = f"{f.display}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    notes.warn(f"{where}: not valid UTF-8 (byte {exc.start}); undecodable bytes replaced")
                    line = raw.decode("utf-8", errors="replace")
                del raw
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    notes.skip(where, f"invalid JSON ({exc.msg}, column {exc.colno})")
                    continue
                except (ValueError, RecursionError) as exc:
                    notes.skip(where, f"invalid JSON ({_json_limit(exc)})")
                    continue
                del line
                try:
                    doc = _record_doc(rec, f, lineno, where)
                except _Skip as exc:
                    notes.skip(where, str(exc))
                    continue
                del rec
                found = True
                yield doc
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _Skip(f"cannot decompress ({exc})") from None
    if not found:
        raise _Skip("empty" if not head else "no valid records")


def _lines(head: bytes, fh, limit: int, gz: bool, block: int = READ_BLOCK) -> Iterator[bytes]:
    """The lines of ``head`` + the rest of ``fh``, read ``block`` (decompressed) bytes at a time.

    Stops with ``_Skip`` as soon as more than ``limit`` bytes were read, before the next block is
    kept (a gzip bomb costs at most ``limit + block`` bytes); each byte is searched for a newline
    once, so a long line costs linear time, not quadratic."""
    pending = bytearray(head)
    total = len(head)
    scan = 0  # pending[:scan] holds no newline
    while True:
        start = 0
        while True:
            i = pending.find(b"\n", max(start, scan))
            if i < 0:
                break
            yield bytes(pending[start:i])
            start = i + 1
        if start:
            del pending[:start]
        scan = len(pending)
        more = fh.read(block)
        if not more:
            break
        total += len(more)
        if total > limit:
            raise _Skip(f"too large ({'decompressed ' if gz else ''}> {_mb(limit)} MB)")
        pending += more
    if pending:
        yield bytes(pending)


def iter_docs(f: _File, limit: int, summary: IngestSummary) -> Iterator[_Doc]:
    """The documents of ``f``, one at a time; ``_Skip`` (a whole file that cannot be ingested)
    may come before the first or after some. Record-level skips and warnings go to ``summary``."""
    size = os.stat(f.path).st_size
    if size > limit:
        raise _Skip(f"too large ({_mb(size)} MB > {_mb(limit)} MB)")
    if size == 0:
        raise _Skip("empty")
    name = f.path.lower()
    notes = _Notes(f.display, summary)
    if name.endswith((".jsonl", ".jsonl.gz")):
        reader = _jsonl_docs(f, limit, notes)
    elif name.endswith(".json"):
        reader = _json_docs(f, limit, notes)
    else:
        reader = _text_docs(f, limit, notes)
    try:
        yield from reader
    finally:
        notes.close()
