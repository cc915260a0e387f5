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
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reliability_helpers import run_cli

QUESTION = "What is topic 1 about?"
REPO = Path(__file__).resolve().parent.parent


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
    elif how in ("format-digits", "id-int", "spec-types"):  # an id no longer matching: dropped
        meta = json.loads(config.read_text())
        meta.pop("checkpoint_id")
        if how == "format-digits":  # int() of over 4300 digits raises ValueError
            meta["format"] = "regrad-learner/1." + "9" * 5000
        elif how == "id-int":  # subscripted in the mismatch message
            meta["checkpoint_id"] = 5
        else:  # a string where a number goes failed in the maths
            meta["spec"]["lora_alpha"] = "nan"
        config.write_text(json.dumps(meta))


CHECKPOINT_DAMAGE = ["truncated-tensors", "header-bomb", "empty-tensors", "deep-json", "json-list",
                     "not-utf8", "bad-names", "bad-spec", "no-tensors", "format-digits", "id-int", "spec-types"]


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


def _sparse_tensors(path: Path, values: int) -> None:
    """``path`` rewritten as a sparse safetensors file with a well-formed header whose first
    tensor holds ``values`` float32 values (the rest keep their shapes; every byte reads zero)."""
    import struct

    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    header.pop("__metadata__", None)
    first, offset, out = sorted(header)[0], 0, {}
    for name in sorted(header):
        shape = [4, values // 4] if name == first else header[name]["shape"]
        size = 4 * (int(np.prod(shape)) if shape else 1)
        out[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(out).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)


def test_a_sparse_checkpoint_is_refused_before_it_is_read(base, tmp_path, capsys, monkeypatch):
    """A learner.safetensors of 4 GB that is all holes, with a well-formed header: it was read
    whole (4 GB of memory, or "out of memory" under a limit) before its shapes were found not to
    fit. Loaded for a model, a tensors file larger than a learner of its spec can be on that
    model is now refused unread. Run with the address space capped 1 GiB above the start."""
    import resource

    case = _copy(base, tmp_path)
    ck = tmp_path / "sparse-ck"
    shutil.copytree(case / "ck", ck)
    _sparse_tensors(ck / "learner.safetensors", 1 << 30)
    ws = ["--workspace", case / "ws"]
    size = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:")][0]
    old = resource.getrlimit(resource.RLIMIT_AS)
    for args in (["query", QUESTION, "--checkpoint", ck], ["build-bank", "--checkpoint", ck],
                 ["learner", "energy", "--checkpoint", ck, "--docs", "2"]):
        resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), old[1]))
        try:
            err = _check([*args, *ws], capsys, monkeypatch)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, old)
        assert "refused before reading it" in err, (args, err)


def test_a_state_whose_version_has_thousands_of_digits_is_one_error(tmp_path):
    """`meta-train --resume` read a state.pt whose format version has 5000 digits with a
    ValueError traceback (int() of over 4300 digits): it is one RegradError now."""
    import torch

    from regrad_cli.errors import RegradError
    from regrad_cli.learning.train_state import STATE_FORMAT, read_state

    path = tmp_path / "state.pt"
    torch.save({"format": f"{STATE_FORMAT}/1." + "9" * 5000}, path)
    with pytest.raises(RegradError, match="is not MAJOR.MINOR"):
        read_state(path)


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


TOML_DIGITS = "9" * 5000  # past Python's 4300-digit limit: int() raises a plain ValueError


