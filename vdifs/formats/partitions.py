"""Read a disk's MBR or GPT partition table into byte ranges of the disk.

Pure: the disk is read through an injected ``read_at(offset, length)``, never
outside ``[0, disk_size)``.  :func:`read_table` never raises for any content
of the disk (only exceptions of ``read_at`` itself propagate): what cannot be
used gives scheme ``"none"``, and everything odd is said in
:attr:`PartitionTable.notes`.  Reads and memory are bounded whatever the disk
claims (an EBR chain of at most :data:`MAX_EBRS` links, a GPT entry array of
at most :data:`~vdifs.formats.c_partitions.MAX_GPT_ENTRY_ARRAY` bytes).

The rules follow Linux (``block/partitions/efi.c`` runs before ``msdos.c``)
so that partitions are numbered as a Linux guest sees them, with these
differences, each reported in the notes when it matters:

* the backup GPT is used when the primary is damaged, as libfdisk (sfdisk,
  fdisk) and libblkid do.  Linux itself only does that with the ``gpt`` boot
  option;
* entries crossing the end of the disk are clipped to it, in GPT as in MBR
  (Linux clips MBR ones and drops GPT ones), and ones starting past it are
  left out (as Linux does);
* an extended partition is shown with its whole extent (Linux shows its first
  1 KiB only, to keep mkfs off it); :attr:`Partition.is_extended` tells it;
* BSD disklabels, Solaris and UnixWare slices and Minix subpartitions inside
  MBR partitions are not read;
* only 512-byte logical sectors are supported (a 4Kn disk's GPT is at byte
  4096 and is not found).

Sources: the UEFI Specification, chapter 5 (GPT); Linux
``block/partitions/msdos.c`` (``msdos_partition``, ``parse_extended``),
``block/partitions/efi.c`` (``find_valid_gpt``, ``is_gpt_valid``,
``is_pmbr_valid``) and ``block/partitions/core.c`` (``blk_add_partition``:
start past the end dropped, end past it clipped).
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from vdifs.formats import c_partitions as c
from vdifs.formats.notes import Notes, listed

ReadAt = Callable[[int, int], bytes]

SECTOR_SIZE = c.SECTOR_SIZE

MAX_EBRS = 256
"""Longest EBR chain followed (Linux gives up after 100 links without a data
partition, and numbers no partition above 255 on a loop device)."""
MAX_NOTES = 32
"""Notes kept; a hostile table could otherwise produce one per entry."""
"""Partition numbers (or overlapping pairs) named in one note before "..."."""


@dataclass(frozen=True)
class Partition:
    """One partition: ``size`` bytes of the disk from byte ``start``.

    ``start + size`` never exceeds the disk's size (see the notes of the
    table for entries that were clipped).
    """

    number: int
    """As Linux numbers it: MBR primaries 1-4 by slot, logical partitions from 5
    in EBR chain order; GPT entry index + 1."""
    start: int
    size: int
    type: str
    """MBR: the system indicator as ``"0x83"``; GPT: the type GUID, lowercase."""
    name: str
    """GPT partition name; ``""`` for MBR."""
    uuid: str | None
    """GPT unique partition GUID, lowercase; None for MBR."""
    attributes: int
    """GPT attribute bits; for MBR the boot indicator (0x80: bootable, else 0)."""

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def is_extended(self) -> bool:
        """An MBR extended partition: the container of the logical ones."""
        return self.uuid is None and self.type in _EXTENDED_TYPE_NAMES

    def to_json(self) -> dict[str, object]:
        return {
            "number": self.number,
            "start": self.start,
            "size": self.size,
            "type": self.type,
            "name": self.name,
            "uuid": self.uuid,
            "attributes": self.attributes,
        }


@dataclass(frozen=True)
class PartitionTable:
    scheme: str
    """``"gpt"``, ``"mbr"`` or ``"none"``."""
    disk_id: str | None
    """MBR disk signature as ``"0x%08x"``; GPT disk GUID, lowercase; None without a table."""
    partitions: tuple[Partition, ...]
    """Ascending by number."""
    notes: tuple[str, ...]
    """What was odd about the table and what was done about it."""

    def to_json(self) -> dict[str, object]:
        return {
            "scheme": self.scheme,
            "sector_size": SECTOR_SIZE,
            "disk_id": self.disk_id,
            "partitions": [p.to_json() for p in self.partitions],
            "notes": list(self.notes),
        }


def _mbr_type_name(system_indicator: int) -> str:
    return f"0x{system_indicator:02x}"


_EXTENDED_TYPE_NAMES = frozenset(_mbr_type_name(t) for t in c.EXTENDED_TYPES)


def read_table(read_at: ReadAt, disk_size: int) -> PartitionTable:
    """The partition table of a disk of ``disk_size`` bytes."""
    disk = _Disk(read_at, disk_size)
    notes = Notes(MAX_NOTES)
    mbr = disk.sector(0)
    if mbr is None:
        notes.add(f"the disk ({disk_size} bytes) is smaller than one sector: no partition table")
        return _none(notes)
    if mbr[c.MBR_SIGNATURE_OFFSET :] != c.MBR_SIGNATURE:
        if _looks_like_gpt(disk.sector(c.GPT_PRIMARY_LBA)):
            notes.add(
                "a GPT header at LBA 1 but no MBR signature (protective MBR missing):"
                " ignored, as Linux and libfdisk do"
            )
        return _none(notes)
    entries = [
        _MbrEntry._make(c.MBR_ENTRY.unpack_from(mbr, c.MBR_TABLE_OFFSET + i * c.MBR_ENTRY.size))
        for i in range(c.MBR_ENTRY_COUNT)
    ]
    for slot, entry in enumerate(entries, 1):
        if entry.boot not in (c.BOOT_ACTIVE, c.BOOT_INACTIVE):
            # msdos.c: a 55AA sector whose boot indicators are not 0/0x80 is a
            # boot sector (FAT, NTFS... on an unpartitioned disk), not a table.
            notes.add(
                f"sector 0 ends in 55AA but entry {slot} has boot indicator 0x{entry.boot:02x}:"
                " not a partition table (a file system's boot sector?)"
            )
            return _none(notes)
    if any(entry.type == c.TYPE_GPT_PROTECTIVE for entry in entries):
        return _read_gpt(disk, entries, notes)
    return _read_mbr(disk, mbr, entries, notes)


# --- helpers ----------------------------------------------------------------------------------


class _Disk:
    """``read_at`` kept inside the disk."""

    def __init__(self, read_at: ReadAt, size: int) -> None:
        self._read_at = read_at
        self.size = max(size, 0)
        self.sectors = self.size // SECTOR_SIZE

    def read(self, offset: int, length: int) -> bytes | None:
        """Exactly ``length`` bytes at ``offset``, or None if they are not all on the disk."""
        if offset < 0 or length < 0 or offset + length > self.size:
            return None
        data = self._read_at(offset, length) if length else b""
        return data if len(data) == length else None

    def sector(self, lba: int) -> bytes | None:
        return self.read(lba * SECTOR_SIZE, SECTOR_SIZE)


class _MbrEntry(NamedTuple):
    boot: int
    chs_first: bytes
    type: int
    chs_last: bytes
    lba: int
    sectors: int


class _Candidate(NamedTuple):
    """A partition as the table gives it, in sectors, not yet checked against the disk."""

    number: int
    start_lba: int
    sectors: int
    type: str
    name: str = ""
    uuid: str | None = None
    attributes: int = 0


def _none(notes: Notes) -> PartitionTable:
    return PartitionTable("none", None, (), notes.result())


def _finish(
    disk: _Disk, scheme: str, disk_id: str, found: list[_Candidate], notes: Notes
) -> PartitionTable:
    """Drop entries starting past the end, clip those crossing it, report overlaps."""
    partitions: list[Partition] = []
    dropped: list[str] = []
    clipped: list[str] = []
    for entry in sorted(found, key=lambda e: e.number):
        start = entry.start_lba * SECTOR_SIZE
        size = entry.sectors * SECTOR_SIZE
        if start >= disk.size:
            dropped.append(str(entry.number))
            continue
        if start + size > disk.size:
            clipped.append(str(entry.number))
            size = disk.size - start
        partitions.append(
            Partition(
                entry.number, start, size, entry.type, entry.name, entry.uuid, entry.attributes
            )
        )
    if dropped:
        notes.add(
            f"partition(s) {listed(dropped)} start past the end of the disk"
            f" ({disk.size} bytes): left out"
        )
    if clipped:
        notes.add(f"partition(s) {listed(clipped)} end past the end of the disk: clipped to it")
    _note_overlaps(partitions, notes)
    return PartitionTable(scheme, disk_id, tuple(partitions), notes.result())


def _note_overlaps(partitions: list[Partition], notes: Notes) -> None:
    """Name overlapping data partitions (not an extended one with its logical ones).

    Overlap is harmless for read-only views; it is reported because it means
    the table is damaged or hand-made.  One sweep finds, for each partition
    that starts inside an earlier one, the earlier one reaching furthest.
    """
    pairs: set[tuple[int, int]] = set()
    data = sorted((p for p in partitions if not p.is_extended), key=lambda p: (p.start, p.number))
    furthest: Partition | None = None
    for p in data:
        if furthest is not None and p.start < furthest.end:
            pairs.add((min(furthest.number, p.number), max(furthest.number, p.number)))
        if furthest is None or p.end > furthest.end:
            furthest = p
    primaries = [p for p in partitions if p.number < c.FIRST_LOGICAL_NUMBER]
    for container in (p for p in primaries if p.is_extended):
        for other in primaries:
            if (
                other is not container
                and other.start < container.end
                and container.start < other.end
            ):
                pairs.add(
                    (min(container.number, other.number), max(container.number, other.number))
                )
    if pairs:
        overlaps = [f"{a} and {b}" for a, b in sorted(pairs)]
        notes.add(f"overlapping partitions: {listed(overlaps)} (all shown: read-only views)")


# --- MBR ----------------------------------------------------------------------------------------


def _read_mbr(disk: _Disk, mbr: bytes, entries: list[_MbrEntry], notes: Notes) -> PartitionTable:
    disk_id = f"0x{c.MBR_DISK_ID.unpack_from(mbr, c.MBR_DISK_ID_OFFSET)[0]:08x}"
    found: list[_Candidate] = []
    next_logical = c.FIRST_LOGICAL_NUMBER
    visited: set[int] = set()  # EBR sectors, over all extended partitions
    for slot, entry in enumerate(entries, 1):
        if not entry.sectors:
            continue  # msdos.c skips a slot of size 0 whatever its type
        found.append(
            _Candidate(
                slot,
                entry.lba,
                entry.sectors,
                _mbr_type_name(entry.type),
                attributes=entry.boot,
            )
        )
        if entry.type in c.EXTENDED_TYPES:
            next_logical = _read_ebr_chain(
                disk, entry.lba, entry.sectors, next_logical, visited, found, notes
            )
    return _finish(disk, "mbr", disk_id, found, notes)


def _read_ebr_chain(
    disk: _Disk,
    first_sector: int,
    first_size: int,
    next_number: int,
    visited: set[int],
    found: list[_Candidate],
    notes: Notes,
) -> int:
    """Follow the chain of EBRs of one extended partition like msdos.c ``parse_extended``.

    Data entries are relative to their own EBR; the link to the next EBR is
    relative to the extended partition.  Returns the next logical number.  ``visited``
    bounds the EBRs read over all extended partitions to :data:`MAX_EBRS`.
    """
    this_sector, this_size = first_sector, first_size
    while True:
        if next_number >= c.MAX_PARTITION_NUMBER:
            notes.add(f"more than {c.MAX_PARTITION_NUMBER - 1} partitions: the rest left out")
            return next_number
        if this_sector in visited:
            notes.add(f"the EBR chain loops back to sector {this_sector}: stopped there")
            return next_number
        if len(visited) >= MAX_EBRS:
            notes.add(f"more than {MAX_EBRS} EBRs: the chain is not followed further")
            return next_number
        visited.add(this_sector)
        ebr = disk.sector(this_sector)
        if ebr is None:
            notes.add(f"the EBR chain leads to sector {this_sector}, past the end of the disk")
            return next_number
        if ebr[c.MBR_SIGNATURE_OFFSET :] != c.MBR_SIGNATURE:
            if this_sector != first_sector:
                notes.add(f"the EBR at sector {this_sector} has no 55AA signature: chain ends")
            return next_number
        ebr_entries = [
            _MbrEntry._make(c.MBR_ENTRY.unpack_from(ebr, c.MBR_TABLE_OFFSET + i * c.MBR_ENTRY.size))
            for i in range(c.MBR_ENTRY_COUNT)
        ]
        for i, entry in enumerate(ebr_entries):
            if not entry.sectors or entry.type in c.EXTENDED_TYPES:
                continue
            start = this_sector + entry.lba
            if i >= 2 and (
                # msdos.c: "the 3rd and 4th entries sometimes contain random garbage"
                entry.lba + entry.sectors > this_size
                or start < first_sector
                or start + entry.sectors > first_sector + first_size
            ):
                continue
            found.append(
                _Candidate(
                    next_number,
                    start,
                    entry.sectors,
                    _mbr_type_name(entry.type),
                    attributes=entry.boot if entry.boot == c.BOOT_ACTIVE else 0,
                )
            )
            next_number += 1
            if next_number >= c.MAX_PARTITION_NUMBER:
                break
        link = next(
            (e for e in ebr_entries if e.sectors and e.type in c.EXTENDED_TYPES),
            None,
        )
        if link is None:
            return next_number
        this_sector, this_size = first_sector + link.lba, link.sectors


# --- GPT ----------------------------------------------------------------------------------------


class _GptHeader(NamedTuple):
    signature: bytes
    revision: int
    header_size: int
    header_crc: int
    reserved: int
    my_lba: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: bytes
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int


class _Gpt(NamedTuple):
    header: _GptHeader
    entries: bytes


class _BadGpt(NamedTuple):
    reason: str
    header: _GptHeader | None
    """The header if its own CRC was right (its alternate LBA is then worth trying)."""


def _looks_like_gpt(sector: bytes | None) -> bool:
    return sector is not None and sector.startswith(c.GPT_SIGNATURE)


def _read_gpt_at(disk: _Disk, lba: int) -> _Gpt | _BadGpt:
    """The header at ``lba`` and its entry array, checked as efi.c ``is_gpt_valid`` does."""
    sector = disk.sector(lba)
    if sector is None:
        return _BadGpt(f"LBA {lba} is past the end of the disk", None)
    header = _GptHeader._make(c.GPT_HEADER.unpack_from(sector))
    if header.signature != c.GPT_SIGNATURE:
        return _BadGpt("no 'EFI PART' signature", None)
    if not c.GPT_HEADER_MIN_SIZE <= header.header_size <= SECTOR_SIZE:
        return _BadGpt(f"header size {header.header_size}", None)
    covered = bytearray(sector[: header.header_size])
    covered[c.GPT_HEADER_CRC_OFFSET : c.GPT_HEADER_CRC_OFFSET + 4] = bytes(4)
    if zlib.crc32(covered) != header.header_crc:
        return _BadGpt("header CRC32 mismatch", None)
    if header.my_lba != lba:
        return _BadGpt(f"it says it is at LBA {header.my_lba}", header)
    if header.first_usable_lba > header.last_usable_lba:
        return _BadGpt("first usable LBA after the last usable one", header)
    size = header.entry_size
    if size < c.GPT_ENTRY_MIN_SIZE or size > c.GPT_ENTRY_MAX_SIZE or size & (size - 1):
        return _BadGpt(f"partition entry size {size} (not 128 x 2^n up to 4096)", header)
    array_size = header.entry_count * size
    if array_size > c.MAX_GPT_ENTRY_ARRAY:
        return _BadGpt(
            f"{header.entry_count} entries of {size} bytes: more than the"
            f" {c.MAX_GPT_ENTRY_ARRAY} bytes accepted",
            header,
        )
    entries = disk.read(header.entries_lba * SECTOR_SIZE, array_size)
    if entries is None:
        return _BadGpt(f"its entry array at LBA {header.entries_lba} ends past the disk", header)
    if zlib.crc32(entries) != header.entries_crc:
        return _BadGpt("entry array CRC32 mismatch", header)
    return _Gpt(header, entries)


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


def _read_gpt(disk: _Disk, mbr_entries: list[_MbrEntry], notes: Notes) -> PartitionTable:
    """GPT behind a protective (or hybrid) MBR, like efi.c ``find_valid_gpt``."""
    last_lba = disk.sectors - 1
    if not any(e.type == c.TYPE_GPT_PROTECTIVE and e.lba == c.GPT_PRIMARY_LBA for e in mbr_entries):
        notes.add("the MBR's 0xEE entry does not start at LBA 1 (Linux would ignore this GPT)")
    if any(e.type not in (c.TYPE_GPT_PROTECTIVE, c.TYPE_EMPTY) for e in mbr_entries):
        notes.add("hybrid MBR: its other entries are ignored, the GPT is used (as Linux does)")
    primary = _read_gpt_at(disk, c.GPT_PRIMARY_LBA)
    chosen: _Gpt | None = None
    if isinstance(primary, _Gpt):
        chosen = primary
        alternate = primary.header.alternate_lba
        backup = _read_gpt_at(disk, alternate)
        if isinstance(backup, _BadGpt):
            notes.add(f"the backup GPT at LBA {alternate} is unusable ({backup.reason})")
        elif alternate != last_lba:
            notes.add(
                f"the backup GPT is at LBA {alternate}, not at the disk's last LBA {last_lba}"
                " (the disk was resized?)"
            )
    else:
        tried = [last_lba]
        if primary.header is not None and primary.header.alternate_lba not in tried:
            tried.append(primary.header.alternate_lba)
        reasons: list[str] = []
        for lba in tried:
            backup = _read_gpt_at(disk, lba)
            if isinstance(backup, _Gpt):
                chosen = backup
                notes.add(
                    f"the primary GPT is unusable ({primary.reason}):"
                    f" the backup GPT at LBA {lba} is used"
                )
                break
            reasons.append(f"at LBA {lba}: {backup.reason}")
        if chosen is None:
            notes.add(
                f"protective MBR but no usable GPT (primary: {primary.reason};"
                f" backup {'; '.join(reasons)}): no partitions (Linux shows none either)"
            )
            return _none(notes)
    header = chosen.header
    if header.last_usable_lba > last_lba:
        notes.add(
            f"the GPT's last usable LBA {header.last_usable_lba} is past the disk's last LBA"
            f" {last_lba} (the disk was truncated?)"
        )
    found: list[_Candidate] = []
    backwards: list[str] = []
    for index in range(header.entry_count):
        offset = index * header.entry_size
        raw = c.GPT_ENTRY.unpack_from(chosen.entries, offset)
        type_guid, unique_guid, first, last, attributes, name = raw
        if type_guid == c.GPT_UNUSED_TYPE:
            continue
        if last < first:
            backwards.append(str(index + 1))
            continue
        found.append(
            _Candidate(
                index + 1,
                first,
                last - first + 1,
                _guid(type_guid),
                _gpt_name(name),
                _guid(unique_guid),
                attributes,
            )
        )
    if backwards:
        notes.add(f"GPT entries {listed(backwards)} end before they start: left out")
    return _finish(disk, "gpt", _guid(header.disk_guid), found, notes)


def _gpt_name(raw: bytes) -> str:
    """The UTF-16LE name up to its first NUL code unit."""
    for i in range(0, len(raw) - 1, 2):
        if raw[i] == 0 and raw[i + 1] == 0:
            raw = raw[:i]
            break
    return raw.decode(c.GPT_NAME_ENCODING, errors="replace")
