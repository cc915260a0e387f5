"""Markdown tables for docs/results.md from an eval's results.json (no model, no torch).

    python benchmarks/results_table.py docs/results/nq-open-dev-results.json

Per dataset: one row per system (F1 with its 95 % interval, EM, yes/no accuracy where the dataset
has it, answer NLL, recall@1, gold weight, perplexity ratio of the deployed weights), then the
paired bootstrap of every system against each reference (regrad, regrad+context) as
"system: diff [lo, hi], p" with "no significant difference" where the interval crosses zero.
"""

from __future__ import annotations

import json
import sys


def _f(v, nd=3):
    return "—" if v is None else f"{v:.{nd}f}"


def table(results: dict) -> str:
    out = []
    for spec, ds in results["datasets"].items():
        out += [f"### {spec}: {ds['n_items']} questions, {ds['n_documents']} documents in the pool", ""]
        yesno = any(s.get("acc_yesno") is not None for s in ds["systems"].values())
        head = "| system | F1 [95 % CI] | EM |" + (" acc (yes/no/maybe) |" if yesno else "") + \
               " NLL | recall@1 | gold weight | ppl ratio (deployed / base) |"
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        for name, s in ds["systems"].items():
            lo, hi = s["f1_ci95"]
            row = f"| {name} | {_f(s['f1'])} [{_f(lo)}, {_f(hi)}] | {_f(s['em'])} |"
            if yesno:
                row += f" {_f(s.get('acc_yesno'))} |"
            row += (f" {_f(s['nll'])} | {_f(s.get('recall_at_1'))} | {_f(s.get('gold_weight'))} |"
                    f" {_f(s['drift'].get('ppl_ratio'))} |")
            out.append(row)
        for ref, comps in ds.get("comparisons", {}).items():
            parts = []
            for name, c in comps.items():
                lo, hi = c["ci95"]
                sig = "" if c.get("significant", lo > 0 or hi < 0) else ", no significant difference"
                parts.append(f"{name} {c['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], p = {c['p_value']:.3f}{sig}")
            out += ["", f"Paired bootstrap against `{ref}` (system − {ref}): " + "; ".join(parts) + "."]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as fh:
            print(table(json.load(fh)))
