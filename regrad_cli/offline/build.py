"""build-bank: the offline half of ReGrad.

For every ingested document without a bank row for its (doc id, content hash), compute g_d under
the current learner checkpoint, encode it and append it. Each appended batch is one atomic LanceDB
commit, so a build killed at any moment leaves only whole rows; a rerun lists the keys already
present and does only the missing work. One bank per learner checkpoint (workspace/banks/bank-<id>):
a bank is never mixed across checkpoints. The bank's build lease keeps two builds off one bank and
tells maintenance that uncommitted files may be in flight (bank_format.lance_ops).

A build removes the rows of documents its workspace no longer has ("stale" rows); removing more
than ``FEW_ROWS`` rows of documents that are gone altogether (not just changed) needs ``force``,
so an emptied or wrongly pointed workspace cannot wipe a bank. Documents unlearned with
``regrad bank rm`` (tombstoned) are never computed, and a removal that happens while the build
runs is honoured at each commit (regrad_cli.offline.unlearn).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from bank_format import CodecSpec, GradientBank
from regrad_cli.errors import RegradError
from regrad_cli.workspace.banks import bank_meta, open_checkpoint_bank, row_norm
from regrad_cli.workspace.config import Workspace
from regrad_cli.workspace.engine import Engine

log = logging.getLogger("regrad")


@dataclass
class BuildSummary:
    built: int = 0
    skipped: int = 0
    removed_stale: int = 0
    failed: list = field(default_factory=list)
    docs_per_s: float = 0.0
    bank: str = ""
    rows: int = 0
    checkpoint_id: str = ""
    compute_dtype: str = ""

    def to_dict(self) -> dict:
        return {"built": self.built, "skipped": self.skipped, "removed_stale": self.removed_stale,
                "failed": self.failed, "docs_per_s": round(self.docs_per_s, 3), "bank": self.bank,
                "rows": self.rows, "checkpoint_id": self.checkpoint_id, "compute_dtype": self.compute_dtype}


# Rows of documents that are gone from the workspace a build may remove without ``force``.
FEW_ROWS = 10


def open_or_create_bank(ws: Workspace, engine: Engine, embedder_fp: dict, codec: CodecSpec,
                        create: bool = True) -> GradientBank | None:
    """The bank of this workspace and learner checkpoint; created when missing (else None when
    ``create`` is False: the Ray engine creates a new bank together with its rows, in one commit)."""
    bank = open_checkpoint_bank(ws, engine, embedder_fp, read_only=False)
    if bank is not None or not create:
        return bank
    path, opts = ws.bank_path(engine.learner.checkpoint_id()), ws.bank_storage_options()
    if not isinstance(path, str):
        path.parent.mkdir(parents=True, exist_ok=True)
    return GradientBank.create(path, bank_meta(engine, embedder_fp, codec), storage_options=opts)


def build_lock(ws: Workspace, location):
    """The build lease of the bank at ``location``: beside a local bank; for an object-store
    bank, on this machine (it then guards this machine only: see docs/scaling.md)."""
    return GradientBank.build_lease(location)


def build_settings(ws: Workspace, codec: CodecSpec | None, batch_size: int | None,
                   max_tokens: int | None) -> tuple[CodecSpec, int, int]:
    """The codec, batch size and token limit of a build: the arguments, else the workspace's."""
    bcfg = ws.config.bank
    codec = codec or CodecSpec(name=bcfg.codec, zstd_level=bcfg.zstd_level, group_size=bcfg.group_size)
    return codec, batch_size or bcfg.batch_size, max_tokens or bcfg.max_doc_tokens


def build_dtype(ws: Workspace, engine: Engine, compute_dtype: str | None) -> str:
    """The precision a build computes gradients in ('float32' or 'bfloat16'): the argument, else
    the workspace's ``bank.compute_dtype``, with 'auto' resolved for this model and device."""
    from regrad_cli.learner.gradients import resolve_compute_dtype

    return resolve_compute_dtype(compute_dtype or ws.config.bank.compute_dtype, engine.model)


@contextmanager
def locked_build(ws: Workspace, engine: Engine, codec: CodecSpec,
                 create: bool = True) -> Iterator[tuple[GradientBank | None, "BuildSummary"]]:
    """The bank a build writes to (None for a missing bank when ``create`` is False) and a fresh
    summary, held under the build lock (refused at once when another build holds it)."""
    from filelock import Timeout

    from regrad_cli.workspace.banks import refuse_linked_banks_dir

    refuse_linked_banks_dir(ws)  # before the lease file is made beside the bank
    location = ws.bank_path(engine.learner.checkpoint_id())
    lock = build_lock(ws, location)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RegradError(f"another `regrad build-bank` is running on {location}; wait for it to finish") from None
    try:
        bank = open_build_bank(ws, engine, codec, create=create)
        yield bank, BuildSummary(bank=str(location), checkpoint_id=engine.learner.checkpoint_id())
    finally:
        lock.release()


