"""Writing into the embedded SR: chunks into new packs, block maps in one transaction."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import secrets
import sqlite3
import struct
import time
import uuid as uuidlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from vdifs.errors import Busy, InvalidArgument, NoSpace, ReadOnly
from vdifs.model import CHUNK_SIZE, CHUNKS_PER_BLOCK, VdiRecord, check_name, utc_iso
from vdifs.storage.local.blockmap import ROW_BYTES, ZERO_ROW, row_mask
from vdifs.storage.local.layout import (
    IOV_MAX,
    PACK_SLOTS,
    check_size,
    chunk_digest,
    is_zero_chunk,
    make_chunk_id,
    pack_of,
    slot_offset,
)

if TYPE_CHECKING:
    from vdifs.storage.local.sr import LocalSR


class ChunkWriter:
    """Stages chunks for one VDI and applies them in one transaction.

    ``write_chunk`` may be called in any order; the last write of a chunk
    wins.  Data goes to a new pack as it arrives (memory stays bounded); the
    block map changes only in :meth:`commit`.  With ``replace=True`` the
    commit makes every chunk that was not written zero (a full image).
    """

    def __init__(
        self,
        sr: LocalSR,
        uuid: str | None,
        *,
        replace: bool,
        new_vdi: tuple[str, int] | None = None,
        direct: bool = False,
    ) -> None:
        self.sr = sr
        self.replace = replace
        # Bulk imports write packs with O_DIRECT: data goes to the device without
        # first filling (and later flushing) the page cache, which made writes
        # and the commit's fsync the slowest part of an import (docs/performance.md).
        self._direct: _DirectWrites | None = _DirectWrites() if direct else None
        self.new_vdi = new_vdi
        if new_vdi is not None:
            # A new VDI appears only when the commit does: never half-made.
            name, size = new_vdi
            check_name(name)
            self.uuid = str(uuidlib.uuid4())
            self.virtual_size = check_size(size)
            self.expect_generation: int | None = None
        else:
            assert uuid is not None
            record = sr.get_vdi(uuid)
            if record.is_a_snapshot:
                raise ReadOnly(f"VDI {uuid} is a snapshot and cannot change")
            self.uuid = uuid
            self.virtual_size = record.virtual_size
            self.expect_generation = None
        self.import_identity: bytes | None = None
        self.import_name: str | None = None
        self._rows: dict[int, bytearray] = {}
        self._written: dict[int, int] = {}  # block -> mask of chunks written
        self._new_digests = _NewDigests(sr.staging_dir)
        self._reused_packs: set[int] = set()  # packs of existing chunks this write shares
        self._packs: list[tuple[int, int, int]] = []  # (pack, fd, slots used)
        self.chunks_written = 0
        self.notes: list[str] = []
        self.bytes_stored = 0
        self._done = False

    def _open_pack(self) -> None:
        while True:
            pack = secrets.randbelow((1 << 31) - 1) + 1
            if self.sr.db.execute("SELECT 1 FROM packs WHERE id = ?", (pack,)).fetchone():
                continue  # in use, or retired by garbage collection: never reused
            # Locked before it has its name: remove_stale_packs never sees it unlocked.
            final = self.sr._pack_path(pack)
            temporary = final.with_name(final.name + ".new")
            try:
                fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                os.link(temporary, final)
            except FileExistsError:
                os.close(fd)
                continue
            finally:
                os.unlink(temporary)
            self._packs.append((pack, fd, 0))
            if self._direct is not None and not self._direct.open(pack, final):
                self._direct = None  # the file system has no O_DIRECT: write through the cache
            return

    def grow(self, size: int) -> None:
        """Make the disk ``size`` bytes long at commit (XAPI's VDI.resize: grow only).

        The new bytes read as zeros unless this writer writes them: the rest of
        the chunk that held the old end is zeroed, whatever it stored past it.
        """
        size = check_size(size)
        old = self.virtual_size
        if size < old:
            raise InvalidArgument(f"VDI {self.uuid} has {old} bytes: a disk can only grow")
        tail = old % CHUNK_SIZE
        if size > old and tail and self.new_vdi is None:
            chunk = old // CHUNK_SIZE
            current = self.staged_chunk(chunk)
            if current is None:
                stored = self.sr.block_map(self.sr.get_vdi(self.uuid)).chunk_id(chunk)
                current = self.sr.read_chunk(stored) if stored else None
            if current is not None and current[tail:] != bytes(CHUNK_SIZE - tail):
                self.write_chunk(chunk, bytes(current[:tail]))
        self.virtual_size = size

    def write_chunk(self, chunk: int, data: bytes | bytearray | memoryview) -> None:
        """Set one chunk.  ``data`` is at most CHUNK_SIZE bytes (zero-padded)."""
        if len(data) != CHUNK_SIZE:
            data = bytes(data).ljust(CHUNK_SIZE, b"\0")
        self.write_chunks(chunk, data)

    def write_chunks(self, first: int, data: bytes | bytearray | memoryview) -> None:
        """Set the whole chunks ``data`` holds, from chunk ``first`` on.

        The import path: a run is hashed, looked up in one query and written
        with one ``pwritev`` per run of new slots, not chunk by chunk.
        """
        view = memoryview(data).cast("B")
        count, rest = divmod(len(view), CHUNK_SIZE)
        if rest:
            raise InvalidArgument("write_chunks takes whole chunks")
        if first < 0 or (first + count - 1) * CHUNK_SIZE >= self.virtual_size:
            raise InvalidArgument(f"chunks {first}..{first + count - 1} are outside the disk")
        pieces = [view[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE] for i in range(count)]
        data_at = [i for i, piece in enumerate(pieces) if not is_zero_chunk(piece)]
        ids = [0] * count
        stored = self._store([pieces[i] for i in data_at])
        for i, chunk_id in zip(data_at, stored, strict=True):
            ids[i] = chunk_id
        i = 0
        while i < count:  # block by block: one slice of the row each
            block, c = divmod(first + i, CHUNKS_PER_BLOCK)
            n = min(count - i, CHUNKS_PER_BLOCK - c)
            row = self._rows.get(block)
            if row is None:
                row = self._rows[block] = bytearray(ROW_BYTES)
            row[c * 8 : (c + n) * 8] = struct.pack(f"<{n}Q", *ids[i : i + n])
            self._written[block] = self._written.get(block, 0) | ((1 << n) - 1) << c
            i += n
        self.chunks_written += count

    def _store(self, pieces: list[memoryview]) -> list[int]:
        """Chunk ids for non-zero chunks: known content reused, the rest written."""
        digests = [chunk_digest(piece) for piece in pieces]
        known = self._new_digests.lookup(set(digests))
        unknown = {d for d in digests if d not in known}
        if unknown:
            marks = ",".join("?" * len(unknown))
            stored = {
                bytes(digest): int(chunk_id)
                for digest, chunk_id in self.sr.db.execute(
                    f"SELECT digest, id FROM chunks WHERE digest IN ({marks})", tuple(unknown)
                )
            }
            self._reused_packs.update(pack_of(chunk) for chunk in stored.values())
            known.update(stored)
        ids: list[int] = []
        new: list[tuple[int, memoryview]] = []  # (slot id, data), slots in increasing order
        added: list[tuple[bytes, int]] = []
        for piece, digest in zip(pieces, digests, strict=True):
            chunk_id = known.get(digest)
            if chunk_id is None:
                chunk_id = known[digest] = self._new_slot()
                added.append((digest, chunk_id))
                new.append((chunk_id, piece))
            ids.append(chunk_id)
        self._write_slots(new)
        self._new_digests.add(added)
        return ids

    def _new_slot(self) -> int:
        if not self._packs or self._packs[-1][2] >= PACK_SLOTS:
            self._open_pack()
        pack, fd, slots = self._packs[-1]
        self._packs[-1] = (pack, fd, slots + 1)
        return make_chunk_id(pack, slots)

    def _write_slots(self, new: list[tuple[int, memoryview]]) -> None:
        """One pwritev per run of consecutive slots (a run ends where a pack does)."""
        fds = {pack: fd for pack, fd, _slots in self._packs}
        start = 0
        while start < len(new):
            end = start + 1
            while end < len(new) and end - start < IOV_MAX and new[end][0] == new[end - 1][0] + 1:
                end += 1
            first = new[start][0]
            pieces = [piece for _id, piece in new[start:end]]
            offset = slot_offset(first)
            try:
                pack = pack_of(first)
                if self._direct is None or not self._direct.write(pack, pieces, offset):
                    os.pwritev(fds[pack], pieces, offset)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise NoSpace("the SR's file system is full") from None
                raise
            start = end
        self.bytes_stored += len(new) * CHUNK_SIZE

    def staged_chunk(self, chunk: int) -> bytes | None:
        """This writer's content for a chunk, or None if it has not written it."""
        block, c = divmod(chunk, CHUNKS_PER_BLOCK)
        if not self._written.get(block, 0) >> c & 1:
            return None
        chunk_id = int.from_bytes(self._rows[block][c * 8 : c * 8 + 8], "little")
        if self._direct is not None:
            self._direct.flush()  # the chunk may still be queued in a buffer
        for pack, fd, _slots in self._packs:
            if pack_of(chunk_id) == pack:
                return os.pread(fd, CHUNK_SIZE, slot_offset(chunk_id))
        return self.sr.read_chunk(chunk_id)

    def commit(self) -> VdiRecord:
        if self._done:
            raise RuntimeError("writer already finished")
        try:
            if self._direct is not None:
                self._direct.flush()
            for _pack, fd, _slots in self._packs:
                os.fsync(fd)
            now = time.time_ns()
            with self.sr.transaction() as db:
                if self.new_vdi is not None:
                    db.execute(
                        "INSERT INTO vdis(uuid, name_label, virtual_size, lineage, created,"
                        " changed_ns) VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            self.uuid,
                            self.new_vdi[0],
                            self.virtual_size,
                            self.uuid,
                            utc_iso(now),
                            now,
                        ),
                    )
                record = self.sr.get_vdi(self.uuid)
                row_id = self.sr.row_id(self.uuid)
                if record.is_a_snapshot:
                    raise ReadOnly(f"VDI {self.uuid} is a snapshot and cannot change")
                if (
                    self.expect_generation is not None
                    and record.generation != self.expect_generation
                ):
                    raise Busy(f"VDI {self.uuid} changed while the import ran; nothing applied")
                if self._reused_packs:
                    marks = ",".join("?" * len(self._reused_packs))
                    (live,) = db.execute(
                        f"SELECT COUNT(*) FROM packs WHERE slots >= 0 AND id IN ({marks})",
                        tuple(self._reused_packs),
                    ).fetchone()
                    if live != len(self._reused_packs):
                        # vdifs sr gc retired data this write deduplicated against.
                        raise Busy("garbage collection ran during this write: run it again")
                for pack, _fd, slots in self._packs:
                    db.execute("INSERT INTO packs(id, slots) VALUES (?, ?)", (pack, slots))
                db.executemany(
                    "INSERT OR IGNORE INTO chunks(digest, id) VALUES (?, ?)",
                    self._new_digests.items(),
                )
                if self.replace:
                    db.execute("DELETE FROM blocks WHERE vdi = ?", (row_id,))
                for block, new_row in self._rows.items():
                    written = self._written[block]
                    if self.replace:
                        row = bytes(new_row)
                    else:
                        old = db.execute(
                            "SELECT chunks FROM blocks WHERE vdi = ? AND idx = ?",
                            (row_id, block),
                        ).fetchone()
                        merged = bytearray(old[0] if old else ZERO_ROW)
                        for c in range(CHUNKS_PER_BLOCK):
                            if written >> c & 1:
                                merged[c * 8 : c * 8 + 8] = new_row[c * 8 : c * 8 + 8]
                        row = bytes(merged)
                    mask = row_mask(row)
                    if mask:
                        db.execute(
                            "INSERT OR REPLACE INTO blocks(vdi, idx, mask, chunks)"
                            " VALUES (?, ?, ?, ?)",
                            (row_id, block, mask, row),
                        )
                    else:
                        db.execute("DELETE FROM blocks WHERE vdi = ? AND idx = ?", (row_id, block))
                count = sum(
                    int(m).bit_count()
                    for (m,) in db.execute("SELECT mask FROM blocks WHERE vdi = ?", (row_id,))
                )
                if self.virtual_size < record.virtual_size:
                    raise Busy(f"VDI {self.uuid} was resized while this write ran")
                db.execute(
                    "UPDATE vdis SET generation = generation + 1, changed_ns = ?,"
                    " allocated_chunks = ?, virtual_size = ? WHERE id = ?",
                    (max(now, record.changed_ns + 1), count, self.virtual_size, row_id),
                )
                if self.import_name is not None:
                    db.execute(
                        "UPDATE vdis SET import_identity = ?, import_name = ?,"
                        " import_generation = generation WHERE id = ?",
                        (self.import_identity, self.import_name, row_id),
                    )
            result = self.sr.get_vdi(self.uuid)
        except BaseException:
            self.abort()
            raise
        self._close_packs(unlink=False)
        self._done = True
        return result

    def abort(self) -> None:
        """Drop everything staged; the VDI is as it was."""
        if not self._done:
            self._close_packs(unlink=True)
            self._done = True

    def _close_packs(self, *, unlink: bool) -> None:
        self._new_digests.close()
        if self._direct is not None:
            self._direct.close()
        for pack, fd, _slots in self._packs:
            if unlink:
                with contextlib.suppress(FileNotFoundError):
                    self.sr._pack_path(pack).unlink()
            os.close(fd)
        self._packs.clear()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class _NewDigests:
    """Digests of the chunks one writer stored: its own dedup, then its commit.

    In a dict up to :attr:`IN_MEMORY` entries (about 30 MB, for 16 GiB of new
    data); past that, in a scratch SQLite file under ``staging/``, so that
    importing a 2 TiB disk costs disk space, not gigabytes of memory.  The
    file is flocked while in use; :meth:`LocalSR.remove_stale_scratch`
    deletes what a crash left.
    """

    IN_MEMORY = 1 << 18

    def __init__(self, staging_dir: Path) -> None:
        self._staging_dir = staging_dir
        self._memory: dict[bytes, int] = {}
        self._db: sqlite3.Connection | None = None
        self._path: Path | None = None
        self._lock_fd = -1

    def lookup(self, digests: set[bytes]) -> dict[bytes, int]:
        found = {d: i for d in digests if (i := self._memory.get(d)) is not None}
        if self._db is not None and len(found) < len(digests):
            rest = tuple(digests - found.keys())
            marks = ",".join("?" * len(rest))
            rows = self._db.execute(f"SELECT digest, id FROM new WHERE digest IN ({marks})", rest)
            found.update((bytes(d), int(i)) for d, i in rows)
        return found

    def add(self, items: list[tuple[bytes, int]]) -> None:
        if self._db is None:
            self._memory.update(items)
            if len(self._memory) > self.IN_MEMORY:
                self._spill()
        else:
            self._db.executemany("INSERT INTO new(digest, id) VALUES (?, ?)", items)

    def _spill(self) -> None:
        self._path = self._staging_dir / f"{secrets.token_hex(8)}.digests"
        self._lock_fd = os.open(
            self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=OFF")  # scratch: a crash discards it whole
        db.execute("PRAGMA synchronous=OFF")
        db.execute("CREATE TABLE new(digest BLOB PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID")
        db.executemany("INSERT INTO new(digest, id) VALUES (?, ?)", self._memory.items())
        self._db = db
        self._memory = {}

    def items(self) -> Iterator[tuple[bytes, int]]:
        yield from self._memory.items()
        if self._db is not None:
            yield from self._db.execute("SELECT digest, id FROM new")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
            os.close(self._lock_fd)
            self._path = None
        self._memory = {}


class _DirectWrites:
    """O_DIRECT writes of new packs, behind the caller, through aligned buffers.

    O_DIRECT needs page-aligned memory; chunks arrive in arbitrary buffers,
    so they are copied into one of a few mmap'ed buffers (a memcpy, far
    cheaper than the page-cache allocation it avoids) and written from
    there by one background thread, while the caller hashes the next run.
    Consecutive slots of one pack fill a buffer across calls (an import
    stores a megabyte at a time, and a chunk stitched from two FUSE writes
    on its own): a buffer is written once full, or when the next slot does
    not follow it, or at :meth:`flush`.  So a 4 MiB ``pwrite`` and one
    thread hand-off per 64 chunks, not one per call.
    A failed write is raised by the next :meth:`write` or by :meth:`flush`.
    """

    BUFFER_CHUNKS = 64  # 4 MiB per buffer
    BUFFERS = 3

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}
        self._size = self.BUFFER_CHUNKS * CHUNK_SIZE
        self._buffers = [mmap.mmap(-1, self._size) for _ in range(self.BUFFERS)]
        self._busy: list[Future[None] | None] = [None] * self.BUFFERS
        self._next = 0
        # The buffer being filled: its index, descriptor, file offset and bytes held.
        self._fill: int | None = None
        self._fill_fd = -1
        self._fill_offset = 0
        self._fill_length = 0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vdifs-pack-writer")

    def open(self, pack: int, path: Path) -> bool:
        """A direct descriptor for a new pack; False where the file system has none."""
        try:
            self._fds[pack] = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.flush()  # what earlier packs queued must not be lost
            self.close()
            return False
        return True

    def write(self, pack: int, pieces: list[memoryview], offset: int) -> bool:
        """Queue a run of whole chunks at ``offset``; False if this pack takes no direct writes."""
        fd = self._fds.get(pack)
        if fd is None:
            return False
        for piece in pieces:
            if self._fill is not None and (
                self._fill_fd != fd
                or self._fill_offset + self._fill_length != offset
                or self._fill_length == self._size
            ):
                self._submit()
            if self._fill is None:
                slot = self._next
                self._next = (slot + 1) % self.BUFFERS
                self._wait(slot)
                self._fill, self._fill_fd, self._fill_offset = slot, fd, offset
                self._fill_length = 0
            at = self._fill_length
            self._buffers[self._fill][at : at + CHUNK_SIZE] = piece
            self._fill_length = at + CHUNK_SIZE
            offset += CHUNK_SIZE
        if self._fill is not None and self._fill_length == self._size:
            self._submit()
        return True

    def _submit(self) -> None:
        """Hand the buffer being filled to the writing thread."""
        slot = self._fill
        assert slot is not None
        self._fill = None
        self._busy[slot] = self._thread.submit(
            _write_exactly, self._fill_fd, self._buffers[slot], self._fill_length, self._fill_offset
        )

    def _wait(self, slot: int) -> None:
        busy = self._busy[slot]
        if busy is not None:
            self._busy[slot] = None
            busy.result()

    def flush(self) -> None:
        """Write what is queued and wait for it; raise the first error."""
        if self._fill is not None:
            self._submit()
        for slot in range(self.BUFFERS):
            self._wait(slot)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # aborting: the data is discarded anyway
            self.flush()
        self._thread.shutdown()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _write_exactly(fd: int, buffer: mmap.mmap, length: int, offset: int) -> None:
    with memoryview(buffer) as view:
        if os.pwrite(fd, view[:length], offset) != length:
            raise OSError(errno.ENOSPC, "short write to a pack")
