"""Batched answers against one-at-a-time answers, token for token, on the demo questions.

One QueryEngine over the demo workspace (the real default models, greedy decoding). Every demo
question is answered twice in each mode measured:

  single  - one request per ``answer_many`` call (the plain 2-D adapter, batch of 1);
  batched - ``answer_many`` over chunks of --max-batch requests (what ``regrad serve`` and
            ``regrad query -``/``--batch`` do): left-padded prompts, one generation call, every
            row with its own phi' stacked [N, ...] on the side path.

It reports how many answers (and retrieved document lists) differ, each difference, and two
probes of the usual cause, floating-point order: the largest difference between a question's
embedding computed alone and in a batch, and the largest difference between a prompt's
next-token logits computed alone and in a left-padded batch (on the question's own phi').
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _common import checkpoint_info, demo_questions, emit, log, machine, on_demo_workspace, parser, setup


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workspace", type=Path, default=None,
                   help="an ingested demo workspace with its bank built (default: build one in /tmp, not timed)")
    p.add_argument("--max-batch", type=int, default=16, help="requests per batched call (default 16)")
    p.add_argument("--modes", default="param", help="comma-separated modes (default: param)")
    p.add_argument("--questions", type=int, default=None, help="first N demo questions (default: all 108; 16 quick)")
    args = p.parse_args()
    setup(args)
    on_demo_workspace(args.workspace, "regrad-bench-equiv-", lambda ws_dir: run(args, ws_dir))


def run(args, ws_dir: Path) -> None:
    import numpy as np
    import torch

    from regrad_cli import adapt
    from regrad_cli.config import Workspace
    from regrad_cli.generation import left_pad
    from regrad_cli.pipeline import step_from_rows
    from regrad_cli.prompting import prompt_ids
    from regrad_cli.query import QueryEngine, Request

    t_start = time.monotonic()
    ws = Workspace.open(ws_dir, create=False)
    top_k, max_new = ws.config.query.top_k, ws.config.query.max_new_tokens
    qe = QueryEngine(ws)
    questions = [q.question for q in demo_questions()]
    questions = questions[: args.questions or (16 if args.quick else len(questions))]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    def key(res: dict):
        return res["answer"], [r["doc_id"] for r in res["retrieved"]]

    per_mode = {}
    for mode in modes:
        reqs = [Request(q, mode=mode, top_k=top_k, max_new_tokens=max_new) for q in questions]
        log(f"{mode}: {len(reqs)} questions one at a time")
        t = time.perf_counter()
        single = [qe.answer_many([r])[0] for r in reqs]
        t_single = time.perf_counter() - t
        log(f"{mode}: the same in batches of {args.max_batch}")
        t = time.perf_counter()
        batched = []
        for i in range(0, len(reqs), args.max_batch):
            batched += qe.answer_many(reqs[i:i + args.max_batch])
        t_batched = time.perf_counter() - t
        diffs = [{"question": s["question"], "single": s["answer"], "batched": b["answer"],
                  "same_documents": key(s)[1] == key(b)[1]}
                 for s, b in zip(single, batched) if key(s) != key(b)]
        per_mode[mode] = {"questions": len(reqs), "differing": len(diffs),
                          "differing_answers": sum(d["single"] != d["batched"] for d in diffs),
                          "differing_documents": sum(not d["same_documents"] for d in diffs),
                          "differences": diffs, "single_s": t_single, "batched_s": t_batched}
        print(f"{mode}: {len(diffs)} of {len(reqs)} differ "
              f"({per_mode[mode]['differing_answers']} answers, {per_mode[mode]['differing_documents']} document lists); "
              f"one at a time {t_single:.1f} s, batched {t_batched:.1f} s")
        for d in diffs[:10]:
            print(f"  {d['question']!r}: single {d['single']!r} vs batched {d['batched']!r}")

    # Probes of floating-point order.
    chunk = questions[: args.max_batch]
    alone = np.stack([qe.embedder.embed([q])[0] for q in chunk])
    together = qe.embedder.embed(chunk)
    embed_diff = float(np.abs(alone - together).max())
    engine = qe.engine
    prompts = [prompt_ids(engine.tokenizer, q, [], "qa") for q in chunk]
    adapters = []
    for q, qvec in zip(chunk, together):
        hits = qe.retrieve(q, qvec, top_k)
        rows, _ = qe.corpus.gradients([h.doc_id for h in hits])
        w, _ = step_from_rows(engine.learner, [rows[h.doc_id] for h in hits], [h.cosine for h in hits],
                              engine.learner.trained_combine, 1.0, next(engine.model.parameters()).device)
        adapters.append(w)
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else engine.tokenizer.eos_token_id
    device = next(engine.model.parameters()).device
    with torch.no_grad():
        lone = []
        for pr, w in zip(prompts, adapters):
            with adapt.applied(engine.learner, w):
                lone.append(engine.model(input_ids=torch.tensor([pr], device=device)).logits[0, -1].float())
        ids, mask = left_pad(prompts, pad)
        with adapt.applied(engine.learner, adapt.stack_rows(adapters)):
            out = engine.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1].float()
        logit_diff = float(max((out[i] - lone[i]).abs().max() for i in range(len(chunk))))
        top2 = [torch.topk(x, 2).values for x in lone]
        min_margin = float(min((t[0] - t[1]) for t in top2))

    total = sum(v["differing"] for v in per_mode.values())
    n = sum(v["questions"] for v in per_mode.values())
    print(f"\n{total} of {n} batched answers differ from their one-at-a-time answers; "
          f"max |embedding alone - in batch| {embed_diff:.2e}; max |next-token logit alone - in batch| "
          f"{logit_diff:.2e} (smallest top-1/top-2 logit margin among them {min_margin:.2e})")
    emit({
        "benchmark": "batch_equivalence",
        "quick": args.quick,
        "differing": total,
        "answers": n,
        "modes": per_mode,
        "max_batch": args.max_batch,
        "top_k": top_k,
        "max_new_tokens": max_new,
        # Strings: emit() rounds floats to 4 decimals, which would turn these into 0.
        "probes": {"max_embedding_abs_diff": f"{embed_diff:.3e}", "max_first_logit_abs_diff": f"{logit_diff:.3e}",
                   "min_top2_logit_margin": f"{min_margin:.3e}", "probe_batch": len(chunk)},
        "learner": checkpoint_info(engine),
        "elapsed_s": time.monotonic() - t_start,
        "machine": machine(),
    }, args.out, args)


if __name__ == "__main__":
    sys.exit(main())
