"""The document key map (regrad_cli/learner/transform.py): the identity map is the plain gradient,
the meta-gradient of the map is first order and matches finite differences, gradient matching
recovers a known map exactly, and a learner with a map saves, loads and identifies itself."""

from __future__ import annotations

import pytest
import torch

from regrad_cli.errors import RegradError
from regrad_cli.learner import adapt
from regrad_cli.learner.gradients import grouped_gradients
from regrad_cli.learner.lora import Learner
from regrad_cli.learner.transform import GradientMatch, KeyMap, capture_factors
from regrad_cli.lm.generation import answer_nll
from regrad_cli.lm.tokens import encode_documents, per_sample_nll

from conftest import FakeTokenizer, make_tiny_llama

TEXTS = ["the cat sat on the mat", "a quick brown fox jumps", "zebras graze at dawn by the lake"]


def _setup(dtype=torch.float64):
    model = make_tiny_llama(seed=0).to(dtype)
    learner = Learner.for_model(model).init_(seed=1, b_std=0.05, alpha_init=0.5).to(dtype)
    learner.attach(model)
    return model, learner, FakeTokenizer()


def test_identity_map_is_the_plain_gradient():
    model, learner, tok = _setup()
    docs = encode_documents(tok, TEXTS)
    plain, plain_loss = grouped_gradients(model, learner, docs)
    learner.transform = KeyMap.identity(learner).to(torch.float64)
    mapped, mapped_loss = grouped_gradients(model, learner, docs)
    assert torch.allclose(plain_loss, mapped_loss)
    for n in learner.names:
        assert torch.allclose(plain[n], mapped[n], atol=1e-10, rtol=1e-8), n
    # Groups: per-group sums, as the plain path gives them.
    g_mapped, _ = grouped_gradients(model, learner, docs, [0, 1, 0], 2)
    learner.transform = None
    g_ref, _ = grouped_gradients(model, learner, docs, [0, 1, 0], 2)
    for n in learner.names:
        assert torch.allclose(g_mapped[n], g_ref[n], atol=1e-10, rtol=1e-8)


def test_a_learned_map_changes_the_gradient_and_refuses_second_order():
    model, learner, tok = _setup()
    docs = encode_documents(tok, TEXTS[:2])
    plain, _ = grouped_gradients(model, learner, docs)
    learner.transform = KeyMap.identity(learner).to(torch.float64)
    with torch.no_grad():
        for p in learner.transform.parameters():
            p.mul_(1.5)
    mapped, _ = grouped_gradients(model, learner, docs)
    for n in learner.names:
        assert torch.allclose(mapped[n], 1.5 * plain[n], atol=1e-10, rtol=1e-8)  # linear in K and V
    with pytest.raises(RegradError, match="first order"):
        grouped_gradients(model, learner, docs, create_graph=True)


def _central_difference(p, idx, eps: float, loss) -> float:
    """(loss(p[idx] + eps) - loss(p[idx] - eps)) / (2 eps), p[idx] restored afterwards."""
    with torch.no_grad():
        old = p[idx].item()
        p[idx] = old + eps
        up = loss()
        p[idx] = old - eps
        down = loss()
        p[idx] = old
    return (up - down) / (2 * eps)


def _outer(model, learner, tok, docs):
    """The meta-training outer loss of one question after one step on the documents' gradients."""
    grads, _ = grouped_gradients(model, learner, docs)
    w = torch.ones(grads[learner.names[0]].shape[0], dtype=torch.float64)
    step = adapt.step(learner.phi_dict(), learner.alpha_dict(), adapt.combine(grads, w, norm="doc"),
                      differentiable=True)
    with learner.using(step):
        return answer_nll(model, tok, [tok("question about cats").input_ids], ["mat"]).sum()


