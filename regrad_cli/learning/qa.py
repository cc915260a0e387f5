"""A QA item (question, gold answers, supporting documents): what datasets load, synthetic data
generates, meta-training learns from and evaluation scores."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class QAItem:
    id: str
    question: str
    answers: list[str]
    documents: list[str]  # supporting documents (gold passages)
    kind: str = "qa"  # "qa", "yesno" or "cloze"
    meta: dict = field(default_factory=dict)


def corpus_of(items: list[QAItem]) -> list[str]:
    """Distinct supporting documents, in first-seen order."""
    seen, out = set(), []
    for it in items:
        for d in it.documents:
            if d not in seen:
                seen.add(d)
                out.append(d)
    return out
