"""qcow2 (version 3) images computed lazily from an allocation.

The file is laid out in one forward order, all metadata before all data, like
XAPI's qcow2-to-stdout (xapi-project/xen-api ``python3/libexec/qcow2-to-stdout.py``), so XCP-ng's
qcow-stream-tool can read it as a stream::

    cluster 0              header, header extensions, backing file name
    refcount table         one entry per refcount block
    refcount blocks        refcount 1 for every cluster of the file
    L1 table               one entry per 512 MiB of virtual disk
    L2 tables              one per L1 entry whose range carries a chunk, in L1 order
    data clusters          one per carried chunk, in ascending virtual order
    EOF                    right after the last data cluster

A cluster is 64 KiB, one vdifs chunk.  Every offset is arithmetic on the
allocation: a prefix count of carried chunks per block says where a chunk's
data cluster lies, so a read of any range costs a bisect plus the pieces it
returns, and no table is ever built whole.  The only cached bytes are the
header's.

A delta names its parent as a relative backing file (qemu resolves it beside
the image) with an explicit "qcow2" backing format, and carries only its
chunks; a chunk that became zero is carried as a cluster of zeros, as
qcow2-to-stdout ``--diff`` does.  The vdifs identity extension carries the
image uuid and timestamp, and a delta's parent uuid, for the importer.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from functools import cached_property
from itertools import accumulate

from vdifs.errors import InvalidArgument, TooLarge
from vdifs.formats import c_qcow2
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
from vdifs.model import CHUNK_SIZE, CHUNKS_PER_BLOCK, FULL_MASK, Allocation, ceil_div

CLUSTER_SIZE = c_qcow2.CLUSTER_SIZE
ENTRY_SIZE = c_qcow2.TABLE_ENTRY.size
L2_ENTRIES = CLUSTER_SIZE // ENTRY_SIZE
"""Clusters one L2 table maps (8192, i.e. 512 MiB of virtual disk)."""
BLOCKS_PER_L2 = L2_ENTRIES // CHUNKS_PER_BLOCK
REFCOUNT_SIZE = c_qcow2.REFCOUNT_ENTRY.size
REFCOUNTS_PER_BLOCK = CLUSTER_SIZE // REFCOUNT_SIZE
"""Clusters one refcount block covers (32768 with 16-bit refcounts)."""
UUID_SIZE = 16

assert CLUSTER_SIZE == CHUNK_SIZE, "one carried chunk is one data cluster"
assert L2_ENTRIES % CHUNKS_PER_BLOCK == 0, "an L2 table maps whole blocks"


class Qcow2Layout:
    """A full qcow2 (``parent is None``) or a delta over ``parent``.

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
        virtual_clusters = ceil_div(virtual_size, CLUSTER_SIZE)
        l1_entries = ceil_div(virtual_clusters, L2_ENTRIES)
        if l1_entries > c_qcow2.MAX_L1_ENTRIES:
            raise TooLarge(
                f"virtual size {virtual_size} needs an L1 table of {l1_entries} entries, "
                f"beyond qemu's limit of {c_qcow2.MAX_L1_ENTRIES}"
            )
        _check_identity(identity, "image")
        _check_allocation(allocation, virtual_clusters)

        self._allocation = allocation
        self._virtual_size = virtual_size
        self._l1_entries = l1_entries
        self._carried_before = array(
            "Q", accumulate(map(int.bit_count, allocation.masks), initial=0)
        )
        """``_carried_before[i]``: carried chunks in blocks ``[0, i)``, so the
        data cluster ordinal of chunk ``c`` of block position ``i``."""
        self._l2_owners = array(
            "Q",
            dict.fromkeys(
                block // BLOCKS_PER_L2
                for block, mask in zip(allocation.blocks, allocation.masks, strict=True)
                if mask
            ),
        )
        """L1 indexes that get an L2 table, ascending: the t-th one owns L2 table t."""
        data_clusters = self._carried_before[-1]
        l1_clusters = ceil_div(l1_entries * ENTRY_SIZE, CLUSTER_SIZE)

        # Refcount blocks cover every cluster, themselves and the table included:
        # grow both until the count they cover stops moving.
        other_clusters = 1 + l1_clusters + len(self._l2_owners) + data_clusters
        table_clusters = refcount_blocks = 0
        while True:
            total = other_clusters + table_clusters + refcount_blocks
            needed_blocks = ceil_div(total, REFCOUNTS_PER_BLOCK)
            needed_table = ceil_div(needed_blocks * ENTRY_SIZE, CLUSTER_SIZE)
            if (needed_blocks, needed_table) == (refcount_blocks, table_clusters):
                break
            refcount_blocks, table_clusters = needed_blocks, needed_table
        self._total_clusters = total
        self._refcount_blocks = refcount_blocks

        # Start of each region, in bytes.
        self._refcount_table_offset = CLUSTER_SIZE
        self._refcount_blocks_offset = self._refcount_table_offset + table_clusters * CLUSTER_SIZE
        self._l1_offset = self._refcount_blocks_offset + refcount_blocks * CLUSTER_SIZE
        self._l2_offset = self._l1_offset + l1_clusters * CLUSTER_SIZE
        self._data_offset = self._l2_offset + len(self._l2_owners) * CLUSTER_SIZE
        self._size = total * CLUSTER_SIZE
        assert self._data_offset + data_clusters * CLUSTER_SIZE == self._size

        if parent is not None:  # refused now, not when the header is first read
            _check_identity(parent.identity, "parent")
            _backing_file_name(parent.file_name)
        self._identity = identity
        self._parent = parent
        self._table_clusters = table_clusters

    @property
    def size(self) -> int:
        return self._size

    @cached_property
    def _header(self) -> bytes:
        # Packed when first read, not when the layout is made: ls -l makes one
        # per image file for its size.
        return _header_bytes(
            virtual_size=self._virtual_size,
            identity=self._identity,
            parent=self._parent,
            l1_entries=self._l1_entries,
            # qemu writes offset 0 for an empty L1 (a 0-byte disk).
            l1_offset=self._l1_offset if self._l1_entries else 0,
            refcount_table_offset=self._refcount_table_offset,
            refcount_table_clusters=self._table_clusters,
        )

    @cached_property
    def allocated_bytes(self) -> int:
        """Whole metadata clusters plus the carried chunks' bytes inside the disk."""
        data_bytes = self._carried_before[-1] * CLUSTER_SIZE
        tail = self._virtual_size % CLUSTER_SIZE
        last_cluster = self._virtual_size // CLUSTER_SIZE
        if tail and self._is_carried(last_cluster):
            data_bytes -= CLUSTER_SIZE - tail
        return self._data_offset + data_bytes

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        return coalesce(self._pieces(offset, min(offset + length, self._size)))

    # --- regions ---

    def _pieces(self, start: int, end: int) -> Iterator[Segment]:
        """Segments of ``[start, end)``, region by region, not yet merged."""
        if start >= end:
            return
        regions: tuple[tuple[int, int, Callable[[int, int], Iterator[Segment]]], ...] = (
            (0, self._refcount_table_offset, self._header_pieces),
            (self._refcount_table_offset, self._refcount_blocks_offset, self._refcount_table),
            (self._refcount_blocks_offset, self._l1_offset, self._refcount_block_pieces),
            (self._l1_offset, self._l2_offset, self._l1_pieces),
            (self._l2_offset, self._data_offset, self._l2_pieces),
            (self._data_offset, self._size, self._data_pieces),
        )
        for region_start, region_end, pieces in regions:
            if start < region_end and end > region_start:
                yield from pieces(
                    max(start, region_start) - region_start, min(end, region_end) - region_start
                )

    def _header_pieces(self, start: int, end: int) -> Iterator[Segment]:
        def header_bytes(first: int, stop: int) -> bytes:
            return self._header[first:stop]

        yield from _used_then_zero(start, end, len(self._header), header_bytes)

    def _refcount_table(self, start: int, end: int) -> Iterator[Segment]:
        def entries(first: int, stop: int) -> bytes:
            return b"".join(
                c_qcow2.TABLE_ENTRY.pack(self._refcount_blocks_offset + block * CLUSTER_SIZE)
                for block in range(first, stop)
            )

        used = self._refcount_blocks * ENTRY_SIZE
        yield from _used_then_zero(start, end, used, _sliced(entries, ENTRY_SIZE))

    def _refcount_block_pieces(self, start: int, end: int) -> Iterator[Segment]:
        def entries(first: int, stop: int) -> bytes:
            return c_qcow2.REFCOUNT_ONE * (stop - first)

        used = self._total_clusters * REFCOUNT_SIZE
        yield from _used_then_zero(start, end, used, _sliced(entries, REFCOUNT_SIZE))

    def _l1_pieces(self, start: int, end: int) -> Iterator[Segment]:
        def entries(first: int, stop: int) -> bytes:
            table = bytearray((stop - first) * ENTRY_SIZE)
            owners = self._l2_owners
            for table_ordinal in range(bisect_left(owners, first), bisect_left(owners, stop)):
                l2_offset = self._l2_offset + table_ordinal * CLUSTER_SIZE
                c_qcow2.TABLE_ENTRY.pack_into(
                    table,
                    (owners[table_ordinal] - first) * ENTRY_SIZE,
                    l2_offset | c_qcow2.OFLAG_COPIED,
                )
            return bytes(table)

        used = self._l1_entries * ENTRY_SIZE
        yield from _used_then_zero(start, end, used, _sliced(entries, ENTRY_SIZE))

    def _l2_pieces(self, start: int, end: int) -> Iterator[Segment]:
        """The L2 tables touched: each maps the 8192 clusters of its L1 entry."""
        while start < end:
            table_ordinal, table_start = divmod(start, CLUSTER_SIZE)
            table_end = min(end - table_ordinal * CLUSTER_SIZE, CLUSTER_SIZE)
            first_cluster = self._l2_owners[table_ordinal] * L2_ENTRIES

            def entries(first: int, stop: int, base: int = first_cluster) -> bytes:
                return self._l2_entries(base + first, base + stop)

            yield Meta(_sliced(entries, ENTRY_SIZE)(table_start, table_end))
            start += table_end - table_start

    def _l2_entries(self, first_cluster: int, stop_cluster: int) -> bytes:
        """L2 entries for virtual clusters ``[first_cluster, stop_cluster)``."""
        table = bytearray((stop_cluster - first_cluster) * ENTRY_SIZE)
        blocks = self._allocation.blocks
        masks = self._allocation.masks
        first_position = bisect_left(blocks, first_cluster // CHUNKS_PER_BLOCK)
        stop_position = bisect_left(blocks, ceil_div(stop_cluster, CHUNKS_PER_BLOCK))
        for position in range(first_position, stop_position):
            block_cluster = blocks[position] * CHUNKS_PER_BLOCK
            mask = masks[position]
            ordinal = self._carried_before[position]
            while mask:
                cluster = block_cluster + trailing_zeros(mask)
                if first_cluster <= cluster < stop_cluster:
                    data_offset = self._data_offset + ordinal * CLUSTER_SIZE
                    c_qcow2.TABLE_ENTRY.pack_into(
                        table,
                        (cluster - first_cluster) * ENTRY_SIZE,
                        data_offset | c_qcow2.OFLAG_COPIED,
                    )
                ordinal += 1
                mask &= mask - 1
        return bytes(table)

    def _data_pieces(self, start: int, end: int) -> Iterator[Segment]:
        """Carried chunks in ascending virtual order, the disk's tail past its end as Zero.

        Neighbouring carried chunks are one Data: a megabyte read then walks
        a few runs, not sixteen clusters.
        """
        ordinal = start // CLUSTER_SIZE
        runs = self._carried_runs_from(ordinal)
        while start < end:
            virtual_cluster, count = next(runs)
            cluster_start = ordinal * CLUSTER_SIZE
            piece_end = min(end, cluster_start + count * CLUSTER_SIZE)
            virtual_start = virtual_cluster * CLUSTER_SIZE + (start - cluster_start)
            virtual_end = min(virtual_start + (piece_end - start), self._virtual_size)
            if virtual_end > virtual_start:
                yield Data(virtual_start, virtual_end - virtual_start)
            data_end = start + max(0, virtual_end - virtual_start)
            if piece_end > data_end:
                yield Zero(piece_end - data_end)
            start = piece_end
            ordinal += count

    def _carried_runs_from(self, ordinal: int) -> Iterator[tuple[int, int]]:
        """``(first virtual cluster, count)`` of each run of neighbouring carried
        chunks inside a block, from the ``ordinal``-th carried chunk on."""
        blocks = self._allocation.blocks
        masks = self._allocation.masks
        position = bisect_right(self._carried_before, ordinal) - 1
        mask = masks[position]
        for _ in range(ordinal - self._carried_before[position]):
            mask &= mask - 1  # drop the chunks before the ordinal-th
        while True:
            while mask:
                low = trailing_zeros(mask)
                count = trailing_ones(mask >> low)
                yield blocks[position] * CHUNKS_PER_BLOCK + low, count
                mask &= ~(((1 << count) - 1) << low)
            position += 1
            if position == len(blocks):
                return
            mask = masks[position]

    def _is_carried(self, cluster: int) -> bool:
        block, chunk = divmod(cluster, CHUNKS_PER_BLOCK)
        position = bisect_left(self._allocation.blocks, block)
        return (
            position < len(self._allocation.blocks)
            and self._allocation.blocks[position] == block
            and bool(self._allocation.masks[position] >> chunk & 1)
        )


def _sliced(entries: Callable[[int, int], bytes], entry_size: int) -> Callable[[int, int], bytes]:
    """Turn "entries [first, stop)" into "bytes [start, end)" of the same table."""

    def table_bytes(start: int, end: int) -> bytes:
        first = start // entry_size
        stop = ceil_div(end, entry_size)
        skip = first * entry_size
        return entries(first, stop)[start - skip : end - skip]

    return table_bytes


def _used_then_zero(
    start: int, end: int, used: int, used_bytes: Callable[[int, int], bytes]
) -> Iterator[Segment]:
    """A region whose first ``used`` bytes come from ``used_bytes`` and the rest are zero."""
    if start < used:
        yield Meta(used_bytes(start, min(end, used)))
    if end > used:
        yield Zero(end - max(start, used))


def _header_bytes(
    *,
    virtual_size: int,
    identity: ImageIdentity,
    parent: ParentRef | None,
    l1_entries: int,
    l1_offset: int,
    refcount_table_offset: int,
    refcount_table_clusters: int,
) -> bytes:
    """Header, extensions, end marker, then the backing file name: the used part of cluster 0."""
    extensions = b""
    backing_name = b""
    if parent is None:
        identity_data = c_qcow2.VDIFS_IDENTITY_FULL.pack(identity.uuid, identity.timestamp)
    else:  # the layout checked the parent when it was made
        backing_name = _backing_file_name(parent.file_name)
        extensions += _extension(c_qcow2.EXT_BACKING_FORMAT, c_qcow2.BACKING_FORMAT_QCOW2)
        identity_data = c_qcow2.VDIFS_IDENTITY_DELTA.pack(
            identity.uuid, identity.timestamp, parent.identity.uuid
        )
    extensions += _extension(c_qcow2.EXT_VDIFS_IDENTITY, identity_data)
    extensions += c_qcow2.EXTENSION_HEADER.pack(c_qcow2.EXT_END, 0)

    backing_offset = c_qcow2.HEADER_V3_LENGTH + len(extensions) if backing_name else 0
    header = c_qcow2.HEADER_V2.pack(
        c_qcow2.MAGIC,
        c_qcow2.VERSION_3,
        backing_offset,
        len(backing_name),
        c_qcow2.CLUSTER_BITS,
        virtual_size,
        c_qcow2.CRYPT_NONE,
        l1_entries,
        l1_offset,
        refcount_table_offset,
        refcount_table_clusters,
        0,  # nb_snapshots
        0,  # snapshots_offset
    ) + c_qcow2.HEADER_V3_TAIL.pack(
        0,  # incompatible features
        0,  # compatible features
        0,  # autoclear features
        c_qcow2.REFCOUNT_ORDER,
        c_qcow2.HEADER_V3_LENGTH,
    )
    header += c_qcow2.COMPRESSION_TYPE.pack(c_qcow2.COMPRESSION_ZLIB)
    header += bytes(c_qcow2.HEADER_V3_LENGTH - len(header))
    cluster0 = header + extensions + backing_name
    assert len(cluster0) <= CLUSTER_SIZE
    return cluster0


def _extension(magic: int, data: bytes) -> bytes:
    return (
        c_qcow2.EXTENSION_HEADER.pack(magic, len(data))
        + data
        + bytes(c_qcow2.extension_padding(len(data)))
    )


def _backing_file_name(file_name: str) -> bytes:
    """The backing file name: relative, so qemu opens it beside the image."""
    if not file_name or "/" in file_name or "\0" in file_name:
        raise InvalidArgument(f"parent file name {file_name!r} is not a plain file name")
    encoded = file_name.encode("utf-8")
    if len(encoded) > c_qcow2.BACKING_FILE_NAME_MAX:
        raise InvalidArgument(f"parent file name {file_name!r} is too long for a qcow2 header")
    return encoded


def _check_allocation(allocation: Allocation, virtual_clusters: int) -> None:
    blocks = allocation.blocks
    masks = allocation.masks
    if any(map(int.__ge__, blocks, blocks[1:])):
        raise ValueError("allocation blocks are not strictly ascending")
    if any(mask & ~FULL_MASK for mask in masks):
        raise ValueError(f"an allocation mask has bits past chunk {CHUNKS_PER_BLOCK - 1}")
    if blocks:
        last_cluster = blocks[-1] * CHUNKS_PER_BLOCK + max(masks[-1].bit_length() - 1, 0)
        if last_cluster >= virtual_clusters:
            raise ValueError(
                f"block {blocks[-1]} carries chunks past the virtual size {allocation.virtual_size}"
            )


def _check_identity(identity: ImageIdentity, whose: str) -> None:
    if len(identity.uuid) != UUID_SIZE:
        raise ValueError(f"{whose} uuid must be {UUID_SIZE} bytes, not {len(identity.uuid)}")
    if not 0 <= identity.timestamp < 1 << 64:
        raise ValueError(f"{whose} timestamp {identity.timestamp} does not fit in 64 bits")
