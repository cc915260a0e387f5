"""The eval harness: datasets -> workspace -> every system -> metrics, drift, significance.

For each dataset the workspace is set up (content-keyed and reused, or the user's, or a fresh one
fed batch by batch in continual mode), the query engine opened once, and every system answers every
question through it (systems.py). Then per system: mean metrics, a bootstrap interval of F1, the
deployed model's drift (drift.py) and a paired bootstrap against ``regrad`` and ``regrad+context``.

Continual mode (T batches): the questions are split into T consecutive groups; the distractor pool
arrives with the first batch and each group's own documents with its batch (ingest + incremental
build_bank for ReGrad, one more round of training on the same copy for CPT); after each batch every
system answers every question seen so far.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from regrad_cli import __version__
from regrad_cli.learning.datasets import load_dataset
from regrad_cli.learning.qa import QAItem, corpus_of
from regrad_cli.errors import ConfigError
from regrad_cli.files import atomic_path
from regrad_cli.learning.evaluation import workspace as wsmod
from regrad_cli.learning.evaluation.config import CPT_SYSTEMS, REFERENCES, RUN_KEY_FIELDS, SYSTEMS_TABLE, EvalConfig, check_config
from regrad_cli.learning.evaluation.systems import Questions, cpt_query_engine, retrieve_all, run_system
from regrad_cli.learning.scores import bootstrap_ci, paired_bootstrap

log = logging.getLogger("regrad")


def split_groups(items: Sequence, t: int) -> list[list]:
    """``t`` consecutive groups of near-equal size (the first ones one larger)."""
    if t < 1:
        raise ConfigError("--continual must be at least 1")
    if t > len(items):
        raise ConfigError(f"--continual {t} needs at least {t} questions (have {len(items)})")
    q, r = divmod(len(items), t)
    out, start = [], 0
    for i in range(t):
        size = q + (i < r)
        out.append(list(items[start:start + size]))
        start += size
    return out


def _slug(spec: str, index: int) -> str:
    fmt, _, rest = spec.partition(":")
    path, _, split = rest.rpartition("@") if "@" in rest else (rest, "", "")
    stem = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    name = "-".join(x for x in (fmt, stem, split) if x)
    return f"{index + 1}-" + re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60]


def _sum_or_none(xs) -> float | None:
    """The sum, or None when any part is unknown (answers kept from a run that did not record it)."""
    xs = list(xs)
    return None if any(x is None for x in xs) else round(sum(xs), 2)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else None


def aggregate(records: Sequence[dict]) -> dict:
    """Mean metrics over per-question records."""
    yesno = [r["acc"] for r in records if r.get("acc") is not None]
    return {"n": len(records), "f1": _mean(r["f1"] for r in records), "em": _mean(r["em"] for r in records),
            "acc_yesno": _mean(yesno), "n_yesno": len(yesno), "nll": _mean(r["nll"] for r in records),
            "recall_at_1": _mean(r.get("recall_at_1") for r in records),
            "recall_at_k": _mean(r.get("recall_at_k") for r in records),
            "gold_weight": _mean(r.get("gold_weight") for r in records),
            "latency_ms": _mean(r["latency_ms"] for r in records)}


def compare(final: dict[str, list[dict]], resamples: int, seed: int) -> dict:
    """{reference: {system: paired bootstrap of F1(system) - F1(reference)}} over the same questions."""
    out = {}
    for ref in REFERENCES:
        if ref not in final:
            continue
        ref_f1 = [r["f1"] for r in final[ref]]
        out[ref] = {name: paired_bootstrap([r["f1"] for r in recs], ref_f1, resamples=resamples, seed=seed)
                    for name, recs in final.items() if name != ref}
    return out


def _versions() -> dict:
    import torch
    import transformers

    v = {"regrad": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
         "python": platform.python_version(), "platform": platform.platform()}
    try:
        import lancedb

        v["lancedb"] = lancedb.__version__
    except (ImportError, AttributeError):
        pass
    return v


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def run_eval(cfg: EvalConfig, *, engine=None, embedder=None,
             progress: Callable[[int, int, str], None] | None = None,
             command: Sequence[str] | None = None) -> dict:
    """Evaluate every system on every dataset; write results.json, report.md and plots into cfg.out.

    ``engine`` (an Engine) and ``embedder`` may be injected (tests use a tiny model); otherwise
    they are loaded from the workspace config (or the bundled defaults). Returns the results."""
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.learning.evaluation.report import check_fail_under, compare_baseline, load_baseline, render_report

    t_start = time.time()
    check_config(cfg)
    baseline = load_baseline(cfg.baseline) if cfg.baseline else None
    user_ws = Workspace.open(cfg.workspace, create=False) if cfg.workspace else None
    distractors = wsmod.load_distractors(cfg.corpus)
    data = _load_datasets(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    t_load = time.time()
    injected = engine is not None
    engine, embedder, meter = _load_models(cfg, user_ws, engine, embedder)
    load_s = time.time() - t_load
    total = sum(sum(len(g) for g in groups[: t + 1]) * len(cfg.systems)
                for _, _, _, groups in data for t in range(len(groups)))
    done = [0]

    def tick(n: int, info: str) -> None:
        done[0] += n
        if progress:
            progress(done[0], total, info)

    results = {
        "command": list(command if command is not None else sys.argv),
        "config": {**{k: v for k, v in asdict(cfg).items() if k != "cpt"}, "cpt": cfg.cpt.to_dict()},
        "versions": _versions(),
        "fingerprints": engine.fingerprints(embedder.fingerprint),
        "base_model": {"sha256": meter.sha0, "ppl_general_text": meter.ppl_base,
                       "n_parameters": sum(v.numel() for v in meter.snapshot.values())},
        "learner": {"checkpoint_id": engine.learner.checkpoint_id(), "combine": engine.learner.trained_combine,
                    "trained": bool(engine.learner.meta.get("trained")), "doc_loss": engine.learner.doc_loss},
        "systems": cfg.systems,
        "datasets": {},
        "wall_s": {"load": round(load_s, 2)},
    }
    for i, (spec, split_items, items, groups) in enumerate(data):
        slug = _slug(spec, i)
        results["datasets"][spec] = _run_dataset(cfg, engine, embedder, meter, spec, slug, split_items, groups,
                                                  user_ws, distractors, injected, tick, results["fingerprints"])
        results["complete"] = i == len(data) - 1
        results["wall_s"]["total"] = round(time.time() - t_start, 2)
        # Written after every dataset, so a long multi-dataset run that dies keeps what it measured.
        (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    results["fail_under"] = check_fail_under(results, cfg.fail_under)
    if baseline is not None:
        results["baseline"] = compare_baseline(results, baseline, cfg.baseline)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    (out / "report.md").write_text(render_report(results))
    return results


def _load_datasets(cfg: EvalConfig) -> list[tuple[str, list[QAItem], list[QAItem], list[list[QAItem]]]]:
    """(spec, the split's items, the items evaluated (--limit), their --continual groups) per
    dataset, each dataset once."""
    data = []
    cfg.datasets = list(dict.fromkeys(cfg.datasets))
    for spec in cfg.datasets:
        split_items = load_dataset(spec)
        items = split_items[: max(0, cfg.limit)] if cfg.limit is not None else split_items
        if not items:
            raise ConfigError(f"{spec}: no questions left after --limit {cfg.limit}")
        data.append((spec, split_items, items, split_groups(items, cfg.continual)))
    return data


def _load_models(cfg: EvalConfig, user_ws, engine=None, embedder=None):
    """(engine, embedder, drift meter): the injected ones or those of the workspace config (or the
    bundled defaults), warmed up."""
    from importlib.resources import files

    from regrad_cli.learner import adapt
    from regrad_cli.learning.evaluation.drift import DriftMeter
    from regrad_cli.lm.generation import generate
    from regrad_cli.lm.models import Embedder
    from regrad_cli.lm.prompting import prompt_ids
    from regrad_cli.workspace.config import BUNDLED_EMBEDDER
    from regrad_cli.workspace.engine import Engine

    engine = engine or Engine.load(user_ws, model_id=cfg.model, checkpoint=cfg.checkpoint, device=cfg.device)
    if embedder is None:
        ecfg = user_ws.config.embedder if user_ws else None
        embedder = Embedder(ecfg.id if ecfg else cfg.embedder or BUNDLED_EMBEDDER, device=cfg.device or "cpu",
                            batch_size=ecfg.batch_size if ecfg else 32)
    general = (files("regrad_cli") / "data" / "general_text.txt").read_text(encoding="utf-8")
    meter = DriftMeter.start(engine, general, cfg.ppl_max_tokens, cfg.gamma, cfg.drift_steps)
    # One-off costs (the tokenizer's newline table, first kernels) must not land in the latency of
    # whichever system happens to run first.
    with adapt.applied(engine.learner, "off"):
        generate(engine.model, engine.tokenizer, [prompt_ids(engine.tokenizer, "warm-up")], 2)
    return engine, embedder, meter


def run_key(cfg: EvalConfig, spec: str, groups: list[list[QAItem]], fingerprints: dict) -> dict:
    """What an earlier run in the same --out must share for ``--resume`` to keep its answers."""
    ids = "\n".join(it.id for g in groups for it in g)
    conf = {f: getattr(cfg, f) for f in RUN_KEY_FIELDS}
    conf["cpt"] = cfg.cpt.to_dict()
    key = {"dataset": spec, "questions_sha256": hashlib.sha256(ids.encode("utf-8")).hexdigest(),
           "config": conf, "fingerprints": fingerprints}
    return json.loads(json.dumps(key, default=_json_default))  # the form it takes in the file


def _key_mismatch(key: dict, prior: dict) -> list[str]:
    """Names of the key parts that differ (a legacy key without a question hash skips that part:
    the kept records' question ids are checked one by one anyway)."""
    diff = [f"dataset ({prior.get('dataset')!r} then, {key['dataset']!r} now)"] if prior.get("dataset") != key["dataset"] else []
    if prior.get("questions_sha256") not in (None, key["questions_sha256"]):
        diff.append("the evaluated questions")
    missing = object()
    for f, v in key["config"].items():
        if (prior.get("config") or {}).get(f, missing) != v:
            diff.append(f"--{f.replace('_', '-')}")
    for part in ("model", "learner", "embedder"):
        if (prior.get("fingerprints") or {}).get(part) != key["fingerprints"].get(part):
            diff.append(f"the {part} fingerprint")
    return diff


def _prior_key(ddir: Path, spec: str) -> tuple[dict | None, str]:
    """The earlier run's key: its run-key.json, else (runs of regrad before --resume existed) the
    config and fingerprints of the results.json it wrote next to the dataset's folder."""
    own = ddir / "run-key.json"
    if own.exists():
        return json.loads(own.read_text(encoding="utf-8")), str(own)
    res = ddir.parent / "results.json"
    if res.exists():
        data = json.loads(res.read_text(encoding="utf-8"))
        if spec in (data.get("datasets") or {}):
            return {"dataset": spec, "config": data.get("config"), "fingerprints": data.get("fingerprints")}, str(res)
    return None, ""


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # the torn last line of a run that was killed
                continue
    return out


def kept_answers(cfg: EvalConfig, ddir: Path, spec: str, key: dict, groups: list[list[QAItem]]) -> tuple[dict, str]:
    """{(stage, system): {"records", "drift", "eval_s", "cpt"}} of the earlier run in ``ddir`` that can be
    kept: every question of the stage answered, in order, under the same run key. ConfigError when
    the earlier run was made with other options (nothing is deleted then)."""
    prior, source = _prior_key(ddir, spec)
    if prior is None:
        if (ddir / "predictions.jsonl").exists():
            raise ConfigError(f"--resume: {ddir} has answers but no run key (run-key.json or results.json) "
                              "to check them against; run without --resume to start afresh")
        return {}, ""
    diff = _key_mismatch(key, prior)
    if diff:
        raise ConfigError(f"--resume: the earlier run in {ddir} differs in {', '.join(diff)} "
                          f"(key from {source}); use another --out or drop --resume")
    by: dict[tuple[int, str], list[dict]] = {}
    for r in _read_jsonl(ddir / "predictions.jsonl"):
        by.setdefault((int(r.get("stage", 0)), str(r.get("system"))), []).append(r)
    side = {(int(s["stage"]), s["system"]): s for s in _read_jsonl(ddir / "systems.jsonl")}
    kept = {}
    for t in range(len(groups)):
        want = [(b + 1, it.id) for b, g in enumerate(groups[: t + 1]) for it in g]
        for name in cfg.systems:
            recs = by.get((t + 1, name), [])
            if [(r.get("batch"), r.get("id")) for r in recs] != want:
                continue
            s = side.get((t + 1, name), {})
            if name in CPT_SYSTEMS and s.get("drift") is None:
                continue  # the CPT copy's drift cannot be measured again without training it
            kept[(t + 1, name)] = {"records": recs, "drift": s.get("drift"), "eval_s": s.get("eval_s"),
                                   "cpt": s.get("cpt")}
    return kept, source


def _cpt_summary(cfg: EvalConfig, cpt, stages: list[dict], kept: dict) -> dict | None:
    """The CPT training of this run, or, when every CPT answer was kept, the earlier run's."""
    if cpt is not None:
        return {"config": cfg.cpt.to_dict(), "trainable_parameters": cpt.n_trainable,
                "rounds": [st["cpt"] for st in stages]}
    rec = {k[0]: v["cpt"] for k, v in sorted(kept.items()) if v.get("cpt")}
    if not rec:
        return None
    return {"config": cfg.cpt.to_dict(), "trainable_parameters": next(iter(rec.values()))["trainable_parameters"],
            "rounds": [rec.get(t + 1, {}).get("round") for t in range(len(stages))], "kept": True}


def _write_jsonl_atomic(path: Path, rows) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n")


def _setup(cfg, engine, embedder, ws, stage_docs: list[str], paths, *, ingest_now: bool, ddir: Path, t: int):
    from regrad_cli.offline.build import build_bank

    info = None
    if ingest_now:
        from regrad_cli.offline.ingest import ingest

        path = ddir / f"corpus-batch{t + 1}.jsonl"
        wsmod.write_corpus(path, stage_docs)
        summary = ingest(ws, [path, *paths], embedder=embedder, tokenizer=engine.tokenizer)
        info = summary.to_dict() if hasattr(summary, "to_dict") else str(summary)
    return info, build_bank(ws, engine).to_dict()


@dataclass
class _Run:
    """What every stage of one dataset's evaluation shares."""

    cfg: EvalConfig
    engine: object
    embedder: object
    meter: object
    kept: dict  # (stage, system) -> the earlier run's answers (--resume)
    cpt: object  # the ContinualPretrainer, or None
    tick: object
    pred_fh: object = None
    side_fh: object = None


def _dataset_workspace(cfg: EvalConfig, engine, embedder, ddir: Path, docs: list[str], user_ws, distractors,
                       injected: bool, continual: bool):
    """(workspace, its description): the user's, a cached one of this pool, or a fresh one that the
    stages of a continual run fill batch by batch."""
    ws_info: dict = {"pool": cfg.pool, "corpus": distractors.specs}
    if user_ws is not None:
        ws, ws_info["kind"] = user_ws, "user"
    elif not continual:
        ws, info = wsmod.cached_workspace(cfg, engine, embedder, docs, distractors.paths, injected=injected)
        ws_info.update(kind="cached", **info)
    else:
        ws = wsmod.fresh_workspace(ddir / "workspace", cfg, engine, injected)
        ws_info["kind"] = "fresh"
    ws_info["path"] = str(ws.root)
    return ws, ws_info


def _keep_answers(ddir: Path, kept: dict, key: dict) -> tuple[Path, Path]:
    """Rewrite predictions.jsonl and systems.jsonl (atomically) with only the kept answers, and
    record the run key; returns the two paths, which the stages append to."""
    pred_path, side_path = ddir / "predictions.jsonl", ddir / "systems.jsonl"
    _write_jsonl_atomic(pred_path, (r for k in sorted(kept) for r in kept[k]["records"]))
    _write_jsonl_atomic(side_path, ({"stage": k[0], "system": k[1], "drift": v["drift"], "eval_s": v["eval_s"],
                                     **({"cpt": v["cpt"]} if v.get("cpt") else {})}
                                    for k, v in sorted(kept.items()) if v["drift"] is not None))
    (ddir / "run-key.json").write_text(json.dumps(key, indent=1), encoding="utf-8")
    return pred_path, side_path


def _run_dataset(cfg: EvalConfig, engine, embedder, meter, spec: str, slug: str, split_items: list[QAItem],
                 groups: list[list[QAItem]], user_ws, distractors, injected: bool, tick, fingerprints: dict) -> dict:
    from regrad_cli.learning.cpt import ContinualPretrainer
    from regrad_cli.learning.evaluation.report import draw_plots

    ddir = Path(cfg.out) / slug
    ddir.mkdir(parents=True, exist_ok=True)
    t_ds = time.time()
    items = [it for g in groups for it in g]
    docs = wsmod.pool_documents(split_items, items, cfg.pool, distractors)
    continual = len(groups) > 1
    ws, ws_info = _dataset_workspace(cfg, engine, embedder, ddir, docs, user_ws, distractors, injected, continual)
    key = run_key(cfg, spec, groups, fingerprints)
    kept, key_source = kept_answers(cfg, ddir, spec, key, groups) if cfg.resume else ({}, "")
    # Only the kept answers stay in the files (atomically rewritten), the rest is answered anew.
    pred_path, side_path = _keep_answers(ddir, kept, key)
    need_cpt = any(s in CPT_SYSTEMS and any((t + 1, s) not in kept for t in range(len(groups))) for s in cfg.systems)
    cpt = ContinualPretrainer(engine.model, engine.tokenizer, cfg.cpt, engine.learner) if need_cpt else None
    run = _Run(cfg, engine, embedder, meter, kept, cpt, tick)
    own = set(corpus_of(items))
    pending = [d for d in docs if d not in own]  # the distractor pool arrives with the first batch
    trained_on: set[str] = set()
    stages, final = [], {}
    with open(pred_path, "a", encoding="utf-8") as run.pred_fh, open(side_path, "a", encoding="utf-8") as run.side_fh:
        for t, group in enumerate(groups):
            stage_docs = list(dict.fromkeys(pending + corpus_of(group))) if continual else []
            pending = []
            stage, answers = _run_stage(run, ws, groups, t, stage_docs, distractors.paths if t == 0 else [],
                                        ingest_now=continual, ddir=ddir, user_ws=user_ws, trained_on=trained_on)
            stages.append(stage)
            final = answers  # the last stage's answers are the dataset's
    result = _dataset_result(run, slug, items, split_items, groups, ws_info, pred_path, stages, final, key_source,
                             t_ds)
    try:
        result["plots"] = draw_plots(result, ddir)
    except Exception as exc:  # noqa: BLE001 - a plot must never lose an evaluation
        log.warning("could not draw plots for %s: %s", spec, exc)
        result["plots"] = []
    return result


def _run_stage(run: _Run, ws, groups: list[list[QAItem]], t: int, stage_docs: list[str], paths, *,
               ingest_now: bool, ddir: Path, user_ws, trained_on: set[str]) -> tuple[dict, dict[str, list[dict]]]:
    """Stage t: add its documents (continual runs), build the bank, train CPT on what it has not
    seen, then answer every question of batches 1..t+1 with every system. Returns the stage's
    record and each system's answers."""
    from regrad_cli.online.query import QueryEngine
    from regrad_cli.workspace.documents import DocumentStore

    cfg, engine, embedder, cpt = run.cfg, run.engine, run.embedder, run.cpt
    t_stage = time.time()
    ingest_info, bank = _setup(cfg, engine, embedder, ws, stage_docs, paths, ingest_now=ingest_now, ddir=ddir, t=t)
    setup_s = time.time() - t_stage
    rows = DocumentStore(ws).all(columns=["id", "text"])
    cpt_stats = None
    if cpt is not None:
        new = [r["text"] for r in rows if r["id"] not in trained_on]
        trained_on.update(r["id"] for r in rows)
        cpt_stats = cpt.train(new)
    qe = QueryEngine(ws, engine=engine, embedder=embedder)
    cpt_qe = cpt_query_engine(ws, engine, embedder, cpt.model) if cpt is not None else None
    eval_items = [(b + 1, it) for b, g in enumerate(groups[: t + 1]) for it in g]
    plain = [it for _, it in eval_items]
    ids = [r["id"] for r in rows]
    gold = wsmod.gold_ids(ids, plain, texts={r["id"]: r["text"] for r in rows} if user_ws else None)
    qs = Questions(eval_items, retrieve_all(qe, plain, cfg), gold, sorted(ids))
    stage = {"stage": t + 1, "documents_added": len(stage_docs), "documents_total": len(rows),
             "bank_rows": bank["rows"], "ingest": ingest_info, "bank": bank, "setup_s": round(setup_s, 2),
             "cpt": cpt_stats, "items": len(eval_items),
             "questions_without_gold": sum(not g for g in gold), "systems": {}}
    last = t == len(groups) - 1
    answers = {}
    for name in cfg.systems:
        answers[name], stage["systems"][name] = _system_at_stage(run, name, t, qs, qe, cpt_qe, cpt_stats, last)
    stage["wall_s"] = round(time.time() - t_stage, 2)
    return stage, answers


def _system_at_stage(run: _Run, name: str, t: int, qs, qe, cpt_qe, cpt_stats, last: bool) -> tuple[list[dict], dict]:
    """One system's answers at stage t (kept from an earlier run under the same key, or answered
    now and appended to predictions.jsonl), its drift (systems.jsonl) and its scores."""
    cfg, engine, cpt = run.cfg, run.engine, run.cpt
    t_sys = time.time()
    on_cpt = SYSTEMS_TABLE[name].model == "cpt"
    prior = run.kept.get((t + 1, name))
    if prior is not None:  # --resume: answered by the earlier run under the same key
        recs, eval_s = prior["records"], prior["eval_s"]
        drift = prior["drift"] or run.meter.measure(name, engine.model, qe=qe, records=recs, with_ppl=last)
        if run.tick:
            run.tick(len(recs), f"{name} (kept)")
    else:
        recs = run_system(cpt_qe if on_cpt else qe, name, qs, cfg, stage=t + 1, tick=run.tick)
        drift = run.meter.measure(name, cpt.model if on_cpt else engine.model, qe=qe, records=recs, with_ppl=last)
        eval_s = round(time.time() - t_sys, 2)
        for r in recs:
            run.pred_fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        run.pred_fh.flush()
    if prior is None or prior["drift"] is None:
        entry = {"stage": t + 1, "system": name, "drift": drift, "eval_s": eval_s}
        if on_cpt and cpt is not None:  # what a later --resume reports for the kept copy
            entry["cpt"] = {"trainable_parameters": cpt.n_trainable, "round": cpt_stats}
        run.side_fh.write(json.dumps(entry, default=_json_default) + "\n")
        run.side_fh.flush()
    by_batch = {str(b + 1): aggregate([r for r in recs if r["batch"] == b + 1]) for b in range(t + 1)}
    return recs, {"all": aggregate(recs), "by_batch": by_batch, "drift": drift, "eval_s": eval_s,
                  "kept": prior is not None}


def _dataset_result(run: _Run, slug: str, items, split_items, groups, ws_info: dict, pred_path: Path,
                    stages: list[dict], final: dict[str, list[dict]], key_source: str, t_ds: float) -> dict:
    """The dataset's entry of results.json: final scores with bootstrap intervals, comparisons,
    the stages, forgetting and drift curves, CPT and time."""
    cfg, kept = run.cfg, run.kept
    systems = {}
    for name in cfg.systems:
        s = stages[-1]["systems"][name]
        std, lo, hi = bootstrap_ci([r["f1"] for r in final[name]], resamples=cfg.bootstrap, seed=cfg.seed)
        systems[name] = {**s["all"], "f1_std": std, "f1_ci95": [lo, hi], "drift": s["drift"]}
    return {
        "slug": slug, "n_items": len(items), "n_split_items": len(split_items),
        "n_documents": stages[-1]["documents_total"], "batches": len(groups), "top_k": cfg.top_k,
        "workspace": ws_info, "predictions": str(pred_path), "systems": systems,
        "kept": {"systems": sorted({k[1] for k in kept if k[0] == len(groups)}), "key": key_source} if cfg.resume else None,
        "comparisons": compare(final, cfg.bootstrap, cfg.seed), "stages": stages,
        "forgetting_f1_batch1": {n: [st["systems"][n]["by_batch"]["1"]["f1"] for st in stages] for n in cfg.systems},
        "drift_l2": {n: [st["systems"][n]["drift"]["l2"] for st in stages] for n in cfg.systems},
        "cpt": _cpt_summary(cfg, run.cpt, stages, kept),
        "wall_s": {"total": round(time.time() - t_ds, 2),
                   "setup": round(sum(st["setup_s"] for st in stages), 2),
                   "cpt_train": round(sum((st["cpt"] or {}).get("train_s", 0.0) for st in stages), 2),
                   "per_system": {n: _sum_or_none(st["systems"][n]["eval_s"] for st in stages)
                                  for n in cfg.systems}},
    }
