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
import functools
import hashlib
import logging
import mmap
import os
import secrets
import sqlite3
import threading
import time
import uuid as uuidlib
from array import array
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vdifs.errors import (
    Busy,
    InvalidArgument,
    NoSpace,
    NotFound,
    ReadOnly,
    StorageError,
)
from vdifs.formats.base import CHUNK_SIZE, CHUNKS_PER_BLOCK, SECTOR_SIZE
from vdifs.storage.blockmap import ROW_BYTES, ZERO_ROW, BlockMap, row_mask

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ZERO_CHUNK = bytes(CHUNK_SIZE)
PACK_SLOTS = 16384  # 1 GiB per pack: few files, yet a failed import wastes at most that
MAX_VIRTUAL_SIZE = 64 << 40  # 64 TiB: qcow2 serves it; keeps block-map rows within u32 indexes
STALE_PACK_SECONDS = 60  # a pack still without its name this long was left by a crash
IOV_MAX = 1024  # buffers per pwritev (Linux)
DIGEST_BYTES = 16  # SHA-256 prefix: 2^64 birthday bound, half the index size

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vdis(
    id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    name_label TEXT NOT NULL,
    name_description TEXT NOT NULL DEFAULT '',
    virtual_size INTEGER NOT NULL,
    is_a_snapshot INTEGER NOT NULL DEFAULT 0,
    snapshot_of TEXT,
    snapshot_time TEXT,
    lineage TEXT NOT NULL,
    created TEXT NOT NULL,
    changed_ns INTEGER NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    allocated_chunks INTEGER NOT NULL DEFAULT 0,
    -- the image most recently imported, so a delta made on top of it applies
    import_identity BLOB,
    import_name TEXT,
    import_generation INTEGER,
    -- the snapshot tree: a snapshot's parent is the VDI's current snapshot when
    -- it was taken; a live VDI's current is the snapshot it descends from
    parent TEXT,
    current TEXT,
    data_destroyed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS vdis_lineage ON vdis(lineage);
CREATE INDEX IF NOT EXISTS vdis_snapshot_of ON vdis(snapshot_of);
CREATE TABLE IF NOT EXISTS blocks(
    vdi INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    mask INTEGER NOT NULL,
    chunks BLOB NOT NULL,
    PRIMARY KEY(vdi, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks(digest BLOB PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS packs(id INTEGER PRIMARY KEY, slots INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS vms(
    id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    name_label TEXT NOT NULL,
    name_description TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '',
    is_a_snapshot INTEGER NOT NULL DEFAULT 0,
    snapshot_of TEXT,
    snapshot_time TEXT,
    parent TEXT,
    current TEXT,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS vm_disks(
    vm TEXT NOT NULL,
    device TEXT NOT NULL,
    vdi TEXT NOT NULL,
    PRIMARY KEY(vm, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS imports(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    target TEXT,
    format TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    errno INTEGER,
    bytes_received INTEGER NOT NULL DEFAULT 0,
    chunks_applied INTEGER NOT NULL DEFAULT 0,
    started TEXT NOT NULL,
    finished TEXT,
    seconds REAL,
    pid INTEGER NOT NULL DEFAULT 0,
    notes TEXT
);
"""


class WouldBlock(Exception):
    """A ``nowait`` read would have waited for the disk (not a user error)."""


# Columns added since the first schema, for SRs made by an earlier vdifs.
ADDED_COLUMNS: dict[str, dict[str, str]] = {
    "vdis": {
        "import_identity": "BLOB",
        "import_name": "TEXT",
        "import_generation": "INTEGER",
        "parent": "TEXT",
        "current": "TEXT",
        "data_destroyed": "INTEGER NOT NULL DEFAULT 0",
    },
    "imports": {"pid": "INTEGER NOT NULL DEFAULT 0", "notes": "TEXT"},
}


# Indexes on columns that ADDED_COLUMNS may have just added.
_LATE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS vdis_parent ON vdis(parent)",
    "CREATE INDEX IF NOT EXISTS vms_parent ON vms(parent)",
    "CREATE INDEX IF NOT EXISTS vms_snapshot_of ON vms(snapshot_of)",
)


def default_sr_path() -> Path:
    env = os.environ.get("VDIFS_SR")
    if env:
        return Path(env)
    return Path.home() / ".local/share/vdifs/sr"


def safe_text(text: str) -> str:
    """A file name that may hold undecodable bytes, as storable, printable text."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def utc_iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_zero_chunk(piece: bytes | bytearray | memoryview) -> bool:
    # Not ``piece == ZERO_CHUNK``: a memoryview compares item by item, which
    # costs 176 µs for a zero chunk here; startswith is one memcmp (3 µs).
    return len(piece) == CHUNK_SIZE and ZERO_CHUNK.startswith(piece)


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()[:DIGEST_BYTES]


@dataclass(frozen=True)
class VdiRecord:
    """One VDI or snapshot, with XAPI's field names where XAPI has them."""

    id: int
    uuid: str
    name_label: str
    name_description: str
    virtual_size: int
    is_a_snapshot: bool
    snapshot_of: str | None
    snapshot_time: str | None
    lineage: str
    created: str
    changed_ns: int
    generation: int
    allocated_chunks: int
    parent: str | None = None
    current: str | None = None
    data_destroyed: bool = False
    snapshots: tuple[str, ...] = ()
    children: tuple[str, ...] = ()

    @property
    def read_only(self) -> bool:
        return self.is_a_snapshot

    @property
    def physical_utilisation(self) -> int:
        return self.allocated_chunks * CHUNK_SIZE

    @functools.cached_property
    def state_uuid(self) -> uuidlib.UUID:
        """Identity of this VDI's content at this generation (image identity)."""
        return uuidlib.uuid5(_STATE_NAMESPACE, f"{self.uuid}/{self.generation}")

    @property
    def state_time(self) -> int:
        """Seconds since the epoch of this state: snapshot time or last change."""
        return self.changed_ns // 1_000_000_000

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name_label": self.name_label,
            "name_description": self.name_description,
            "virtual_size": self.virtual_size,
            "physical_utilisation": self.physical_utilisation,
            "is_a_snapshot": self.is_a_snapshot,
            "snapshot_of": self.snapshot_of,
            "snapshot_time": self.snapshot_time,
            "snapshots": list(self.snapshots),
            "read_only": self.read_only,
            "parent": self.parent,
            "children": list(self.children),
            "current": self.current,
            "type": "cbt_metadata" if self.data_destroyed else "user",
            "data_destroyed": self.data_destroyed,
            "created": self.created,
            "last_changed": utc_iso(self.changed_ns),
            "generation": self.generation,
            "content_id": str(self.state_uuid),
        }


_STATE_NAMESPACE = uuidlib.UUID("6d0c7c5e-3c55-4d0b-9a57-7664696673ff")


class PackPins:
    """Shared flocks on packs an open view reads: garbage collection skips them."""

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


class LocalSR:
    """The embedded storage repository in one directory."""

    FD_CACHE = 512

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.packs_dir = self.path / "packs"
        self.staging_dir = self.path / "staging"
        for d in (self.path, self.packs_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._local = threading.local()
        self._fds: dict[int, _PackFile] = {}
        self._fd_lock = threading.Lock()
        db = self.db
        for statement in _SCHEMA.strip().split(";\n"):
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
        db = self.db
        if db.in_transaction:
            yield db
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    def data_version(self) -> int:
        """Changes whenever another connection commits (cheap change polling)."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._fd_lock:
            self._fds.clear()

    # -- records -------------------------------------------------------------

    _COLUMNS = (
        "id, uuid, name_label, name_description, virtual_size, is_a_snapshot, snapshot_of,"
        " snapshot_time, lineage, created, changed_ns, generation, allocated_chunks,"
        " parent, current, data_destroyed"
    )

    def _record(
        self, row: tuple[Any, ...], snapshots: tuple[str, ...], children: tuple[str, ...] = ()
    ) -> VdiRecord:
        return VdiRecord(
            id=row[0],
            uuid=row[1],
            name_label=row[2],
            name_description=row[3],
            virtual_size=row[4],
            is_a_snapshot=bool(row[5]),
            snapshot_of=row[6],
            snapshot_time=row[7],
            lineage=row[8],
            created=row[9],
            changed_ns=row[10],
            generation=row[11],
            allocated_chunks=row[12],
            parent=row[13],
            current=row[14],
            data_destroyed=bool(row[15]),
            snapshots=snapshots,
            children=children,
        )

    def list_vdis(self) -> list[VdiRecord]:
        db = self.db
        rows = db.execute(f"SELECT {self._COLUMNS} FROM vdis ORDER BY created, uuid").fetchall()
        snaps: dict[str, list[str]] = {}
        children: dict[str, list[str]] = {}
        for row in rows:
            if row[6]:
                snaps.setdefault(row[6], []).append(row[1])
            if row[13]:
                children.setdefault(row[13], []).append(row[1])
        return [
            self._record(r, tuple(snaps.get(r[1], ())), tuple(children.get(r[1], ()))) for r in rows
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
            "SELECT idx, mask, chunks FROM blocks WHERE vdi = ? ORDER BY idx", (vdi.id,)
        )
        return BlockMap.from_rows(vdi.virtual_size, iter(rows))

    def snapshot_state(
        self, uuid: str, known: VdiRecord | None = None
    ) -> tuple[VdiRecord, BlockMap]:
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
                (cur.lastrowid, src.id),
            )
            if snapshot:
                db.execute("UPDATE vdis SET current = ? WHERE id = ?", (uuid, src.id))
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
            db.execute("DELETE FROM blocks WHERE vdi = ?", (record.id,))
            db.execute("DELETE FROM vdis WHERE id = ?", (record.id,))
            db.execute("DELETE FROM vm_disks WHERE vdi = ?", (uuid,))

    def delete_snapshot(
        self, uuid: str, *, children: bool = False, only_children: bool = False
    ) -> list[str]:
        """Delete a snapshot (default: it alone), or its subtree, or only its subtree."""
        with self.transaction():
            record = self.get_vdi(uuid)
            if not record.is_a_snapshot:
                raise InvalidArgument(f"{uuid} is not a snapshot (use vdifs vdi destroy)")
            doomed = self.descendants(uuid) if (children or only_children) else []
            if not only_children:
                doomed.append(uuid)
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
                "UPDATE vdis SET data_destroyed = 1, allocated_chunks = 0 WHERE id = ?",
                (record.id,),
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
            tail = record.virtual_size % CHUNK_SIZE
            chunk_id = self.block_map(record).chunk_id(record.virtual_size // CHUNK_SIZE)
            if tail and chunk_id:
                # Bytes past the old end become part of the disk: they must read as zeros.
                data = bytearray(self.read_chunk(chunk_id))
                if data[tail:] != bytes(CHUNK_SIZE - tail):
                    data[tail:] = bytes(CHUNK_SIZE - tail)
                    writer.write_chunk(record.virtual_size // CHUNK_SIZE, data)
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
        retry the whole request off the event loop.
        """
        if chunk_id == 0:
            if len(buf) <= CHUNK_SIZE:
                buf[:] = ZERO_CHUNK[: len(buf)]
            else:
                buf[:] = bytes(len(buf))
            return
        pf = self._pack_file(chunk_id >> 32)
        offset = (chunk_id & 0xFFFFFFFF) * CHUNK_SIZE + skip
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

    def read(self, block_map: BlockMap, offset: int, length: int) -> bytes:
        """Bytes of a disk through its block map, clamped at the end of the disk."""
        end = min(offset + length, block_map.virtual_size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        self.read_into(block_map, offset, memoryview(out))
        return bytes(out)

    def read_into(
        self, block_map: BlockMap, offset: int, buf: memoryview, *, nowait: bool = False
    ) -> None:
        """Fill ``buf`` with the disk's bytes at ``offset`` (inside the disk).

        Chunks stored one after the other in a pack (what a sequential write
        leaves) are read with one preadv per run, not one per chunk.
        """
        if not len(buf):
            return
        first = offset // CHUNK_SIZE
        last = (offset + len(buf) - 1) // CHUNK_SIZE
        ids = block_map.chunk_ids(first, last - first + 1)
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

    def writer(self, uuid: str, *, replace: bool = False) -> ChunkWriter:
        return ChunkWriter(self, uuid, replace=replace)

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

    def pin(self, packs: frozenset[int]) -> PackPins:
        """Keep these packs from garbage collection until the pins are released."""
        fds = []
        for pack in packs:
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
        return PackPins(fds)

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
                        (pack << 32, (pack + 1) << 32),
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
            live.update(i >> 32 for i in ids if i)
        return {p for (p,) in self.db.execute("SELECT id FROM packs WHERE slots >= 0")} - live


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

        The new bytes read as zeros unless this writer writes them.
        """
        size = check_size(size)
        if size < self.virtual_size:
            raise InvalidArgument(
                f"VDI {self.uuid} has {self.virtual_size} bytes: a disk can only grow"
            )
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
        for i, chunk_id in enumerate(ids):
            block, c = divmod(first + i, CHUNKS_PER_BLOCK)
            row = self._rows.get(block)
            if row is None:
                row = self._rows[block] = bytearray(ROW_BYTES)
            row[c * 8 : c * 8 + 8] = chunk_id.to_bytes(8, "little")
            self._written[block] = self._written.get(block, 0) | 1 << c
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
            self._reused_packs.update(chunk_id >> 32 for chunk_id in stored.values())
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
        return pack << 32 | slots

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
            offset = (first & 0xFFFFFFFF) * CHUNK_SIZE
            try:
                if self._direct is None or not self._direct.write(first >> 32, pieces, offset):
                    os.pwritev(fds[first >> 32], pieces, offset)
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
            if chunk_id >> 32 == pack:
                return os.pread(fd, CHUNK_SIZE, (chunk_id & 0xFFFFFFFF) * CHUNK_SIZE)
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
                    db.execute("DELETE FROM blocks WHERE vdi = ?", (record.id,))
                for block, new_row in self._rows.items():
                    written = self._written[block]
                    if self.replace:
                        row = bytes(new_row)
                    else:
                        old = db.execute(
                            "SELECT chunks FROM blocks WHERE vdi = ? AND idx = ?",
                            (record.id, block),
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
                            (record.id, block, mask, row),
                        )
                    else:
                        db.execute(
                            "DELETE FROM blocks WHERE vdi = ? AND idx = ?", (record.id, block)
                        )
                count = sum(
                    int(m).bit_count()
                    for (m,) in db.execute("SELECT mask FROM blocks WHERE vdi = ?", (record.id,))
                )
                if self.virtual_size < record.virtual_size:
                    raise Busy(f"VDI {self.uuid} was resized while this write ran")
                db.execute(
                    "UPDATE vdis SET generation = generation + 1, changed_ns = ?,"
                    " allocated_chunks = ?, virtual_size = ? WHERE id = ?",
                    (max(now, record.changed_ns + 1), count, self.virtual_size, record.id),
                )
                if self.import_name is not None:
                    db.execute(
                        "UPDATE vdis SET import_identity = ?, import_name = ?,"
                        " import_generation = generation WHERE id = ?",
                        (self.import_identity, self.import_name, record.id),
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
    so a run is copied into one of a few mmap'ed buffers (a memcpy, far
    cheaper than the page-cache allocation it avoids) and written from
    there by one background thread, while the caller hashes the next run.
    A failed write is raised by the next :meth:`write` or by :meth:`flush`.
    """

    BUFFER_CHUNKS = 64  # 4 MiB per buffer
    BUFFERS = 3

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}
        size = self.BUFFER_CHUNKS * CHUNK_SIZE
        self._buffers = [mmap.mmap(-1, size) for _ in range(self.BUFFERS)]
        self._busy: list[Future[None] | None] = [None] * self.BUFFERS
        self._next = 0
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
        """Queue a run of chunks at ``offset``; False if this pack takes no direct writes."""
        fd = self._fds.get(pack)
        if fd is None:
            return False
        for start in range(0, len(pieces), self.BUFFER_CHUNKS):
            slot = self._next
            self._next = (slot + 1) % self.BUFFERS
            self._wait(slot)
            buffer = self._buffers[slot]
            batch = pieces[start : start + self.BUFFER_CHUNKS]
            for i, piece in enumerate(batch):
                buffer[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE] = piece
            self._busy[slot] = self._thread.submit(
                _write_exactly, fd, buffer, len(batch) * CHUNK_SIZE, offset + start * CHUNK_SIZE
            )
        return True

    def _wait(self, slot: int) -> None:
        busy = self._busy[slot]
        if busy is not None:
            self._busy[slot] = None
            busy.result()

    def flush(self) -> None:
        """Wait for every queued write; raise the first error."""
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


_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"10G"`` -> 10 GiB.  Suffixes are binary; ``B``/``iB`` optional."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    suffix = s[-1:] if s[-1:] in _SIZE_SUFFIXES and s[-1:] else ""
    number = s[: -len(suffix)] if suffix else s
    try:
        value = int(number)
    except ValueError:
        raise InvalidArgument(f"invalid size {text!r}: use bytes or K/M/G/T (binary)") from None
    return value * _SIZE_SUFFIXES[suffix]


def check_size(size: int) -> int:
    """Validate a virtual size and round it up to whole sectors."""
    if size <= 0:
        raise InvalidArgument("a VDI needs a size above zero")
    if size > MAX_VIRTUAL_SIZE:
        raise InvalidArgument(f"size {size} is above the SR limit of {MAX_VIRTUAL_SIZE} bytes")
    return -(-size // SECTOR_SIZE) * SECTOR_SIZE


def check_name(name: str) -> None:
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"a name must be UTF-8 text: {safe_text(name)!r}") from None
    if not name or "\0" in name or len(encoded) > 255:
        raise InvalidArgument("a name must be 1 to 255 bytes with no NUL")
    if name in (".", ".."):
        raise InvalidArgument("'.' and '..' are not names")
