"""Parse an uploaded qcow2 image into writes onto a virtual disk.

Pure: the file is reached only through an injected ``read_at(offset,
length)``, and nothing is written.  The parser accepts what qemu-img writes:
versions 2 and 3, metadata before, after or between the data,
zlib-compressed clusters, zero clusters, and a backing file (a delta; the
backing file is never opened).  Internal snapshots are ignored: only the
active L1 table is read.  Refcounts are never read, so lazy refcounts (the
dirty bit) are fine.

Everything is checked before it is used.  An upload is hostile until proven
otherwise, so every header field, table offset and cluster offset is checked
against the file size and against the metadata.  Memory and work are bounded
by the file size, never by what the header claims.  The result reports
:class:`~vdifs.errors.MalformedImage` (not qcow2, truncated, inconsistent),
:class:`~vdifs.errors.TooLarge` (beyond the limits below) or
:class:`~vdifs.errors.Unsupported` (valid, but a feature vdifs cannot apply
safely), and never any other exception.

:func:`parse_qcow2` walks every L2 table once to validate the image, so a bad
upload is refused before anything is applied.  :meth:`ParsedQcow2.writes`
walks the tables again and yields the writes in ascending file offset order,
so the data is read front to back.
"""

from __future__ import annotations

import sys
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from vdifs.errors import MalformedImage, TooLarge, Unsupported, VdifsError
from vdifs.formats import c_qcow2
from vdifs.formats.base import NotStreamable
from vdifs.model import SECTOR_SIZE, ceil_div

ReadAt = Callable[[int, int], bytes]

MAX_IMPORT_VIRTUAL_SIZE = 64 * 1024**4
"""64 TiB.  This bounds what one upload can make vdifs allocate and walk: the
block map of the target disk (32 Mi rows of 2 MiB) and the active L1 table
(1 MiB at 64 KiB clusters).  It is well past the 2 TiB of VHD and the 16 TiB
disks the encoder is tested with."""
SCAN_WINDOW_CLUSTERS = 1 << 22
"""Host clusters sorted per pass of :meth:`ParsedQcow2.writes` (a 32 MiB slot
array).  Files larger than this (256 GiB at 64 KiB clusters) take more passes
over the L2 tables instead of more memory."""

MAX_STREAM_HEAD = 1 << 30
"""Metadata a streaming importer stages before it applies data (on disk, not
in memory): the L2 tables of a 4 TiB disk fully allocated at 64 KiB clusters."""

_NATIVE_IS_BIG_ENDIAN = sys.byteorder == "big"


class Write(NamedTuple):
    """Bytes to put at ``virtual_offset`` of the target disk.

    ``file_offset`` None: the ``length`` bytes are zeros (a qcow2 zero
    cluster).  ``compressed_length`` > 0: ``file_offset`` starts raw deflate
    data of at most that many bytes (the spec's upper bound, clipped at EOF),
    whose first ``length`` bytes :func:`inflate_cluster` returns.  Otherwise
    ``length`` bytes are copied from ``file_offset``.
    """

    virtual_offset: int
    length: int
    file_offset: int | None
    compressed_length: int = 0


@dataclass(frozen=True)
class ParsedQcow2:
    """A validated qcow2 image.

    A full image is applied onto zeros and a delta onto its base.  Clusters the
    image does not allocate produce no write: they read as zeros (full) or as
    the base (delta).  Zero clusters produce zero writes in a delta only,
    because a full image reads as zeros there anyway.
    """

    virtual_size: int
    is_delta: bool
    """The image has a backing file: apply it onto its base."""
    identity: bytes | None
    """The image uuid from the vdifs identity extension, if present."""
    parent_identity: bytes | None
    """The base's uuid from the vdifs identity extension of a delta, if present."""
    parent_name: str | None
    """The backing file name, for messages only: nobody opens it."""
    compressed: bool
    """Some clusters are compressed (their length is only bounded by the file's end)."""
    _clusters: _ClusterMap = field(repr=False, compare=False)
    geometry_slack: int = 0  # qcow2 sizes are exact (see vhd_parse.ParsedImage)

    def writes(self) -> Iterator[Write]:
        """Writes in ascending ``file_offset``, merged into runs (zero writes come first)."""
        return self._clusters.scan()


