"""Write the format-1.0 golden files. Run once; never regenerate (docs/bank-format.md, 10).

    python tests/golden/make_golden_bank.py

Writes, next to this script:
* ``bank_v1_0/``: a bank (codec int8) with 3 documents of a tiny 3-tensor layout;
* ``blobs_v1_0/<codec>.bin``: one blob per codec, of the same tensors;
* ``expected.npz``: the original tensors and embeddings, and the values format 1.0 decodes
  from each blob and from each bank row. A later reader must decode them bit for bit.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from bank_format import CODECS, BankMeta, CodecSpec, GradientBank, TensorSpec, decode_blob, encode_blob  # noqa: E402

SEED = 20250101
LAYOUT = [
    TensorSpec("layers.0.q_proj.lora_A", (2, 8)),
    TensorSpec("layers.0.q_proj.lora_B", (8, 2)),
    TensorSpec("layers.0.scale", ()),
]
DOCS = ["doc-alpha", "doc-beta", "doc-gamma"]
DIM = 6


def make_meta() -> BankMeta:
    return BankMeta(
        producer="regrad 0.1.0 (golden)",
        model={"id": "golden/tiny-model", "weights_sha256": "0" * 64},
        learner={"checkpoint_id": "golden-ckpt-1", "lora": {"r": 2, "alpha": 4, "targets": ["q_proj"]}},
        embedder={"id": "golden/fake-embedder", "dim": DIM},
        layout=LAYOUT,
        codec=CodecSpec("int8", zstd_level=3, group_size=64),
        created_at="2025-01-01T00:00:00Z",
    )


def tensors_for(rng: np.random.Generator) -> list[np.ndarray]:
    out = [rng.standard_normal(t.shape).astype(np.float32) for t in LAYOUT]
    out[0][1] = 0.0  # a zero row: must decode to exact zeros
    return out


def main() -> None:
    rng = np.random.default_rng(SEED)
    expected: dict[str, np.ndarray] = {}
    docs = {d: tensors_for(rng) for d in DOCS}
    embeddings = rng.standard_normal((len(DOCS), DIM)).astype(np.float32)
    expected["embeddings"] = embeddings

    bank_dir = HERE / "bank_v1_0"
    shutil.rmtree(bank_dir, ignore_errors=True)
    bank = GradientBank.create(bank_dir, make_meta())
    bank.append([
        {"doc_id": d, "content_hash": f"sha256:{i:064d}", "source": "golden.jsonl",
         "embedding": embeddings[i], "tensors": docs[d], "n_tokens": 10 + i}
        for i, d in enumerate(DOCS)
    ])
    for d, decoded in bank.fetch(DOCS).items():
        for j, (orig, dec) in enumerate(zip(docs[d], decoded)):
            expected[f"orig/{d}/{j}"] = orig
            expected[f"bank/{d}/{j}"] = dec
    (bank_dir / ".regrad-bank.lock").unlink(missing_ok=True)

    blob_dir = HERE / "blobs_v1_0"
    shutil.rmtree(blob_dir, ignore_errors=True)
    blob_dir.mkdir()
    for codec in CODECS:
        blob = encode_blob(docs[DOCS[0]], LAYOUT, CodecSpec(codec, zstd_level=3, group_size=4))
        (blob_dir / f"{codec}.bin").write_bytes(blob)
        for j, dec in enumerate(decode_blob(blob, LAYOUT)):
            expected[f"blob/{codec}/{j}"] = dec
    np.savez(HERE / "expected.npz", **expected)
    print(f"wrote {bank_dir}, {blob_dir} and expected.npz")


if __name__ == "__main__":
    main()
