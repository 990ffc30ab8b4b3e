"""The embedded SR: SQLite metadata beside immutable, content-addressed chunk packs.

Layout of an SR directory::

    sr.db              metadata (WAL): VDIs, block maps, the chunk index, packs
    packs/<id>.pack    chunk objects, 64 KiB slots, written once then sealed
    staging/           import uploads in progress (see vdifs.imports)

A chunk id is ``pack << 32 | slot``: the id *is* the location, so reading a
chunk needs no lookup.  Identical chunks are stored once (``chunks`` maps a
SHA-256 prefix to an id), which is what makes a re-imported block keep its
identity and clones of a golden image free.  All-zero chunks are never stored
(id 0).

Every mutation is one SQLite transaction.  Chunk data is written and fsynced
to a new pack *before* the transaction that references it commits; a crash
leaves at worst an unreferenced pack file, removed at the next open.  Packs
being written are flock()ed so that a concurrent process never removes them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import secrets
import sqlite3
import threading
import time
import uuid as uuidlib
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vdifs.errors import (
    InvalidArgument,
    NotFound,
    ReadOnly,
    StorageError,
)
from vdifs.model import CHUNK_SIZE, CHUNKS_PER_BLOCK, VdiRecord, check_name, utc_iso
from vdifs.storage import digests
from vdifs.storage.backend import Capabilities, ContentMap, WouldBlock, deletion_order
from vdifs.storage.importlog import IMPORTS_TABLE, SqliteImportLog, write_transaction
from vdifs.storage.local.blockmap import BlockMap
from vdifs.storage.local.layout import (
    _LATE_INDEXES,
    _SCHEMA,
    ADDED_COLUMNS,
    PACK_SLOTS,
    SCHEMA_VERSION,
    SLOT_MASK,
    STALE_PACK_SECONDS,
    ZERO_CHUNK,
    check_size,
    chunk_digest,
    make_chunk_id,
    pack_of,
    slot_of,
    slot_offset,
)
from vdifs.storage.local.vms import Vms
from vdifs.storage.local.writer import ChunkWriter
from vdifs.storage.locks import import_lock_fd

log = logging.getLogger(__name__)


def _own(content: ContentMap) -> BlockMap:
    """A content map this backend made (a map is only ever handed back to its backend)."""
    if not isinstance(content, BlockMap):
        raise TypeError(f"not a map of the embedded SR: {content!r}")
    return content


def default_sr_path() -> Path:
    env = os.environ.get("VDIFS_SR")
    if env:
        return Path(env)
    return Path.home() / ".local/share/vdifs/sr"


class _FdPin:
    """Open descriptors holding flocks: pack pins (shared) or an import lock."""

    def __init__(self, fds: list[int]) -> None:
        self._fds = fds

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class _PackFile:
    """An open pack descriptor; closed when the last user drops it."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


class _CheckedSlots:
    """The slots of one pack this process has checked against their digests.

    One bit per 64 KiB slot (2 KiB for a full pack), for one version of the
    file: ``identity`` is its (inode, size, mtime, ctime) when the bits were
    set.
    """

    __slots__ = ("bits", "identity")

    def __init__(self, identity: tuple[int, int, int, int], slots: int) -> None:
        self.identity = identity
        self.bits = bytearray((slots + 7) // 8)

    def has(self, slot: int) -> bool:
        byte = slot >> 3
        return byte < len(self.bits) and bool(self.bits[byte] >> (slot & 7) & 1)

    def covers(self, first: int, last: int) -> bool:
        """Whether every slot of ``first..last`` was checked."""
        bits = self.bits
        byte, end = first >> 3, last >> 3
        if end >= len(bits):
            return False
        mask = (1 << (last - first + 1)) - 1
        if byte == end:  # a read of up to 8 chunks, most often
            return bits[byte] >> (first & 7) & mask == mask
        return int.from_bytes(bits[byte : end + 1], "little") >> (first & 7) & mask == mask

    def mark(self, slots: Iterable[int]) -> None:
        # Not locked: two threads marking one byte at once may lose a bit,
        # which only costs checking that chunk again.
        bits = self.bits
        for slot in slots:
            if slot >> 3 < len(bits):
                bits[slot >> 3] |= 1 << (slot & 7)


@dataclass
class ChunkUse:
    """Where one VDI or snapshot holds a chunk: byte ranges ``[start, end)`` of the disk."""

    uuid: str
    name_label: str
    is_a_snapshot: bool
    ranges: list[tuple[int, int]]

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name_label": self.name_label,
            "is_a_snapshot": self.is_a_snapshot,
            "ranges": [[start, end] for start, end in self.ranges],
        }


@dataclass
class DamagedChunk:
    """A stored chunk that does not hold what its digest says.

    ``reason``: ``corrupt`` (read, but its SHA-256 differs), ``unreadable``
    (the disk answered EIO), ``missing`` (past the end of its pack, or the
    pack file is gone).
    """

    chunk_id: int
    reason: str
    uses: list[ChunkUse] = field(default_factory=list)

    @property
    def pack(self) -> int:
        return pack_of(self.chunk_id)

    @property
    def offset(self) -> int:
        return slot_offset(self.chunk_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "chunk": f"{self.chunk_id:016x}",
            "pack": f"{self.pack:08x}",
            "offset": self.offset,
            "reason": self.reason,
            "used_by": [use.to_json() for use in self.uses],
        }


