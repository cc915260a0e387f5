"""Minor findings of issue 32: build-bank fails when every document fails, the no-bank error
lists banks (not lock files), and ingest of an empty root says so."""

from __future__ import annotations

from reliability_helpers import run_cli


def test_build_bank_fails_when_every_document_fails_and_no_bank_lists_no_lock(tmp_path, capsys, monkeypatch):
    import torch

    from regrad_cli.learner.persistence import save_learner
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.workspace.engine import Engine

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"d{i}.txt").write_text(f"Document {i} about topic {i}.")
    ws = tmp_path / "ws"
    code, _, err = run_cli(["ingest", corpus, "--workspace", ws, "--model", "fake:llama",
                            "--embedder", "fake:hash-32"], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["build-bank", "--workspace", ws, "--checkpoint", "init"], capsys, monkeypatch)
    assert code == 0, err
    assert list((ws / "banks").glob("bank-*.build.lock"))  # the build's lease file sits beside the bank

    learner = Engine.load(Workspace.open(ws, create=False), checkpoint="init").learner
    with torch.no_grad():
        for n in learner.names:
            learner.tensor(n).fill_(float("nan"))
    save_learner(learner, tmp_path / "nan")
    for extra in ([], ["--json"]):
        code, out, err = run_cli(["build-bank", "--workspace", ws, "--checkpoint", tmp_path / "nan", *extra],
                                 capsys, monkeypatch)
        assert code == 1, (out, err)
        assert "every document to build failed (3)" in err, err

    learner2 = Engine.load(Workspace.open(ws, create=False), checkpoint="init").learner
    with torch.no_grad():
        learner2.tensor(learner2.names[0]).mul_(2.0)
    save_learner(learner2, tmp_path / "other")
    code, out, err = run_cli(["query", "topic?", "--workspace", ws, "--checkpoint", tmp_path / "other"],
                             capsys, monkeypatch)
    assert code == 1 and "no gradient bank" in err and "banks for other learner checkpoints" in err, err
    assert ".lock" not in err, err


def test_ingest_of_an_empty_root_says_nothing_was_found(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "mnt"
    empty.mkdir()
    for extra in ([], ["--prune"]):
        code, out, err = run_cli(["ingest", empty, "--workspace", tmp_path / "ws", "--model", "fake:llama",
                                  "--embedder", "fake:hash-32", *extra], capsys, monkeypatch)
        assert code == 1, (out, err)
        line = err.strip().splitlines()[-1]
        assert f"no files found under {empty}" in line and "0 path(s)" not in line, err
        if extra:
            assert "nothing pruned" in line, err


def test_meta_train_locality_text_is_read_bounded_with_one_clear_error(tmp_path, capsys, monkeypatch):
    """--locality-text: a missing, binary or too-short file is a usage error (exit 2), one line,
    before any model loads."""
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00" * 100)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    for path, says in ((tmp_path / "missing.txt", "cannot read it"), (binary, "not UTF-8"),
                       (short, "too short")):
        code, out, err = run_cli(["meta-train", "--train", "synthetic:1:2", "--model", "fake:llama",
                                  "--locality", "1", "--locality-text", path, "--out", tmp_path / "run"],
                                 capsys, monkeypatch)
        assert code == 2, (out, err)
        assert f"--locality-text {path}: {says}" in err and "Traceback" not in err, err
    code, out, err = run_cli(["meta-train", "--train", "synthetic:1:2", "--model", "fake:llama",
                              "--factor-cache-dtype", "int3", "--out", tmp_path / "run"], capsys, monkeypatch)
    assert code == 2 and "--factor-cache-dtype 'int3'" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
