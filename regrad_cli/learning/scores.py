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


# Retrieval and resampling helpers for `regrad eval` ---------------------------------------------
def _squash(text: str) -> str:
    return " ".join(text.split())


def gold_retrieved(retrieved: Sequence[str], golds: Sequence[str]) -> float | None:
    """1.0 when any retrieved text is a gold document or a chunk of one (whitespace-insensitive
    containment: ingest splits long documents into chunks), 0.0 when none is, None without golds."""
    golds = [_squash(g) for g in golds if g.strip()]
    if not golds:
        return None
    for r in retrieved:
        r = _squash(r)
        if r and any(r == g or r in g for g in golds):
            return 1.0
    return 0.0


def bootstrap_ci(values: Sequence[float], *, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(std of the mean, lower, upper): percentile bootstrap over items, seeded."""
    import numpy as np

    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(means.std()), float(lo), float(hi)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Paired bootstrap of mean(a) - mean(b) over items (a[i] and b[i] are the same question).

    Returns the observed difference, its percentile interval, and a two-sided p-value: twice the
    smaller share of resampled differences on either side of zero, counted with the +1 correction
    (so p is never 0, and identical systems, whose every resampled difference is 0, get p = 1)."""
    import numpy as np

    x, y = np.asarray(list(a), dtype=np.float64), np.asarray(list(b), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired bootstrap needs equal lengths, got {x.size} and {y.size}")
    if x.size == 0:
        return {"n": 0, "diff": None, "ci95": [None, None], "p_value": None, "significant": False}
    d = x - y
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = (float(v) for v in np.percentile(means, [tail, 100 - tail]))
    le, ge = int((means <= 0).sum()), int((means >= 0).sum())
    p = min(1.0, 2.0 * (min(le, ge) + 1) / (resamples + 1))
    return {"n": int(d.size), "diff": float(d.mean()), "ci95": [lo, hi], "p_value": p,
            # The interval decides: it excludes zero only when every resampled mean is on one side
            # of it at the chosen level.
            "significant": bool(lo > 0 or hi < 0)}
