"""Injection bounds: what ONE step in LoRA space can put into an answer, by where its direction
comes from. No meta-training; every figure is the learner as it is (shipped or untrained init).

For each dev question the adapter becomes phi' = phi - gamma * c * u / ||u||, u = alpha (.) g
(the learner's own step sizes times a direction g), c = the mean norm of the plain document step
alpha (.) g_doc / ||g_doc|| (so gamma = 1 is the usual step size of every method). Directions g:

- ``doc``        the gold document's gradient under the learner's own document loss, what its
                 bank stores (the paper's next-token loss for every learner that records none);
- ``doc-LOSS``   the same under document loss LOSS (``regrad_cli/learner/doc_loss.py``: plain,
                 salient, augmented, distill), computed by the product (``grouped_gradients``
                 with the learner's ``doc_loss`` set): what a bank of such a learner would store;
- ``probe-kd``   the name this script gave context distillation: now ``doc-distill`` (probes
                 built from the document alone, target = the model with the document in
                 context); result files written before are from the script's own earlier copy;
- ``salient``    exploratory, not a product loss: the next-token loss on salient target tokens
                 only (a token whose text starts with a digit or a capital), every other token
                 weighted 0 (``doc-salient`` weights salient spans 4x and keeps the rest);
- ``qa``         the gold question -> answer loss itself: what one step can do at best;
- ``qa-doc``     the sum of the QA gradients of every question about the same document (one
                 stored step per document, built from the questions: an upper bound too);
- ``doc`` with ``--checkpoint DIR`` of a learner with a document key map (``regrad learner
                 fit-keymap``): what that learner's bank stores, the transformed gradient;
- ``nstep-N``    PRAG-style: N Adam steps (lr 1e-3) of the document's next-token loss, the
                 direction is minus the delta.

Each over gamma in 1/8..16, chosen by mean answer NLL on the same questions (an oracle choice: a
bound, not a result), then greedy F1 (16 tokens) at that gamma. Tensors: every A and B ("AB") or
B only ("B"). Reference rows: no step (closed-book + phi) and the gold document in context
(rag + phi). Writes docs/benchmarks/injection_bounds*.json.

    python benchmarks/injection_bounds.py --checkpoint bundled --dataset synthetic --out docs/benchmarks/injection_bounds.json
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from pathlib import Path

from _common import emit, log, parser, print_table, setup

GAMMAS = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
_SALIENT = re.compile(r"^\s*([0-9]|[A-Z])")


def load_items(name: str, n: int, fictional_path: Path):
    """[(question item, document text)], questions grouped by document, dev data only."""
    from regrad_cli.learning import synthetic
    from regrad_cli.learning.datasets import load_dataset

    if name == "synthetic":
        items = synthetic.generate(11, 12)  # seed 11: disjoint from every training seed
        return items[:n]
    # Fictional dev: 240 probes over 45 documents, grouped by document; every k-th probe, so that
    # n questions cover as many documents as the stride allows (the first n would cover 4).
    items = load_dataset(f"fictional:{fictional_path}@dev")
    stride = max(1, len(items) // n)
    return items[::stride][:n]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="bundled", help="'bundled', 'init' or a checkpoint directory")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "fictional"])
    p.add_argument("--n", type=int, default=60, help="dev questions")
    p.add_argument("--methods", default="none,rag,doc,doc-salient,doc-augmented,doc-distill,qa,qa-doc,nstep-1,nstep-4,nstep-16")
    p.add_argument("--tensors", default="AB,B")
    p.add_argument("--max-doc-tokens", type=int, default=384)
    p.add_argument("--fictional", type=Path,
                   default=Path(__file__).resolve().parents[2] / "shared/data/fictional_knowledge/fictional_knowledge.json")
    args = p.parse_args()
    setup(args)

    import torch

    from _common import load_engine
    from regrad_cli.learner import adapt
    from regrad_cli.learner.gradients import grouped_gradients
    from regrad_cli.learning.scores import f1_score
    from regrad_cli.lm.generation import answer_nll, generate
    from regrad_cli.lm.prompting import prompt_ids
    from regrad_cli.lm.tokens import encode_documents, per_sample_nll

    engine = load_engine(None if args.checkpoint == "bundled" else args.checkpoint)
    model, tok, learner = engine.model, engine.tokenizer, engine.learner
    model.eval()
    for q in learner.parameters():
        q.requires_grad_(False)
    phi = {n: t.detach() for n, t in learner.phi_dict().items()}
    alpha = {n: learner.alpha(n).detach() for n in learner.names}
    names = learner.names

    items = load_items(args.dataset, args.n, args.fictional)
    docs = list(OrderedDict.fromkeys(it.documents[0] for it in items))
    doc_of = [docs.index(it.documents[0]) for it in items]
    prompts = [prompt_ids(tok, it.question, kind=it.kind) for it in items]
    golds = [it.answers for it in items]
    answers = [it.answers[0] for it in items]
    log(f"{args.dataset}: {len(items)} questions over {len(docs)} documents; learner {args.checkpoint}")

    def grad_of(loss_fn) -> dict:
        base = {n: t.clone().requires_grad_(True) for n, t in phi.items()}
        with torch.enable_grad(), learner.using(base):
            loss = loss_fn()
            gs = torch.autograd.grad(loss, list(base.values()), allow_unused=True)
        return {n: (g if g is not None else torch.zeros_like(phi[n])).detach() for n, g in zip(names, gs)}

    def ntp_loss(text: str, salient: bool = False):
        enc = encode_documents(tok, [text], args.max_doc_tokens)
        tmask = None
        if salient:
            toks = tok.convert_ids_to_tokens(enc.input_ids[0].tolist())
            flags = [1 if _SALIENT.match(tok.convert_tokens_to_string([t]) or "") else 0 for t in toks]
            flags[0] = 0
            tmask = torch.tensor([flags]) * enc.attention_mask
        return per_sample_nll(model, enc.input_ids, enc.attention_mask, tmask).sum()

    def nstep(text: str, n: int, which: str) -> dict:
        cur = {k: v.clone().requires_grad_(which == "AB" or k.endswith(".B")) for k, v in phi.items()}
        opt = torch.optim.Adam([v for v in cur.values() if v.requires_grad], lr=1e-3)
        for _ in range(n):
            opt.zero_grad()
            with torch.enable_grad(), learner.using(cur):
                ntp_loss(text).backward()
            opt.step()
        return {k: (phi[k] - v.detach()) / alpha[k] for k, v in cur.items()}  # alpha (.) g = -delta

    # ---- evaluation -----------------------------------------------------------------------
    def unit_step(g: dict, which: str) -> dict:
        u = {k: alpha[k] * g[k] for k in names if which == "AB" or k.endswith(".B")}
        nrm = math.sqrt(sum(float(v.pow(2).sum()) for v in u.values())) + 1e-12
        return {k: v / nrm for k, v in u.items()}

    def stacked(units: list[dict], gamma: float, c: float) -> dict:
        return {k: torch.stack([phi[k] - gamma * c * u[k] if k in u else phi[k] for u in units]) for k in names}

    def nll_of(state, rows=None) -> list[float]:
        out = []
        for i in range(0, len(prompts), 20):
            sl = slice(i, i + 20)
            st = None if state is None else {k: v[sl] for k, v in state.items()}
            with torch.no_grad(), learner.using(st):
                out += answer_nll(model, tok, prompts[sl], answers[sl]).tolist()
        return out

    def f1_of(state, ps=None) -> tuple[list[str], list[float]]:
        ps = ps or prompts
        preds = []
        for i in range(0, len(ps), 30):
            sl = slice(i, i + 30)
            if state is None:
                with learner.using(phi):
                    preds += generate(model, tok, ps[sl], 16)
            else:
                st = {k: v[sl] for k, v in state.items()}
                learner.use(st)
                try:
                    preds += generate(model, tok, ps[sl], 16,
                                      on_rows=lambda rows, st=st: learner.use(adapt.select_rows(st, rows)))
                finally:
                    learner.use(None)
        return preds, [f1_score(p, g) for p, g in zip(preds, golds)]

    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    def doc_gradient(text: str, loss: str | None = None) -> dict:
        """What build-bank stores for the document: grouped_gradients under the learner's document
        loss, or under ``loss`` (a learner with a key map gives its transformed gradient)."""
        saved = dict(learner.meta)
        if loss is not None:
            learner.doc_loss = loss
        try:
            enc = encode_documents(tok, [text], args.max_doc_tokens)
            g, _ = grouped_gradients(model, learner, enc)
        finally:
            learner.meta = saved
        return {n: t[0].detach() for n, t in g.items()}

    plain = [doc_gradient(d) for d in docs]
    c = mean([math.sqrt(sum(float((alpha[k] * g[k]).pow(2).sum()) for k in names))
              / math.sqrt(sum(float(g[k].pow(2).sum()) for k in names)) for g in plain])
    rows, results = [], {}

    def record(key: str, per_q: list[dict] | None, which: str, secs: float) -> None:
        if per_q is None:
            nll = nll_of(None) if key == "none" else None
            if key == "rag":
                ps = [prompt_ids(tok, it.question, [d], kind=it.kind) for it, d in zip(items, (docs[j] for j in doc_of))]
                with torch.no_grad(), learner.using(phi):
                    nll = []
                    for i in range(0, len(ps), 10):
                        nll += answer_nll(model, tok, ps[i:i + 10], answers[i:i + 10]).tolist()
                preds, f1 = f1_of(None, ps)
            else:
                preds, f1 = f1_of(None)
            res = {"nll": mean(nll), "f1": mean(f1), "gamma": None, "per_question_f1": f1, "predictions": preds}
        else:
            units = [unit_step(g, which) for g in per_q]
            sweep = {}
            for gm in GAMMAS:
                sweep[gm] = mean(nll_of(stacked(units, gm, c)))
            best = min(sweep, key=sweep.get)
            preds, f1 = f1_of(stacked(units, best, c))
            res = {"nll": sweep[best], "f1": mean(f1), "gamma": best, "nll_by_gamma": sweep,
                   "per_question_f1": f1, "predictions": preds, "direction_seconds": round(secs, 1)}
        results[key] = res
        rows.append([key, res["gamma"], round(res["nll"], 3), round(res["f1"], 3)])
        log(f"{key}: gamma {res['gamma']} nll {res['nll']:.3f} f1 {res['f1']:.3f}")

    wanted = ["doc-distill" if m == "probe-kd" else m for m in args.methods.split(",")]
    tensor_sets = args.tensors.split(",")
    for m in wanted:
        t0 = time.time()
        if m in ("none", "rag"):
            record(m, None, "AB", 0.0)
            continue
        for which in tensor_sets:
            t0 = time.time()
            if m == "doc":
                per_q = [plain[j] for j in doc_of]
            elif m == "salient":
                per_doc = [grad_of(lambda d=d: ntp_loss(d, salient=True)) for d in docs]
                per_q = [per_doc[j] for j in doc_of]
            elif m == "qa":
                per_q = [grad_of(lambda i=i: answer_nll(model, tok, [prompts[i]], [answers[i]]).sum())
                         for i in range(len(items))]
            elif m == "qa-doc":
                qa = [grad_of(lambda i=i: answer_nll(model, tok, [prompts[i]], [answers[i]]).sum())
                      for i in range(len(items))]
                sums = {}
                for i, j in enumerate(doc_of):
                    sums[j] = qa[i] if j not in sums else {k: sums[j][k] + qa[i][k] for k in names}
                per_q = [sums[j] for j in doc_of]
            elif m.startswith("doc-"):
                per_doc = [doc_gradient(d, m.removeprefix("doc-")) for d in docs]
                per_q = [per_doc[j] for j in doc_of]
            elif m.startswith("nstep-"):
                n = int(m.split("-")[1])
                per_doc = [nstep(d, n, which) for d in docs]
                per_q = [per_doc[j] for j in doc_of]
            else:
                raise SystemExit(f"unknown method {m}")
            record(f"{m}/{which}", per_q, which, time.time() - t0)

    print_table(f"injection bounds: {args.dataset}, learner {args.checkpoint}",
                ["direction/tensors", "best gamma", "answer NLL", "F1"], rows)
    emit({"dataset": args.dataset, "checkpoint": args.checkpoint, "questions": len(items),
          "documents": len(docs), "step_norm_c": c, "gammas": GAMMAS, "results": results},
         args.out, args, "injection_bounds")


if __name__ == "__main__":
    main()
