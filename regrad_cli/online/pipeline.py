"""The answering pipeline, defined once: retrieve -> weigh -> step -> prompt -> generate -> restore.

``answer_many`` answers a list of ``Request``s in as few generation calls as possible: every row
gets its *own* side-path adapter (phi' for a row that takes a step, phi, or zeros for a row that
runs the bare base model), stacked [N, ...] so that the base matmuls run once for the batch and
each row adds its own low-rank term. With a single request the adapter is the plain 2-D one, so
``regrad query`` answers exactly as before. The step and the combination are ``adapt``'s
(``adapt.flat_steps`` on flat gradient rows); nothing here re-implements them.

What the pipeline reads (retrieval, passage texts, decoded gradients) comes from a ``Corpus``:
``query.WorkspaceCorpus`` over a workspace's documents table and gradient bank, or an in-memory
corpus (meta-training's dev check), so every caller answers through the same code.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from regrad_cli.learner import adapt
from regrad_cli.errors import FieldError, RegradError
from regrad_cli.lm.generation import answer_nll, generate
from regrad_cli.lm.prompting import answer_ids, answer_so_far, prompt_ids

log = logging.getLogger("regrad")


# The modes and the bounds of a request live in the torch-free regrad_cli.modes (the CLI checks
# its options there before any model loads); re-exported here for the pipeline's callers.
from regrad_cli.online.modes import MAX_NEW_TOKENS, MAX_TOP_K, MODES, RETRIEVERS, Mode, check_options  # noqa: E402,F401


@dataclass
class Retrieved:
    doc_id: str
    score: float  # retriever score (cosine for dense, BM25 for bm25, RRF for hybrid)
    source: str
    cosine: float  # question-document cosine, used by combine="score"


@dataclass
class Request:
    """One question and how to answer it."""

    question: str
    mode: str = "param"
    top_k: int = 3
    gamma: float = 1.0
    combine: str | None = None  # default: what the learner was trained with
    retriever: str = "dense"
    max_new_tokens: int = 20
    show_docs: bool = False
    kind: str = "qa"  # prompt kind: "qa", "yesno" or "cloze"
    # Explicit document ids: no retrieval, these documents' gradients/passages are used
    # (eval's oracle, shifted and random controls).
    docs: list[str] | None = None
    # A gold answer: its teacher-forced NLL under exactly the answering weights is returned.
    gold: str | None = None
    max_passage_tokens: int = 256
    # Documents whose cosine with the question is below this give neither a step nor a passage.
    min_score: float | None = None
    # Streaming: called from the generating thread with the answer so far each time it grows
    # (each text extends the one before; the last is the whole answer), while the row's step is
    # applied. It must be quick and must not raise (an exception stops this row's stream only).
    on_text: Callable[[str], None] | None = field(default=None, repr=False, compare=False)


class Corpus(Protocol):
    layout: list[str]

    def search(self, question: str, qvec: np.ndarray, k: int, retriever: str,
               gradients: bool = True) -> list[Retrieved]: ...
    # ``gradients``: the documents are wanted for their gradients (a step), so the search may run
    # over the gradient bank's vectors; False: for their texts only.

    def cosines(self, qvec: np.ndarray, ids: Sequence[str]) -> dict[str, float]: ...

    def texts(self, ids: Sequence[str]) -> dict[str, str]: ...

    def sources(self, ids: Sequence[str]) -> dict[str, str]: ...

    def gradients(self, ids: Sequence[str]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]: ...


def check_request(req: Request, learner) -> Request:
    """The request with its defaults filled in; FieldError (a RegradError) naming the field if it
    is invalid."""
    if not isinstance(req.question, str) or not req.question.strip():
        raise FieldError("question", "empty question")
    gamma = check_options(mode=req.mode, top_k=req.top_k, gamma=req.gamma, combine=req.combine,
                          retriever=req.retriever, max_new_tokens=req.max_new_tokens, min_score=req.min_score)
    combine = req.combine or learner.trained_combine
    check_options(combine=combine)
    return replace(req, combine=combine, gamma=gamma)


@dataclass
class Row:
    """One request on its way through the stages of ``answer_many``: each stage reads the fields
    the earlier ones filled, and a row whose ``error`` is set leaves the later stages."""

    req: Request
    retrieved: list[Retrieved] = field(default_factory=list)  # retrieve
    passages: list[str] = field(default_factory=list)  # passages: the prompt's documents
    used: list[str] = field(default_factory=list)  # steps: documents whose gradient is applied
    weights: list[float] = field(default_factory=list)  # steps: their combination weights
    skipped: list[dict] = field(default_factory=list)  # steps: rows not applied, with the reason
    warnings: list[str] = field(default_factory=list)  # one line each, with the fixing command
    adapter: dict | None = None  # steps: phi' for a step row
    answer: str = ""  # generate
    nll: float | None = None  # generate: the gold answer's NLL, when asked
    batch_size: int = 1  # generate: rows in this row's generation call
    timings: dict = field(default_factory=dict)  # ms per stage, this row's share
    error: Exception | None = None


TIMING_STAGES = ("embed", "retrieve", "fetch_decode", "apply", "generate", "restore")


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def answer_many(engine, embedder, corpus: Corpus, requests: Sequence[Request], *, strict: bool = False,
                return_exceptions: bool = False, fingerprints: dict | None = None) -> list:
    """Answer every request; results in request order (dicts as ``regrad query --json`` prints).

    The stages, in order, over ``Row``s: check -> retrieve -> passages -> steps -> generate ->
    results. A request that fails (bad field, corrupt gradient row with ``strict``, non-finite
    step) fails alone: with ``return_exceptions`` its slot holds the RegradError and the others
    are answered; without, the first error is raised (an invalid field before anything runs)."""
    rows = _check(engine.learner, requests)
    if not return_exceptions:
        for row in rows:
            if row.error is not None:
                raise row.error
    _retrieve(embedder, corpus, _live(rows))
    _passages(corpus, _live(rows))
    _steps(engine, corpus, _live(rows), strict)
    _generate(engine, _live(rows))
    return _results(corpus, rows, return_exceptions, fingerprints)


def _live(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.error is None]


def _check(learner, requests: Sequence[Request]) -> list[Row]:
    """Stage 1: every request checked and its defaults filled in (an invalid one gets its error)."""
    rows = []
    for req in requests:
        row = Row(req)
        try:
            row.req = check_request(req, learner)
        except RegradError as exc:
            row.error = exc
        rows.append(row)
    return rows


def _retrieve(embedder, corpus: Corpus, live: list[Row]) -> None:
    """Stage 2: one embedder call for every question that needs documents, then each row's
    documents: searched (the bank's vectors for a step, the documents table otherwise) or given."""
    need = [r for r in live if MODES[r.req.mode].retrieve]
    if not need:
        return
    t = time.perf_counter()
    qvecs = embedder.embed([r.req.question for r in need])
    embed_ms = _ms(t) / len(need)
    for r, qvec in zip(need, qvecs):
        r.timings["embed"] = embed_ms
        t = time.perf_counter()
        try:
            if r.req.docs is not None:
                cos = corpus.cosines(qvec, r.req.docs)
                src = corpus.sources(r.req.docs)
                r.retrieved = [Retrieved(d, cos.get(d, 0.0), src.get(d, ""), cos.get(d, 0.0))
                               for d in r.req.docs]
            else:
                step = MODES[r.req.mode].adapter == "step"
                r.retrieved = corpus.search(r.req.question, qvec, r.req.top_k, r.req.retriever,
                                            gradients=step)
                if r.req.min_score is not None:
                    r.retrieved = [h for h in r.retrieved if h.cosine >= r.req.min_score]
                notes = getattr(corpus, "notes", None)
                if notes is not None:
                    r.warnings += notes(step)
        except RegradError as exc:
            r.error = exc
        r.timings["retrieve"] = _ms(t)


def _passages(corpus: Corpus, live: list[Row]) -> None:
    """Stage 3: the documents' texts for the rows whose prompt holds them."""
    ctx_rows = [r for r in live if MODES[r.req.mode].passages and r.retrieved]
    if ctx_rows:
        texts = corpus.texts([h.doc_id for r in ctx_rows for h in r.retrieved])
        for r in ctx_rows:
            r.passages = [texts[h.doc_id] for h in r.retrieved if h.doc_id in texts]


def _steps(engine, corpus: Corpus, live: list[Row], strict: bool) -> None:
    """Stage 4: gradients -> combination -> phi' for every step row. Rows whose steps share their
    shape (as many documents, the same combination and gamma) are stepped together, [n, k, ...]:
    the same arithmetic per row as one at a time, without a few thousand small tensor operations
    per row."""
    learner, model = engine.learner, engine.model
    step_rows = [r for r in live if MODES[r.req.mode].adapter == "step"]
    if not step_rows:
        return
    t = time.perf_counter()
    ids = list(dict.fromkeys(h.doc_id for r in step_rows for h in r.retrieved))
    decoded, bad = corpus.gradients(ids) if ids else ({}, {})
    fetch_ms = _ms(t) / len(step_rows)
    device = next(model.parameters()).device
    same: dict[tuple, list[tuple[Row, list[Retrieved]]]] = {}
    for r in step_rows:
        r.timings["fetch_decode"] = fetch_ms
        r.skipped = [{"doc_id": h.doc_id, "reason": bad[h.doc_id]} for h in r.retrieved if h.doc_id in bad]
        if r.skipped and strict:
            s = r.skipped[0]
            r.error = RegradError(f"corrupt or missing gradient row for {s['doc_id']!r}: {s['reason']}")
            continue
        for s in r.skipped:
            log.info("not applying the gradient of %s: %s", s["doc_id"], s["reason"])
            r.warnings.append(f"not applied: {s['doc_id']}: {s['reason']}")
        used = [h for h in r.retrieved if h.doc_id in decoded]
        r.used = [h.doc_id for h in used]
        if not used:
            r.adapter = None  # nothing to apply: phi itself
            r.timings["apply"] = 0.0
            continue
        same.setdefault((len(used), r.req.combine, r.req.gamma), []).append((r, used))
    for (_, combine, gamma), members in same.items():
        t = time.perf_counter()
        steps, weights = steps_from_rows(learner, [[decoded[h.doc_id] for h in used] for _, used in members],
                                         [[h.cosine for h in used] for _, used in members], combine, gamma,
                                         device, row_norm=getattr(corpus, "row_norm", None))
        finite = steps.finite
        apply_ms = _ms(t) / len(members)
        for i, (r, _) in enumerate(members):
            r.weights = weights[i]
            r.timings["apply"] = apply_ms
            if finite[i]:
                r.adapter = {n: v[i] for n, v in steps.items()}
            else:
                r.error = RegradError(
                    f"the step for {r.req.question[:60]!r} is not finite (documents {', '.join(r.used)}): "
                    "a gradient row or the learner holds inf/NaN; run `regrad bank verify`")


def _generate(engine, live: list[Row]) -> None:
    """Stage 5: one generation call per max_new_tokens value, every row with its own adapter;
    the weights are restored when the call ends. Each row's timings are its share of the call."""
    learner, tok, model = engine.learner, engine.tokenizer, engine.model
    groups: dict[int, list[Row]] = {}
    for r in live:
        groups.setdefault(r.req.max_new_tokens, []).append(r)
    for max_new, group in groups.items():
        prompts = [prompt_ids(tok, r.req.question, r.passages, r.req.kind, r.req.max_passage_tokens)
                   for r in group]
        state = _batch_adapter(learner, group)
        t = time.perf_counter()
        try:
            with adapt.applied(learner, state):
                # Rows that finish leave the generation batch; their stacked adapters go too.
                follow = None
                if isinstance(state, dict) and len(group) > 1:
                    follow = lambda rows, state=state: learner.use(adapt.select_rows(state, rows))  # noqa: E731
                # The gold answers' likelihood is scored on the prefill's cache (no second pass).
                golds = ([answer_ids(tok, r.req.gold or "") for r in group]
                         if any(r.req.gold is not None for r in group) else None)
                nlls = [] if golds is not None else None
                stream = _TextStream.of(tok, group)
                texts = generate(model, tok, prompts, max_new, on_rows=follow, answers=golds, nll_out=nlls,
                                 on_tokens=stream)
                gen_ms = _ms(t)
                if golds is not None and not nlls:  # a cache that cannot be scored in place
                    if follow is not None:
                        learner.use(state)  # every row again
                    nlls = answer_nll(model, tok, prompts, [r.req.gold or "" for r in group]).tolist()
            t = time.perf_counter()
        except RegradError as exc:
            for r in group:
                r.error = exc
            continue
        restore_ms = _ms(t)
        if stream is not None:
            stream.finish(texts)
        for i, (r, text) in enumerate(zip(group, texts)):
            r.batch_size = len(group)
            r.timings["generate"] = gen_ms / len(group)
            r.timings["restore"] = restore_ms / len(group)
            r.answer = text
            if nlls is not None and r.req.gold is not None:
                r.nll = float(nlls[i])


class _TextStream:
    """The ``on_tokens`` of one generation call: each streaming row's tokens decoded as they
    come, and its ``on_text`` called whenever ``answer_so_far`` grows; ``finish`` sends the
    whole answers. Reads tokens only: the weights and the per-row adapters are not touched."""

    def __init__(self, tokenizer, sinks: dict[int, Callable[[str], None]]):
        self.tokenizer, self.sinks = tokenizer, sinks
        self.tokens: dict[int, list[int]] = {i: [] for i in sinks}
        self.sent: dict[int, str] = {i: "" for i in sinks}

    @classmethod
    def of(cls, tokenizer, group: list[Row]) -> "_TextStream | None":
        sinks = {i: r.req.on_text for i, r in enumerate(group) if r.req.on_text is not None}
        return cls(tokenizer, sinks) if sinks else None

    def __call__(self, rows: list[int], tokens: list[int]) -> None:
        for i, t in zip(rows, tokens):
            if i in self.sinks:
                self.tokens[i].append(t)
                self._send(i, answer_so_far(self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)))

    def finish(self, texts: Sequence[str]) -> None:
        for i in list(self.sinks):
            self._send(i, texts[i], final=True)

    def _send(self, i: int, text: str, final: bool = False) -> None:
        if i not in self.sinks or text == self.sent[i]:
            return
        if not text.startswith(self.sent[i]):
            # answer_so_far only grows; a tokenizer whose decoding of more tokens rewrites earlier
            # text could still break that: wait for more, and say so if the whole answer differs.
            if final:
                log.warning("a streamed answer changed under its stream (%r sent, the answer is %r)",
                            self.sent[i], text)
                del self.sinks[i]
            return
        self.sent[i] = text
        try:
            self.sinks[i](text)
        except Exception:  # noqa: BLE001 - one listener's failure must not stop the batch
            log.exception("a stream listener failed; its stream stopped")
            del self.sinks[i]


