"""Codecs and blobs: round trips, fidelity, and fuzzing that only BankFormatError ever escapes."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bank_format import (
    CODECS,
    BankFormatError,
    BankMeta,
    CodecSpec,
    CorruptBlobError,
    TensorSpec,
    blob_info,
    decode_blob,
    encode_blob,
)
from bank_format.blob import HEADER_SIZE, MAGIC

# BANK_FORMAT_FUZZ_EXAMPLES=5000 for a long fuzzing run; the default keeps the suite fast.
_N = int(os.environ.get("BANK_FORMAT_FUZZ_EXAMPLES", "250"))
FAST = settings(max_examples=max(60, _N // 4), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=_N, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# Mostly ordinary magnitudes, but extremes and subnormals too.
values = st.one_of(finite32, st.floats(-10, 10, width=32), st.sampled_from([0.0, -0.0, 3.4e38, -3.4e38, 1e-45]))


def _bound_ok(x: np.ndarray, y: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    # Half a quantisation step, plus float32 rounding of the result and the subnormal floor.
    step = scale.astype(np.float64) / (2 * qmax)
    err = np.abs(x.astype(np.float64) - y.astype(np.float64))
    return err <= step * (1 + 1e-6) + np.abs(x.astype(np.float64)) * 2.0**-23 + 2.0**-148


@FAST
@given(data=st.data(), codec=st.sampled_from(CODECS), group=st.sampled_from([2, 4, 6, 64]))
def test_round_trip_all_codecs(data, codec, group):
    layout = [TensorSpec(f"t{i}", data.draw(shapes)) for i in range(data.draw(st.integers(1, 3)))]
    tensors = [data.draw(hnp.arrays(np.float32, t.shape, elements=values)) for t in layout]
    spec = CodecSpec(codec, zstd_level=data.draw(st.sampled_from([1, 3, 19])), group_size=group)
    if codec == "fp16":
        with np.errstate(over="ignore"):
            overflow = any(not np.isfinite(t.astype(np.float16)).all() for t in tensors)
        if overflow:
            with pytest.raises(BankFormatError, match="float16 range"):
                encode_blob(tensors, layout, spec)
            return
    blob = encode_blob(tensors, layout, spec)
    assert blob_info(blob)["codec"] == codec
    for out in (decode_blob(blob), decode_blob(blob, layout)):
        assert len(out) == len(tensors)
        for x, y, t in zip(tensors, out, layout):
            assert y.dtype == np.float32 and y.shape == t.shape
            if codec == "fp32":
                assert np.array_equal(x, y)
            elif codec == "fp16":
                assert np.array_equal(x.astype(np.float16).astype(np.float32), y)
            elif codec == "int8" and x.size:
                rows = x.reshape(-1, x.shape[-1] if x.ndim else 1)
                scale = np.abs(rows).max(axis=1, keepdims=True) * np.ones_like(rows)
                ok = _bound_ok(rows, y.reshape(rows.shape), scale, 127)
                assert ok.all(), f"int8 error too large at {np.argwhere(~ok)[:3]}"
                assert (y.reshape(rows.shape)[scale[:, 0] == 0] == 0).all()
            elif codec == "int4" and x.size:
                flat = x.reshape(-1)
                pad = np.zeros(-(-flat.size // group) * group, np.float32)
                pad[: flat.size] = flat
                groups = pad.reshape(-1, group)
                scale = (np.abs(groups).max(axis=1, keepdims=True) * np.ones_like(groups)).reshape(-1)[: flat.size]
                ok = _bound_ok(flat, y.reshape(-1), scale, 7)
                assert ok.all(), f"int4 error too large at {np.argwhere(~ok)[:3]}"
            elif codec == "int8g" and x.size:
                _check_int8g(x, y, group)
            elif codec == "int4s" and x.size:
                _check_int4s(x, y, group)


def _check_int8g(x: np.ndarray, y: np.ndarray, group: int) -> None:
    """Every value within half a step of its group's scale, groups cut along the long axis."""
    from bank_format.codecs import long_axis

    if x.ndim == 0:
        lx, ly = x.reshape(1, 1), y.reshape(1, 1)
    else:
        ax = long_axis(x.shape)
        lx = np.moveaxis(x, ax, -1).reshape(-1, x.shape[ax])
        ly = np.moveaxis(y, ax, -1).reshape(lx.shape)
    n = -(-lx.shape[1] // group) * group
    px = np.zeros((lx.shape[0], n), np.float32)
    px[:, : lx.shape[1]] = lx
    scale = np.repeat(np.abs(px.reshape(lx.shape[0], -1, group)).max(axis=2), group, axis=1)[:, : lx.shape[1]]
    ok = _bound_ok(lx, ly, scale, 127)
    assert ok.all(), f"int8g error too large at {np.argwhere(~ok)[:3]}"
    assert (ly[scale == 0] == 0).all()


def _check_int4s(x: np.ndarray, y: np.ndarray, group: int) -> None:
    """Within half a step of a group scale that is at most 1/16 above the group's absmax (or, for
    groups below 2^-15 of the tensor's absmax, at most 2^-15 of it)."""
    flat = x.reshape(-1).astype(np.float64)
    pad = np.zeros(-(-flat.size // group) * group)
    pad[: flat.size] = flat
    absmax = np.abs(pad.reshape(-1, group)).max(axis=1)
    bound = np.maximum(absmax * 17 / 16, np.abs(flat).max() * 2.0**-15)
    scale = np.repeat(bound, group)[: flat.size]
    ok = _bound_ok(flat, y.reshape(-1), scale, 7)
    assert ok.all(), f"int4s error too large at {np.argwhere(~ok)[:3]}"


@pytest.mark.parametrize("codec", CODECS)
def test_zero_tensors_decode_to_exact_zeros(codec):
    layout = [TensorSpec("z", (3, 70)), TensorSpec("s", ())]
    out = decode_blob(encode_blob([np.zeros((3, 70)), np.zeros(())], layout, CodecSpec(codec)), layout)
    assert all(np.array_equal(o, np.zeros(t.shape, np.float32)) for o, t in zip(out, layout))
    assert all(np.isfinite(o).all() for o in out)


@pytest.mark.parametrize("codec,min_cos", [("int8", 0.9999), ("int4", 0.99), ("fp16", 0.999999),
                                           ("int8g", 0.9999), ("int4s", 0.99)])
def test_fidelity_on_gaussian_tensors(codec, min_cos):
    rng = np.random.default_rng(0)
    layout = [TensorSpec("A", (16, 256)), TensorSpec("B", (256, 16)), TensorSpec("C", (1000,))]
    tensors = [rng.standard_normal(t.shape).astype(np.float32) for t in layout]
    out = decode_blob(encode_blob(tensors, layout, CodecSpec(codec, group_size=64)), layout)
    for x, y, t in zip(tensors, out, layout):
        x, y = x.ravel().astype(np.float64), y.ravel().astype(np.float64)
        cos = float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
        rel = float(np.linalg.norm(x - y) / np.linalg.norm(x))
        assert cos >= min_cos, f"{codec} {t.name}: cosine {cos:.6f} < {min_cos}, relative L2 {rel:.4g}"


def test_encoder_refuses_bad_input():
    layout = [TensorSpec("a", (2, 3))]
    with pytest.raises(BankFormatError, match="non-finite"):
        encode_blob([np.array([[1, np.nan, 0], [0, 0, 0]])], layout, CodecSpec("int8"))
    with pytest.raises(BankFormatError, match="shape"):
        encode_blob([np.zeros((3, 2))], layout, CodecSpec("int8"))
    with pytest.raises(BankFormatError, match="1 tensors|2 tensors"):
        encode_blob([np.zeros((2, 3))] * 2, layout, CodecSpec("int8"))
    with pytest.raises(BankFormatError, match="dtype"):
        encode_blob([np.array([["a"] * 3] * 2)], layout, CodecSpec("int8"))
    with pytest.raises(BankFormatError, match="float16 range"):
        encode_blob([np.full((2, 3), 1e6)], layout, CodecSpec("fp16"))
    with pytest.raises(BankFormatError, match="unknown codec"):
        CodecSpec("int3")
    with pytest.raises(BankFormatError, match="even"):
        CodecSpec("int4", group_size=3)


# -- blob fuzzing ----------------------------------------------------------------------------

_LAYOUT = [TensorSpec("a", (3, 5)), TensorSpec("b", (7,)), TensorSpec("c", ())]
_RNG = np.random.default_rng(1)
_TENSORS = [_RNG.standard_normal(t.shape).astype(np.float32) for t in _LAYOUT]
_VALID = {c: encode_blob(_TENSORS, _LAYOUT, CodecSpec(c, group_size=4)) for c in CODECS}


def _decode_only_bank_errors(blob, layout=None):
    try:
        out = decode_blob(blob, layout)
    except BankFormatError:
        return None
    assert all(isinstance(o, np.ndarray) and o.dtype == np.float32 for o in out)
    return out


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(blob):
    _decode_only_bank_errors(blob)
    _decode_only_bank_errors(blob, _LAYOUT)


@FUZZ
@given(
    version=st.integers(0, 3), codec_id=st.integers(0, 6), flags=st.integers(0, 2),
    n=st.integers(0, 2**32 - 1), group=st.integers(0, 70000), plen=st.integers(0, 2**64 - 1),
    tail=st.binary(max_size=200),
)
def test_fuzz_plausible_headers(version, codec_id, flags, n, group, plen, tail):
    blob = struct.pack("<4sHBBIIQ", MAGIC, version, codec_id, flags, n, group, plen) + tail
    _decode_only_bank_errors(blob)


@FUZZ
@given(codec=st.sampled_from(CODECS), data=st.data())
def test_fuzz_mutated_valid_blobs(codec, data):
    blob = bytearray(_VALID[codec])
    kind = data.draw(st.sampled_from(["flip", "set", "truncate", "insert", "append", "header"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= data.draw(st.integers(1, 255))
    elif kind == "set":
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "insert":
        i = data.draw(st.integers(0, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    elif kind == "append":
        blob += data.draw(st.binary(min_size=1, max_size=8))
    else:
        blob[data.draw(st.integers(4, HEADER_SIZE - 1))] = data.draw(st.integers(0, 255))
    blob = bytes(blob)
    assume(blob != _VALID[codec])
    out = _decode_only_bank_errors(blob, _LAYOUT)
    if out is not None and kind in ("truncate", "insert", "append"):
        pytest.fail(f"{kind} of a valid blob was accepted")
    _decode_only_bank_errors(blob)


def test_specific_malformed_blobs_have_clear_messages():
    good = _VALID["int8"]
    cases = {
        b"": "truncated",
        b"XXXX" + good[4:]: "magic",
        good[:4] + struct.pack("<H", 2) + good[6:]: "newer.*upgrade regrad",
        good[:6] + bytes([9]) + good[7:]: "unknown codec id 9",
        good[:-3]: "truncated|does not|decompress",
        good + b"\x00": "after the end",
    }
    for blob, pattern in cases.items():
        with pytest.raises(BankFormatError, match=pattern):
            decode_blob(blob)
    swapped = [TensorSpec("a", (5, 3)), TensorSpec("b", (7,)), TensorSpec("c", ())]
    with pytest.raises(CorruptBlobError, match="shape"):  # same size: found while parsing
        decode_blob(_VALID["fp32"], swapped)
    with pytest.raises(CorruptBlobError, match="does not match the layout"):  # found from sizes
        decode_blob(good, swapped)
    with pytest.raises(CorruptBlobError) as e:
        decode_blob(good[:-3])
    assert e.value.doc_id is None
    with pytest.raises(BankFormatError):
        decode_blob("not bytes")  # type: ignore[arg-type]


# -- BankMeta ---------------------------------------------------------------------------------

def _meta(**kw) -> BankMeta:
    base = dict(
        producer="regrad 0.1.0", model={"id": "m", "weights_sha256": "ab"},
        learner={"checkpoint_id": "c", "lora": {"r": 4}}, embedder={"id": "e", "dim": 8},
        layout=[TensorSpec("A", (2, 3))], codec=CodecSpec("int4", 5, 32),
        created_at="2025-01-31T12:00:00Z",
    )
    base.update(kw)
    return BankMeta(**base)


def test_meta_round_trip_and_versions():
    m = _meta()
    assert BankMeta.from_json(m.to_json()) == m
    d = json.loads(m.to_json())
    with pytest.raises(BankFormatError, match="newer.*upgrade regrad"):
        BankMeta.from_json(json.dumps({**d, "format_version": "2.0"}))
    with pytest.raises(BankFormatError, match="not a known"):
        BankMeta.from_json(json.dumps({**d, "format_version": "0.9"}))
    newer = BankMeta.from_json(json.dumps({**d, "format_version": "1.7", "new_key": [1],
                                           "codec": {**d["codec"], "new_codec_key": 1}}))
    assert newer.is_newer_minor and newer.format_version == "1.7"
    with pytest.raises(BankFormatError, match="unknown keys"):
        BankMeta.from_json(json.dumps({**d, "new_key": [1]}))
    with pytest.raises(BankFormatError, match="unknown codec 'int3'.*upgrade regrad"):
        BankMeta.from_json(json.dumps({**d, "codec": {**d["codec"], "name": "int3"}}))
    with pytest.raises(BankFormatError, match=r"bank format 1\.3 uses codec 'int3'.*upgrade regrad"):
        BankMeta.from_json(json.dumps({**d, "format_version": "1.3", "codec": {**d["codec"], "name": "int3"}}))


def test_meta_1_1_omitted_and_codecs():
    m = _meta(omitted=[TensorSpec("B", (3, 2))], codec=CodecSpec("int4s", 3, 64))
    assert m.format_version == "1.2" and m.full_layout_values == 12  # what this regrad writes
    assert _meta(format_version="1.1", omitted=[TensorSpec("B", (3, 2))], codec=CodecSpec("int4s", 3, 64))
    d = json.loads(m.to_json())
    assert d["omitted"] == [{"name": "B", "shape": [3, 2]}]
    assert BankMeta.from_json(m.to_json()) == m
    assert "omitted" not in json.loads(_meta().to_json())  # written only when non-empty
    with pytest.raises(BankFormatError, match="1.1 key"):
        BankMeta.from_json(json.dumps({**d, "format_version": "1.0", "codec": {**d["codec"], "name": "int4"}}))
    with pytest.raises(BankFormatError, match="cannot hold codec 'int4s'"):
        _meta(format_version="1.0", codec=CodecSpec("int4s", 3, 64))
    with pytest.raises(BankFormatError, match="also in the layout"):
        _meta(omitted=[TensorSpec("A", (2, 3))])
    with pytest.raises(BankFormatError, match="only when non-empty"):
        BankMeta.from_json(json.dumps({**d, "omitted": []}))
    assert _meta(format_version="1.0").to_json()  # a 1.0 bank's metadata stays 1.0


def test_meta_1_2_row_norm():
    """row_norm (format 1.2): written only when set, one known value, refused in older formats."""
    m = _meta(omitted=[TensorSpec("B", (3, 2))], row_norm="doc")
    d = json.loads(m.to_json())
    assert d["row_norm"] == "doc" and BankMeta.from_json(m.to_json()) == m
    assert "row_norm" not in json.loads(_meta().to_json())
    assert BankMeta.from_json(_meta().to_json()).row_norm is None
    with pytest.raises(BankFormatError, match="1.2 key"):
        BankMeta.from_json(json.dumps({**d, "format_version": "1.1"}))
    with pytest.raises(BankFormatError, match="cannot hold row_norm: needs format 1.2"):
        _meta(format_version="1.1", row_norm="doc")
    with pytest.raises(BankFormatError, match="row_norm must be one of doc"):
        _meta(row_norm="tensor")
    with pytest.raises(BankFormatError, match="only when set"):
        BankMeta.from_json(json.dumps({**d, "row_norm": None}))
    # A newer minor may define more values; this reader cannot apply them and says so.
    with pytest.raises(BankFormatError, match="row_norm must be one of"):
        BankMeta.from_json(json.dumps({**d, "format_version": "1.5", "row_norm": "tensor"}))


@FAST
@given(absmax=hnp.arrays(np.float32, st.integers(1, 20),
                         elements=finite32.map(abs)))
def test_int4s_group_codes_cover_absmax_tightly(absmax):
    from bank_format.codecs import E4M4, _e4m4_codes

    s = np.float32(absmax.max())
    codes = _e4m4_codes(absmax, s)
    scales = np.float64(s) * E4M4[codes]
    assert (scales >= absmax).all()  # nothing clips
    if s > 0:
        assert (scales <= np.maximum(absmax.astype(np.float64) * 17 / 16, np.float64(s) * 2.0**-15)).all()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200), json_values.map(json.dumps)))
def test_fuzz_meta_random(text):
    try:
        BankMeta.from_json(text)
    except BankFormatError:
        pass


@FUZZ
@given(data=st.data())
def test_fuzz_meta_mutated(data):
    d = json.loads(_meta().to_json())
    target = d
    path = data.draw(st.sampled_from([[], ["codec"], ["embedder"], ["model"], ["layout", 0]]))
    for p in path:
        target = target[p]
    key = data.draw(st.sampled_from(sorted(target) + ["extra"]))
    action = data.draw(st.sampled_from(["replace", "delete"]))
    if action == "delete":
        target.pop(key, None)
    else:
        target[key] = data.draw(json_values)
    text = json.dumps(d)
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(text) - 1))
        text = text[:i] + data.draw(st.characters()) + text[i + 1:]
    try:
        m = BankMeta.from_json(text)
    except BankFormatError:
        return
    assert BankMeta.from_json(m.to_json()) == m


# -- the whole-row int4 decode ----------------------------------------------------------------

def _per_tensor(blob: bytes, layout) -> list[np.ndarray]:
    """Every tensor decoded alone with decode_values: the reference the vectorised path must equal."""
    from bank_format.blob import _decompress, read_header
    from bank_format.codecs import decode_values, section_size

    h = read_header(blob)
    payload = _decompress(memoryview(blob)[HEADER_SIZE:], h.payload_len)
    out, pos = [], 0
    for t in layout:
        ndim = payload[pos]
        pos += 1 + 4 * ndim
        out.append(decode_values(payload, pos, t.shape, h.codec, h.group_size))
        pos += section_size(t.shape, h.codec, h.group_size)
    return out


@pytest.mark.parametrize("codec", ["int4", "int4s"])
@pytest.mark.parametrize("shapes", [[(8, 16), (16, 8), (4,)], [(3, 5), (8, 8)], [(), (0, 4), (64,)]])
def test_whole_row_decode_equals_per_tensor_decode_bit_for_bit(codec, shapes):
    """Rows whose tensors are whole groups decode in one pass (bank_format.codecs.decode_int4_many),
    the others tensor by tensor; either way each value is the per-tensor decode's, bit for bit,
    and every tensor is a view of one flat float32 row (``flat``)."""
    rng = np.random.default_rng(len(shapes))
    layout = [TensorSpec(f"t{i}", s) for i, s in enumerate(shapes)]
    tensors = [(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 3)).astype(np.float32) for s in shapes]
    blob = encode_blob(tensors, layout, CodecSpec(codec, group_size=4))
    got = decode_blob(blob, layout)
    want = _per_tensor(blob, layout)
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape == w.shape and g.tobytes() == w.tobytes()
    assert got.flat.dtype == np.float32 and got.flat.size == sum(int(np.prod(s)) for s in shapes)
    assert np.concatenate([g.reshape(-1) for g in got]).tobytes() == got.flat.tobytes()


def test_whole_row_decode_names_the_damaged_tensor():
    """A nibble 0 in the second tensor: the error still names tensor 1, as the per-tensor decode did."""
    import zstandard

    from bank_format.blob import read_header

    layout = [TensorSpec("a", (8, 8)), TensorSpec("b", (8, 8))]
    tensors = [np.ones((8, 8), np.float32), np.ones((8, 8), np.float32)]
    blob = encode_blob(tensors, layout, CodecSpec("int4", zstd_level=1, group_size=8))
    h = read_header(blob)
    payload = bytearray(zstandard.ZstdDecompressor().decompress(blob[HEADER_SIZE:], max_output_size=h.payload_len))
    payload[-1] = 0x08  # the last byte of tensor 1: its high nibble becomes 0 (-8), never written
    frame = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(bytes(payload))
    # The header is unchanged: the payload keeps its length.
    with pytest.raises(CorruptBlobError, match=r"tensor 1: int4 values hold nibble 0"):
        decode_blob(bytes(blob[:HEADER_SIZE]) + frame, layout)
