"""Token batches and token losses: how a document is tokenised for a loss (its start token), a
batch of documents as right-padded tensors, and the mean next-token NLL per sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


def pad_rows(rows: Sequence[Sequence[int]], pad: int, *, left: bool = False,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids as one long tensor [N, width] (default: the longest row) filled with
    ``pad`` after each row (before it with ``left``), and the attention mask (1 on the rows' ids)."""
    width = max(len(r) for r in rows) if width is None else width
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts for generation: padded on the left, so every row's last token is at the end."""
    return pad_rows(rows, pad, left=True)


def pad_id(tokenizer) -> int:
    """The id that pads a right-padded batch (masked out): the tokenizer's pad token, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def doc_start_token(tokenizer) -> int | None:
    """The token a document starts with when the model saw documents in pre-training.

    Tokenizers that add a BOS themselves need nothing. SmolLM2 and Qwen separate pre-training
    documents with <|endoftext|>; their BOS is a chat-turn marker, which would be wrong here.
    """
    probe = tokenizer("a").input_ids
    if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id:
        return None
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id and eot is not None and eot >= 0:
        return eot
    return tokenizer.bos_token_id


@dataclass
class EncodedDocs:
    input_ids: torch.Tensor  # [N, T], right-padded
    attention_mask: torch.Tensor  # [N, T]
    n_tokens: list[int]  # real tokens per document, start token included
    # What the rows were encoded from: a document loss other than the plain next-token loss
    # (learner/doc_loss.py) builds its own rows from the texts (encode_documents sets these).
    texts: list[str] | None = None
    tokenizer: object = None
    max_tokens: int | None = None


def encode_documents(tokenizer, texts: Sequence[str], max_tokens: int = 256) -> EncodedDocs:
    start = doc_start_token(tokenizer)
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True).input_ids
        if start is not None:
            ids = [start] + ids
        ids = ids[:max_tokens]
        if len(ids) < 2:
            # A loss needs at least one predicted token; an (almost) empty text gets the start
            # token and EOS so that its gradient is defined (and near-uninformative).
            ids = (ids + [tokenizer.eos_token_id])[:2] if ids else [tokenizer.eos_token_id] * 2
        rows.append(ids)
    input_ids, mask = pad_rows(rows, pad_id(tokenizer))
    return EncodedDocs(input_ids, mask, [len(r) for r in rows], list(texts), tokenizer, max_tokens)


# Model types whose causal-LM logits are exactly ``lm_head(decoder(...).last_hidden_state)``
# (no logit scaling or soft-capping): for these, a masked loss runs the head only where it scores.
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3"})


def _decoder_and_head(model):
    cfg = getattr(model, "config", None)
    dec, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if dec is None or head is None or getattr(cfg, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    return dec, head


def per_sample_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   target_mask: torch.Tensor | None = None, *, prefix=None,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token NLL per sample [N] over positions where target_mask (default: attention)
    is 1 on the *predicted* token.

    With a ``target_mask`` (an answer after a prompt) on a model whose logits are a plain head
    over the decoder's last hidden states, the head runs only at the scored positions: the same
    losses and gradients (tested) without the [N, T, vocab] logits of every prompt token, which
    for prompts with passages were most of a meta-step's time and memory. With a ``prefix``
    (``prefix.PrefixCache``) that serves the model, the decoder starts at the first adapted layer
    from cached hidden states, and the head runs only where a token is scored (documents too).

    ``weights`` [N, T] (float, on the *predicted* token; 0 where nothing is scored) make it a
    weighted mean: sum_t w_t nll_t / sum_t w_t per sample (document losses, learner/doc_loss.py)."""
    if weights is not None:
        return _weighted_nll(model, input_ids, attention_mask, weights, prefix)
    scored = attention_mask if target_mask is None else target_mask
    # The cache serves only plain-head families (prefix.FAMILIES); it says None for the others.
    hidden = prefix.last_hidden(model, input_ids, attention_mask) if prefix is not None else None
    if hidden is not None:
        return _scored_nll(_decoder_and_head(model)[1], hidden, input_ids, attention_mask, scored)
    parts = _decoder_and_head(model) if target_mask is not None else None
    if parts is not None:
        dec, head = parts
        hidden = dec(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return _scored_nll(head, hidden, input_ids, attention_mask, scored)
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = input_ids[:, 1:]
    tmask = scored[:, 1:].to(logits.dtype)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    nll = nll.view(targets.shape) * tmask
    return nll.sum(1) / tmask.sum(1).clamp_min(1.0)


def _scored_nll(head, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                target_mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean NLL from the decoder's last hidden states, the head run only at the
    positions whose next token is scored."""
    scored = target_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    logits = head(hidden[:, :-1][scored])
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    flat = F.cross_entropy(logits, input_ids[:, 1:][scored], reduction="none")
    nll = flat.new_zeros(scored.shape).masked_scatter(scored, flat)
    return nll.sum(1) / scored.sum(1).clamp_min(1).to(nll.dtype)


def scored_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                  *, prefix=None) -> torch.Tensor:
    """The logits [n, vocab] (half precision upcast) that predict the tokens where ``target_mask`` [N, T] is 1
    (and the attention mask too), in row-major order. The head runs only there where the family
    allows it (as in ``per_sample_nll``); other families slice the full logits."""
    scored = target_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    hidden = prefix.last_hidden(model, input_ids, attention_mask) if prefix is not None else None
    parts = _decoder_and_head(model)
    if hidden is None and parts is not None:
        hidden = parts[0](input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    if hidden is not None:
        logits = parts[1](hidden[:, :-1][scored])
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][scored]
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _weighted_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, weights: torch.Tensor,
                  prefix=None) -> torch.Tensor:
    """``per_sample_nll`` with per-token weights on the predicted tokens."""
    scored = (weights > 0) & attention_mask.bool()
    logits = scored_logits(model, input_ids, attention_mask, scored, prefix=prefix)
    w = weights.to(logits.dtype) * scored.to(logits.dtype)
    inner = scored[:, 1:]
    flat = F.cross_entropy(logits, input_ids[:, 1:][inner], reduction="none") * w[:, 1:][inner]
    nll = flat.new_zeros(inner.shape).masked_scatter(inner, flat)
    return nll.sum(1) / w[:, 1:].sum(1).clamp_min(1e-12)
