"""Write the format-1.2 golden bank. Run once; never regenerate (docs/bank-format.md, 10).

    python tests/golden/make_golden_v1_2.py

Writes, next to this script:
* ``bank_v1_2/``: a format 1.2 bank (codec int8g, group 4, ``row_norm`` "doc") of 3 documents
  that stores two tensors of a three-tensor learner and records the third as ``omitted``; each
  row is N(g) = g / ||g|| with the norm over all three tensors, as build-bank writes it;
* ``expected_v1_2.npz``: the original (normalised) tensors and embeddings and the values format
  1.2 decodes from each bank row. A later reader must decode them bit for bit.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from bank_format import BankMeta, CodecSpec, GradientBank, TensorSpec  # noqa: E402

SEED = 20260301
LAYOUT = [
    TensorSpec("layers.0.q_proj.lora_A", (2, 8)),
    TensorSpec("layers.0.q_proj.lora_B", (8, 2)),
    TensorSpec("layers.0.scale", ()),
]
STORED = [LAYOUT[1], LAYOUT[2]]  # the bank leaves lora_A out
DOCS = ["doc-alpha", "doc-beta", "doc-gamma"]
DIM = 6


def make_meta() -> BankMeta:
    return BankMeta(
        format_version="1.2",
        producer="regrad 0.1.0 (golden 1.2)",
        model={"id": "golden/tiny-model", "weights_sha256": "0" * 64},
        learner={"checkpoint_id": "golden-ckpt-3", "lora": {"r": 2, "alpha": 4, "targets": ["q_proj"]}},
        embedder={"id": "golden/fake-embedder", "dim": DIM},
        layout=STORED,
        omitted=[LAYOUT[0]],
        codec=CodecSpec("int8g", zstd_level=3, group_size=4),
        created_at="2026-03-01T00:00:00Z",
        row_norm="doc",
    )


def normalised_tensors(rng: np.random.Generator) -> list[np.ndarray]:
    out = [rng.standard_normal(t.shape).astype(np.float32) for t in LAYOUT]
    norm = np.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in out))
    return [(t / norm).astype(np.float32) for t in out]


def main() -> None:
    bank_dir = HERE / "bank_v1_2"
    if bank_dir.exists():
        raise SystemExit(f"{bank_dir} exists: golden files are never regenerated")
    rng = np.random.default_rng(SEED)
    expected: dict[str, np.ndarray] = {}
    docs = {d: normalised_tensors(rng) for d in DOCS}
    embeddings = rng.standard_normal((len(DOCS), DIM)).astype(np.float32)
    expected["embeddings"] = embeddings
    bank = GradientBank.create(bank_dir, make_meta())
    bank.append([
        {"doc_id": d, "content_hash": f"sha256:{i:064d}", "source": "golden.jsonl",
         "embedding": embeddings[i], "tensors": docs[d][1:], "n_tokens": 20 + i}
        for i, d in enumerate(DOCS)
    ])
    for d, decoded in bank.fetch(DOCS).items():
        for j, (orig, dec) in enumerate(zip(docs[d][1:], decoded)):
            expected[f"orig/{d}/{j}"] = orig
            expected[f"bank/{d}/{j}"] = dec
    (bank_dir / ".regrad-bank.lock").unlink(missing_ok=True)
    shutil.rmtree(HERE / "__pycache__", ignore_errors=True)
    np.savez(HERE / "expected_v1_2.npz", **expected)
    print(f"wrote {bank_dir} and expected_v1_2.npz")


if __name__ == "__main__":
    main()
