"""The adaptation core: how k document gradients become one temporary step, defined once.

    phi' = phi - gamma * alpha (.) sum_d w_d * N(g_d)

- ``combination_weights`` turns the k retrieval scores of a question into weights w_d (``sum``:
  all 1, the paper's plain sum; ``mean``: 1/k; ``score``: softmax(score / T) with a learned
  temperature T).
- ``normalise`` is N: ``none`` (raw gradients), ``doc`` (each document's gradient scaled to unit
  L2 norm over all its tensors, so that no document wins by having a larger gradient and the
  combined step does not grow with k) or ``tensor`` (every tensor of every document to unit norm).
- ``combine`` is the weighted sum, ``step`` the update, both for one question (tensors [...]) or
  a batch of questions (a leading dimension [N, ...]), and both differentiable when asked
  (meta-training takes second-order gradients through them).
- ``flat_steps`` is the two at query time on flat rows (every tensor of a document end to end),
  a few whole-row operations instead of a few per tensor; tests hold it to ``combine`` + ``step``.
- ``applied`` points the learner's side paths at given weights and restores *whatever was active
  before* on exit, so blocks nest.

Query, eval, serve and meta-training all call these functions; a change of method is one diff here.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from regrad_cli.errors import RegradError

COMBINES = ("sum", "mean", "score")
NORMALISATIONS = ("none", "doc", "tensor")
_EPS = 1e-12


def combination_weights(scores: torch.Tensor, method: str, log_temp: torch.Tensor | None = None) -> torch.Tensor:
    """Weights [..., k] of k documents' gradients from their retrieval scores [..., k] (cosine)."""
    k = scores.shape[-1]
    if method == "sum":
        return torch.ones_like(scores)
    if method == "mean":
        return torch.full_like(scores, 1.0 / max(1, k))
    if method == "score":
        if log_temp is None:
            raise RegradError("combine 'score' needs the learner's temperature")
        # Weights sum to 1: a clear best match gets the whole step; close scores share it.
        return torch.softmax(scores / log_temp.to(scores.device).exp(), dim=-1)
    raise RegradError(f"unknown combine {method!r} (use {', '.join(COMBINES)})")


def _wide(g: torch.Tensor) -> torch.Tensor:
    # Norms of half-precision gradients are summed in fp32; fp32/fp64 keep their own precision.
    return g.float() if g.dtype in (torch.float16, torch.bfloat16) else g


def check_norm(method: str) -> None:
    if method not in NORMALISATIONS:
        raise RegradError(f"unknown normalisation {method!r} (use {', '.join(NORMALISATIONS)})")


