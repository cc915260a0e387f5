"""The blob: one document's gradient tensors as a self-describing byte string.

Byte layout in docs/bank-format.md, section 5. ``decode_blob`` treats its input as untrusted: every
size is checked before it is used, so malformed bytes raise ``BankFormatError`` (usually
``CorruptBlobError``) and never another exception or a huge allocation.

Bounded decoding (docs/reliability.md, threat model): before anything is allocated, the declared
payload size must be at most ``MAX_PAYLOAD_BYTES`` and, past ``FREE_PAYLOAD_BYTES``, at most
``MAX_EXPANSION`` times the stored frame; a zstd frame must declare its content size, and is
decompressed in reads no larger than what is still expected. So decoding a blob of n stored bytes
never holds more than about ``max(FREE_PAYLOAD_BYTES, MAX_EXPANSION * n)`` payload bytes, whatever
its header and the bank's layout claim.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import zstandard

from .codecs import decode_int4_many, decode_values, encode_values, section_size
from .errors import BankFormatError, CorruptBlobError
from .schema import CODEC_IDS, CODECS, GROUPED_CODECS, MAX_NDIM, CodecSpec, TensorSpec, coerce_codec, coerce_layout

MAGIC = b"RGRB"
BLOB_VERSION = 1
# magic, blob_version u16, codec_id u8, flags u8, n_tensors u32, group_size u32, payload_len u64
_HEADER = struct.Struct("<4sHBBIIQ")
HEADER_SIZE = _HEADER.size  # 24

# Largest decompressed payload any blob may declare (1 GiB: 2^28 fp32 values, the largest layout
# a bank may declare, see bank.MAX_LAYOUT_VALUES).
MAX_PAYLOAD_BYTES = 1 << 30
# Past FREE_PAYLOAD_BYTES, a payload may be at most this many times its stored zstd frame. Real
# gradients compress about 1.1x (int4 codes are near random); zstd can reach ~32000x on zeros,
# which is what a decompression bomb uses. encode_blob refuses to write what this would refuse.
MAX_EXPANSION = 128
FREE_PAYLOAD_BYTES = 8 << 20


@dataclass(frozen=True)
class BlobHeader:
    blob_version: int
    codec: str
    n_tensors: int
    group_size: int
    payload_len: int


def _tensor_header(shape: tuple[int, ...]) -> bytes:
    return struct.pack(f"<B{len(shape)}I", len(shape), *shape)


def payload_size(layout: Sequence[TensorSpec], codec: CodecSpec) -> int:
    """Decompressed payload length a blob of this layout and codec must have."""
    g = codec.group_size if codec.name in GROUPED_CODECS else 0  # format 1.1: grouped codecs
    return sum(1 + 4 * len(t.shape) + section_size(t.shape, codec.name, g) for t in layout)


def encode_blob(tensors: Sequence[Any], layout: Sequence[TensorSpec], codec: CodecSpec) -> bytes:
    """Encode ``tensors`` (in layout order, shapes equal to the layout's) into one blob."""
    layout = coerce_layout(layout)
    codec = coerce_codec(codec)
    if isinstance(tensors, np.ndarray) or not isinstance(tensors, Sequence):
        raise BankFormatError("tensors must be a list of arrays, one per layout entry")
    if len(tensors) != len(layout):
        raise BankFormatError(f"got {len(tensors)} tensors, the layout has {len(layout)}")
    group_size = codec.group_size if codec.name in GROUPED_CODECS else 0  # format 1.1
    parts: list[bytes] = []
    for t, spec in zip(tensors, layout):
        try:
            a = np.asarray(t)
        except Exception as e:  # arbitrary objects: one error type for the caller
            raise BankFormatError(f"tensor {spec.name!r} is not convertible to an array: {e}") from None
        if a.dtype.kind not in "fiu":
            raise BankFormatError(f"tensor {spec.name!r} has dtype {a.dtype}, expected a real number type")
        if a.shape != spec.shape:
            raise BankFormatError(f"tensor {spec.name!r} has shape {a.shape}, the layout says {spec.shape}")
        with np.errstate(over="ignore"):
            a = a.astype(np.float32)  # float64 beyond float32 range becomes inf: refused below
        try:
            sections = encode_values(a, codec.name, group_size)
        except BankFormatError as e:
            raise BankFormatError(f"tensor {spec.name!r}: {e}") from None
        parts.append(_tensor_header(spec.shape))
        parts.extend(sections)
    payload = b"".join(parts)
    frame = zstandard.ZstdCompressor(
        level=codec.zstd_level, write_checksum=True, write_content_size=True
    ).compress(payload)
    try:
        check_expansion(len(payload), len(frame))
    except CorruptBlobError as e:
        raise BankFormatError(
            f"refusing to write a blob readers would refuse ({e}): the tensors are almost all "
            f"zeros (a degenerate gradient)"
        ) from None
    header = _HEADER.pack(
        MAGIC, BLOB_VERSION, CODEC_IDS[codec.name], 0, len(layout), group_size, len(payload)
    )
    return header + frame


def check_expansion(payload_len: int, stored: int) -> None:
    """Refuse a declared payload that is too large, absolutely or against its stored size."""
    if payload_len > MAX_PAYLOAD_BYTES:
        raise CorruptBlobError(
            f"blob declares a {payload_len}-byte payload; at most {MAX_PAYLOAD_BYTES} are allowed"
        )
    if payload_len > FREE_PAYLOAD_BYTES and payload_len > MAX_EXPANSION * stored:
        raise CorruptBlobError(
            f"blob declares a {payload_len}-byte payload from {stored} stored bytes, more than "
            f"{MAX_EXPANSION}x: refused as a decompression bomb"
        )


def read_header(blob: Any) -> BlobHeader:
    """Parse and check the fixed 24-byte header without decompressing anything."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise BankFormatError(f"a blob must be bytes, got {type(blob).__name__}")
    if len(blob) < HEADER_SIZE:
        raise CorruptBlobError(f"blob is truncated: {len(blob)} bytes, the header alone needs {HEADER_SIZE}")
    magic, version, codec_id, flags, n_tensors, group_size, payload_len = _HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CorruptBlobError(f"not a regrad blob: magic is {bytes(magic)!r}, expected {MAGIC!r}")
    if version > BLOB_VERSION:
        raise BankFormatError(
            f"blob version {version} is newer than this regrad reads ({BLOB_VERSION}); upgrade regrad"
        )
    if version != BLOB_VERSION:
        raise CorruptBlobError(f"blob version {version} is not a valid version")
    if codec_id >= len(CODECS):
        raise BankFormatError(
            f"unknown codec id {codec_id} (this regrad knows 0..{len(CODECS) - 1}: "
            f"{', '.join(CODECS)}); the blob is corrupt or was written by a newer regrad"
        )
    codec = CODECS[codec_id]
    if flags != 0:
        raise CorruptBlobError(f"blob flags are {flags:#04x}; no flag is defined in blob version 1")
    if codec in GROUPED_CODECS:  # format 1.1: int4, int8g, int4s
        if not 2 <= group_size <= 65536 or group_size % 2:
            raise CorruptBlobError(f"{codec} group size {group_size} is not an even number in [2, 65536]")
    elif group_size != 0:
        raise CorruptBlobError(f"group size is {group_size} for codec {codec}; it must be 0")
    if n_tensors > payload_len:  # each tensor takes at least its ndim byte
        raise CorruptBlobError(f"{n_tensors} tensors cannot fit in a {payload_len}-byte payload")
    check_expansion(payload_len, len(blob) - HEADER_SIZE)
    return BlobHeader(version, codec, n_tensors, group_size, payload_len)


def _decompress(frame: memoryview, payload_len: int) -> bytes:
    try:
        params = zstandard.get_frame_parameters(bytes(frame[:18]))  # 18 = max frame header size
    except zstandard.ZstdError as e:
        raise CorruptBlobError(f"payload is not a zstd frame: {e}") from None
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise CorruptBlobError("zstd frame does not declare its content size; format 1 requires it")
    if params.content_size != payload_len:
        raise CorruptBlobError(
            f"zstd frame declares {params.content_size} bytes, the header says {payload_len}"
        )
    if not params.has_checksum:
        raise CorruptBlobError("zstd frame has no content checksum; format 1 requires one")
    # The writer knows the content size, so zstd never needs a window larger than the payload;
    # capping it stops a damaged window descriptor from making zstd reserve up to 128 MiB.
    max_window = 1 << max(10, payload_len.bit_length())
    # One call into a buffer of exactly content_size bytes (already checked against the caps):
    # zstd stops with an error when the frame would write past it, or leaves data after it.
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=max_window)
        out = dctx.decompress(bytes(frame), max_output_size=payload_len, read_across_frames=False,
                              allow_extra_data=False)
    except zstandard.ZstdError as e:
        msg = str(e)
        if "unused data" in msg:
            raise CorruptBlobError("blob has bytes after the end of its zstd frame") from None
        if "full frame" in msg:
            raise CorruptBlobError("blob is truncated: the zstd frame does not end") from None
        raise CorruptBlobError(f"payload does not decompress: {e}") from None
    if len(out) != payload_len:
        raise CorruptBlobError(f"payload is {len(out)} bytes, the header says {payload_len}")
    return out


def decode_blob(blob: bytes, layout: Sequence[TensorSpec] | None = None) -> list[np.ndarray]:
    """Decode a blob into float32 arrays; with ``layout``, also check every shape against it.

    Raises ``BankFormatError`` (``CorruptBlobError`` for damage) on any malformed input, and only
    that: an arithmetic or allocation failure on a hostile blob is reported the same way.
    """
    try:
        return _decode_blob(blob, layout)
    except BankFormatError:
        raise
    except MemoryError:
        raise CorruptBlobError("blob does not fit in memory: refused") from None
    except (OverflowError, ValueError, TypeError, struct.error) as e:
        raise CorruptBlobError(f"blob cannot be decoded: {type(e).__name__}: {e}") from None


def _decode_blob(blob: bytes, layout: Sequence[TensorSpec] | None) -> list[np.ndarray]:
    header = read_header(blob)
    specs = None
    if layout is not None:
        specs = coerce_layout(layout)
        if header.n_tensors != len(specs):
            raise CorruptBlobError(f"blob holds {header.n_tensors} tensors, the layout has {len(specs)}")
        expected = payload_size(specs, CodecSpec(header.codec, 3, header.group_size or 64))
        if expected != header.payload_len:
            raise CorruptBlobError(
                f"blob does not match the layout: its payload is {header.payload_len} bytes, the "
                f"layout implies {expected} (different shapes, or a damaged header)"
            )
    payload = _decompress(memoryview(blob)[HEADER_SIZE:], header.payload_len)

    sections: list[tuple[tuple[int, ...], int]] = []  # (shape, offset of its sections)
    pos = 0
    n = len(payload)
    for i in range(header.n_tensors):
        if pos >= n:
            raise CorruptBlobError(f"payload ends before tensor {i}")
        ndim = payload[pos]
        pos += 1
        if ndim > MAX_NDIM:
            raise CorruptBlobError(f"tensor {i} has {ndim} dimensions, at most {MAX_NDIM} allowed")
        if pos + 4 * ndim > n:
            raise CorruptBlobError(f"payload ends inside the shape of tensor {i}")
        shape = struct.unpack_from(f"<{ndim}I", payload, pos)
        pos += 4 * ndim
        if specs is not None and shape != specs[i].shape:
            raise CorruptBlobError(
                f"tensor {i} ({specs[i].name}) has shape {shape}, the layout says {specs[i].shape}"
            )
        size = section_size(shape, header.codec, header.group_size)
        if pos + size > n:
            raise CorruptBlobError(
                f"tensor {i} of shape {shape} needs {size} bytes, only {n - pos} remain"
            )
        sections.append((shape, pos))
        pos += size
    if pos != n:
        raise CorruptBlobError(f"payload has {n - pos} bytes after its last tensor")

    sizes = [math.prod(shape) for shape, _ in sections]
    flat = None
    if header.codec in ("int4", "int4s"):
        try:
            flat = decode_int4_many(payload, [(off, m) for (_, off), m in zip(sections, sizes)],
                                    header.codec, header.group_size)
        except CorruptBlobError:
            flat = None  # decoded tensor by tensor below, for a message that names the tensor
    if flat is None:
        flat = np.empty(sum(sizes), dtype=np.float32)
        start = 0
        for i, ((shape, off), m) in enumerate(zip(sections, sizes)):
            try:
                flat[start:start + m] = decode_values(payload, off, shape, header.codec, header.group_size).reshape(-1)
            except CorruptBlobError as e:
                raise CorruptBlobError(f"tensor {i}: {e}") from None
            start += m
    # One flat float32 row, every tensor a view of it (pipeline.steps_from_rows uses the row).
    out, start = DecodedRow(), 0
    for (shape, _), m in zip(sections, sizes):
        out.append(flat[start:start + m].reshape(shape))
        start += m
    out.flat = flat
    return out


class DecodedRow(list):
    """The decoded tensors of one blob (a list of float32 arrays, layout order); ``flat`` is
    the one contiguous float32 buffer they are views of, every value in order."""

    flat: np.ndarray


def blob_info(blob: bytes) -> dict:
    """Header fields of a blob (codec, group size, tensor count, payload size) without decoding."""
    h = read_header(blob)
    return {
        "blob_version": h.blob_version,
        "codec": h.codec,
        "group_size": h.group_size,
        "n_tensors": h.n_tensors,
        "payload_len": h.payload_len,
        "blob_len": len(blob),
    }


