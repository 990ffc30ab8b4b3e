"""Find LVM2 volume groups on a disk and map their logical volumes onto it.

Pure: the disk is read through an injected ``read_at(offset, length)``, only
inside the device ranges given (the whole disk, its partitions).  Nothing from
the disk is trusted without a bound: labels, metadata area headers and the
metadata text are checked (LVM's own CRCs included), the text is parsed with
a bounded nesting depth and read up to :data:`MAX_METADATA_TEXT` bytes
(:data:`MAX_METADATA_READ` for the whole scan), every extent is checked to lie
inside the PV's device and the number of extents is capped
(:data:`MAX_EXTENTS`).  :func:`scan` never raises for any content of the disk
(only exceptions of ``read_at`` itself propagate): what cannot be used is
left out and said in the notes.

What is mapped: logical volumes whose every segment is of type ``striped``
and lies on PVs found on this disk: linear ones (``stripe_count = 1``) and
striped ones (``stripe_count > 1``, chunks of ``stripe_size`` dealt round-robin
over the stripes as dm-stripe does).  Hidden sub-volumes (raid images, thin
pool data, ...), snapshot copy-on-write stores and volumes of any other
segment type (thin, thin-pool, raid*, mirror, cache, writecache, vdo,
integrity, snapshot, error, zero...) are not mapped, and are named in the
volume group's notes.

Metadata is read like LVM does (``lib/format_text/format-text.c``
``_vg_read_raw_area``): slot 0 of each metadata area's ``raw_locn`` list (the
committed copy; slot 1 is the transient precommitted one), its text possibly
wrapping from the end of the area back to just after the 512-byte header, its
checksum LVM's ``calc_crc`` over the text.  When the copies of a volume group
(on several PVs, or both metadata areas of one PV) disagree, the highest
seqno with a valid checksum wins and the others are noted.

Sources: LVM2 ``lib/label/label.c`` (label scan of sectors 0-3),
``lib/format_text/layout.h``, ``lib/format_text/format-text.c``,
``lib/format_text/text_label.c`` (``_text_read``: the pv_header's two
zero-terminated lists), ``lib/format_text/import_vsn1.c`` (the text's
sections and keys), ``libdm/libdm-config.c`` (the text syntax),
``lib/misc/crc.c`` and Linux ``drivers/md/dm-stripe.c`` (``stripe_map_sector``).
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

from vdifs.formats import c_lvm as c
from vdifs.formats.notes import Notes, listed

ReadAt = Callable[[int, int], bytes]

SECTOR_SIZE = c.SECTOR_SIZE

MAX_METADATA_TEXT = 16 * 1024 * 1024
"""Largest metadata text read from one area.  LVM's default area is 1 MiB and
holds two copies; ``--metadatasize`` can make it larger, but real texts stay
far below this (about 1 KiB per logical volume)."""
MAX_METADATA_READ = 64 * 1024 * 1024
"""Metadata text read in one scan, over all areas of all PVs."""
MAX_MDAS_PER_PV = 2
"""LVM writes at most two metadata areas per PV (``--pvmetadatacopies 0|1|2``)."""
MAX_DEPTH = 32
"""Section nesting accepted in the text (LVM writes 5 levels)."""
MAX_NUMBER_LENGTH = 32
"""Characters of one number in the text (LVM writes 64-bit values)."""
MAX_EXTENTS = 1 << 20
"""Extents produced for one scan, before merging adjacent ones.  A linear
segment is one extent; a striped one is one per stripe chunk (a 64 GiB striped
volume with 64 KiB chunks needs 2^20).  Beyond this, volumes are left out."""
MAX_NOTES = 64

STRIPED = "striped"
"""The segment type of linear and striped volumes (``lib/striped/striped.c``)."""
SNAPSHOT = "snapshot"
VISIBLE = "VISIBLE"


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes of a volume from ``lv_offset`` are at ``device_offset`` of the disk.

    ``device_offset`` is a byte offset of the disk read through ``read_at``
    (the device's own offset already added).
    """

    lv_offset: int
    length: int
    device_offset: int


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    size: int
    """Bytes: extent_count x the VG's extent size."""
    extents: tuple[Extent, ...]
    """Ascending, contiguous, covering ``[0, size)``; adjacent runs merged."""

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """``(disk offset, length)`` pieces of ``[offset, offset + length)`` of the
        volume, clipped to its size."""
        end = min(offset + length, self.size)
        if offset < 0 or offset >= end:
            return
        i = bisect.bisect_right(self.extents, offset, key=lambda e: e.lv_offset) - 1
        while offset < end:
            extent = self.extents[i]
            skip = offset - extent.lv_offset
            piece = min(extent.length - skip, end - offset)
            yield extent.device_offset + skip, piece
            offset += piece
            i += 1


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    uuid: str
    """As LVM writes it, with dashes.  Two volume groups of one disk may share a
    name, never a uuid."""
    seqno: int
    extent_size: int
    """Bytes."""
    volumes: tuple[LogicalVolume, ...]
    """The volumes that can be mapped (see the module doc), in metadata order."""
    metadata_text: str
    """The metadata text as found (UTF-8, invalid bytes replaced), without its NUL."""
    notes: tuple[str, ...]


