"""The prefix cache (lm/prefix.py): passes that start at the first adapted layer from cached
hidden states give the full forward's losses, per-document gradients and second-order
meta-gradient; the cache keeps to its byte bound and never lets two texts share an entry."""

import logging
import random

import pytest
import torch

from regrad_cli.learner.gradients import grouped_gradients
from regrad_cli.learner.lora import Learner
from regrad_cli.learning.datasets import QAItem
from regrad_cli.learning.metatrain import BatchEntry, MetaTrainConfig, build_pool, documents_for, outer_loss
from regrad_cli.lm.fakes import tiny_model
from regrad_cli.lm.generation import answer_nll
from regrad_cli.lm.prefix import PrefixCache
from regrad_cli.lm.tokens import encode_documents, per_sample_nll, pad_rows

from conftest import FakeEmbedder, FakeTokenizer

DOCS = [
    "zarn the river flows past kelb mill every spring",
    "the moth vesper has blue wings",
    "tollvane cheese is aged in caves for nine months, then sold at the winter fair in dunmoor",
    "the engine was built by pryde",
]
ITEMS = [QAItem(f"q{i}", q, [a], [DOCS[i]]) for i, (q, a) in enumerate(
    [("where does zarn flow", "kelb mill"), ("what colour are vesper wings", "blue"),
     ("where is tollvane aged", "caves"), ("who built the engine", "pryde")])]


def _model(family="llama", n_layers=4):
    model = tiny_model(family, n_layers=n_layers)
    learner = Learner.for_model(model).init_(seed=0, b_std=0.05, alpha_init=0.5).attach(model)
    return model, learner


def _cache(model, learner, max_bytes=1 << 30):
    return PrefixCache(max_bytes, learner.first_layer(model))


def _close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_first_adapted_layer_is_the_lowest_block_with_a_side_path():
    model, learner = _model(n_layers=6)
    assert learner.first_layer(model) == 3  # upper half of 6 layers
    assert PrefixCache(1, 3).first_layer == 3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_document_losses_and_gradients_equal_the_full_forward(family):
    model, learner = _model(family)
    enc = encode_documents(FakeTokenizer(), DOCS, 64)  # lengths differ: right padding in the batch
    assert len(set(enc.n_tokens)) > 1
    cache = _cache(model, learner)
    g_full, l_full = grouped_gradients(model, learner, enc)
    for _ in range(2):  # cold (the lower layers computed), then warm (all rows from the cache)
        g, losses = grouped_gradients(model, learner, enc, prefix=cache)
        _close(losses, l_full)
        for n in learner.names:
            _close(g[n], g_full[n], rtol=1e-4, atol=1e-7)
    assert (cache.misses, cache.hits, len(cache)) == (len(DOCS), len(DOCS), len(DOCS))


def test_answer_losses_equal_the_full_forward_in_length_groups():
    model, learner = _model()
    tok = FakeTokenizer()
    prompts = [tok(it.question).input_ids + ([5] * 40 if i % 2 else []) for i, it in enumerate(ITEMS)]
    answers = [it.answers[0] for it in ITEMS]
    cache = _cache(model, learner)
    full = answer_nll(model, tok, prompts, answers, per_group=lambda rows: None)
    for _ in range(2):
        _close(answer_nll(model, tok, prompts, answers, per_group=lambda rows: None, prefix=cache), full)


def _batch(cfg):
    pool = build_pool("toy", ITEMS, FakeEmbedder())
    rng = random.Random(0)
    return [BatchEntry(it, docs, pool.scores(it, docs), with_context=i == 0)
            for i, it in enumerate(ITEMS) for docs in [documents_for(it, pool, cfg.k, rng)]]


