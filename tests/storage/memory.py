"""A second storage backend, in memory: proof that the seam carries more than the embedded SR.

It keeps each VDI's chunks in a dict and shares nothing with ``storage/local``:
no SQL, no packs, no block rows.  A state's content map is a frozen copy of
the dict (copy-on-write by snapshot, so a snapshot costs a dict copy, fine for
tests).  It passes the contract suite (tests/storage/test_contract.py) and is
mounted through the kernel in tests/storage/test_memory_mount.py.
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import tempfile
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vdifs.errors import Busy, InvalidArgument, NotFound, ReadOnly, Unsupported
from vdifs.model import (
    CHUNK_SIZE,
    CHUNKS_PER_BLOCK,
    SECTOR_SIZE,
    Allocation,
    VdiRecord,
    VmRecord,
    ceil_div,
    check_name,
    utc_iso,
)
from vdifs.storage.backend import Capabilities, deletion_order

ZERO = bytes(CHUNK_SIZE)


@dataclass(frozen=True, eq=False)
class MemoryMap:
    """A state's chunks: index -> 64 KiB of data (zero chunks absent)."""

    virtual_size: int
    chunks: MappingProxyType[int, bytes]

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    @property
    def footprint(self) -> int:
        return 64 * len(self.chunks)  # the dict, not the data it shares

    def allocation(self) -> Allocation:
        return _allocation(self.virtual_size, sorted(self.chunks))

    def holds_data(self, offset: int, length: int) -> bool:
        first, last = offset // CHUNK_SIZE, (offset + length - 1) // CHUNK_SIZE
        return any(c in self.chunks for c in range(first, last + 1))

    def diff(self, base: Any) -> Allocation:
        assert isinstance(base, MemoryMap)
        limit = ceil_div(self.virtual_size, CHUNK_SIZE)
        changed = sorted(
            c
            for c in self.chunks.keys() | base.chunks.keys()
            if c < limit and self.chunks.get(c, ZERO) != base.chunks.get(c, ZERO)
        )
        return _allocation(self.virtual_size, changed)


def _allocation(virtual_size: int, chunks: list[int]) -> Allocation:
    out = Allocation(virtual_size)
    for chunk in chunks:
        block, bit = divmod(chunk, CHUNKS_PER_BLOCK)
        if not out.blocks or out.blocks[-1] != block:
            out.blocks.append(block)
            out.masks.append(0)
        out.masks[-1] |= 1 << bit
    return out


@dataclass
class _Vdi:
    record: VdiRecord
    chunks: dict[int, bytes] = field(default_factory=dict)
    frozen: MemoryMap | None = None  # the map of the current generation, once asked for
    last_import: tuple[bytes | None, str | None, int | None] = (None, None, None)


class _Pin:
    def __init__(self, release: Any = None) -> None:
        self._release = release

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None


