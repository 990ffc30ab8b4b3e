"""qcow2 on-disk constants and structures (all fields big-endian).

Source: qemu ``docs/interop/qcow2.txt`` (sections "Header", "Header
extensions", "Host cluster management", "Cluster mapping"), qemu
``block/qcow2.h`` for the limits qemu enforces, and
xapi-project/xen-api ``python3/libexec/qcow2-to-stdout.py`` and mirage/ocaml-qcow
``lib/qcow_stream.ml`` (``stream_decode``) for what XAPI's
qcow2-to-stdout writes and qcow-stream-tool accepts.  This module holds names
and tiny helpers only; the encoder is :mod:`vdifs.formats.qcow2` and the import
parser :mod:`vdifs.formats.qcow2_parse`.
"""

from __future__ import annotations

import struct

from vdifs.model import ceil_div

MAGIC = b"QFI\xfb"
VERSION_2 = 2
VERSION_3 = 3

# --- Header ("Header" in qcow2.txt) ---
HEADER_V2 = struct.Struct(
    ">"
    "4s"  # 0 magic
    "I"  # 4 version
    "Q"  # 8 backing_file_offset (0: no backing file)
    "I"  # 16 backing_file_size
    "I"  # 20 cluster_bits
    "Q"  # 24 size (virtual size in bytes)
    "I"  # 32 crypt_method
    "I"  # 36 l1_size (entries)
    "Q"  # 40 l1_table_offset
    "Q"  # 48 refcount_table_offset
    "I"  # 56 refcount_table_clusters
    "I"  # 60 nb_snapshots
    "Q"  # 64 snapshots_offset
)
"""The version 2 header; version 3 appends :data:`HEADER_V3_TAIL`."""
assert HEADER_V2.size == 72

HEADER_V3_TAIL = struct.Struct(
    ">"
    "Q"  # 72 incompatible_features
    "Q"  # 80 compatible_features
    "Q"  # 88 autoclear_features
    "I"  # 96 refcount_order
    "I"  # 100 header_length
)
assert HEADER_V2.size + HEADER_V3_TAIL.size == 104

COMPRESSION_TYPE = struct.Struct(">B")
"""Byte 104, present when header_length > 104 (else zlib)."""
COMPRESSION_TYPE_OFFSET = 104
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

HEADER_V2_LENGTH = HEADER_V2.size
"""Version 2 has no header_length field: its header is always 72 bytes."""
HEADER_V3_MIN_LENGTH = 104
HEADER_V3_LENGTH = 112
"""What vdifs writes: 104 bytes, the compression type byte, 7 bytes of padding
to keep header extensions 8-byte aligned (qemu and qcow2-to-stdout write 112
as well; qcow-stream-tool wants a multiple of 8)."""
HEADER_LENGTH_ALIGNMENT = 8

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

# --- Feature bits ---
INCOMPAT_DIRTY = 1 << 0
"""Refcounts may be stale (lazy refcounts); L1/L2 are still consistent."""
INCOMPAT_CORRUPT = 1 << 1
"""qemu found the metadata inconsistent and stopped writing to it."""
INCOMPAT_EXTERNAL_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION_TYPE = 1 << 3
"""Set exactly when the compression type byte is not zlib."""
INCOMPAT_EXTENDED_L2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_EXTERNAL_DATA_FILE
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2
)
INCOMPAT_NAMES = {
    INCOMPAT_DIRTY: "dirty",
    INCOMPAT_CORRUPT: "corrupt",
    INCOMPAT_EXTERNAL_DATA_FILE: "external data file",
    INCOMPAT_COMPRESSION_TYPE: "compression type",
    INCOMPAT_EXTENDED_L2: "extended L2 entries",
}
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_RAW_EXTERNAL_DATA = 1 << 1

# --- Header extensions ("Header extensions" in qcow2.txt) ---
EXTENSION_HEADER = struct.Struct(">II")
"""magic, length of the data that follows (padded to 8 bytes, padding not counted)."""
EXTENSION_ALIGNMENT = 8
EXT_END = 0x00000000
"""End of the extension area (an all-zero extension header)."""
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAME_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FULL_DISK_ENCRYPTION = 0x0537BE77
EXT_EXTERNAL_DATA_FILE = 0x44415441
EXT_VDIFS_IDENTITY = 0x76646966
"""b"vdif": a vdifs-private extension naming the image and, for a delta, its base.

qemu and libqcow skip extensions they do not know; the vdifs importer reads it
to tell which base a delta applies onto."""

