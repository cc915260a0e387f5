"""query: the online half of ReGrad.

Retrieve the top-k documents, decode only their gradient blobs, take one step in LoRA space
(phi' = phi - gamma * alpha (.) combine(g_d)), generate, and restore. Restoring is exact by
construction: phi is never written; the side path is pointed at a new phi' tensor and then back
at phi (``Learner.using``), also when generation raises. The model, embedder, documents table
and bank are loaded once per ``QueryEngine``, so stdin and batch modes pay the load once.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from regrad_cli.config import Workspace
from regrad_cli.engine import Engine
from regrad_cli.errors import NoBankError, RegradError
from regrad_cli.generation import generate
from regrad_cli.prompting import prompt_ids

log = logging.getLogger("regrad")

MODES = ("param", "param+context", "context", "closed-book", "closed-book+phi")
RETRIEVERS = ("dense", "bm25", "hybrid")
COMBINES = ("sum", "mean", "score")
RRF_K = 60


@dataclass
class Retrieved:
    doc_id: str
    score: float  # retriever score (cosine for dense, BM25 for bm25, RRF for hybrid)
    source: str
    cosine: float  # question-document cosine, used by combine="score"


class QueryEngine:
    """Answers questions over one workspace; everything is loaded once."""

    def __init__(self, ws: Workspace, *, engine: Engine | None = None, embedder=None,
                 checkpoint: str | None = None, device: str | None = None, strict: bool = False,
                 need_bank: bool = True):
        from regrad_cli.build import expected_fingerprints
        from regrad_cli.documents import DocumentStore
        from regrad_cli.models import Embedder

        self.ws = ws
        self.strict = strict
        self.engine = engine or Engine.load(ws, checkpoint=checkpoint, device=device)
        self.embedder = embedder or Embedder(ws.config.embedder.id, device=device or ws.config.model.device,
                                             batch_size=ws.config.embedder.batch_size)
        self.store = DocumentStore(ws)
        self.bank = None
        path = ws.bank_path(self.engine.learner.checkpoint_id())
        from bank_format import GradientBank

        opts = ws.bank_storage_options()
        if GradientBank.exists(path, opts):
            self.bank = GradientBank.open(path, expect=expected_fingerprints(self.engine, self.embedder.fingerprint),
                                          read_only=True, storage_options=opts)
        elif need_bank:
            self._no_bank()
        self._check_embedder()
        self._layout = [t.name for t in self.bank.meta.layout] if self.bank else []

    def _check_embedder(self) -> None:
        # Without a bank nothing else compares them, and question vectors from another embedder
        # would search the document vectors silently wrong (or fail on a dimension mismatch).
        stored = self.store.embedder_fingerprint
        if stored is None:
            return
        mine = self.embedder.fingerprint
        if stored.get("id") not in (None, mine["id"]) or stored["dim"] != mine["dim"]:
            raise RegradError(
                f"the documents in {self.ws.root} were embedded with {stored.get('id')!r} (dim "
                f"{stored['dim']}), this query uses {mine['id']!r} (dim {mine['dim']}): use the "
                f"embedder the workspace was ingested with, or re-ingest into a new workspace"
            )

    def _no_bank(self):
        loc = self.ws.banks_location
        others = sorted(p.name for p in loc.glob("bank-*")) if not isinstance(loc, str) and loc.exists() else []
        hint = (f" (the workspace has banks for other learner checkpoints: {', '.join(others)}; "
                "gradients depend on the checkpoint, so rebuild)") if others else ""
        raise NoBankError(f"no gradient bank for learner checkpoint {self.engine.learner.checkpoint_id()[:16]} "
                          f"in {loc}{hint}: run `regrad build-bank`")

    # Retrieval --------------------------------------------------------------------------------
    def retrieve(self, question: str, qvec, k: int, retriever: str = "dense") -> list[Retrieved]:
        if retriever not in RETRIEVERS:
            raise RegradError(f"unknown retriever {retriever!r} (use {', '.join(RETRIEVERS)})")
        if k <= 0:
            return []
        dense = bm25 = None
        if retriever in ("dense", "hybrid"):
            n = k * (2 if retriever == "hybrid" else 1)
            if self.bank is not None:
                from bank_format import BankFormatError

                try:
                    hits = self.bank.search(qvec, n)
                except BankFormatError as exc:  # e.g. a data file damaged or deleted on disk
                    raise RegradError(f"{exc} (is the bank damaged? `regrad bank verify` checks every row)") from exc
                dense = [(h["doc_id"], float(h["score"]), h.get("source", "")) for h in hits]
            else:
                dense = self._with_sources(self.store.search_vector(qvec, n))
        if retriever in ("bm25", "hybrid"):
            bm25 = self._with_sources(self.store.search_text(question, k * (2 if retriever == "hybrid" else 1)))
        if retriever == "dense":
            ranked = dense
        elif retriever == "bm25":
            ranked = bm25
        else:
            fused: dict[str, list] = {}
            for hits in (dense, bm25):
                for rank, (doc_id, _, source) in enumerate(hits):
                    entry = fused.setdefault(doc_id, [0.0, source])
                    entry[0] += 1.0 / (RRF_K + rank + 1)
            ranked = sorted(((d, s, src) for d, (s, src) in fused.items()), key=lambda x: -x[1])
        ranked = ranked[:k]
        cos = self._cosines(qvec, [d for d, _, _ in ranked], dense)
        return [Retrieved(d, s, src, cos.get(d, 0.0)) for d, s, src in ranked]

    def _with_sources(self, hits) -> list[tuple[str, float, str]]:
        rows = self.store.get([d for d, _ in hits], columns=["id", "source"]) if hits else {}
        return [(d, float(score), rows.get(d, {}).get("source", "")) for d, score in hits]

    def _cosines(self, qvec, ids: Sequence[str], dense) -> dict[str, float]:
        import numpy as np

        known = {d: s for d, s, _ in (dense or [])}
        missing = [d for d in ids if d not in known]
        if missing:
            rows = self.store.get(missing)
            for d in missing:
                if d in rows:
                    known[d] = float(np.asarray(rows[d]["embedding"], dtype=np.float32) @ qvec)
        return known

    # Adaptation ----------------------------------------------------------------------------------
    def combined_gradient(self, retrieved: list[Retrieved], combine: str) -> tuple[dict, list[str], list[dict]]:
        """sum_i w_i g_i over the retrieved documents whose rows decode cleanly.

        Returns (gradient by tensor name, used doc ids, skipped [{doc_id, reason}]). A corrupt row
        is never applied: skipped with a warning, or an error with strict."""
        if not retrieved:
            return {}, [], []
        if self.bank is None:
            self._no_bank()
        decoded, bad = self.bank.fetch_checked([r.doc_id for r in retrieved])
        skipped = [{"doc_id": d, "reason": why} for d, why in bad.items()]
        if skipped and self.strict:
            raise RegradError(f"corrupt or missing gradient row for {skipped[0]['doc_id']!r}: "
                              f"{skipped[0]['reason']}")
        for s in skipped:
            log.warning("not applying the gradient of %s: %s", s["doc_id"], s["reason"])
        used = [r for r in retrieved if r.doc_id in decoded]
        if not used:
            return {}, [], skipped
        weights = self.engine.learner.combine_weights(
            torch.tensor([r.cosine for r in used], dtype=torch.float32), combine).detach()
        device = next(self.engine.model.parameters()).device
        total = {}
        for i, name in enumerate(self._layout):
            acc = None
            for w, r in zip(weights.tolist(), used):
                t = torch.from_numpy(decoded[r.doc_id][i]) * w
                acc = t if acc is None else acc + t
            total[name] = acc.to(device)
        return total, [r.doc_id for r in used], skipped

    @contextmanager
    def adapted(self, grad: dict, gamma: float = 1.0) -> Iterator[None]:
        """phi' on the side path for the duration of the block; phi restored exactly after."""
        weights = self.engine.learner.adapted_weights(grad, gamma)
        with self.engine.learner.using(weights):
            yield

    # Answering --------------------------------------------------------------------------------------
    def answer(self, question: str, *, mode: str = "param", top_k: int = 3, gamma: float = 1.0,
               combine: str | None = None, retriever: str = "dense", max_new_tokens: int = 20,
               show_docs: bool = False) -> dict:
        if mode not in MODES:
            raise RegradError(f"unknown mode {mode!r} (use {', '.join(MODES[:4])})")
        combine = combine or self.engine.learner.trained_combine
        if combine not in COMBINES:
            raise RegradError(f"unknown combine {combine!r} (use {', '.join(COMBINES)})")
        if not question.strip():
            raise RegradError("empty question")
        timings = dict.fromkeys(("embed", "retrieve", "fetch_decode", "apply", "generate", "restore"), 0.0)
        t = time.perf_counter()
        retrieved: list[Retrieved] = []
        needs_docs = mode in ("param", "param+context", "context")
        if needs_docs:
            qvec = self.embedder.embed([question])[0]
            timings["embed"] = _ms(t)
            t = time.perf_counter()
            retrieved = self.retrieve(question, qvec, top_k, retriever)
            timings["retrieve"] = _ms(t)
        passages: list[str] = []
        if mode in ("param+context", "context") and retrieved:
            rows = self.store.get([r.doc_id for r in retrieved])
            passages = [rows[r.doc_id]["text"] for r in retrieved if r.doc_id in rows]
        prompt = prompt_ids(self.engine.tokenizer, question, passages)
        learner = self.engine.learner
        skipped: list[dict] = []
        used: list[str] = []
        if mode in ("param", "param+context"):
            t = time.perf_counter()
            grad, used, skipped = self.combined_gradient(retrieved, combine)
            timings["fetch_decode"] = _ms(t)
            t = time.perf_counter()
            weights = learner.adapted_weights(grad, gamma)
            learner.use(weights)
            timings["apply"] = _ms(t)
            try:
                t = time.perf_counter()
                text = generate(self.engine.model, self.engine.tokenizer, [prompt], max_new_tokens)[0]
                timings["generate"] = _ms(t)
            finally:
                t = time.perf_counter()
                learner.use(None)
                timings["restore"] = _ms(t)
        elif mode in ("context", "closed-book"):
            t = time.perf_counter()
            with learner.disabled():
                text = generate(self.engine.model, self.engine.tokenizer, [prompt], max_new_tokens)[0]
            timings["generate"] = _ms(t)
        else:  # closed-book+phi
            t = time.perf_counter()
            text = generate(self.engine.model, self.engine.tokenizer, [prompt], max_new_tokens)[0]
            timings["generate"] = _ms(t)
        result = {
            "question": question,
            "answer": text,
            "mode": mode,
            "retrieved": [{"doc_id": r.doc_id, "score": round(r.score, 6), "source": r.source,
                           "applied": r.doc_id in used} for r in retrieved],
            "timings_ms": {k: round(v, 2) for k, v in timings.items()},
            "bank": self.fingerprints(),
        }
        if skipped:
            result["skipped"] = skipped
        if show_docs and retrieved:
            rows = self.store.get([r.doc_id for r in retrieved])
            for r in result["retrieved"]:
                r["text"] = rows.get(r["doc_id"], {}).get("text", "")
        return result

    def fingerprints(self) -> dict:
        if self.bank is None:
            return {"model": self.engine.lm.fingerprint,
                    "learner": {"checkpoint_id": self.engine.learner.checkpoint_id()}}
        m = self.bank.meta
        return {"model": m.model, "learner": {"checkpoint_id": m.learner.get("checkpoint_id")},
                "embedder": m.embedder, "codec": m.codec.name, "format_version": m.format_version,
                "path": str(self.bank.path)}


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
