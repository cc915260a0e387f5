"""Bank size: bytes per document of each codec against fp32 safetensors, gradient fidelity, and
the change in dev F1 when the decoded gradients replace the exact ones.

Real gradients: every corpus document's LoRA gradient under the default learner (or
--checkpoint), computed with ``document_gradients`` exactly as ``build_bank`` does (batch and
token limit from BankConfig). Corpus: the demo corpus, or with ``--dataset SPEC`` (e.g. NQ-open
dev) the sampled questions' gold passages. The reference storage is ``safetensors.torch.save`` of
the same tensors in fp32 (the stored layout), in bytes.

F1 (a seeded sample of questions with --quick). Two settings, both through
``Learner.adapted_weights`` + ``generation.generate`` like ``QueryEngine.answer``, in batches
with one adapter per row:
  gold  - the gold document's gradient alone;
  top-k - the top-k documents retrieved by MiniLM cosine, combined with the learner's trained
          combine weights (what ``regrad query`` applies).
F1 is in points (0-100). ``f1_delta`` = default codec F1 minus fp32 F1 on the top-k setting. F1
moves in steps of 100/n points, so the answer NLL change and the number of changed answers are
reported beside it: they show an effect long before F1 does.
"""

from __future__ import annotations

import sys

from _common import (
    corpus_texts,
    checkpoint_info,
    demo_questions,
    emit,
    load_engine,
    log,
    machine,
    parser,
    print_table,
    setup,
    timer,
)

CODEC_VARIANTS = [("fp32", 64), ("fp16", 64), ("int8", 64), ("int8g", 64), ("int4", 32), ("int4", 64),
                  ("int4", 128), ("int4s", 64), ("int4s", 128)]
GOAL_RATIO = 16.0
GOAL_F1_LOSS = 0.5


def label(name: str, group: int) -> str:
    return f"{name}/g{group}" if name in ("int4", "int4s", "int8g") else name


