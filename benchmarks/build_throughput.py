"""Build throughput: documents/s of the real ``build_bank`` against a bare per-document loop.

The bare loop is the minimum work a bank needs: for each document (tokenised beforehand), one
forward of the model with the LoRA side path on phi and ``loss.backward()`` into phi, nothing
else (no per-sample copies, no encoding, no LanceDB). ``build_bank`` runs on a fresh bank of a
fresh workspace (the demo corpus ingested through ``regrad_cli.offline.ingest``; ``--copies N`` in full
mode ingests N distinct copies), once per batch size. The bare loop runs before and after the
builds; its mean is the baseline, so slow drift in machine load hits both sides alike. Builds run
in increasing batch size: freed memory stays in the process (allocator), so each peak RSS is
that of the largest batch so far.

Everything runs once per torch thread count (``--thread-counts``, default 1 and every core), in
one process; each count has its own bare-loop baseline. tokens/s counts the documents' real tokens.

Builds run once per compute dtype too (``--compute-dtypes``, default: the default 'auto' as it
resolves on this machine, and float32): 'auto' is bf16 autocast where bf16 products are native
(AVX512-BF16/AMX CPUs, CUDA). The baseline bare loop is float32, what a bank needs at full
precision; the bare loop in bf16 runs too (``bare_bf16_docs_per_s``), so the gain of the build
over the same passes in bf16 is reported next to it.

``ratio_vs_bare_loop`` = build docs/s at the default settings (BankConfig: batch size, compute
dtype) and torch's default thread count / float32 bare-loop docs/s at the same thread count.
"""

from __future__ import annotations

import shutil
import sys

from _common import (
    DEMO_CORPUS,
    PeakRSS,
    checkpoint_info,
    emit,
    ingest_workspace,
    load_engine,
    log,
    machine,
    make_corpus_copies,
    max_rss_mb,
    parser,
    print_table,
    rss_mb,
    setup,
    temp_dir,
    timer,
)


