"""Format 1.0 golden files (tests/golden/, written once by make_golden_bank.py) still read the same."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bank_format import CODECS, GradientBank, decode_blob

GOLDEN = Path(__file__).resolve().parent / "golden"
DOCS = ["doc-alpha", "doc-beta", "doc-gamma"]


@pytest.fixture(scope="module")
def expected():
    with np.load(GOLDEN / "expected.npz") as f:
        return dict(f)


@pytest.fixture
def bank(tmp_path):
    # A copy: nothing a test does may touch the committed files.
    shutil.copytree(GOLDEN / "bank_v1_0", tmp_path / "bank")
    return GradientBank.open(tmp_path / "bank", read_only=True)


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


@pytest.mark.parametrize("codec", CODECS)
def test_golden_blobs_decode_bit_for_bit(codec, expected):
    out = decode_blob((GOLDEN / "blobs_v1_0" / f"{codec}.bin").read_bytes())
    assert len(out) == 3
    for j, arr in enumerate(out):
        assert np.array_equal(arr, expected[f"blob/{codec}/{j}"]), j