def _results(corpus: Corpus, rows: list[Row], return_exceptions: bool, fingerprints: dict | None) -> list:
    """Stage 6: the answer dicts (every mode has the same keys; ``weight`` is None for a document
    whose gradient was not applied), or the errors in their slots."""
    out = []
    show = [r for r in rows if r.error is None and r.req.show_docs and r.retrieved]
    shown = corpus.texts([h.doc_id for r in show for h in r.retrieved]) if show else {}
    for r in rows:
        if r.error is not None:
            if return_exceptions:
                out.append(r.error)
                continue
            raise r.error
        timings = dict.fromkeys(TIMING_STAGES, 0.0)
        timings.update(r.timings)
        wmap = dict(zip(r.used, r.weights))
        res = {
            "question": r.req.question,
            "answer": r.answer,
            "mode": r.req.mode,
            "retrieved": [{"doc_id": h.doc_id, "score": round(h.score, 6), "cosine": round(h.cosine, 6),
                           "source": h.source, "applied": h.doc_id in wmap,
                           "weight": round(wmap[h.doc_id], 6) if h.doc_id in wmap else None}
                          for h in r.retrieved],
            "warnings": list(dict.fromkeys(r.warnings)),
            "skipped": r.skipped,
            "timings_ms": {k: round(v, 2) for k, v in timings.items()},
            "batch_size": r.batch_size,
        }
        if fingerprints is not None:
            res["bank"] = fingerprints
        if r.nll is not None:
            res["nll"] = r.nll
        if r.req.show_docs and r.retrieved:
            for item in res["retrieved"]:
                item["text"] = shown.get(item["doc_id"], "")
        out.append(res)
    return out


