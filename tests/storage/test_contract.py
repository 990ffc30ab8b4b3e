"""The contract every storage backend passes: the embedded SR, the in-memory one, a pool.

Where a backend differs by nature (a pool: 2 MiB allocation and sizes, no
snapshot tree, live disks read as they are now), its ``Capabilities`` say so
and the contract checks the promise that remains.

A new backend joins the ``backend`` fixture's parameters and must pass all of
this before anything above ``vdifs/storage`` may use it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.pool.fakepool import running_pool
from tests.storage.memory import MemoryBackend
from vdifs.errors import Busy, InvalidArgument, NotFound, ReadOnly, VdifsError
from vdifs.exports import DiskState, Export
from vdifs.model import CHUNK_SIZE, CHUNKS_PER_BLOCK, Allocation
from vdifs.storage.backend import Backend, WouldBlock
from vdifs.storage.local import LocalSR
from vdifs.storage.xapi.api import PoolAddress
from vdifs.storage.xapi.pool import PoolBackend

MiB = 1 << 20


@pytest.fixture(params=["local", "memory", "pool"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    if request.param != "pool":
        made: Backend = LocalSR(tmp_path / "sr") if request.param == "local" else MemoryBackend()
        yield made
        made.close()
        return
    # A fresh fake pool per test (tests/pool/fakepool: XAPI over HTTPS, nbdkit for bytes).
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    with running_pool(tmp_path / "pool") as pool:
        port = urlsplit(pool.url).port
        made = PoolBackend(
            PoolAddress.parse(f"xapi://{pool.user}@127.0.0.1:{port}"),
            pool.password,
            ca=Path(pool.ca),
            scratch=tmp_path / "cache",
        )
        yield made
        made.close()


def size_of(backend: Backend, size: int) -> int:
    """``size`` as the backend rounds it."""
    unit = backend.capabilities.size_unit
    return -(-size // unit) * unit


def allocated(backend: Backend, chunks: list[int], size: int) -> list[int]:
    """The chunks an allocation holding ``chunks`` lists, at the backend's granularity."""
    per_unit = backend.capabilities.allocation_unit // CHUNK_SIZE
    limit = -(-size // CHUNK_SIZE)
    units = sorted({c // per_unit for c in chunks})
    return [c for u in units for c in range(u * per_unit, min((u + 1) * per_unit, limit))]


def read(backend: Backend, uuid: str, offset: int = 0, length: int | None = None) -> bytes:
    record, content = backend.state(uuid)
    length = record.virtual_size - offset if length is None else length
    buf = bytearray(length)
    backend.read_into(content, offset, memoryview(buf))
    return bytes(buf)


def write(backend: Backend, uuid: str, chunks: dict[int, bytes]) -> None:
    with backend.writer(uuid) as writer:
        for chunk, data in chunks.items():
            writer.write_chunk(chunk, data)
        writer.commit()


def chunks_of(allocation: Allocation) -> list[int]:
    return [
        block * CHUNKS_PER_BLOCK + bit
        for block, mask in zip(allocation.blocks, allocation.masks, strict=True)
        for bit in range(CHUNKS_PER_BLOCK)
        if mask >> bit & 1
    ]


def test_records_and_names(backend: Backend) -> None:
    version = backend.data_version()
    record = backend.create_vdi("disk", 3 * MiB + 512, "a description")
    assert backend.data_version() != version
    assert record.virtual_size == size_of(backend, 3 * MiB + 512) and record.generation >= 1
    assert not record.is_a_snapshot and record.name_description == "a description"
    assert backend.get_vdi(record.uuid) == record
    assert [r.uuid for r in backend.list_vdis()] == [record.uuid]
    with pytest.raises(NotFound):
        backend.get_vdi("01234567-89ab-cdef-0123-456789abcdef")
    for bad in ("", "a\0b", "x" * 256, ".."):
        with pytest.raises(InvalidArgument):
            backend.create_vdi(bad, MiB)
    backend.set_name(record.uuid, "renamed")
    assert backend.get_vdi(record.uuid).name_label == "renamed"
    assert read(backend, record.uuid) == bytes(record.virtual_size)


def test_a_commit_is_all_or_nothing(backend: Backend) -> None:
    uuid = backend.create_vdi("d", 4 * MiB).uuid
    a, b = os.urandom(CHUNK_SIZE), os.urandom(CHUNK_SIZE)
    write(backend, uuid, {0: a, 40: b})
    record, content = backend.state(uuid)
    assert read(backend, uuid, 0, CHUNK_SIZE) == a
    assert read(backend, uuid, 40 * CHUNK_SIZE + 100, 10) == b[100:110]
    assert chunks_of(content.allocation()) == allocated(backend, [0, 40], 4 * MiB)
    assert content.chunk_count == len(allocated(backend, [0, 40], 4 * MiB))
    assert record.physical_utilisation >= 2 * CHUNK_SIZE
    # Not committed: nothing changes.
    with backend.writer(uuid) as writer:
        writer.write_chunk(1, os.urandom(CHUNK_SIZE))
        assert writer.staged_chunk(1) is not None and writer.staged_chunk(2) is None
    assert backend.state(uuid)[0].generation == record.generation
    # A writer that expects a generation the disk has left fails whole.
    with backend.writer(uuid) as writer:
        writer.expect_generation = record.generation
        writer.write_chunk(2, os.urandom(CHUNK_SIZE))
        write(backend, uuid, {3: os.urandom(CHUNK_SIZE)})
        with pytest.raises(Busy):
            writer.commit()
    assert read(backend, uuid, 2 * CHUNK_SIZE, CHUNK_SIZE) == bytes(CHUNK_SIZE)
    # replace: what is not written becomes zero (a full image); zeros free chunks.
    with backend.writer(uuid, replace=True) as writer:
        writer.write_chunks(0, a + bytes(CHUNK_SIZE))
        writer.commit()
    assert read(backend, uuid, 0, 4 * MiB) == a + bytes(4 * MiB - CHUNK_SIZE)
    assert chunks_of(backend.state(uuid)[1].allocation()) == allocated(backend, [0], 4 * MiB)
    with pytest.raises(VdifsError):
        write(backend, uuid, {64: a})  # past the end


def test_holds_data_never_hides_data(backend: Backend) -> None:
    """``holds_data`` may say True of zeros, never False of data (reads of a range it
    calls empty are answered with shared zeros, without reading)."""
    uuid = backend.create_vdi("d", 8 * MiB).uuid
    write(backend, uuid, {3: os.urandom(CHUNK_SIZE), 70: os.urandom(CHUNK_SIZE)})
    snap = backend.snapshot(uuid).uuid  # immutable: what a backend can be sure of
    for state in (uuid, snap):
        _, content = backend.state(state)
        for offset, length in [(0, 8 * MiB), (3 * CHUNK_SIZE + 1, 1), (2 * MiB, 4 * MiB)]:
            assert content.holds_data(offset, length)
        assert content.holds_data(3 * CHUNK_SIZE - 1, 2)  # straddles into chunk 3
    _, content = backend.state(snap)
    if backend.capabilities.allocation_unit == CHUNK_SIZE:
        assert not content.holds_data(4 * CHUNK_SIZE, 66 * CHUNK_SIZE - 1)
        assert not content.holds_data(71 * CHUNK_SIZE, 8 * MiB - 71 * CHUNK_SIZE)
    assert not content.holds_data(6 * MiB, 2 * MiB)  # a block never written


def test_read_into_writes_every_byte(backend: Backend) -> None:
    """Readers hand read_into buffers that are not cleared first (vdifs.exports)."""
    uuid = backend.create_vdi("d", 6 * MiB).uuid
    data = os.urandom(CHUNK_SIZE)
    write(backend, uuid, {2: data})
    _, content = backend.state(backend.snapshot(uuid).uuid)
    expected = bytes(2 * CHUNK_SIZE) + data + bytes(6 * MiB - 3 * CHUNK_SIZE)
    for offset, length in [(0, 6 * MiB), (CHUNK_SIZE - 5, CHUNK_SIZE + 10), (4 * MiB, MiB)]:
        buf = bytearray(b"\xee" * length)
        backend.read_into(content, offset, memoryview(buf))
        assert buf == expected[offset : offset + length]


def test_a_state_read_is_a_point_in_time(backend: Backend) -> None:
    uuid = backend.create_vdi("d", 2 * MiB).uuid
    old = os.urandom(CHUNK_SIZE)
    write(backend, uuid, {5: old})
    record, content = backend.state(uuid)
    if not backend.capabilities.pinned_live_states:
        # Only snapshots stay as they were: read the old state through one.
        uuid = backend.snapshot(uuid).uuid
        record, content = backend.state(uuid)
        uuid = record.snapshot_of or uuid
    pin = backend.keep_readable(content)
    new = os.urandom(CHUNK_SIZE)
    write(backend, uuid, {5: new})
    buf = bytearray(CHUNK_SIZE)
    backend.read_into(content, 5 * CHUNK_SIZE, memoryview(buf))
    assert bytes(buf) == old
    pin.release()
    assert read(backend, uuid, 5 * CHUNK_SIZE, CHUNK_SIZE) == new
    record, _ = backend.state(uuid)
    write(backend, uuid, {6: new})
    again, _ = backend.state(uuid, known=record)
    assert again.generation > record.generation
    current, _ = backend.state(uuid)
    assert backend.state(uuid, known=current)[0] is current  # unchanged: returned as is
    with contextlib.suppress(WouldBlock):  # nowait answers at once or says it would block
        backend.read_into(content, 0, memoryview(bytearray(CHUNK_SIZE)), nowait=True)


def test_snapshots_clones_and_deltas(backend: Backend) -> None:
    uuid = backend.create_vdi("d", 4 * MiB).uuid
    data = {c: os.urandom(CHUNK_SIZE) for c in (0, 1, 33, 40)}
    write(backend, uuid, data)
    snap = backend.snapshot(uuid, "monday")
    assert snap.is_a_snapshot and snap.snapshot_of == uuid and snap.read_only
    tree = backend.capabilities.snapshot_tree
    assert backend.get_vdi(uuid).current == (snap.uuid if tree else None)
    assert snap.uuid in backend.get_vdi(uuid).snapshots
    before = read(backend, snap.uuid)
    write(backend, uuid, {1: os.urandom(CHUNK_SIZE), 33: bytes(CHUNK_SIZE), 50: b"x"})
    assert read(backend, snap.uuid) == before
    with pytest.raises(ReadOnly):
        write(backend, snap.uuid, {0: b"y"})
    _, live = backend.state(uuid)
    _, base = backend.state(snap.uuid)
    assert chunks_of(live.diff(base)) == [1, 33, 50]  # the zeroed chunk too
    assert chunks_of(base.diff(base)) == []
    # A delta export applies exactly: qemu and vhd-lib would see this layout.
    export = Export(
        backend, DiskState(*backend.state(uuid)), "vhd", DiskState(*backend.state(snap.uuid))
    )
    assert export.size > 0
    clone = backend.clone(snap.uuid, "copy")
    assert not clone.is_a_snapshot and read(backend, clone.uuid) == before
    write(backend, clone.uuid, {0: b"z"})
    assert read(backend, snap.uuid) == before
    # The snapshot tree: a second snapshot hangs under the first.
    second = backend.snapshot(uuid)
    assert second.parent == (snap.uuid if tree else None)
    assert backend.descendants(snap.uuid) == ([second.uuid] if tree else [])
    assert backend.delete_snapshot(snap.uuid) == [snap.uuid]
    assert backend.get_vdi(second.uuid).parent is None  # re-parented
    assert read(backend, clone.uuid, CHUNK_SIZE, CHUNK_SIZE) == data[1]
    with pytest.raises(InvalidArgument):
        backend.delete_snapshot(uuid)  # not a snapshot
    # A checkpoint keeps its map for deltas, not its data.
    checkpoint = backend.data_destroy(second.uuid)
    assert checkpoint.data_destroyed
    _, kept = backend.state(second.uuid)
    assert chunks_of(live.diff(kept)) == []
    backend.destroy(clone.uuid)
    with pytest.raises(NotFound):
        backend.get_vdi(clone.uuid)


def test_new_vdis_resize_and_import_identity(backend: Backend) -> None:
    with backend.writer(None, replace=True, new_vdi=("made", 3 * MiB), bulk=True) as writer:
        writer.write_chunk(2, b"new")
        assert [r.uuid for r in backend.list_vdis()] == []  # appears with the commit
        writer.import_identity, writer.import_name = b"\1" * 16, "made.vhd"
        record = writer.commit()
    assert record.name_label == "made" and record.virtual_size == size_of(backend, 3 * MiB)
    assert read(backend, record.uuid, 2 * CHUNK_SIZE, 3) == b"new"
    identity, name, generation = backend.last_import(record.uuid)
    if backend.capabilities.import_identity:
        assert (identity, name, generation) == (b"\1" * 16, "made.vhd", record.generation)
    else:
        assert (identity, name, generation) == (None, None, None)
    grown = backend.resize(record.uuid, 5 * MiB)
    assert grown.virtual_size == size_of(backend, 5 * MiB)
    assert grown.generation > record.generation
    assert read(backend, record.uuid, 3 * MiB, 2 * MiB) == bytes(2 * MiB)
    with pytest.raises(InvalidArgument):
        backend.resize(record.uuid, MiB)
    snap = backend.snapshot(record.uuid)
    with pytest.raises(ReadOnly):
        backend.resize(snap.uuid, 9 * MiB)


def test_imports_lock_and_log(backend: Backend) -> None:
    lock = backend.import_lock("some-target")
    with pytest.raises(Busy):
        backend.import_lock("some-target")
    other = backend.import_lock("new-other")
    lock.release()
    backend.import_lock("some-target").release()
    other.release()
    first = backend.imports.start("a.vhd", None, "vhd", 10)
    second = backend.imports.start("b.raw", "t", "raw", 20)
    backend.imports.end(second, "failed", "why", 22, 0, 0.1, notes="a note")
    backend.imports.end(first, "done", None, 0, 3, 0.2, target="u", received=11)
    newest, oldest = backend.imports.recent(2)
    assert (newest["id"], newest["state"], newest["errno_name"]) == (second, "failed", "EINVAL")
    assert newest["notes"] == "a note" and newest["error"] == "why"
    assert (oldest["target"], oldest["bytes_received"], oldest["chunks_applied"]) == ("u", 11, 3)
    backend.imports.forget(first)
    assert [i["id"] for i in backend.imports.recent(10)] == [second]
    path, fd = backend.scratch_file()
    try:
        os.pwrite(fd, b"staged", 0)
        assert path.read_bytes() == b"staged"
    finally:
        os.close(fd)
        path.unlink()
    block_size, blocks, free = backend.space()
    assert block_size > 0 and blocks >= free >= 0
