"""Document losses: the loss a document's gradient is the gradient of, built from the document alone.

A learner records its loss in ``learner.json`` (``doc_loss``; absent means ``plain``):

* ``plain``: the mean next-token NLL of the document (the paper's; every learner before this had it).
* ``salient``: the next-token NLL with the tokens of salient spans weighted ``SALIENT_WEIGHT`` times
  the others (a weighted mean). Salient spans (``salient_spans``) are found in the text by a fixed
  rule, whatever the tokenizer: numbers (a digit run, with , . : / - inside and an ordinal or
  plural ending: 1887, 3.5, 12:30, 1880s, 3rd) and capitalised words of two or more characters
  that are not the first word of a sentence or line, or are but also appear capitalised inside a
  sentence elsewhere in the document; neighbours separated only by spaces or tabs merge into one
  span ("12 March 1887", "Ada Lind"). A token is salient when it is one of the tokens the span's
  text adds to the encoding of the text before it (the prefix is tokenised, not the decoded ids).
* ``augmented``: the mean of three next-token losses, each a third (a half when there is no cloze
  pair): the document itself; its restatement (``restatement``: every sentence names the
  document's entity, its title line or else its first salient name, and the sentences are
  permuted in an order seeded by the text's sha256); and cloze pairs "prefix -> salient span"
  (``cloze_pairs``: the restated sentence up to a salient span, the loss on the span's tokens
  only; at most ``MAX_CLOZE``, averaged).
* ``distill``: context distillation. Probe prompts are built from the document alone
  (``probes``: its entity in generic question templates; each restated sentence up to its last
  salient span, as a cloze prompt). The teacher is the same model at the same adapter point with
  the document in the prompt (no gradient); it answers each probe greedily (at most
  ``DISTILL_TOKENS`` tokens); the student sees the probe without the document, and the loss is
  the KL from the teacher's next-token distribution to the student's over those tokens, averaged
  over tokens and probes. First order only: the teacher depends on phi, and its gradient is not
  taken (second-order meta-training with it is refused).

None of them ever sees a question of a dataset. ``plain`` keeps its own code path (gradients.py),
so its gradients and every plain learner's checkpoint id are exactly what they were; the others
build ``LossRows`` (several token rows per document, each with its share of the document's loss)
whose per-row losses sum, per document, to the document's loss.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Sequence

from regrad_cli.errors import RegradError

DOC_LOSSES = ("plain", "salient", "augmented", "distill")
DEFAULT_DOC_LOSS = "plain"
SALIENT_WEIGHT = 4.0
MAX_CLOZE = 8
MAX_PROBES = 16
DISTILL_TOKENS = 8
PROBE_TEMPLATES = (
    "What is {e}?", "Where is {e}?", "When was {e} founded?", "Who founded {e}?", "Who created {e}?",
    "In which year did {e} begin?", "What is {e} known for?", "Who leads {e}?",
)


def check_doc_loss(name) -> str:
    """``name`` if it is a document loss regrad knows; one RegradError line if not."""
    if name not in DOC_LOSSES:
        raise RegradError(f"unknown document loss {name!r} (use {', '.join(DOC_LOSSES)})")
    return name


# Text rules (pure Python, deterministic) ---------------------------------------------------------
_NUMBER = r"\d(?:[\d,.:/\-]*\d)?(?:st|nd|rd|th|s)?"
_WORD = r"[^\W\d_][\w'’\-]*"
_TOKEN = re.compile(rf"(?P<num>{_NUMBER})|(?P<word>{_WORD})")
_OPENERS = "\"'“‘([{#*-–—>` \t"
_PRONOUNS = {"He": "", "She": "", "It": "", "They": "", "His": "'s", "Her": "'s", "Its": "'s", "Their": "'s"}


def _sentence_initial(text: str, start: int) -> bool:
    """True when the word at ``start`` opens the text, a line or a sentence."""
    i = start - 1
    while i >= 0 and text[i] in _OPENERS:
        i -= 1
    return i < 0 or text[i] in ".!?:\n\r"


def salient_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the salient spans of ``text`` (module docstring)."""
    found = []
    inside_caps = set()
    words = list(_TOKEN.finditer(text))
    for m in words:
        if m.group("word") and m.group()[0].isupper() and len(m.group()) > 1 and not _sentence_initial(text, m.start()):
            inside_caps.add(m.group())
    for m in words:
        w = m.group()
        if m.group("num"):
            found.append((m.start(), m.end()))
        elif w[0].isupper() and len(w) > 1 and (w in inside_caps or not _sentence_initial(text, m.start())):
            found.append((m.start(), m.end()))
    spans: list[list[int]] = []
    for s, e in found:
        if spans and text[spans[-1][1]:s].strip(" \t") == "" and "\n" not in text[spans[-1][1]:s]:
            spans[-1][1] = e
        else:
            spans.append([s, e])
    return [(s, e) for s, e in spans]