def step_from_rows(learner, rows: Sequence[dict[str, np.ndarray]], cosines: Sequence[float], combine: str,
                   gamma: float = 1.0, device=None, row_norm: str | None = None
                   ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """phi' for one question from its documents' decoded gradient rows (name -> array each) and
    their retrieval cosines: adapt.combination_weights -> adapt.combine -> adapt.step.

    ``row_norm``: the normalisation the rows already carry (a bank's ``row_norm``, taken over
    the whole gradient when the bank leaves tensors out); they are then not normalised again."""
    steps, weights = steps_from_rows(learner, [rows], [cosines], combine, gamma, device, row_norm)
    return {n: v[0] for n, v in steps.items()}, weights[0]


def steps_from_rows(learner, rows: Sequence[Sequence[dict[str, np.ndarray]]], cosines: Sequence[Sequence[float]],
                    combine: str, gamma: float = 1.0, device=None, row_norm: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], list[list[float]]]:
    """``step_from_rows`` for n questions with k documents each at once: phi' stacked [n, ...]
    and the combination weights per question. Every question's phi' is bit for bit the one
    ``step_from_rows`` gives it alone (each question's arithmetic is its own: tests/test_serve.py
    checks it).

    The arithmetic is ``adapt.flat_steps`` (``adapt.combine`` then ``adapt.step`` on each
    gradient row as one flat vector; a bank row decodes into one, ``bank_format.decode_blob``),
    with phi and alpha kept flat on the learner."""
    scores = torch.tensor([list(c) for c in cosines], dtype=torch.float32)
    w = adapt.combination_weights(scores, combine, learner.log_temp.detach().cpu())
    names = list(rows[0][0])
    norm = learner.trained_norm
    if row_norm is not None:
        if row_norm != norm:
            raise RegradError(f"the bank's rows are normalised per {row_norm!r}, the learner per {norm!r}: "
                              "rebuild the bank with `regrad build-bank`")
        norm = "none"
    flat = _FlatLayout.of(learner, names)
    as_tensor: dict[int, torch.Tensor] = {}  # one tensor per document, however many questions use it
    flat_rows = [[as_tensor.setdefault(id(row), torch.from_numpy(flat.row(row))) for row in q] for q in rows]
    phi, ga = flat.tensors(device if device is not None else "cpu", gamma)
    stepped = adapt.flat_steps(phi, ga, flat_rows, w, norm, flat.sizes)
    finite = torch.isfinite(stepped).all(1).tolist()
    out, n = {}, stepped.shape[0]
    views = dict(zip(names, torch.split(stepped, flat.sizes, dim=1)))
    for name, p in learner.phi_dict().items():
        v = views.get(name)
        out[name] = (v.view(n, *p.shape) if v is not None
                     else p.detach().to(stepped.device).unsqueeze(0).expand(n, *p.shape))
    steps = Steps(out)
    steps.finite = [f and flat.phi_finite for f in finite]
    return steps, [[float(x) for x in row] for row in w]


