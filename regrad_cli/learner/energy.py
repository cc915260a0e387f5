"""Which LoRA tensors the step uses: each tensor's share of the step energy.

The step is phi' = phi - gamma * alpha (.) sum_d w_d N(g_d). Over a sample of documents, tensor t's
*energy* is sum_d ||alpha_t (.) N(g_d)_t||^2, and its *share* the energy over the total of all
tensors. A tensor whose share is tiny moves phi' by nothing measurable, so a bank need not store
it: measured on the shipped SmolLM2 learner, the LoRA B tensors carry almost all the energy and the
A tensors almost none, although A is 42 % of the values (docs/performance.md).

The learner records the result in its meta (``learner.json``, key ``stored_tensors``):

    {"threshold": 0.0, "energy": {name: share, ...}, "grad_share": {name: share, ...},
     "n_docs": 36, "max_tokens": 256, "norm": "none"}

and ``select_tensors`` keeps the tensors whose share is above the threshold;
``Engine.stored_tensors`` asks it, so ``build-bank`` stores and ``query`` applies exactly those.
A learner without a record keeps every tensor with a non-negligible step size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from regrad_cli.errors import RegradError
from regrad_cli.files import atomic_write_text

META_KEY = "stored_tensors"
# Per-tensor share of the step energy at or below which a tensor is not stored. Chosen by
# measurement (benchmarks/tensor_subset.py, docs/performance.md): on the shipped learner even
# 1e-4 (the 44 A tensors with 0.08 % of the energy left out, 41 % fewer values) changed 5 of 108
# demo answers against the full step, more than the 2 % allowed, so the default stores every
# tensor with any energy; `regrad learner energy --threshold 1e-4 --write` opts in.
DEFAULT_THRESHOLD = 0.0
# Step sizes below this contribute nothing measurable (kept from the alpha-only rule).
NEGLIGIBLE_ALPHA = 1e-8


def _doc_scale(grads: dict, norm: str, n_docs: int):
    """Per-document factor of N(g) (adapt.normalise): 1 / ||g_d|| for 'doc', 1 for 'none'; None
    for 'tensor' (a factor per tensor, applied by the caller)."""
    import torch

    from regrad_cli.learner import adapt

    adapt.check_norm(norm)
    if norm == "none":
        return torch.ones(n_docs, dtype=torch.float64)
    if norm == "doc":
        return adapt.doc_factors(grads)
    return None


def tensor_energy(engine_or_model, learner=None, tokenizer=None, texts: Sequence[str] = (),
                  max_tokens: int = 256, *, batch_size: int = 4, norm: str | None = None,
                  with_grad_share: bool = False):
    """Each tensor's share of the step energy over ``texts``: {name: share}, shares sum to 1.

    ``engine_or_model`` is an ``Engine`` (its learner and tokenizer are used when not given) or a
    model with ``learner`` attached. ``norm`` is the step's gradient normalisation (default: the
    one the learner was trained with, ``learner.meta['norm']``, else none). With
    ``with_grad_share`` also returns the shares of the raw gradient (no alpha) as a second dict.
    """
    from regrad_cli.learner.gradients import grouped_gradients
    from regrad_cli.lm.tokens import encode_documents

    model = getattr(engine_or_model, "model", engine_or_model)
    learner = learner if learner is not None else engine_or_model.learner
    tokenizer = tokenizer if tokenizer is not None else engine_or_model.tokenizer
    texts = list(texts)
    if not texts:
        raise RegradError("tensor_energy needs at least one document text")
    acc = EnergyAccumulator(learner, norm)
    for start in range(0, len(texts), batch_size):
        docs = encode_documents(tokenizer, texts[start:start + batch_size], max_tokens)
        grads, _ = grouped_gradients(model, learner, docs)
        acc.add(grads)
    return acc.shares(with_grad_share)


class EnergyAccumulator:
    """Sums sum_d ||alpha (.) N(g_d)||^2 per tensor over batches of per-document gradients
    ({name: [N, ...]}), so that a caller that already has the gradients (a benchmark, a build)
    need not compute them again."""

    def __init__(self, learner, norm: str | None = None):
        self.names = list(learner.names)
        self.norm = norm or learner.meta.get("norm", "none")
        self.alpha_sq = {n: learner.alpha(n).detach().double().cpu().pow(2) for n in self.names}
        self.energy = {n: 0.0 for n in self.names}
        self.raw = {n: 0.0 for n in self.names}

    def add(self, grads: dict) -> None:
        grads = {n: grads[n].detach().double().cpu() for n in self.names}
        n_docs = next(iter(grads.values())).shape[0]
        scale = _doc_scale(grads, self.norm, n_docs)
        for n, g in grads.items():
            sq = g.pow(2)  # [N, ...]
            per_doc_raw = sq.flatten(1).sum(1)
            self.raw[n] += float(per_doc_raw.sum())
            a2 = self.alpha_sq[n]
            weighted = (sq * a2).flatten(1).sum(1) if a2.dim() else per_doc_raw * a2
            if scale is None:  # 'tensor': every tensor of every document scaled to unit norm
                self.energy[n] += float((weighted / per_doc_raw.clamp_min(1e-300)).sum())
            else:
                self.energy[n] += float((weighted * scale.pow(2)).sum())

    def shares(self, with_grad_share: bool = False):
        shares = _shares(self.energy)
        return (shares, _shares(self.raw)) if with_grad_share else shares


def _shares(values: dict) -> dict:
    total = sum(values.values())
    if not total > 0:
        raise RegradError("every tensor's gradient is zero on these documents; cannot rank tensors")
    return {n: v / total for n, v in values.items()}


def energy_record(energy: dict, threshold: float = DEFAULT_THRESHOLD, **facts) -> dict:
    """The ``stored_tensors`` entry of a learner's meta (``facts``: n_docs, max_tokens, norm...)."""
    _check_threshold(threshold)
    return {"threshold": float(threshold), "energy": {n: float(v) for n, v in energy.items()}, **facts}


