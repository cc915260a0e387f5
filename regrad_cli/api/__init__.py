"""The whole workflow from Python: ``Regrad`` (``from regrad_cli import Regrad``).

One object per workspace directory, doing what the CLI does with the same settings (its
regrad.toml, ``[query]`` included) and the same checks::

    from regrad_cli import Regrad

    rg = Regrad("my-workspace")              # created on first use, like `regrad ingest`
    rg.ingest("notes/")                      # incremental, like `regrad ingest notes/`
    rg.build_bank()                          # like `regrad build-bank`
    rg.query("Who founded the Tessaly Guild?")["answer"]
    rg.status()["pending"]                   # like `regrad status --json`

The language model and embedder load once, on the first call that needs them, and are kept
for the object's life; results are the dicts the CLI prints with ``--json``. Errors are
``regrad_cli.RegradError`` (``FieldError`` for a bad option, naming it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

QUERY_OPTIONS = ("mode", "top_k", "gamma", "combine", "retriever", "max_new_tokens", "min_score", "show_docs")


class Regrad:
    """A regrad workspace and everything loaded for it.

    ``path``: the workspace directory (default: $REGRAD_WORKSPACE or ./.regrad). ``model`` and
    ``embedder`` name the models of a *new* workspace (checked by loading them before its
    regrad.toml is written); for an existing one they apply to this object only, as the CLI's
    --model/--embedder do for one run (checked at once, never saved). ``create=False`` refuses a
    directory that is not a workspace yet. ``checkpoint`` and ``device`` are as the CLI's
    ``--checkpoint`` and ``--device``."""

    def __init__(self, path: "str | os.PathLike | None" = None, *, model: str | None = None,
                 embedder: str | None = None, create: bool = True, checkpoint: str | None = None,
                 device: str | None = None):
        from regrad_cli.lm.models import load_checked
        from regrad_cli.workspace.config import Workspace

        self._loaded: dict = {}
        self.ws = Workspace.open(path, create=create, overrides={"model.id": model, "embedder.id": embedder},
                                 check=lambda c: self._loaded.update(
                                     load_checked(c.model.id, c.embedder.id, c.embedder.batch_size)))
        self.checkpoint, self.device = checkpoint, device
        self._engine = None  # the language model with its learner (Engine), once loaded
        self._query = None  # the QueryEngine over the current documents and bank

    @property
    def root(self) -> Path:
        return self.ws.root

    # Loading, once ----------------------------------------------------------------------------
    def _embedder(self):
        if "embedder" not in self._loaded:
            from regrad_cli.lm.models import Embedder

            cfg = self.ws.config
            self._loaded["embedder"] = Embedder(cfg.embedder.id, device=self.device or cfg.model.device,
                                                batch_size=cfg.embedder.batch_size)
        return self._loaded["embedder"]

    def _lm(self):
        if self._engine is None:
            from regrad_cli.workspace.engine import Engine

            self._engine = Engine.load(self.ws, checkpoint=self.checkpoint, device=self.device)
        return self._engine

    def _stale(self) -> None:
        self._query = None  # documents or bank changed: the next query opens them again

    # The workflow ----------------------------------------------------------------------------
    def ingest(self, *paths: "str | os.PathLike", prune: bool = False, force: bool = False,
               readmit: bool = False) -> dict:
        """Ingest files and folders (`regrad ingest PATH... [--prune]`); returns its summary."""
        from regrad_cli.errors import IngestError
        from regrad_cli.offline.ingest import ingest

        if not paths:
            raise IngestError("give at least one file or folder to ingest")
        tok = self._loaded.get("tokenizer") or (self._engine.tokenizer if self._engine is not None else None)
        summary = ingest(self.ws, [Path(p) for p in paths], prune=prune, force=force, readmit=readmit,
                         embedder=self._embedder(), tokenizer=tok)
        self._stale()
        if not summary.ok:
            raise IngestError(f"nothing could be ingested ({len(summary.skipped)} path(s) skipped)")
        return summary.to_dict()

    def build_bank(self, *, limit: int | None = None, force: bool = False, compute_dtype: str | None = None,
                   batch_size: int | None = None) -> dict:
        """Compute the gradients of the documents that lack one (`regrad build-bank`)."""
        from regrad_cli.offline.build import build_bank

        summary = build_bank(self.ws, self._lm(), limit=limit, force=force, compute_dtype=compute_dtype,
                             batch_size=batch_size)
        self._stale()
        return summary.to_dict()

    def _query_engine(self):
        if self._query is None:
            from regrad_cli.online.query import QueryEngine

            self._query = QueryEngine(self.ws, engine=self._lm(), embedder=self._embedder(), need_bank=False)
        return self._query

    def _request(self, question: str, options: dict):
        from regrad_cli.errors import FieldError
        from regrad_cli.online.modes import check_options
        from regrad_cli.online.pipeline import Request

        unknown = sorted(set(options) - set(QUERY_OPTIONS))
        if unknown:
            raise FieldError(unknown[0], f"unknown option (use {', '.join(QUERY_OPTIONS)})")
        given = {k: v for k, v in options.items() if v is not None}
        check_options(**{k: v for k, v in given.items() if k != "show_docs"})  # named as given
        opts = self.ws.config.query.request_options(**{k: given.get(k) for k in (
            "mode", "top_k", "gamma", "combine", "retriever", "max_new_tokens")})
        check_options(**opts)  # the workspace's settings too
        return Request(question, show_docs=bool(given.get("show_docs", False)), min_score=given.get("min_score"),
                       **opts)

    def query(self, question: str, **options) -> dict:
        """Answer one question (`regrad query QUESTION --json`). ``options``: mode, top_k, gamma,
        combine, retriever, max_new_tokens, min_score, show_docs; each left out takes the
        workspace's ``[query]`` setting."""
        return self.query_many([question], **options)[0]

    def query_many(self, questions: Sequence[str], **options) -> list[dict]:
        """Answer several questions in one batched generation call (as `regrad query --batch`)."""
        reqs = [self._request(q, options) for q in questions]  # every option checked before any load
        if not reqs:
            return []
        return self._query_engine().answer_many(reqs)

    def status(self) -> dict:
        """Documents, chunks, rows, pending and stale counts, fingerprints (`regrad status --json`)."""
        from regrad_cli.workspace.status import workspace_status

        return workspace_status(self.ws)

    def documents(self, source: str | None = None) -> list[dict]:
        """One entry per document with its chunk ids (`regrad docs ls --json`)."""
        from regrad_cli.workspace.status import list_documents

        return list_documents(self.ws, source)

    def remove(self, *doc_ids: str, sources: Iterable[str] = (), keep_documents: bool = False) -> dict:
        """Unlearn documents: their gradients and texts, for good (`regrad bank rm`)."""
        from regrad_cli.offline.unlearn import remove_documents

        out = remove_documents(self.ws.root, None, list(doc_ids), list(sources), keep_documents=keep_documents)
        self._stale()
        return out

    def __repr__(self) -> str:
        return f"Regrad({str(self.root)!r})"
