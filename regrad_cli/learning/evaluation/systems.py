"""Every eval system answers through the one answering pipeline (``QueryEngine.answer_many``).

A system is a pipeline mode plus, for the controls, the documents it is given (explicit documents
skip retrieval): ``oracle`` the gold document's chunks, ``shifted`` question i+1's retrieved
documents, ``random`` k random documents of the workspace. Nothing here builds a step, a weight, a
prompt or a generation call: the per-question records only score what the pipeline returned.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from regrad_cli.learning.qa import QAItem
from regrad_cli.learning.evaluation.config import SYSTEMS_TABLE, EvalConfig
from regrad_cli.learning.scores import exact_match, f1_score, yes_no_accuracy


@dataclass
class Questions:
    """One stage's evaluated questions with what every system shares."""

    items: list[tuple[int, QAItem]]  # (batch number, item)
    retrieved: list[list[str]]  # top-k ids per question (the pipeline retrieves the same)
    gold: list[list[str]]  # ids of the gold document's rows per question
    pool: list[str]  # every document id of the workspace (the random control draws from it)


def retrieve_all(qe, items: Sequence[QAItem], cfg: EvalConfig) -> list[list[str]]:
    """Top-k ids per question through the query engine's public retrieval (for shifted)."""
    qvecs = qe.embedder.embed([it.question for it in items])
    return [[h.doc_id for h in qe.retrieve(it.question, v, cfg.top_k, cfg.retriever)]
            for it, v in zip(items, qvecs)]


def requests(name: str, qs: Questions, idx: Sequence[int], cfg: EvalConfig, rng: random.Random) -> list:
    from regrad_cli.online.pipeline import Request

    system = SYSTEMS_TABLE[name]
    out = []
    for i in idx:
        it = qs.items[i][1]
        docs = None
        if system.docs == "gold":
            docs = list(qs.gold[i])
        elif system.docs == "shifted":
            docs = list(qs.retrieved[(i + 1) % len(qs.items)])
        elif system.docs == "random":
            docs = rng.sample(qs.pool, min(cfg.top_k, len(qs.pool)))
        out.append(Request(it.question, mode=system.mode, top_k=cfg.top_k, gamma=cfg.gamma, retriever=cfg.retriever,
                           max_new_tokens=cfg.max_new_tokens, kind=it.kind, docs=docs, gold=it.answers[0]))
    return out


def _latency(timings: dict, batch: int) -> float:
    # The pipeline reports one generate/restore time for the whole batch; the rest is per question.
    shared = timings.get("generate", 0.0) + timings.get("restore", 0.0)
    return sum(v for k, v in timings.items() if k not in ("generate", "restore")) + shared / max(1, batch)


def score(name: str, stage: int, batch: int, it: QAItem, res: dict, gold: list[str], n_batch: int) -> dict:
    pred = res["answer"]
    docs = [h["doc_id"] for h in res["retrieved"]]
    applied = [h["doc_id"] for h in res["retrieved"] if h.get("applied")]
    weights = [h["weight"] for h in res["retrieved"] if h.get("applied")]
    gold_set = set(gold)
    has_gold = bool(gold_set)
    rec = {
        "stage": stage, "batch": batch, "system": name, "id": it.id, "question": it.question,
        "answers": it.answers, "prediction": pred, "em": exact_match(pred, it.answers),
        "f1": f1_score(pred, it.answers), "acc": yes_no_accuracy(pred, it.answers) if it.kind == "yesno" else None,
        "nll": res.get("nll"), "docs": docs, "applied": applied, "weights": weights,
        "recall_at_1": float(docs[0] in gold_set) if docs and has_gold else None,
        "recall_at_k": float(any(d in gold_set for d in docs)) if docs and has_gold else None,
        # Share of the step's combination weight on the gold document (its chunks).
        "gold_weight": (sum(w for d, w in zip(applied, weights) if d in gold_set) / sum(weights)
                        if applied and has_gold and sum(weights) else None),
        "latency_ms": _latency(res["timings_ms"], n_batch),
    }
    if res.get("skipped"):
        rec["skipped"] = res["skipped"]
    return rec


def run_system(qe, name: str, qs: Questions, cfg: EvalConfig, *, stage: int,
               tick: Callable[[int, str], None] | None = None) -> list[dict]:
    """Answer every question of ``qs`` with system ``name``: one answer_many call per batch."""
    rng = random.Random(cfg.seed * 1_000_003 + stage)
    records = []
    for start in range(0, len(qs.items), cfg.batch_size):
        idx = list(range(start, min(start + cfg.batch_size, len(qs.items))))
        results = qe.answer_many(requests(name, qs, idx, cfg, rng))
        for i, res in zip(idx, results):
            batch, it = qs.items[i]
            records.append(score(name, stage, batch, it, res, qs.gold[i], len(idx)))
        if tick:
            tick(len(idx), f"{name} (batch {stage})")
    return records


def cpt_query_engine(ws, engine, embedder, cpt_model):
    """A QueryEngine whose model is the CPT-trained copy (for cpt and cpt+rag, which run the
    context and closed-book modes only: no step, so the learner never touches the copy)."""
    from regrad_cli.workspace.engine import Engine
    from regrad_cli.lm.models import LoadedModel
    from regrad_cli.online.query import QueryEngine

    lm = engine.lm
    # The fingerprint stays the base model's: it only lets the workspace's bank open (the copy's
    # modes never read a gradient row), the copy's own drift is measured apart.
    copy = Engine(LoadedModel(cpt_model, lm.tokenizer, dict(lm.fingerprint), lm.device, lm.dtype), engine.learner,
                  engine.model_id)
    return QueryEngine(ws, engine=copy, embedder=embedder, need_bank=False)
