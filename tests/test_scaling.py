"""Scale-out (docs/scaling.md): `build-bank --engine ray` and object-store banks.

Runs on the tiny random Llama, byte tokenizer and fake embedder of conftest.py, with a real local
Ray cluster (2 CPU workers, each loading the engine itself) and a real S3-compatible server on
loopback (moto's server) for remote banks. The same build on the real models is checked against
the single-process bank in tests/test_end_to_end.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DEMO_DIR
from reliability_helpers import (
    HERE,
    REPO,
    Worker,
    bank_of,
    do_build,
    do_ingest,
    make_engine,
    open_ws,
    worker_cmd,
    worker_env,
    write_corpus,
)

pytest.importorskip("ray")

from bank_format import CodecSpec, GradientBank  # noqa: E402
from regrad_cli.offline.ray_build import build_bank_ray  # noqa: E402

FP32 = CodecSpec(name="fp32")


@pytest.fixture
def ray_env(monkeypatch):
    # Ray's workers start from this environment: they must import the tests' tiny engine.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def engine():
    return make_engine()


def rows_by_id(bank) -> dict:
    t = bank.dataset().to_table(columns=["doc_id", "content_hash", "source", "embedding", "n_tokens", "codec"])
    return {r["doc_id"]: r for r in t.to_pylist()}


def assert_same_bank(a, b, atol=1e-6):
    """Same rows (keys, sources, embeddings, token counts), metadata and decoded gradients."""
    ra, rb = rows_by_id(a), rows_by_id(b)
    assert ra.keys() == rb.keys() and len(ra) == a.count() == b.count()
    for d in ra:
        x, y = dict(ra[d]), dict(rb[d])
        np.testing.assert_array_equal(x.pop("embedding"), y.pop("embedding"))
        assert x == y
    for field in ("model", "learner", "embedder", "layout", "codec", "format_version"):
        assert getattr(a.meta, field) == getattr(b.meta, field), field
    ids = sorted(ra)
    ga, gb = a.fetch(ids), b.fetch(ids)
    worst = max(float(np.abs(u - v).max()) for d in ids for u, v in zip(ga[d], gb[d]))
    assert worst <= atol, worst
    assert any(float(np.abs(u).max()) > 0 for u in ga[ids[0]])  # real gradients, not zeros


def two_workspaces(tmp_path: Path, corpus: Path):
    wss = []
    for name in ("single", "ray"):
        ws = open_ws(tmp_path / name)
        do_ingest(ws, corpus)
        wss.append(ws)
    return wss


@pytest.mark.slow
def test_ray_build_of_demo_corpus_equals_single_process(tmp_path, engine, ray_env):
    single, distributed = two_workspaces(tmp_path, DEMO_DIR / "corpus")
    s1 = do_build(single, engine, batch_size=4).to_dict()
    seen = []
    s2 = build_bank_ray(distributed, engine, loader=make_engine, batch_size=4,
                        workers=2, progress=lambda d, n, r: seen.append((d, n))).to_dict()
    assert s2["built"] == s1["built"] == s1["rows"] == s2["rows"] > 36  # demo files cut into chunks
    assert s2["failed"] == [] and seen[-1] == (s2["built"], s2["built"])
    a, b = bank_of(single, engine), bank_of(distributed, engine)
    # int4 codes of gradients equal to float tolerance: equal up to one quantisation step at most.
    assert_same_bank(a, b, atol=1e-3)
    report = b.verify()
    assert report["ok"] == report["rows"] == s2["rows"] and not report["bad"] and not report["duplicates"]
    # The new bank's metadata and all its rows arrived in one commit: version 1.
    assert b.version() == 1
    # A rerun does nothing and commits nothing.
    again = build_bank_ray(distributed, engine, loader=make_engine, workers=2).to_dict()
    assert again["built"] == 0 and again["skipped"] == s2["rows"] and b.version() == 1


@pytest.mark.slow
def test_ray_build_fp32_gradients_equal_and_stale_rows_replaced(tmp_path, engine, ray_env):
    corpus = write_corpus(tmp_path / "corpus", 10)
    from regrad_cli.offline.build import build_bank

    single2, distributed = two_workspaces(tmp_path, corpus)
    build_bank(single2, engine, codec=FP32)
    build_bank_ray(distributed, engine, loader=make_engine, codec=FP32, workers=2)
    assert_same_bank(bank_of(single2, engine), bank_of(distributed, engine), atol=1e-6)

    # A changed document: its new gradient comes in, its stale row goes.
    (corpus / "doc004.txt").write_text("document four, rewritten entirely: zarn kelb vesper.", encoding="utf-8")
    for ws in (single2, distributed):
        do_ingest(ws, corpus)
    s = build_bank_ray(distributed, engine, loader=make_engine, workers=2).to_dict()
    assert s["built"] >= 1 and s["removed_stale"] >= 1
    build_bank(single2, engine)
    assert_same_bank(bank_of(single2, engine), bank_of(distributed, engine), atol=1e-6)


@pytest.mark.slow
def test_ray_build_failing_before_commit_leaves_bank_unchanged(tmp_path, engine, ray_env, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", 9)
    ws = open_ws(tmp_path / "ws")
    do_ingest(ws, corpus)
    do_build(ws, engine)
    bank = bank_of(ws, engine)
    before = (bank.version(), bank.keys(), bank.count())
    write_corpus(corpus, 6, start=9)  # new work for the distributed build
    do_ingest(ws, corpus)

    def interrupted(self, fragments, keys=None, **_):
        assert fragments, "the workers wrote fragments"
        raise KeyboardInterrupt  # Ctrl-C (or a kill) right before the commit

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(GradientBank, "commit_fragments", interrupted)
        build_bank_ray(ws, engine, loader=make_engine, workers=2)
    bank = bank_of(ws, engine)
    assert (bank.version(), bank.keys(), bank.count()) == before
    assert bank.verify()["ok"] == before[2]

    s = build_bank_ray(ws, engine, loader=make_engine, workers=2).to_dict()
    assert s["skipped"] == before[2] and s["rows"] == before[2] + s["built"] and s["built"] > 0
    report = bank_of(ws, engine).verify()
    assert report["ok"] == report["rows"] == s["rows"] and not report["duplicates"]
    # compact removes the data files the interrupted build left unreferenced.
    data = bank.path / "gradients.lance" / "data"
    n_files = len(list(data.iterdir()))
    bank_rw = GradientBank.open(bank.path)
    bank_rw.compact()
    assert len(list(data.iterdir())) < n_files and bank_rw.verify()["ok"] == s["rows"]


@pytest.mark.slow
def test_first_ray_build_failing_before_commit_leaves_no_bank(tmp_path, engine, ray_env, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", 6)
    ws = open_ws(tmp_path / "ws")
    do_ingest(ws, corpus)
    path = ws.bank_path(engine.learner.checkpoint_id())

    def interrupted(cls, *a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(GradientBank, "create_from_fragments", classmethod(interrupted))
        build_bank_ray(ws, engine, loader=make_engine, workers=2)
    assert not GradientBank.exists(path)  # no bank at all, not an empty one
    s = build_bank_ray(ws, engine, loader=make_engine, workers=2).to_dict()
    assert s["built"] == s["rows"] > 6 and bank_of(ws, engine).version() == 1


@pytest.mark.slow
def test_ray_build_killed_by_sigkill_before_commit(tmp_path, engine, ray_env):
    """A real kill -9 of the driver while its workers compute: no row appears, the rerun is whole."""
    corpus = write_corpus(tmp_path / "corpus", 12)
    ws = open_ws(tmp_path / "ws")
    do_ingest(ws, corpus)
    do_build(ws, engine)
    before = bank_of(ws, engine)
    state = (before.version(), before.keys())
    write_corpus(corpus, 8, start=12)
    do_ingest(ws, corpus)
    # --pause: the driver sleeps after each batch of results, before the commit: kill it there.
    worker = Worker(worker_cmd(ws.root, corpus, "--build", "--ray", "2", "--pause", "30"))
    try:
        worker.wait_for_events(2, timeout=240)  # "ready", "build 0/n"
        while not any(line.startswith("build ") and not line.startswith("build 0/") for line in worker.lines):
            assert worker.proc.poll() is None, worker.lines
            time.sleep(0.2)
        worker.kill()
    finally:
        code, err = worker.finish()
    assert code == -9, err[-2000:]
    after = bank_of(ws, engine)
    assert (after.version(), after.keys()) == state
    s = build_bank_ray(ws, engine, loader=make_engine, workers=2).to_dict()
    assert s["built"] == s["rows"] - len(state[1]) > 0
    report = bank_of(ws, engine).verify()
    assert report["ok"] == report["rows"] == s["rows"] and not report["duplicates"]


# Object-store banks -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    """A real S3-compatible HTTP server on loopback (moto); yields (bucket URI, storage options)."""
    import logging

    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    opts = {"aws_endpoint": endpoint, "aws_access_key_id": "test", "aws_secret_access_key": "test",
            "aws_region": "us-east-1", "allow_http": "true"}
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="banks")
    yield "s3://banks", opts
    server.stop()


def s3_workspace(root: Path, uri: str, opts: dict, corpus: Path):
    from regrad_cli.workspace.config import Workspace

    ws = open_ws(root)
    ws.config.bank.uri = uri
    ws.config.bank.storage_options = {k: v for k, v in opts.items() if not k.startswith("aws_secret")}
    ws.save()  # the secret stays out of regrad.toml: it comes from the environment variable
    do_ingest(ws, corpus)
    return Workspace.open(root, overrides={"chunking.max_tokens": 64, "chunking.overlap": 8})


def test_workspace_bank_on_object_store(tmp_path, engine, s3, monkeypatch, capsys):
    from conftest import FakeEmbedder
    from regrad_cli.offline.build import build_bank
    from regrad_cli.online.query import QueryEngine
    from reliability_helpers import run_cli

    bucket, opts = s3
    monkeypatch.setenv("REGRAD_BANK_STORAGE_OPTIONS", json.dumps({"aws_secret_access_key": opts["aws_secret_access_key"]}))
    corpus = write_corpus(tmp_path / "corpus", 8)
    ws = s3_workspace(tmp_path / "ws", f"{bucket}/team-a/", opts, corpus)
    cid = engine.learner.checkpoint_id()
    # One bank per workspace under a shared location (two workspaces never write one bank).
    assert ws.bank_path(cid) == f"{bucket}/team-a/ws-{ws.workspace_id}/bank-{cid[:16]}"
    s = build_bank(ws, engine).to_dict()
    assert s["bank"].startswith("s3://banks/team-a/ws-") and s["built"] == s["rows"] > 8
    assert not (ws.root / "banks" / f"bank-{cid[:16]}").exists()  # nothing written locally

    local = open_ws(tmp_path / "local")
    do_ingest(local, corpus)
    build_bank(local, engine)
    remote = GradientBank.open(s["bank"], storage_options=ws.bank_storage_options(), read_only=True)
    assert remote.remote and remote.verify()["ok"] == s["rows"]
    assert_same_bank(bank_of(local, engine), remote, atol=0)

    # Queries read the remote bank; the retrieved gradients are applied.
    qe = QueryEngine(ws, engine=engine, embedder=FakeEmbedder())
    question = (corpus / "doc003.txt").read_text()
    res = qe.answer(question, top_k=2, max_new_tokens=2)
    applied = [r for r in res["retrieved"] if r["applied"]]
    assert len(applied) == 2 and not res.get("skipped")

    # The CLI's bank commands on the remote bank, found through the workspace config.
    code, out, err = run_cli(["bank", "stats", "--json", "-w", ws.root, "--bank", s["bank"]], capsys, monkeypatch)
    stats = json.loads(out)
    assert code == 0 and stats["rows"] == s["rows"] and stats["path"] == s["bank"] and stats["bytes_on_disk"] > 0
    code, out, err = run_cli(["bank", "verify", "--json", "-w", ws.root, "--bank", s["bank"]], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["ok_all"]

    # Unlearning on the object store: the row goes and old versions are purged.
    victim = sorted(remote.keys())[0][0]
    code, out, err = run_cli(["bank", "rm", victim, "--keep-documents", "--json", "-w", ws.root, "--bank", s["bank"]],
                             capsys, monkeypatch)
    assert code == 0 and json.loads(out)["removed_rows"] == 1, err
    assert victim not in {k[0] for k in remote.keys()} and len(remote.dataset().versions()) == 1


@pytest.mark.slow
def test_ray_build_into_object_store_bank(tmp_path, engine, s3, ray_env, monkeypatch):
    bucket, opts = s3
    monkeypatch.setenv("REGRAD_BANK_STORAGE_OPTIONS", json.dumps({"aws_secret_access_key": opts["aws_secret_access_key"]}))
    corpus = write_corpus(tmp_path / "corpus", 8)
    ws = s3_workspace(tmp_path / "ws", f"{bucket}/team-b", opts, corpus)
    s = build_bank_ray(ws, engine, loader=make_engine, workers=2, codec=FP32).to_dict()
    assert s["bank"].startswith("s3://banks/team-b/") and s["built"] == s["rows"] > 8
    from regrad_cli.offline.build import build_bank

    local = open_ws(tmp_path / "local")
    do_ingest(local, corpus)
    build_bank(local, engine, codec=FP32)
    remote = GradientBank.open(s["bank"], storage_options=ws.bank_storage_options(), read_only=True)
    assert remote.version() == 1
    assert_same_bank(bank_of(local, engine), remote, atol=1e-6)


@pytest.mark.slow
def test_ray_build_joins_an_existing_cluster(tmp_path, engine, ray_env):
    """--ray-address: a cluster started apart (`ray start --head`) runs the build; regrad does
    not start or stop it."""
    import shutil
    import socket
    import subprocess
    import sys

    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        ray_cli = shutil.which("ray")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = subprocess.run([str(ray_cli), "start", "--head", "--port", str(port), "--num-cpus", "2",
                            "--include-dashboard", "false", "--disable-usage-stats"],
                           capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        corpus = write_corpus(tmp_path / "corpus", 6)
        single, distributed = two_workspaces(tmp_path, corpus)
        do_build(single, engine)
        # A fresh process, as the CLI is: Ray reads its authentication mode when first imported.
        run = subprocess.run(worker_cmd(distributed.root, corpus, "--build", "--ray", "2",
                                        "--ray-address", f"127.0.0.1:{port}"),
                             cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        s = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("summary "))[len("summary "):])
        assert s["built"] == s["rows"] > 6
        assert_same_bank(bank_of(single, engine), bank_of(distributed, engine), atol=1e-3)
        status = subprocess.run([str(ray_cli), "status", "--address", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "RAY_AUTH_MODE": "token"})
        assert status.returncode == 0, status.stderr[-1000:]  # still up: regrad left it running
    finally:
        subprocess.run([str(ray_cli), "stop"], capture_output=True, timeout=120)


def test_fragment_writer_never_pickles_credentials(tmp_path):
    import pickle

    from bank_format import BankMeta, TensorSpec
    from bank_format.fragments import FragmentWriter

    meta = BankMeta(producer="t", model={"id": "m"}, learner={"checkpoint_id": "c"}, embedder={"id": "e", "dim": 4},
                    layout=[TensorSpec("a", (2,))], codec=CodecSpec("fp32"))
    opts = {"aws_region": "eu-west-1", "aws_access_key_id": "AKIA-SECRET", "aws_secret_access_key": "s3cr3t",
            "aws_session_token": "tok", "allow_http": "true"}
    w = FragmentWriter("s3://b/bank", meta, opts)
    blob = pickle.dumps(w)
    assert b"s3cr3t" not in blob and b"tok\x94" not in blob  # the key *id* names a key, like a user name
    back = pickle.loads(blob)
    assert back.storage_options == {"aws_region": "eu-west-1", "allow_http": "true", "aws_access_key_id": "AKIA-SECRET"}
    assert set(back.secrets_left_out) == {"aws_secret_access_key", "aws_session_token"}
    again = back.with_storage_options({"aws_secret_access_key": "worker-own"})
    assert again.storage_options["aws_secret_access_key"] == "worker-own"


def test_local_ray_cluster_is_its_own_and_ignores_ray_auth_mode(monkeypatch):
    import sys
    import types

    from regrad_cli.offline import ray_build
    seen = {}

    def init(**kw):
        seen.update(kw)
        seen["auth_mode_at_init"] = os.environ.get("RAY_AUTH_MODE")

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_build._init_ray(None, 2, 1.0, 0.0) is True
    assert seen["auth_mode_at_init"] is None
    assert seen["address"] == "local"  # never joins a `ray start` cluster found on the machine
    assert os.environ["RAY_AUTH_MODE"] == "disabled"  # restored for the user's other clusters
