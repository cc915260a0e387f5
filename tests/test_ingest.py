"""`regrad ingest`: chunking, stable ids, incremental re-ingest, prune, records, hostile input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import DEMO_DIR, FakeEmbedder
from regrad_cli.workspace.config import Workspace
from regrad_cli.workspace.documents import DocumentStore
from regrad_cli.errors import IngestError
from regrad_cli.offline.ingest import chunk_text, ingest
from reliability_helpers import run_cli


class WordTokenizer:
    """One token per whitespace-separated word; no offsets (exercises the word-by-word path)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[self.vocab.setdefault(w, len(self.vocab)) for w in text.split()])

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return " ".join(inv[i] for i in ids)


class CountingEmbedder(FakeEmbedder):
    def __init__(self, fail_on_call: int | None = None, name: str = "fake-embedder", dim: int = 32):
        super().__init__(dim)
        self.name = name
        self.calls = 0
        self.texts: list[str] = []
        self.fail_on_call = fail_on_call

    def embed(self, texts):
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("simulated embedder crash")
        self.texts.extend(texts)
        return super().embed(texts)


def _real_tokenizer_or_skip():
    from regrad_cli.lm.models import cache_dir

    if not any((cache_dir() / "models").glob("smollm2-135m-instruct-*/DONE")):
        pytest.skip("the converted bundled model is not cached (set REGRAD_CACHE_DIR)")
    from regrad_cli.lm.models import load_tokenizer

    return load_tokenizer()


def _ws(**overrides) -> Workspace:
    return Workspace.open(overrides=overrides)


def _run(ws, paths, **kw):
    kw.setdefault("embedder", FakeEmbedder())
    kw.setdefault("tokenizer", WordTokenizer())
    return ingest(ws, [Path(p) for p in paths], **kw)


def _words(n: int, start: int = 0, sentence: int = 7) -> str:
    out = []
    for i in range(start, start + n):
        out.append(f"w{i}" + ("." if (i + 1) % sentence == 0 else ""))
    return " ".join(out)


# Chunking -----------------------------------------------------------------------------------
def test_short_document_is_one_chunk():
    chunks = chunk_text("  A short note.\n", WordTokenizer(), 256, 32)
    assert [c.text for c in chunks] == ["A short note."]
    assert chunks[0].n_tokens == 3


def test_chunking_respects_max_tokens_and_overlap():
    text = _words(1000)
    chunks = chunk_text(text, WordTokenizer(), 50, 10)
    assert len(chunks) > 20
    words = [c.text.split() for c in chunks]
    for c, w in zip(chunks, words):
        assert c.n_tokens == len(w) <= 50
    for a, b in zip(words, words[1:]):
        shared = next(k for k in range(min(len(a), len(b)), -1, -1) if a[len(a) - k:] == b[:k])
        assert 1 <= shared <= 10  # consecutive chunks overlap, by at most `overlap` tokens
    for w in words[:-1]:
        assert w[-1].endswith(".")  # cut at a sentence end when one is in reach
    # Nothing is lost: the chunks, overlaps removed, give back the text.
    rebuilt = list(words[0])
    for w in words[1:]:
        i = rebuilt.index(w[0], len(rebuilt) - 10)
        rebuilt = rebuilt[:i] + w
    assert rebuilt == text.split()


def test_chunking_prefers_paragraph_ends():
    para = lambda i: _words(30, start=100 * i, sentence=10)  # noqa: E731
    text = "\n\n".join(para(i) for i in range(6))
    chunks = chunk_text(text, WordTokenizer(), 70, 5)
    for c in chunks[:-1]:
        assert text[text.index(c.text) + len(c.text):].startswith("\n\n")


def test_chunking_rejects_bad_settings():
    from regrad_cli.errors import ConfigError

    with pytest.raises(ConfigError):
        chunk_text("a b c", WordTokenizer(), 8, 8)


@pytest.mark.real
def test_chunking_with_the_real_tokenizer():
    tok = _real_tokenizer_or_skip()
    text = (DEMO_DIR.parent / "general_text.txt").read_text(encoding="utf-8") + "\n\nCafé crème, naïve façade — ünïcödé. " * 40
    chunks = chunk_text(text, tok, 64, 8)
    assert len(chunks) > 10
    for c in chunks:
        assert c.n_tokens == len(tok(c.text, add_special_tokens=False).input_ids) <= 64
        assert "\ufffd" not in c.text
    assert sum(c.text.rstrip().endswith((".", "!", "?")) for c in chunks) > len(chunks) // 2


