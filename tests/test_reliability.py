"""Reliability guarantees (docs/reliability.md): crashes, damage, fuzzed metadata, concurrency,
hostile input, mismatches, write failures and CLI error paths.

Everything runs on the tiny random Llama, the byte tokenizer and the fake embedder of conftest.py;
the CLI is run in this process with ``Engine.load`` and the embedder swapped for them (so the
real code paths from argument parsing to the exit code are exercised without the real models),
and crash tests kill a worker process (tests/reliability_helpers.py) with SIGKILL.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEMO_DIR, FakeEmbedder, FakeTokenizer
from reliability_helpers import (
    CHUNKING,
    Worker,
    bank_of,
    do_build,
    do_ingest,
    doc_text,
    make_engine,
    open_ws,
    run_cli,
    worker_cmd,
    worker_env,
    write_corpus,
)

N_FILES = 8


# Fixtures -----------------------------------------------------------------------------------------
@dataclass
class Template:
    ws: Path
    corpus: Path


@pytest.fixture(scope="module")
def engine():
    return make_engine()


@pytest.fixture(scope="module")
def template(tmp_path_factory, engine) -> Template:
    """A workspace with N_FILES documents ingested and banked; copied by each test that needs it."""
    root = tmp_path_factory.mktemp("template")
    corpus = write_corpus(root / "corpus", N_FILES)
    ws = open_ws(root / "ws")
    do_ingest(ws, corpus)
    do_build(ws, engine)
    return Template(root / "ws", corpus)


def copy_template(template: Template, dest: Path, with_bank: bool = True):
    """(workspace, corpus) copied from the template under ``dest`` (same folder names: same ids)."""
    shutil.copytree(template.ws, dest / "ws")
    shutil.copytree(template.corpus, dest / "corpus")
    if not with_bank:
        shutil.rmtree(dest / "ws" / "banks")
    return open_ws(dest / "ws"), dest / "corpus"


@pytest.fixture
def built(template, tmp_path):
    return copy_template(template, tmp_path)


@pytest.fixture
def tiny_cli(monkeypatch, engine):
    """The CLI loads the tiny engine and the fake embedder/tokenizer instead of the real models."""
    import regrad_cli.lm.models as models
    from regrad_cli.workspace.engine import Engine

    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: engine))
    monkeypatch.setattr(models, "Embedder", lambda *a, **k: FakeEmbedder())
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: FakeTokenizer())
    return engine


def chunk_hashes(text: str) -> set[str]:
    from regrad_cli.offline.ingest import chunk_text

    chunks = chunk_text(text, FakeTokenizer(), CHUNKING["chunking.max_tokens"], CHUNKING["chunking.overlap"])
    return {hashlib.sha256(c.text.encode("utf-8")).hexdigest() for c in chunks}


def doc_rows(ws) -> list[dict]:
    from regrad_cli.workspace.documents import DocumentStore

    return DocumentStore(ws).all(columns=["id", "source", "content_hash"])


def by_source(rows) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r["source"], set()).add(r["content_hash"])
    return out


def assert_bank_clean(bank) -> dict:
    report = bank.verify()
    assert report["bad"] == [] and report["duplicates"] == [], report
    assert report["ok"] == report["rows"]
    return report


def cli_verify(ws, capsys, monkeypatch) -> dict:
    code, out, err = run_cli(["bank", "verify", "--json", "-w", ws.root], capsys, monkeypatch)
    report = json.loads(out)
    assert code == (0 if report["ok_all"] else 1), (code, out, err)
    return report


def one_error_line(err: str) -> str:
    """The one error line of stderr; the plain progress lines a command prints before it when
    stderr is not a terminal ("build-bank: 2/20 (10%), ...") are not part of the error."""
    import re

    err = "".join(line for line in err.splitlines(keepends=True)
                  if not re.match(r"[\w-]+: \d+/\d+ \(\d+%\)", line))
    assert err.startswith("Error: ") and err.count("\n") == 1, repr(err)
    return err


# 1. Crash safety ----------------------------------------------------------------------------------
def kill_trial(seed: int, root: Path, template: Template, engine, capsys, monkeypatch) -> dict:
    """Change and add documents, run ingest + build-bank in a worker, SIGKILL it at a seeded
    random moment, check nothing is lost or half-written, rerun, check the end state."""
    rng = random.Random(seed)
    ws, corpus = copy_template(template, root)
    old = {f"corpus/{p.name}": chunk_hashes(p.read_text()) for p in corpus.iterdir()}
    for i in rng.sample(range(N_FILES), 3):
        (corpus / f"doc{i:03d}.txt").write_text(doc_text(i, version=1), encoding="utf-8")
    write_corpus(corpus, 4, start=N_FILES)
    new = {f"corpus/{p.name}": chunk_hashes(p.read_text()) for p in corpus.iterdir()}

    worker = Worker(worker_cmd(ws.root, corpus, "--ingest", "--build", "--batch-size", "2"))
    try:
        # Lines: ready, ingest 0..n (n + 1), build 0..m. Aim anywhere from the start of the ingest
        # to the last build batches, then a random sub-interval so kills land inside writes.
        target = rng.randint(1, 1 + len(new) + 1 + 8)
        worker.wait_for_events(target + 1)
        time.sleep(rng.uniform(0.0, 0.3))
        worker.kill()
    finally:
        code, err = worker.finish()
    assert code in (0, -9), err[-3000:]
    killed_at = worker.lines[-1] if worker.lines else "(before start)"

    # Right after the kill: every source is whole, in its old or its new version; none lost.
    rows = doc_rows(ws)
    assert len({r["id"] for r in rows}) == len(rows), "duplicate document ids"
    got = by_source(rows)
    for source, hashes in old.items():
        assert source in got, f"{source} lost (killed at {killed_at})"
        assert got[source] in (hashes, new[source]), f"{source} half-written (killed at {killed_at})"
    for source, hashes in got.items():
        assert hashes == new[source] or hashes == old.get(source), source
    assert_bank_clean(bank_of(ws, engine))

    # The rerun completes and leaves exactly the current documents, each with one clean row.
    do_ingest(ws, corpus)
    summary = do_build(ws, engine)
    assert not summary.failed
    rows = doc_rows(ws)
    assert by_source(rows) == new
    bank = bank_of(ws, engine)
    assert bank.keys() == {(r["id"], r["content_hash"]) for r in rows}
    report = cli_verify(ws, capsys, monkeypatch)
    assert report["ok_all"] and report["rows"] == len(rows) == bank.count()
    return {"seed": seed, "killed_at": killed_at, "exit": code}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_during_ingest_and_build_then_rerun(seed, tmp_path, template, engine, capsys, monkeypatch):
    kill_trial(seed, tmp_path, template, engine, capsys, monkeypatch)


@pytest.mark.slow
def test_kill_9_twenty_trials(tmp_path, template, engine, capsys, monkeypatch):
    outcomes = [kill_trial(seed, tmp_path / f"t{seed}", template, engine, capsys, monkeypatch)
                for seed in range(100, 120)]
    killed = [o for o in outcomes if o["exit"] == -9]
    assert len(killed) >= 15, outcomes  # most trials really were killed mid-run
    assert any(o["killed_at"].startswith("ingest") for o in killed), outcomes
    assert any(o["killed_at"].startswith("build") for o in killed), outcomes


def test_crash_while_creating_tables_leaves_no_stuck_workspace(template, tmp_path, engine):
    """A kill inside table creation can leave a table directory without a committed version;
    the next run must create the table, not fail to open it forever."""
    ws, corpus = copy_template(template, tmp_path, with_bank=False)
    bank_dir = ws.bank_path(engine.learner.checkpoint_id()) / "gradients.lance"
    (bank_dir / "_transactions").mkdir(parents=True)
    (bank_dir / "_transactions" / "0-interrupted.txn").write_bytes(b"half")
    summary = do_build(ws, engine)
    assert summary.built == summary.rows == len(doc_rows(ws))
    assert_bank_clean(bank_of(ws, engine))

    fresh = open_ws(tmp_path / "fresh")
    docs_dir = fresh.db_path / "documents.lance"
    (docs_dir / "_transactions").mkdir(parents=True)
    (docs_dir / "_transactions" / "0-interrupted.txn").write_bytes(b"half")
    s = do_ingest(fresh, corpus)
    assert s.added == s.documents == len(doc_rows(ws))


@pytest.mark.real
def test_real_cli_build_bank_killed_and_rerun(tmp_path):
    """`regrad build-bank` on the real model and the demo corpus, SIGKILLed mid-build, rerun."""
    import subprocess
    import sys

    import lance

    env = {**worker_env(), "REGRAD_WORKSPACE": str(tmp_path / "ws")}
    cmd = [sys.executable, "-m", "regrad_cli"]
    r = subprocess.run([*cmd, "ingest", str(DEMO_DIR / "corpus"), "--json"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and json.loads(r.stdout)["documents"] == 36, r.stderr[-2000:]
    proc = subprocess.Popen([*cmd, "build-bank", "--batch-size", "2", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows_at_kill = 0
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            tables = list((tmp_path / "ws" / "banks").glob("bank-*/gradients.lance/_versions"))
            if tables:
                try:
                    rows_at_kill = lance.dataset(str(tables[0].parent)).count_rows()
                except Exception:  # noqa: BLE001 - being created
                    rows_at_kill = 0
            if rows_at_kill >= 2:
                time.sleep(random.Random(0).uniform(0.5, 3.0))  # kill inside a later batch
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -9, f"build-bank was not killed mid-build: {err[-2000:]}"
    r = subprocess.run([*cmd, "build-bank", "--json"], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["rows"] == 36 and summary["built"] <= 36 - rows_at_kill
    r = subprocess.run([*cmd, "bank", "verify", "--json"], env=env, capture_output=True, text=True, timeout=600)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok_all"] and report["rows"] == report["ok"] == 36, r.stdout


# 2. Corruption ------------------------------------------------------------------------------------
def _data_files(bank) -> list[Path]:
    return sorted((bank.path / "gradients.lance" / "data").glob("*.lance"))


def _flip_blob_on_disk(bank, doc_id: str) -> None:
    blob = bank.dataset().to_table(filter=f"doc_id = '{doc_id}'").column("blob")[0].as_py()
    hits = [p for p in _data_files(bank) if blob in p.read_bytes()]
    assert len(hits) == 1, "the blob should be stored verbatim in one data file"
    data = bytearray(hits[0].read_bytes())
    data[data.find(blob) + len(blob) // 2] ^= 0xFF
    hits[0].write_bytes(bytes(data))


def _question_for(ws, doc_id: str) -> str:
    from regrad_cli.workspace.documents import DocumentStore

    return DocumentStore(ws).texts([doc_id])[doc_id]


def test_cli_flipped_blob_named_skipped_strict_fails_and_repairable(built, tiny_cli, capsys, monkeypatch):
    ws, _ = built
    bank = bank_of(ws, tiny_cli)
    victim = sorted(k[0] for k in bank.keys())[3]
    _flip_blob_on_disk(bank, victim)

    report = cli_verify(ws, capsys, monkeypatch)
    assert not report["ok_all"] and [b["doc_id"] for b in report["bad"]] == [victim]
    assert "checksum" in report["bad"][0]["reason"] and report["ok"] == report["rows"] - 1
    code, out, err = run_cli(["bank", "verify", "-w", ws.root], capsys, monkeypatch)
    assert code == 1 and "1 bad" in out and f"bad: {victim}:" in err

    question = _question_for(ws, victim)
    code, out, err = run_cli(["query", question, "-k", "2", "--json", "--max-new-tokens", "2", "-w", ws.root],
                             capsys, monkeypatch)
    res = json.loads(out)
    assert code == 0 and res["retrieved"][0]["doc_id"] == victim
    assert {r["doc_id"]: r["applied"] for r in res["retrieved"]} == {victim: False, res["retrieved"][1]["doc_id"]: True}
    assert [s["doc_id"] for s in res["skipped"]] == [victim] and "checksum" in res["skipped"][0]["reason"]
    code, out, err = run_cli(["query", question, "-k", "2", "--strict", "-w", ws.root], capsys, monkeypatch)
    assert code == 1 and out == "" and victim in one_error_line(err) and "corrupt" in err

    # Repair: drop the bad row (keeping the text) and build it again.
    code, out, err = run_cli(["bank", "rm", victim, "--keep-documents", "-w", ws.root], capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run_cli(["build-bank", "--json", "-w", ws.root], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["built"] == 1, err
    assert cli_verify(ws, capsys, monkeypatch)["ok_all"]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_cli_damaged_fragment_file_named_and_never_applied(damage, built, tiny_cli, capsys, monkeypatch):
    ws, _ = built
    bank = bank_of(ws, tiny_cli)
    frags = bank.dataset().get_fragments()
    assert len(frags) > 2
    frag = frags[1]
    lost = set(frag.to_table(columns=["doc_id"]).column("doc_id").to_pylist())
    path = bank.path / "gradients.lance" / "data" / frag.metadata.files[0].path
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:
        path.unlink()

    report = cli_verify(ws, capsys, monkeypatch)
    assert not report["ok_all"] and report["bad"]
    assert {b["fragment"] for b in report["bad"]} == {frag.fragment_id}
    named = {b["doc_id"] for b in report["bad"]}
    # The doc ids when they can still be read, else the fragment with its row count.
    assert named == lost or (named == {None} and report["bad"][0]["rows"] == len(lost))
    assert f"fragment {frag.fragment_id}" in report["bad"][0]["reason"]
    assert report["ok"] == report["rows"] - len(lost)
    code, out, err = run_cli(["bank", "verify", "-w", ws.root], capsys, monkeypatch)
    assert code == 1 and f"fragment {frag.fragment_id}" in err and "bad: None" not in err

    # A query either answers without the damaged rows or fails with one line; never applies them.
    for victim in sorted(lost):
        code, out, err = run_cli(["query", _question_for(ws, victim), "-k", "2", "--json",
                                  "--max-new-tokens", "2", "-w", ws.root], capsys, monkeypatch)
        if code == 0:
            res = json.loads(out)
            assert not any(r["applied"] for r in res["retrieved"] if r["doc_id"] in lost), res
        else:
            assert code == 1 and "bank verify" in one_error_line(err), err


# 3. Fuzzed metadata in a real bank ------------------------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=10,
)


@pytest.fixture(scope="module")
def fuzz_bank(tmp_path_factory, engine):
    root = tmp_path_factory.mktemp("fuzz")
    ws = open_ws(root / "ws")
    do_ingest(ws, write_corpus(root / "corpus", 2))
    do_build(ws, engine)
    bank = bank_of(ws, engine)
    import lance

    ds = lance.dataset(str(bank.path / "gradients.lance"))
    return ws, bank.path, dict(ds.schema.metadata)


def _set_metadata(table_dir: Path, key: str, value: str | None, original: dict) -> None:
    import lance

    ds = lance.dataset(str(table_dir))
    meta = {k.decode(): v.decode() for k, v in original.items()}
    if value is None:
        meta.pop(key, None)
    else:
        meta[key] = value
    ds.update_schema_metadata(meta, replace=True)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_bank_metadata_only_bank_format_error(fuzz_bank, engine, data):
    from bank_format import BankFormatError, GradientBank
    from regrad_cli.workspace.banks import expected_fingerprints

    ws, path, original = fuzz_bank
    good = json.loads(original[b"regrad.bank"])
    kind = data.draw(st.sampled_from(["replace", "mutate", "text", "delete"]))
    if kind == "replace":
        value = json.dumps(data.draw(_json))
    elif kind == "mutate":
        d = json.loads(json.dumps(good))
        target = d
        for key in data.draw(st.sampled_from([[], ["codec"], ["embedder"], ["learner"], ["layout", 0]])):
            target = target[key]
        key = data.draw(st.sampled_from(sorted(target) + ["extra"]))
        target[key] = data.draw(_json)
        value = json.dumps(d)
    elif kind == "text":
        value = data.draw(st.text(max_size=80))
    else:
        value = None
    _set_metadata(path / "gradients.lance", "regrad.bank", value, original)
    try:
        bank = GradientBank.open(path, expect=expected_fingerprints(engine, FakeEmbedder().fingerprint))
    except BankFormatError:
        return
    # Accepted (e.g. a changed producer string): reading it still raises nothing but our error.
    try:
        bank.verify()
        bank.fetch_checked([k[0] for k in bank.keys()])
        bank.search(FakeEmbedder().embed(["zarn river"])[0], 2)
    except BankFormatError:
        pass


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(["regrad.embedder", "regrad.documents_format"]),
       value=st.one_of(_json.map(json.dumps), st.text(max_size=40)))
def test_fuzzed_documents_metadata_only_ingest_error(fuzz_bank, key, value):
    import lance

    from regrad_cli.workspace.documents import DocumentStore
    from regrad_cli.errors import IngestError

    ws, _, _ = fuzz_bank
    table_dir = ws.db_path / "documents.lance"
    original = lance.dataset(str(table_dir)).schema.metadata
    try:
        _set_metadata(table_dir, key, value, original)
        store = DocumentStore(ws)
        try:
            fp = store.embedder_fingerprint
        except IngestError:
            return
        assert isinstance(fp, dict) and isinstance(fp.get("dim"), int)
    finally:
        lance.dataset(str(table_dir)).update_schema_metadata(
            {k.decode(): v.decode() for k, v in original.items()}, replace=True)


# 4. Concurrency -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_queries_while_another_process_builds(tmp_path, engine):
    from regrad_cli.online.query import QueryEngine

    corpus = write_corpus(tmp_path / "corpus", 16)
    ws = open_ws(tmp_path / "ws")
    do_ingest(ws, corpus)
    from regrad_cli.offline.build import build_bank

    build_bank(ws, engine, limit=3)
    docs = {r["id"] for r in doc_rows(ws)}
    qe = QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    questions = [doc_text(i) for i in range(16)]
    worker = Worker(worker_cmd(ws.root, corpus, "--build", "--batch-size", "1", "--pause", "0.05"))
    answers, counts = 0, set()
    try:
        assert worker.wait_for_events(1)
        while worker.proc.poll() is None or answers < 5:
            before = qe.bank.dataset().version
            res = qe.answer(questions[answers % 16], top_k=3, max_new_tokens=2)
            ds = qe.bank.dataset()
            after_keys = {d for d in ds.to_table(columns=["doc_id"]).column("doc_id").to_pylist()}
            ids = [r["doc_id"] for r in res["retrieved"]]
            assert ids and set(ids) <= after_keys <= docs, res
            assert not res["skipped"] and all(r["applied"] for r in res["retrieved"]), res  # every answer has the key now
            assert ds.version >= before
            counts.add(len(after_keys))
            answers += 1
    finally:
        code, err = worker.finish()
    assert code == 0, err[-3000:]
    assert len(counts) >= 3, f"queries did not overlap the build: {sorted(counts)}"
    bank = bank_of(ws, engine)
    assert bank.count() == len(docs) and assert_bank_clean(bank)


# 5. Hostile input at CLI level -------------------------------------------------------------------
def _deeper_than_path_max(root: Path) -> None:
    """A directory chain whose absolute path is longer than PATH_MAX (made with relative paths)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(420):  # 420 * 11 > 4096
            os.mkdir("d" * 10, dir_fd=fd)
            new = os.open("d" * 10, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = new
        with open(os.open("too-deep.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as fh:
            fh.write("unreachable by absolute path")
    finally:
        os.close(fd)


@pytest.fixture
def fake_models(monkeypatch):
    import regrad_cli.lm.models as models

    monkeypatch.setattr(models, "Embedder", lambda *a, **k: FakeEmbedder())
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: FakeTokenizer())


def test_cli_hostile_input_loses_nothing_and_never_tracebacks(tmp_path, fake_models, capsys, monkeypatch):
    good = write_corpus(tmp_path / "good", 3)
    ws_root = tmp_path / "ws"
    code, out, err = run_cli(["ingest", good, "--json", "-w", ws_root], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["added"] >= 3, err
    from regrad_cli.workspace.documents import DocumentStore
    from regrad_cli.workspace.config import Workspace

    before = DocumentStore(Workspace.open(ws_root)).get(DocumentStore(Workspace.open(ws_root)).keys())

    bad = tmp_path / "bad"
    bad.mkdir()
    # What tests/test_ingest.py::hostile does not have yet.
    (bad / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (bad / "nested.jsonl").write_text('{"text": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
                                      '{"id": "ok-1", "text": "A good record after a hostile one."}\n')
    (bad / "bigint.json").write_text('{"text": "x", "n": ' + "7" * 5000 + "}")
    (bad / "nul.md").write_bytes(b"looks like text\x00\x00but is not")
    (bad / "bom.txt").write_bytes("\ufeffA byte-order mark, then text.".encode("utf-8"))
    (bad / "crlf.jsonl").write_bytes(b'{"id": "crlf-1", "text": "Windows line ends."}\r\n\r\n')
    _deeper_than_path_max(bad)
    code, out, err = run_cli(["ingest", bad, "/dev/zero", good, "--json", "-w", ws_root], capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads(out)
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert "invalid JSON" in reasons["nested.json"] and "invalid JSON" in reasons["bigint.json"]
    assert "invalid JSON" in reasons["nested.jsonl:1"]
    assert reasons["nul.md"] == "binary" and reasons["zero"] == "not a regular file"
    assert any("too long" in r.lower() for r in reasons.values()), reasons
    store = DocumentStore(Workspace.open(ws_root))
    keys = store.keys()
    assert {"ok-1", "crlf-1", "bad/bom.txt#0"} <= set(keys)
    assert store.texts(["bad/bom.txt#0"])["bad/bom.txt#0"].startswith("A byte-order")
    assert store.get(before) == before, "previously ingested documents changed"
    assert summary["unchanged"] == len(before)


# 6. Mismatches ------------------------------------------------------------------------------------
class OtherEmbedder(FakeEmbedder):
    name = "other-embedder"


def test_query_with_another_embedder_is_refused(built, engine):
    from bank_format import BankMismatchError
    from regrad_cli.errors import RegradError
    from regrad_cli.online.query import QueryEngine

    ws, _ = built
    with pytest.raises(BankMismatchError) as e:
        QueryEngine(ws, engine=engine, embedder=OtherEmbedder())
    assert "embedder.id" in str(e.value) and "other-embedder" in str(e.value) and "fake-embedder" in str(e.value)
    # Without a bank (context / closed-book modes) the documents table's embedder is checked.
    shutil.rmtree(ws.banks_dir)
    with pytest.raises(RegradError) as e:
        QueryEngine(ws, engine=engine, embedder=OtherEmbedder(), need_bank=False)
    assert "other-embedder" in str(e.value) and "fake-embedder" in str(e.value)
    with pytest.raises(RegradError, match="dim"):
        QueryEngine(ws, engine=engine, embedder=FakeEmbedder(dim=16), need_bank=False)
    QueryEngine(ws, engine=engine, embedder=FakeEmbedder(), need_bank=False)  # same one: fine


def _mismatch_cli(args, capsys, monkeypatch) -> str:
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 1 and out == "" and err.startswith("Error: "), (code, out, err)
    return err


def test_cli_mismatches_name_both_values(built, tiny_cli, capsys, monkeypatch):
    import regrad_cli.lm.models as models
    from regrad_cli.workspace.engine import Engine

    ws, corpus = built
    q = ["query", "zarn river", "--json", "-w", ws.root]

    other_model = make_engine()
    other_model.lm.fingerprint = {"id": "tiny-llama", "weights_sha256": "retrained"}
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: other_model))
    err = _mismatch_cli(q, capsys, monkeypatch)
    assert "model.weights_sha256" in err and "'retrained'" in err and "'tiny'" in err

    other_learner = make_engine(seed=1)
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: other_learner))
    err = _mismatch_cli(q, capsys, monkeypatch)
    old_id, new_id = tiny_cli.learner.checkpoint_id(), other_learner.learner.checkpoint_id()
    assert old_id[:16] in err and new_id[:16] in err and "rebuild" in err
    # A bank directory that claims the new checkpoint but holds gradients of the old one.
    shutil.copytree(ws.bank_path(old_id), ws.bank_path(new_id))
    err = _mismatch_cli(q, capsys, monkeypatch)
    assert "learner.checkpoint_id" in err and old_id in err and new_id in err
    err = _mismatch_cli(["build-bank", "-w", ws.root], capsys, monkeypatch)
    assert "learner.checkpoint_id" in err and old_id in err and new_id in err

    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: tiny_cli))
    monkeypatch.setattr(models, "Embedder", lambda *a, **k: OtherEmbedder())
    for mode in ("param", "context"):
        err = _mismatch_cli([*q, "--mode", mode], capsys, monkeypatch)
        assert "other-embedder" in err and "fake-embedder" in err
    # Documents re-ingested with another embedder, stale bank kept: build-bank refuses.
    shutil.rmtree(ws.db_path)
    code, _, err = run_cli(["ingest", corpus, "-w", ws.root], capsys, monkeypatch)
    assert code == 0, err
    err = _mismatch_cli(["build-bank", "-w", ws.root], capsys, monkeypatch)
    assert "embedder.id" in err and "other-embedder" in err and "fake-embedder" in err


