"""Write the format-1.1 golden files. Run once; never regenerate (docs/bank-format.md, 10).

    python tests/golden/make_golden_v1_1.py

Writes, next to this script:
* ``bank_v1_1/``: a format 1.1 bank (codec int4s, group 4) of 3 documents that stores two tensors
  of a three-tensor learner and records the third as ``omitted``;
* ``blobs_v1_1/<codec>.bin``: one blob per codec new in 1.1 (int8g, int4s; group 6, so that groups
  are padded), of the same tensors as the 1.0 blobs;
* ``expected_v1_1.npz``: the original tensors and embeddings and the values format 1.1 decodes
  from each blob and bank row. A later reader must decode them bit for bit.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from bank_format import BankMeta, CodecSpec, GradientBank, TensorSpec, decode_blob, encode_blob  # noqa: E402

SEED = 20251201
LAYOUT = [
    TensorSpec("layers.0.q_proj.lora_A", (2, 8)),
    TensorSpec("layers.0.q_proj.lora_B", (8, 2)),
    TensorSpec("layers.0.scale", ()),
]
STORED = [LAYOUT[1], LAYOUT[2]]  # the bank leaves lora_A out
NEW_CODECS = ("int8g", "int4s")
DOCS = ["doc-alpha", "doc-beta", "doc-gamma"]
DIM = 6


def make_meta() -> BankMeta:
    return BankMeta(
        format_version="1.1",
        producer="regrad 0.1.0 (golden 1.1)",
        model={"id": "golden/tiny-model", "weights_sha256": "0" * 64},
        learner={"checkpoint_id": "golden-ckpt-2", "lora": {"r": 2, "alpha": 4, "targets": ["q_proj"]}},
        embedder={"id": "golden/fake-embedder", "dim": DIM},
        layout=STORED,
        omitted=[LAYOUT[0]],
        codec=CodecSpec("int4s", zstd_level=3, group_size=4),
        created_at="2025-12-01T00:00:00Z",
    )


def tensors_for(rng: np.random.Generator) -> list[np.ndarray]:
    out = [rng.standard_normal(t.shape).astype(np.float32) for t in LAYOUT]
    out[0][1] = 0.0  # a zero row: must decode to exact zeros
    out[1][:2] *= 1e-3  # small groups next to large ones: the int4s group codes spread out
    return out


def main() -> None:
    rng = np.random.default_rng(SEED)
    expected: dict[str, np.ndarray] = {}
    docs = {d: tensors_for(rng) for d in DOCS}
    embeddings = rng.standard_normal((len(DOCS), DIM)).astype(np.float32)
    expected["embeddings"] = embeddings

    bank_dir = HERE / "bank_v1_1"
    shutil.rmtree(bank_dir, ignore_errors=True)
    bank = GradientBank.create(bank_dir, make_meta())
    bank.append([
        {"doc_id": d, "content_hash": f"sha256:{i:064d}", "source": "golden.jsonl",
         "embedding": embeddings[i], "tensors": docs[d][1:], "n_tokens": 10 + i}
        for i, d in enumerate(DOCS)
    ])
    for d, decoded in bank.fetch(DOCS).items():
        for j, (orig, dec) in enumerate(zip(docs[d][1:], decoded)):
            expected[f"orig/{d}/{j}"] = orig
            expected[f"bank/{d}/{j}"] = dec
    (bank_dir / ".regrad-bank.lock").unlink(missing_ok=True)

    blob_dir = HERE / "blobs_v1_1"
    shutil.rmtree(blob_dir, ignore_errors=True)
    blob_dir.mkdir()
    for codec in NEW_CODECS:
        blob = encode_blob(docs[DOCS[0]], LAYOUT, CodecSpec(codec, zstd_level=3, group_size=6))
        (blob_dir / f"{codec}.bin").write_bytes(blob)
        for j, dec in enumerate(decode_blob(blob, LAYOUT)):
            expected[f"blob/{codec}/{j}"] = dec
            expected[f"blob_orig/{codec}/{j}"] = docs[DOCS[0]][j]
    np.savez(HERE / "expected_v1_1.npz", **expected)
    print(f"wrote {bank_dir}, {blob_dir} and expected_v1_1.npz")


if __name__ == "__main__":
    main()
