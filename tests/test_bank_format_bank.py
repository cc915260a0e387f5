"""GradientBank on a real LanceDB directory: the whole life of a bank, damage, unlearning, concurrency."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from bank_format import (
    BankFormatError,
    BankMeta,
    BankMismatchError,
    CodecSpec,
    CorruptBlobError,
    GradientBank,
    TensorSpec,
    encode_blob,
)

REPO = Path(__file__).resolve().parent.parent
DIM = 8
LAYOUT = [TensorSpec("A", (4, 6)), TensorSpec("B", (6, 4))]


def make_meta(codec: str = "fp32", **kw) -> BankMeta:
    base = dict(
        producer="regrad 0.1.0",
        model={"id": "tiny-llama", "weights_sha256": "ab" * 32},
        learner={"checkpoint_id": "ckpt-1", "lora": {"r": 4, "alpha": 8}},
        embedder={"id": "fake-embedder", "dim": DIM},
        layout=LAYOUT,
        codec=CodecSpec(codec),
    )
    base.update(kw)
    return BankMeta(**base)


def make_rows(prefix: str, n: int, seed: int = 0, source: str | None = "corpus.jsonl"):
    rng = np.random.default_rng(abs(hash((prefix, seed))) % 2**32)
    return [
        {
            "doc_id": f"{prefix}{i}",
            "content_hash": f"h-{prefix}{i}",
            "embedding": rng.standard_normal(DIM).astype(np.float32),
            "tensors": [rng.standard_normal(t.shape).astype(np.float32) for t in LAYOUT],
            "n_tokens": 10 + i,
            "source": source,
        }
        for i in range(n)
    ]


def n_versions(bank: GradientBank) -> int:
    return len(bank.dataset().versions())


def all_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def files_containing(path: Path, needle: bytes) -> list[str]:
    return [name for name, data in all_files(path).items() if needle in data]


def set_stored_meta(path: Path, changes: dict) -> None:
    """Rewrite the bank metadata in place, as a newer (or broken) writer would have stored it."""
    import lance

    ds = lance.dataset(str(path / "gradients.lance"))
    meta = json.loads(ds.schema.metadata[b"regrad.bank"])
    meta.update(changes)
    ds.update_schema_metadata({"regrad.bank": json.dumps(meta)})


# -- life of a bank ----------------------------------------------------------------------------

def test_create_append_search_fetch_verify_stats(tmp_path):
    path = tmp_path / "bank"
    assert not GradientBank.exists(path)
    bank = GradientBank.create(path, make_meta())
    assert GradientBank.exists(path) and bank.count() == 0 and bank.search(np.ones(DIM), 3) == []
    v0 = n_versions(bank)

    rows_a = make_rows("a", 4)
    rows_b = make_rows("b", 3, source="other.jsonl")
    # a pre-encoded blob is accepted as is
    rows_b[0] = {**rows_b[0], "blob": encode_blob(rows_b[0]["tensors"], LAYOUT, CodecSpec("fp32"))}
    del rows_b[0]["tensors"]
    assert bank.append(rows_a) == 4
    assert bank.append(rows_b) == 3
    assert n_versions(bank) == v0 + 2, "each append must be exactly one commit"

    reopened = GradientBank.open(path, expect={"model": {"id": "tiny-llama"}, "codec": CodecSpec("fp32")})
    assert reopened.meta == bank.meta
    assert reopened.count() == 7
    assert reopened.keys() == {(r["doc_id"], r["content_hash"]) for r in rows_a + rows_b}

    hits = reopened.search(rows_a[2]["embedding"], 3)
    assert [set(h) for h in hits] == [{"doc_id", "content_hash", "source", "score"}] * 3
    assert hits[0]["doc_id"] == "a2" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert "blob" not in reopened.search_query(np.ones(DIM), 3).explain_plan(), "search must not read blobs"

    got = reopened.fetch(["a1", "b0"])
    assert all(np.array_equal(x, y) for x, y in zip(got["a1"], rows_a[1]["tensors"]))
    assert all(x.dtype == np.float32 for x in got["b0"])

    report = reopened.verify()
    assert report["rows"] == report["ok"] == 7 and report["bad"] == [] and report["duplicates"] == []

    s = reopened.stats()
    fp32_bytes = 4 * (24 + 24)
    assert s["rows"] == s["documents"] == 7
    assert s["fp32_bytes_per_doc"] == fp32_bytes
    assert s["ratio_vs_fp32"] == pytest.approx(fp32_bytes / s["bytes_per_doc"])
    assert s["bytes_on_disk"] > 0 and s["median_bytes_per_doc"] > 0 and s["versions"] == n_versions(bank)
    assert s["codec"]["name"] == "fp32" and s["format_version"] == "1.2" and s["producer"] == "regrad 0.1.0"
    assert s["fingerprints"]["model"]["id"] == "tiny-llama"
    assert s["layout"] == {"n_tensors": 2, "n_values": 48, "omitted_tensors": 0, "omitted_values": 0}
    assert s["ratio_vs_fp32_stored"] == s["ratio_vs_fp32"]  # nothing omitted


def test_create_refuses_existing_and_open_refuses_missing(tmp_path):
    GradientBank.create(tmp_path / "b", make_meta())
    with pytest.raises(BankFormatError, match="already exists"):
        GradientBank.create(tmp_path / "b", make_meta())
    with pytest.raises(BankFormatError, match="no bank at"):
        GradientBank.open(tmp_path / "nothing")


def test_mismatch_names_field_expected_and_found(tmp_path):
    GradientBank.create(tmp_path / "b", make_meta("int8"))
    with pytest.raises(BankMismatchError) as e:
        GradientBank.open(tmp_path / "b", expect={
            "model": {"id": "other-model"},
            "learner": {"checkpoint_id": "ckpt-2"},
            "embedder": {"dim": 16},
            "layout": [TensorSpec("A", (4, 6))],
            "codec": {"name": "int4"},
        })
    msg = str(e.value)
    for field, want, found in [("model.id", "other-model", "tiny-llama"), ("learner.checkpoint_id", "ckpt-2", "ckpt-1"),
                               ("embedder.dim", "16", "8"), ("codec.name", "int4", "int8"), ("layout", "A[4, 6]]", "B[6, 4]")]:
        assert field in msg and want in msg and found in msg, (field, msg)
    assert len(e.value.differences) == 5
    # only what is given is compared
    GradientBank.open(tmp_path / "b", expect={"model": {"id": "tiny-llama"}, "learner": {"lora": {"r": 4, "alpha": 8}}})


def test_versions_newer_major_refused_newer_minor_read_only(tmp_path):
    path = tmp_path / "b"
    GradientBank.create(path, make_meta()).append(make_rows("a", 2))
    set_stored_meta(path, {"format_version": "1.4", "added_in_1_4": {"x": 1}})
    bank = GradientBank.open(path)
    assert bank.read_only and bank.meta.format_version == "1.4"
    assert bank.count() == 2 and len(bank.fetch(["a0"])["a0"]) == 2
    with pytest.raises(BankFormatError, match="upgrade regrad"):
        bank.append(make_rows("c", 1))
    with pytest.raises(BankFormatError, match="upgrade regrad"):
        bank.delete(["a0"])
    set_stored_meta(path, {"format_version": "2.0"})
    with pytest.raises(BankFormatError, match="newer than this regrad.*upgrade regrad"):
        GradientBank.open(path)


def test_unknown_codec_refused_clearly(tmp_path):
    path = tmp_path / "b"
    GradientBank.create(path, make_meta())
    set_stored_meta(path, {"codec": {"name": "int3", "zstd_level": 3, "group_size": 64}})
    with pytest.raises(BankFormatError, match="unknown codec 'int3'.*fp32, fp16, int8, int4.*upgrade regrad"):
        GradientBank.open(path)


def test_open_read_only_refuses_writes(tmp_path):
    GradientBank.create(tmp_path / "b", make_meta())
    bank = GradientBank.open(tmp_path / "b", read_only=True)
    for write in (lambda: bank.append(make_rows("a", 1)), bank.purge, bank.compact, lambda: bank.delete(["x"])):
        with pytest.raises(BankFormatError, match="read-only"):
            write()


def test_append_validation(tmp_path):
    bank = GradientBank.create(tmp_path / "b", make_meta("int8"))
    good = make_rows("a", 1)[0]
    bad_rows = {
        "embedding has shape": {**good, "embedding": np.ones(DIM + 1)},
        "non-zero norm": {**good, "embedding": np.zeros(DIM)},
        "exactly one of": {**good, "blob": b"x"},
        "unknown keys": {**good, "text": "hello"},
        "n_tokens": {**good, "n_tokens": -1},
        "doc_id": {**good, "doc_id": ""},
        "bank uses 'int8'|int4": {**{k: v for k, v in good.items() if k != "tensors"},
                                   "blob": encode_blob(good["tensors"], LAYOUT, CodecSpec("int4"))},
        "shape": {**good, "tensors": [np.zeros((6, 4)), np.zeros((6, 4))]},
    }
    for pattern, row in bad_rows.items():
        with pytest.raises(BankFormatError, match=pattern):
            bank.append([row])
    with pytest.raises(BankFormatError, match="repeats"):
        bank.append([good, good])
    assert bank.count() == 0 and bank.append([]) == 0


# -- corruption ------------------------------------------------------------------------------

def _rewrite_row_with_flipped_blob(bank: GradientBank, doc_id: str) -> None:
    """Replace a row by the same row whose blob has one byte flipped but the old checksum."""
    row = bank.dataset().to_table(filter=f"doc_id = '{doc_id}'").to_pylist()[0]
    blob = bytearray(row["blob"])
    blob[len(blob) // 2] ^= 0x40
    row["blob"] = bytes(blob)
    bank.dataset().delete(f"doc_id = '{doc_id}'")
    import pyarrow as pa

    bank._table.add(pa.Table.from_pylist([row], schema=bank._table.schema.remove_metadata()))


def test_corrupt_row_detected_by_verify_and_fetch(tmp_path, caplog):
    bank = GradientBank.create(tmp_path / "b", make_meta("int8"))
    bank.append(make_rows("a", 5))
    _rewrite_row_with_flipped_blob(bank, "a3")

    report = bank.verify()
    assert report["rows"] == 5 and report["ok"] == 4
    assert [b["doc_id"] for b in report["bad"]] == ["a3"] and "checksum" in report["bad"][0]["reason"]

    with pytest.raises(CorruptBlobError) as e:
        bank.fetch(["a1", "a3"])
    assert e.value.doc_id == "a3" and "a3" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="bank_format"):
        got = bank.fetch(["a1", "a3", "missing"], strict=False)
    assert set(got) == {"a1"}
    assert "a3" in caplog.text and "missing" in caplog.text
    decoded, bad = bank.fetch_checked(["a1", "a3", "missing"])
    assert set(decoded) == {"a1"} and set(bad) == {"a3", "missing"}
    with pytest.raises(BankFormatError, match="no row for doc_id 'missing'"):
        bank.fetch(["missing"])


def test_corruption_in_data_file_detected(tmp_path):
    path = tmp_path / "b"
    bank = GradientBank.create(path, make_meta("fp32"))
    bank.append(make_rows("a", 3))
    blob = bank.dataset().to_table(filter="doc_id = 'a1'").column("blob")[0].as_py()
    [name] = files_containing(path, blob)
    data = bytearray((path / name).read_bytes())
    data[data.find(blob) + len(blob) // 2] ^= 0xFF
    (path / name).write_bytes(bytes(data))
    report = bank.verify()
    assert [b["doc_id"] for b in report["bad"]] == ["a1"] and report["ok"] == 2
    with pytest.raises(CorruptBlobError, match="a1"):
        bank.fetch(["a1"])


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_verify_reports_damaged_fragment_and_checks_the_others(tmp_path, damage):
    path = tmp_path / "b"
    bank = GradientBank.create(path, make_meta("int8"))
    for part in range(3):
        bank.append(make_rows(f"p{part}_", 2))
    frag = bank.dataset().get_fragments()[1]
    data_file = path / "gradients.lance" / "data" / frag.metadata.files[0].path
    if damage == "truncate":
        data_file.write_bytes(data_file.read_bytes()[:100])
    else:
        data_file.unlink()
    report = bank.verify()
    assert report["ok"] == 4 and report["rows"] == 6
    assert report["bad"] and all(b["fragment"] == frag.fragment_id for b in report["bad"])
    assert f"fragment {frag.fragment_id}" in report["bad"][0]["reason"]
    with pytest.raises(BankFormatError):  # whole-table reads fail with our error type, not a raw one
        bank.keys()


# -- deleting and unlearning ------------------------------------------------------------------

def test_delete_by_ids_sources_and_keep_keys(tmp_path):
    bank = GradientBank.create(tmp_path / "b", make_meta())
    bank.append(make_rows("a", 3, source="s1") + make_rows("b", 3, source="s2"))
    v = n_versions(bank)
    assert bank.delete(["a0", "zzz"]) == 1 and n_versions(bank) == v + 1
    assert bank.delete(where_sources=["s2"]) == 3
    assert bank.delete(["nothing"]) == 0
    bank.append(make_rows("c", 2))
    assert bank.delete(keep_keys={("a1", "h-a1"), ("c0", "h-c0"), ("c1", "stale-hash")}) == 2
    assert bank.keys() == {("a1", "h-a1"), ("c0", "h-c0")}
    with pytest.raises(BankFormatError):
        bank.delete()


def test_unlearning_purge_removes_bytes_from_every_file(tmp_path):
    path = tmp_path / "b"
    bank = GradientBank.create(path, make_meta("int8"))
    rows = make_rows("doc-", 40) + make_rows("late-", 3)
    bank.append(rows[:40])
    bank.create_index()  # an index holds its own copy of the (normalised) vectors
    bank.append(rows[40:])
    victim = rows[7]
    secret_id = "doc-7"  # no other id contains it: ids run doc-0 .. doc-39
    blob = bank.dataset().to_table(filter=f"doc_id = '{secret_id}'").column("blob")[0].as_py()
    emb = victim["embedding"]
    unit = (emb / np.linalg.norm(emb)).astype(np.float32)
    needles = {
        "blob": blob,
        "embedding": emb.tobytes(),
        "normalised embedding (index)": unit.tobytes()[:16],
        "doc_id": secret_id.encode(),
    }
    present = {what for what, needle in needles.items() if files_containing(path, needle)}
    # Positive controls: each is on disk before purging. The index's normalised copy is not
    # always stored byte-for-byte (its k-means training on 40 rows varies), so it is checked
    # after the purge only when it was found before.
    assert present >= {"blob", "embedding", "doc_id"}, f"missing before deletion: {set(needles) - present}"
    needles = {what: needle for what, needle in needles.items() if what in present}

    assert bank.delete([secret_id]) == 1
    assert files_containing(path, blob), "delete alone only marks the row"
    stats = bank.purge()
    assert stats["versions_removed"] > 0
    for what, needle in needles.items():
        hits = files_containing(path, needle)
        assert not hits, f"{what} of the deleted document still on disk in {hits}"
    # the rest of the bank is intact, metadata included
    reopened = GradientBank.open(path, expect={"model": {"id": "tiny-llama"}})
    assert reopened.count() == 42 and secret_id not in {k[0] for k in reopened.keys()}
    assert reopened.verify()["ok"] == 42
    assert reopened.search(emb, 1)[0]["doc_id"] != secret_id
    assert n_versions(reopened) == 1


def test_metadata_survives_appends_compaction_and_cleanup(tmp_path):
    path = tmp_path / "b"
    meta = make_meta("int4")
    bank = GradientBank.create(path, meta)
    for i in range(4):
        bank.append(make_rows(f"x{i}_", 2))
    bank.delete(["x0_0"])
    bank.compact()
    bank.purge()
    assert GradientBank.open(path).meta == meta
    assert len(bank.dataset().get_fragments()) == 1


def test_duplicates_reported_and_fetch_uses_latest(tmp_path):
    bank = GradientBank.create(tmp_path / "b", make_meta())
    first = make_rows("d", 1, seed=1)
    second = make_rows("d", 1, seed=2)
    bank.append(first)
    bank.append(second)  # same doc_id and content_hash again: allowed, but reported
    report = bank.verify()
    assert report["duplicates"] == [{"doc_id": "d0", "content_hash": "h-d0", "count": 2}]
    got = bank.fetch(["d0"])["d0"]
    assert np.array_equal(got[0], second[0]["tensors"][0])


# -- concurrency ------------------------------------------------------------------------------

_READER = r"""
import sys, time
from bank_format import GradientBank
bank = GradientBank.open(sys.argv[1], read_only=True)
seen, deadline = set(), time.time() + 20
while time.time() < deadline:
    keys = bank.keys()
    ids = {k[0] for k in keys}
    batches = {i.split("_")[0] for i in ids}
    for b in batches:  # a batch is visible entirely or not at all
        assert {f"{b}_0", f"{b}_1", f"{b}_2"} <= ids, (b, sorted(ids))
    if ids:
        some = sorted(ids)[-1]
        assert len(bank.fetch([some])[some]) == 2
    seen.add(len(ids))
    if len(ids) == 18:
        break
