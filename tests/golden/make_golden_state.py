"""Write the golden workspace config and learner checkpoint of the *current* formats. Run once per
new format version, into a new folder; never regenerate an existing one (tests/test_versions.py).

    python tests/golden/make_golden_state.py

Writes, next to this script:
* ``workspace_v1_0/regrad.toml``: a workspace config of format 1.0 with non-default values;
* ``learner_v1_1/``: a learner checkpoint of format 1.1 for the tiny random GPT-2 of
  regrad_cli/lm/fakes.py (Conv1D targets) chosen by [lora] target_patterns.

The older ones were written by the code of commit d9ed61e (before versioning):
``workspace_v0/regrad.toml`` (the defaults then) and ``learner_v1_0/`` (the tiny Llama of
tests/conftest.py, 4 layers, ``Learner.for_model(m).init_(seed=3, b_std=0.05, alpha_init=0.5)``,
saved with ``extra={"combine": "score"}``; checkpoint id ea3d9e43...).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from regrad_cli.workspace.config import RegradConfig, Workspace  # noqa: E402
from regrad_cli.lm.fakes import tiny_model  # noqa: E402
from regrad_cli.learner.lora import Learner  # noqa: E402

PATTERNS = [r"transformer\.h\.[23]\.mlp\.c_fc", r"transformer\.h\.3\.attn\.c_proj"]


def main() -> None:
    ws_dir = HERE / "workspace_v1_0"
    ck_dir = HERE / "learner_v1_1"
    for d in (ws_dir, ck_dir):
        if d.exists():
            raise SystemExit(f"{d} exists: golden files are never regenerated")
    cfg = RegradConfig()
    cfg.model.id = "fake:gpt2"
    cfg.embedder.id = "fake:hash-16"
    cfg.lora.rank = 4
    cfg.lora.target_patterns = list(PATTERNS)
    cfg.learner.checkpoint = "init"
    cfg.query.top_k = 2
    Workspace(ws_dir, cfg).save()
    learner = Learner.for_model(tiny_model("gpt2"), rank=4, target_patterns=PATTERNS)
    cid = learner.init_(seed=5, b_std=0.05, alpha_init=0.5).save(ck_dir, extra={"combine": "mean"})
    print(ws_dir / "regrad.toml")
    print(ck_dir, cid)


if __name__ == "__main__":
    main()
