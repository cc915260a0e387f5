"""Ray build: `build-bank --engine ray` (local Ray cluster, N workers) against the single-process
build of the same corpus, measured in the same run.

Each build starts from an empty bank (same workspace, same documents, same learner). The Ray
figures are end to end, as a user sees them: starting the local cluster, each actor loading the
model and learner, computing, writing fragments and the one commit. Every Ray bank is compared
with the single-process bank: same keys and metadata, and its decoded gradients (max abs
difference, min cosine per document).

``ratio_vs_single`` = Ray docs/s / single-process docs/s (> 1: Ray is faster).
"""

from __future__ import annotations

import shutil

from _common import (
    DEMO_CORPUS,
    checkpoint_info,
    emit,
    ingest_workspace,
    load_engine,
    log,
    machine,
    make_corpus_copies,
    parser,
    print_table,
    setup,
    temp_dir,
    timer,
)


def compare(local, other) -> dict:
    import numpy as np

    ids = sorted(k[0] for k in local.keys())
    same_keys = local.keys() == other.keys()
    a, b = local.fetch(ids), other.fetch(ids)
    worst, cos = 0.0, 1.0
    for d in ids:
        x = np.concatenate([t.ravel() for t in a[d]])
        y = np.concatenate([t.ravel() for t in b[d]])
        worst = max(worst, float(np.abs(x - y).max()))
        cos = min(cos, float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    same_meta = all(getattr(local.meta, f) == getattr(other.meta, f)
                    for f in ("model", "learner", "embedder", "layout", "codec", "format_version"))
    return {"same_keys": same_keys, "same_fingerprints": same_meta, "max_abs_diff": worst, "min_cosine": cos,
            "verify_ok": other.verify()["ok"] == other.count()}


def main() -> None:
    p = parser(__doc__.splitlines()[0], checkpoint=True)
    p.add_argument("--copies", type=int, default=None, help="copies of the demo corpus (default: 1 quick, 3 full)")
    p.add_argument("--workers", default="1,2", help="Ray worker counts to run, comma-separated (default 1,2)")
    args = p.parse_args()
    setup(args)

    from bank_format import GradientBank
    from regrad_cli.offline.build import build_bank
    from regrad_cli.offline.ray_build import EngineLoader, build_bank_ray

    copies = args.copies or (1 if args.quick else 3)
    worker_counts = [int(w) for w in args.workers.split(",")]
    with temp_dir("regrad-bench-ray-") as tmp:
        corpus = DEMO_CORPUS if copies == 1 else make_corpus_copies(tmp / "corpus", copies)
        log(f"ingesting {copies} cop{'y' if copies == 1 else 'ies'} of the demo corpus")
        ws = ingest_workspace(tmp / "ws", corpus)
        engine = load_engine(args.checkpoint, ws)
        bank_dir = ws.bank_path(engine.learner.checkpoint_id())
        log("single-process build (baseline)")
        with timer() as t:
            s = build_bank(ws, engine)
        n = s.built
        runs = [{"engine": "single process", "workers": 1, "wall_s": t["s"], "docs_per_s": n / t["s"]}]
        local_copy = tmp / "local-bank"
        shutil.move(str(bank_dir), local_copy)
        local = GradientBank.open(local_copy, read_only=True)
        loader = EngineLoader.for_workspace(ws, args.checkpoint)
        for w in worker_counts:
            shutil.rmtree(ws.banks_dir, ignore_errors=True)
            log(f"Ray build, {w} worker(s) of 1 CPU")
            with timer() as t:
                r = build_bank_ray(ws, engine, loader=loader, workers=w, cpus_per_worker=1)
            if r.built != n or r.failed:
                raise SystemExit(f"Ray build built {r.built} of {n}: {r.failed}")
            runs.append({"engine": "ray", "workers": w, "wall_s": t["s"], "docs_per_s": n / t["s"],
                         **compare(local, GradientBank.open(bank_dir, read_only=True))})
        info = checkpoint_info(engine)

    base = runs[0]["docs_per_s"]
    for r in runs:
        r["ratio_vs_single"] = r["docs_per_s"] / base
    print_table(f"build-bank on {n} demo documents: single process vs local Ray",
                ["engine", "workers", "wall s", "docs/s", "x single", "max |diff|", "min cosine", "same keys+fps"],
                [[r["engine"], r["workers"], r["wall_s"], r["docs_per_s"], r["ratio_vs_single"],
                  r.get("max_abs_diff", "-"), r.get("min_cosine", "-"),
                  r.get("same_keys", True) and r.get("same_fingerprints", True)] for r in runs])
    ray_runs = [r for r in runs if r["engine"] == "ray"]
    emit({"benchmark": "ray_build", "machine": machine(), "learner": info, "documents": n, "runs": runs,
          "ratio_vs_single": max(r["ratio_vs_single"] for r in ray_runs),
          "worker_scaling": (ray_runs[-1]["docs_per_s"] / ray_runs[0]["docs_per_s"]) if len(ray_runs) > 1 else None},
         args.out, args)


if __name__ == "__main__":
    main()
