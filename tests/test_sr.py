"""The embedded SR without FUSE: records, block maps, transactions, crashes."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vdifs.cli import parse_size
from vdifs.errors import InvalidArgument, NotFound, ReadOnly
from vdifs.imports.engine import Applier
from vdifs.model import CHUNK_SIZE
from vdifs.storage.local import LocalSR, layout, writer
from vdifs.storage.local.blockmap import ROW_BYTES
from vdifs.storage.local.writer import ChunkWriter


def test_parse_size() -> None:
    assert parse_size("512") == 512
    assert parse_size("10G") == 10 << 30
    assert parse_size("4k") == 4096
    assert parse_size("2TiB") == 2 << 40
    assert parse_size("1M") == 1 << 20
    with pytest.raises(InvalidArgument):
        parse_size("ten")


def test_create_rounds_to_sectors_and_records_xapi_fields(sr: LocalSR) -> None:
    record = sr.create_vdi("disk", 1000, "a description")
    assert record.virtual_size == 1024
    fields = record.to_json()
    for key in (
        "uuid",
        "name_label",
        "name_description",
        "virtual_size",
        "physical_utilisation",
        "is_a_snapshot",
        "snapshot_of",
        "snapshot_time",
        "snapshots",
        "read_only",
    ):
        assert key in fields
    assert fields["is_a_snapshot"] is False and fields["snapshot_of"] is None


def test_zero_chunks_are_never_stored(sr: LocalSR) -> None:
    record = sr.create_vdi("disk", 8 << 20)
    with sr.writer(record.uuid) as w:
        for chunk in range(64):
            w.write_chunk(chunk, bytes(CHUNK_SIZE))
        w.commit()
    assert sr.get_vdi(record.uuid).physical_utilisation == 0
    assert sum(f.stat().st_size for f in sr.packs_dir.iterdir()) == 0


def test_zero_chunks_in_a_run_are_told_from_data_by_their_last_byte(sr: LocalSR) -> None:
    # Imports hand write_chunks memoryviews of the FUSE writes: the zero test
    # must see every byte of a view, whatever object it views.
    record = sr.create_vdi("disk", 8 << 20)
    run = bytearray(4 * CHUNK_SIZE)
    run[2 * CHUNK_SIZE - 1] = 1  # chunk 1: one byte at its very end
    run[3 * CHUNK_SIZE] = 7  # chunk 3: one byte at its very start
    with sr.writer(record.uuid) as w:
        w.write_chunks(0, memoryview(run))
        w.commit()
    state = sr.state(record.uuid)
    assert sr.read(state[1], 0, 4 * CHUNK_SIZE) == bytes(run)
    assert sr.get_vdi(record.uuid).physical_utilisation == 2 * CHUNK_SIZE
    assert layout.is_zero_chunk(memoryview(bytes(CHUNK_SIZE)))
    assert not layout.is_zero_chunk(memoryview(run)[CHUNK_SIZE : 2 * CHUNK_SIZE])
    assert not layout.is_zero_chunk(bytes(CHUNK_SIZE - 1))  # not a whole chunk


def test_snapshot_is_a_point_in_time_and_shares_data(sr: LocalSR) -> None:
    record = sr.create_vdi("disk", 8 << 20)
    first = os.urandom(CHUNK_SIZE)
    with sr.writer(record.uuid) as w:
        w.write_chunk(5, first)
        w.commit()
    used = sum(f.stat().st_size for f in sr.packs_dir.iterdir())
    snap = sr.snapshot(record.uuid, "monday")
    assert sum(f.stat().st_size for f in sr.packs_dir.iterdir()) == used
    with sr.writer(record.uuid) as w:
        w.write_chunk(5, os.urandom(CHUNK_SIZE))
        w.commit()
    snap_state = sr.state(snap.uuid)
    assert sr.read(snap_state[1], 5 * CHUNK_SIZE, CHUNK_SIZE) == first
    live = sr.state(record.uuid)
    assert sr.read(live[1], 5 * CHUNK_SIZE, CHUNK_SIZE) != first
    assert snap_state[0].is_a_snapshot and snap_state[0].snapshot_of == record.uuid
    assert sr.get_vdi(record.uuid).snapshots == (snap.uuid,)
    with pytest.raises(ReadOnly):
        sr.writer(snap.uuid)


def test_identical_content_keeps_its_identity(sr: LocalSR) -> None:
    record = sr.create_vdi("disk", 4 << 20)
    data = os.urandom(CHUNK_SIZE)
    with sr.writer(record.uuid) as w:
        w.write_chunk(0, data)
        w.commit()
    snap = sr.snapshot(record.uuid)
    with sr.writer(record.uuid, replace=True) as w:
        w.write_chunk(0, data)
        w.commit()
    live_map = sr.state(record.uuid)[1]
    snap_map = sr.state(snap.uuid)[1]
    assert live_map.diff(snap_map).blocks.tolist() == []


def test_destroy_keeps_snapshots_and_their_data(sr: LocalSR) -> None:
    record = sr.create_vdi("disk", 4 << 20)
    data = os.urandom(CHUNK_SIZE)
    with sr.writer(record.uuid) as w:
        w.write_chunk(1, data)
        w.commit()
    snap = sr.snapshot(record.uuid)
    sr.destroy(record.uuid)
    with pytest.raises(NotFound):
        sr.get_vdi(record.uuid)
    assert sr.garbage_collect() == (0, 0)
    assert sr.read(sr.state(snap.uuid)[1], CHUNK_SIZE, CHUNK_SIZE) == data


def test_failed_commit_leaves_the_vdi_unchanged(sr: LocalSR) -> None:
    record = sr.create_vdi("disk", 4 << 20)
    before = sr.state(record.uuid)
    w = sr.writer(record.uuid)
    w.write_chunk(0, os.urandom(CHUNK_SIZE))
    sr.destroy(record.uuid)  # the target vanishes under the writer
    with pytest.raises(NotFound):
        w.commit()
    assert before[0].generation == 1
    assert list(sr.packs_dir.iterdir()) == []  # staged data was dropped


def test_snapshot_of_20_gib_copies_rows_not_data(sr: LocalSR) -> None:
    """20 GiB of data: 10240 rows.  Rows point at one stored chunk (content
    addressing), so the test is cheap; the snapshot copies rows only."""
    record = sr.create_vdi("big", 20 << 30)
    with sr.writer(record.uuid) as w:
        w.write_chunk(0, os.urandom(CHUNK_SIZE))
        w.commit()
    row_id = sr.row_id(record.uuid)
    row = sr.db.execute("SELECT chunks FROM blocks WHERE vdi = ?", (row_id,)).fetchone()[0]
    chunk_id = row[:8]
    full_row = chunk_id * (ROW_BYTES // 8)
    with sr.transaction() as db:
        db.executemany(
            "INSERT OR REPLACE INTO blocks(vdi, idx, mask, chunks) VALUES (?, ?, ?, ?)",
            ((row_id, i, 0xFFFFFFFF, full_row) for i in range(10240)),
        )
    data_before = sum(f.stat().st_size for f in sr.packs_dir.iterdir())
    start = time.perf_counter()
    snap = sr.snapshot(record.uuid)
    elapsed = time.perf_counter() - start
    assert sum(f.stat().st_size for f in sr.packs_dir.iterdir()) == data_before
    assert sr.state(snap.uuid)[1].chunk_count == 10240 * 32
    print(f"snapshot of 20 GiB of data: {elapsed * 1000:.1f} ms")


SNAPSHOT_LOOP = """
import sys
from vdifs.storage.local import LocalSR
sr = LocalSR(sys.argv[1])
uuid = sys.argv[2]
print("ready", flush=True)
while True:
    sr.snapshot(uuid)
