"""Golden files of formats 1.0 and 1.1 (tests/golden/, each written once) still read the same."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bank_format import CODECS, GradientBank, decode_blob

GOLDEN = Path(__file__).resolve().parent / "golden"
DOCS = ["doc-alpha", "doc-beta", "doc-gamma"]


def _expected(name: str) -> dict:
    with np.load(GOLDEN / name) as f:
        return dict(f)


def _golden_bank(tmp_path, name: str) -> GradientBank:
    # A copy: nothing a test does may touch the committed files.
    shutil.copytree(GOLDEN / name, tmp_path / "bank")
    return GradientBank.open(tmp_path / "bank", read_only=True)


@pytest.fixture(scope="module")
def expected():
    return _expected("expected.npz")


@pytest.fixture
def bank(tmp_path):
    return _golden_bank(tmp_path, "bank_v1_0")


def test_golden_bank_metadata(bank):
    m = bank.meta
    assert m.format_version == "1.0" and m.codec.name == "int8"
    assert m.model["id"] == "golden/tiny-model" and m.embedder == {"id": "golden/fake-embedder", "dim": 6}
    assert [(t.name, t.shape) for t in m.layout] == [
        ("layers.0.q_proj.lora_A", (2, 8)), ("layers.0.q_proj.lora_B", (8, 2)), ("layers.0.scale", ()),
    ]
    GradientBank.open(bank.path, expect={"learner": {"checkpoint_id": "golden-ckpt-1"}, "codec": {"name": "int8"}})


def test_golden_bank_decodes_bit_for_bit(bank, expected):
    report = bank.verify()
    assert report["rows"] == report["ok"] == 3 and not report["bad"]
    got = bank.fetch(DOCS)
    for d in DOCS:
        for j, arr in enumerate(got[d]):
            assert np.array_equal(arr, expected[f"bank/{d}/{j}"]), (d, j)
            # and the values are close to what was encoded
            orig = expected[f"orig/{d}/{j}"]
            assert np.allclose(arr, orig, atol=np.abs(orig).max() / 200 + 1e-7)
    assert np.array_equal(got["doc-alpha"][0][1], np.zeros(8, np.float32))  # the zero row


def test_golden_bank_search(bank, expected):
    for i, d in enumerate(DOCS):
        assert bank.search(expected["embeddings"][i], 1)[0]["doc_id"] == d


@pytest.mark.parametrize("codec", CODECS[:4])  # the codecs of format 1.0
def test_golden_blobs_decode_bit_for_bit(codec, expected):
    out = decode_blob((GOLDEN / "blobs_v1_0" / f"{codec}.bin").read_bytes())
    assert len(out) == 3
    for j, arr in enumerate(out):
        assert np.array_equal(arr, expected[f"blob/{codec}/{j}"]), j


# Format 1.1 --------------------------------------------------------------------------------------
STORED_1_1 = [("layers.0.q_proj.lora_B", (8, 2)), ("layers.0.scale", ())]


@pytest.fixture(scope="module")
def expected_1_1():
    return _expected("expected_v1_1.npz")


@pytest.fixture
def bank_1_1(tmp_path):
    return _golden_bank(tmp_path, "bank_v1_1")


def test_golden_1_1_bank_metadata(bank_1_1):
    m = bank_1_1.meta
    assert m.format_version == "1.1" and m.codec.name == "int4s" and m.codec.group_size == 4
    assert [(t.name, t.shape) for t in m.layout] == STORED_1_1
    assert [(t.name, t.shape) for t in m.omitted] == [("layers.0.q_proj.lora_A", (2, 8))]
    s = bank_1_1.stats()
    assert s["fp32_bytes_per_doc"] == 4 * (16 + 16 + 1)  # the whole gradient, omitted tensor included
    assert s["layout"]["omitted_values"] == 16
    assert s["ratio_vs_fp32"] > s["ratio_vs_fp32_stored"] > 0


def test_golden_1_1_bank_decodes_bit_for_bit(bank_1_1, expected_1_1):
    report = bank_1_1.verify()
    assert report["rows"] == report["ok"] == 3 and not report["bad"]
    got = bank_1_1.fetch(DOCS)
    for d in DOCS:
        assert len(got[d]) == len(STORED_1_1)
        for j, arr in enumerate(got[d]):
            assert np.array_equal(arr, expected_1_1[f"bank/{d}/{j}"]), (d, j)
            orig = expected_1_1[f"orig/{d}/{j}"]
            # int4s: error at most half a step of the group scale, itself at most 1/16 above the
            # group's absmax, which is at most the tensor's absmax
            assert np.all(np.abs(arr - orig) <= np.abs(orig).max() * (17 / 16) / 14 + 1e-7)


@pytest.mark.parametrize("codec", ["int8g", "int4s"])
def test_golden_1_1_blobs_decode_bit_for_bit(codec, expected_1_1):
    out = decode_blob((GOLDEN / "blobs_v1_1" / f"{codec}.bin").read_bytes())
    assert len(out) == 3
    for j, arr in enumerate(out):
        assert np.array_equal(arr, expected_1_1[f"blob/{codec}/{j}"]), j


def _as_reader_1_0(monkeypatch):
    """Make bank_format behave as a reader that knows only format 1.0 and its four codecs."""
    import bank_format.schema as schema

    monkeypatch.setattr(schema, "FORMAT_VERSION", "1.0")
    monkeypatch.setattr(schema, "FORMAT_MINOR", 0)
    monkeypatch.setattr(schema, "CODECS", CODECS[:4])


def test_reader_1_0_refuses_a_1_1_codec_naming_the_version(monkeypatch, tmp_path):
    from bank_format import BankFormatError

    shutil.copytree(GOLDEN / "bank_v1_1", tmp_path / "bank")
    _as_reader_1_0(monkeypatch)
    with pytest.raises(BankFormatError, match=r"bank format 1\.1 uses codec 'int4s'.*\(bank format 1\.0.*upgrade regrad"):
        GradientBank.open(tmp_path / "bank", read_only=True)


def test_reader_1_0_reads_a_newer_bank_with_a_1_0_codec_read_only(monkeypatch, tmp_path):
    from bank_format import BankFormatError, BankMeta, CodecSpec, TensorSpec

    meta = BankMeta(producer="test", model={"id": "m"}, learner={"checkpoint_id": "c"},
                    embedder={"id": "e", "dim": 2}, layout=[TensorSpec("b", (4, 2))],
                    omitted=[TensorSpec("a", (2, 3))], codec=CodecSpec("int4", 3, 4))
    bank = GradientBank.create(tmp_path / "bank", meta)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    row = {"doc_id": "d", "content_hash": "h", "embedding": np.ones(2, np.float32), "tensors": [x], "n_tokens": 3}
    bank.append([row])
    want = bank.fetch(["d"])["d"][0]
    _as_reader_1_0(monkeypatch)
    old = GradientBank.open(tmp_path / "bank", read_only=True)
    assert old.meta.format_version == "1.2" and [t.name for t in old.meta.layout] == ["b"]
    assert np.array_equal(old.fetch(["d"])["d"][0], want)
    writer = GradientBank.open(tmp_path / "bank")
    assert writer.read_only
    with pytest.raises(BankFormatError, match="can be read but not written"):
        writer.append([{**row, "doc_id": "e"}])


def test_reader_1_1_reads_a_1_2_row_norm_bank_read_only(monkeypatch, tmp_path):
    """A 1.1 reader ignores row_norm (a 1.2 key) and opens the bank read-only; the rows read the
    same. (Normalising such rows again over the stored tensors gives exactly what a 1.1 bank of
    raw rows gave: the normalisation is scale-free.)"""
    import bank_format.schema as schema
    from bank_format import BankFormatError, BankMeta, CodecSpec, TensorSpec

    meta = BankMeta(producer="test", model={"id": "m"}, learner={"checkpoint_id": "c"},
                    embedder={"id": "e", "dim": 2}, layout=[TensorSpec("b", (4, 2))],
                    omitted=[TensorSpec("a", (2, 3))], codec=CodecSpec("int4s", 3, 4), row_norm="doc")
    bank = GradientBank.create(tmp_path / "bank", meta)
    x = np.arange(8, dtype=np.float32).reshape(4, 2) / 10
    row = {"doc_id": "d", "content_hash": "h", "embedding": np.ones(2, np.float32), "tensors": [x], "n_tokens": 3}
    bank.append([row])
    want = bank.fetch(["d"])["d"][0]
    monkeypatch.setattr(schema, "FORMAT_VERSION", "1.1")
    monkeypatch.setattr(schema, "FORMAT_MINOR", 1)
    old = GradientBank.open(tmp_path / "bank", read_only=True)
    assert old.meta.format_version == "1.2" and old.meta.is_newer_minor
    assert np.array_equal(old.fetch(["d"])["d"][0], want)
    with pytest.raises(BankFormatError, match="can be read but not written"):
        GradientBank.open(tmp_path / "bank").append([{**row, "doc_id": "e"}])


# Format 1.2 (the current format) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def expected_1_2():
    return _expected("expected_v1_2.npz")


@pytest.fixture
def bank_1_2(tmp_path):
    return _golden_bank(tmp_path, "bank_v1_2")


def test_golden_1_2_bank_metadata(bank_1_2):
    from bank_format import FORMAT_VERSION

    m = bank_1_2.meta
    assert m.format_version == FORMAT_VERSION == "1.2", "a new format version needs its own golden bank"
    assert m.codec.name == "int8g" and m.codec.group_size == 4 and m.row_norm == "doc"
    assert [(t.name, t.shape) for t in m.layout] == STORED_1_1
    assert [(t.name, t.shape) for t in m.omitted] == [("layers.0.q_proj.lora_A", (2, 8))]
    GradientBank.open(bank_1_2.path, expect={"learner": {"checkpoint_id": "golden-ckpt-3"}})


def test_golden_1_2_bank_decodes_bit_for_bit(bank_1_2, expected_1_2):
    report = bank_1_2.verify()
    assert report["rows"] == report["ok"] == 3 and not report["bad"]
    got = bank_1_2.fetch(DOCS)
    for i, d in enumerate(DOCS):
        assert bank_1_2.search(expected_1_2["embeddings"][i], 1)[0]["doc_id"] == d
        for j, arr in enumerate(got[d]):
            assert np.array_equal(arr, expected_1_2[f"bank/{d}/{j}"]), (d, j)
            orig = expected_1_2[f"orig/{d}/{j}"]
            assert np.allclose(arr, orig, atol=np.abs(orig).max() / 200 + 1e-7)
        # row_norm "doc": the stored part of a unit-norm gradient (lora_A, left out, holds the rest)
        assert 0 < sum(float(np.sum(a.astype(np.float64) ** 2)) for a in got[d]) < 1
