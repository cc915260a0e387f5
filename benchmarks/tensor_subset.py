"""Stored tensor subset and codecs: answers changed against the full fp32 step, F1, and bank bytes
per document against fp32 of the whole gradient.

What `build-bank` + `query` would do, without a bank on disk: every corpus document's gradient
under the learner (default: the bundled one, or --checkpoint; re-run it on a new checkpoint), each
LoRA tensor's share of the step energy (``regrad_cli.learner.energy.tensor_energy`` over the corpus), then
for every setting (a threshold, which decides the stored tensors, and a codec) the stored tensors
are encoded and decoded with ``bank_format`` exactly as a bank stores them, combined over the top-k
retrieved documents with the learner's trained combination, and applied as one step before
greedy generation (batched, one adapter per row).

A setting may end in ``@bf16``: its gradients come from passes under bf16 autocast (build-bank's
``--compute-dtype bfloat16``, what 'auto' picks on CPUs with native bf16) instead of float32.

The reference is the full layout in fp32 (every tensor, no rounding, float32 passes). Reported per setting:
answers that differ from the reference's ("changed"), F1 and EM in points (0-100), the mean
answer NLL change, bytes per document (zstd-compressed blobs as a bank stores them) and
``ratio_vs_fp32`` = 4 bytes x all values of the learner's gradient / bytes per document (what
`regrad bank stats` reports for a 1.1 bank).

    python benchmarks/tensor_subset.py --threads 1                      # 108 demo questions
    python benchmarks/tensor_subset.py --threads 1 --questions 100 \\
        --dataset nq-open:../shared/data/nq_open/nq-open-oracle.jsonl.gz@dev
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import (
    checkpoint_info,
    corpus_texts,
    demo_questions,
    emit,
    load_engine,
    log,
    parser,
    print_table,
    setup,
    timer,
)

GOAL_RATIO = 16.0
GOAL_F1_LOSS = 0.5
GOAL_CHANGED = 0.02


def parse_codec(text: str) -> tuple[str, int]:
    name, _, g = text.partition("/g")
    return name, int(g) if g else 64


def main() -> None:
    p = parser(__doc__.splitlines()[0], checkpoint=True)
    p.add_argument("--dataset", default="demo",
                   help="'demo' (demo corpus and its 108 questions) or a dataset spec such as "
                        "nq-open:../shared/data/nq_open/nq-open-oracle.jsonl.gz@dev (corpus = the "
                        "sampled questions' gold passages)")
    p.add_argument("--questions", type=int, default=None,
                   help="questions (default: all demo questions, 100 of --dataset; --quick: 30)")
    p.add_argument("--settings",
                   default="full:int4/g64,1e-4:fp32,1e-4n:fp32,1e-4n:int4s/g64,1e-4n:int4s/g128",
                   help="comma-separated STORED:CODEC settings, each compared with the full fp32 "
                        "layout (always measured first). STORED is 'full', 'B' (every LoRA B tensor, no A) or an energy-share "
                        "threshold; a trailing 'n' (e.g. 1e-4n) stores rows normalised over the "
                        "whole gradient (bank key row_norm, format 1.2) instead of leaving the "
                        "query to normalise the stored tensors alone. CODEC is NAME or NAME/gGROUP (NAME a bank_format codec, or simqQ: "
                        "levels -Q..Q a group, one byte each, zstd, simulated), "
                        "optionally followed by ~rK (each stored tensor kept as its best rank-K factors, "
                        "both through the codec: a simulated low-rank layout) and @bf16 (gradients computed "
                        "under bf16 autocast)")
    p.add_argument("--energy", choices=("record", "corpus"), default="record",
                   help="tensor shares that decide the stored subset: the learner's recorded ones "
                        "(what build-bank uses; default) or measured over this run's corpus")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--gen-batch", type=int, default=12, help="questions per batched generate call")
    args = p.parse_args()
    setup(args)

    import random

    import numpy as np
    import torch

    from bank_format import CodecSpec, TensorSpec, decode_blob, encode_blob
    from regrad_cli.learner import adapt
    from regrad_cli.workspace.config import BankConfig
    from regrad_cli.learner.energy import EnergyAccumulator
    from regrad_cli.lm.generation import answer_nll, generate
    from regrad_cli.learner.gradients import document_gradients
    from regrad_cli.learning.scores import exact_match, f1_score
    from regrad_cli.lm.models import Embedder
    from regrad_cli.lm.prompting import prompt_ids

    bcfg = BankConfig()
    log("loading model and learner")
    engine = load_engine(args.checkpoint)
    model, tok, learner = engine.model, engine.tokenizer, engine.learner
    n_questions = args.questions or (30 if args.quick else None)
    if args.dataset == "demo":
        texts = [t for _, t in corpus_texts()]
        questions = demo_questions()
        if n_questions and n_questions < len(questions):
            questions = random.Random(args.seed).sample(questions, n_questions)
    else:
        from regrad_cli.learning.datasets import load_dataset
        from regrad_cli.learning.qa import corpus_of

        pool = [q for q in load_dataset(args.dataset) if q.documents and q.kind == "qa"]
        questions = random.Random(args.seed).sample(pool, min(len(pool), n_questions or 100))
        texts = corpus_of(pool)  # the whole pool's passages: retrieval searches all of them

    # Retrieval: MiniLM cosine over the corpus, like a dense bank search.
    embedder = Embedder()
    sims = embedder.embed([q.question for q in questions]) @ embedder.embed(texts).T
    top = np.argsort(-sims, axis=1)[:, :args.top_k]
    # Only the retrieved documents need a gradient (the rest of the pool is never applied).
    needed = sorted({int(d) for d in top.reshape(-1)})

    log(f"gradients of {len(needed)} retrieved documents of {len(texts)} "
        f"(batch {bcfg.batch_size}, max {bcfg.max_doc_tokens} tokens)")
    settings = [("full", None, False, "fp32", 64, None, "float32")]
    for item in args.settings.split(","):
        item, _, dt = item.strip().partition("@")
        item, _, rank_text = item.partition("~r")
        rank = int(rank_text) if rank_text else None
        if dt not in ("", "bf16", "bfloat16"):
            raise SystemExit(f"unknown compute dtype @{dt} in --settings (use @bf16)")
        where, _, codec_text = item.partition(":")
        row_norm = where.endswith("n") and where != "full"
        threshold = None if where == "full" else where.rstrip("n") if where.rstrip("n") == "B" else float(where.rstrip("n"))
        label = ("full" if threshold is None else "B only" if threshold == "B" else f"share>{threshold:g}") + (" row-norm" if row_norm else "")
        label += f" rank {rank}" if rank else ""
        settings.append((label, threshold, row_norm, *parse_codec(codec_text or "fp32"), rank,
                         "bfloat16" if dt else "float32"))
    settings = list(dict.fromkeys(settings))

    grads_by_dtype: dict[str, dict] = {}
    acc = EnergyAccumulator(learner)  # each tensor's share of the step energy over these documents
    t_grad = {"s": 0.0}
    for dtype in dict.fromkeys(s[-1] for s in settings):
        grads_by_dtype[dtype] = got = {}
        with timer() as t:
            for i in range(0, len(needed), bcfg.batch_size):
                ids = needed[i:i + bcfg.batch_size]
                g, _ = document_gradients(model, learner, tok, [texts[d] for d in ids], bcfg.max_doc_tokens, dtype)
                got.update(zip(ids, g))
                if dtype == "float32":
                    acc.add({n: torch.stack([d[n] for d in g]) for n in learner.names})
        t_grad[dtype] = t["s"]
        t_grad["s"] += t["s"]
        log(f"{dtype} gradients: {t['s']:.0f} s")
    energy = acc.shares()
    recorded = (learner.meta.get("stored_tensors") or {}).get("energy")
    if args.energy == "record" and recorded:
        energy = {n: float(recorded[n]) for n in learner.names}
    names = learner.names
    shapes = dict(learner.layout)
    n_values_full = sum(int(np.prod(s)) for s in shapes.values())
    fp32_full = 4 * n_values_full

    prompts = [prompt_ids(tok, q.question) for q in questions]
    step_fn, weights_fn = _step_functions(learner)
    combine = learner.trained_combine
    plan = [(list(row), weights_fn(torch.tensor(sims[i, row], dtype=torch.float32), combine))
            for i, row in enumerate(top)]

    def evaluate(decoded: dict, norm: str | None = None) -> dict:
        """Answers, F1, EM and answer NLL with these per-document gradients (stored tensors only);
        ``norm`` overrides the learner's normalisation ('none' for rows normalised at build)."""
        preds, nlls = [], []
        for s in range(0, len(questions), args.gen_batch):
            idx = range(s, min(len(questions), s + args.gen_batch))
            rows = [step_fn([decoded[d] for d in plan[i][0]], plan[i][1], norm) for i in idx]
            with torch.no_grad():
                stacked = {n: torch.stack([r[n] for r in rows]) for n in names}
            with torch.no_grad(), learner.using(stacked):
                # Finished rows leave the batch; their stacked adapters leave with them.
                preds += generate(model, tok, [prompts[i] for i in idx], args.max_new_tokens,
                                  on_rows=lambda rows: learner.use(adapt.select_rows(stacked, rows)))
                learner.use(stacked)  # every row again, for the likelihoods
                nlls += answer_nll(model, tok, [prompts[i] for i in idx],
                                   [questions[i].answers[0] for i in idx]).tolist()
        return {"preds": preds, "nll": float(np.mean(nlls)),
                "f1": 100 * float(np.mean([f1_score(pr, q.answers) for pr, q in zip(preds, questions)])),
                "em": 100 * float(np.mean([exact_match(pr, q.answers) for pr, q in zip(preds, questions)]))}

    def stored(threshold: float | None) -> list[str]:
        if threshold == "B":
            return [n for n in names if n.endswith(".B")]
        keep = [n for n in names if threshold is None or energy[n] > threshold]
        return keep or list(names)

    def coded(keep: list[str], codec: str, group: int, row_norm: bool, grads: dict,
              rank: int | None = None) -> tuple[dict, float]:
        """Decoded per-document gradients of the kept tensors and the mean blob bytes; with
        ``row_norm`` each row is divided by its whole gradient's norm before encoding (build.py).
        With ``rank`` k each tensor [m, n] is stored as its best rank-k factors (truncated SVD:
        U_k S_k [m, k] and V_k^T [k, n], both through the codec) and decoded as their product:
        a simulation of a low-rank bank layout, which bank_format does not have."""
        if rank:
            layout = [TensorSpec(f"{n}.{part}", shape) for n in keep
                      for part, shape in (("P", (shapes[n][0], rank)), ("Q", (rank, shapes[n][1])))]
        else:
            layout = [TensorSpec(n, tuple(shapes[n])) for n in keep]
        spec = None if codec.startswith("simq") else CodecSpec(codec, zstd_level=bcfg.zstd_level, group_size=group)
        out, sizes = {}, []
        for d, g in grads.items():
            scale = 1.0
            if row_norm:
                scale = float(torch.rsqrt(sum(g[n].double().pow(2).sum() for n in names) + 1e-12))
            arrays = [(g[n] * scale) for n in keep]
            if rank:
                factors = []
                for a in arrays:
                    u, sv, vh = torch.linalg.svd(a.double(), full_matrices=False)
                    factors += [(u[:, :rank] * sv[:rank]).float(), vh[:rank].float().contiguous()]
                arrays = factors
            if codec.startswith("simq"):
                size, dec = _simulated_levels([a.numpy() for a in arrays], int(codec[4:]), group, bcfg.zstd_level)
            else:
                blob = encode_blob([a.numpy() for a in arrays], layout, spec)
                size, dec = len(blob), [torch.from_numpy(a) for a in decode_blob(blob, layout)]
            sizes.append(size)
            if rank:
                dec = [dec[2 * i] @ dec[2 * i + 1] for i in range(len(keep))]
            out[d] = dict(zip(keep, dec))
        return out, float(np.mean(sizes))

    results, ref = [], None
    with timer() as t_eval:
        for label, threshold, row_norm, codec, group, rank, dtype in settings:
            keep = stored(threshold)
            log(f"{label} ({len(keep)} tensors), {codec}/g{group}, {dtype} passes: encode, decode, "
                f"answer {len(questions)} questions")
            decoded, size = coded(keep, codec, group, row_norm, grads_by_dtype[dtype], rank)
            norm_now = "none" if row_norm else None
            ev = evaluate(decoded, norm_now)
            ref = ref or ev
            n_kept = sum(int(np.prod(shapes[n])) for n in keep)
            changed = sum(a != b for a, b in zip(ev["preds"], ref["preds"]))
            results.append({
                "subset": label, "threshold": threshold, "row_norm": row_norm, "codec": codec,
                "rank": rank, "compute_dtype": dtype,
                "group_size": group if codec in ("int4", "int4s", "int8g") or codec.startswith("simq") else None,
                "tensors": len(keep), "values_fraction": n_kept / n_values_full,
                "energy_dropped": sum(energy[n] for n in names if n not in keep),
                "bytes_per_doc": size, "ratio_vs_fp32": fp32_full / size,
                "ratio_vs_fp32_stored": 4 * n_kept / size,
                "f1": ev["f1"], "em": ev["em"], "f1_delta": ev["f1"] - ref["f1"],
                "nll_delta": ev["nll"] - ref["nll"], "changed": changed,
                "changed_fraction": changed / len(questions),
                "preds": ev["preds"],
            })
            r = results[-1]
            r["meets_targets"] = bool(r["ratio_vs_fp32"] >= GOAL_RATIO and r["f1_delta"] >= -GOAL_F1_LOSS
                                      and r["changed_fraction"] <= GOAL_CHANGED)
            # A long run on a busy machine: keep what is measured so far (the final emit replaces it).
            partial = Path("/tmp") / f"regrad-tensor_subset-{args.dataset.split(':')[0]}.partial.json"
            partial.write_text(json.dumps({"partial": True, "settings": [
                {k: v for k, v in x.items() if k != "preds"} for x in results]}, indent=2, default=str))

    # A bf16 setting against the same setting with float32 passes: what the precision alone changes.
    for r in results:
        twin = next((x for x in results if x["compute_dtype"] == "float32" and
                     (x["subset"], x["codec"], x["group_size"]) == (r["subset"], r["codec"], r["group_size"])), None)
        if r["compute_dtype"] == "bfloat16" and twin is not None:
            n = sum(a != b for a, b in zip(r["preds"], twin["preds"]))
            r["vs_float32_passes"] = {"changed": n, "changed_fraction": n / len(questions),
                                      "f1_delta": r["f1"] - twin["f1"]}
            log(f"{r['subset']} {r['codec']}: bf16 passes vs float32 passes: {n} of {len(questions)} answers "
                f"changed, F1 {r['f1'] - twin['f1']:+.2f}")
    print_table(
        f"{len(questions)} questions of {args.dataset}, top-{args.top_k}, greedy {args.max_new_tokens} tokens; "
        f"reference: full layout, fp32 (F1 {ref['f1']:.2f}, EM {ref['em']:.2f}); fp32 of the whole gradient "
        f"{fp32_full:,} B/doc",
        ["stored", "codec", "passes", "tensors", "values", "bytes/doc", "x vs fp32", "F1", "dF1", "dNLL", "changed", "targets"],
        [[r["subset"], r["codec"] + (f"/g{r['group_size']}" if r["group_size"] else ""),
          "bf16" if r["compute_dtype"] == "bfloat16" else "fp32", r["tensors"],
          f"{r['values_fraction']:.1%}", r["bytes_per_doc"], r["ratio_vs_fp32"], r["f1"], r["f1_delta"],
          r["nll_delta"], f"{r['changed']} ({r['changed_fraction']:.1%})", "yes" if r["meets_targets"] else "no"]
         for r in results],
    )
    ranked = sorted(energy.items(), key=lambda kv: kv[1])
    a_share = sum(v for n, v in energy.items() if n.endswith(".A"))
    print(f"\nenergy: A tensors {a_share:.3%} in all (largest A {max(v for n, v in energy.items() if n.endswith('.A')):.2e}), "
          f"smallest B {min(v for n, v in energy.items() if n.endswith('.B')):.2e}; smallest overall "
          f"{ranked[0][1]:.2e} ({ranked[0][0]})")
    print(f"time: gradients and energy {t_grad['s']:.0f} s, evaluation {t_eval['s']:.0f} s")
    emit({
        "benchmark": "tensor_subset",
        "dataset": args.dataset,
        "n_questions": len(questions),
        "n_documents": len(texts),
        "n_documents_retrieved": len(needed),
        "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens,
        "reference": {"subset": "full", "codec": "fp32", "f1": ref["f1"], "em": ref["em"]},
        "fp32_bytes_per_doc_whole_gradient": fp32_full,
        "targets": {"ratio_vs_fp32": GOAL_RATIO, "f1_loss_points": GOAL_F1_LOSS, "changed_fraction": GOAL_CHANGED},
        "settings": [{k: v for k, v in r.items() if k != "preds"} for r in results],
        "energy": {"a_total": a_share, "shares": energy},
        "answers": {f"{r['subset']}|{r['codec']}/g{r['group_size']}"
                    + ("|bf16" if r["compute_dtype"] == "bfloat16" else ""): r["preds"] for r in results},
        "questions": [q.question for q in questions],
        "learner": checkpoint_info(engine),
        "seconds": {"gradients": t_grad["s"], "evaluation": t_eval["s"]},
    }, args.out, args, name="tensor_subset_" + ("demo" if args.dataset == "demo" else args.dataset.split(":")[0]))


