"""Parse an uploaded VHD into the writes that apply it onto a disk.

Pure: the file is read through an injected ``read_at(offset, length)``.  Every
structure is checked before :func:`parse_vhd` returns, so a hostile file fails
with :class:`~vdifs.errors.MalformedImage`, :class:`~vdifs.errors.TooLarge` or
:class:`~vdifs.errors.Unsupported` and nothing else; memory stays bounded by
the limits below whatever the file claims.  Parent locators are never
followed, and the parent's name is only reported.

Like XAPI's vhd-tool ``serve`` (xapi-project/xen-api ``ocaml/vhd-tool/src/impl.ml``
``serve_vhd_to_raw``, ``ocaml/libs/vhd/vhd_format/f.ml`` ``From_input``), a dynamic or
differencing image writes exactly the sectors whose bitmap bit is set; unlike
it, fixed images are accepted and the footer is checked at both ends.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import NamedTuple

from vdifs.errors import MalformedImage, TooLarge, Unsupported, VdifsError
from vdifs.formats import c_vhd
from vdifs.formats.base import NotStreamable
from vdifs.model import ceil_div

SECTOR_SIZE = c_vhd.SECTOR_SIZE

MAX_BLOCK_SIZE = 256 * 1024 * 1024
"""Largest block size accepted.  Real writers use 2 MiB (qemu, Hyper-V,
vhd-tool) or 512 KiB; the cap bounds one sector bitmap read to 64 KiB."""
MAX_TABLE_ENTRIES = 1 << 20
"""Largest BAT accepted (4 MiB).  It covers MAX_VHD_SIZE with 2 MiB blocks
(1044480 entries) and bounds the BAT read and the per-block arrays (~12 B an
entry) before anything is allocated.  Smaller blocks on a disk beyond
``MAX_TABLE_ENTRIES * block_size`` are refused as too large."""
BAT_READ_ENTRIES = 64 * 1024
MAX_STREAM_HEAD = 16 * 1024 * 1024
"""Metadata a streamed VHD may put before its first block (a 2040 GiB BAT is 4 MiB)."""
"""The BAT is read this many entries (256 KiB) at a time."""
BLOCK_INDEX_BITS = (MAX_TABLE_ENTRIES - 1).bit_length()
BAT_ARRAY_TYPE = "I"
assert array(BAT_ARRAY_TYPE).itemsize == c_vhd.BAT_ENTRY.size

ReadAt = Callable[[int, int], bytes]


class Write(NamedTuple):
    """Copy ``length`` bytes at ``file_offset`` of the image to ``virtual_offset`` of the disk."""

    virtual_offset: int
    length: int
    file_offset: int


class BlockSpan(NamedTuple):
    """Where one allocated block lies in the file: its bitmap, then its data."""

    block: int
    bitmap_offset: int
    bitmap_size: int
    block_size: int

    @property
    def data_offset(self) -> int:
        return self.bitmap_offset + self.bitmap_size

    @property
    def end(self) -> int:
        return self.data_offset + self.block_size


@dataclass(frozen=True)
class _Blocks:
    """The allocated blocks of a dynamic or differencing image, in file order."""

    read_at: ReadAt
    block_size: int
    # (bitmap file offset // SECTOR_SIZE) << BLOCK_INDEX_BITS | block index, ascending.
    keys: array[int]


@dataclass(frozen=True)
class ParsedImage:
    virtual_size: int
    is_delta: bool
    """A differencing VHD: apply it onto its parent's content."""
    identity: bytes | None
    """The footer's unique id (16 bytes)."""
    parent_identity: bytes | None
    """The parent's unique id, for a differencing VHD."""
    parent_name: str | None
    """The parent's unicode name, for information only: nobody opens it."""
    _blocks: _Blocks | None = field(default=None, repr=False, compare=False)
    """None for a fixed image: all of it is data."""
    geometry_slack: int = 0
    """When the size is the footer's CHS geometry (qemu-img's default), the bytes of
    one cylinder: the size was rounded up to the geometry by less than that."""

    def writes(self) -> Iterator[Write]:
        """Runs of present data, ascending file offset, merged within a block.

        A fixed image is one run.  A dynamic or differencing image gives the
        runs of sectors whose bitmap bit is set, clipped to the virtual size;
        it reads one bitmap at a time through ``read_at``.
        """
        if self._blocks is None:
            if self.virtual_size:
                yield Write(0, self.virtual_size, 0)
            return
        used_bitmap_bytes = ceil_div(self._blocks.block_size // SECTOR_SIZE, 8)
        for span in self.blocks():
            bitmap = _read_exactly(self._blocks.read_at, span.bitmap_offset, used_bitmap_bytes)
            yield from self.block_writes(span, bitmap)

    def blocks(self) -> Iterator[BlockSpan]:
        """The allocated blocks in file order (none for a fixed image)."""
        if self._blocks is None:
            return
        block_size = self._blocks.block_size
        bitmap_size = c_vhd.bitmap_size(block_size)
        index_mask = (1 << BLOCK_INDEX_BITS) - 1
        for key in self._blocks.keys:
            yield BlockSpan(
                key & index_mask, (key >> BLOCK_INDEX_BITS) * SECTOR_SIZE, bitmap_size, block_size
            )

    def block_writes(self, span: BlockSpan, bitmap: bytes) -> Iterator[Write]:
        """The runs of one block whose bitmap bit is set, clipped to the virtual size.

        ``bitmap`` is (at least) the block's used bitmap bytes; a streaming
        importer passes it once the block has arrived.
        """
        sectors_per_block = span.block_size // SECTOR_SIZE
        virtual_start = span.block * span.block_size
        valid_sectors = min(sectors_per_block, (self.virtual_size - virtual_start) // SECTOR_SIZE)
        if valid_sectors <= 0:
            return  # a block past the disk, in a table longer than needed
        bitmap = bitmap[: ceil_div(sectors_per_block, 8)]
        for first, end in _set_runs(bitmap, valid_sectors):
            yield Write(
                virtual_start + first * SECTOR_SIZE,
                (end - first) * SECTOR_SIZE,
                span.data_offset + first * SECTOR_SIZE,
            )


def parse_vhd(read_at: ReadAt, file_size: int) -> ParsedImage:
    """Check a fixed, dynamic or differencing VHD of ``file_size`` bytes.

    Exceptions raised by ``read_at`` itself propagate unchanged.
    """
    if file_size < c_vhd.FOOTER_SIZE:
        raise MalformedImage(f"a VHD holds at least a 512-byte footer, this is {file_size} bytes")
    if file_size % SECTOR_SIZE:
        raise MalformedImage(f"VHD size {file_size} is not a whole number of sectors")
    footer_offset = file_size - c_vhd.FOOTER_SIZE
    footer_bytes = _read_exactly(read_at, footer_offset, c_vhd.FOOTER_SIZE)
    footer = _Footer.parse(footer_bytes)

    if footer.disk_type == c_vhd.DISK_TYPE_FIXED:
        if footer.data_offset not in (c_vhd.FIXED_DATA_OFFSET, c_vhd.FIXED_DATA_OFFSET_32):
            raise MalformedImage(f"fixed VHD with a data offset of {footer.data_offset}")
        if footer.current_size != footer_offset:
            raise MalformedImage(
                f"fixed VHD of {footer.current_size} bytes in a file of {file_size} bytes"
            )
        first_sector = _read_exactly(read_at, 0, c_vhd.FOOTER_SIZE)
        if first_sector != footer_bytes and is_vhd_footer(first_sector):
            # qemu reads the footer at offset 0 first and would see the inner
            # image; the specification reads the one at the end.  Neither is safe.
            raise MalformedImage(
                "ambiguous VHD: it ends with a fixed VHD's footer but begins with another"
                " VHD's footer (a fixed VHD holding a VHD?); import its data as raw instead"
            )
        return ParsedImage(
            footer.current_size,
            False,
            footer.unique_id,
            None,
            None,
            geometry_slack=footer.geometry_slack,
        )

    if _read_exactly(read_at, 0, c_vhd.FOOTER_SIZE) != footer_bytes:
        raise MalformedImage("the footer copy at offset 0 differs from the footer at the end")
    header_offset = footer.data_offset
    _check_inside("dynamic header", header_offset, c_vhd.HEADER_SIZE, footer_offset)
    header = _Header.parse(_read_exactly(read_at, header_offset, c_vhd.HEADER_SIZE))
    needed_entries = ceil_div(footer.current_size, header.block_size)
    if header.table_entries < needed_entries:
        raise MalformedImage(
            f"{header.table_entries} BAT entries of {header.block_size} bytes cannot hold "
            f"a disk of {footer.current_size} bytes"
        )
    if header.table_entries > MAX_TABLE_ENTRIES:
        raise TooLarge(
            f"the VHD has {header.table_entries} blocks, more than the {MAX_TABLE_ENTRIES} "
            "vdifs accepts"
        )
    bat_size = header.table_entries * c_vhd.BAT_ENTRY.size
    _check_inside("block allocation table", header.table_offset, bat_size, footer_offset)
    metadata = sorted(
        [
            (0, c_vhd.FOOTER_SIZE, "footer copy"),
            (header_offset, header_offset + c_vhd.HEADER_SIZE, "dynamic header"),
            (header.table_offset, header.table_offset + bat_size, "block allocation table"),
        ]
    )
    for (_, first_end, first), (second_start, _, second) in pairwise(metadata):
        if second_start < first_end:
            raise MalformedImage(f"the {first} overlaps the {second}")

    keys = _allocated_blocks(read_at, header.table_offset, header.table_entries)
    _check_blocks(keys, header.block_size, footer_offset, metadata)

    is_delta = footer.disk_type == c_vhd.DISK_TYPE_DIFFERENCING
    return ParsedImage(
        virtual_size=footer.current_size,
        is_delta=is_delta,
        identity=footer.unique_id,
        parent_identity=header.parent_unique_id if is_delta else None,
        parent_name=header.parent_name if is_delta else None,
        _blocks=_Blocks(read_at, header.block_size, keys),
        geometry_slack=footer.geometry_slack,
    )


def is_vhd_footer(sector: bytes) -> bool:
    """Whether 512 bytes are a VHD footer: the cookie and a matching checksum."""
    return (
        len(sector) == c_vhd.FOOTER_SIZE
        and sector.startswith(c_vhd.FOOTER_COOKIE)
        and c_vhd.CHECKSUM.unpack_from(sector, c_vhd.FOOTER_CHECKSUM_OFFSET)[0]
        == c_vhd.checksum(sector, c_vhd.FOOTER_CHECKSUM_OFFSET)
    )


class _Footer(NamedTuple):
    data_offset: int
    current_size: int
    disk_type: int
    unique_id: bytes
    geometry_slack: int

    @classmethod
    def parse(cls, raw: bytes) -> _Footer:
        (
            cookie,
            _features,
            version,
            data_offset,
            _timestamp,
            _creator_application,
            _creator_version,
            _creator_host_os,
            _original_size,
            current_size,
            cylinders,
            heads,
            sectors_per_track,
            disk_type,
            stored_checksum,
            unique_id,
            _saved_state,
            _reserved,
        ) = c_vhd.FOOTER.unpack(raw)
        if cookie != c_vhd.FOOTER_COOKIE:
            raise MalformedImage("no VHD footer: the last sector lacks the 'conectix' cookie")
        if stored_checksum != c_vhd.checksum(raw, c_vhd.FOOTER_CHECKSUM_OFFSET):
            raise MalformedImage("VHD footer checksum mismatch")
        if version >> 16 != c_vhd.FILE_FORMAT_VERSION >> 16:
            raise Unsupported(f"VHD file format version {version:#010x}")
        if disk_type in c_vhd.DEPRECATED_DISK_TYPES:
            raise Unsupported(f"VHD disk type {disk_type} is deprecated")
        if disk_type not in (
            c_vhd.DISK_TYPE_FIXED,
            c_vhd.DISK_TYPE_DYNAMIC,
            c_vhd.DISK_TYPE_DIFFERENCING,
        ):
            raise MalformedImage(f"unknown VHD disk type {disk_type}")
        if current_size % SECTOR_SIZE:
            raise MalformedImage(f"VHD size {current_size} is not a whole number of sectors")
        if current_size > c_vhd.MAX_VHD_SIZE:
            raise TooLarge(
                f"VHD size {current_size} is beyond the limit of {c_vhd.MAX_VHD_SIZE} bytes"
            )
        cylinder = heads * sectors_per_track * SECTOR_SIZE
        slack = cylinder if cylinders * cylinder == current_size else 0
        return cls(data_offset, current_size, disk_type, unique_id, slack)


class _Header(NamedTuple):
    table_offset: int
    table_entries: int
    block_size: int
    parent_unique_id: bytes
    parent_name: str | None

    @classmethod
    def parse(cls, raw: bytes) -> _Header:
        (
            cookie,
            _data_offset,  # unused by the spec; nothing to check it against
            table_offset,
            version,
            table_entries,
            block_size,
            stored_checksum,
            parent_unique_id,
            _parent_timestamp,
            _reserved,
            parent_name,
            _locators,  # never followed
            _reserved2,
        ) = c_vhd.HEADER.unpack(raw)
        if cookie != c_vhd.HEADER_COOKIE:
            raise MalformedImage("no dynamic disk header: the 'cxsparse' cookie is missing")
        if stored_checksum != c_vhd.checksum(raw, c_vhd.HEADER_CHECKSUM_OFFSET):
            raise MalformedImage("VHD dynamic header checksum mismatch")
        if version >> 16 != c_vhd.HEADER_VERSION >> 16:
            raise Unsupported(f"VHD dynamic header version {version:#010x}")
        if block_size < SECTOR_SIZE or block_size & (block_size - 1):
            raise MalformedImage(f"VHD block size {block_size} is not a power-of-two of sectors")
        if block_size > MAX_BLOCK_SIZE:
            raise Unsupported(
                f"VHD block size {block_size} is beyond the {MAX_BLOCK_SIZE} vdifs accepts"
            )
        return cls(
            table_offset, table_entries, block_size, parent_unique_id, _decode_name(parent_name)
        )


def _decode_name(raw: bytes) -> str | None:
    """The parent unicode name up to its first NUL, or None when empty."""
    length = len(raw)
    for position in range(0, len(raw), 2):
        if raw[position : position + 2] == b"\0\0":
            length = position
            break
    try:
        name = raw[:length].decode(c_vhd.PARENT_NAME_ENCODING)
    except UnicodeDecodeError:
        raise MalformedImage("the VHD parent name is not valid UTF-16") from None
    return name or None


def _allocated_blocks(read_at: ReadAt, table_offset: int, table_entries: int) -> array[int]:
    """Sort keys of the allocated BAT entries, in file order (see :class:`_Blocks`)."""
    keys: list[int] = []
    for first in range(0, table_entries, BAT_READ_ENTRIES):
        count = min(BAT_READ_ENTRIES, table_entries - first)
        entries = array(BAT_ARRAY_TYPE)
        entries.frombytes(
            _read_exactly(
                read_at,
                table_offset + first * c_vhd.BAT_ENTRY.size,
                count * c_vhd.BAT_ENTRY.size,
            )
        )
        if sys.byteorder != "big":
            entries.byteswap()  # BAT entries are big-endian
        keys.extend(
            entry << BLOCK_INDEX_BITS | (first + position)
            for position, entry in enumerate(entries)
            if entry != c_vhd.BAT_UNUSED
        )
    keys.sort()
    return array("Q", keys)


def _check_blocks(
    keys: array[int],
    block_size: int,
    footer_offset: int,
    metadata: list[tuple[int, int, str]],
) -> None:
    """Every block lies before the footer, off the metadata, and off every other block."""
    block_span = c_vhd.bitmap_size(block_size) + block_size
    previous_end = 0
    for key in keys:
        start = (key >> BLOCK_INDEX_BITS) * SECTOR_SIZE
        end = start + block_span
        block_index = key & ((1 << BLOCK_INDEX_BITS) - 1)
        if end > footer_offset:
            raise MalformedImage(f"VHD block {block_index} at {start} runs past the data area")
        if start < previous_end:
            raise MalformedImage(f"VHD block {block_index} at {start} overlaps another block")
        for region_start, region_end, region in metadata:
            if start < region_end and region_start < end:
                raise MalformedImage(f"VHD block {block_index} at {start} overlaps the {region}")
        previous_end = end


def _set_runs(bitmap: bytes, valid_sectors: int) -> Iterator[tuple[int, int]]:
    """``(first, end)`` sector runs whose bit is set (MSB first), below ``valid_sectors``."""
    bits = int.from_bytes(bitmap, "big") >> (len(bitmap) * 8 - valid_sectors)
    # Bit i of ``bits`` is sector valid_sectors - 1 - i: peel runs off the top.
    while bits:
        top = bits.bit_length()
        below_run = (~bits & ((1 << top) - 1)).bit_length()
        yield valid_sectors - top, valid_sectors - below_run
        bits &= (1 << below_run) - 1


def _check_inside(what: str, offset: int, length: int, limit: int) -> None:
    if offset < 0 or offset + length > limit:
        raise MalformedImage(f"the VHD {what} at {offset} lies outside the file")


def _read_exactly(read_at: ReadAt, offset: int, length: int) -> bytes:
    data = read_at(offset, length)
    if len(data) != length:
        raise MalformedImage(f"VHD truncated: {len(data)} of {length} bytes at {offset}")
    return data


def metadata_length(head: bytes | bytearray) -> int:
    """Bytes from offset 0 that hold a dynamic VHD's footer copy, header and BAT.

    A streaming importer calls this as the file's first bytes arrive; while
    the answer exceeds ``len(head)`` it needs more.  Raises
    :class:`NotStreamable` for a fixed VHD, a damaged head (the whole-file
    parse gives the precise verdict) or metadata beyond :data:`MAX_STREAM_HEAD`.
    """
    if len(head) < c_vhd.FOOTER_SIZE:
        return c_vhd.FOOTER_SIZE
    try:
        footer = _Footer.parse(bytes(head[: c_vhd.FOOTER_SIZE]))
    except VdifsError as exc:
        raise NotStreamable(str(exc)) from None
    if footer.disk_type == c_vhd.DISK_TYPE_FIXED:
        raise NotStreamable("a fixed VHD has no footer copy at offset 0")
    need = footer.data_offset + c_vhd.HEADER_SIZE
    if need > MAX_STREAM_HEAD or footer.data_offset < c_vhd.FOOTER_SIZE:
        raise NotStreamable("the dynamic header is not near the start")
    if len(head) < need:
        return need
    try:
        header = _Header.parse(bytes(head[footer.data_offset : need]))
    except VdifsError as exc:
        raise NotStreamable(str(exc)) from None
    bat_end = header.table_offset + header.table_entries * c_vhd.BAT_ENTRY.size
    if bat_end > MAX_STREAM_HEAD or header.table_entries > MAX_TABLE_ENTRIES:
        raise NotStreamable("the block allocation table is not near the start")
    return max(need, bat_end)


def streamed_size(head: bytes | bytearray) -> int:
    """The smallest file that can hold the blocks the BAT in ``head`` names, footer included.

    A streaming importer parses with this presumed size before the end has
    arrived, and checks at the end that the real footer matches the copy.
    """
    header, entries = _head_table(head)
    used = [e for e in entries if e != c_vhd.BAT_UNUSED]
    last_end = header.table_offset + len(entries) * c_vhd.BAT_ENTRY.size
    if used:
        span = c_vhd.bitmap_size(header.block_size) + header.block_size
        last_end = max(last_end, max(used) * SECTOR_SIZE + span)
    return c_vhd.round_up_to_sector(last_end) + c_vhd.FOOTER_SIZE


def allocated_blocks(head: bytes | bytearray) -> tuple[int, list[int]]:
    """``(block size, indexes of the blocks the BAT allocates)`` from a VHD's head
    (as much as :func:`metadata_length` asks for): how much a pool's disk holds,
    read from the head of XAPI's VHD export."""
    header, entries = _head_table(head)
    return header.block_size, [i for i, e in enumerate(entries) if e != c_vhd.BAT_UNUSED]


def _head_table(head: bytes | bytearray) -> tuple[_Header, array[int]]:
    footer = _Footer.parse(bytes(head[: c_vhd.FOOTER_SIZE]))
    header = _Header.parse(bytes(head[footer.data_offset : footer.data_offset + c_vhd.HEADER_SIZE]))
    entries = array(BAT_ARRAY_TYPE)
    bat_size = header.table_entries * c_vhd.BAT_ENTRY.size
    entries.frombytes(bytes(head[header.table_offset : header.table_offset + bat_size]))
    if sys.byteorder != "big":
        entries.byteswap()
    return header, entries