"""


def test_killed_mid_snapshot_reopens_consistent(sr_path: Path) -> None:
    sr = LocalSR(sr_path)
    record = sr.create_vdi("disk", 4 << 30)
    with sr.writer(record.uuid) as w:
        for chunk in range(0, 65536, 3):
            w.write_chunk(chunk, chunk.to_bytes(8, "little") * (CHUNK_SIZE // 8))
        w.commit()
    rows = sr.db.execute(
        "SELECT COUNT(*) FROM blocks WHERE vdi = ?", (sr.row_id(record.uuid),)
    ).fetchone()[0]
    sr.close()
    for delay in (0.05, 0.13, 0.3):
        proc = subprocess.Popen(
            [sys.executable, "-c", SNAPSHOT_LOOP, str(sr_path), record.uuid],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(delay)
        proc.kill()
        proc.wait()
    sr = LocalSR(sr_path)
    snapshots = [r for r in sr.list_vdis() if r.is_a_snapshot]
    assert snapshots, "no snapshot was completed"
    for snap in snapshots:
        count = sr.db.execute(
            "SELECT COUNT(*) FROM blocks WHERE vdi = ?", (sr.row_id(snap.uuid),)
        ).fetchone()
        assert count[0] == rows, "a half-made snapshot survived"
    orphans = sr.db.execute("SELECT COUNT(*) FROM blocks WHERE vdi NOT IN (SELECT id FROM vdis)")
    assert orphans.fetchone()[0] == 0
    sr.close()


def test_stale_packs_from_a_crash_are_removed(sr_path: Path) -> None:
    sr = LocalSR(sr_path)
    record = sr.create_vdi("disk", 4 << 20)
    w = sr.writer(record.uuid)
    w.write_chunk(0, os.urandom(CHUNK_SIZE))
    (left_behind,) = sr.packs_dir.iterdir()
    # A live writer's pack survives another process's cleanup...
    assert LocalSR(sr_path).remove_stale_packs() == 0
    w._close_packs(unlink=False)  # ...what a crash before commit leaves does not
    sr.close()
    LocalSR(sr_path).close()
    assert not left_behind.exists()


@pytest.mark.parametrize("direct", [False, True])
def test_a_large_import_keeps_its_digests_on_disk(
    sr: LocalSR, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """Past IN_MEMORY new chunks, a writer's digests go to a scratch file (bounded memory)."""
    monkeypatch.setattr(writer._NewDigests, "IN_MEMORY", 8)
    record = sr.create_vdi("disk", 64 * CHUNK_SIZE)
    chunks = [os.urandom(CHUNK_SIZE) for _ in range(20)]
    w = ChunkWriter(sr, record.uuid, replace=True, direct=direct)
    w.write_chunks(0, b"".join(chunks))
    assert list(sr.staging_dir.glob("*.digests"))  # spilled
    # Chunks seen before and after the spill still deduplicate within the import.
    w.write_chunks(20, chunks[3] + chunks[17] + bytes(CHUNK_SIZE))
    w.commit()
    assert not list(sr.staging_dir.glob("*.digests"))
    block_map = sr.state(record.uuid)[1]
    ids = [block_map.chunk_id(c) for c in range(23)]
    assert ids[20] == ids[3] and ids[21] == ids[17] and ids[22] == 0
    assert len(set(ids[:20])) == 20
    for c, data in enumerate([*chunks, chunks[3], chunks[17]]):
        assert sr.read(block_map, c * CHUNK_SIZE, CHUNK_SIZE) == data
    # A later import finds them through the committed digests.
    again = ChunkWriter(sr, record.uuid, replace=False)
    again.write_chunks(40, chunks[5])
    again.commit()
    assert sr.state(record.uuid)[1].chunk_id(40) == ids[5]


