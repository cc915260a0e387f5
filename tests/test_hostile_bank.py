"""Hostile banks and blobs: crafted by someone else, read under a memory limit.

Every case runs the reader in a subprocess whose address space is capped with
``resource.RLIMIT_AS`` (``LIMIT``): a decompression bomb that allocated what its header claims
would die there with MemoryError or be killed. The reader must instead refuse the blob or bank
with ``BankFormatError`` (and nothing else) before allocating, and exit normally.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from bank_format import BankFormatError, BankMeta, CodecSpec, CorruptBlobError, GradientBank, TensorSpec, decode_blob
from bank_format.blob import _HEADER, FREE_PAYLOAD_BYTES, MAGIC, MAX_PAYLOAD_BYTES, encode_blob
from bank_format.schema import arrow_schema

REPO = Path(__file__).resolve().parent.parent
# Address-space cap of the reading subprocess. A Python process with lance loaded maps about
# 2.3 GB of (mostly unused) virtual memory; the bombs below would each need more than 3 GB more.
LIMIT = 3 << 30

_RUNNER = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from bank_format import BankFormatError, GradientBank, decode_blob
out = {}
def attempt(name, fn):
    try:
        r = fn()
        out[name] = {"ok": True, "value": r}
    except BankFormatError as e:
        out[name] = {"ok": False, "error": "BankFormatError", "message": str(e)[:300]}
    except BaseException as e:  # anything else is a failure of the guarantee
        out[name] = {"ok": False, "error": type(e).__name__, "message": str(e)[:300]}
job = json.loads(sys.argv[2])
for i, path in enumerate(job.get("blobs", [])):
    data = open(path, "rb").read()
    attempt(f"blob{i}", lambda: [a.shape for a in decode_blob(data)] and "decoded")
if "bank" in job:
    def opened():
        return GradientBank.open(job["bank"], read_only=True)
    attempt("open", lambda: opened() and "opened")
    attempt("verify", lambda: {k: v for k, v in opened().verify().items() if k in ("rows", "ok")} |
            {"bad": [b["reason"][:300] for b in opened().verify()["bad"]]})
    attempt("fetch", lambda: sorted(opened().fetch_checked(job.get("ids", []))[1]))
    attempt("stats", lambda: opened().stats()["rows"])
if job.get("fuzz"):
    # Random headers over small frames that expand a lot: any outcome but a BankFormatError or
    # a clean decode is a failure, and so is running out of the capped address space.
    import random, struct, zstandard
    from bank_format.blob import _HEADER, MAGIC
    rng = random.Random(job["fuzz"])
    frames = [zstandard.ZstdCompressor(write_checksum=rng.random() < 0.8,
                                       write_content_size=rng.random() < 0.8).compress(bytes(n))
              for n in (0, 1, 100, 1 << 16, 1 << 22, 1 << 26)]
    fails = []
    for i in range(job["n"]):
        frame = rng.choice(frames)
        plen = rng.choice([0, 1, len(frame), 1 << 16, 1 << 22, 1 << 26, 1 << 30, (1 << 30) + 1,
                           2**63, 2**64 - 1, rng.randrange(2**64)])
        hdr = _HEADER.pack(MAGIC, rng.choice([1, 1, 1, 0, 2]), rng.randrange(6), rng.choice([0, 0, 1]),
                           rng.choice([0, 1, 2, 33, 2**32 - 1, rng.randrange(2**32)]),
                           rng.choice([0, 2, 64, 65536, 65537, rng.randrange(2**32)]), plen)
        blob = hdr + frame
        if rng.random() < 0.3:
            b = bytearray(blob)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            blob = bytes(b)
        try:
            decode_blob(blob)
        except BankFormatError:
            pass
        except BaseException as e:
            fails.append(f"{type(e).__name__}: {e}"[:200])
    out["fuzz"] = fails
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        out["peak_rss_kb"] = int(line.split()[1])
print(json.dumps(out))
"""


def run_limited(job: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", _RUNNER, str(LIMIT), json.dumps(job)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def zero_frame(n: int, *, content_size: bool = True) -> bytes:
    """A valid zstd frame of n zero bytes, made without holding n bytes (a few KB per GB)."""
    cctx = zstandard.ZstdCompressor(write_checksum=True, write_content_size=content_size)
    cobj = cctx.compressobj(size=n if content_size else -1)
    chunk = bytes(1 << 20)
    parts = []
    for start in range(0, n, len(chunk)):
        parts.append(cobj.compress(chunk[: min(len(chunk), n - start)]))
    parts.append(cobj.flush())
    return b"".join(parts)


def header(payload_len: int, n_tensors: int = 1, codec_id: int = 0, group: int = 0) -> bytes:
    return _HEADER.pack(MAGIC, 1, codec_id, 0, n_tensors, group, payload_len)


def fp32_bomb(n_values: int) -> bytes:
    """A blob whose header, frame and shape all agree on n_values fp32 zeros: the bomb."""
    payload_len = 1 + 4 + 4 * n_values
    cctx = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True)
    cobj = cctx.compressobj(size=payload_len)
    parts = [cobj.compress(struct.pack("<BI", 1, n_values))]
    chunk = bytes(1 << 20)
    left = 4 * n_values
    while left:
        parts.append(cobj.compress(chunk[: min(left, len(chunk))]))
        left -= min(left, len(chunk))
    parts.append(cobj.flush())
    return header(payload_len) + b"".join(parts)