def test_meta_gradient_of_the_map_matches_finite_differences():
    model, learner, tok = _setup()
    km = KeyMap.identity(learner).to(torch.float64)
    learner.transform = km
    docs = encode_documents(tok, TEXTS[:2])
    with torch.enable_grad():
        loss = _outer(model, learner, tok, docs)
        params = [km.K[k] for k in km.K] + [km.V[k] for k in km.V]
        grads = torch.autograd.grad(loss, params)
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for p, g in zip(params, grads):
        for _ in range(2):
            idx = tuple(int(torch.randint(s, (1,), generator=gen)) for s in p.shape)
            # Part of the tiny model's forward runs in float32 (noise ~1e-9 on the loss): a step
            # of 3e-2 keeps the central difference far above that noise (its own error is
            # O(eps^2), measured below 1e-4 relative here).
            eps = 3e-2
            fd = _central_difference(p, idx, eps, lambda: _outer(model, learner, tok, docs).item())
            assert g[idx].item() == pytest.approx(fd, rel=2e-3, abs=2e-3 * float(g.abs().max()))
            checked += 1
    assert checked == 2 * len(params)
    # The whole gradient along one random direction of every K and V at once.
    dirs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    norm = sum(float(d.pow(2).sum()) for d in dirs) ** 0.5
    dirs = [d / norm for d in dirs]
    eps = 3e-2
    with torch.no_grad():
        for p, d in zip(params, dirs):
            p.add_(eps * d)
        up = _outer(model, learner, tok, docs).item()
        for p, d in zip(params, dirs):
            p.sub_(2 * eps * d)
        down = _outer(model, learner, tok, docs).item()
        for p, d in zip(params, dirs):
            p.add_(eps * d)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, dirs))
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=2e-2)


def test_gradient_matching_recovers_a_known_map():
    model, learner, tok = _setup()
    truth = KeyMap.identity(learner).to(torch.float64)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in truth.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    fit = GradientMatch(learner.spec.scale, dtype=torch.float64)
    texts = TEXTS + ["one two three four five six", "dawn lake cat fox mat", "brown zebras sat quick"] * 3
    for i, text in enumerate(texts):
        docs = encode_documents(tok, [text + f" {i}"])
        ids, mask = docs.input_ids, docs.attention_mask
        factors, _ = capture_factors(model, learner, lambda: per_sample_nll(model, ids, mask))
        target = {n: g[0] for n, g in truth.gradients(factors, learner.spec.scale, learner.names).items()}
        # The predictor is divided by plain_norm and the target by its own norm: with the two
        # equal, the true map fits every document exactly.
        fit.add(factors, target, plain_norm=sum(float(t.pow(2).sum()) for t in target.values()) ** 0.5)
    got = fit.solve(KeyMap.for_learner(learner).to(torch.float64), ridge=1e-10)
    # The fit is over the span the documents reach; its predictions equal the truth's on them.
    docs = encode_documents(tok, ["the fox sat by the lake"])
    factors, _ = capture_factors(model, learner, lambda: per_sample_nll(model, docs.input_ids, docs.attention_mask))
    want = truth.gradients(factors, learner.spec.scale, learner.names)
    pred = got.gradients(factors, learner.spec.scale, learner.names)
    for n in learner.names:
        scale = float(want[n].abs().max())
        assert torch.allclose(pred[n], want[n], atol=1e-4 * scale + 1e-12, rtol=1e-3), n


def test_checkpoint_with_a_map_round_trips_and_changes_its_id(tmp_path):
    model, learner, tok = _setup(torch.float32)
    plain_id = learner.checkpoint_id()
    learner.save(tmp_path / "plain")
    assert Learner.load(tmp_path / "plain").transform is None
    assert Learner.load(tmp_path / "plain").checkpoint_id() == plain_id
    learner.transform = KeyMap.identity(learner)
    with torch.no_grad():
        next(iter(learner.transform.parameters())).add_(0.25)
    mapped_id = learner.checkpoint_id()
    assert mapped_id != plain_id
    learner.save(tmp_path / "mapped")
    back = Learner.load(tmp_path / "mapped")
    assert back.checkpoint_id() == mapped_id
    for n, t in learner.transform.tensors().items():
        assert torch.equal(back.transform.tensors()[n], t.detach())


