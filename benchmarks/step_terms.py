"""Which terms of a document step change the model's weights: Delta W = s (dB A + B dA + dB dA).

A LoRA module's weight is W0 + s B A. One document's step moves B and A by dB = -alpha_B (.) N(g)_B
and dA = -alpha_A (.) N(g)_A (the learner's step sizes and normalisation, gamma = 1), so the
module's weight moves by s (dB A + B dA + dB dA). A tensor's share of the *parameter* step energy
(``regrad learner energy``, what decides which tensors a bank stores) counts ||dA|| and ||dB||
alone; this benchmark reports the Frobenius norm of each of the three weight-change terms, summed
over modules and documents (root of the sum of squares), and the same with the A step left out
(only dB A remains): what a bank that stores B only would lose.

Documents: synthetic training entities (``synthetic:2:N``, never an evaluation set).

    python benchmarks/step_terms.py --checkpoint DIR --docs 24 --out docs/benchmarks/step_terms.json
"""

from __future__ import annotations

from _common import emit, load_engine, log, parser, setup


def main() -> None:
    p = parser(__doc__.splitlines()[0], checkpoint=True)
    p.add_argument("--docs", type=int, default=24, help="synthetic training documents")
    p.add_argument("--max-doc-tokens", type=int, default=256)
    args = p.parse_args()
    setup(args)

    import torch

    from regrad_cli.learner import adapt
    from regrad_cli.learner.gradients import grouped_gradients
    from regrad_cli.learning import synthetic
    from regrad_cli.lm.tokens import encode_documents

    engine = load_engine(args.checkpoint)
    learner = engine.learner
    norm = learner.meta.get("norm", "none")
    items = synthetic.generate(2, max(args.docs, 1))
    texts = list(dict.fromkeys(it.documents[0] for it in items))[: args.docs]
    phi = {n: t.detach().double() for n, t in learner.phi_dict().items()}
    mods = sorted({n.rpartition(".")[0] for n in learner.names})
    terms = {"dB_A": 0.0, "B_dA": 0.0, "dB_dA": 0.0, "B_A_phi": 0.0}
    per_module = {m: {k: 0.0 for k in terms} for m in mods}
    s = learner.spec.scale
    for start in range(0, len(texts), 4):
        docs = encode_documents(engine.tokenizer, texts[start:start + 4], args.max_doc_tokens)
        grads, _ = grouped_gradients(engine.model, learner, docs)
        grads = {n: g.detach().double() for n, g in grads.items()}
        step = adapt.normalise(grads, norm)
        n_docs = next(iter(grads.values())).shape[0]
        for m in mods:
            A, B = phi[m + ".A"], phi[m + ".B"]
            dA = -step[m + ".A"] * learner.alpha(m + ".A").detach().double()
            dB = -step[m + ".B"] * learner.alpha(m + ".B").detach().double()
            got = {"dB_A": (s * dB @ A).pow(2).sum(), "B_dA": (s * B @ dA).pow(2).sum(),
                   "dB_dA": (s * dB @ dA).pow(2).sum(), "B_A_phi": (s * B @ A).pow(2).sum() * n_docs}
            for k, v in got.items():
                per_module[m][k] += float(v)
                terms[k] += float(v)
        log(f"{min(start + 4, len(texts))}/{len(texts)} documents")
    full = sum(terms[k] for k in ("dB_A", "B_dA", "dB_dA"))
    result = {
        "benchmark": "step_terms",
        "checkpoint_id": learner.checkpoint_id()[:16],
        "documents": len(texts),
        "norm": norm,
        "frobenius": {k: v ** 0.5 for k, v in terms.items()},
        "a_terms_share_of_squared_change": (terms["B_dA"] + terms["dB_dA"]) / full if full else 0.0,
        "note": "root of the sum over modules and documents of ||term||_F^2; B_A_phi: the adapter "
                "itself, for scale",
        "per_module": {m: {k: v ** 0.5 for k, v in d.items()} for m, d in per_module.items()},
    }
    for k, v in result["frobenius"].items():
        print(f"{k:8s} {v:10.4f}")
    print(f"A terms' share of the squared weight change: {result['a_terms_share_of_squared_change']:.3f}")
    emit(result, args.out, args)


if __name__ == "__main__":
    main()
