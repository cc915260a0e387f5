"""Build throughput: documents/s of the real ``build_bank`` against a bare per-document loop.

The bare loop is the minimum work a bank needs: for each document (tokenised beforehand), one
forward of the model with the LoRA side path on phi and ``loss.backward()`` into phi, nothing
else (no per-sample copies, no encoding, no LanceDB). ``build_bank`` runs on a fresh bank of a
fresh workspace (the demo corpus ingested through ``regrad_cli.ingest``; ``--copies N`` in full
mode ingests N distinct copies), once per batch size. The bare loop runs before and after the
builds; its mean is the baseline, so slow drift in machine load hits both sides alike. Builds run
in increasing batch size: freed memory stays in the process (allocator), so each peak RSS is
that of the largest batch so far.

``ratio_vs_bare_loop`` = best build docs/s / bare-loop docs/s (> 1: batching beats the loop).
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
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="learner: 'bundled' (default), 'init' or a directory")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default: 1,4,8,16; full adds 32)")
    p.add_argument("--docs", type=int, default=None, help="documents per build (default: 16 quick, all full)")
    p.add_argument("--copies", type=int, default=None, help="copies of the demo corpus (default: 1 quick, 4 full)")
    args = p.parse_args()
    setup(args)

    from regrad_cli.build import build_bank
    from regrad_cli.config import BankConfig
    from regrad_cli.documents import DocumentStore
    from regrad_cli.gradients import document_gradients, encode_documents, per_sample_nll

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else (
        [1, 4, 8, 16] if args.quick else [1, 4, 8, 16, 32])
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

        def bare_loop() -> tuple[float, float]:
            for q in phi:
                q.requires_grad_(True)
            learner.use(None)
            try:
                with PeakRSS() as mem, timer() as t:
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
        document_gradients(model, learner, tok, texts[:2], max_tokens)

        base_rss = rss_mb()
        log(f"bare loop over {len(texts)} documents (before)")
        bare_before, bare_rss_1 = bare_loop()
        builds = []
        for bs in batch_sizes:
            shutil.rmtree(ws.banks_dir, ignore_errors=True)
            log(f"build_bank batch size {bs}")
            with PeakRSS() as mem, timer() as t:
                summary = build_bank(ws, engine, batch_size=bs, limit=n_docs)
            if summary.built != len(texts) or summary.failed:
                raise SystemExit(f"build_bank built {summary.built} of {len(texts)}: {summary.failed}")
            builds.append({"batch_size": bs, "docs_per_s": summary.built / t["s"],
                           "docs_per_s_inner": summary.docs_per_s, "wall_s": t["s"],
                           "peak_rss_mb": mem.peak_mb, "peak_rss_over_base_mb": mem.peak_mb - base_rss})
        log(f"bare loop over {len(texts)} documents (after)")
        bare_after, bare_rss_2 = bare_loop()
        shutil.rmtree(ws.banks_dir, ignore_errors=True)
        info = checkpoint_info(engine)

    bare = (bare_before + bare_after) / 2
    for b in builds:
        b["ratio_vs_bare_loop"] = b["docs_per_s"] / bare
    best = max(builds, key=lambda b: b["docs_per_s"])
    # Only the first bare loop's peak means anything: the second runs after the largest build,
    # and the allocator keeps the memory that build freed, so its RSS is the build's leftover.
    bare_peak = bare_rss_1

    print_table(
        f"Build throughput, {len(texts)} demo documents ({n_tokens / len(texts):.0f} tokens each on "
        f"average, max {max_tokens}); bare loop {bare:.3f} docs/s (before {bare_before:.3f}, after {bare_after:.3f})",
        ["batch size", "docs/s (wall)", "docs/s (inner)", "x bare loop", "wall s", "peak RSS MB", "over base MB"],
        [[b["batch_size"], b["docs_per_s"], b["docs_per_s_inner"], b["ratio_vs_bare_loop"], b["wall_s"],
          b["peak_rss_mb"], b["peak_rss_over_base_mb"]] for b in builds],
    )
    print(f"\nbare loop peak RSS {bare_peak:.0f} MB (process before builds {base_rss:.0f} MB; "
          f"ru_maxrss {max_rss_mb():.0f} MB)")
    print(f"best batch size: {best['batch_size']} ({best['docs_per_s']:.3f} docs/s, "
          f"{best['ratio_vs_bare_loop']:.2f}x the bare loop)")

    emit({
        "benchmark": "build_throughput",
        "quick": args.quick,
        "ratio_vs_bare_loop": best["ratio_vs_bare_loop"],
        "best_batch_size": best["batch_size"],
        "build_docs_per_s": best["docs_per_s"],
        "bare_loop_docs_per_s": bare,
        "bare_loop_before_after": [bare_before, bare_after],
        "per_batch_size": {str(b["batch_size"]): {k: v for k, v in b.items() if k != "batch_size"} for b in builds},
        "peak_rss_mb": max([bare_peak] + [b["peak_rss_mb"] for b in builds]),
        "bare_loop_peak_rss_mb": bare_peak,
        "rss_before_builds_mb": base_rss,
        "n_documents": len(texts),
        "mean_tokens_per_doc": n_tokens / len(texts),
        "copies": copies,
        "learner": info,
        "machine": machine(),
    }, args.out)


if __name__ == "__main__":
    sys.exit(main())
