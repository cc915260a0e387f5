"""Meta-step cost: one meta-training step (``metatrain.outer_loss`` + backward) against the plain
passes it replaces.

A meta-step with meta-batch B and k documents per question does, in two batched passes, what
(k+1)*B single forward+backward passes do one at a time: k*B document passes (the inner
gradients) and B outer passes (the answer loss after the step). The baseline runs exactly those
passes, batch size 1, on the same documents and questions (tokenised beforehand): each a forward
with the LoRA side path on phi and ``loss.backward()`` into phi. The meta-step is measured second
order (the default: the inner gradients keep their graph) and first order (``--first-order``),
and second order with the prefix cache (``--prefix-cache-gb``: the hidden states entering the
first adapted layer kept per text, warm as in training where texts repeat, so every pass starts
there; filled in the warm-up).
``lower_layers_s`` times what the warm prefix cache saves per step: the layers below the first
adapted one, forward only, over the step's documents and answer prompts (one padded batch each).
With ``--keymap DIR`` (a learner with a document key map, e.g. ``training/km-cached/last``) a
further variant is the design the long run trains: the key map first order with phi frozen, the
documents' factors taken from a warm ``FactorCache`` (``--factor-cache-gb``), so a step is the
map, the combination and the answer pass; its learner is swapped in only for that variant.

Demo questions, each with its gold document plus k-1 other demo documents (seeded); the same
batch in every repetition; repetitions interleaved (baseline, second order, first order) so load
drift hits all of them alike; one warm-up of each excluded. ``ratio_vs_fwd_bwd`` = median second-
order meta-step time / median baseline time.
"""

from __future__ import annotations

import random
import sys

from _common import (
    PeakRSS,
    checkpoint_info,
    demo_questions,
    emit,
    load_engine,
    log,
    machine,
    median,
    parser,
    print_table,
    rss_mb,
    setup,
    timer,
)


