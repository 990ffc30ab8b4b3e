"""The bottom of vdifs: units, allocations and the records every layer shares.

Formats and storage both import this module and nothing above it: a block map
(storage) and an image layout (formats) meet in an :class:`Allocation`, and
a backend hands the layers above :class:`VdiRecord` and :class:`VmRecord`,
whatever it keeps them in.
"""

from __future__ import annotations

import calendar
import functools
import json
import time
import uuid as uuidlib
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vdifs.errors import InvalidArgument

SECTOR_SIZE = 512
CHUNK_SIZE = 64 * 1024
"""Unit of identity, allocation and change tracking (a qcow2 cluster)."""
BLOCK_SIZE = 2 * 1024 * 1024
"""Unit of a block map row (a VHD block)."""
CHUNKS_PER_BLOCK = BLOCK_SIZE // CHUNK_SIZE
FULL_MASK = (1 << CHUNKS_PER_BLOCK) - 1


def ceil_div(a: int, b: int) -> int:
    """``a / b`` rounded up, for non-negative ``a`` and positive ``b``."""
    return -(-a // b)


def utc_iso(ns: int) -> str:
    """Nanoseconds since the epoch as XAPI writes times: ``2026-01-31T12:00:00Z``."""
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_to_unix(text: str) -> int:
    """The inverse of :func:`utc_iso`: seconds since the epoch, whatever the local time zone."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


def safe_text(text: str) -> str:
    """A file name that may hold undecodable bytes, as storable, printable text."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def check_name(name: str) -> None:
    """A name_label: 1 to 255 bytes of UTF-8, no NUL, not ``.`` or ``..``."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"a name must be UTF-8 text: {safe_text(name)!r}") from None
    if not name or "\0" in name or len(encoded) > 255:
        raise InvalidArgument("a name must be 1 to 255 bytes with no NUL")
    if name in (".", ".."):
        raise InvalidArgument("'.' and '..' are not names")


@dataclass(frozen=True)
class Allocation:
    """Which chunks an image carries, block by block.

    ``blocks`` holds the indexes of 2 MiB blocks that carry at least one chunk,
    strictly ascending; ``masks[i]`` has bit ``c`` (LSB first) set when chunk
    ``c`` of ``blocks[i]`` is carried.  A carried chunk is read from the
    virtual disk; every other byte of the image's virtual disk reads as zero
    (full image) or as the parent's (delta image).  Chunks past
    ``virtual_size`` are never carried.
    """

    virtual_size: int
    blocks: array[int] = field(default_factory=lambda: array("Q"))
    masks: array[int] = field(default_factory=lambda: array("L"))

    def __post_init__(self) -> None:
        if self.virtual_size < 0 or self.virtual_size % SECTOR_SIZE:
            raise ValueError(f"virtual size {self.virtual_size} is not a sector multiple")
        if len(self.blocks) != len(self.masks):
            raise ValueError("blocks and masks differ in length")

    @property
    def chunk_count(self) -> int:
        return sum(mask.bit_count() for mask in self.masks)

    def whole_blocks(self) -> Allocation:
        """The same blocks, each carried whole: every chunk of it inside the disk."""
        disk_chunks = ceil_div(self.virtual_size, CHUNK_SIZE)
        masks = array(
            "L",
            (
                (1 << max(0, min(CHUNKS_PER_BLOCK, disk_chunks - block * CHUNKS_PER_BLOCK))) - 1
                for block in self.blocks
            ),
        )
        return Allocation(self.virtual_size, self.blocks, masks)


@dataclass(frozen=True)
class VdiRecord:
    """One VDI or snapshot, with XAPI's field names where XAPI has them."""

    uuid: str
    name_label: str
    name_description: str
    virtual_size: int
    is_a_snapshot: bool
    snapshot_of: str | None
    snapshot_time: str | None
    lineage: str
    created: str
    changed_ns: int
    generation: int
    allocated_chunks: int
    parent: str | None = None
    current: str | None = None
    data_destroyed: bool = False
    snapshots: tuple[str, ...] = ()
    children: tuple[str, ...] = ()
    extra: str = ""
    """A backend's own fields for info.json, as a JSON object (a pool's XAPI fields)."""

    @property
    def read_only(self) -> bool:
        return self.is_a_snapshot

    @property
    def physical_utilisation(self) -> int:
        return self.allocated_chunks * CHUNK_SIZE

    @functools.cached_property
    def state_uuid(self) -> uuidlib.UUID:
        """Identity of this VDI's content at this generation (image identity)."""
        return uuidlib.uuid5(_STATE_NAMESPACE, f"{self.uuid}/{self.generation}")

    @property
    def state_time(self) -> int:
        """Seconds since the epoch of this state: snapshot time or last change."""
        return self.changed_ns // 1_000_000_000

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name_label": self.name_label,
            "name_description": self.name_description,
            "virtual_size": self.virtual_size,
            "physical_utilisation": self.physical_utilisation,
            "is_a_snapshot": self.is_a_snapshot,
            "snapshot_of": self.snapshot_of,
            "snapshot_time": self.snapshot_time,
            "snapshots": list(self.snapshots),
            "read_only": self.read_only,
            "parent": self.parent,
            "children": list(self.children),
            "current": self.current,
            "type": "cbt_metadata" if self.data_destroyed else "user",
            "data_destroyed": self.data_destroyed,
            "created": self.created,
            "last_changed": utc_iso(self.changed_ns),
            "generation": self.generation,
            "content_id": str(self.state_uuid),
        } | (json.loads(self.extra) if self.extra else {})


_STATE_NAMESPACE = uuidlib.UUID("6d0c7c5e-3c55-4d0b-9a57-7664696673ff")


@dataclass(frozen=True)
class VmRecord:
    uuid: str
    name_label: str
    name_description: str
    metadata: str
    is_a_snapshot: bool
    snapshot_of: str | None
    snapshot_time: str | None
    parent: str | None
    current: str | None
    created: str
    disks: dict[str, str]
    snapshots: tuple[str, ...] = ()
    children: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "uuid": self.uuid,
            "name_label": self.name_label,
            "name_description": self.name_description,
            "is_a_snapshot": self.is_a_snapshot,
            "disks": dict(sorted(self.disks.items())),
            "metadata": self.metadata,
            "created": self.created,
        }
        if self.is_a_snapshot:
            out |= {
                "snapshot_of": self.snapshot_of,
                "snapshot_time": self.snapshot_time,
                "parent": self.parent,
                "children": list(self.children),
            }
        else:
            out |= {"snapshots": list(self.snapshots), "current_snapshot": self.current}
        return out
