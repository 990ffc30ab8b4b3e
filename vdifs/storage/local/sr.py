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
import fcntl
import hashlib
import logging
import os
import secrets
import sqlite3
import threading
import time
import uuid as uuidlib
from array import array
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from vdifs.errors import (
    Busy,
    InvalidArgument,
    NotFound,
    ReadOnly,
    StorageError,
)
from vdifs.model import CHUNK_SIZE, VdiRecord, check_name, utc_iso
from vdifs.storage.backend import Capabilities, ContentMap, WouldBlock, deletion_order
from vdifs.storage.importlog import IMPORTS_TABLE, SqliteImportLog
from vdifs.storage.local.blockmap import BlockMap
from vdifs.storage.local.layout import (
    _LATE_INDEXES,
    _SCHEMA,
    ADDED_COLUMNS,
    SCHEMA_VERSION,
    STALE_PACK_SECONDS,
    ZERO_CHUNK,
    check_size,
    make_chunk_id,
    pack_of,
    slot_offset,
)
from vdifs.storage.local.vms import Vms
from vdifs.storage.local.writer import ChunkWriter

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


class LocalSR:
    """The embedded SR in one directory (a :class:`vdifs.storage.backend.Backend`)."""

    FD_CACHE = 512
    capabilities = Capabilities()

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
        db = self.db
        for statement in (_SCHEMA + IMPORTS_TABLE).strip().split(";\n"):
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
        retry the whole request off the event loop.
        """
        if chunk_id == 0:
            if len(buf) <= CHUNK_SIZE:
                buf[:] = ZERO_CHUNK[: len(buf)]
            else:
                buf[:] = bytes(len(buf))
            return
        pf = self._pack_file(pack_of(chunk_id))
        offset = slot_offset(chunk_id) + skip
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
        # Hashed: a key is a uuid or a VDI name of up to 255 bytes, longer than a file name allows.
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        path = self.staging_dir / f"{digest}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"an import into {key} is already in progress") from None
        return _FdPin([fd])

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
