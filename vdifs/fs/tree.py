"""The directory tree users see, without FUSE.

Nodes are small tuples (``("raw", uuid)``, ``("delta", uuid, base, "vhd")``)
so that the adapter can give each a stable inode.  A directory that appears
at two paths (a snapshot's folder under ``vdis/`` and its view under a
VDI's ``snapshots/`` in admin mode) gets distinct nodes (a trailing
``"view"``), because Linux keeps one dentry per directory inode.

The tree holds the SR's records as of the last :meth:`Tree.refresh` and caches
disk states and exports per VDI generation: a changed VDI has a new
generation, hence new cache entries, and an open handle keeps the export it
opened.
"""

from __future__ import annotations

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

from vdifs.errors import NotFound, ReadOnly
from vdifs.exports import IMAGE_FORMATS, DiskState, Export, format_supports
from vdifs.imports.uploads import Uploads
from vdifs.model import VdiRecord, VmRecord, ceil_div, iso_to_unix
from vdifs.storage.backend import Backend

log = logging.getLogger(__name__)

Node = tuple[Any, ...]
ROOT: Node = ("root",)
VDIS: Node = ("vdis",)
VMS: Node = ("vms",)
BY_NAME: Node = ("by-name",)
IMPORT: Node = ("import",)
STATUS_DIR: Node = ("status-dir",)
STATUS_HISTORY = 100  # imports whose outcome import/.status/ shows

IMMUTABLE_TIMEOUT = 300.0  # snapshot files never change
MUTABLE_TIMEOUT = 1.0  # the mount shows CLI changes within a second

DIR_KINDS = frozenset(
    {
        "root", "vdis", "vms", "by-name", "import", "status-dir", "vdi", "deltas", "snapdir",
        "snapview", "vm", "vmdisks", "vmsnaps", "vmsnap", "vmsnapdisks",
    }
)  # fmt: skip
LINK_KINDS = frozenset({"name", "snaplink", "curlink", "vmdisk", "vmsnapdisk", "vmcurrent"})
GENERATED_KINDS = frozenset({"info", "status", "vminfo", "vmsnapinfo", "vmsnapxml"})
PRIVATE_DIRS = frozenset({"import", "status-dir"})


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


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


