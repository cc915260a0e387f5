"""Writing a file so that readers see the old content or the new, never part of it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` (unique to this process) to write in the block; when the
    block ends normally it replaces ``path`` in one rename, else it is removed. ``fsync`` flushes
    the temporary file to disk before the rename (for state that must survive a power cut)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    if os.path.lexists(tmp):  # left by a dead process, or planted as a link: never written through
        tmp.unlink()
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = False) -> None:
    """Write ``text`` to ``path`` atomically (``atomic_path``)."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding=encoding)


def read_at_most(path: str | os.PathLike, limit: int, what: str, error: type[Exception]) -> bytes:
    """The file's bytes, never more than ``limit + 1`` of them read: ``error`` (one line starting
    with ``what``) when it cannot be read or holds more than ``limit`` bytes."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"{what}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise error(f"{what}: larger than {limit / 2**20:g} MiB, refused")
    return raw
