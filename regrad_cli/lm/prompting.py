"""Prompts and answer extraction, shared by meta-training, query and eval.

Meta-training optimises the answer's likelihood under exactly these prompts, so query and eval
must build them the same way; this module is the one place that does.
"""

from __future__ import annotations

import re
from typing import Sequence

SYSTEM_PROMPT = "Answer the question with a short phrase only."
CLOZE_SYSTEM_PROMPT = "Complete the text with a short phrase only."


def build_messages(question: str, passages: Sequence[str] = (), kind: str = "qa") -> list[dict]:
    system = CLOZE_SYSTEM_PROMPT if kind == "cloze" else SYSTEM_PROMPT
    if passages:
        ctx = "\n\n".join(f"Passage {i + 1}: {p.strip()}" for i, p in enumerate(passages))
        user = f"{ctx}\n\nQuestion: {question.strip()}" if kind != "cloze" else f"{ctx}\n\nText: {question.strip()}"
    else:
        user = question.strip()
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def prompt_ids(tokenizer, question: str, passages: Sequence[str] = (), kind: str = "qa",
               max_passage_tokens: int = 256) -> list[int]:
    """Token ids of the chat prompt, ending with the assistant turn's opening."""
    if passages and max_passage_tokens:
        passages = [_truncate(tokenizer, p, max_passage_tokens) for p in passages]
    msgs = build_messages(question, passages, kind)
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)
        ids = out["input_ids"]
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)
    # Models without a chat template (and the tiny test model) get a plain prompt.
    text = "\n".join(m["content"] for m in msgs) + "\nAnswer:"
    return list(tokenizer(text).input_ids)


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Target tokens: the answer followed by the end-of-turn token."""
    ids = list(tokenizer(answer.strip(), add_special_tokens=False).input_ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def _truncate(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens])


_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:\-]\s*", re.IGNORECASE)


def extract_answer(text: str) -> str:
    """First non-empty line, without an 'Answer:' prefix or trailing period."""
    for line in text.replace("\r", "\n").split("\n"):
        line = line.strip()
        if line:
            line = _PREFIX.sub("", line).strip()
            return line.rstrip(".").strip()
    return ""


# Every beginning _PREFIX can match up to its colon or dash, whitespace runs written as one space
# (a first line that is still the start of one of these may yet turn out to be a prefix).
_PREFIX_HEADS = tuple(t + f + "answer" + s1 + i + s2 + c for t in ("", "the ") for f in ("", "final ")
                      for s1 in ("", " ") for i in ("", "is") for s2 in ("", " ") for c in (":", "-"))


def answer_so_far(text: str) -> str:
    """The part of ``extract_answer(text + more)`` that no ``more`` can change: what a stream
    may send while the answer is still being generated (each result extends the one before).

    Held back until the text decides them: a first line that may still become an "Answer:"
    prefix, trailing spaces and periods (stripped if the line ends there), and a trailing U+FFFD
    (a multi-byte character cut between two tokens)."""
    text = text.rstrip("\ufffd").replace("\r", "\n")
    lines = text.split("\n")
    first = next((n for n, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return ""
    if first < len(lines) - 1:  # the first non-empty line has ended: the answer is settled
        return extract_answer(text)
    line = lines[first].lstrip()
    head = re.sub(r"\s+", " ", line.casefold())
    if any(len(h) > len(head) and h.startswith(head) for h in _PREFIX_HEADS):
        return ""
    m = _PREFIX.match(line)
    body = line[m.end():] if m else line
    return re.sub(r"[\s.]+$", "", body.lstrip())
