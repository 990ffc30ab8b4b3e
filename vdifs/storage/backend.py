"""The one protocol every storage backend implements, and all that the layers above use.

A backend keeps VDIs (disks and snapshots), VMs, and the history of imports.
The tree, the exports, the imports and the CLI see it only through
:class:`Backend`; nothing above ``vdifs/storage`` knows whether the disks live
in the embedded SR (``storage/local``), in memory (the test suite's second
backend) or in a pool.  A backend is added by implementing this protocol and
passing the contract suite in ``tests/storage``.

The content of one state of a disk is a :class:`ContentMap`: which 64 KiB
chunks hold data (a full image's allocation) and which differ from another
state (a delta's), from whatever the backend knows (chunk identity here,
changed-block tracking for a pool).  Reading takes the map of the state it
reads, so an open file keeps reading the state it opened, and
:meth:`Backend.keep_readable` keeps that state's data from being reclaimed
while it is open.

What a backend cannot do, it says with :class:`Capabilities` (and the
operation raises :class:`~vdifs.errors.Unsupported`), never by missing a
method.  Methods may block (disk, network): the FUSE adapter calls them off
its event loop, except :meth:`Backend.read_into` with ``nowait=True``, which
must either answer from memory or the page cache at once or raise
:class:`WouldBlock`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vdifs.errors import InvalidArgument, NotFound
from vdifs.model import CHUNK_SIZE, SECTOR_SIZE, Allocation, VdiRecord, VmRecord


class WouldBlock(Exception):
    """A ``nowait`` read would have waited for the disk or the network (not a user error)."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond reading and listing."""

    writable: bool = True
    """Imports, live writes, snapshots, clones, destroy."""
    vms: bool = True
    """VM records, VM snapshots and revert."""
    garbage_collection: bool = True
    """``vdifs sr gc``: data that no state references can be reclaimed on demand."""
    live_writes: bool = True
    """A live VDI's raw.img takes writes (a pool's disks change only through imports)."""
    remote: bool = False
    """Maps come over the network: the FUSE adapter asks for them off its event loop."""
    deltas_forward_only: bool = False
    """A delta's base must be older than what it applies to (changed-block tracking)."""
    snapshot_tree: bool = True
    """Snapshots form a tree (``parent``, ``current``, ``descendants``: libvirt's model);
    a pool's snapshots stand alone."""
    pinned_live_states: bool = True
    """A live VDI's state stays readable as it was after later writes; a pool reads a
    live disk as it is now (its snapshots are what stays)."""
    import_identity: bool = True
    """``last_import`` remembers the image last imported (a pool keeps nothing of it)."""
    allocation_unit: int = CHUNK_SIZE
    """What a state's allocation is exact to (a pool knows 2 MiB blocks)."""
    size_unit: int = SECTOR_SIZE
    """Virtual sizes are rounded up to a multiple of this (XAPI's VHD SRs: 2 MiB)."""


class ContentMap(Protocol):
    """What one state of a disk holds (immutable)."""

    @property
    def virtual_size(self) -> int: ...

    @property
    def chunk_count(self) -> int:
        """Chunks holding data (not zero)."""
        ...

    @property
    def footprint(self) -> int:
        """Bytes of memory this map holds (what a cache of states counts)."""
        ...

    def allocation(self) -> Allocation:
        """Every chunk that holds data: what a full image carries."""
        ...

    def diff(self, base: Any) -> Allocation:
        """Chunks that differ from ``base`` (a map of the same backend), zeroed ones
        included: what a delta carries.  Chunks past the smaller disk compare with zeros."""
        ...

    def holds_data(self, offset: int, length: int) -> bool:
        """Whether the disk's range may hold data: False only when it is known to
        read as zeros (without reading it)."""
        ...


class Pin(Protocol):
    """Something held until released (an open view's data, an import's target)."""

    def release(self) -> None: ...


