"""`regrad ingest`: read text files into the workspace's ``documents`` table, incrementally.

Inputs are files and directories (walked recursively, in sorted order, following symlinks but
never entering a directory twice, so symlink loops end). In a directory only ``.txt``, ``.md``,
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
  1-based position in JSON) with the same chunk rule. A repeated id is skipped (first one wins).

Chunking is by tokens of the workspace language model's tokenizer: windows of at most
``chunking.max_tokens`` tokens, cut preferably at a paragraph end, else a sentence end, else a line
end, else between words (searched in the window's second half); consecutive chunks share up to
``chunking.overlap`` tokens. A document that fits is one chunk.

Incremental: every file is read and chunked, then compared with the table (content hash, title,
metadata, chunk layout). An unchanged source costs no write at all; a changed one is written with
its new rows replacing all its old ones in one atomic commit; only new or changed texts are
embedded. ``prune`` deletes the documents of files under the given paths that no longer exist.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import re
import stat
import zlib
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from regrad_cli.errors import ConfigError, IngestError, RegradError

log = logging.getLogger("regrad.ingest")

TEXT_EXTENSIONS = (".txt", ".md", ".markdown")
RECORD_EXTENSIONS = (".jsonl.gz", ".jsonl", ".json")
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + RECORD_EXTENSIONS
BINARY_SNIFF_BYTES = 8192
DEFAULT_MAX_FILE_MB = 20.0
# Rows buffered before one merge_insert: few table versions for a big corpus, and a failure
# loses at most this much not-yet-written work (never anything already in the table).
FLUSH_ROWS = 512

ProgressFn = Callable[..., None]


# Summary ------------------------------------------------------------------------------------
@dataclass
class IngestSummary:
    """What an ingest did. Counts are of documents (table rows, i.e. chunks)."""

    added: int = 0  # new ids
    updated: int = 0  # existing ids whose text, title or metadata changed
    unchanged: int = 0
    removed: int = 0  # old chunks of a changed source that its new version no longer has
    pruned: int = 0  # documents of files that no longer exist (--prune)
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


# Chunking -----------------------------------------------------------------------------------
@dataclass
class Chunk:
    text: str
    n_tokens: int


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _token_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span of every token of ``text``.

    A fast Hugging Face tokenizer reports offsets. Others are run word by word (a word with its
    whitespace left out) and each word's tokens share its characters evenly: approximate spans,
    but the chunk sizes are re-checked by tokenizing each chunk.
    """
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) == len(enc["input_ids"]):
            return [(int(a), int(b)) for a, b in offsets]
    except (TypeError, KeyError, NotImplementedError, ValueError, AttributeError):
        pass
    spans: list[tuple[int, int]] = []
    for m in re.finditer(r"\S+", text):
        n = len(_token_ids(tokenizer, m.group()))
        length = m.end() - m.start()
        for j in range(n):
            spans.append((m.start() + length * j // n, m.start() + length * (j + 1) // n))
    return spans


# Boundary kinds, best last; a cut "at c" ends the chunk at character c (before the whitespace).
_BOUNDARIES = [
    (1, re.compile(r"\s+")),  # between words
    (2, re.compile(r"[ \t]*\n")),  # line end
    (3, re.compile(r"(?<=[.!?…])[\"'”’)\]]*(?=\s)")),  # sentence end (cut after closing quotes)
    (4, re.compile(r"[ \t]*\n[ \t]*\n")),  # paragraph end
]


def chunk_text(text: str, tokenizer, max_tokens: int, overlap: int) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``max_tokens`` tokens sharing up to ``overlap``."""
    if max_tokens < 1 or overlap < 0 or overlap >= max_tokens:
        raise ConfigError(
            f"chunking needs max_tokens >= 1 and 0 <= overlap < max_tokens (got {max_tokens}, {overlap})"
        )
    text = text.strip()
    if not text:
        return []
    spans = _token_spans(tokenizer, text)
    n = len(spans)
    if n <= max_tokens:
        return [Chunk(text, len(_token_ids(tokenizer, text)))]
    starts = [s for s, _ in spans]
    # kind[e] = best boundary kind for cutting just before token e.
    kind = [0] * (n + 1)
    for k, pattern in _BOUNDARIES:
        for m in pattern.finditer(text):
            c = m.start() if k != 3 else m.end()
            e = bisect_left(starts, c)
            if 0 < e < n and spans[e - 1][1] <= c:
                kind[e] = max(kind[e], k)

    chunks: list[Chunk] = []
    s = 0
    while s < n:
        end = min(s + max_tokens, n)
        if end < n:
            lo = s + max(1, max_tokens // 2)
            best = max(kind[lo : end + 1], default=0)
            if best:
                end = max(e for e in range(lo, end + 1) if kind[e] == best)
        while True:  # re-tokenising the chunk alone may count a token or two more
            piece = text[spans[s][0] : spans[end - 1][1]].strip()
            n_tok = len(_token_ids(tokenizer, piece))
            if n_tok <= max_tokens or end - s <= 1:
                break
            end = max(s + 1, end - (n_tok - max_tokens))
        if piece:
            chunks.append(Chunk(piece, n_tok))
        if end >= n:
            break
        nxt = max(end - overlap, s + 1)
        # Start the overlap on a word boundary rather than mid-word.
        for e in range(nxt, end):
            if kind[e] or starts[e] == 0 or text[starts[e] - 1].isspace():
                nxt = e
                break
        s = nxt
    return chunks


# Reading ------------------------------------------------------------------------------------
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


@dataclass
class _File:
    path: str  # absolute, symlinks not resolved
    source: str
    display: str
    explicit: bool


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
    total = 0
    try:
        with _open_stream(f.path, gz=gz) as fh:
            head = fh.read(BINARY_SNIFF_BYTES)
            if _is_binary(head):
                raise _Skip("binary")
            # Streamed line by line: the whole file is never held as one string.
            for lineno, raw in enumerate(_lines(head, fh), start=1):
                total += len(raw) + 1
                if total > limit + 1:
                    raise _Skip(f"too large ({'decompressed ' if gz else ''}> {_mb(limit)} MB)")
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
        raise _Skip("empty" if total == 0 else "no valid records")
    return docs


def _lines(head: bytes, fh, block: int = 1 << 20) -> Iterator[bytes]:
    pending = head
    while True:
        *lines, pending = pending.split(b"\n")
        yield from lines
        more = fh.read(block)
        if not more:
            break
        pending += more
    if pending:
        yield pending


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


# Finding files ------------------------------------------------------------------------------
def _stat_reason(path: str, exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(exc, FileNotFoundError):
        return "broken symlink" if os.path.islink(path) else "not found"
    return f"cannot read ({exc.strerror or exc})"


def _supported(name: str) -> bool:
    return name.lower().endswith(SUPPORTED_EXTENSIONS)


def discover(paths: list[Path], summary: IngestSummary, *, exclude: str | None = None) -> list[_File]:
    """The files to read under ``paths``; everything passed over goes to ``summary.skipped``."""
    files: list[_File] = []
    seen_files: dict[tuple[int, int], str] = {}
    seen_dirs: set[tuple[int, int]] = set()

    def add_file(path: str, st: os.stat_result, source: str, display: str, explicit: bool) -> None:
        key = (st.st_dev, st.st_ino)
        if key in seen_files:
            summary.skip(display, f"same file as {seen_files[key]}")
            return
        seen_files[key] = display
        files.append(_File(path, source, display, explicit))

    for arg in paths:
        display = str(arg)
        absolute = os.path.abspath(os.fspath(arg))
        parent = os.path.dirname(absolute)
        try:
            st = os.stat(absolute)
        except OSError as exc:
            summary.skip(display, _stat_reason(absolute, exc))
            continue
        top = os.path.relpath(absolute, parent) if absolute != parent else ""
        if stat.S_ISREG(st.st_mode):
            add_file(absolute, st, Path(top).as_posix() if top else os.path.basename(absolute), display, True)
            continue
        if not stat.S_ISDIR(st.st_mode):
            summary.skip(display, "not a regular file")
            continue
        # Iterative walk (deep trees cannot overflow the stack); directories are identified by
        # (device, inode) so a symlink back up the tree is entered once only.
        seen_dirs.add((st.st_dev, st.st_ino))
        stack = [(absolute, top, display)]
        while stack:
            d_abs, d_rel, d_disp = stack.pop()
            try:
                with os.scandir(d_abs) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                summary.skip(d_disp, _stat_reason(d_abs, exc))
                continue
            subdirs = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                e_abs = os.path.join(d_abs, entry.name)
                e_rel = f"{d_rel}/{entry.name}" if d_rel else entry.name
                e_disp = os.path.join(d_disp, entry.name)
                if exclude and e_abs == exclude:
                    continue
                try:
                    est = os.stat(e_abs)
                except OSError as exc:
                    summary.skip(e_disp, _stat_reason(e_abs, exc))
                    continue
                if stat.S_ISDIR(est.st_mode):
                    key = (est.st_dev, est.st_ino)
                    if key in seen_dirs:
                        summary.skip(e_disp, "symlink loop (directory already visited)")
                        continue
                    seen_dirs.add(key)
                    subdirs.append((e_abs, e_rel, e_disp))
                elif not stat.S_ISREG(est.st_mode):
                    summary.skip(e_disp, "not a regular file")
                elif not _supported(entry.name):
                    summary.skip(e_disp, "unsupported extension")
                else:
                    add_file(e_abs, est, e_rel, e_disp, False)
            stack.extend(reversed(subdirs))
    return files


# Ingest -------------------------------------------------------------------------------------
def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _doc_rows(doc: _Doc, f: _File, chunks: list[Chunk]) -> list[dict]:
    meta = json.dumps(doc.metadata, ensure_ascii=False, sort_keys=True, default=str)
    rows = []
    for k, ch in enumerate(chunks):
        rid = f"{doc.base_id}#{k}" if doc.suffix_always or len(chunks) > 1 else doc.base_id
        rows.append(
            {
                "id": rid, "source": f.source, "path": f.path, "title": doc.title, "text": ch.text,
                "content_hash": _sha256(ch.text), "chunk": k, "n_tokens": ch.n_tokens,
                "metadata": meta,
            }
        )
    return rows


_COMPARED = ("source", "title", "content_hash", "chunk", "n_tokens", "metadata")


class _Writer:
    """Buffers rows of whole sources, embeds what is new, writes them with one merge_insert."""

    def __init__(self, store, embedder, batch_size: int, summary: IngestSummary):
        self.store = store
        self.embedder = embedder
        self.batch_size = max(1, int(batch_size))
        self.summary = summary
        self.rows: list[dict] = []
        self.sources: set[str] = set()
        self.wrote = False

    def add(self, source: str, rows: list[dict]) -> None:
        self.rows.extend(rows)
        self.sources.add(source)
        if len(self.rows) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.sources:
            return
        import numpy as np

        todo = [r for r in self.rows if r.get("embedding") is None]
        for i in range(0, len(todo), self.batch_size):
            batch = todo[i : i + self.batch_size]
            try:
                vecs = np.asarray(self.embedder.embed([r["text"] for r in batch]), dtype=np.float32)
            except RegradError:
                raise
            except Exception as exc:  # noqa: BLE001 - the embedder is a third-party model
                raise IngestError(
                    f"embedding failed on a batch from {batch[0]['source']}: {exc} "
                    f"(documents written before this batch are kept; re-run to continue)"
                ) from exc
            for r, v in zip(batch, vecs):
                r["embedding"] = v
        if self.rows:
            dim = int(np.asarray(self.rows[0]["embedding"]).shape[-1])
            fp = self.store.embedder_fingerprint
            if fp is None:
                self.store.create(dim, {"id": _embedder_name(self.embedder), "dim": dim})
            elif fp["dim"] != dim:
                raise IngestError(
                    f"embedder {_embedder_name(self.embedder)!r} gives {dim}-dim vectors but the "
                    f"documents table holds {fp['dim']}-dim vectors from {fp['id']!r}"
                )
        now = datetime.now(timezone.utc)
        for r in self.rows:
            r["ingested_at"] = now
            r["embedding"] = np.asarray(r["embedding"], dtype=np.float32).tolist()
        if self.store.table() is not None:
            self.store.replace_sources(self.rows, self.sources)
            self.wrote = True
        self.rows, self.sources = [], set()


def _embedder_name(embedder) -> str:
    name = getattr(embedder, "name", None)
    return str(name) if name else str(embedder.fingerprint["id"])


def ingest(
    ws,
    paths: list[Path],
    *,
    prune: bool = False,
    embedder=None,
    tokenizer=None,
    progress: ProgressFn | None = None,
    max_file_mb: float = DEFAULT_MAX_FILE_MB,
) -> IngestSummary:
    """Ingest ``paths`` into the workspace ``ws``; returns what changed. Never prints.

    ``embedder`` (``.embed(texts)``, ``.name``/``.fingerprint``) and ``tokenizer`` (a Hugging Face
    style callable) default to the workspace's; ``progress(done, total, info)`` is called per file.
    """
    from filelock import FileLock, Timeout

    from regrad_cli.documents import LIGHT_COLUMNS, DocumentStore, is_within

    chunking = ws.config.chunking
    max_tokens, overlap = int(chunking.max_tokens), int(chunking.overlap)
    if max_tokens < 1 or overlap < 0 or overlap >= max_tokens:
        raise ConfigError(
            f"chunking.max_tokens must be >= 1 and 0 <= chunking.overlap < max_tokens "
            f"(got {max_tokens} and {overlap})"
        )
    if max_file_mb <= 0:
        raise ConfigError(f"--max-file-mb must be positive (got {max_file_mb})")
    limit = int(max_file_mb * 1e6)
    summary = IngestSummary()
    if embedder is None:
        from regrad_cli.models import Embedder

        embedder = Embedder(ws.config.embedder.id, batch_size=ws.config.embedder.batch_size)

    ws.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(ws.root / "ingest.lock"))
    try:
        lock.acquire(timeout=5)
    except Timeout:
        raise IngestError(f"another `regrad ingest` is writing to {ws.root}; wait for it to finish") from None
    try:
        store = DocumentStore(ws)
        fp = store.embedder_fingerprint
        name = _embedder_name(embedder)
        if fp is not None and fp.get("id") not in (None, name):
            raise IngestError(
                f"the workspace {ws.root} was ingested with embedder {fp['id']!r} (dim {fp['dim']}), "
                f"not {name!r}: use --embedder {fp['id']} or a new --workspace"
            )

        files = discover(paths, summary, exclude=str(ws.root))
        existing = store.arrow(LIGHT_COLUMNS).to_pylist() if store.exists else []
        by_id = {r["id"]: r for r in existing}
        by_source: dict[str, list[dict]] = {}
        for r in existing:
            by_source.setdefault(r["source"], []).append(r)

        writer = _Writer(store, embedder, ws.config.embedder.batch_size, summary)
        seen_ids: dict[str, str] = {}
        seen_sources: set[str] = set()
        total = len(files)
        if progress:
            progress(0, total, "")
        for i, f in enumerate(files):
            try:
                docs = _read_docs(f, limit, summary)
            except _Skip as exc:
                summary.skip(f.display, str(exc))
                docs = None
            except OSError as exc:
                summary.skip(f.display, _stat_reason(f.path, exc))
                docs = None
            if docs:
                if tokenizer is None:
                    from regrad_cli.models import load_tokenizer

                    tokenizer = load_tokenizer(ws.config.model.id)
                rows: list[dict] = []
                for doc in docs:
                    doc_rows = _doc_rows(doc, f, chunk_text(doc.text, tokenizer, max_tokens, overlap))
                    clash = next((r["id"] for r in doc_rows if r["id"] in seen_ids), None)
                    if clash is not None:
                        summary.skip(doc.where, f"duplicate id {clash!r} (first in {seen_ids[clash]})")
                        continue
                    for r in doc_rows:
                        seen_ids[r["id"]] = doc.where
                    rows.extend(doc_rows)
                if rows:
                    seen_sources.add(f.source)
                    _stage_source(f.source, rows, by_id, by_source.get(f.source, []), store, writer, summary)
            if progress:
                progress(i + 1, total, f.display)
        writer.flush()

        if prune:
            roots = [os.path.abspath(os.fspath(p)) for p in paths]
            stale = {
                r["source"] for r in existing
                if r["source"] not in seen_sources and r.get("path")
                and any(is_within(r["path"], root) for root in roots)
                and not os.path.exists(r["path"])
            }
            summary.pruned = store.delete_sources(stale)
        if writer.wrote or summary.pruned:
            try:
                store.ensure_fts_index()
            except (OSError, ValueError, RuntimeError) as exc:  # search still works without it
                summary.warnings.append(f"full-text index not rebuilt: {exc}")
        summary.documents = store.count()
        log.info("ingest: %d added, %d updated, %d unchanged, %d removed, %d pruned, %d skipped; %d documents",
                 summary.added, summary.updated, summary.unchanged, summary.removed, summary.pruned,
                 len(summary.skipped), summary.documents)
        return summary
    finally:
        lock.release()


def _stage_source(source, rows, by_id, old_rows, store, writer: _Writer, summary: IngestSummary) -> None:
    """Count one source's new rows against the table and queue it for writing if it changed."""
    new_ids = {r["id"] for r in rows}
    changed = len(old_rows) != len(rows)
    counts = {"added": 0, "updated": 0, "unchanged": 0}
    for r in rows:
        old = by_id.get(r["id"])
        if old is None:
            counts["added"] += 1
            changed = True
        elif any(old.get(k) != r[k] for k in _COMPARED):
            counts["updated"] += 1
            changed = True
        else:
            counts["unchanged"] += 1
            if old.get("path") != r["path"]:
                changed = True  # same content found at a new place: record the new path
    summary.added += counts["added"]
    summary.updated += counts["updated"]
    summary.unchanged += counts["unchanged"]
    if not changed:
        return
    summary.removed += sum(1 for r in old_rows if r["id"] not in new_ids)
    # Reuse the stored vector of any text this source already had (same hash = same vector).
    reusable = {r["content_hash"]: r["id"] for r in old_rows}
    reusable.update({by_id[r["id"]]["content_hash"]: r["id"] for r in rows if r["id"] in by_id})
    want = {reusable[r["content_hash"]] for r in rows if r["content_hash"] in reusable}
    vectors = {}
    if want:
        got = store.get(want, ["content_hash", "embedding"])
        vectors = {g["content_hash"]: g["embedding"] for g in got.values()}
    for r in rows:
        r["embedding"] = vectors.get(r["content_hash"])
    writer.add(source, rows)