VDIFS_IDENTITY_FULL = struct.Struct(
    ">"
    "16s"  # image uuid (ImageIdentity.uuid)
    "Q"  # image timestamp, seconds since the Unix epoch
)
VDIFS_IDENTITY_DELTA = struct.Struct(
    ">"
    "16s"  # image uuid
    "Q"  # image timestamp
    "16s"  # parent image uuid
)
"""The identity of a delta: the full layout plus the parent's uuid.  A reader
tells them apart by the extension length and ignores any longer tail."""

FEATURE_NAME_ENTRY = struct.Struct(">BB46s")
"""type (0 incompatible, 1 compatible, 2 autoclear), bit number, name (NUL padded)."""
FEATURE_TYPE_INCOMPATIBLE = 0

BACKING_FORMAT_QCOW2 = b"qcow2"
BACKING_FILE_NAME_MAX = 1023
"""The spec's limit on backing_file_size (qemu keeps names in a 1024-byte buffer)."""

# --- Cluster geometry and limits ---
MIN_CLUSTER_BITS = 9
"""512-byte clusters: the spec's minimum (one sector)."""
MAX_CLUSTER_BITS = 21
"""2 MiB clusters: qemu refuses larger ones; the compressed-cluster descriptor
and qemu's buffers are sized for this."""
CLUSTER_BITS = 16
"""What vdifs writes: 64 KiB clusters, one vdifs chunk per cluster."""
CLUSTER_SIZE = 1 << CLUSTER_BITS

TABLE_ENTRY = struct.Struct(">Q")
"""One L1, L2 or refcount table entry."""
MAX_L1_BYTES = 32 * 1024 * 1024
"""qemu's QCOW_MAX_L1_SIZE: it refuses larger active L1 tables (about 2 PiB of
virtual disk at 64 KiB clusters).  vdifs writes nothing qemu cannot open, and
reads no larger L1 from an upload."""
MAX_L1_ENTRIES = MAX_L1_BYTES // TABLE_ENTRY.size
MAX_REFCOUNT_ORDER = 6
"""64-bit refcounts, the spec's maximum."""
REFCOUNT_ORDER = 4
"""What vdifs writes: 16-bit refcounts, as qemu and qcow2-to-stdout do."""
REFCOUNT_ENTRY = struct.Struct(">H")
"""One 16-bit refcount (refcount_order 4)."""
assert REFCOUNT_ENTRY.size * 8 == 1 << REFCOUNT_ORDER
REFCOUNT_ONE = REFCOUNT_ENTRY.pack(1)

# --- L1 and L2 entries ("Cluster mapping" in qcow2.txt) ---
OFLAG_COPIED = 1 << 63
"""Refcount is exactly 1: the cluster may be written in place."""
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
"""Version 3 only: the cluster reads as zeros."""
L1_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
"""Bits 9-55 of an L1 entry: the L2 table offset (must be cluster aligned)."""
L1_RESERVED_MASK = 0x7F00_0000_0000_01FF
L2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
"""Bits 9-55 of a standard L2 entry: the host cluster offset (cluster aligned)."""
L2_STANDARD_RESERVED_MASK = 0x3F00_0000_0000_01FE
"""Bits 1-8 and 56-61 of a standard L2 entry must be zero."""
COMPRESSED_SECTOR_SIZE = 512
"""The unit of the compressed-cluster length field."""
ZLIB_WINDOW_BITS = -15
"""Raw deflate, no zlib header; -15 inflates any window size (qemu writes -12)."""


def compressed_offset_bits(cluster_bits: int) -> int:
    """x in the spec: bits 0..x-1 of a compressed entry are the host byte offset."""
    return 62 - (cluster_bits - 8)


def round_up(value: int, unit: int) -> int:
    return ceil_div(value, unit) * unit


def extension_padding(length: int) -> int:
    """Zero bytes after an extension's data to reach 8-byte alignment."""
    return round_up(length, EXTENSION_ALIGNMENT) - length
