"""The directory tree users see, without FUSE.

Nodes are small tuples (``("raw", uuid)``, ``("delta", uuid, base, "vhd")``)
so that the adapter can give each a stable inode.  The tree holds the SR's
records as of the last :meth:`Tree.refresh` and caches disk states and
exports per VDI generation: a changed VDI has a new generation, hence new
cache entries, and an open handle keeps the export it opened.
"""

from __future__ import annotations

import json
import logging
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from vdifs.errors import NotFound, ReadOnly
from vdifs.exports import IMAGE_FORMATS, DiskState, Export, format_supports
from vdifs.imports import import_status
from vdifs.storage.local import LocalSR, VdiRecord
from vdifs.uploads import Uploads

log = logging.getLogger(__name__)

Node = tuple[Any, ...]
ROOT: Node = ("root",)
VDIS: Node = ("vdis",)
BY_NAME: Node = ("by-name",)
IMPORT: Node = ("import",)
STATUS_DIR: Node = ("status-dir",)
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


class Tree:
    STATE_CACHE = 64
    EXPORT_CACHE = 128

    def __init__(self, sr: LocalSR, *, read_only: bool = False) -> None:
        self.sr = sr
        self.read_only = read_only
        self.records: dict[str, VdiRecord] = {}
        self.by_lineage: dict[str, list[str]] = {}
        self.names: dict[str, str] = {}
        self.changed_ns = time.time_ns()
        self._data_version = -1
        self._states: OrderedDict[tuple[str, int], DiskState] = OrderedDict()
        self._exports: OrderedDict[tuple[Any, ...], Export] = OrderedDict()
        self.uploads = Uploads(sr, read_only)
        self.refresh(force=True)

    # -- refreshing from the SR ---------------------------------------------------

    def refresh(self, *, force: bool = False) -> set[str]:
        """Reload records if the SR changed; return the uuids that changed."""
        version = self.sr.data_version()
        if not force and version == self._data_version:
            return set()
        self._data_version = version
        old = self.records
        records = {r.uuid: r for r in self.sr.list_vdis()}
        changed = {
            u
            for u in old.keys() | records.keys()
            if u not in old
            or u not in records
            or old[u].generation != records[u].generation
            or old[u] != records[u]
        }
        self.records = records
        lineage: dict[str, list[str]] = {}
        for r in records.values():
            lineage.setdefault(r.lineage, []).append(r.uuid)
        self.by_lineage = lineage
        self.names = self._name_links(records)
        if changed:
            self.changed_ns = time.time_ns()
        return changed

    @staticmethod
    def _name_links(records: dict[str, VdiRecord]) -> dict[str, str]:
        counts: dict[str, int] = {}
        live = [r for r in records.values() if not r.is_a_snapshot]
        for r in live:
            counts[r.name_label] = counts.get(r.name_label, 0) + 1
        links = {}
        for r in live:
            name = escape_name(r.name_label)
            if counts[r.name_label] > 1:
                name = f"{name} ({r.uuid})"
            links[name] = r.uuid
        return links

    def record(self, uuid: str) -> VdiRecord:
        try:
            return self.records[uuid]
        except KeyError:
            raise NotFound(f"no VDI {uuid}") from None

    # -- states and exports ---------------------------------------------------------

    def state(self, uuid: str) -> DiskState:
        """The VDI's state as of the last refresh (block map loaded once per generation)."""
        record = self.record(uuid)
        key = (uuid, record.generation)
        state = self._states.get(key)
        if state is None:
            fresh, block_map = self.sr.snapshot_state(uuid)
            if fresh.generation != record.generation:
                # The SR moved on since the last refresh: serve the newer state.
                key = (uuid, fresh.generation)
            state = DiskState(fresh, block_map)
            self._states[key] = state
            while len(self._states) > self.STATE_CACHE:
                self._states.popitem(last=False)
        else:
            self._states.move_to_end(key)
        return state

    def export(self, uuid: str, fmt: str, base: str | None = None) -> Export:
        state = self.state(uuid)
        base_state = self.state(base) if base is not None else None
        key = (
            uuid,
            state.record.generation,
            fmt,
            base,
            base_state.record.generation if base_state else None,
        )
        export = self._exports.get(key)
        if export is None:
            export = Export(self.sr, state, fmt, base_state)
            self._exports[key] = export
            while len(self._exports) > self.EXPORT_CACHE:
                self._exports.popitem(last=False)
        else:
            self._exports.move_to_end(key)
        return export

    def delta_bases(self, uuid: str) -> list[str]:
        """Snapshots a delta of this VDI can be taken from: its lineage's snapshots."""
        record = self.record(uuid)
        return sorted(
            u
            for u in self.by_lineage.get(record.lineage, ())
            if u != uuid and self.records[u].is_a_snapshot
        )

    def info_json(self, uuid: str) -> bytes:
        return (json.dumps(self.record(uuid).to_json(), indent=2) + "\n").encode()

    # -- the directory structure --------------------------------------------------------

    def children(self, node: Node) -> list[tuple[str, Node]]:
        kind = node[0]
        if kind == "root":
            return [("by-name", BY_NAME), ("import", IMPORT), ("vdis", VDIS)]
        if kind == "vdis":
            return [(u, ("vdi", u)) for u in sorted(self.records)]
        if kind == "vdi":
            uuid = node[1]
            record = self.record(uuid)
            entries: list[tuple[str, Node]] = [
                ("delta-from", ("deltas", uuid)),
                ("info.json", ("info", uuid)),
                ("raw.img", ("raw", uuid)),
            ]
            for fmt in IMAGE_FORMATS:
                if format_supports(fmt, record.virtual_size):
                    entries.append((f"full.{fmt}", ("full", uuid, fmt)))
            return sorted(entries)
        if kind == "deltas":
            uuid = node[1]
            size = self.record(uuid).virtual_size
            return [
                (f"{base}.{fmt}", ("delta", uuid, base, fmt))
                for base in self.delta_bases(uuid)
                for fmt in IMAGE_FORMATS
                if format_supports(fmt, size)
            ]
        if kind == "by-name":
            return [(name, ("name", name)) for name in sorted(self.names)]
        if kind == "import":
            return [(".status", STATUS_DIR)] + [
                (name, ("upload", name)) for name in sorted(self.uploads.entries)
            ]
        if kind == "status-dir":
            return [(f"{name}.json", ("status", name)) for name in self.import_outcomes()]
        raise NotFound("not a directory")

    def import_outcomes(self) -> dict[str, dict[str, Any]]:
        """The latest outcome of each recent import, by uploaded file name."""
        latest: dict[str, dict[str, Any]] = {}
        for item in import_status(self.sr, STATUS_HISTORY):
            latest.setdefault(item["name"], item)
        return latest

    def status_json(self, name: str) -> bytes:
        try:
            item = self.import_outcomes()[name]
        except KeyError:
            raise NotFound(name) from None
        return (json.dumps(item, indent=2) + "\n").encode()

    def lookup(self, parent: Node, name: str) -> Node:
        kind = parent[0]
        # Direct answers for the large directories, without listing them.
        if kind == "import":
            if name == ".status":
                return STATUS_DIR
            if name in self.uploads.entries:
                return ("upload", name)
            raise NotFound(name)
        if kind == "vdis":
            if name in self.records:
                return ("vdi", name)
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
        if kind in ("root", "vdis", "by-name", "import", "status-dir"):
            return True
        if kind == "name":
            return node[1] in self.names
        if kind == "upload":
            return node[1] in self.uploads.entries
        if kind == "status":
            return True
        if len(node) > 1 and node[1] not in self.records:
            return False
        if kind == "delta":
            return node[2] in self.records and node[2] in self.delta_bases(node[1])
        return True

    def attr(self, node: Node) -> Attr:
        if not self.exists(node):
            raise NotFound("gone")
        kind = node[0]
        if kind in ("root", "vdis", "by-name", "vdi", "deltas"):
            mtime = self.record(node[1]).changed_ns if kind == "vdi" else self.changed_ns
            return Attr(stat.S_IFDIR | 0o755, 0, mtime)
        if kind in ("import", "status-dir"):
            return Attr(stat.S_IFDIR | 0o700, 0, self.changed_ns)
        if kind == "upload":
            upload = self.uploads.get(node[1])
            return Attr(stat.S_IFREG | 0o600, upload.size, upload.mtime_ns, -(-upload.size // 512))
        if kind == "status":
            return Attr(stat.S_IFREG | 0o400, len(self.status_json(node[1])), self.changed_ns)
        if kind == "name":
            target = f"../vdis/{self.names[node[1]]}"
            return Attr(stat.S_IFLNK | 0o777, len(target), self.changed_ns, target=target)
        record = self.record(node[1])
        immutable = record.is_a_snapshot
        timeout = IMMUTABLE_TIMEOUT if immutable else MUTABLE_TIMEOUT
        if kind == "info":
            return Attr(stat.S_IFREG | 0o444, len(self.info_json(record.uuid)), record.changed_ns)
        if kind == "raw":
            writable = not immutable and not self.read_only
            mode = 0o600 if writable else 0o400
            export = self.export(record.uuid, "raw")
        elif kind == "full":
            mode = 0o400
            export = self.export(record.uuid, node[2])
        elif kind == "delta":
            mode = 0o400
            export = self.export(record.uuid, node[3], node[2])
            base_record = self.record(node[2])
            timeout = (
                IMMUTABLE_TIMEOUT if immutable and base_record.is_a_snapshot else MUTABLE_TIMEOUT
            )
        else:
            raise NotFound(str(node))
        return Attr(
            stat.S_IFREG | mode,
            export.size,
            record.changed_ns,
            blocks=-(-export.allocated_bytes // 512),
            timeout=timeout,
        )

    def is_immutable(self, node: Node) -> bool:
        """Whether a file's bytes can never change (its page cache may be kept)."""
        kind = node[0]
        if kind in ("raw", "full", "info"):
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
