"""VHD on-disk constants and structures (all fields big-endian).

Source: Microsoft "Virtual Hard Disk Image Format Specification" 1.0
(footer: "Hard Disk Footer Format"; header: "Dynamic Disk Header Format";
geometry: "Appendix: CHS Calculation"), and xapi-project/xen-api
``ocaml/libs/vhd/vhd_format/f.ml`` and qemu/qemu ``block/vpc.c`` for what XAPI's vhd-tool and
qemu write.  This module holds names and tiny helpers only; the encoder is
:mod:`vdifs.formats.vhd` and the import parser :mod:`vdifs.formats.vhd_parse`.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from vdifs.model import ceil_div

SECTOR_SIZE = 512

# --- Footer (512 bytes, at EOF; dynamic and differencing disks also keep a copy at 0) ---
FOOTER_SIZE = 512
FOOTER_COOKIE = b"conectix"
FOOTER = struct.Struct(
    ">"
    "8s"  # 0 cookie
    "I"  # 8 features
    "I"  # 12 file format version
    "Q"  # 16 data offset: the dynamic header, or all-ones for a fixed disk
    "I"  # 24 timestamp, seconds since VHD_EPOCH_UNIX
    "4s"  # 28 creator application
    "I"  # 32 creator version
    "I"  # 36 creator host OS
    "Q"  # 40 original size
    "Q"  # 48 current size
    "H"  # 56 cylinders
    "B"  # 58 heads
    "B"  # 59 sectors per track
    "I"  # 60 disk type
    "I"  # 64 checksum
    "16s"  # 68 unique id
    "B"  # 84 saved state
    "427s"  # 85 reserved
)
assert FOOTER.size == FOOTER_SIZE
FOOTER_CHECKSUM_OFFSET = 64
CHECKSUM = struct.Struct(">I")
"""The u32 checksum field of the footer and of the header."""

FEATURES_RESERVED = 0x00000002
"""The spec says this bit must always be set."""
FEATURES_TEMPORARY = 0x00000001
FILE_FORMAT_VERSION = 0x00010000
FIXED_DATA_OFFSET = 0xFFFF_FFFF_FFFF_FFFF
"""Footer data offset of a fixed disk: there is no dynamic header."""
FIXED_DATA_OFFSET_32 = 0xFFFF_FFFF
"""The spec's own wording ("0xFFFFFFFF") for the same; some writers set only 32 bits."""

DISK_TYPE_FIXED = 2
DISK_TYPE_DYNAMIC = 3
DISK_TYPE_DIFFERENCING = 4
DEPRECATED_DISK_TYPES = frozenset({1, 5, 6})
"""Listed by the spec as "Reserved (deprecated)"; 0 is "None"."""

CREATOR_APPLICATION = b"CTXS"
"""What vdifs writes as creator application.

qemu sizes a VHD by its CHS geometry (which is usually smaller than the disk)
unless it recognises the creator: it trusts current_size only for ``win ``,
``qem2``, ``d2v ``, ``CTXS`` and ``tap\\0`` (qemu ``block/vpc.c``).  ``tap``
would make blktap's libvhd expect a batmap; ``win ``/``qem2`` claim to be
Hyper-V/qemu (qemu writes ``qem2`` only together with the maximal CHS
geometry).  ``CTXS`` (Citrix XenConverter) is from the XenServer family whose
vhd-tool vdifs imitates, and no reader we know (libvhd, vhd-format, libvhdi,
vhd-lib) does anything with it beyond qemu's size rule.
"""
CREATOR_VERSION = 0x00010000
CREATOR_HOST_OS_NONE = 0x00000000
"""The spec names only Wi2k and Mac hosts; vhd-tool writes 0 too, nobody checks it."""
CREATOR_HOST_OS_WINDOWS = 0x5769326B  # "Wi2k"
CREATOR_HOST_OS_MAC = 0x4D616320  # "Mac "

VHD_EPOCH_UNIX = 946_684_800
"""2000-01-01T00:00:00Z in Unix seconds: VHD timestamps count from here."""
MAX_TIMESTAMP = 0xFFFF_FFFF

MAX_VHD_SIZE = 2040 * 1024**3
"""2040 GiB = 2190433320960 bytes: XAPI's max_vhd_size, SM's cap, and qemu
refuses to open larger VHDs (EFBIG)."""
assert MAX_VHD_SIZE == 2_190_433_320_960

