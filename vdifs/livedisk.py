"""Writes to a live VDI's raw.img, buffered per chunk and committed as transactions.

A write patches whole 64 KiB chunks in memory (reading the current chunk
first when the write covers only part of it).  ``flush`` (close, fsync, or
the buffer growing past its limit) commits the dirty chunks to the SR in one
transaction, after which a snapshot sees them.  Reads overlay the buffered
chunks on the disk's current state, so a writer reads its own writes.

Await-atomicity: :meth:`write` and :meth:`read` never await; the adapter
serialises flushes with a lock, and a flush swaps the dirty set out first
(``pending``), so writes may continue while it commits.
"""

from __future__ import annotations

from collections.abc import Callable

from vdifs.errors import NoSpace
from vdifs.exports import Export
from vdifs.formats.base import CHUNK_SIZE
from vdifs.storage.local import LocalSR, VdiRecord

DIRTY_LIMIT = 64 << 20  # flush when this much is buffered: bounds memory per disk


class LiveDisk:
    def __init__(self, sr: LocalSR, uuid: str, current: Callable[[], Export]) -> None:
        self.sr = sr
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

    def _chunk(self, chunk: int, *, nowait: bool) -> bytearray:
        data = self.dirty.get(chunk)
        if data is None:
            data = self.pending.get(chunk)
            if data is None:
                return bytearray(
                    self._current()
                    .read(chunk * CHUNK_SIZE, CHUNK_SIZE, nowait=nowait)
                    .ljust(CHUNK_SIZE, b"\0")
                )
            return bytearray(data)
        return data

    def write(self, offset: int, data: bytes, *, nowait: bool = False) -> int:
        size = self.size
        if offset + len(data) > size:
            raise NoSpace(f"write past the end of the disk ({size} bytes)")
        if not data:
            return 0
        first = offset // CHUNK_SIZE
        last = (offset + len(data) - 1) // CHUNK_SIZE
        # Gather every chunk first: a WouldBlock leaves nothing half-applied.
        chunks = {}
        for chunk in range(first, last + 1):
            start = chunk * CHUNK_SIZE
            covers_all = offset <= start and offset + len(data) >= start + CHUNK_SIZE
            chunks[chunk] = (
                bytearray(CHUNK_SIZE) if covers_all else self._chunk(chunk, nowait=nowait)
            )
        view = memoryview(data)
        for chunk, buf in chunks.items():
            start = chunk * CHUNK_SIZE
            lo = max(offset, start)
            hi = min(offset + len(data), start + CHUNK_SIZE)
            buf[lo - start : hi - start] = view[lo - offset : hi - offset]
            self.dirty[chunk] = buf
        return len(data)

    def read(self, offset: int, length: int, *, nowait: bool = False) -> bytearray:
        out = self._current().read(offset, length, nowait=nowait)
        if not (self.dirty or self.pending) or not out:
            return out
        data = out
        first = offset // CHUNK_SIZE
        last = (offset + len(data) - 1) // CHUNK_SIZE
        for chunk in range(first, last + 1):
            buf = self.dirty.get(chunk)
            if buf is None:
                buf = self.pending.get(chunk)
            if buf is None:
                continue
            start = chunk * CHUNK_SIZE
            lo = max(offset, start)
            hi = min(offset + len(data), start + CHUNK_SIZE)
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
        with self.sr.writer(self.uuid) as writer:
            for chunk in sorted(self.pending):
                writer.write_chunk(chunk, bytes(self.pending[chunk]))
            return writer.commit()

    def end_flush(self, *, ok: bool) -> None:
        if not ok:
            # Keep the data: newer writes win over the failed batch.
            self.pending.update(self.dirty)
            self.dirty = self.pending
        self.pending = {}
