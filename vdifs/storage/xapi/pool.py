"""A XAPI pool as a :class:`~vdifs.storage.backend.Backend`.

Records come over XenAPI and are kept in memory, renewed by a watcher
thread on ``event.from`` (a mount sees a new snapshot within a second or
two).  A disk's bytes come over NBD (``VDI.get_nbd_info``), through several
connections with read-ahead (:mod:`vdifs.storage.xapi.nbd`).  What a full
image carries is the allocation in the head of XAPI's own VHD export
(footer, header, BAT; the stream is closed after it), as Xen Orchestra
reads it; what a delta carries is ``VDI.list_changed_blocks`` (CBT).
Imports are validated by vdifs's parsers, then sent as a VHD to
``import_raw_vdi`` (:mod:`vdifs.storage.xapi.upload`).

Every method may block on the network; the FUSE adapter calls them off its
loop (``capabilities.remote``).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from array import array
from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdifs.errors import (
    AccessDenied,
    Busy,
    InvalidArgument,
    MalformedImage,
    NotFound,
    PoolError,
    ReadOnly,
    Unsupported,
    VdifsError,
)
from vdifs.formats import vhd_parse
from vdifs.formats.base import NotStreamable
from vdifs.model import (
    BLOCK_SIZE,
    CHUNK_SIZE,
    CHUNKS_PER_BLOCK,
    FULL_MASK,
    Allocation,
    VdiRecord,
    ceil_div,
    check_name,
)
from vdifs.storage import digests
from vdifs.storage.backend import Capabilities, WouldBlock, deletion_order
from vdifs.storage.importlog import ImportJournal, SqliteImportLog
from vdifs.storage.locks import import_lock_fd
from vdifs.storage.xapi.api import NULL_REF, ExportRefused, PoolAddress, Session
from vdifs.storage.xapi.nbd import NbdError, NbdReader, NbdTarget
from vdifs.storage.xapi.records import PoolView, build_view
from vdifs.storage.xapi.vms import PoolVms

log = logging.getLogger(__name__)

WATCHED_CLASSES = ["vdi", "vbd", "vm", "sr"]
EVENT_WAIT = 30.0  # seconds event.from waits for a change
# xapi-nbd takes at most 16 connections per host: 2 VDIs read at once, 8 connections
# each (a backup copies a snapshot or two at a time; a third VDI evicts the oldest).
READERS = 2
NBD_CONNECTIONS = 8
# Each connection carries one segment at a time: 4 MiB segments keep 32 MiB in flight
# per VDI (at 20 ms of latency, 4.4 times one connection: docs/performance.md), and a
# reader holds at most 12 of them (48 MiB; 96 MiB for 2 VDIs).
NBD_SEGMENT = 4 << 20
NBD_CACHE_SEGMENTS = 12
NBD_READAHEAD = 6
LIVE_SEGMENT_AGE = 1.0  # seconds a live disk's read-ahead stays fresh enough to serve
_BIT_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


@dataclass(eq=False)
class PoolMap:
    """One state of a pool VDI: its allocation, and its changes against other states."""

    uuid: str
    virtual_size: int
    blocks: Allocation
    exact: bool
    """Whether ``blocks`` is XAPI's allocation (else every block counts: a raw SR)."""
    immutable: bool
    pool: PoolBackend
    _diffs: dict[str, Allocation | VdifsError] = field(default_factory=dict)

    @property
    def chunk_count(self) -> int:
        return self.blocks.chunk_count

    @property
    def footprint(self) -> int:
        return 16 * len(self.blocks.blocks) + 256

    def allocation(self) -> Allocation:
        return self.blocks

    def diff(self, base: Any) -> Allocation:
        assert isinstance(base, PoolMap)
        cached = self._diffs.get(base.uuid)
        if cached is None:
            try:
                cached = self.pool.changed_chunks(base.uuid, self.uuid, self.virtual_size)
            except VdifsError as exc:
                cached = exc  # asked again at once by the loop: answer without the network
            self._diffs[base.uuid] = cached
        if isinstance(cached, VdifsError):
            raise cached
        return cached

    def holds_data(self, offset: int, length: int) -> bool:
        """Whether a range may hold data (for reads of snapshots, which cannot change)."""
        if not self.immutable or not self.exact:
            return True
        first, last = offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE
        blocks = self.blocks.blocks
        i = bisect_left(blocks, first)
        return i < len(blocks) and blocks[i] <= last


