"""Greedy generation and teacher-forced answer likelihood for batches of prompts.

Prompts are left-padded so that a batch can share one ``generate`` call; each row may run on its
own adapter (the learner's per-sample mode), so meta-training dev checks and eval batch questions.
``generate`` is a greedy loop over the KV cache that drops rows as they finish (token-identical to
Hugging Face's greedy ``generate``, which keeps them to the end).
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch

from regrad_cli.lm.prompting import answer_ids, extract_answer
from regrad_cli.lm.tokens import left_pad, pad_id, pad_rows


def _newline_token_ids(tokenizer) -> torch.Tensor:
    """Ids of every token whose text contains a newline (generation stops at the first one).

    Computed once per tokenizer and kept on it: decoding the whole vocabulary costs ~0.2 s."""
    ids = getattr(tokenizer, "_regrad_newline_ids", None)
    if ids is None:
        ids = torch.tensor([i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])],
                           dtype=torch.long)
        tokenizer._regrad_newline_ids = ids
    return ids


# Generation settings that would make Hugging Face's greedy ``generate`` do more than argmax: a
# model whose generation config sets any of them is answered by ``generate`` itself.
_PROCESSOR_SETTINGS = ("repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
                       "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                       "forced_eos_token_id", "sequence_bias", "min_length", "min_new_tokens",
                       "exponential_decay_length_penalty", "renormalize_logits", "epsilon_cutoff", "eta_cutoff",
                       "diversity_penalty", "guidance_scale", "watermarking_config")


def _plain_greedy(model) -> bool:
    """True when greedy decoding of ``model`` is a plain argmax per step (our loop may run it)."""
    if "generate" in vars(model):  # an instance-level wrapper (a benchmark probe) wants its calls
        return False
    cfg = getattr(model, "generation_config", None)
    if cfg is None or getattr(model.config, "is_encoder_decoder", False):
        return False
    default = type(cfg)()
    return all(getattr(cfg, k, None) == getattr(default, k, None) for k in _PROCESSOR_SETTINGS)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 20, *,
             on_rows: Callable[[torch.Tensor], None] | None = None, stop: bool = True,
             stats: dict | None = None, answers: Sequence[Sequence[int]] | None = None,
             nll_out: list | None = None, on_tokens: Callable[[list[int], list[int]], None] | None = None) -> list[str]:
    """Greedy continuation of each prompt, stopped at the first newline or end of turn.

    Token for token what Hugging Face's greedy ``model.generate`` gives for the same left-padded
    batch (same position ids, same attention mask, argmax of the fp32 logits), but a row that has
    finished leaves the batch: its KV cache rows are dropped and ``on_rows(rows)`` is called with
    the original indices of the rows still running, so that a per-row side-path state [N, ...] can
    follow (``adapt.select_rows``). ``generate`` keeps feeding finished rows padding until the last
    row stops, which on a CPU is most of a batch's decoding when answers differ in length.
    ``stop=False`` generates exactly ``max_new_tokens`` tokens per row (benchmarks). ``stats``, if
    given, receives the decode steps, the row-steps computed and each row's new tokens.

    With ``answers`` (target token ids per row, ``prompting.answer_ids``) and a list ``nll_out``,
    the mean NLL per answer token of each row (what ``answer_nll`` computes) is appended to
    ``nll_out``, scored on the prompt's KV cache right after the prefill instead of a second pass
    over prompt and answer. ``nll_out`` stays empty where that is not possible (a cache other than
    plain dynamic layers, or Hugging Face's ``generate``): call ``answer_nll`` then.

    ``on_tokens(rows, tokens)``, if given, gets the original indices of the rows still running
    and their new tokens after every step (streaming); it only reads them."""
    if not _plain_greedy(model):
        return generate_hf(model, tokenizer, prompts, max_new_tokens, stop=stop, stats=stats, on_tokens=on_tokens)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(prompts, pad)
    ids, mask = ids.to(device), mask.to(device)
    n = ids.shape[0]
    stops = _stop_ids(tokenizer, device)
    kw, pos, attn = _prefill_inputs(model, mask)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, **kw)
    cache = out.cache
    if pos is not None:
        pos = pos[:, -1:]
    if answers is not None and nll_out is not None:
        nll_out.extend(_cached_answer_nll(model, out.logits[:, -1], cache, mask, pos, answers))
    rows = torch.arange(n, device=device)  # original index of every row still running
    new: list[list[int]] = [[] for _ in range(n)]
    steps = row_steps = 0
    while True:
        nxt = out.logits[:, -1].to(dtype=torch.float32).argmax(-1)
        steps += 1
        row_steps += len(rows)
        for i, t in zip(rows.tolist(), nxt.tolist()):
            new[i].append(t)
        if on_tokens is not None:
            on_tokens(rows.tolist(), nxt.tolist())
        if steps >= max_new_tokens:
            break
        if stop:
            keep = (~torch.isin(nxt, stops)).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            if keep.numel() < len(rows):
                rows, nxt = rows[keep], nxt[keep]
                cache.reorder_cache(keep)
                attn = attn[keep] if attn is not None else None
                pos = pos[keep] if pos is not None else None
                if on_rows is not None:
                    on_rows(rows)
        if attn is not None:
            attn = torch.cat([attn, attn.new_ones((len(rows), 1))], dim=-1)
        if pos is not None:
            pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, cache=cache, **kw)
        cache = out.cache
    if stats is not None:
        stats.update(steps=steps, row_steps=row_steps, new_tokens=[len(t) for t in new], tokens=new)
    # The same [n, steps] tensor generate returns (finished rows padded), decoded the same way.
    gen, _ = pad_rows(new, pad, width=steps)
    texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
    return [extract_answer(t) for t in texts]


def _stop_ids(tokenizer, device) -> torch.Tensor:
    """The tokens that end an answer: every newline token and the end of turn."""
    stops = _newline_token_ids(tokenizer).to(device)
    if tokenizer.eos_token_id is not None:
        stops = torch.cat([stops, torch.tensor([tokenizer.eos_token_id], device=device)])
    return stops


def _prefill_inputs(model, mask: torch.Tensor) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    """(forward keywords, position ids or None, attention mask or None) for the prefill of a
    left-padded batch, as Hugging Face's ``generate`` prepares them: positions count only real
    tokens (left padding sits at 0), and a batch without padding runs with no mask at all (the
    same attention kernels, the same numbers)."""
    params = inspect.signature(model.forward).parameters
    kw: dict = {"use_cache": True, "return_dict": True}
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    pos = None
    if "position_ids" in params:
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    attn = None if bool((mask == 1).all()) else mask
    return kw, pos, attn


def _cached_answer_nll(model, last_logits, cache, mask, last_pos, answers) -> list[float]:
    """Mean NLL per answer token per row, the answers fed on top of the prompts' cache; the cache
    is then put back to the prompts alone (its plain dynamic layers grow by concatenation, so the
    tensors held before are untouched). [] when the cache is of another kind."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return []
    n, device = len(answers), last_logits.device
    width = max(1, max(len(a) for a in answers))
    a_ids = torch.zeros((n, width), dtype=torch.long)
    a_mask = torch.zeros((n, width), dtype=torch.long)
    for i, a in enumerate(answers):
        a_ids[i, : len(a)] = torch.tensor(list(a), dtype=torch.long)
        a_mask[i, : len(a)] = 1
    a_ids, a_mask = a_ids.to(device), a_mask.to(device)
    tm = a_mask.to(torch.float32)
    # The first answer token is predicted by the prompt's last position (the prefill's logits).
    total = torch.nn.functional.cross_entropy(last_logits.float(), a_ids[:, 0], reduction="none") * tm[:, 0]
    if width > 1:
        saved = [(layer.keys, layer.values) for layer in layers]
        try:
            kw: dict = {"input_ids": a_ids, "attention_mask": torch.cat([mask, a_mask], dim=-1),
                        "cache": cache, "use_cache": True, "return_dict": True}
            if last_pos is not None:
                kw["position_ids"] = last_pos + 1 + torch.arange(width, device=device)[None, :]
            logits = model(**kw).logits[:, :-1].float()
        finally:
            for layer, (k, v) in zip(layers, saved):
                layer.keys, layer.values = k, v
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), a_ids[:, 1:].reshape(-1),
                                                reduction="none").view(n, width - 1)
        total = total + (nll * tm[:, 1:]).sum(1)
    return (total / tm.sum(1).clamp_min(1.0)).tolist()


