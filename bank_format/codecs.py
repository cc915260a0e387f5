"""The value codecs, as pure numpy maths (docs/bank-format.md, section 6).

Each codec turns one float32 tensor into its byte sections (scales, then values) and back. The
blob container (header, shapes, zstd) lives in ``blob.py``; nothing here knows about it.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import BankFormatError, CorruptBlobError

# Dequantisation runs in float64 (exact q*scale, one rounding for the division) but in chunks of
# about this many values, so a large tensor needs no float64 copy of itself.
_CHUNK_VALUES = 1 << 20
# Values per float64 buffer in dequantisation (512 KiB: stays in cache).
_DEQ_CHUNK = 1 << 16

_INT8_QMAX = 127
_INT4_QMAX = 7


def int8_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """(n_rows, row_len) of the int8 codec: a row is the last axis; a 0-d tensor is one row."""
    numel = math.prod(shape)
    row_len = shape[-1] if shape else 1
    return (numel // row_len if numel else 0), row_len


def int4_groups(numel: int, group_size: int) -> int:
    return -(-numel // group_size)


def section_size(shape: tuple[int, ...], codec: str, group_size: int) -> int:
    """Bytes of the scales and values sections of one tensor."""
    numel = math.prod(shape)
    if codec == "fp32":
        return 4 * numel
    if codec == "fp16":
        return 2 * numel
    if codec == "int8":
        return 4 * int8_rows(shape)[0] + numel
    if codec == "int4":
        n_groups = int4_groups(numel, group_size)
        return 4 * n_groups + n_groups * group_size // 2
    if codec == "int8g":
        n_groups = int8g_groups(shape, group_size)[0]
        return 4 * n_groups + n_groups * group_size
    if codec == "int4s":
        n_groups = int4_groups(numel, group_size)
        return 4 + n_groups + n_groups * group_size // 2
    raise BankFormatError(f"unknown codec {codec!r}")


def long_axis(shape: tuple[int, ...]) -> int:
    """The axis int8g groups along: the longest (the first of equals); 0 for a 0-d tensor."""
    return max(range(len(shape)), key=lambda i: (shape[i], -i)) if shape else 0


def int8g_groups(shape: tuple[int, ...], group_size: int) -> tuple[int, int, int]:
    """(n_groups, n_lines, groups_per_line) of int8g: each line along the long axis is cut into
    groups of G values (the last padded with zeros)."""
    numel = math.prod(shape)
    length = shape[long_axis(shape)] if shape else 1
    n_lines = numel // length if numel else 0
    per_line = -(-length // group_size)
    return n_lines * per_line, n_lines, per_line


def _quantize(x2d: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row absmax quantisation of a float32 (rows, L) array -> (int8 q, float32 scales)."""
    scales = np.abs(x2d).max(axis=1) if x2d.size else np.zeros(x2d.shape[0], np.float32)
    q = np.empty(x2d.shape, dtype=np.int8)
    step = max(1, _CHUNK_VALUES // max(1, x2d.shape[1]))
    for i in range(0, x2d.shape[0], step):
        s = scales[i : i + step].astype(np.float64)
        # A zero row divides by 1 instead: its values are all zero, so q is 0 with no 0/0 NaN.
        safe = np.where(s > 0, s, 1.0)[:, None]
        r = np.rint(x2d[i : i + step].astype(np.float64) / safe * qmax)
        np.clip(r, -qmax, qmax, out=r)
        q[i : i + step] = r
    return q, scales.astype(np.float32)


def _dequantize(q2d: np.ndarray, scales: np.ndarray, qmax: int) -> np.ndarray:
    """float32(float64(q) x float64(scale) / qmax) per value, through one reused float64 buffer
    of about ``_DEQ_CHUNK`` values with in-place products instead of float64 temporaries (the
    same bits; part of the fetch + decode time cut in docs/performance.md "Query latency")."""
    out = np.empty(q2d.shape, dtype=np.float32)
    step = max(1, _DEQ_CHUNK // max(1, q2d.shape[1]))
    s64 = scales.astype(np.float64, copy=False)[:, None]
    buf = np.empty((min(step, q2d.shape[0]), q2d.shape[1]), dtype=np.float64)
    for i in range(0, q2d.shape[0], step):
        b = buf[: min(step, q2d.shape[0] - i)]
        np.multiply(q2d[i : i + step], s64[i : i + step], out=b)
        np.divide(b, qmax, out=b)
        out[i : i + step] = b
    return out


def encode_values(x: np.ndarray, codec: str, group_size: int) -> list[bytes]:
    """Byte sections (scales, values) of one finite float32 tensor under ``codec``."""
    if not np.isfinite(x).all():
        raise BankFormatError("tensor has non-finite values (NaN or inf); refusing to store it")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if codec == "fp32":
        return [x.astype("<f4", copy=False).tobytes()]
    if codec == "fp16":
        with np.errstate(over="ignore"):
            h = x.astype("<f2")
        if not np.isfinite(h).all():
            raise BankFormatError(
                "tensor has values beyond float16 range (|x| > 65504); use codec fp32 or int8"
            )
        return [h.tobytes()]
    if codec == "int8":
        n_rows, row_len = int8_rows(x.shape)
        q, scales = _quantize(x.reshape(n_rows, row_len if n_rows else 0), _INT8_QMAX)
        return [scales.astype("<f4").tobytes(), q.tobytes()]
    if codec == "int4":
        flat = x.reshape(-1)
        n_groups = int4_groups(flat.size, group_size)
        padded = np.zeros(n_groups * group_size, dtype=np.float32)
        padded[: flat.size] = flat
        q, scales = _quantize(padded.reshape(n_groups, group_size), _INT4_QMAX)
        nib = (q.reshape(-1).astype(np.int16) + 8).astype(np.uint8)
        packed = nib[0::2] | (nib[1::2] << 4)
        return [scales.astype("<f4").tobytes(), packed.tobytes()]
    if codec == "int8g":
        lines = _lines(x)
        n_groups, n_lines, per_line = int8g_groups(x.shape, group_size)
        padded = np.zeros((n_lines, per_line * group_size), dtype=np.float32)
        padded[:, : lines.shape[1]] = lines
        q, scales = _quantize(padded.reshape(n_groups, group_size), _INT8_QMAX)
        return [scales.astype("<f4").tobytes(), q.tobytes()]
    if codec == "int4s":
        flat = x.reshape(-1)
        n_groups = int4_groups(flat.size, group_size)
        padded = np.zeros(n_groups * group_size, dtype=np.float32)
        padded[: flat.size] = flat
        groups = padded.reshape(n_groups, group_size)
        absmax = np.abs(groups).max(axis=1) if n_groups else np.zeros(0, np.float32)
        tensor_scale = np.float32(absmax.max()) if n_groups else np.float32(0)
        codes = _e4m4_codes(absmax, tensor_scale)
        q = _quantize_with(groups, tensor_scale.astype(np.float64) * E4M4[codes], _INT4_QMAX)
        nib = (q.reshape(-1).astype(np.int16) + 8).astype(np.uint8)
        packed = nib[0::2] | (nib[1::2] << 4)
        return [np.array([tensor_scale], "<f4").tobytes() + codes.tobytes(), packed.tobytes()]
    raise BankFormatError(f"unknown codec {codec!r}")


def _lines(x: np.ndarray) -> np.ndarray:
    """The tensor as (n_lines, length): the long axis last, other axes in C order."""
    if x.ndim == 0:
        return x.reshape(1, 1)
    ax = long_axis(x.shape)
    moved = np.moveaxis(x, ax, -1)
    return moved.reshape(-1, x.shape[ax]) if x.size else np.zeros((0, x.shape[ax]), x.dtype)


def _unlines(lines: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if not shape:
        return lines.reshape(())
    ax = long_axis(shape)
    moved_shape = tuple(d for i, d in enumerate(shape) if i != ax) + (shape[ax],)
    return np.ascontiguousarray(np.moveaxis(lines.reshape(moved_shape), -1, ax))


# int4s group scales: one byte c = (e << 4) | m stands for the factor (16 + m) / 16 * 2^-e of the
# tensor's scale (e, m in 0..15: 1 down to 2^-15 in steps of at most 1/16). Exact in float64, so
# every reader decodes the same bits.
E4M4 = np.array([(16 + (c & 15)) / 16 * 2.0 ** -(c >> 4) for c in range(256)], dtype=np.float64)


def _e4m4_codes(absmax: np.ndarray, tensor_scale) -> np.ndarray:
    """The smallest factor >= absmax / tensor_scale for every group (so nothing clips), as codes."""
    s = float(tensor_scale)
    if s == 0:
        return np.full(absmax.shape, 0xF0, dtype=np.uint8)
    r = absmax.astype(np.float64) / s
    # factor(c) is decreasing in e and increasing in m; search the sorted table of all factors.
    order = np.argsort(E4M4, kind="stable")
    sorted_f = E4M4[order]
    idx = np.searchsorted(sorted_f, r, side="left")  # first factor >= r
    idx = np.clip(idx, 0, len(sorted_f) - 1)
    codes = order[idx].astype(np.uint8)
    # Float rounding of r may leave absmax a hair above factor * s: step up until it is covered.
    low = E4M4[codes] * s < absmax
    while low.any():
        idx[low] = np.minimum(idx[low] + 1, len(sorted_f) - 1)
        codes = order[idx].astype(np.uint8)
        low = (E4M4[codes] * s < absmax) & (idx < len(sorted_f) - 1)
    return codes


def _quantize_with(x2d: np.ndarray, scales: np.ndarray, qmax: int) -> np.ndarray:
    """q = rint(x / scale * qmax) per row with given float64 scales, clipped; 0 where scale is 0."""
    q = np.empty(x2d.shape, dtype=np.int8)
    step = max(1, _CHUNK_VALUES // max(1, x2d.shape[1]))
    for i in range(0, x2d.shape[0], step):
        s = scales[i : i + step]
        safe = np.where(s > 0, s, 1.0)[:, None]
        r = np.rint(x2d[i : i + step].astype(np.float64) / safe * qmax)
        np.clip(r, -qmax, qmax, out=r)
        q[i : i + step] = r
    return q


def _finite(arr: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise CorruptBlobError(f"{what} holds non-finite values")
    return arr


def _scales(buf, offset: int, n: int) -> np.ndarray:
    s = np.frombuffer(buf, dtype="<f4", count=n, offset=offset).astype(np.float32)
    _finite(s, "scales")
    if (s < 0).any():
        raise CorruptBlobError("scales hold negative values")
    return s


def decode_values(buf, offset: int, shape: tuple[int, ...], codec: str, group_size: int) -> np.ndarray:
    """Decode one tensor whose sections start at ``offset`` of ``buf`` (sizes already checked)."""
    numel = math.prod(shape)
    if codec == "fp32":
        v = np.frombuffer(buf, dtype="<f4", count=numel, offset=offset).astype(np.float32)
        return _finite(v, "fp32 values").reshape(shape)
    if codec == "fp16":
        v = np.frombuffer(buf, dtype="<f2", count=numel, offset=offset).astype(np.float32)
        return _finite(v, "fp16 values").reshape(shape)
    if codec == "int8":
        n_rows, row_len = int8_rows(shape)
        scales = _scales(buf, offset, n_rows)
        q = np.frombuffer(buf, dtype=np.int8, count=numel, offset=offset + 4 * n_rows)
        if (q == -128).any():
            raise CorruptBlobError("int8 values hold -128, which the codec never writes")
        return _dequantize(q.reshape(n_rows, row_len if n_rows else 0), scales, _INT8_QMAX).reshape(shape)
    if codec == "int4":
        n_groups = int4_groups(numel, group_size)
        scales = _scales(buf, offset, n_groups)
        nib = _nibbles(buf, offset + 4 * n_groups, n_groups * group_size // 2, numel)
        return _dequantize_int4(nib, scales.astype(np.float64), group_size, numel).reshape(shape)
    if codec == "int8g":
        n_groups, n_lines, per_line = int8g_groups(shape, group_size)
        scales = _scales(buf, offset, n_groups)
        q = np.frombuffer(buf, dtype=np.int8, count=n_groups * group_size, offset=offset + 4 * n_groups)
        if (q == -128).any():
            raise CorruptBlobError("int8g values hold -128, which the codec never writes")
        q = q.reshape(n_lines, per_line * group_size)
        length = shape[long_axis(shape)] if shape else 1
        if (q[:, length:] != 0).any():
            raise CorruptBlobError("int8g padding is not zero")
        out = _dequantize(q.reshape(n_groups, group_size), scales, _INT8_QMAX)
        return _unlines(out.reshape(n_lines, per_line * group_size)[:, :length], shape)
    if codec == "int4s":
        n_groups = int4_groups(numel, group_size)
        tensor_scale = _scales(buf, offset, 1)[0]
        codes = np.frombuffer(buf, dtype=np.uint8, count=n_groups, offset=offset + 4)
        nib = _nibbles(buf, offset + 4 + n_groups, n_groups * group_size // 2, numel)
        scales = np.float64(tensor_scale) * E4M4[codes]
        return _dequantize_int4(nib, scales, group_size, numel).reshape(shape)
    raise BankFormatError(f"unknown codec {codec!r}")


def _nibbles(buf, offset: int, n_bytes: int, numel: int) -> np.ndarray:
    """The nibbles of an int4 values section, checked (no nibble 0, padding all 8)."""
    packed = np.frombuffer(buf, dtype=np.uint8, count=n_bytes, offset=offset)
    nib = np.empty(2 * n_bytes, dtype=np.uint8)
    nib[0::2] = packed & 0x0F
    nib[1::2] = packed >> 4
    if (nib == 0).any():
        raise CorruptBlobError("int4 values hold nibble 0 (-8), which the codec never writes")
    if (nib[numel:] != 8).any():
        raise CorruptBlobError("int4 padding is not zero")
    return nib


def _dequantize_int4(nib: np.ndarray, scales: np.ndarray, group_size: int, numel: int) -> np.ndarray:
    # Measured: strided unpacking plus one float64 product per value is faster here than a
    # lookup table or a per-group table of the 16 possible results with a gather.
    q = nib.view(np.int8) - np.int8(8)
    out = _dequantize(q.reshape(scales.shape[0], group_size), scales, _INT4_QMAX)
    return out.reshape(-1)[:numel]


def decode_int4_many(buf, sections: list[tuple[int, int]], codec: str, group_size: int) -> np.ndarray | None:
    """Every tensor of an int4 or int4s payload at once, into one flat float32 array (the
    tensors' values back to back), or None when a tensor's length is not a whole number of
    groups (then each tensor is decoded alone, dropping its padding).

    ``sections``: (offset of the tensor's sections, numel) per tensor, sizes already checked.
    The same checks and the same float32(float64(q) x float64(scale) / 7) per value as
    ``decode_values``, done once over the whole row: one nibble unpack and one dequantisation
    instead of a few dozen numpy calls per tensor. A damaged section raises CorruptBlobError
    without naming the tensor; the caller then decodes tensor by tensor for the message."""
    if any(numel % group_size for _, numel in sections):
        return None
    scales, packed = [], []
    for offset, numel in sections:
        n_groups = numel // group_size
        if codec == "int4":
            scales.append(_scales(buf, offset, n_groups))
            start = offset + 4 * n_groups
        else:  # int4s: a tensor scale, then one code byte per group
            tensor_scale = _scales(buf, offset, 1)[0]
            codes = np.frombuffer(buf, dtype=np.uint8, count=n_groups, offset=offset + 4)
            scales.append(np.float64(tensor_scale) * E4M4[codes])
            start = offset + 4 + n_groups
        packed.append(np.frombuffer(buf, dtype=np.uint8, count=numel // 2, offset=start))
    if not sections:
        return np.zeros(0, dtype=np.float32)
    all_packed = np.concatenate(packed)
    numel = 2 * all_packed.size
    nib = _nibbles(all_packed, 0, all_packed.size, numel)
    return _dequantize_int4(nib, np.concatenate(scales).astype(np.float64), group_size, numel)