print(sorted(seen))
"""


def test_reader_process_sees_consistent_snapshots_during_appends(tmp_path):
    path = tmp_path / "b"
    bank = GradientBank.create(path, make_meta("int8"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(path)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for b in range(6):
            bank.append(make_rows(f"b{b}_", 3))
        out, err = reader.communicate(timeout=60)
    finally:
        reader.kill()
    assert reader.returncode == 0, err[-2000:]
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen[-1] == 18 and all(n % 3 == 0 for n in seen)


def test_two_writers_take_turns(tmp_path):
    path = tmp_path / "b"
    GradientBank.create(path, make_meta())
    banks = [GradientBank.open(path), GradientBank.open(path)]
    errors: list[BaseException] = []

    def write(i):
        try:
            for b in range(4):
                banks[i].append(make_rows(f"w{i}_{b}_", 2))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert banks[0].count() == 16 and n_versions(banks[0]) == 1 + 8


# -- in-memory search snapshot (small banks) ----------------------------------------------------

def _lance_exact(bank: GradientBank, q, k: int) -> list[tuple[str, float]]:
    t = bank.search_query(q, k).to_arrow()
    return list(zip(t.column("doc_id").to_pylist(), [1.0 - d for d in t.column("_distance").to_pylist()]))


def test_memory_search_equals_lancedb_exact_search_and_follows_every_commit(tmp_path):
    """A small bank is searched in memory: the same rows in the same order as LanceDB's exact
    search; an append, a delete and a compaction by another handle are seen by the next search
    and fetch of a reader opened before them (the snapshot is re-read on a new version)."""
    path = tmp_path / "b"
    writer = GradientBank.create(path, make_meta("int4"))
    writer.append(make_rows("a", 12))
    reader = GradientBank.open(path, read_only=True)
    rng = np.random.default_rng(3)
    for _ in range(10):
        q = rng.standard_normal(DIM).astype(np.float32)
        got = reader.search(q, 5)
        assert reader._snap is not None and reader._snap.usable
        want = _lance_exact(reader, q, 5)
        assert [h["doc_id"] for h in got] == [d for d, _ in want]
        assert [h["score"] for h in got] == pytest.approx([s for _, s in want], abs=1e-5)
    q = make_rows("a", 12)[4]["embedding"]
    assert reader.search(q, 1)[0]["doc_id"] == "a4"

    new = make_rows("n", 1, seed=9)
    writer.append(new)
    assert reader.search(new[0]["embedding"], 1)[0]["doc_id"] == "n0", "an append must be searched at once"
    got = reader.fetch(["n0"])["n0"]
    assert [g.shape for g in got] == [t.shape for t in LAYOUT]

    writer.delete(doc_ids=["a4"])
    assert "a4" not in [h["doc_id"] for h in reader.search(q, 12)]
    decoded, bad = reader.fetch_checked(["a4", "a5"])
    assert set(decoded) == {"a5"} and "a4" in bad, "a deleted row must not be fetched"
    before = {d: [x.copy() for x in v] for d, v in reader.fetch(["a5", "a11", "n0"]).items()}
    writer.compact()
    after = reader.fetch(["a5", "a11", "n0"])
    assert all(np.array_equal(x, y) for d in before for x, y in zip(before[d], after[d]))


def test_memory_search_skipped_for_indexed_or_big_banks(tmp_path, monkeypatch):
    import bank_format.bank as bank_mod

    path = tmp_path / "b"
    bank = GradientBank.create(path, make_meta())
    bank.append(make_rows("a", 6))
    monkeypatch.setattr(bank_mod, "MEMORY_SEARCH_ROWS", 5)
    q = np.ones(DIM, dtype=np.float32)
    hits = bank.search(q, 3)
    assert bank._snap is not None and not bank._snap.usable, "6 rows > 5: LanceDB searches"
    assert [h["doc_id"] for h in hits] == [d for d, _ in _lance_exact(bank, q, 3)]
    assert set(bank.fetch(["a1", "a2"])) == {"a1", "a2"}

    monkeypatch.setattr(bank_mod, "MEMORY_SEARCH_ROWS", 1000)
    bank._snap = None  # the choice is made once per version: forget this version's
    bank.search(q, 3)
    assert bank._snap.usable, "6 rows, no index: searched in memory"
    bank.create_index(num_partitions=2)
    hits = bank.search(q, 3)
    assert not bank._snap.usable, "an indexed bank is searched by LanceDB (its ANN index)"
    assert len(hits) == 3 and set(bank.fetch(["a1"])) == {"a1"}


def test_memory_search_budget_bounds_a_hostile_bank(tmp_path, monkeypatch):
    """Sources of 64 KiB each: past the byte budget the snapshot is abandoned (LanceDB searches),
    so a bank's strings cannot make a reader hold more than the budget."""
    import bank_format.bank as bank_mod

    bank = GradientBank.create(tmp_path / "b", make_meta())
    bank.append(make_rows("s", 8, source="x" * 65536))
    monkeypatch.setattr(bank_mod, "MEMORY_SEARCH_BYTES", 256 * 1024)
    q = np.ones(DIM, dtype=np.float32)
    hits = bank.search(q, 3)
    assert not bank._snap.usable
    assert [h["doc_id"] for h in hits] == [d for d, _ in _lance_exact(bank, q, 3)]
    monkeypatch.setattr(bank_mod, "MEMORY_SEARCH_BYTES", 64 << 20)
    bank._snap = None
    assert [h["doc_id"] for h in bank.search(q, 3)] == [h["doc_id"] for h in hits] and bank._snap.usable


def test_memory_fetch_uses_the_latest_of_duplicate_rows(tmp_path):
    bank = GradientBank.create(tmp_path / "b", make_meta())
    first, second = make_rows("d", 1, seed=1), make_rows("d", 1, seed=2)
    bank.append(first)
    bank.search(first[0]["embedding"], 1)  # builds the snapshot of the first version
    bank.append(second)
    got = bank.fetch(["d0"])["d0"]
    assert bank._snap.usable and np.array_equal(got[0], second[0]["tensors"][0])