def parse_qcow2(read_at: ReadAt, file_size: int) -> ParsedQcow2:
    """Validate a qcow2 image and describe how to apply it."""
    header = _Header.read(read_at, file_size)
    extensions = _Extensions.read(read_at, file_size, header)
    header.check_features(extensions.feature_names)
    parent_name = header.backing_file_name(read_at, file_size)
    clusters = _ClusterMap.build(read_at, file_size, header)
    compressed = False
    for write in clusters.scan():  # every L2 entry is checked before anything is applied
        compressed = compressed or write.compressed_length > 0
    is_delta = parent_name is not None
    return ParsedQcow2(
        virtual_size=header.virtual_size,
        is_delta=is_delta,
        identity=extensions.identity,
        parent_identity=extensions.parent_identity if is_delta else None,
        parent_name=parent_name,
        compressed=compressed,
        _clusters=clusters,
    )


def metadata_length(read_at: ReadAt, available: int) -> int:
    """Bytes from offset 0 that hold the header, the L1 and every L2 table.

    A streaming importer calls this as the file's first ``available`` bytes
    arrive; while the answer exceeds ``available`` it needs more.  Raises
    :class:`NotStreamable` for a damaged head (the whole-file parse gives the
    precise verdict) or tables beyond :data:`MAX_STREAM_HEAD` (metadata at the
    end of the file).
    """
    if available < c_qcow2.HEADER_V3_MIN_LENGTH:
        return c_qcow2.HEADER_V3_MIN_LENGTH
    try:
        cluster_bits = c_qcow2.HEADER_V2.unpack(read_at(0, c_qcow2.HEADER_V2.size))[4]
        if not c_qcow2.MIN_CLUSTER_BITS <= cluster_bits <= c_qcow2.MAX_CLUSTER_BITS:
            raise MalformedImage(f"cluster_bits {cluster_bits} is out of range")
        if available < 1 << cluster_bits:
            return 1 << cluster_bits
        header = _Header.read(read_at, available)
        l2_entries = header.cluster_size // c_qcow2.TABLE_ENTRY.size
        virtual_clusters = ceil_div(header.virtual_size, header.cluster_size)
        l1_entries = min(ceil_div(virtual_clusters, l2_entries), header.l1_size)
        need = header.l1_table_offset + l1_entries * c_qcow2.TABLE_ENTRY.size
        if need > MAX_STREAM_HEAD:
            raise NotStreamable("the L1 table is not near the start")
        if available < need:
            return need
        l1 = _entries(read_at(header.l1_table_offset, l1_entries * c_qcow2.TABLE_ENTRY.size))
    except VdifsError as exc:
        raise NotStreamable(str(exc)) from None
    l2_end = max((entry & c_qcow2.L1_OFFSET_MASK for entry in l1), default=0)
    need = max(need, l2_end + header.cluster_size if l2_end else 0)
    if need > MAX_STREAM_HEAD:
        raise NotStreamable("the L2 tables are not near the start")
    return need


def streamed_size(read_at: ReadAt, head_length: int) -> int:
    """A file size no valid image with this metadata head exceeds.

    The head is parsed with it before the end has arrived: every data cluster
    lies within it, and the importer checks at the end that each one arrived.
    """
    header = _Header.read(read_at, head_length)
    clusters = ceil_div(header.virtual_size, header.cluster_size)
    return (ceil_div(head_length, header.cluster_size) + clusters) * header.cluster_size


def inflate_cluster(data: bytes, length: int) -> bytes:
    """The first ``length`` bytes of a compressed cluster (raw deflate, as qemu writes it).

    The output is bounded by ``length``, whatever the data claims.  qemu
    accepts a stream as soon as it fills the cluster, so a stream without
    its end marker is fine here too.
    """
    if not 0 <= length <= 1 << c_qcow2.MAX_CLUSTER_BITS:
        raise MalformedImage(f"compressed cluster length {length} is not a cluster size")
    if length == 0:
        return b""  # zlib reads a max_length of 0 as "no limit"
    inflater = zlib.decompressobj(c_qcow2.ZLIB_WINDOW_BITS)
    try:
        out = inflater.decompress(data, length)
    except zlib.error as exc:
        raise MalformedImage(f"compressed cluster does not inflate: {exc}") from None
    if len(out) < length:
        raise MalformedImage(f"compressed cluster inflates to {len(out)} bytes, not {length}")
    return out


