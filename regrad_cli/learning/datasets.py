"""Dataset adapters for meta-training and evaluation: ``FORMAT:PATH[@SPLIT]``.

Formats: ``demo`` (the bundled demo questions, regrad_cli/data/demo, no path), ``synthetic:SEED[:N]``
(generated invented knowledge, no file), ``nq-open`` (NQ-Open oracle jsonl.gz), ``pubmedqa`` (PQA-L
ori_pqal.json), ``fictional`` (fictional-knowledge json, cloze probes), ``jsonl`` (generic:
question, answers, documents) and ``auto`` (guessed from the file). SPLIT is ``train``, ``dev`` or
``all`` (default): a fixed split by a hash of the item id, so train and dev never overlap whatever
the file order. ``@SPLIT:N`` keeps N of the split's items, the same N whatever the file order (those
whose id hashes lowest, the split's own order of items kept): a fixed subset, e.g. one sized to
meta-training's factor cache.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import itertools
import json
import zlib
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterator

from regrad_cli.errors import DatasetError
from regrad_cli.learning.qa import QAItem

FORMATS = ("nq-open", "pubmedqa", "fictional", "jsonl", "auto")
DEV_FRACTION_PERCENT = 20


def parse_spec(spec: str) -> tuple[str, Path, str, int | None]:
    """``FORMAT:PATH[@SPLIT[:N]]`` -> (format, path, split, N or None)."""
    fmt, sep, rest = spec.partition(":")
    if not sep or fmt not in FORMATS:
        raise DatasetError(f"dataset spec {spec!r} must be FORMAT:PATH with FORMAT one of {', '.join(FORMATS)} "
                           "(or demo, or synthetic:SEED[:N])")
    split, limit = "all", None
    if "@" in rest:
        path_part, _, maybe = rest.rpartition("@")
        name, colon, count = maybe.partition(":")
        if name in ("train", "dev", "all"):
            rest, split = path_part, name
            if colon:
                if not (count.isdigit() and int(count) > 0):
                    raise DatasetError(f"dataset spec {spec!r}: @{name}:N needs a positive whole number N, not {count!r}")
                limit = int(count)
    path = Path(rest).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset file {path} does not exist")
    if fmt == "auto":
        fmt = guess_format(path)
    return fmt, path, split, limit


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


def _id_hash(item_id: str) -> str:
    # Another hash than the split's, so a subset of a split is not biased by the split itself.
    return hashlib.sha256(b"subset:" + item_id.encode()).hexdigest()


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
    fmt, path, split, limit = parse_spec(spec)
    try:
        items = _LOADERS[fmt](path, pubmedqa_long) if fmt == "pubmedqa" else _LOADERS[fmt](path)
    except DatasetError:
        raise
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"cannot read {fmt} dataset {path}: cannot decompress it ({exc})") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"cannot read {fmt} dataset {path}: not UTF-8 text (byte {exc.start})") from None
    except (OSError, ValueError, KeyError, TypeError, SyntaxError, IndexError, AttributeError) as exc:
        raise DatasetError(f"cannot read {fmt} dataset {path}: {type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:300]}") from None
    except (RecursionError, MemoryError):  # a value nested too deeply for json or literal_eval
        raise DatasetError(f"cannot read {fmt} dataset {path}: a value is nested too deeply") from None
    if split == "train":
        items = [it for it in items if not in_dev(split_key(it))]
    elif split == "dev":
        items = [it for it in items if in_dev(split_key(it))]
    if limit is not None and limit < len(items):
        keep = set(sorted(range(len(items)), key=lambda i: (_id_hash(items[i].id), i))[:limit])
        items = [it for i, it in enumerate(items) if i in keep]
    if not items:
        raise DatasetError(f"{spec}: no items")
    return items


# A dataset file is untrusted: what is read of it is bounded before it is parsed, so memory
# follows these limits (a few hundred MB at most), not the file. The bundled and supported
# datasets are far below them (NQ-Open oracle: 3.2 MB, 3 610 questions).
MAX_DATASET_BYTES = 128 * 2**20  # decompressed, per file
MAX_LINE_BYTES = 16 * 2**20
MAX_ITEMS = 250_000  # per file
MAX_QUESTION_CHARS = 4000  # as `regrad serve` takes
MAX_ANSWER_CHARS = 4000
MAX_ANSWERS = 100
KINDS = ("qa", "yesno", "cloze")


def _too_large(path: Path) -> DatasetError:
    return DatasetError(f"dataset {path} is larger than {MAX_DATASET_BYTES // 2**20} MB"
                        f"{' decompressed' if path.name.endswith('.gz') else ''}: split it into smaller files")


def _lines(path: Path):
    """(line number, text) of every non-blank line of ``path`` (gzip when it ends in .gz), read
    in bounded pieces: a line over MAX_LINE_BYTES or a file over MAX_DATASET_BYTES (counted
    decompressed, as a gzip bomb is) is a DatasetError before it is held."""
    opener = gzip.open if path.name.endswith(".gz") else open
    total = 0
    with opener(path, "rb") as fh:
        for line_no in itertools.count(1):
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            total += len(raw)
            if total > MAX_DATASET_BYTES:
                raise _too_large(path)
            if len(raw) > MAX_LINE_BYTES:
                raise DatasetError(f"{path}:{line_no}: a line longer than {MAX_LINE_BYTES // 2**20} MB")
            if raw.strip():
                try:
                    yield line_no, raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise DatasetError(f"{path}:{line_no}: not UTF-8 text (byte {exc.start})") from None


def _read_json(path: Path):
    """A whole-file JSON dataset, its size checked before it is read."""
    if path.stat().st_size > MAX_DATASET_BYTES:
        raise _too_large(path)
    return json.loads(path.read_text(encoding="utf-8"))


def _item(items: list, where: str, item_id, question, answers, documents, kind: str = "qa",
          meta: dict | None = None) -> None:
    """Append one checked QAItem: the types and sizes every consumer relies on, or a
    DatasetError naming ``where`` (file:line or file[key])."""
    if len(items) >= MAX_ITEMS:
        raise DatasetError(f"{where}: more than {MAX_ITEMS} questions in one file: split it")
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or str(item_id) == "":
        raise DatasetError(f'{where}: "id" must be a non-empty string or an integer')
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f'{where}: "question" must be a non-empty string')
    if len(question) > MAX_QUESTION_CHARS:
        raise DatasetError(f'{where}: "question" is longer than {MAX_QUESTION_CHARS} characters')
    answers = answers if isinstance(answers, list) else [answers]
    if not answers or len(answers) > MAX_ANSWERS or not all(
            isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers):
        raise DatasetError(f'{where}: "answers" must be 1 to {MAX_ANSWERS} strings (or numbers)')
    answers = [str(a) for a in answers]
    if any(len(a) > MAX_ANSWER_CHARS for a in answers):
        raise DatasetError(f'{where}: an answer is longer than {MAX_ANSWER_CHARS} characters')
    documents = documents if isinstance(documents, list) else [documents]
    if not all(isinstance(d, str) for d in documents):
        raise DatasetError(f'{where}: "documents" must be a string or a list of strings')
    if kind not in KINDS:
        raise DatasetError(f'{where}: "kind" must be one of {", ".join(KINDS)}')
    items.append(QAItem(str(item_id), question, answers, documents, kind, meta or {}))


def _json_lines(path: Path, kind: str) -> Iterator[tuple[str, int, Any]]:
    """(where, line number, parsed value) for each non-blank line of a JSON-lines file."""
    for line_no, line in _lines(path):
        where = f"{path}:{line_no}"
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise DatasetError(f"{where}: malformed {kind}record ({exc})") from None
        yield where, line_no, rec


def _load_nq(path: Path) -> list[QAItem]:
    items: list[QAItem] = []
    for where, _, rec in _json_lines(path, "NQ-Open "):
        try:
            ctx = rec["ctxs"][0]
            text = f"{ctx.get('title', '')}\n{ctx['text']}".strip()
            qid = "nq-" + hashlib.sha1(str(rec["question"]).encode()).hexdigest()[:12]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise DatasetError(f"{where}: malformed NQ-Open record ({type(exc).__name__}: {exc})") from None
        _item(items, where, qid, rec["question"], rec.get("answers"), [text], "qa", {"title": ctx.get("title", "")})
    return items


def _load_pubmedqa(path: Path, long_answer: bool = False) -> list[QAItem]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a PubMedQA file is one object keyed by PMID")
    items: list[QAItem] = []
    for pmid, rec in data.items():
        where = f"{path}[{pmid}]"
        try:
            contexts = rec["CONTEXTS"]
            if isinstance(contexts, str):
                contexts = ast.literal_eval(contexts)
            doc = " ".join(contexts)
            question = rec["QUESTION"] + " Answer yes, no or maybe."
            answers = [rec["final_decision"]]
            if long_answer and rec.get("LONG_ANSWER"):
                answers = [rec["LONG_ANSWER"]]
        except (ValueError, KeyError, TypeError, SyntaxError, AttributeError) as exc:
            raise DatasetError(f"{where}: malformed PubMedQA record ({type(exc).__name__}: {exc})") from None
        _item(items, where, f"pubmedqa-{pmid}", question, answers, [doc], "qa" if long_answer else "yesno",
              {"long_answer": rec.get("LONG_ANSWER", "")})
    return items


def _as_list(value) -> list:
    if isinstance(value, list):
        return value
    return list(ast.literal_eval(value))


def _load_fictional(path: Path) -> list[QAItem]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a fictional-knowledge file is a list of records")
    items: list[QAItem] = []
    for d_idx, rec in enumerate(data):
        where = f"{path}[{d_idx}]"
        try:
            doc = rec["train_context"]
            probes = []
            for level in ("mem", "gen", "hard_gen"):
                inputs = _as_list(rec.get(f"{level}_input", []))
                targets = _as_list(rec.get(f"{level}_target", []))
                probes += [(level, p_idx, prompt, target)
                           for p_idx, (prompt, target) in enumerate(zip(inputs, targets))]
        except (ValueError, KeyError, TypeError, SyntaxError, AttributeError) as exc:
            raise DatasetError(f"{where}: malformed fictional-knowledge record ({type(exc).__name__}: {exc})") from None
        for level, p_idx, prompt, target in probes:
            # Split by document, so that a dev probe's document was never trained on.
            _item(items, where, f"fictional-{d_idx}-{level}-{p_idx}", prompt, [target], [doc],
                  "cloze", {"level": level, "doc": d_idx})
    return items


def _load_jsonl(path: Path) -> list[QAItem]:
    items: list[QAItem] = []
    for where, line_no, rec in _json_lines(path, ""):
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: a record must be a JSON object, not {type(rec).__name__}")
        if "question" not in rec or "answers" not in rec:
            raise DatasetError(f'{where}: malformed record (needs "question" and "answers")')
        _item(items, where, rec["id"] if rec.get("id") is not None else f"{path.name}:{line_no}",
              rec["question"], rec["answers"],
              rec.get("documents") or [], rec.get("kind", "qa"),
              {k: v for k, v in rec.items() if k not in ("question", "answers", "documents")})
    return items


_LOADERS = {"nq-open": _load_nq, "pubmedqa": _load_pubmedqa, "fictional": _load_fictional,
            "jsonl": _load_jsonl}


def split_key(item: QAItem) -> str:
    """Fictional probes split by document (a dev document is never seen in training)."""
    if item.id.startswith("fictional-"):
        return item.id.rsplit("-", 2)[0]
    return item.id
