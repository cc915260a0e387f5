"""The continual-pretraining (CPT) baseline of `regrad eval`.

CPT writes the corpus into the weights: next-token training on the raw document text, exactly the
loss a document gradient is taken of (lm.tokens: encode_documents + per_sample_nll), but on the base
weights themselves and for several epochs. It trains a deep COPY of the base model, so the model
that ReGrad and the other systems use is never touched. In continual mode one copy and one AdamW
state carry over from batch to batch, which is what makes drift and forgetting accumulate.

Defaults (chosen for a 135M model on a CPU and a corpus of tens to hundreds of passages):
full fine-tuning of every base parameter (``params="all"``; ``"mlp"`` trains only the MLP
projections, where the LoRA learner lives), AdamW lr 5e-5, no weight decay, constant rate,
3 epochs over the documents in seeded random order, 4 documents per step (accumulated one document
per forward pass, which keeps the activations of a full backward small), documents truncated to 256
tokens (as in the bank), gradient-norm clip 1.0, in the model's dtype, dropout off (eval mode).
The loss of a step is the mean over its documents of each document's mean next-token NLL.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from regrad_cli.errors import ConfigError
from regrad_cli.lm.tokens import encode_documents, per_sample_nll
from regrad_cli.learner.lora import LoRALinear

log = logging.getLogger("regrad")

PARAM_SETS = ("all", "mlp")


@dataclass
class CPTConfig:
    lr: float = 5e-5
    epochs: int = 3
    batch_size: int = 4
    params: str = "all"
    max_tokens: int = 256
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    micro_batch: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def base_copy(model, learner=None):
    """A deep copy of ``model`` whose LoRA side paths are switched off: the bare base model.

    The copy keeps the wrapper modules (so its state_dict names match the original's and
    weights_sha256 compares like with like), but they point at nothing and the learner does not
    know them, so nothing the learner does reaches the copy."""
    if learner is not None:
        with learner.disabled():
            clone = copy.deepcopy(model)
    else:
        clone = copy.deepcopy(model)
    for m in clone.modules():
        if isinstance(m, LoRALinear):
            m.set_active(None, None)
    clone.eval()
    return clone


class ContinualPretrainer:
    """One model copy under CPT; ``train(texts)`` may be called once per arriving batch."""

    def __init__(self, model, tokenizer, cfg: CPTConfig, learner=None):
        if cfg.params not in PARAM_SETS:
            raise ConfigError(f"unknown CPT parameter set {cfg.params!r} (use {', '.join(PARAM_SETS)})")
        if cfg.epochs < 0 or cfg.batch_size < 1 or cfg.lr <= 0:
            raise ConfigError("CPT needs epochs >= 0, batch size >= 1 and a positive learning rate")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model = base_copy(model, learner)
        self.trainable = []
        seen = set()
        mlp = None
        if cfg.params == "mlp":
            # The family's MLP projections (targets.py), in every layer: a name test such as
            # ".mlp." would miss families whose MLP is not a submodule called mlp (OPT's fc1/fc2).
            from regrad_cli.learner.targets import find_targets, n_layers

            mlp = tuple(m + "." for m in find_targets(self.model, list(range(n_layers(self.model))), []))
        for name, p in self.model.named_parameters():
            take = mlp is None or name.startswith(mlp)
            p.requires_grad_(take)
            if take and id(p) not in seen:  # tied embeddings appear once
                seen.add(id(p))
                self.trainable.append(p)
        self.n_trainable = sum(p.numel() for p in self.trainable)
        self.opt = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps = 0
        self.rounds = 0

    def train(self, texts: Sequence[str], progress: Callable[[int, int], None] | None = None) -> dict:
        """Next-token training on ``texts`` for cfg.epochs epochs; returns loss and timing stats."""
        cfg = self.cfg
        texts = [t for t in texts if t.strip()]
        rng = random.Random(cfg.seed * 1_000_003 + self.rounds)
        self.rounds += 1
        per_epoch = (len(texts) + cfg.batch_size - 1) // cfg.batch_size
        total = per_epoch * cfg.epochs
        losses: list[list[float]] = []
        device = next(self.model.parameters()).device
        t0 = time.time()
        done = 0
        for _ in range(cfg.epochs):
            order = list(texts)
            rng.shuffle(order)
            epoch_losses = []
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start:start + cfg.batch_size]
                self.opt.zero_grad(set_to_none=True)
                loss = 0.0
                for m in range(0, len(batch), max(1, cfg.micro_batch)):
                    enc = encode_documents(self.tokenizer, batch[m:m + max(1, cfg.micro_batch)], cfg.max_tokens)
                    with torch.enable_grad():
                        part = per_sample_nll(self.model, enc.input_ids.to(device),
                                              enc.attention_mask.to(device)).sum() / len(batch)
                        part.backward()
                    loss += float(part.detach())
                if cfg.clip:
                    torch.nn.utils.clip_grad_norm_(self.trainable, cfg.clip)
                self.opt.step()
                self.steps += 1
                done += 1
                epoch_losses.append(loss)
                if progress:
                    progress(done, total)
            losses.append(epoch_losses)
        self.opt.zero_grad(set_to_none=True)
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        stats = {"documents": len(texts), "steps": done, "total_steps": self.steps,
                 "loss_first_epoch": mean(losses[0]) if losses else None,
                 "loss_last_epoch": mean(losses[-1]) if losses else None,
                 "train_s": round(time.time() - t0, 2)}
        log.info("CPT round %d: %s", self.rounds, stats)
        return stats
