"""How much structure the stored gradients have for a codec to exploit, and what each codec's
rounding does to the step.

For the first ``--docs`` demo documents' gradients under the learner (float32 passes, each
normalised as the learner normalises it), measured in the step's own units (alpha (.) g, every
tensor):

- low rank: the relative L2 error of the best rank-k approximation of every tensor (k = 1, 2, 4;
  LoRA tensors are [r, in] or [out, r] with r = 8, so rank 8 is exact);
- codecs: the relative L2 error of encode + decode (int8g/g128, int4/g32, int4/g64, int4/g128,
  int4s/g64) and of leaving the A tensors out;
- the weight change: the relative error of every module's B'A' - BA (phi' = phi - alpha (.) g),
  which is what the side path adds to the model;
- what documents share: the cosine between two documents' steps, and the part of each step left
  after removing the documents' mean step (what a bank-wide shared component would leave to
  store per document).

    python benchmarks/gradient_structure.py --threads 2 --docs 8
"""

from __future__ import annotations

import sys

from _common import checkpoint_info, corpus_texts, emit, load_engine, log, parser, print_table, setup

CODECS = [("int8g", 128), ("int4", 32), ("int4", 64), ("int4", 128), ("int4s", 64)]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=4)
    args = p.parse_args()
    setup(args)
    import numpy as np
    import torch

    from bank_format import CodecSpec, TensorSpec, decode_blob, encode_blob
    from regrad_cli.learner import adapt
    from regrad_cli.learner.gradients import document_gradients

    engine = load_engine()
    model, tok, learner = engine.model, engine.tokenizer, engine.learner
    names, shapes = learner.names, dict(learner.layout)
    layout = [TensorSpec(n, tuple(shapes[n])) for n in names]
    phi = {n: t.detach() for n, t in learner.phi_dict().items()}
    alpha = {n: t.detach() for n, t in learner.alpha_dict().items()}
    modules = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
    texts = [t for _, t in corpus_texts()][: args.docs]
    log(f"gradients of {len(texts)} demo documents (float32 passes)")

    def rel(a: dict, b: dict, keys) -> float:
        num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
        den = sum(float(b[k].double().pow(2).sum()) for k in keys)
        return (num / den) ** 0.5

    def delta_w(g: dict) -> dict:
        p2 = adapt.step(phi, alpha, g)
        return {m: p2[m + ".B"].double() @ p2[m + ".A"].double() - phi[m + ".B"].double() @ phi[m + ".A"].double()
                for m in modules}

    per_doc, steps = [], []
    for text in texts:
        raw = document_gradients(model, learner, tok, [text])[0][0]
        g = adapt.normalise({n: raw[n][None] for n in names}, learner.trained_norm)
        g = {n: t[0] for n, t in g.items()}
        step = {n: alpha[n] * g[n] for n in names}
        steps.append(torch.cat([step[n].reshape(-1) for n in names]).double())
        ref_dw = delta_w(g)
        row = {"low_rank": {}, "codecs": {}}
        for k in (1, 2, 4):
            approx = {}
            for n in names:
                u, s, vh = torch.linalg.svd(step[n].double(), full_matrices=False)
                approx[n] = (u[:, :k] * s[:k]) @ vh[:k]
            row["low_rank"][f"rank{k}"] = rel(approx, step, names)
        settings = [(f"{c}/g{gs}", c, gs) for c, gs in CODECS]
        for label, codec, gs in settings:
            blob = encode_blob([g[n].numpy() for n in names], layout, CodecSpec(codec, group_size=gs))
            dec = {n: torch.from_numpy(a) for n, a in zip(names, decode_blob(blob, layout))}
            row["codecs"][label] = {
                "bytes": len(blob), "ratio_vs_fp32": 4 * sum(t.numel() for t in g.values()) / len(blob),
                "step_rel_error": rel({n: alpha[n] * dec[n] for n in names}, step, names),
                "a_rel_error": rel(dec, g, [n for n in names if n.endswith(".A")]),
                "b_rel_error": rel(dec, g, [n for n in names if n.endswith(".B")]),
                "delta_w_rel_error": rel(delta_w(dec), ref_dw, modules),
            }
        no_a = {n: (g[n] if n.endswith(".B") else torch.zeros_like(g[n])) for n in names}
        row["codecs"]["A tensors left out (fp32)"] = {
            "step_rel_error": rel({n: alpha[n] * no_a[n] for n in names}, step, names),
            "delta_w_rel_error": rel(delta_w(no_a), ref_dw, modules),
        }
        per_doc.append(row)

    unit = torch.stack([v / v.norm() for v in steps])
    cos = unit @ unit.T
    off = cos[~torch.eye(len(steps), dtype=torch.bool)]
    residual = (unit - unit.mean(0)).norm(dim=1)
    shared = {"pairwise_cosine_mean": float(off.mean()), "pairwise_cosine_max": float(off.max()),
              "residual_after_mean_removed": float(residual.mean())}
    print(f"documents' steps: pairwise cosine mean {shared['pairwise_cosine_mean']:.3f} (max "
          f"{shared['pairwise_cosine_max']:.3f}); after removing their mean step {shared['residual_after_mean_removed']:.3f} "
          "of each step's norm is left")

    def mean(path) -> float:
        vals = [path(r) for r in per_doc]
        return float(np.mean(vals))

    low_rank = {k: mean(lambda r, k=k: r["low_rank"][k]) for k in per_doc[0]["low_rank"]}
    codecs = {label: {key: mean(lambda r, label=label, key=key: r["codecs"][label][key])
                      for key in per_doc[0]["codecs"][label]} for label in per_doc[0]["codecs"]}
    print_table(f"Low-rank approximation of alpha (.) g per tensor, mean of {len(per_doc)} documents",
                ["rank", "relative L2 error"], [[k, v] for k, v in low_rank.items()])
    print_table("Codec rounding, mean over documents (relative L2 errors)",
                ["codec", "x vs fp32", "step", "A", "B", "B'A' - BA"],
                [[label, c.get("ratio_vs_fp32", float("nan")), c["step_rel_error"], c.get("a_rel_error", float("nan")),
                  c.get("b_rel_error", float("nan")), c["delta_w_rel_error"]] for label, c in codecs.items()])
    emit({
        "benchmark": "gradient_structure",
        "n_documents": len(per_doc),
        "low_rank_step_rel_error": low_rank,
        "codecs": codecs,
        "shared_between_documents": shared,
        "per_document": per_doc,
        "learner": checkpoint_info(engine),
    }, args.out, args, name="gradient_structure")


if __name__ == "__main__":
    sys.exit(main())
