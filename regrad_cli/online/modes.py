"""Answering modes and the bounds of a request's options, torch-free.

The CLI checks its options against these before any model loads (a bad ``--mode`` is refused at
once); the answering pipeline (``regrad_cli.pipeline.check_request``) and the HTTP server check
every request against the same definitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from regrad_cli.errors import FieldError


@dataclass(frozen=True)
class Mode:
    retrieve: bool  # documents are retrieved (or given) for the question
    adapter: str  # "step" (phi'), "phi" (the learner, no step) or "base" (no side path)
    passages: bool  # the documents' texts go into the prompt


MODES: dict[str, Mode] = {
    "param": Mode(True, "step", False),
    "param+context": Mode(True, "step", True),
    "context": Mode(True, "base", True),  # RAG on the bare base model
    "rag+phi": Mode(True, "phi", True),  # RAG with the meta-learned phi active, no step
    "closed-book": Mode(False, "base", False),
    "closed-book+phi": Mode(False, "phi", False),
}
RETRIEVERS = ("dense", "bm25", "hybrid")
COMBINES = ("sum", "mean", "score")  # regrad_cli.adapt.COMBINES, named here without torch
MAX_TOP_K = 64
MAX_NEW_TOKENS = 512


def uses_step(mode: str) -> bool:
    """Whether ``mode`` applies documents' gradients (and so needs a gradient bank)."""
    return mode in MODES and MODES[mode].adapter == "step"


def check_options(*, mode=None, top_k=None, gamma=None, combine=None, retriever=None,
                  max_new_tokens=None, min_score=None) -> float | None:
    """FieldError naming the first invalid option (None means "not given": not checked).
    Returns gamma as a float (None when not given)."""
    if mode is not None and mode not in MODES:
        raise FieldError("mode", f"unknown mode {mode!r} (use {', '.join(MODES)})")
    if combine and combine not in COMBINES:
        raise FieldError("combine", f"unknown combine {combine!r} (use {', '.join(COMBINES)})")
    if retriever is not None and retriever not in RETRIEVERS:
        raise FieldError("retriever", f"unknown retriever {retriever!r} (use {', '.join(RETRIEVERS)})")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                              or not 0 <= top_k <= MAX_TOP_K):
        raise FieldError("top_k", f"must be an integer from 0 to {MAX_TOP_K}, got {top_k!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool)
                                       or not 1 <= max_new_tokens <= MAX_NEW_TOKENS):
        raise FieldError("max_new_tokens", f"must be an integer from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens!r}")
    if min_score is not None:
        try:
            ms = float(min_score)
        except (TypeError, ValueError):
            raise FieldError("min_score", f"not a number: {min_score!r}") from None
        if not -1.0 <= ms <= 1.0:
            raise FieldError("min_score", f"must be a cosine from -1 to 1, got {min_score!r}")
    if gamma is None:
        return None
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise FieldError("gamma", f"not a number: {gamma!r}") from None
    if not math.isfinite(g):
        raise FieldError("gamma", f"must be finite, got {gamma!r}")
    return g


# What every answer holds (`regrad query --json`, the server's /v1/query, Regrad.query): the same
# keys in every mode. docs/cli.md's "JSON output" section is generated from these.
ANSWER_KEYS: dict[str, str] = {
    "id": "the record's id (only with `--batch` or a request that gave one)",
    "question": "the question as asked",
    "answer": "the generated answer",
    "mode": "the mode that answered",
    "retrieved": "the documents retrieved, best first (empty for the closed-book modes): objects below",
    "warnings": "one line each: documents without a gradient yet, gradient rows of removed or changed "
                "documents, rows not applied; each names the command that fixes it",
    "skipped": "retrieved documents whose gradient was not applied: {doc_id, reason}",
    "timings_ms": "this row's milliseconds per stage: embed, retrieve, fetch_decode, apply, generate, "
                  "restore (in a batch, its share of the batch's calls)",
    "batch_size": "questions answered by the same generation call (1 for a single question)",
    "bank": "fingerprints of the model, learner and (when there is one) bank that answered",
}
RETRIEVED_KEYS: dict[str, str] = {
    "doc_id": "the chunk's id (`regrad docs ls` lists them)",
    "score": "the retriever's score: cosine (dense), BM25 (bm25) or reciprocal rank (hybrid)",
    "cosine": "the question-document cosine (what `--min-score` compares)",
    "source": "the file or record the chunk came from",
    "applied": "whether its gradient was part of the step",
    "weight": "its weight in the step, null where no step was taken with it",
    "text": "the passage (only with `--show-docs`)",
}
