"""Chunking by tokens of the workspace language model's tokenizer (rule in regrad_cli.offline.ingest)."""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass

from regrad_cli.errors import ConfigError


@dataclass
class Chunk:
    text: str
    n_tokens: int


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _token_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span of every token of ``text``.

    A fast Hugging Face tokenizer reports offsets. Others are run word by word (a word with its
    whitespace left out) and each word's tokens share its characters evenly: approximate spans,
    but the chunk sizes are re-checked by tokenizing each chunk.
    """
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) == len(enc["input_ids"]):
            return [(int(a), int(b)) for a, b in offsets]
    except (TypeError, KeyError, NotImplementedError, ValueError, AttributeError):
        pass
    spans: list[tuple[int, int]] = []
    for m in re.finditer(r"\S+", text):
        n = len(_token_ids(tokenizer, m.group()))
        length = m.end() - m.start()
        for j in range(n):
            spans.append((m.start() + length * j // n, m.start() + length * (j + 1) // n))
    return spans


# Boundary kinds, best last; a cut "at c" ends the chunk at character c (before the whitespace).
_BOUNDARIES = [
    (1, re.compile(r"\s+")),  # between words
    (2, re.compile(r"[ \t]*\n")),  # line end
    (3, re.compile(r"(?<=[.!?…])[\"'”’)\]]*(?=\s)")),  # sentence end (cut after closing quotes)
    (4, re.compile(r"[ \t]*\n[ \t]*\n")),  # paragraph end
]


def chunk_text(text: str, tokenizer, max_tokens: int, overlap: int) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``max_tokens`` tokens sharing up to ``overlap``."""
    if max_tokens < 1 or overlap < 0 or overlap >= max_tokens:
        raise ConfigError(
            f"chunking needs max_tokens >= 1 and 0 <= overlap < max_tokens (got {max_tokens}, {overlap})"
        )
    text = text.strip()
    if not text:
        return []
    spans = _token_spans(tokenizer, text)
    n = len(spans)
    if n <= max_tokens:
        return [Chunk(text, len(_token_ids(tokenizer, text)))]
    starts = [s for s, _ in spans]
    # kind[e] = best boundary kind for cutting just before token e.
    kind = [0] * (n + 1)
    for k, pattern in _BOUNDARIES:
        for m in pattern.finditer(text):
            c = m.start() if k != 3 else m.end()
            e = bisect_left(starts, c)
            if 0 < e < n and spans[e - 1][1] <= c:
                kind[e] = max(kind[e], k)

    chunks: list[Chunk] = []
    s = 0
    while s < n:
        end = min(s + max_tokens, n)
        if end < n:
            lo = s + max(1, max_tokens // 2)
            best = max(kind[lo : end + 1], default=0)
            if best:
                end = max(e for e in range(lo, end + 1) if kind[e] == best)
        while True:  # re-tokenising the chunk alone may count a token or two more
            piece = text[spans[s][0] : spans[end - 1][1]].strip()
            n_tok = len(_token_ids(tokenizer, piece))
            if n_tok <= max_tokens or end - s <= 1:
                break
            end = max(s + 1, end - (n_tok - max_tokens))
        if piece:
            chunks.append(Chunk(piece, n_tok))
        if end >= n:
            break
        nxt = max(end - overlap, s + 1)
        # Start the overlap on a word boundary rather than mid-word.
        for e in range(nxt, end):
            if kind[e] or starts[e] == 0 or text[starts[e] - 1].isspace():
                nxt = e
                break
        s = nxt
    return chunks
