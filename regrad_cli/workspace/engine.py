"""The loaded pieces of a workspace: language model + attached learner, and their fingerprints.

Which learner checkpoint is meant is decided in regrad_cli.workspace.checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from regrad_cli import __version__
from regrad_cli.errors import RegradError
from regrad_cli.learner.lora import Learner
from regrad_cli.lm.models import LoadedModel, load_language_model
from regrad_cli.workspace.checkpoints import resolve_learner
from regrad_cli.workspace.config import BUNDLED_MODEL, Workspace


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
            learner.check_fits(lm.model)
        except RegradError as exc:
            raise RegradError(f"learner checkpoint does not fit model {model_id}: {exc}") from None
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