class Tree:
    # Bounded by the block-map bytes they hold, not by count: a thousand small
    # VDIs all stay cached (ls -lR), a few huge ones do not pile up.
    STATE_CACHE_BYTES = 256 << 20
    STATE_CACHE_MAX = 8192
    EXPORT_CACHE = 8192  # an export holds a layout (small) over a cached state

    def __init__(
        self, sr: Backend, *, read_only: bool = False, snapshot_admin: bool = False
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
        self.uploads = Uploads(sr, read_only)
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
            self._file_attrs = {n: a for n, a in self._file_attrs.items() if n[1] in records}
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
        """Snapshots (checkpoints included) in this VDI's lineage, itself excluded."""
        record = self.record(uuid)
        return sorted(
            u
            for u in self.by_lineage.get(record.lineage, ())
            if u != uuid and self.records[u].is_a_snapshot
        )

    # -- names inside snapshot directories ---------------------------------------------

    def vdi_snapshot_names(self, vdi: str) -> dict[str, str]:
        snaps = [self.records[u] for u in self.record(vdi).snapshots if u in self.records]
        return display_names(((s.name_label, s.uuid) for s in snaps), reserved=("current",))

    def vm_snapshot_names(self, vm: str) -> dict[str, str]:
        snaps = [self.vms[u] for u in self.vm(vm).snapshots if u in self.vms]
        return display_names((s.name_label, s.uuid) for s in snaps)

    def snapshot_owner(self, node: Node) -> tuple[str, str]:
        """``("vdi"|"vm", uuid)`` for a snapshots/ directory; NotFound otherwise."""
        if node[0] == "snapdir":
            return "vdi", node[1]
        if node[0] == "vmsnaps":
            return "vm", node[1]
        raise NotFound("not a snapshots directory")

    # -- generated files ------------------------------------------------------------------

    def generated(self, node: Node) -> bytes:
        kind = node[0]
        if kind == "info":
            return _json(self.record(node[1]).to_json())
        if kind == "status":
            try:
                return _json(self.import_outcomes()[node[1]])
            except KeyError:
                raise NotFound(node[1]) from None
        if kind in ("vminfo", "vmsnapinfo"):
            return _json(self.vm(node[1]).to_json())
        if kind == "vmsnapxml":
            return self.snapshot_xml(node[1])
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
        kind = node[0]
        if kind == "root":
            return [("by-name", BY_NAME), ("import", IMPORT), ("vdis", VDIS), ("vms", VMS)]
        if kind == "vdis":
            return [(u, ("vdi", u)) for u in sorted(self.records)]
        if kind in ("vdi", "snapview"):
            uuid = node[1] if kind == "vdi" else node[2]
            return self._vdi_entries(uuid, view=kind == "snapview" or len(node) > 2)
        if kind == "deltas":
            uuid = node[1]
            size = self.record(uuid).virtual_size
            return [
                (f"{base}.{fmt}", ("delta", uuid, base, fmt))
                for base in self.delta_bases(uuid)
                for fmt in IMAGE_FORMATS
                if format_supports(fmt, size)
            ]
        if kind == "snapdir":
            vdi = node[1]
            entry = "snapview" if self.snapshot_admin else "snaplink"
            out: list[tuple[str, Node]] = [
                (n, (entry, vdi, s)) for n, s in self.vdi_snapshot_names(vdi).items()
            ]
            if self.record(vdi).current in self.records:
                out.append(("current", ("curlink", vdi)))
            return sorted(out)
        if kind == "by-name":
            return [(name, ("name", name)) for name in sorted(self.names)]
        if kind == "import":
            return [(".status", STATUS_DIR)] + [
                (name, ("upload", name)) for name in self.uploads.visible()
            ]
        if kind == "status-dir":
            return [(f"{name}.json", ("status", name)) for name in self.import_outcomes()]
        if kind == "vms":
            return [(u, ("vm", u)) for u, v in sorted(self.vms.items()) if not v.is_a_snapshot]
        if kind == "vm":
            vm = self.vm(node[1])
            out = [
                ("disks", ("vmdisks", vm.uuid)),
                ("info.json", ("vminfo", vm.uuid)),
                ("snapshots", ("vmsnaps", vm.uuid)),
            ]
            if vm.current in self.vms:
                out.append(("current", ("vmcurrent", vm.uuid)))
            return out
        if kind == "vmdisks":
            return [(d, ("vmdisk", node[1], d)) for d in sorted(self.vm(node[1]).disks)]
        if kind == "vmsnaps":
            return sorted(
                (n, ("vmsnap", node[1], s)) for n, s in self.vm_snapshot_names(node[1]).items()
            )
        if kind == "vmsnap":
            snap = node[2]
            return [
                ("disks", ("vmsnapdisks", snap)),
                ("info.json", ("vmsnapinfo", snap)),
                ("snapshot.xml", ("vmsnapxml", snap)),
            ]
        if kind == "vmsnapdisks":
            return [(d, ("vmsnapdisk", node[1], d)) for d in sorted(self.vm(node[1]).disks)]
        raise NotFound("not a directory")

    def _vdi_entries(self, uuid: str, *, view: bool) -> list[tuple[str, Node]]:
        record = self.record(uuid)
        entries: list[tuple[str, Node]] = [("info.json", ("info", uuid))]
        if record.data_destroyed:
            return entries  # a checkpoint: no data, only what deltas need
        entries += [
            ("delta-from", ("deltas", uuid, "view") if view else ("deltas", uuid)),
            ("raw.img", ("raw", uuid)),
        ]
        for fmt in IMAGE_FORMATS:
            if format_supports(fmt, record.virtual_size):
                entries.append((f"full.{fmt}", ("full", uuid, fmt)))
        if not record.is_a_snapshot and not view:
            entries.append(("snapshots", ("snapdir", uuid)))
        return sorted(entries)

    def lookup(self, parent: Node, name: str) -> Node:
        kind = parent[0]
        # Direct answers for the large directories, without listing them.
        if kind == "vdis":
            if name in self.records:
                return ("vdi", name)
            raise NotFound(name)
        if kind == "import":
            if name == ".status":
                return STATUS_DIR
            if name in self.uploads.entries:
                return ("upload", name)
            raise NotFound(name)
        if kind == "deltas":
            base, dot, fmt = name.rpartition(".")
            uuid = parent[1]
            if (
                dot
                and fmt in IMAGE_FORMATS
                and base in self.delta_bases(uuid)
                and format_supports(fmt, self.record(uuid).virtual_size)
            ):
                return ("delta", uuid, base, fmt)
            raise NotFound(name)
        for child_name, child in self.children(parent):
            if child_name == name:
                return child
        raise NotFound(name)

    def exists(self, node: Node) -> bool:
        kind = node[0]
        try:
            if kind in ("root", "vdis", "vms", "by-name", "import", "status-dir", "status"):
                return True
            if kind == "name":
                return node[1] in self.names
            if kind == "upload":
                return node[1] in self.uploads.entries
            if kind in ("vm", "vminfo", "vmdisks", "vmsnaps", "vmsnapinfo", "vmsnapxml"):
                return node[1] in self.vms
            if kind == "vmcurrent":
                return self.vm(node[1]).current in self.vms
            if kind in ("vmsnap",):
                return node[2] in self.vm(node[1]).snapshots and node[2] in self.vms
            if kind == "vmsnapdisks":
                return node[1] in self.vms
            if kind in ("vmdisk", "vmsnapdisk"):
                return node[2] in self.vm(node[1]).disks
            record = self.record(node[1])
            if kind in ("snaplink", "snapview"):
                return node[2] in record.snapshots and node[2] in self.records
            if kind == "curlink":
                return record.current in self.records
            if record.data_destroyed and kind in ("raw", "full", "delta", "deltas", "snapview"):
                return False  # a checkpoint has no data to show
            if kind == "delta":
                return node[2] in self.records and node[2] in self.delta_bases(node[1])
            return True
        except NotFound:
            return False

    def _link_target(self, node: Node) -> str:
        kind = node[0]
        if kind == "name":
            return f"../vdis/{self.names[node[1]]}"
        if kind == "snaplink":
            return f"../../{node[2]}"
        if kind == "curlink":
            return f"../../{self.record(node[1]).current}"
        if kind == "vmdisk":
            return f"../../../vdis/{self.vm(node[1]).disks[node[2]]}"
        if kind == "vmsnapdisk":
            return f"../../../../../vdis/{self.vm(node[1]).disks[node[2]]}"
        if kind == "vmcurrent":
            vm = self.vm(node[1])
            names = {s: n for n, s in self.vm_snapshot_names(vm.uuid).items()}
            return f"snapshots/{names[vm.current]}" if vm.current in names else ""
        raise NotFound(str(node))

    def attr(self, node: Node) -> Attr:
        if not self.exists(node):
            raise NotFound("gone")
        kind = node[0]
        if kind in DIR_KINDS:
            mode = 0o700 if kind in PRIVATE_DIRS else 0o755
            if kind in ("vdi", "snapview"):
                mtime = self.record(node[1] if kind == "vdi" else node[2]).changed_ns
            else:
                mtime = self.changed_ns
            return Attr(stat.S_IFDIR | mode, 0, mtime)
        if kind in LINK_KINDS:
            target = self._link_target(node)
            return Attr(stat.S_IFLNK | 0o777, len(target), self.changed_ns, target=target)
        if kind == "upload":
            upload = self.uploads.get(node[1])
            # Never cached: an upload vanishes once applied, and the same name
            # must then be creatable again at once.
            return Attr(
                stat.S_IFREG | 0o600, upload.size, upload.mtime_ns, ceil_div(upload.size, 512), 0.0
            )
        if kind == "info":
            return self._cached_attr(node, (self.record(node[1]),), self._generated_attr)
        if kind in GENERATED_KINDS:
            return self._generated_attr(node)
        if kind not in ("raw", "full", "delta"):
            raise NotFound(str(node))
        sources = (self.record(node[1]),) + ((self.record(node[2]),) if kind == "delta" else ())
        return self._cached_attr(node, sources, self._image_attr)

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
        mode = 0o400 if node[0] == "status" else 0o444
        return Attr(stat.S_IFREG | mode, len(self.generated(node)), self.changed_ns)

    def _image_attr(self, node: Node) -> Attr:
        kind = node[0]
        record = self.record(node[1])
        immutable = self.is_immutable(node)
        if kind == "raw":
            writable = not record.is_a_snapshot and not self.read_only
            mode = 0o600 if writable else 0o400
        else:
            mode = 0o400
        export = self.open_export(node, write=False)
        return Attr(
            stat.S_IFREG | mode,
            export.size,
            record.changed_ns,
            blocks=ceil_div(export.allocated_bytes, 512),
            timeout=IMMUTABLE_TIMEOUT if immutable else MUTABLE_TIMEOUT,
        )

    def is_immutable(self, node: Node) -> bool:
        """Whether a file's bytes can never change (its page cache may be kept)."""
        kind = node[0]
        if kind in ("raw", "full"):
            return self.record(node[1]).is_a_snapshot
        if kind == "delta":
            return self.record(node[1]).is_a_snapshot and self.record(node[2]).is_a_snapshot
        return False

    def open_export(self, node: Node, *, write: bool) -> Export:
        """The export a file handle pins at open."""
        kind = node[0]
        if write:
            if kind != "raw":
                raise ReadOnly("only a live VDI's raw.img is writable")
            if self.read_only or self.record(node[1]).is_a_snapshot:
                raise ReadOnly(f"VDI {node[1]} is read-only")
        if kind == "raw":
            return self.export(node[1], "raw")
        if kind == "full":
            return self.export(node[1], node[2])
        if kind == "delta":
            return self.export(node[1], node[3], node[2])
        raise NotFound(str(node))

    def inode_nodes_of(self, uuid: str) -> list[Node]:
        """Every node whose content depends on this VDI (for cache invalidation)."""
        nodes: list[Node] = [("vdi", uuid), ("info", uuid), ("raw", uuid), ("deltas", uuid)]
        nodes += [("full", uuid, fmt) for fmt in IMAGE_FORMATS]
        return nodes
