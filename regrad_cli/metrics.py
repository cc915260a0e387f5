"""QA metrics: SQuAD-style normalisation, EM and F1 as a max over gold aliases, yes/no accuracy."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD v1.1 script)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    return max((_f1(prediction, g) for g in golds), default=0.0)


def yes_no_label(prediction: str) -> str | None:
    """'yes', 'no' or 'maybe' from the first such word of a prediction (None if absent)."""
    for word in normalize_answer(prediction).split():
        if word in ("yes", "no", "maybe"):
            return word
    return None


def yes_no_accuracy(prediction: str, golds: Sequence[str]) -> float:
    label = yes_no_label(prediction)
    return float(label is not None and label in {normalize_answer(g) for g in golds})
