"""Meta-training recipe: learn phi and alpha so that one gradient step on retrieved documents
makes the model answer (method.md §1.4).

    min_{phi, alpha}  E_q [ -log p_{theta0, phi'_q}(a | prompt(q [, D_q])) ]
    phi'_q = phi - alpha (.) sum_{d in D_q} grad_phi L_NTP(d)

Training runs under the query's conditions: documents are chunked as ``ingest`` chunks them, D_q
is the top-k of the query's dense retriever over the training pool (so the gold chunk is sometimes
missing or not first), every document gradient passes through the bank codec (fake quantisation
with a straight-through estimator), and the k gradients are normalised, weighted and stepped by the
same ``adapt`` functions a query calls. A fraction of questions (``context_mix``) also see the
passages in the prompt, so one learner serves both ``param`` and ``param+context``. The dev check
answers through the real answering pipeline (``pipeline.answer_many``) over an in-memory corpus of
the dev pool with gradients computed by the current learner. The inner gradients are taken with
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
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from regrad_cli.learner import adapt

from regrad_cli.learning import distributed
from regrad_cli.learning.datasets import load_dataset
from regrad_cli.learning.qa import QAItem, corpus_of
from regrad_cli.learning.distributed import Dist
from regrad_cli.errors import RegradError
from regrad_cli.files import atomic_write_text
from regrad_cli.lm.generation import answer_nll
from regrad_cli.learner.gradients import compute_context, encode_documents, grouped_gradients, resolve_compute_dtype
from regrad_cli.learner.lora import Learner
from regrad_cli.learning.scores import exact_match, f1_score, yes_no_accuracy
from regrad_cli.learning.train_state import STATE_FILE, apply_state, read_state, write_state
from regrad_cli.lm.prompting import prompt_ids
from regrad_cli.lm.tokens import per_sample_nll

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
    # Warm-up: the first N steps are first order (cheaper), second order after.
    first_order_steps: int = 0
    with_context: bool = False
    locality: float = 0.0
    # Text of the locality KL (None: the bundled general text, which `regrad eval` also measures
    # drift on: give a different file to keep that measurement out of training).
    locality_text: str | None = None
    seed: int = 0
    max_doc_tokens: int = 256
    max_passage_tokens: int = 256
    dev_limit: int = 48
    eval_every: int = 25
    # state.pt and log.json are also written when this many seconds passed since the last save
    # (a long run loses at most this much work when it is stopped); 0: only at dev checks.
    save_every_s: float = 300.0
    max_new_tokens: int = 16
    # Untrained init (when not resuming from a checkpoint).
    rank: int | None = None
    lora_alpha: float | None = None
    b_std: float = 1e-3
    alpha_init: float = 1.0  # = LoraConfig.alpha_init: the 'init' learner is where training starts
    init_checkpoint: str | None = None
    mix_weights: list[float] | None = None
    # How the k gradients are combined (the same choice must be used at query time).
    combine: str = "score"
    # Gradient normalisation before combining (adapt.normalise): "none", "doc" or "tensor".
    norm: str = "doc"
    # Fraction of training questions that also get the k passages in the prompt.
    context_mix: float = 0.5
    # "retrieved": D_q = the dense retriever's top-k over the pool (as a query); "gold": the
    # question's supporting documents plus retrieved distractors (the old construction).
    retrieval: str = "retrieved"
    # Inner-step gradients pass through this bank codec (straight-through); None: exact fp32.
    codec: str | None = "int4"
    group_size: int = 64
    # Chunking of pool documents, as `regrad ingest` does (max tokens = max_doc_tokens).
    chunk_overlap: int = 32
    # Documents of the first training pool over which the tensors' step-energy shares are measured
    # at the end (energy.py): a bank then stores only the tensors above the threshold. 0: skip.
    energy_docs: int = 64
    # Learning rate of the learner's document key map (learner.transform, first order: the
    # factors are detached, so the map's meta-gradient needs no double backward). 0: the map, if
    # any, stays as it is. Needs a learner with a map (``--init`` of ``regrad learner fit-keymap``).
    transform_lr: float = 0.0
    # Keep phi (the adapter the model answers with) fixed; only alpha, T and the map learn. With
    # phi fixed, the documents' factors do not change during training.
    freeze_phi: bool = False
    # With a trained map and phi frozen, documents' factors never change: keep them (bfloat16)
    # up to this many GiB and reuse them (transform.FactorCache). 0: recompute every draw.
    factor_cache_gb: float = 0.0
    # How the factor cache stores factors: bfloat16, float8 (row-scaled, half the memory) or float32.
    factor_cache_dtype: str = "bfloat16"
    # Keep each training text's hidden states below the first adapted layer (float32, exact) up to
    # this many GiB and start every pass there (lm/prefix.py: llama-style families). 0: off.
    prefix_cache_gb: float = 0.0
    # Precision of the model passes of a meta-step and of the dev checks: "float32", "bfloat16"
    # (autocast; phi, alpha, the map, AdamW and the loss stay float32) or "auto" (bfloat16 where
    # the device has native bf16 products, gradients.fast_bf16; else float32).
    precision: str = "float32"
    # Dev checkpoint selection: mean F1 of these pipeline modes.
    select_modes: list[str] = field(default_factory=lambda: ["param", "param+context"])
    # The document loss the inner step's gradients are taken of (learner/doc_loss.py), recorded
    # in the trained learner; None: the learner's own (plain for a new one).
    doc_loss: str | None = None
    # Learned per-token weights in the document key map (transform.KeyMap.enable_token_weights),
    # trained with --transform-lr; they start at w = 1 (the map as it was).
    token_weights: bool = False


# Data ------------------------------------------------------------------------------------------
@dataclass
class Pool:
    """One dataset with its own retrieval corpus (chunks), for retrieval as a query would do it."""

    name: str
    items: list[QAItem]
    corpus: list[str]
    neighbours: dict[str, list[str]]  # item id -> retrieved non-gold chunks, best first
    index: dict[str, int] = field(default_factory=dict)
    doc_emb: np.ndarray | None = None
    q_emb: dict[str, np.ndarray] = field(default_factory=dict)
    ranked: dict[str, list[str]] = field(default_factory=dict)  # item id -> top chunks, gold included
    gold: dict[str, list[str]] = field(default_factory=dict)  # item id -> its gold chunks

    def scores(self, item: QAItem, docs: list[str]) -> list[float]:
        """Retrieval scores (cosine) of the documents for the question, as a query would see."""
        if self.doc_emb is None:
            return [0.0] * len(docs)
        q = self.q_emb[item.id]
        return [float(self.doc_emb[self.index[d]] @ q) for d in docs]

    def recall(self, k: int) -> float:
        """Fraction of questions whose top-k holds one of their gold chunks."""
        if not self.ranked:
            return 1.0
        hits = [bool(set(self.ranked[it.id][:k]) & set(self.gold.get(it.id, it.documents))) for it in self.items]
        return float(np.mean(hits)) if hits else 0.0


def build_pool(name: str, items: list[QAItem], embedder, depth: int = 8, *, tokenizer=None,
               max_tokens: int = 256, overlap: int = 32) -> Pool:
    """The pool's corpus (each distinct document chunked like ``ingest`` when a tokenizer is
    given), embeddings, and every question's ranking by cosine, as the dense retriever ranks."""
    chunks_of: dict[str, list[str]] = {}
    if tokenizer is not None:
        from regrad_cli.offline.ingest import chunk_text

        for d in corpus_of(items):
            chunks_of[d] = [c.text for c in chunk_text(d, tokenizer, max_tokens, min(overlap, max_tokens - 1))] or [d]
    corpus = list(dict.fromkeys(c for d in corpus_of(items) for c in chunks_of.get(d, [d])))
    index = {d: i for i, d in enumerate(corpus)}
    gold = {it.id: [c for d in it.documents for c in chunks_of.get(d, [d])] for it in items}
    neighbours: dict[str, list[str]] = {}
    ranked: dict[str, list[str]] = {}
    docs, q_emb = None, {}
    if embedder is not None and len(corpus) > 1:
        docs = np.asarray(embedder.embed(corpus), dtype=np.float32)
        qs = np.asarray(embedder.embed([it.question for it in items]), dtype=np.float32)
        q_emb = {it.id: v for it, v in zip(items, qs)}
        for start in range(0, len(items), 1024):
            scores = qs[start:start + 1024] @ docs.T
            top = np.argsort(-scores, axis=1)[:, : depth + 4]
            for it, row in zip(items[start:start + 1024], top):
                g = {index[c] for c in gold[it.id]}
                ranked[it.id] = [corpus[j] for j in row[:depth]]
                neighbours[it.id] = [corpus[j] for j in row if j not in g][:depth]
    return Pool(name, items, corpus, neighbours, index, docs, q_emb, ranked, gold)