class _Pin:
    def __init__(self, release: Any = None) -> None:
        self._release = release

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None


def bitmap_allocation(bitmap: bytes, virtual_size: int) -> Allocation:
    """CBT's changed-block bitmap (one bit per 64 KiB, most significant bit first:
    xapi-project/sm ``VDI.py list_changed_blocks``) as an allocation."""
    chunks = ceil_div(virtual_size, CHUNK_SIZE)
    table = ceil_div(chunks, CHUNKS_PER_BLOCK)
    data = bitmap[: table * 4].translate(_BIT_REVERSED).ljust(table * 4, b"\0")
    masks = array("I")
    masks.frombytes(data)
    if masks.itemsize != 4 or array("I", [1]).tobytes()[0] != 1:
        raise AssertionError("little-endian 32-bit masks expected")
    out = Allocation(virtual_size)
    for block, mask in enumerate(masks):
        if mask:
            if block == table - 1 and chunks % CHUNKS_PER_BLOCK:
                mask &= (1 << (chunks % CHUNKS_PER_BLOCK)) - 1
            if mask:
                out.blocks.append(block)
                out.masks.append(mask)
    return out


def block_allocation(block_size: int, indexes: list[int], virtual_size: int) -> Allocation:
    """A VHD BAT's allocated blocks (of any block size) as 64 KiB chunks."""
    chunks = ceil_div(virtual_size, CHUNK_SIZE)
    per_block: dict[int, int] = {}
    for index in indexes:
        first = index * block_size // CHUNK_SIZE
        last = min(chunks, ceil_div((index + 1) * block_size, CHUNK_SIZE))
        for chunk in range(first, last):
            block, bit = divmod(chunk, CHUNKS_PER_BLOCK)
            per_block[block] = per_block.get(block, 0) | 1 << bit
    out = Allocation(virtual_size)
    for block in sorted(per_block):
        out.blocks.append(block)
        out.masks.append(per_block[block])
    return out


def everything(virtual_size: int) -> Allocation:
    chunks = ceil_div(virtual_size, CHUNK_SIZE)
    out = Allocation(virtual_size)
    for block in range(ceil_div(chunks, CHUNKS_PER_BLOCK)):
        out.blocks.append(block)
        out.masks.append(min(FULL_MASK, (1 << (chunks - block * CHUNKS_PER_BLOCK)) - 1))
    return out