def test_cli_fit_keymap_writes_a_learner_with_its_map(tmp_path, capsys, monkeypatch):
    import json

    from reliability_helpers import run_cli

    out = tmp_path / "km"
    args = ["learner", "fit-keymap", "--train", "synthetic:1:3", "--model", "fake:llama", "--checkpoint", "init",
            "--docs", "3", "--max-doc-tokens", "48", "--out", out, "--json"]
    code, stdout, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["documents"] == 3 and res["questions"] >= 3 and res["kind"] == "keymap"
    learner = Learner.load(out)
    assert learner.transform is not None and learner.checkpoint_id() == res["checkpoint_id"]
    assert learner.meta["doc_transform"]["train"] == ["synthetic:1:3"]
    # Never over an existing checkpoint, never on the demo questions.
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 1 and "already holds" in err
    code, _, err = run_cli([*args[:3], "demo", *args[4:-3], "--out", tmp_path / "d"], capsys, monkeypatch)
    assert code == 1 and "evaluation set" in err


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2), ("float8", 6e-2)])
def test_factor_cache_gives_the_transformed_gradients(dtype, tol):
    """Cached factors (trimmed to each document's tokens, reused on the next draw) give the
    map's gradients of the same documents computed afresh in one padded batch."""
    from regrad_cli.learner.transform import FactorCache

    model, learner, tok = _setup(torch.float32)
    learner.transform = KeyMap.identity(learner)
    with torch.no_grad():
        for p in learner.transform.parameters():
            p.add_(0.01 * torch.randn_like(p))
    texts = ["alpha beta gamma delta", "one two three four five six seven", "alpha beta gamma delta"]
    enc = encode_documents(tok, texts, 32)
    want, want_loss = grouped_gradients(model, learner, enc)
    cache = FactorCache(1 << 30, dtype=dtype, capture_batch=1)  # one document per capture pass
    nll = lambda i, m: per_sample_nll(model, i, m)  # noqa: E731
    for draw in range(2):  # the first fills the cache (two distinct texts), the second reuses it
        got, loss = cache.gradients(model, learner, texts, enc, nll)
        for n in learner.names:
            torch.testing.assert_close(got[n], want[n], rtol=tol, atol=tol * float(want[n].detach().abs().max()))
        torch.testing.assert_close(loss, want_loss.float(), rtol=1e-5, atol=1e-6)
    assert (cache.misses, cache.hits, len(cache)) == (2, 4, 2)
    # The map's parameters get gradients through cached factors (first order, factors detached).
    got, _ = cache.gradients(model, learner, texts, enc, nll)
    sum(g.sum() for g in got.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.transform.parameters())
    # A budget smaller than one document keeps nothing; a tight one evicts the oldest.
    small = FactorCache(1, dtype=dtype)
    small.gradients(model, learner, texts, enc, nll)
    assert len(small) == 0 and small.bytes == 0


def test_factor_cache_memory_float8_and_shared_inputs():
    """float8 factors take about half the bytes of bfloat16 (per-row scales aside), and an input
    read by several modules (gate and up) is stored once."""
    from regrad_cli.learner.transform import FactorCache

    model, learner, tok = _setup(torch.float32)
    learner.transform = KeyMap.identity(learner)
    texts = ["alpha beta gamma delta", "one two three four five six seven"]
    enc = encode_documents(tok, texts, 32)
    nll = lambda i, m: per_sample_nll(model, i, m)  # noqa: E731
    caches = {dt: FactorCache(1 << 30, dtype=dt) for dt in ("bfloat16", "float8")}
    for c in caches.values():
        c.gradients(model, learner, texts, enc, nll)
    assert caches["float8"].bytes < 0.6 * caches["bfloat16"].bytes
    per, _, size = caches["bfloat16"]._docs[("plain", texts[1])]  # entries are per (document loss, text)
    inputs = {id(x[0]) for x, _ in per.values()}
    mods = [m for m in per if m.endswith(("gate_proj", "up_proj"))]
    assert mods and len(inputs) < len(per)  # gate and up share their stored input
    naive = sum(x[0].numel() * 2 + d[0].numel() * 2 for x, d in per.values())
    assert size < naive
    with pytest.raises(RegradError, match="unknown factor cache dtype"):
        FactorCache(1, dtype="int3")


