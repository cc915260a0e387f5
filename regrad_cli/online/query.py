"""query: the online half of ReGrad, over one workspace.

``QueryEngine`` loads the model, learner, embedder, documents table and bank once, and answers
through the one answering pipeline (``pipeline.answer_many``: retrieve, weigh, one temporary step
phi' = phi - gamma * alpha (.) combine(g_d), generate, restore). ``WorkspaceCorpus`` is what the
pipeline reads here: dense / BM25 / hybrid retrieval over the workspace, passage texts, and the
gradient rows decoded from the bank (corrupt rows are reported, never applied).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from regrad_cli.learner.adapt import COMBINES
from regrad_cli.workspace.config import Workspace
from regrad_cli.workspace.engine import Engine
from regrad_cli.errors import NoBankError, RegradError
from regrad_cli.online.pipeline import MODES, RETRIEVERS, GradientRow, Request, Retrieved, answer_many

log = logging.getLogger("regrad")

__all__ = ["QueryEngine", "WorkspaceCorpus", "Request", "Retrieved", "MODES", "RETRIEVERS", "COMBINES"]
RRF_K = 60


class QueryEngine:
    """Answers questions over one workspace; everything is loaded once."""

    def __init__(self, ws: Workspace, *, engine: Engine | None = None, embedder=None,
                 checkpoint: str | None = None, device: str | None = None, strict: bool = False,
                 need_bank: bool = True):
        from regrad_cli.lm.models import Embedder
        from regrad_cli.workspace.banks import open_checkpoint_bank
        from regrad_cli.workspace.documents import DocumentStore

        self.ws = ws
        self.strict = strict
        self.engine = engine or Engine.load(ws, checkpoint=checkpoint, device=device)
        self.embedder = embedder or Embedder(ws.config.embedder.id, device=device or ws.config.model.device,
                                             batch_size=ws.config.embedder.batch_size)
        self.store = DocumentStore(ws)
        self.bank = open_checkpoint_bank(ws, self.engine, self.embedder.fingerprint, read_only=True)
        if self.bank is None and need_bank:
            self._no_bank()
        self._check_embedder()
        if self.bank is not None:
            self._check_layout()
        self.corpus = WorkspaceCorpus(self.store, self.bank)

    def _check_layout(self) -> None:
        # The bank's fingerprints name the checkpoint, but a bank written by other code could still
        # declare tensors the learner does not have (or other shapes): refuse before applying any.
        mine = dict(self.engine.learner.layout)
        for t in self.bank.meta.layout:
            if t.name not in mine or tuple(mine[t.name]) != tuple(t.shape):
                raise RegradError(
                    f"bank {self.bank.path} stores tensor {t.name} {tuple(t.shape)}, which the learner "
                    f"{'has as ' + str(tuple(mine[t.name])) if t.name in mine else 'does not have'}: "
                    "rebuild the bank with `regrad build-bank`")

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
        # Bank directories only: a build's lease file (bank-<id>.build.lock) sits beside them.
        others = sorted(p.name for p in loc.glob("bank-*") if p.is_dir()) \
            if not isinstance(loc, str) and loc.exists() else []
        hint = (f" (the workspace has banks for other learner checkpoints: {', '.join(others)}; "
                "gradients depend on the checkpoint, so rebuild)") if others else ""
        raise NoBankError(f"no gradient bank for learner checkpoint {self.engine.learner.checkpoint_id()[:16]} "
                          f"in {loc}{hint}: run `regrad build-bank`")

    # Retrieval --------------------------------------------------------------------------------
    def retrieve(self, question: str, qvec, k: int, retriever: str = "dense") -> list[Retrieved]:
        """The top-k documents for a question (its embedding ``qvec``), best first."""
        return self.corpus.search(question, qvec, k, retriever)

    # Answering --------------------------------------------------------------------------------------
    def answer(self, question: str, *, mode: str = "param", top_k: int = 3, gamma: float = 1.0,
               combine: str | None = None, retriever: str = "dense", max_new_tokens: int = 20,
               show_docs: bool = False, min_score: float | None = None) -> dict:
        req = Request(question, mode=mode, top_k=top_k, gamma=gamma, combine=combine, retriever=retriever,
                      max_new_tokens=max_new_tokens, show_docs=show_docs, min_score=min_score)
        return self.answer_many([req])[0]

    def answer_many(self, requests: Sequence[Request], *, return_exceptions: bool = False) -> list:
        """Answer a batch in one generation call per token limit, each row with its own step."""
        needs_bank = [self.bank is None and r.mode in MODES and MODES[r.mode].adapter == "step" for r in requests]
        if any(needs_bank) and not return_exceptions:
            self._no_bank()
        # Without a bank, a request that takes a step fails alone; the others are answered.
        todo = [r for r, nb in zip(requests, needs_bank) if not nb]
        done = iter(answer_many(self.engine, self.embedder, self.corpus, todo, strict=self.strict,
                                return_exceptions=return_exceptions, fingerprints=self.fingerprints()) if todo else [])
        out = []
        for nb in needs_bank:
            if not nb:
                out.append(next(done))
                continue
            try:
                self._no_bank()
            except NoBankError as exc:
                out.append(exc)
        return out

    def fingerprints(self) -> dict:
        if self.bank is None:
            return {"model": self.engine.lm.fingerprint,
                    "learner": {"checkpoint_id": self.engine.learner.checkpoint_id()}}
        m = self.bank.meta
        return {"model": m.model, "learner": {"checkpoint_id": m.learner.get("checkpoint_id")},
                "embedder": m.embedder, "codec": m.codec.name, "format_version": m.format_version,
                "path": str(self.bank.path)}


class WorkspaceCorpus:
    """Retrieval, texts and decoded gradient rows of one workspace (the pipeline's Corpus)."""

    def __init__(self, store, bank):
        self.store = store
        self.bank = bank
        self.layout = [t.name for t in bank.meta.layout] if bank is not None else []
        # Bank format 1.2: rows already normalised over the whole gradient (pipeline.step_from_rows).
        self.row_norm = bank.meta.row_norm if bank is not None else None
        self._row_hash: dict[str, str | None] = {}  # doc id -> content hash of its bank row (searched)
        self._fresh = None  # ((documents version, bank version), freshness)

    def search(self, question: str, qvec, k: int, retriever: str = "dense",
               gradients: bool = True) -> list[Retrieved]:
        """The top-k documents, best first. Dense retrieval runs over the bank's vectors when the
        documents are wanted for their gradients (``gradients``), else over the documents table,
        so that a passage-only mode finds a document before it has a gradient."""
        if retriever not in RETRIEVERS:
            raise RegradError(f"unknown retriever {retriever!r} (use {', '.join(RETRIEVERS)})")
        if k <= 0:
            return []
        dense = bm25 = None
        if retriever in ("dense", "hybrid"):
            n = k * (2 if retriever == "hybrid" else 1)
            if self.bank is not None and gradients:
                from bank_format import BankFormatError

                try:
                    hits = self.bank.search(qvec, n)
                except BankFormatError as exc:  # e.g. a data file damaged or deleted on disk
                    raise RegradError(f"{exc} (is the bank damaged? `regrad bank verify` checks every row)") from exc
                dense = [(h["doc_id"], float(h["score"]), h.get("source", "")) for h in hits]
                for h in hits:  # what each row was computed from: checked against the documents
                    self._row_hash[h["doc_id"]] = h.get("content_hash")
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
        known = {d: s for d, s, _ in (dense or [])}
        cos = {**self.cosines(qvec, [d for d, _, _ in ranked if d not in known]), **known}
        return [Retrieved(d, s, src, cos.get(d, 0.0)) for d, s, src in ranked]

    def notes(self, gradients: bool) -> list[str]:
        """Warnings for a query that wants gradients: documents without a current gradient (not
        found by its search) and gradient rows whose document is gone, each with the fix."""
        if not gradients or self.bank is None:
            return []
        from regrad_cli.workspace.status import freshness

        key = (self.store.version, self.bank.version())
        if self._fresh is None or self._fresh[0] != key:
            self._fresh = (key, freshness(self.store, self.bank))
        f = self._fresh[1]
        out = []
        if f["pending"]:
            out.append(f"{f['pending']} document(s) have no gradient yet and are not searched in this mode: "
                       "run `regrad build-bank`")
        if f["stale"]:
            out.append(f"the bank holds {f['stale']} gradient row(s) of documents that were removed or changed "
                       "(never applied): run `regrad build-bank`")
        return out

    def _with_sources(self, hits) -> list[tuple[str, float, str]]:
        rows = self.store.get([d for d, _ in hits], columns=["id", "source"]) if hits else {}
        return [(d, float(score), rows.get(d, {}).get("source", "")) for d, score in hits]

    def cosines(self, qvec, ids: Sequence[str]) -> dict[str, float]:
        """Question-document cosines (the stored embeddings are unit vectors)."""
        if not ids:
            return {}
        rows = self.store.get(list(ids))
        return {d: float(np.asarray(rows[d]["embedding"], dtype=np.float32) @ qvec) for d in ids if d in rows}

    def texts(self, ids: Sequence[str]) -> dict[str, str]:
        return self.store.texts(list(dict.fromkeys(ids))) if ids else {}

    def sources(self, ids: Sequence[str]) -> dict[str, str]:
        rows = self.store.get(list(ids), columns=["id", "source"]) if ids else {}
        return {d: r.get("source", "") for d, r in rows.items()}

    def gradients(self, ids: Sequence[str]):
        """({doc_id: {tensor name: array}}, {doc_id: why it was not decoded}). A row computed
        from another text than the document's (changed since) or whose document is gone is not
        decoded: its gradient would be stale."""
        if self.bank is None:
            return {}, {d: "no gradient bank: run `regrad build-bank`" for d in ids}
        ids = list(ids)
        current = {d: r.get("content_hash") for d, r in self.store.get(ids, columns=["id", "content_hash"]).items()}
        bad = {}
        for d in ids:
            if d not in current:
                bad[d] = "its document is no longer in the workspace: run `regrad build-bank`"
            elif d in self._row_hash and self._row_hash[d] not in (None, current[d]):
                bad[d] = "its document changed after the gradient was computed: run `regrad build-bank`"
        decoded, broken = self.bank.fetch_checked([d for d in ids if d not in bad])
        for d, reason in broken.items():
            bad[d] = (f"no gradient yet: run `regrad build-bank`" if reason.startswith("no row with doc_id")
                      else reason)
        return {d: GradientRow(self.layout, arrays) for d, arrays in decoded.items()}, bad
