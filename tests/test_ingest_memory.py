"""Ingest memory follows the limits the user sets, not the file (issue 32).

Chunking tokenises in windows (one 19 MB record was 3.9 GB with the bundled tokenizer, 8.2 GB with
the fake one), and a file's rows are streamed: read a document at a time, written as Lance
fragments of ``BATCH_ROWS`` rows, published by one commit per group of whole files (600 000 tiny
records, 11 MB, took 3.0 GB when a file's rows were held until its commit). The first tests check
that streaming keeps a file all old or all new; the others ingest hostile shapes in a child
process under RLIMIT_AS (``benchmarks/ingest_memory.py``, whose figures docs/reliability.md cites).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FakeEmbedder, FakeTokenizer

REPO = Path(__file__).resolve().parent.parent


# Streaming keeps files whole ---------------------------------------------------------------------
@pytest.fixture
def small_batches(monkeypatch):
    """Fragments of 3 rows and a commit once 2 rows are pending: a 10-record file spans several
    fragments, and several small files share a commit."""
    import regrad_cli.offline.ingest.writer as writer

    monkeypatch.setattr(writer, "BATCH_ROWS", 3)
    monkeypatch.setattr(writer, "FLUSH_ROWS", 2)


def _ws(tmp_path):
    from regrad_cli.workspace.config import Workspace

    return Workspace.open(tmp_path / "ws", overrides={"model.id": "fake:llama", "embedder.id": "fake:hash-32"})


def _ingest(ws, paths, **kw):
    from regrad_cli.offline.ingest import ingest

    kw.setdefault("embedder", FakeEmbedder())
    return ingest(ws, [Path(p) for p in paths], tokenizer=FakeTokenizer(), **kw)


def _records(path: Path, texts: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()), encoding="utf-8")
    return path


def _table(ws) -> dict[str, str]:
    from regrad_cli.workspace.documents import DocumentStore

    return {r["id"]: r["text"] for r in DocumentStore(ws).all(["id", "text"])}


def test_a_file_streams_in_fragments_and_is_committed_whole(tmp_path, small_batches):
    import lance

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {f"r{i}": f"Record {i} says the lighthouse has {i} lamps." for i in range(10)}
    _records(corpus / "big.jsonl", texts)
    (corpus / "a.txt").write_text("A small neighbour.", encoding="utf-8")
    ws = _ws(tmp_path)
    s = _ingest(ws, [corpus])
    assert (s.added, s.documents) == (11, 11) and _table(ws) == {**texts, "corpus/a.txt#0": "A small neighbour."}
    ds = lance.dataset(str(ws.db_path / "documents.lance"))
    assert len(ds.get_fragments()) >= 4  # written 3 rows at a time

    # One record changed, one gone, one new: counts as before, unchanged rows copied, not embedded.
    new = {**texts, "r3": "Record 3 now says something else.", "r10": "A new record."}
    del new["r7"]
    _records(corpus / "big.jsonl", new)

    class Counting(FakeEmbedder):
        n = 0

        def embed(self, batch):
            Counting.n += len(batch)
            return super().embed(batch)

    s = _ingest(ws, [corpus], embedder=Counting())
    assert (s.added, s.updated, s.unchanged, s.removed) == (1, 1, 9, 1), s
    assert Counting.n == 2
    assert _table(ws) == {**new, "corpus/a.txt#0": "A small neighbour."}


def _ingested_big_file(tmp_path):
    """A workspace with one ingested file of 8 records (several fragments with small_batches):
    (workspace, corpus folder, {id: text})."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    old = {f"r{i}": f"Old record {i}." for i in range(8)}
    _records(corpus / "big.jsonl", old)
    ws = _ws(tmp_path)
    _ingest(ws, [corpus])
    return ws, corpus, old


