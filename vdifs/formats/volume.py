"""A partition or a logical volume as a file: runs of the virtual disk, end to end.

Implements :class:`vdifs.formats.base.Layout` with no metadata of its own:
every byte of the file is a byte of the disk, found by a bisect on the runs.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from itertools import accumulate

from vdifs.formats.base import Data, Segment


class VolumeLayout:
    def __init__(self, runs: Sequence[tuple[int, int]]) -> None:
        """``runs``: ``(disk offset, length)`` in the file's order, each of positive length."""
        if any(length <= 0 or offset < 0 for offset, length in runs):
            raise ValueError("a run has a negative offset or no length")
        self._runs = list(runs)
        self._starts = [0, *accumulate(length for _, length in runs)]

    @property
    def size(self) -> int:
        return self._starts[-1]

    @property
    def allocated_bytes(self) -> int:
        return self.size

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        end = min(offset + length, self.size)
        i = bisect_right(self._starts, offset) - 1
        while offset < end:
            disk_offset, run = self._runs[i]
            skip = offset - self._starts[i]
            piece = min(run - skip, end - offset)
            yield Data(disk_offset + skip, piece)
            offset += piece
            i += 1
