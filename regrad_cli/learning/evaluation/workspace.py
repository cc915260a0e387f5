"""The documents `regrad eval` retrieves from, and the workspaces that hold them.

Hard retrieval by default: the workspace holds every supporting document of the evaluated split
(not only the ``--limit`` questions'), plus any ``--corpus`` distractors (folders, JSONL files, or
another dataset's documents). The dataset's documents are written to one JSONL file with ids
``doc-<sha256 of the text>[:16]`` (chunks get ``#k``), so the gold documents of a question are
known by id. A workspace is keyed by its content (documents, distractor files, model, learner and
the tensors its bank stores, embedder, chunking) and kept under ``--cache``: a second eval on the
same data opens it again and the bank build finds nothing to do. Eval workspaces never use
``$REGRAD_BANK_URI``: their banks live inside them, never in the user's bank location.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from regrad_cli.learning.datasets import is_dataset_spec, load_dataset
from regrad_cli.learning.qa import QAItem, corpus_of
from regrad_cli.errors import ConfigError
from regrad_cli.files import atomic_write_text

log = logging.getLogger("regrad")

MARKER = ".regrad-eval-workspace"
READY = "eval-ready.json"


def doc_id(text: str) -> str:
    return "doc-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def write_corpus(path: Path, docs: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            title = d.split("\n", 1)[0].strip().lstrip("# ")[:120]
            fh.write(json.dumps({"id": doc_id(d), "title": title, "text": d}, ensure_ascii=False) + "\n")


@dataclass
class Distractors:
    """``--corpus`` values, resolved: texts of other datasets' documents and paths to ingest."""

    texts: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    specs: list[str] = field(default_factory=list)


def load_distractors(specs: Sequence[str]) -> Distractors:
    out = Distractors(specs=list(specs))
    for spec in specs:
        if is_dataset_spec(spec):
            out.texts += corpus_of(load_dataset(spec))
            continue
        p = Path(spec).expanduser()
        if not p.exists():
            raise ConfigError(f"--corpus {spec}: no such folder or file, and not a dataset spec "
                              "(FORMAT:PATH, demo or synthetic:SEED)")
        out.paths.append(p.resolve())
    return out


def pool_documents(split_items: Sequence[QAItem], items: Sequence[QAItem], pool: str,
                   distractors: Distractors) -> list[str]:
    """The dataset-side documents of the workspace: the evaluated questions' own first, then the
    rest of the split (pool "split"), then other datasets' documents; each text once."""
    docs = corpus_of(list(items))
    if pool == "split":
        docs += corpus_of(list(split_items))
    docs += distractors.texts
    return list(dict.fromkeys(d for d in docs if d.strip()))


def _hash_path(h, path: Path) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)


def content_key(docs: Sequence[str], paths: Sequence[Path], engine, embedder_fp: dict) -> str:
    from regrad_cli.workspace.config import RegradConfig

    h = hashlib.sha256()
    chunking = RegradConfig().chunking
    # The learner is part of the key too (its id and the tensors a bank stores for it): a bank
    # path names only the checkpoint, and a learner whose stored layout changed (energy shares)
    # could not use the old rows.
    h.update(json.dumps({"model": engine.lm.fingerprint, "embedder": embedder_fp,
                         "learner": engine.learner.checkpoint_id(), "layout": engine.stored_tensors(),
                         "chunking": [chunking.max_tokens, chunking.overlap]}, sort_keys=True, default=str).encode())
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8")).digest())
    for p in paths:
        _hash_path(h, p)
    return h.hexdigest()


def _open_eval_ws(root: Path, cfg, engine, injected: bool):
    from regrad_cli.workspace.config import Workspace

    # Banks of an eval are computed in float32 whatever the CPU, so that its figures do not depend
    # on the machine's bf16 support (a user's build-bank defaults to bf16 where it is native).
    overrides = {"learner.checkpoint": cfg.checkpoint, "bank.compute_dtype": "float32"}
    if not injected:
        overrides["model.id"] = engine.model_id
        overrides["model.device"] = cfg.device
    ws = Workspace.open(root, create=True, overrides=overrides)
    (root / MARKER).write_text("made by regrad eval\n")
    ws.use_bank_env = False  # an eval workspace never writes to the user's bank location
    return ws


def fresh_workspace(root: Path, cfg, engine, injected: bool):
    """An empty eval workspace at ``root`` (continual mode feeds it batch by batch). Only a folder
    that an earlier eval made (its marker file) is ever deleted."""
    if root.exists():
        if not (root / MARKER).is_file():
            raise ConfigError(f"{root} exists and was not made by `regrad eval`: move it away or choose another --out")
        shutil.rmtree(root)
    return _open_eval_ws(root, cfg, engine, injected)


def cached_workspace(cfg, engine, embedder, docs: Sequence[str], paths: Sequence[Path], *, injected: bool):
    """(workspace, info): the content-keyed eval workspace holding ``docs`` and ``paths``, ingested
    on first use and reused afterwards; the bank for the current learner is built (incrementally)."""
    from regrad_cli.offline.ingest import ingest

    key = content_key(docs, paths, engine, embedder.fingerprint)
    home = Path(cfg.cache) / key[:16]
    root = home / "workspace"
    if root.exists() and not (root / MARKER).is_file():
        raise ConfigError(f"{root} exists and was not made by `regrad eval`: move it away or choose another --cache")
    home.mkdir(parents=True, exist_ok=True)
    ws = _open_eval_ws(root, cfg, engine, injected)
    ready = root / READY
    info = {"key": key, "path": str(root), "documents": len(docs), "corpus_paths": [str(p) for p in paths]}
    try:
        reused = json.loads(ready.read_text()).get("key") == key
    except (OSError, ValueError):
        reused = False
    if not reused:
        corpus = home / "corpus.jsonl"  # outside the workspace: ingest never reads its own folder
        write_corpus(corpus, docs)
        summary = ingest(ws, [corpus, *paths], embedder=embedder, tokenizer=engine.tokenizer)
        info["ingest"] = summary.to_dict() if hasattr(summary, "to_dict") else str(summary)
        atomic_write_text(ready, json.dumps({"key": key, "documents": len(docs)}))
    info["reused"] = reused
    return ws, info


def gold_ids(store_ids: Sequence[str], items: Sequence[QAItem], *, texts: dict[str, str] | None = None) -> list[list[str]]:
    """Per question, the ids of the workspace rows that are (chunks of) its supporting documents.

    By id for the eval's own workspaces; for a user's ``--workspace`` (``texts`` given) by text:
    a row is gold when its whitespace-squashed text lies inside a supporting document."""
    if texts is None:
        by_base: dict[str, list[str]] = {}
        for i in store_ids:
            by_base.setdefault(i.split("#", 1)[0], []).append(i)
        return [[i for d in it.documents for i in by_base.get(doc_id(d), [])] for it in items]
    squashed = {i: " ".join(t.split()) for i, t in texts.items()}
    out = []
    for it in items:
        golds = [" ".join(d.split()) for d in it.documents if d.strip()]
        out.append([i for i, t in squashed.items() if t and any(t in g for g in golds)])
    return out
