"""The directory tree users see, without FUSE.

Entries are :mod:`vdifs.fs.nodes` (one frozen dataclass per kind, dispatched
with ``match``), so that the adapter can give each a stable inode.

The tree holds the SR's records as of the last :meth:`Tree.refresh` and caches
disk states and exports per VDI generation: a changed VDI has a new
generation, hence new cache entries, and an open handle keeps the export it
opened.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import stat
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from vdifs.checksums import file_digest, sums_size, sums_text
from vdifs.errors import AlreadyExists, NotFound, ReadOnly, VdifsError
from vdifs.exports import IMAGE_FORMATS, DiskState, Export, format_supports
from vdifs.formats.volume import VolumeLayout
from vdifs.fs.nodes import (
    BY_NAME,
    IMPORT,
    STATUS_DIR,
    VDIS,
    VMS,
    ByNameDir,
    ChecksumsFile,
    CurrentLink,
    DeltaImage,
    DeltasDir,
    FullImage,
    ImportDir,
    InfoFile,
    Link,
    LvImage,
    LvmDir,
    LvmNotesFile,
    NameLink,
    Node,
    PartitionImage,
    PartitionsDir,
    PartitionTableFile,
    RawImage,
    Root,
    SnapshotLink,
    SnapshotsDir,
    SnapshotView,
    StatusDir,
    StatusFile,
    UploadFile,
    VdiDir,
    VdisDir,
    VgDir,
    VgMetadataFile,
    VmCurrentLink,
    VmDir,
    VmDiskLink,
    VmDisksDir,
    VmInfoFile,
    VmsDir,
    VmSnapshotDir,
    VmSnapshotDiskLink,
    VmSnapshotDisksDir,
    VmSnapshotInfoFile,
    VmSnapshotsDir,
    VmSnapshotXml,
    VolumeNode,
)
from vdifs.imports.uploads import Uploads
from vdifs.model import VdiRecord, VmRecord, ceil_div, iso_to_unix
from vdifs.storage.backend import Backend
from vdifs.volumes import DiskVolumes, analyse

log = logging.getLogger(__name__)

STATUS_HISTORY = 100  # imports whose outcome import/.status/ shows

IMMUTABLE_TIMEOUT = 300.0  # snapshot files never change
MUTABLE_TIMEOUT = 1.0  # the mount shows CLI changes within a second


@dataclass(frozen=True)
class Attr:
    mode: int
    size: int
    mtime_ns: int
    blocks: int = 0  # 512-byte units actually holding data
    timeout: float = MUTABLE_TIMEOUT
    target: str | None = None  # symlinks


def escape_name(name: str) -> str:
    """A name_label as a file name: '/' cannot appear in one."""
    return name.replace("%", "%25").replace("/", "%2F")


NAME_MAX = 255  # bytes in a file name (Linux)


def display_names(items: Iterable[tuple[str, str]], reserved: Iterable[str] = ()) -> dict[str, str]:
    """File names for ``(name_label, uuid)`` pairs: one each, unique, at most 255 bytes.

    A name held by one item only is shown as is.  Repeated (or reserved, or
    too long) names get ``~`` and the first 8 characters of the uuid, or the
    whole uuid where that is taken too (a VDI may itself be named
    ``dup~1234abcd``), and finally a counter.  Derived, never stored: the
    same records always give the same names.
    """
    pairs = sorted((escape_name(name), uuid) for name, uuid in items)
    counts = Counter(shown for shown, _ in pairs)
    out: dict[str, str] = {}
    taken = set(reserved)
    suffixed: list[tuple[str, str]] = []
    for shown, uuid in pairs:
        if counts[shown] == 1 and shown not in taken and _fits(shown):
            out[shown] = uuid
        else:
            suffixed.append((shown, uuid))
    taken |= out.keys()
    for shown, uuid in suffixed:
        for suffix in _suffixes(uuid):
            candidate = _clip(shown, NAME_MAX - len(suffix)) + suffix
            if candidate not in taken:
                taken.add(candidate)
                out[candidate] = uuid
                break
    return out


def _fits(name: str) -> bool:
    return len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX


def _clip(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes of UTF-8, on a character boundary."""
    while not len(name.encode("utf-8", "surrogateescape")) <= limit:
        name = name[:-1]
    return name


def _suffixes(uuid: str) -> Iterator[str]:
    yield f"~{uuid[:8]}"
    yield f"~{uuid}"
    for n in itertools.count(2):
        yield f"~{uuid}~{n}"


SnapshotFolder = SnapshotsDir | VmSnapshotsDir


def _by_name(entry: tuple[str, Node]) -> str:
    return entry[0]


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


