"""regrad serve: throughput and latency with dynamic batching, against one-at-a-time answering.

One process, the model loaded once (a QueryEngine over the demo workspace: the real default
models, param mode, the workspace's top-k and token limit):

  sequential  - the questions answered one at a time (``QueryEngine.answer``), no server: what
                a loop over ``regrad query`` costs once the model is loaded. Run again right
                before each served level, and each level's ratio is against that run, so that
                load drift on a shared machine hits both sides of a ratio alike;
  served/C    - the same questions sent to ``regrad serve`` (real uvicorn, loopback only) by C
                concurrent HTTP clients (C = 1, 4, 16); the server batches whatever arrives within
                its window into one ``answer_many`` call. Throughput = questions / wall time;
                latency = per-request round trip. Every served answer is compared with the
                sequential one (how many differ is reported, not hidden);
  distinct vs shared - the cost of per-request steps: a batch of B questions answered by the
                full pipeline (every row retrieves its own documents and gets its own phi', stacked
                [B, ...] on the side path) against the same B prompts generated in one call with
                ONE shared adapter (the 2-D phi: plain matmuls, no retrieval, no step) - the
                multi-LoRA "one adapter for the whole batch" case. Both generate exactly
                ``max_new_tokens`` tokens per row (stopping disabled), so the comparison is not
                skewed by answer lengths.

Where the time goes is recorded too: per level, the mean of every answer's ``timings_ms`` and,
per generation call, its rows, decode steps and row-steps (finished rows leave the batch, see
``regrad_cli.lm.generation``), and how many rows ran to ``max_new_tokens``. Both sides use the
same torch thread count (torch's default, one per core, unless --threads is given).

Bounded: --questions requests per level and --time-limit seconds in all (levels are cut short,
and say so, when the time is up). Run it on an idle machine; the JSON records the load average.
"""

from __future__ import annotations

import functools
import os
import queue
import sys
import threading
import time
from pathlib import Path

from _common import (
    checkpoint_info,
    demo_questions,
    emit,
    log,
    machine,
    median,
    on_demo_workspace,
    parser,
    pct,
    print_table,
    setup,
)


def main() -> None:
    p = parser(__doc__.splitlines()[0], workspace=True)
    p.add_argument("--questions", type=int, default=None, help="questions per level (default: 16 quick, 48 full)")
    p.add_argument("--levels", default="1,4,16", help="concurrent clients per level (default 1,4,16)")
    p.add_argument("--max-batch", type=int, default=16, help="server --max-batch (default 16)")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="server --batch-window-ms (default 10)")
    p.add_argument("--distinct-batch", type=int, default=16, help="B of the distinct-vs-shared comparison (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats of the distinct/shared batches (default 2)")
    p.add_argument("--time-limit", type=float, default=420.0, help="seconds for all timed phases (default 420)")
    p.add_argument("--pairs", type=int, default=1,
                   help="(one-at-a-time pass, served pass) pairs per level, interleaved; the level reports "
                        "its median pair and lists every pair (default 1)")
    args = p.parse_args()
    setup(args)
    on_demo_workspace(args.workspace, "regrad-bench-serve-", lambda ws_dir: run(args, ws_dir))