def test_stale_digest_scratch_from_a_crash_is_removed(sr_path: Path) -> None:
    LocalSR(sr_path).close()
    left, busy = sr_path / "staging" / "a.digests", sr_path / "staging" / "b.digests"
    for path in (left, busy):
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 3600,) * 2)
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer still using it
    try:
        LocalSR(sr_path).close()
        assert not left.exists() and busy.exists()
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct", [False, True])
def test_a_chunk_stored_early_is_read_back_whole(sr: LocalSR, direct: bool) -> None:
    """An import's partly written chunk stored before the rest of it came (past the
    open-chunk limit) is completed from the writer's copy, even one still queued
    for an O_DIRECT write."""
    record = sr.create_vdi("disk", 4 * CHUNK_SIZE)
    head, tail = os.urandom(CHUNK_SIZE // 2), os.urandom(CHUNK_SIZE // 2)
    for _ in range(20):  # the background writer may or may not have run yet
        w = ChunkWriter(sr, record.uuid, replace=True, direct=direct)
        applier = Applier(sr, w, None)
        applier.write(CHUNK_SIZE + len(head), tail)
        applier.settle(0, 4 * CHUNK_SIZE)  # stored, zeros in front
        applier.write(CHUNK_SIZE, head)
        applier.finish()
        w.commit()
        block_map = sr.state(record.uuid)[1]
        assert sr.read(block_map, CHUNK_SIZE, CHUNK_SIZE) == head + tail
        head, tail = tail, head


def test_direct_writes_fill_whole_buffers_across_calls(
    sr: LocalSR, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import's runs (a megabyte, a chunk stitched from two FUSE writes) share
    O_DIRECT buffers: one pwrite per 4 MiB of consecutive slots, not one per call;
    a chunk that is already stored (no new slot) and the commit break nothing."""
    calls: list[int] = []
    write_exactly = writer._write_exactly

    def counted(fd: int, buffer: object, length: int, offset: int) -> None:
        calls.append(length)
        write_exactly(fd, buffer, length, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "_write_exactly", counted)
    chunks = 150
    record = sr.create_vdi("disk", chunks * CHUNK_SIZE)
    data = [os.urandom(CHUNK_SIZE) for _ in range(chunks)]
    data[70] = data[3]  # stored already: no slot, the buffer goes on filling
    w = ChunkWriter(sr, record.uuid, replace=True, direct=True)
    first = 0
    for size in [1, 15, 1, 15, 3, 40, 1, 74]:
        w.write_chunks(first, b"".join(data[first : first + size]))
        first += size
    assert first == chunks
    w.commit()
    content = sr.state(record.uuid)[1]
    assert sr.read(content, 0, chunks * CHUNK_SIZE) == b"".join(data)
    assert calls == [64 * CHUNK_SIZE, 64 * CHUNK_SIZE, 21 * CHUNK_SIZE]


def test_growing_zeroes_what_the_old_last_chunk_held_past_the_end(sr: LocalSR) -> None:
    """Bytes past a disk's end are never data; once the disk grows they must read as zeros."""
    size = CHUNK_SIZE + 512
    record = sr.create_vdi("odd", size)
    with sr.writer(record.uuid) as writer:
        writer.write_chunk(1, os.urandom(CHUNK_SIZE))  # a whole chunk: 63.5 KiB past the end
        writer.commit()
    before = sr.read(sr.state(record.uuid)[1], CHUNK_SIZE, 512)
    grown = sr.resize(record.uuid, 4 * CHUNK_SIZE)
    content = sr.state(grown.uuid)[1]
    assert sr.read(content, CHUNK_SIZE, 512) == before
    assert sr.read(content, CHUNK_SIZE + 512, 3 * CHUNK_SIZE - 512) == bytes(3 * CHUNK_SIZE - 512)