def main() -> None:
    p = parser(__doc__.splitlines()[0], checkpoint=True)
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default: 1,4,8,16; full adds 32)")
    p.add_argument("--docs", type=int, default=None, help="documents per build (default: 16 quick, all full)")
    p.add_argument("--copies", type=int, default=None, help="copies of the demo corpus (default: 1 quick, 4 full)")
    p.add_argument("--thread-counts", default=None,
                   help="torch thread counts to measure, comma-separated (default: 1 and torch's default)")
    p.add_argument("--compute-dtypes", default="auto,float32",
                   help="build compute dtypes, comma-separated (auto, float32, bfloat16; default auto,float32)")
    args = p.parse_args()
    setup(args)
    import torch

    default_threads = torch.get_num_threads()
    thread_counts = [int(t) for t in args.thread_counts.split(",")] if args.thread_counts else \
        list(dict.fromkeys([1, default_threads]))

    from regrad_cli.offline.build import build_bank
    from regrad_cli.workspace.config import BankConfig
    from regrad_cli.workspace.documents import DocumentStore
    from regrad_cli.learner.gradients import compute_context, document_gradients, resolve_compute_dtype
    from regrad_cli.lm.tokens import encode_documents, per_sample_nll

    default_batch = BankConfig().batch_size
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else (
        [1, 4, 8] if args.quick else [1, 4, 8, 16, 32])
    batch_sizes = sorted(set(batch_sizes) | {default_batch})
    copies = args.copies or (1 if args.quick else 4)
    n_docs = args.docs or (16 if args.quick else None)
    max_tokens = BankConfig().max_doc_tokens

    with temp_dir("regrad-bench-build-") as tmp:
        corpus = DEMO_CORPUS if copies == 1 else make_corpus_copies(tmp / "corpus", copies)
        log(f"ingesting {copies} cop{'y' if copies == 1 else 'ies'} of the demo corpus into a fresh workspace")
        ws = ingest_workspace(tmp / "ws", corpus)
        log("loading model and learner")
        engine = load_engine(args.checkpoint, ws)
        model, tok, learner = engine.model, engine.tokenizer, engine.learner
        # The same documents, in the same order, as build_bank's to-do list (store order, limit).
        docs = DocumentStore(ws).all(columns=["id", "content_hash", "text"])
        docs = docs[:n_docs] if n_docs else docs
        texts = [d["text"] for d in docs]
        encoded = [encode_documents(tok, [t], max_tokens) for t in texts]
        n_tokens = sum(e.n_tokens[0] for e in encoded)

        phi = list(learner.phi.parameters())
        was = [q.requires_grad for q in phi]

        default_dtype = resolve_compute_dtype(BankConfig().compute_dtype, model)
        dtypes = list(dict.fromkeys(resolve_compute_dtype(d.strip(), model) for d in args.compute_dtypes.split(",")))

        def bare_loop(dtype: str = "float32") -> tuple[float, float]:
            for q in phi:
                q.requires_grad_(True)
            learner.use(None)
            try:
                with PeakRSS() as mem, timer() as t, compute_context(model, dtype):
                    for e in encoded:
                        per_sample_nll(model, e.input_ids, e.attention_mask).sum().backward()
            finally:
                for q, w in zip(phi, was):
                    q.grad = None
                    q.requires_grad_(w)
            return len(encoded) / t["s"], mem.peak_mb

        log("warm-up (excluded)")
        bare_loop_warm = encoded[:1]
        e = bare_loop_warm[0]
        for q in phi:
            q.requires_grad_(True)
        per_sample_nll(model, e.input_ids, e.attention_mask).sum().backward()
        for q, w in zip(phi, was):
            q.grad = None
            q.requires_grad_(w)
        for dtype in dtypes:  # the first bf16 pass sets up its kernels
            document_gradients(model, learner, tok, texts[:2], max_tokens, dtype)

        base_rss = rss_mb()
        per_threads = []
        for threads in thread_counts:
            torch.set_num_threads(threads)
            log(f"{threads} thread(s): bare loop over {len(texts)} documents (before)")
            bare_before, bare_rss_1 = bare_loop()
            bf16_before = bare_loop("bfloat16")[0] if "bfloat16" in dtypes else None
            builds = []
            for dtype in dtypes:
                for bs in batch_sizes:
                    shutil.rmtree(ws.banks_dir, ignore_errors=True)
                    log(f"{threads} thread(s): build_bank batch size {bs}, {dtype}")
                    with PeakRSS() as mem, timer() as t:
                        summary = build_bank(ws, engine, batch_size=bs, limit=n_docs, compute_dtype=dtype)
                    if summary.built != len(texts) or summary.failed or summary.compute_dtype != dtype:
                        raise SystemExit(f"build_bank built {summary.built} of {len(texts)} in "
                                         f"{summary.compute_dtype}: {summary.failed}")
                    builds.append({"batch_size": bs, "compute_dtype": dtype, "docs_per_s": summary.built / t["s"],
                                   "tokens_per_s": n_tokens / t["s"],
                                   "docs_per_s_inner": summary.docs_per_s, "wall_s": t["s"],
                                   "peak_rss_mb": mem.peak_mb, "peak_rss_over_base_mb": mem.peak_mb - base_rss})
            log(f"{threads} thread(s): bare loop over {len(texts)} documents (after)")
            bf16_after = bare_loop("bfloat16")[0] if "bfloat16" in dtypes else None
            bare_after, _ = bare_loop()
            bare = (bare_before + bare_after) / 2
            bare16 = (bf16_before + bf16_after) / 2 if bf16_before else None
            for b in builds:
                b["ratio_vs_bare_loop"] = b["docs_per_s"] / bare
                same = bare16 if b["compute_dtype"] == "bfloat16" else bare
                b["ratio_vs_bare_loop_same_dtype"] = b["docs_per_s"] / same if same else None
            per_threads.append({"threads": threads, "bare_docs_per_s": bare, "bare_tokens_per_s": bare * n_tokens / len(texts),
                                "bare_before_after": [bare_before, bare_after], "bare_peak_rss_mb": bare_rss_1,
                                "bare_bf16_docs_per_s": bare16,
                                "bare_bf16_before_after": [bf16_before, bf16_after] if bf16_before else None,
                                "builds": builds})
        shutil.rmtree(ws.banks_dir, ignore_errors=True)
        info = checkpoint_info(engine)

    for r in per_threads:
        print_table(
            f"{r['threads']} thread(s): build throughput, {len(texts)} demo documents ({n_tokens / len(texts):.0f} tokens "
            f"each on average, max {max_tokens}); bare loop {r['bare_docs_per_s']:.3f} docs/s, "
            f"{r['bare_tokens_per_s']:.0f} tokens/s (before {r['bare_before_after'][0]:.3f}, after {r['bare_before_after'][1]:.3f})"
            + (f"; bf16 bare loop {r['bare_bf16_docs_per_s']:.3f} docs/s" if r["bare_bf16_docs_per_s"] else ""),
            ["batch size", "compute", "docs/s", "tokens/s", "x bare loop (fp32)", "x bare loop (same dtype)", "wall s",
             "peak RSS MB", "over base MB"],
            [[b["batch_size"], b["compute_dtype"], b["docs_per_s"], b["tokens_per_s"], b["ratio_vs_bare_loop"],
              b["ratio_vs_bare_loop_same_dtype"], b["wall_s"], b["peak_rss_mb"], b["peak_rss_over_base_mb"]]
             for b in r["builds"]],
        )
    default = next(r for r in per_threads if r["threads"] == default_threads) if default_threads in thread_counts \
        else per_threads[-1]
    at_default = next((b for b in default["builds"] if b["batch_size"] == default_batch
                       and b["compute_dtype"] == default_dtype), None)
    if at_default is None:
        raise SystemExit(f"--compute-dtypes must include the default ({default_dtype} here)")
    best = max((dict(b, threads=r["threads"]) for r in per_threads for b in r["builds"]), key=lambda b: b["docs_per_s"])
    print(f"\ndefault settings ({default['threads']} threads, batch {default_batch}, {default_dtype}): "
          f"{at_default['docs_per_s']:.3f} docs/s, {at_default['ratio_vs_bare_loop']:.2f}x the float32 bare loop at the "
          f"same threads; best: {best['threads']} threads, "
          f"batch {best['batch_size']}, {best['docs_per_s']:.3f} docs/s (ru_maxrss {max_rss_mb():.0f} MB)")

    emit({
        "benchmark": "build_throughput",
        "quick": args.quick,
        "ratio_vs_bare_loop": at_default["ratio_vs_bare_loop"],
        "default_threads": default["threads"],
        "default_batch_size": default_batch,
        "default_compute_dtype": default_dtype,
        "ratio_vs_bare_loop_same_dtype": at_default["ratio_vs_bare_loop_same_dtype"],
        "build_docs_per_s": at_default["docs_per_s"],
        "build_tokens_per_s": at_default["tokens_per_s"],
        "bare_loop_docs_per_s": default["bare_docs_per_s"],
        "best": best,
        "per_threads": per_threads,
        "rss_before_builds_mb": base_rss,
        "n_documents": len(texts),
        "n_tokens": n_tokens,
        "mean_tokens_per_doc": n_tokens / len(texts),
        "copies": copies,
        "learner": info,
        "machine": machine(),
    }, args.out, args)


if __name__ == "__main__":
    sys.exit(main())
