"""Paired comparison of two `regrad eval` runs on the same questions, system by system.

Each run's answers come from its predictions file (`docs/results/<name>-predictions.jsonl.gz`, or
a run's `predictions.jsonl`); answers are paired by (system, question id), and every system both
runs answered is compared by the paired bootstrap `regrad eval` uses
(regrad_cli.learning.scores.paired_bootstrap): F1 of run A minus F1 of run B, its 95 % interval and p.

    python benchmarks/compare_runs.py docs/results/nq-open-dev-init-predictions.jsonl.gz \\
        docs/results/nq-open-dev-predictions.jsonl.gz --names init,shipped
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from _common import emit, parser, print_table, setup


def load(path: Path) -> dict[tuple[str, str], float]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = {}
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            out[(r["system"], str(r["id"]))] = float(r["f1"])
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="predictions of run A")
    p.add_argument("b", type=Path, help="predictions of run B")
    p.add_argument("--names", default="a,b", help="the two runs' names, comma-separated")
    p.add_argument("--pair", action="append", default=[], metavar="SYS_A:SYS_B",
                   help="compare system SYS_A of run A with SYS_B of run B (repeatable; default: each "
                        "system with itself), e.g. regrad:closed-book+phi")
    args = p.parse_args()
    setup(args)
    from regrad_cli.learning.scores import paired_bootstrap

    name_a, name_b = args.names.split(",")
    a, b = load(args.a), load(args.b)
    pairs = [tuple(pr.split(":", 1)) for pr in args.pair] or [(s, s) for s in dict.fromkeys(s for s, _ in a)]
    rows, out = [], []
    for sa, sb in pairs:
        ids = [i for (t, i) in a if t == sa and (sb, i) in b]
        if not ids:
            continue
        x, y = [a[(sa, i)] for i in ids], [b[(sb, i)] for i in ids]
        t = paired_bootstrap(x, y)
        lo, hi = t["ci95"]
        s = sa if sa == sb else f"{sa} vs {sb}"
        out.append({"system": s, "n": len(ids), f"f1_{name_a}": sum(x) / len(x), f"f1_{name_b}": sum(y) / len(y), **t})
        rows.append([s, len(ids), sum(x) / len(x), sum(y) / len(y), t["diff"], f"[{lo:+.3f}, {hi:+.3f}]",
                     t["p_value"], "yes" if t["significant"] else "no"])
    if not rows:
        raise SystemExit("the two runs share no (system, question) pair")
    print_table(f"F1, {name_a} - {name_b}, paired bootstrap over the questions both answered",
                ["system", "n", f"F1 {name_a}", f"F1 {name_b}", "difference", "95 % interval", "p", "significant"],
                rows)
    emit({"benchmark": "compare_runs", "a": str(args.a), "b": str(args.b), "names": [name_a, name_b],
          "comparisons": out}, args.out, args, name=f"compare_{name_a}_vs_{name_b}")


if __name__ == "__main__":
    sys.exit(main())
