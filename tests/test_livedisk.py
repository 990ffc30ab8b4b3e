"""A live disk's reads and writes against flushes, with a page cache that never holds anything."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio

from vdifs.exports import Export
from vdifs.fs.ops import on_live_disk
from vdifs.livedisk import LiveDisk, NeedsFetch
from vdifs.model import CHUNK_SIZE
from vdifs.storage.backend import WouldBlock
from vdifs.storage.local import LocalSR


class ColdExport:
    """A committed state whose bytes are never in the page cache."""

    def __init__(self, data: bytes, generation: int) -> None:
        self.data = data
        self.size = len(data)
        self.state = SimpleNamespace(record=SimpleNamespace(generation=generation))

    def read(self, offset: int, length: int, *, nowait: bool = False) -> bytearray:
        if nowait:
            raise WouldBlock
        return bytearray(self.data[offset : offset + length])


class Disk:
    def __init__(self, data: bytes) -> None:
        self.committed = ColdExport(data, 1)
        self.live = LiveDisk(cast(LocalSR, None), "uuid", lambda: cast(Export, self.committed))

    def flush(self) -> None:
        """What a flush does, with the commit done by hand."""
        assert self.live.begin_flush()
        data = bytearray(self.committed.data)
        for chunk, buf in self.live.pending.items():
            data[chunk * CHUNK_SIZE : (chunk + 1) * CHUNK_SIZE] = buf
        self.committed = ColdExport(bytes(data), self.committed.state.record.generation + 1)
        self.live.end_flush(ok=True)


def call(fn: Any, *args: Any) -> Any:
    """Through the adapter's own helper: fetch in a thread what is missing, call again."""
    return trio.run(on_live_disk, partial(fn, *args))


def test_a_write_that_needs_a_fetch_changes_nothing_until_it_has_it() -> None:
    disk = Disk(b"a" * (4 * CHUNK_SIZE))
    offset, data = CHUNK_SIZE // 2, b"w" * (2 * CHUNK_SIZE)  # half, whole, half
    with pytest.raises(NeedsFetch) as need:
        disk.live.write(offset, data)
    assert need.value.spans == [(0, CHUNK_SIZE), (2 * CHUNK_SIZE, CHUNK_SIZE)]
    assert not disk.live.dirty
    assert disk.live.write(offset, data, need.value.fetch()) == len(data)
    want = b"a" * offset + data + b"a" * (4 * CHUNK_SIZE - offset - len(data))
    assert call(disk.live.read, 0, 4 * CHUNK_SIZE) == want


def test_bytes_fetched_before_a_flush_are_not_used_after_it() -> None:
    disk = Disk(b"a" * (2 * CHUNK_SIZE))
    stale = NeedsFetch(cast(Export, disk.committed), [(0, CHUNK_SIZE)]).fetch()
    stale_too = NeedsFetch(cast(Export, disk.committed), [(0, CHUNK_SIZE)]).fetch()
    disk.live.write(0, b"b" * CHUNK_SIZE)  # whole chunk: needs nothing
    disk.flush()  # the buffer is empty again; "b" is committed
    # A read or write whose fetch was made before the flush must not bring "a" back.
    with pytest.raises(NeedsFetch):
        disk.live.read(0, CHUNK_SIZE, stale)
    assert call(disk.live.read, 0, CHUNK_SIZE) == b"b" * CHUNK_SIZE
    with pytest.raises(NeedsFetch):
        disk.live.write(10, b"c", stale_too)
    call(disk.live.write, 10, b"c")
    assert call(disk.live.read, 0, 16) == b"b" * 10 + b"c" + b"b" * 5


def test_a_write_never_changes_a_chunk_being_committed() -> None:
    disk = Disk(b"a" * CHUNK_SIZE)
    disk.live.write(0, b"b" * CHUNK_SIZE)
    assert disk.live.begin_flush()
    being_committed = bytes(disk.live.pending[0])
    disk.live.write(5, b"c")  # while the commit copies the pending chunks in a thread
    assert disk.live.pending[0] == being_committed
    assert call(disk.live.read, 0, 8) == b"bbbbbcbb"
    disk.live.end_flush(ok=False)  # the commit failed: the newer write wins
    assert call(disk.live.read, 0, 8) == b"bbbbbcbb"


def test_a_disk_ending_mid_chunk() -> None:
    disk = Disk(b"a" * (CHUNK_SIZE + 512))
    call(disk.live.write, CHUNK_SIZE + 100, b"z")
    assert call(disk.live.read, CHUNK_SIZE, 1024) == b"a" * 100 + b"z" + b"a" * 411