def _check_threshold(threshold) -> None:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold < 1:
        raise RegradError(f"energy threshold must be a number in [0, 1), got {threshold!r}")


def select_tensors(learner, threshold: float | None = None) -> list[str]:
    """Names of the tensors a bank stores, in learner order.

    With an energy record in ``learner.meta['stored_tensors']``: every tensor whose share is above
    ``threshold`` (default: the recorded one). Without one: every tensor. Tensors whose step size
    is negligible are never kept; if nothing would be kept, every tensor is (never an empty bank)."""
    record = learner.meta.get(META_KEY) or {}
    energy = record.get("energy")
    if threshold is None:
        threshold = record.get("threshold", DEFAULT_THRESHOLD)
    _check_threshold(threshold)
    keep = []
    for n in learner.names:
        if float(learner.alpha(n).detach().abs().max()) <= NEGLIGIBLE_ALPHA:
            continue
        if energy is not None:
            if n not in energy:
                raise RegradError(f"the learner's energy record has no entry for tensor {n!r}; "
                                  "recompute it with `regrad learner energy --write`")
            if not float(energy[n]) > threshold:
                continue
        keep.append(n)
    return keep or list(learner.names)


def subset_report(learner, energy: dict, threshold: float) -> dict:
    """What a threshold keeps: counts, values and the energy share left out."""
    keep = set(select_tensors(_WithMeta(learner, energy, threshold)))
    shapes = dict(learner.layout)
    values = {n: 1 for n in shapes}
    for n, s in shapes.items():
        for d in s:
            values[n] *= d
    return {
        "threshold": threshold,
        "tensors_kept": len(keep),
        "tensors_total": len(shapes),
        "values_kept_fraction": sum(values[n] for n in keep) / sum(values.values()),
        "energy_dropped": sum(v for n, v in energy.items() if n not in keep),
        "dropped": [n for n in learner.names if n not in keep],
    }


class _WithMeta:
    """A learner view with another energy record (for what-if reports)."""

    def __init__(self, learner, energy, threshold):
        self._learner = learner
        self.names = learner.names
        self.meta = {META_KEY: {"energy": energy, "threshold": threshold}}

    def alpha(self, name):
        return self._learner.alpha(name)


def write_record(checkpoint_dir: str | os.PathLike, record: dict) -> Path:
    """Set ``stored_tensors`` in a checkpoint's learner.json (atomically; tensors untouched, so the
    checkpoint id does not change)."""
    from regrad_cli.learner.persistence import CHECKPOINT_CONFIG

    path = Path(checkpoint_dir) / CHECKPOINT_CONFIG
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegradError(f"cannot read learner checkpoint config {path}: {exc}") from exc
    meta[META_KEY] = record
    try:
        atomic_write_text(path, json.dumps(meta, indent=2))
    except OSError as exc:
        raise RegradError(f"cannot write {path}: {exc}") from exc
    return path


def measure(engine, texts: Sequence[str], *, max_tokens: int = 256, threshold: float | None = None,
            batch_size: int = 4, progress=None) -> dict:
    """Energy shares of ``engine``'s learner over ``texts``, the record to store and what the
    threshold keeps. ``threshold`` default: the learner's recorded one, else DEFAULT_THRESHOLD."""
    learner = engine.learner
    if threshold is None:
        threshold = (learner.meta.get(META_KEY) or {}).get("threshold", DEFAULT_THRESHOLD)
    _check_threshold(threshold)
    norm = learner.meta.get("norm", "none")
    energy, grad_share = tensor_energy(engine, texts=texts, max_tokens=max_tokens, batch_size=batch_size,
                                       norm=norm, with_grad_share=True)
    record = energy_record(energy, threshold, grad_share={n: float(v) for n, v in grad_share.items()},
                           n_docs=len(texts), max_tokens=max_tokens, norm=norm)
    return {"record": record, "subset": subset_report(learner, energy, threshold),
            "checkpoint_id": learner.checkpoint_id()}