# 7. Write failures --------------------------------------------------------------------------------
def _fail_second_call(monkeypatch, owner, name, exc):
    real = getattr(owner, name)
    calls = {"n": 0}

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise exc
        return real(self, *a, **k)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.parametrize("where", ["GradientBank.append", "lancedb write"])
def test_cli_build_bank_disk_full_keeps_a_clean_bank(where, template, tmp_path, tiny_cli, capsys, monkeypatch):
    import lancedb.table

    from bank_format import GradientBank

    ws, _ = copy_template(template, tmp_path, with_bank=False)
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "GradientBank.append":
        _fail_second_call(monkeypatch, GradientBank, "append", full)
    else:
        _fail_second_call(monkeypatch, lancedb.table.LanceTable, "add", full)
    code, out, err = run_cli(["build-bank", "--batch-size", "2", "-w", ws.root], capsys, monkeypatch)
    assert code == 1 and "No space left on device" in one_error_line(err)
    monkeypatch.undo()
    bank = bank_of(ws, tiny_cli)
    assert bank.count() == 2 and assert_bank_clean(bank)
    assert cli_verify(ws, capsys, monkeypatch)["rows"] == 2


@pytest.mark.parametrize("where", ["fragments", "commit"])
def test_cli_ingest_write_failure_keeps_previous_documents(built, fake_models, capsys, monkeypatch, where):
    """The disk fills while ingest writes a file's fragments, or at the commit that publishes
    them: one line, exit 1, the documents table exactly as before."""
    import lance
    import lance.fragment

    ws, corpus = built
    before = doc_rows(ws)
    write_corpus(corpus, 5, start=50)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        if where == "fragments":
            m.setattr(lance.fragment, "write_fragments", full)
        else:
            m.setattr(lance.LanceDataset, "commit", staticmethod(full))
        code, out, err = run_cli(["ingest", corpus, "-w", ws.root], capsys, monkeypatch)
    assert code == 1 and "No space left on device" in one_error_line(err)
    assert sorted(map(str, doc_rows(ws))) == sorted(map(str, before))


