"""What a disk holds besides its bytes: partitions and LVM logical volumes, by name.

The parsers (:mod:`vdifs.formats.partitions`, :mod:`vdifs.formats.lvm`) read
the disk through an injected ``read_at``; this module names what they find
for the tree (``partitions/p<N>.img``, ``lvm/<vg>/<lv>.img``) and turns each
into the runs of the disk it is made of.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vdifs.formats import lvm, partitions
from vdifs.formats.partitions import Partition, PartitionTable

ReadAt = partitions.ReadAt


@dataclass(frozen=True)
class DiskVolumes:
    table: PartitionTable
    groups: dict[str, lvm.VolumeGroup]
    """By directory name: the VG's name, or ``name~uuid8`` when two share a name."""
    notes: tuple[str, ...]
    """About LVM on this disk (what was not mapped, and why)."""

    def partition_files(self) -> dict[str, Partition]:
        return {f"p{p.number}.img": p for p in self.table.partitions if not p.is_extended}

    def volume_files(self, group: str) -> dict[str, lvm.LogicalVolume]:
        return {f"{v.name}.img": v for v in self.groups[group].volumes if _safe(v.name)}

    def table_json(self) -> bytes:
        return (json.dumps(self.table.to_json(), indent=2) + "\n").encode()

    def lvm_notes(self) -> bytes:
        lines = list(self.notes)
        for name, group in self.groups.items():
            lines += [f"{name}: {note}" for note in group.notes]
        return "".join(f"{line}\n" for line in lines).encode()

    def runs(self, node: Any) -> list[tuple[int, int]]:
        """The ``(disk offset, length)`` runs of a partition or a volume."""
        if isinstance(node, Partition):
            return [(node.start, node.size)]
        return [(e.device_offset, e.length) for e in node.extents]


def _safe(name: str) -> bool:
    """A name usable as a file name (LVM's own names always are; hostile metadata
    might not be)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def analyse(read_at: ReadAt, disk_size: int) -> DiskVolumes:
    table = partitions.read_table(read_at, disk_size)
    devices = [(0, disk_size)] + [(p.start, p.size) for p in table.partitions if not p.is_extended]
    scan = lvm.scan(devices, read_at)
    notes = list(scan.notes)
    groups: dict[str, lvm.VolumeGroup] = {}
    names = [g.name for g in scan.volume_groups]
    for group in scan.volume_groups:
        if not _safe(group.name):
            notes.append(f"a volume group named {group.name!r} cannot be a directory: skipped")
            continue
        name = group.name if names.count(group.name) == 1 else f"{group.name}~{group.uuid[:8]}"
        groups[name] = group
    return DiskVolumes(table, groups, tuple(notes))
