"""Format readers: a text, Markdown, JSON or JSONL(.gz) file into documents (``_Doc``).

Every reader treats its file as untrusted: sizes are checked while reading (a compressed file
counts its decompressed bytes, read in bounded blocks, so a gzip bomb stops at the per-file
limit), lines are split in linear time, and anything unreadable becomes a ``_Skip`` with a reason.
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


@dataclass
class _Doc:
    base_id: str
    suffix_always: bool  # text files: "#k" even for one chunk
    title: str
    text: str
    metadata: dict
    where: str  # for messages


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


def _text_docs(f: _File, limit: int, warnings: list[str]) -> list[_Doc]:
    with _open_stream(f.path, gz=False) as fh:
        head = fh.read(BINARY_SNIFF_BYTES)
        if _is_binary(head):
            raise _Skip("binary")
        data = head + _read_limited(fh, limit - len(head), "file")
    text = _decode(data, f.display, warnings)
    if not text.strip():
        raise _Skip("empty")
    title = Path(f.path).stem
    if f.path.lower().endswith((".md", ".markdown")):
        m = _TITLE_RE.match(text)
        if m:
            title = m.group(1).strip()
    return [_Doc(f.source, True, title, text, {}, f.display)]


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


def _json_docs(f: _File, limit: int, summary: IngestSummary) -> list[_Doc]:
    with _open_stream(f.path, gz=False) as fh:
        head = fh.read(BINARY_SNIFF_BYTES)
        if _is_binary(head):
            raise _Skip("binary")
        data = head + _read_limited(fh, limit - len(head), "file")
    text = _decode(data, f.display, summary.warnings)
    if not text.strip():
        raise _Skip("empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Skip(f"invalid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # nested too deep, or an integer too long
        raise _Skip(f"invalid JSON ({_json_limit(exc)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("documents"), list):
        records = obj["documents"]
    elif isinstance(obj, dict) and "text" in obj:
        records = [obj]
    elif isinstance(obj, list):
        records = obj
    else:
        raise _Skip('no documents (expected a record with "text", a list of records, or {"documents": [...]})')
    docs = []
    for i, rec in enumerate(records, start=1):
        where = f"{f.display}[{i}]"
        try:
            docs.append(_record_doc(rec, f, i, where))
        except _Skip as exc:
            summary.skip(where, str(exc))
    if not docs:
        raise _Skip("no valid records")
    return docs


def _jsonl_docs(f: _File, limit: int, summary: IngestSummary) -> list[_Doc]:
    gz = f.path.lower().endswith(".gz")
    docs: list[_Doc] = []
    try:
        with _open_stream(f.path, gz=gz) as fh:
            head = fh.read(BINARY_SNIFF_BYTES)
            if _is_binary(head):
                raise _Skip("binary")
            # Streamed line by line: the whole file is never held as one string.
            for lineno, raw in enumerate(_lines(head, fh, limit, gz), start=1):
                if not raw.strip():
                    continue
                where = f"{f.display}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    summary.warnings.append(
                        f"{where}: not valid UTF-8 (byte {exc.start}); undecodable bytes replaced"
                    )
                    line = raw.decode("utf-8", errors="replace")
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    summary.skip(where, f"invalid JSON ({exc.msg}, column {exc.colno})")
                    continue
                except (ValueError, RecursionError) as exc:
                    summary.skip(where, f"invalid JSON ({_json_limit(exc)})")
                    continue
                try:
                    docs.append(_record_doc(rec, f, lineno, where))
                except _Skip as exc:
                    summary.skip(where, str(exc))
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _Skip(f"cannot decompress ({exc})") from None
    if not docs:
        raise _Skip("empty" if not head else "no valid records")
    return docs


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


def _read_docs(f: _File, limit: int, summary: IngestSummary) -> list[_Doc]:
    size = os.stat(f.path).st_size
    if size > limit:
        raise _Skip(f"too large ({_mb(size)} MB > {_mb(limit)} MB)")
    if size == 0:
        raise _Skip("empty")
    name = f.path.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_docs(f, limit, summary)
    if name.endswith(".json"):
        return _json_docs(f, limit, summary)
    return _text_docs(f, limit, summary.warnings)
