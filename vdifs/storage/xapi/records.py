"""XAPI's records as vdifs's: which VDIs a pool shows, and how its fields map.

Pure: the input is what ``VDI/SR/VBD/VM.get_all_records`` return (field
names from xapi-project/xen-api ``ocaml/idl/datamodel*.ml``), the output the
records every layer above the storage shares.
"""

from __future__ import annotations

import json
import xmlrpc.client
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from vdifs.model import CHUNK_SIZE, VdiRecord, VmRecord, ceil_div, iso_to_unix
from vdifs.storage.xapi.api import NULL_REF

Records = Mapping[str, Mapping[str, Any]]
EPOCH = "1970-01-01T00:00:00Z"


def xapi_time(value: Any) -> str:
    """XAPI's ``20261207T21:00:00Z`` (an XML-RPC dateTime) as ``2026-12-07T21:00:00Z``."""
    text = value.value if isinstance(value, xmlrpc.client.DateTime) else str(value)
    text = text.replace("-", "")
    if len(text) < 17:
        return EPOCH
    return f"{text[0:4]}-{text[4:6]}-{text[6:8]}T{text[9:17]}Z"


def shown_srs(srs: Records, only: str | None) -> set[str]:
    """SR refs whose VDIs are disks: no ISO libraries, no udev (CD/USB) SRs."""
    return {
        ref
        for ref, sr in srs.items()
        if sr.get("content_type") != "iso"
        and sr.get("type") not in ("iso", "udev")
        and (only is None or sr.get("uuid") == only)
    }


def is_shown_vdi(vdi: Mapping[str, Any], srs: set[str]) -> bool:
    """User disks and their checkpoints (``cbt_metadata``), nothing else."""
    return (
        vdi.get("SR") in srs
        and vdi.get("type") in ("user", "cbt_metadata")
        and not vdi.get("missing", False)
        and not vdi.get("is_tools_iso", False)
    )


@dataclass
class PoolView:
    """One consistent read of the pool: vdifs records plus the refs behind them."""

    vdis: dict[str, VdiRecord] = field(default_factory=dict)
    vms: dict[str, VmRecord] = field(default_factory=dict)
    vdi_refs: dict[str, str] = field(default_factory=dict)  # uuid -> ref
    vm_refs: dict[str, str] = field(default_factory=dict)
    attached: set[str] = field(default_factory=set)  # VDI uuids a running VM uses
    raw_srs: set[str] = field(default_factory=set)  # SR uuids export_raw_vdi refused VHD for