def inverse_norm(sq: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(sq + eps): the factor N() scales by, from a sum of squares."""
    return (sq + _EPS).rsqrt()


def doc_factors(grads: Mapping[str, torch.Tensor], doc_dims: int = 1) -> torch.Tensor:
    """The 'doc' normalisation's factor per document, 1 / ||g_d|| over every tensor of it
    ([*doc_shape]; the first ``doc_dims`` dimensions of each tensor index documents)."""
    sq = None
    for g in grads.values():
        s = _wide(g).pow(2).flatten(doc_dims).sum(-1)
        sq = s if sq is None else sq + s
    return inverse_norm(sq)


def normalise(grads: Mapping[str, torch.Tensor], method: str, doc_dims: int = 1) -> dict[str, torch.Tensor]:
    """N(g) for a stack of documents: every tensor is [*doc_shape, ...] where the first
    ``doc_dims`` dimensions index documents. Differentiable.

    The one definition of the normalisations: 'none'; 'doc' (each document's whole gradient to
    unit norm, ``doc_factors``); 'tensor' (each tensor of each document to unit norm).
    ``flat_steps`` applies the same factors to flat rows, ``energy`` weighs by them."""
    if method == "none" or not grads:
        return dict(grads)
    check_norm(method)
    if method == "doc":
        inv = doc_factors(grads, doc_dims)
        return {n: g * inv.to(g.dtype).view(*inv.shape, *([1] * (g.dim() - doc_dims)))
                for n, g in grads.items()}
    out = {}
    for n, g in grads.items():  # 'tensor'
        inv = inverse_norm(_wide(g).pow(2).flatten(doc_dims).sum(-1))
        out[n] = g * inv.to(g.dtype).view(*inv.shape, *([1] * (g.dim() - doc_dims)))
    return out


def combine(grads: Mapping[str, torch.Tensor], weights: torch.Tensor, *, norm: str = "none") -> dict[str, torch.Tensor]:
    """sum_d w_d N(g_d) over the document dimension.

    ``grads[name]`` is [k, ...] (one question) or [N, k, ...] (N questions, k documents each);
    ``weights`` is [k] or [N, k] accordingly."""
    doc_dims = weights.dim()
    g = normalise(grads, norm, doc_dims)
    out = {}
    for n, t in g.items():
        w = weights.to(t.device, t.dtype).view(*weights.shape, *([1] * (t.dim() - doc_dims)))
        out[n] = (t * w).sum(doc_dims - 1)
    return out


def step(phi: Mapping[str, torch.Tensor], alpha: Mapping[str, torch.Tensor], grad: Mapping[str, torch.Tensor],
         gamma: float = 1.0, *, batched: bool = False, differentiable: bool = False) -> dict[str, torch.Tensor]:
    """phi' = phi - gamma * alpha (.) g for every tensor of phi; tensors without a gradient keep phi.

    With ``batched`` the gradients carry a leading question dimension [N, ...] and so does every
    returned tensor (tensors without a gradient are expanded views of phi). phi is never written."""
    n_rows = None
    if batched:
        n_rows = next(iter(grad.values())).shape[0] if grad else None
    ctx = torch.enable_grad() if differentiable else torch.no_grad()
    out = {}
    with ctx:
        for name, p in phi.items():
            g = grad.get(name)
            if not differentiable:
                p = p.detach()
            if g is None:
                out[name] = p.unsqueeze(0).expand(n_rows, *p.shape) if batched and n_rows else p
                continue
            a = alpha[name] if differentiable else alpha[name].detach()
            g = g.to(p.device, p.dtype)
            base = p.unsqueeze(0) if batched else p
            out[name] = base - (gamma * a) * g
    return out


def flat_steps(phi: torch.Tensor, gamma_alpha: torch.Tensor, rows: Sequence[Sequence[torch.Tensor]],
               weights: torch.Tensor, norm: str, sizes: Sequence[int]) -> torch.Tensor:
    """``step(phi, alpha, combine(g, w, norm=norm), gamma)`` for n questions at query time, with
    every tensor of a row laid end to end in one flat vector (a bank row decodes that way).

    ``phi`` and ``gamma_alpha`` (gamma times each value's step size) are [V]; ``rows[i][d]`` is
    question i's document d gradient, [V] float32 on the CPU (one tensor object per document,
    normalised once however many questions share it); ``weights`` [n, k]; ``sizes`` the tensors'
    lengths in that order (for ``tensor`` normalisation). Returns phi' [n, V] on phi's device.
    No autograd: meta-training uses ``combine`` and ``step``.

    The same arithmetic as those two, except the order of the ``doc`` norm's sum of squares (one
    dot product over the row instead of a sum per tensor), a float rounding. Each question is
    computed on its own row with correctly rounded products and sums only (no fused multiply-add),
    so its phi' does not depend on the batch it came in; one scratch row, written in place,
    because a fresh 3 MB temporary costs more in page faults than in arithmetic."""
    check_norm(norm)
    scaled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(row) -> (row, its N() factor)

    def normalised(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if id(g) not in scaled:
            if norm == "tensor":  # a factor per tensor: scale the row itself
                inv = [inverse_norm(torch.dot(v, v)) for v in torch.split(g, list(sizes))]
                scaled[id(g)] = (g * torch.cat([i.expand(m) for i, m in zip(inv, sizes)]), torch.ones(()))
            elif norm == "doc":
                scaled[id(g)] = (g, inverse_norm(torch.dot(g, g)))
            else:
                scaled[id(g)] = (g, torch.ones(()))
        return scaled[id(g)]

    n_values = phi.shape[0]
    out = torch.empty(len(rows), n_values, dtype=torch.float32)
    tmp = torch.empty(n_values, dtype=torch.float32)
    for i, (docs, w) in enumerate(zip(rows, weights)):
        c = out[i]
        for j, (g, wd) in enumerate(zip(docs, w)):
            g, f = normalised(g)
            coef = float(f * wd)  # a float32 product, exact as a Python float
            if j == 0:
                torch.mul(g, coef, out=c)
            else:
                c.add_(torch.mul(g, coef, out=tmp))
    out, tmp = out.to(phi.device), tmp.to(phi.device)
    for c in out:
        torch.sub(phi, torch.mul(gamma_alpha, c, out=tmp), out=c)  # phi - gamma alpha (.) c
    return out


@contextmanager
def applied(learner, weights: Mapping[str, torch.Tensor] | None | str) -> Iterator[None]:
    """Point the side paths at ``weights`` for the block: a name -> tensor mapping, None (phi
    itself) or "off" (no side path: the bare base model). On exit, also on exceptions, the side
    paths get back exactly what they had before, so blocks nest."""
    previous = learner.active_state()
    if isinstance(weights, str):
        if weights != "off":
            raise RegradError(f"unknown side-path state {weights!r}")
        learner.disable()
    else:
        learner.use(weights)
    try:
        yield
    finally:
        learner.restore_state(previous)


def stack_rows(rows: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-question adapters [N, ...] from N single adapters (one row each)."""
    names = list(rows[0])
    return {n: torch.stack([r[n] for r in rows]) for n in names}


def select_rows(weights: Mapping[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-question adapters of ``rows`` (indices into the leading dimension) of a stack."""
    return {n: t.index_select(0, rows.to(t.device)) for n, t in weights.items()}