@dataclass
class BuildPlan:
    """What a build will do: the bank, the documents to compute, the stale keys to drop."""

    bank: GradientBank
    todo: list
    current: set
    stale: set
    skipped: int
    layout: list
    forbidden: Callable[[], set] = lambda: set()  # doc ids unlearned: never committed

    def check_stale(self, force: bool) -> None:
        """Refuse to delete more than FEW_ROWS rows of documents that are gone altogether (not
        just changed) unless ``force``."""
        ids = {d for d, _ in self.current} | self.forbidden()  # unlearned rows: meant to go
        gone = sorted({d for d, _ in self.stale if d not in ids})
        if len(gone) > FEW_ROWS and not force:
            raise RegradError(
                f"this build would delete the gradients of {len(gone)} documents that are no longer in "
                f"the workspace (e.g. {gone[0]!r}) from bank {self.bank.path}; if they were removed on "
                f"purpose, run `regrad build-bank --force` (is the workspace the one the bank belongs to?)"
            )

    def remove_stale(self, force: bool) -> int:
        """Delete the stale rows (one commit), after ``check_stale``; returns the rows deleted."""
        if not self.stale:
            return 0
        self.check_stale(force)
        return self.bank.delete(keep_keys=self.current)


def open_build_bank(ws: Workspace, engine: Engine, codec: CodecSpec, create: bool = True) -> GradientBank | None:
    """The bank a build writes to (created on first use unless ``create`` is False); refuses a
    workspace without documents."""
    from regrad_cli.workspace.documents import DocumentStore

    store = DocumentStore(ws)
    if store.count() == 0:
        raise RegradError(f"workspace {ws.root} has no documents: run `regrad ingest PATH` first")
    return open_or_create_bank(ws, engine, store.embedder_fingerprint, codec, create=create)


def plan_build(ws: Workspace, engine: Engine, bank: GradientBank | None, limit: int | None) -> BuildPlan:
    """List the documents that lack a row in ``bank`` (all of them for a bank not created yet)
    and the rows whose document is gone."""
    from regrad_cli.workspace.documents import DocumentStore
    from regrad_cli.workspace.tombstones import Tombstones, forbidden_ids

    store = DocumentStore(ws)
    layout = [name for name, _ in engine.stored_tensors()]
    if bank is not None and [t.name for t in bank.meta.layout] != layout:
        raise RegradError(f"bank {bank.path} stores another tensor layout than this learner; "
                          "remove it or use a fresh workspace")
    if bank is not None and bank.meta.row_norm != row_norm(engine):
        raise RegradError(f"bank {bank.path} stores rows with normalisation {bank.meta.row_norm or 'none'}, "
                          f"this regrad writes {row_norm(engine) or 'none'} for this learner; remove the bank "
                          "(`rm -r` its directory) and run `regrad build-bank` again")
    tombs = Tombstones(ws).load()
    docs = [d for d in store.all(columns=["id", "content_hash", "text", "embedding", "source"])
            if d["id"] not in tombs["ids"] and d.get("source") not in tombs["sources"]]
    current = {(d["id"], d["content_hash"]) for d in docs}
    existing = bank.keys() if bank is not None else set()
    stale = existing - current
    existing &= current
    todo = [d for d in docs if (d["id"], d["content_hash"]) not in existing]
    skipped = len(docs) - len(todo)
    if limit is not None:
        todo = todo[: max(0, limit)]
    # Similar lengths in a batch waste less compute on padding.
    todo.sort(key=lambda d: len(d["text"]))
    return BuildPlan(bank, todo, current, stale, skipped, layout, forbidden_ids(ws))


