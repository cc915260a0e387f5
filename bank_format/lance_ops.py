"""Lance maintenance shared by the bank and regrad's documents table: locks, purge, quoting.

One lock discipline for every writer and maintainer of a Lance table (docs/reliability.md):

* the **writer lock** is held for each commit (append, delete, fragment commit, compaction and
  cleanup). It is re-entrant within a thread, so a caller may hold it around a check and the
  commit that depends on it (``GradientBank.locked()``). Local table: a file lock in the table's
  directory. Object store: a file lock on this machine keyed by the URI; across machines, Lance's
  own conditional commits detect conflicting commits (each names the version it read) and the
  cleanup grace period below keeps files that another machine has written but not yet committed.
* the **build lease** is held for a whole build, while uncommitted fragments may exist (a Ray
  build's workers write data files long before the driver commits them). Maintenance deletes
  unreferenced files at once only when it can take the lease itself (no build in flight on this
  machine); otherwise only files older than ``ORPHAN_GRACE`` go.

Locks are ``fcntl`` locks: the OS drops them when a process dies, so a killed run never blocks
the next one. The lock files stay on disk and do no harm.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from . import links
from .errors import BankFormatError

LOCK_NAME = ".regrad-bank.lock"
LOCK_TIMEOUT_S = 600.0
# Lance keeps unreferenced ("unverified") files younger than this unless told otherwise; regrad
# never tells it otherwise while a writer may be in flight.
ORPHAN_GRACE = timedelta(days=7)

_registry_guard = threading.Lock()
_registry: dict[str, Any] = {}


def sql_str(value: str) -> str:
    """A SQL string literal for Lance filters: a quote is doubled; nothing else is special
    (checked with ', \\ and newlines)."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_in(column: str, values: list[str]) -> str:
    return f"{column} IN ({', '.join(sql_str(v) for v in values)})"


def committed(table_dir: Path) -> bool:
    """True when a local Lance table directory has a committed version. A process killed while
    creating a table can leave the directory without one: that is no table yet."""
    try:
        return any(p.name.endswith(".manifest") for p in (Path(table_dir) / "_versions").iterdir())
    except OSError:
        return False


def local_dir(ds: Any) -> Path | None:
    """The directory of a local Lance dataset, None for an object-store one."""
    uri = str(getattr(ds, "uri", "") or "")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if not uri or "://" in uri:
        return None
    return Path(uri)


def _machine_lock_dir() -> Path:
    d = os.environ.get("REGRAD_LOCK_DIR") or os.path.join(tempfile.gettempdir(), f"regrad-locks-{os.getuid()}")
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _lock_file(location: "Path | str", kind: str) -> str:
    if isinstance(location, str):  # object store: a lock on this machine, keyed by the URI
        key = hashlib.sha256(location.encode()).hexdigest()[:32]
        return str(_machine_lock_dir() / f"{key}.{kind}.lock")
    if kind == "writer":
        return str(Path(location) / LOCK_NAME)
    return str(Path(location)) + f".{kind}.lock"  # beside the table directory


def _lock(path: str):
    import filelock

    with _registry_guard:
        lock = _registry.get(path)
        if lock is None:
            # thread_local (the default): re-entrant in one thread, exclusive across threads.
            lock = _registry[path] = filelock.FileLock(path)
        return lock


@contextlib.contextmanager
def writer_lock(location: "Path | str", timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the writer lock of the table at ``location`` (re-entrant within a thread)."""
    import filelock

    path = _lock_file(location, "writer")
    if not isinstance(location, str):
        try:
            Path(location).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BankFormatError(f"cannot create {location} for its lock: {e}") from None
    links.check_lock_file(path)
    lock = _lock(path)
    try:
        lock.acquire(timeout=timeout)
    except filelock.Timeout:
        raise BankFormatError(
            f"another process has been writing to {location} for {timeout:.0f} s (lock {path}); "
            f"try again later"
        ) from None
    try:
        yield
    finally:
        lock.release()


def build_lease(location: "Path | str"):
    """The lease a build holds for its whole run (a ``filelock.FileLock``; acquire it yourself)."""
    path = _lock_file(location, "build")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    links.check_lock_file(path)
    return _lock(path)


@contextlib.contextmanager
def no_build_in_flight(location: "Path | str") -> Iterator[bool]:
    """Yields True while this process holds the build lease (so no build of this machine is
    writing uncommitted files), False when a build holds it. Never waits."""
    import filelock

    if isinstance(location, str):  # another machine may be writing: never assume none is
        yield False
        return
    lease = build_lease(location)
    try:
        lease.acquire(timeout=0)
    except filelock.Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lease.release()


def purge_dataset(ds: Any, *, all_deletions: bool, orphans_now: bool, what: str,
                  compact_options: Mapping[str, Any] | None = None,
                  after_compaction: Callable[[], Any] | None = None, reopen: Callable[[], Any]) -> dict:
    """Compact a Lance dataset and remove its old versions (the caller holds the writer lock).

    ``all_deletions``: rewrite every fragment holding a deleted row, so those rows' bytes leave
    the disk (unlearning). ``orphans_now``: unreferenced files (of failed or in-flight writes)
    are deleted whatever their age; otherwise only those older than ``ORPHAN_GRACE``.
    ``reopen()`` gives the latest version; ``after_compaction`` runs before the cleanup.
    A local dataset holding a symbolic link anywhere is refused before anything is rewritten or
    deleted (``links.refuse_links``): Lance's cleanup would follow it out of the dataset.
    """
    local = local_dir(ds)
    if local is not None:
        links.refuse_links(local, what)
    options: dict[str, Any] = {"materialize_deletions": True}
    if all_deletions:
        # Lance rewrites a fragment only past 10 % deleted rows by default: 0 rewrites every
        # fragment holding a deleted row, so its bytes do not survive.
        options["materialize_deletions_threshold"] = 0.0
    options.update(compact_options or {})
    m = ds.optimize.compact_files(**options)
    ds = reopen()
    if all_deletions:
        left = [f.fragment_id for f in ds.get_fragments() if f.metadata.deletion_file is not None]
        if left:
            raise BankFormatError(f"compaction left deleted rows in fragments {left} of {what}; "
                                  f"their bytes are still on disk")
    if after_compaction is not None:
        after_compaction()
        ds = reopen()
    if local is not None:  # checked again right before the deletions
        links.refuse_links(local, what)
    try:
        cleanup = ds.cleanup_old_versions(older_than=timedelta(0), delete_unverified=orphans_now,
                                          error_if_tagged_old_versions=True)
    except Exception as e:
        if "tag" in str(e).lower():
            raise BankFormatError(
                f"{what} has tagged versions, which keep their files (and any deleted rows) on "
                f"disk; delete the tags and run the purge again ({e})"
            ) from e
        raise
    return {
        "fragments_removed": m.fragments_removed,
        "fragments_added": m.fragments_added,
        "files_removed": m.files_removed,
        "files_added": m.files_added,
        "versions_removed": cleanup.old_versions,
        "bytes_removed": cleanup.bytes_removed,
        "orphans_kept_for_grace": not orphans_now,
    }