def generate_hf(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 20, *,
                 stop: bool = True, stats: dict | None = None,
                 on_tokens: Callable[[list[int], list[int]], None] | None = None) -> list[str]:
    """``generate`` through Hugging Face's ``model.generate`` (every row runs to the last one's
    end); the reference the loop above is tested against, and the path for generation configs
    that do more than argmax. ``on_tokens`` as in ``generate`` (through a streamer; a row that
    has finished gets padding until the last one ends)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(prompts, pad)
    ids, mask = ids.to(device), mask.to(device)
    start = ids.shape[1]
    newline = _newline_token_ids(tokenizer).to(device)

    class _StopAtNewline(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids[:, start:]
            if new.shape[1] == 0 or newline.numel() == 0:
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            return torch.isin(new, newline).any(dim=1)

    extra = {"stopping_criteria": StoppingCriteriaList([_StopAtNewline()])} if stop else {
        "min_new_tokens": max_new_tokens}
    if on_tokens is not None:
        extra["streamer"] = _StepStreamer(ids.shape[0], on_tokens)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            temperature=None, top_p=None, top_k=None, **extra,
        )
    if stats is not None:
        stats.update(steps=int(out.shape[1] - start), row_steps=int(out.shape[0] * (out.shape[1] - start)))
    texts = tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
    return [extract_answer(t) for t in texts]


class _StepStreamer:
    """Hugging Face's streamer interface (put, end) feeding ``on_tokens``: its first ``put`` is
    the prompts, each later one the step's token per row."""

    def __init__(self, n: int, on_tokens: Callable[[list[int], list[int]], None]):
        self.rows, self.on_tokens, self.prompt_seen = list(range(n)), on_tokens, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        if len(tokens) == len(self.rows):
            self.on_tokens(self.rows, tokens)

    def end(self) -> None:
        pass


