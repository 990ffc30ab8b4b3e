"""A VDI's block map at one point in time: which chunk object holds each 64 KiB.

Rows are kept as three flat, sorted arrays rather than a dict, because the map
is the only per-disk memory cost vdifs is allowed (a full 2 TiB disk has a
million rows): ``indexes`` (block numbers, ascending), ``masks`` (bit c set
when chunk c of that block is not zero) and ``ids`` (32 little-endian u64
chunk ids per row, 0 meaning an all-zero chunk).  A map never changes once
built; a newer state of the disk is a new map.
"""

from __future__ import annotations

import functools
import struct
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass

from vdifs.model import BLOCK_SIZE, CHUNK_SIZE, CHUNKS_PER_BLOCK, Allocation, ceil_div
from vdifs.storage.local.layout import pack_of

ROW_BYTES = CHUNKS_PER_BLOCK * 8
ZERO_ROW = bytes(ROW_BYTES)
_CHUNK_ID = struct.Struct("<Q")


def row_mask(row: bytes) -> int:
    """Bit c set when chunk c of the row is not the zero chunk."""
    mask = 0
    for c in range(CHUNKS_PER_BLOCK):
        if row[c * 8 : c * 8 + 8] != b"\0\0\0\0\0\0\0\0":
            mask |= 1 << c
    return mask


@dataclass(frozen=True, eq=False)
class BlockMap:
    virtual_size: int
    indexes: array[int]
    masks: array[int]
    ids: bytes

    @classmethod
    def empty(cls, virtual_size: int) -> BlockMap:
        return cls(virtual_size, array("Q"), array("L"), b"")

    @classmethod
    def from_rows(cls, virtual_size: int, rows: Iterator[tuple[int, int, bytes]]) -> BlockMap:
        """Build from ``(index, mask, row)`` in ascending index order."""
        indexes: array[int] = array("Q")
        masks: array[int] = array("L")
        parts: list[bytes] = []
        for index, mask, row in rows:
            indexes.append(index)
            masks.append(mask)
            parts.append(row)
        return cls(virtual_size, indexes, masks, b"".join(parts))

    @functools.cached_property
    def packs(self) -> frozenset[int]:
        """The packs holding this map's chunks (what an open view pins against gc)."""
        ids = array("Q")
        ids.frombytes(self.ids)
        return frozenset(pack_of(i) for i in ids if i)

    @property
    def footprint(self) -> int:
        return len(self.ids) + 12 * len(self.indexes)

    @property
    def chunk_count(self) -> int:
        return sum(m.bit_count() for m in self.masks)

    def _position(self, block: int) -> int:
        pos = bisect_left(self.indexes, block)
        if pos < len(self.indexes) and self.indexes[pos] == block:
            return pos
        return -1

    def row(self, block: int) -> bytes:
        pos = self._position(block)
        return ZERO_ROW if pos < 0 else self.ids[pos * ROW_BYTES : (pos + 1) * ROW_BYTES]

    def chunk_id(self, chunk: int) -> int:
        pos = self._position(chunk // CHUNKS_PER_BLOCK)
        if pos < 0:
            return 0
        return _CHUNK_ID.unpack_from(self.ids, pos * ROW_BYTES + (chunk % CHUNKS_PER_BLOCK) * 8)[0]

    def chunk_ids(self, first_chunk: int, count: int) -> list[int]:
        """Ids of ``count`` consecutive chunks, one bisect per block touched."""
        out: list[int] = []
        chunk = first_chunk
        end = first_chunk + count
        while chunk < end:
            block, c = divmod(chunk, CHUNKS_PER_BLOCK)
            n = min(CHUNKS_PER_BLOCK - c, end - chunk)
            pos = self._position(block)
            if pos < 0:
                out.extend([0] * n)
            else:
                base = pos * ROW_BYTES + c * 8
                out.extend(struct.unpack_from(f"<{n}Q", self.ids, base))
            chunk += n
        return out

    def holds_data(self, offset: int, length: int) -> bool:
        first = offset // CHUNK_SIZE
        return any(self.chunk_ids(first, (offset + length - 1) // CHUNK_SIZE - first + 1))

    def allocation(self) -> Allocation:
        """Every non-zero chunk: what a full image carries."""
        return Allocation(self.virtual_size, self.indexes, self.masks)

    def diff(self, base: BlockMap) -> Allocation:
        """Chunks whose identity differs from ``base``: what a delta carries.

        A chunk that became zero differs too, so applying the delta onto the
        base reproduces it.  Chunks past the smaller disk's end compare against
        zero.
        """
        blocks: array[int] = array("Q")
        masks: array[int] = array("L")
        i = j = 0
        mine, theirs = self.indexes, base.indexes
        limit_chunks = ceil_div(self.virtual_size, CHUNK_SIZE)
        while i < len(mine) or j < len(theirs):
            a = mine[i] if i < len(mine) else None
            b = theirs[j] if j < len(theirs) else None
            if b is None or (a is not None and a < b):
                assert a is not None
                blocks.append(a)
                masks.append(self.masks[i])
                i += 1
                continue
            if a is None or b < a:
                # A block only the base has: it became zero here.
                mask = base.masks[j] & _mask_below(b, limit_chunks)
                if mask:
                    blocks.append(b)
                    masks.append(mask)
                j += 1
                continue
            row_a = self.ids[i * ROW_BYTES : (i + 1) * ROW_BYTES]
            row_b = base.ids[j * ROW_BYTES : (j + 1) * ROW_BYTES]
            if row_a != row_b:
                mask = 0
                for c in range(CHUNKS_PER_BLOCK):
                    if row_a[c * 8 : c * 8 + 8] != row_b[c * 8 : c * 8 + 8]:
                        mask |= 1 << c
                mask &= _mask_below(a, limit_chunks)
                if mask:
                    blocks.append(a)
                    masks.append(mask)
            i += 1
            j += 1
        return Allocation(self.virtual_size, blocks, masks)


def _mask_below(block: int, limit_chunks: int) -> int:
    """Mask of the chunks of ``block`` that lie below ``limit_chunks``."""
    first = block * CHUNKS_PER_BLOCK
    n = max(0, min(CHUNKS_PER_BLOCK, limit_chunks - first))
    return (1 << n) - 1


def blocks_in(virtual_size: int) -> int:
    return ceil_div(virtual_size, BLOCK_SIZE)