def main() -> None:
    p = parser(__doc__.splitlines()[0], checkpoint=True)
    p.add_argument("--meta-batch", type=int, default=None, help="B (default: 2 quick, 4 full)")
    p.add_argument("--k", type=int, default=3, help="documents per question (meta-train's default is 3)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 2 quick, 4 full)")
    p.add_argument("--max-doc-tokens", type=int, default=None, help="default: meta-train's, 256")
    p.add_argument("--keymap", default=None, help="learner with a key map: also time the phi-frozen, factor-cached step")
    args = p.parse_args()
    setup(args)

    import dataclasses

    from regrad_cli.lm.generation import teacher_forced_batch
    from regrad_cli.lm.tokens import encode_documents, per_sample_nll
    from regrad_cli.learning.metatrain import BatchEntry, MetaTrainConfig, build_pool, documents_for, outer_loss
    import torch

    from regrad_cli.lm.prefix import FAMILIES, PrefixCache, run_layers
    from regrad_cli.lm.prompting import prompt_ids

    B = args.meta_batch or (2 if args.quick else 4)
    reps = args.reps or (2 if args.quick else 4)
    cfg2 = MetaTrainConfig(k=args.k, meta_batch=B, first_order=False)
    if args.max_doc_tokens:
        cfg2.max_doc_tokens = args.max_doc_tokens
    cfg1 = dataclasses.replace(cfg2, first_order=True)

    log("loading model and learner")
    engine = load_engine(args.checkpoint)
    model, tok, learner = engine.model, engine.tokenizer, engine.learner
    items = demo_questions()
    # No embedder: distractors are random other demo documents and scores are equal; the cost of
    # a step does not depend on which documents they are, only on their lengths.
    pool = build_pool("demo", items, None)
    rng = random.Random(args.seed)
    batch = []
    for it in rng.sample(items, B):
        docs = documents_for(it, pool, args.k, rng)
        batch.append(BatchEntry(it, docs, pool.scores(it, docs)))

    params = list(learner.phi.parameters()) + list(learner.log_alpha.parameters()) + [learner.log_temp]
    for q in params:
        q.requires_grad_(True)
    learner.use(None)

    # Baseline inputs, tokenised outside the timed region.
    doc_inputs = [encode_documents(tok, [d], cfg2.max_doc_tokens) for e in batch for d in e.documents]
    qa_inputs = [teacher_forced_batch(tok, [prompt_ids(tok, e.item.question, (), e.item.kind, cfg2.max_passage_tokens)],
                                      [e.item.answers[0]]) for e in batch]
    doc_tokens = [e.n_tokens[0] for e in doc_inputs]

    def zero():
        for q in params:
            q.grad = None

    def baseline() -> float:
        zero()
        with timer() as t:
            for e in doc_inputs:
                per_sample_nll(model, e.input_ids, e.attention_mask).sum().backward()
            for ids, mask, tmask in qa_inputs:
                per_sample_nll(model, ids, mask, tmask).sum().backward()
        zero()
        return t["s"]

    prefix = PrefixCache(4 * 2**30, learner.first_layer(model))
    step_docs = encode_documents(tok, [d for e in batch for d in e.documents], cfg2.max_doc_tokens)
    step_qa = teacher_forced_batch(tok, [prompt_ids(tok, e.item.question, (), e.item.kind, cfg2.max_passage_tokens)
                                         for e in batch], [e.item.answers[0] for e in batch])

    def lower_layers() -> float:
        """What the warm prefix cache saves per step: the layers below the first adapted one."""
        dec, style = model.model, FAMILIES[model.config.model_type]
        with torch.no_grad(), timer() as t:
            for ids, mask in ((step_docs.input_ids, step_docs.attention_mask), step_qa[:2]):
                run_layers(dec, style, dec.embed_tokens(ids), mask, range(prefix.first_layer))
        return t["s"]

    def meta(cfg, prefix_cache=None) -> tuple[float, float, float]:
        zero()
        with PeakRSS() as mem, timer() as t:
            loss, _ = outer_loss(model, tok, learner, batch, cfg, prefix_cache=prefix_cache)
            loss.backward()
        zero()
        return t["s"], mem.peak_mb, float(loss.detach())

    km = None
    if args.keymap:
        from regrad_cli.learner.lora import Learner
        from regrad_cli.learner.transform import FactorCache

        km = Learner.load(args.keymap)
        for q in km.parameters():
            q.requires_grad_(False)
        km_params = list(km.transform.parameters()) + list(km.log_alpha.parameters()) + [km.log_temp]
        cache = FactorCache(4 * 2**30)
        cfg_km = dataclasses.replace(cfg1, freeze_phi=True)

    def keymap_step() -> tuple[float, float, float]:
        """The long run's step: map + alpha + temperature learn, phi frozen, factors cached."""
        learner.detach_from(model)
        km.attach(model)
        try:
            for q in km_params:
                q.requires_grad_(True)
                q.grad = None
            with PeakRSS() as mem, timer() as t:
                loss, _ = outer_loss(model, tok, km, batch, cfg_km, factor_cache=cache)
                loss.backward()
            for q in km_params:
                q.grad = None
                q.requires_grad_(False)
        finally:
            km.detach_from(model)
            learner.attach(model)
        return t["s"], mem.peak_mb, float(loss.detach())

    base_rss = rss_mb()
    log(f"warm-up (excluded): B={B}, k={args.k}, {len(doc_inputs)} documents of {min(doc_tokens)}-{max(doc_tokens)} tokens")
    baseline()
    meta(cfg1)
    meta(cfg2)
    meta(cfg2, prefix)  # fills the prefix cache: every later pass over these texts is a hit
    lower_layers()
    if km is not None:
        keymap_step()  # fills the factor cache: every later draw of these documents is a hit
    t_base, t_so, t_fo, m_so, m_fo, t_km, m_km, t_pc, m_pc, t_low = [], [], [], [], [], [], [], [], [], []
    for r in range(reps):
        log(f"repetition {r + 1}/{reps}")
        t_base.append(baseline())
        s, m, loss2 = meta(cfg2)
        t_so.append(s)
        m_so.append(m)
        s, m, loss1 = meta(cfg1)
        t_fo.append(s)
        m_fo.append(m)
        s, m, loss_pc = meta(cfg2, prefix)
        t_pc.append(s)
        m_pc.append(m)
        t_low.append(lower_layers())
        if km is not None:
            s, m, loss_km = keymap_step()
            t_km.append(s)
            m_km.append(m)
    info = checkpoint_info(engine)

    base, so, fo, pc, low = median(t_base), median(t_so), median(t_fo), median(t_pc), median(t_low)
    kms = median(t_km) if t_km else None
    passes = (args.k + 1) * B
    rows = [[f"baseline: {passes} single fwd+bwd passes", base, 1.0, None, None],
            ["meta-step, second order", so, so / base, max(m_so), max(m_so) - base_rss],
            ["meta-step, first order", fo, fo / base, max(m_fo), max(m_fo) - base_rss],
            ["meta-step, second order, prefix cached", pc, pc / base, max(m_pc), max(m_pc) - base_rss]]
    if kms is not None:
        rows.append(["key map, phi frozen, factors cached", kms, kms / base, max(m_km), max(m_km) - base_rss])
    print_table(
        f"One meta-step, B={B} questions x k={args.k} documents (mean {sum(doc_tokens) / len(doc_tokens):.0f} tokens, "
        f"max {cfg2.max_doc_tokens}); medians of {reps} repetitions",
        ["what", "seconds", "x baseline", "peak RSS MB", "over base MB"],
        rows,
    )
    print(f"\nper pass in the baseline: {base / passes:.3f} s; outer loss {loss2:.3f} (second order), "
          f"{loss1:.3f} (first order), {loss_pc:.3f} (second order, prefix cached)")
    print(f"per training question: second order {so / B:.3f} s, first order {fo / B:.3f} s, "
          f"second order prefix cached {pc / B:.3f} s ({so / pc:.2f}x cheaper); layers below "
          f"{prefix.first_layer}: {low:.2f} s a step ({low / so:.0%} of the second-order step)"
          + (f", key map cached {kms / B:.3f} s; second order / first order {so / fo:.2f}x, "
             f"second order / key map cached {so / kms:.2f}x" if kms is not None else ""))

    emit({
        "benchmark": "meta_step",
        "quick": args.quick,
        "ratio_vs_fwd_bwd": so / base,
        "ratio_vs_fwd_bwd_first_order": fo / base,
        "meta_step_s": so,
        "meta_step_first_order_s": fo,
        "meta_step_prefix_cached_s": pc,
        "ratio_vs_fwd_bwd_prefix_cached": pc / base,
        "lower_layers_s": low,
        "lower_layers_share_of_second_order": low / so,
        "outer_loss": {"second_order": loss2, "first_order": loss1, "second_order_prefix_cached": loss_pc},
        "prefix_cache": {"rows": len(prefix), "mib": prefix.bytes / 2**20, "first_layer": prefix.first_layer,
                         "hits": prefix.hits, "misses": prefix.misses},
        "baseline_s": base,
        "baseline_passes": passes,
        "runs_s": {"baseline": t_base, "second_order": t_so, "first_order": t_fo,
                   "second_order_prefix_cached": t_pc, "lower_layers": t_low, "keymap_cached": t_km},
        "peak_rss_mb": {"second_order": max(m_so), "first_order": max(m_fo),
                        "second_order_prefix_cached": max(m_pc), "process_before": base_rss,
                        **({"keymap_cached": max(m_km)} if m_km else {})},
        "seconds_per_question": {"second_order": so / B, "first_order": fo / B,
                                 "second_order_prefix_cached": pc / B,
                                 **({"keymap_cached": kms / B} if kms is not None else {})},
        "speedup_vs_second_order": {"first_order": so / fo, "second_order_prefix_cached": so / pc,
                                    **({"keymap_cached": so / kms} if kms is not None else {})},
        "keymap_learner": args.keymap,
        "meta_batch": B,
        "k": args.k,
        "max_doc_tokens": cfg2.max_doc_tokens,
        "mean_doc_tokens": sum(doc_tokens) / len(doc_tokens),
        "learner": info,
        "machine": machine(),
    }, args.out, args)


if __name__ == "__main__":
    sys.exit(main())