def documents_for(item: QAItem, pool: Pool, k: int, rng: random.Random, retrieval: str = "gold") -> list[str]:
    """The k documents whose gradients question ``item`` gets in training.

    ``retrieved``: the dense retriever's top-k over the pool, in rank order, exactly what a query
    would apply (the gold chunk may be missing or not first). ``gold``: the supporting documents
    plus retrieved distractors, k in all, in a random order."""
    if retrieval == "retrieved" and pool.ranked.get(item.id):
        return list(pool.ranked[item.id][:k])
    docs = list(pool.gold.get(item.id, item.documents)[:k])
    extra = pool.neighbours.get(item.id) or []
    if len(extra) < k - len(docs):
        extra = extra + [d for d in rng.sample(pool.corpus, min(len(pool.corpus), k + 2))
                         if d not in docs and d not in extra]
    docs += extra[: max(0, k - len(docs))]
    rng.shuffle(docs)
    return docs


@dataclass
class BatchEntry:
    """One question of a meta-batch: the documents whose gradients its inner step combines, their
    retrieval scores (the combination weights' input), and whether its prompt also shows them."""

    item: QAItem
    documents: list[str]
    scores: list[float]
    with_context: bool = False


def draw_batch(cfg: MetaTrainConfig, pools: list[Pool], weights: list[float], step: int) -> list[BatchEntry]:
    """The meta-batch of ``step``: it depends only on (seed, step), so a resumed run sees the same
    batches, and every process draws the whole batch (the same random stream) and keeps its shard."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    batch = []
    for _ in range(cfg.meta_batch):
        pool = rng.choices(pools, weights=weights)[0]
        item = rng.choice(pool.items)
        docs = documents_for(item, pool, cfg.k, rng, cfg.retrieval)
        batch.append(BatchEntry(item, docs, pool.scores(item, docs), rng.random() < cfg.context_mix))
    return batch


# One meta-step ---------------------------------------------------------------------------------
def fake_quantise(grads: dict[str, torch.Tensor], codec: str | None, group_size: int) -> dict[str, torch.Tensor]:
    """Per-document gradients [N, ...] as the bank would return them, with a straight-through
    estimator: the forward value is decode(encode(g)), the backward is the identity."""
    if not codec or codec == "fp32":
        return grads
    out = {}
    for n, g in grads.items():
        with torch.no_grad():
            q = _codec_roundtrip(g.detach(), codec, group_size)
        out[n] = g + (q - g).detach()
    return out


def _codec_roundtrip(g: torch.Tensor, codec: str, group_size: int) -> torch.Tensor:
    if codec == "int4":
        # Vectorised bank_format int4: per group of group_size values, absmax scale, round to
        # -7..7 (tests/test_metatrain.py checks it against bank_format's encoder/decoder).
        n = g.shape[0]
        flat = g.reshape(n, -1).float()
        pad = (-flat.shape[1]) % group_size
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        grp = flat.view(n, -1, group_size)
        scale = grp.abs().amax(-1, keepdim=True)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(grp / safe * 7).clamp_(-7, 7)
        deq = (q.double() * scale.double() / 7).float().view(n, -1)
        return deq[:, : g[0].numel()].reshape(g.shape).to(g.dtype)
    from bank_format.codecs import decode_values, encode_values

    arr = g.cpu().float().numpy()
    rows = []
    for i in range(arr.shape[0]):
        buf = b"".join(encode_values(arr[i], codec, group_size))
        rows.append(decode_values(buf, 0, arr[i].shape, codec, group_size))
    return torch.from_numpy(np.stack(rows)).to(g.device, g.dtype)


def outer_loss(model, tokenizer, learner: Learner, batch: Sequence[BatchEntry],
               cfg: MetaTrainConfig, general_ids: torch.Tensor | None = None, *,
               share: float = 1.0, general_share: float = 1.0, factor_cache=None, prefix_cache=None):
    """Answer-only cross-entropy after one inner step per question (differentiable in phi, alpha, T).

    ``batch`` holds one ``BatchEntry`` per question. Every
    document's gradient is taken at phi (second order unless cfg.first_order), passed through the
    bank codec, and combined and stepped by ``adapt`` exactly as a query does. The loss is the mean
    over questions of each answer's mean token NLL, plus ``cfg.locality`` times the KL averaged
    over the rows of ``general_ids``. When a meta-batch is split over processes, ``share`` and
    ``general_share`` are this shard's fractions of the questions and of the general-text rows: the
    shards' losses, and so their gradients, then sum exactly to the whole batch's.
    ``prefix_cache`` (``lm.prefix.PrefixCache``) starts the document and answer passes at the
    first adapted layer: the same losses and gradients (tests/test_prefix_cache.py).
    """
    texts = [d for entry in batch for d in entry.documents]
    enc = encode_documents(tokenizer, texts, cfg.max_doc_tokens)
    phi = learner.phi_dict()
    if factor_cache is not None:
        grads, doc_losses = factor_cache.gradients(model, learner, texts, enc,
                                                   lambda i, m: per_sample_nll(model, i, m, prefix=prefix_cache), phi,
                                                   prefix=prefix_cache)
    else:
        grads, doc_losses = grouped_gradients(model, learner, enc, base=phi, create_graph=not cfg.first_order,
                                              prefix=prefix_cache)
    if cfg.first_order and learner.transform is None:
        # (A key map's gradients are differentiable in the map only: they stay attached.)
        grads = {n: g.detach() for n, g in grads.items()}
    grads = fake_quantise(grads, cfg.codec, cfg.group_size)
    combined: dict[str, list[torch.Tensor]] = {n: [] for n in learner.names}
    start = 0
    for entry in batch:
        k = len(entry.documents)
        scores = torch.tensor(entry.scores, dtype=torch.float32, device=learner.log_temp.device)
        w = adapt.combination_weights(scores, cfg.combine, learner.log_temp)
        c = adapt.combine({n: g[start:start + k] for n, g in grads.items()}, w, norm=cfg.norm)
        for n in learner.names:
            combined[n].append(c[n])
        start += k
    stacked = {n: torch.stack(v) for n, v in combined.items()}
    adapted = adapt.step(phi, learner.alpha_dict(), stacked, 1.0, batched=True, differentiable=True)
    prompts = [prompt_ids(tokenizer, e.item.question, e.documents if cfg.with_context or e.with_context else (),
                          e.item.kind, cfg.max_passage_tokens) for e in batch]
    answers = [e.item.answers[0] for e in batch]
    # Each question's own adapted weights (batched step): a length group applies its rows' slice.
    nll = answer_nll(model, tokenizer, prompts, answers,
                     per_group=lambda rows: learner.using({n: t[rows] for n, t in adapted.items()}),
                     prefix=prefix_cache)
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
DEV_MODES = ("param", "param+context", "closed-book+phi", "rag+phi")


@dataclass
class DevSet:
    """Dev questions and their pool: answered through the real pipeline over an in-memory corpus."""

    items: list[QAItem]
    pool: Pool
    docs: dict[str, list[str]]  # item id -> explicit documents when the pool has no embeddings

    def __len__(self) -> int:
        return len(self.items)


def _dev_corpus(model, tokenizer, learner: Learner, pool: Pool, cfg: MetaTrainConfig, batch_size: int = 8):
    """An in-memory Corpus of the dev pool whose gradient rows are computed on demand (only the
    retrieved chunks) under the current learner and passed through the bank codec like a bank row."""
    from regrad_cli.online.pipeline import MemoryCorpus

    ids = [f"dev-{i}" for i in range(len(pool.corpus))]
    text_of = dict(zip(ids, pool.corpus))

    def compute(wanted: list[str]) -> dict:
        rows = {}
        for start in range(0, len(wanted), batch_size):
            part = wanted[start:start + batch_size]
            enc = encode_documents(tokenizer, [text_of[d] for d in part], cfg.max_doc_tokens)
            g, _ = grouped_gradients(model, learner, enc)
            g = fake_quantise({n: v.detach() for n, v in g.items()}, cfg.codec, cfg.group_size)
            for j, d in enumerate(part):
                # float(): a key map's gradients come out of bf16 autocast in bf16 (numpy has none).
                rows[d] = {n: v[j].float().cpu().numpy() for n, v in g.items()}
        return rows

    return MemoryCorpus(ids, list(pool.corpus), pool.doc_emb, {}, compute), {t: i for i, t in text_of.items()}


@torch.no_grad()
def evaluate_dev(model, tokenizer, learner: Learner, dev: DevSet, cfg: MetaTrainConfig, batch_size: int = 8,
                 modes=DEV_MODES, embedder=None) -> dict:
    """Dev F1/EM/NLL per mode, every answer produced by ``pipeline.answer_many`` as a query would."""
    from types import SimpleNamespace

    from regrad_cli.online.pipeline import Request, answer_many

    if not len(dev):
        return {}
    corpus, id_of = _dev_corpus(model, tokenizer, learner, dev.pool, cfg)
    engine = SimpleNamespace(model=model, tokenizer=tokenizer, learner=learner)
    emb = embedder if (embedder is not None and dev.pool.doc_emb is not None) else _ZeroEmbedder()
    results = {}
    for mode in modes:
        f1s, ems, nlls = [], [], []
        for start in range(0, len(dev.items), batch_size):
            chunk = dev.items[start:start + batch_size]
            reqs = []
            for it in chunk:
                explicit = None if dev.pool.doc_emb is not None else [id_of[d] for d in dev.docs[it.id]]
                reqs.append(Request(it.question, mode=mode, top_k=cfg.k, combine=cfg.combine,
                                    max_new_tokens=cfg.max_new_tokens, kind=it.kind, docs=explicit,
                                    gold=it.answers[0], max_passage_tokens=cfg.max_passage_tokens))
            out = answer_many(engine, emb, corpus, reqs)
            for it, res in zip(chunk, out):
                p = res["answer"]
                if it.kind == "yesno":
                    f1s.append(yes_no_accuracy(p, it.answers))
                    ems.append(f1s[-1])
                else:
                    f1s.append(f1_score(p, it.answers))
                    ems.append(exact_match(p, it.answers))
                nlls.append(res.get("nll", float("nan")))
        results[mode] = {"f1": float(np.mean(f1s)), "em": float(np.mean(ems)),
                         "nll": float(np.nanmean(nlls)) if nlls else float("nan"), "n": len(f1s)}
    return results


class _ZeroEmbedder:
    """Question vectors for a pool without embeddings (documents are then given explicitly)."""

    def embed(self, texts):
        return np.zeros((len(texts), 1), dtype=np.float32)


def select_score(res: dict, cfg: MetaTrainConfig) -> float:
    vals = [res[m]["f1"] for m in cfg.select_modes if m in res]
    return float(np.mean(vals)) if vals else -1.0


# The recipe -------------------------------------------------------------------------------------
def _lr_lambda(total: int, warmup: float) -> Callable[[int], float]:
    w = max(1, int(round(total * warmup)))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return max(0.0, (total - step) / max(1, total - w))

    return f


def _evaluate_dev_sharded(model, tokenizer, learner: Learner, dev: DevSet, cfg: MetaTrainConfig,
                          dist: Dist, embedder=None) -> dict:
    """``evaluate_dev`` on rank 0 (the pipeline answers one process's batches); every rank takes
    the same best/last decision from rank 0's numbers."""
    res = evaluate_dev(model, tokenizer, learner, dev, cfg, embedder=embedder) if dist.main else None
    return dist.broadcast_object(res) if dist.enabled else res


def _batch_stats(dist: Dist, loss: torch.Tensor, info: dict, shard: list[BatchEntry], share: float,
                 general_share: float) -> tuple[float, dict]:
    """The logged loss and its parts for the whole meta-batch (a rank saw only its shard)."""
    if not dist.enabled:
        return float(loss.detach()), info
    n_docs = sum(len(entry.documents) for entry in shard)
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
    lora_cfg=None,
    stop_after: int | None = None,
) -> dict:
    """Run meta-training; returns a summary. Writes into cfg.out:
    ``best/`` and ``last/`` learner checkpoints, ``state.pt`` (resume), ``log.json``, ``curves.png``.

    Under torchrun (``dist``, default: the job this process joined, see distributed.py) every
    process runs this function on its shard of each meta-batch; only rank 0 writes files and
    calls ``progress``. ``cfg.meta_batch`` stays the global batch, so the run equals the
    single-process one up to float rounding. ``stop_after`` N: stop after N steps of this call
    as SIGTERM stops (state.pt and log.json saved, no ``last/``; ``--resume`` continues)."""
    run = MetaRun(cfg, model, tokenizer, embedder, dist=dist or distributed.current(), progress=progress,
                  general_text=general_text)
    state = run.setup(learner, lora_cfg, resume)
    if state is not None:
        run.resume(state)
    return run.train(stop_after)


