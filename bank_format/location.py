"""Where a bank is: a local directory (a ``Path``) or an object-store URI (a ``str``), and the
URI of its table; and the one wrapper that turns Lance failures into ``BankFormatError``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import BankFormatError
from .schema import TABLE_NAME


def table_dir(path: Path) -> Path:
    return path / f"{TABLE_NAME}.lance"


def is_remote(path: Any) -> bool:
    """True for an object-store URI such as ``s3://bucket/banks/b1`` (any ``scheme://`` but file)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def location(path: Any) -> "Path | str":
    """A bank location: a local ``Path``, or the URI string of a remote bank (no trailing /)."""
    if isinstance(path, str) and path.startswith("file://"):
        path = path[len("file://"):]
    if is_remote(path):
        return path.rstrip("/")
    if not isinstance(path, (str, os.PathLike)):
        raise BankFormatError(f"a bank location must be a path or a URI, got {type(path).__name__}")
    return Path(path)


def table_uri(loc: "Path | str") -> str:
    return f"{loc}/{TABLE_NAME}.lance" if isinstance(loc, str) else str(table_dir(loc))


@contextlib.contextmanager
def lance_errors(what: str) -> Iterator[None]:
    """Turn lance/lancedb/arrow failures into one BankFormatError naming what was being done."""
    try:
        yield
    except BankFormatError:
        raise
    except Exception as e:  # lance raises OSError, ValueError, RuntimeError, pyarrow errors...
        raise BankFormatError(f"{what}: {type(e).__name__}: {e}") from e