def _simulated_levels(arrays, qmax: int, group: int, zstd_level: int):
    """A codec bank_format does not have, simulated: per group of ``group`` values an absmax scale
    (one byte, as int4s's e4m4 code; its rounding left out), values rounded to the 2 qmax + 1
    levels -qmax..qmax and stored one byte each, zstd entropy-coding the bytes. Returns (the byte count
    a bank would store, about: zstd of the level bytes + one byte a group + 4 a tensor; the
    decoded arrays as tensors)."""
    import numpy as np
    import torch
    import zstandard

    codes, scales, out = [], 0, []
    for a in arrays:
        flat = a.reshape(-1).astype(np.float64)
        pad = (-flat.size) % group
        g = np.pad(flat, (0, pad)).reshape(-1, group)
        absmax = np.abs(g).max(axis=1, keepdims=True)
        safe = np.where(absmax > 0, absmax, 1.0)
        q = np.clip(np.rint(g / safe * qmax), -qmax, qmax).astype(np.int8)
        codes.append(q.tobytes())
        scales += 4 + g.shape[0]
        out.append(torch.from_numpy((q * (safe / qmax)).reshape(-1)[: flat.size].reshape(a.shape).astype(np.float32)))
    size = len(zstandard.ZstdCompressor(level=zstd_level).compress(b"".join(codes))) + scales
    return size, out


def _step_functions(learner):
    """(step, weights): phi' for one question from its documents' gradients and weights, and the
    combination weights from retrieval scores, through the one definition the query uses
    (regrad_cli.learner.adapt when present, else the learner's own methods)."""
    import torch

    try:
        from regrad_cli.learner import adapt
    except ImportError:
        adapt = None
    if adapt is not None and hasattr(learner, "alpha_dict"):
        trained = getattr(learner, "trained_norm", "none")

        def step(docs, w, norm=None):
            g = {n: torch.stack([d[n] for d in docs]) for n in docs[0]}
            return adapt.step(learner.phi_dict(), learner.alpha_dict(), adapt.combine(g, w, norm=norm or trained))

        return step, lambda s, method: adapt.combination_weights(s, method, learner.log_temp).detach()

    def step(docs, w, norm=None):
        g = {n: sum(d[n] * float(wi) for d, wi in zip(docs, w)) for n in docs[0]}
        return learner.adapted_weights(g, 1.0)

    return step, lambda s, method: learner.combine_weights(s, method).detach()


if __name__ == "__main__":
    sys.exit(main())