def teacher_forced_batch(tokenizer, prompts: Sequence[Sequence[int]], answers: Sequence[str]):
    """Right-padded prompt+answer ids, attention mask and a mask over the answer tokens."""
    rows, tmasks = [], []
    for p, a in zip(prompts, answers):
        t = answer_ids(tokenizer, a)
        rows.append(list(p) + t)
        tmasks.append([0] * len(p) + [1] * len(t))
    ids, mask = pad_rows(rows, pad_id(tokenizer))
    tmask, _ = pad_rows(tmasks, 0)
    return ids, mask, tmask


def length_groups(lengths: Sequence[int], *, min_fill: float = 0.6) -> list[list[int]]:
    """Row indices grouped by length (longest first) so that every row of a group is at least
    ``min_fill`` of the group's longest: right-padding then wastes little. A batch that mixes
    prompts with passages (~800 tokens) and without (~50) otherwise pads every row to 800."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] >= min_fill * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def answer_nll(model, tokenizer, prompts, answers, *, per_group=None, prefix=None) -> torch.Tensor:
    """Mean NLL per answer token, per row [N] (differentiable if grad is enabled).

    With ``per_group`` (a function of a group's row indices returning a context manager, e.g.
    one that applies those rows' per-sample adapters), rows of very different lengths run in
    separate padded batches inside it: each row's loss is its own, so the values equal one
    batch's (tested), without padding 50-token prompts to the 800 of prompts with passages.
    ``prefix`` (a ``PrefixCache``) starts the passes at the first adapted layer."""
    from contextlib import nullcontext

    from regrad_cli.lm.tokens import per_sample_nll

    device = next(model.parameters()).device
    if per_group is None:
        ids, mask, tmask = teacher_forced_batch(tokenizer, prompts, answers)
        return per_sample_nll(model, ids.to(device), mask.to(device), tmask.to(device), prefix=prefix)
    lengths = [len(p) + len(answer_ids(tokenizer, a)) for p, a in zip(prompts, answers)]
    parts, order = [], []
    for group in length_groups(lengths):
        ids, mask, tmask = teacher_forced_batch(tokenizer, [prompts[i] for i in group], [answers[i] for i in group])
        with per_group(group) or nullcontext():
            parts.append(per_sample_nll(model, ids.to(device), mask.to(device), tmask.to(device), prefix=prefix))
        order.extend(group)
    nll = torch.cat(parts)
    return nll[torch.argsort(torch.tensor(order, device=nll.device))]
