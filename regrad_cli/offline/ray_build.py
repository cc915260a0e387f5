"""build-bank --engine ray: the offline half of ReGrad on a Ray cluster.

The driver lists the documents that still need a row (content hash + learner checkpoint, exactly
as the single-process build does) and hands them to a Ray Data pipeline: ``map_batches`` on an
actor pool whose actors load the model and learner once, compute the gradients (the same
``compute_rows`` as the single-process build), encode them and write them as *uncommitted* Lance
fragments straight into the bank (``bank_format.FragmentWriter``). The driver gathers the
fragments' metadata and makes them visible in ONE atomic commit. Until that commit the bank is
exactly as it was: a build that fails or is killed changes nothing a reader can see, and a rerun
does all of the missing work again (the data files written before the failure are unreferenced;
``regrad bank compact`` removes them).

Ray is an optional dependency (``pip install "regrad[scale]"``); it is imported only here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bank_format import CodecSpec, GradientBank
from regrad_cli.offline.build import BuildSummary, build_settings, compute_rows, locked_build, plan_build
from regrad_cli.workspace.banks import bank_meta
from regrad_cli.workspace.config import Workspace
from regrad_cli.workspace.engine import Engine
from regrad_cli.errors import RegradError

log = logging.getLogger("regrad")

# Documents per actor call (and so per written fragment) at most. Calls are also small enough
# that each worker gets about CALLS_PER_WORKER of them: an actor takes one call at a time, so the
# work spreads over the actors as they become free (one big call each would leave the pool
# waiting on whichever actor loaded its model last, or got the longest documents).
MAX_DOCS_PER_CALL = 256
CALLS_PER_WORKER = 4


@dataclass(frozen=True)
class EngineLoader:
    """How an actor loads the engine: the workspace's model and learner checkpoint (picklable).

    It carries the workspace's configuration, not its path: a worker on another node needs the
    model and the checkpoint (bundled, or a directory at the same path), not the workspace."""

    config: dict
    checkpoint: str | None = None
    device: str | None = None

    @classmethod
    def for_workspace(cls, ws: Workspace, checkpoint: str | None = None, device: str | None = None) -> "EngineLoader":
        def absolute(p: str | None) -> str | None:
            # Ray workers run in other directories: relative paths are made absolute here.
            if p and p not in ("bundled", "init") and Path(p).expanduser().exists():
                return str(Path(p).expanduser().resolve())
            return p

        from bank_format.fragments import secret_option

        cfg = ws.config.to_dict()
        # Credentials are not shipped to workers (their environment supplies them).
        opts = cfg.get("bank", {}).get("storage_options") or {}
        cfg.setdefault("bank", {})["storage_options"] = {k: v for k, v in opts.items() if not secret_option(k)}
        cfg["learner"]["checkpoint"] = absolute(cfg["learner"]["checkpoint"])
        cfg["model"]["id"] = absolute(cfg["model"]["id"])
        return cls(cfg, absolute(checkpoint), device)

    def __call__(self) -> Engine:
        from regrad_cli.workspace.config import RegradConfig

        ws = Workspace(Path("."), RegradConfig.from_dict(self.config))
        return Engine.load(ws, checkpoint=self.checkpoint, device=self.device)


class GradientActor:
    """One Ray actor: loads the engine once, then turns batches of documents into fragments."""

    def __init__(self, loader: Callable[[], Engine], writer: Any, layout: list[str], max_tokens: int,
                 batch_size: int, checkpoint_id: str, threads: int, compute_dtype: str = "float32"):
        import torch

        from regrad_cli.learner.gradients import resolve_compute_dtype

        torch.set_num_threads(max(1, threads))
        self.engine = loader()
        got = self.engine.learner.checkpoint_id()
        if got != checkpoint_id:
            raise RegradError(f"a Ray worker loaded learner checkpoint {got[:16]}, the driver {checkpoint_id[:16]}: "
                              "every node must see the same checkpoint and model")
        if writer.secrets_left_out:
            # The driver's credentials were not pickled: this worker's own environment
            # ($REGRAD_BANK_STORAGE_OPTIONS) supplies them, else Lance reads AWS_* itself.
            from regrad_cli.workspace.config import RegradConfig

            mine = Workspace(Path("."), RegradConfig()).bank_storage_options()
            writer = writer.with_storage_options({k: v for k, v in mine.items() if k in writer.secrets_left_out})
            missing = sorted(set(writer.secrets_left_out) - set(mine))
            if missing:
                log.warning("storage options %s are not sent to Ray workers (credentials are never pickled) and "
                            "this worker's $REGRAD_BANK_STORAGE_OPTIONS lacks them: Lance will look in its "
                            "environment (AWS_*...)", ", ".join(missing))
        self.writer, self.layout = writer, layout
        self.max_tokens, self.batch_size = max_tokens, batch_size
        # Resolved here: 'auto' means bf16 on this worker's hardware when it has fast bf16.
        self.dtype = resolve_compute_dtype(compute_dtype, self.engine.model)

    def __call__(self, batch) -> dict:
        docs = batch.to_pylist()
        rows, failed = [], []
        for start in range(0, len(docs), self.batch_size):
            r, f = compute_rows(self.engine, docs[start:start + self.batch_size], self.layout, self.max_tokens,
                                self.dtype)
            rows += r
            failed += f
        fragments = self.writer.write(rows) if rows else []
        return {
            "fragments": [json.dumps(fragments)],
            "keys": [json.dumps([[r["doc_id"], r["content_hash"]] for r in rows])],
            "failed": [json.dumps(failed)],
            "docs": [len(docs)],
            "dtype": [self.dtype],
        }


def _init_ray(address: str | None, workers: int, cpus_per_worker: float, gpus_per_worker: float) -> bool:
    """Join the cluster at ``address`` or start a local one; True when we started it."""
    if address:
        token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token.exists()):
            # Ray 2.60 sends its token to an explicit HOST:PORT only in token mode, read when ray
            # is first imported (measured: otherwise a token-protected cluster answers
            # "InvalidAuthToken" for minutes).
            os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise RegradError('--engine ray needs Ray: pip install "regrad[scale]" (ray[data])') from None
    if ray.is_initialized():
        return False
    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(max(1, int(cpus_per_worker)))}
    # What Engine.load reads on a worker (the bank's location and storage options travel in the
    # FragmentWriter, resolved on the driver).
    for key in ("REGRAD_CACHE_DIR", "HF_HUB_OFFLINE"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    kwargs: dict = {"runtime_env": {"env_vars": env}, "log_to_driver": False, "include_dashboard": False,
                    "logging_level": logging.WARNING}
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:
            raise RegradError(f"cannot join the Ray cluster at {address}: {exc}") from None
        return True
    # A local cluster is regrad's own: always a new one (address "local": a bare ray.init()
    # would join whatever `ray start` cluster runs on this machine), started without the
    # RAY_AUTH_MODE meant for the user's other clusters.
    saved = os.environ.pop("RAY_AUTH_MODE", None)
    try:
        ray.init(address="local", num_cpus=max(1, int(round(workers * cpus_per_worker))),
                 num_gpus=int(round(workers * gpus_per_worker)) or None, **kwargs)
    finally:
        if saved is not None:
            os.environ["RAY_AUTH_MODE"] = saved
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a cluster address nobody answers at (ray.init would retry for minutes)."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RegradError(f"--ray-address {address!r}: expected HOST:PORT, ray://HOST:PORT or 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RegradError(f"cannot reach the Ray cluster at {address}: {exc}") from None


def build_bank_ray(
    ws: Workspace,
    engine: Engine,
    *,
    loader: Callable[[], Engine] | None = None,
    codec: CodecSpec | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    max_tokens: int | None = None,
    workers: int = 2,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    force: bool = False,
    compute_dtype: str | None = None,
) -> BuildSummary:
    """Compute the missing gradients on a Ray actor pool; commit them all at once.

    ``engine`` is the driver's copy (fingerprints, layout, checkpoint id); each actor loads its own
    with ``loader`` (default: the workspace's model and checkpoint, as ``Engine.load``). ``force``
    and ``compute_dtype`` as in ``build_bank`` ('auto' is resolved by each actor for its own
    hardware; the summary lists what they used).
    """
    from regrad_cli.learner.gradients import check_compute_dtype

    if workers < 1 or cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise RegradError("--workers must be >= 1, --cpus-per-worker > 0 and --gpus-per-worker >= 0")
    codec, batch_size, max_tokens = build_settings(ws, codec, batch_size, max_tokens)
    dtype_setting = check_compute_dtype(compute_dtype or ws.config.bank.compute_dtype)
    loader = loader or EngineLoader.for_workspace(ws)
    with locked_build(ws, engine, codec, create=False) as (bank, summary):
        plan = plan_build(ws, engine, bank, limit)
        plan.check_stale(force)
        summary.skipped = plan.skipped
        writer, meta = _fragment_writer(ws, engine, bank, codec, summary.checkpoint_id)
        fragments: list[str] = []
        keys: list[tuple[str, str]] = []
        t0 = time.time()
        if plan.todo:
            started = _init_ray(address, workers, cpus_per_worker, gpus_per_worker)
            try:
                fragments, keys, summary.failed, dtypes = _run_pipeline(
                    plan.todo, loader, writer, plan.layout, max_tokens, batch_size,
                    summary.checkpoint_id, workers, cpus_per_worker, gpus_per_worker, progress, t0,
                    dtype_setting)
                summary.compute_dtype = ",".join(sorted(dtypes))
            finally:
                if started:
                    import ray

                    ray.shutdown()
        bank, summary.built = _commit(ws, bank, writer, meta, fragments, keys, plan.forbidden)
        # After the rows are in: a build that dies between the two commits leaves the stale
        # rows behind (never used for a current document; the rerun removes them).
        plan.bank = bank
        summary.removed_stale = plan.remove_stale(force)
        elapsed = time.time() - t0
        summary.docs_per_s = summary.built / elapsed if elapsed > 0 and summary.built else 0.0
        summary.rows = bank.count()
    return summary


def _fragment_writer(ws: Workspace, engine: Engine, bank: GradientBank | None, codec: CodecSpec, checkpoint_id: str):
    """(writer, metadata): the bank's fragment writer, or for a bank not created yet one whose
    metadata and first rows go in one commit (``_commit``)."""
    if bank is not None:
        return bank.fragment_writer(), None
    from bank_format import FragmentWriter
    from regrad_cli.workspace.documents import DocumentStore

    meta = bank_meta(engine, DocumentStore(ws).embedder_fingerprint, codec)
    return FragmentWriter(ws.bank_path(checkpoint_id), meta, ws.bank_storage_options()), meta


def _commit(ws: Workspace, bank: GradientBank | None, writer, meta, fragments: list[str], keys: list,
            forbidden: Callable[[], set]) -> tuple[GradientBank, int]:
    """Make the workers' fragments visible in one commit (creating the bank with them when it is
    new), leaving out documents unlearned while the build ran; (bank, rows built)."""
    if bank is None:
        bank = GradientBank.create_from_fragments(writer.location, meta, fragments, keys=keys,
                                                  storage_options=ws.bank_storage_options())
        built = len(keys)
        with bank.locked():  # documents unlearned while the build ran
            gone = sorted({d for d, _ in keys} & forbidden())
            if gone:
                built -= bank.delete(doc_ids=gone)
                bank.purge()
        return bank, built
    version = bank.version()
    try:
        return bank, bank.commit_fragments(fragments, keys=keys, forbidden=forbidden)
    except Exception as exc:
        raise RegradError(f"cannot commit the new rows to bank {bank.uri}: {exc}; the bank is unchanged "
                          f"(version {version}): run `regrad build-bank --engine ray` again") from exc


def _run_pipeline(todo, loader, writer, layout, max_tokens, batch_size, checkpoint_id, workers,
                  cpus_per_worker, gpus_per_worker, progress, t0, compute_dtype="float32"):
    import numpy as np
    import pyarrow as pa
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # (ray.data sets its own level on import)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # regrad's own bar (or --json) reports progress
    per_call = min(MAX_DOCS_PER_CALL, max(batch_size, -(-len(todo) // (workers * CALLS_PER_WORKER))))
    dim = len(todo[0]["embedding"])
    table = pa.table({
        "id": [d["id"] for d in todo],
        "content_hash": [d["content_hash"] for d in todo],
        "text": [d["text"] for d in todo],
        "source": [d.get("source") or "" for d in todo],
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.asarray([d["embedding"] for d in todo], dtype=np.float32).reshape(-1)), dim),
    })
    # One block per actor call: no repartition step (an all-to-all task would need a CPU that
    # the actors hold, and wait for ever on a cluster they fill).
    ds = ray.data.from_arrow([table.slice(i, per_call) for i in range(0, len(todo), per_call)])
    out = ds.map_batches(
        GradientActor,
        fn_constructor_args=(loader, writer, layout, max_tokens, batch_size, checkpoint_id, int(max(1, cpus_per_worker)),
                             compute_dtype),
        batch_size=per_call,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(workers, -(-len(todo) // per_call)),
                                           max_tasks_in_flight_per_actor=1),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
    )
    fragments: list[str] = []
    keys: list[tuple[str, str]] = []
    failed: list[dict] = []
    dtypes: set[str] = set()
    done = 0
    if progress:
        progress(0, len(todo), 0.0)
    try:
        for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            for frag_json, key_json, fail_json, n, dt in zip(*(batch.column(c).to_pylist() for c in
                                                               ("fragments", "keys", "failed", "docs", "dtype"))):
                dtypes.add(dt)
                fragments += json.loads(frag_json)
                keys += [tuple(k) for k in json.loads(key_json)]
                failed += json.loads(fail_json)
                done += n
            if progress:
                elapsed = time.time() - t0
                progress(done, len(todo), len(keys) / elapsed if elapsed > 0 else 0.0)
    except RegradError:
        raise
    except Exception as exc:
        cause = _root_cause(exc)
        raise RegradError(f"the Ray build failed before its commit, the bank is unchanged: {cause}") from exc
    return fragments, keys, failed, dtypes


def _root_cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # Ray wraps a worker's error in several layers; its last line names the original one.
    return (text[-1] if text else type(exc).__name__)[:500]
