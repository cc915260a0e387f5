"""Format versions of regrad's own state files and their named migrations (simonw/llm style).

A file records ``MAJOR.MINOR``. A reader refuses a newer major (it cannot know what changed) and
reads a newer minor (minors only add optional things). An older file is upgraded, in memory, by
the recorded list of named migrations between its version and the current one, applied in order;
each migration is a small function of the file's parsed data, registered once and never edited
(a change of mind is a new migration). The list is the history of the format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from regrad_cli.errors import RegradError


@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int = 0

    @classmethod
    def parse(cls, text, where: str = "version") -> "Version":
        try:
            shown = str(text)
        except ValueError:  # an int past Python's 4300-digit limit for str(): not a version
            shown = "(an integer of thousands of digits)"
        # At most 9 digits a part: int() of a longer run can be slow or raise ValueError (4300
        # digits), and no format of regrad's will ever need more.
        m = re.fullmatch(r"\s*(\d{1,9})(?:\.(\d{1,9}))?\s*", shown[:64])
        if m is None:
            short = shown if len(shown) <= 40 else shown[:37] + "..."
            raise RegradError(f"{where}: format version {short!r} is not MAJOR.MINOR")
        return cls(int(m.group(1)), int(m.group(2) or 0))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    def tag(self) -> "int | str":
        """How a file records this version when its first format wrote a plain integer (the
        documents table, tombstones): that integer for MAJOR.0, else "MAJOR.MINOR"."""
        return self.major if self.minor == 0 else str(self)


@dataclass(frozen=True)
class Migration:
    name: str
    to: Version  # the version the data has after this migration
    fn: Callable[[dict], dict]


class Migrations:
    """The ordered migrations of one kind of file ("workspace config", "learner checkpoint")."""

    def __init__(self, what: str):
        self.what = what
        self._steps: list[Migration] = []

    def register(self, to: Version) -> Callable:
        """Decorator: ``fn(data) -> data`` upgrades data of the previous version to ``to``."""
        def deco(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
            if self._steps and to < self._steps[-1].to:
                raise ValueError(f"migration {fn.__name__} is out of order")
            self._steps.append(Migration(fn.__name__, to, fn))
            return fn
        return deco

    @property
    def names(self) -> list[str]:
        return [m.name for m in self._steps]

    def upgrade(self, data: dict, found: Version, current: Version, where: str) -> tuple[dict, list[str]]:
        """(data at ``current``, names of the migrations applied). Refuses a newer major."""
        if found.major > current.major:
            raise RegradError(
                f"{where}: {self.what} format {found} is newer than this regrad understands "
                f"({current}); upgrade regrad (pip install -U regrad)")
        applied = []
        for step in self._steps:
            if found < step.to <= current:
                data = step.fn(data)
                applied.append(step.name)
        return data, applied
