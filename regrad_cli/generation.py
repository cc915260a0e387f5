"""Greedy generation and teacher-forced answer likelihood for batches of prompts.

Prompts are left-padded so that a batch can share one ``generate`` call; each row may run on its
own adapter (the learner's per-sample mode), so meta-training dev checks and eval batch questions.
"""

from __future__ import annotations

from typing import Sequence

import torch

from regrad_cli.prompting import answer_ids, extract_answer

def _newline_token_ids(tokenizer) -> torch.Tensor:
    """Ids of every token whose text contains a newline (generation stops at the first one).

    Computed once per tokenizer and kept on it: decoding the whole vocabulary costs ~0.2 s."""
    ids = getattr(tokenizer, "_regrad_newline_ids", None)
    if ids is None:
        ids = torch.tensor([i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])],
                           dtype=torch.long)
        tokenizer._regrad_newline_ids = ids
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 20) -> list[str]:
    """Greedy continuation of each prompt, stopped at the first newline or end of turn."""
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

    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        stopping_criteria=StoppingCriteriaList([_StopAtNewline()]),
        temperature=None, top_p=None, top_k=None,
    )
    texts = tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
    return [extract_answer(t) for t in texts]


def teacher_forced_batch(tokenizer, prompts: Sequence[Sequence[int]], answers: Sequence[str]):
    """Right-padded prompt+answer ids, attention mask and a mask over the answer tokens."""
    rows, tmasks = [], []
    for p, a in zip(prompts, answers):
        t = answer_ids(tokenizer, a)
        rows.append(list(p) + t)
        tmasks.append([0] * len(p) + [1] * len(t))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    tmask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, tmasks)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        tmask[i, : len(r)] = torch.tensor(m)
    return ids, mask, tmask


def answer_nll(model, tokenizer, prompts, answers) -> torch.Tensor:
    """Mean NLL per answer token, per row [N] (differentiable if grad is enabled)."""
    from regrad_cli.gradients import per_sample_nll

    device = next(model.parameters()).device
    ids, mask, tmask = teacher_forced_batch(tokenizer, prompts, answers)
    return per_sample_nll(model, ids.to(device), mask.to(device), tmask.to(device))