class Tree:
    # Bounded by the block-map bytes they hold, not by count: a thousand small
    # VDIs all stay cached (ls -lR), a few huge ones do not pile up.
    STATE_CACHE_BYTES = 256 << 20
    STATE_CACHE_MAX = 8192
    EXPORT_CACHE = 8192  # an export holds a layout (small) over a cached state

    def __init__(
        self,
        sr: Backend,
        *,
        read_only: bool = False,
        snapshot_admin: bool = False,
        mountpoint: str | None = None,
    ) -> None:
        self.sr = sr
        self.read_only = read_only
        self.snapshot_admin = snapshot_admin
        self.vm_model = sr.vms
        self.records: dict[str, VdiRecord] = {}
        self.vms: dict[str, VmRecord] = {}
        self.by_lineage: dict[str, list[str]] = {}
        self.names: dict[str, str] = {}
        self.changed_ns = time.time_ns()
        self._data_version = -1
        self._states: OrderedDict[str, DiskState] = OrderedDict()  # by VDI uuid
        self._state_bytes = 0
        self._exports: OrderedDict[tuple[str, str, str | None], Export] = OrderedDict()
        # Attributes of files, valid while the records they derive from are equal
        # (ls -lR: a layout and an info.json are built once per state, not per stat).
        self._file_attrs: dict[Node, tuple[tuple[VdiRecord, ...], Attr]] = {}
        # Partitions and logical volumes found on a disk, per (uuid, generation).
        self._volumes: dict[tuple[str, int], DiskVolumes] = {}
        self.uploads = Uploads(sr, read_only, mountpoint)
        self.refresh(force=True)

    # -- refreshing from the SR ---------------------------------------------------

    def refresh(self, *, force: bool = False) -> set[str]:
        """Reload records if the SR changed; return the VDI uuids that changed."""
        version = self.sr.data_version()
        if not force and version == self._data_version:
            return set()
        self._data_version = version
        old = self.records
        records = {r.uuid: r for r in self.sr.list_vdis()}
        changed = {u for u in old.keys() | records.keys() if old.get(u) != records.get(u)}
        self.records = records
        self.vms = {v.uuid: v for v in self.vm_model.all()}
        lineage: dict[str, list[str]] = {}
        for r in records.values():
            lineage.setdefault(r.lineage, []).append(r.uuid)
        self.by_lineage = lineage
        self.names = display_names(
            (r.name_label, r.uuid) for r in records.values() if not r.is_a_snapshot
        )
        self.changed_ns = time.time_ns()
        if changed:
            self._file_attrs = {
                node: attr
                for node, attr in self._file_attrs.items()
                if isinstance(node, InfoFile | RawImage | FullImage | DeltaImage)
                and node.uuid in records
            }
        return changed

    def record(self, uuid: str) -> VdiRecord:
        try:
            return self.records[uuid]
        except KeyError:
            raise NotFound(f"no VDI {uuid}") from None

    def vm(self, uuid: str) -> VmRecord:
        try:
            return self.vms[uuid]
        except KeyError:
            raise NotFound(f"no VM {uuid}") from None

    # -- states and exports ---------------------------------------------------------

    def state(self, uuid: str) -> DiskState:
        """The VDI's state as of the last refresh (block map loaded once per generation).

        One state per VDI is kept: an older generation is never asked for again
        (an open handle holds its own), and a disk written all day would
        otherwise fill the cache with the states it went through.
        """
        record = self.record(uuid)
        state = self._states.get(uuid)
        if state is not None and state.record.generation >= record.generation:
            self._states.move_to_end(uuid)
            return state
        fresh, content = self.sr.state(uuid, known=record)
        # fresh may be newer than the last refresh: the SR moved on; serve it.
        if state is not None:
            self._state_bytes -= state.content.footprint
        state = self._states[uuid] = DiskState(fresh, content)
        self._states.move_to_end(uuid)
        self._state_bytes += content.footprint
        while len(self._states) > 1 and (
            self._state_bytes > self.STATE_CACHE_BYTES or len(self._states) > self.STATE_CACHE_MAX
        ):
            _uuid, evicted = self._states.popitem(last=False)
            self._state_bytes -= evicted.content.footprint
        return state

    def export(self, uuid: str, fmt: str, base: str | None = None) -> Export:
        state = self.state(uuid)
        base_state = self.state(base) if base is not None else None
        key = (uuid, fmt, base)
        export = self._exports.get(key)
        if export is None or export.state is not state or export.base is not base_state:
            export = self._exports[key] = Export(self.sr, state, fmt, base_state)
            while len(self._exports) > self.EXPORT_CACHE:
                self._exports.popitem(last=False)
        self._exports.move_to_end(key)
        return export

    def delta_bases(self, uuid: str) -> list[str]:
        """Snapshots (checkpoints included) in this VDI's lineage, itself excluded;
        only older ones where the backend tracks changes forward (CBT).  XAPI's
        snapshot times have one-second resolution: two taken in the same second are
        both listed, and the one XAPI cannot answer is ENOENT when looked up."""
        record = self.record(uuid)
        forward_only = self.sr.capabilities.deltas_forward_only and record.is_a_snapshot
        return sorted(
            u
            for u in self.by_lineage.get(record.lineage, ())
            if u != uuid
            and self.records[u].is_a_snapshot
            and not (forward_only and self.records[u].changed_ns > record.changed_ns)
        )

    # -- names inside snapshot directories ---------------------------------------------

    def vdi_snapshot_names(self, vdi: str) -> dict[str, str]:
        snaps = [self.records[u] for u in self.record(vdi).snapshots if u in self.records]
        return display_names(((s.name_label, s.uuid) for s in snaps), reserved=("current",))

    def vm_snapshot_names(self, vm: str) -> dict[str, str]:
        snaps = [self.vms[u] for u in self.vm(vm).snapshots if u in self.vms]
        return display_names((s.name_label, s.uuid) for s in snaps)

    # -- snapshots/ with -o snapshot_admin (blocking: call these off the loop) ----------

    def snapshot_names(self, folder: SnapshotFolder) -> dict[str, str]:
        match folder:
            case SnapshotsDir(vdi):
                return self.vdi_snapshot_names(vdi)
            case VmSnapshotsDir(vm):
                return self.vm_snapshot_names(vm)

    def _snapshot_named(self, folder: SnapshotFolder, name: str) -> str:
        snap = self.snapshot_names(folder).get(name)
        if snap is None:
            raise NotFound(name)
        return snap

    def take_snapshot(self, folder: SnapshotFolder, name: str) -> Node:
        """``mkdir snapshots/<name>``: a snapshot of the VDI, or of the VM with its disks."""
        if name in self.snapshot_names(folder) or name == "current":
            raise AlreadyExists(name)
        match folder:
            case SnapshotsDir(vdi):
                return SnapshotView(vdi, self.sr.snapshot(vdi, name).uuid)
            case VmSnapshotsDir(vm):
                return VmSnapshotDir(vm, self.vm_model.snapshot(vm, name).uuid)

    def delete_snapshot(self, folder: SnapshotFolder, name: str) -> str:
        """``rmdir snapshots/<name>``: one point in time, never its children."""
        snap = self._snapshot_named(folder, name)
        match folder:
            case SnapshotsDir():
                self.sr.delete_snapshot(snap)
            case VmSnapshotsDir():
                self.vm_model.delete_snapshot(snap)
        return snap

    def rename_snapshot(self, folder: SnapshotFolder, old: str, new: str) -> None:
        snap = self._snapshot_named(folder, old)
        if new in self.snapshot_names(folder) or new == "current":
            raise AlreadyExists(new)
        match folder:
            case SnapshotsDir():
                self.sr.set_name(snap, new)
            case VmSnapshotsDir():
                self.vm_model.set_name(snap, new)

    # -- generated files ------------------------------------------------------------------

    def generated(self, node: Node) -> bytes:
        match node:
            case InfoFile(uuid):
                return _json(self.record(uuid).to_json())
            case StatusFile(name):
                try:
                    return _json(self.import_outcomes()[name])
                except KeyError:
                    raise NotFound(name) from None
            case VmInfoFile(uuid) | VmSnapshotInfoFile(uuid):
                return _json(self.vm(uuid).to_json())
            case VmSnapshotXml(uuid):
                return self.snapshot_xml(uuid)
            case PartitionTableFile(uuid):
                return self.volumes(uuid).table_json()
            case LvmNotesFile(uuid):
                return self.volumes(uuid).lvm_notes()
            case VgMetadataFile(uuid, vg):
                return self._group(uuid, vg).metadata_text.encode()
        raise NotFound(str(node))

    def snapshot_xml(self, uuid: str) -> bytes:
        """libvirt's ``<domainsnapshot>`` vocabulary for a VM snapshot."""
        snap = self.vm(uuid)
        created = iso_to_unix(snap.snapshot_time or snap.created)
        lines = [
            "<domainsnapshot>",
            f"  <name>{escape(snap.name_label)}</name>",
            f"  <description>{escape(snap.name_description)}</description>",
            "  <state>disk-snapshot</state>",
            f"  <creationTime>{created}</creationTime>",
        ]
        if snap.parent and snap.parent in self.vms:
            lines.append(
                f"  <parent><name>{escape(self.vms[snap.parent].name_label)}</name></parent>"
            )
        lines.append("  <memory snapshot='no'/>")
        lines.append("  <disks>")
        for device, vdi in sorted(snap.disks.items()):
            lines.append(
                f"    <disk name='{escape(device)}' snapshot='external'>"
                f"<source file='../../../../vdis/{vdi}/raw.img'/></disk>"
            )
        lines += ["  </disks>", f"  <domain><uuid>{snap.snapshot_of}</uuid></domain>"]
        lines.append("</domainsnapshot>")
        return ("\n".join(lines) + "\n").encode()

    def import_outcomes(self) -> dict[str, dict[str, Any]]:
        """The latest outcome of each recent import, by uploaded file name."""
        latest: dict[str, dict[str, Any]] = {}
        for item in self.sr.imports.recent(STATUS_HISTORY):
            latest.setdefault(item["name"], item)
        return latest

    # -- the directory structure --------------------------------------------------------

    def children(self, node: Node) -> list[tuple[str, Node]]:
        match node:
            case Root():
                return [("by-name", BY_NAME), ("import", IMPORT), ("vdis", VDIS), ("vms", VMS)]
            case VdisDir():
                return [(u, VdiDir(u)) for u in sorted(self.records)]
            case VdiDir(uuid):
                return self._vdi_entries(uuid, view=False)
            case SnapshotView(_owner, snap):
                return self._vdi_entries(snap, view=True)
            case DeltasDir(uuid):
                size = self.record(uuid).virtual_size
                deltas: list[tuple[str, Node]] = [
                    (f"{base}.{fmt}", DeltaImage(uuid, base, fmt))
                    for base in self.delta_bases(uuid)
                    for fmt in IMAGE_FORMATS
                    if format_supports(fmt, size)
                ]
                if self.checksum_names(ChecksumsFile(uuid, deltas=True)):
                    deltas.append(("SHA256SUMS", ChecksumsFile(uuid, deltas=True)))
                return deltas
            case PartitionsDir(uuid):
                found: list[tuple[str, Node]] = [("table.json", PartitionTableFile(uuid))]
                files = self.volumes(uuid).partition_files()
                return found + [(name, PartitionImage(uuid, name)) for name in files]
            case LvmDir(uuid):
                volumes = self.volumes(uuid)
                found = [(vg, VgDir(uuid, vg)) for vg in sorted(volumes.groups)]
                return found + ([("notes.txt", LvmNotesFile(uuid))] if volumes.lvm_notes() else [])
            case VgDir(uuid, vg):
                self._group(uuid, vg)
                found = [("metadata.txt", VgMetadataFile(uuid, vg))]
                lvs = self.volumes(uuid).volume_files(vg)
                return found + [(name, LvImage(uuid, vg, name)) for name in sorted(lvs)]
            case SnapshotsDir(vdi):
                out: list[tuple[str, Node]] = [
                    (n, SnapshotView(vdi, s) if self.snapshot_admin else SnapshotLink(vdi, s))
                    for n, s in self.vdi_snapshot_names(vdi).items()
                ]
                if self.record(vdi).current in self.records:
                    out.append(("current", CurrentLink(vdi)))
                return sorted(out, key=_by_name)
            case ByNameDir():
                return [(name, NameLink(name)) for name in sorted(self.names)]
            case ImportDir():
                return [(".status", STATUS_DIR)] + [
                    (name, UploadFile(name)) for name in self.uploads.visible()
                ]
            case StatusDir():
                return [(f"{name}.json", StatusFile(name)) for name in self.import_outcomes()]
            case VmsDir():
                return [(u, VmDir(u)) for u, v in sorted(self.vms.items()) if not v.is_a_snapshot]
            case VmDir(uuid):
                vm = self.vm(uuid)
                entries: list[tuple[str, Node]] = [
                    ("disks", VmDisksDir(uuid)),
                    ("info.json", VmInfoFile(uuid)),
                    ("snapshots", VmSnapshotsDir(uuid)),
                ]
                if vm.current in self.vms:
                    entries.append(("current", VmCurrentLink(uuid)))
                return entries
            case VmDisksDir(vm):
                return [(d, VmDiskLink(vm, d)) for d in sorted(self.vm(vm).disks)]
            case VmSnapshotsDir(vm):
                return sorted(
                    ((n, VmSnapshotDir(vm, s)) for n, s in self.vm_snapshot_names(vm).items()),
                    key=_by_name,
                )
            case VmSnapshotDir(_vm, snap):
                return [
                    ("disks", VmSnapshotDisksDir(snap)),
                    ("info.json", VmSnapshotInfoFile(snap)),
                    ("snapshot.xml", VmSnapshotXml(snap)),
                ]
            case VmSnapshotDisksDir(snap):
                return [(d, VmSnapshotDiskLink(snap, d)) for d in sorted(self.vm(snap).disks)]
        raise NotFound("not a directory")

    def _vdi_entries(self, uuid: str, *, view: bool) -> list[tuple[str, Node]]:
        record = self.record(uuid)
        entries: list[tuple[str, Node]] = [("info.json", InfoFile(uuid))]
        if record.data_destroyed:
            return entries  # a checkpoint: no data, only what deltas need
        entries += [("delta-from", DeltasDir(uuid, view)), ("raw.img", RawImage(uuid))]
        if self._may_hold_volumes(record):
            entries += [("partitions", PartitionsDir(uuid, view)), ("lvm", LvmDir(uuid, view))]
        for fmt in IMAGE_FORMATS:
            if format_supports(fmt, record.virtual_size):
                entries.append((f"full.{fmt}", FullImage(uuid, fmt)))
        if not record.is_a_snapshot and not view:
            entries.append(("snapshots", SnapshotsDir(uuid)))
        if record.is_a_snapshot:
            entries.append(("SHA256SUMS", ChecksumsFile(uuid)))
        return sorted(entries, key=_by_name)

    def _may_hold_volumes(self, record: VdiRecord) -> bool:
        """Whether a disk gets partitions/ and lvm/: not a disk that was never
        written (an empty block map holds no table and no PV, and a thousand empty
        directories would double what ``ls -lR`` asks of the mount), nor a
        checkpoint.  A remote backend's map is not loaded to list a directory."""
        if record.data_destroyed:
            return False
        return self.sr.capabilities.remote or self.state(record.uuid).content.chunk_count > 0

    def lookup(self, parent: Node, name: str) -> Node:
        # Direct answers for the large directories, without listing them.
        match parent:
            case VdisDir():
                if name in self.records:
                    return VdiDir(name)
                raise NotFound(name)
            case ImportDir():
                if name == ".status":
                    return STATUS_DIR
                if name in self.uploads.entries:
                    return UploadFile(name)
                raise NotFound(name)
            case DeltasDir(uuid):
                sums = ChecksumsFile(uuid, deltas=True)
                if name == "SHA256SUMS" and self.checksum_names(sums):
                    return sums
                base, dot, fmt = name.rpartition(".")
                if (
                    dot
                    and fmt in IMAGE_FORMATS
                    and base in self.delta_bases(uuid)
                    and format_supports(fmt, self.record(uuid).virtual_size)
                ):
                    return DeltaImage(uuid, base, fmt)
                raise NotFound(name)
        for child_name, child in self.children(parent):
            if child_name == name:
                return child
        raise NotFound(name)

    def exists(self, node: Node) -> bool:
        try:
            return self._exists(node)
        except NotFound:
            return False

    def _exists(self, node: Node) -> bool:
        match node:
            case Root() | VdisDir() | VmsDir() | ByNameDir() | ImportDir() | StatusDir():
                return True
            case StatusFile():  # a vanished outcome reads as ENOENT when generated
                return True
            case NameLink(name):
                return name in self.names
            case UploadFile(name):
                return name in self.uploads.entries
            case VmDir(vm) | VmInfoFile(vm) | VmDisksDir(vm) | VmSnapshotsDir(vm):
                return vm in self.vms
            case VmSnapshotInfoFile(vm) | VmSnapshotXml(vm) | VmSnapshotDisksDir(vm):
                return vm in self.vms
            case VmCurrentLink(vm):
                return self.vm(vm).current in self.vms
            case VmSnapshotDir(vm, snap):
                return snap in self.vm(vm).snapshots and snap in self.vms
            case VmDiskLink(vm, device) | VmSnapshotDiskLink(vm, device):
                return device in self.vm(vm).disks
            case SnapshotLink(vdi, snap) | SnapshotView(vdi, snap):
                return snap in self.record(vdi).snapshots and snap in self.records
            case CurrentLink(vdi):
                return self.record(vdi).current in self.records
            case RawImage(uuid) | FullImage(uuid) | DeltasDir(uuid):
                return not self.record(uuid).data_destroyed  # a checkpoint has no data
            case PartitionsDir(uuid) | LvmDir(uuid) | PartitionTableFile(uuid):
                return self._may_hold_volumes(self.record(uuid))
            case LvmNotesFile(uuid):
                return self._may_hold_volumes(self.record(uuid)) and bool(
                    self.volumes(uuid).lvm_notes()
                )
            case PartitionImage(uuid, name):
                return self._may_hold_volumes(self.record(uuid)) and (
                    name in self.volumes(uuid).partition_files()
                )
            case VgDir(uuid, vg) | VgMetadataFile(uuid, vg):
                return self._may_hold_volumes(self.record(uuid)) and vg in self.volumes(uuid).groups
            case LvImage(uuid, vg, name):
                if not self._may_hold_volumes(self.record(uuid)):
                    return False
                volumes = self.volumes(uuid)
                return vg in volumes.groups and name in volumes.volume_files(vg)
            case DeltaImage(uuid, base):
                return (
                    not self.record(uuid).data_destroyed
                    and base in self.records
                    and base in self.delta_bases(uuid)
                )
            case VdiDir(uuid) | InfoFile(uuid) | SnapshotsDir(uuid):
                return uuid in self.records
            case ChecksumsFile():
                return bool(self.checksum_names(node))
        raise NotFound(str(node))

    def _link_target(self, node: Link) -> str:
        match node:
            case NameLink(name):
                return f"../vdis/{self.names[name]}"
            case SnapshotLink(_vdi, snap):
                return f"../../{snap}"
            case CurrentLink(vdi):
                return f"../../{self.record(vdi).current}"
            case VmDiskLink(vm, device):
                return f"../../../vdis/{self.vm(vm).disks[device]}"
            case VmSnapshotDiskLink(snap, device):
                return f"../../../../../vdis/{self.vm(snap).disks[device]}"
            case VmCurrentLink(vm_uuid):
                current = self.vm(vm_uuid).current
                names = {s: n for n, s in self.vm_snapshot_names(vm_uuid).items()}
                return f"snapshots/{names[current]}" if current in names else ""
        raise NotFound(str(node))

    def attr(self, node: Node) -> Attr:
        if not self.exists(node):
            raise NotFound("gone")
        match node:
            case VdiDir(uuid) | SnapshotView(_, uuid):
                return Attr(stat.S_IFDIR | 0o755, 0, self.record(uuid).changed_ns)
            case ImportDir() | StatusDir():
                return Attr(stat.S_IFDIR | 0o700, 0, self.changed_ns)
            case (
                Root() | VdisDir() | VmsDir() | ByNameDir() | DeltasDir() | SnapshotsDir()
                | VmDir() | VmDisksDir() | VmSnapshotsDir() | VmSnapshotDir()
                | VmSnapshotDisksDir()
            ):  # fmt: skip
                return Attr(stat.S_IFDIR | 0o755, 0, self.changed_ns)
            case PartitionsDir(uuid) | LvmDir(uuid) | VgDir(uuid):
                return Attr(stat.S_IFDIR | 0o755, 0, self.record(uuid).changed_ns)
            case PartitionTableFile(uuid) | LvmNotesFile(uuid) | VgMetadataFile(uuid):
                return self._cached_attr(node, (self.record(uuid),), self._generated_attr)
            case PartitionImage(uuid) | LvImage(uuid):
                return self._cached_attr(node, (self.record(uuid),), self._image_attr)
            case ChecksumsFile(uuid):
                # Known from the names alone: stat never computes a digest.
                size = sums_size(self.checksum_names(node))
                record = self.record(uuid)
                return Attr(
                    stat.S_IFREG | 0o444, size, record.changed_ns, timeout=IMMUTABLE_TIMEOUT
                )
            case (
                NameLink() | SnapshotLink() | CurrentLink() | VmDiskLink()
                | VmSnapshotDiskLink() | VmCurrentLink()
            ):  # fmt: skip
                target = self._link_target(node)
                return Attr(stat.S_IFLNK | 0o777, len(target), self.changed_ns, target=target)
            case UploadFile(name):
                upload = self.uploads.get(name)
                # Never cached: an upload vanishes once applied, and the same name
                # must then be creatable again at once.
                blocks = ceil_div(upload.size, 512)
                return Attr(stat.S_IFREG | 0o600, upload.size, upload.mtime_ns, blocks, 0.0)
            case InfoFile(uuid):
                return self._cached_attr(node, (self.record(uuid),), self._generated_attr)
            case StatusFile() | VmInfoFile() | VmSnapshotInfoFile() | VmSnapshotXml():
                return self._generated_attr(node)
            case RawImage(uuid) | FullImage(uuid):
                return self._cached_attr(node, (self.record(uuid),), self._image_attr)
            case DeltaImage(uuid, base):
                sources = (self.record(uuid), self.record(base))
                return self._cached_attr(node, sources, self._image_attr)
        raise NotFound(str(node))

    def _cached_attr(
        self, node: Node, sources: tuple[VdiRecord, ...], build: Callable[[Node], Attr]
    ) -> Attr:
        cached = self._file_attrs.get(node)
        if cached is not None and cached[0] == sources:
            return cached[1]
        attr = build(node)
        self._file_attrs[node] = (sources, attr)
        return attr

    def _generated_attr(self, node: Node) -> Attr:
        mode = 0o400 if isinstance(node, StatusFile) else 0o444
        return Attr(stat.S_IFREG | mode, len(self.generated(node)), self.changed_ns)

    def _image_attr(self, node: Node) -> Attr:
        assert isinstance(node, RawImage | FullImage | DeltaImage | PartitionImage | LvImage)
        record = self.record(node.uuid)
        writable = isinstance(node, RawImage) and not self._read_only(record)
        immutable = self.is_immutable(node)
        export = self.open_export(node, write=False)
        return Attr(
            stat.S_IFREG | (0o600 if writable else 0o400),
            export.size,
            record.changed_ns,
            blocks=ceil_div(export.allocated_bytes, 512),
            timeout=IMMUTABLE_TIMEOUT if immutable else MUTABLE_TIMEOUT,
        )

    # -- SHA256SUMS -------------------------------------------------------------------------

    def checksum_names(self, node: ChecksumsFile) -> list[str]:
        """The files a SHA256SUMS lists: a snapshot's images, or its deltas from older
        snapshots; none for a live VDI or a checkpoint (their bytes are not fixed)."""
        record = self.records.get(node.uuid)
        if record is None or not record.is_a_snapshot or record.data_destroyed:
            return []
        fmts = [f for f in IMAGE_FORMATS if format_supports(f, record.virtual_size)]
        if not node.deltas:
            return ["raw.img", *(f"full.{fmt}" for fmt in fmts)]
        return [
            f"{base}.{fmt}"
            for base in self.delta_bases(node.uuid)
            if self.records[base].is_a_snapshot
            for fmt in fmts
        ]

    def checksums(
        self, node: ChecksumsFile, progress: Callable[[int], None] | None = None
    ) -> bytes:
        """The SHA256SUMS text, computing and storing the digests it lacks (blocking:
        it reads every file it lists the first time; call it off the loop)."""
        names = self.checksum_names(node)
        if not names:
            raise NotFound(f"{node.uuid} has no SHA256SUMS: it is not a snapshot with data")
        record, content = self.sr.state(node.uuid, known=self.records[node.uuid])
        keys = {name: ("delta-from/" if node.deltas else "") + name for name in names}
        stored = self.sr.stored_digests(node.uuid, record.generation)
        missing = {key: name for name, key in keys.items() if key not in stored}
        if missing:
            state = DiskState(record, content)
            computed: dict[str, str] = {}
            for key, name in missing.items():
                if node.deltas:
                    base_uuid, _, fmt = name.rpartition(".")
                    base = DiskState(*self.sr.state(base_uuid, known=self.records[base_uuid]))
                    export = Export(self.sr, state, fmt, base)
                else:
                    fmt = "raw" if name == "raw.img" else name.removeprefix("full.")
                    export = Export(self.sr, state, fmt)
                pin = self.sr.keep_readable(content)
                try:
                    computed[key] = file_digest(export, progress)
                finally:
                    pin.release()
            self.sr.store_digests(node.uuid, record.generation, computed)
            stored = {**stored, **computed}
        return sums_text(names, {name: stored[key] for name, key in keys.items()})

    def volumes(self, uuid: str) -> DiskVolumes:
        """The partitions and logical volumes of a VDI's current state (read from the
        disk in a thread by :meth:`warm_all` first; here only if it was not)."""
        found = self._volumes.get((uuid, self.record(uuid).generation))
        if found is None:
            log.debug("reading the partitions of %s on the event loop", uuid)
            found = self._analyse(uuid)
        return found

    def _analyse(self, uuid: str) -> DiskVolumes:
        """Read a disk's partition table and LVM metadata (blocking: off the loop)."""
        record, content = self.sr.state(uuid, known=self.records[uuid])

        def read_at(offset: int, length: int) -> bytes:
            length = max(0, min(length, record.virtual_size - offset))
            buf = bytearray(length)
            self.sr.read_into(content, offset, memoryview(buf))
            return bytes(buf)

        found = analyse(read_at, record.virtual_size)
        # Older states of this disk are not asked for again (open files pinned theirs).
        for key in [k for k in self._volumes if k[0] == uuid]:
            self._volumes.pop(key, None)
        self._volumes[(uuid, record.generation)] = found
        return found

    def _group(self, uuid: str, vg: str) -> Any:
        try:
            return self.volumes(uuid).groups[vg]
        except KeyError:
            raise NotFound(f"no volume group {vg} on {uuid}") from None

    def _read_only(self, record: VdiRecord) -> bool:
        return self.read_only or record.is_a_snapshot or not self.sr.capabilities.live_writes

    def needs_warming(self, node: Node) -> bool:
        """Whether ``node``'s attributes need what the tree has not loaded: a disk's
        partitions and volumes (read from the disk), or a remote backend's map
        (info.json too: reading a map can teach a backend more of the record)."""
        if isinstance(node, VolumeNode):
            record = self.records.get(node.uuid)
            if record is None or record.data_destroyed:
                return False
            if (node.uuid, record.generation) in self._volumes:
                return False
            if not self.sr.capabilities.remote and self.state(node.uuid).content.chunk_count == 0:
                # A disk of zeros holds no table and no PV: nothing to read (ls -lR).
                self._volumes[(node.uuid, record.generation)] = analyse(
                    lambda offset, length: bytes(length), record.virtual_size
                )
                return False
            return True
        if not self.sr.capabilities.remote:
            return False
        match node:
            case RawImage(uuid) | FullImage(uuid) | InfoFile(uuid):
                key: tuple[str, str, str | None] = (uuid, "raw", None)
            case DeltaImage(uuid, base, fmt):
                key = (uuid, fmt, base)
            case _:
                return False
        record = self.records.get(uuid)
        if record is None or record.data_destroyed:
            return False
        state = self._states.get(uuid)
        if state is None or state.record.generation < record.generation:
            return True
        export = self._exports.get(key)
        return key[2] is not None and (export is None or export.state is not state)

    def warm_all(self, nodes: list[Node]) -> None:
        """Fetch the maps these nodes' attributes need (a remote backend: off the loop).

        Only the backend is called: its caches then answer the loop's own
        calls at once.  The tree's structures are left to the loop.
        """
        for node in nodes:
            if not self.needs_warming(node):
                continue
            if isinstance(node, VolumeNode):
                self._analyse(node.uuid)
                continue
            match node:
                case RawImage(uuid) | FullImage(uuid) | InfoFile(uuid):
                    self.sr.state(uuid, known=self.records[uuid])
                case DeltaImage(uuid, base):
                    with contextlib.suppress(VdifsError):  # the loop reports it
                        _, content = self.sr.state(uuid, known=self.records[uuid])
                        content.diff(self.sr.state(base, known=self.records[base])[1])

    def is_immutable(self, node: Node) -> bool:
        """Whether a file's bytes can never change (its page cache may be kept)."""
        match node:
            case RawImage(uuid) | FullImage(uuid) | PartitionImage(uuid) | LvImage(uuid):
                return self.record(uuid).is_a_snapshot
            case DeltaImage(uuid, base):
                return self.record(uuid).is_a_snapshot and self.record(base).is_a_snapshot
        return False

    def open_export(self, node: Node, *, write: bool) -> Export:
        """The export a file handle pins at open."""
        if write:
            if not isinstance(node, RawImage):
                raise ReadOnly("only a live VDI's raw.img is writable")
            if self._read_only(self.record(node.uuid)):
                raise ReadOnly(
                    f"VDI {node.uuid} is read-only"
                    + ("" if self.sr.capabilities.live_writes else ": write through import/")
                )
        match node:
            case RawImage(uuid):
                return self.export(uuid, "raw")
            case FullImage(uuid, fmt):
                return self.export(uuid, fmt)
            case DeltaImage(uuid, base, fmt):
                return self.export(uuid, fmt, base)
            case PartitionImage(uuid, name):
                volumes = self.volumes(uuid)
                view = VolumeLayout(volumes.runs(volumes.partition_files()[name]))
                return Export(self.sr, self.state(uuid), "raw", view=view)
            case LvImage(uuid, vg, name):
                volumes = self.volumes(uuid)
                view = VolumeLayout(volumes.runs(volumes.volume_files(vg)[name]))
                return Export(self.sr, self.state(uuid), "raw", view=view)
        raise NotFound(str(node))

    def inode_nodes_of(self, uuid: str) -> list[Node]:
        """Every node whose content depends on this VDI (for cache invalidation)."""
        nodes: list[Node] = [VdiDir(uuid), InfoFile(uuid), RawImage(uuid), DeltasDir(uuid)]
        nodes += [FullImage(uuid, fmt) for fmt in IMAGE_FORMATS]
        nodes += [PartitionsDir(uuid), LvmDir(uuid), PartitionTableFile(uuid), LvmNotesFile(uuid)]
        for (owner, _generation), volumes in list(self._volumes.items()):
            if owner == uuid:
                nodes += [PartitionImage(uuid, name) for name in volumes.partition_files()]
                for vg in volumes.groups:
                    nodes += [VgDir(uuid, vg), VgMetadataFile(uuid, vg)]
                    nodes += [LvImage(uuid, vg, name) for name in volumes.volume_files(vg)]
        return nodes
