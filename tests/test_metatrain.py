"""Meta-training on a tiny model: the objective, its second-order gradient, resume, datasets."""

import json
import random

import pytest
import numpy as np
import torch

from regrad_cli.errors import DatasetError
from regrad_cli.learning.datasets import QAItem, load_dataset
from regrad_cli.learner.lora import Learner
from regrad_cli.learning.metatrain import BatchEntry, MetaTrainConfig, build_pool, documents_for, meta_train, outer_loss

from conftest import FakeEmbedder, FakeTokenizer, make_tiny_llama, require_shared_data

DOCS = [
    "zarn the river flows past kelb mill every spring",
    "the moth vesper has blue wings and lives in dunmoor",
    "tollvane cheese is aged in caves for nine months",
    "the engine was built by pryde in the year of rain",
]
ITEMS = [
    QAItem("q0", "where does zarn flow", ["kelb mill"], [DOCS[0]]),
    QAItem("q1", "what colour are vesper wings", ["blue"], [DOCS[1]]),
    QAItem("q2", "where is tollvane aged", ["caves"], [DOCS[2]]),
    QAItem("q3", "who built the engine", ["pryde"], [DOCS[3]]),
]


def _setup(seed=0, **cfg_kw):
    model = make_tiny_llama(seed=0)
    tok = FakeTokenizer()
    learner = Learner.for_model(model).init_(seed=seed, b_std=0.05, alpha_init=0.5).attach(model)
    cfg = MetaTrainConfig(k=2, max_doc_tokens=64, **cfg_kw)
    pool = build_pool("toy", ITEMS, FakeEmbedder())
    rng = random.Random(0)
    batch = []
    for it in ITEMS:
        docs = documents_for(it, pool, cfg.k, rng)
        batch.append(BatchEntry(it, docs, pool.scores(it, docs)))
    return model, tok, learner, cfg, batch


def _params(learner):
    return [learner.phi[k] for k in learner.phi.keys()] + [learner.log_alpha[k] for k in learner.log_alpha.keys()]


def test_documents_include_gold_plus_distractors():
    _, _, _, cfg, batch = _setup()
    for e in batch:
        assert len(e.documents) == cfg.k and e.item.documents[0] in e.documents and len(e.scores) == cfg.k


@pytest.mark.parametrize("combine", ["sum", "score"])
def test_meta_step_lowers_outer_loss(combine):
    model, tok, learner, cfg, batch = _setup(combine=combine)
    params = _params(learner) + [learner.log_temp]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.05)
    before, _ = outer_loss(model, tok, learner, batch, cfg)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after, _ = outer_loss(model, tok, learner, batch, cfg)
    assert after.item() < before.item()


def test_second_order_gradient_matches_finite_difference():
    torch.set_default_dtype(torch.float64)
    try:
        # Exact fp32 inner gradients: the codec's rounding is not differentiable (the training
        # default passes it straight through), so a finite difference would measure its steps.
        model, tok, learner, cfg, batch = _setup(combine="sum", codec=None, norm="none")
        model.double()
        learner.double()
        learner.use(None)
        params = _params(learner)
        for p in params:
            p.requires_grad_(True)
        loss, _ = outer_loss(model, tok, learner, batch[:2], cfg)
        grads = torch.autograd.grad(loss, params)
        # Directional derivative along a random direction vs a central difference.
        gen = torch.Generator().manual_seed(0)
        dirs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        analytic = sum((g * d).sum() for g, d in zip(grads, dirs)).item()
        # The model's attention softmax runs in float32 even in a float64 model: steps much
        # below 1e-3 would measure rounding noise, not the derivative.
        eps = 1e-3
        with torch.no_grad():
            for p, d in zip(params, dirs):
                p.add_(eps * d)
        plus = outer_loss(model, tok, learner, batch[:2], cfg)[0].item()
        with torch.no_grad():
            for p, d in zip(params, dirs):
                p.sub_(2 * eps * d)
        minus = outer_loss(model, tok, learner, batch[:2], cfg)[0].item()
        numeric = (plus - minus) / (2 * eps)
        assert analytic == pytest.approx(numeric, rel=2e-3)
        # The first-order approximation drops the d g / d phi term: it must be visibly worse.
        with torch.no_grad():
            for p, d in zip(params, dirs):
                p.add_(eps * d)
        cfg.first_order = True
        loss_fo, _ = outer_loss(model, tok, learner, batch[:2], cfg)
        fo = torch.autograd.grad(loss_fo, params)
        first_order = sum((g * d).sum() for g, d in zip(fo, dirs)).item()
        assert abs(first_order - numeric) > 10 * abs(analytic - numeric)
    finally:
        torch.set_default_dtype(torch.float32)


