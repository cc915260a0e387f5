"""A user's first day (issue 31), through the CLI: instant errors, nothing loaded when there is
nothing to do, state that never goes silently stale, `status` and `docs ls`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from reliability_helpers import run_cli

FAKE = ["--model", "fake:llama", "--embedder", "fake:hash-32"]


def _corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "quorra.md").write_text("Quorra Vell founded the Tessaly Guild in 1887.\n\nIt keeps maps.", encoding="utf-8")
    (root / "felix.md").write_text("Felix Darrow built the Ombra bridge in 1921.", encoding="utf-8")
    return root


def _learner_dir(ws_root: Path) -> Path:
    """The workspace's learner saved as a checkpoint directory and named in regrad.toml, so that
    its id (and so its bank) can be told from its files, as for the shipped checkpoint."""
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.workspace.engine import Engine

    ws = Workspace.open(ws_root, create=False)
    out = ws_root.parent / "learner"
    Engine.load(ws).learner.save(out)
    ws.config.learner.checkpoint = str(out)
    ws.save()
    return out


@pytest.fixture
def built(tmp_path, capsys, monkeypatch):
    """A workspace (the test's $REGRAD_WORKSPACE) with two documents and their bank."""
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path / "corpus")
    code, _, err = run_cli(["ingest", "corpus", *FAKE], capsys, monkeypatch)
    assert code == 0, err
    _learner_dir(tmp_path / "ws")
    code, _, err = run_cli(["build-bank", "--json"], capsys, monkeypatch)
    assert code == 0, err
    return tmp_path


def _loads(monkeypatch, tmp_path) -> Path:
    log = tmp_path / "loads.log"
    monkeypatch.setenv("REGRAD_FAKE_LOAD_LOG", str(log))
    return log


def test_bad_options_and_inputs_are_refused_before_any_model_loads(built, capsys, monkeypatch):
    log = _loads(monkeypatch, built)
    for args, code, words in [
        (["query", "q", "--mode", "parm"], 2, "--mode: unknown mode 'parm'"),
        (["query", "q", "--top-k", "-1"], 2, "--top-k: must be an integer from 0 to 64"),
        (["query", "q", "--retriever", "bm26"], 2, "--retriever: unknown retriever 'bm26'"),
        (["query", "q", "--min-score", "3"], 2, "--min-score"),
        (["query", "--batch", "missing.jsonl"], 1, "cannot read missing.jsonl"),
    ]:
        got, out, err = run_cli(args, capsys, monkeypatch)
        assert got == code and words in err, (args, got, err)
        assert err.startswith("Error: ") and len(err.strip().splitlines()) == 1, (args, err)
    assert not log.exists(), log.read_text()


def test_an_empty_workspace_is_told_to_run_ingest(tmp_path, capsys, monkeypatch):
    from regrad_cli.workspace.config import Workspace

    Workspace.open(tmp_path / "ws", overrides={"model.id": "fake:llama", "embedder.id": "fake:hash-32"})
    log = _loads(monkeypatch, tmp_path)
    for args in (["query", "q"], ["query", "q", "--mode", "rag+phi"], ["build-bank"]):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 1 and "run `regrad ingest PATH`" in err, (args, err)
    assert not log.exists()