@pytest.mark.parametrize("name", ["format-version-digits", "integer-digits", "device-mps", "fake-embedder-dim"])
def test_a_config_that_passed_the_schema_or_the_parser_badly_is_one_line(base, tmp_path, capsys, monkeypatch, name):
    """Values that got past the parser or the schema and failed later with a traceback (a
    version or integer of 5000 digits, the MPS device on a machine without it) or with memory
    (a fake embedder of 999 999 999 dimensions): one line, before any work."""
    case = _copy(base, tmp_path)
    cfg = case / "ws" / "regrad.toml"
    text = cfg.read_text()
    text = {"format-version-digits": text.replace('format_version = "1.2"', f'format_version = "1.{TOML_DIGITS}"'),
            "integer-digits": text.replace("seed = 0", f"seed = {TOML_DIGITS}"),
            "device-mps": text.replace('device = "cpu"', 'device = "mps"'),
            "fake-embedder-dim": text.replace('id = "fake:hash-32"', 'id = "fake:hash-999999999"')}[name]
    assert text != cfg.read_text()
    cfg.write_text(text)
    (case / "corpus" / "new.txt").write_text("A new document about epsilon.")
    ws = ["--workspace", case / "ws"]
    commands = {"format-version-digits": [["ingest", case / "corpus"], ["query", QUESTION], ["build-bank"], ["bank", "stats"]],
                "integer-digits": [["ingest", case / "corpus"], ["query", QUESTION], ["build-bank"], ["bank", "stats"]],
                "device-mps": [["query", QUESTION], ["learner", "energy", "--docs", "2"]],  # they load the model
                "fake-embedder-dim": [["ingest", case / "corpus"]]}[name]
    if name == "fake-embedder-dim":  # only the config copied: an ingested workspace refuses another embedder
        shutil.rmtree(case / "ws" / "db")
        shutil.rmtree(case / "ws" / "banks")
    expected = {"format-version-digits": "is not MAJOR.MINOR", "integer-digits": "more than 4300 digits",
                "device-mps": "MPS is not available", "fake-embedder-dim": "from 1 to 4096"}[name]
    for args in commands:
        if name == "fake-embedder-dim":  # the files are read (progress lines) before the embedder loads
            code, out, err = run_cli([*args, *ws], capsys, monkeypatch)
            assert code == 1 and err.strip().splitlines()[-1].startswith("Error:"), (args, err)
        else:
            err = _check([*args, *ws], capsys, monkeypatch)
        assert expected in err, (args, err)


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
    # The damaged documents table is named in one line, not Lance's stack: by a query that reads
    # the texts, and by ingest, which reads every row before it writes (exit 1, not a pyarrow error).
    if damage == "documents-data-missing":
        err = _check(["query", QUESTION, "--mode", "context", *ws], capsys, monkeypatch)
        assert "documents table" in err, err
    if damage.startswith("documents"):
        err = _check(["ingest", case / "corpus", *ws], capsys, monkeypatch)
        assert "documents table" in err and "Traceback" not in err, err


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


