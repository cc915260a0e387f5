"""The adaptation core: combination weights, normalisation, combine, step and the nesting-safe
side-path context manager (regrad_cli/learner/adapt.py)."""

from __future__ import annotations

import pytest
import torch

from regrad_cli.learner import adapt
from regrad_cli.errors import RegradError
from regrad_cli.learner.lora import Learner

from conftest import make_tiny_llama


def _grads(k=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(k, 4, 5, generator=gen, dtype=dtype),
            "b": torch.randn(k, 6, 2, generator=gen, dtype=dtype) * 10}


def test_combination_weights():
    s = torch.tensor([0.9, 0.5, 0.1])
    assert torch.equal(adapt.combination_weights(s, "sum"), torch.ones(3))
    assert torch.allclose(adapt.combination_weights(s, "mean"), torch.full((3,), 1 / 3))
    w = adapt.combination_weights(s, "score", torch.tensor(-2.0))  # T = e^-2
    assert torch.allclose(w.sum(), torch.tensor(1.0)) and w[0] > w[1] > w[2]
    with pytest.raises(RegradError, match="unknown combine"):
        adapt.combination_weights(s, "max")


def test_doc_normalisation_gives_unit_documents_and_keeps_tensor_ratios():
    g = _grads()
    n = adapt.normalise(g, "doc")
    for d in range(3):
        total = sum(float(t[d].pow(2).sum()) for t in n.values())
        assert total == pytest.approx(1.0, rel=1e-9)
        ratio_before = float(g["a"][d].norm() / g["b"][d].norm())
        assert float(n["a"][d].norm() / n["b"][d].norm()) == pytest.approx(ratio_before, rel=1e-9)
    t = adapt.normalise(g, "tensor")
    for name in t:
        assert torch.allclose(t[name].flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert adapt.normalise(g, "none")["a"] is g["a"]


def test_combined_step_is_k_invariant_with_doc_norm_and_mean_weights():
    # The same document k times: with doc normalisation and weights summing to 1, the step does
    # not grow with k (the plain sum grows k-fold).
    one = {n: v[:1] for n, v in _grads().items()}
    for k in (1, 3, 7):
        many = {n: v.expand(k, *v.shape[1:]) for n, v in one.items()}
        c = adapt.combine(many, adapt.combination_weights(torch.zeros(k, dtype=torch.float64), "mean"), norm="doc")
        ref = adapt.combine(one, torch.ones(1, dtype=torch.float64), norm="doc")
        for n in c:
            assert torch.allclose(c[n], ref[n])


def test_normalise_and_combine_are_differentiable():
    g = {n: v.requires_grad_(True) for n, v in _grads(k=2).items()}
    w = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)

    def f(a, b, w):
        c = adapt.combine({"a": a, "b": b}, w, norm="doc")
        return (c["a"].sin().sum() + c["b"].pow(2).sum())

    assert torch.autograd.gradcheck(f, (g["a"], g["b"], w))


def test_batched_combine_equals_per_question():
    g = _grads(k=3)
    batched = {n: torch.stack([v, v.flip(0)]) for n, v in g.items()}
    w = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 2.0]], dtype=torch.float64)
    c = adapt.combine(batched, w, norm="doc")
    for i in range(2):
        single = adapt.combine({n: v[i] for n, v in batched.items()}, w[i], norm="doc")
        for n in c:
            assert torch.allclose(c[n][i], single[n])


def test_step_formula_and_missing_tensors_keep_phi():
    phi = {"a": torch.ones(2, 2), "b": torch.zeros(3)}
    alpha = {"a": torch.tensor(0.5), "b": torch.tensor(2.0)}
    out = adapt.step(phi, alpha, {"a": torch.full((2, 2), 4.0)}, gamma=0.5)
    assert torch.equal(out["a"], torch.zeros(2, 2))  # 1 - 0.5 * 0.5 * 4
    assert torch.equal(out["b"], phi["b"])
    batched = adapt.step(phi, alpha, {"a": torch.stack([torch.zeros(2, 2), torch.full((2, 2), 4.0)])},
                         batched=True)
    assert batched["a"].shape == (2, 2, 2) and batched["b"].shape == (2, 3)
    assert torch.equal(batched["a"][0], phi["a"]) and torch.equal(batched["a"][1], -torch.ones(2, 2))


def test_applied_restores_the_previous_state_when_nested():
    model = make_tiny_llama()
    learner = Learner.for_model(model).init_(seed=0, b_std=0.05).attach(model)
    wrapper = next(iter(learner._wrappers.values()))
    phi_a = wrapper.A
    w1 = {n: p + 1 for n, p in learner.phi_dict().items()}
    w2 = {n: p + 2 for n, p in learner.phi_dict().items()}
    with adapt.applied(learner, w1):
        first = wrapper.A
        with adapt.applied(learner, w2):
            assert not torch.equal(wrapper.A, first)
            with adapt.applied(learner, "off"):
                assert wrapper.A is None
            name = next(iter(learner._wrappers))
            assert wrapper.A is w2[name + ".A"]
        assert wrapper.A is first
        with pytest.raises(RuntimeError):
            with adapt.applied(learner, w2):
                raise RuntimeError("boom")
        assert wrapper.A is first
    assert wrapper.A is phi_a
