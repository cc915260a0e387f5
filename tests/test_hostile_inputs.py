"""Hostile inputs through every command (issue 32): each ends with exit 0, 1 or 2 and one line on
stderr, never a Python traceback.

The corpus: damaged learner checkpoints given with ``--checkpoint`` (truncated tensors, a header
claiming petabytes, a deeply nested or non-object learner.json, wrong names), hostile regrad.toml
values, a documents table or bank with a data file missing or a manifest cut short, a bank holding
a link, and a corpus of hostile files. Everything runs in this process on the tiny fake models
(``fake:llama``, ``fake:hash-32``), so the whole corpus stays in the everyday loop.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from reliability_helpers import run_cli

QUESTION = "What is topic 1 about?"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A workspace with 4 documents, a saved 'init' learner as its checkpoint, and its bank."""
    from _pytest.monkeypatch import MonkeyPatch

    from regrad_cli.learner.persistence import save_learner
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.workspace.engine import Engine

    root = tmp_path_factory.mktemp("hostile")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(f"Document {i} is about topic {i}: alpha beta gamma delta.")
    ws = root / "ws"
    w = Workspace.open(ws, overrides={"model.id": "fake:llama", "embedder.id": "fake:hash-32"})
    save_learner(Engine.load(w, checkpoint="init").learner, root / "ck")
    w.config.learner.checkpoint = str(root / "ck")
    w.save()
    mp = MonkeyPatch()
    try:
        for args in (["ingest", corpus, "--workspace", ws], ["build-bank", "--workspace", ws]):
            code, out, err = _cli(args, mp)
            assert code == 0, (args, out, err)
    finally:
        mp.undo()
    return root