# Learned per-token weights (KeyMap.enable_token_weights) -----------------------------------------
def _weighted_map(learner, u_scale=0.0, b=0.0, seed=0):
    km = KeyMap.identity(learner).to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(km.K.values()) + list(km.V.values()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    km.enable_token_weights()
    with torch.no_grad():
        for k in km.score_u:
            km.score_u[k].copy_(u_scale * torch.randn(km.score_u[k].shape, generator=gen, dtype=torch.float64))
            km.score_b[k].fill_(b)
    return km


def _without_weights(km):
    import copy

    plain = copy.deepcopy(km)
    plain.score_u.clear()
    plain.score_b.clear()
    assert not plain.token_weights
    return plain


def test_token_weights_at_zero_are_the_unweighted_map():
    model, learner, tok = _setup()
    docs = encode_documents(tok, TEXTS)
    learner.transform = _weighted_map(learner)
    assert learner.transform.token_weights
    weighted, _ = grouped_gradients(model, learner, docs)
    factors, _ = capture_factors(model, learner, lambda: per_sample_nll(model, docs.input_ids, docs.attention_mask))
    x = next(iter(factors.values()))[0]
    assert torch.equal(learner.transform.weights_of(next(iter(factors)), x), torch.ones(*x.shape[:2], 1, dtype=x.dtype))
    learner.transform = _without_weights(learner.transform)
    unweighted, _ = grouped_gradients(model, learner, docs)
    for n in learner.names:
        assert torch.equal(weighted[n], unweighted[n]), n


def test_token_weights_multiply_each_tokens_delta():
    """With u = 0 and b != 0 every weight is 2 sigmoid(b): the gradient scales by it; with u != 0
    the result is the unweighted map applied to Delta scaled token by token."""
    model, learner, tok = _setup()
    docs = encode_documents(tok, TEXTS[:2])
    learner.transform = _weighted_map(learner, b=0.7)
    scaled, _ = grouped_gradients(model, learner, docs)
    with torch.no_grad():
        for k in learner.transform.score_b:
            learner.transform.score_b[k].zero_()
    base, _ = grouped_gradients(model, learner, docs)
    w = 2 * torch.sigmoid(torch.tensor(0.7, dtype=torch.float64))
    for n in learner.names:
        torch.testing.assert_close(scaled[n], w * base[n])
    learner.transform = _weighted_map(learner, u_scale=0.3, seed=2)
    got, _ = grouped_gradients(model, learner, docs)
    factors, _ = capture_factors(model, learner, lambda: per_sample_nll(model, docs.input_ids, docs.attention_mask))
    km = learner.transform
    by_hand = {m: (x, d * (2 * torch.sigmoid(x @ km.score_u[m.replace(".", "__")])).unsqueeze(-1))
               for m, (x, d) in factors.items()}
    want = _without_weights(km).gradients(by_hand, learner.spec.scale, learner.names)
    for n in learner.names:
        torch.testing.assert_close(got[n], want[n])


def test_meta_gradient_of_the_token_weights_matches_finite_differences():
    model, learner, tok = _setup()
    km = _weighted_map(learner, u_scale=0.5, b=0.3, seed=1)
    learner.transform = km
    docs = encode_documents(tok, TEXTS[:2])
    params = list(km.score_u.values()) + list(km.score_b.values())
    with torch.enable_grad():
        grads = torch.autograd.grad(_outer(model, learner, tok, docs), params)
    assert all(float(g.abs().max()) > 0 for g in grads)
    gen = torch.Generator().manual_seed(4)
    eps = 3e-2  # as for K and V above: far above the tiny model's float32 noise on the loss
    for p, g in zip(params, grads):
        idx = tuple(int(torch.randint(s, (1,), generator=gen)) for s in p.shape)
        fd = _central_difference(p, idx, eps, lambda: _outer(model, learner, tok, docs).item())
        assert g[idx].item() == pytest.approx(fd, rel=2e-3, abs=2e-3 * float(g.abs().max()))
    dirs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    norm = sum(float(d.pow(2).sum()) for d in dirs) ** 0.5
    with torch.no_grad():
        for p, d in zip(params, dirs):
            p.add_(eps * d / norm)
        up = _outer(model, learner, tok, docs).item()
        for p, d in zip(params, dirs):
            p.sub_(2 * eps * d / norm)
        down = _outer(model, learner, tok, docs).item()
        for p, d in zip(params, dirs):
            p.add_(eps * d / norm)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, dirs)) / norm
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=2e-2)


