"""Links planted in a bank or workspace (issue 32, item 1): nothing is written or deleted through
them.

A bank from someone else with ``gradients.lance/data/evil -> /victim`` made ``regrad bank
compact`` and ``regrad bank rm --keep-documents`` delete every unreferenced ``*.lance`` file under
``/victim`` (Lance's cleanup follows links). Every command that writes or deletes now refuses such
a bank with one line naming the link; reading it stays allowed.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from bank_format import BankFormatError, BankMeta, CodecSpec, GradientBank, TensorSpec
from reliability_helpers import run_cli

DIM = 8
LAYOUT = [TensorSpec("A", (4, 6)), TensorSpec("B", (6, 4))]


def _meta() -> BankMeta:
    return BankMeta(producer="regrad 0.1.0", model={"id": "tiny", "weights_sha256": "ab" * 32},
                    learner={"checkpoint_id": "ckpt-1"}, embedder={"id": "fake", "dim": DIM},
                    layout=LAYOUT, codec=CodecSpec("fp32"))


def _rows(prefix: str, n: int):
    rng = np.random.default_rng(0)
    return [{"doc_id": f"{prefix}{i}", "content_hash": f"h{prefix}{i}",
             "embedding": rng.standard_normal(DIM).astype(np.float32),
             "tensors": [rng.standard_normal(t.shape).astype(np.float32) for t in LAYOUT],
             "n_tokens": 3, "source": "c.jsonl"} for i in range(n)]


def _victim(root: Path) -> dict[str, bytes]:
    """Files a cleanup following the link would delete: a real Lance table's data files and
    plain *.lance files, all unreferenced from the bank's point of view."""
    victim = root / "victim"
    other = GradientBank.create(victim / "bank", _meta())
    for i in range(3):
        other.append(_rows(f"v{i}-", 2))
    (victim / "loose").mkdir()
    for i in range(3):
        (victim / "loose" / f"f{i}.lance").write_bytes(b"precious" * 10)
    return {str(p): p.read_bytes() for p in victim.rglob("*") if p.is_file()}


def _bank_with_link(root: Path, where: str) -> tuple[Path, Path]:
    bank_dir = root / "bank"
    b = GradientBank.create(bank_dir, _meta())
    b.append(_rows("d", 3))
    b.append(_rows("e", 2))
    b.delete(["d0"])
    link = bank_dir / "gradients.lance" / where / "evil"
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(root / "victim", link)
    return bank_dir, link


def _unchanged(before: dict[str, bytes]) -> None:
    after = {p: Path(p).read_bytes() for p in before if Path(p).exists()}
    assert after == before, f"files outside the bank changed: {sorted(set(before) - set(after))}"


@pytest.mark.parametrize("where", ["data", "_indices", "_versions", "."])
@pytest.mark.parametrize("command", [["bank", "compact"], ["bank", "rm", "d1", "--keep-documents"]],
                         ids=["compact", "rm"])
def test_a_link_in_a_bank_is_refused_by_every_writer(tmp_path, capsys, monkeypatch, command, where):
    before = _victim(tmp_path)
    bank_dir, link = _bank_with_link(tmp_path, where)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli([*command, "--bank", bank_dir], capsys, monkeypatch)
    assert code == 1, (out, err)
    assert "symbolic link" in err and str(link) in err and len(err.strip().splitlines()) == 1, err
    _unchanged(before)
    # Reading is still allowed (it never deletes).
    code, out, err = run_cli(["bank", "stats", "--json", "--bank", bank_dir], capsys, monkeypatch)
    assert code == 0 and '"rows": 4' in out, (out, err)


def test_the_library_refuses_every_write_and_cleanup(tmp_path):
    before = _victim(tmp_path)
    bank_dir, link = _bank_with_link(tmp_path, "data")
    bank = GradientBank.open(bank_dir)
    for attempt in (lambda: bank.append(_rows("x", 1)), lambda: bank.delete(["d1"]), bank.purge,
                    bank.compact, bank.fragment_writer, lambda: bank.create_index("IVF_FLAT")):
        with pytest.raises(BankFormatError, match="symbolic link"):
            attempt()
    # Maintenance shared with the documents table refuses on its own too (no bank in between).
    import lance

    from bank_format import lance_ops

    uri = str(bank_dir / "gradients.lance")
    with pytest.raises(BankFormatError, match="symbolic link"):
        lance_ops.purge_dataset(lance.dataset(uri), all_deletions=True, orphans_now=True, what="t",
                                reopen=lambda: lance.dataset(uri))
    _unchanged(before)
    assert GradientBank.open(bank_dir, read_only=True).count() == 4