# CLI error paths ----------------------------------------------------------------------------------
def test_cli_error_paths_are_one_line(tmp_path, tiny_cli, capsys, monkeypatch):
    import regrad_cli.lm.models as models
    from regrad_cli.lm.models import LoadedModel

    from conftest import make_tiny_llama

    monkeypatch.setattr(models, "load_language_model", lambda *a, **k: LoadedModel(
        make_tiny_llama(), FakeTokenizer(), {"id": "tiny-llama", "weights_sha256": "tiny"}, "cpu", "float32"))
    nows, empty = tmp_path / "nows", tmp_path / "empty"
    open_ws(empty)  # a workspace with a config and nothing else
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    cases = [
        (["query", "hello", "-w", nows], "no regrad workspace"),
        (["query", "-w", empty], "give a QUESTION"),
        (["query", "hello", "-w", empty], "has no documents: run `regrad ingest PATH`"),
        (["query", "--batch", tmp_path / "missing.jsonl", "--mode", "closed-book", "-w", empty], "cannot read"),
        (["query", "--batch", tmp_path / "bad.jsonl", "--mode", "closed-book", "-w", empty], "malformed record"),
        (["query", "hello", "--mode", "context", "-w", empty], "no documents"),
        (["build-bank", "-w", nows], "no regrad workspace"),
        (["build-bank", "-w", empty], "no documents"),
        (["build-bank", "--codec", "int3", "-w", empty], "unknown codec"),
        (["bank", "verify", "-w", nows], "no regrad workspace"),
        (["bank", "verify", "-w", empty], "no gradient bank"),
        (["bank", "verify", "--bank", tmp_path / "nobank"], "no bank at"),
        (["bank", "stats", "-w", empty], "no gradient bank"),
        (["bank", "rm", "-w", empty], "DOC_ID"),
        (["ingest", tmp_path / "missing", "-w", empty], "nothing could be ingested"),
        (["meta-train", "--train", f"jsonl:{tmp_path / 'missing.jsonl'}", "--out", tmp_path / "mt"], "does not exist"),
    ]
    if importlib.util.find_spec("regrad_cli.learning.evaluation") is not None:
        cases += [
            (["eval", "--dataset", "bogus:/x", "--out", tmp_path / "ev"], "FORMAT:PATH"),
            (["eval", "--dataset", f"jsonl:{tmp_path / 'missing.jsonl'}", "--out", tmp_path / "ev"], "does not exist"),
        ]
    for args, expected in cases:
        code, out, err = run_cli(args, capsys, monkeypatch)
        assert code == 1, (args, code, out, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("Error: ") and expected in last, (args, err)
        assert sum(line.startswith("Error") for line in err.splitlines()) == 1, (args, err)


def test_cli_usage_and_os_errors_have_no_traceback(tmp_path, fake_models, capsys, monkeypatch):
    for args in (["query", "x", "--top-k", "abc"], ["bank", "verify", "--bogus"], ["no-such-command"]):
        code, out, err = run_cli(args, capsys, monkeypatch)
        assert code == 2 and err.strip().splitlines()[-1].startswith("Error: "), (args, err)
    import filelock

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", self.lock_file)

    monkeypatch.setattr(filelock.FileLock, "acquire", denied)
    corpus = write_corpus(tmp_path / "corpus", 1)
    code, out, err = run_cli(["ingest", corpus, "-w", tmp_path / "ws"], capsys, monkeypatch)
    assert code == 1 and "Permission denied" in one_error_line(err) and "ingest.lock" in err