# Hostile dataset files for `regrad eval` --------------------------------------------------------
def _write_dataset(path: Path, how: str) -> Path:
    import gzip

    ok = json.dumps({"question": "What is topic 1 about?", "answers": ["alpha"]})
    if how == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" + bytes(range(256)) * 4)
    elif how == "not-utf8":
        path.write_bytes(ok.encode() + b"\n" + b'{"question": "\xff\xfe", "answers": ["a"]}\n')
    elif how == "huge-line":
        with open(path, "wb") as fh:  # 17 MB without a newline
            for _ in range(17):
                fh.write(b"x" * 2**20)
    elif how == "deep":
        path.write_text('{"question": "q", "answers": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    elif how.startswith("type-"):
        bad = {"type-question": {"question": 5, "answers": ["a"]},
               "type-answers": {"question": "q", "answers": {"a": 1}},
               "type-no-answers": {"question": "q", "answers": []},
               "type-documents": {"question": "q", "answers": ["a"], "documents": [{"x": 1}]},
               "type-id": {"id": ["x"], "question": "q", "answers": ["a"]},
               "type-kind": {"question": "q", "answers": ["a"], "kind": "essay"},
               "type-long-question": {"question": "q" * 5000, "answers": ["a"]},
               "type-record": ["q", "a"]}[how]
        path.write_text(ok + "\n" + json.dumps(bad) + "\n")
    elif how == "gzip-bomb":  # 64 MB decompressed, one endless line, from a few KB
        path = path.with_suffix(".jsonl.gz")
        member = gzip.compress(b"a" * 2**20)  # gzip members may follow one another
        path.write_bytes(member * 64)
    elif how == "not-gzip":
        path = path.with_suffix(".jsonl.gz")
        path.write_bytes(b"this is not gzip data")
    return path


DATASET_ATTACKS = ["binary", "not-utf8", "huge-line", "deep", "type-question", "type-answers", "type-no-answers",
                   "type-documents", "type-id", "type-kind", "type-long-question", "type-record", "gzip-bomb",
                   "not-gzip"]


@pytest.mark.parametrize("how", DATASET_ATTACKS)
def test_a_hostile_eval_dataset_is_one_line(tmp_path, capsys, monkeypatch, how):
    """`regrad eval --dataset jsonl:FILE` on a hostile file: exit 1, one line naming the file
    (and the line where there is one), before any model loads."""
    data = _write_dataset(tmp_path / "questions.jsonl", how)
    err = _check(["eval", "--dataset", f"jsonl:{data}", "--model", "fake:llama", "--embedder", "fake:hash-32",
                  "--systems", "closed-book", "--out", tmp_path / "out", "--cache", tmp_path / "cache"],
                 capsys, monkeypatch)
    assert data.name in err, err
    if how.startswith("type-"):
        assert f"{data.name}:2" in err, err  # the first line is fine: the second is named


_DATASET_CHILD = r"""
import gzip, json, resource, sys
sys.path[:0] = [sys.argv[2]]
from regrad_cli.errors import DatasetError
from regrad_cli.learning.datasets import load_dataset

def status(key):
    return [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":")][0]

limit = status("VmSize") + int(sys.argv[3]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    load_dataset(sys.argv[1])
    print("loaded")
except DatasetError as exc:
    print(json.dumps({"error": str(exc), "peak_mb": status("VmHWM") / 2**20}))
"""


@pytest.mark.parametrize("shape", ["records", "documents"])
def test_a_dataset_bomb_stops_at_the_limits_with_bounded_memory(tmp_path, shape):
    """A .jsonl.gz of 1.5 GB decompressed (valid records, tiny or with 1 KB documents) is
    refused at the item or size limit in a child whose address space is capped 600 MB above its
    start: without the limits, its questions alone would need several GB."""
    import gzip

    path = tmp_path / "bomb.jsonl.gz"
    doc = "x" * (1000 if shape == "documents" else 0)
    line = (json.dumps({"question": "q?", "answers": ["a"], "documents": [doc]}) + "\n").encode()
    member = gzip.compress(line * (2**20 // len(line)))  # gzip members may follow one another
    path.write_bytes(member * 1536)
    r = subprocess.run([sys.executable, "-c", _DATASET_CHILD, f"jsonl:{path}", str(REPO), "600"],
                       capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expected = "more than 250000 questions" if shape == "records" else "larger than 128 MB decompressed"
    assert expected in out["error"], out


# A hostile --init checkpoint for `regrad meta-train` -----------------------------------------------
INIT_ATTACKS = ["truncated-tensors", "header-bomb", "deep-json", "json-list", "not-utf8", "bad-spec", "no-tensors",
                "missing-dir", "a-file", "empty-dir", "other-model", "other-shapes"]


@pytest.mark.parametrize("how", INIT_ATTACKS)
def test_a_hostile_init_checkpoint_is_one_line_in_meta_train(base, tmp_path, capsys, monkeypatch, how):
    case = _copy(base, tmp_path)
    ck = tmp_path / "init"
    if how == "missing-dir":
        pass
    elif how == "a-file":
        ck.write_text("not a checkpoint")
    elif how == "empty-dir":
        ck.mkdir()
    elif how == "other-model":  # a whole learner, of another model family (other names and shapes)
        from regrad_cli.learner.persistence import save_learner
        from regrad_cli.workspace.config import Workspace
        from regrad_cli.workspace.engine import Engine

        other = Workspace.open(tmp_path / "other-ws", overrides={"model.id": "fake:gpt2", "embedder.id": "fake:hash-32",
                                                                 "lora.rank": 2})
        save_learner(Engine.load(other, checkpoint="init").learner, ck)
    elif how == "other-shapes":  # the model's module names, other tensor shapes, a matching content id
        import torch

        from regrad_cli.learner.lora import Learner
        from regrad_cli.learner.persistence import save_learner

        learner = Learner.load(case / "ck")
        key = next(iter(learner.phi.keys()))
        learner.phi[key] = torch.nn.Parameter(torch.zeros(learner.phi[key].shape[0], 7))
        save_learner(learner, ck)
    else:
        shutil.copytree(case / "ck", ck)
        _damage_checkpoint(ck, how)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": f"What is topic {i} about?", "answers": ["alpha"],
                                         "documents": [f"Document {i} is about topic {i}."]}) + "\n" for i in range(4)))
    err = _check(["meta-train", "--train", f"jsonl:{train}", "--init", ck, "--model", "fake:llama",
                  "--steps", "1", "--meta-batch", "1", "--k", "1", "--out", tmp_path / "run",
                  "--workspace", case / "ws"], capsys, monkeypatch)
    assert any(w in err for w in ("init", "checkpoint", "does not fit")), err
