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


# Text is tokenised in windows of this many characters (at least): the token offsets of one
# window, not of the whole text, are in memory at a time, so memory follows the window and not
# the length of a document (a 19 MB record took 3.9 GB when tokenised whole).
WINDOW_CHARS = 1 << 16
# Tokens kept clear of a window's end: the last tokens of a window may be cut mid-word.
_TAIL_TOKENS = 8


def chunk_text(text: str, tokenizer, max_tokens: int, overlap: int,
               window_chars: int = WINDOW_CHARS) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``max_tokens`` tokens sharing up to ``overlap``.

    Long texts are tokenised window by window (``window_chars``, grown when a window holds too
    few tokens); each window after the first starts where the next chunk starts, so a text that
    fits one window is chunked exactly as a whole, and a longer one as if whole up to how its
    words tokenise at a window's edge."""
    if max_tokens < 1 or overlap < 0 or overlap >= max_tokens:
        raise ConfigError(
            f"chunking needs max_tokens >= 1 and 0 <= overlap < max_tokens (got {max_tokens}, {overlap})"
        )
    text = text.strip()
    if not text:
        return []
    chunks: list[Chunk] = []
    pos, total = 0, len(text)
    while pos < total:
        width = max(window_chars, 1)
        while True:
            stop = min(total, pos + width)
            if stop < total:  # end the window between words when one ends near its edge
                cut = max(text.rfind(" ", stop - 1024, stop), text.rfind("\n", stop - 1024, stop))
                if cut > pos:
                    stop = cut
            window = text[pos:stop]
            spans = _token_spans(tokenizer, window)
            last = stop >= total
            if last or len(spans) >= 2 * max_tokens + _TAIL_TOKENS:
                break
            width *= 2  # too few tokens for a chunk clear of the window's edge: a wider window
        if last and pos == 0 and len(spans) <= max_tokens:
            return [Chunk(text, len(_token_ids(tokenizer, text)))]
        made, resume = _chunk_window(window, spans, tokenizer, max_tokens, overlap, last)
        chunks += made
        if resume is None:
            break
        pos += resume
    return chunks


def _chunk_window(text: str, spans: list[tuple[int, int]], tokenizer, max_tokens: int, overlap: int,
                  last: bool) -> tuple[list[Chunk], int | None]:
    """Chunks of one window, and the character (in the window) where the next window starts
    (None after the last window)."""
    n = len(spans)
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
        if not last and s > 0 and s + max_tokens + _TAIL_TOKENS > n:
            return chunks, starts[s]  # the rest is chunked in the next window
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
    if last:
        return chunks, None
    # The window ended inside the last chunk (only when the window holds few tokens).
    return chunks, spans[-1][1] if spans else len(text)