# --- the header ---


@dataclass(frozen=True)
class _Header:
    version: int
    cluster_bits: int
    virtual_size: int
    header_length: int
    backing_file_offset: int
    backing_file_size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    incompatible_features: int
    refcount_order: int
    compression_type: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @classmethod
    def read(cls, read_at: ReadAt, file_size: int) -> _Header:
        if file_size < c_qcow2.HEADER_V2.size:
            raise MalformedImage(f"a {file_size}-byte file is too short for a qcow2 header")
        fixed = _read(read_at, file_size, 0, min(file_size, c_qcow2.HEADER_V3_MIN_LENGTH))
        (
            magic,
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            virtual_size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            _nb_snapshots,
            _snapshots_offset,
        ) = c_qcow2.HEADER_V2.unpack_from(fixed)
        if magic != c_qcow2.MAGIC:
            raise MalformedImage("not a qcow2 image (bad magic)")
        if version not in (c_qcow2.VERSION_2, c_qcow2.VERSION_3):
            raise Unsupported(f"qcow2 version {version} is not supported (only 2 and 3)")
        if not c_qcow2.MIN_CLUSTER_BITS <= cluster_bits <= c_qcow2.MAX_CLUSTER_BITS:
            raise MalformedImage(
                f"cluster_bits {cluster_bits} is outside "
                f"[{c_qcow2.MIN_CLUSTER_BITS}, {c_qcow2.MAX_CLUSTER_BITS}]"
            )
        cluster_size = 1 << cluster_bits

        incompatible = 0
        refcount_order = c_qcow2.REFCOUNT_ORDER
        header_length = c_qcow2.HEADER_V2_LENGTH
        compression_type = c_qcow2.COMPRESSION_ZLIB
        if version == c_qcow2.VERSION_3:
            if len(fixed) < c_qcow2.HEADER_V3_MIN_LENGTH:
                raise MalformedImage("file too short for a version 3 qcow2 header")
            incompatible, _compatible, _autoclear, refcount_order, header_length = (
                c_qcow2.HEADER_V3_TAIL.unpack_from(fixed, c_qcow2.HEADER_V2.size)
            )
            if (
                header_length < c_qcow2.HEADER_V3_MIN_LENGTH
                or header_length % c_qcow2.HEADER_LENGTH_ALIGNMENT
                or header_length > min(cluster_size, file_size)
            ):
                raise MalformedImage(f"bad qcow2 header_length {header_length}")
            if header_length > c_qcow2.COMPRESSION_TYPE_OFFSET:
                (compression_type,) = c_qcow2.COMPRESSION_TYPE.unpack(
                    _read(read_at, file_size, c_qcow2.COMPRESSION_TYPE_OFFSET, 1)
                )
        if refcount_order > c_qcow2.MAX_REFCOUNT_ORDER:
            raise MalformedImage(f"refcount_order {refcount_order} is beyond 64-bit refcounts")
        if crypt_method != c_qcow2.CRYPT_NONE:
            raise Unsupported(
                f"encrypted qcow2 images (crypt_method {crypt_method}) are not supported"
            )
        return cls(
            version=version,
            cluster_bits=cluster_bits,
            virtual_size=virtual_size,
            header_length=header_length,
            backing_file_offset=backing_file_offset,
            backing_file_size=backing_file_size,
            crypt_method=crypt_method,
            l1_size=l1_size,
            l1_table_offset=l1_table_offset,
            refcount_table_offset=refcount_table_offset,
            refcount_table_clusters=refcount_table_clusters,
            incompatible_features=incompatible,
            refcount_order=refcount_order,
            compression_type=compression_type,
        )

    def check_features(self, feature_names: dict[int, str]) -> None:
        """Refuse what vdifs cannot apply; the dirty bit only means stale refcounts."""
        features = self.incompatible_features
        unknown = features & ~c_qcow2.INCOMPAT_KNOWN
        if unknown:
            bits = [bit for bit in range(64) if unknown >> bit & 1]
            names = ", ".join(
                f"bit {bit}" + (f" ({feature_names[bit]!r})" if bit in feature_names else "")
                for bit in bits
            )
            raise Unsupported(f"qcow2 image needs unknown incompatible features: {names}")
        if features & c_qcow2.INCOMPAT_CORRUPT:
            raise MalformedImage("qemu marked this qcow2 image corrupt: its metadata is unsafe")
        if features & c_qcow2.INCOMPAT_EXTERNAL_DATA_FILE:
            raise Unsupported("qcow2 images with an external data file are not supported")
        if features & c_qcow2.INCOMPAT_EXTENDED_L2:
            raise Unsupported(
                "qcow2 images with extended L2 entries (subclusters) are not supported"
            )
        has_type_bit = bool(features & c_qcow2.INCOMPAT_COMPRESSION_TYPE)
        if self.compression_type == c_qcow2.COMPRESSION_ZLIB:
            if has_type_bit:
                raise MalformedImage("compression type bit set for zlib compression")
        elif not has_type_bit:
            raise MalformedImage("non-zlib compression type without its incompatible bit")
        elif self.compression_type == c_qcow2.COMPRESSION_ZSTD:
            raise Unsupported("zstd-compressed qcow2 images are not supported (only zlib)")
        else:
            raise Unsupported(f"unknown qcow2 compression type {self.compression_type}")

    def backing_file_name(self, read_at: ReadAt, file_size: int) -> str | None:
        if self.backing_file_offset == 0:
            return None
        length = self.backing_file_size
        if not 0 < length <= c_qcow2.BACKING_FILE_NAME_MAX:
            raise MalformedImage(f"bad backing file name length {length}")
        if self.backing_file_offset + length > min(self.cluster_size, file_size):
            raise MalformedImage("backing file name lies outside the first cluster")
        raw = _read(read_at, file_size, self.backing_file_offset, length)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedImage("backing file name is not UTF-8") from None
        if "\0" in name:
            raise MalformedImage("backing file name contains a NUL byte")
        return name


