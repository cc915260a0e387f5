"""generation.generate: the greedy loop that drops finished rows gives exactly what Hugging Face's
greedy ``generate`` gives (which keeps every row to the end), per family, with per-row adapters."""

from __future__ import annotations

import pytest
import torch

from regrad_cli.learner import adapt
from regrad_cli.lm.fakes import FAMILIES, byte_tokenizer, tiny_model
from regrad_cli.lm.generation import generate_hf, generate, left_pad

PROMPTS = ["the observatory was founded in", "who", "a much longer prompt about the comet and its return",
           "x y z", "eighteen eighty", "the lens is"]
MAX_NEW = 12


def _prompt_ids(tok):
    return [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]


def _reference(model, tok, prompts, stops: set[int]) -> list[list[int]]:
    """Each row's tokens from model.generate without stopping, cut after its first stop token."""
    pad = tok.pad_token_id
    ids, mask = left_pad(prompts, pad)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                         pad_token_id=pad, eos_token_id=None, temperature=None, top_p=None, top_k=None)
    rows = []
    for r in out[:, ids.shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(r) if t in stops), len(r))
        rows.append(r[:cut])
    return rows


def _model(family: str):
    """A tiny random model with weights large enough that greedy continuations vary (with the
    fakes' small init every step repeats the prompt's last token)."""
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _stop_tokens(model, tok, prompts) -> set[int]:
    """Stop tokens chosen so that the rows finish at different steps: for row i, the first token
    from step i on that it has not produced before."""
    stops = set()
    for i, row in enumerate(_reference(model, tok, prompts, set())):
        j = next((j for j in range(min(i, len(row) - 1), len(row)) if row[j] not in row[:j]), len(row) - 1)
        stops.add(row[j])
    return stops - {tok.eos_token_id}


@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_finished_rows_is_token_identical_to_hf_generate(family, one_thread):
    model, tok = _model(family), byte_tokenizer()
    prompts = _prompt_ids(tok)
    stops = _stop_tokens(model, tok, prompts)
    tok._regrad_newline_ids = torch.tensor(sorted(stops))  # these count as "newline" here
    stats: dict = {}
    texts = generate(model, tok, prompts, MAX_NEW, stats=stats)
    assert texts == generate_hf(model, tok, prompts, MAX_NEW)
    assert stats["tokens"] == _reference(model, tok, prompts, stops | {tok.eos_token_id})
    lengths = stats["new_tokens"]
    assert len(set(lengths)) > 1, "the rows should finish at different steps"
    # Finished rows left the batch: fewer row-steps than rows x steps.
    assert stats["row_steps"] == sum(lengths) < len(prompts) * stats["steps"]


def test_one_prompt_without_padding_matches_generate(one_thread):
    model, tok = _model("llama"), byte_tokenizer()
    prompts = _prompt_ids(tok)[:1]
    stats: dict = {}
    assert generate(model, tok, prompts, MAX_NEW, stats=stats) == generate_hf(model, tok, prompts, MAX_NEW)
    assert stats["tokens"][0] == _reference(model, tok, prompts, {tok.eos_token_id} |
                                            set(tok._regrad_newline_ids.tolist()))[0][: len(stats["tokens"][0])]


def test_per_row_adapters_follow_the_rows_that_remain(one_thread):
    """Each row on its own stacked side-path adapter: dropping rows slices the stack with them, and
    every row's tokens equal its tokens when generated alone on its own (2-D) adapter."""
    from regrad_cli.learner.lora import Learner

    model, tok = _model("llama"), byte_tokenizer()
    learner = Learner.for_model(model).init_(seed=0, b_std=0.5).attach(model)
    prompts = _prompt_ids(tok)
    gen = torch.Generator().manual_seed(1)
    per_row = [{n: p.detach() + 0.5 * torch.randn(p.shape, generator=gen) for n, p in learner.phi_dict().items()}
               for _ in prompts]
    state = adapt.stack_rows(per_row)
    with adapt.applied(learner, state):
        stops = _stop_tokens(model, tok, prompts)
    tok._regrad_newline_ids = torch.tensor(sorted(stops))
    seen = []

    def follow(rows):
        seen.append(rows.tolist())
        learner.use(adapt.select_rows(state, rows))

    stats: dict = {}
    with adapt.applied(learner, state):
        texts = generate(model, tok, prompts, MAX_NEW, on_rows=follow, stats=stats)
        learner.use(state)  # every row again: generate keeps every row to the end
        assert texts == generate_hf(model, tok, prompts, MAX_NEW)
    assert seen and all(len(b) < len(a) for a, b in zip([list(range(len(prompts)))] + seen, seen))
    for i, p in enumerate(prompts):
        with adapt.applied(learner, per_row[i]):
            alone: dict = {}
            generate(model, tok, [p], MAX_NEW, stats=alone)
        assert alone["tokens"][0] == stats["tokens"][i], f"row {i}"
    # applied restored phi itself on exit, whatever the rows had pointed the side paths at.
    assert learner.active_state()[learner.names[0].rsplit(".", 1)[0]][0] is learner.tensor(learner.names[0])