class Writer(Protocol):
    """Changes to one VDI (or a new one), invisible until :meth:`commit`.

    ``write_chunk(s)`` in any order, the last write of a chunk winning; a
    commit applies all of them at once and bumps the VDI's generation, or
    raises and leaves the VDI as it was.  With ``replace`` every chunk not
    written becomes zero (a full image).  Usable as a context manager that
    aborts what was not committed.
    """

    uuid: str
    virtual_size: int
    expect_generation: int | None
    """If set, the commit fails (Busy) unless the VDI is still at this generation."""
    import_identity: bytes | None
    import_name: str | None
    """Recorded with the commit: the image this write imports (a delta's base check)."""
    chunks_written: int
    notes: list[str]
    """What the backend adds to the import's status (a pool's safety snapshot)."""

    def grow(self, size: int) -> None: ...

    def write_chunk(self, chunk: int, data: bytes | bytearray | memoryview) -> None: ...

    def write_chunks(self, first: int, data: bytes | bytearray | memoryview) -> None: ...

    def staged_chunk(self, chunk: int) -> bytes | None:
        """This writer's content for a chunk, or None if it has not written it."""
        ...

    def commit(self) -> VdiRecord: ...

    def abort(self) -> None: ...

    def __enter__(self) -> Writer: ...

    def __exit__(self, *exc: object) -> None: ...