@dataclass(frozen=True)
class _Extensions:
    identity: bytes | None
    parent_identity: bytes | None
    feature_names: dict[int, str]
    """Names of incompatible feature bits, from the feature name table."""

    @classmethod
    def read(cls, read_at: ReadAt, file_size: int, header: _Header) -> _Extensions:
        """Walk the extensions between the header and the backing file name (or cluster end)."""
        end = header.backing_file_offset or header.cluster_size
        if end < header.header_length:
            raise MalformedImage("backing file name overlaps the qcow2 header")
        end = min(end, header.cluster_size, file_size)
        area = _read(read_at, file_size, 0, end)
        identity = parent_identity = None
        feature_names: dict[int, str] = {}
        seen_identity = False
        offset = header.header_length
        while offset < end:
            if end - offset < c_qcow2.EXTENSION_HEADER.size:
                raise MalformedImage("qcow2 header extension runs past its area")
            magic, length = c_qcow2.EXTENSION_HEADER.unpack_from(area, offset)
            if magic == c_qcow2.EXT_END:
                break
            offset += c_qcow2.EXTENSION_HEADER.size
            if length > end - offset:
                raise MalformedImage(f"qcow2 header extension {magic:#x} is too large")
            data = area[offset : offset + length]
            if magic == c_qcow2.EXT_VDIFS_IDENTITY:
                if seen_identity:
                    raise MalformedImage("two vdifs identity extensions")
                seen_identity = True
                identity, parent_identity = _identity(data)
            elif magic == c_qcow2.EXT_FEATURE_NAME_TABLE:
                feature_names = _incompatible_feature_names(data)
            offset += length + c_qcow2.extension_padding(length)
        return cls(identity, parent_identity, feature_names)


