"""Summarise an eval's predictions.jsonl (the systems finished so far) with paired bootstraps:
    python benchmarks/summarise_predictions.py runs/eval-all/demo/1-demo/predictions.jsonl > OUT.json"""
import json, collections, sys
from regrad_cli.metrics import paired_bootstrap
rows = [json.loads(l) for l in open(sys.argv[1])]
by = collections.defaultdict(dict)
for r in rows:
    by[r["system"]][r["id"]] = r
out = {"source": sys.argv[1], "systems": {}, "paired": {}}
for s, rs in by.items():
    f = [r["f1"] for r in rs.values()]
    out["systems"][s] = {"n": len(f), "f1": sum(f) / len(f), "em": sum(r["em"] for r in rs.values()) / len(f)}
pairs = [("regrad", "closed-book+phi"), ("regrad+context", "rag+phi"), ("rag+phi", "rag"), ("oracle", "closed-book+phi"), ("regrad", "rag")]
for a, b in pairs:
    if a in by and b in by and len(by[a]) == len(by[b]):
        ids = sorted(by[a])
        res = paired_bootstrap([by[a][i]["f1"] for i in ids], [by[b][i]["f1"] for i in ids], resamples=2000)
        out["paired"][f"{a} - {b}"] = res
json.dump(out, sys.stdout, indent=1, default=float)