def main() -> None:
    p = parser(__doc__.splitlines()[0], checkpoint=True)
    p.add_argument("--questions", type=int, default=None,
                   help="dev questions (default: 20 quick; full: all 108 demo questions, or 60 of --dataset)")
    p.add_argument("--dataset", default="demo",
                   help="'demo' (default: demo corpus and questions) or a dataset spec such as "
                        "nq-open:../shared/data/nq_open/nq-open-oracle.jsonl.gz@dev (corpus = the "
                        "sampled questions' gold passages)")
    p.add_argument("--top-k", type=int, default=None, help="retrieved documents (default: workspace config, 3)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: workspace config, 20")
    p.add_argument("--gen-batch", type=int, default=10, help="questions per batched generate call")
    p.add_argument("--show-answers", action="store_true", help="print every question's answers (fp32 vs default codec)")
    p.add_argument("--f1-codecs", default=None,
                   help="codecs whose F1 is measured (default: fp32,int8,int4/g64 quick; all full); "
                        "size and fidelity are always measured for all")
    args = p.parse_args()
    setup(args)

    import random

    import numpy as np
    import torch
    from safetensors.torch import save as st_save

    from bank_format import CodecSpec, TensorSpec, decode_blob, encode_blob
    from regrad_cli.workspace.config import BankConfig, QueryConfig
    from regrad_cli.learner.energy import NEGLIGIBLE_ALPHA
    from regrad_cli.lm.generation import answer_nll, generate
    from regrad_cli.learner.gradients import document_gradients
    from regrad_cli.learning.scores import exact_match, f1_score
    from regrad_cli.lm.models import Embedder
    from regrad_cli.lm.prompting import prompt_ids

    bcfg, qcfg = BankConfig(), QueryConfig()
    top_k = args.top_k or qcfg.top_k
    max_new = args.max_new_tokens or qcfg.max_new_tokens
    n_questions = args.questions or (20 if args.quick else None)
    all_labels = [label(n, g) for n, g in CODEC_VARIANTS]
    f1_codecs = args.f1_codecs.split(",") if args.f1_codecs else (
        list(dict.fromkeys(["fp32", "int8", label(bcfg.codec, bcfg.group_size), "int4/g128"]))
        if args.quick else all_labels)
    if "fp32" not in f1_codecs:
        f1_codecs.insert(0, "fp32")

    log("loading model and learner")
    engine = load_engine(args.checkpoint)
    model, tok, learner = engine.model, engine.tokenizer, engine.learner
    info = checkpoint_info(engine)
    if args.dataset == "demo":
        # The demo corpus (36 files) and its questions; each question names its file.
        docs = corpus_texts()
        names = [n for n, _ in docs]
        texts = [t for _, t in docs]
        questions = demo_questions()
        if n_questions and n_questions < len(questions):
            questions = random.Random(args.seed).sample(questions, n_questions)
        gold = [names.index(q.meta["source"]) for q in questions]
    else:
        # A regrad dataset spec: the sampled questions' gold passages form the corpus.
        from regrad_cli.learning.datasets import load_dataset
        from regrad_cli.learning.qa import corpus_of

        questions = [q for q in load_dataset(args.dataset) if q.documents and q.kind == "qa"]
        questions = random.Random(args.seed).sample(questions, min(len(questions), n_questions or 60))
        texts = corpus_of(questions)
        gold = [texts.index(q.documents[0]) for q in questions]

    log(f"gradients of {len(texts)} documents (batch {bcfg.batch_size}, max {bcfg.max_doc_tokens} tokens)")
    grads: list[dict[str, torch.Tensor]] = []
    with timer() as t_grad:
        for i in range(0, len(texts), bcfg.batch_size):
            g, _ = document_gradients(model, learner, tok, texts[i:i + bcfg.batch_size], bcfg.max_doc_tokens)
            grads += g

    full_layout = learner.layout
    stored = engine.stored_tensors()
    stored_names = [n for n, _ in stored]
    dropped = [n for n, _ in full_layout if n not in set(stored_names)]
    layout = [TensorSpec(n, tuple(s)) for n, s in stored]
    n_values = sum(int(np.prod(s)) for _, s in stored)

    def flat(d: dict, keys) -> np.ndarray:
        return np.concatenate([d[k].reshape(-1).numpy() if torch.is_tensor(d[k]) else d[k].reshape(-1) for k in keys])

    # Reference storage: fp32 safetensors of the learner's whole gradient (every tensor, stored or
    # not), per document; ratio_vs_fp32_stored compares with the stored tensors only.
    st_bytes = [len(st_save({n: g[n].contiguous() for n, _ in full_layout})) for g in grads]
    st_mean = float(np.mean(st_bytes))
    st_stored_mean = float(np.mean([len(st_save({n: g[n].contiguous() for n in stored_names})) for g in grads]))

    # Retrieval for the top-k setting: MiniLM cosine over the corpus, like a dense bank search.
    embedder = Embedder()
    doc_emb = embedder.embed(texts)
    q_emb = embedder.embed([q.question for q in questions])
    sims = q_emb @ doc_emb.T
    top = np.argsort(-sims, axis=1)[:, :top_k]
    recall = float(np.mean([g in row for g, row in zip(gold, top)]))
    combine = learner.trained_combine
    topk_w = [learner.combine_weights(torch.tensor(sims[i, row], dtype=torch.float32), combine).tolist()
              for i, row in enumerate(top)]
    prompts = [prompt_ids(tok, q.question) for q in questions]
    settings = {
        "gold": [([g], [1.0]) for g in gold],
        "top-k": [(list(row), w) for row, w in zip(top, topk_w)],
    }

    def evaluate(decoded: list[dict[str, torch.Tensor]] | None) -> dict:
        """F1/EM/answer NLL per setting with these per-document gradients (None: phi only)."""
        out = {}
        for setting, plan in (settings.items() if decoded is not None else [("phi-only", None)]):
            preds, nlls = [], []
            for s in range(0, len(questions), args.gen_batch):
                idx = range(s, min(len(questions), s + args.gen_batch))
                stacked = None
                if plan is not None:
                    per_q = []
                    for i in idx:
                        doc_ids, w = plan[i]
                        g = {n: sum(decoded[d][n] * wi for d, wi in zip(doc_ids, w)) for n in stored_names}
                        per_q.append(learner.adapted_weights(g, 1.0))
                    with torch.no_grad():
                        stacked = {n: torch.stack([a[n] for a in per_q]) for n in learner.names}
                with torch.no_grad(), learner.using(stacked):
                    preds += generate(model, tok, [prompts[i] for i in idx], max_new)
                    nlls += answer_nll(model, tok, [prompts[i] for i in idx],
                                       [questions[i].answers[0] for i in idx]).tolist()
            out[setting] = {
                "f1": 100 * float(np.mean([f1_score(pr, q.answers) for pr, q in zip(preds, questions)])),
                "em": 100 * float(np.mean([exact_match(pr, q.answers) for pr, q in zip(preds, questions)])),
                "nll": float(np.mean(nlls)),
                "preds": preds,
            }
        return out

    log(f"phi-only baseline on {len(questions)} questions (F1 codecs: {', '.join(f1_codecs)})")
    with timer() as t_eval:
        base = evaluate(None)["phi-only"]

    results = []
    ref_eval = None
    for name, group in CODEC_VARIANTS:
        spec = CodecSpec(name=name, zstd_level=bcfg.zstd_level, group_size=group)
        lab = label(name, group)
        log(f"codec {lab}: encode/decode {len(grads)} documents, then F1")
        sizes, cos, rel, enc_ms, dec_ms = [], [], [], [], []
        decoded = []
        for g in grads:
            arrays = [g[n].numpy() for n in stored_names]
            with timer() as te:
                blob = encode_blob(arrays, layout, spec)
            with timer() as td:
                back = decode_blob(blob, layout)
            enc_ms.append(te["s"] * 1e3)
            dec_ms.append(td["s"] * 1e3)
            sizes.append(len(blob))
            x = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float64)
            y = np.concatenate([b.reshape(-1) for b in back]).astype(np.float64)
            cos.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
            rel.append(float(np.linalg.norm(x - y) / np.linalg.norm(x)))
            decoded.append({n: torch.from_numpy(b) for n, b in zip(stored_names, back)})
        ev = evaluate(decoded) if lab in f1_codecs else None
        if lab == label(bcfg.codec, bcfg.group_size):
            default_eval = ev
        if name == "fp32":
            ref_eval = ev
        mean_bytes = float(np.mean(sizes))
        row = {
            "codec": lab, "bytes_per_doc": mean_bytes, "bytes_per_value": mean_bytes / n_values,
            "ratio_vs_fp32": st_mean / mean_bytes, "ratio_vs_fp32_stored": st_stored_mean / mean_bytes,
            "cosine_min": min(cos), "cosine_mean": float(np.mean(cos)),
            "rel_l2_mean": float(np.mean(rel)), "rel_l2_max": max(rel),
            "encode_ms": float(np.median(enc_ms)), "decode_ms": float(np.median(dec_ms)),
        }
        for setting in settings:
            e, r = (ev or {}).get(setting), ref_eval[setting]
            row[f"f1_{setting}"] = e["f1"] if e else None
            row[f"f1_delta_{setting}"] = e["f1"] - r["f1"] if e else None
            row[f"nll_delta_{setting}"] = e["nll"] - r["nll"] if e else None
            row[f"changed_{setting}"] = sum(a != b for a, b in zip(e["preds"], r["preds"])) if e else None
        # None: F1 not measured for this codec (quick mode), so the goal cannot be judged.
        row["meets_goal"] = None if ev is None else bool(
            row["ratio_vs_fp32"] >= GOAL_RATIO
            and all(row[f"f1_delta_{s}"] >= -GOAL_F1_LOSS for s in settings)
        )
        results.append(row)
        del decoded

    # What dropping negligible-alpha tensors (Engine.stored_tensors) saves and costs.
    default_label = label(bcfg.codec, bcfg.group_size)
    default = next(r for r in results if r["codec"] == default_label)
    drop_info = {"tensors_total": len(full_layout), "tensors_stored": len(stored), "dropped": dropped,
                 "negligible_alpha": NEGLIGIBLE_ALPHA}
    if dropped:
        spec = CodecSpec(name=bcfg.codec, zstd_level=bcfg.zstd_level, group_size=bcfg.group_size)
        full_specs = [TensorSpec(n, tuple(s)) for n, s in full_layout]
        full_bytes = float(np.mean([len(encode_blob([g[n].numpy() for n, _ in full_layout], full_specs, spec))
                                    for g in grads]))
        max_step = max(float((learner.alpha(n).detach() * g[n]).abs().max()) for g in grads for n in dropped)
        drop_info.update({"bytes_per_doc_all_tensors": full_bytes,
                          "bytes_saved_fraction": 1 - default["bytes_per_doc"] / full_bytes,
                          "max_weight_change_skipped": max_step})

    print_table(
        f"Bytes per document and fidelity ({len(grads)} documents of {args.dataset}, {n_values:,} values each; "
        f"reference: fp32 safetensors of the whole gradient {st_mean:,.0f} B)",
        ["codec", "bytes/doc", "B/value", "x smaller", "cos min", "rel L2 mean", "rel L2 max", "enc ms", "dec ms"],
        [[r["codec"], r["bytes_per_doc"], r["bytes_per_value"], r["ratio_vs_fp32"], r["cosine_min"],
          r["rel_l2_mean"], r["rel_l2_max"], r["encode_ms"], r["decode_ms"]] for r in results],
    )
    print_table(
        f"Dev F1 in points, {len(questions)} questions of {args.dataset}, greedy {max_new} tokens "
        f"(phi only, no gradient: F1 {base['f1']:.1f}, NLL {base['nll']:.3f}; top-{top_k} recall {recall:.2f})",
        ["codec", "F1 gold", "dF1 gold", "dNLL gold", "changed", f"F1 top-{top_k}", f"dF1 top-{top_k}",
         f"dNLL top-{top_k}", "changed", "meets goal"],
        [[r["codec"], r["f1_gold"], r["f1_delta_gold"], r["nll_delta_gold"], r["changed_gold"],
          r["f1_top-k"], r["f1_delta_top-k"], r["nll_delta_top-k"], r["changed_top-k"],
          {True: "yes", False: "no", None: "-"}[r["meets_goal"]]] for r in results],
    )
    print(f"\nstored tensors: {len(stored)} of {len(full_layout)} (alpha > {NEGLIGIBLE_ALPHA:g}); dropped: "
          f"{dropped if dropped else 'none'}")
    print(f"learner: {info}")
    print(f"gradients: {t_grad['s']:.1f} s for {len(texts)} documents; phi-only eval {t_eval['s']:.1f} s")
    if args.show_answers:
        print_table("Answers (phi only | fp32 top-k | default codec top-k)", ["question", "gold", "phi only", "fp32", default_label],
                    [[q.question[:60], q.answers[0], a, b, c] for q, a, b, c in
                     zip(questions, base["preds"], ref_eval["top-k"]["preds"], default_eval["top-k"]["preds"])])
    meets = [r["codec"] for r in results if r["meets_goal"]]
    print(f"codecs meeting >= {GOAL_RATIO:g}x and <= {GOAL_F1_LOSS} F1 points lost: {', '.join(meets) or 'none'}")

    emit({
        "benchmark": "bank_size",
        "quick": args.quick,
        "default_codec": default_label,
        "ratio_vs_fp32": default["ratio_vs_fp32"],
        "f1_delta": default["f1_delta_top-k"],
        "f1_delta_gold": default["f1_delta_gold"],
        "f1_unit": "points (0-100)",
        "fp32_safetensors_bytes_per_doc": st_mean,
        "codecs_meeting_goal": meets,
        "per_codec": {r["codec"]: {k: v for k, v in r.items() if k != "codec"} for r in results},
        "phi_only": {k: v for k, v in base.items() if k != "preds"},
        "fp32": {s: {k: v for k, v in ref_eval[s].items() if k != "preds"} for s in settings},
        "dataset": args.dataset,
        "n_documents": len(grads),
        "n_values": n_values,
        "n_questions": len(questions),
        "top_k": top_k,
        "recall_at_k": recall,
        "max_new_tokens": max_new,
        "stored_tensors": drop_info,
        "learner": info,
        "machine": machine(),
    }, args.out, args)


if __name__ == "__main__":
    sys.exit(main())
