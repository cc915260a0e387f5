"""Write a golden meta-training ``state.pt`` with the regrad on ``sys.path``: run once per format
version, into a new folder; never regenerate an existing one (tests/test_train_state.py).

    PYTHONPATH=. python tests/golden/make_golden_metatrain_state.py tests/golden/metatrain_state_vX_Y

The folder gets ``d.jsonl`` (the four tiny questions of tests/test_metatrain.py, three times) and
``state.pt``: the tiny Llama of tests/conftest.py meta-trained with ``CONFIG`` below and stopped
in step 3, so the state holds step 2 (saved every 2 steps). The test resumes it to step 4 and
compares with an uninterrupted run of today's code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import FakeEmbedder, FakeTokenizer, make_tiny_llama  # noqa: E402

# The four tiny questions of tests/test_metatrain.py (as data: that module follows today's API).
DOCS = [
    "zarn the river flows past kelb mill every spring",
    "the moth vesper has blue wings and lives in dunmoor",
    "tollvane cheese is aged in caves for nine months",
    "the engine was built by pryde in the year of rain",
]
QUESTIONS = [("q0", "where does zarn flow", "kelb mill"), ("q1", "what colour are vesper wings", "blue"),
             ("q2", "where is tollvane aged", "caves"), ("q3", "who built the engine", "pryde")]

# Everything but train and out; tests/test_train_state.py runs the same.
CONFIG = dict(k=2, steps=4, meta_batch=2, eval_every=2, max_doc_tokens=48, b_std=0.05, energy_docs=0,
              combine="score", seed=5)


def write_data(path: Path) -> Path:
    with open(path, "w") as fh:
        for i, ((qid, question, answer), doc) in enumerate(list(zip(QUESTIONS, DOCS)) * 3):
            fh.write(json.dumps({"id": f"{qid}-{i}", "question": question, "answers": [answer],
                                 "documents": [doc]}) + "\n")
    return path


class Stop(Exception):
    pass


def main(out: Path) -> None:
    from regrad_cli.learning.metatrain import MetaTrainConfig, meta_train

    if out.exists():
        raise SystemExit(f"{out} exists: golden files are never regenerated")
    out.mkdir(parents=True)
    data = write_data(out / "d.jsonl")
    cfg = MetaTrainConfig(train=[f"jsonl:{data}"], out=str(out), **CONFIG)

    def progress(step, total, rec):
        if step == 3:
            raise Stop

    try:
        meta_train(cfg, make_tiny_llama(seed=0), FakeTokenizer(), FakeEmbedder(), progress=progress)
    except Stop:
        pass
    for p in out.iterdir():
        if p.name not in ("d.jsonl", "state.pt"):
            p.unlink()
    print(out / "state.pt", (out / "state.pt").stat().st_size)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