class PoolBackend:
    """Implements :class:`vdifs.storage.backend.Backend` over XenAPI, NBD and CBT."""

    capabilities = Capabilities(
        vms=True,
        garbage_collection=False,
        live_writes=False,
        remote=True,
        deltas_forward_only=True,
        snapshot_tree=False,
        pinned_live_states=False,
        import_identity=False,
        allocation_unit=BLOCK_SIZE,
        size_unit=BLOCK_SIZE,
    )

    def __init__(
        self,
        address: PoolAddress,
        password: str,
        *,
        ca: Path | None = None,
        scratch: Path | None = None,
    ) -> None:
        self.address = address
        self.session = Session(address, password, ca=ca)
        self.journal = ImportJournal(
            _state_home() / "vdifs" / "pools" / f"{address.host}_{address.port}.db"
        )
        self.imports = SqliteImportLog(
            self.journal,
            "the process running it stopped; the disk may be partly written:"
            " its snapshot named '<disk> (before import)' holds what it was",
        )
        self.imports.mark_interrupted()
        self.vms = PoolVms(self)
        self._lock = threading.RLock()
        self._view = PoolView()
        self._version = 0
        self._readers: OrderedDict[str, NbdReader] = OrderedDict()
        self._maps: dict[str, tuple[int, PoolMap]] = {}  # uuid -> (generation, map)
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        base = scratch or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        self._scratch = _scratch_dir(base / "vdifs" / "pool-scratch")
        self.reload()

    @property
    def description(self) -> str:
        return str(self.address)

    # -- records ------------------------------------------------------------------------

    def reload(self) -> None:
        """Read every record again (after our own changes, and on XAPI's events)."""
        call = self.session.call
        vdis, srs = call("VDI.get_all_records"), call("SR.get_all_records")
        vbds, vms = call("VBD.get_all_records"), call("VM.get_all_records")
        with self._lock:
            view = build_view(
                vdis,
                srs,
                vbds,
                vms,
                only_sr=self.address.sr,
                previous=self._view,
                now_ns=time.time_ns(),
            )
            if view.vdis != self._view.vdis or view.vms != self._view.vms:
                self._version += 1
            self._view = view

    def _watch(self) -> None:
        token = ""
        while not self._closed.is_set():
            try:
                result = self.session.call("event.from", WATCHED_CLASSES, token, EVENT_WAIT)
                token = result["token"]
                if result.get("events"):
                    self.reload()
            except VdifsError as exc:
                log.warning("watching the pool: %s; retrying", exc)
                token = ""
                self._closed.wait(2.0)

    def data_version(self) -> int:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="pool-events", daemon=True)
            self._watcher.start()
        return self._version

    def view(self) -> PoolView:
        return self._view

    def ref(self, uuid: str) -> str:
        try:
            return self._view.vdi_refs[uuid]
        except KeyError:
            raise NotFound(f"no VDI with uuid {uuid} in {self.address}") from None

    def list_vdis(self) -> list[VdiRecord]:
        return list(self._view.vdis.values())

    def get_vdi(self, uuid: str) -> VdiRecord:
        try:
            return self._view.vdis[uuid]
        except KeyError:
            raise NotFound(f"no VDI with uuid {uuid} in {self.address}") from None

    def descendants(self, uuid: str) -> list[str]:
        return []  # XAPI keeps no tree of snapshots: each stands alone

    def state(self, uuid: str, known: VdiRecord | None = None) -> tuple[VdiRecord, PoolMap]:
        record = self.get_vdi(uuid)
        if known is not None and known.generation == record.generation:
            record = known
        with self._lock:
            cached = self._maps.get(uuid)
        if cached is not None and cached[0] == record.generation:
            return record, cached[1]
        # A live VDI's map is read again when XAPI's record of it moves (a thin
        # SR's physical_utilisation grows as the guest writes new blocks).
        content = self._read_map(record)
        with self._lock:
            self._maps[uuid] = (record.generation, content)
        return record, content

    def _read_map(self, record: VdiRecord) -> PoolMap:
        size = record.virtual_size
        immutable = record.is_a_snapshot
        if record.data_destroyed:
            return PoolMap(record.uuid, size, Allocation(size), True, True, self)
        sr = self._sr_of(record)
        if sr in self._view.raw_srs:
            return PoolMap(record.uuid, size, everything(size), False, immutable, self)
        try:
            block_size, indexes = self.session.export_head(self.ref(record.uuid), _read_head)
        except ExportRefused as exc:
            log.info("%s: %s; every block counts as allocated", record.uuid, exc)
            with self._lock:
                self._view.raw_srs.add(sr)
            self.reload()  # info.json says so
            return PoolMap(record.uuid, size, everything(size), False, immutable, self)
        allocation = block_allocation(block_size, indexes, size)
        return PoolMap(record.uuid, size, allocation, True, immutable, self)

    def _sr_of(self, record: VdiRecord) -> str:
        return str(json.loads(record.extra or "{}").get("SR"))

    def changed_chunks(self, base: str, target: str, virtual_size: int) -> Allocation:
        """``VDI.list_changed_blocks(base, target)`` as chunks (zeroed ones included)."""
        try:
            encoded = self.session.call("VDI.list_changed_blocks", self.ref(base), self.ref(target))
        except VdifsError as exc:
            raise NotFound(f"no delta of {target} from {base}: {exc}") from None
        return bitmap_allocation(base64.b64decode(encoded), virtual_size)

    def stored_digests(self, uuid: str, generation: int) -> dict[str, str]:
        return digests.stored(self.journal.db, uuid, generation)

    def store_digests(self, uuid: str, generation: int, found: dict[str, str]) -> None:
        with self.journal.transaction() as db:
            digests.store(db, uuid, generation, found)

    def last_import(self, uuid: str) -> tuple[bytes | None, str | None, int | None]:
        return None, None, None  # XAPI records no image identity: deltas are applied as given

    # -- reading --------------------------------------------------------------------------

    def read_into(
        self, content: Any, offset: int, buf: memoryview, *, nowait: bool = False
    ) -> None:
        assert isinstance(content, PoolMap)
        if not content.holds_data(offset, len(buf)):
            buf[:] = bytes(len(buf))
            return
        reader = self._reader(content)
        if nowait:
            # Read-ahead keeps an in-order reader's next segments cached: served
            # here, on the caller's loop, with no thread hop per request.
            if reader.read_cached(offset, buf):
                return
            raise WouldBlock
        try:
            try:
                reader.read_into(offset, buf)
            except NbdError:
                if not reader.closed:
                    raise
                # Evicted by reads of other VDIs meanwhile: a fresh reader takes over.
                self._reader(content).read_into(offset, buf)
        except NbdError as exc:
            # A reader learns EIO (or EACCES for a certificate), the log learns why.
            log.warning("reading VDI %s over NBD: %s", content.uuid, exc)
            if exc.errno == errno.EACCES:
                raise AccessDenied(str(exc)) from None
            raise PoolError(f"reading VDI {content.uuid} over NBD: {exc}") from None

    def _reader(self, content: PoolMap) -> NbdReader:
        uuid = content.uuid
        with self._lock:
            reader = self._readers.get(uuid)
            if reader is not None and reader.size == content.virtual_size:
                self._readers.move_to_end(uuid)
                return reader
            if reader is not None:
                reader.close()  # resized
            wanted = content.holds_data if content.immutable and content.exact else None
            reader = self._readers[uuid] = NbdReader(
                lambda: self.nbd_target(uuid),
                content.virtual_size,
                connections=NBD_CONNECTIONS,
                segment=NBD_SEGMENT,
                cache_segments=NBD_CACHE_SEGMENTS,
                readahead=NBD_READAHEAD,
                wanted=wanted,
                max_age=None if content.immutable else LIVE_SEGMENT_AGE,
            )
            while len(self._readers) > READERS:
                _, evicted = self._readers.popitem(last=False)
                evicted.close()
            return reader

    def nbd_target(self, uuid: str) -> NbdTarget:
        """Where to read a VDI over NBD now (the export name carries the session)."""
        infos = self.session.call("VDI.get_nbd_info", self.ref(uuid))
        if not infos:
            raise PoolError(
                f"the pool offers no NBD for VDI {uuid}: give a network the purpose 'nbd'"
                " (xe network-param-add param-name=purpose param-key=nbd uuid=...)"
            )
        info = infos[0]
        return NbdTarget(
            address=info["address"],
            port=int(info["port"]),
            exportname=info["exportname"],
            cert_pem=info.get("cert") or None,
            subject=info.get("subject") or None,
        )

    def keep_readable(self, content: Any) -> _Pin:
        return _Pin()  # the pool owns its data; deleting a snapshot under a reader is XAPI's

    # -- changing -------------------------------------------------------------------------

    def writer(
        self,
        uuid: str | None,
        *,
        replace: bool = False,
        new_vdi: tuple[str, int] | None = None,
        bulk: bool = False,
    ) -> Any:
        from vdifs.storage.xapi.upload import PoolWriter

        return PoolWriter(self, uuid, replace=replace, new_vdi=new_vdi)

    def default_sr(self) -> str:
        if self.address.sr is not None:
            for ref, sr in self.session.call("SR.get_all_records").items():
                if sr["uuid"] == self.address.sr:
                    return str(ref)
            raise NotFound(f"no SR {self.address.sr} in the pool")
        pools = self.session.call("pool.get_all")
        ref = str(self.session.call("pool.get_default_SR", pools[0]))
        if ref == NULL_REF:
            raise InvalidArgument("the pool has no default SR: add ?sr=<uuid> to the address")
        return ref

    def create_vdi(self, name: str, size: int, description: str = "") -> VdiRecord:
        """A VDI in the default SR (or ``?sr=``), with changed-block tracking on, so
        that its snapshots have deltas."""
        check_name(name)
        if size <= 0:
            raise InvalidArgument("a VDI needs a size above zero")
        size = ceil_div(size, BLOCK_SIZE) * BLOCK_SIZE  # as SM rounds VHD VDIs
        ref = self.session.call(
            "VDI.create",
            {
                "name_label": name,
                "name_description": description,
                "SR": self.default_sr(),
                "virtual_size": str(size),
                "type": "user",
                "sharable": False,
                "read_only": False,
                "other_config": {},
                "xenstore_data": {},
                "sm_config": {},
                "tags": [],
            },
        )
        self.session.call("VDI.enable_cbt", ref)
        return self._after(self.session.call("VDI.get_uuid", ref))

    def _after(self, uuid: str) -> VdiRecord:
        self.reload()
        return self.get_vdi(uuid)

    def snapshot(
        self, uuid: str, name: str | None = None, description: str | None = None
    ) -> VdiRecord:
        record = self.get_vdi(uuid)
        if record.is_a_snapshot:
            raise InvalidArgument(f"{uuid} is a snapshot: XAPI snapshots only live VDIs")
        ref = self.session.call("VDI.snapshot", self.ref(uuid), {})
        if name is not None:
            check_name(name)
            self.session.call("VDI.set_name_label", ref, name)
        if description is not None:
            self.session.call("VDI.set_name_description", ref, description)
        return self._after(self.session.call("VDI.get_uuid", ref))

    def clone(self, uuid: str, name: str | None = None) -> VdiRecord:
        ref = self.session.call("VDI.clone", self.ref(uuid), {})
        if name is not None:
            check_name(name)
            self.session.call("VDI.set_name_label", ref, name)
        return self._after(self.session.call("VDI.get_uuid", ref))

    def destroy(self, uuid: str) -> None:
        self.session.call("VDI.destroy", self.ref(uuid))
        self.forget(uuid)
        self.reload()

    def forget(self, uuid: str) -> None:
        """Drop what this process holds of a VDI's content (it changed or went)."""
        with self._lock:
            self._maps.pop(uuid, None)
            reader = self._readers.pop(uuid, None)
        if reader is not None:
            reader.close()

    def delete_snapshot(
        self, uuid: str, *, children: bool = False, only_children: bool = False
    ) -> list[str]:
        if not self.get_vdi(uuid).is_a_snapshot:
            raise InvalidArgument(f"{uuid} is not a snapshot (use vdifs vdi destroy)")
        doomed = deletion_order(uuid, [], children=children, only_children=only_children)
        for victim in doomed:
            self.destroy(victim)
        return doomed

    def data_destroy(self, uuid: str) -> VdiRecord:
        if not self.get_vdi(uuid).is_a_snapshot:
            raise InvalidArgument(f"{uuid} is not a snapshot: only snapshots become checkpoints")
        self.session.call("VDI.data_destroy", self.ref(uuid))
        with self._lock:
            self._maps.pop(uuid, None)
        return self._after(uuid)

    def set_name(self, uuid: str, name: str) -> None:
        check_name(name)
        self.session.call("VDI.set_name_label", self.ref(uuid), name)
        self.reload()

    def resize(self, uuid: str, size: int) -> VdiRecord:
        record = self.get_vdi(uuid)
        if record.is_a_snapshot:
            raise ReadOnly(f"VDI {uuid} is a snapshot: it cannot be resized")
        size = ceil_div(size, BLOCK_SIZE) * BLOCK_SIZE
        if size < record.virtual_size:
            raise InvalidArgument(f"VDI {uuid} can only grow")
        if size > record.virtual_size:
            self.session.call("VDI.resize", self.ref(uuid), str(size))
        return self._after(uuid)

    def check_not_in_use(self, uuid: str) -> None:
        if uuid in self._view.attached:
            raise Busy(f"VDI {uuid} is attached to a running VM: shut it down or import elsewhere")

    # -- imports ----------------------------------------------------------------------------

    def import_lock(self, key: str) -> _Pin:
        """One import per target on this host (a flock beside the scratch space)."""
        fd = import_lock_fd(Path(self._scratch.name).parent, key)
        return _Pin(lambda: os.close(fd))

    def scratch_file(self) -> tuple[Path, int]:
        fd, name = tempfile.mkstemp(suffix=".upload", dir=self._scratch.name)
        return Path(name), fd

    # -- the repository ---------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "backend": "xapi",
            "pool": str(self.address),
            "vms": len(self._view.vms),
            "vdis_attached_to_running_vms": len(self._view.attached),
        }

    def garbage_collect(self) -> tuple[int, int]:
        raise Unsupported("a pool reclaims its own space (XAPI's SR.scan and coalesce)")

    def space(self) -> tuple[int, int, int]:
        total = free = 0
        with contextlib.suppress(VdifsError):
            for sr in self.session.call("SR.get_all_records").values():
                if self.address.sr in (None, sr.get("uuid")) and sr.get("content_type") != "iso":
                    size, used = (
                        int(sr.get("physical_size", 0)),
                        int(sr.get("physical_utilisation", 0)),
                    )
                    total, free = total + size, free + max(0, size - used)
        return 4096, total // 4096, free // 4096

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            readers, self._readers = list(self._readers.values()), OrderedDict()
        for reader in readers:
            reader.close()
        self.session.logout()
        self._scratch.cleanup()


