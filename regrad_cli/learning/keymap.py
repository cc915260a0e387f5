"""Fit a learner's document key map by gradient matching (regrad_cli.learner.transform).

For every training document whose questions are known, the target is the sum of the gradients of
its questions' answer losses (prompt -> gold answer, at phi): the one step per document that
``benchmarks/injection_bounds.py`` measures as the bound of a stored step. The document's own
factors come from one forward+backward of its document loss (the learner's, doc_loss.py). ``GradientMatch`` keeps only the
normal equations, so memory does not grow with the number of documents, and the solution is exact
(ridge least squares). Evaluation and demo questions are never used: pass training sets only.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Callable, Sequence

import torch

from regrad_cli.errors import RegradError
from regrad_cli.learner.transform import GradientMatch, KeyMap, document_factors
from regrad_cli.learning.qa import QAItem
from regrad_cli.lm.generation import answer_nll
from regrad_cli.lm.prompting import prompt_ids
from regrad_cli.lm.tokens import encode_documents

log = logging.getLogger("regrad")


def answer_gradient(model, learner, tokenizer, questions: Sequence[tuple[list[int], str]]) -> dict[str, torch.Tensor]:
    """d/d phi of the summed answer NLL of (prompt ids, answer) pairs, at phi (detached)."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in learner.phi_dict().items()}
    with torch.enable_grad(), learner.using(leaves):
        loss = answer_nll(model, tokenizer, [p for p, _ in questions], [a for _, a in questions]).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(leaves[n])).detach() for n, g in zip(leaves, grads)}


def fit_keymap(model, tokenizer, learner, items: Sequence[QAItem], *, max_docs: int = 400, ridge: float = 0.1,
               max_doc_tokens: int = 256, max_passage_tokens: int = 256, b_only: bool = True,
               progress: Callable[[int, int], None] | None = None) -> tuple[KeyMap, dict]:
    """The ridge key map of ``learner`` fitted on the documents of ``items`` (at most ``max_docs``,
    in order); returns it with a summary. The learner's own transform, if any, is not used.
    ``b_only``: V = 0, the map writes the B tensors only (measured: B alone answers at least as
    well, docs/meta-training.md, and the bank then stores B only)."""
    by_doc: OrderedDict[str, list[tuple[list[int], str]]] = OrderedDict()
    for it in items:
        if not it.documents or not it.answers:
            continue
        doc = it.documents[0]
        if doc not in by_doc and len(by_doc) >= max_docs:
            continue
        by_doc.setdefault(doc, []).append(
            (prompt_ids(tokenizer, it.question, kind=it.kind, max_passage_tokens=max_passage_tokens), it.answers[0]))
    if not by_doc:
        raise RegradError("no training document with a question and an answer to fit the key map on")
    scale = learner.spec.scale
    fit = GradientMatch(scale, with_a=not b_only)
    saved, learner.transform = learner.transform, None
    identity = KeyMap.identity(learner)  # the plain gradient from factors: its norm scales each document
    try:
        for j, (text, questions) in enumerate(by_doc.items()):
            target = answer_gradient(model, learner, tokenizer, questions)
            enc = encode_documents(tokenizer, [text], max_doc_tokens)
            # The document's factors under the learner's document loss (doc_loss.py), over its tokens.
            (per, _), = document_factors(model, learner, enc, [0])
            factors = {m: (x.unsqueeze(0), d.unsqueeze(0)) for m, (x, d) in per.items()}
            with torch.no_grad():
                plain = identity.gradients(factors, scale, learner.names)
            norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in plain.values()))
            fit.add(factors, target, plain_norm=norm)
            if progress:
                progress(j + 1, len(by_doc))
            if (j + 1) % 50 == 0:
                log.info("key map: %d of %d training documents", j + 1, len(by_doc))
    finally:
        learner.transform = saved
    keymap = fit.solve(KeyMap.for_learner(learner), ridge=ridge)  # V = 0 when b_only
    summary = {"kind": "keymap", "fit": "gradient-matching", "tensors": "B" if b_only else "AB", "documents": fit.n_docs,
               "questions": sum(len(q) for q in by_doc.values()), "ridge": ridge, "max_doc_tokens": max_doc_tokens}
    return keymap, summary
