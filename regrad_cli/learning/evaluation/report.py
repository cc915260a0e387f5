"""report.md, plots, the significance statements, --fail-under and --baseline.

Every sentence about a difference between systems is generated from the paired bootstrap
(metrics.paired_bootstrap): "better" or "worse" only when the 95 % interval of the F1 difference
excludes zero, "no significant difference" otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

from regrad_cli.errors import ConfigError
from regrad_cli.learning.evaluation.config import CPT_SYSTEMS, REGRAD_SYSTEMS


def _fmt(x, nd: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.3f}"


def _p(p: float | None) -> str:
    return "—" if p is None else f"{p:.3f}" if p >= 0.001 else "< 0.001"


def significance_sentence(name: str, ref: str, c: dict) -> str:
    """One sentence that states what the interval says, and nothing more."""
    if c["diff"] is None:
        return f"{name} vs {ref}: no questions."
    lo, hi = c["ci95"]
    nums = f"ΔF1 {c['diff']:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}], p = {_p(c['p_value'])}, n = {c['n']}"
    if lo > 0:
        return f"**{name}** scores significantly higher than {ref} ({nums})."
    if hi < 0:
        return f"**{name}** scores significantly lower than {ref} ({nums})."
    return f"{name}: no significant difference from {ref} ({nums}; the interval includes zero)."


def render_report(results: dict) -> str:
    lines = ["# regrad eval", ""]
    fp = results["fingerprints"]
    cfg = results["config"]
    lines += [f"- command: `{' '.join(results['command'])}`",
              f"- model: {fp['model'].get('id')} (weights {str(fp['model'].get('weights_sha256'))[:20]}…), "
              f"learner {fp['learner']['checkpoint_id'][:16]} (combine {results['learner']['combine']}"
              f"{', untrained init' if not results['learner']['trained'] else ''}"
              f"{_doc_loss_note(results['learner'])}), embedder {fp['embedder'].get('id')}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if k != "platform"),
              f"- top-k {cfg['top_k']}, gamma {cfg['gamma']}, retriever {cfg['retriever']}, retrieval pool "
              f"{cfg['pool']}{' + ' + ', '.join(cfg['corpus']) if cfg['corpus'] else ''}, greedy "
              f"{cfg['max_new_tokens']} new tokens, seed {cfg['seed']}, bootstrap {cfg['bootstrap']} resamples, "
              f"wall time {results['wall_s'].get('total')} s",
              "- CPT: " + ", ".join(f"{k} {v}" for k, v in cfg["cpt"].items()),
              f"- base model: sha256 {results['base_model']['sha256'][:16]}…, general-text perplexity "
              f"{results['base_model']['ppl_general_text']:.3f}", ""]
    for spec, ds in results["datasets"].items():
        lines += _dataset_section(spec, ds, cfg)
    if results.get("fail_under"):
        lines += ["## --fail-under", ""]
        lines += [f"- {f['system']} on {f['dataset']}: F1 {_fmt(f['f1'])} vs threshold {f['threshold']:.3f}: "
                  f"{'pass' if f['passed'] else '**FAIL**'}" for f in results["fail_under"]]
        lines.append("")
    if results.get("baseline"):
        lines += ["## Change against the baseline", "", f"Baseline: `{results['baseline']['path']}`", "",
                  "| dataset | system | F1 before | F1 now | change |", "|---|---|---|---|---|"]
        lines += [f"| {c['dataset']} | {c['system']} | {_fmt(c['f1_before'])} | {_fmt(c['f1_after'])} | "
                  f"{_signed(c['delta'])} |" for c in results["baseline"]["changes"]]
        lines.append("")
    return "\n".join(lines)


def _dataset_section(spec: str, ds: dict, cfg: dict) -> list[str]:
    k = ds["top_k"]
    w = ds["workspace"]
    lines = [f"## {spec}", "",
             f"{ds['n_items']} questions (of {ds['n_split_items']} in the split); {ds['n_documents']} documents "
             f"in the retrieval pool ({w['kind']} workspace{', reused' if w.get('reused') else ''}); "
             f"{ds['batches']} batch(es). F1 interval: 95% bootstrap over questions; gold weight = share of "
             "the step's combination weight on the gold document; latency = mean per question (batched "
             "generation, retrieval included where used; CPT training excluded).", "",
             f"| system | F1 [95% CI] | EM | acc (yes/no) | NLL | recall@1 | recall@{k} | gold weight | latency ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in ds["systems"].items():
        lo, hi = s["f1_ci95"]
        acc = "—" if s["acc_yesno"] is None else f"{s['acc_yesno']:.3f} (n={s['n_yesno']})"
        lines.append(f"| {name} | {s['f1']:.3f} [{lo:.3f}, {hi:.3f}] | {s['em']:.3f} | {acc} | {_fmt(s['nll'])} | "
                     f"{_fmt(s['recall_at_1'])} | {_fmt(s['recall_at_k'])} | {_fmt(s['gold_weight'])} | "
                     f"{_fmt(s['latency_ms'], 1)} |")
    lines += ["", "Drift of the deployed weights (general-text perplexity of exactly the weights that answered; "
              "base+phi+step: mean over the steps of n evaluated questions):", "",
              "| system | deployed weights | ppl (base → deployed) | ratio | base L2 | base sha256 identical | "
              "phi identical |", "|---|---|---|---|---|---|---|"]
    for name, s in ds["systems"].items():
        d = s["drift"]
        dep = d["deployed"] + (f" (n={d['n_steps']})" if d.get("n_steps") is not None else "")
        std = f" ± {d['ppl_deployed_std']:.3f}" if d.get("ppl_deployed_std") else ""
        lines.append(f"| {name} | {dep} | {_fmt(d['ppl_base'])} → {_fmt(d['ppl_deployed'])}{std} | "
                     f"{_fmt(d['ppl_ratio'])} | {d['l2']:.6g} | {_fmt(d['identical'])} | {_fmt(d['phi_identical'])} |")
    for ref, comps in ds.get("comparisons", {}).items():
        lines += ["", f"Paired bootstrap against **{ref}** (F1 difference system − {ref}, same questions):", "",
                  "| system | ΔF1 | 95% CI | p |", "|---|---|---|---|"]
        for name, c in comps.items():
            lo, hi = c["ci95"]
            lines.append(f"| {name} | {_fmt(c['diff'])} | [{_fmt(lo)}, {_fmt(hi)}] | {_p(c['p_value'])} |")
        lines += [""] + [f"- {significance_sentence(n, ref, c)}" for n, c in comps.items()]
    if ds["batches"] > 1:
        stages = range(1, ds["batches"] + 1)
        for title, key, fmt in (("Forgetting: F1 on batch 1 after each batch", "forgetting_f1_batch1", _fmt),
                                ("Drift: L2 distance of the base weights after each batch", "drift_l2",
                                 lambda v: f"{v:.6g}")):
            lines += ["", title, "", "| system | " + " | ".join(f"after {t}" for t in stages) + " |",
                      "|---|" + "---|" * ds["batches"]]
            lines += [f"| {n} | " + " | ".join(fmt(v) for v in vals) + " |" for n, vals in ds[key].items()]
    if ds.get("cpt"):
        rounds = [r for r in ds["cpt"]["rounds"] if r]
        lines += ["", f"CPT: {ds['cpt']['trainable_parameters']:,} trainable parameters; "
                  + "; ".join(f"batch {i + 1}: {r['documents']} docs, {r['steps']} steps, loss "
                              f"{_fmt(r['loss_first_epoch'])} → {_fmt(r['loss_last_epoch'])}, {r['train_s']} s"
                              for i, r in enumerate(rounds))]
    wall = ds["wall_s"]
    lines += ["", f"Wall time {wall['total']} s (ingest + bank {wall['setup']} s, CPT training {wall['cpt_train']} s; "
              + ", ".join(f"{n} {v} s" if v is not None else f"{n} not recorded"
                          for n, v in wall["per_system"].items()) + ")"]
    kept = (ds.get("kept") or {}).get("systems")
    if kept:
        lines += ["", f"Answers kept from an earlier run in the same folder (`--resume`, same run key: "
                  f"{ds['kept']['key']}): {', '.join(kept)}. Their wall times are that run's, where it recorded them"
                  + (", and CPT was not trained again (the training above is that run's)." if (ds.get("cpt") or {}).get("kept")
                     else ".")]
    if ds.get("plots"):
        lines += [""] + [f"![{Path(p).stem}]({Path(p).relative_to(Path(cfg['out']))})" for p in ds["plots"]]
    lines.append("")
    return lines


def check_fail_under(results: dict, thresholds: dict) -> list[dict]:
    out = []
    for spec, ds in results["datasets"].items():
        for name, th in thresholds.items():
            f1 = ds["systems"][name]["f1"]
            out.append({"dataset": spec, "system": name, "threshold": th, "f1": f1, "passed": f1 >= th})
    return out


def fail_under_message(results: dict) -> str | None:
    """One line naming every system below its --fail-under threshold (None when all pass)."""
    bad = [f for f in results.get("fail_under") or [] if not f["passed"]]
    if not bad:
        return None
    return "--fail-under: " + "; ".join(f"{f['system']} F1 {f['f1']:.3f} < {f['threshold']:.3f} on {f['dataset']}"
                                        for f in bad)


def load_baseline(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--baseline {path}: cannot read an earlier results.json ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), dict):
        raise ConfigError(f"--baseline {path}: not a results.json of `regrad eval` (no 'datasets')")
    return data


def compare_baseline(results: dict, baseline: dict, path: str) -> dict:
    changes = []
    for spec, ds in results["datasets"].items():
        old = baseline["datasets"].get(spec, {}).get("systems", {})
        for name, s in ds["systems"].items():
            before = (old.get(name) or {}).get("f1")
            changes.append({"dataset": spec, "system": name, "f1_before": before, "f1_after": s["f1"],
                            "delta": None if before is None else s["f1"] - before})
    return {"path": str(path), "changes": changes}


def baseline_lines(results: dict) -> list[str]:
    b = results.get("baseline")
    if not b:
        return []
    out = [f"change against {b['path']}:"]
    for c in b["changes"]:
        if c["delta"] is None:
            out.append(f"  {c['dataset']} {c['system']}: F1 {c['f1_after']:.3f} (not in the baseline)")
        else:
            out.append(f"  {c['dataset']} {c['system']}: F1 {c['f1_before']:.3f} -> {c['f1_after']:.3f} "
                       f"({c['delta']:+.3f})")
    return out


def draw_plots(ds: dict, directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = list(ds["systems"])
    means = [ds["systems"][n]["f1"] for n in names]
    lo = [m - ds["systems"][n]["f1_ci95"][0] for n, m in zip(names, means)]
    hi = [ds["systems"][n]["f1_ci95"][1] - m for n, m in zip(names, means)]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4))
    colours = ["tab:red" if n in REGRAD_SYSTEMS else "tab:orange" if n in CPT_SYSTEMS else "tab:blue" for n in names]
    ax.bar(range(len(names)), means, yerr=[lo, hi], capsize=4, color=colours)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("F1 (95% bootstrap CI)")
    ax.set_title(f"F1 per system ({ds['n_items']} questions)")
    fig.tight_layout()
    p = directory / "f1.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(str(p))
    if ds["batches"] > 1:
        x = list(range(1, ds["batches"] + 1))
        for key, ylabel, fname in (("drift_l2", "L2 distance of base weights", "drift.png"),
                                   ("forgetting_f1_batch1", "F1 on batch 1", "forgetting.png")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for n in names:
                ax.plot(x, [float("nan") if v is None else v for v in ds[key][n]], marker="o", label=n)
            ax.set_xlabel("batches of the corpus seen")
            ax.set_xticks(x)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
            fig.tight_layout()
            p = directory / fname
            fig.savefig(p, dpi=100)
            plt.close(fig)
            paths.append(str(p))
    return paths


def _doc_loss_note(learner: dict) -> str:
    """', document loss NAME' for a learner whose document loss is not the plain one (results
    written before the loss could be chosen have none: plain)."""
    loss = learner.get("doc_loss", "plain")
    return "" if loss == "plain" else f", document loss {loss}"
