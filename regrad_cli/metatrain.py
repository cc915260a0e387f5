"""Meta-training recipe: learn phi and alpha so that one gradient step on retrieved documents
makes the model answer (method.md §1.4).

    min_{phi, alpha}  E_q [ -log p_{theta0, phi'_q}(a | prompt(q [, D_q])) ]
    phi'_q = phi - alpha (.) sum_{d in D_q} grad_phi L_NTP(d)

D_q holds the question's supporting documents plus retrieved distractors, k in all, so training
sees the same sums of k gradients that queries apply. The inner gradients are taken with
create_graph (second order) unless --first-order. One meta-step handles a meta-batch of questions
in two passes: one forward/backward over all their documents (per-question gradient sums come out
of a single backward, see gradients.py), then one batched outer forward with one adapter per row.
Under torchrun each process takes a shard of every meta-batch and the gradients are summed
(distributed.py); the result is the single-process step.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from regrad_cli import distributed
from regrad_cli.datasets import QAItem, corpus_of, load_dataset
from regrad_cli.distributed import Dist
from regrad_cli.errors import RegradError
from regrad_cli.generation import answer_nll, generate
from regrad_cli.gradients import encode_documents, grouped_gradients
from regrad_cli.lora import Learner
from regrad_cli.metrics import exact_match, f1_score, yes_no_accuracy
from regrad_cli.prompting import prompt_ids

log = logging.getLogger("regrad")


@dataclass
class MetaTrainConfig:
    train: list[str] = field(default_factory=list)
    dev: list[str] = field(default_factory=list)
    out: str = "runs/meta"
    k: int = 3
    steps: int = 100
    epochs: float | None = None
    meta_batch: int = 16
    lr: float = 4e-4
    alpha_lr: float = 5e-2
    warmup: float = 0.1
    clip: float = 0.5
    first_order: bool = False
    with_context: bool = False
    locality: float = 0.0
    seed: int = 0
    max_doc_tokens: int = 256
    max_passage_tokens: int = 256
    dev_limit: int = 48
    eval_every: int = 25
    max_new_tokens: int = 16
    # Untrained init (when not resuming from a checkpoint).
    rank: int | None = None
    lora_alpha: float | None = None
    b_std: float = 1e-3
    alpha_init: float = 1.0
    init_checkpoint: str | None = None
    mix_weights: list[float] | None = None
    # How the k gradients are combined (the same choice must be used at query time).
    combine: str = "score"


# Data ------------------------------------------------------------------------------------------
@dataclass
class Pool:
    """One dataset with its own retrieval corpus, for picking distractor documents."""

    name: str
    items: list[QAItem]
    corpus: list[str]
    neighbours: dict[str, list[str]]  # item id -> retrieved documents, best first
    index: dict[str, int] = field(default_factory=dict)
    doc_emb: np.ndarray | None = None
    q_emb: dict[str, np.ndarray] = field(default_factory=dict)

    def scores(self, item: QAItem, docs: list[str]) -> list[float]:
        """Retrieval scores (cosine) of the documents for the question, as a query would see."""
        if self.doc_emb is None:
            return [0.0] * len(docs)
        q = self.q_emb[item.id]
        return [float(self.doc_emb[self.index[d]] @ q) for d in docs]


def build_pool(name: str, items: list[QAItem], embedder, depth: int = 8) -> Pool:
    corpus = corpus_of(items)
    index = {d: i for i, d in enumerate(corpus)}
    neighbours: dict[str, list[str]] = {}
    docs, q_emb = None, {}
    if embedder is not None and len(corpus) > 1:
        docs = embedder.embed(corpus)
        qs = embedder.embed([it.question for it in items])
        q_emb = {it.id: v for it, v in zip(items, qs)}
        scores = qs @ docs.T
        top = np.argsort(-scores, axis=1)[:, : depth + 4]
        for it, row in zip(items, top):
            gold = {index[d] for d in it.documents}
            neighbours[it.id] = [corpus[j] for j in row if j not in gold][:depth]
    return Pool(name, items, corpus, neighbours, index, docs, q_emb)


def documents_for(item: QAItem, pool: Pool, k: int, rng: random.Random) -> list[str]:
    """The question's supporting documents plus retrieved distractors, k in all, in a random
    order (retrieval order carries no meaning for a sum, but keeps eval honest)."""
    docs = list(item.documents[:k])
    extra = pool.neighbours.get(item.id) or []
    if len(extra) < k - len(docs):
        extra = extra + [d for d in rng.sample(pool.corpus, min(len(pool.corpus), k + 2))
                         if d not in docs and d not in extra]
    docs += extra[: max(0, k - len(docs))]
    rng.shuffle(docs)
    return docs


# One meta-step ---------------------------------------------------------------------------------
def _flatten(learner: Learner, batch, combine: str):
    texts, group, weights = [], [], []
    for qi, (_, docs, scores) in enumerate(batch):
        texts += docs
        group += [qi] * len(docs)
        # Retrieval scores come as floats; the temperature lives on the model's device.
        scores_t = torch.tensor(scores, dtype=torch.float32, device=learner.log_temp.device)
        weights.append(learner.combine_weights(scores_t, combine))
    return texts, group, torch.cat(weights)


def outer_loss(model, tokenizer, learner: Learner, batch: Sequence[tuple[QAItem, list[str], list[float]]],
               cfg: MetaTrainConfig, general_ids: torch.Tensor | None = None, *,
               share: float = 1.0, general_share: float = 1.0):
    """Answer-only cross-entropy after one inner step per question (differentiable in phi, alpha).

    The loss is the mean over questions of each answer's mean token NLL, plus ``cfg.locality``
    times the KL averaged over the rows of ``general_ids``. When a meta-batch is split over
    processes, ``share`` and ``general_share`` are this shard's fractions of the questions and
    of the general-text rows: the shards' losses, and so their gradients, then sum exactly to
    the whole batch's (a mean over n questions is the sum of each shard's mean x n_shard / n).
    """
    texts, group, weights = _flatten(learner, batch, cfg.combine)
    enc = encode_documents(tokenizer, texts, cfg.max_doc_tokens)
    phi = learner.phi_dict()
    grads, doc_losses = grouped_gradients(model, learner, enc, group, len(batch), base=phi,
                                          create_graph=not cfg.first_order, weights=weights)
    adapted = {}
    for n in learner.names:
        g = grads[n] if not cfg.first_order else grads[n].detach()
        adapted[n] = phi[n].unsqueeze(0) - learner.alpha(n) * g
    prompts = [prompt_ids(tokenizer, it.question, docs if cfg.with_context else (), it.kind,
                          cfg.max_passage_tokens) for it, docs, _ in batch]
    answers = [it.answers[0] for it, _, _ in batch]
    with learner.using(adapted):
        nll = answer_nll(model, tokenizer, prompts, answers)
    loss = nll.mean() * share
    kl = torch.zeros(())
    if cfg.locality > 0 and general_ids is not None and len(general_ids):
        ids = general_ids.to(nll.device)
        mask = torch.ones_like(ids)
        with torch.no_grad(), learner.disabled():
            base_logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        with learner.using(adapted):
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        kl = (base_logp.exp() * (base_logp - logp)).sum(-1).mean()
        loss = loss + cfg.locality * general_share * kl
    return loss, {"nll": nll.detach().mean().item(), "doc_nll": doc_losses.mean().item(),
                  "kl": float(kl.detach())}


# Evaluation during training --------------------------------------------------------------------
DEV_MODES = ("param", "closed-book+phi")


@torch.no_grad()
def evaluate_dev(model, tokenizer, learner: Learner, dev: list[tuple[QAItem, list[str]]],
                 cfg: MetaTrainConfig, batch_size: int = 8, modes=DEV_MODES) -> dict:
    """Dev F1/EM/NLL with the training construction of documents (gold + distractors)."""
    results = {}
    for mode in modes:
        f1s, ems, nlls = [], [], []
        for start in range(0, len(dev), batch_size):
            chunk = dev[start:start + batch_size]
            with_ctx = cfg.with_context and mode == "param"
            prompts = [prompt_ids(tokenizer, it.question, docs if with_ctx else (), it.kind,
                                  cfg.max_passage_tokens) for it, docs, _ in chunk]
            if mode == "param":
                texts, group, w = _flatten(learner, chunk, cfg.combine)
                enc = encode_documents(tokenizer, texts, cfg.max_doc_tokens)
                grads, _ = grouped_gradients(model, learner, enc, group, len(chunk), weights=w.detach())
                phi = learner.phi_dict()
                weights = {n: phi[n].detach().unsqueeze(0) - learner.alpha(n).detach() * grads[n]
                           for n in learner.names}
            else:
                weights = None
            with learner.using(weights):
                preds = generate(model, tokenizer, prompts, cfg.max_new_tokens)
                nll = answer_nll(model, tokenizer, prompts, [it.answers[0] for it, _, _ in chunk])
            for (it, _, _), p, n in zip(chunk, preds, nll.tolist()):
                if it.kind == "yesno":
                    f1s.append(yes_no_accuracy(p, it.answers))
                    ems.append(f1s[-1])
                else:
                    f1s.append(f1_score(p, it.answers))
                    ems.append(exact_match(p, it.answers))
                nlls.append(n)
        results[mode] = {"f1": float(np.mean(f1s)), "em": float(np.mean(ems)),
                         "nll": float(np.mean(nlls)), "n": len(f1s)}
    return results


# The recipe -------------------------------------------------------------------------------------
def _lr_lambda(total: int, warmup: float) -> Callable[[int], float]:
    w = max(1, int(round(total * warmup)))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return max(0.0, (total - step) / max(1, total - w))

    return f


def _evaluate_dev_sharded(model, tokenizer, learner: Learner, dev: list, cfg: MetaTrainConfig,
                          dist: Dist, batch_size: int = 8) -> dict:
    """``evaluate_dev`` with the dev batches split over the processes and the means combined.

    Each rank takes whole batches of the single-process run, so every question is scored with
    the same padding (and the same numbers) as without torchrun."""
    if not dist.enabled:
        return evaluate_dev(model, tokenizer, learner, dev, cfg, batch_size)
    lo, hi = dist.bounds(-(-len(dev) // batch_size))
    mine = dev[lo * batch_size: hi * batch_size]
    res = evaluate_dev(model, tokenizer, learner, mine, cfg, batch_size) if mine else {}
    keys = ("f1", "em", "nll")
    sums = torch.tensor([[res[m][k] * res[m]["n"] for k in keys] + [res[m]["n"]] if mine else [0.0] * 4
                         for m in DEV_MODES], dtype=torch.float64, device=next(learner.parameters()).device)
    dist.sum_(sums)
    out = {}
    for m, row in zip(DEV_MODES, sums.tolist()):
        out[m] = {**{k: row[i] / row[3] for i, k in enumerate(keys)}, "n": int(row[3])}
    # Every rank must take the same best/last decision: use rank 0's numbers everywhere.
    return dist.broadcast_object(out)


def _batch_stats(dist: Dist, loss: torch.Tensor, info: dict, shard: list, share: float,
                 general_share: float) -> tuple[float, dict]:
    """The logged loss and its parts for the whole meta-batch (a rank saw only its shard)."""
    if not dist.enabled:
        return float(loss.detach()), info
    n_docs = sum(len(docs) for _, docs, _ in shard)
    t = torch.tensor([float(loss.detach()), info["nll"] * share, info["doc_nll"] * n_docs, n_docs,
                      info["kl"] * general_share], dtype=torch.float64, device=loss.device)
    dist.sum_(t)
    loss_v, nll, doc_sum, docs, kl = t.tolist()
    return loss_v, {"nll": nll, "doc_nll": doc_sum / docs, "kl": kl}


def meta_train(
    cfg: MetaTrainConfig,
    model,
    tokenizer,
    embedder,
    *,
    learner: Learner | None = None,
    resume: bool = False,
    progress: Callable[[int, int, dict], None] | None = None,
    general_text: str | None = None,
    dist: Dist | None = None,
) -> dict:
    """Run meta-training; returns a summary. Writes into cfg.out:
    ``best/`` and ``last/`` learner checkpoints, ``state.pt`` (resume), ``log.json``, ``curves.png``.

    Under torchrun (``dist``, default: the job this process joined, see distributed.py) every
    process runs this function on its shard of each meta-batch; only rank 0 writes files and
    calls ``progress``. ``cfg.meta_batch`` stays the global batch, so the run equals the
    single-process one up to float rounding."""
    dist = dist or distributed.current()
    if cfg.meta_batch < dist.world:
        raise RegradError(f"--meta-batch {cfg.meta_batch} is smaller than the {dist.world} processes: "
                          "each process needs at least one question per meta-step")
    out = Path(cfg.out)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if learner is None:
        if cfg.init_checkpoint:
            learner = Learner.load(cfg.init_checkpoint)
        else:
            learner = Learner.for_model(model, rank=cfg.rank, lora_alpha=cfg.lora_alpha).init_(
                seed=cfg.seed, b_std=cfg.b_std, alpha_init=cfg.alpha_init)
        learner.attach(model)

    # Rank 0 reads and embeds the data once; every rank gets the same pools, so the same
    # neighbours and scores, and draws the same meta-batches from them.
    pools, dev_pools = dist.broadcast_object(
        ([build_pool(spec, load_dataset(spec), embedder) for spec in cfg.train],
         [build_pool(spec, load_dataset(spec), embedder) for spec in cfg.dev]) if dist.main else None)
    weights = cfg.mix_weights or [len(p.items) for p in pools]
    if len(weights) != len(pools):
        raise RegradError("--mix needs one weight per --train dataset")
    dev_rng = random.Random(cfg.seed + 1)
    dev = []
    per_dev = max(1, cfg.dev_limit // max(1, len(dev_pools)))
    for p in dev_pools:
        chosen = dev_rng.sample(p.items, min(per_dev, len(p.items)))
        for it in chosen:
            docs = documents_for(it, p, cfg.k, dev_rng)
            dev.append((it, docs, p.scores(it, docs)))
    total_items = sum(len(p.items) for p in pools)
    steps = cfg.steps
    if cfg.epochs:
        steps = max(1, int(math.ceil(cfg.epochs * total_items / cfg.meta_batch)))

    general_ids, general_share = None, 1.0
    if cfg.locality > 0 and general_text:
        ids = tokenizer(general_text).input_ids
        chunks = [ids[i:i + 64] for i in range(0, len(ids) - 64, 64)]
        general_ids = torch.tensor(chunks[: max(1, cfg.meta_batch)])
        # The rows are split over the processes like the questions.
        g_lo, g_hi = dist.bounds(len(general_ids))
        general_share = (g_hi - g_lo) / max(1, len(general_ids))
        general_ids = general_ids[g_lo:g_hi]

    params_phi = [learner.phi[k] for k in learner.phi.keys()]
    params_alpha = [learner.log_alpha[k] for k in learner.log_alpha.keys()]
    if cfg.combine == "score":
        params_alpha.append(learner.log_temp)
    learner.meta["combine"] = cfg.combine
    for p in params_phi + params_alpha:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": params_phi, "lr": cfg.lr},
                             {"params": params_alpha, "lr": cfg.alpha_lr, "weight_decay": 0.0}],
                            lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, cfg.warmup))
    history: dict = {"config": asdict(cfg), "train": [], "dev": []}
    start_step, best_f1 = 0, -1.0
    state_path = out / "state.pt"
    # Rank 0 reads the state and sends it to the others: OUT need not be shared between nodes.
    state = dist.broadcast_object(
        torch.load(state_path, weights_only=False, map_location="cpu")
        if resume and dist.main and state_path.exists() else None)
    if state is not None:
        learner.load_state_dict(state["learner"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_step, best_f1, history = state["step"], state["best_f1"], state["history"]
        if dist.main:
            log.info("resumed from step %d", start_step)
    # Identical by construction (same seed, same checkpoint); the broadcast makes it certain.
    dist.broadcast_(learner.parameters())

    def save_state(step: int) -> None:
        tmp = out / "state.pt.tmp"
        torch.save({"learner": learner.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": step, "best_f1": best_f1, "history": history}, tmp)
        tmp.replace(state_path)

    def run_dev(step: int) -> None:
        nonlocal best_f1
        dist.check_in_sync(learner.parameters())
        res = _evaluate_dev_sharded(model, tokenizer, learner, dev, cfg, dist)
        history["dev"].append({"step": step, **res})
        f1 = res["param"]["f1"]
        if f1 > best_f1:
            best_f1 = f1
            if dist.main:
                learner.save(out / "best", {"trained": {"step": step, "dev": res, "config": asdict(cfg)}})
        if dist.main:
            log.info("dev step %d: %s", step, json.dumps(res))

    t0 = time.time()
    if start_step == 0 and dev:
        run_dev(0)
    for step in range(start_step, steps):
        # Data order depends only on (seed, step): a resumed run sees the same batches. Every
        # process draws the whole meta-batch (the same random stream as one process) and keeps
        # its shard.
        rng = random.Random(cfg.seed * 1_000_003 + step)
        batch = []
        for _ in range(cfg.meta_batch):
            pool = rng.choices(pools, weights=weights)[0]
            item = rng.choice(pool.items)
            docs = documents_for(item, pool, cfg.k, rng)
            batch.append((item, docs, pool.scores(item, docs)))
        lo, hi = dist.bounds(len(batch))
        share = (hi - lo) / len(batch)
        opt.zero_grad(set_to_none=True)
        loss, info = outer_loss(model, tokenizer, learner, batch[lo:hi], cfg, general_ids,
                                share=share, general_share=general_share)
        loss.backward()
        # Sum before clipping: every rank then clips the same whole-batch gradient.
        dist.sum_grads(params_phi + params_alpha)
        gnorm = torch.nn.utils.clip_grad_norm_(params_phi + params_alpha, cfg.clip)
        opt.step()
        sched.step()
        loss_value, info = _batch_stats(dist, loss, info, batch[lo:hi], share, general_share)
        alphas = torch.stack([learner.alpha(n).detach().mean() for n in learner.names])
        rec = {"step": step + 1, "loss": loss_value, **info, "grad_norm": float(gnorm),
               "alpha_mean": float(alphas.mean()), "alpha_max": float(alphas.max()),
               "temp": float(learner.log_temp.detach().exp()),
               "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1)}
        history["train"].append(rec)
        if progress and dist.main:
            progress(step + 1, steps, rec)
        if dev and ((step + 1) % cfg.eval_every == 0 or step + 1 == steps):
            run_dev(step + 1)
        if dist.main and ((step + 1) % cfg.eval_every == 0 or step + 1 == steps):
            save_state(step + 1)
            (out / "log.json").write_text(json.dumps(history, indent=1))
    for p in params_phi + params_alpha:
        p.requires_grad_(False)
    dist.check_in_sync(learner.parameters())
    if dist.main:
        learner.save(out / "last", {"trained": {"step": steps, "config": asdict(cfg)}})
        if not (out / "best").exists():
            learner.save(out / "best", {"trained": {"step": steps, "config": asdict(cfg)}})
        (out / "log.json").write_text(json.dumps(history, indent=1))
        try:
            plot_curves(history, out / "curves.png")
        except Exception as exc:  # a plot must never lose a training run
            log.warning("could not draw curves: %s", exc)
    # The others wait for rank 0's files: when any process returns, the run is on disk.
    dist.barrier()
    return {"steps": steps, "best_dev_f1": best_f1, "out": str(out), "world_size": dist.world,
            "wall_s": round(time.time() - t0, 1), "last": history["train"][-1] if history["train"] else None}


def plot_curves(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    tr = history["train"]
    if tr:
        axes[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], label="outer loss")
        axes[0].set_xlabel("step")
        axes[0].legend()
    for mode in ("param", "closed-book+phi"):
        pts = [(d["step"], d[mode]["f1"]) for d in history["dev"] if mode in d]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=f"dev F1 {mode}")
    axes[1].set_xlabel("step")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
