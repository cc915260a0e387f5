"""Rows of a bank: validating and encoding the rows given to ``append`` (or to a
``FragmentWriter``) into the Arrow table that is written, and checking a stored row's blob on read
(docs/bank-format.md, section 7). Pure functions of the bank's metadata: no I/O.
"""

from __future__ import annotations

import hashlib
import operator
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np

from .blob import decode_blob, encode_blob, read_header
from .errors import BankFormatError, CorruptBlobError
from .schema import CODECS, GROUPED_CODECS, BankMeta, arrow_schema

# The keys a row given to ``append`` may have.
ROW_KEYS = {"doc_id", "content_hash", "embedding", "tensors", "blob", "n_tokens", "source"}


def repeated(keys) -> list:
    """The keys that occur more than once (in first-seen order)."""
    return [k for k, c in Counter(tuple(k) for k in keys).items() if c > 1]


def check_row(meta: BankMeta, doc_id: str | None, blob: Any, checksum: Any, codec: Any) -> list[np.ndarray]:
    """Decode one stored row, or raise CorruptBlobError naming it (section 7)."""
    if blob is None:
        raise CorruptBlobError("blob is missing", doc_id=doc_id)
    actual = hashlib.sha256(blob).hexdigest()
    if checksum != actual:
        raise CorruptBlobError(
            f"checksum mismatch: stored {checksum}, blob hashes to {actual}", doc_id=doc_id
        )
    want = meta.codec
    if codec != want.name:
        what = "unknown codec" if codec not in CODECS else "codec"
        raise CorruptBlobError(f"row has {what} {codec!r}, the bank uses {want.name!r}", doc_id=doc_id)
    try:
        header = read_header(blob)
        if header.codec != want.name or (want.name in GROUPED_CODECS and header.group_size != want.group_size):
            raise CorruptBlobError(
                f"blob is {header.codec} (group {header.group_size}), the bank uses "
                f"{want.name} (group {want.group_size})"
            )
        return decode_blob(blob, meta.layout)
    except BankFormatError as e:
        raise CorruptBlobError(str(e), doc_id=doc_id) from None


def prepare_row(meta: BankMeta, i: int, row: Any) -> dict:
    """Validate one row given to ``append`` and encode its tensors (or check its blob)."""
    if not isinstance(row, Mapping):
        raise BankFormatError(f"row {i} must be a dict, got {type(row).__name__}")
    unknown = sorted(set(row) - ROW_KEYS)
    if unknown:
        raise BankFormatError(f"row {i} has unknown keys {unknown}; allowed: {sorted(ROW_KEYS)}")
    doc_id = row.get("doc_id")
    if not isinstance(doc_id, str) or not doc_id or "\x00" in doc_id:
        raise BankFormatError(f"row {i}: doc_id must be a non-empty string without NUL, got {doc_id!r}")
    where = f"row {i} (doc_id {doc_id!r})"
    content_hash = row.get("content_hash")
    if not isinstance(content_hash, str) or not content_hash:
        raise BankFormatError(f"{where}: content_hash must be a non-empty string, got {content_hash!r}")
    source = row.get("source")
    if source is not None and not isinstance(source, str):
        raise BankFormatError(f"{where}: source must be a string or None, got {source!r}")
    try:
        n_tokens = operator.index(row.get("n_tokens"))
    except TypeError:
        n_tokens = None
    if n_tokens is None or isinstance(row.get("n_tokens"), bool) or not 0 <= n_tokens < 2**31:
        raise BankFormatError(f"{where}: n_tokens must be an integer in [0, 2^31), got {row.get('n_tokens')!r}")
    try:
        emb = np.asarray(row.get("embedding"), dtype=np.float32)
    except (TypeError, ValueError):
        raise BankFormatError(f"{where}: embedding is not a vector of numbers") from None
    if emb.shape != (meta.dim,):
        raise BankFormatError(
            f"{where}: embedding has shape {emb.shape}, the bank's embedder has dim {meta.dim}"
        )
    if not np.isfinite(emb).all() or not np.any(emb):
        # Cosine similarity of a zero vector is undefined: such a row could never be found.
        raise BankFormatError(f"{where}: embedding must be finite with a non-zero norm")
    has_t, has_b = row.get("tensors") is not None, row.get("blob") is not None
    if has_t == has_b:
        raise BankFormatError(f"{where}: give exactly one of 'tensors' or 'blob'")
    if has_t:
        try:
            blob = encode_blob(row["tensors"], meta.layout, meta.codec)
        except BankFormatError as e:
            raise BankFormatError(f"{where}: {e}") from None
    else:
        blob = row["blob"]
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise BankFormatError(f"{where}: blob must be bytes, got {type(blob).__name__}")
        blob = bytes(blob)
        checksum = hashlib.sha256(blob).hexdigest()
        try:
            check_row(meta, doc_id, blob, checksum, meta.codec.name)
        except CorruptBlobError as e:
            raise CorruptBlobError(f"{where}: refusing to append: {e}", doc_id=doc_id) from None
    return {
        "doc_id": doc_id,
        "content_hash": content_hash,
        "source": source,
        "embedding": emb,
        "blob": blob,
        "n_tokens": n_tokens,
    }


def rows_table(meta: BankMeta, rows: Sequence[Mapping[str, Any]]) -> Any:
    """Validate and encode ``rows`` into the Arrow table that ``append`` writes (no I/O).

    Each row: ``doc_id``, ``content_hash``, ``embedding`` (dim floats), ``n_tokens``, optional
    ``source``, and either ``tensors`` (arrays in layout order) or ``blob`` (encoded bytes,
    checked against the layout and codec). Returns None for an empty list.
    """
    import pyarrow as pa

    if isinstance(rows, Mapping):
        raise BankFormatError("append takes a list of row dicts, not one dict")
    prepared = [prepare_row(meta, i, r) for i, r in enumerate(rows)]
    if not prepared:
        return None
    dup = repeated((r["doc_id"], r["content_hash"]) for r in prepared)
    if dup:
        raise BankFormatError(f"the batch repeats (doc_id, content_hash) keys: {dup[:5]}")
    now = datetime.now(timezone.utc)
    dim = meta.dim
    schema = arrow_schema(dim)  # no metadata: an append must never touch the bank's metadata
    embeddings = np.stack([r["embedding"] for r in prepared]).reshape(-1)
    return pa.table(
        {
            "doc_id": pa.array([r["doc_id"] for r in prepared], pa.string()),
            "content_hash": pa.array([r["content_hash"] for r in prepared], pa.string()),
            "source": pa.array([r["source"] for r in prepared], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings, pa.float32()), dim),
            "blob": pa.array([r["blob"] for r in prepared], pa.large_binary()),
            "codec": pa.array([meta.codec.name] * len(prepared), pa.string()),
            "n_tokens": pa.array([r["n_tokens"] for r in prepared], pa.int32()),
            "checksum": pa.array([hashlib.sha256(r["blob"]).hexdigest() for r in prepared], pa.string()),
            "created_at": pa.array([now] * len(prepared), pa.timestamp("us", tz="UTC")),
        },
        schema=schema,
    )
