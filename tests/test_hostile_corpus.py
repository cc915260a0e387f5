"""Hostile corpora and inputs (issue 19): each finding, with a test that it stays fixed.

Compressed-input bombs, quadratic line splitting, an explicit id that takes over another file's
document, ids with control characters, ``--prune`` on an empty or unmounted root, symlinks out of
the folder, malformed dataset strings, and a document id the bank refuses at build time.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FakeEmbedder, FakeTokenizer
from reliability_helpers import bank_of, do_build, make_engine, open_ws, run_cli, write_corpus

REPO = Path(__file__).resolve().parent.parent


def _ingest(ws, paths, **kw):
    from regrad_cli.offline.ingest import ingest

    return ingest(ws, list(paths), embedder=FakeEmbedder(), tokenizer=FakeTokenizer(), **kw)


def _reasons(summary) -> dict[str, str]:
    return {Path(s["path"]).name: s["reason"] for s in summary.skipped}


# Compressed input ------------------------------------------------------------------------------------
def _gz_bomb(path: Path, n_bytes: int, line: bool) -> None:
    """A .jsonl.gz that decompresses to n_bytes: one endless line, or many lines."""
    with gzip.open(path, "wb", compresslevel=9) as fh:
        if line:
            block = b"a" * (1 << 20)
        else:
            block = (json.dumps({"text": "x" * 1000}).encode() + b"\n") * 1000
        written = 0
        while written < n_bytes:
            fh.write(block)
            written += len(block)


@pytest.mark.parametrize("line", [True, False], ids=["one-line", "many-lines"])
def test_gzip_bomb_stops_at_the_limit_with_bounded_memory(tmp_path, line):
    """200 MB decompressed from well under 1 MB, read under a 1 MB limit in a child whose
    address space is capped: skipped as too large, and the child never holds the 200 MB."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _gz_bomb(corpus / "bomb.jsonl.gz", 200 << 20, line)
    (corpus / "good.txt").write_text("a fine document", encoding="utf-8")
    assert (corpus / "bomb.jsonl.gz").stat().st_size < 1 << 20
    code = r"""
import json, resource, sys
sys.path[:0] = [sys.argv[3], sys.argv[3] + "/tests"]
from conftest import FakeEmbedder, FakeTokenizer
from regrad_cli.workspace.config import Workspace
from regrad_cli.offline.ingest import ingest
ws = Workspace.open(sys.argv[1])
import lance, lancedb  # loaded before the cap: the cap is on what reading the corpus adds
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
s = ingest(ws, [sys.argv[2]], embedder=FakeEmbedder(), tokenizer=FakeTokenizer(), max_file_mb=1)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"skipped": s.skipped, "added": s.added, "hwm_kb": hwm}))
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ws"), str(corpus), str(REPO)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    reasons = {Path(s["path"]).name: s["reason"] for s in out["skipped"]}
    assert "too large (decompressed > 1 MB)" in reasons["bomb.jsonl.gz"], reasons
    assert out["added"] == 1
    assert out["hwm_kb"] < 900_000, out["hwm_kb"]


def test_line_splitting_finds_every_line_once_across_blocks():
    from regrad_cli.offline.ingest.readers import _lines

    data = b"".join(b"line %d " % i + b"y" * (i % 37) + b"\n" for i in range(2000)) + b"tail"
    fh = io.BytesIO(data[100:])
    got = list(_lines(data[:100], fh, limit=len(data), gz=False, block=7))
    assert got == data.split(b"\n")

    class CountingBuffer(io.BytesIO):
        reads = 0

        def read(self, n=-1):
            CountingBuffer.reads += 1
            return super().read(n)

    # A 4 MB line with no newline, read in 4 KB blocks: about 1000 reads, each scanned once.
    big = CountingBuffer(b"z" * (4 << 20))
    (only,) = list(_lines(b"", big, limit=8 << 20, gz=False, block=4096))
    assert len(only) == 4 << 20 and CountingBuffer.reads <= (4 << 20) // 4096 + 2


def test_plain_jsonl_over_the_limit_without_newlines_is_skipped(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "long.jsonl").write_bytes(b"b" * 300_000)
    ws = open_ws(tmp_path / "ws")
    s = _ingest(ws, [corpus], max_file_mb=0.1)
    assert "too large" in _reasons(s)["long.jsonl"]


# Ids -------------------------------------------------------------------------------------------------
def test_explicit_id_cannot_replace_a_document_from_another_file(tmp_path):
    from regrad_cli.workspace.documents import DocumentStore

    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"id": "shared", "text": "the original text of A"}) + "\n")
    ws = open_ws(tmp_path / "ws")
    assert _ingest(ws, [corpus / "a.jsonl"]).added == 1
    (corpus / "b.jsonl").write_text(json.dumps({"id": "shared", "text": "B tries to take it over"}) + "\n")
    s = _ingest(ws, [corpus / "b.jsonl"])
    assert "already used by a document from 'a.jsonl'" in s.skipped[0]["reason"], s.skipped
    row = DocumentStore(ws).get(["shared"], ["text", "source"])["shared"]
    assert row["text"] == "the original text of A" and row["source"] == "a.jsonl"
    # In one run, whichever file comes first keeps it; the other is skipped, not merged.
    s = _ingest(ws, [corpus])
    assert DocumentStore(ws).get(["shared"], ["text"])["shared"]["text"] == "the original text of A"
    # A file that moved takes its records along (the old file is gone).
    (corpus / "b.jsonl").unlink()
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (corpus / "a.jsonl").rename(moved / "a.jsonl")
    s = _ingest(ws, [moved])
    assert not s.skipped and DocumentStore(ws).get(["shared"], ["source"])["shared"]["source"] == "elsewhere/a.jsonl"


def test_ids_with_control_characters_are_skipped(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    recs = [{"id": "ok", "text": "fine"}, {"id": "nul\x00id", "text": "t"}, {"id": "esc\x1b[31m", "text": "t"}]
    (corpus / "r.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    ws = open_ws(tmp_path / "ws")
    s = _ingest(ws, [corpus])
    assert s.added == 1
    assert sorted(x["reason"] for x in s.skipped) == ['"id" contains control characters'] * 2


def test_an_id_the_bank_refuses_fails_one_row_not_every_build(tmp_path):
    """A document table written by an older regrad may hold an id the bank refuses (NUL)."""
    from regrad_cli.workspace.documents import DocumentStore

    ws = open_ws(tmp_path / "ws")
    _ingest(ws, [write_corpus(tmp_path / "corpus", 3)])
    store = DocumentStore(ws)
    row = dict(store.all()[0])
    row.update(id="bad\x00id", source="old/bad.txt", content_hash="f" * 64)
    store.replace_sources([row], ["old/bad.txt"])
    engine = make_engine()
    s = do_build(ws, engine, batch_size=8)
    assert [f["doc_id"] for f in s.failed] == ["bad\x00id"] and s.built == store.count() - 1
    s2 = do_build(ws, engine)
    assert [f["doc_id"] for f in s2.failed] == ["bad\x00id"] and s2.built == 0
    assert bank_of(ws, engine).verify()["ok"] == s.built


# --prune --------------------------------------------------------------------------------------------
def test_prune_of_a_missing_or_empty_root_deletes_nothing(tmp_path):
    corpus = write_corpus(tmp_path / "mnt" / "corpus", 4)
    ws = open_ws(tmp_path / "ws")
    n = _ingest(ws, [corpus]).documents
    for p in corpus.iterdir():  # the disk is unmounted: the folder is there, empty
        p.unlink()
    s = _ingest(ws, [corpus], prune=True)
    assert s.pruned == 0 and s.documents == n and any("unmounted" in w for w in s.warnings)
    corpus.rmdir()  # or gone altogether
    s = _ingest(ws, [corpus], prune=True)
    assert s.pruned == 0 and s.documents == n


def test_prune_of_many_documents_asks_for_force(tmp_path, capsys, monkeypatch):
    from regrad_cli.errors import IngestError

    corpus = write_corpus(tmp_path / "corpus", 20)
    ws = open_ws(tmp_path / "ws")
    n = _ingest(ws, [corpus]).documents
    for p in sorted(corpus.iterdir())[1:]:
        p.unlink()
    with pytest.raises(IngestError, match="--force"):
        _ingest(ws, [corpus], prune=True)
    assert _ingest(ws, [corpus]).documents == n
    s = _ingest(ws, [corpus], prune=True, force=True)
    assert s.pruned == n - s.documents and s.documents >= 1


# Symlinks -------------------------------------------------------------------------------------------
def test_symlinks_out_of_the_folder_are_not_followed(tmp_path):
    secret = tmp_path / "home"
    secret.mkdir()
    (secret / "id_rsa.txt").write_text("PRIVATE KEY")
    (secret / "notes").mkdir()
    (secret / "notes" / "n.md").write_text("private notes")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("public text")
    (corpus / "sub").mkdir()
    (corpus / "sub" / "b.txt").write_text("inside")
    (corpus / "key.txt").symlink_to(secret / "id_rsa.txt")
    (corpus / "home").symlink_to(secret / "notes", target_is_directory=True)
    (corpus / "inside.txt").symlink_to(corpus / "sub" / "b.txt")  # inside: followed (same file: once)
    ws = open_ws(tmp_path / "ws")
    s = _ingest(ws, [corpus])
    r = _reasons(s)
    assert "symlink out of" in r["key.txt"] and "symlink out of" in r["home"]
    from regrad_cli.workspace.documents import DocumentStore

    texts = [d["text"] for d in DocumentStore(ws).all(["text"])]
    assert "PRIVATE KEY" not in texts and "private notes" not in texts and "public text" in texts


# Datasets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", [
    {"p1": {"QUESTION": "q", "final_decision": "yes", "CONTEXTS": "[" * 200_000}},
    {"p1": {"QUESTION": "q", "final_decision": "yes", "CONTEXTS": "(" * 5000 + ")" * 5000}},
], ids=["unclosed", "deep"])
def test_malformed_dataset_string_is_a_dataset_error(tmp_path, payload):
    from regrad_cli.learning.datasets import load_dataset
    from regrad_cli.errors import DatasetError

    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(DatasetError):
        load_dataset(f"pubmedqa:{path}")


def test_deeply_nested_jsonl_dataset_is_a_dataset_error(tmp_path):
    from regrad_cli.learning.datasets import load_dataset
    from regrad_cli.errors import DatasetError

    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q", "answers": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DatasetError):
        load_dataset(f"jsonl:{path}")


# Unlearned documents -----------------------------------------------------------------------------
def test_ingest_skips_unlearned_documents_unless_readmitted(tmp_path, capsys, monkeypatch):
    from regrad_cli.workspace.documents import DocumentStore
    from regrad_cli.offline.unlearn import Tombstones, remove_documents

    corpus = write_corpus(tmp_path / "corpus", 3)
    ws = open_ws(tmp_path / "ws")
    _ingest(ws, [corpus])
    remove_documents(ws.root, None, [], ["corpus/doc001.txt"])
    s = _ingest(ws, [corpus])
    assert "unlearned" in _reasons(s)["doc001.txt"] and "corpus/doc001.txt#0" not in DocumentStore(ws).keys()
    s = _ingest(ws, [corpus], readmit=True)
    assert s.added >= 1 and "corpus/doc001.txt#0" in DocumentStore(ws).keys()
    assert "corpus/doc001.txt" not in Tombstones(ws).sources()


def test_damaged_tombstones_stop_ingest_build_and_rm_with_a_regrad_error(tmp_path):
    from regrad_cli.errors import RegradError
    from regrad_cli.offline.unlearn import remove_documents

    ws = open_ws(tmp_path / "ws")
    _ingest(ws, [write_corpus(tmp_path / "corpus", 2)])
    (ws.root / "tombstones.json").write_text("{not json")
    for run in (lambda: _ingest(ws, [tmp_path / "corpus"]), lambda: do_build(ws, make_engine()),
                lambda: remove_documents(ws.root, None, ["corpus/doc000.txt#0"])):
        with pytest.raises(RegradError, match="tombstones.json is damaged"):
            run()


def test_a_heading_made_to_backtrack_costs_no_time(tmp_path):
    """A Markdown file whose first line is "# # # ..." (2 MB): the title pattern backtracks
    quadratically in the heading's length, so the reader only looks at the first characters
    (8 000 characters took 2.5 s, 2 MB would take days). Measured in CPU time, not wall time."""
    import time

    from regrad_cli.offline.ingest.discovery import _File
    from regrad_cli.offline.ingest.readers import iter_docs
    from regrad_cli.offline.ingest.summary import IngestSummary

    path = tmp_path / "heading.md"
    path.write_text("# " + "# " * 1_000_000 + "x\n\nBody text.", encoding="utf-8")
    t = time.process_time()
    (doc,) = iter_docs(_File(str(path), "heading.md", "heading.md", True), 5 * 10**6, IngestSummary())
    assert time.process_time() - t < 5
    assert len(doc.title) < 1024 and doc.text.endswith("Body text.")
