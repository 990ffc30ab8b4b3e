"""VMs and VM snapshots in the embedded SR.

A VM has a name, a free-form metadata document and disks attached at device
names.  A VM snapshot is a row of the same table (``is_a_snapshot``) holding
the VM's metadata at that time and a snapshot of every attached disk, all
taken in one SQLite transaction: the disks are truly coherent, unlike XAPI's
one-by-one ``VM.snapshot``.  VM snapshots form a tree with a current
snapshot, like libvirt's.  Revert keeps the VM's uuid and replaces its disks
with clones of the snapshot's disks (XAPI's classic path); every snapshot
stays intact.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid as uuidlib
from typing import TYPE_CHECKING, Any

from vdifs.errors import AlreadyExists, Busy, InvalidArgument, NotFound
from vdifs.model import VmRecord, check_name, utc_iso
from vdifs.storage.backend import deletion_order, resolve_vm

if TYPE_CHECKING:
    from vdifs.storage.local.sr import LocalSR

DEVICE_NAME = re.compile(r"^[a-z][a-z0-9]{0,15}$")  # xvda, hdb, sda, vdc, nvme0n1 ...


_COLUMNS = (
    "uuid, name_label, name_description, metadata, is_a_snapshot, snapshot_of, snapshot_time,"
    " parent, current, created"
)


class Vms:
    """VM operations over one SR; each method is one transaction."""

    def __init__(self, sr: LocalSR) -> None:
        self.sr = sr

    def _record(self, row: tuple[Any, ...]) -> VmRecord:
        db = self.sr.db
        uuid = row[0]
        disks = dict(db.execute("SELECT device, vdi FROM vm_disks WHERE vm = ?", (uuid,)))
        snaps = self.sr.related("vms", "snapshot_of", uuid)
        children = self.sr.related("vms", "parent", uuid)
        return VmRecord(
            uuid=uuid,
            name_label=row[1],
            name_description=row[2],
            metadata=row[3],
            is_a_snapshot=bool(row[4]),
            snapshot_of=row[5],
            snapshot_time=row[6],
            parent=row[7],
            current=row[8],
            created=row[9],
            disks=disks,
            snapshots=snaps,
            children=children,
        )

    def all(self, *, snapshots: bool = True) -> list[VmRecord]:
        rows = self.sr.db.execute(f"SELECT {_COLUMNS} FROM vms ORDER BY created, uuid").fetchall()
        return [self._record(r) for r in rows if snapshots or not r[4]]

    def get(self, uuid: str) -> VmRecord:
        row = self.sr.db.execute(f"SELECT {_COLUMNS} FROM vms WHERE uuid = ?", (uuid,)).fetchone()
        if row is None:
            raise NotFound(f"no VM or VM snapshot with uuid {uuid}")
        return self._record(row)

    def resolve(self, key: str, *, snapshot: bool | None = None, of: str | None = None) -> VmRecord:
        return resolve_vm(self, key, snapshot=snapshot, of=of)

    def create(self, name: str, description: str = "", metadata: str = "") -> VmRecord:
        check_name(name)
        uuid = str(uuidlib.uuid4())
        with self.sr.transaction() as db:
            db.execute(
                "INSERT INTO vms(uuid, name_label, name_description, metadata, created)"
                " VALUES (?, ?, ?, ?, ?)",
                (uuid, name, description, metadata, utc_iso(time.time_ns())),
            )
        return self.get(uuid)

    def set_name(self, uuid: str, name: str) -> None:
        check_name(name)
        with self.sr.transaction() as db:
            self.get(uuid)
            db.execute("UPDATE vms SET name_label = ? WHERE uuid = ?", (name, uuid))

    def set_metadata(self, vm: str, metadata: str) -> None:
        with self.sr.transaction() as db:
            if self.get(vm).is_a_snapshot:
                raise InvalidArgument("a VM snapshot's metadata cannot change")
            db.execute("UPDATE vms SET metadata = ? WHERE uuid = ?", (metadata, vm))

    def attach(self, vm: str, vdi: str, device: str) -> None:
        if not DEVICE_NAME.match(device):
            raise InvalidArgument(f"invalid device name {device!r} (like xvda, sdb, vdc)")
        with self.sr.transaction() as db:
            record = self.get(vm)
            if record.is_a_snapshot:
                raise InvalidArgument("disks cannot be attached to a VM snapshot")
            disk = self.sr.get_vdi(vdi)
            if disk.is_a_snapshot:
                raise InvalidArgument(f"{vdi} is a snapshot: attach a clone of it instead")
            if device in record.disks:
                raise AlreadyExists(f"VM {vm} already has a disk at {device}")
            owner = db.execute(
                "SELECT vm, device FROM vm_disks JOIN vms ON vms.uuid = vm_disks.vm"
                " WHERE vdi = ? AND vms.is_a_snapshot = 0",
                (vdi,),
            ).fetchone()
            if owner:
                raise Busy(f"VDI {vdi} is already attached to VM {owner[0]} at {owner[1]}")
            db.execute("INSERT INTO vm_disks(vm, device, vdi) VALUES (?, ?, ?)", (vm, device, vdi))

    def detach(self, vm: str, device: str) -> None:
        with self.sr.transaction() as db:
            record = self.get(vm)
            if record.is_a_snapshot:
                raise InvalidArgument("disks cannot be detached from a VM snapshot")
            if device not in record.disks:
                raise NotFound(f"VM {vm} has no disk at {device}")
            db.execute("DELETE FROM vm_disks WHERE vm = ? AND device = ?", (vm, device))

    def destroy(self, vm: str) -> None:
        """Forget a VM and its snapshot records; every VDI and VDI snapshot stays."""
        with self.sr.transaction() as db:
            record = self.get(vm)
            if record.is_a_snapshot:
                raise InvalidArgument(f"{vm} is a VM snapshot: use vdifs vm snapshot-delete")
            for snap in record.snapshots:
                db.execute("DELETE FROM vm_disks WHERE vm = ?", (snap,))
                db.execute("DELETE FROM vms WHERE uuid = ?", (snap,))
            db.execute("DELETE FROM vm_disks WHERE vm = ?", (vm,))
            db.execute("DELETE FROM vms WHERE uuid = ?", (vm,))

    def snapshot(self, vm: str, name: str | None = None, description: str = "") -> VmRecord:
        """Metadata plus every attached disk, in one transaction."""
        now = time.time_ns()
        uuid = str(uuidlib.uuid4())
        with self.sr.transaction() as db:
            record = self.get(vm)
            if record.is_a_snapshot:
                raise InvalidArgument(f"{vm} is already a VM snapshot")
            label = name or utc_iso(now).replace(":", "-")
            check_name(label)
            if any(self.get(s).name_label == label for s in record.snapshots):
                raise AlreadyExists(f"VM {vm} already has a snapshot named {label!r}")
            db.execute(
                "INSERT INTO vms(uuid, name_label, name_description, metadata, is_a_snapshot,"
                " snapshot_of, snapshot_time, parent, created) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?)",
                (
                    uuid,
                    label,
                    description,
                    record.metadata,
                    vm,
                    utc_iso(now),
                    record.current,
                    utc_iso(now),
                ),
            )
            for device, vdi in sorted(record.disks.items()):
                disk_snap = self.sr.snapshot(vdi, f"{label}-{device}", description)
                db.execute(
                    "INSERT INTO vm_disks(vm, device, vdi) VALUES (?, ?, ?)",
                    (uuid, device, disk_snap.uuid),
                )
            db.execute("UPDATE vms SET current = ? WHERE uuid = ?", (uuid, vm))
        return self.get(uuid)

    def revert(self, snapshot: str) -> VmRecord:
        """The VM takes the snapshot's metadata and clones of its disks.

        The VM keeps its uuid; its disks get new uuids (recorded on the VM),
        the replaced disks are destroyed, and their snapshots now say they
        are snapshots of the clones (XAPI's re-pointing).  Disks attached
        since the snapshot are detached, not destroyed.  Every snapshot stays.
        """
        with self.sr.transaction() as db:
            snap = self.get(snapshot)
            if not snap.is_a_snapshot or snap.snapshot_of is None:
                raise InvalidArgument(f"{snapshot} is not a VM snapshot")
            vm = self.get(snap.snapshot_of)
            db.execute("DELETE FROM vm_disks WHERE vm = ?", (vm.uuid,))
            for device, disk_snap in sorted(snap.disks.items()):
                old = vm.disks.get(device)
                name = self.sr.get_vdi(old).name_label if old is not None else None
                clone = self.sr.clone(disk_snap, name)
                if old is not None:
                    db.execute(
                        "UPDATE vdis SET snapshot_of = ? WHERE snapshot_of = ?", (clone.uuid, old)
                    )
                    self.sr.destroy(old)
                else:
                    db.execute(
                        "UPDATE vdis SET snapshot_of = ? WHERE uuid = ?", (clone.uuid, disk_snap)
                    )
                db.execute("UPDATE vdis SET current = ? WHERE uuid = ?", (disk_snap, clone.uuid))
                db.execute(
                    "INSERT INTO vm_disks(vm, device, vdi) VALUES (?, ?, ?)",
                    (vm.uuid, device, clone.uuid),
                )
            db.execute(
                "UPDATE vms SET metadata = ?, current = ? WHERE uuid = ?",
                (snap.metadata, snap.uuid, vm.uuid),
            )
        return self.get(vm.uuid)

    def delete_snapshot(
        self, snapshot: str, *, children: bool = False, only_children: bool = False
    ) -> list[str]:
        """Delete a VM snapshot and its disk snapshots; children are re-parented."""
        with self.sr.transaction() as db:
            snap = self.get(snapshot)
            if not snap.is_a_snapshot:
                raise InvalidArgument(f"{snapshot} is a VM, not a VM snapshot")
            below = self.sr.descendants(snapshot, "vms") if children or only_children else []
            doomed = deletion_order(snapshot, below, children=children, only_children=only_children)
            for victim_uuid in doomed:
                victim = self.get(victim_uuid)
                db.execute(
                    "UPDATE vms SET parent = ? WHERE parent = ?", (victim.parent, victim_uuid)
                )
                db.execute(
                    "UPDATE vms SET current = ? WHERE current = ?", (victim.parent, victim_uuid)
                )
                for disk in victim.disks.values():
                    with contextlib.suppress(NotFound):  # deleted on its own already
                        self.sr.destroy(disk)
                db.execute("DELETE FROM vm_disks WHERE vm = ?", (victim_uuid,))
                db.execute("DELETE FROM vms WHERE uuid = ?", (victim_uuid,))
        return doomed