@dataclass(frozen=True)
class LvmScan:
    volume_groups: tuple[VolumeGroup, ...]
    """Sorted by name, then uuid."""
    notes: tuple[str, ...]
    """About the disk rather than one volume group: damaged labels or metadata areas,
    PVs in no volume group, limits reached."""


def find_volume_groups(devices: Sequence[tuple[int, int]], read_at: ReadAt) -> list[VolumeGroup]:
    """The volume groups whose PVs are on the ``(offset, size)`` ranges of the disk."""
    return list(scan(devices, read_at).volume_groups)


def scan(devices: Sequence[tuple[int, int]], read_at: ReadAt) -> LvmScan:
    """Like :func:`find_volume_groups`, with the notes that belong to no volume group."""
    notes = Notes(MAX_NOTES)
    reader = _Reader(read_at)
    pvs: dict[str, _PV] = {}
    for index, (offset, size) in enumerate(devices):
        pv = _probe_label(reader, index, offset, size, notes)
        if pv is None:
            continue
        if pv.uuid in pvs:
            notes.add(
                f"PV {_dashed(pv.uuid)} is found on devices {pvs[pv.uuid].device} and"
                f" {index}: device {pvs[pv.uuid].device} is used"
            )
            continue
        pvs[pv.uuid] = pv

    copies: dict[str, list[_Copy]] = {}
    parsed: dict[bytes, _Section | str] = {}
    for pv in pvs.values():
        if len(pv.mdas) > MAX_MDAS_PER_PV:
            notes.add(
                f"PV {_dashed(pv.uuid)} lists {len(pv.mdas)} metadata areas: the first 2 read"
            )
        has_metadata = False
        for mda_offset, mda_size in pv.mdas[:MAX_MDAS_PER_PV]:
            text = _read_metadata(reader, pv, mda_offset, mda_size, notes)
            if text is None:
                continue
            has_metadata = True
            if text not in parsed:
                parsed[text] = _parse_vg_text(text)
            root = parsed[text]
            where = f"PV {_dashed(pv.uuid)} metadata area at {mda_offset}"
            if isinstance(root, str):
                notes.add(f"{where}: {root}")
                continue
            copy = _copy_of(root, text, where)
            if isinstance(copy, str):
                notes.add(f"{where}: {copy}")
                continue
            copies.setdefault(copy.uuid, []).append(copy)
        if not pv.mdas:
            has_metadata = True  # a PV without metadata areas is described by the others
        if not has_metadata:
            notes.add(
                f"PV {_dashed(pv.uuid)} (device {pv.device}) holds no usable volume group"
                " metadata (a PV in no volume group?)"
            )

    budget = _Budget(MAX_EXTENTS)
    groups = [_build_group(versions, pvs, budget) for versions in copies.values()]
    names: dict[str, list[str]] = {}
    for group in groups:
        names.setdefault(group.name, []).append(group.uuid)
    result: list[VolumeGroup] = []
    for group in groups:
        others = [u for u in names[group.name] if u != group.uuid]
        if others:
            note = f"other volume group(s) named {group.name!r} here: {', '.join(others)}"
            group = dataclasses.replace(group, notes=(*group.notes, note))
        result.append(group)
    if budget.exhausted:
        notes.add(f"more than {MAX_EXTENTS} extents: some volumes are left out")
    result.sort(key=lambda g: (g.name, g.uuid))
    return LvmScan(tuple(result), notes.result())


