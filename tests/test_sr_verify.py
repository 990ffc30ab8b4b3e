"""Damaged chunks: `vdifs sr verify` finds and names them, reads of them fail with EIO."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, Mount, fill, needs_fuse, pread, wait_for
from vdifs.errors import StorageError
from vdifs.model import CHUNK_SIZE, CHUNKS_PER_BLOCK
from vdifs.storage.backend import WouldBlock
from vdifs.storage.local import LocalSR
from vdifs.storage.local.layout import pack_of, slot_offset

MiB = 1 << 20
DAMAGED = 21  # the chunk of the test disk that gets a flipped byte


# -- helpers --------------------------------------------------------------------


def chunk_at(sr_path: Path, uuid: str, offset: int) -> int:
    """The id of the chunk holding a disk's byte ``offset``, from the SR's tables."""
    block, c = divmod(offset // CHUNK_SIZE, CHUNKS_PER_BLOCK)
    db = sqlite3.connect(sr_path / "sr.db")
    try:
        row = db.execute(
            "SELECT chunks FROM blocks WHERE vdi = (SELECT id FROM vdis WHERE uuid = ?)"
            " AND idx = ?",
            (uuid, block),
        ).fetchone()
    finally:
        db.close()
    assert row is not None, f"no data at {offset} in {uuid}"
    chunk = int.from_bytes(row[0][c * 8 : c * 8 + 8], "little")
    assert chunk, f"chunk at {offset} of {uuid} is zero"
    return chunk


def pack_path(sr_path: Path, chunk: int) -> Path:
    return sr_path / "packs" / f"{pack_of(chunk):08x}.pack"


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def flip(sr_path: Path, chunk: int, at: int = 1000) -> None:
    """Flip one bit of a stored chunk in its pack, as a failing disk would."""
    path = pack_path(sr_path, chunk)
    fd = os.open(path, os.O_RDWR)
    try:
        offset = slot_offset(chunk) + at
        (byte,) = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte ^ 0x10]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    evict(path)


def verify(cli: Cli, *args: str) -> tuple[int, dict[str, Any], str]:
    """(exit status, JSON report, stderr) of `vdifs sr verify --json`."""
    result = cli.run("sr", "verify", "--json", *args, check=False)
    return result.returncode, json.loads(result.stdout), result.stderr


def make_disk(cli: Cli, tmp_path: Path) -> tuple[str, str, bytes, bytes]:
    """A 16 MiB VDI imported from a raw file, snapshotted, then partly rewritten.

    Chunk 3 and chunk 40 hold the same bytes (one stored chunk used twice).
    Returns (vdi, snapshot, the snapshot's bytes, the VDI's bytes).
    """
    vdi = cli("vdi", "create", "disk", "--size", "16M")
    data = bytearray(os.urandom(16 * MiB))
    data[40 * CHUNK_SIZE : 41 * CHUNK_SIZE] = data[3 * CHUNK_SIZE : 4 * CHUNK_SIZE]
    data[100 * CHUNK_SIZE : 110 * CHUNK_SIZE] = bytes(10 * CHUNK_SIZE)  # zeros: never stored
    raw = tmp_path / "disk.raw"
    raw.write_bytes(data)
    cli("import", vdi, str(raw))
    snap = cli("vdi", "snapshot", vdi, "--name", "nightly")
    later = bytearray(data)
    later[200 * CHUNK_SIZE : 202 * CHUNK_SIZE] = os.urandom(2 * CHUNK_SIZE)
    raw.write_bytes(later)
    cli("import", vdi, str(raw))
    return vdi, snap, bytes(data), bytes(later)


# -- the CLI ----------------------------------------------------------------------


def test_a_clean_sr_verifies_with_exit_0(cli: Cli, tmp_path: Path) -> None:
    empty = cli.run("sr", "verify")
    assert empty.returncode == 0 and "checked 0 chunk(s)" in empty.stdout
    vdi, snap, _data, _later = make_disk(cli, tmp_path)
    code, report, _ = verify(cli)
    # 256 chunks, 10 zero, chunk 40 shares chunk 3's: 245; then 2 new ones.
    assert code == 0, report
    assert report["damaged"] == [] and report["chunks"] == 247
    assert report["bytes"] == 247 * CHUNK_SIZE and report["unverifiable"] == 0
    plain = cli.run("sr", "verify")
    assert plain.returncode == 0 and plain.stderr == ""
    assert "checked 247 chunk(s) (15.4 MiB)" in plain.stdout and ": 0 damaged" in plain.stdout
    assert verify(cli, snap)[1]["chunks"] == 245
    assert verify(cli, vdi)[1]["chunks"] == 245
    assert verify(cli, "nightly")[1]["chunks"] == 245  # names resolve as elsewhere
    assert cli.run("sr", "verify", "no-such-vdi", check=False).returncode == 3


def test_a_flipped_byte_is_found_and_named(cli: Cli, sr_path: Path, tmp_path: Path) -> None:
    vdi, snap, _data, _later = make_disk(cli, tmp_path)
    shared = chunk_at(sr_path, snap, 3 * CHUNK_SIZE)
    assert chunk_at(sr_path, vdi, 40 * CHUNK_SIZE) == shared
    flip(sr_path, shared)

    result = cli.run("sr", "verify", check=False)
    assert result.returncode == 11, result.stderr  # StorageError
    assert result.stderr.startswith("vdifs: the SR is damaged: 1 of 247")
    out = result.stdout
    assert f"damaged chunk {shared:016x}: its content does not match its digest" in out
    assert f"packs/{pack_of(shared):08x}.pack at byte {slot_offset(shared)}" in out
    ranges = f"bytes {3 * CHUNK_SIZE}-{4 * CHUNK_SIZE - 1}, {40 * CHUNK_SIZE}-{41 * CHUNK_SIZE - 1}"
    assert f"VDI      {vdi}  {ranges}  disk" in out
    assert f"snapshot {snap}  {ranges}  nightly" in out
    assert ": 1 damaged" in out

    code, report, _ = verify(cli)
    assert code == 11
    (damaged,) = report["damaged"]
    assert damaged["chunk"] == f"{shared:016x}" and damaged["reason"] == "corrupt"
    assert damaged["pack"] == f"{pack_of(shared):08x}"
    assert damaged["offset"] == slot_offset(shared)
    users = {use["uuid"]: use for use in damaged["used_by"]}
    assert users.keys() == {vdi, snap}
    assert users[snap]["is_a_snapshot"] and not users[vdi]["is_a_snapshot"]
    for use in users.values():
        assert use["ranges"] == [
            [3 * CHUNK_SIZE, 4 * CHUNK_SIZE],
            [40 * CHUNK_SIZE, 41 * CHUNK_SIZE],
        ]


def test_verify_of_some_vdis_checks_only_their_chunks(
    cli: Cli, sr_path: Path, tmp_path: Path
) -> None:
    vdi, snap, _data, _later = make_disk(cli, tmp_path)
    only_vdi = chunk_at(sr_path, vdi, 200 * CHUNK_SIZE)  # rewritten after the snapshot
    assert chunk_at(sr_path, snap, 200 * CHUNK_SIZE) != only_vdi
    flip(sr_path, only_vdi, at=CHUNK_SIZE - 1)  # its last byte
    code, report, _ = verify(cli, snap)
    assert code == 0 and report["damaged"] == [] and report["chunks"] == 245
    code, report, stderr = verify(cli, vdi)
    assert code == 11 and "1 of 245" in stderr
    (damaged,) = report["damaged"]
    assert damaged["chunk"] == f"{only_vdi:016x}"
    (use,) = damaged["used_by"]
    assert use["uuid"] == vdi and use["ranges"] == [[200 * CHUNK_SIZE, 201 * CHUNK_SIZE]]
    code, report, _ = verify(cli, snap, vdi)
    assert code == 11 and report["chunks"] == 247


def test_a_checkpoint_has_no_data_to_verify(cli: Cli, sr_path: Path, tmp_path: Path) -> None:
    _vdi, snap, _data, _later = make_disk(cli, tmp_path)
    cli("vdi", "data-destroy", snap)
    cli("sr", "gc")  # nothing freed: the VDI still uses most of it
    code, report, _ = verify(cli, snap)
    assert code == 0 and report["chunks"] == 0
    flip(sr_path, chunk_at(sr_path, snap, 200 * CHUNK_SIZE))  # only the checkpoint held it
    code, report, _ = verify(cli)
    assert code == 11
    (damaged,) = report["damaged"]
    assert damaged["used_by"] == []  # a checkpoint's data is not read: not a user
    out = cli.run("sr", "verify", check=False).stdout
    assert "used by no VDI or snapshot" in out


def test_progress_on_a_terminal(cli: Cli, tmp_path: Path) -> None:
    make_disk(cli, tmp_path)
    master, slave = os.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "vdifs", "--sr", str(cli.sr), "sr", "verify", "--progress"],
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            timeout=60,
            check=False,
        )
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                piece = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not piece:
                break
            shown += piece
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert result.returncode == 0
    assert b"100.0%" in shown and b"[" + b"#" * 30 + b"]" in shown
    # Not on a terminal: nothing but the report.
    quiet = cli.run("sr", "verify", "--progress")
    assert quiet.stderr == ""


# -- LocalSR, without the CLI ------------------------------------------------------


def write_disk(sr: LocalSR, chunks: int = 40) -> tuple[str, list[bytes]]:
    record = sr.create_vdi("d", chunks * CHUNK_SIZE)
    data = [os.urandom(CHUNK_SIZE) for _ in range(chunks)]
    with sr.writer(record.uuid) as w:
        w.write_chunks(0, b"".join(data))
        w.commit()
    return record.uuid, data


def test_reads_check_each_chunk_once_and_again_after_the_pack_changed(sr: LocalSR) -> None:
    uuid, data = write_disk(sr)
    _record, content = sr.state(uuid)
    buf = memoryview(bytearray(2 * CHUNK_SIZE))
    # Not yet checked: a read that may not wait leaves the hashing to a thread.
    with pytest.raises(WouldBlock):
        sr.read_into(content, 4 * CHUNK_SIZE, buf, nowait=True)
    sr.read_into(content, 4 * CHUNK_SIZE, buf)
    assert bytes(buf) == data[4] + data[5]
    sr.read_into(content, 4 * CHUNK_SIZE, buf, nowait=True)  # checked: from the cache at once
    assert bytes(buf) == data[4] + data[5]
    # Changed in place (a new mtime and ctime): checked again, so the damage is seen.
    flip(sr.path, content.chunk_id(5))
    sr.read_into(content, 4 * CHUNK_SIZE + 100, buf[:1000])  # chunk 4 only: fine
    with pytest.raises(StorageError, match=f"chunk {content.chunk_id(5):016x} is damaged"):
        sr.read_into(content, 5 * CHUNK_SIZE + 100, buf[:1000])
    assert sr.read(content, 4 * CHUNK_SIZE, CHUNK_SIZE) == data[4]
    assert sr.read(content, 6 * CHUNK_SIZE, 10 * CHUNK_SIZE) == b"".join(data[6:16])
    with pytest.raises(StorageError):
        sr.read(content, 0, 40 * CHUNK_SIZE)  # a run through it fails whole
    with pytest.raises(StorageError):
        sr.read_chunk(content.chunk_id(5))
    with pytest.raises(WouldBlock):
        sr.read_into(content, 5 * CHUNK_SIZE, buf[:10], nowait=True)  # never marked checked


def test_missing_and_truncated_packs_and_chunks_without_a_digest(sr: LocalSR) -> None:
    uuid, data = write_disk(sr)
    _record, content = sr.state(uuid)
    path = sr._pack_path(pack_of(content.chunk_id(0)))
    assert sr.verify().chunks == 40
    # A chunk nothing records a digest for (two writers stored it at once, and
    # the other copy was collected): counted apart, not damage.
    sr.db.execute("DELETE FROM chunks WHERE id = ?", (content.chunk_id(7),))
    report = sr.verify()
    assert report.unverifiable == 1 and report.damaged == []
    assert sr.read(content, 7 * CHUNK_SIZE, CHUNK_SIZE) == data[7]
    os.truncate(path, 38 * CHUNK_SIZE + 5)
    report = sr.verify([uuid])
    assert [(d.chunk_id, d.reason) for d in report.damaged] == [
        (content.chunk_id(38), "missing"),
        (content.chunk_id(39), "missing"),
    ]
    assert report.damaged[0].uses[0].ranges == [(38 * CHUNK_SIZE, 39 * CHUNK_SIZE)]
    with pytest.raises(StorageError, match="truncated"):
        sr.read(content, 39 * CHUNK_SIZE, 10)
    path.unlink()
    report = sr.verify()
    assert len(report.damaged) == 40 and {d.reason for d in report.damaged} == {"missing"}
    assert report.packs == 0
    with pytest.raises(StorageError, match="missing"):
        LocalSR(sr.path).read(content, 0, 10)


def test_chunks_the_disk_cannot_read_are_named(
    sr: LocalSR, monkeypatch: pytest.MonkeyPatch
) -> None:
    uuid, _data = write_disk(sr)
    _record, content = sr.state(uuid)
    bad = slot_offset(content.chunk_id(9))
    real = os.preadv

    def failing(fd: int, buffers: list[Any], offset: int, *flags: int) -> int:
        length = sum(len(b) for b in buffers)
        if offset <= bad < offset + length:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", failing)
    report = sr.verify()
    assert [(d.chunk_id, d.reason) for d in report.damaged] == [(content.chunk_id(9), "unreadable")]
    assert report.chunks == 40 and report.damaged[0].uses[0].uuid == uuid


def test_verify_leaves_collected_packs_alone(sr: LocalSR) -> None:
    uuid, _data = write_disk(sr)
    sr.destroy(uuid)
    assert sr.verify().chunks == 40  # stored, even if unused: gc has not run
    assert sr.garbage_collect()[0] == 1
    report = sr.verify()
    assert report.chunks == 0 and report.damaged == []


# -- through the mount ------------------------------------------------------------------


def read_fails_with_eio(path: Path, offset: int, length: int) -> None:
    with pytest.raises(OSError) as failure:
        pread(path, offset, length)
    assert failure.value.errno == errno.EIO


@needs_fuse
def test_reads_of_a_damaged_chunk_fail_with_eio_through_the_mount(
    cli: Cli, sr_path: Path, mount_factory: Any, tmp_path: Path
) -> None:
    mnt: Mount = mount_factory()
    vdi = cli("vdi", "create", "disk", "--size", "8M")
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    raw = mnt.vdi(vdi) / "raw.img"
    data = os.urandom(4 * MiB)
    fill(raw, 0, data)
    snap = cli("vdi", "snapshot", vdi, "--name", "nightly")
    assert wait_for(lambda: mnt.vdi(snap).exists(), 3)
    damaged_at = DAMAGED * CHUNK_SIZE
    # The daemon reads the chunk, and checks it, before the damage.
    assert pread(raw, damaged_at, CHUNK_SIZE) == data[damaged_at : damaged_at + CHUNK_SIZE]
    chunk = chunk_at(sr_path, snap, damaged_at)
    assert chunk_at(sr_path, vdi, damaged_at) == chunk
    flip(sr_path, chunk, at=4096 + 7)

    def check(mount: Mount) -> None:
        raw = mount.vdi(vdi) / "raw.img"
        snap_raw = mount.vdi(snap) / "raw.img"
        for path in (snap_raw, raw):
            read_fails_with_eio(path, damaged_at, CHUNK_SIZE)
            read_fails_with_eio(path, damaged_at + 4096, 512)  # the damaged sector itself
            read_fails_with_eio(path, damaged_at + 60000, 100)  # elsewhere in that chunk
            # A read that starts before it: EIO, or (from the page cache, as
            # read(2) does) the good bytes up to the damaged chunk, short.
            start = damaged_at - CHUNK_SIZE
            try:
                got = pread(path, start, 2 * CHUNK_SIZE)
            except OSError as failure:
                assert failure.errno == errno.EIO
            else:
                assert got == data[start:damaged_at], len(got)
            # Other ranges still read, the chunks on either side included.
            assert pread(path, 0, damaged_at) == data[:damaged_at]
            after = damaged_at + CHUNK_SIZE
            assert pread(path, after, 4 * MiB - after) == data[after:]
            assert pread(path, 4 * MiB, MiB) == bytes(MiB)
        # Exports of the disk fail rather than carry wrong bytes.
        export = cli.run("export", snap, str(tmp_path / "out.raw"), check=False)
        assert export.returncode == 11 and f"{chunk:016x} is damaged" in export.stderr
        log = mount.log.read_text()
        assert f"chunk {chunk:016x} (pack " in log and "is damaged" in log

    # The running daemon had checked it: the pack's changed mtime and ctime
    # make it check again.
    check(mnt)
    assert mnt.stop() == 0
    check(mount_factory(name="again"))  # a fresh process

    code, report, _ = verify(cli)
    assert code == 11
    (damaged,) = report["damaged"]
    assert damaged["chunk"] == f"{chunk:016x}"
    assert {use["uuid"] for use in damaged["used_by"]} == {vdi, snap}


@needs_fuse
def test_a_clean_disk_reads_through_the_mount_after_verify(
    cli: Cli, sr_path: Path, mnt: Mount, tmp_path: Path
) -> None:
    vdi, snap, data, later = make_disk(cli, tmp_path)
    assert wait_for(lambda: mnt.vdi(snap).exists(), 3)
    for uuid in (vdi, snap):
        chunk = chunk_at(sr_path, uuid, 0)
        evict(pack_path(sr_path, chunk))  # read from the disk, checked on the way
    assert pread(mnt.vdi(snap) / "raw.img", 0, 16 * MiB) == data
    assert pread(mnt.vdi(vdi) / "raw.img", 0, 16 * MiB) == later
    assert cli.run("sr", "verify").returncode == 0