def test_commands_with_nothing_to_do_load_no_model(built, capsys, monkeypatch):
    log = _loads(monkeypatch, built)
    code, out, _ = run_cli(["ingest", "corpus", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["unchanged"] == 2
    code, out, _ = run_cli(["build-bank", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["built"] == 0 and json.loads(out)["rows"] == 2
    code, out, _ = run_cli(["build-bank"], capsys, monkeypatch)
    assert code == 0 and out.startswith("up to date")
    for args in (["bank", "stats", "--json"], ["status", "--json"], ["docs", "ls"]):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 0, (args, err)
    assert not log.exists(), log.read_text()
    # A changed file is noticed (chunked and embedded again), and then the build has work.
    (built / "corpus" / "felix.md").write_text("Felix Darrow built the Ombra bridge in 1922.", encoding="utf-8")
    code, out, _ = run_cli(["ingest", "corpus", "--json"], capsys, monkeypatch)
    assert json.loads(out)["updated"] == 1
    code, out, _ = run_cli(["status", "--json"], capsys, monkeypatch)
    s = json.loads(out)
    assert (s["pending"], s["stale"], s["next"]) == (1, 1, "regrad build-bank")


def test_nothing_to_do_loads_no_model_with_an_untrained_learner_too(tmp_path, capsys, monkeypatch):
    """A workspace of a model without a shipped learner (the guide's `fake:` try-out, or any
    Hugging Face model) uses an untrained learner whose id needs the model: an up-to-date
    `build-bank` loaded it and printed "built 0, skipped 5". The first load records the id
    under a key of what the learner is made from; a changed key means a load again."""
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path / "corpus")
    assert run_cli(["ingest", "corpus", *FAKE], capsys, monkeypatch)[0] == 0
    code, out, err = run_cli(["build-bank", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["built"] == 2, err
    log = _loads(monkeypatch, tmp_path)
    code, out, _ = run_cli(["build-bank"], capsys, monkeypatch)
    assert code == 0 and out.startswith("up to date"), out
    code, out, _ = run_cli(["status", "--json"], capsys, monkeypatch)
    s = json.loads(out)
    assert s["learner"]["checkpoint_id"] and s["bank"]["learner_checkpoint_id"] == s["learner"]["checkpoint_id"]
    assert (s["rows"], s["pending"], s["next"]) == (2, 0, None)
    code, out, _ = run_cli(["status"], capsys, monkeypatch)  # the table folds the bank's path, whole
    assert code == 0 and s["bank"]["path"].replace(" ", "") in "".join(re.sub(r"[│|]", "", out).split())
    assert not log.exists(), log.read_text()
    toml = tmp_path / "ws" / "regrad.toml"
    toml.write_text(toml.read_text().replace("seed = 0", "seed = 1"))  # another untrained learner
    code, out, _ = run_cli(["build-bank", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["built"] == 2 and "model fake:llama" in log.read_text()


def test_bank_rm_of_an_unknown_id_names_the_chunk_ids(built, capsys, monkeypatch):
    code, _, err = run_cli(["bank", "rm", "corpus/quorra.md"], capsys, monkeypatch)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "corpus/quorra.md#0" in err and "--source corpus/quorra.md" in err and "nothing was removed" in err
    code, _, err = run_cli(["bank", "rm", "nothing-like-it"], capsys, monkeypatch)
    assert code == 1 and "regrad docs ls" in err
    code, out, _ = run_cli(["status", "--json"], capsys, monkeypatch)
    assert json.loads(out)["rows"] == 2  # nothing removed
    code, out, _ = run_cli(["bank", "rm", "corpus/quorra.md#0", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["removed_rows"] == 1


def test_bank_rm_of_an_unknown_source_exits_1_and_removes_nothing(built, capsys, monkeypatch):
    """`--source` of a path no document came from is refused like an unknown id (it used to
    exit 0 having removed nothing), naming the sources that look like it; a removed source can
    be named again (the re-run that finishes an interrupted removal)."""
    for given, hint in (("quorra.md", "sources like it: corpus/quorra.md"),
                        ("corpus/nobody.md", "regrad docs ls"), ("./corpus/felix.md", "corpus/felix.md")):
        code, out, err = run_cli(["bank", "rm", "--source", given, "--json"], capsys, monkeypatch)
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, (given, out, err)
        assert f"no document from source {given!r}" in err and hint in err and "nothing was removed" in err, err
    code, _, err = run_cli(["bank", "rm", "corpus/quorra.md#0", "--source", "nowhere.md"], capsys, monkeypatch)
    assert code == 1 and "'nowhere.md'" in err, err
    code, _, err = run_cli(["bank", "rm", "--source", "nowhere.md", "--keep-documents"], capsys, monkeypatch)
    assert code == 1 and "'nowhere.md'" in err, err
    code, out, _ = run_cli(["status", "--json"], capsys, monkeypatch)
    assert (json.loads(out)["rows"], json.loads(out)["documents"]) == (2, 2)  # nothing removed
    assert not (built / "ws" / "tombstones.json").exists()
    for _ in range(2):  # removed, then named again: accepted both times
        code, out, err = run_cli(["bank", "rm", "--source", "corpus/felix.md", "--json"], capsys, monkeypatch)
        assert code == 0, err
    code, out, _ = run_cli(["status", "--json"], capsys, monkeypatch)
    assert (json.loads(out)["rows"], json.loads(out)["documents"]) == (1, 1)


def _cli_in_subprocess(args: list[str], cwd: Path) -> tuple[int, str, list[str]]:
    """(exit status, stderr, the heavy modules imported) of `regrad ARGS` in a fresh interpreter."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys\n"
            "from regrad_cli.cli import main\n"
            f"sys.argv = ['regrad', *{args!r}]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    status = exc.code\n"
            "heavy = [m for m in ('lancedb', 'torch', 'transformers', 'sentence_transformers') if m in sys.modules]\n"
            "print('HEAVY', status, *heavy, file=sys.stderr)\n")
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    lines = run.stderr.strip().splitlines()
    last = lines[-1].split() if lines else []
    assert last[:1] == ["HEAVY"], run.stderr
    return int(last[1]), "\n".join(lines[:-1]), last[2:]


@pytest.mark.parametrize("extra", [[], ["--keep-documents"]], ids=["unlearn", "keep-documents"])
def test_bank_rm_of_an_unknown_id_loads_neither_lancedb_nor_a_model(built, monkeypatch, extra):
    """The unknown id is told from the ids read with pylance alone: no lancedb (seconds to
    import), no torch, no model; the same one-line error and exit status 1."""
    log = _loads(monkeypatch, built)
    status, err, heavy = _cli_in_subprocess(["bank", "rm", "corpus/quorra.md", *extra], built)
    assert status == 1 and heavy == [], (err, heavy)
    assert err.startswith("Error: no document 'corpus/quorra.md'") and len(err.splitlines()) == 1, err
    assert "corpus/quorra.md#0" in err and "nothing was removed" in err
    status, err, heavy = _cli_in_subprocess(["bank", "rm", "corpus/felix.md#0", "nothing-like-it", *extra], built)
    assert status == 1 and heavy == [] and "'nothing-like-it'" in err and "regrad docs ls" in err, err
    assert not log.exists()
    # A known id goes on to the removal itself (lancedb loads, nothing is refused).
    status, err, heavy = _cli_in_subprocess(["bank", "rm", "corpus/quorra.md#0", *extra], built)
    assert status == 0 and "lancedb" in heavy, err


def test_prune_removes_gradients_and_new_documents_are_found_with_a_warning(built, capsys, monkeypatch):
    corpus = built / "corpus"
    (corpus / "felix.md").unlink()
    (corpus / "zara.md").write_text("Zara Quell painted the Amber Gate in 1760.", encoding="utf-8")
    code, out, _ = run_cli(["ingest", "corpus", "--prune", "--json"], capsys, monkeypatch)
    s = json.loads(out)
    assert code == 0 and (s["pruned"], s["pruned_rows"], s["added"]) == (1, 1, 1)
    code, out, _ = run_cli(["status", "--json"], capsys, monkeypatch)
    st = json.loads(out)
    assert (st["documents"], st["rows"], st["pending"], st["stale"]) == (2, 1, 1, 0)

    # A passage-only mode searches the documents table: the new document is found at once.
    code, out, err = run_cli(["query", "Who painted the Amber Gate?", "--mode", "rag+phi", "--top-k", "1",
                              "--json"], capsys, monkeypatch)
    res = json.loads(out)
    assert code == 0 and res["retrieved"][0]["doc_id"] == "corpus/zara.md#0" and res["warnings"] == []
    # A mode that applies gradients says, in the JSON and on stderr, what it cannot see and the fix.
    code, out, err = run_cli(["query", "Who painted the Amber Gate?", "--mode", "param", "--json"],
                             capsys, monkeypatch)
    res = json.loads(out)
    assert code == 0 and "corpus/felix.md#0" not in [r["doc_id"] for r in res["retrieved"]]
    assert any("no gradient yet" in w and "regrad build-bank" in w for w in res["warnings"])
    assert "warning: 1 document(s) have no gradient yet" in err

    code, _, _ = run_cli(["build-bank", "--json"], capsys, monkeypatch)
    code, out, err = run_cli(["query", "Who painted the Amber Gate?", "--mode", "param", "--top-k", "1",
                              "--json"], capsys, monkeypatch)
    res = json.loads(out)
    assert res["warnings"] == [] and res["retrieved"][0]["applied"] and "warning" not in err


def test_status_and_docs_ls(built, capsys, monkeypatch):
    code, out, _ = run_cli(["status", "--json"], capsys, monkeypatch)
    s = json.loads(out)
    assert (s["documents"], s["chunks"], s["rows"], s["pending"], s["stale"], s["next"]) == (2, 2, 2, 0, 0, None)
    assert s["bank"]["learner_checkpoint_id"] == s["learner"]["checkpoint_id"] and s["default_mode"] == "param+context"
    code, out, _ = run_cli(["status"], capsys, monkeypatch)
    assert code == 0 and "pending" in out
    code, out, _ = run_cli(["docs", "ls", "--source", "corpus/quorra.md", "--json"], capsys, monkeypatch)
    assert json.loads(out)["documents"] == [{"source": "corpus/quorra.md", "document": "corpus/quorra.md",
                                             "chunks": ["corpus/quorra.md#0"], "tokens": json.loads(out)["documents"][0]["tokens"]}]
    code, out, _ = run_cli(["docs", "ls"], capsys, monkeypatch)
    assert out.splitlines()[0].startswith("corpus/felix.md\t1 chunk(s)") and "corpus/quorra.md#0" in out


def test_the_guides_two_removals_in_a_row(built, capsys, monkeypatch):
    """docs/guide.md shows `bank rm corpus/guild.md#0` and `bank rm --source corpus/guild.md`;
    run in that order the second said "no document from source" with exit 1, though that file
    was just unlearned. A file whose every chunk was unlearned by id counts as removed (as the
    id does): nothing left to remove, exit 0, and it stays out of later ingests."""
    code, out, err = run_cli(["bank", "rm", "corpus/quorra.md#0", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["removed_rows"] == 1, err
    code, out, err = run_cli(["bank", "rm", "--source", "corpus/quorra.md", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["removed_rows"] == 0 and json.loads(out)["removed_documents"] == 0, err
    code, out, _ = run_cli(["status", "--json"], capsys, monkeypatch)
    assert json.loads(out)["unlearned"] == 1  # one chunk, however many times it was named
    code, out, err = run_cli(["ingest", "corpus", "--json"], capsys, monkeypatch)
    summary = json.loads(out)
    assert code == 0 and summary["added"] == 0 and "unlearned" in json.dumps(summary["skipped"]), out
    code, _, err = run_cli(["bank", "rm", "--source", "corpus/quorra"], capsys, monkeypatch)
    assert code == 1 and "nothing was removed" in err  # not a file that was removed


def test_docs_ls_refuses_a_source_as_typed_rather_than_as_recorded(built, capsys, monkeypatch):
    """`docs ls --source ./corpus/quorra.md` (or `quorra.md`) listed nothing with exit 0 and
    told the user to ingest what was already ingested; like `bank rm --source`, it now exits 1
    naming the recorded sources like it (the guide: "those are refused, naming the sources")."""
    for given in ("./corpus/quorra.md", "quorra.md"):
        code, out, err = run_cli(["docs", "ls", "--source", given], capsys, monkeypatch)
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, (given, code, err)
        assert "sources like it: corpus/quorra.md" in err and "ingest" not in err, err
    code, _, err = run_cli(["docs", "ls", "--source", "elsewhere"], capsys, monkeypatch)
    assert code == 1 and "`regrad docs ls` lists the sources" in err
    code, out, _ = run_cli(["docs", "ls", "--source", "corpus/", "--json"], capsys, monkeypatch)
    assert code == 0 and len(json.loads(out)["documents"]) == 2  # a folder: everything under it


def test_status_says_when_an_untrained_learner_stands_in_for_the_shipped_one(tmp_path, capsys, monkeypatch):
    """With another model than the bundled one, [learner] checkpoint = "bundled" means an
    untrained learner (none ships for it): `status` says so instead of "bundled (told when
    loaded)", which read as if the shipped learner were in use."""
    import re

    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path / "corpus")
    code, _, err = run_cli(["ingest", "corpus", *FAKE], capsys, monkeypatch)
    assert code == 0, err
    code, out, _ = run_cli(["status"], capsys, monkeypatch)
    flat = re.sub(r"[│┃|\s]+", " ", out)
    assert code == 0 and "bundled: none ships for fake:llama, so an untrained learner" in flat, out


def test_settings_that_do_not_load_are_never_saved(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path / "corpus")
    toml = tmp_path / "ws" / "regrad.toml"
    code, _, err = run_cli(["ingest", "corpus", "--model", str(tmp_path / "no" / "such" / "dir")], capsys, monkeypatch)
    assert code == 1 and "no such directory" in err and not toml.exists()
    # conftest sets HF_HUB_OFFLINE=1: a hub id that is not cached fails at once, with the hint.
    code, _, err = run_cli(["ingest", "corpus", "--model", "fake:llama", "--embedder", "no-org/no-such-embedder"],
                           capsys, monkeypatch)
    assert code == 1 and "HF_HUB_OFFLINE" in err and "local directory" in err and not toml.exists()
    code, _, err = run_cli(["ingest", "corpus", *FAKE], capsys, monkeypatch)
    assert code == 0 and 'id = "fake:llama"' in toml.read_text()


def test_a_bad_model_for_an_existing_workspace_is_refused_before_anything_loads(built, capsys, monkeypatch):
    """On an existing workspace `--model`/`--embedder` apply to one run; a missing directory or
    an uncached hub id was found only after the workspace's embedder had loaded (7 s of CPU on
    a first-day replay): now the same fail-fast check as a new workspace's, and nothing saved."""
    log = _loads(monkeypatch, built)
    toml = built / "ws" / "regrad.toml"
    before = toml.read_text()
    for args, words in ((["--model", str(built / "no" / "such" / "dir")], "--model"),
                        (["--embedder", "no-org/no-such-embedder"], "HF_HUB_OFFLINE")):
        code, _, err = run_cli(["ingest", "corpus", *args], capsys, monkeypatch)
        assert code == 1 and words in err and len(err.strip().splitlines()) == 1, (args, err)
    assert "no such directory" in run_cli(["ingest", "corpus", "--model", "./nowhere"], capsys, monkeypatch)[2]
    assert toml.read_text() == before
    assert not log.exists(), log.read_text()


def test_every_mode_answers_the_documented_keys(built, capsys, monkeypatch):
    from regrad_cli.online.modes import ANSWER_KEYS, MODES, RETRIEVED_KEYS

    batch = built / "q.jsonl"
    batch.write_text('{"id": 1, "question": "Who founded the Tessaly Guild?"}\n'
                     '{"id": 2, "question": "Who built the Ombra bridge?"}\n')
    for mode in MODES:
        code, out, err = run_cli(["query", "--batch", batch, "--mode", mode, "--max-new-tokens", "3"],
                                 capsys, monkeypatch)
        rows = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and len(rows) == 2, err
        for res in rows:
            assert set(res) == set(ANSWER_KEYS), (mode, set(res) ^ set(ANSWER_KEYS))
            assert res["batch_size"] == 2
            for r in res["retrieved"]:
                assert set(r) == set(RETRIEVED_KEYS) - {"text"}
                assert (r["weight"] is None) == (not r["applied"])
    code, out, err = run_cli(["query", "Who founded the Tessaly Guild?", "--mode", "param", "--show-docs"],
                             capsys, monkeypatch)
    assert "weight" in err and "It keeps maps." in err.splitlines()  # the passage's own line breaks


def test_the_guides_jsonl_example_is_the_eval_format(tmp_path):
    import re

    from conftest import REPO
    from regrad_cli.learning.datasets import load_dataset

    guide = (REPO / "docs" / "guide.md").read_text(encoding="utf-8")
    block = re.search(r"```json\n(.*?)```", guide, re.S).group(1)
    path = tmp_path / "my-questions.jsonl"
    path.write_text(block, encoding="utf-8")
    items = load_dataset(f"jsonl:{path}")
    assert [(i.id, i.answers) for i in items] == [("q1", ["Quorra Vell"]), ("q2", ["1921"])]
    assert all(len(i.documents) == 1 for i in items)


def test_no_development_machine_paths_in_the_repository():
    import subprocess

    from conftest import REPO

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    # The patterns are assembled here so that this file does not contain them: a plain grep of the
    # repository for them then finds nothing at all, this test included.
    patterns = [f"/{top}/" for top in ("work", "root", "home")]
    args = [arg for p in patterns for arg in ("-e", p)]
    found = subprocess.run(["git", "grep", "-n", "-I", *args, "--", "."], cwd=REPO, capture_output=True,
                           text=True).stdout
    assert found == "", found[:2000]


def test_verbosity_flags_after_the_command_and_plain_progress(tmp_path, capsys, monkeypatch):
    from regrad_cli.cli import hoist_global_options

    assert hoist_global_options(["query", "q", "-v", "--", "-q"]) == ["-v", "query", "q", "--", "-q"]
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path / "corpus")
    # -v after the command (a real process: logging is set up once per process): regrad's own log
    # lines, no third-party configuration dumps.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    r = subprocess.run([sys.executable, "-m", "regrad_cli", "ingest", "corpus", *FAKE, "-v"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "INFO regrad" in r.stderr, r.stderr
    assert "Config" not in r.stderr and "vocab_size" not in r.stderr
    # stderr is not a terminal here: plain progress lines, with the rate.
    code, out, err = run_cli(["build-bank"], capsys, monkeypatch)
    assert code == 0 and "build-bank: 2/2 (100%)" in err and "/s" in err
    # -q after the command: no progress, no warnings; the answer still printed.
    (tmp_path / "corpus" / "zara.md").write_text("Zara Quell painted the Amber Gate in 1760.", encoding="utf-8")
    code, out, err = run_cli(["ingest", "corpus", "-q"], capsys, monkeypatch)
    assert code == 0 and err == ""
    code, out, err = run_cli(["query", "Who painted the Amber Gate?", "--mode", "param", "-q"], capsys, monkeypatch)
    assert code == 0 and out.strip() and err == ""
    code, out, err = run_cli(["query", "Who painted the Amber Gate?", "--mode", "param"], capsys, monkeypatch)
    assert "warning: 1 document(s) have no gradient yet" in err


def test_min_score_keeps_dissimilar_documents_out(built, capsys, monkeypatch):
    code, out, _ = run_cli(["query", "Who founded the Tessaly Guild?", "--mode", "param", "--json"], capsys, monkeypatch)
    everything = json.loads(out)["retrieved"]
    floor = max(r["cosine"] for r in everything) - 1e-6  # only the best document is similar enough
    code, out, _ = run_cli(["query", "Who founded the Tessaly Guild?", "--mode", "param", "--json",
                            "--min-score", str(floor)], capsys, monkeypatch)
    kept = json.loads(out)["retrieved"]
    assert code == 0 and len(everything) == 2 and len(kept) == 1
    assert kept[0]["doc_id"] == max(everything, key=lambda r: r["cosine"])["doc_id"] and kept[0]["applied"]
    code, out, _ = run_cli(["query", "Who founded the Tessaly Guild?", "--mode", "param+context", "--json",
                            "--min-score", "1"], capsys, monkeypatch)
    assert json.loads(out)["retrieved"] == []  # no step, no passage


def test_questions_on_stdin_get_plain_answers_unless_json(built, capsys, monkeypatch):
    import io
    import sys

    qs = ["where does the zarn river flow?", "who founded the guild?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(qs) + "\n"))
    code, out, err = run_cli(["query", "-", "--max-new-tokens", "3"], capsys, monkeypatch)
    assert code == 0, err
    plain = out.splitlines()
    assert len(plain) == len(qs) and not any(line.lstrip().startswith("{") for line in plain)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(qs) + "\n"))
    code, out, err = run_cli(["query", "-", "--json", "--max-new-tokens", "3"], capsys, monkeypatch)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["question"] for r in rows] == qs
    assert [" ".join(r["answer"].split()) for r in rows] == plain


def test_the_guide_runs_word_for_word(tmp_path, capsys, monkeypatch):
    """Every command of docs/guide.md's shell blocks, literally and in order, in a fresh folder
    (the reviewer's check of issue 31). Two departures, both cheap stand-ins: ./.regrad is made
    first with the guide's own try-out models (`fake:llama`, `fake:hash-32`), and `regrad eval`
    (which makes its own workspace, of the bundled models by default) gets them as options.
    `regrad serve` and its curl line are left to tests/test_serve.py and test_openai_compat.py."""
    import shlex
    import subprocess

    from conftest import REPO
    from regrad_cli.workspace.config import Workspace

    guide = (REPO / "docs" / "guide.md").read_text(encoding="utf-8")
    (tmp_path / "my-questions.jsonl").write_text(re.search(r"```json\n(.*?)```", guide, re.S).group(1),
                                                 encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REGRAD_WORKSPACE")
    Workspace.open(".regrad", overrides={"model.id": "fake:llama", "embedder.id": "fake:hash-32"})
    ran = []
    for block in re.findall(r"```bash\n(.*?)```", guide, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if not words or words[:2] == ["regrad", "serve"] or words[0] == "curl":
                continue
            if words[0] != "regrad":
                subprocess.run(line, shell=True, check=True, cwd=tmp_path)
                continue
            args = words[1:] + (FAKE if words[1] == "eval" else [])
            code, out, err = run_cli(args, capsys, monkeypatch)
            assert code == 0, (line, out, err)
            ran.append(words[1])
    assert ran == ["ingest", "build-bank", "query", "status", "ingest", "build-bank", "eval", "eval"], ran
    assert (tmp_path / "results" / "report.md").exists() and (tmp_path / "results" / "results.json").exists()


def test_a_hub_id_fails_fast_when_the_name_lookup_hangs(tmp_path, capsys, monkeypatch):
    """Without a network a resolver may not answer for tens of seconds, and a connection's
    timeout does not bound the name lookup: the hub probe is given up after its timeout."""
    import socket
    import threading
    import time

    from regrad_cli.lm import models

    release = threading.Event()

    def hanging_lookup(*args, **kwargs):
        release.wait(30)
        raise socket.gaierror("released")

    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path / "corpus")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    monkeypatch.setattr(models, "HUB_PROBE_TIMEOUT_S", 0.5)
    import regrad_cli.cli  # noqa: F401 - imported before the clock starts
    start = time.monotonic()
    try:
        code, _, err = run_cli(["ingest", "corpus", "--model", "no-org/no-such-model-31", "--embedder", "fake:hash-32"],
                               capsys, monkeypatch)
    finally:
        release.set()
    assert code == 1 and "cannot be reached (no answer within 0.5 s)" in err and "HF_HUB_OFFLINE=1" in err, err
    assert time.monotonic() - start < 25  # the lookup hangs for 30 s: the probe was given up
    assert not (tmp_path / "ws" / "regrad.toml").exists()
