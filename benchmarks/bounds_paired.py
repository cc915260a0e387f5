"""Paired bootstrap between rows of an injection-bounds result (benchmarks/injection_bounds.py).

Every row holds the greedy F1 of each of the same dev questions (``per_question_f1``), so two rows
compare question by question. Writes FILE with ``_paired`` before ``.json``.

    python benchmarks/bounds_paired.py docs/benchmarks/injection_bounds_synthetic_doc_losses.json \\
        --pairs doc-salient/B:doc/B,doc-augmented/B:doc/B
"""

from __future__ import annotations

import json
from pathlib import Path

from _common import emit, parser, print_table


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("file", type=Path)
    p.add_argument("--pairs", required=True, help="comma-separated ROW:AGAINST row names")
    p.add_argument("--other", type=Path, default=None,
                   help="take the AGAINST rows from this result file (same dataset and questions)")
    args = p.parse_args()
    from regrad_cli.learning.scores import paired_bootstrap

    data = json.loads(args.file.read_text())
    rows = data["results"]
    other = rows
    if args.other is not None:
        odata = json.loads(args.other.read_text())
        if (odata.get("dataset"), odata.get("questions")) != (data.get("dataset"), data.get("questions")):
            raise SystemExit(f"{args.other} holds other questions than {args.file}")
        other = odata["results"]
    out = []
    for pair in args.pairs.split(","):
        a, _, b = pair.partition(":")
        if a not in rows or b not in other:
            raise SystemExit(f"no row {a if a not in rows else b!r} (rows: {', '.join(rows)}; against: {', '.join(other)})")
        r = paired_bootstrap(rows[a]["per_question_f1"], other[b]["per_question_f1"])
        out.append({"row": a, "against": b, "f1": rows[a]["f1"], "f1_against": other[b]["f1"], **r})
    print_table(f"paired bootstrap, {args.file.name}", ["row", "against", "F1", "F1 against", "difference", "95 % interval", "p"],
                [[o["row"], o["against"], f"{o['f1']:.3f}", f"{o['f1_against']:.3f}", f"{o['diff']:+.3f}",
                  f"[{o['ci95'][0]:+.3f}, {o['ci95'][1]:+.3f}]", f"{o['p_value']:.3f}"] for o in out])
    emit({"benchmark": "bounds_paired", "source": str(args.file),
          "against_source": str(args.other or args.file), "dataset": data.get("dataset"),
          "checkpoint": data.get("checkpoint"), "questions": data.get("questions"), "comparisons": out},
         args.out or args.file.with_name(args.file.stem + "_paired.json"))


if __name__ == "__main__":
    main()