def _identity(data: bytes) -> tuple[bytes, bytes | None]:
    if len(data) >= c_qcow2.VDIFS_IDENTITY_DELTA.size:
        uuid, _timestamp, parent_uuid = c_qcow2.VDIFS_IDENTITY_DELTA.unpack_from(data)
        return uuid, parent_uuid
    if len(data) >= c_qcow2.VDIFS_IDENTITY_FULL.size:
        uuid, _timestamp = c_qcow2.VDIFS_IDENTITY_FULL.unpack_from(data)
        return uuid, None
    raise MalformedImage(f"vdifs identity extension of {len(data)} bytes is too short")


def _incompatible_feature_names(data: bytes) -> dict[int, str]:
    names = {}
    entry = c_qcow2.FEATURE_NAME_ENTRY
    for offset in range(0, len(data) - entry.size + 1, entry.size):
        kind, bit, raw_name = entry.unpack_from(data, offset)
        if kind == c_qcow2.FEATURE_TYPE_INCOMPATIBLE and bit < 64:
            names[bit] = raw_name.rstrip(b"\0").decode("ascii", "replace")
    return names


# --- the cluster map ---


@dataclass(frozen=True)
class _ClusterMap:
    """The active L1 table, checked, and what is needed to walk its L2 tables."""

    read_at: ReadAt
    file_size: int
    version: int
    cluster_bits: int
    virtual_size: int
    is_delta: bool
    l1_indexes: array[int]
    """L1 indexes with an L2 table, ascending."""
    l2_clusters: array[int]
    """Host cluster of the L2 table of ``l1_indexes[i]``."""
    metadata_starts: array[int]
    metadata_stops: array[int]
    """Host cluster ranges ``[start, stop)`` of the header, the refcount, L1 and
    L2 tables: disjoint and ascending, so one bisect finds an overlap."""

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @classmethod
    def build(cls, read_at: ReadAt, file_size: int, header: _Header) -> _ClusterMap:
        cluster_size = header.cluster_size
        virtual_size = header.virtual_size
        if virtual_size % SECTOR_SIZE:
            raise MalformedImage(f"virtual size {virtual_size} is not a multiple of 512")
        if virtual_size > MAX_IMPORT_VIRTUAL_SIZE:
            raise TooLarge(
                f"virtual size {virtual_size} is beyond the import limit of "
                f"{MAX_IMPORT_VIRTUAL_SIZE} bytes (64 TiB)"
            )
        l2_entries = cluster_size // c_qcow2.TABLE_ENTRY.size
        virtual_clusters = ceil_div(virtual_size, cluster_size)
        l1_needed = ceil_div(virtual_clusters, l2_entries)
        if l1_needed > c_qcow2.MAX_L1_ENTRIES:
            raise TooLarge(
                f"virtual size {virtual_size} needs {l1_needed} L1 entries at "
                f"{cluster_size}-byte clusters, beyond qemu's {c_qcow2.MAX_L1_ENTRIES}"
            )
        if header.l1_size < l1_needed:
            raise MalformedImage(f"L1 table of {header.l1_size} entries is too small")
        if header.l1_size > c_qcow2.MAX_L1_ENTRIES:
            raise MalformedImage(f"L1 table of {header.l1_size} entries is beyond qemu's limit")

        if header.refcount_table_clusters == 0:
            raise MalformedImage("qcow2 image has no refcount table")
        refcount_clusters = _table_clusters(
            "refcount table",
            header.refcount_table_offset,
            header.refcount_table_clusters * cluster_size,
            cluster_size,
            file_size,
        )
        fixed: list[tuple[int, int]] = [(0, 1), refcount_clusters]  # the header, then refcounts
        l1_indexes = array("Q")
        l2_clusters = array("Q")
        if l1_needed:
            l1_bytes = l1_needed * c_qcow2.TABLE_ENTRY.size
            l1_clusters = _table_clusters(
                "L1 table", header.l1_table_offset, l1_bytes, cluster_size, file_size
            )
            _refuse_overlap("L1 table", l1_clusters, fixed)
            fixed.append(l1_clusters)
            l1 = _entries(_read(read_at, file_size, header.l1_table_offset, l1_bytes))
            for index, entry in enumerate(l1):
                if entry & c_qcow2.L1_RESERVED_MASK:
                    raise MalformedImage(f"L1 entry {index} has reserved bits set")
                l2_offset = entry & c_qcow2.L1_OFFSET_MASK
                if l2_offset == 0:
                    continue  # no L2 table: the whole range is unallocated
                if l2_offset % cluster_size or l2_offset + cluster_size > file_size:
                    raise MalformedImage(f"L1 entry {index}: bad L2 table offset {l2_offset:#x}")
                cluster = l2_offset >> header.cluster_bits
                if any(first <= cluster < stop for first, stop in fixed):
                    raise MalformedImage(f"L2 table at {l2_offset:#x} overlaps the metadata")
                l1_indexes.append(index)
                l2_clusters.append(cluster)
        l2_sorted = sorted(l2_clusters)
        if any(map(int.__eq__, l2_sorted, l2_sorted[1:])):
            raise MalformedImage("two L1 entries share one L2 table")
        metadata = sorted([*fixed, *((cluster, cluster + 1) for cluster in l2_sorted)])
        return cls(
            read_at=read_at,
            file_size=file_size,
            version=header.version,
            cluster_bits=header.cluster_bits,
            virtual_size=virtual_size,
            is_delta=header.backing_file_offset != 0,
            l1_indexes=l1_indexes,
            l2_clusters=l2_clusters,
            metadata_starts=array("Q", (start for start, _stop in metadata)),
            metadata_stops=array("Q", (stop for _start, stop in metadata)),
        )

    def scan(self) -> Iterator[Write]:
        """All writes: zero runs while the first pass walks the tables, then data by file offset.

        Each pass sorts the data clusters of one window of host clusters with
        a slot array indexed by host cluster, so memory stays bounded however
        large the file is.  A slot taken twice is a cluster mapped twice, a
        slot on a metadata cluster is data aliasing metadata.  The first pass
        also checks every entry and notes which host clusters each table
        uses, so later passes skip the tables outside their window.
        """
        host_clusters = ceil_div(self.file_size, self.cluster_size)
        table_spans: list[tuple[int, int]] = []
        for window_start in range(0, host_clusters, SCAN_WINDOW_CLUSTERS):
            window_stop = min(window_start + SCAN_WINDOW_CLUSTERS, host_clusters)
            window = _Window(window_start, window_stop)
            for table in range(len(self.l1_indexes)):
                if window_start == 0:
                    zero_clusters: list[int] = []
                    table_spans.append(self._walk(table, window, zero_clusters))
                    if self.is_delta:  # a full image reads as zeros there anyway
                        yield from self._zero_writes(zero_clusters)
                else:
                    lowest, highest = table_spans[table]
                    if lowest < window_stop and highest >= window_start:
                        self._walk(table, window, None)
            self._refuse_data_on_metadata(window)
            window.compressed.sort()
            yield from self._data_writes(window)

    def _walk(
        self, table: int, window: _Window, zero_clusters: list[int] | None
    ) -> tuple[int, int]:
        """Place one L2 table's data in ``window``; return its lowest and highest host cluster.

        With ``zero_clusters`` (the first pass), every entry is checked and the
        zero clusters are collected.  Unallocated entries and entries past the
        virtual size say nothing.
        """
        cluster_bits = self.cluster_bits
        cluster_size = 1 << cluster_bits
        file_size = self.file_size
        l2_entries = cluster_size // c_qcow2.TABLE_ENTRY.size
        first_cluster = self.l1_indexes[table] * l2_entries
        virtual_clusters = ceil_div(self.virtual_size, cluster_size)
        used = min(l2_entries, virtual_clusters - first_cluster)
        l2_offset = self.l2_clusters[table] << cluster_bits
        entries = _entries(_read(self.read_at, file_size, l2_offset, used * 8))
        slots = window.slots
        window_start = window.start
        window_size = len(slots)
        lowest, highest = 1 << 64, -1
        for index, entry in enumerate(entries):
            if not entry:
                continue
            virtual_cluster = first_cluster + index
            if entry & _SPECIAL_L2_BITS:
                host_offset, compressed_length = self._special_entry(entry, virtual_cluster)
                if host_offset is None:
                    if zero_clusters is not None:
                        zero_clusters.append(virtual_cluster)
                    continue
                host_cluster = host_offset >> cluster_bits
                if zero_clusters is not None:
                    self._refuse_compressed_on_metadata(host_offset, compressed_length)
                if 0 <= host_cluster - window_start < window_size:
                    window.compressed.append((host_offset, virtual_cluster, compressed_length))
            else:
                host_offset = entry & c_qcow2.L2_OFFSET_MASK
                if not host_offset:
                    continue  # unallocated (a stray COPIED flag means nothing)
                if host_offset & (cluster_size - 1) or (
                    host_offset + cluster_size > file_size
                    and host_offset + self._bytes_inside(virtual_cluster) > file_size
                ):
                    raise _bad_entry(virtual_cluster, f"bad data cluster offset {host_offset:#x}")
                host_cluster = host_offset >> cluster_bits
                slot = host_cluster - window_start
                if 0 <= slot < window_size:
                    if slots[slot]:
                        raise MalformedImage(f"host cluster {host_offset:#x} is mapped twice")
                    slots[slot] = virtual_cluster + 1
            if host_cluster < lowest:
                lowest = host_cluster
            if host_cluster > highest:
                highest = host_cluster
        return lowest, highest

    def _special_entry(self, entry: int, virtual_cluster: int) -> tuple[int | None, int]:
        """(host offset, compressed length) of a compressed entry, (None, 0) for a zero one."""
        if entry & c_qcow2.OFLAG_COMPRESSED:
            offset_bits = c_qcow2.compressed_offset_bits(self.cluster_bits)
            host_offset = entry & ((1 << offset_bits) - 1)
            sectors = (entry >> offset_bits & ((1 << (62 - offset_bits)) - 1)) + 1
            length = sectors * c_qcow2.COMPRESSED_SECTOR_SIZE - host_offset % SECTOR_SIZE
            if host_offset >= self.file_size:
                raise _bad_entry(virtual_cluster, "compressed data outside the file")
            return host_offset, min(length, self.file_size - host_offset)
        if entry & c_qcow2.L2_STANDARD_RESERVED_MASK:
            raise _bad_entry(virtual_cluster, "reserved bits set")
        if self.version < c_qcow2.VERSION_3:
            raise _bad_entry(virtual_cluster, "zero flag in a version 2 image")
        return None, 0  # a zero cluster; a preallocated one's offset does not matter

    def _bytes_inside(self, virtual_cluster: int) -> int:
        """Bytes of a virtual cluster inside the disk: the last one may be partial."""
        return min(self.cluster_size, self.virtual_size - (virtual_cluster << self.cluster_bits))

    def _refuse_compressed_on_metadata(self, host_offset: int, length: int) -> None:
        first = host_offset >> self.cluster_bits
        stop = ((host_offset + length - 1) >> self.cluster_bits) + 1
        position = bisect_right(self.metadata_stops, first)
        if position < len(self.metadata_starts) and self.metadata_starts[position] < stop:
            raise MalformedImage(f"compressed data at {host_offset:#x} overlaps the metadata")

    def _refuse_data_on_metadata(self, window: _Window) -> None:
        slots = window.slots
        first = bisect_right(self.metadata_stops, window.start)
        for position in range(first, len(self.metadata_starts)):
            start = self.metadata_starts[position] - window.start
            if start >= len(slots):
                break
            stop = self.metadata_stops[position] - window.start
            if any(slots[max(start, 0) : stop]):
                cluster = window.start + max(start, 0)
                raise MalformedImage(
                    f"data cluster at {cluster << self.cluster_bits:#x} overlaps the metadata"
                )

    def _data_writes(self, window: _Window) -> Iterator[Write]:
        """Merge consecutive clusters into runs, and interleave compressed ones by offset."""
        pending_compressed = iter(window.compressed)
        next_compressed = next(pending_compressed, None)
        run_host = run_virtual = run_count = 0
        for slot, stored in enumerate(window.slots):
            if not stored:
                continue
            virtual_cluster = stored - 1
            host_cluster = window.start + slot
            if (
                run_count
                and host_cluster == run_host + run_count
                and virtual_cluster == run_virtual + run_count
            ):
                run_count += 1
                continue
            host_offset = host_cluster << self.cluster_bits
            while next_compressed is not None and next_compressed[0] < host_offset:
                if run_count:
                    yield self._data_write(run_host, run_virtual, run_count)
                    run_count = 0
                yield self._compressed_write(*next_compressed)
                next_compressed = next(pending_compressed, None)
            if run_count:
                yield self._data_write(run_host, run_virtual, run_count)
            run_host, run_virtual, run_count = host_cluster, virtual_cluster, 1
        if run_count:
            yield self._data_write(run_host, run_virtual, run_count)
        while next_compressed is not None:
            yield self._compressed_write(*next_compressed)
            next_compressed = next(pending_compressed, None)

    def _data_write(self, host_cluster: int, virtual_cluster: int, count: int) -> Write:
        virtual_offset = virtual_cluster << self.cluster_bits
        length = min(count << self.cluster_bits, self.virtual_size - virtual_offset)
        return Write(virtual_offset, length, host_cluster << self.cluster_bits)

    def _compressed_write(self, host_offset: int, virtual_cluster: int, length: int) -> Write:
        virtual_offset = virtual_cluster << self.cluster_bits
        return Write(virtual_offset, self._bytes_inside(virtual_cluster), host_offset, length)

    def _zero_writes(self, zero_clusters: list[int]) -> Iterator[Write]:
        """Runs of consecutive zero clusters (ascending, from one L2 table)."""
        run_start = run_stop = -1
        for cluster in [*zero_clusters, -1]:
            if cluster == run_stop:
                run_stop += 1
                continue
            if run_stop > run_start:
                virtual_offset = run_start << self.cluster_bits
                end = min(run_stop << self.cluster_bits, self.virtual_size)
                yield Write(virtual_offset, end - virtual_offset, None)
            run_start, run_stop = cluster, cluster + 1


