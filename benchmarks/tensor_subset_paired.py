"""Paired significance for a tensor_subset result: per-question F1 of every setting against the
reference (full layout, fp32), and of every bf16-pass setting against the same setting with
float32 passes, by the paired bootstrap `regrad eval` uses (regrad_cli.learning.scores.paired_bootstrap).

The result file keeps each setting's answers and the questions; the gold answers come from the
same dataset (demo, or the dataset spec the file names), matched by question text.

    python benchmarks/tensor_subset_paired.py docs/benchmarks/tensor_subset_nq-open.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import demo_questions, emit, log, parser, print_table, setup


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("result", type=Path, help="a tensor_subset JSON file (with its answers)")
    args = p.parse_args()
    setup(args)
    from regrad_cli.learning.scores import f1_score, paired_bootstrap

    res = json.loads(args.result.read_text())
    if res["dataset"] == "demo":
        items = demo_questions()
    else:
        from regrad_cli.learning.datasets import load_dataset

        items = load_dataset(res["dataset"])
    gold = {}
    for q in items:
        gold.setdefault(q.question, q.answers)
    questions = res["questions"]
    missing = [q for q in questions if q not in gold]
    if missing:
        raise SystemExit(f"{len(missing)} questions of {args.result} are not in {res['dataset']}: {missing[0]!r}")
    answers = res["answers"]
    f1 = {k: [f1_score(a, gold[q]) for a, q in zip(v, questions)] for k, v in answers.items()}
    ref_key = next(k for k in answers if k.startswith("full|fp32"))
    rows, out = [], []
    for key in answers:
        pairs = [("reference", ref_key)]
        if key.endswith("|bf16") and key.removesuffix("|bf16") in answers:
            pairs.append(("float32 passes", key.removesuffix("|bf16")))
        for what, other in pairs:
            if other == key:
                continue
            t = paired_bootstrap(f1[key], f1[other])
            changed = sum(a != b for a, b in zip(answers[key], answers[other]))
            out.append({"setting": key, "against": other, "changed": changed, **t})
            lo, hi = t["ci95"]
            rows.append([key, what, f"{changed} of {len(questions)}", 100 * t["diff"],
                         f"[{100 * lo:+.2f}, {100 * hi:+.2f}]", t["p_value"],
                         "yes" if t["significant"] else "no"])
    print_table(f"{args.result.name}: F1 difference in points (setting - other), paired bootstrap over questions",
                ["setting", "against", "answers changed", "dF1", "95 % interval", "p", "significant"], rows)
    log(f"gold answers from {res['dataset']}")
    emit({"benchmark": "tensor_subset_paired", "source": str(args.result), "dataset": res["dataset"],
          "n_questions": len(questions), "comparisons": out}, args.out, args,
         name=args.result.stem + "_paired")


if __name__ == "__main__":
    sys.exit(main())
