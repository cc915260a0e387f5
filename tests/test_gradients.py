"""The LoRA side path and per-document gradients on a tiny random Llama."""

import torch

from regrad_cli.learner.gradients import grouped_gradients
from regrad_cli.lm.tokens import encode_documents, per_sample_nll
from regrad_cli.learner.lora import Learner

TEXTS = ["the quick brown fox jumps", "lorem ipsum dolor sit amet, consectetur", "a b c"]


def _learner(model, **kw):
    return Learner.for_model(model, **kw).init_(seed=1, b_std=0.05).attach(model)


def test_upper_half_default_layers(tiny_llama):
    learner = Learner.for_model(tiny_llama)
    assert learner.spec.layers == [2, 3]
    assert len(learner.names) == 2 * 3 * 2
    assert all(t.abs().sum() > 0 for t in _learner(tiny_llama).phi_dict().values())


def test_side_path_gradient_equals_merged_weight_gradient(tiny_llama, fake_tokenizer):
    model = tiny_llama
    learner = _learner(model)
    docs = encode_documents(fake_tokenizer, TEXTS[:1])
    grads, _ = grouped_gradients(model, learner, docs)

    # Same loss through explicitly merged weights W' = W + s * B A, differentiated by hand.
    learner.disable()
    modules = dict(model.named_modules())
    originals, leaves = {}, {}
    for w_name in {n.rsplit(".", 1)[0] for n in learner.names}:
        lin = modules[w_name].base
        A = learner.tensor(w_name + ".A").detach().clone().requires_grad_(True)
        B = learner.tensor(w_name + ".B").detach().clone().requires_grad_(True)
        leaves[w_name] = (A, B)
        originals[w_name] = lin.weight
        del lin.weight
        lin.weight = originals[w_name] + learner.spec.scale * B @ A
    try:
        with torch.enable_grad():
            loss = per_sample_nll(model, docs.input_ids, docs.attention_mask).sum()
            flat = [t for pair in leaves.values() for t in pair]
            merged = torch.autograd.grad(loss, flat)
    finally:
        for w_name, w in originals.items():
            lin = modules[w_name].base
            del lin.weight
            lin.weight = w
        learner.use(None)
    for (w_name, _), gA, gB in zip(leaves.items(), merged[0::2], merged[1::2]):
        torch.testing.assert_close(grads[w_name + ".A"][0], gA, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(grads[w_name + ".B"][0], gB, rtol=1e-4, atol=1e-7)


def test_batched_equals_one_at_a_time(tiny_llama, fake_tokenizer):
    learner = _learner(tiny_llama)
    batched, _ = grouped_gradients(tiny_llama, learner, encode_documents(fake_tokenizer, TEXTS))
    for i, text in enumerate(TEXTS):
        single, _ = grouped_gradients(tiny_llama, learner, encode_documents(fake_tokenizer, [text]))
        for n in learner.names:
            torch.testing.assert_close(batched[n][i], single[n][0], rtol=1e-4, atol=1e-7)


def test_grouped_sums_equal_sum_of_per_doc(tiny_llama, fake_tokenizer):
    learner = _learner(tiny_llama)
    docs = encode_documents(fake_tokenizer, TEXTS)
    per_doc, _ = grouped_gradients(tiny_llama, learner, docs)
    grouped, _ = grouped_gradients(tiny_llama, learner, docs, group=[0, 1, 0], n_groups=2)
    for n in learner.names:
        torch.testing.assert_close(grouped[n][0], per_doc[n][0] + per_doc[n][2], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(grouped[n][1], per_doc[n][1], rtol=1e-4, atol=1e-7)


def test_gradient_for_A_nonzero_with_default_init(tiny_llama, fake_tokenizer):
    learner = Learner.for_model(tiny_llama).init_(seed=0).attach(tiny_llama)
    grads, _ = grouped_gradients(tiny_llama, learner, encode_documents(fake_tokenizer, TEXTS[:1]))
    assert all(grads[n].abs().sum() > 0 for n in learner.names if n.endswith(".A"))


def test_base_weights_untouched_and_phi_restored(tiny_llama, fake_tokenizer):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    learner = _learner(tiny_llama)
    phi_before = {n: t.detach().clone() for n, t in learner.phi_dict().items()}
    grads, _ = grouped_gradients(tiny_llama, learner, encode_documents(fake_tokenizer, TEXTS))
    learner.detach_from(tiny_llama)
    after = tiny_llama.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(phi_before[n], t) for n, t in learner.phi_dict().items())


def test_checkpoint_roundtrip_and_content_id(tiny_llama, tmp_path):
    learner = Learner.for_model(tiny_llama).init_(seed=3)
    cid = learner.save(tmp_path / "ck")
    again = Learner.load(tmp_path / "ck")
    assert again.checkpoint_id() == cid
    assert Learner.for_model(tiny_llama).init_(seed=3).checkpoint_id() == cid
    assert Learner.for_model(tiny_llama).init_(seed=4).checkpoint_id() != cid