def run(args, ws_dir: Path) -> None:
    import httpx

    import torch

    from regrad_cli.learner import adapt

    from regrad_cli.online import pipeline
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.lm.generation import generate
    from regrad_cli.lm.prompting import prompt_ids
    from regrad_cli.online.query import QueryEngine, Request
    from regrad_cli.online.serve import BackgroundServer, BatchWorker, ServeSettings

    # Every generation call of the pipeline, recorded (rows, steps, row-steps, rows at the limit).
    gen_calls: list[dict] = []

    def recorded_generate(*a, stats=None, **kw):
        st: dict = {}
        t = time.perf_counter()
        out = generate(*a, stats=st, **kw)
        max_new = a[3] if len(a) > 3 else kw.get("max_new_tokens", 20)
        gen_calls.append({"rows": len(st.get("new_tokens", [])), "steps": st.get("steps"),
                          "row_steps": st.get("row_steps"),
                          "rows_at_limit": sum(n >= max_new for n in st.get("new_tokens", [])),
                          "s": time.perf_counter() - t})
        return out

    pipeline.generate = recorded_generate

    t_start = time.monotonic()
    load_at_start = os.getloadavg()

    def left() -> float:
        return args.time_limit - (time.monotonic() - t_start)

    ws = Workspace.open(ws_dir, create=False)
    top_k, max_new = ws.config.query.top_k, ws.config.query.max_new_tokens
    log(f"loading the QueryEngine over {ws_dir}")
    qe = QueryEngine(ws)
    n_q = args.questions or (16 if args.quick else 48)
    questions = [q.question for q in demo_questions()][:n_q]
    levels = [int(x) for x in args.levels.split(",") if x.strip()]

    # Warm-up (not timed): both the 2-D and the stacked side path, at the shapes each side runs
    # (one question; a full batch).
    qe.answer(questions[0], top_k=top_k, max_new_tokens=max_new)
    qe.answer_many([Request(q, top_k=top_k, max_new_tokens=max_new) for q in questions[:args.max_batch]])

    # 1. Sequential: one at a time in this process. Run again right before each served level (the
    # worker is idle then), so that every ratio compares two runs minutes apart, not a whole run.
    seq_answers: dict[str, str] = {}

    def gen_summary(calls: list[dict]) -> dict:
        rows = sum(c["rows"] for c in calls)
        full = sum(c["rows"] * c["steps"] for c in calls)
        return {"calls": len(calls), "mean_rows": rows / len(calls) if calls else None,
                "rows_per_call": [c["rows"] for c in calls] if len(calls) <= 64 else None,
                "mean_steps": median([c["steps"] for c in calls]) if calls else None,
                "rows_at_max_new_tokens": sum(c["rows_at_limit"] for c in calls),
                "row_steps": sum(c["row_steps"] for c in calls),
                "row_steps_if_rows_kept": full, "generate_s": sum(c["s"] for c in calls)}

    def mean_timings(results: list[dict]) -> dict:
        keys = results[0]["timings_ms"] if results else {}
        return {k: sum(r["timings_ms"][k] for r in results) / len(results) for k in keys}

    def sequential_pass(limit_s: float) -> dict:
        lat, answers = [], []
        g0 = len(gen_calls)
        t0 = time.perf_counter()
        for q in questions:
            if time.perf_counter() - t0 > limit_s:
                break
            t = time.perf_counter()
            res = qe.answer(q, top_k=top_k, max_new_tokens=max_new)
            lat.append(time.perf_counter() - t)
            seq_answers[q] = res["answer"]
            answers.append(res)
        wall = time.perf_counter() - t0
        return {"requests": len(lat), "wall_s": wall, "throughput_qps": len(lat) / wall,
                "p50_ms": median(lat) * 1e3, "p95_ms": pct(lat, 95) * 1e3,
                "mean_timings_ms": mean_timings(answers), "generation": gen_summary(gen_calls[g0:])}

    # 2. Served, C concurrent clients. Every answer_many call of the worker is recorded.
    many_calls: list[tuple[int, float]] = []
    real_many = qe.answer_many

    def recorded_many(reqs, **kw):
        t = time.perf_counter()
        out = real_many(reqs, **kw)
        many_calls.append((len(reqs), time.perf_counter() - t))
        return out

    qe.answer_many = recorded_many
    settings = ServeSettings(max_batch=args.max_batch, batch_window_ms=args.batch_window_ms)
    worker = BatchWorker(lambda: qe, settings)
    served = {}
    with BackgroundServer(worker, settings) as server:
        for c in levels:
            pairs = []
            for pair in range(max(1, args.pairs)):
                if left() < 45:
                    log(f"time limit: level {c} skipped" + (f" after {pair} pairs" if pair else ""))
                    break
                log(f"sequential (before the {c}-client level): up to {len(questions)} questions one at a time")
                seq = sequential_pass(max(20.0, (left() - 45) / 3))
                work: queue.Queue = queue.Queue()
                for q in questions[: seq["requests"]]:
                    work.put(q)
                lat, results, errors, full = [], {}, [], []
                lock = threading.Lock()
                deadline = time.monotonic() + max(30.0, left() - 45)

                # Each client opens its connection before the clock starts (an application keeps its
                # HTTP client), then all start together.
                clients = [httpx.Client(base_url=server.url, timeout=600) for _ in range(c)]
                for http in clients:
                    http.get("/healthz")
                go = threading.Barrier(c + 1)

                def client(http):
                    go.wait()
                    try:
                        while time.monotonic() < deadline:
                            try:
                                q = work.get_nowait()
                            except queue.Empty:
                                return
                            t = time.perf_counter()
                            try:
                                r = http.post("/v1/query", json={"question": q, "top_k": top_k, "max_new_tokens": max_new})
                            except httpx.HTTPError as exc:
                                with lock:
                                    errors.append(repr(exc)[:200])
                                continue
                            dt = time.perf_counter() - t
                            with lock:
                                if r.status_code == 200:
                                    lat.append(dt)
                                    results[q] = r.json()["answer"]
                                    full.append(r.json())
                                else:
                                    errors.append(r.text[:200])
                    finally:
                        http.close()

                b0, a0, g0, m0 = worker.batches, worker.answered, len(gen_calls), len(many_calls)
                log(f"served: {c} concurrent clients")
                threads = [threading.Thread(target=client, args=(http,)) for http in clients]
                for t in threads:
                    t.start()
                go.wait()
                t0 = time.perf_counter()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                batches = worker.batches - b0
                differ = [q for q, a in results.items() if a != seq_answers[q]]
                served[str(c)] = {
                    "clients": c, "requests": len(lat), "errors": len(errors), "wall_s": wall,
                    "throughput_qps": len(lat) / wall if wall else float("nan"),
                    "p50_ms": median(lat) * 1e3, "p95_ms": pct(lat, 95) * 1e3,
                    "mean_batch": (worker.answered - a0) / batches if batches else float("nan"),
                    "mean_timings_ms": mean_timings(full), "generation": gen_summary(gen_calls[g0:]),
                    "answer_many_calls": [{"rows": n, "s": round(dt, 3)} for n, dt in many_calls[m0:]][:64],
                    "sequential_before": seq,
                    "ratio_vs_sequential_before": (len(lat) / wall) / seq["throughput_qps"] if wall else float("nan"),
                    "answers_differing_from_sequential": len(differ),
                    "differing_examples": [{"question": q, "sequential": seq_answers[q], "served": results[q]}
                                           for q in differ[:3]],
                    "cut_short": not work.empty(),
                }
                pairs.append(served[str(c)])
            if pairs:
                # The level's figures are those of its median pair (the lower of two); all are kept.
                ranked = sorted(pairs, key=lambda x: x["ratio_vs_sequential_before"])
                served[str(c)] = {**ranked[(len(ranked) - 1) // 2], "pairs": [
                    {"sequential_qps": x["sequential_before"]["throughput_qps"], "served_qps": x["throughput_qps"],
                     "ratio": x["ratio_vs_sequential_before"], "mean_batch": x["mean_batch"],
                     "answers_differing_from_sequential": x["answers_differing_from_sequential"]} for x in pairs]}
        with httpx.Client(base_url=server.url, timeout=600) as http:
            deep = http.get("/healthz", params={"deep": 1}).json()

    # 3. Distinct deltas vs one shared phi (fixed generation length).
    distinct_vs_shared = None
    if left() > 20:
        b = min(args.distinct_batch, len(questions))
        batch_q = questions[:b]
        engine = qe.engine
        # Exactly max_new tokens per row on both sides: stopping off in the pipeline's generate too.
        pipeline.generate = functools.partial(generate, stop=False)
        prompts = [prompt_ids(engine.tokenizer, q, [], "qa") for q in batch_q]
        d_times, s_times, d_gen = [], [], []
        try:
            for _ in range(max(1, args.repeats)):
                t = time.perf_counter()
                res = qe.answer_many([Request(q, top_k=top_k, max_new_tokens=max_new) for q in batch_q])
                d_times.append(time.perf_counter() - t)
                d_gen.append(res[0]["timings_ms"]["generate"] / 1e3)
                t = time.perf_counter()
                with adapt.applied(engine.learner, None):  # phi, 2-D: one adapter for every row
                    generate(engine.model, engine.tokenizer, prompts, max_new, stop=False)
                s_times.append(time.perf_counter() - t)
                if left() < 0:
                    break
        finally:
            pipeline.generate = generate
        d, s = median(d_times), median(s_times)
        distinct_vs_shared = {
            "batch": b, "new_tokens_per_row": max_new, "repeats": len(d_times),
            "distinct_s": d, "distinct_generate_s": median(d_gen), "shared_s": s,
            "distinct_qps": b / d, "shared_qps": b / s,
            "ratio_distinct_over_shared": s / d,
            "stacked_side_path_generate_ratio": s / median(d_gen),
        }

    levels_run = [served[k] for k in sorted(served, key=int)]
    print_table(f"regrad serve vs one at a time (up to {len(questions)} demo questions, param mode, top-k {top_k}, "
                f"max {max_new} new tokens, max batch {args.max_batch}, window {args.batch_window_ms} ms)",
                ["run", "requests", "q/s", "p50 ms", "p95 ms", "mean batch", "differ"],
                [row for s in levels_run for row in (
                    [f"sequential (before {s['clients']})", s["sequential_before"]["requests"],
                     s["sequential_before"]["throughput_qps"], s["sequential_before"]["p50_ms"],
                     s["sequential_before"]["p95_ms"], 1.0, 0],
                    [f"served, {s['clients']} clients", s["requests"], s["throughput_qps"], s["p50_ms"], s["p95_ms"],
                     s["mean_batch"], s["answers_differing_from_sequential"]])])
    ratios = {k: v["ratio_vs_sequential_before"] for k, v in served.items()}
    if distinct_vs_shared:
        print_table(f"Batch of {distinct_vs_shared['batch']}, exactly {max_new} new tokens per row",
                    ["run", "s", "q/s"],
                    [["distinct deltas (full pipeline)", distinct_vs_shared["distinct_s"], distinct_vs_shared["distinct_qps"]],
                     ["one shared phi (generate only)", distinct_vs_shared["shared_s"], distinct_vs_shared["shared_qps"]]])
    targets = {
        "served16_over_sequential": ratios.get("16"),
        "served16_over_sequential_target": 3.0,
        "distinct_over_shared": distinct_vs_shared["ratio_distinct_over_shared"] if distinct_vs_shared else None,
        "distinct_over_shared_target": 0.8,
    }
    print(f"\nthroughput ratios vs sequential: {ratios}; targets: {targets}; weights unchanged: {deep.get('unchanged')}")
    emit({
        "benchmark": "serve",
        "quick": args.quick,
        "targets": targets,
        "throughput_ratio_vs_sequential": ratios,
        "served": served,
        "distinct_vs_shared": distinct_vs_shared,
        "weights_unchanged_after": deep.get("unchanged"),
        "settings": {"questions": len(questions), "levels": levels, "max_batch": args.max_batch,
                     "batch_window_ms": args.batch_window_ms, "top_k": top_k, "max_new_tokens": max_new,
                     "mode": "param", "time_limit_s": args.time_limit, "transport": "HTTP/1.1 on 127.0.0.1",
                     "torch_threads": torch.get_num_threads(), "same_threads_both_sides": True},
        "learner": checkpoint_info(qe.engine),
        "load_avg_at_start": [round(x, 2) for x in load_at_start],
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        "elapsed_s": time.monotonic() - t_start,
        "machine": machine(),
    }, args.out, args)


if __name__ == "__main__":
    sys.exit(main())
