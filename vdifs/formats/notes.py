"""What a parser of hostile metadata says about what it found: bounded notes."""

from __future__ import annotations

from collections.abc import Sequence

MAX_LISTED = 16  # items named in one note before "and N more"


class Notes:
    """At most ``limit`` notes, then a count of those left out (memory stays bounded
    whatever a damaged table or metadata area holds)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._notes: list[str] = []
        self._dropped = 0

    def add(self, note: str) -> None:
        if len(self._notes) < self._limit:
            self._notes.append(note)
        else:
            self._dropped += 1

    def result(self) -> tuple[str, ...]:
        if self._dropped:
            return (*self._notes, f"... and {self._dropped} more notes")
        return tuple(self._notes)


def listed(items: Sequence[str]) -> str:
    """``a, b, c`` or ``a, b, ... and N more``."""
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