_SPECIAL_L2_BITS = c_qcow2.OFLAG_COMPRESSED | c_qcow2.OFLAG_ZERO | c_qcow2.L2_STANDARD_RESERVED_MASK
"""An L2 entry with none of these is a plain data cluster or unallocated."""


class _Window:
    """Host clusters ``[start, stop)`` sorted in one pass of :meth:`_ClusterMap.scan`."""

    def __init__(self, start: int, stop: int) -> None:
        self.start = start
        self.slots = array("Q", bytes(8 * (stop - start)))
        """``slots[c - start]``: 1 + the virtual cluster stored in host cluster ``c``, or 0."""
        self.compressed: list[tuple[int, int, int]] = []
        """(host byte offset, virtual cluster, compressed length) starting in the window."""


def _bad_entry(virtual_cluster: int, problem: str) -> MalformedImage:
    return MalformedImage(f"L2 entry for virtual cluster {virtual_cluster}: {problem}")


def _table_clusters(
    what: str, offset: int, length: int, cluster_size: int, file_size: int
) -> tuple[int, int]:
    """Host cluster range of a table, checked to be aligned, past cluster 0, inside the file."""
    if offset % cluster_size or offset < cluster_size or offset + length > file_size:
        raise MalformedImage(f"{what} at {offset:#x} ({length} bytes) is misplaced")
    return offset // cluster_size, ceil_div(offset + length, cluster_size)


def _refuse_overlap(what: str, clusters: tuple[int, int], others: list[tuple[int, int]]) -> None:
    first, stop = clusters
    for other_first, other_stop in others:
        if first < other_stop and other_first < stop:
            raise MalformedImage(f"{what} overlaps other qcow2 metadata")


def _entries(raw: bytes) -> array[int]:
    """Big-endian u64 table entries."""
    table = array("Q", raw)
    if not _NATIVE_IS_BIG_ENDIAN:
        table.byteswap()
    return table


def _read(read_at: ReadAt, file_size: int, offset: int, length: int) -> bytes:
    if offset < 0 or offset + length > file_size:
        raise MalformedImage(f"qcow2 structure at {offset:#x} runs past the end of the file")
    data = read_at(offset, length)
    if len(data) != length:
        raise MalformedImage(f"short read at {offset:#x}: the file is shorter than its size")
    return data
