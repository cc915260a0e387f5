"""Drift of the deployed model: what each system's answering weights do to general text.

Every system answers with one of four weight sets, and its drift is measured on exactly those:

    base           closed-book, rag                  the bare base model (side paths off)
    base+phi       closed-book+phi, rag+phi          the meta-learned phi, no step
    base+phi+step  regrad, regrad+context, oracle,   phi' = the question's step; reported as the
                   shifted, random                   mean perplexity over up to --drift-steps of
                                                     the evaluated questions' steps
    cpt            cpt, cpt+rag                      the CPT-trained copy of the base model

The perplexity is that of the shipped general text (regrad_cli/data/general_text.txt), reported
next to the base model's. The base weights are fingerprinted (sha256) and snapshotted once: after
each system their sha256 and L2 distance from the snapshot are measured again (ReGrad never writes
a base weight, so its rows read L2 = 0; CPT trains a copy, whose distance is the drift it costs),
and phi's content id is compared before and after (the side path is restored, never undone).
The step of a question is rebuilt from its answer's applied documents with pipeline.step_from_rows
(the pipeline's own definition); its weights must equal the ones the answer reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from regrad_cli.learner import adapt
from regrad_cli.errors import RegradError
from regrad_cli.learning.evaluation.config import SYSTEMS_TABLE


def deployed(name: str) -> str:
    s = SYSTEMS_TABLE[name]
    if s.model == "cpt":
        return "cpt"
    if s.mode in ("param", "param+context"):
        return "base+phi+step"
    return "base+phi" if s.mode.endswith("+phi") else "base"


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 256, batch_size: int = 4,
               max_tokens: int | None = None) -> float:
    """Perplexity of ``text`` (its first ``max_tokens`` tokens) in non-overlapping windows, each
    opened with a document-start token."""
    from regrad_cli.lm.tokens import doc_start_token, pad_id, pad_rows, per_sample_nll

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
    pad = pad_id(tokenizer)
    total, count = 0.0, 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        inp, mask = pad_rows(chunk, pad)
        nll = per_sample_nll(model, inp.to(device), mask.to(device))
        n = torch.tensor([len(r) - 1 for r in chunk], dtype=torch.float64)
        total += float((nll.double().cpu() * n).sum())
        count += int(n.sum())
    return float(np.exp(total / count))


def params_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def l2_distance(model, snapshot: dict[str, torch.Tensor]) -> float:
    """sqrt(sum ||theta - theta0||^2) over every (distinct) parameter, in float64."""
    total = 0.0
    for n, p in model.named_parameters():
        total += float((p.detach().double() - snapshot[n].to(p.device).double()).pow(2).sum())
    return float(np.sqrt(total))


def sample_evenly(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted({int(round(i * (n - 1) / max(1, k - 1))) for i in range(k)}) if k > 1 else [0]


@dataclass
class DriftMeter:
    """Measures the deployed weights of each system against the base model."""

    engine: object
    general: str
    max_tokens: int
    gamma: float
    steps: int
    snapshot: dict = field(default_factory=dict)
    sha0: str = ""
    phi0: str = ""
    ppl_base: float = math.nan
    _ppl_phi: float | None = None
    _cpt_ppl: dict = field(default_factory=dict)

    @classmethod
    def start(cls, engine, general: str, max_tokens: int, gamma: float, steps: int) -> "DriftMeter":
        from regrad_cli.lm.models import weights_sha256

        m = cls(engine, general, max_tokens, gamma, steps, params_snapshot(engine.model),
                weights_sha256(engine.model), engine.learner.checkpoint_id())
        m.ppl_base = m.ppl(engine.model, "off")
        return m

    def ppl(self, model, state) -> float:
        with adapt.applied(self.engine.learner, state):
            return perplexity(model, self.engine.tokenizer, self.general, max_tokens=self.max_tokens)

    def ppl_phi(self) -> float:
        if self._ppl_phi is None:
            self._ppl_phi = self.ppl(self.engine.model, None)
        return self._ppl_phi

    def step_ppls(self, qe, records: list[dict]) -> tuple[list[float], bool]:
        """Perplexity under the steps of up to ``steps`` evenly spread questions that applied
        documents, and whether every rebuilt step's weights equal those the answer reported."""
        from regrad_cli.online.pipeline import step_from_rows

        learner = self.engine.learner
        with_docs = [r for r in records if r["applied"]]
        chosen = [with_docs[i] for i in sample_evenly(len(with_docs), self.steps)] if self.steps else []
        if not chosen:
            return [], True
        qvecs = qe.embedder.embed([r["question"] for r in chosen])
        device = next(self.engine.model.parameters()).device
        out, match = [], True
        for r, v in zip(chosen, qvecs):
            ids = r["applied"]
            rows, bad = qe.corpus.gradients(ids)
            if bad:
                raise RegradError(f"drift: gradient rows of {', '.join(bad)} could not be read again")
            cos = qe.corpus.cosines(v, ids)
            step, w = step_from_rows(learner, [rows[d] for d in ids], [cos.get(d, 0.0) for d in ids],
                                     learner.trained_combine, self.gamma, device,
                                     row_norm=getattr(qe.corpus, "row_norm", None))
            match = match and np.allclose(w, r["weights"], atol=1e-5)
            out.append(self.ppl(self.engine.model, step))
        return out, match

    def measure(self, name: str, model, *, qe=None, records=None, with_ppl: bool = True) -> dict:
        from regrad_cli.lm.models import weights_sha256

        kind = deployed(name)
        sha = weights_sha256(model)
        d = {"deployed": kind, "l2": l2_distance(model, self.snapshot), "sha256_before": self.sha0,
             "sha256_after": sha, "identical": sha == self.sha0, "phi_before": self.phi0,
             "phi_after": self.engine.learner.checkpoint_id(), "ppl_base": self.ppl_base,
             "ppl_deployed": None, "ppl_deployed_std": None, "ppl_ratio": None, "n_steps": None}
        d["phi_identical"] = d["phi_after"] == d["phi_before"]
        if not with_ppl:
            return d
        if kind == "base":
            vals = [self.ppl_base]
        elif kind == "base+phi":
            vals = [self.ppl_phi()]
        elif kind == "cpt":
            key = id(model)
            if key not in self._cpt_ppl:
                self._cpt_ppl = {key: self.ppl(model, "off")}  # the copy has no side path; "off" is a no-op
            vals = [self._cpt_ppl[key]]
        else:
            vals, match = self.step_ppls(qe, records or [])
            d["n_steps"] = len(vals)
            d["step_weights_match"] = match
        if vals:
            d["ppl_deployed"] = float(np.mean(vals))
            d["ppl_deployed_std"] = float(np.std(vals)) if len(vals) > 1 else 0.0
            d["ppl_ratio"] = d["ppl_deployed"] / self.ppl_base
        return d
