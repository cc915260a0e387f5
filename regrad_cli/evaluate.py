"""eval: the evaluation harness. Every system on the same questions, with drift measured.

Systems (method.md §1.5, §2):

    closed-book       base model, no side path            regrad       top-k gradients, no passages
    closed-book+phi   meta-learned phi, no gradients      regrad+context  top-k gradients + passages
    rag               base model, top-k passages          shifted      question i gets the gradients
    cpt               continual pre-training of a copy                 of question i+1's retrieval
    cpt+rag           that copy with top-k passages       random       k random documents' gradients

Everything that queries do is done here the way ``regrad query`` does it: the same QueryEngine
(retrieval, bank decoding, combined_gradient with the learner's trained combine), the same
Learner.adapted_weights step, the same prompts (prompting.prompt_ids) and the same greedy
generation. The only difference is batching: several questions share one ``generate`` call, each
row on its own adapter (the learner's per-sample mode, as in metatrain.evaluate_dev); a batch of
one uses the plain 2-D adapter, exactly like a query.

Drift: the base model is fingerprinted (weights_sha256) and snapshotted once; after each system
its L2 distance from the snapshot and its sha256 are measured again, and the perplexity of the
shipped general text is measured before and after. ReGrad never writes a base weight, so its rows
must read L2 = 0 and identical sha256; CPT trains a copy, whose distance is the drift it costs.

Continual mode (T batches): the questions are split into T consecutive groups; their documents
arrive batch by batch (ingest + incremental build_bank for ReGrad, one more round of training on
the same copy for CPT) and after each batch every system answers every question seen so far.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from regrad_cli import __version__
from regrad_cli.cpt import ContinualPretrainer, CPTConfig
from regrad_cli.datasets import QAItem, corpus_of, load_dataset
from regrad_cli.errors import ConfigError, RegradError
from regrad_cli.metrics import bootstrap_ci, exact_match, f1_score, gold_retrieved, yes_no_accuracy

log = logging.getLogger("regrad")

SYSTEMS = ("closed-book", "closed-book+phi", "rag", "cpt", "cpt+rag", "regrad", "regrad+context",
           "shifted", "random")
REGRAD_SYSTEMS = ("regrad", "regrad+context", "shifted", "random")
CPT_SYSTEMS = ("cpt", "cpt+rag")


@dataclass(frozen=True)
class _Plan:
    model: str  # "base" or "cpt"
    adapter: str | None  # None (no side path), "phi", or which documents' gradients: own/shifted/random
    passages: bool  # the question's top-k passages in the prompt
    retrieval: bool  # uses the question's retrieval (for latency and recall@k)


_PLANS = {
    "closed-book": _Plan("base", None, False, False),
    "closed-book+phi": _Plan("base", "phi", False, False),
    "rag": _Plan("base", None, True, True),
    "cpt": _Plan("cpt", None, False, False),
    "cpt+rag": _Plan("cpt", None, True, True),
    "regrad": _Plan("base", "own", False, True),
    "regrad+context": _Plan("base", "own", True, True),
    "shifted": _Plan("base", "shifted", False, True),
    "random": _Plan("base", "random", False, False),
}


@dataclass
class EvalConfig:
    datasets: list[str]
    out: str = "runs/eval"
    limit: int | None = None
    top_k: int = 3
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    workspace: str | None = None
    checkpoint: str | None = None
    continual: int = 1
    seed: int = 0
    max_new_tokens: int = 16
    batch_size: int = 8
    gamma: float = 1.0
    retriever: str = "dense"
    bootstrap: int = 1000
    device: str | None = None
    # Tokens of the shipped general text used for perplexity (about 3.3k for SmolLM2: all of it).
    ppl_max_tokens: int = 4096
    cpt: CPTConfig = field(default_factory=CPTConfig)


def parse_systems(text: str | None) -> list[str]:
    """'all' / None -> every system; else a comma-separated list, checked."""
    if text is None or text.strip() in ("", "all"):
        return list(SYSTEMS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SYSTEMS]
    if bad:
        raise ConfigError(f"unknown system(s) {', '.join(bad)} (use {', '.join(SYSTEMS)})")
    return list(dict.fromkeys(names))


# Small pieces --------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 256, batch_size: int = 4,
               max_tokens: int | None = None) -> float:
    """Perplexity of ``text`` (its first ``max_tokens`` tokens) in non-overlapping windows, each
    opened with a document-start token."""
    from regrad_cli.gradients import doc_start_token, per_sample_nll

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or window
    window = max(8, min(window, int(limit)))
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)[:max_tokens]
    start = doc_start_token(tokenizer)
    if start is None:
        start = tokenizer.bos_token_id
    body = window - (start is not None)
    rows = [([start] if start is not None else []) + ids[i:i + body] for i in range(0, len(ids), body)]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise RegradError("the general text is too short to measure perplexity")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        width = max(len(r) for r in chunk)
        inp = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            inp[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        nll = per_sample_nll(model, inp.to(device), mask.to(device))
        n = torch.tensor([len(r) - 1 for r in chunk], dtype=torch.float64)
        total += float((nll.double().cpu() * n).sum())
        count += int(n.sum())
    return float(np.exp(total / count))


def _params_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def l2_distance(model, snapshot: dict[str, torch.Tensor]) -> float:
    """sqrt(sum ||theta - theta0||^2) over every (distinct) parameter, in float64."""
    total = 0.0
    for n, p in model.named_parameters():
        total += float((p.detach().double() - snapshot[n].to(p.device).double()).pow(2).sum())
    return float(np.sqrt(total))


def _slug(spec: str, index: int) -> str:
    fmt, _, rest = spec.partition(":")
    path, _, split = rest.rpartition("@") if "@" in rest else (rest, "", "")
    stem = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    name = "-".join(x for x in (fmt, stem, split) if x)
    return f"{index + 1}-" + re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60]


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


def _write_corpus(path: Path, docs: Sequence[str]) -> None:
    import hashlib

    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            title = d.split("\n", 1)[0].strip()[:120]
            rec = {"id": "doc-" + hashlib.sha256(d.encode("utf-8")).hexdigest()[:16], "title": title, "text": d}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else None


def aggregate(records: Sequence[dict]) -> dict:
    """Mean metrics over per-question records."""
    yesno = [r["acc"] for r in records if r.get("acc") is not None]
    return {"n": len(records), "f1": _mean(r["f1"] for r in records), "em": _mean(r["em"] for r in records),
            "acc_yesno": _mean(yesno), "n_yesno": len(yesno), "nll": _mean(r["nll"] for r in records),
            "recall_at_k": _mean(r.get("recall") for r in records),
            "latency_ms": _mean(r["latency_ms"] for r in records)}


# The harness ---------------------------------------------------------------------------------------
@dataclass
class _Run:
    cfg: EvalConfig
    engine: object
    embedder: object
    snapshot: dict
    sha0: str
    phi0: str
    ppl0: float
    general: str
    progress: Callable[[int, int, str], None] | None
    total: int
    done: int = 0

    def tick(self, n: int, info: str) -> None:
        self.done += n
        if self.progress:
            self.progress(self.done, self.total, info)


def run_eval(cfg: EvalConfig, *, engine=None, embedder=None,
             progress: Callable[[int, int, str], None] | None = None,
             command: Sequence[str] | None = None) -> dict:
    """Evaluate every system on every dataset; write results.json, report.md and plots into cfg.out.

    ``engine`` (an Engine) and ``embedder`` may be injected (tests use a tiny model); otherwise
    they are loaded from the workspace config (or the bundled defaults). Returns the results."""
    from regrad_cli.config import BUNDLED_EMBEDDER, Workspace
    from regrad_cli.engine import Engine
    from regrad_cli.models import Embedder, weights_sha256

    t_start = time.time()
    systems = parse_systems(",".join(cfg.systems)) if cfg.systems else list(SYSTEMS)
    cfg.systems = systems
    if not cfg.datasets:
        raise ConfigError("give at least one --dataset FORMAT:PATH[@split]")
    if cfg.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    if cfg.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if cfg.workspace and cfg.continual > 1:
        raise ConfigError("--continual feeds the corpus batch by batch into a fresh workspace: drop --workspace")
    user_ws = Workspace.open(cfg.workspace, create=False) if cfg.workspace else None
    data = []
    cfg.datasets = list(dict.fromkeys(cfg.datasets))
    for spec in cfg.datasets:
        items = load_dataset(spec)
        if cfg.limit is not None:
            items = items[: max(0, cfg.limit)]
        if not items:
            raise ConfigError(f"{spec}: no questions left after --limit {cfg.limit}")
        data.append((spec, items, split_groups(items, cfg.continual)))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    t_load = time.time()
    injected = engine is not None
    engine = engine or Engine.load(user_ws, checkpoint=cfg.checkpoint, device=cfg.device)
    if embedder is None:
        ecfg = user_ws.config.embedder if user_ws else None
        embedder = Embedder(ecfg.id if ecfg else BUNDLED_EMBEDDER, device=cfg.device or "cpu",
                            batch_size=ecfg.batch_size if ecfg else 32)
    general = (files("regrad_cli") / "data" / "general_text.txt").read_text(encoding="utf-8")
    with engine.learner.disabled():
        ppl0 = perplexity(engine.model, engine.tokenizer, general, max_tokens=cfg.ppl_max_tokens)
        # One-off costs (the tokenizer's newline table, first kernels) must not land in the
        # latency of whichever system happens to run first.
        from regrad_cli.generation import generate
        from regrad_cli.prompting import prompt_ids

        generate(engine.model, engine.tokenizer, [prompt_ids(engine.tokenizer, "warm-up")], 2)
    load_s = time.time() - t_load
    total = 0
    for _, _, groups in data:
        for t in range(len(groups)):
            total += sum(len(g) for g in groups[: t + 1]) * len(systems)
    run = _Run(cfg, engine, embedder, _params_snapshot(engine.model), weights_sha256(engine.model),
               engine.learner.checkpoint_id(), ppl0, general, progress, total)

    results = {
        "command": list(command if command is not None else sys.argv),
        "config": {**{k: v for k, v in asdict(cfg).items() if k != "cpt"}, "cpt": cfg.cpt.to_dict()},
        "versions": _versions(),
        "fingerprints": engine.fingerprints(embedder.fingerprint),
        "base_model": {"sha256": run.sha0, "ppl_general_text": ppl0,
                       "n_parameters": sum(v.numel() for v in run.snapshot.values())},
        "learner": {"checkpoint_id": engine.learner.checkpoint_id(), "combine": engine.learner.trained_combine,
                    "trained": bool(engine.learner.meta.get("trained"))},
        "systems": systems,
        "datasets": {},
        "wall_s": {"load": round(load_s, 2)},
    }
    for i, (spec, items, groups) in enumerate(data):
        ws = user_ws
        if ws is None:
            root = out / _slug(spec, i) / "workspace"
            if root.exists():
                shutil.rmtree(root)  # "fresh": a rerun must not inherit the last run's documents
            overrides = {"learner.checkpoint": cfg.checkpoint}
            if not injected:
                overrides["model.id"] = engine.model_id
                overrides["model.device"] = cfg.device
            ws = Workspace.open(root, create=True, overrides=overrides)
        results["datasets"][spec] = _run_dataset(run, spec, _slug(spec, i), groups, ws, fresh=user_ws is None)
        results["complete"] = i == len(data) - 1
        results["wall_s"]["total"] = round(time.time() - t_start, 2)
        # Written after every dataset, so a long multi-dataset run that dies keeps what it measured.
        (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    (out / "report.md").write_text(render_report(results))
    return results


def _versions() -> dict:
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
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _run_dataset(run: _Run, spec: str, slug: str, groups: list[list[QAItem]], ws, *, fresh: bool) -> dict:
    from regrad_cli.build import build_bank
    from regrad_cli.documents import DocumentStore
    from regrad_cli.ingest import ingest
    from regrad_cli.models import weights_sha256
    from regrad_cli.query import QueryEngine

    cfg, engine = run.cfg, run.engine
    ddir = Path(cfg.out) / slug
    ddir.mkdir(parents=True, exist_ok=True)
    t_ds = time.time()
    need_cpt = any(s in CPT_SYSTEMS for s in cfg.systems)
    cpt = ContinualPretrainer(engine.model, engine.tokenizer, cfg.cpt, engine.learner) if need_cpt else None
    seen: set[str] = set()
    stages = []
    pred_path = ddir / "predictions.jsonl"
    pred_fh = open(pred_path, "w", encoding="utf-8")
    final: dict[str, dict] = {}
    try:
        for t, group in enumerate(groups):
            t_stage = time.time()
            new_docs = [d for d in corpus_of(group) if d not in seen]
            seen.update(new_docs)
            ingest_info = None
            if fresh:
                path = ddir / f"corpus-batch{t + 1}.jsonl"
                _write_corpus(path, new_docs)
                ingest_info = ingest(ws, [path], embedder=run.embedder, tokenizer=engine.tokenizer)
                ingest_info = ingest_info.to_dict() if hasattr(ingest_info, "to_dict") else ingest_info
            bank = build_bank(ws, engine).to_dict()
            setup_s = time.time() - t_stage
            cpt_stats = None
            if cpt is not None:
                texts = new_docs if fresh else [r["text"] for r in DocumentStore(ws).all(columns=["text"])]
                cpt_stats = cpt.train(texts)
            qe = QueryEngine(ws, engine=engine, embedder=run.embedder)
            eval_items = [(b + 1, it) for b, g in enumerate(groups[: t + 1]) for it in g]
            retrieval = _retrieve(qe, eval_items, cfg)
            stage = {"stage": t + 1, "documents_added": len(new_docs), "documents_total": qe.store.count(),
                     "bank_rows": bank["rows"], "ingest": ingest_info, "bank": bank,
                     "setup_s": round(setup_s, 2), "cpt": cpt_stats, "items": len(eval_items), "systems": {}}
            order = [s for s in cfg.systems if _PLANS[s].model == "base"] + \
                    [s for s in cfg.systems if _PLANS[s].model == "cpt"]
            cpt_ppl = None
            for name in order:
                t_sys = time.time()
                recs = _run_system(run, name, eval_items, retrieval, qe, cpt, stage=t + 1)
                model = engine.model if _PLANS[name].model == "base" else cpt.model
                ppl_after = None  # base systems: filled in once all of them have run
                if _PLANS[name].model == "cpt":
                    if cpt_ppl is None:
                        cpt_ppl = perplexity(cpt.model, engine.tokenizer, run.general, max_tokens=cfg.ppl_max_tokens)
                    ppl_after = cpt_ppl
                sha = weights_sha256(model)
                drift = {"l2": l2_distance(model, run.snapshot), "sha256_before": run.sha0, "sha256_after": sha,
                         "identical": sha == run.sha0, "ppl_before": run.ppl0, "ppl_after": ppl_after,
                         # phi itself must come back exactly too (the side path is restored, not undone).
                         "phi_identical": engine.learner.checkpoint_id() == run.phi0}
                by_batch = {str(b + 1): aggregate([r for r in recs if r["batch"] == b + 1]) for b in range(t + 1)}
                stage["systems"][name] = {"all": aggregate(recs), "by_batch": by_batch, "drift": drift,
                                          "eval_s": round(time.time() - t_sys, 2)}
                for r in recs:
                    pred_fh.write(json.dumps(r, ensure_ascii=False) + "\n")
                if t == len(groups) - 1:
                    final[name] = {"records": recs}
            if any(_PLANS[s].model == "base" for s in cfg.systems):
                # After the base model's systems ran: its weights are unchanged, so must be its perplexity.
                with engine.learner.disabled():
                    base_ppl_after = perplexity(engine.model, engine.tokenizer, run.general,
                                                max_tokens=cfg.ppl_max_tokens)
                for name in order:
                    if _PLANS[name].model == "base":
                        stage["systems"][name]["drift"]["ppl_after"] = base_ppl_after
            stage["wall_s"] = round(time.time() - t_stage, 2)
            stages.append(stage)
    finally:
        pred_fh.close()

    last = stages[-1]
    systems = {}
    for name in cfg.systems:
        s = last["systems"][name]
        f1s = [r["f1"] for r in final[name]["records"]]
        std, lo, hi = bootstrap_ci(f1s, resamples=cfg.bootstrap, seed=cfg.seed)
        systems[name] = {**s["all"], "f1_std": std, "f1_ci95": [lo, hi], "drift": s["drift"]}
    n_items = sum(len(g) for g in groups)
    result = {
        "slug": slug, "n_items": n_items, "n_documents": len(seen), "batches": len(groups),
        "top_k": cfg.top_k, "workspace": str(ws.root), "predictions": str(pred_path),
        "systems": systems, "stages": stages,
        "forgetting_f1_batch1": {n: [st["systems"][n]["by_batch"]["1"]["f1"] for st in stages] for n in cfg.systems},
        "drift_l2": {n: [st["systems"][n]["drift"]["l2"] for st in stages] for n in cfg.systems},
        "cpt": {"config": cfg.cpt.to_dict(), "trainable_parameters": cpt.n_trainable if cpt else None,
                "rounds": [st["cpt"] for st in stages]} if cpt else None,
        "wall_s": {"total": round(time.time() - t_ds, 2),
                   "setup": round(sum(st["setup_s"] for st in stages), 2),
                   "cpt_train": round(sum((st["cpt"] or {}).get("train_s", 0.0) for st in stages), 2),
                   "per_system": {n: round(sum(st["systems"][n]["eval_s"] for st in stages), 2)
                                  for n in cfg.systems}},
    }
    try:
        result["plots"] = draw_plots(result, ddir)
    except Exception as exc:  # a plot must never lose an evaluation
        log.warning("could not draw plots for %s: %s", spec, exc)
        result["plots"] = []
    return result


def _retrieve(qe, eval_items, cfg: EvalConfig) -> list[dict]:
    """Top-k retrieval for every question, once per stage: ids, Retrieved objects, timing, recall."""
    questions = [it.question for _, it in eval_items]
    t0 = time.perf_counter()
    qvecs = qe.embedder.embed(questions)
    embed_ms = (time.perf_counter() - t0) * 1000.0 / max(1, len(questions))
    out = []
    for (_, it), q, v in zip(eval_items, questions, qvecs):
        t = time.perf_counter()
        hits = qe.retrieve(q, v, cfg.top_k, cfg.retriever)
        out.append({"hits": hits, "qvec": v, "ms": embed_ms + (time.perf_counter() - t) * 1000.0})
    texts = qe.store.texts({h.doc_id for r in out for h in r["hits"]})
    for r, (_, it) in zip(out, eval_items):
        r["recall"] = gold_retrieved([texts.get(h.doc_id, "") for h in r["hits"]], it.documents)
    return out


def _doc_hits(run: _Run, plan: _Plan, i: int, retrieval: list[dict], qe, rng: random.Random, pool: list[str]):
    """The Retrieved list whose gradients question i gets under this plan."""
    from regrad_cli.query import Retrieved

    if plan.adapter == "own":
        return retrieval[i]["hits"]
    if plan.adapter == "shifted":
        return retrieval[(i + 1) % len(retrieval)]["hits"]
    if plan.adapter == "random":
        ids = rng.sample(pool, min(run.cfg.top_k, len(pool)))
        # Weighted as a query would weight these documents for this question (combine="score").
        cos = qe._cosines(retrieval[i]["qvec"], ids, None)
        return [Retrieved(d, cos.get(d, 0.0), "random", cos.get(d, 0.0)) for d in ids]
    return []


def _run_system(run: _Run, name: str, eval_items, retrieval, qe, cpt, *, stage: int) -> list[dict]:
    from regrad_cli.generation import answer_nll, generate
    from regrad_cli.prompting import prompt_ids

    cfg, engine = run.cfg, run.engine
    learner, tok = engine.learner, engine.tokenizer
    plan = _PLANS[name]
    model = engine.model if plan.model == "base" else cpt.model
    combine = learner.trained_combine
    rng = random.Random(cfg.seed * 1_000_003 + stage)
    pool = sorted({d for d, _ in qe.bank.keys()}) if plan.adapter == "random" else []
    records = []
    for start in range(0, len(eval_items), cfg.batch_size):
        idx = list(range(start, min(start + cfg.batch_size, len(eval_items))))
        chunk = [eval_items[i][1] for i in idx]
        t0 = time.perf_counter()
        passages = [[] for _ in idx]
        if plan.passages:
            ids = [h.doc_id for i in idx for h in retrieval[i]["hits"]]
            texts = qe.store.texts(ids)
            passages = [[texts[h.doc_id] for h in retrieval[i]["hits"] if h.doc_id in texts] for i in idx]
        prompts = [prompt_ids(tok, it.question, p, it.kind) for it, p in zip(chunk, passages)]
        applied: list[list[str]] = [[] for _ in idx]
        if plan.model == "cpt":
            ctx = nullcontext()
        elif plan.adapter is None:
            ctx = learner.disabled()
        elif plan.adapter == "phi":
            ctx = learner.using(None)
        else:
            per_q = []
            for j, i in enumerate(idx):
                grad, used, _ = qe.combined_gradient(_doc_hits(run, plan, i, retrieval, qe, rng, pool), combine)
                applied[j] = used
                per_q.append(learner.adapted_weights(grad, cfg.gamma))
            if len(per_q) == 1:
                weights = per_q[0]  # exactly the 2-D adapter a single query uses
            else:
                weights = {n: torch.stack([w[n] for w in per_q]) for n in learner.names}
            ctx = learner.using(weights)
        with ctx:
            preds = generate(model, tok, prompts, cfg.max_new_tokens)
            gen_ms = (time.perf_counter() - t0) * 1000.0
            nll = answer_nll(model, tok, prompts, [it.answers[0] for it in chunk]).tolist()
        if plan.adapter == "own" or plan.passages:
            docs = [[h.doc_id for h in retrieval[i]["hits"]] for i in idx]
        else:
            docs = applied
        used_texts = qe.store.texts({d for ds in applied for d in ds}) if plan.adapter in ("shifted", "random") else {}
        for j, (i, it, pred) in enumerate(zip(idx, chunk, preds)):
            recall = None
            if plan.retrieval and plan.adapter != "shifted":
                recall = retrieval[i]["recall"]
            elif plan.adapter in ("shifted", "random"):
                recall = gold_retrieved([used_texts.get(d, "") for d in applied[j]], it.documents)
            records.append({
                "stage": stage, "batch": eval_items[i][0], "system": name, "id": it.id,
                "question": it.question, "answers": it.answers, "prediction": pred,
                "em": exact_match(pred, it.answers), "f1": f1_score(pred, it.answers),
                "acc": yes_no_accuracy(pred, it.answers) if it.kind == "yesno" else None,
                "nll": float(nll[j]), "recall": recall, "docs": docs[j],
                "latency_ms": gen_ms / len(idx) + (retrieval[i]["ms"] if plan.retrieval else 0.0),
            })
        run.tick(len(idx), f"{name} (batch {stage})")
    return records


# Report ------------------------------------------------------------------------------------------
def _fmt(x, nd: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def render_report(results: dict) -> str:
    lines = ["# regrad eval", ""]
    fp = results["fingerprints"]
    cfg = results["config"]
    lines += [f"- command: `{' '.join(results['command'])}`",
              f"- model: {fp['model'].get('id')} (weights {str(fp['model'].get('weights_sha256'))[:20]}…), "
              f"learner {fp['learner']['checkpoint_id'][:16]} (combine {results['learner']['combine']}"
              f"{', untrained init' if not results['learner']['trained'] else ''}), embedder {fp['embedder'].get('id')}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if k != "platform"),
              f"- top-k {cfg['top_k']}, gamma {cfg['gamma']}, retriever {cfg['retriever']}, greedy "
              f"{cfg['max_new_tokens']} new tokens, seed {cfg['seed']}, wall time {results['wall_s'].get('total')} s",
              "- CPT: " + ", ".join(f"{k} {v}" for k, v in cfg["cpt"].items()),
              f"- base model: sha256 {results['base_model']['sha256'][:16]}…, general-text perplexity "
              f"{results['base_model']['ppl_general_text']:.3f}", ""]
    for spec, ds in results["datasets"].items():
        k = ds["top_k"]
        lines += [f"## {spec}", "",
                  f"{ds['n_items']} questions, {ds['n_documents']} documents, {ds['batches']} batch(es); "
                  f"F1 interval: 95% bootstrap over questions; latency = mean per question (batched "
                  f"generation, retrieval included where used; CPT training excluded).", "",
                  f"| system | F1 [95% CI] | EM | acc (yes/no) | NLL | recall@{k} | latency ms | drift L2 | "
                  "sha256 identical | ppl before → after |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in ds["systems"].items():
            d = s["drift"]
            lo, hi = s["f1_ci95"]
            acc = "—" if s["acc_yesno"] is None else f"{s['acc_yesno']:.3f} (n={s['n_yesno']})"
            lines.append(
                f"| {name} | {s['f1']:.3f} [{lo:.3f}, {hi:.3f}] | {s['em']:.3f} | {acc} | {_fmt(s['nll'])} | "
                f"{_fmt(s['recall_at_k'])} | {_fmt(s['latency_ms'], 1)} | {d['l2']:.6g} | {_fmt(d['identical'])} | "
                f"{_fmt(d['ppl_before'])} → {_fmt(d['ppl_after'])} |")
        if ds["batches"] > 1:
            stages = range(1, ds["batches"] + 1)
            lines += ["", "Forgetting: F1 on batch 1 after each batch", "",
                      "| system | " + " | ".join(f"after {t}" for t in stages) + " |",
                      "|---|" + "---|" * ds["batches"]]
            for name, vals in ds["forgetting_f1_batch1"].items():
                lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in vals) + " |")
            lines += ["", "Drift: L2 distance of the base weights after each batch", "",
                      "| system | " + " | ".join(f"after {t}" for t in stages) + " |",
                      "|---|" + "---|" * ds["batches"]]
            for name, vals in ds["drift_l2"].items():
                lines.append(f"| {name} | " + " | ".join(f"{v:.6g}" for v in vals) + " |")
        if ds.get("cpt"):
            rounds = [r for r in ds["cpt"]["rounds"] if r]
            lines += ["", f"CPT: {ds['cpt']['trainable_parameters']:,} trainable parameters; "
                      + "; ".join(f"batch {i + 1}: {r['documents']} docs, {r['steps']} steps, loss "
                                  f"{_fmt(r['loss_first_epoch'])} → {_fmt(r['loss_last_epoch'])}, {r['train_s']} s"
                                  for i, r in enumerate(rounds))]
        w = ds["wall_s"]
        lines += ["", f"Wall time {w['total']} s (ingest + bank {w['setup']} s, CPT training {w['cpt_train']} s; "
                  + ", ".join(f"{n} {v} s" for n, v in w["per_system"].items()) + ")"]
        if ds.get("plots"):
            lines += [""] + [f"![{Path(p).stem}]({Path(p).relative_to(Path(cfg['out']))})" for p in ds["plots"]]
        lines.append("")
    return "\n".join(lines)


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
                ys = [float("nan") if v is None else v for v in ds[key][n]]
                ax.plot(x, ys, marker="o", label=n)
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
