"""Query latency: param-only ReGrad against closed-book and against RAG (mode "context").

One process, model loaded once, a fresh workspace with the demo corpus ingested and its bank
built (default codec). Every question is answered in the three modes, interleaved (question 1 in
each mode, then question 2...) so load drift hits all modes alike; warm-up questions excluded.
Same top-k and max new tokens everywhere; the real ``QueryEngine.answer`` path, whose
``timings_ms`` gives the per-stage breakdown.

Generated lengths differ between modes (generation stops at a newline or end of turn), so each
question is run twice per mode (also interleaved):
  natural - as ``regrad query`` runs it; also reported as ms per generated token;
  fixed   - exactly ``max_new_tokens`` new tokens (stopping disabled): the fair comparison.
``param_vs_closed_book`` and ``param_vs_rag`` are ratios of median end-to-end latency in the
fixed-length run; the natural-length ratios are reported beside them. ``paired_fixed_length``
pairs each question's latencies across modes: the geometric-mean ratio with its paired bootstrap
interval and p-value.
"""

from __future__ import annotations

import random
import sys
import time

from _common import (
    DEMO_CORPUS,
    checkpoint_info,
    demo_questions,
    emit,
    ingest_workspace,
    load_engine,
    log,
    machine,
    median,
    parser,
    pct,
    print_table,
    setup,
    temp_dir,
    timer,
)

MODES = ("param", "closed-book", "context")
STAGES = ("embed", "retrieve", "fetch_decode", "apply", "generate", "restore")


class GenerateProbe:
    """Wraps ``model.generate`` (an instance attribute shadowing the method, removed on close):
    counts the new tokens of each call and, when ``fixed`` is set, forces exactly
    ``max_new_tokens`` of them by turning off every stopping rule."""

    def __init__(self, model):
        self.model = model
        self.orig = model.generate
        self.fixed = False
        self.last_new_tokens = 0
        model.generate = self

    def __call__(self, *a, **kw):
        if self.fixed:
            kw.pop("stopping_criteria", None)
            kw["min_new_tokens"] = kw["max_new_tokens"]
        out = self.orig(*a, **kw)
        self.last_new_tokens = int(out.shape[1] - kw["input_ids"].shape[1])
        return out

    def close(self):
        del self.model.generate