def _cli(args, mp):
    """regrad ARGS in this process: (exit code, stdout, stderr); a raised exception propagates."""
    import contextlib
    import io
    import sys

    from regrad_cli.cli import main

    mp.setattr(sys, "argv", ["regrad", *map(str, args)])
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def _copy(base: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "case"
    shutil.copytree(base, dst, symlinks=True)
    cfg = dst / "ws" / "regrad.toml"
    cfg.write_text(cfg.read_text().replace(str(base), str(dst)))
    return dst


def _check(args, capsys, monkeypatch, expect_fail: bool = True) -> str:
    code, out, err = run_cli(args, capsys, monkeypatch)  # fails on "Traceback"
    assert code in (0, 1, 2), (args, code, err)
    if expect_fail:
        assert code != 0, (args, out, err)
        assert len(err.strip().splitlines()) == 1, (args, err)
    return err


# Damaged learner checkpoints ---------------------------------------------------------------------
def _damage_checkpoint(ck: Path, how: str) -> None:
    tensors, config = ck / "learner.safetensors", ck / "learner.json"
    if how == "truncated-tensors":
        data = tensors.read_bytes()
        tensors.write_bytes(data[: len(data) // 2])
    elif how == "header-bomb":
        tensors.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    elif how == "empty-tensors":
        tensors.write_bytes(b"")
    elif how == "deep-json":
        config.write_text("[" * 200_000 + "]" * 200_000)
    elif how == "json-list":
        config.write_text("[1, 2]")
    elif how == "not-utf8":
        config.write_bytes(b"\xff\xfe{")
    elif how == "bad-names":
        meta = json.loads(config.read_text())
        meta["names"] = [1, None]
        config.write_text(json.dumps(meta))
    elif how == "bad-spec":
        meta = json.loads(config.read_text())
        meta["spec"] = {"rank": "many"}
        config.write_text(json.dumps(meta))
    elif how == "no-tensors":
        tensors.unlink()


CHECKPOINT_DAMAGE = ["truncated-tensors", "header-bomb", "empty-tensors", "deep-json", "json-list",
                     "not-utf8", "bad-names", "bad-spec", "no-tensors"]


@pytest.mark.parametrize("how", CHECKPOINT_DAMAGE)
def test_a_damaged_checkpoint_is_one_line_everywhere(base, tmp_path, capsys, monkeypatch, how):
    case = _copy(base, tmp_path)
    ck = tmp_path / "bad-ck"
    shutil.copytree(case / "ck", ck)
    _damage_checkpoint(ck, how)
    ws = ["--workspace", case / "ws"]
    for args in (["query", QUESTION, "--checkpoint", ck], ["build-bank", "--checkpoint", ck],
                 ["learner", "energy", "--checkpoint", ck, "--docs", "2"]):
        err = _check([*args, *ws], capsys, monkeypatch)
        assert "checkpoint" in err, err
    # The same checkpoint as the workspace's own (regrad.toml points at it).
    _damage_checkpoint(case / "ck", how)
    for args in (["query", QUESTION], ["build-bank"], ["bank", "stats"], ["bank", "compact"]):
        _check([*args, *ws], capsys, monkeypatch, expect_fail=args[0] != "bank")


# Hostile configurations ---------------------------------------------------------------------------
CONFIGS = {
    "max_tokens-text": ("chunking", "max_tokens", '"abc"'),
    "batch-text": ("embedder", "batch_size", '"x"'),
    "rank-huge": ("lora", "rank", "1000000000"),
    "zstd-level": ("bank", "zstd_level", "99"),
    "top_k-float": ("query", "top_k", "1.5"),
    "gamma-inf": ("query", "gamma", "inf"),
    "checkpoint-empty": ("learner", "checkpoint", '""'),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_hostile_config_is_one_line_in_every_command(base, tmp_path, capsys, monkeypatch, name):
    section, key, value = CONFIGS[name]
    case = _copy(base, tmp_path)
    cfg = case / "ws" / "regrad.toml"
    lines = [ln for ln in cfg.read_text().splitlines() if not ln.startswith(f"{key} = ")
             or _section_of(cfg.read_text(), ln) != section]
    text = "\n".join(lines).replace(f"[{section}]", f"[{section}]\n{key} = {value}", 1)
    cfg.write_text(text + "\n")
    ws = ["--workspace", case / "ws"]
    for args in (["ingest", case / "corpus"], ["build-bank"], ["query", QUESTION], ["query", QUESTION, "--mode", "context"],
                 ["bank", "stats"], ["bank", "verify"], ["bank", "compact"], ["bank", "rm", "d0.txt"],
                 ["learner", "energy", "--docs", "2"], ["serve", "--port", "1"]):
        err = _check([*args, *ws], capsys, monkeypatch)
        assert f"{section}.{key}" in err, (args, err)


def _section_of(text: str, line: str) -> str:
    section = ""
    for ln in text.splitlines():
        if ln.startswith("[") and ln.endswith("]"):
            section = ln[1:-1]
        if ln == line:
            return section
    return section


def test_a_config_that_is_not_toml_or_not_utf8(base, tmp_path, capsys, monkeypatch):
    case = _copy(base, tmp_path)
    cfg = case / "ws" / "regrad.toml"
    for content in (b"[model\nid = ", b"\xff\xfe\x00", b"[model]\nid = " + b"[" * 100_000,
                    b"# " + b"x" * (2 << 20)):
        cfg.write_bytes(content)
        for args in (["query", QUESTION], ["bank", "stats"], ["ingest", case / "corpus"]):
            _check([*args, "--workspace", case / "ws"], capsys, monkeypatch)


# Damaged tables -----------------------------------------------------------------------------------
def _first_data_file(table: Path) -> Path:
    return sorted((table / "data").iterdir())[0]


@pytest.mark.parametrize("damage", ["documents-data-missing", "documents-manifest-cut",
                                    "bank-data-missing", "bank-manifest-cut"])
def test_a_damaged_table_is_one_line_in_every_command(base, tmp_path, capsys, monkeypatch, damage):
    case = _copy(base, tmp_path)
    table = case / "ws" / "db" / "documents.lance" if damage.startswith("documents") else \
        next(p for p in (case / "ws" / "banks").glob("bank-*") if p.is_dir()) / "gradients.lance"
    if damage.endswith("data-missing"):
        _first_data_file(table).unlink()
    else:
        for m in (table / "_versions").iterdir():
            m.write_bytes(m.read_bytes()[:40])
    (case / "corpus" / "new.txt").write_text("A new document about epsilon.")
    ws = ["--workspace", case / "ws"]
    for args in (["ingest", case / "corpus"], ["build-bank"], ["query", QUESTION],
                 ["query", QUESTION, "--mode", "context"], ["bank", "stats"], ["bank", "verify"],
                 ["bank", "compact"], ["bank", "rm", "d1.txt"], ["bank", "rm", "d2.txt", "--keep-documents"]):
        _check([*args, *ws], capsys, monkeypatch, expect_fail=False)
    # The damaged documents table is named in one line, not Lance's stack.
    if damage == "documents-data-missing":
        err = _check(["query", QUESTION, "--mode", "context", *ws], capsys, monkeypatch)
        assert "documents table" in err, err


# A hostile corpus ---------------------------------------------------------------------------------
def test_a_hostile_corpus_is_skipped_or_refused_in_one_line(base, tmp_path, capsys, monkeypatch):
    case = _copy(base, tmp_path)
    corpus = case / "corpus"
    (corpus / "deep.json").write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (corpus / "deep.jsonl").write_text("[" * 100_000 + "\n")
    (corpus / "bad-utf8.txt").write_bytes(b"\xff\xfe\xfa not text")
    (corpus / "nul.md").write_bytes(b"# title\x00\n" + b"\x00" * 1000)
    (corpus / "ctrl.txt").write_text("escape \x1b[2J\x1b]0;title\x07 sequences")
    (corpus / "records.jsonl").write_text('{"text": 1}\n{"id": ["x"], "text": "t"}\n"str"\n{"text": "ok"}\n')
    (corpus / "empty.txt").write_text("")
    os.symlink("/etc/passwd", corpus / "outside.txt")
    os.symlink(corpus / "nowhere", corpus / "dangling.txt")
    ws = ["--workspace", case / "ws"]
    code, out, err = run_cli(["ingest", corpus, *ws], capsys, monkeypatch)
    assert code in (0, 1, 2), err
    for args in (["build-bank"], ["query", QUESTION], ["bank", "verify"]):
        _check([*args, *ws], capsys, monkeypatch, expect_fail=False)