class _ScratchDir:
    """This process's directory for staged uploads, flocked while it lives, so a
    later process removes what a crashed one left."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def cleanup(self) -> None:
        if self._fd >= 0:
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._fd)
            self._fd = -1


def _scratch_dir(base: Path) -> _ScratchDir:
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in base.glob("vdifs-*"):
        try:
            fd = os.open(stale, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live process's
        finally:
            os.close(fd)
        log.info("removing %s, left by a process that is gone", stale)
        shutil.rmtree(stale, ignore_errors=True)
    # Locked before it takes a name the sweep above looks at.
    fresh = _ScratchDir(Path(tempfile.mkdtemp(prefix=".new-", dir=base)))
    final = fresh.path.with_name("vdifs-" + fresh.path.name.removeprefix(".new-"))
    fresh.path.rename(final)
    fresh.path, fresh.name = final, str(final)
    return fresh


def _state_home() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")


def _read_head(read: Any) -> tuple[int, list[int]]:
    """The BAT from the head of a VHD stream: footer, header, then the table."""
    head = bytearray()
    try:
        while (need := vhd_parse.metadata_length(head)) > len(head):
            piece = read(need - len(head))
            if not piece:
                raise PoolError(f"export_raw_vdi ended after {len(head)} bytes of the VHD head")
            head += piece
        return vhd_parse.allocated_blocks(head)
    except (NotStreamable, MalformedImage, Unsupported) as exc:
        raise PoolError(f"export_raw_vdi sent a VHD head vdifs cannot read: {exc}") from None
