"""MBR and GPT on-disk constants and structures (all fields little-endian).

Sources: the UEFI Specification 2.10, chapter 5 "GUID Partition Table (GPT)
Disk Layout" (5.2.3 "Protective MBR", 5.3.2 "GPT Header", 5.3.3 "GPT
Partition Entry Array"), and Linux ``block/partitions/msdos.c`` and
``block/partitions/efi.c`` / ``efi.h`` for what the kernel accepts and how it
numbers partitions.  This module holds names only; the reader is
:mod:`vdifs.formats.partitions`.
"""

from __future__ import annotations

import struct

SECTOR_SIZE = 512
"""The only logical sector size supported (4Kn disks put GPT at byte 4096)."""

# --- MBR and EBR (one sector each) ---
MBR_SIGNATURE_OFFSET = 510
MBR_SIGNATURE = b"\x55\xaa"
MBR_DISK_ID = struct.Struct("<I")
"""The 32-bit disk signature ("NT disk id")."""
MBR_DISK_ID_OFFSET = 0x1B8
MBR_TABLE_OFFSET = 0x1BE
MBR_ENTRY_COUNT = 4
MBR_ENTRY = struct.Struct(
    "<"
    "B"  # 0 boot indicator: 0x80 active, 0 inactive
    "3s"  # 1 CHS of the first sector (ignored, as by Linux)
    "B"  # 4 system indicator (partition type)
    "3s"  # 5 CHS of the last sector (ignored)
    "I"  # 8 first sector, LBA (relative: see partitions.py)
    "I"  # 12 number of sectors
)
assert MBR_ENTRY.size == 16
assert MBR_TABLE_OFFSET + MBR_ENTRY_COUNT * MBR_ENTRY.size == MBR_SIGNATURE_OFFSET

BOOT_ACTIVE = 0x80
BOOT_INACTIVE = 0x00

TYPE_EMPTY = 0x00
TYPE_GPT_PROTECTIVE = 0xEE
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
"""DOS_EXTENDED, WIN98_EXTENDED and LINUX_EXTENDED: msdos.c ``is_extended_partition``."""

FIRST_LOGICAL_NUMBER = 5
"""Linux numbers logical partitions from 5, in the order of the EBR chain."""
MAX_PARTITION_NUMBER = 256
"""DISK_MAX_PARTS in Linux: no block device gets a partition numbered higher."""

# --- GPT header (UEFI 5.3.2) ---
GPT_SIGNATURE = b"EFI PART"
GPT_PRIMARY_LBA = 1
GPT_HEADER = struct.Struct(
    "<"
    "8s"  # 0 signature "EFI PART"
    "I"  # 8 revision (0x00010000)
    "I"  # 12 header size: 92 up to the sector size
    "I"  # 16 header CRC32, computed with this field zeroed
    "I"  # 20 reserved, zero
    "Q"  # 24 my LBA
    "Q"  # 32 alternate LBA
    "Q"  # 40 first usable LBA
    "Q"  # 48 last usable LBA
    "16s"  # 56 disk GUID (mixed-endian)
    "Q"  # 72 partition entry LBA
    "I"  # 80 number of partition entries
    "I"  # 84 size of a partition entry: 128 x 2^n
    "I"  # 88 partition entry array CRC32
)
assert GPT_HEADER.size == 92
GPT_HEADER_CRC_OFFSET = 16
GPT_HEADER_MIN_SIZE = GPT_HEADER.size

# --- GPT partition entry (UEFI 5.3.3); larger entries keep these 128 bytes first ---
GPT_ENTRY = struct.Struct(
    "<"
    "16s"  # 0 partition type GUID (all zero: unused entry)
    "16s"  # 16 unique partition GUID
    "Q"  # 32 starting LBA
    "Q"  # 40 ending LBA, inclusive
    "Q"  # 48 attributes
    "72s"  # 56 partition name, UTF-16LE, NUL-padded
)
assert GPT_ENTRY.size == 128
GPT_ENTRY_MIN_SIZE = GPT_ENTRY.size
GPT_ENTRY_MAX_SIZE = 4096
GPT_NAME_ENCODING = "utf-16-le"
GPT_UNUSED_TYPE = bytes(16)

MAX_GPT_ENTRY_ARRAY = 1024 * 1024
"""Largest partition entry array read (8192 entries of 128 bytes).  Real tables
hold 128 entries (16 KiB); the header's entry count and size are not trusted
beyond this, and a header that claims more is treated as invalid."""
