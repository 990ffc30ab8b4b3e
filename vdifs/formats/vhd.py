"""Dynamic and differencing VHD images computed lazily from an allocation.

The file is laid out in one forward order, like XAPI's vhd-tool stream
(xapi-project/xen-api ``ocaml/libs/vhd/vhd_format/f.ml`` ``Vhd_input.vhd_common``), so a
streaming importer can consume it::

    0                 footer copy (512)
    512               dynamic header (1024)
    1536              parent locator data (differencing only, sector-padded)
    bat_offset        BAT: one u32 per 2 MiB block, sector-padded with 0xFFFFFFFF
    blocks_offset     for the k-th carried block, in ascending block index:
                        sector bitmap (512), then 2 MiB of data
    size - 512        footer

Every offset is arithmetic on the number of carried blocks, so a read of any
range costs a bisect on ``allocation.blocks`` plus the pieces it returns.

A differencing VHD carries each of its blocks whole, every sector bit set, as
XAPI's vhd-tool writes them: Xen Orchestra's vhd-lib reads, merges and
restores a chain block by block and never looks at a bitmap, so a block
carried in part would lose its parent's sectors there (docs/dev-formats-vhd.md).
A dynamic VHD marks only the sectors of carried chunks; the rest of its
blocks hold zeros, which is what every reader, bitmap or not, then sees.
"""

from __future__ import annotations

import functools
from bisect import bisect_left
from collections.abc import Iterator
from functools import cached_property

from vdifs.errors import InvalidArgument, TooLarge
from vdifs.formats import c_vhd
from vdifs.formats.base import (
    Data,
    ImageIdentity,
    Meta,
    ParentRef,
    Segment,
    Zero,
    coalesce,
    trailing_ones,
    trailing_zeros,
)
from vdifs.model import BLOCK_SIZE, CHUNK_SIZE, CHUNKS_PER_BLOCK, SECTOR_SIZE, Allocation, ceil_div

BITMAP_SIZE = c_vhd.bitmap_size(BLOCK_SIZE)
BLOCK_STRIDE = BITMAP_SIZE + BLOCK_SIZE
"""File bytes one carried block takes: its bitmap, then its data."""
SECTORS_PER_CHUNK = CHUNK_SIZE // SECTOR_SIZE
HEADER_OFFSET = c_vhd.FOOTER_SIZE
LOCATOR_DATA_OFFSET = HEADER_OFFSET + c_vhd.HEADER_SIZE
UUID_SIZE = 16

assert BITMAP_SIZE == SECTOR_SIZE
assert SECTORS_PER_CHUNK % 8 == 0, "a chunk covers whole bitmap bytes"


