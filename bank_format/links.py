"""Links in a Lance table or bank directory: refused before anything writes or deletes there.

Lance's maintenance (compaction, ``cleanup_old_versions``, including its ``delete_unverified``
cleanup of unreferenced files) lists a table's ``data/``, ``_indices/``, ``_versions/`` ...
recursively and follows symbolic links while it does. A link planted in a bank from someone else
(``gradients.lance/data/evil -> /another/workspace/db``) would then make it delete files outside
the bank. So every writer and maintainer of a local table first walks the directory without
following links and refuses it, naming the first link it finds (``refuse_links``). Reading such
a bank stays allowed: reads never delete.

A lock file is opened with ``O_TRUNC`` by ``filelock``: one that is a link (symbolic, or a hard
link to a file with content) would truncate the file it points at, so it is refused as well
(``check_lock_file``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import BankFormatError

# Walking stops after this many entries: a table of a regrad bank holds far fewer files, and a
# hostile one must not make the check itself unbounded.
MAX_ENTRIES = 2_000_000


def find_link(root: "str | os.PathLike") -> Path | None:
    """The first symbolic link at or under ``root`` (``root`` itself included), never following
    one; None when there is none or ``root`` does not exist."""
    root = Path(root)
    try:
        if root.is_symlink():
            return root
        if not root.is_dir():
            return None
    except OSError:
        return None
    stack, seen = [root], 0
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for entry in it:
                    seen += 1
                    if seen > MAX_ENTRIES:
                        raise BankFormatError(f"{root} holds more than {MAX_ENTRIES} files: refused")
                    if entry.is_symlink():
                        return Path(entry.path)
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
        except FileNotFoundError:
            continue  # removed while walking (another reader's cleanup): nothing to refuse
        except PermissionError as e:
            raise BankFormatError(f"cannot check {d} for links before writing: {e}") from None
    return None


def refuse_links(root: "str | os.PathLike", what: str) -> None:
    """BankFormatError naming the first symbolic link at or under ``root`` (a local table or bank
    directory that is about to be written to or cleaned up)."""
    link = find_link(root)
    if link is None:
        return
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    raise BankFormatError(
        f"{what} contains a symbolic link {link} -> {target}: refused to write or delete there "
        f"(maintenance would follow it out of the directory); remove the link, or copy the "
        f"files it points to in its place"
    )


def check_lock_file(path: "str | os.PathLike") -> None:
    """Refuse a lock file that ``filelock`` must not open: a symbolic link, something other than
    a regular file, or a hard link to a file with content (opening truncates it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise BankFormatError(f"cannot check lock file {path}: {e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise BankFormatError(f"lock file {path} is a symbolic link -> {os.readlink(path)}: refused "
                              f"(taking the lock would truncate its target); delete it")
    if not stat.S_ISREG(st.st_mode):
        raise BankFormatError(f"lock file {path} is not a regular file: refused; delete it")
    if st.st_nlink > 1 and st.st_size > 0:
        raise BankFormatError(f"lock file {path} is a hard link to a file with content: refused "
                              f"(taking the lock would truncate it); delete it")