def test_second_order_meta_gradient_equals_the_uncached_one():
    """One meta-step's loss and its gradient in phi, alpha and T, second order through the
    document passes, with the cache cold and then warm."""
    model, learner = _model()
    tok = FakeTokenizer()
    cfg = MetaTrainConfig(k=2, max_doc_tokens=64, first_order=False, combine="score")
    batch = _batch(cfg)
    params = list(learner.phi.parameters()) + list(learner.log_alpha.parameters()) + [learner.log_temp]
    for p in params:
        p.requires_grad_(True)
    loss, _ = outer_loss(model, tok, learner, batch, cfg)
    ref = torch.autograd.grad(loss, params)
    cache = _cache(model, learner)
    for _ in range(2):
        loss_c, _ = outer_loss(model, tok, learner, batch, cfg, prefix_cache=cache)
        _close(loss_c, loss)
        for a, b in zip(torch.autograd.grad(loss_c, params), ref):
            _close(a, b, rtol=1e-4, atol=1e-7)
    assert cache.hits > 0 and cache.misses == len(cache)


def test_the_cache_keeps_to_its_byte_bound_and_results_stay_exact():
    model, learner = _model()
    enc = encode_documents(FakeTokenizer(), DOCS, 64)
    full = per_sample_nll(model, enc.input_ids, enc.attention_mask)
    row_bytes = [n * 32 * 4 + n * 8 for n in enc.n_tokens]  # float32 hidden [n, 32] + its key
    bound = sorted(row_bytes)[1] + sorted(row_bytes)[0]  # room for the two shortest rows only
    cache = _cache(model, learner, bound)
    for _ in range(3):
        _close(per_sample_nll(model, enc.input_ids, enc.attention_mask, prefix=cache), full)
        assert 0 < cache.bytes <= bound and len(cache) < len(DOCS)
    tiny = _cache(model, learner, 16)  # smaller than any row: nothing kept, still exact
    _close(per_sample_nll(model, enc.input_ids, enc.attention_mask, prefix=tiny), full)
    assert (len(tiny), tiny.bytes) == (0, 0)


def test_different_texts_never_share_an_entry():
    """Rows that differ in one token, or where one is a prefix of another, each get their own
    entry (the key is the row's token ids), and a row repeated in a batch is computed once."""
    model, learner = _model()
    rows = [[1, 10, 11, 12, 13], [1, 10, 11, 12, 14], [1, 10, 11, 12], [1, 10, 11, 12, 13]]
    ids, mask = pad_rows(rows, 0)
    cache = _cache(model, learner)
    _close(per_sample_nll(model, ids, mask, prefix=cache), per_sample_nll(model, ids, mask))
    assert len(cache) == 3 and cache.misses == 3 and cache.hits == 1
    # A text first seen alone is then served from the cache inside a batch of others.
    alone_ids, alone_mask = pad_rows([[1, 20, 21]], 0)
    per_sample_nll(model, alone_ids, alone_mask, prefix=cache)
    ids2, mask2 = pad_rows([[1, 20, 21], [1, 20, 21, 22, 23, 24]], 0)
    _close(per_sample_nll(model, ids2, mask2, prefix=cache), per_sample_nll(model, ids2, mask2))


def test_other_families_left_padding_and_other_models_fall_back(caplog):
    model, learner = _model("gpt2")
    enc = encode_documents(FakeTokenizer(), DOCS, 64)
    cache = _cache(model, learner)
    with caplog.at_level(logging.INFO, logger="regrad"):
        _close(per_sample_nll(model, enc.input_ids, enc.attention_mask, prefix=cache),
               per_sample_nll(model, enc.input_ids, enc.attention_mask))
        per_sample_nll(model, enc.input_ids, enc.attention_mask, prefix=cache)
    assert len(cache) == 0 and sum("prefix cache" in r.message for r in caplog.records) == 1
    llama, llama_learner = _model()
    cache = _cache(llama, llama_learner)
    left_ids, left_mask = pad_rows([[1, 10, 11], [1, 10, 11, 12, 13]], 0, left=True)
    assert cache.last_hidden(llama, left_ids, left_mask) is None
    other, _ = _model()
    cache.last_hidden(llama, enc.input_ids, enc.attention_mask)
    with pytest.raises(Exception, match="one model"):
        cache.last_hidden(other, enc.input_ids, enc.attention_mask)