def _write_jsonl(path):
    with open(path, "w") as fh:
        for it in ITEMS * 3:
            fh.write(json.dumps({"id": it.id + str(random.random()), "question": it.question,
                                 "answers": it.answers, "documents": it.documents}) + "\n")
    return path


def _run(tmp_path, out, steps, resume=False, stop_after=None):
    model = make_tiny_llama(seed=0)
    data = _write_jsonl(tmp_path / "d.jsonl") if not (tmp_path / "d.jsonl").exists() else tmp_path / "d.jsonl"
    cfg = MetaTrainConfig(train=[f"jsonl:{data}"], dev=[f"jsonl:{data}"], out=str(out), k=2, steps=steps,
                          meta_batch=2, eval_every=2, dev_limit=4, max_new_tokens=4, max_doc_tokens=48,
                          b_std=0.05)
    if stop_after is not None:
        cfg.steps = steps

        class Stop(Exception):
            pass

        def progress(step, total, rec):
            if step == stop_after:
                raise Stop

        with pytest.raises(Stop):
            meta_train(cfg, model, FakeTokenizer(), FakeEmbedder(), progress=progress)
        return None
    meta_train(cfg, model, FakeTokenizer(), FakeEmbedder(), resume=resume)
    return Learner.load(out / "last")


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(tmp_path):
    straight = _run(tmp_path, tmp_path / "a", steps=4)
    # Interrupted after step 3: state.pt holds step 2 (saved every 2 steps); resume to 4.
    _run(tmp_path, tmp_path / "b", steps=4, stop_after=3)
    resumed = _run(tmp_path, tmp_path / "b", steps=4, resume=True)
    for n in straight.names:
        torch.testing.assert_close(straight.tensor(n), resumed.tensor(n), rtol=0, atol=1e-6)
        torch.testing.assert_close(straight.alpha(n), resumed.alpha(n), rtol=0, atol=1e-6)
    assert (tmp_path / "a" / "log.json").exists() and (tmp_path / "a" / "best" / "learner.json").exists()
    assert (tmp_path / "a" / "curves.png").exists()
    # The tensors a bank stores were measured at the end of training and recorded.
    rec = json.loads((tmp_path / "a" / "best" / "learner.json").read_text())["stored_tensors"]
    assert set(rec["energy"]) == set(straight.names) and abs(sum(rec["energy"].values()) - 1) < 1e-6


@pytest.mark.slow
def test_resume_with_other_options_records_the_change_and_restarts_selection(tmp_path):
    """A long run resumed with another mix keeps the record of what changed at which step, and a
    changed dev check restarts the best-by-dev selection (scores on two dev sets do not compare)."""
    model = make_tiny_llama(seed=0)
    data = _write_jsonl(tmp_path / "d.jsonl")
    base = dict(dev=[f"jsonl:{data}"], out=str(tmp_path / "run"), k=2, meta_batch=2, eval_every=2,
                dev_limit=4, max_new_tokens=4, max_doc_tokens=48, b_std=0.05)
    meta_train(MetaTrainConfig(train=[f"jsonl:{data}"], steps=2, **base), model, FakeTokenizer(), FakeEmbedder())
    log1 = json.loads((tmp_path / "run" / "log.json").read_text())
    assert "config_changes" not in log1 and log1["config"]["mix_weights"] is None
    cfg2 = MetaTrainConfig(train=[f"jsonl:{data}", f"jsonl:{data}@all:3"], mix_weights=[1.0, 3.0],
                           steps=4, **{**base, "dev_limit": 2})
    meta_train(cfg2, make_tiny_llama(seed=0), FakeTokenizer(), FakeEmbedder(), resume=True)
    log2 = json.loads((tmp_path / "run" / "log.json").read_text())
    (change,) = log2["config_changes"]
    assert change["step"] == 2
    assert change["changed"]["mix_weights"] == [None, [1.0, 3.0]]
    assert change["changed"]["train"] == [[f"jsonl:{data}"], [f"jsonl:{data}", f"jsonl:{data}@all:3"]]
    assert change["changed"]["dev_limit"] == [4, 2] and change["changed"]["steps"] == [2, 4]
    assert set(change["pools"]) == set(cfg2.train) and change["pools"][f"jsonl:{data}@all:3"]["questions"] == 3
    assert log2["config"]["mix_weights"] == [1.0, 3.0] and [r["step"] for r in log2["train"]] == [1, 2, 3, 4]
    # The dev check changed, so the best checkpoint is the first check after the change (step 4),
    # not step 2's under the old check.
    best = json.loads((tmp_path / "run" / "best" / "learner.json").read_text())
    assert best["trained"]["step"] == 4