class MemoryWriter:
    def __init__(
        self, backend: MemoryBackend, uuid: str | None, replace: bool, new_vdi: Any
    ) -> None:
        self.backend = backend
        self.replace = replace
        self.new_vdi = new_vdi
        if new_vdi is not None:
            name, size = new_vdi
            check_name(name)
            self.uuid = str(uuidlib.uuid4())
            self.virtual_size = backend.check_size(size)
        else:
            assert uuid is not None
            record = backend.get_vdi(uuid)
            if record.is_a_snapshot:
                raise ReadOnly(f"VDI {uuid} is a snapshot and cannot change")
            self.uuid = uuid
            self.virtual_size = record.virtual_size
        self.expect_generation: int | None = None
        self.import_identity: bytes | None = None
        self.import_name: str | None = None
        self.chunks_written = 0
        self.notes: list[str] = []
        self._staged: dict[int, bytes] = {}
        self._done = False

    def grow(self, size: int) -> None:
        size = self.backend.check_size(size)
        if size < self.virtual_size:
            raise InvalidArgument("a disk can only grow")
        self.virtual_size = size

    def write_chunk(self, chunk: int, data: bytes | bytearray | memoryview) -> None:
        self.write_chunks(chunk, bytes(data).ljust(CHUNK_SIZE, b"\0"))

    def write_chunks(self, first: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        count, rest = divmod(len(view), CHUNK_SIZE)
        if rest:
            raise InvalidArgument("write_chunks takes whole chunks")
        if first < 0 or (first + count - 1) * CHUNK_SIZE >= self.virtual_size:
            raise InvalidArgument("chunks outside the disk")
        for i in range(count):
            self._staged[first + i] = bytes(view[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE])
        self.chunks_written += count

    def staged_chunk(self, chunk: int) -> bytes | None:
        return self._staged.get(chunk)

    def commit(self) -> VdiRecord:
        if self._done:
            raise RuntimeError("writer already finished")
        self._done = True
        backend = self.backend
        with backend.lock:
            if self.new_vdi is not None:
                backend.add_vdi(self.new_vdi[0], self.virtual_size, uuid=self.uuid)
            vdi = backend.vdi(self.uuid)
            record = vdi.record
            if record.is_a_snapshot:
                raise ReadOnly(f"VDI {self.uuid} is a snapshot and cannot change")
            if self.expect_generation is not None and record.generation != self.expect_generation:
                raise Busy(f"VDI {self.uuid} changed while the import ran; nothing applied")
            chunks = {} if self.replace else dict(vdi.chunks)
            for index, data in self._staged.items():
                if data == ZERO:
                    chunks.pop(index, None)
                else:
                    chunks[index] = data
            vdi.chunks = chunks
            vdi.frozen = None
            generation = record.generation + 1
            vdi.record = replace(
                record,
                virtual_size=self.virtual_size,
                generation=generation,
                changed_ns=max(time.time_ns(), record.changed_ns + 1),
                allocated_chunks=len(chunks),
            )
            if self.import_name is not None:
                vdi.last_import = (self.import_identity, self.import_name, generation)
            backend.changed()
        return backend.get_vdi(self.uuid)

    def abort(self) -> None:
        self._done = True
        self._staged.clear()

    def __enter__(self) -> MemoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()


class MemoryImportLog:
    """Implements :class:`vdifs.storage.backend.ImportLog` in a dict."""

    def __init__(self) -> None:
        self.items: dict[int, dict[str, Any]] = {}
        self.next_id = 1
        self._lock = threading.Lock()

    def start(self, name: str, target: str | None, fmt: str, received: int) -> int:
        with self._lock:
            import_id, self.next_id = self.next_id, self.next_id + 1
        self.items[import_id] = {
            "id": import_id,
            "name": name,
            "target": target,
            "format": fmt,
            "state": "running",
            "error": None,
            "errno": None,
            "bytes_received": received,
            "chunks_applied": 0,
            "started": utc_iso(time.time_ns()),
            "finished": None,
            "seconds": None,
        }
        return import_id

    def end(
        self,
        import_id: int,
        state: str,
        error: str | None,
        errno: int,
        chunks: int,
        seconds: float,
        target: str | None = None,
        received: int | None = None,
        notes: str | None = None,
    ) -> None:
        item = self.items[import_id]
        item.update(state=state, error=error, errno=errno or None, chunks_applied=chunks)
        item.update(finished=utc_iso(time.time_ns()), seconds=seconds)
        if target is not None:
            item["target"] = target
        if received is not None:
            item["bytes_received"] = received
        if notes is not None:
            item["notes"] = notes
        if errno:
            item["errno_name"] = errno_module.errorcode.get(errno, str(errno))

    def forget(self, import_id: int) -> None:
        self.items.pop(import_id, None)

    def record_digest(self, import_id: int, sha256: str) -> None:
        self.items[import_id]["sha256"] = sha256

    def recent(self, limit: int) -> list[dict[str, Any]]:
        return [dict(self.items[i]) for i in sorted(self.items, reverse=True)[:limit]]

    def mark_interrupted(self) -> None:
        pass  # nothing outlives the process


class NoVms:
    """This backend keeps no VMs (``capabilities.vms`` is False)."""

    def all(self, *, snapshots: bool = True) -> list[VmRecord]:
        return []

    def get(self, uuid: str) -> VmRecord:
        raise NotFound(f"no VM {uuid}")

    def resolve(self, key: str, *, snapshot: bool | None = None, of: str | None = None) -> VmRecord:
        raise NotFound(f"no VM {key}")

    def _unsupported(self, *args: Any, **kwargs: Any) -> Any:
        raise Unsupported("this backend keeps no VMs")

    create = set_metadata = attach = detach = destroy = snapshot = _unsupported
    revert = set_name = delete_snapshot = _unsupported


class MemoryBackend:
    """Implements :class:`vdifs.storage.backend.Backend` with dicts."""

    MAX_SIZE = 64 << 40
    capabilities = Capabilities(vms=False, garbage_collection=False)

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.vdis: dict[str, _Vdi] = {}
        self.vms = NoVms()
        self.imports = MemoryImportLog()
        self._version = 0
        self._locks: set[str] = set()
        self.digests: dict[tuple[str, int], dict[str, str]] = {}
        self._scratch = tempfile.TemporaryDirectory(prefix="vdifs-memory-")

    @property
    def description(self) -> str:
        return "memory:"

    def changed(self) -> None:
        self._version += 1

    def check_size(self, size: int) -> int:
        if size <= 0 or size > self.MAX_SIZE:
            raise InvalidArgument(f"size {size} is out of range")
        return ceil_div(size, SECTOR_SIZE) * SECTOR_SIZE

    # -- records --------------------------------------------------------------------------

    def data_version(self) -> int:
        return self._version

    def vdi(self, uuid: str) -> _Vdi:
        try:
            return self.vdis[uuid]
        except KeyError:
            raise NotFound(f"no VDI with uuid {uuid}") from None

    def _full(self, record: VdiRecord) -> VdiRecord:
        snaps = tuple(u for u, v in self.vdis.items() if v.record.snapshot_of == record.uuid)
        kids = tuple(u for u, v in self.vdis.items() if v.record.parent == record.uuid)
        return replace(record, snapshots=snaps, children=kids)

    def list_vdis(self) -> list[VdiRecord]:
        with self.lock:
            return [self._full(v.record) for v in self.vdis.values()]

    def get_vdi(self, uuid: str) -> VdiRecord:
        with self.lock:
            return self._full(self.vdi(uuid).record)

    def descendants(self, uuid: str) -> list[str]:
        out: list[str] = []
        for child in self.get_vdi(uuid).children:
            out += self.descendants(child)
            out.append(child)
        return out

    def state(self, uuid: str, known: VdiRecord | None = None) -> tuple[VdiRecord, MemoryMap]:
        with self.lock:
            vdi = self.vdi(uuid)
            if vdi.frozen is None:
                vdi.frozen = MemoryMap(vdi.record.virtual_size, MappingProxyType(dict(vdi.chunks)))
            record = known
            if known is None or known.generation != vdi.record.generation:
                record = self._full(vdi.record)
            return record, vdi.frozen

    def stored_digests(self, uuid: str, generation: int) -> dict[str, str]:
        return dict(self.digests.get((uuid, generation), {}))

    def store_digests(self, uuid: str, generation: int, digests: dict[str, str]) -> None:
        self.digests.setdefault((uuid, generation), {}).update(digests)

    def last_import(self, uuid: str) -> tuple[bytes | None, str | None, int | None]:
        return self.vdi(uuid).last_import

    # -- reading --------------------------------------------------------------------------

    def read_into(
        self, content: Any, offset: int, buf: memoryview, *, nowait: bool = False
    ) -> None:
        assert isinstance(content, MemoryMap)
        pos = 0
        while pos < len(buf):
            chunk, within = divmod(offset + pos, CHUNK_SIZE)
            take = min(CHUNK_SIZE - within, len(buf) - pos)
            data = content.chunks.get(chunk)
            buf[pos : pos + take] = data[within : within + take] if data else bytes(take)
            pos += take

    def keep_readable(self, content: Any) -> _Pin:
        return _Pin()  # maps hold their data: nothing to reclaim under them

    # -- changing -------------------------------------------------------------------------

    def writer(
        self,
        uuid: str | None,
        *,
        replace: bool = False,
        new_vdi: tuple[str, int] | None = None,
        bulk: bool = False,
    ) -> MemoryWriter:
        return MemoryWriter(self, uuid, replace, new_vdi)

    def add_vdi(self, name: str, size: int, description: str = "", uuid: str | None = None) -> _Vdi:
        check_name(name)
        uuid = uuid or str(uuidlib.uuid4())
        now = time.time_ns()
        record = VdiRecord(
            uuid=uuid,
            name_label=name,
            name_description=description,
            virtual_size=self.check_size(size),
            is_a_snapshot=False,
            snapshot_of=None,
            snapshot_time=None,
            lineage=uuid,
            created=utc_iso(now),
            changed_ns=now,
            generation=1,
            allocated_chunks=0,
        )
        vdi = self.vdis[uuid] = _Vdi(record)
        self.changed()
        return vdi

    def create_vdi(self, name: str, size: int, description: str = "") -> VdiRecord:
        with self.lock:
            return self._full(self.add_vdi(name, size, description).record)

    def _copy(self, uuid: str, name: str | None, snapshot: bool, description: str | None) -> str:
        with self.lock:
            src = self.vdi(uuid)
            if src.record.data_destroyed:
                raise InvalidArgument(f"snapshot {uuid} is a checkpoint: its data was destroyed")
            label = name if name is not None else src.record.name_label
            check_name(label)
            new = str(uuidlib.uuid4())
            now = time.time_ns()
            record = replace(
                src.record,
                uuid=new,
                name_label=label,
                name_description=(
                    src.record.name_description if description is None else description
                ),
                is_a_snapshot=snapshot,
                snapshot_of=uuid if snapshot else None,
                snapshot_time=utc_iso(now) if snapshot else None,
                created=utc_iso(now),
                changed_ns=now,
                generation=1,
                parent=src.record.current if snapshot else None,
                current=None,
                snapshots=(),
                children=(),
            )
            self.vdis[new] = _Vdi(record, dict(src.chunks))
            if snapshot:
                src.record = replace(src.record, current=new)
            self.changed()
            return new

    def snapshot(
        self, uuid: str, name: str | None = None, description: str | None = None
    ) -> VdiRecord:
        return self.get_vdi(self._copy(uuid, name, True, description))

    def clone(self, uuid: str, name: str | None = None) -> VdiRecord:
        return self.get_vdi(self._copy(uuid, name, False, None))

    def destroy(self, uuid: str) -> None:
        with self.lock:
            record = self.vdi(uuid).record
            for vdi in self.vdis.values():
                if vdi.record.parent == uuid:
                    vdi.record = replace(vdi.record, parent=record.parent)
                if vdi.record.current == uuid:
                    vdi.record = replace(vdi.record, current=record.parent)
            del self.vdis[uuid]
            self.changed()

    def delete_snapshot(
        self, uuid: str, *, children: bool = False, only_children: bool = False
    ) -> list[str]:
        with self.lock:
            if not self.get_vdi(uuid).is_a_snapshot:
                raise InvalidArgument(f"{uuid} is not a snapshot (use vdifs vdi destroy)")
            below = self.descendants(uuid) if children or only_children else []
            doomed = deletion_order(uuid, below, children=children, only_children=only_children)
            for victim in doomed:
                self.destroy(victim)
            return doomed

    def data_destroy(self, uuid: str) -> VdiRecord:
        with self.lock:
            vdi = self.vdi(uuid)
            if not vdi.record.is_a_snapshot:
                raise InvalidArgument(
                    f"{uuid} is not a snapshot: only snapshots become checkpoints"
                )
            # The map stays (deltas compare against it); reads are refused above.
            vdi.record = replace(vdi.record, data_destroyed=True, allocated_chunks=0)
            self.changed()
            return self.get_vdi(uuid)

    def set_name(self, uuid: str, name: str) -> None:
        check_name(name)
        with self.lock:
            vdi = self.vdi(uuid)
            vdi.record = replace(vdi.record, name_label=name)
            self.changed()

    def resize(self, uuid: str, size: int) -> VdiRecord:
        record = self.get_vdi(uuid)
        if record.is_a_snapshot:
            raise ReadOnly(f"VDI {uuid} is a snapshot: it cannot be resized")
        size = self.check_size(size)
        if size < record.virtual_size:
            raise InvalidArgument(f"VDI {uuid} can only grow")
        if size == record.virtual_size:
            return record
        with self.writer(uuid) as writer:
            writer.expect_generation = record.generation
            writer.grow(size)
            return writer.commit()

    # -- imports --------------------------------------------------------------------------

    def import_lock(self, key: str) -> _Pin:
        with self.lock:
            if key in self._locks:
                raise Busy(f"an import into {key} is already in progress")
            self._locks.add(key)
        return _Pin(lambda: self._locks.discard(key))

    def scratch_file(self) -> tuple[Path, int]:
        fd, name = tempfile.mkstemp(suffix=".upload", dir=self._scratch.name)
        return Path(name), fd

    # -- the repository -------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"backend": "memory", "chunks": sum(len(v.chunks) for v in self.vdis.values())}

    def garbage_collect(self) -> tuple[int, int]:
        raise Unsupported("the memory backend frees data as soon as nothing holds it")

    def space(self) -> tuple[int, int, int]:
        return 4096, 1 << 30, 1 << 29

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._scratch.cleanup()
