"""The ``documents`` table: schema, atomic per-source replacement, reads, BM25 and vector search."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import numpy as np
import pytest

from conftest import FakeEmbedder
from regrad_cli.workspace.config import Workspace
from regrad_cli.workspace.documents import DocumentStore, documents_schema
from regrad_cli.errors import IngestError

EMB = FakeEmbedder(dim=16)


def _row(id_, source, text, chunk=0):
    return {
        "id": id_, "source": source, "path": f"/data/{source}", "title": source.upper(), "text": text,
        "content_hash": hashlib.sha256(text.encode()).hexdigest(), "chunk": chunk,
        "n_tokens": len(text.split()), "embedding": EMB.embed([text])[0].tolist(),
        "ingested_at": datetime.now(timezone.utc), "metadata": json.dumps({"n": chunk}),
    }


@pytest.fixture
def store():
    s = DocumentStore(Workspace.open())
    s.create(16, EMB.fingerprint)
    s.replace_sources([_row("a#0", "a", "The lighthouse keeper counts ships at dawn."),
                       _row("a#1", "a", "Fog horns sound over the harbour wall.", 1)], ["a"])
    s.replace_sources([_row("b#0", "b", "Bees make honey from clover in summer.")], ["b"])
    return s


def test_empty_workspace_reads_as_empty():
    s = DocumentStore(Workspace.open())
    assert (s.exists, s.count(), s.keys(), s.sources(), s.get(["x"]), s.embedder_fingerprint) == (
        False, 0, {}, [], {}, None)
    with pytest.raises(IngestError, match="regrad ingest"):
        s.search_text("honey", 3)


def test_schema_and_fingerprint(store):
    schema = DocumentStore(Workspace.open()).table().schema  # a fresh reader sees the same
    assert schema.names == ["id", "source", "path", "title", "text", "content_hash", "chunk", "n_tokens",
                            "embedding", "ingested_at", "metadata"]
    assert str(schema.field("embedding").type) == "fixed_size_list<item: float>[16]"
    assert str(schema.field("chunk").type) == "int32"
    assert DocumentStore(Workspace.open()).embedder_fingerprint == {"id": "fake-embedder", "dim": 16}
    assert documents_schema(16, EMB.fingerprint).names == schema.names


def test_reads(store):
    assert store.count() == 3 and store.sources() == ["a", "b"]
    assert store.keys()["b#0"] == hashlib.sha256(b"Bees make honey from clover in summer.").hexdigest()
    got = store.get(["a#1", "missing"], ["text", "chunk"])
    assert got == {"a#1": {"id": "a#1", "text": "Fog horns sound over the harbour wall.", "chunk": 1}}
    assert store.texts(["b#0"]) == {"b#0": "Bees make honey from clover in summer."}
    rows = store.all(["id", "title"])
    assert sorted(r["id"] for r in rows) == ["a#0", "a#1", "b#0"] and set(rows[0]) == {"id", "title"}
    assert store.arrow(["id"], where="source = 'a'").num_rows == 2


def test_replace_sources_replaces_only_those_sources(store):
    v = store.version
    store.replace_sources([_row("a#0", "a", "A brand new lighthouse text.")], ["a"])
    assert store.version == v + 1  # one commit
    assert set(store.keys()) == {"a#0", "b#0"}
    assert store.texts(["a#0"]) == {"a#0": "A brand new lighthouse text."}
    assert store.delete_sources(["b", "nope"]) == 1 and set(store.keys()) == {"a#0"}
    v = store.version
    assert store.delete_sources(["nope"]) == 0 and store.version == v  # nothing matched: no commit


def test_a_failed_write_changes_nothing(store):
    before = store.get(store.keys())
    bad = _row("a#0", "a", "oops")
    bad["embedding"] = [0.0] * 3  # wrong dimension: the write fails before committing
    with pytest.raises(Exception):
        store.replace_sources([bad], ["a"])
    again = DocumentStore(Workspace.open())
    assert again.get(again.keys()) == before


def test_quotes_in_sources_and_ids(store):
    store.replace_sources([_row("it's#0", "it's", "Apostrophes are fine.")], ["it's"])
    assert store.texts(["it's#0"]) == {"it's#0": "Apostrophes are fine."}
    assert store.delete_sources(["it's"]) == 1


def test_bm25_search_and_index_refresh(store):
    assert store.ensure_fts_index() is True
    assert store.ensure_fts_index() is False  # up to date: no new version
    hits = store.search_text("honey clover", 2)
    assert hits[0][0] == "b#0" and hits[0][1] > 0
    store.replace_sources([_row("c#0", "c", "Clover fields and honey bees near the lighthouse.")], ["c"])
    assert {h[0] for h in store.search_text("honey", 5)} == {"b#0", "c#0"}  # unindexed rows searched too
    assert store.ensure_fts_index() is True
    assert store.search_text('weird "query" AND (', 3) is not None
    assert store.search_text("   ", 3) == []


def test_vector_search(store):
    q = EMB.embed(["Bees make honey from clover in summer."])[0]
    hits = store.search_vector(q, 2)
    assert hits[0][0] == "b#0" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 2 and hits[0][1] >= hits[1][1]
    assert isinstance(np.float32(hits[1][1]), np.floating)