def test_a_split_subset_is_fixed_whatever_the_file_order(tmp_path):
    rows = [{"id": f"item-{i}", "question": f"q{i}?", "answers": [f"a{i}"], "documents": [f"doc {i}."]} for i in range(40)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    train = load_dataset(f"jsonl:{a}@train")
    sub_a, sub_b = load_dataset(f"jsonl:{a}@train:5"), load_dataset(f"jsonl:{b}@train:5")
    assert len(sub_a) == 5 and {i.id for i in sub_a} == {i.id for i in sub_b}
    assert {i.id for i in sub_a} <= {i.id for i in train}
    # In the file's order, and the whole split when N is larger than it.
    assert [i.id for i in sub_a] == [i.id for i in train if i.id in {j.id for j in sub_a}]
    assert [i.id for i in load_dataset(f"jsonl:{a}@train:1000")] == [i.id for i in train]
    for bad in ("@train:0", "@train:x", "@dev:-1"):
        with pytest.raises(DatasetError, match="positive whole number"):
            load_dataset(f"jsonl:{a}{bad}")


def test_shared_dataset_adapters_parse():
    data = require_shared_data()
    nq_train = load_dataset(f"nq-open:{data}/nq_open/nq-open-oracle.jsonl.gz@train")
    nq_dev = load_dataset(f"nq-open:{data}/nq_open/nq-open-oracle.jsonl.gz@dev")
    assert len(nq_train) + len(nq_dev) == 1710
    assert not {i.id for i in nq_train} & {i.id for i in nq_dev}
    assert all(i.answers and i.documents for i in nq_dev)
    pub = load_dataset(f"pubmedqa:{data}/pubmedqa/ori_pqal.json")
    assert len(pub) == 500 and {i.answers[0] for i in pub} <= {"yes", "no", "maybe"}
    fic_train = load_dataset(f"fictional:{data}/fictional_knowledge/fictional_knowledge.json@train")
    fic_dev = load_dataset(f"fictional:{data}/fictional_knowledge/fictional_knowledge.json@dev")
    assert fic_dev and fic_train
    assert not {i.documents[0] for i in fic_train} & {i.documents[0] for i in fic_dev}
    auto = load_dataset(f"auto:{data}/nq_open/nq-open-oracle.jsonl.gz")
    assert len(auto) == 1710


def test_fake_quantisation_matches_the_bank_codec_and_passes_gradients_through():
    from bank_format.codecs import decode_values, encode_values
    from regrad_cli.learning.metatrain import fake_quantise

    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(3, 8, 100, generator=gen) * torch.logspace(-4, 1, 100)).requires_grad_(True)
    q = fake_quantise({"t": g}, "int4", 64)["t"]
    for i in range(3):
        arr = g[i].detach().numpy()
        ref = decode_values(b"".join(encode_values(arr, "int4", 64)), 0, arr.shape, "int4", 64)
        np.testing.assert_allclose(q[i].detach().numpy(), ref, rtol=1e-6, atol=1e-12)
    assert not torch.equal(q.detach(), g.detach())
    (q * 3.0).sum().backward()
    assert torch.equal(g.grad, torch.full_like(g, 3.0))


def test_training_retrieval_is_the_query_retrievers_top_k():
    pool = build_pool("toy", ITEMS, FakeEmbedder())
    rng = random.Random(0)
    for it in ITEMS:
        docs = documents_for(it, pool, 2, rng, "retrieved")
        q = pool.q_emb[it.id]
        best = sorted(pool.corpus, key=lambda d: -float(pool.doc_emb[pool.index[d]] @ q))[:2]
        assert docs == best
    assert 0.0 <= pool.recall(2) <= 1.0