def build_view(
    vdis: Records,
    srs: Records,
    vbds: Records,
    vms: Records,
    *,
    only_sr: str | None,
    previous: PoolView | None,
    now_ns: int,
) -> PoolView:
    """vdifs's records of a pool from XAPI's.

    ``previous`` keeps what XAPI does not say: a live VDI's generation and
    change time move on when its record changes (XAPI has no content version),
    so the tree re-reads its allocation then.
    """
    shown = shown_srs(srs, only_sr)
    uuid_of = {ref: v["uuid"] for ref, v in vdis.items()}
    view = PoolView(raw_srs=set(previous.raw_srs) if previous else set())
    running = {ref for ref, vm in vms.items() if vm.get("power_state") == "Running"}
    for vbd in vbds.values():
        if vbd.get("VM") in running and vbd.get("currently_attached", False):
            used = vdis.get(vbd.get("VDI", NULL_REF))
            if used is not None:
                view.attached.add(used["uuid"])

    def family(ref: str) -> str:
        """The live VDI a snapshot descends from (CBT relates exactly those)."""
        seen = set()
        while ref in vdis and vdis[ref].get("is_a_snapshot") and ref not in seen:
            seen.add(ref)
            ref = vdis[ref].get("snapshot_of", NULL_REF)
        return uuid_of.get(ref, f"ref:{ref}")

    for ref, vdi in vdis.items():
        if not is_shown_vdi(vdi, shown):
            continue
        uuid = vdi["uuid"]
        snapshot = bool(vdi.get("is_a_snapshot"))
        taken = xapi_time(vdi.get("snapshot_time", "")) if snapshot else None
        sr = srs.get(vdi.get("SR", NULL_REF), {})
        extra = {
            "SR": sr.get("uuid"),
            "SR_name_label": sr.get("name_label"),
            "xapi_type": vdi.get("type"),
            "cbt_enabled": bool(vdi.get("cbt_enabled")),
            "sharable": bool(vdi.get("sharable")),
            "xapi_physical_utilisation": int(vdi.get("physical_utilisation", 0)),
            "attached_to_running_vm": uuid in view.attached,
            "allocation": (
                "unknown: the SR has no VHD export, every block counts as allocated"
                if sr.get("uuid") in view.raw_srs
                else "from the pool's VHD export (2 MiB blocks)"
            ),
        }
        generation, changed_ns = 1, iso_to_unix(taken) * 1_000_000_000 if taken else now_ns
        old = previous.vdis.get(uuid) if previous else None
        record = VdiRecord(
            uuid=uuid,
            name_label=str(vdi.get("name_label", "")),
            name_description=str(vdi.get("name_description", "")),
            virtual_size=int(vdi.get("virtual_size", 0)),
            is_a_snapshot=snapshot,
            snapshot_of=uuid_of.get(vdi.get("snapshot_of", NULL_REF)) if snapshot else None,
            snapshot_time=taken,
            lineage=_lineage(ref, family, vdi, uuid in view.attached),
            created=taken or EPOCH,
            changed_ns=changed_ns,
            generation=generation,
            allocated_chunks=ceil_div(int(vdi.get("physical_utilisation", 0)), CHUNK_SIZE),
            data_destroyed=vdi.get("type") == "cbt_metadata",
            snapshots=tuple(sorted(uuid_of[s] for s in vdi.get("snapshots", ()) if s in uuid_of)),
            extra=json.dumps(extra, sort_keys=True),
        )
        if not snapshot and old is not None:
            # A live VDI: a new generation whenever XAPI's record moved.
            if replace(record, generation=old.generation, changed_ns=old.changed_ns) == old:
                record = old
            else:
                record = replace(
                    record,
                    generation=old.generation + 1,
                    changed_ns=max(now_ns, old.changed_ns + 1),
                )
        view.vdis[uuid] = record
        view.vdi_refs[uuid] = ref

    vm_uuid = {ref: vm["uuid"] for ref, vm in vms.items()}
    for ref, vm in vms.items():
        if vm.get("is_control_domain") or (vm.get("is_a_template") and not vm.get("is_a_snapshot")):
            continue
        snapshot = bool(vm.get("is_a_snapshot"))
        disks = {}
        for vbd_ref in vm.get("VBDs", ()):
            plug = vbds.get(vbd_ref)
            if plug is None or plug.get("type") != "Disk":
                continue
            disk = vdis.get(plug.get("VDI", NULL_REF))
            if disk is not None and disk["uuid"] in view.vdis:
                number = int(plug.get("userdevice", 0))
                device = plug.get("device") or f"xvd{chr(ord('a') + number)}"
                disks[device] = disk["uuid"]
        taken = xapi_time(vm.get("snapshot_time", "")) if snapshot else None
        parent = vm_uuid.get(vm.get("parent", NULL_REF))
        view.vms[vm["uuid"]] = VmRecord(
            uuid=vm["uuid"],
            name_label=str(vm.get("name_label", "")),
            name_description=str(vm.get("name_description", "")),
            metadata=json.dumps({"power_state": vm.get("power_state")}),
            is_a_snapshot=snapshot,
            snapshot_of=vm_uuid.get(vm.get("snapshot_of", NULL_REF)) if snapshot else None,
            snapshot_time=taken,
            parent=parent if snapshot else None,
            current=None if snapshot else parent,
            created=taken or EPOCH,
            disks=disks,
            snapshots=tuple(sorted(vm_uuid[s] for s in vm.get("snapshots", ()) if s in vm_uuid)),
            children=tuple(sorted(vm_uuid[c] for c in vm.get("children", ()) if c in vm_uuid)),
        )
        view.vm_refs[vm["uuid"]] = ref
    return view


def _lineage(ref: str, family: Any, vdi: Mapping[str, Any], in_use: bool) -> str:
    """Deltas exist only where changed-block tracking relates two states, and XAPI
    refuses ``list_changed_blocks`` onto a disk a running VM uses: such a VDI and
    one without CBT stand alone (``delta-from/`` stays empty instead of failing)."""
    if not vdi.get("cbt_enabled"):
        return str(vdi["uuid"])
    if in_use and not vdi.get("is_a_snapshot"):
        return f"in-use:{vdi['uuid']}"
    return str(family(ref))