class MetaRun:
    """One meta-training run as a recipe: ``setup`` (run directory, learner, data, optimiser),
    ``resume`` (from state.pt), ``train`` (``train_step`` per step; ``dev_check`` every
    ``eval_every`` steps and at the end; ``save`` then, and every ``save_every_s`` seconds), and
    ``finish`` (checkpoints, tensor energy, log, curves). Only rank 0 writes files."""

    def __init__(self, cfg: MetaTrainConfig, model, tokenizer, embedder, *, dist: Dist,
                 progress: Callable[[int, int, dict], None] | None = None, general_text: str | None = None):
        self.cfg, self.model, self.tokenizer, self.embedder = cfg, model, tokenizer, embedder
        self.dist, self.progress, self.general_text = dist, progress, general_text
        self.out = Path(cfg.out)
        self.state_path = self.out / STATE_FILE
        self.start_step, self.best_f1 = 0, -1.0

    # Setup ----------------------------------------------------------------------------------
    def setup(self, learner: Learner | None, lora_cfg, resume: bool) -> dict | None:
        """Everything before the first step; returns the state to resume from (None: a new run).
        The state file is read first, so a damaged one stops the run before any data loads."""
        cfg, dist = self.cfg, self.dist
        if cfg.meta_batch < dist.world:
            raise RegradError(f"--meta-batch {cfg.meta_batch} is smaller than the {dist.world} processes: "
                              "each process needs at least one question per meta-step")
        if dist.main and not resume and ((self.out / "best").exists() or self.state_path.exists()):
            # Never overwrite a run (or checkpoints meta-train did not make) without being asked.
            raise RegradError(f"{self.out} already holds a meta-training run (best/ or state.pt): pass --resume "
                              "to continue it, or choose another --out")
        if dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        # Rank 0 reads the state and sends it to the others: OUT need not be shared between nodes.
        state = dist.broadcast_object(
            read_state(self.state_path) if resume and dist.main and self.state_path.exists() else None)
        torch.manual_seed(cfg.seed)
        self.learner = learner if learner is not None else self._new_learner(lora_cfg)
        # 'float32' or 'bfloat16' ('auto' decided for this device; a model loaded in another dtype
        # computes in its own, named so): every model pass of a step and a dev check runs in it.
        self.precision = resolve_compute_dtype(cfg.precision, self.model)
        if dist.main:
            log.info("precision: %s", self.precision)
        self._set_doc_loss()
        self._load_data()
        self._check_key_map()
        self._make_optimiser()
        self.history: dict = {"config": asdict(cfg), "pools": self.pool_stats, "train": [], "dev": []}
        return state

    def _new_learner(self, lora_cfg) -> Learner:
        cfg = self.cfg
        if cfg.init_checkpoint:
            learner = Learner.load(cfg.init_checkpoint)
        else:
            # The one learner initialisation (checkpoints.init_learner): the workspace's [lora] shape
            # and targets, with this run's explicit settings on top.
            from regrad_cli.workspace.checkpoints import init_learner

            over = {"rank": cfg.rank, "lora_alpha": cfg.lora_alpha, "init_b_std": cfg.b_std,
                    "alpha_init": cfg.alpha_init, "seed": cfg.seed}
            learner = init_learner(self.model, lora_cfg, **{k: v for k, v in over.items() if v is not None})
        return learner.attach(self.model)

    def _load_data(self) -> None:
        """Training pools, dev sets, the number of steps and the locality KL's general text.

        Rank 0 reads and embeds the data once; every rank gets the same pools, so the same
        neighbours and scores, and draws the same meta-batches from them."""
        cfg, dist = self.cfg, self.dist
        if cfg.norm not in adapt.NORMALISATIONS:
            raise RegradError(f"unknown normalisation {cfg.norm!r} (use {', '.join(adapt.NORMALISATIONS)})")
        if cfg.retrieval not in ("retrieved", "gold"):
            raise RegradError(f"unknown training retrieval {cfg.retrieval!r} (use retrieved or gold)")
        pool_kw = dict(tokenizer=self.tokenizer, max_tokens=cfg.max_doc_tokens, overlap=cfg.chunk_overlap)
        self.pools, dev_pools = dist.broadcast_object(
            ([build_pool(spec, load_dataset(spec), self.embedder, **pool_kw) for spec in cfg.train],
             [build_pool(spec, load_dataset(spec), self.embedder, **pool_kw) for spec in cfg.dev])
            if dist.main else None)
        self.weights = cfg.mix_weights or [len(p.items) for p in self.pools]
        if len(self.weights) != len(self.pools):
            raise RegradError("--mix needs one weight per --train dataset")
        dev_rng = random.Random(cfg.seed + 1)
        self.devs: list[DevSet] = []
        per_dev = max(1, cfg.dev_limit // max(1, len(dev_pools)))
        for p in dev_pools:
            chosen = dev_rng.sample(p.items, min(per_dev, len(p.items)))
            self.devs.append(DevSet(chosen, p, {it.id: documents_for(it, p, cfg.k, dev_rng, "gold") for it in chosen}))
        self.pool_stats = {p.name: {"questions": len(p.items), "chunks": len(p.corpus),
                                    f"recall@{cfg.k}": p.recall(cfg.k)} for p in self.pools + dev_pools}
        if dist.main:
            log.info("pools: %s", json.dumps(self.pool_stats))
        self.steps = cfg.steps
        if cfg.epochs:
            total_items = sum(len(p.items) for p in self.pools)
            self.steps = max(1, int(math.ceil(cfg.epochs * total_items / cfg.meta_batch)))
        self.general_all = None
        if cfg.locality > 0 and self.general_text:
            ids = self.tokenizer(self.general_text).input_ids
            chunks = [ids[i:i + 64] for i in range(0, len(ids) - 64, 64)]
            self.general_all = torch.tensor(chunks) if chunks else None

    def _set_doc_loss(self) -> None:
        """The run's document loss (--doc-loss, else the learner's own), recorded in the learner;
        a loss the run cannot train with is refused before any data loads."""
        cfg, learner = self.cfg, self.learner
        learner.doc_loss = cfg.doc_loss or learner.doc_loss
        if learner.doc_loss == "distill" and not cfg.first_order:
            raise RegradError("the distill document loss is first order only (its teacher carries no gradient): "
                              "pass --first-order")

    def _check_key_map(self) -> None:
        """The key-map options against the learner; the factor and prefix caches when asked for."""
        cfg, learner = self.cfg, self.learner
        if cfg.token_weights:
            if learner.transform is None or cfg.transform_lr <= 0:
                raise RegradError("--token-weights learns per-token weights inside the document key map: it needs a "
                                  "learner with a key map (--init DIR) and --transform-lr above 0")
            learner.transform.enable_token_weights()
        if cfg.transform_lr > 0 and learner.transform is None:
            raise RegradError("--transform-lr trains a document key map, and this learner has none: start from one "
                              "made by `regrad learner fit-keymap` (--init DIR)")
        if learner.transform is not None and not cfg.first_order:
            raise RegradError("a learner with a document key map is meta-trained first order: pass --first-order")
        self.factor_cache = None
        if cfg.factor_cache_gb > 0:
            if not (cfg.freeze_phi and learner.transform is not None):
                raise RegradError("--factor-cache-gb reuses documents' factors, which stay the same only while phi "
                                  "does: it needs a learner with a key map and --freeze-phi")
            from regrad_cli.learner.transform import FactorCache

            self.factor_cache = FactorCache(int(cfg.factor_cache_gb * 2**30), dtype=cfg.factor_cache_dtype)
        self.prefix_cache = None
        if cfg.prefix_cache_gb > 0 and self._autocast():
            # PrefixCache.last_hidden answers None under autocast (its exactness is float32's):
            # every pass would run in full anyway, so the cache is not built.
            log.warning("--prefix-cache-gb is off under bfloat16 autocast (the prefix cache serves float32 passes)")
        elif cfg.prefix_cache_gb > 0:
            from regrad_cli.lm.prefix import PrefixCache

            self.prefix_cache = PrefixCache(int(cfg.prefix_cache_gb * 2**30), learner.first_layer(self.model))

    def _autocast(self) -> bool:
        """True when the model passes run under bf16 autocast (``gradients.compute_context``)."""
        return self.precision == "bfloat16" and next(self.model.parameters()).dtype == torch.float32

    def _make_optimiser(self) -> None:
        """AdamW over what learns (phi unless frozen; alpha and, for combine=score, the
        temperature; the key map with --transform-lr) and the warm-up then linear-decay schedule."""
        cfg, learner = self.cfg, self.learner
        params_phi = [] if cfg.freeze_phi else [learner.phi[k] for k in learner.phi.keys()]
        params_alpha = [learner.log_alpha[k] for k in learner.log_alpha.keys()]
        if cfg.combine == "score":
            params_alpha.append(learner.log_temp)
        params_map = (list(learner.transform.parameters())
                      if learner.transform is not None and cfg.transform_lr > 0 else [])
        learner.meta["combine"] = cfg.combine
        learner.meta["norm"] = cfg.norm
        for p in learner.parameters():
            p.requires_grad_(False)
        self.params = params_phi + params_alpha + params_map
        for p in self.params:
            p.requires_grad_(True)
        groups = [{"params": params_alpha, "lr": cfg.alpha_lr, "weight_decay": 0.0}]
        if params_phi:
            groups.insert(0, {"params": params_phi, "lr": cfg.lr})
        if params_map:
            groups.append({"params": params_map, "lr": cfg.transform_lr, "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(self.steps, cfg.warmup))

    def resume(self, state: dict) -> None:
        """Continue from ``state`` (``train_state.read_state``): learner, optimiser, schedule,
        step, best dev score and log."""
        recorded = (state["history"].get("config") or {}).get("doc_loss")
        if recorded and self.cfg.doc_loss and recorded != self.cfg.doc_loss:
            raise RegradError(f"{self.state_path} continues a run with --doc-loss {recorded}: resume with the same loss")
        apply_state(state, self.learner, self.opt, self.sched, str(self.state_path))
        self.start_step, self.best_f1, self.history = state["step"], state["best_f1"], state["history"]
        self._record_config_change()
        if self.dist.main:
            log.info("resumed from step %d", self.start_step)

    # Options a resumed run may change without touching what the state holds, and those whose change
    # makes earlier dev scores incomparable (the best-by-dev selection then starts again).
    _DEV_OPTIONS = ("dev", "dev_limit", "k", "max_new_tokens", "select_modes", "seed")

    def _record_config_change(self) -> None:
        """A run resumed with other options (another training mix, a larger factor cache) keeps the
        record: ``history["config"]`` becomes this session's options and ``history["config_changes"]``
        lists, per resumed step, each option that changed (old, new) and the pools then in use."""
        old, new = self.history.get("config") or {}, asdict(self.cfg)
        # An option the recorded config lacks did not exist when it was written: that run ran
        # with its default (a run continued with --precision bfloat16 records the switch).
        before = {**asdict(MetaTrainConfig()), **old} if old else {}
        changed = {k: [before[k], v] for k, v in new.items() if k in before and before[k] != v}
        if not changed:
            return
        self.history.setdefault("config_changes", []).append(
            {"step": self.start_step, "changed": changed, "pools": self.pool_stats})
        self.history["config"], self.history["pools"] = new, self.pool_stats
        if self.dist.main:
            log.warning("resumed at step %d with other options: %s", self.start_step,
                        ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        if any(k in changed for k in self._DEV_OPTIONS):
            # Scores on another dev set are not comparable: the next dev check becomes the best.
            self.best_f1 = -1.0
            if self.dist.main:
                log.warning("the dev check changed: best-by-dev selection starts again at the next check")

    # Training -------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> dict:
        """The loop: a dev check before the first step of a new run, then every step.
        ``stop_after``: stop after that many steps of this session, as on SIGTERM (state saved)."""
        cfg = self.cfg
        stop_at = self.start_step + stop_after if stop_after else None
        # Identical by construction (same seed, same checkpoint); the broadcast makes it certain.
        self.dist.broadcast_(self.learner.parameters())
        self.t0 = self.last_save = time.time()
        if self.start_step == 0 and self.devs:
            self.dev_check(0)
        with _StopRequest() as stop:
            for step in range(self.start_step, self.steps):
                self.train_step(step)
                done = step + 1
                at_check = done % cfg.eval_every == 0 or done == self.steps
                if self.devs and at_check:
                    self.dev_check(done)
                by_time = cfg.save_every_s > 0 and time.time() - self.last_save >= cfg.save_every_s
                # Every process stops after the same step: rank 0's signal decides.
                signalled = self.dist.broadcast_object(stop.requested) if self.dist.enabled else stop.requested
                stopping = done < self.steps and (signalled or done == stop_at)
                if self.dist.main and (at_check or by_time or stopping):
                    self.save(done)
                if stopping:
                    return self.stopped(done, stop.signal_name if signalled else "--stop-after")
        return self.finish()

    def stopped(self, step: int, why: str | None) -> dict:
        """A run stopped by SIGTERM/SIGINT after ``step``: its state is saved (``--resume``
        continues it), no last/ checkpoint is written (the run is not finished)."""
        self.dist.barrier()
        if self.dist.main:
            log.warning("stopped after step %d (%s): state saved to %s; the same command with --resume continues",
                        step, why or "signal", self.state_path)
        train = self.history["train"]
        return {"steps": self.steps, "stopped_at": step, "stopped_by": why, "best_dev_f1": self.best_f1, "out": str(self.out),
                "world_size": self.dist.world, "precision": self.precision, "wall_s": round(time.time() - self.t0, 1),
                "last": train[-1] if train else None}

    def train_step(self, step: int) -> dict:
        """One meta-step on ``draw_batch(step)`` (this process's shard of it); returns its record."""
        cfg, dist = self.cfg, self.dist
        batch = draw_batch(cfg, self.pools, self.weights, step)
        lo, hi = dist.bounds(len(batch))
        share = (hi - lo) / len(batch)
        self.opt.zero_grad(set_to_none=True)
        step_cfg = cfg if step >= cfg.first_order_steps or cfg.first_order else replace(cfg, first_order=True)
        general_ids, general_share = self.general_rows(step)
        # The forward passes (and the document passes' own backward) under the run's precision; the
        # outer backward outside it, as autocast is meant to be used (its ops keep the forward's dtypes).
        with compute_context(self.model, self.precision):
            loss, info = outer_loss(self.model, self.tokenizer, self.learner, batch[lo:hi], step_cfg, general_ids,
                                    share=share, general_share=general_share, factor_cache=self.factor_cache,
                                    prefix_cache=self.prefix_cache)
        loss.backward()
        # Sum before clipping: every rank then clips the same whole-batch gradient.
        dist.sum_grads(self.params)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
        self.opt.step()
        self.sched.step()
        loss_value, info = _batch_stats(dist, loss, info, batch[lo:hi], share, general_share)
        return self._record(step + 1, loss_value, info, float(gnorm))

    def general_rows(self, step: int) -> tuple[torch.Tensor | None, float]:
        """The step's general-text rows for the locality KL: ``meta_batch`` rows of 64 tokens,
        rotating through the text with the step (a resumed run sees the same rows), split over
        the processes like the questions; returns (this shard's rows, its share of them)."""
        if self.general_all is None:
            return None, 1.0
        n, rows_all = max(1, self.cfg.meta_batch), self.general_all
        rows = rows_all[[(step * n + i) % len(rows_all) for i in range(min(n, len(rows_all)))]]
        g_lo, g_hi = self.dist.bounds(len(rows))
        return rows[g_lo:g_hi], (g_hi - g_lo) / max(1, len(rows))

    def _record(self, step: int, loss: float, info: dict, grad_norm: float) -> dict:
        """The step's log record: into the history, the log and ``progress``."""
        learner, cache, prefix = self.learner, self.factor_cache, self.prefix_cache
        alphas = torch.stack([learner.alpha(n).detach().mean() for n in learner.names])
        rec = {"step": step, "loss": loss, **info, "grad_norm": grad_norm,
               "alpha_mean": float(alphas.mean()), "alpha_max": float(alphas.max()),
               "temp": float(learner.log_temp.detach().exp()),
               "lr": self.sched.get_last_lr()[0], "elapsed_s": round(time.time() - self.t0, 1)}
        if self.precision != "float32":
            rec["precision"] = self.precision  # which steps of a long run ran in bf16 (a float32 step says nothing)
        if cache is not None:
            rec["factor_cache"] = {"docs": len(cache), "hits": cache.hits,
                                   "misses": cache.misses, "gib": round(cache.bytes / 2**30, 3)}
        if prefix is not None:
            rec["prefix_cache"] = {"rows": len(prefix), "hits": prefix.hits, "misses": prefix.misses,
                                   "gib": round(prefix.bytes / 2**30, 3)}
        self.history["train"].append(rec)
        if self.dist.main:
            log.info("step %d/%d: %s", step, self.steps, json.dumps(rec))
        if self.progress and self.dist.main:
            self.progress(step, self.steps, rec)
        return rec

    def dev_check(self, step: int) -> None:
        """Every dev set through the real pipeline; a better selection score saves ``best/``."""
        cfg, dist = self.cfg, self.dist
        dist.check_in_sync(self.learner.parameters())
        with compute_context(self.model, self.precision):
            per_set = {d.pool.name: _evaluate_dev_sharded(self.model, self.tokenizer, self.learner, d, cfg, dist,
                                                          self.embedder)
                       for d in self.devs}
        # Modes averaged over the dev sets (the curve and the selection), and each set apart.
        res = {m: {**{k: float(np.mean([r[m][k] for r in per_set.values()])) for k in ("f1", "em", "nll")},
                   "n": int(sum(r[m]["n"] for r in per_set.values()))}
               for m in DEV_MODES}
        res["select"] = float(np.mean([select_score(r, cfg) for r in per_set.values()]))
        res["sets"] = per_set
        self.history["dev"].append({"step": step, **res})
        if res["select"] > self.best_f1:
            self.best_f1 = res["select"]
            if dist.main:
                self.learner.save(self.out / "best", {"trained": {"step": step, "dev": res, "config": asdict(cfg)}})
        if dist.main:
            log.info("dev step %d: %s", step, json.dumps(res))

    def save(self, step: int) -> None:
        """state.pt (train_state.py: phi left out while frozen) and log.json, each atomically."""
        self.last_save = time.time()
        write_state(self.state_path, learner=self.learner, opt=self.opt, sched=self.sched, step=step,
                    best_f1=self.best_f1, history=self.history, store_phi=not self.cfg.freeze_phi,
                    init=self.cfg.init_checkpoint)
        atomic_write_text(self.out / "log.json", json.dumps(self.history, indent=1))

    def finish(self) -> dict:
        """``last/`` (and ``best/`` if no dev check made one), tensor energy, log.json, curves.png;
        returns the summary."""
        cfg, dist, learner, out = self.cfg, self.dist, self.learner, self.out
        for p in self.params:
            p.requires_grad_(False)
        dist.check_in_sync(learner.parameters())
        if dist.main:
            learner.save(out / "last", {"trained": {"step": self.steps, "config": asdict(cfg)}})
            if not (out / "best").exists():
                learner.save(out / "best", {"trained": {"step": self.steps, "config": asdict(cfg)}})
            if cfg.energy_docs > 0 and self.pools:
                _record_energy(self.model, self.tokenizer, learner, out, self.pools[0].corpus[: cfg.energy_docs], cfg)
            atomic_write_text(out / "log.json", json.dumps(self.history, indent=1))
            try:
                plot_curves(self.history, out / "curves.png")
            except Exception as exc:  # a plot must never lose a training run
                log.warning("could not draw curves: %s", exc)
        # The others wait for rank 0's files: when any process returns, the run is on disk.
        dist.barrier()
        train = self.history["train"]
        return {"steps": self.steps, "best_dev_f1": self.best_f1, "out": str(out), "world_size": dist.world,
                "precision": self.precision, "wall_s": round(time.time() - self.t0, 1),
                "last": train[-1] if train else None}


class _StopRequest:
    """SIGTERM or SIGINT during meta-training asks for a stop after the current step (state saved,
    nothing lost); a second one stops at once, as without this. Only the main thread can take
    signals: elsewhere (a library call from a worker thread) this does nothing."""

    def __init__(self) -> None:
        self.requested, self.signal_name, self._old = False, None, {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            # The second request: the previous handler (KeyboardInterrupt, or termination).
            old = self._old.get(signum)
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.requested, self.signal_name = True, signal.Signals(signum).name
        log.warning("%s: stopping after this step (state saved); send it again to stop at once", self.signal_name)

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _record_energy(model, tokenizer, learner: Learner, out: Path, texts: list[str], cfg: MetaTrainConfig) -> None:
    """Measure and record in ``best/`` and ``last/`` which tensors a bank stores (energy.py),
    each with its own weights; a failure here is logged, never loses the run."""
    from regrad_cli.learner import energy
    try:
        for name in ("last", "best"):
            ck = Learner.load(out / name)
            learner.detach_from(model)
            ck.attach(model)
            try:
                # An engine-like holder: a causal-LM's own ``.model`` is its decoder stack.
                holder = SimpleNamespace(model=model, learner=ck, tokenizer=tokenizer)
                shares = energy.tensor_energy(holder, ck, tokenizer, texts, cfg.max_doc_tokens)
            finally:
                ck.detach_from(model)
                learner.attach(model)
            energy.write_record(out / name, energy.energy_record(
                shares, n_docs=len(texts), max_tokens=cfg.max_doc_tokens, norm=cfg.norm))
    except Exception as exc:  # noqa: BLE001 - the checkpoints are already on disk
        log.warning("could not record tensor energy: %s (run `regrad learner energy --write`)", exc)


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
    for mode in DEV_MODES:
        pts = [(d["step"], d[mode]["f1"]) for d in history["dev"] if mode in d]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=f"dev F1 {mode}")
    axes[1].set_xlabel("step")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