def test_token_weights_are_stored_only_when_enabled(tmp_path):
    model, learner, tok = _setup(torch.float32)
    learner.transform = KeyMap.identity(learner)
    plain_id = learner.checkpoint_id()
    plain_names = set(learner.transform.tensors())
    learner.save(tmp_path / "plain")
    back = Learner.load(tmp_path / "plain")
    assert not back.transform.token_weights and back.checkpoint_id() == plain_id
    assert not any(k.startswith("transform.score_") for k in back.state_dict())  # state.pt keys as before
    learner.transform.enable_token_weights()
    assert set(learner.transform.tensors()) - plain_names == {f"transform.{m}.{s}" for m in learner.transform.modules_
                                                              for s in ("u", "b")}
    with torch.no_grad():
        next(iter(learner.transform.score_u.values())).add_(0.5)
    weighted_id = learner.checkpoint_id()
    assert weighted_id != plain_id
    learner.save(tmp_path / "weighted")
    back = Learner.load(tmp_path / "weighted")
    assert back.transform.token_weights and back.checkpoint_id() == weighted_id
    for n, t in learner.transform.tensors().items():
        assert torch.equal(back.transform.tensors()[n], t.detach())
    # Half a scorer is refused.
    tensors = {n: t for n, t in learner.transform.tensors().items() if not n.endswith(".b")}
    with pytest.raises(RegradError, match="missing"):
        KeyMap.from_tensors(tensors)


def test_meta_train_token_weights_with_phi_frozen_and_the_factor_cache(tmp_path, capsys, monkeypatch):
    """--token-weights: the scorers start at w = 1 and learn from the answer loss through cached
    factors (phi frozen); they need a key map and --transform-lr."""
    import json

    from conftest import FakeEmbedder
    from regrad_cli.learning.metatrain import MetaTrainConfig, meta_train
    from test_metatrain import _write_jsonl

    model = make_tiny_llama(seed=0)
    data = _write_jsonl(tmp_path / "d.jsonl")
    learner = Learner.for_model(model).init_(seed=0, b_std=0.05, alpha_init=0.5)
    kw = dict(train=[f"jsonl:{data}"], k=2, steps=3, meta_batch=2, eval_every=10, max_doc_tokens=48,
              first_order=True, transform_lr=5e-2, freeze_phi=True, factor_cache_gb=1.0, energy_docs=0,
              token_weights=True)
    with pytest.raises(RegradError, match="token-weights"):
        meta_train(MetaTrainConfig(**{**kw, "out": str(tmp_path / "no")}), model, FakeTokenizer(), FakeEmbedder(),
                   learner=learner.attach(model))
    learner.transform = KeyMap.identity(learner)
    learner.save(tmp_path / "init")
    meta_train(MetaTrainConfig(**{**kw, "out": str(tmp_path / "tw"), "init_checkpoint": str(tmp_path / "init")}),
               make_tiny_llama(seed=0), FakeTokenizer(), FakeEmbedder())
    trained = Learner.load(tmp_path / "tw" / "last")
    assert trained.transform.token_weights
    moved = [float(t.detach().abs().max()) for n, t in trained.transform.tensors().items() if n.endswith((".u", ".b"))]
    assert max(moved) > 0  # from u = b = 0
    log = json.loads((tmp_path / "tw" / "log.json").read_text())["train"]
    assert log[-1]["factor_cache"]["hits"] > 0
    # A snapshot of the run (its --init has no weights; the state has them) is the same learner.
    from reliability_helpers import run_cli

    code, _, err = run_cli(["learner", "snapshot", tmp_path / "tw", "--out", tmp_path / "snap"], capsys, monkeypatch)
    assert code == 0, err
    snap = Learner.load(tmp_path / "snap")
    assert snap.checkpoint_id() == trained.checkpoint_id()