class Steps(dict):
    """phi' per tensor name, [n, ...]; ``finite`` says per question whether every value is finite
    (checked once on the flat rows, for ``answer_many``)."""

    finite: list[bool]


class _FlatLayout:
    """phi and alpha of the tensors ``names`` as flat vectors, in that order, cached on the
    learner until one of its parameters changes (their version counters)."""

    def __init__(self, learner, names: list[str], key):
        self.names, self.key = names, key
        shapes = dict(learner.layout)
        self.sizes = [math.prod(shapes[n]) for n in names]
        with torch.no_grad():
            self._phi = torch.cat([learner.phi_dict()[n].detach().reshape(-1) for n in names])
            # alpha per value: the learner's scalar (or per-element) step size of each tensor
            self._alpha = torch.cat([learner.alpha(n).detach().expand(shapes[n]).reshape(-1) for n in names])
            # Tensors the rows do not hold keep phi: their finiteness is phi's, checked once.
            stored = set(names)
            rest = [p for n, p in learner.phi_dict().items() if n not in stored]
            self.phi_finite = all(bool(torch.isfinite(p).all()) for p in rest)
        self._on: dict = {}

    @classmethod
    def of(cls, learner, names: list[str]) -> "_FlatLayout":
        unknown = [n for n in names if n not in learner.names]
        if unknown:
            raise RegradError(f"gradient rows hold tensor {unknown[0]!r}, which the learner does not have")
        params = list(learner.parameters())
        key = (tuple(names), tuple((id(p), p._version) for p in params))
        cached = getattr(learner, "_flat_layout", None)
        if cached is None or cached.key != key:
            cached = cls(learner, names, key)
            object.__setattr__(learner, "_flat_layout", cached)
        return cached

    def tensors(self, device, gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(phi, gamma * alpha) on ``device``, each computed once."""
        key = (str(device), float(gamma))
        if key not in self._on:
            phi, alpha = self._phi.to(device), self._alpha.to(device)
            self._on[key] = (phi, alpha if gamma == 1.0 else alpha * gamma)
        return self._on[key]

    def row(self, row) -> np.ndarray:
        """A gradient row (name -> array) as one flat float32 vector in ``names`` order: the
        decoded buffer itself for a bank row in this order (``GradientRow``), else a copy."""
        buf = getattr(row, "flat", None)
        if buf is not None and row.names == self.names:
            return buf
        return np.concatenate([np.asarray(row[n], dtype=np.float32).reshape(-1) for n in self.names])


class GradientRow(dict):
    """One document's decoded gradient: name -> array; ``flat`` is the whole row (float32, in
    ``names`` order) that the arrays are views of, when it came from a bank (else None)."""

    def __init__(self, names: Sequence[str], arrays: Sequence[np.ndarray]):
        super().__init__(zip(names, arrays))
        self.names = list(names)
        self.flat = getattr(arrays, "flat", None)  # bank_format.blob.DecodedRow's buffer


def _batch_adapter(learner, group: list[Row]):
    """The side-path state for one generation call over ``group``."""
    kinds = [MODES[r.req.mode].adapter for r in group]
    if all(k == "base" for k in kinds):
        return "off"
    if len(group) == 1:
        return group[0].adapter if kinds[0] == "step" else None
    if all(k == "phi" or (k == "step" and r.adapter is None) for r, k in zip(group, kinds)):
        return None  # every row on phi itself: the plain 2-D side path, no stack
    phi = {n: p.detach() for n, p in learner.phi_dict().items()}
    per_row = []
    for r, k in zip(group, kinds):
        if k == "step" and r.adapter is not None:
            per_row.append(r.adapter)
        elif k == "base":
            # Zero A and B: the side path adds exactly 0, i.e. the bare base model.
            per_row.append({n: torch.zeros_like(p) for n, p in phi.items()})
        else:
            per_row.append(phi)
    return adapt.stack_rows(per_row)


class MemoryCorpus:
    """A Corpus held in memory: ids, texts, unit embeddings [n, d] (or None) and decoded
    gradient rows. Meta-training's dev check answers through it; dense retrieval only."""

    def __init__(self, ids: Sequence[str], texts: Sequence[str], embeddings, gradients: dict,
                 compute=None):
        # ``compute(ids) -> {id: {name: array}}`` fills missing rows on demand (then cached).
        self._compute = compute
        self.ids = list(ids)
        self._text = dict(zip(self.ids, texts))
        self._row = {d: i for i, d in enumerate(self.ids)}
        self.emb = None if embeddings is None else np.asarray(embeddings, dtype=np.float32)
        self._grads = gradients
        first = next(iter(gradients.values()), {})
        self.layout = list(first)

    def search(self, question: str, qvec, k: int, retriever: str = "dense",
               gradients: bool = True) -> list[Retrieved]:
        if retriever != "dense":
            raise RegradError(f"retriever: an in-memory corpus supports dense retrieval only, not {retriever!r}")
        if self.emb is None:
            raise RegradError("this corpus has no embeddings: give the documents explicitly")
        if k <= 0:
            return []
        scores = self.emb @ np.asarray(qvec, dtype=np.float32)
        top = np.argsort(-scores, kind="stable")[:k]
        return [Retrieved(self.ids[j], float(scores[j]), "", float(scores[j])) for j in top]

    def cosines(self, qvec, ids: Sequence[str]) -> dict[str, float]:
        if self.emb is None:
            return {d: 0.0 for d in ids if d in self._row}
        q = np.asarray(qvec, dtype=np.float32)
        return {d: float(self.emb[self._row[d]] @ q) for d in ids if d in self._row}

    def texts(self, ids: Sequence[str]) -> dict[str, str]:
        return {d: self._text[d] for d in ids if d in self._text}

    def sources(self, ids: Sequence[str]) -> dict[str, str]:
        return {d: "" for d in ids if d in self._text}

    def gradients(self, ids: Sequence[str]):
        missing = [d for d in ids if d not in self._grads and d in self._text]
        if missing and self._compute is not None:
            self._grads.update(self._compute(missing))
        return ({d: self._grads[d] for d in ids if d in self._grads},
                {d: "no gradient row" for d in ids if d not in self._grads})
