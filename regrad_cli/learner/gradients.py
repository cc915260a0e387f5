"""Document gradients: g_d = d/d phi of the mean next-token loss of document d (or of the
learner's other document loss, doc_loss.py).

Many documents go through one forward and one backward pass and still get separate gradients:
each sample i runs on its own copy phi_i of the adapter (a [N, ...] stack), the losses are summed,
and because sample i depends only on phi_i, d(sum)/d(phi_i) is exactly g_i. The same trick with one
copy per *group* gives sum_{d in group} g_d directly (meta-training now takes per-document gradients
and combines them with adapt.combine, so it can normalise each document before summing).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from regrad_cli.learner.lora import Learner
from regrad_cli.lm.tokens import EncodedDocs, encode_documents, per_sample_nll


def grouped_gradients(
    model,
    learner: Learner,
    docs: EncodedDocs,
    group: Sequence[int] | None = None,
    n_groups: int | None = None,
    *,
    base: dict[str, torch.Tensor] | None = None,
    create_graph: bool = False,
    prefix=None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradients of the documents' losses with respect to phi, summed within groups.

    Returns ({name: tensor [n_groups, *shape]}, per-document losses [N]). ``group[i]`` is the
    group of document i (default: one group per document, i.e. per-document gradients).
    ``base`` is the adapter point (default phi); with ``create_graph`` the result stays
    differentiable with respect to it (second-order meta-training). ``prefix`` (a
    ``PrefixCache``) starts the passes at the first adapted layer. The loss is the learner's
    document loss (``learner.doc_loss``, doc_loss.py): a loss other than 'plain' is built from
    the texts ``docs`` were encoded from. Weighting and combining documents' gradients is
    ``adapt.combine``'s job, not this function's.
    """
    n = docs.input_ids.shape[0]
    if group is None:
        group = list(range(n))
        n_groups = n
    n_groups = n_groups if n_groups is not None else max(group) + 1
    device = next(model.parameters()).device
    rows = _loss_rows(model, learner, docs, base, create_graph)
    if learner.transform is not None:
        return _transformed_gradients(model, learner, docs, group, n_groups, base, create_graph, prefix, rows)
    if rows is not None:
        # Several rows per document: each row runs on its document's group's copy of phi.
        idx = torch.tensor([group[d] for d in rows.doc], device=device)
        grads, row_losses = _stacked_gradients(learner, idx, n_groups, base, create_graph,
                                               lambda: rows.losses(model, prefix))
        return grads, rows.per_document(row_losses, n)
    idx = torch.tensor(list(group), device=device)
    return _stacked_gradients(learner, idx, n_groups, base, create_graph, lambda: per_sample_nll(
        model, docs.input_ids.to(device), docs.attention_mask.to(device), prefix=prefix))


def _stacked_gradients(learner: Learner, idx: torch.Tensor, n_groups: int, base, create_graph: bool, loss_fn):
    """d(sum of ``loss_fn()``)/d(phi_g) for every group g, sample i running on copy idx[i]."""
    if base is None:
        base = {k: v.detach() for k, v in learner.phi_dict().items()}
    with torch.enable_grad():
        stacks = {}
        for name in learner.names:
            p = base[name]
            rep = p.unsqueeze(0).repeat(n_groups, *([1] * p.dim()))
            if not rep.requires_grad:
                rep.requires_grad_(True)
            stacks[name] = rep
        per_doc = {name: s.index_select(0, idx) for name, s in stacks.items()}
    with torch.enable_grad(), learner.using(per_doc):
        losses = loss_fn()
        total = losses.sum()
        grads = torch.autograd.grad(
            total, [stacks[n] for n in learner.names], create_graph=create_graph
        )
    return dict(zip(learner.names, grads)), losses.detach()


def _loss_rows(model, learner: Learner, docs: EncodedDocs, base, create_graph: bool):
    """The loss rows of the learner's document loss (doc_loss.build_rows), None for 'plain'."""
    kind = learner.doc_loss
    if kind == "plain":
        return None
    from regrad_cli.errors import RegradError
    from regrad_cli.learner.doc_loss import build_rows

    if create_graph and kind == "distill":
        raise RegradError("the distill document loss is first order only (its teacher carries no gradient): "
                          "meta-train with --first-order")
    if docs.texts is None or docs.tokenizer is None:
        raise RegradError(f"the {kind} document loss is built from the documents' texts: encode them with "
                          "encode_documents")
    return build_rows(kind, docs.tokenizer, docs.texts, docs.max_tokens or docs.input_ids.shape[1],
                      model=model, learner=learner, base=base)