def blob_cases(tmp_path: Path) -> dict[str, bytes]:
    big = 1 << 30  # a GB of zeros: about 30 KB compressed
    cases = {
        "gb_bomb": fp32_bomb((big - 5) // 4),
        "512mb_bomb": fp32_bomb(1 << 27),
        "over_the_cap": header(MAX_PAYLOAD_BYTES + 1) + zero_frame(1 << 20),
        "u64_payload_len": header(2**64 - 1) + zero_frame(1 << 10),
        "u32_tensor_count": header(2**32 - 1, n_tensors=2**32 - 1) + zero_frame(1 << 10),
        "unknown_content_size": header(1 << 20) + zero_frame(1 << 20, content_size=False),
        "frame_larger_than_header": header(1 << 10) + zero_frame(64 << 20),
        "frame_smaller_than_header": header(32 << 20) + zero_frame(1 << 20),
        "two_frames": header(2 << 10) + zero_frame(1 << 10) + zero_frame(1 << 10),
        "int4_huge_groups": header(1 << 29, codec_id=3, group=65536) + zero_frame(1 << 20),
    }
    # A frame header whose content-size field was edited after compression (the frame lies).
    real = zero_frame(64 << 20)
    lie = bytearray(real)
    fhd = lie[4]
    if (fhd >> 6) == 3:  # 8-byte content size field right after the descriptor (+window byte)
        off = 5 + (0 if fhd & 0x20 else 1)
        struct.pack_into("<Q", lie, off, 1 << 10)
    cases["frame_content_size_lies"] = header(1 << 10) + bytes(lie)
    return cases


def test_crafted_blobs_fail_fast_with_bank_format_error_under_a_memory_limit(tmp_path):
    cases = blob_cases(tmp_path)
    paths = []
    for name, data in cases.items():
        assert len(data) < 200_000, (name, len(data))  # small on disk, huge if believed
        p = tmp_path / f"{name}.bin"
        p.write_bytes(data)
        paths.append(str(p))
    out = run_limited({"blobs": paths})
    for i, name in enumerate(cases):
        res = out[f"blob{i}"]
        assert res.get("error") == "BankFormatError", (name, res)
    # Nothing close to the claimed sizes was allocated.
    assert out["peak_rss_kb"] < 600_000, out["peak_rss_kb"]


def test_fuzzed_headers_over_expanding_frames_under_a_memory_limit():
    out = run_limited({"fuzz": 19, "n": 600})
    assert out["fuzz"] == [], out["fuzz"][:5]
    assert out["peak_rss_kb"] < 600_000, out["peak_rss_kb"]


def test_in_process_every_crafted_blob_is_a_bank_format_error(tmp_path):
    for name, data in blob_cases(tmp_path).items():
        with pytest.raises(BankFormatError):
            decode_blob(data)


def test_honest_blobs_within_the_allowance_still_decode():
    # All-zero gradients compress ~30000x; up to FREE_PAYLOAD_BYTES they are still accepted.
    layout = [TensorSpec("t", ((FREE_PAYLOAD_BYTES - 16) // 4,))]
    blob = encode_blob([np.zeros(layout[0].shape, np.float32)], layout, CodecSpec("fp32"))
    (out,) = decode_blob(blob, layout)
    assert out.shape == layout[0].shape and not out.any()
    rng = np.random.default_rng(0)
    dense = [TensorSpec("a", (512, 1024))]
    vals = [rng.standard_normal((512, 1024)).astype(np.float32)]
    for codec in ("fp32", "fp16", "int8", "int4"):
        got = decode_blob(encode_blob(vals, dense, CodecSpec(codec)), dense)
        assert got[0].shape == (512, 1024)


def test_writer_refuses_what_readers_would_refuse():
    layout = [TensorSpec("t", (4 << 20,))]  # 16 MB of zeros: past the allowance, ~30000x
    with pytest.raises(BankFormatError, match="degenerate"):
        encode_blob([np.zeros((4 << 20,), np.float32)], layout, CodecSpec("fp32"))


# Hostile banks -----------------------------------------------------------------------------------
def _meta(layout, dim=4) -> BankMeta:
    return BankMeta(producer="hostile", model={"id": "m", "weights_sha256": "x"},
                    learner={"checkpoint_id": "c"}, embedder={"id": "e", "dim": dim},
                    layout=layout, codec=CodecSpec("fp32"))


def _raw_rows(bank_path: Path, rows: list[dict], dim: int = 4) -> None:
    """Append rows straight through Lance, bypassing every check of GradientBank.append."""
    import lance
    import pyarrow as pa

    from datetime import datetime, timezone

    n = len(rows)
    table = pa.table({
        "doc_id": pa.array([r["doc_id"] for r in rows], pa.string()),
        "content_hash": pa.array([r.get("content_hash", "h") for r in rows], pa.string()),
        "source": pa.array([r.get("source", "s") for r in rows], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * dim, np.float32)), dim),
        "blob": pa.array([r["blob"] for r in rows], pa.large_binary()),
        "codec": pa.array([r.get("codec", "fp32") for r in rows], pa.string()),
        "n_tokens": pa.array([1] * n, pa.int32()),
        "checksum": pa.array([r.get("checksum") or hashlib.sha256(r["blob"]).hexdigest() for r in rows], pa.string()),
        "created_at": pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
    }, schema=arrow_schema(dim))
    lance.write_dataset(table, str(bank_path / "gradients.lance"), mode="append")


def test_bank_whose_layout_matches_its_bombs_is_refused_row_by_row(tmp_path):
    """A 40 KB bank: layout of 2^27 fp32 values and rows whose blobs really expand to 512 MB."""
    n_values = 1 << 27
    path = tmp_path / "bank"
    GradientBank.create(path, _meta([TensorSpec("t", (n_values,))]))
    bomb = fp32_bomb(n_values)
    _raw_rows(path, [{"doc_id": f"d{i}", "blob": bomb} for i in range(3)])
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 200_000
    out = run_limited({"bank": str(path), "ids": ["d0", "d1", "d2"]})
    assert out["open"]["ok"], out
    v = out["verify"]
    assert v["ok"] and v["value"]["rows"] == 3 and v["value"]["ok"] == 0, v
    assert all("decompression bomb" in b for b in v["value"]["bad"]), v
    assert out["fetch"]["ok"] and out["fetch"]["value"] == ["d0", "d1", "d2"], out["fetch"]
    assert out["stats"]["ok"], out["stats"]
    assert out["peak_rss_kb"] < 600_000, out["peak_rss_kb"]


def test_bank_declaring_a_huge_layout_is_refused_on_open(tmp_path):
    import lance

    path = tmp_path / "bank"
    GradientBank.create(path, _meta([TensorSpec("t", (8,))]))
    ds = lance.dataset(str(path / "gradients.lance"))
    meta = {k.decode(): v.decode() for k, v in ds.schema.metadata.items()}
    doc = json.loads(meta["regrad.bank"])
    doc["layout"] = [{"name": "t", "shape": [2**32 - 1, 2**32 - 1]}]
    meta["regrad.bank"] = json.dumps(doc)
    ds.update_schema_metadata(meta, replace=True)
    out = run_limited({"bank": str(path)})
    for step in ("open", "verify", "fetch", "stats"):
        assert out[step]["error"] == "BankFormatError", (step, out[step])


def test_hostile_rows_and_ids_in_bank_verify_cli(tmp_path, capsys, monkeypatch):
    """Terminal escapes and rich markup in doc ids and metadata are printed inert."""
    from reliability_helpers import run_cli

    path = tmp_path / "bank"
    layout = [TensorSpec("t", (8,))]
    GradientBank.create(path, _meta(layout))
    good = encode_blob([np.ones(8, np.float32)], layout, CodecSpec("fp32"))
    _raw_rows(path, [{"doc_id": "\x1b[2J\x1b]0;pwned\x07[/x][bold]", "blob": good, "checksum": "0" * 64},
                     {"doc_id": "fine", "blob": good}])
    code, out, err = run_cli(["bank", "verify", "--bank", path], capsys, monkeypatch)
    assert code == 1 and "\x1b" not in out + err and "\\x1b[2J" in err, err
    code, out, err = run_cli(["bank", "stats", "--bank", path], capsys, monkeypatch)
    assert code == 0 and "\x1b" not in out + err


def test_bank_with_another_tensor_layout_is_refused_by_query(tmp_path):
    """A bank whose layout names other tensors than the learner stores (same checkpoint id,
    edited metadata): the query side refuses it, naming the layout, instead of applying it."""
    import lance

    from bank_format import BankMismatchError
    from conftest import FakeEmbedder
    from regrad_cli.workspace.banks import expected_fingerprints
    from reliability_helpers import bank_of, do_build, do_ingest, make_engine, open_ws, write_corpus

    engine = make_engine()
    ws = open_ws(tmp_path / "ws")
    do_ingest(ws, write_corpus(tmp_path / "corpus", 2))
    do_build(ws, engine)
    path = bank_of(ws, engine).path
    ds = lance.dataset(str(path / "gradients.lance"))
    meta = {k.decode(): v.decode() for k, v in ds.schema.metadata.items()}
    doc = json.loads(meta["regrad.bank"])
    doc["layout"] = list(reversed(doc["layout"]))  # same tensors, other order: other meaning
    meta["regrad.bank"] = json.dumps(doc)
    ds.update_schema_metadata(meta, replace=True)
    with pytest.raises(BankMismatchError, match="layout"):
        GradientBank.open(path, expect=expected_fingerprints(engine, FakeEmbedder().fingerprint))
