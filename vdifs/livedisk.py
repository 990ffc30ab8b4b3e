"""Writes to a live VDI's raw.img, buffered per chunk and committed as transactions.

A write patches whole 64 KiB chunks in memory (reading the current chunk
first when the write covers only part of it).  ``flush`` (close, fsync, or
the buffer growing past its limit) commits the dirty chunks to the SR in one
transaction, after which a snapshot sees them.  Reads overlay the buffered
chunks on the disk's current state, so a writer reads its own writes.

Reads and writes run on the event loop and never await, so each one is
atomic against the others and against a flush, which swaps the dirty set out
first (``pending``) and commits it in a thread while writes go on.  When the
committed bytes they need are not in the page cache they raise
:class:`NeedsFetch`; the adapter reads those bytes in a thread and calls
again with them, and they are used only if the disk's committed state is
still the one they were read from.  (Running the whole read or write in a
thread would race with a flush: a commit could copy half of a write, a read
could overlay the buffer on a state older than the one just committed.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vdifs.errors import NoSpace
from vdifs.exports import Export
from vdifs.model import CHUNK_SIZE, VdiRecord
from vdifs.storage.backend import Backend, WouldBlock

DIRTY_LIMIT = 64 << 20  # flush when this much is buffered: bounds memory per disk

Span = tuple[int, int]  # (offset, length)


@dataclass
class Fetched:
    """Committed bytes of one state of a disk, read off the loop."""

    generation: int
    spans: dict[Span, bytearray] = field(default_factory=dict)


class NeedsFetch(Exception):
    """A live read or write needs committed bytes the page cache does not hold."""

    def __init__(self, export: Export, spans: list[Span]) -> None:
        super().__init__(spans)
        self.export = export
        self.spans = spans

    def fetch(self) -> Fetched:
        """Read the spans (blocking: call it in a thread)."""
        fetched = Fetched(self.export.state.record.generation)
        for offset, length in self.spans:
            fetched.spans[offset, length] = self.export.read(offset, length)
        return fetched


class LiveDisk:
    def __init__(self, backend: Backend, uuid: str, current: Callable[[], Export]) -> None:
        self.backend = backend
        self.uuid = uuid
        self._current = current  # the raw export of the disk's latest committed state
        self.dirty: dict[int, bytearray] = {}
        self.pending: dict[int, bytearray] = {}
        self.open_handles = 0

    @property
    def dirty_bytes(self) -> int:
        return len(self.dirty) * CHUNK_SIZE

    @property
    def size(self) -> int:
        return self._current().size

    def _committed(self, export: Export, span: Span, fetched: Fetched | None) -> bytearray:
        """Committed bytes of ``span``: fetched ones if still current, else cached ones."""
        if fetched is not None and fetched.generation == export.state.record.generation:
            data = fetched.spans.pop(span, None)
            if data is not None:
                return data
        return export.read(*span, nowait=True)

    def write(self, offset: int, data: bytes, fetched: Fetched | None = None) -> int:
        export = self._current()
        if offset + len(data) > export.size:
            raise NoSpace(f"write past the end of the disk ({export.size} bytes)")
        if not data:
            return 0
        first = offset // CHUNK_SIZE
        last = (offset + len(data) - 1) // CHUNK_SIZE
        # Gather every chunk first: a NeedsFetch leaves nothing half-applied.
        chunks: dict[int, bytearray] = {}
        missing: list[Span] = []
        for chunk in range(first, last + 1):
            start = chunk * CHUNK_SIZE
            if offset <= start and offset + len(data) >= start + CHUNK_SIZE:
                chunks[chunk] = bytearray(CHUNK_SIZE)
            elif (buf := self.dirty.get(chunk)) is not None:
                chunks[chunk] = buf
            elif (buf := self.pending.get(chunk)) is not None:
                chunks[chunk] = bytearray(buf)  # being committed: never changed under it
            else:
                try:
                    buf = self._committed(export, (start, CHUNK_SIZE), fetched)
                except WouldBlock:
                    missing.append((start, CHUNK_SIZE))
                    continue
                chunks[chunk] = buf.ljust(CHUNK_SIZE, b"\0")  # the disk may end mid-chunk
        if missing:
            raise NeedsFetch(export, missing)
        view = memoryview(data)
        for chunk, buf in chunks.items():
            start = chunk * CHUNK_SIZE
            lo = max(offset, start)
            hi = min(offset + len(data), start + CHUNK_SIZE)
            buf[lo - start : hi - start] = view[lo - offset : hi - offset]
            self.dirty[chunk] = buf
        return len(data)

    def read(self, offset: int, length: int, fetched: Fetched | None = None) -> bytearray:
        export = self._current()
        try:
            out = self._committed(export, (offset, length), fetched)
        except WouldBlock:
            raise NeedsFetch(export, [(offset, length)]) from None
        if not (self.dirty or self.pending) or not out:
            return out
        first = offset // CHUNK_SIZE
        last = (offset + len(out) - 1) // CHUNK_SIZE
        for chunk in range(first, last + 1):
            buf = self.dirty.get(chunk)
            if buf is None:
                buf = self.pending.get(chunk)
            if buf is None:
                continue
            start = chunk * CHUNK_SIZE
            lo = max(offset, start)
            hi = min(offset + len(out), start + CHUNK_SIZE)
            out[lo - offset : hi - offset] = buf[lo - start : hi - start]
        return out

    def begin_flush(self) -> bool:
        """Move the dirty chunks aside for :meth:`commit`; False when clean."""
        if not self.dirty:
            return False
        self.pending, self.dirty = self.dirty, {}
        return True

    def commit(self) -> VdiRecord:
        """Write the pending chunks in one transaction (blocking; off the loop)."""
        with self.backend.writer(self.uuid) as writer:
            for chunk in sorted(self.pending):
                writer.write_chunk(chunk, bytes(self.pending[chunk]))
            return writer.commit()

    def end_flush(self, *, ok: bool) -> None:
        if not ok:
            # Keep the data: newer writes win over the failed batch.
            self.pending.update(self.dirty)
            self.dirty = self.pending
        self.pending = {}