def test_key_map_trains_first_order_with_phi_frozen(tmp_path):
    """--transform-lr: the document key map learns from the answer loss (first order, phi fixed
    with --freeze-phi); a learner without a map is refused, and so is second order."""
    from regrad_cli.errors import RegradError
    from regrad_cli.learner.transform import KeyMap

    model = make_tiny_llama(seed=0)
    data = _write_jsonl(tmp_path / "d.jsonl")
    learner = Learner.for_model(model).init_(seed=0, b_std=0.05, alpha_init=0.5)
    kw = dict(train=[f"jsonl:{data}"], out=str(tmp_path / "plain"), k=2, steps=2, meta_batch=2,
              eval_every=10, max_doc_tokens=48, first_order=True, transform_lr=1e-2, freeze_phi=True,
              energy_docs=0)
    with pytest.raises(RegradError, match="has none"):
        meta_train(MetaTrainConfig(**kw), model, FakeTokenizer(), FakeEmbedder(), learner=learner.attach(model))
    learner.transform = KeyMap.identity(learner)
    with pytest.raises(RegradError, match="first order"):
        meta_train(MetaTrainConfig(**{**kw, "first_order": False, "out": str(tmp_path / "so")}), model,
                   FakeTokenizer(), FakeEmbedder(), learner=learner)
    before = {n: t.detach().clone() for n, t in learner.transform.tensors().items()}
    phi_before = {n: learner.tensor(n).detach().clone() for n in learner.names}
    meta_train(MetaTrainConfig(**{**kw, "out": str(tmp_path / "km")}), model, FakeTokenizer(), FakeEmbedder(),
               learner=learner)
    with pytest.raises(RegradError, match="freeze-phi"):
        meta_train(MetaTrainConfig(**{**kw, "freeze_phi": False, "factor_cache_gb": 1.0, "out": str(tmp_path / "fc0")}),
                   model, FakeTokenizer(), FakeEmbedder(), learner=learner)
    # With phi frozen the documents' factors are cached and reused across steps.
    fresh = make_tiny_llama(seed=0)
    meta_train(MetaTrainConfig(**{**kw, "steps": 3, "factor_cache_gb": 1.0, "out": str(tmp_path / "fc")}), fresh,
               FakeTokenizer(), FakeEmbedder(), learner=Learner.load(tmp_path / "km" / "last").attach(fresh))
    log = json.loads((tmp_path / "fc" / "log.json").read_text())["train"]
    assert log[-1]["factor_cache"]["hits"] > 0 and log[-1]["factor_cache"]["docs"] >= 1
    trained = Learner.load(tmp_path / "km" / "last")
    after = trained.transform.tensors()
    assert any(not torch.equal(before[n], after[n]) for n in before)
    for n in trained.names:
        assert torch.equal(trained.tensor(n), phi_before[n])


def test_state_is_saved_by_time_between_dev_checks(tmp_path):
    """--save-every-s: a long run between two dev checks still writes state.pt (at most that many
    seconds of work are lost when it is stopped)."""
    model = make_tiny_llama(seed=0)
    data = _write_jsonl(tmp_path / "d.jsonl")
    cfg = MetaTrainConfig(train=[f"jsonl:{data}"], out=str(tmp_path / "run"), k=2, steps=3, meta_batch=2,
                          eval_every=100, save_every_s=1e-6, max_doc_tokens=48, b_std=0.05, energy_docs=0)
    seen = {}

    def progress(step, total, rec):
        state = tmp_path / "run" / "state.pt"
        seen[step] = torch.load(state, weights_only=True)["step"] if state.exists() else None

    meta_train(cfg, model, FakeTokenizer(), FakeEmbedder(), progress=progress)
    # Before step 2's own save, the file already holds step 1, saved by time, not by a dev check.
    assert seen == {1: None, 2: 1, 3: 2}


def test_outer_loss_groups_answers_by_length_with_each_questions_own_step(monkeypatch):
    """The answer pass runs length groups, each with its rows' slice of the per-question adapted
    weights: the loss and its gradient equal those of one batch (groups forced to single rows)."""
    import regrad_cli.lm.generation as generation

    model, tok, learner, cfg, batch = _setup()
    # Rows 0 and 2 see their passages: longer prompts than rows 1 and 3.
    batch = [BatchEntry(e.item, e.documents, e.scores, with_context=i % 2 == 0) for i, e in enumerate(batch)]
    params = _params(learner)
    for p in params:
        p.requires_grad_(True)
    results = []
    for groups in (lambda lengths, **kw: [list(range(len(lengths)))], lambda lengths, **kw: [[i] for i in range(len(lengths))]):
        monkeypatch.setattr(generation, "length_groups", groups)
        loss, _ = outer_loss(model, tok, learner, batch, cfg)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