def test_a_linked_lock_file_is_never_truncated(tmp_path):
    """filelock opens its file with O_TRUNC: a lock file that is a link would truncate its target."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    bank_dir = tmp_path / "bank"
    GradientBank.create(bank_dir, _meta()).append(_rows("d", 2))
    lock = bank_dir / ".regrad-bank.lock"
    lock.unlink(missing_ok=True)
    os.symlink(victim, lock)
    with pytest.raises(BankFormatError, match="symbolic link"):
        GradientBank.open(bank_dir).append(_rows("x", 1))
    lock.unlink()
    os.link(victim, lock)  # a hard link to a file with content
    with pytest.raises(BankFormatError, match="hard link"):
        GradientBank.open(bank_dir).append(_rows("x", 1))
    assert victim.read_text() == "keep me"


def test_a_link_in_the_documents_table_is_refused(tmp_path, capsys, monkeypatch):
    """A workspace whose documents database holds a link: ingest and bank rm refuse it."""
    before = _victim(tmp_path)
    ws = tmp_path / "ws"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha document text")
    common = ["--workspace", ws, "--model", "fake:llama", "--embedder", "fake:hash-32"]
    code, out, err = run_cli(["ingest", corpus, *common], capsys, monkeypatch)
    assert code == 0, err
    link = ws / "db" / "documents.lance" / "data" / "evil"
    os.symlink(tmp_path / "victim", link)
    (corpus / "b.txt").write_text("beta document text")
    code, out, err = run_cli(["ingest", corpus, "--workspace", ws], capsys, monkeypatch)
    assert code == 1 and "symbolic link" in err and str(link) in err, err
    # A real document id: an unknown one is refused before anything is opened for writing.
    code, out, err = run_cli(["docs", "ls", "--workspace", ws, "--json"], capsys, monkeypatch)
    doc_id = json.loads(out)["documents"][0]["chunks"][0]
    code, out, err = run_cli(["bank", "rm", doc_id, "--workspace", ws], capsys, monkeypatch)
    assert code == 1 and "symbolic link" in err and str(link) in err, err
    _unchanged(before)


def test_a_planted_temporary_link_is_never_written_through(tmp_path):
    """Atomic writes go through NAME.PID.tmp: one planted as a link in a copied workspace or
    checkpoint is replaced, never followed."""
    from regrad_cli.files import atomic_write_text

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    target = tmp_path / "ws" / "regrad.toml"
    target.parent.mkdir()
    os.symlink(victim, target.with_name(f"regrad.toml.{os.getpid()}.tmp"))
    atomic_write_text(target, "x = 1\n")
    assert victim.read_text() == "keep me" and target.read_text() == "x = 1\n"


def _workspace_with_bank(tmp_path: Path, capsys, monkeypatch, name: str) -> tuple[Path, Path]:
    """A fake-model workspace with two documents and its bank: (workspace, corpus). Workspaces
    made in one test share the corpus, so their document ids are the same."""
    ws, corpus = tmp_path / name, tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "a.txt").write_text("alpha document text")
    (corpus / "b.txt").write_text("beta document text")
    for args in (["ingest", corpus, "--workspace", ws, "--model", "fake:llama", "--embedder", "fake:hash-32"],
                 ["build-bank", "--workspace", ws]):
        code, out, err = run_cli(args, capsys, monkeypatch)
        assert code == 0, (args, err)
    return ws, corpus


def test_a_linked_banks_folder_is_refused_by_every_writer(tmp_path, capsys, monkeypatch):
    """A copied workspace whose ``banks`` is a link to another workspace's ``banks``: `bank
    compact`, `bank rm` and `build-bank` went through it and purged and rewrote the other
    workspace's bank (20 of its files gone). Every writer now refuses it in one line; reading
    through it stays allowed."""
    victim, _ = _workspace_with_bank(tmp_path, capsys, monkeypatch, "victim")
    ws, corpus = _workspace_with_bank(tmp_path, capsys, monkeypatch, "ws")
    (corpus / "c.txt").write_text("gamma document text")  # work for build-bank to do
    code, out, err = run_cli(["ingest", corpus, "--workspace", ws], capsys, monkeypatch)
    assert code == 0, err
    import shutil

    shutil.rmtree(ws / "banks")
    os.symlink(victim / "banks", ws / "banks")
    before = {str(p): p.read_bytes() for p in (victim / "banks").rglob("*") if p.is_file()}
    code, out, err = run_cli(["docs", "ls", "--workspace", ws, "--json"], capsys, monkeypatch)
    doc_id = json.loads(out)["documents"][0]["chunks"][0]
    for args in (["bank", "compact"], ["bank", "rm", doc_id, "--keep-documents"], ["bank", "rm", doc_id],
                 ["build-bank"], ["ingest", corpus, "--prune"]):
        if args[0] == "ingest":
            (corpus / "b.txt").unlink()  # a prune deletes the file's rows from every bank
        code, out, err = run_cli([*args, "--workspace", ws], capsys, monkeypatch)
        assert code == 1, (args, out, err)
        assert "symbolic link" in err and str(ws / "banks") in err, (args, err)
        assert err.strip().splitlines()[-1].startswith("Error:"), (args, err)
        after = {str(p): p.read_bytes() for p in (victim / "banks").rglob("*") if p.is_file()}
        assert after == before, (args, sorted(set(before) ^ set(after)))
    code, out, err = run_cli(["bank", "stats", "--json", "--workspace", ws], capsys, monkeypatch)
    assert code == 0 and '"rows": 2' in out, (out, err)


@contextmanager
def _address_space(extra_bytes: int):
    """This process's address space capped ``extra_bytes`` above its current size, then restored:
    a file read until memory runs out fails fast (MemoryError) instead of filling the machine."""
    import resource

    size = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:")][0]
    old = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + extra_bytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


@pytest.mark.parametrize("name", ["tombstones.json", "ingest-digests.json", "workspace-id", "regrad.toml",
                                  "learner-init.json"])
def test_workspace_files_linked_to_a_device_are_not_read_forever(tmp_path, capsys, monkeypatch, name):
    """A copied workspace whose small state files are links to /dev/zero (or FIFOs): each was
    read whole, so memory grew until the process died (3 GB in the attack, then "out of
    memory"). Now they are read only when they are regular files, and with a bound."""
    ws, corpus = _workspace_with_bank(tmp_path, capsys, monkeypatch, "ws")
    (corpus / "c.txt").write_text("gamma document text")
    if name == "workspace-id":  # read only for a bank location outside the workspace
        cfg = ws / "regrad.toml"
        cfg.write_text(cfg.read_text().replace('uri = ""', f'uri = "{tmp_path / "shared"}"'))
    path = ws / name
    path.unlink(missing_ok=True)
    os.symlink("/dev/zero", path)
    commands = {"tombstones.json": [["ingest", corpus], ["build-bank"], ["bank", "rm", "--source", str(corpus / "a.txt")]],
                "ingest-digests.json": [["ingest", corpus]],
                "workspace-id": [["build-bank"], ["status"]],
                "regrad.toml": [["status"]],
                "learner-init.json": [["status"], ["build-bank"]]}[name]
    for args in commands:
        with _address_space(1 << 30):
            code, out, err = run_cli([*args, "--workspace", ws], capsys, monkeypatch)
        assert "out of memory" not in err, (args, err)
        if name in ("ingest-digests.json", "learner-init.json"):  # only shortcuts: ignored, the command goes on
            assert code == 0, (args, err)
            continue
        if name == "tombstones.json" and args == ["build-bank"] and code == 0:
            # An up-to-date bank needs no tombstones (nothing to build): it answers without reading them.
            assert "up to date" in out + err, (out, err)
            continue
        assert code == 1 and err.strip().splitlines()[-1].startswith("Error:"), (args, err)
        assert str(path) in err, (args, err)
    if name == "regrad.toml":  # a FIFO blocked the open until a writer came (here: one that sends nothing)
        import threading

        path.unlink()
        os.mkfifo(path)
        writer = threading.Thread(target=lambda: open(path, "wb").close(), daemon=True)
        writer.start()
        code, out, err = run_cli(["status", "--workspace", ws], capsys, monkeypatch)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer go, whatever happened
        writer.join(10)
        os.close(fd)
        assert code == 1 and "not a regular file" in err, err


def test_hard_links_in_a_bank_leave_the_other_names_alone(tmp_path):
    """Hard links (allowed in a bank) to another bank's data files and manifest, planted in
    ``data/`` and ``_versions/`` and in place of a referenced data file: compaction, purge and
    deletes remove only the bank's own names, never the other bank's files or bytes."""
    before = _victim(tmp_path)
    victim_table = tmp_path / "victim" / "bank" / "gradients.lance"
    bank_dir = tmp_path / "bank"
    b = GradientBank.create(bank_dir, _meta())
    b.append(_rows("d", 3))
    b.append(_rows("e", 2))
    table = bank_dir / "gradients.lance"
    theirs = sorted((victim_table / "data").iterdir())
    os.link(theirs[0], table / "data" / "planted.lance")
    os.link(sorted((victim_table / "_versions").iterdir())[0], table / "_versions" / "planted.manifest")
    own = sorted((table / "data").iterdir())[0]
    own.unlink()
    os.link(theirs[1], own)  # a referenced file's name now points at the other bank's bytes
    bank = GradientBank.open(bank_dir)
    for attempt in (lambda: bank.delete(["d1"]), bank.compact, bank.purge):
        try:
            attempt()
        except BankFormatError:
            pass  # the swapped file may be refused as damaged: only the other bank matters here
    _unchanged(before)
    assert all(p.exists() for p in map(Path, before))
    assert GradientBank.open(tmp_path / "victim" / "bank", read_only=True).count() == 6
