"""The loaded pieces of a workspace: language model + attached learner, and their fingerprints.

Also resolves which learner checkpoint to use: the shipped meta-trained checkpoint for the
bundled model ("bundled"), an untrained seeded init ("init"), or a checkpoint directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path

from regrad_cli import __version__
from regrad_cli.workspace.config import BUNDLED_CHECKPOINT, BUNDLED_MODEL, LoraConfig, Workspace
from regrad_cli.errors import RegradError
from regrad_cli.learner.lora import Learner, target_shapes
from regrad_cli.lm.models import LoadedModel, load_language_model

log = logging.getLogger("regrad")

# Step sizes below this contribute nothing measurable: their tensors are not stored in banks.
NEGLIGIBLE_ALPHA = 1e-8


def bundled_checkpoint_dir() -> Path:
    return Path(str(files("regrad_cli") / "data" / "checkpoints" / "smollm2-135m-instruct"))


def init_learner(model, lora_cfg: LoraConfig | None = None, **overrides) -> Learner:
    """An untrained learner for ``model``, shaped and seeded by ``lora_cfg`` ([lora] of
    regrad.toml; its defaults when None), each keyword overriding the field of the same name.

    The one place a fresh learner is made: ``resolve_learner`` ('init') and meta-training both
    call it, so they share every default (targets by model family, alpha_init, seed...). An
    override of None leaves the field as it is."""
    cfg = replace(lora_cfg or LoraConfig(), **{k: v for k, v in overrides.items() if v is not None})
    auto = lambda v: None if v == "auto" else v  # noqa: E731  (by model size: lora.default_lora)
    learner = Learner.for_model(model, rank=auto(cfg.rank), lora_alpha=auto(cfg.lora_alpha), layers=cfg.layers,
                                modules=cfg.modules, per_element_alpha=cfg.per_element_alpha,
                                target_patterns=cfg.target_patterns)
    return learner.init_(seed=cfg.seed, b_std=cfg.init_b_std, alpha_init=cfg.alpha_init)


def resolve_learner(ws_or_none: Workspace | None, model, model_id: str, checkpoint: str | None) -> Learner:
    """The learner for ``model``: from ``checkpoint`` ('bundled', 'init' or a directory)."""
    lcfg = ws_or_none.config.lora if ws_or_none else None
    choice = checkpoint or (ws_or_none.config.learner.checkpoint if ws_or_none else BUNDLED_CHECKPOINT)
    if choice == BUNDLED_CHECKPOINT:
        path = bundled_checkpoint_dir()
        if model_id == BUNDLED_MODEL and (path / "learner.json").exists():
            return Learner.load(path)
        log.info("no shipped checkpoint for %s: using the untrained init", model_id)
        choice = "init"
    if choice == "init":
        return init_learner(model, lcfg)
    from regrad_cli.workspace.banks import checkpoint_dir

    path = checkpoint_dir(choice)  # a meta-train output directory means its best/
    if not (path / "learner.json").exists():
        raise RegradError(f"no learner checkpoint at {path} (expected learner.json and learner.safetensors)")
    return Learner.load(path)


@dataclass
class Engine:
    """A language model with its learner attached."""

    lm: LoadedModel
    learner: Learner
    model_id: str

    @property
    def model(self):
        return self.lm.model

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @classmethod
    def load(cls, ws: Workspace | None = None, *, model_id: str | None = None, checkpoint: str | None = None,
             device: str | None = None, dtype: str | None = None) -> "Engine":
        mcfg = ws.config.model if ws else None
        model_id = model_id or (mcfg.id if mcfg else BUNDLED_MODEL)
        lm = load_language_model(model_id, device=device or (mcfg.device if mcfg else "cpu"),
                                 dtype=dtype or (mcfg.dtype if mcfg else "float32"))
        learner = resolve_learner(ws, lm.model, model_id, checkpoint)
        try:
            expected = target_shapes(lm.model, learner.spec)
        except RegradError as exc:
            raise RegradError(f"learner checkpoint does not fit model {model_id} (was it trained for "
                              f"another model?): {exc}") from None
        if expected != dict(learner.layout):
            raise RegradError(
                f"learner checkpoint does not fit model {model_id}: its LoRA tensors have other "
                "names or shapes (was it trained for another model?)"
            )
        learner.to(next(lm.model.parameters()).device)
        learner.attach(lm.model)
        return cls(lm, learner, model_id)

    def stored_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Layout of what a bank stores and a query applies: the tensors whose share of the step
        energy is above the learner's recorded threshold (every tensor without a record; never
        one whose step size is negligible). The one place that decides it (regrad_cli.learner.energy)."""
        from regrad_cli.learner.energy import select_tensors

        keep = set(select_tensors(self.learner))
        return [(n, s) for n, s in self.learner.layout if n in keep]

    def fingerprints(self, embedder_fp: dict) -> dict:
        return {"model": dict(self.lm.fingerprint), "learner": self.learner.fingerprint(),
                "embedder": dict(embedder_fp)}


def producer() -> str:
    return f"regrad {__version__}"