class VhdLayout:
    """A dynamic VHD (``parent is None``) or a differencing VHD over ``parent``.

    Implements :class:`vdifs.formats.base.Layout`.  Same inputs give the same
    bytes: every field comes from the arguments, nothing from the clock.
    """

    def __init__(
        self,
        allocation: Allocation,
        identity: ImageIdentity,
        parent: ParentRef | None = None,
    ) -> None:
        virtual_size = allocation.virtual_size
        if virtual_size > c_vhd.MAX_VHD_SIZE:
            raise TooLarge(
                f"virtual size {virtual_size} is beyond the VHD limit of "
                f"{c_vhd.MAX_VHD_SIZE} bytes (2040 GiB)"
            )
        _check_uuid(identity.uuid, "image")
        if parent is not None:
            allocation = allocation.whole_blocks()
        table_entries = ceil_div(virtual_size, BLOCK_SIZE)
        blocks = allocation.blocks
        if blocks and blocks[-1] >= table_entries:
            raise ValueError(f"block {blocks[-1]} is past the virtual size {virtual_size}")
        if any(map(int.__ge__, blocks, blocks[1:])):
            raise ValueError("allocation blocks are not strictly ascending")

        self._allocation = allocation
        self._virtual_size = virtual_size
        self._table_entries = table_entries

        locator_data = b""
        if parent is not None:
            _check_uuid(parent.identity.uuid, "parent")
            locator_data = _macx_locator_data(parent.file_name)
        self._bat_offset = LOCATOR_DATA_OFFSET + len(locator_data)
        self._bat_size = c_vhd.round_up_to_sector(table_entries * c_vhd.BAT_ENTRY.size)
        self._blocks_offset = self._bat_offset + self._bat_size
        self._footer_offset = self._blocks_offset + len(blocks) * BLOCK_STRIDE
        self._size = self._footer_offset + c_vhd.FOOTER_SIZE
        # BAT entries are u32 sector numbers; this holds up to MAX_VHD_SIZE.
        assert self._footer_offset // SECTOR_SIZE <= c_vhd.BAT_UNUSED

        self._identity = identity
        self._parent = parent
        self._locator_data = locator_data

    @property
    def size(self) -> int:
        return self._size

    # The footer and header are packed and checksummed when first read, not
    # when the layout is made: ls -l makes one per image file for its size.
    @cached_property
    def _footer(self) -> bytes:
        return _footer(self._virtual_size, self._identity, self._parent is not None)

    @cached_property
    def _prologue(self) -> bytes:
        """Everything before the BAT, small and fixed: one piece."""
        header = _header(
            table_offset=self._bat_offset,
            table_entries=self._table_entries,
            parent=self._parent,
            locator_data_size=len(self._locator_data),
        )
        return self._footer + header + self._locator_data

    @cached_property
    def allocated_bytes(self) -> int:
        """Metadata plus carried chunks (the last one may round up past the disk)."""
        metadata = self._blocks_offset + len(self._allocation.blocks) * BITMAP_SIZE
        return metadata + self._allocation.chunk_count * CHUNK_SIZE + c_vhd.FOOTER_SIZE

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        return coalesce(self._pieces(offset, min(offset + length, self._size)))

    def _pieces(self, start: int, end: int) -> Iterator[Segment]:
        """Segments of ``[start, end)``, one region at a time, not yet merged."""
        if start >= end:
            return
        if start < self._bat_offset:
            yield Meta(self._prologue[start : min(end, self._bat_offset)])
        if start < self._blocks_offset and end > self._bat_offset:
            yield Meta(
                self._bat_bytes(
                    max(start, self._bat_offset) - self._bat_offset,
                    min(end, self._blocks_offset) - self._bat_offset,
                )
            )
        if start < self._footer_offset and end > self._blocks_offset:
            yield from self._block_pieces(
                max(start, self._blocks_offset) - self._blocks_offset,
                min(end, self._footer_offset) - self._blocks_offset,
            )
        if end > self._footer_offset:
            footer_start = max(start, self._footer_offset) - self._footer_offset
            yield Meta(self._footer[footer_start : end - self._footer_offset])

    def _bat_bytes(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the BAT, built only for the entries they touch."""
        entry_size = c_vhd.BAT_ENTRY.size
        first_entry = start // entry_size
        end_entry = ceil_div(end, entry_size)
        table = bytearray(c_vhd.BAT_UNUSED_BYTES * (end_entry - first_entry))
        blocks = self._allocation.blocks
        # Padding entries past the table are never matched: every block < table_entries.
        for k in range(bisect_left(blocks, first_entry), bisect_left(blocks, end_entry)):
            bitmap_sector = (self._blocks_offset + k * BLOCK_STRIDE) // SECTOR_SIZE
            c_vhd.BAT_ENTRY.pack_into(table, (blocks[k] - first_entry) * entry_size, bitmap_sector)
        skip = first_entry * entry_size
        return bytes(table[start - skip : end - skip])

    def _block_pieces(self, start: int, end: int) -> Iterator[Segment]:
        """Segments of ``[start, end)`` of the carried-block area."""
        blocks = self._allocation.blocks
        masks = self._allocation.masks
        k = start // BLOCK_STRIDE
        while start < end:
            block_file_start = k * BLOCK_STRIDE
            block_end = min(end, block_file_start + BLOCK_STRIDE)
            block_index = blocks[k]
            valid_sectors = self._valid_sectors(block_index)
            if start < block_file_start + BITMAP_SIZE:
                bitmap = _bitmap(masks[k], valid_sectors)
                yield Meta(
                    bitmap[
                        start - block_file_start : min(block_end - block_file_start, BITMAP_SIZE)
                    ]
                )
                start = block_file_start + BITMAP_SIZE
            if start < block_end:
                data_start = block_file_start + BITMAP_SIZE
                yield from _data_pieces(
                    block_index * BLOCK_SIZE,
                    masks[k],
                    valid_sectors * SECTOR_SIZE,
                    start - data_start,
                    block_end - data_start,
                )
            start = block_end
            k += 1

    def _valid_sectors(self, block_index: int) -> int:
        """Sectors of a block that lie inside the virtual disk."""
        return min(BLOCK_SIZE, self._virtual_size - block_index * BLOCK_SIZE) // SECTOR_SIZE


def _data_pieces(
    block_virtual_offset: int, mask: int, valid_bytes: int, start: int, end: int
) -> Iterator[Segment]:
    """Segments of bytes ``[start, end)`` of one block's data.

    Carried chunks inside the disk are Data, everything else Zero.  A run of
    carried chunks (or of absent ones) is one segment: a megabyte read then
    walks a few runs, not sixteen chunks.
    """
    while start < end:
        chunk = start // CHUNK_SIZE
        rest = mask >> chunk
        if rest & 1:
            run = trailing_ones(rest)
            piece_end = min(end, (chunk + run) * CHUNK_SIZE)
            data_end = min(piece_end, valid_bytes)
            if data_end > start:
                yield Data(block_virtual_offset + start, data_end - start)
            if piece_end > max(data_end, start):
                yield Zero(piece_end - max(data_end, start))
        else:
            run = trailing_zeros(rest) if rest else CHUNKS_PER_BLOCK
            piece_end = min(end, (chunk + run) * CHUNK_SIZE)
            yield Zero(piece_end - start)
        start = piece_end


@functools.lru_cache(maxsize=256)
def _bitmap(mask: int, valid_sectors: int) -> bytes:
    """Sector bitmap (MSB first) with bits set for carried chunks' sectors inside the disk."""
    bitmap = bytearray(BITMAP_SIZE)
    bytes_per_chunk = SECTORS_PER_CHUNK // 8
    for chunk in range(CHUNKS_PER_BLOCK):
        if mask >> chunk & 1:
            first = chunk * SECTORS_PER_CHUNK
            last = min(first + SECTORS_PER_CHUNK, valid_sectors)
            if last <= first:
                break
            full_bytes, partial_bits = divmod(last - first, 8)
            byte = chunk * bytes_per_chunk
            bitmap[byte : byte + full_bytes] = b"\xff" * full_bytes
            if partial_bits:
                bitmap[byte + full_bytes] = (0xFF << (8 - partial_bits)) & 0xFF
    return bytes(bitmap)


def _footer(virtual_size: int, identity: ImageIdentity, differencing: bool) -> bytes:
    geometry = c_vhd.geometry_for(virtual_size)
    fields = (
        c_vhd.FOOTER_COOKIE,
        c_vhd.FEATURES_RESERVED,
        c_vhd.FILE_FORMAT_VERSION,
        HEADER_OFFSET,
        c_vhd.unix_to_vhd_time(identity.timestamp),
        c_vhd.CREATOR_APPLICATION,
        c_vhd.CREATOR_VERSION,
        c_vhd.CREATOR_HOST_OS_NONE,
        virtual_size,  # original size
        virtual_size,  # current size
        geometry.cylinders,
        geometry.heads,
        geometry.sectors_per_track,
        c_vhd.DISK_TYPE_DIFFERENCING if differencing else c_vhd.DISK_TYPE_DYNAMIC,
        0,  # checksum, filled below
        identity.uuid,
        0,  # saved state
        b"",
    )
    return _with_checksum(c_vhd.FOOTER.pack(*fields), c_vhd.FOOTER_CHECKSUM_OFFSET)


def _header(
    *,
    table_offset: int,
    table_entries: int,
    parent: ParentRef | None,
    locator_data_size: int,
) -> bytes:
    parent_uuid = b""
    parent_timestamp = 0
    parent_name = b""
    locators = b""
    if parent is not None:
        parent_uuid = parent.identity.uuid
        parent_timestamp = c_vhd.unix_to_vhd_time(parent.identity.timestamp)
        parent_name = _parent_unicode_name(parent.file_name)
        locators = c_vhd.PARENT_LOCATOR.pack(
            c_vhd.PLATFORM_MACX,
            locator_data_size // SECTOR_SIZE,  # data space, in sectors like vhd-format
            len(_macx_location(parent.file_name)),
            0,
            LOCATOR_DATA_OFFSET,
        )
    fields = (
        c_vhd.HEADER_COOKIE,
        c_vhd.HEADER_DATA_OFFSET,
        table_offset,
        c_vhd.HEADER_VERSION,
        table_entries,
        BLOCK_SIZE,
        0,  # checksum, filled below
        parent_uuid,
        parent_timestamp,
        0,
        parent_name,
        locators,
        b"",
    )
    return _with_checksum(c_vhd.HEADER.pack(*fields), c_vhd.HEADER_CHECKSUM_OFFSET)


def _with_checksum(structure: bytes, checksum_offset: int) -> bytes:
    out = bytearray(structure)
    c_vhd.CHECKSUM.pack_into(out, checksum_offset, c_vhd.checksum(out, checksum_offset))
    return bytes(out)


def _parent_unicode_name(file_name: str) -> bytes:
    """The header's parent name: the relative file name libvhdi and vhd-lib open."""
    if not file_name or "/" in file_name or "\0" in file_name:
        raise InvalidArgument(f"parent file name {file_name!r} is not a plain file name")
    encoded = file_name.encode(c_vhd.PARENT_NAME_ENCODING)
    if len(encoded) > c_vhd.PARENT_NAME_SIZE:
        raise InvalidArgument(f"parent file name {file_name!r} is too long for a VHD header")
    return encoded


def _macx_location(file_name: str) -> bytes:
    return (c_vhd.MACX_RELATIVE_PREFIX + file_name).encode(c_vhd.MACX_ENCODING)


def _macx_locator_data(file_name: str) -> bytes:
    """Sector-padded data of the one parent locator: a MacX ``file://./name`` URL.

    MacX is what vhd-format (XAPI) and blktap's libvhd resolve relative to the
    child's directory; libvhdi and vhd-lib use the unicode name instead.  Unlike
    vhd-tool, the URL is really written here, not a zero sector.
    """
    _parent_unicode_name(file_name)  # the same rules for both spellings
    location = _macx_location(file_name)
    return location + bytes(c_vhd.round_up_to_sector(len(location)) - len(location))


def _check_uuid(uuid: bytes, whose: str) -> None:
    if len(uuid) != UUID_SIZE:
        raise ValueError(f"{whose} uuid must be {UUID_SIZE} bytes, not {len(uuid)}")