def read_volume(read_at: ReadAt, volume: LogicalVolume, offset: int, length: int) -> bytes:
    """Bytes of a volume (clipped to its size), read through its extents."""
    return b"".join(read_at(where, piece) for where, piece in volume.runs(offset, length))


# --- helpers -----------------------------------------------------------------------------------


class _Reader:
    """``read_at`` for exact reads, with the scan's metadata budget."""

    def __init__(self, read_at: ReadAt) -> None:
        self._read_at = read_at
        self.metadata_left = MAX_METADATA_READ

    def read(self, offset: int, length: int) -> bytes | None:
        data = self._read_at(offset, length) if length else b""
        return data if len(data) == length else None


class _Budget:
    def __init__(self, left: int) -> None:
        self.left = left
        self.exhausted = False

    def take(self, count: int) -> bool:
        if count > self.left:
            self.exhausted = True
            return False
        self.left -= count
        return True


def _dashed(uuid: str) -> str:
    """An LVM uuid as LVM prints it: 6-4-4-4-4-4-6 (``lib/uuid/uuid.c`` ``id_write_format``)."""
    if len(uuid) != c.ID_LEN:
        return uuid
    cuts = (0, 6, 10, 14, 18, 22, 26, 32)
    return "-".join(uuid[a:b] for a, b in pairwise(cuts))


def _undashed(uuid: str) -> str:
    return uuid.replace("-", "")


# --- labels and metadata areas ----------------------------------------------------------------


class _PV(NamedTuple):
    uuid: str
    """32 characters, no dashes."""
    device: int
    """Index in the devices given."""
    offset: int
    """The device's offset on the disk."""
    size: int
    """The device's size: every extent must end inside it."""
    mdas: tuple[tuple[int, int], ...]
    """(offset, size) of each metadata area, from the start of the device."""


