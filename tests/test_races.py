"""Racing writers and maintainers: no data lost, nothing unlearned comes back, no broken bank.

Covers issue 19's race findings: a Ray-style fragment write racing compaction and ``bank rm``;
``bank rm`` between a build's planning and its append, and interrupted half-way; two workspaces
sharing one bank location; throwaway workspaces and ``$REGRAD_BANK_URI``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bank_format import BankFormatError, BankMeta, CodecSpec, GradientBank, TensorSpec
from conftest import FakeEmbedder
from reliability_helpers import bank_of, do_build, do_ingest, make_engine, open_ws, run_cli, write_corpus

LAYOUT = [TensorSpec("a", (4, 3)), TensorSpec("b", (5,))]


@pytest.fixture(scope="module")
def engine():
    return make_engine()


def _meta() -> BankMeta:
    return BankMeta(producer="test", model={"id": "m", "weights_sha256": "x"}, learner={"checkpoint_id": "c"},
                    embedder={"id": "e", "dim": 4}, layout=LAYOUT, codec=CodecSpec("fp32"))


def _rows(ids, seed=0):
    rng = np.random.default_rng(seed)
    return [{"doc_id": d, "content_hash": f"h-{d}", "embedding": rng.standard_normal(4) + 2, "n_tokens": 3,
             "source": f"src/{d}", "tensors": [rng.standard_normal(t.shape).astype(np.float32) for t in LAYOUT]}
            for d in ids]


def _files(path: Path) -> set[str]:
    return {p.name for p in (path / "gradients.lance" / "data").glob("*")}


def _frag_files(frags) -> set[str]:
    import json

    return {f["path"] for fr in frags for f in json.loads(fr)["files"]}


def _on_disk(path: Path, needle: bytes) -> bool:
    return any(needle in p.read_bytes() for p in path.rglob("*") if p.is_file())


class HeldLease:
    """The build lease held by another thread, as a build running in another process would."""

    def __init__(self, path):
        self.lease = GradientBank.build_lease(path)
        self._go, self._stop = threading.Event(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with self.lease:
            self._go.set()
            self._stop.wait(60)

    def __enter__(self):
        self._t.start()
        assert self._go.wait(10)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(10)


# Fragment write -> compact / rm -> commit ----------------------------------------------------------
@pytest.mark.parametrize("maintenance", ["compact", "purge"])
def test_fragments_written_during_a_build_survive_maintenance_and_commit(tmp_path, maintenance):
    path = tmp_path / "bank"
    bank = GradientBank.create(path, _meta())
    bank.append(_rows(["old1", "old2"]))
    bank.delete(doc_ids=["old2"])
    with HeldLease(path):  # a build is in flight: its workers have written uncommitted files
        frags = bank.fragment_writer().write(_rows(["new1", "new2"], seed=1))
        out = getattr(bank, maintenance)()
        assert out["orphans_kept_for_grace"] is True
        assert _frag_files(frags) <= _files(path)  # the build's uncommitted files are still there
        n = bank.commit_fragments(frags, keys=[("new1", "h-new1"), ("new2", "h-new2")])
    assert n == 2 and bank.count() == 3
    report = bank.verify()
    assert report["ok"] == 3 and not report["bad"] and not report["duplicates"]
    assert set(bank.fetch(["old1", "new1", "new2"])) == {"old1", "new1", "new2"}


def test_commit_of_fragments_deleted_meanwhile_is_refused_and_bank_unchanged(tmp_path):
    path = tmp_path / "bank"
    bank = GradientBank.create(path, _meta())
    bank.append(_rows(["old1"]))
    frags = bank.fragment_writer().write(_rows(["new1"], seed=1))
    version = bank.version()
    bank.compact()  # no build holds the lease: unreferenced files go at once (a crashed build's)
    with pytest.raises(BankFormatError, match="cannot be read"):
        bank.commit_fragments(frags, keys=[("new1", "h-new1")])
    assert bank.count() == 1 and bank.verify()["ok"] == 1
    assert bank.version() >= version  # compaction committed; the refused commit did not


def test_orphans_older_than_the_grace_period_are_removed(tmp_path):
    path = tmp_path / "bank"
    bank = GradientBank.create(path, _meta())
    bank.append(_rows(["old1"]))
    lost = _frag_files(bank.fragment_writer().write(_rows(["lost"], seed=1)))  # a build died before its commit
    with HeldLease(path):
        bank.compact()
        assert lost <= _files(path)  # young: kept
        old = time.time() - 8 * 86400
        for f in (path / "gradients.lance" / "data").glob("*"):
            os.utime(f, (old, old))
        bank.append(_rows(["old2"], seed=2))
        bank.compact()
        assert not lost & _files(path)  # past the grace period: removed, even with a build in flight
    assert bank.verify()["ok"] == 2


def test_commit_refuses_fragments_whose_rows_differ_from_the_keys(tmp_path):
    bank = GradientBank.create(tmp_path / "bank", _meta())
    frags = bank.fragment_writer().write(_rows(["a", "b"]))
    with pytest.raises(BankFormatError, match="other rows"):
        bank.commit_fragments(frags, keys=[("a", "h-a")])
    assert bank.count() == 0


def test_commit_drops_rows_unlearned_while_the_build_ran(tmp_path):
    path = tmp_path / "bank"
    bank = GradientBank.create(path, _meta())
    frags = bank.fragment_writer().write(_rows(["keep", "secret"]))
    n = bank.commit_fragments(frags, keys=[("keep", "h-keep"), ("secret", "h-secret")],
                              forbidden=lambda: {"secret"})
    assert n == 1 and bank.doc_ids() == {"keep"}
    assert set(bank.fetch(["keep"])) == {"keep"} and bank.verify()["ok"] == 1
    assert not _on_disk(path, b"h-secret")  # deleted and purged in the same lock hold


# rm between a build's planning and its append; interrupted rm ------------------------------------
def _ws_with_docs(tmp_path, n=6):
    ws = open_ws(tmp_path / "ws")
    do_ingest(ws, write_corpus(tmp_path / "corpus", n))
    return ws


def _texts_on_disk(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_rm_between_planning_and_append_is_never_undone(tmp_path, engine):
    from regrad_cli.offline.build import build_bank
    from regrad_cli.workspace.documents import DocumentStore
    from regrad_cli.offline.unlearn import Tombstones, remove_documents

    ws = _ws_with_docs(tmp_path)
    victim = "corpus/doc001.txt#0"
    text = DocumentStore(ws).texts([victim])[victim].encode()
    done = []

    def progress(d, n, rate):
        if not done:  # after planning (the victim is in the todo list), before the first append
            done.append(remove_documents(ws.root, None, [victim]))

    s = build_bank(ws, engine, batch_size=2, progress=progress)
    bank = bank_of(ws, engine)
    assert done and victim not in bank.doc_ids()
    assert victim not in DocumentStore(ws).keys() and victim in Tombstones(ws).ids()
    assert s.rows == bank.count() == DocumentStore(ws).count()
    assert bank.verify()["ok"] == bank.count()
    # A second build does not bring it back; neither does ingesting the same folder again.
    s2 = do_build(ws, engine)
    assert s2.built == 0 and victim not in bank_of(ws, engine).doc_ids()
    again = do_ingest(ws, tmp_path / "corpus")
    assert any("unlearned" in k["reason"] for k in again.skipped)
    assert victim not in DocumentStore(ws).keys()
    assert not _texts_on_disk(ws.db_path, text)  # its text left the disk


def test_interrupted_rm_is_finished_by_a_rerun_and_a_build_in_between_skips_it(tmp_path, engine, monkeypatch,
                                                                              capsys):
    from regrad_cli.workspace.documents import DocumentStore
    from regrad_cli.offline.unlearn import Tombstones, remove_documents

    ws = _ws_with_docs(tmp_path)
    do_build(ws, engine)
    victim = "corpus/doc002.txt#0"
    text = DocumentStore(ws).texts([victim])[victim].encode()
    real = DocumentStore.delete

    class Killed(BaseException):
        pass

    def crash(self, *a, **k):
        raise Killed("killed between the bank's purge and the documents' delete")

    monkeypatch.setattr(DocumentStore, "delete", crash)
    with pytest.raises(Killed):
        remove_documents(ws.root, None, [victim])
    monkeypatch.setattr(DocumentStore, "delete", real)
    assert victim in Tombstones(ws).pending()[0]
    assert victim not in bank_of(ws, engine).doc_ids() and victim in DocumentStore(ws).keys()
    s = do_build(ws, engine)  # the text is still there: the build must not compute it again
    assert s.built == 0 and victim not in bank_of(ws, engine).doc_ids()
    code, out, err = run_cli(["bank", "rm", "-w", ws.root, "--json"], capsys, monkeypatch)  # finishes
    assert code == 0, err
    assert victim not in DocumentStore(ws).keys() and Tombstones(ws).pending() == (set(), set())
    assert not _texts_on_disk(ws.db_path, text)


def test_rm_with_bank_option_also_removes_documents(tmp_path, engine, capsys, monkeypatch):
    from regrad_cli.workspace.documents import DocumentStore

    ws = _ws_with_docs(tmp_path, 4)
    do_build(ws, engine)
    path = bank_of(ws, engine).path
    victim = "corpus/doc003.txt#0"
    code, out, err = run_cli(["bank", "rm", victim, "--bank", path, "-w", ws.root], capsys, monkeypatch)
    assert code == 0, err
    assert victim not in DocumentStore(ws).keys() and victim not in bank_of(ws, engine).doc_ids()


def test_rm_reaches_every_bank_of_the_workspace(tmp_path, engine):
    from regrad_cli.offline.unlearn import remove_documents

    ws = _ws_with_docs(tmp_path, 4)
    do_build(ws, engine)
    other = make_engine(seed=7)  # another learner checkpoint: another bank
    do_build(ws, other)
    victim = "corpus/doc000.txt#0"
    out = remove_documents(ws.root, None, [victim])
    assert len(out["banks"]) == 2 and out["removed_rows"] == 2
    assert victim not in bank_of(ws, engine).doc_ids() and victim not in bank_of(ws, other).doc_ids()


# Shared bank locations --------------------------------------------------------------------------------
def test_two_workspaces_sharing_a_bank_location_keep_their_rows(tmp_path, engine, monkeypatch):
    monkeypatch.setenv("REGRAD_BANK_URI", str(tmp_path / "shared"))
    a = open_ws(tmp_path / "a")
    b = open_ws(tmp_path / "b")
    do_ingest(a, write_corpus(tmp_path / "ca" / "corpus", 4))
    do_ingest(b, write_corpus(tmp_path / "cb" / "corpus", 3, start=10))
    sa, sb = do_build(a, engine), do_build(b, engine)
    assert sa.bank != sb.bank and sa.bank.startswith(str(tmp_path / "shared"))
    do_build(a, engine)  # a rebuild of A must not touch B's rows, nor B's A's
    ka, kb = bank_of(a, engine).keys(), bank_of(b, engine).keys()
    assert len(ka) == sa.rows and len(kb) == sb.rows and not ka & kb


def test_a_build_asks_for_force_before_deleting_many_rows(tmp_path, engine):
    from regrad_cli.offline.build import FEW_ROWS, build_bank
    from regrad_cli.errors import RegradError

    ws = open_ws(tmp_path / "ws")
    corpus = write_corpus(tmp_path / "corpus", 20)
    do_ingest(ws, corpus)
    rows = do_build(ws, engine).rows
    assert rows > FEW_ROWS
    # Documents gone from the table without `ingest --prune` (which deletes their rows with them):
    # a workspace emptied or pointed at the wrong place.
    from regrad_cli.workspace.documents import DocumentStore

    gone = sorted(p.relative_to(corpus.parent).as_posix() for p in corpus.glob("*.txt"))[2:]
    DocumentStore(ws).delete_sources(gone)
    with pytest.raises(RegradError, match="--force"):
        build_bank(ws, engine)
    assert bank_of(ws, engine).count() == rows  # nothing deleted
    s = build_bank(ws, engine, force=True)
    assert s.removed_stale == rows - s.rows


def test_throwaway_workspaces_never_use_the_users_bank_location(tmp_path, monkeypatch):
    from regrad_cli.workspace.config import Workspace

    monkeypatch.setenv("REGRAD_BANK_URI", str(tmp_path / "users-banks"))
    ws = Workspace.open(tmp_path / "eval-ws")
    assert str(ws.banks_location).startswith(str(tmp_path / "users-banks"))
    ws.use_bank_env = False
    assert ws.banks_location == ws.banks_dir and str(ws.bank_path("ab" * 8)).startswith(str(ws.root))


def test_eval_workspace_ignores_bank_env_and_is_deleted_only_if_eval_made_it(tmp_path, monkeypatch):
    """The place eval makes throwaway workspaces (regrad_cli.learning.evaluation.workspace, or the older
    single module): a workspace made there ignores $REGRAD_BANK_URI, and an existing folder
    without eval's marker is never deleted."""
    from types import SimpleNamespace

    from regrad_cli.errors import ConfigError

    try:
        from regrad_cli.learning.evaluation import workspace as evws
    except ImportError:
        pytest.skip("eval workspaces are made elsewhere in this version")
    monkeypatch.setenv("REGRAD_BANK_URI", str(tmp_path / "users-banks"))
    cfg = SimpleNamespace(checkpoint=None, device=None)
    ws = evws.fresh_workspace(tmp_path / "out" / "workspace", cfg, None, True)
    assert ws.banks_location == ws.banks_dir
    mine = tmp_path / "precious" / "workspace"
    mine.mkdir(parents=True)
    (mine / "thesis.txt").write_text("do not delete")
    with pytest.raises(ConfigError, match="not made by"):
        evws.fresh_workspace(mine, cfg, None, True)
    assert (mine / "thesis.txt").exists()