# --- Dynamic disk header (1024 bytes, at footer.data_offset) ---
HEADER_SIZE = 1024
HEADER_COOKIE = b"cxsparse"
HEADER = struct.Struct(
    ">"
    "8s"  # 0 cookie
    "Q"  # 8 data offset: unused, all-ones
    "Q"  # 16 table offset (BAT)
    "I"  # 24 header version
    "I"  # 28 max table entries
    "I"  # 32 block size
    "I"  # 36 checksum
    "16s"  # 40 parent unique id
    "I"  # 56 parent timestamp
    "I"  # 60 reserved
    "512s"  # 64 parent unicode name, UTF-16BE, zero-padded
    "192s"  # 576 eight parent locator entries
    "256s"  # 768 reserved
)
assert HEADER.size == HEADER_SIZE
HEADER_CHECKSUM_OFFSET = 36
HEADER_VERSION = 0x00010000
HEADER_DATA_OFFSET = 0xFFFF_FFFF_FFFF_FFFF
PARENT_NAME_SIZE = 512
PARENT_NAME_ENCODING = "utf-16-be"

# --- Parent locator entries (8 x 24 bytes inside the header) ---
PARENT_LOCATOR = struct.Struct(
    ">"
    "I"  # platform code
    "I"  # platform data space, in sectors (some writers put bytes)
    "I"  # platform data length, bytes
    "I"  # reserved
    "Q"  # platform data offset, bytes
)
PARENT_LOCATOR_COUNT = 8
assert PARENT_LOCATOR.size * PARENT_LOCATOR_COUNT == 192

PLATFORM_NONE = 0x00000000
PLATFORM_WI2R = 0x57693272  # "Wi2r": deprecated relative path
PLATFORM_WI2K = 0x5769326B  # "Wi2k": deprecated absolute path
PLATFORM_W2RU = 0x57327275  # "W2ru": relative path, UTF-16LE
PLATFORM_W2KU = 0x57326B75  # "W2ku": absolute path, UTF-16LE
PLATFORM_MAC = 0x4D616320  # "Mac ": Mac OS alias blob
PLATFORM_MACX = 0x4D616358  # "MacX": file URL, UTF-8
MACX_RELATIVE_PREFIX = "file://./"
"""How vhd-format and libvhd spell a parent next to the child in a MacX locator."""
MACX_ENCODING = "utf-8"

# --- Block allocation table and blocks ---
BAT_ENTRY = struct.Struct(">I")
BAT_UNUSED = 0xFFFF_FFFF
"""BAT value of an unallocated block; the BAT's padding to a sector uses it too."""
BAT_UNUSED_BYTES = b"\xff\xff\xff\xff"


def sectors_for(size: int) -> int:
    """Sectors needed to hold ``size`` bytes."""
    return ceil_div(size, SECTOR_SIZE)


def round_up_to_sector(size: int) -> int:
    return sectors_for(size) * SECTOR_SIZE


def bitmap_size(block_size: int) -> int:
    """Bytes of the sector bitmap before each block: one bit per sector, sector-padded."""
    return round_up_to_sector(ceil_div(block_size // SECTOR_SIZE, 8))


def checksum(structure: bytes | bytearray, checksum_offset: int) -> int:
    """One's complement of the byte sum, with the 4-byte checksum field counted as zero."""
    total = sum(structure) - sum(structure[checksum_offset : checksum_offset + 4])
    return ~total & 0xFFFF_FFFF


def unix_to_vhd_time(unix_seconds: int) -> int:
    """VHD timestamp for a Unix time, clamped to what the u32 field can hold."""
    return min(max(unix_seconds - VHD_EPOCH_UNIX, 0), MAX_TIMESTAMP)


class Geometry(NamedTuple):
    cylinders: int
    heads: int
    sectors_per_track: int


MAX_CHS_SECTORS = 65535 * 16 * 255


def geometry_for(size: int) -> Geometry:
    """CHS geometry of a disk of ``size`` bytes, as the spec appendix computes it.

    Uses ``>=`` at 65535*16*63 sectors like the spec and qemu (vhd-format uses
    ``>``).  C*H*S may be less than the size: that is why readers that size
    by CHS need the creator application above.
    """
    total_sectors = min(size // SECTOR_SIZE, MAX_CHS_SECTORS)
    if total_sectors >= 65535 * 16 * 63:
        sectors_per_track = 255
        heads = 16
        cylinders_times_heads = total_sectors // sectors_per_track
    else:
        sectors_per_track = 17
        cylinders_times_heads = total_sectors // sectors_per_track
        heads = max((cylinders_times_heads + 1023) // 1024, 4)
        if cylinders_times_heads >= heads * 1024 or heads > 16:
            sectors_per_track = 31
            heads = 16
            cylinders_times_heads = total_sectors // sectors_per_track
        if cylinders_times_heads >= heads * 1024:
            sectors_per_track = 63
            heads = 16
            cylinders_times_heads = total_sectors // sectors_per_track
    return Geometry(cylinders_times_heads // heads, heads, sectors_per_track)