def compute_rows(engine: Engine, batch: list[dict], layout: list[str], max_tokens: int,
                 compute_dtype: str = "float32") -> tuple[list[dict], list[dict]]:
    """Gradients of one batch of documents as bank rows, computed in ``compute_dtype`` (resolved:
    see ``build_dtype``); returns (rows, failed).

    A batch that fails (out of memory on one huge batch, say) is retried one document at a time;
    a document whose gradient fails or is not finite is reported in ``failed``, not written."""
    from regrad_cli.learner.gradients import document_gradients

    failed: list[dict] = []
    try:
        grads, n_tokens = document_gradients(engine.model, engine.learner, engine.tokenizer,
                                             [d["text"] for d in batch], max_tokens, compute_dtype)
    except RuntimeError as exc:
        log.warning("batch failed (%s); retrying its documents one by one", exc)
        grads, n_tokens, ok_batch = [], [], []
        for d in batch:
            try:
                g, n = document_gradients(engine.model, engine.learner, engine.tokenizer, [d["text"]],
                                          max_tokens, compute_dtype)
                grads += g
                n_tokens += n
                ok_batch.append(d)
            except RuntimeError as exc1:
                failed.append({"doc_id": d["id"], "error": str(exc1)[:200]})
        batch = ok_batch
    norm = row_norm(engine)
    rows = []
    for d, g, n in zip(batch, grads, n_tokens):
        if norm is not None:  # over every tensor of the learner, stored or not (see row_norm)
            from regrad_cli.learner import adapt
            g = {k: v[0] for k, v in adapt.normalise({k: v.unsqueeze(0) for k, v in g.items()}, norm).items()}
        tensors = [g[name].detach().cpu().numpy().astype(np.float32, copy=False) for name in layout]
        if not all(np.isfinite(t).all() for t in tensors):
            failed.append({"doc_id": d["id"], "error": "non-finite gradient"})
            continue
        rows.append({"doc_id": d["id"], "content_hash": d["content_hash"],
                     "embedding": np.asarray(d["embedding"], dtype=np.float32),
                     "tensors": tensors, "n_tokens": int(n), "source": d.get("source") or ""})
    return rows, failed


def build_bank(
    ws: Workspace,
    engine: Engine,
    *,
    codec: CodecSpec | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    max_tokens: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    force: bool = False,
    compute_dtype: str | None = None,
) -> BuildSummary:
    """Compute and store the gradient of every document that lacks one (single process).

    ``force`` lets it remove the rows of more than ``FEW_ROWS`` documents gone from the workspace;
    ``compute_dtype`` (auto, float32, bfloat16) overrides the workspace's ``bank.compute_dtype``."""
    codec, batch_size, max_tokens = build_settings(ws, codec, batch_size, max_tokens)
    dtype = build_dtype(ws, engine, compute_dtype)
    with locked_build(ws, engine, codec) as (bank, summary):
        summary.compute_dtype = dtype
        plan = plan_build(ws, engine, bank, limit)
        # Changed or deleted documents: their old gradients must not be retrieved any more.
        summary.removed_stale = plan.remove_stale(force)
        todo, layout = plan.todo, plan.layout
        summary.skipped = plan.skipped
        t0 = time.time()
        if progress:
            progress(0, len(todo), 0.0)
        for start in range(0, len(todo), batch_size):
            rows, failed = compute_rows(engine, todo[start:start + batch_size], layout, max_tokens, dtype)
            summary.failed += failed
            if rows:
                try:
                    summary.built += append_rows(bank, rows, plan.forbidden, summary.failed)
                except OSError as exc:  # e.g. a full disk; each append is atomic, so the bank is clean
                    raise RegradError(
                        f"cannot write to bank {bank.path}: {exc}; every row written before is kept "
                        f"({summary.built} in this run): run `regrad build-bank` again to continue"
                    ) from exc
            elapsed = time.time() - t0
            if progress:
                progress(min(start + batch_size, len(todo)), len(todo),
                         summary.built / elapsed if elapsed > 0 else 0.0)
        elapsed = time.time() - t0
        summary.docs_per_s = summary.built / elapsed if elapsed > 0 and summary.built else 0.0
        summary.rows = bank.count()
    return summary


def append_rows(bank: GradientBank, rows: list[dict], forbidden, failed: list) -> int:
    """Append one batch (one commit); a row the bank refuses (say, an id it cannot store) is
    reported in ``failed`` on its own instead of failing the batch and every later build."""
    from bank_format import BankFormatError

    try:
        return bank.append(rows, forbidden=forbidden)
    except BankFormatError:
        good = []
        for r in rows:
            try:
                bank.rows_table([r])
                good.append(r)
            except BankFormatError as exc:
                failed.append({"doc_id": r["doc_id"], "error": f"refused by the bank: {str(exc)[:200]}"})
        if len(good) == len(rows):
            raise  # not a row's fault
    return bank.append(good, forbidden=forbidden) if good else 0
