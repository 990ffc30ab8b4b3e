"""A pool's VMs: listed, snapshotted and reverted through XAPI.

VMs are made and wired up with ``xe`` or Xen Orchestra; vdifs backs them up
(``VM.snapshot``: all disks at one instant) and restores them (``VM.revert``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from vdifs.errors import InvalidArgument, NotFound, Unsupported
from vdifs.model import VmRecord, check_name, utc_iso
from vdifs.storage.backend import deletion_order, resolve_vm

if TYPE_CHECKING:
    from vdifs.storage.xapi.pool import PoolBackend


class PoolVms:
    """Implements :class:`vdifs.storage.backend.VmStore` over XAPI's VM class."""

    def __init__(self, pool: PoolBackend) -> None:
        self.pool = pool

    def all(self, *, snapshots: bool = True) -> list[VmRecord]:
        return [v for v in self.pool.view().vms.values() if snapshots or not v.is_a_snapshot]

    def get(self, uuid: str) -> VmRecord:
        try:
            return self.pool.view().vms[uuid]
        except KeyError:
            raise NotFound(f"no VM with uuid {uuid} in {self.pool.address}") from None

    def resolve(self, key: str, *, snapshot: bool | None = None, of: str | None = None) -> VmRecord:
        return resolve_vm(self, key, snapshot=snapshot, of=of)

    def _ref(self, uuid: str) -> str:
        self.get(uuid)
        return self.pool.view().vm_refs[uuid]

    def _unsupported(self, *args: Any, **kwargs: Any) -> Any:
        raise Unsupported(
            "a pool's VMs are created and wired up with xe or Xen Orchestra;"
            " vdifs snapshots, reverts and backs them up"
        )

    create = set_metadata = attach = detach = destroy = _unsupported

    def snapshot(self, vm: str, name: str | None = None, description: str = "") -> VmRecord:
        record = self.get(vm)
        if record.is_a_snapshot:
            raise InvalidArgument(f"{vm} is a VM snapshot, not a VM")
        name = name or utc_iso(time.time_ns())
        check_name(name)
        call = self.pool.session.call
        ref = call("VM.snapshot", self._ref(vm), name)
        if description:
            call("VM.set_name_description", ref, description)
        uuid = call("VM.get_uuid", ref)
        self.pool.reload()
        return self.get(uuid)

    def revert(self, snapshot: str) -> VmRecord:
        snap = self.get(snapshot)
        if not snap.is_a_snapshot or snap.snapshot_of is None:
            raise InvalidArgument(f"{snapshot} is not a VM snapshot")
        self.pool.session.call("VM.revert", self._ref(snapshot))
        self.pool.reload()
        return self.get(snap.snapshot_of)

    def set_name(self, uuid: str, name: str) -> None:
        check_name(name)
        self.pool.session.call("VM.set_name_label", self._ref(uuid), name)
        self.pool.reload()

    def _descendants(self, uuid: str) -> list[str]:
        out: list[str] = []
        for child in self.get(uuid).children:
            out += self._descendants(child)
            out.append(child)
        return out

    def delete_snapshot(
        self, uuid: str, *, children: bool = False, only_children: bool = False
    ) -> list[str]:
        """Delete VM snapshots and their disk snapshots (``xe snapshot-uninstall``)."""
        if not self.get(uuid).is_a_snapshot:
            raise InvalidArgument(f"{uuid} is a VM, not a VM snapshot")
        below = self._descendants(uuid) if children or only_children else []
        doomed = deletion_order(uuid, below, children=children, only_children=only_children)
        call = self.pool.session.call
        for victim in doomed:
            disks = self.get(victim).disks.values()
            call("VM.destroy", self._ref(victim))
            for disk in disks:
                call("VDI.destroy", self.pool.ref(disk))
        self.pool.reload()
        return doomed