def _transformed_gradients(model, learner: Learner, docs: EncodedDocs, group, n_groups: int, base,
                           create_graph: bool, prefix=None, rows=None):
    """``grouped_gradients`` for a learner with a document key map (learner.transform): one
    ordinary forward+backward captures each module's factors, the map turns them into the
    stored gradient. Differentiable in the map only (first order in phi by construction).
    With loss ``rows`` (a document loss other than 'plain') each row's transformed gradient is
    added to its document's group: the map is linear in the rows' factors."""
    from regrad_cli.errors import RegradError
    from regrad_cli.learner.transform import capture_factors

    if create_graph:
        raise RegradError("a learner with a document key map is meta-trained first order "
                          "(--first-order): its gradients are not differentiable in phi")
    device = next(model.parameters()).device
    if rows is not None:
        factors, row_losses = capture_factors(model, learner, lambda: rows.losses(model, prefix), base)
        per_row = learner.transform.gradients(factors, learner.spec.scale, learner.names)
        idx = torch.tensor([group[d] for d in rows.doc], device=device)
        return ({k: torch.zeros(n_groups, *g.shape[1:], dtype=g.dtype, device=g.device).index_add(0, idx, g)
                 for k, g in per_row.items()}, rows.per_document(row_losses, docs.input_ids.shape[0]))
    ids, mask = docs.input_ids.to(device), docs.attention_mask.to(device)
    factors, losses = capture_factors(model, learner, lambda: per_sample_nll(model, ids, mask, prefix=prefix), base)
    per_doc = learner.transform.gradients(factors, learner.spec.scale, learner.names)
    if list(group) == list(range(n_groups)):
        return per_doc, losses
    idx = torch.tensor(list(group), device=device)
    return {k: torch.zeros(n_groups, *g.shape[1:], dtype=g.dtype, device=g.device).index_add(0, idx, g)
            for k, g in per_doc.items()}, losses


COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def fast_bf16(device: torch.device | str) -> bool:
    """True where bfloat16 matrix products run natively: a CUDA device that supports them, or a
    CPU with AVX512-BF16 or AMX (measured on an AVX512-BF16 EPYC: bf16 products 2.0x to 2.6x as
    fast as fp32 at the shapes of a 135M model; docs/performance.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(c()) for c in checks if c is not None)


def check_compute_dtype(setting: str) -> str:
    """``setting`` if it is a compute dtype this build knows; a ConfigError naming them if not."""
    if setting not in COMPUTE_DTYPES:
        from regrad_cli.errors import ConfigError

        raise ConfigError(f"unknown compute dtype {setting!r} (use {', '.join(COMPUTE_DTYPES)})")
    return setting


def resolve_compute_dtype(setting: str, model) -> str:
    """The precision document gradients are computed in: 'float32' or 'bfloat16'.

    'auto' is bfloat16 autocast for a float32 model on hardware with native bf16 products (see
    ``fast_bf16``) and float32 otherwise; a model loaded in another dtype computes in its own
    dtype (reported as such). bf16 gradients differ from float32 ones by about 2.6 % (relative
    L2), less than int4 rounding (13.4 %), yet they change more answers (7 % against float32
    passes on NQ-Open dev and the demo, F1 not significantly different): docs/performance.md."""
    check_compute_dtype(setting)
    param = next(model.parameters())
    if param.dtype != torch.float32:
        return str(param.dtype).removeprefix("torch.")
    if setting == "auto":
        return "bfloat16" if fast_bf16(param.device) else "float32"
    return setting


def compute_context(model, dtype: str):
    """Autocast to ``dtype`` on the model's device for 'bfloat16' (a float32 model); nothing else."""
    param = next(model.parameters())
    if dtype != "bfloat16" or param.dtype != torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(param.device.type, dtype=torch.bfloat16)


def document_gradients(model, learner: Learner, tokenizer, texts: Sequence[str],
                       max_tokens: int = 256, compute_dtype: str = "float32",
                       ) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Per-document gradients (detached, float32, on CPU) and token counts, one forward+backward in
    all; ``compute_dtype`` 'bfloat16' runs the passes under bf16 autocast (``resolve_compute_dtype``
    turns 'auto' into one of the two)."""
    docs = encode_documents(tokenizer, texts, max_tokens)
    with compute_context(model, compute_dtype):
        grads, _ = grouped_gradients(model, learner, docs)
    out = [{n: g[i].detach().float().cpu() for n, g in grads.items()} for i in range(len(texts))]
    return out, docs.n_tokens
