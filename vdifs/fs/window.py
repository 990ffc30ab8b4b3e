"""Reading ahead for readers that ask for small pieces in order.

With ``-o direct_io`` (and for a read-only open of a live ``raw.img``) the
kernel sends every ``read()`` to the daemon as it is: ``sha256sum`` asks for
32 KiB at a time, ``tar`` for 10 KiB.  Each request then paid for walking
the layout and reading the packs on its own.  A :class:`ReadWindow` notices
a reader asking for small pieces in order, reads the next ``AHEAD`` of its
requests at once (at most a megabyte) and answers the pieces that follow
from it.

A handle's export is immutable (pinned at open), so a window never goes
stale; it is only ever replaced, never written into, so a piece handed to
pyfuse3 stays valid however the window moves on.  :class:`Windows` bounds
the memory: at most ``LIMIT`` windows for the whole daemon, the least
recently used dropped first (its reader just reads ahead again, so many
readers at once cost at most ``AHEAD`` times the bytes they ask for).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

from vdifs.exports import Buffer

WINDOW = 1 << 20  # the most one read fetches: the size of a direct_io request
AHEAD = 16  # a window holds this many of the reader's requests
SMALL = 256 << 10  # requests below this, in order, are served from a window
LIMIT = 32  # windows kept at once (at most 32 MiB)


class ReadWindow:
    """One handle's bytes read ahead, and where its reader is."""

    def __init__(self, file_size: int) -> None:
        self.file_size = file_size
        self.start = 0
        self.data: Buffer = b""
        self.next_offset = 0  # where the reader's last request ended

    async def read(
        self, offset: int, size: int, read_at: Callable[[int, int], Awaitable[Buffer]]
    ) -> Buffer:
        """The bytes at ``offset``: from the window, by reading ahead, or as asked."""
        piece = self.piece(offset, size)
        if piece is not None:
            return piece
        if self.wants(offset, size):
            return self.fill(offset, size, await read_at(offset, self.span(size)))
        data = await read_at(offset, size)
        self.next_offset = offset + len(data)
        return data

    def piece(self, offset: int, size: int) -> memoryview | None:
        """The requested bytes if the window holds them (short at the file's end)."""
        end = self.start + len(self.data)
        stop = min(offset + size, self.file_size)
        if not self.start <= offset <= stop <= end:
            return None
        self.next_offset = stop
        return memoryview(self.data)[offset - self.start : stop - self.start]

    def wants(self, offset: int, size: int) -> bool:
        """Whether this request continues a reader of small pieces in order."""
        return size < SMALL and offset == self.next_offset

    @staticmethod
    def span(size: int) -> int:
        """Bytes to read for a window: a few requests' worth, not always a
        megabyte, so that readers that evict each other's windows (more than
        LIMIT at once) read at most AHEAD times what they asked for."""
        return min(WINDOW, size * AHEAD)

    def fill(self, offset: int, size: int, data: Buffer) -> memoryview:
        """Hold ``data`` (read at ``offset``); the first ``size`` bytes answer now."""
        self.start, self.data = offset, data
        first = memoryview(data)[:size]  # data ends where the file does
        self.next_offset = offset + len(first)
        return first


class Windows:
    """The daemon's read windows, by file handle, least recently used first."""

    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        self._windows: OrderedDict[int, ReadWindow] = OrderedDict()

    def get(self, fh: int, file_size: int) -> ReadWindow:
        window = self._windows.get(fh)
        if window is None:
            window = self._windows[fh] = ReadWindow(file_size)
            while len(self._windows) > self._limit:
                self._windows.popitem(last=False)
        self._windows.move_to_end(fh)
        return window

    def drop(self, fh: int) -> None:
        self._windows.pop(fh, None)
