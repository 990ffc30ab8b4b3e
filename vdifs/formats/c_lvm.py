"""LVM2 on-disk constants and structures (all fields little-endian).

Sources: LVM2 ``lib/label/label.h`` (``label_header``), ``lib/format_text/layout.h``
(``pv_header``, ``disk_locn``, ``mda_header``, ``raw_locn``),
``lib/format_text/format-text.c`` (``_raw_read_mda_header``,
``_vg_read_raw_area``: the circular metadata buffer) and ``lib/misc/crc.c``
(``calc_crc``).  This module holds names and the checksum only; the reader is
:mod:`vdifs.formats.lvm`.
"""

from __future__ import annotations

import struct
import zlib

SECTOR_SIZE = 512

# --- Label (one of the first LABEL_SCAN_SECTORS sectors of the PV) ---
LABEL_SIZE = SECTOR_SIZE
LABEL_SCAN_SECTORS = 4
LABEL_ID = b"LABELONE"
LABEL_TYPE_LVM2 = b"LVM2 001"
LABEL_HEADER = struct.Struct(
    "<"
    "8s"  # 0 id "LABELONE"
    "Q"  # 8 sector_xl: the sector this label is in
    "I"  # 16 crc_xl: calc_crc of the sector from offset_xl (byte 20) to its end
    "I"  # 20 offset_xl: where the pv_header starts, from the start of the label
    "8s"  # 24 type "LVM2 001"
)
assert LABEL_HEADER.size == 32
LABEL_CRC_START = 20

ID_LEN = 32
"""An LVM uuid: 32 characters, written with dashes (6-4-4-4-4-4-6) in the text."""
PV_HEADER = struct.Struct(
    "<"
    "32s"  # 0 pv_uuid, without dashes
    "Q"  # 32 device_size_xl, bytes
)
assert PV_HEADER.size == 40
DISK_LOCN = struct.Struct(
    "<"
    "Q"  # offset, bytes from the start of the PV
    "Q"  # size, bytes (0 for a data area: up to the end of the device)
)
"""After the pv_header: data areas up to an all-zero entry, then metadata areas likewise."""

# --- Metadata area: a 512-byte header, then a circular buffer of metadata text ---
MDA_HEADER_SIZE = 512
MDA_HEADER = struct.Struct(
    "<"
    "I"  # 0 checksum_xl: calc_crc of bytes 4..512
    "16s"  # 4 magic
    "I"  # 20 version
    "Q"  # 24 start: the header's own offset on the PV
    "Q"  # 32 size of the whole metadata area, header included
)
assert MDA_HEADER.size == 40
MDA_CRC_START = 4
FMTT_MAGIC = b" LVM2 x[5A%r0N*>"
FMTT_VERSION = 1
RAW_LOCN = struct.Struct(
    "<"
    "Q"  # offset of the text from the start of the metadata area
    "Q"  # size of the text, its terminating NUL included
    "I"  # checksum: calc_crc of the text (both pieces when it wraps)
    "I"  # flags
)
RAW_LOCN_IGNORED = 0x00000001
"""``pvchange --metadataignore``: the area is not kept up to date."""
RAW_LOCN_SLOTS = 2
"""Slot 0 is the committed metadata, slot 1 the precommitted (transient) one."""

INITIAL_CRC = 0xF597A6CF


def calc_crc(data: bytes | bytearray | memoryview, initial: int = INITIAL_CRC) -> int:
    """LVM's ``calc_crc``: CRC-32 (zlib's polynomial) without the pre- and post-inversion.

    zlib inverts the running value on entry and on exit, so inverting around
    it gives LVM's plain update from ``initial``.
    """
    return zlib.crc32(data, initial ^ 0xFFFF_FFFF) ^ 0xFFFF_FFFF