@dataclass
class VerifyReport:
    """What :meth:`LocalSR.verify` checked and found."""

    packs: int = 0
    chunks: int = 0
    bytes: int = 0
    unverifiable: int = 0  # chunks with no recorded digest (see _read_checked)
    seconds: float = 0.0
    damaged: list[DamagedChunk] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "packs": self.packs,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "unverifiable": self.unverifiable,
            "seconds": round(self.seconds, 3),
            "damaged": [chunk.to_json() for chunk in self.damaged],
        }


class LocalSR:
    """The embedded SR in one directory (a :class:`vdifs.storage.backend.Backend`)."""

    FD_CACHE = 512
    VERIFY_RUN = 128  # chunks per read of a scrub: 8 MiB
    VERIFY_GAP = 16  # a scrub of some VDIs reads through this many unused slots rather than seek
    capabilities = Capabilities()
    # Check each chunk against its digest the first time this process reads
    # it (see _read_checked); off only to measure what it costs.
    verify_reads = True

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.vms = Vms(self)
        self.imports = SqliteImportLog(self, "the process running it stopped; nothing was applied")
        self.packs_dir = self.path / "packs"
        self.staging_dir = self.path / "staging"
        for d in (self.path, self.packs_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._local = threading.local()
        self._commits = 0
        self._fds: dict[int, _PackFile] = {}
        self._fd_lock = threading.Lock()
        self._checked: dict[int, _CheckedSlots] = {}  # pack -> slots read and checked
        self._damage_logged: set[int] = set()
        db = self.db
        for statement in (_SCHEMA + IMPORTS_TABLE + digests.DIGESTS_TABLE).strip().split(";\n"):
            if statement.strip():
                db.execute(statement)
        db.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES('schema', ?)", (str(SCHEMA_VERSION),)
        )
        self._add_missing_columns()
        for statement in _LATE_INDEXES:
            db.execute(statement)
        self.remove_stale_packs()
        self.remove_stale_scratch()
        self.remove_stale_uploads()

    @property
    def description(self) -> str:
        return f"local:{self.path}"

    def _add_missing_columns(self) -> None:
        """Bring an SR made by an earlier vdifs up to this schema (additive only)."""
        with self.transaction() as db:
            for table, columns in ADDED_COLUMNS.items():
                present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns.items():
                    if name not in present:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    # -- connections ---------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections are not shared)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path / "sr.db", timeout=30, isolation_level=None, check_same_thread=True
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a commit that returned survives a crash
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or none of it.

        Nested uses join the outer transaction (a VM snapshot is several VDI
        snapshots committed together).
        """
        outer = not self.db.in_transaction
        with write_transaction(self.db) as db:
            yield db
        if outer:
            self._commits += 1

    def data_version(self) -> int:
        """Changes whenever anyone commits: SQLite's counter of other connections'
        commits (cheap change polling), plus this object's own."""
        others = int(self.db.execute("PRAGMA data_version").fetchone()[0])
        return others << 32 | self._commits & 0xFFFFFFFF

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._fd_lock:
            self._fds.clear()

    # -- records -------------------------------------------------------------

    # The vdis columns a VdiRecord is made of, named as its fields.
    _FIELDS = (
        "uuid", "name_label", "name_description", "virtual_size", "is_a_snapshot",
        "snapshot_of", "snapshot_time", "lineage", "created", "changed_ns", "generation",
        "allocated_chunks", "parent", "current", "data_destroyed",
    )  # fmt: skip
    _COLUMNS = ", ".join(_FIELDS)

    def _record(
        self, row: tuple[Any, ...], snapshots: tuple[str, ...], children: tuple[str, ...] = ()
    ) -> VdiRecord:
        fields = dict(zip(self._FIELDS, row, strict=True))
        fields["is_a_snapshot"] = bool(fields["is_a_snapshot"])
        fields["data_destroyed"] = bool(fields["data_destroyed"])
        return VdiRecord(**fields, snapshots=snapshots, children=children)

    def list_vdis(self) -> list[VdiRecord]:
        rows = self.db.execute(f"SELECT {self._COLUMNS} FROM vdis ORDER BY created, uuid")
        records = [self._record(row, ()) for row in rows]
        snaps: dict[str, list[str]] = {}
        children: dict[str, list[str]] = {}
        for r in records:
            if r.snapshot_of:
                snaps.setdefault(r.snapshot_of, []).append(r.uuid)
            if r.parent:
                children.setdefault(r.parent, []).append(r.uuid)
        return [
            replace(
                r, snapshots=tuple(snaps.get(r.uuid, ())), children=tuple(children.get(r.uuid, ()))
            )
            for r in records
        ]

    def get_vdi(self, uuid: str) -> VdiRecord:
        db = self.db
        row = db.execute(f"SELECT {self._COLUMNS} FROM vdis WHERE uuid = ?", (uuid,)).fetchone()
        if row is None:
            raise NotFound(f"no VDI with uuid {uuid}")
        snaps = self.related("vdis", "snapshot_of", uuid)
        return self._record(row, snaps, self.related("vdis", "parent", uuid))

    _TREE_LINKS = frozenset({("vdis", "snapshot_of"), ("vdis", "parent"), ("vms", "snapshot_of"),
                             ("vms", "parent")})  # fmt: skip

    def related(self, table: str, column: str, uuid: str) -> tuple[str, ...]:
        """uuids of VDIs or VMs whose ``snapshot_of`` or ``parent`` is ``uuid``, oldest first."""
        if (table, column) not in self._TREE_LINKS:
            raise ValueError(f"no tree link {table}.{column}")
        rows = self.db.execute(
            f"SELECT uuid FROM {table} WHERE {column} = ? ORDER BY created, uuid", (uuid,)
        )
        return tuple(r[0] for r in rows)

    def descendants(self, uuid: str, table: str = "vdis") -> list[str]:
        """Snapshots below one in its tree, deepest first (a safe delete order)."""
        out: list[str] = []
        for child in self.related(table, "parent", uuid):
            out += self.descendants(child, table)
            out.append(child)
        return out

    def block_map(self, vdi: VdiRecord) -> BlockMap:
        rows = self.db.execute(
            "SELECT idx, mask, chunks FROM blocks WHERE vdi = (SELECT id FROM vdis WHERE uuid = ?)"
            " ORDER BY idx",
            (vdi.uuid,),
        )
        return BlockMap.from_rows(vdi.virtual_size, iter(rows))

    def row_id(self, uuid: str) -> int:
        """The VDI's row in this SR's tables (never leaves storage/local)."""
        row = self.db.execute("SELECT id FROM vdis WHERE uuid = ?", (uuid,)).fetchone()
        if row is None:
            raise NotFound(f"no VDI with uuid {uuid}")
        return int(row[0])

    def state(self, uuid: str, known: VdiRecord | None = None) -> tuple[VdiRecord, BlockMap]:
        """A VDI record and its block map, read in one consistent transaction.

        ``known`` is a record the caller holds: if the VDI is still at its
        generation, it is returned as is (saving the record's queries).
        """
        db = self.db
        db.execute("BEGIN")
        try:
            record = known
            if known is not None:
                row = db.execute("SELECT generation FROM vdis WHERE uuid = ?", (uuid,)).fetchone()
                if row is None or row[0] != known.generation:
                    record = None
            if record is None:
                record = self.get_vdi(uuid)
            return record, self.block_map(record)
        finally:
            db.execute("COMMIT")

    # -- mutations on records ------------------------------------------------

    def create_vdi(self, name: str, size: int, description: str = "") -> VdiRecord:
        size = check_size(size)
        check_name(name)
        uuid = str(uuidlib.uuid4())
        now = time.time_ns()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO vdis(uuid, name_label, name_description, virtual_size, lineage,"
                " created, changed_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (uuid, name, description, size, uuid, utc_iso(now), now),
            )
        return self.get_vdi(uuid)

    def _copy(
        self, source_uuid: str, name: str | None, *, snapshot: bool, description: str | None = None
    ) -> VdiRecord:
        uuid = str(uuidlib.uuid4())
        now = time.time_ns()
        with self.transaction() as db:
            src = self.get_vdi(source_uuid)
            if src.data_destroyed:
                raise InvalidArgument(
                    f"snapshot {src.uuid} is a checkpoint: its data was destroyed"
                )
            label = name if name is not None else src.name_label
            check_name(label)
            # A snapshot hangs under the VDI's current snapshot and becomes current.
            parent = src.current if snapshot else None
            cur = db.execute(
                "INSERT INTO vdis(uuid, name_label, name_description, virtual_size,"
                " is_a_snapshot, snapshot_of, snapshot_time, lineage, created, changed_ns,"
                " allocated_chunks, parent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    uuid,
                    label,
                    src.name_description if description is None else description,
                    src.virtual_size,
                    int(snapshot),
                    src.uuid if snapshot else None,
                    utc_iso(now) if snapshot else None,
                    src.lineage,
                    utc_iso(now),
                    now,
                    src.allocated_chunks,
                    parent,
                ),
            )
            db.execute(
                "INSERT INTO blocks(vdi, idx, mask, chunks)"
                " SELECT ?, idx, mask, chunks FROM blocks WHERE vdi = ?",
                (cur.lastrowid, self.row_id(src.uuid)),
            )
            if snapshot:
                db.execute("UPDATE vdis SET current = ? WHERE uuid = ?", (uuid, src.uuid))
        return self.get_vdi(uuid)

    def snapshot(
        self, uuid: str, name: str | None = None, description: str | None = None
    ) -> VdiRecord:
        """A read-only point in time; copies the block map, never data."""
        return self._copy(uuid, name, snapshot=True, description=description)

    def clone(self, uuid: str, name: str | None = None) -> VdiRecord:
        """A writable copy; copies the block map, never data."""
        return self._copy(uuid, name, snapshot=False)

    def destroy(self, uuid: str) -> None:
        """Forget a VDI or snapshot.

        A VDI's snapshots stay, and so does the data they share.  A
        snapshot's children are re-parented to its parent, and a VDI whose
        current snapshot it was now descends from that parent.  No other
        VDI's bytes change: every block map is complete on its own.
        """
        with self.transaction() as db:
            record = self.get_vdi(uuid)
            db.execute("UPDATE vdis SET parent = ? WHERE parent = ?", (record.parent, uuid))
            db.execute("UPDATE vdis SET current = ? WHERE current = ?", (record.parent, uuid))
            db.execute("DELETE FROM blocks WHERE vdi = ?", (self.row_id(uuid),))
            db.execute("DELETE FROM vdis WHERE uuid = ?", (uuid,))
            db.execute("DELETE FROM vm_disks WHERE vdi = ?", (uuid,))
            digests.forget(db, uuid)

    def delete_snapshot(
        self, uuid: str, *, children: bool = False, only_children: bool = False
    ) -> list[str]:
        """Delete a snapshot (default: it alone), or its subtree, or only its subtree."""
        with self.transaction():
            record = self.get_vdi(uuid)
            if not record.is_a_snapshot:
                raise InvalidArgument(f"{uuid} is not a snapshot (use vdifs vdi destroy)")
            below = self.descendants(uuid) if children or only_children else []
            doomed = deletion_order(uuid, below, children=children, only_children=only_children)
            for victim in doomed:
                self.destroy(victim)
        return doomed

    def data_destroy(self, uuid: str) -> VdiRecord:
        """Make a snapshot a checkpoint: its data may go, deltas from it still work.

        The block map (chunk identities) is kept because a delta compares
        identities; the chunks it alone used are freed by garbage collection.
        """
        with self.transaction() as db:
            record = self.get_vdi(uuid)
            if not record.is_a_snapshot:
                raise InvalidArgument(
                    f"{uuid} is not a snapshot: only snapshots become checkpoints"
                )
            db.execute(
                "UPDATE vdis SET data_destroyed = 1, allocated_chunks = 0 WHERE uuid = ?",
                (uuid,),
            )
        return self.get_vdi(uuid)

    def resize(self, uuid: str, size: int) -> VdiRecord:
        """Grow a VDI to ``size`` bytes (XAPI's ``VDI.resize``); its snapshots keep theirs.

        Sizes round up to whole sectors.  A smaller size is refused: shrinking
        would cut data off, and XAPI refuses it too.
        """
        record = self.get_vdi(uuid)
        if record.is_a_snapshot:
            raise ReadOnly(f"VDI {uuid} is a snapshot: it cannot be resized")
        size = check_size(size)
        if size < record.virtual_size:
            raise InvalidArgument(
                f"VDI {uuid} has {record.virtual_size} bytes: a disk can only grow, not shrink"
            )
        if size == record.virtual_size:
            return record
        with ChunkWriter(self, uuid, replace=False) as writer:
            writer.expect_generation = record.generation
            writer.grow(size)
            return writer.commit()

    def set_name(self, uuid: str, name: str) -> None:
        check_name(name)
        with self.transaction() as db:
            self.get_vdi(uuid)
            db.execute("UPDATE vdis SET name_label = ? WHERE uuid = ?", (name, uuid))

    # -- chunk data ------------------------------------------------------------

    def _pack_path(self, pack: int) -> Path:
        return self.packs_dir / f"{pack:08x}.pack"

    def _pack_file(self, pack: int) -> _PackFile:
        with self._fd_lock:
            pf = self._fds.get(pack)
            if pf is None:
                if len(self._fds) >= self.FD_CACHE:
                    self._fds.clear()  # users still holding one keep it open
                try:
                    pf = _PackFile(os.open(self._pack_path(pack), os.O_RDONLY | os.O_CLOEXEC))
                except FileNotFoundError:
                    raise StorageError(f"chunk pack {pack:08x} is missing from the SR") from None
                self._fds[pack] = pf
            return pf

    def read_chunk(self, chunk_id: int) -> bytes:
        buf = bytearray(CHUNK_SIZE)
        self.read_chunk_into(chunk_id, memoryview(buf))
        return bytes(buf)

    def read_chunk_into(
        self, chunk_id: int, buf: memoryview, skip: int = 0, *, nowait: bool = False
    ) -> None:
        """Fill ``buf`` from a stored chunk (and the chunks after it in its pack),
        starting ``skip`` bytes into it.

        With ``nowait`` the read only succeeds from the page cache
        (``RWF_NOWAIT``); otherwise :class:`WouldBlock` tells the caller to
        retry the whole request off the event loop.  A chunk this process has
        not yet checked against its digest is checked first (off the event
        loop: ``nowait`` raises :class:`WouldBlock`); a damaged one raises
        :class:`StorageError`, never hands out its bytes.
        """
        if chunk_id == 0:
            if len(buf) <= CHUNK_SIZE:
                buf[:] = ZERO_CHUNK[: len(buf)]
            else:
                buf[:] = bytes(len(buf))
            return
        pack = pack_of(chunk_id)
        pf = self._pack_file(pack)
        offset = slot_offset(chunk_id) + skip
        if self.verify_reads:
            first = slot_of(chunk_id) + skip // CHUNK_SIZE
            last = slot_of(chunk_id) + (skip + len(buf) - 1) // CHUNK_SIZE
            seen = self._checked_slots(pack, pf.fd)
            if not seen.covers(first, last):
                if nowait:
                    raise WouldBlock  # hashing is for a thread, not the event loop
                self._read_checked(pack, pf.fd, seen, first, last, buf, offset)
                return
        if nowait:
            try:
                got = os.preadv(pf.fd, [buf], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                raise WouldBlock from None
            if got != len(buf):
                raise WouldBlock
            return
        got = os.preadv(pf.fd, [buf], offset)
        if got != len(buf):
            raise StorageError(f"chunk {chunk_id:016x} is truncated in the SR")

    # -- checking chunks as they are read (docs/dev-storage.md, "Integrity") --

    def _checked_slots(self, pack: int, fd: int) -> _CheckedSlots:
        """The slots of a pack this process has checked, for the file as it is now.

        A pack changed in place since (its inode, size, mtime or ctime moved:
        copied back from a backup, edited) is checked again from scratch.
        """
        st = os.fstat(fd)
        identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        seen = self._checked.get(pack)
        if seen is None or seen.identity != identity:
            seen = self._checked[pack] = _CheckedSlots(identity, st.st_size // CHUNK_SIZE)
        return seen

    def _read_checked(
        self,
        pack: int,
        fd: int,
        seen: _CheckedSlots,
        first: int,
        last: int,
        buf: memoryview,
        offset: int,
    ) -> None:
        """Read whole slots ``first..last``, check those not yet checked, fill ``buf``."""
        start = first * CHUNK_SIZE
        length = (last - first + 1) * CHUNK_SIZE
        whole = offset == start and len(buf) == length
        data = buf if whole else memoryview(bytearray(length))
        got = os.preadv(fd, [data], start)
        if got != length:
            chunk = make_chunk_id(pack, first + got // CHUNK_SIZE)
            raise StorageError(f"chunk {chunk:016x} is truncated in the SR")
        todo = [slot for slot in range(first, last + 1) if not seen.has(slot)]
        expected = self._pack_digests(pack, todo[0], todo[-1]) if todo else {}
        damaged = []
        unknown: dict[bytes, int] = {}
        for slot in todo:
            at = (slot - first) * CHUNK_SIZE
            digest = chunk_digest(data[at : at + CHUNK_SIZE])
            want = expected.get(slot)
            if want is None:
                unknown[digest] = slot
            elif want != digest:
                damaged.append(slot)
        for digest in unknown.keys() - self._known_digests(unknown.keys()):
            # Stored twice by two concurrent writers and its twin since
            # collected, or damaged: nothing records what it should hold.
            chunk = make_chunk_id(pack, unknown[digest])
            log.info("chunk %016x has no recorded digest: not checked", chunk)
        seen.mark(slot for slot in todo if slot not in damaged)
        if damaged:
            chunk = make_chunk_id(pack, damaged[0])
            if len(self._damage_logged) < 10000 and chunk not in self._damage_logged:
                self._damage_logged.add(chunk)
                log.error(
                    "chunk %016x (pack %s, byte %d) is damaged: its content does not match"
                    " its digest; reads of it fail with EIO (run vdifs sr verify)",
                    chunk,
                    self._pack_path(pack),
                    slot_offset(chunk),
                )
            raise StorageError(
                f"chunk {chunk:016x} is damaged: its content does not match its digest"
                " (vdifs sr verify lists what it affects)"
            )
        if not whole:
            buf[:] = data[offset - start : offset - start + len(buf)]

    def _pack_digests(self, pack: int, first: int, last: int) -> dict[int, bytes]:
        """slot -> recorded digest, for the slots ``first..last`` of a pack."""
        rows = self.db.execute(
            "SELECT id, digest FROM chunks WHERE id >= ? AND id <= ?",
            (make_chunk_id(pack, first), make_chunk_id(pack, last)),
        )
        return {slot_of(chunk): bytes(digest) for chunk, digest in rows}

    def _known_digests(self, digests: Collection[bytes]) -> set[bytes]:
        """Those of ``digests`` that some stored chunk is recorded with."""
        found: set[bytes] = set()
        items = list(digests)
        for at in range(0, len(items), 500):
            part = items[at : at + 500]
            marks = ",".join("?" * len(part))
            rows = self.db.execute(f"SELECT digest FROM chunks WHERE digest IN ({marks})", part)
            found.update(bytes(d) for (d,) in rows)
        return found

    def read(self, block_map: BlockMap, offset: int, length: int) -> bytes:
        """Bytes of a disk through its block map, clamped at the end of the disk."""
        end = min(offset + length, block_map.virtual_size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        self.read_into(block_map, offset, memoryview(out))
        return bytes(out)

    def read_into(
        self, content: ContentMap, offset: int, buf: memoryview, *, nowait: bool = False
    ) -> None:
        """Fill ``buf`` with the disk's bytes at ``offset`` (inside the disk).

        Chunks stored one after the other in a pack (what a sequential write
        leaves) are read with one preadv per run, not one per chunk.
        """
        if not len(buf):
            return
        first = offset // CHUNK_SIZE
        last = (offset + len(buf) - 1) // CHUNK_SIZE
        ids = _own(content).chunk_ids(first, last - first + 1)
        pos = 0
        n = 0
        while n < len(ids):
            chunk_id = ids[n]
            skip = offset + pos - (first + n) * CHUNK_SIZE
            run = 1
            while n + run < len(ids) and ids[n + run] == (chunk_id + run if chunk_id else 0):
                run += 1
            take = min(run * CHUNK_SIZE - skip, len(buf) - pos)
            self.read_chunk_into(chunk_id, buf[pos : pos + take], skip, nowait=nowait)
            pos += take
            n += run

    def writer(
        self,
        uuid: str | None,
        *,
        replace: bool = False,
        new_vdi: tuple[str, int] | None = None,
        bulk: bool = False,
    ) -> ChunkWriter:
        # Bulk imports write packs with O_DIRECT (see ChunkWriter).
        return ChunkWriter(self, uuid, replace=replace, new_vdi=new_vdi, direct=bulk)

    def stored_digests(self, uuid: str, generation: int) -> dict[str, str]:
        return digests.stored(self.db, uuid, generation)

    def store_digests(self, uuid: str, generation: int, found: dict[str, str]) -> None:
        with self.transaction() as db:
            digests.store(db, uuid, generation, found)

    def last_import(self, uuid: str) -> tuple[bytes | None, str | None, int | None]:
        """(identity, file name, generation after it) of the last image imported."""
        row = self.db.execute(
            "SELECT import_identity, import_name, import_generation FROM vdis WHERE uuid = ?",
            (uuid,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no VDI with uuid {uuid}")
        return row[0], row[1], row[2]

    # -- housekeeping -----------------------------------------------------------

    def import_lock(self, key: str) -> _FdPin:
        """Hold the one-import-per-target lock (a flock in staging/); Busy if held."""
        return _FdPin([import_lock_fd(self.staging_dir, key)])

    def scratch_file(self) -> tuple[Path, int]:
        path = self.staging_dir / f"{secrets.token_hex(8)}.upload"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # marks it live for remove_stale_scratch elsewhere
        return path, fd

    def info(self) -> dict[str, Any]:
        packs = sum(f.stat().st_size for f in self.packs_dir.iterdir())
        return {"path": str(self.path), "data_bytes": packs}

    def space(self) -> tuple[int, int, int]:
        st = os.statvfs(self.path)
        return st.f_frsize, st.f_blocks, st.f_bavail

    def remove_stale_uploads(self) -> None:
        """Staged uploads of a daemon that died are garbage: nobody can finish them.

        Its imports still marked running are recorded as interrupted.
        """
        self.imports.mark_interrupted()
        for entry in os.scandir(self.staging_dir):
            if not entry.name.endswith(".upload"):
                continue
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            finally:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)

    def remove_stale_scratch(self) -> None:
        """Delete digest scratch files (``_NewDigests``) of writers that died."""
        now = time.time()
        for entry in os.scandir(self.staging_dir):
            if not entry.name.endswith(".digests"):
                continue
            try:
                if now - entry.stat().st_mtime < STALE_PACK_SECONDS:
                    continue  # perhaps being created: it is locked right after
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            except BlockingIOError:
                pass  # in use
            finally:
                os.close(fd)

    def remove_stale_packs(self) -> int:
        """Delete pack files no transaction committed and nobody is writing.

        A writer holds an flock on its pack from before the file has its name
        until after its commit, so a pack we can lock is finished: if the
        packs table (read *after* taking the lock) does not name it, it was
        left by a crash or an abort.
        """
        removed = 0
        now = time.time()
        for entry in os.scandir(self.packs_dir):
            stem, _, ext = entry.name.partition(".")
            if ext == "pack.new":
                # Another process may be naming it right now: it vanishes under us.
                with contextlib.suppress(FileNotFoundError):
                    if now - entry.stat().st_mtime > STALE_PACK_SECONDS:
                        os.unlink(entry.path)  # died between creating and naming it
                continue
            try:
                pack = int(stem, 16)
            except ValueError:
                continue
            if ext != "pack":
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                committed = self.db.execute("SELECT 1 FROM packs WHERE id = ?", (pack,))
                if committed.fetchone() is None:
                    os.unlink(entry.path)
                    removed += 1
            except BlockingIOError:
                pass  # a live writer holds it
            finally:
                os.close(fd)
        if removed:
            log.info("removed %d pack(s) left behind by an interrupted write", removed)
        return removed

    def keep_readable(self, content: ContentMap) -> _FdPin:
        """Keep the packs a state reads from garbage collection until released."""
        fds = []
        for pack in _own(content).packs:
            try:
                fd = os.open(self._pack_path(pack), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # already gone: reads of it will say so
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # being collected right now
                continue
            fds.append(fd)
        return _FdPin(fds)

    def garbage_collect(self) -> tuple[int, int]:
        """Remove packs no readable block map references.

        Returns ``(packs_removed, bytes_freed)``.  A pack is deleted only when
        none of its chunks is referenced by a VDI or snapshot whose data is
        kept (checkpoints keep identities, not data), and no open view pins
        it (a handle on a snapshot deleted since, in a mounted daemon).
        Partly used packs stay whole.  A deleted pack's id stays reserved
        (``slots = -1``) so that a checkpoint's old chunk ids can never name
        new data.
        """
        locked: dict[int, int] = {}
        try:
            for pack in self._unreferenced_packs():
                try:
                    fd = os.open(self._pack_path(pack), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    fd = -1
                if fd >= 0:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        os.close(fd)
                        continue  # pinned by an open view: next time
                locked[pack] = fd
            with self.transaction() as db:
                still_dead = self._unreferenced_packs() & locked.keys()
                for pack in still_dead:
                    db.execute("UPDATE packs SET slots = -1 WHERE id = ?", (pack,))
                    db.execute(
                        "DELETE FROM chunks WHERE id >= ? AND id < ?",
                        (make_chunk_id(pack, 0), make_chunk_id(pack + 1, 0)),
                    )
            freed = 0
            for pack in still_dead:
                path = self._pack_path(pack)
                with contextlib.suppress(FileNotFoundError):
                    freed += path.stat().st_size
                    path.unlink()
            with self._fd_lock:
                for pack in still_dead:
                    self._fds.pop(pack, None)
                    self._checked.pop(pack, None)
            return len(still_dead), freed
        finally:
            for fd in locked.values():
                if fd >= 0:
                    os.close(fd)

    def _unreferenced_packs(self) -> set[int]:
        live: set[int] = set()
        for (blob,) in self.db.execute(
            "SELECT chunks FROM blocks JOIN vdis ON vdis.id = blocks.vdi"
            " WHERE vdis.data_destroyed = 0"
        ):
            ids = array("Q", blob)
            live.update(pack_of(i) for i in ids if i)
        return {p for (p,) in self.db.execute("SELECT id FROM packs WHERE slots >= 0")} - live

    # -- scrub: vdifs sr verify --------------------------------------------------

    def verify(
        self,
        uuids: Sequence[str] = (),
        progress: Callable[[int, int], None] | None = None,
    ) -> VerifyReport:
        """Re-read stored chunks and check each against its digest.

        Every chunk of every pack, or only those the VDIs and snapshots
        ``uuids`` use; pack by pack in id order, slot order within a pack, in
        runs of up to :attr:`VERIFY_RUN` chunks through two reused buffers (the
        next run is read while the last one is hashed).
        Reads bypass the page cache where the file system allows (O_DIRECT):
        what is checked is what the disk holds, and the daemon's cache is left
        alone.  Each pack is flocked (shared) while read, so gc leaves it be.
        ``progress(done, total)`` is called in bytes.  Each damaged chunk
        comes with every VDI and snapshot (checkpoints aside) that uses it.
        """
        began = time.monotonic()
        plan = self._verify_plan(uuids)
        total = sum(len(slots) for _pack, slots, _live in plan) * CHUNK_SIZE
        report = VerifyReport()
        damaged: dict[int, str] = {}
        done = 0

        def advance(chunks: int) -> None:
            nonlocal done
            done += chunks * CHUNK_SIZE
            if progress is not None:
                progress(done, total)

        # Two page-aligned buffers (O_DIRECT needs it): one thread reads the
        # next run into one while this one hashes the other.
        buffers = [mmap.mmap(-1, self.VERIFY_RUN * CHUNK_SIZE) for _ in range(2)]
        reader = ThreadPoolExecutor(1, thread_name_prefix="vdifs-verify-reader")
        try:
            for pack, slots, live in plan:
                self._verify_pack(pack, slots, live, buffers, reader, damaged, report, advance)
        finally:
            reader.shutdown()
            for buffer in buffers:
                buffer.close()
        uses = self._chunk_uses(set(damaged))
        report.damaged = [
            DamagedChunk(chunk, reason, uses.get(chunk, []))
            for chunk, reason in sorted(damaged.items())
        ]
        report.seconds = time.monotonic() - began
        return report

    def _verify_plan(self, uuids: Sequence[str]) -> list[tuple[int, Sequence[int], bool]]:
        """(pack, its slots to check, live when planned), in pack order."""
        db = self.db
        db.execute("BEGIN")
        try:
            live = dict(db.execute("SELECT id, slots FROM packs WHERE slots >= 0").fetchall())
            if not uuids:
                return [(pack, range(live[pack]), True) for pack in sorted(live)]
            wanted: dict[int, bytearray] = {}
            for uuid in dict.fromkeys(uuids):
                if self.get_vdi(uuid).data_destroyed:
                    continue  # a checkpoint: its data is not kept, only its identities
                rows = db.execute("SELECT chunks FROM blocks WHERE vdi = ?", (self.row_id(uuid),))
                for (blob,) in rows:
                    for chunk in array("Q", blob):
                        if chunk:
                            bits = wanted.get(pack_of(chunk))
                            if bits is None:
                                bits = wanted[pack_of(chunk)] = bytearray(PACK_SLOTS // 8)
                            slot = chunk & SLOT_MASK
                            bits[slot >> 3] |= 1 << (slot & 7)
        finally:
            db.execute("COMMIT")
        plan: list[tuple[int, Sequence[int], bool]] = []
        for pack in sorted(wanted):
            bits = wanted[pack]
            slots = [s for s in range(PACK_SLOTS) if bits[s >> 3] >> (s & 7) & 1]
            plan.append((pack, slots, pack in live))
        return plan

    def _runs(self, slots: Sequence[int]) -> Iterator[tuple[int, int]]:
        """(first, last) spans covering ``slots`` (ascending): each one read."""
        i = 0
        while i < len(slots):
            first = last = slots[i]
            i += 1
            while (
                i < len(slots)
                and slots[i] - last <= self.VERIFY_GAP
                and slots[i] - first < self.VERIFY_RUN
            ):
                last = slots[i]
                i += 1
            yield first, last

    def _verify_pack(
        self,
        pack: int,
        slots: Sequence[int],
        live: bool,
        buffers: list[mmap.mmap],
        reader: ThreadPoolExecutor,
        damaged: dict[int, str],
        report: VerifyReport,
        advance: Callable[[int], None],
    ) -> None:
        try:
            fd = _open_unbuffered(self._pack_path(pack), buffers[0])
        except FileNotFoundError:
            if not live or not self._pack_retired(pack):
                for slot in slots:
                    damaged[make_chunk_id(pack, slot)] = "missing"
                report.chunks += len(slots)
                report.bytes += len(slots) * CHUNK_SIZE
            advance(len(slots))  # else collected since the plan was made: nothing to check
            return
        pending: Future[list[str | None]] | None = None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # gc skips a pack it cannot lock
            if live and self._pack_retired(pack):
                advance(len(slots))  # collected since the plan was made
                return
            report.packs += 1
            expected = self._pack_digests(pack, slots[0], slots[-1]) if slots else {}
            unknown: dict[bytes, list[int]] = {}
            wanted = set(slots) if isinstance(slots, list) else None
            runs = list(self._runs(slots))
            with memoryview(buffers[0]) as one, memoryview(buffers[1]) as two:
                views = (one, two)

                def read(k: int) -> list[str | None]:
                    first, last = runs[k]
                    return _scrub_read(fd, views[k % 2][: (last - first + 1) * CHUNK_SIZE], first)

                pending = reader.submit(read, 0) if runs else None
                for k, (first, _last) in enumerate(runs):
                    assert pending is not None
                    states = pending.result()
                    pending = reader.submit(read, k + 1) if k + 1 < len(runs) else None
                    view = views[k % 2]
                    checked = 0
                    for i, state in enumerate(states):
                        slot = first + i
                        if wanted is not None and slot not in wanted:
                            continue
                        checked += 1
                        if state is not None:
                            damaged[make_chunk_id(pack, slot)] = state
                            continue
                        digest = chunk_digest(view[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE])
                        want = expected.get(slot)
                        if want is None:
                            unknown.setdefault(digest, []).append(slot)
                        elif want != digest:
                            damaged[make_chunk_id(pack, slot)] = "corrupt"
                    report.chunks += checked
                    report.bytes += checked * CHUNK_SIZE
                    advance(checked)
            # A chunk without a recorded digest is fine if its content is
            # recorded under another id (two writers stored it at once).
            for digest in unknown.keys() - self._known_digests(unknown.keys()):
                report.unverifiable += len(unknown[digest])
        finally:
            if pending is not None:  # an error above: the read ahead must end first
                with contextlib.suppress(Exception):
                    pending.result()
            os.close(fd)

    def _pack_retired(self, pack: int) -> bool:
        row = self.db.execute("SELECT slots FROM packs WHERE id = ?", (pack,)).fetchone()
        return row is None or row[0] < 0

    def _chunk_uses(self, chunks: set[int]) -> dict[int, list[ChunkUse]]:
        """Every VDI and snapshot (checkpoints aside) holding one of ``chunks``, and where."""
        if not chunks:
            return {}
        db = self.db
        db.execute("BEGIN")
        try:
            vdis = {
                row[0]: row[1:]
                for row in db.execute(
                    "SELECT id, uuid, name_label, is_a_snapshot, virtual_size, created FROM vdis"
                    " WHERE data_destroyed = 0"
                )
            }
            keys = [chunk.to_bytes(8, "little") for chunk in chunks]
            found: dict[tuple[int, int], list[int]] = {}  # (chunk, vdi row) -> chunk indexes
            for vdi, idx, blob in db.execute("SELECT vdi, idx, chunks FROM blocks"):
                if vdi not in vdis or (len(keys) <= 64 and not any(k in blob for k in keys)):
                    continue
                for c, chunk in enumerate(array("Q", blob)):
                    if chunk in chunks:
                        found.setdefault((chunk, vdi), []).append(idx * CHUNKS_PER_BLOCK + c)
        finally:
            db.execute("COMMIT")
        out: dict[int, list[ChunkUse]] = {}
        order = sorted(found, key=lambda key: (key[0], vdis[key[1]][4], vdis[key[1]][0]))
        for chunk, vdi in order:
            uuid, name, is_a_snapshot, size, _created = vdis[vdi]
            ranges: list[tuple[int, int]] = []
            for index in sorted(found[chunk, vdi]):
                start, end = index * CHUNK_SIZE, min((index + 1) * CHUNK_SIZE, size)
                if ranges and ranges[-1][1] == start:
                    ranges[-1] = (ranges[-1][0], end)
                else:
                    ranges.append((start, end))
            out.setdefault(chunk, []).append(ChunkUse(uuid, name, bool(is_a_snapshot), ranges))
        return out


def _open_unbuffered(path: Path, probe: mmap.mmap) -> int:
    """A pack opened for a scrub: O_DIRECT where the file system takes it
    (a first read into the page-aligned ``probe`` tells), else buffered."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    else:
        try:
            with memoryview(probe) as view:
                os.preadv(fd, [view[:4096]], 0)
            return fd
        except OSError as exc:
            os.close(fd)
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _scrub_read(fd: int, view: memoryview, first: int) -> list[str | None]:
    """Read slots from ``first`` into ``view``; each slot's state: None when
    read whole, else ``missing`` (past the end) or ``unreadable`` (EIO).

    A run the disk fails is read again chunk by chunk, to tell which chunks
    are unreadable.
    """
    count = len(view) // CHUNK_SIZE
    try:
        got = os.preadv(fd, [view], first * CHUNK_SIZE)
    except OSError as exc:
        if exc.errno != errno.EIO:
            raise
    else:
        return [None if (i + 1) * CHUNK_SIZE <= got else "missing" for i in range(count)]
    states: list[str | None] = []
    for i in range(count):
        piece = view[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
        try:
            got = os.preadv(fd, [piece], (first + i) * CHUNK_SIZE)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            states.append("unreadable")
        else:
            states.append(None if got == CHUNK_SIZE else "missing")
    return states
