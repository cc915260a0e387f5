"""Finding the files to ingest under the paths given (rules in regrad_cli.offline.ingest)."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from regrad_cli.offline.ingest.summary import IngestSummary

TEXT_EXTENSIONS = (".txt", ".md", ".markdown")
RECORD_EXTENSIONS = (".jsonl.gz", ".jsonl", ".json")
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + RECORD_EXTENSIONS


@dataclass
class _File:
    path: str  # absolute, symlinks not resolved
    source: str
    display: str
    explicit: bool


def _stat_reason(path: str, exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(exc, FileNotFoundError):
        return "broken symlink" if os.path.islink(path) else "not found"
    return f"cannot read ({exc.strerror or exc})"


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _supported(name: str) -> bool:
    return name.lower().endswith(SUPPORTED_EXTENSIONS)


def discover(paths: list[Path], summary: IngestSummary, *, exclude: str | None = None) -> list[_File]:
    """The files to read under ``paths``; everything passed over goes to ``summary.skipped``."""
    files: list[_File] = []
    seen_files: dict[tuple[int, int], str] = {}
    seen_dirs: set[tuple[int, int]] = set()

    def add_file(path: str, st: os.stat_result, source: str, display: str, explicit: bool) -> None:
        key = (st.st_dev, st.st_ino)
        if key in seen_files:
            summary.skip(display, f"same file as {seen_files[key]}")
            return
        seen_files[key] = display
        files.append(_File(path, source, display, explicit))

    for arg in paths:
        display = str(arg)
        absolute = os.path.abspath(os.fspath(arg))
        parent = os.path.dirname(absolute)
        try:
            st = os.stat(absolute)
        except OSError as exc:
            summary.skip(display, _stat_reason(absolute, exc))
            continue
        top = os.path.relpath(absolute, parent) if absolute != parent else ""
        if stat.S_ISREG(st.st_mode):
            add_file(absolute, st, Path(top).as_posix() if top else os.path.basename(absolute), display, True)
            continue
        if not stat.S_ISDIR(st.st_mode):
            summary.skip(display, "not a regular file")
            continue
        # Iterative walk (deep trees cannot overflow the stack); directories are identified by
        # (device, inode) so a symlink back up the tree is entered once only.
        seen_dirs.add((st.st_dev, st.st_ino))
        # Symlinks are followed only while they stay inside the folder given (its real path).
        real_root = os.path.realpath(absolute)
        stack = [(absolute, top, display)]
        while stack:
            d_abs, d_rel, d_disp = stack.pop()
            try:
                with os.scandir(d_abs) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                summary.skip(d_disp, _stat_reason(d_abs, exc))
                continue
            subdirs = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                e_abs = os.path.join(d_abs, entry.name)
                e_rel = f"{d_rel}/{entry.name}" if d_rel else entry.name
                e_disp = os.path.join(d_disp, entry.name)
                if exclude and e_abs == exclude:
                    continue
                try:
                    est = os.stat(e_abs)
                except OSError as exc:
                    summary.skip(e_disp, _stat_reason(e_abs, exc))
                    continue
                outside = entry.is_symlink() and not _within(os.path.realpath(e_abs), real_root)
                if stat.S_ISDIR(est.st_mode):
                    key = (est.st_dev, est.st_ino)
                    if key in seen_dirs:
                        summary.skip(e_disp, "symlink loop (directory already visited)")
                        continue
                    if outside:
                        summary.skip(e_disp, f"symlink out of {display} (not followed)")
                        continue
                    seen_dirs.add(key)
                    subdirs.append((e_abs, e_rel, e_disp))
                elif not stat.S_ISREG(est.st_mode):
                    summary.skip(e_disp, "not a regular file")
                elif not _supported(entry.name):
                    summary.skip(e_disp, "unsupported extension")
                elif outside:
                    summary.skip(e_disp, f"symlink out of {display} (not followed)")
                else:
                    add_file(e_abs, est, e_rel, e_disp, False)
            stack.extend(reversed(subdirs))
    return files