_HEADING = re.compile(r"\A\s*#+[ \t]*(?P<title>[^\n]+)\n?")


def entity_and_body(text: str) -> tuple[str | None, str]:
    """The document's entity (its markdown title line, else its first salient span with a
    letter) and its body (the text without the title line)."""
    m = _HEADING.match(text)
    if m:
        return m.group("title").strip().strip("#").strip() or None, text[m.end():]
    for s, e in salient_spans(text):
        if any(c.isalpha() for c in text[s:e]):
            return text[s:e], text
    return None, text


def sentences(body: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", body) if s.strip()]


def _name_entity(sentence: str, entity: str | None) -> str:
    """The sentence with the entity named in it: unchanged if it names it already; a leading
    pronoun becomes the entity (possessives its possessive); else the entity comes first."""
    if not entity or entity.lower() in sentence.lower():
        return sentence
    first, _, rest = sentence.partition(" ")
    if first in _PRONOUNS and rest:
        return f"{entity}{_PRONOUNS[first]} {rest}"
    return f"{entity}: {sentence}"


def _seed(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16)


def restated_sentences(text: str) -> list[str]:
    """The body's sentences, each naming the entity, in document order."""
    entity, body = entity_and_body(text)
    return [_name_entity(s, entity) for s in sentences(body)]


def restatement(text: str) -> str:
    """The restated sentences in an order seeded by the text (the same text, the same order)."""
    restated = restated_sentences(text)
    random.Random(_seed(text)).shuffle(restated)
    return " ".join(restated)


def _prefix_ok(prefix: str) -> bool:
    return len(prefix.split()) >= 2


def cloze_pairs(text: str, limit: int = MAX_CLOZE) -> list[tuple[str, str]]:
    """("prefix", "salient span") pairs over the restated sentences, in document order: each
    salient span of a sentence with at least two words before it; at most ``limit``."""
    pairs = []
    for s in restated_sentences(text):
        for a, b in salient_spans(s):
            prefix = s[:a].rstrip()
            if _prefix_ok(prefix):
                pairs.append((prefix, s[a:b]))
    return pairs[:limit]


def probes(text: str, limit: int = MAX_PROBES) -> list[tuple[str, str]]:
    """(prompt text, prompt kind) probes for distillation: the entity in each question template
    ("qa"), then each restated sentence up to its last salient span ("cloze"); at most ``limit``.
    A document with neither gets one cloze probe: the first half of its first words."""
    entity, _ = entity_and_body(text)
    out = [(t.format(e=entity), "qa") for t in PROBE_TEMPLATES] if entity else []
    for s in restated_sentences(text):
        cuts = [a for a, _ in salient_spans(s) if _prefix_ok(s[:a].rstrip())]
        if cuts:
            out.append((s[:cuts[-1]].rstrip(), "cloze"))
    if not out:
        words = text.split()
        out = [(" ".join(words[: max(1, min(12, len(words) // 2))]), "cloze")]
    return out[:limit]


# Token rows ------------------------------------------------------------------------------------
def salient_token_flags(tokenizer, text: str, n_ids: int, offset: int) -> list[int]:
    """1 for the tokens of ``text``'s encoding (``offset`` ids before it, ``n_ids`` in all) that
    belong to a salient span: the ids between the encoding of the text before the span (trailing
    spaces dropped, so a word's leading space stays with the word) and the text up to its end."""
    flags = [0] * n_ids
    for s, e in salient_spans(text):
        a = offset + len(tokenizer(text[:s].rstrip(), add_special_tokens=True).input_ids)
        b = offset + len(tokenizer(text[:e], add_special_tokens=True).input_ids)
        for j in range(max(0, a), min(n_ids, b)):
            flags[j] = 1
    return flags


@dataclass
class LossRows:
    """Token rows of some documents' losses. Row r belongs to document ``doc[r]``; its loss is
    ``scale[r]`` times the weighted mean NLL of its tokens (``weights``), or, with a teacher
    (distill), the mean KL from ``teacher_logp`` to the student over its ``target_mask`` tokens.
    The rows' losses summed per document are the documents' losses."""

    input_ids: "torch.Tensor"  # noqa: F821 - [R, T], right-padded
    attention_mask: "torch.Tensor"  # noqa: F821
    doc: list[int]
    scale: list[float]
    n_tokens: list[int]
    weights: "torch.Tensor | None" = None  # noqa: F821 - [R, T], on the predicted token
    target_mask: "torch.Tensor | None" = None  # noqa: F821 - distill: the teacher's tokens
    teacher_logp: "torch.Tensor | None" = None  # noqa: F821 - [n scored, vocab], row-major

    def losses(self, model, prefix=None):
        """Per-row losses [R] (differentiable in the adapter the model runs with)."""
        import torch

        from regrad_cli.lm.tokens import per_sample_nll, scored_logits

        device = next(model.parameters()).device
        ids, mask = self.input_ids.to(device), self.attention_mask.to(device)
        scale = torch.tensor(self.scale, dtype=torch.float64, device=device)
        if self.teacher_logp is None:
            loss = per_sample_nll(model, ids, mask, prefix=prefix, weights=self.weights.to(device))
            return loss * scale.to(loss.dtype)
        tmask = self.target_mask.to(device)
        logq = torch.log_softmax(scored_logits(model, ids, mask, tmask, prefix=prefix), -1)
        logp = self.teacher_logp.to(device, logq.dtype)
        scale = scale.to(logq.dtype)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # [n scored]
        inner = tmask[:, 1:].bool() & mask[:, 1:].bool()
        per_row = kl.new_zeros(inner.shape).masked_scatter(inner, kl).sum(1)
        return per_row / inner.sum(1).clamp_min(1).to(per_row.dtype) * scale

    def per_document(self, row_values, n_docs: int):
        """Row values [R] summed per document: [n_docs]."""
        import torch

        idx = torch.tensor(self.doc, device=row_values.device)
        return row_values.new_zeros(n_docs).index_add(0, idx, row_values)


def build_rows(kind: str, tokenizer, texts: Sequence[str], max_tokens: int = 256, *, model=None,
               learner=None, base=None) -> LossRows:
    """The rows of document loss ``kind`` (not 'plain') for ``texts``; ``distill`` runs the
    teacher with ``model`` and ``learner`` at ``base`` (default phi), without gradients."""
    check_doc_loss(kind)
    if kind == "plain":
        raise RegradError("the plain document loss has no loss rows: it is the documents' own next-token loss")
    if kind == "distill":
        return _distill_rows(model, learner, tokenizer, texts, max_tokens, base)
    import torch

    from regrad_cli.lm.tokens import doc_start_token, pad_id, pad_rows

    start = doc_start_token(tokenizer)
    offset = 1 if start is not None else 0
    rows, weights, doc, scale = [], [], [], []

    def encode(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=True).input_ids
        ids = ([start] + ids if start is not None else ids)[:max_tokens]
        if len(ids) < 2:  # as encode_documents: a loss needs one predicted token
            ids = (ids + [tokenizer.eos_token_id])[:2] if ids else [tokenizer.eos_token_id] * 2
        return ids

    def add(ids: list[int], w: list[float], j: int, share: float) -> None:
        rows.append(ids)
        weights.append(w)
        doc.append(j)
        scale.append(share)

    for j, text in enumerate(texts):
        ids = encode(text)
        if kind == "salient":
            flags = salient_token_flags(tokenizer, text, len(ids), offset)
            add(ids, [1.0 + (SALIENT_WEIGHT - 1.0) * f for f in flags], j, 1.0)
            continue
        pairs = cloze_pairs(text)
        share = 1.0 / (3 if pairs else 2)
        add(ids, [1.0] * len(ids), j, share)
        restated = encode(restatement(text) or text)
        add(restated, [1.0] * len(restated), j, share)
        for prefix, span in pairs:
            head = encode(prefix)
            tail = list(tokenizer(" " + span, add_special_tokens=False).input_ids)
            both = (head + tail)[:max_tokens]
            add(both, [0.0] * len(head) + [1.0] * (len(both) - len(head)), j, share / len(pairs))
    input_ids, mask = pad_rows(rows, pad_id(tokenizer))
    w = torch.zeros(input_ids.shape, dtype=torch.float32)
    for r, row in enumerate(weights):
        w[r, : len(row)] = torch.tensor(row)
    return LossRows(input_ids, mask, doc, scale, [len(r) for r in rows], weights=w)


def _distill_rows(model, learner, tokenizer, texts: Sequence[str], max_tokens: int, base) -> LossRows:
    """Probe rows (student: probe + the teacher's greedy tokens) and the teacher's log-probabilities
    at those tokens, the teacher seeing the document in its prompt."""
    import torch

    from regrad_cli.lm.generation import generate
    from regrad_cli.lm.prompting import answer_ids, prompt_ids
    from regrad_cli.lm.tokens import pad_id, pad_rows, scored_logits

    if model is None or learner is None:
        raise RegradError("the distill document loss needs the model and the learner (its teacher)")
    student, teacher, doc, scale = [], [], [], []
    for j, text in enumerate(texts):
        pr = probes(text)
        for q, kind in pr:
            student.append(prompt_ids(tokenizer, q, kind=kind))
            teacher.append(prompt_ids(tokenizer, q, [text], kind=kind, max_passage_tokens=max_tokens))
            doc.append(j)
            scale.append(1.0 / len(pr))
    src = base if base is not None else learner.phi_dict()
    at_phi = {n: t.detach() for n, t in src.items()}
    with torch.no_grad(), learner.using(at_phi):
        stats: dict = {}
        texts_out = generate(model, tokenizer, teacher, DISTILL_TOKENS, stop=True, stats=stats)
        tokens = stats.get("tokens") or [answer_ids(tokenizer, t)[:DISTILL_TOKENS] for t in texts_out]
        answers = [list(t)[:DISTILL_TOKENS] or [tokenizer.eos_token_id] for t in tokens]
        t_ids, t_mask = pad_rows([p + a for p, a in zip(teacher, answers)], pad_id(tokenizer))
        t_target = torch.zeros_like(t_ids)
        for r, (p, a) in enumerate(zip(teacher, answers)):
            t_target[r, len(p): len(p) + len(a)] = 1
        device = next(model.parameters()).device
        logp = []
        for lo in range(0, len(teacher), 8):  # the teacher's prompts hold the document: a few at a time
            sl = slice(lo, lo + 8)
            logp.append(torch.log_softmax(scored_logits(model, t_ids[sl].to(device), t_mask[sl].to(device),
                                                        t_target[sl].to(device)), -1))
        teacher_logp = torch.cat(logp)
    s_rows = [p + a for p, a in zip(student, answers)]
    s_ids, s_mask = pad_rows(s_rows, pad_id(tokenizer))
    s_target = torch.zeros_like(s_ids)
    for r, (p, a) in enumerate(zip(student, answers)):
        s_target[r, len(p): len(p) + len(a)] = 1
    return LossRows(s_ids, s_mask, doc, scale, [len(r) for r in s_rows], target_mask=s_target,
                    teacher_logp=teacher_logp)