def test_a_file_skipped_half_way_leaves_its_old_rows(tmp_path, small_batches, monkeypatch):
    """A file found unreadable after some of its documents were written as fragments (a .jsonl.gz
    over the limit half way, say): none of its new rows are committed, its old ones stay, the
    ids it took are free again, and the other files are ingested."""
    import regrad_cli.offline.ingest as ingest_mod
    from regrad_cli.offline.ingest.readers import _Skip

    ws, corpus, old = _ingested_big_file(tmp_path)
    _records(corpus / "big.jsonl", {k: v.replace("Old", "New") for k, v in old.items()})
    (corpus / "z.txt").write_text("A file after it.", encoding="utf-8")
    (ws.root / "ingest-digests.json").unlink()  # no shortcut: the file is streamed
    real = ingest_mod.iter_docs

    def fails_half_way(f, limit, summary):
        for n, doc in enumerate(real(f, limit, summary)):
            if f.path.endswith("big.jsonl") and n == 7:
                raise _Skip("too large (decompressed > 1 MB)")
            yield doc

    monkeypatch.setattr(ingest_mod, "iter_docs", fails_half_way)
    s = _ingest(ws, [corpus])
    assert [x["reason"] for x in s.skipped] == ["too large (decompressed > 1 MB)"]
    assert _table(ws) == {**old, "corpus/z.txt#0": "A file after it."}
    assert (s.added, s.updated) == (1, 0)


def test_an_ingest_killed_half_way_through_a_file_loses_nothing(tmp_path, small_batches, monkeypatch):
    """An exception (a kill, in process) after a changed file's fragments were written: the table
    is as it was, and a rerun completes."""
    import regrad_cli.offline.ingest as ingest_mod

    ws, corpus, old = _ingested_big_file(tmp_path)
    before = _table(ws)
    new = {k: v.replace("Old", "New") for k, v in old.items()}
    _records(corpus / "big.jsonl", new)
    real = ingest_mod.chunk_text
    calls = {"n": 0}

    def dies(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ingest_mod, "chunk_text", dies)
    with pytest.raises(KeyboardInterrupt):
        _ingest(ws, [corpus])
    assert _table(ws) == before
    monkeypatch.setattr(ingest_mod, "chunk_text", real)
    s = _ingest(ws, [corpus])
    assert (s.updated, _table(ws)) == (8, new)


def test_an_id_moved_from_a_deleted_file_and_a_source_met_twice(tmp_path, small_batches):
    """A record whose file is gone may be taken over by another file (its old row is replaced, not
    doubled); two folders of one name give one source, whose files both stay."""
    one, two = tmp_path / "one" / "notes", tmp_path / "two" / "notes"
    one.mkdir(parents=True), two.mkdir(parents=True)
    _records(one / "a.jsonl", {"x": "Record x, first home.", "y": "Record y."})
    ws = _ws(tmp_path)
    _ingest(ws, [one])
    (one / "a.jsonl").unlink()
    _records(one / "b.jsonl", {"x": "Record x, new home."})
    s = _ingest(ws, [one])
    assert s.updated == 1 and _table(ws) == {"x": "Record x, new home.", "y": "Record y."}
    _records(two / "b.jsonl", {"z": "Record z from the other folder."})
    s = _ingest(ws, [one, two])
    assert _table(ws) == {"x": "Record x, new home.", "y": "Record y.", "z": "Record z from the other folder."}


# Memory under RLIMIT_AS ---------------------------------------------------------------------------
def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import ingest_memory
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return ingest_memory


def _measure(tmp_path, shape: str, scale: float, as_mb: int, again: bool = False) -> list[dict]:
    """One ingest of the shape in a fresh child (and, with ``again``, a second one, unchanged,
    in another)."""
    bench = _bench()
    f = bench.write_shape(shape, tmp_path / "corpus", scale)
    return [bench.measure(f, tmp_path / "ws", "fake:llama", "fake:hash-32", as_mb=as_mb, timeout=1800)
            for _ in range(2 if again else 1)]


# Above the baseline, with the fake models (a byte per token: the most chunks per MB). Measured
# at full size (benchmarks/ingest_memory.py, docs/benchmarks/ingest_memory.json): see
# docs/reliability.md. The RLIMIT_AS headroom is the address space a run may add: with room for
# Lance's and the allocator's reservations, which count in it but not in RSS.
BOUND_MB = 450
AS_HEADROOM_MB = 1500
SHAPES = {"tiny-records": 600_000, "one-record": 1, "one-line-text": 1, "one-line-not-json": 0, "paragraphs": 1,
          "bad-records": 0}


def test_memory_does_not_grow_with_the_records_of_a_file(tmp_path):
    """10 000 and then 70 000 tiny records in one JSONL file (fresh workspaces): the peak grows by
    a few bytes per record (the ids taken in the run), not by the rows (about 3 KB a record when
    a file's rows were held until its commit: 180 MB more)."""
    small = _measure(tmp_path / "small", "tiny-records", 10_000 / 600_000, AS_HEADROOM_MB)[0]
    large = _measure(tmp_path / "large", "tiny-records", 70_000 / 600_000, AS_HEADROOM_MB)[0]
    assert (small["added"], large["added"]) == (10_000, 70_000)
    assert large["above_baseline_mb"] - small["above_baseline_mb"] < 60, (small, large)


