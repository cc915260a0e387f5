"""Writing a file so that readers see the old content or the new, never part of it; reading a
small state file of a workspace or checkpoint with a bound (``read_bounded``)."""

from __future__ import annotations

import os
import stat
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


class UnsafeFileError(OSError):
    """A small state file that is not a regular file, or larger than its bound (``read_bounded``)."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def read_bounded(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (a link is followed), at most ``limit`` of them.

    A workspace or checkpoint may come from someone else: its ``tombstones.json`` or
    ``workspace-id`` can be a link to ``/dev/zero`` (read forever: memory grows until the process
    dies), a FIFO (blocks for ever) or a sparse file of terabytes. So the file must be regular
    (checked on the open descriptor, opened without blocking) and is read in pieces up to
    ``limit``; anything else raises ``UnsafeFileError`` (an ``OSError``, which callers already
    report as an unreadable file). A missing file raises ``FileNotFoundError`` as ``open`` does.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{path} is not a regular file (a device, FIFO or directory): refused")
        if st.st_size > limit:
            raise UnsafeFileError(f"{path} is larger than {limit >> 20} MiB: refused", too_large=True)
        parts, n = [], 0
        while True:
            part = os.read(fd, min(1 << 20, limit + 1 - n))
            if not part:
                return b"".join(parts)
            parts.append(part)
            n += len(part)
            if n > limit:  # grew while being read
                raise UnsafeFileError(f"{path} is larger than {limit >> 20} MiB: refused", too_large=True)
    finally:
        os.close(fd)


def read_at_most(path: str | os.PathLike, limit: int, what: str, error: type[Exception]) -> bytes:
    """``read_bounded``, with one line starting with ``what`` in ``error`` when the file cannot be
    read, is not a regular file, or holds more than ``limit`` bytes."""
    try:
        return read_bounded(path, limit)
    except UnsafeFileError as exc:
        if exc.too_large:
            raise error(f"{what}: larger than {limit / 2**20:g} MiB, refused") from None
        raise error(f"{what}: not a regular file (a device, FIFO or directory), refused") from None
    except OSError as exc:
        raise error(f"{what}: cannot read it ({exc.strerror or exc})") from None
