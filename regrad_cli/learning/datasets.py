"""Dataset adapters for meta-training and evaluation: ``FORMAT:PATH[@SPLIT]``.

Formats: ``demo`` (the bundled demo questions, regrad_cli/data/demo, no path), ``synthetic:SEED[:N]``
(generated invented knowledge, no file), ``nq-open`` (NQ-Open oracle jsonl.gz), ``pubmedqa`` (PQA-L
ori_pqal.json), ``fictional`` (fictional-knowledge json, cloze probes), ``jsonl`` (generic:
question, answers, documents) and ``auto`` (guessed from the file). SPLIT is ``train``, ``dev`` or
``all`` (default): a fixed split by a hash of the item id, so train and dev never overlap whatever
the file order.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
from importlib.resources import files
from pathlib import Path

from regrad_cli.errors import DatasetError
from regrad_cli.learning.qa import QAItem

FORMATS = ("nq-open", "pubmedqa", "fictional", "jsonl", "auto")
DEV_FRACTION_PERCENT = 20


def parse_spec(spec: str) -> tuple[str, Path, str]:
    fmt, sep, rest = spec.partition(":")
    if not sep or fmt not in FORMATS:
        raise DatasetError(f"dataset spec {spec!r} must be FORMAT:PATH with FORMAT one of {', '.join(FORMATS)} "
                           "(or demo, or synthetic:SEED[:N])")
    split = "all"
    if "@" in rest:
        path_part, _, maybe = rest.rpartition("@")
        if maybe in ("train", "dev", "all"):
            rest, split = path_part, maybe
    path = Path(rest).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset file {path} does not exist")
    if fmt == "auto":
        fmt = guess_format(path)
    return fmt, path, split


def guess_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".jsonl.gz") and "nq" in name:
        return "nq-open"
    if "pqal" in name or "pubmedqa" in name:
        return "pubmedqa"
    if "fictional" in name:
        return "fictional"
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return "jsonl"
    raise DatasetError(f"cannot guess the format of {path}; use nq-open:, pubmedqa:, fictional: or jsonl:")


def in_dev(item_id: str) -> bool:
    return int(hashlib.sha256(item_id.encode()).hexdigest(), 16) % 100 < DEV_FRACTION_PERCENT


def demo_questions() -> Path:
    """The bundled demo questions (108, three per document of the bundled demo corpus)."""
    return Path(str(files("regrad_cli") / "data" / "demo" / "questions.jsonl"))


def is_dataset_spec(spec: str) -> bool:
    """Whether ``spec`` names a dataset (``demo``, ``synthetic:...`` or ``FORMAT:PATH``) rather than a path."""
    fmt, sep, _ = spec.partition(":")
    return spec.partition("@")[0] == "demo" or (bool(sep) and (fmt in FORMATS or fmt == "synthetic"))


def load_dataset(spec: str, *, pubmedqa_long: bool = False) -> list[QAItem]:
    if spec.partition("@")[0] == "demo":
        # ``demo[@SPLIT]``: the bundled questions, whose documents are the bundled corpus's files.
        return load_dataset(f"jsonl:{demo_questions()}" + (f"@{spec.partition('@')[2]}" if "@" in spec else ""))
    if spec.startswith("synthetic:"):
        # Generated, not read: synthetic:SEED[:N] (synthetic.py). Train and dev use other seeds.
        from regrad_cli.learning import synthetic
        return synthetic.generate(*synthetic.parse(spec[len("synthetic:"):]))
    fmt, path, split = parse_spec(spec)
    try:
        items = _LOADERS[fmt](path, pubmedqa_long) if fmt == "pubmedqa" else _LOADERS[fmt](path)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError) as exc:
        raise DatasetError(f"cannot read {fmt} dataset {path}: {exc}") from exc
    except (RecursionError, MemoryError):  # a value nested too deeply for json or literal_eval
        raise DatasetError(f"cannot read {fmt} dataset {path}: a value is nested too deeply") from None
    if split == "train":
        items = [it for it in items if not in_dev(split_key(it))]
    elif split == "dev":
        items = [it for it in items if in_dev(split_key(it))]
    if not items:
        raise DatasetError(f"{spec}: no items")
    return items


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _load_nq(path: Path) -> list[QAItem]:
    items = []
    with _open_text(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            ctx = rec["ctxs"][0]
            text = f"{ctx.get('title', '')}\n{ctx['text']}".strip()
            qid = "nq-" + hashlib.sha1(rec["question"].encode()).hexdigest()[:12]
            items.append(QAItem(qid, rec["question"], list(rec["answers"]), [text], "qa",
                                {"title": ctx.get("title", "")}))
    return items


def _load_pubmedqa(path: Path, long_answer: bool = False) -> list[QAItem]:
    data = json.loads(path.read_text(encoding="utf-8"))
    items = []
    for pmid, rec in data.items():
        contexts = rec["CONTEXTS"]
        if isinstance(contexts, str):
            contexts = ast.literal_eval(contexts)
        doc = " ".join(contexts)
        answers = [rec["final_decision"]]
        if long_answer and rec.get("LONG_ANSWER"):
            answers = [rec["LONG_ANSWER"]]
        items.append(QAItem(f"pubmedqa-{pmid}", rec["QUESTION"] + " Answer yes, no or maybe.",
                            answers, [doc], "qa" if long_answer else "yesno",
                            {"long_answer": rec.get("LONG_ANSWER", "")}))
    return items


def _as_list(value) -> list:
    if isinstance(value, list):
        return value
    return list(ast.literal_eval(value))


def _load_fictional(path: Path) -> list[QAItem]:
    data = json.loads(path.read_text(encoding="utf-8"))
    items = []
    for d_idx, rec in enumerate(data):
        doc = rec["train_context"]
        for level in ("mem", "gen", "hard_gen"):
            inputs = _as_list(rec.get(f"{level}_input", []))
            targets = _as_list(rec.get(f"{level}_target", []))
            for p_idx, (prompt, target) in enumerate(zip(inputs, targets)):
                # Split by document, so that a dev probe's document was never trained on.
                items.append(QAItem(f"fictional-{d_idx}-{level}-{p_idx}", prompt, [target], [doc],
                                    "cloze", {"level": level, "doc": d_idx}))
    return items


def _load_jsonl(path: Path) -> list[QAItem]:
    items = []
    with _open_text(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                answers = rec["answers"] if isinstance(rec["answers"], list) else [rec["answers"]]
                docs = rec.get("documents") or []
                docs = docs if isinstance(docs, list) else [docs]
                items.append(QAItem(str(rec.get("id", f"{path.name}:{line_no}")), rec["question"],
                                    [str(a) for a in answers], [str(d) for d in docs],
                                    rec.get("kind", "qa"), {k: v for k, v in rec.items()
                                                            if k not in ("question", "answers", "documents")}))
            except (ValueError, KeyError, TypeError) as exc:
                raise DatasetError(f"{path}:{line_no}: malformed record ({exc})") from exc
    return items


_LOADERS = {"nq-open": _load_nq, "pubmedqa": _load_pubmedqa, "fictional": _load_fictional,
            "jsonl": _load_jsonl}


def split_key(item: QAItem) -> str:
    """Fictional probes split by document (a dev document is never seen in training)."""
    if item.id.startswith("fictional-"):
        return item.id.rsplit("-", 2)[0]
    return item.id