# Incremental ingest -------------------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.md").write_text("# Alpha Title\n\nAlpha is the first letter. " + _words(20), encoding="utf-8")
    (root / "b.txt").write_text("Bravo follows alpha. " + _words(15), encoding="utf-8")
    (root / "sub" / "c.md").write_text("No heading here, just charlie.", encoding="utf-8")
    (root / "notes.csv").write_text("x,y\n1,2\n", encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden files are passed over", encoding="utf-8")
    return root


def test_ingest_twice_changes_nothing_and_ids_are_stable(corpus, tmp_path, monkeypatch):
    ws = _ws()
    first = _run(ws, [corpus])
    assert (first.added, first.updated, first.unchanged, first.documents) == (3, 0, 0, 3)
    assert first.skipped == [{"path": str(corpus / "notes.csv"), "reason": "unsupported extension"}]
    store = DocumentStore(ws)
    rows = {r["id"]: r for r in store.all(["id", "source", "title", "chunk", "content_hash"])}
    assert set(rows) == {"corpus/a.md#0", "corpus/b.txt#0", "corpus/sub/c.md#0"}
    assert rows["corpus/a.md#0"]["title"] == "Alpha Title"
    assert rows["corpus/sub/c.md#0"]["title"] == "c"
    version = store.version

    emb = CountingEmbedder()
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # ids do not depend on the current directory
    second = _run(ws, [corpus], embedder=emb)
    assert (second.added, second.updated, second.unchanged, second.removed) == (0, 0, 3, 0)
    assert emb.calls == 0
    assert DocumentStore(ws).version == version  # not even a new table version
    assert DocumentStore(ws).keys() == {k: r["content_hash"] for k, r in rows.items()}

    monkeypatch.chdir(corpus)  # "." names the same folder: same sources
    third = _run(ws, ["."], embedder=emb)
    assert (third.added, third.updated, third.unchanged) == (0, 0, 3)


def test_explicit_file_is_relative_to_its_parent(corpus):
    ws = _ws()
    s = _run(ws, [corpus / "b.txt", corpus / "notes.csv"])
    assert s.added == 2 and s.skipped == []  # an explicitly named file is read as text
    assert set(DocumentStore(ws).keys()) == {"b.txt#0", "notes.csv#0"}


def test_changed_file_replaces_its_chunks(tmp_path):
    ws = _ws(**{"chunking.max_tokens": 40, "chunking.overlap": 5})
    root = tmp_path / "docs"
    root.mkdir()
    long = root / "long.txt"
    long.write_text(_words(100), encoding="utf-8")
    (root / "keep.txt").write_text("Untouched neighbour document.", encoding="utf-8")
    first = _run(ws, [root])
    old_ids = {k for k in DocumentStore(ws).keys() if k.startswith("docs/long.txt")}
    assert len(old_ids) >= 3 and first.documents == len(old_ids) + 1

    # Change only the end: unchanged leading chunks keep their vectors (not re-embedded).
    long.write_text(_words(95) + " changed ending here.", encoding="utf-8")
    emb = CountingEmbedder()
    s = _run(ws, [root], embedder=emb)
    assert s.added + s.updated >= 1 and s.unchanged >= 2
    assert len(emb.texts) == s.added + s.updated

    n_before = len(DocumentStore(ws).keys()) - 1
    long.write_text("Now it is short.", encoding="utf-8")
    s = _run(ws, [root])
    keys = DocumentStore(ws).keys()
    assert (s.added, s.updated, s.unchanged) == (0, 1, 1)
    assert s.removed == n_before - 1
    assert set(keys) == {"docs/long.txt#0", "docs/keep.txt#0"}
    assert s.documents == 2
    assert DocumentStore(ws).texts(["docs/long.txt#0"]) == {"docs/long.txt#0": "Now it is short."}


def test_prune_deletes_documents_of_deleted_files(corpus, tmp_path):
    ws = _ws()
    elsewhere = tmp_path / "other.txt"
    elsewhere.write_text("A file outside the corpus.", encoding="utf-8")
    _run(ws, [corpus, elsewhere])
    (corpus / "b.txt").unlink()
    elsewhere.unlink()

    s = _run(ws, [corpus])
    assert s.pruned == 0 and "corpus/b.txt#0" in DocumentStore(ws).keys()  # no --prune, kept

    s = _run(ws, [corpus], prune=True)
    keys = DocumentStore(ws).keys()
    assert s.pruned == 1 and s.unchanged == 2 and s.ok
    assert "corpus/b.txt#0" not in keys
    assert "other.txt#0" in keys  # not under the paths given: left alone
    assert s.documents == 3


def test_json_jsonl_and_gz_records(tmp_path):
    ws = _ws(**{"chunking.max_tokens": 30, "chunking.overlap": 4})
    root = tmp_path / "rec"
    root.mkdir()
    (root / "list.json").write_text(json.dumps([
        {"id": "doc-1", "title": "One", "text": "First record text.", "lang": "en", "year": 2024},
        {"text": "A record without id."},
        {"id": "long-1", "title": "Long", "text": _words(70)},
    ]), encoding="utf-8")
    (root / "wrapped.json").write_text(json.dumps({"documents": [{"id": "w1", "text": "Wrapped record."}]}))
    (root / "single.json").write_text(json.dumps({"id": 7, "text": "A single record.", "title": "Seven"}))
    (root / "lines.jsonl").write_text(
        json.dumps({"id": "l1", "text": "Line one."}) + "\n\n" + json.dumps({"text": "Line three, no id."}) + "\n"
    )
    with gzip.open(root / "packed.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "g1", "title": "Gz", "text": "Compressed record.", "tag": "x"}) + "\n")
    s = _run(ws, [root])
    assert s.skipped == [] and s.warnings == []
    rows = DocumentStore(ws).get(DocumentStore(ws).keys())
    assert set(rows) == {"doc-1", "rec/list.json@2", "long-1#0", "long-1#1", "long-1#2", "w1", "7",
                         "l1", "rec/lines.jsonl@3", "g1"}
    assert rows["doc-1"]["title"] == "One" and json.loads(rows["doc-1"]["metadata"]) == {"lang": "en", "year": 2024}
    assert rows["g1"]["source"] == "rec/packed.jsonl.gz" and json.loads(rows["g1"]["metadata"]) == {"tag": "x"}
    assert rows["long-1#2"]["chunk"] == 2 and rows["long-1#1"]["title"] == "Long"
    assert rows["7"]["title"] == "Seven"
    again = _run(ws, [root])
    assert (again.added, again.updated, again.unchanged) == (0, 0, s.added)


def test_duplicate_record_ids_keep_the_first(tmp_path):
    ws = _ws()
    f = tmp_path / "dup.jsonl"
    f.write_text('{"id": "x", "text": "first"}\n{"id": "x", "text": "second"}\n')
    s = _run(ws, [f])
    assert s.added == 1 and DocumentStore(ws).texts(["x"]) == {"x": "first"}
    assert s.skipped[0]["path"].endswith("dup.jsonl:2") and "duplicate id" in s.skipped[0]["reason"]


def test_other_embedder_is_refused(corpus):
    ws = _ws()
    _run(ws, [corpus])
    with pytest.raises(IngestError, match=r"fake-embedder.*other-embedder"):
        _run(ws, [corpus], embedder=CountingEmbedder(name="other-embedder"))


# Nothing lost -------------------------------------------------------------------------------
def test_failure_half_way_loses_nothing(tmp_path):
    ws = _ws(**{"embedder.batch_size": 2})
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for i in range(3):
        (a / f"a{i}.txt").write_text(f"Document a{i} of the first batch.", encoding="utf-8")
    for i in range(5):
        (b / f"b{i}.txt").write_text(f"Document b{i} of the second batch.", encoding="utf-8")
    _run(ws, [a])
    before = DocumentStore(ws).get(DocumentStore(ws).keys())

    with pytest.raises(IngestError, match="simulated embedder crash"):
        _run(ws, [b], embedder=CountingEmbedder(fail_on_call=2))
    store = DocumentStore(ws)
    assert store.get(store.keys()) == before  # A intact, nothing half-written
    s = _run(ws, [a, b])  # and the workspace is still usable
    assert (s.added, s.unchanged, s.documents) == (5, 3, 8)


# Hostile input ------------------------------------------------------------------------------
@pytest.fixture
def hostile(tmp_path):
    root = tmp_path / "hostile"
    root.mkdir()
    (root / "good.md").write_text("# Good\n\nA perfectly fine document.", encoding="utf-8")
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (root / "zero.txt").write_bytes(b"")
    (root / "blank.md").write_text(" \n\t\n  \n", encoding="utf-8")
    (root / "big.txt").write_text("word " * 60_000, encoding="utf-8")  # 300 KB; limit set to 0.1 MB
    (root / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, na\xefve text in Latin-1.".encode("latin-1"))
    (root / "mixed.jsonl").write_text(
        '{"id": "m1", "text": "Good line one."}\n{"id": "m2", "text": broken\n{"id": "m3", "text": "Good line three."}\n'
        '["not", "an", "object"]\n{"id": "m5"}\n',
        encoding="utf-8",
    )
    (root / "bad.json").write_text('{"documents": [ {"text": "unterminated"', encoding="utf-8")
    (root / "gzip.jsonl.gz").write_bytes(b"this is not gzip data")
    (root / "image.png").write_bytes(b"\x89PNG\r\n")
    deep = root.joinpath(*[f"d{i}" for i in range(40)])
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text("Found at the bottom of a deep tree.", encoding="utf-8")
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "loop_a.txt").symlink_to(root / "loop_b.txt")
    (root / "loop_b.txt").symlink_to(root / "loop_a.txt")
    (root / "dangling.md").symlink_to(root / "missing.md")
    (root / "locked.txt").write_text("You may not read me.", encoding="utf-8")
    os.chmod(root / "locked.txt", 0)
    os.mkfifo(root / "pipe.txt")
    yield root
    os.chmod(root / "locked.txt", 0o600)


@pytest.fixture
def deny_locked(monkeypatch):
    """Root reads a chmod-000 file anyway: make opening it fail as it would for a user."""
    import builtins

    import regrad_cli.offline.ingest.readers as mod

    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if str(path).endswith("locked.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(mod, "open", fake_open, raising=False)


EXPECTED_SKIPS = {
    "binary.txt": "binary",
    "zero.txt": "empty",
    "blank.md": "empty",
    "big.txt": "too large",
    "mixed.jsonl:2": "invalid JSON",
    "mixed.jsonl:4": "not an object",
    "mixed.jsonl:5": "no \"text\"",
    "bad.json": "invalid JSON",
    "gzip.jsonl.gz": "cannot decompress",
    "image.png": "unsupported extension",
    "loop": "symlink loop",
    "loop_a.txt": "symlink loop",
    "loop_b.txt": "symlink loop",
    "dangling.md": "broken symlink",
    "locked.txt": "permission denied",
    "pipe.txt": "not a regular file",
}


def _check_hostile(summary: dict, root: Path):
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    for name, reason in EXPECTED_SKIPS.items():
        assert name in reasons, f"{name} not reported in {summary['skipped']}"
        assert reason in reasons[name], (name, reasons[name])
    assert len(summary["skipped"]) == len(EXPECTED_SKIPS)
    assert summary["added"] == 5  # good.md, latin1.txt, m1, m3, deep.txt
    assert any("latin1.txt" in w and "UTF-8" in w for w in summary["warnings"])


def test_hostile_folder_core(hostile, deny_locked):
    ws = _ws()
    s = _run(ws, [hostile], max_file_mb=0.1)
    _check_hostile(s.to_dict(), hostile)
    keys = DocumentStore(ws).keys()
    assert {"m1", "m3", "hostile/good.md#0", "hostile/latin1.txt#0"} <= set(keys)
    assert any(k.endswith("/d39/deep.txt#0") for k in keys)
    text = DocumentStore(ws).texts(["hostile/latin1.txt#0"])["hostile/latin1.txt#0"]
    assert text.startswith("Caf\ufffd cr\ufffdme")


def test_real_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can read a chmod-000 file (covered by the monkeypatched open)")
    f = tmp_path / "locked.txt"
    f.write_text("secret")
    f.chmod(0)
    try:
        s = _run(_ws(), [f])
    finally:
        f.chmod(0o600)
    assert s.skipped == [{"path": str(f), "reason": "permission denied"}]


# CLI ----------------------------------------------------------------------------------------
@pytest.fixture
def fake_models(monkeypatch):
    import regrad_cli.lm.models as models

    monkeypatch.setattr(models, "Embedder", lambda *a, **k: FakeEmbedder())
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: WordTokenizer())


def test_cli_hostile_folder(hostile, deny_locked, fake_models, capsys, monkeypatch):
    code, out, err = run_cli(["ingest", hostile, "--json", "--max-file-mb", "0.1"], capsys, monkeypatch)
    assert code == 0
    assert out.count("\n") == 1  # exactly one JSON object on stdout
    _check_hostile(json.loads(out), hostile)

    code, out, err = run_cli(["ingest", hostile, "--max-file-mb", "0.1"], capsys, monkeypatch)
    assert code == 0 and "unchanged" in out and "binary" not in out
    assert "binary" in err and "mixed.jsonl:2" in err and "latin1.txt" in err


def test_cli_all_bad_exits_1(tmp_path, fake_models, capsys, monkeypatch):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    (tmp_path / "empty.md").write_text("")
    code, out, err = run_cli(["ingest", tmp_path / "bin.txt", tmp_path / "empty.md", tmp_path / "nope", "--json"],
                             capsys, monkeypatch)
    assert code == 1
    summary = json.loads(out)
    assert {s["reason"] for s in summary["skipped"]} == {"binary", "empty", "not found"}
    assert err.startswith("Error: nothing could be ingested") and err.count("\n") == 1


def test_cli_embedder_mismatch_is_one_line(corpus, fake_models, capsys, monkeypatch, tmp_path):
    code, _, _ = run_cli(["ingest", corpus], capsys, monkeypatch)
    assert code == 0
    import regrad_cli.lm.models as models

    # Another embedder that exists (a local directory: a hub id not in the cache is refused before
    # anything loads, tests/test_first_day.py), ingested into a workspace made with fake-embedder.
    other = tmp_path / "other-model"
    other.mkdir()
    monkeypatch.setattr(models, "Embedder", lambda *a, **k: CountingEmbedder(name=str(other)))
    code, out, err = run_cli(["ingest", corpus, "--embedder", str(other)], capsys, monkeypatch)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "fake-embedder" in err and "other-model" in err


def test_cli_chunk_options_are_written_on_first_use(corpus, fake_models, capsys, monkeypatch):
    code, _, _ = run_cli(["ingest", corpus, "--chunk-tokens", "128", "--chunk-overlap", "16"], capsys, monkeypatch)
    assert code == 0
    cfg = Workspace.open().config.chunking
    assert (cfg.max_tokens, cfg.overlap) == (128, 16)


@pytest.mark.slow
def test_cli_skips_a_real_50mb_file(tmp_path, fake_models, capsys, monkeypatch):
    big = tmp_path / "huge.txt"
    line = b"All work and no play makes a very large text file. " * 20 + b"\n"
    with open(big, "wb") as fh:
        for _ in range(50_000_000 // len(line) + 1):
            fh.write(line)
    (tmp_path / "small.txt").write_text("A small companion file.")
    code, out, _ = run_cli(["ingest", tmp_path, "--json"], capsys, monkeypatch)
    summary = json.loads(out)
    assert code == 0 and summary["added"] == 1
    assert summary["skipped"] == [{"path": str(big), "reason": "too large (50 MB > 20 MB)"}]


def test_import_is_light():
    code = ("import sys, regrad_cli.offline.ingest, regrad_cli.workspace.documents;"
            "bad = {'torch', 'transformers', 'lancedb'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# Demo corpus --------------------------------------------------------------------------------
def test_demo_corpus_ingests(tmp_path):
    from regrad_cli.lm.models import cache_dir

    cached = any((cache_dir() / "models").glob("smollm2-135m-instruct-*/DONE"))
    tok = _real_tokenizer_or_skip() if cached else WordTokenizer()
    ws = _ws()
    s = ingest(ws, [DEMO_DIR / "corpus"], embedder=FakeEmbedder(), tokenizer=tok)
    assert (s.added, s.documents, s.skipped) == (36, 36, [])
    again = ingest(ws, [DEMO_DIR / "corpus"], embedder=FakeEmbedder(), tokenizer=tok)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 36)


@pytest.mark.real
def test_demo_corpus_with_the_real_embedder(capsys, monkeypatch):
    code, out, err = run_cli(["ingest", DEMO_DIR / "corpus", "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["documents"] == 36
    store = DocumentStore(Workspace.open())
    assert store.embedder_fingerprint == {"id": "sentence-transformers/all-MiniLM-L6-v2", "dim": 384}
    from regrad_cli.lm.models import Embedder

    q = Embedder().embed(["Who founded the Velmora Ridge Observatory?"])[0]
    assert store.search_vector(q, 1)[0][0] == "corpus/01-velmora-ridge-observatory.md#0"
    code, out, _ = run_cli(["ingest", DEMO_DIR / "corpus", "--json"], capsys, monkeypatch)
    summary = json.loads(out)
    assert (code, summary["added"], summary["updated"], summary["unchanged"]) == (0, 0, 0, 36)