def test_every_hostile_shape_at_a_twentieth_in_one_ingest(tmp_path):
    """All the shapes at a twentieth of their size in one folder, one ingest under RLIMIT_AS:
    each file ingested or skipped with a reason."""
    bench = _bench()
    for shape in SHAPES:
        bench.write_shape(shape, tmp_path / "corpus", 0.05)
    m = bench.measure(tmp_path / "corpus", tmp_path / "ws", "fake:llama", "fake:hash-32", as_mb=AS_HEADROOM_MB)
    assert m["skipped"] == 2 + 1 + 100 + 1, m  # one-line.jsonl (its line, then the file); bad-records
    assert m["added"] > 30_000 + 3 * 3_000, m  # tiny records, and chunks of the three 1 MB texts
    assert m["above_baseline_mb"] < BOUND_MB, m


# At full size here: the two record shapes issue 32 measured (3.0 and 3.9 GB before streaming).
# The other shapes run at a twentieth above (same code paths: the window and the fragment batch
# do not depend on the file's length), and at full size in benchmarks/ingest_memory.py, whose
# committed record (every shape, and the unchanged second ingest) docs/reliability.md cites:
# about 3 more minutes of CI that would test nothing new.
@pytest.mark.slow
@pytest.mark.parametrize("shape", ["tiny-records", "one-record"])
def test_hostile_shapes_ingest_in_bounded_memory(tmp_path, shape):
    """Full size (600 000 tiny records in 12.6 MB; one 19 MB JSONL record): ingested, peak RSS
    under BOUND_MB above the baseline, under RLIMIT_AS."""
    runs = _measure(tmp_path, shape, 1.0, AS_HEADROOM_MB)
    for m in runs:
        _check(shape, m, scale=1.0)
        assert m["above_baseline_mb"] < BOUND_MB, m


def _check(shape: str, m: dict, scale: float) -> None:
    if SHAPES[shape] == 0:  # skipped with a reason
        assert m["added"] == 0 and m["skipped"] >= 1 and m["first_reasons"], m
    elif shape == "tiny-records":
        assert m["added"] + m["unchanged"] == int(600_000 * scale), m
    else:
        assert m["added"] + m["unchanged"] > 1000 * scale and m["skipped"] == 0, m


def test_a_19mb_record_is_chunked_in_bounded_memory():
    """Chunking alone, with a tokenizer that reports offsets, under RLIMIT_AS = its size at start
    + 200 MB (text, chunks and working room; the old whole-text tokenisation ran out)."""
    n_bytes = 19 * 10**6
    headroom = 200 << 20
    out = subprocess.run([sys.executable, "-c", _CHUNK_CHILD, str(n_bytes), str(headroom)], capture_output=True,
                         text=True, timeout=600, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, (out.stdout, out.stderr[-2000:])
    n_chunks, n_chars = map(int, out.stdout.split())
    assert n_chunks > 1000 and n_chars >= n_bytes  # every character is in a chunk (overlaps repeat some)


_CHUNK_CHILD = r"""
import re, resource, sys
from regrad_cli.offline.ingest.chunking import chunk_text

class OffsetTokenizer:
    # A fast tokenizer's interface (offsets reported), one token per word or punctuation mark:
    # the whole-text offset list of 19 MB is about 4 million tuples.
    _tok = re.compile(r"\w+|[^\w\s]")
    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        spans = [m.span() for m in self._tok.finditer(text)]
        out = {"input_ids": [0] * len(spans)}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return type("Enc", (), {"input_ids": out["input_ids"], "__getitem__": lambda s, k: out[k]})()

def vm():
    return int(open("/proc/self/statm").read().split()[0]) * 4096

n_bytes, headroom = int(sys.argv[1]), int(sys.argv[2])
words = "The observatory on Velmora Ridge was founded in 1887, and its first director was Ada. "
text = (words * (n_bytes // len(words) + 1))[:n_bytes]
limit = vm() + headroom
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    chunks = chunk_text(text, OffsetTokenizer(), 256, 32)
except MemoryError:
    print("MemoryError")
    sys.exit(3)
assert all(c.n_tokens <= 256 for c in chunks)
print(len(chunks), sum(len(c.text) for c in chunks))
"""