def main() -> None:
    p = parser(__doc__.splitlines()[0], checkpoint=True)
    p.add_argument("--questions", type=int, default=None, help="timed questions (default: 6 quick, 40 full)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up questions per mode, excluded (default: 1 quick, 2 full)")
    p.add_argument("--top-k", type=int, default=None, help="default: workspace config, 3")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: workspace config, 20")
    args = p.parse_args()
    setup(args)

    from regrad_cli.offline.build import build_bank
    from regrad_cli.online.query import QueryEngine

    n_q = args.questions or (6 if args.quick else 40)
    n_warm = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    with temp_dir("regrad-bench-query-") as tmp:
        log("ingesting the demo corpus into a fresh workspace")
        ws = ingest_workspace(tmp / "ws", DEMO_CORPUS)
        top_k = args.top_k or ws.config.query.top_k
        max_new = args.max_new_tokens or ws.config.query.max_new_tokens
        log("loading model and learner; building the bank (not timed)")
        engine = load_engine(args.checkpoint, ws)
        with timer() as t_build:
            summary = build_bank(ws, engine)
        qe = QueryEngine(ws, engine=engine)
        probe = GenerateProbe(engine.model)
        questions = demo_questions()
        picked = random.Random(args.seed).sample(questions, min(len(questions), n_q + n_warm))
        warm, timed = picked[:n_warm], picked[n_warm:]

        def run(question: str, mode: str) -> dict:
            t0 = time.perf_counter()
            r = qe.answer(question, mode=mode, top_k=top_k, max_new_tokens=max_new)
            return {"total_ms": (time.perf_counter() - t0) * 1e3, "new_tokens": probe.last_new_tokens,
                    "answer": r["answer"], **{s: r["timings_ms"].get(s, 0.0) for s in STAGES}}

        records: dict[tuple[str, str], list[dict]] = {}
        try:
            log(f"{len(warm)} warm-up + {len(timed)} timed questions x {len(MODES)} modes x 2 lengths")
            for i, q in enumerate(warm + timed):
                for length in ("natural", "fixed"):
                    probe.fixed = length == "fixed"
                    for mode in MODES:
                        r = run(q.question, mode)
                        if i >= len(warm):
                            records.setdefault((length, mode), []).append(r)
        finally:
            probe.close()
        info = checkpoint_info(engine)

    summary_rows, stats = [], {}
    for (length, mode), recs in records.items():
        tot = [r["total_ms"] for r in recs]
        toks = sum(r["new_tokens"] for r in recs)
        st = {
            "p50_ms": median(tot), "p95_ms": pct(tot, 95), "mean_ms": sum(tot) / len(tot),
            "mean_new_tokens": toks / len(recs),
            "ms_per_new_token": sum(r["generate"] for r in recs) / max(1, toks),
            "stages_p50_ms": {s: median([r[s] for r in recs]) for s in STAGES},
        }
        stats.setdefault(length, {})[mode] = st
        summary_rows.append([length, mode, st["p50_ms"], st["p95_ms"], st["mean_new_tokens"], st["ms_per_new_token"],
                             *(st["stages_p50_ms"][s] for s in STAGES)])

    def ratio(length: str, a: str, b: str) -> float:
        return stats[length][a]["p50_ms"] / stats[length][b]["p50_ms"]

    print_table(
        f"Query latency, {len(timed)} demo questions per mode ({len(warm)} warm-up excluded), top-k {top_k}, "
        f"max {max_new} new tokens; medians in ms",
        ["length", "mode", "p50", "p95", "new tok", "ms/tok", *STAGES],
        summary_rows,
    )
    ratios = {length: {"param_vs_closed_book": ratio(length, "param", "closed-book"),
                       "param_vs_rag": ratio(length, "param", "context")} for length in stats}
    print_table("Ratios of median end-to-end latency", ["length", "param / closed-book", "param / RAG"],
                [[k, v["param_vs_closed_book"], v["param_vs_rag"]] for k, v in ratios.items()])
    # Paired over questions: the same question in both modes, fixed length. The bootstrap of the
    # mean log-latency difference gives the geometric-mean ratio param / closed-book with its
    # interval and a p-value against "no difference" (regrad_cli.learning.scores.paired_bootstrap).
    import math

    from regrad_cli.learning.scores import paired_bootstrap

    paired = {}
    for other in ("closed-book", "context"):
        a = [math.log(r["total_ms"]) for r in records[("fixed", "param")]]
        b = [math.log(r["total_ms"]) for r in records[("fixed", other)]]
        t = paired_bootstrap(a, b)
        paired[f"param_vs_{other}"] = {
            "geomean_ratio": math.exp(t["diff"]), "ci95": [math.exp(x) for x in t["ci95"]],
            "p_value": t["p_value"], "significant": t["significant"], "n": t["n"]}
    print_table("Paired over questions (fixed length): geometric-mean ratio, 95 % bootstrap interval",
                ["comparison", "ratio", "95 % interval", "p", "significant"],
                [[k, v["geomean_ratio"], f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]", v["p_value"],
                  "yes" if v["significant"] else "no"] for k, v in paired.items()])
    param_fixed = stats["fixed"]["param"]["stages_p50_ms"]
    overhead = sum(param_fixed[s] for s in ("fetch_decode", "apply", "restore"))
    print(f"\nparam-only overhead outside generation (fixed run, p50 fetch+decode+apply+restore): {overhead:.1f} ms; "
          f"bank built in {t_build['s']:.1f} s ({summary.built} documents, not timed)")

    emit({
        "benchmark": "query_latency",
        "quick": args.quick,
        "param_vs_closed_book": ratios["fixed"]["param_vs_closed_book"],
        "param_vs_rag": ratios["fixed"]["param_vs_rag"],
        "ratios_basis": f"median end-to-end latency, exactly {max_new} new tokens in every mode",
        "natural_length": ratios["natural"],
        "paired_fixed_length": paired,
        "param_overhead_ms": overhead,
        "stats": stats,
        "n_questions": len(timed),
        "warmup": len(warm),
        "top_k": top_k,
        "max_new_tokens": max_new,
        "learner": info,
        "machine": machine(),
    }, args.out, args)


if __name__ == "__main__":
    sys.exit(main())