def _probe_label(reader: _Reader, index: int, offset: int, size: int, notes: Notes) -> _PV | None:
    """The PV label in one of the first four sectors of a device, as ``label.c`` looks for it."""
    scan_size = min(size, c.LABEL_SCAN_SECTORS * c.LABEL_SIZE) // c.LABEL_SIZE * c.LABEL_SIZE
    if offset < 0 or scan_size <= 0:
        return None
    head = reader.read(offset, scan_size)
    if head is None:
        notes.add(f"device {index} at {offset}: its first sectors cannot be read")
        return None
    for sector in range(scan_size // c.LABEL_SIZE):
        label = head[sector * c.LABEL_SIZE : (sector + 1) * c.LABEL_SIZE]
        if not label.startswith(c.LABEL_ID):
            continue
        where = f"device {index}, sector {sector}"
        _, sector_xl, crc, pv_header_offset, label_type = c.LABEL_HEADER.unpack_from(label)
        if sector_xl != sector:
            notes.add(f"{where}: LVM label says it is in sector {sector_xl}: ignored")
            continue
        if c.calc_crc(label[c.LABEL_CRC_START :]) != crc:
            notes.add(f"{where}: LVM label checksum mismatch: ignored")
            continue
        if label_type != c.LABEL_TYPE_LVM2:
            notes.add(f"{where}: label type {label_type!r} is not LVM2: ignored")
            continue
        if not c.LABEL_HEADER.size <= pv_header_offset <= c.LABEL_SIZE - c.PV_HEADER.size:
            notes.add(f"{where}: pv_header offset {pv_header_offset}: ignored")
            continue
        raw_uuid, _device_size = c.PV_HEADER.unpack_from(label, pv_header_offset)
        uuid = raw_uuid.decode("ascii", errors="replace")
        position = pv_header_offset + c.PV_HEADER.size
        lists: list[list[tuple[int, int]]] = [[], []]
        for areas in lists:  # data areas, then metadata areas, each ending in a zero offset
            while True:
                if position + c.DISK_LOCN.size > c.LABEL_SIZE:
                    notes.add(f"{where}: the PV's area lists run off the label sector")
                    break
                area_offset, area_size = c.DISK_LOCN.unpack_from(label, position)
                position += c.DISK_LOCN.size
                if area_offset == 0:
                    break
                areas.append((area_offset, area_size))
        return _PV(uuid, index, offset, size, tuple(lists[1]))
    return None


def _read_metadata(
    reader: _Reader, pv: _PV, mda_offset: int, mda_size: int, notes: Notes
) -> bytes | None:
    """The committed metadata text of one area (``_vg_read_raw_area``), without its NUL."""
    where = f"PV {_dashed(pv.uuid)} metadata area at {mda_offset}"
    if mda_size < c.MDA_HEADER_SIZE or mda_offset + mda_size > pv.size:
        notes.add(f"{where}: size {mda_size} does not fit the device ({pv.size} bytes)")
        return None
    header = reader.read(pv.offset + mda_offset, c.MDA_HEADER_SIZE)
    if header is None:
        notes.add(f"{where}: cannot be read")
        return None
    checksum, magic, version, start, area_size = c.MDA_HEADER.unpack_from(header)
    if c.calc_crc(header[c.MDA_CRC_START :]) != checksum:
        notes.add(f"{where}: header checksum mismatch")
        return None
    if magic != c.FMTT_MAGIC or version != c.FMTT_VERSION:
        notes.add(f"{where}: not an LVM2 text metadata area (magic or version {version})")
        return None
    if start != mda_offset:
        notes.add(f"{where}: its header says it starts at {start}")
        return None
    if not c.MDA_HEADER_SIZE < area_size <= mda_size:
        # LVM wraps at the header's size; it must stay inside the area the label gives.
        notes.add(f"{where}: its header gives a size of {area_size}, the label {mda_size}")
        return None
    text_offset, text_size, text_checksum, flags = c.RAW_LOCN.unpack_from(header, c.MDA_HEADER.size)
    if text_offset == 0 and text_size == 0:
        return None  # a PV in no volume group (or one not written yet)
    if flags & c.RAW_LOCN_IGNORED:
        notes.add(f"{where}: marked ignored (pvchange --metadataignore): not read")
        return None
    if not c.MDA_HEADER_SIZE <= text_offset < area_size or not 0 < text_size <= (
        area_size - c.MDA_HEADER_SIZE
    ):
        notes.add(f"{where}: metadata of {text_size} bytes at {text_offset} does not fit it")
        return None
    if text_size > MAX_METADATA_TEXT:
        notes.add(f"{where}: metadata of {text_size} bytes, more than {MAX_METADATA_TEXT}")
        return None
    wrap = max(0, text_offset + text_size - area_size)
    if wrap > text_offset - c.MDA_HEADER_SIZE:
        notes.add(f"{where}: metadata wraps over its own start")
        return None
    if text_size > reader.metadata_left:
        notes.add(f"{where}: not read, more than {MAX_METADATA_READ} bytes of metadata read")
        return None
    reader.metadata_left -= text_size
    first = reader.read(pv.offset + mda_offset + text_offset, text_size - wrap)
    second = reader.read(pv.offset + mda_offset + c.MDA_HEADER_SIZE, wrap)
    if first is None or second is None:
        notes.add(f"{where}: metadata cannot be read")
        return None
    text = first + second
    if c.calc_crc(text) != text_checksum:
        notes.add(f"{where}: metadata checksum mismatch")
        return None
    return text.split(b"\0", 1)[0]


# --- the metadata text (libdm-config syntax) ---------------------------------------------------

_Scalar = int | float | str
_Value = _Scalar | list[_Scalar]


class _Section:
    __slots__ = ("duplicates", "sections", "values")

    def __init__(self) -> None:
        self.values: dict[str, _Value] = {}
        self.sections: dict[str, _Section] = {}
        self.duplicates: list[str] = []
        """Keys given more than once: the first is kept."""

    def add_value(self, key: str, value: _Value) -> None:
        if key in self.values or key in self.sections:
            self.duplicates.append(key)
        else:
            self.values[key] = value

    def add_section(self, key: str, section: _Section) -> None:
        if key in self.values or key in self.sections:
            self.duplicates.append(key)
        else:
            self.sections[key] = section

    def get_int(self, key: str) -> int | None:
        value = self.values.get(key)
        return value if isinstance(value, int) else None

    def get_str(self, key: str) -> str | None:
        value = self.values.get(key)
        return value if isinstance(value, str) else None

    def get_strings(self, key: str) -> list[str]:
        value = self.values.get(key)
        if not isinstance(value, list):
            return []
        return [v for v in value if isinstance(v, str)]


_TOKEN = re.compile(
    r"""
      (?P<space>\s+|\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<bare>'[^']*')
    | (?P<punct>[{}\[\]=,])
    | (?P<word>[^\s\#{}\[\]=,"']+)
    | (?P<bad>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+)")
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


class _SyntaxError(Exception):
    pass


def _tokens(text: str) -> Iterator[tuple[str, str, int]]:
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        assert kind is not None
        if kind == "space":
            continue
        if kind == "bad":
            raise _SyntaxError(f"unexpected {match.group()!r} at line {_line(text, match)}")
        yield kind, match.group(), match.start()


def _line(text: str, match: re.Match[str]) -> int:
    return text.count("\n", 0, match.start()) + 1


def _scalar(kind: str, token: str) -> _Scalar:
    if kind == "string":
        return _ESCAPE.sub(r"\1", token[1:-1])
    if kind == "bare":
        return token[1:-1]
    if kind == "word" and len(token) <= MAX_NUMBER_LENGTH:
        if _INT.fullmatch(token):
            return int(token, 10)
        if _FLOAT.fullmatch(token):
            return float(token)
    raise _SyntaxError(f"{token[:40]!r} is not a value")


def _parse(text: str) -> _Section:
    """``key = value``, ``key = [v, ...]`` and ``name { ... }``, as libdm-config reads them."""
    root = _Section()
    stack = [root]
    tokens = _tokens(text)
    for kind, token, _ in tokens:
        if token == "}" and kind == "punct":
            if len(stack) == 1:
                raise _SyntaxError("'}' without a section")
            stack.pop()
            continue
        if kind != "word":
            raise _SyntaxError(f"expected a name, found {token[:40]!r}")
        key = token
        kind, token, _ = next(tokens, ("end", "", 0))
        if token == "{":
            if len(stack) > MAX_DEPTH:
                raise _SyntaxError(f"sections nested deeper than {MAX_DEPTH}")
            section = _Section()
            stack[-1].add_section(key, section)
            stack.append(section)
            continue
        if token != "=":
            raise _SyntaxError(f"expected '=' or '{{' after {key[:40]!r}")
        kind, token, _ = next(tokens, ("end", "", 0))
        if kind == "punct" and token == "[":
            items: list[_Scalar] = []
            while True:
                kind, token, _ = next(tokens, ("end", "", 0))
                if kind == "punct" and token == "]":
                    break
                if kind == "punct" and token == "," and items:
                    continue
                if kind in ("end", "punct"):
                    raise _SyntaxError(f"unterminated list for {key[:40]!r}")
                items.append(_scalar(kind, token))
            stack[-1].add_value(key, items)
        elif kind in ("end", "punct"):
            raise _SyntaxError(f"no value for {key[:40]!r}")
        else:
            stack[-1].add_value(key, _scalar(kind, token))
    if len(stack) != 1:
        raise _SyntaxError("unterminated section")
    return root


def _parse_vg_text(text: bytes) -> _Section | str:
    """The parsed text, or why it cannot be used."""
    try:
        root = _parse(text.decode("utf-8", errors="replace"))
    except _SyntaxError as error:
        return f"metadata text cannot be parsed: {error}"
    contents = root.get_str("contents")
    version = root.values.get("version")
    if contents is not None and contents != "Text Format Volume Group":
        return f"metadata text of another kind: contents = {contents[:60]!r}"
    if version is not None and version != 1:
        return f"metadata text version {version!r} (only 1 is known)"
    if not root.sections:
        return "metadata text without a volume group section"
    return root


# --- volume groups -------------------------------------------------------------------------------


class _Copy(NamedTuple):
    """One copy of a volume group's metadata."""

    name: str
    uuid: str
    seqno: int
    extent_size: int
    """Sectors."""
    vg: _Section
    text: bytes
    where: str


def _copy_of(root: _Section, text: bytes, where: str) -> _Copy | str:
    name, vg = next(iter(root.sections.items()))
    uuid = vg.get_str("id")
    seqno = vg.get_int("seqno")
    extent_size = vg.get_int("extent_size")
    if uuid is None or seqno is None or seqno < 0:
        return f"volume group {name!r} without an id or seqno"
    if extent_size is None or extent_size <= 0:
        return f"volume group {name!r} with extent size {extent_size}"
    return _Copy(name, uuid, seqno, extent_size, vg, text, where)


class _PvPlace(NamedTuple):
    """Where a PV of the volume group's metadata is on this disk."""

    name: str
    data_offset: int
    """Disk offset of its first extent: device offset + pe_start."""
    pe_count: int
    device_end: int
    """Disk offset of the end of its device."""


def _build_group(versions: list[_Copy], pvs: dict[str, _PV], budget: _Budget) -> VolumeGroup:
    notes = Notes(MAX_NOTES)
    best = max(versions, key=lambda v: v.seqno)  # first of the newest: the earliest device
    for other in versions:
        if other.seqno < best.seqno:
            notes.add(f"{other.where}: older metadata (seqno {other.seqno}) ignored")
        elif other.text != best.text:
            notes.add(f"{other.where}: different metadata with the same seqno: ignored")
    vg = best.vg
    extent_bytes = best.extent_size * SECTOR_SIZE
    physical = vg.sections.get("physical_volumes", _Section())
    logical = vg.sections.get("logical_volumes", _Section())
    duplicates = [*vg.duplicates, *physical.duplicates, *logical.duplicates]
    if duplicates:
        notes.add(f"names given twice (the first is used): {listed(duplicates)}")

    places: dict[str, _PvPlace] = {}
    for pv_name, pv_section in physical.sections.items():
        pv_uuid = pv_section.get_str("id")
        pe_start = pv_section.get_int("pe_start")
        pe_count = pv_section.get_int("pe_count")
        if pv_uuid is None or pe_start is None or pe_count is None or pe_start < 0 or pe_count < 0:
            notes.add(f"PV {pv_name}: no id, pe_start or pe_count")
            continue
        found = pvs.get(_undashed(pv_uuid))
        if found is None:
            notes.add(f"PV {pv_name} ({pv_uuid}) is not on this disk: volumes on it left out")
            continue
        data_start = pe_start * SECTOR_SIZE
        if data_start + pe_count * extent_bytes > found.size:
            notes.add(
                f"PV {pv_name}: {pe_count} extents from sector {pe_start} do not fit its device"
                f" ({found.size} bytes): only extents inside it are used"
            )
        places[pv_name] = _PvPlace(
            pv_name, found.offset + data_start, pe_count, found.offset + found.size
        )

    # Old-style snapshots (lib/snapshot/snapshot.c): a hidden "snapshotN" volume with a
    # "snapshot" segment naming the origin and the copy-on-write store.  LVM writes the
    # store hidden too (lvs shows the snapshot under the store's name); a visible one
    # must not be mapped either: its bytes are exceptions, not a file system.
    snapshot_parts: set[str] = set()
    for lv_name, lv in logical.sections.items():
        for segment in _segments(lv):
            if segment.get_str("type") == SNAPSHOT:
                cow = segment.get_str("cow_store") or "?"
                origin = segment.get_str("origin") or "?"
                snapshot_parts.update((lv_name, cow))
                notes.add(f"{cow}: a snapshot of {origin} (copy-on-write): not mapped")
    volumes: list[LogicalVolume] = []
    hidden: list[str] = []
    for lv_name, lv in logical.sections.items():
        if lv_name in snapshot_parts:
            continue
        if VISIBLE not in lv.get_strings("status"):
            hidden.append(lv_name)
            continue
        volume = _map_volume(lv_name, lv, places, extent_bytes, budget)
        if isinstance(volume, str):
            notes.add(f"{lv_name}: {volume}")
        else:
            volumes.append(volume)
    if hidden:
        notes.add(f"hidden sub-volumes not shown: {listed(hidden)}")
    return VolumeGroup(
        best.name,
        best.uuid,
        best.seqno,
        extent_bytes,
        tuple(volumes),
        best.text.decode("utf-8", errors="replace"),
        notes.result(),
    )


def _segments(lv: _Section) -> list[_Section]:
    return [s for name, s in lv.sections.items() if name.startswith("segment")]


class _Segment(NamedTuple):
    start: int
    extents: int
    section: _Section


def _map_volume(
    name: str, lv: _Section, places: dict[str, _PvPlace], extent_bytes: int, budget: _Budget
) -> LogicalVolume | str:
    """The volume's extents, or why it is not mapped."""
    segments: list[_Segment] = []
    for section in _segments(lv):
        start = section.get_int("start_extent")
        count = section.get_int("extent_count")
        kind = section.get_str("type")
        if start is None or count is None or start < 0 or count <= 0 or kind is None:
            return "a segment without start_extent, extent_count or type: not mapped"
        if kind != STRIPED:
            return f"segment type {kind!r} is not mapped"
        segments.append(_Segment(start, count, section))
    if not segments:
        return "no segments: not mapped"
    segments.sort(key=lambda s: s.start)
    extents: list[Extent] = []
    expected = 0
    for segment in segments:
        if segment.start != expected:
            return f"segments leave a gap or overlap at extent {expected}: not mapped"
        mapped = _map_striped(segment, places, extent_bytes, budget)
        if isinstance(mapped, str):
            return mapped
        extents.extend(mapped)
        expected += segment.extents
    return LogicalVolume(name, expected * extent_bytes, tuple(_merged(extents)))


def _map_striped(
    segment: _Segment, places: dict[str, _PvPlace], extent_bytes: int, budget: _Budget
) -> list[Extent] | str:
    section = segment.section
    stripe_count = section.get_int("stripe_count")
    areas = section.values.get("stripes")
    if stripe_count is None or stripe_count < 1 or not isinstance(areas, list):
        return "a striped segment without stripe_count or stripes: not mapped"
    if len(areas) != 2 * stripe_count or segment.extents % stripe_count:
        return (
            f"a segment of {segment.extents} extents with {len(areas)} stripe fields"
            f" for {stripe_count} stripes: not mapped"
        )
    area_extents = segment.extents // stripe_count
    starts: list[int] = []
    for pv_name, first in zip(areas[::2], areas[1::2], strict=True):
        if not isinstance(pv_name, str) or not isinstance(first, int) or first < 0:
            return "a stripe that is not a PV name and an extent number"
        place = places.get(pv_name)
        if place is None:
            return f"on {pv_name}, which is not a PV found on this disk: not mapped"
        if first + area_extents > place.pe_count:
            return f"extents {first}+{area_extents} past the {place.pe_count} of {pv_name}"
        start = place.data_offset + first * extent_bytes
        if start + area_extents * extent_bytes > place.device_end:
            return f"extents {first}+{area_extents} of {pv_name} lie past the end of its device"
        starts.append(start)
    lv_start = segment.start * extent_bytes
    if stripe_count == 1:
        if not budget.take(1):
            return f"more than {MAX_EXTENTS} extents in this scan: not mapped"
        return [Extent(lv_start, segment.extents * extent_bytes, starts[0])]
    stripe_size = section.get_int("stripe_size")
    if stripe_size is None or stripe_size <= 0:
        return "a striped segment without stripe_size: not mapped"
    chunk = stripe_size * SECTOR_SIZE
    area_bytes = area_extents * extent_bytes
    if area_bytes % chunk:
        # dm-stripe refuses a stripe length that is not a multiple of the chunk.
        return f"stripes of {area_bytes} bytes are not whole {chunk}-byte chunks: not mapped"
    rows = area_bytes // chunk
    if not budget.take(rows * stripe_count):
        return f"{rows * stripe_count} stripe chunks: more than the limit of {MAX_EXTENTS}"
    # dm-stripe: chunk n of the segment is chunk n // stripe_count of stripe n % stripe_count.
    return [
        Extent(lv_start + (row * stripe_count + stripe) * chunk, chunk, start + row * chunk)
        for row in range(rows)
        for stripe, start in enumerate(starts)
    ]


def _merged(extents: list[Extent]) -> Iterator[Extent]:
    """Adjacent extents that are adjacent on the disk too, as one."""
    current: Extent | None = None
    for extent in extents:
        if (
            current is not None
            and current.lv_offset + current.length == extent.lv_offset
            and current.device_offset + current.length == extent.device_offset
        ):
            current = Extent(
                current.lv_offset, current.length + extent.length, current.device_offset
            )
            continue
        if current is not None:
            yield current
        current = extent
    if current is not None:
        yield current