def test_a_wrapped_generate_is_honoured():
    """A benchmark probe that wraps model.generate still sees every call (the Hugging Face path)."""
    model, tok = _model("llama"), byte_tokenizer()
    calls = []
    orig = model.generate

    def probe(*a, **kw):
        calls.append(kw["max_new_tokens"])
        return orig(*a, **kw)

    model.generate = probe
    try:
        generate(model, tok, _prompt_ids(tok)[:2], 3)
    finally:
        del model.generate
    assert calls == [3]


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_likelihood_on_the_prefill_cache_equals_a_second_pass(family, one_thread):
    """The gold answers scored on the prompts' cache give answer_nll's values, and the answers
    generated afterwards are those of a run that scores nothing (the cache is put back)."""
    from regrad_cli.lm.generation import answer_nll
    from regrad_cli.lm.prompting import answer_ids

    model, tok = _model(family), byte_tokenizer()
    prompts = _prompt_ids(tok)
    golds = ["seventeen", "", "a comet", "no", "1880 and 1881", "x"]
    nll: list = []
    texts = generate(model, tok, prompts, MAX_NEW, answers=[answer_ids(tok, g) for g in golds], nll_out=nll)
    assert texts == generate(model, tok, prompts, MAX_NEW)
    assert nll == pytest.approx(answer_nll(model, tok, prompts, golds).tolist(), rel=1e-4, abs=1e-5)
    # Without padding (one prompt) too.
    one: list = []
    generate(model, tok, prompts[:1], MAX_NEW, answers=[answer_ids(tok, golds[0])], nll_out=one)
    assert one == pytest.approx(answer_nll(model, tok, prompts[:1], golds[:1]).tolist(), rel=1e-4, abs=1e-5)


def test_answer_likelihood_with_per_row_adapters(one_thread):
    from regrad_cli.lm.generation import answer_nll
    from regrad_cli.learner.lora import Learner
    from regrad_cli.lm.prompting import answer_ids

    model, tok = _model("llama"), byte_tokenizer()
    learner = Learner.for_model(model).init_(seed=0, b_std=0.5).attach(model)
    prompts = _prompt_ids(tok)
    gen = torch.Generator().manual_seed(2)
    state = adapt.stack_rows([{n: p.detach() + 0.5 * torch.randn(p.shape, generator=gen)
                               for n, p in learner.phi_dict().items()} for _ in prompts])
    golds = ["one", "two words", "three", "four", "five", "six"]
    nll: list = []
    with adapt.applied(learner, state):
        ref = answer_nll(model, tok, prompts, golds).tolist()
        generate(model, tok, prompts, MAX_NEW, on_rows=lambda rows: learner.use(adapt.select_rows(state, rows)),
                 answers=[answer_ids(tok, g) for g in golds], nll_out=nll)
    assert nll == pytest.approx(ref, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_loss_with_the_head_only_at_answer_tokens_equals_the_full_logits(family):
    """per_sample_nll with a target mask runs the LM head only where it scores (llama, qwen2, ...):
    the same per-row losses and the same gradients in the LoRA side path as the full logits."""
    import torch.nn.functional as F

    from regrad_cli.learner.lora import Learner
    from regrad_cli.lm.generation import teacher_forced_batch
    from regrad_cli.lm.tokens import per_sample_nll

    model, tok = _model(family), byte_tokenizer()
    learner = Learner.for_model(model).init_(seed=0, b_std=0.05, alpha_init=0.5).attach(model)
    ids, mask, tmask = teacher_forced_batch(tok, _prompt_ids(tok), ["1887", "no", "a long answer here", "z", "x", "y"])
    params = [learner.phi[k] for k in learner.phi.keys()]
    for p in params:
        p.requires_grad_(True)

    def full():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        tm = tmask[:, 1:].float()
        return (nll.view(tm.shape) * tm).sum(1) / tm.sum(1)

    fast, ref = per_sample_nll(model, ids, mask, tmask), full()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    g_fast = torch.autograd.grad(fast.sum(), params)
    g_ref = torch.autograd.grad(ref.sum(), params)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_answer_nll_groups_rows_by_length_with_the_same_losses():
    """answer_nll runs prompts of very different lengths (with and without passages) in separate
    padded batches: the per-row losses equal those of one batch, in the caller's order."""
    from regrad_cli.lm.generation import answer_nll, length_groups, teacher_forced_batch
    from regrad_cli.lm.tokens import per_sample_nll

    assert length_groups([50, 800, 60, 700, 10]) == [[1, 3], [2, 0], [4]]
    model, tok = _model("llama"), byte_tokenizer()
    long = tok("the observatory on the ridge was founded by a society of amateurs " * 6,
               add_special_tokens=False).input_ids
    prompts = [_prompt_ids(tok)[1], long, _prompt_ids(tok)[0], long[:200], _prompt_ids(tok)[3]]
    answers = ["1887", "no", "a long answer here", "z", "x"]
    ids, mask, tmask = teacher_forced_batch(tok, prompts, answers)
    one_batch = per_sample_nll(model, ids, mask, tmask)
    grouped = answer_nll(model, tok, prompts, answers, per_group=lambda rows: None)
    torch.testing.assert_close(grouped, one_batch, rtol=1e-5, atol=1e-5)