class ImportLog(Protocol):
    """Every import attempt and its outcome: ``import/.status`` and ``vdifs import-status``."""

    def start(self, name: str, target: str | None, fmt: str, received: int) -> int: ...

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
    ) -> None: ...

    def forget(self, import_id: int) -> None: ...

    def record_digest(self, import_id: int, sha256: str) -> None:
        """The sha256 of the disk as the import left it (computed after it)."""
        ...

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest first: id, name, target, format, state, error, errno, ..."""
        ...

    def mark_interrupted(self) -> None:
        """Attempts left running by a process that is gone are recorded as failed."""
        ...


class VmStore(Protocol):
    """VMs: disks at device names, coherent snapshots, revert (libvirt's model)."""

    def all(self, *, snapshots: bool = True) -> list[VmRecord]: ...

    def get(self, uuid: str) -> VmRecord: ...

    def resolve(
        self, key: str, *, snapshot: bool | None = None, of: str | None = None
    ) -> VmRecord: ...

    def create(self, name: str, description: str = "", metadata: str = "") -> VmRecord: ...

    def set_metadata(self, vm: str, metadata: str) -> None: ...

    def attach(self, vm: str, vdi: str, device: str) -> None: ...

    def detach(self, vm: str, device: str) -> None: ...

    def destroy(self, vm: str) -> None: ...

    def snapshot(self, vm: str, name: str | None = None, description: str = "") -> VmRecord: ...

    def revert(self, snapshot: str) -> VmRecord: ...

    def set_name(self, uuid: str, name: str) -> None: ...

    def delete_snapshot(
        self, uuid: str, *, children: bool = False, only_children: bool = False
    ) -> list[str]: ...


class Backend(Protocol):
    """A storage repository: the VDIs, VMs and imports one mount or CLI call works on."""

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def vms(self) -> VmStore: ...

    @property
    def imports(self) -> ImportLog: ...

    @property
    def description(self) -> str:
        """What it is, for messages and the mount's fsname (``local:/path``)."""
        ...

    # -- records ---------------------------------------------------------------

    def data_version(self) -> int:
        """Changes whenever any record may have changed (by this process or another)."""
        ...

    def list_vdis(self) -> list[VdiRecord]: ...

    def get_vdi(self, uuid: str) -> VdiRecord: ...

    def descendants(self, uuid: str) -> list[str]:
        """A snapshot's descendants in the snapshot tree, deepest first."""
        ...

    def state(self, uuid: str, known: VdiRecord | None = None) -> tuple[VdiRecord, ContentMap]:
        """A VDI's record and the map of that very state, read consistently.

        ``known``: a record the caller holds; returned as is if still current.
        """
        ...

    def last_import(self, uuid: str) -> tuple[bytes | None, str | None, int | None]:
        """(identity, file name, generation) of the image last imported into a VDI."""
        ...

    def stored_digests(self, uuid: str, generation: int) -> dict[str, str]:
        """sha256 hex digests kept for a state's files (``raw.img``, ``full.vhd``,
        ``delta-from/<base>.vhd``...): what SHA256SUMS lists."""
        ...

    def store_digests(self, uuid: str, generation: int, digests: dict[str, str]) -> None: ...

    # -- reading ---------------------------------------------------------------

    def read_into(
        self, content: ContentMap, offset: int, buf: memoryview, *, nowait: bool = False
    ) -> None:
        """Fill ``buf`` with the disk's bytes at ``offset`` in the state ``content`` maps."""
        ...

    def keep_readable(self, content: ContentMap) -> Pin:
        """Keep a state's data from being reclaimed until released (open files)."""
        ...

    # -- changing --------------------------------------------------------------

    def writer(
        self,
        uuid: str | None,
        *,
        replace: bool = False,
        new_vdi: tuple[str, int] | None = None,
        bulk: bool = False,
    ) -> Writer:
        """Changes to VDI ``uuid``, or to a new VDI ``(name, size)`` created at commit.

        ``bulk``: a large sequential import (the backend may bypass caches).
        """
        ...

    def create_vdi(self, name: str, size: int, description: str = "") -> VdiRecord: ...

    def snapshot(
        self, uuid: str, name: str | None = None, description: str | None = None
    ) -> VdiRecord: ...

    def clone(self, uuid: str, name: str | None = None) -> VdiRecord: ...

    def destroy(self, uuid: str) -> None: ...

    def delete_snapshot(
        self, uuid: str, *, children: bool = False, only_children: bool = False
    ) -> list[str]: ...

    def data_destroy(self, uuid: str) -> VdiRecord: ...

    def set_name(self, uuid: str, name: str) -> None: ...

    def resize(self, uuid: str, size: int) -> VdiRecord: ...

    # -- imports ----------------------------------------------------------------

    def import_lock(self, key: str) -> Pin:
        """One import per target (a VDI uuid, or ``new-<name>``): Busy if held elsewhere."""
        ...

    def scratch_file(self) -> tuple[Path, int]:
        """A new file to stage an upload in: ``(path, fd)``; the caller removes it.

        Scratch files that a crashed process left are the backend's to clean.
        """
        ...

    # -- the repository ---------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What ``vdifs sr info`` shows besides the counts of VDIs (JSON-able)."""
        ...

    def garbage_collect(self) -> tuple[int, int]:
        """Reclaim data no state references: (objects removed, bytes freed).

        Only where ``capabilities.garbage_collection``; Unsupported elsewhere.
        """
        ...

    def space(self) -> tuple[int, int, int]:
        """(block size, blocks, free blocks) for statfs."""
        ...

    def close(self) -> None: ...


def resolve_vm(
    vms: VmStore, key: str, *, snapshot: bool | None = None, of: str | None = None
) -> VmRecord:
    """A VM (or VM snapshot) by uuid, or by a name exactly one candidate has."""
    try:
        record = vms.get(key)
    except NotFound:
        candidates = [
            r
            for r in vms.all()
            if r.name_label == key
            and (snapshot is None or r.is_a_snapshot == snapshot)
            and (of is None or r.snapshot_of == of)
        ]
        if len(candidates) == 1:
            return candidates[0]
        what = "VM snapshot" if snapshot else "VM"
        if not candidates:
            raise NotFound(f"no {what} with uuid or name {key!r}") from None
        raise InvalidArgument(
            f"{what} name {key!r} is ambiguous: use a uuid: "
            + ", ".join(r.uuid for r in candidates)
        ) from None
    if snapshot is not None and record.is_a_snapshot != snapshot:
        raise InvalidArgument(f"{key} is {'not ' if snapshot else ''}a VM snapshot")
    return record


def deletion_order(
    uuid: str, descendants: list[str], *, children: bool, only_children: bool
) -> list[str]:
    """What ``delete_snapshot`` removes, in a safe order: the snapshot alone (default),
    its subtree (``children``, libvirt's ``--children``) or only its subtree
    (``only_children``); ``descendants`` come deepest first."""
    doomed = list(descendants) if (children or only_children) else []
    if not only_children:
        doomed.append(uuid)
    return doomed
