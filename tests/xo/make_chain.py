"""Write dynamic and differencing VHDs per the VHD spec, to feed tests/xo/restore.mjs.

``python3 tests/xo/make_chain.py selftest`` builds a chain (a dynamic base made by
``qemu-img convert`` and two differencing children written here) and checks that
restore.mjs's ``synthetic`` and ``merge`` give back the expected raw disk. qemu-img
cannot create differencing VHDs, hence this writer. Standard library only.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTOR = 512
BLOCK_SIZE = 2 * 1024 * 1024
DYNAMIC, DIFFERENCING = 3, 4
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z
PLATFORM_W2KU = 0x57326B75  # "W2ku": UTF-16LE path
BAT_UNUSED = 0xFFFFFFFF


def _checksum(data: bytes) -> int:
    return ~sum(data) & 0xFFFFFFFF


def _geometry(size: int) -> tuple[int, int, int]:
    """CHS of the VHD spec's appendix (cylinders, heads, sectors per track)."""
    sectors = min(size // SECTOR, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = sectors // spt
    else:
        spt = 17
        cyl_heads = sectors // spt
        heads = max((cyl_heads + 1023) // 1024, 4)
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = sectors // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = sectors // spt
    return cyl_heads // heads, heads, spt


def footer(size: int, disk_type: int, image_uuid: bytes, timestamp: int) -> bytes:
    cylinders, heads, spt = _geometry(size)
    raw = struct.pack(
        ">8sIIQI4sIIQQHBBII16sB427s",
        b"conectix",
        2,  # features: reserved bit
        0x00010000,
        SECTOR,  # data offset: the dynamic header
        timestamp,
        b"vdxo",
        0x00010000,
        0x5769326B,  # "Wi2k"
        size,
        size,
        cylinders,
        heads,
        spt,
        disk_type,
        0,
        image_uuid,
        0,
        b"",
    )
    return raw[:64] + struct.pack(">I", _checksum(raw)) + raw[68:]


def header(
    table_offset: int,
    entries: int,
    block_size: int,
    parent_uuid: bytes = bytes(16),
    parent_timestamp: int = 0,
    parent_name: str = "",
    locator: tuple[int, int, int] | None = None,
) -> bytes:
    """A dynamic header; ``locator`` is one W2ku entry (data space in sectors, length, offset)."""
    locators = b""
    if locator is not None:
        space, length, offset = locator
        locators = struct.pack(">IIIIQ", PLATFORM_W2KU, space, length, 0, offset)
    name = parent_name.encode("utf-16-be")
    assert len(name) <= 512, "parentUnicodeName holds 256 UTF-16 units"
    raw = struct.pack(
        ">8sQQIIII16sII512s192s256s",
        b"cxsparse",
        0xFFFFFFFFFFFFFFFF,
        table_offset,
        0x00010000,
        entries,
        block_size,
        0,
        parent_uuid,
        parent_timestamp,
        0,
        name,
        locators,
        b"",
    )
    return raw[:36] + struct.pack(">I", _checksum(raw)) + raw[40:]


def write_vhd(
    path: Path,
    size: int,
    blocks: Mapping[int, bytes],
    *,
    parent: Path | None = None,
    bitmaps: Mapping[int, bytes] | None = None,
    block_size: int = BLOCK_SIZE,
    image_uuid: bytes | None = None,
) -> bytes:
    """Write a dynamic VHD, or a differencing one over ``parent`` (named by its file name,
    relative to ``path``'s directory, in parentUnicodeName and a W2ku locator ".\\name").

    ``blocks`` maps block index to its data (``block_size`` bytes, shorter is zero-padded);
    each block's sector bitmap is all ones unless ``bitmaps`` gives it. Returns the uuid.
    """
    entries = -(-size // block_size)
    bitmap_size = -(-(block_size // SECTOR // 8) // SECTOR) * SECTOR
    image_uuid = image_uuid or uuidlib.uuid4().bytes
    timestamp = int(time.time()) - VHD_EPOCH
    offset = SECTOR + 1024
    locator_data = b""
    parent_uuid, parent_timestamp, parent_name = bytes(16), 0, ""
    if parent is not None:
        with parent.open("rb") as f:
            parent_footer = f.read(SECTOR)
        parent_uuid = parent_footer[68:84]
        parent_timestamp = struct.unpack(">I", parent_footer[24:28])[0]
        parent_name = parent.name
        locator_data = (".\\" + parent_name).encode("utf-16-le")
    locator = None
    if locator_data:
        space = -(-len(locator_data) // SECTOR)
        locator = (space, len(locator_data), offset)
        offset += space * SECTOR
    table_offset = offset
    bat_size = -(-entries * 4 // SECTOR) * SECTOR
    offset += bat_size
    bat = [BAT_UNUSED] * entries
    body = bytearray()
    for index in sorted(blocks):
        assert 0 <= index < entries, f"block {index} outside the disk"
        data = blocks[index]
        assert len(data) <= block_size
        bat[index] = (offset + len(body)) // SECTOR
        bitmap = (bitmaps or {}).get(index, b"\xff" * (block_size // SECTOR // 8))
        body += bitmap.ljust(bitmap_size, b"\0") + data.ljust(block_size, b"\0")
    foot = footer(size, DIFFERENCING if parent else DYNAMIC, image_uuid, timestamp)
    head = header(
        table_offset, entries, block_size, parent_uuid, parent_timestamp, parent_name, locator
    )
    bat_bytes = struct.pack(f">{entries}I", *bat).ljust(bat_size, b"\xff")
    locator_bytes = locator_data.ljust(-(-len(locator_data) // SECTOR) * SECTOR, b"\0")
    with path.open("wb") as f:
        f.write(foot + head + locator_bytes + bat_bytes + body + foot)
    return image_uuid


def restore(*args: str | Path) -> None:
    subprocess.run(["node", str(HERE / "restore.mjs"), *map(str, args)], check=True)


def selftest() -> None:
    rng = random.Random(0)
    size = 64 * 1024 * 1024
    nblocks = size // BLOCK_SIZE
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        disk = bytearray(size)
        for _ in range(20):  # random extents, some blocks left empty
            start = rng.randrange(0, size, SECTOR)
            n = rng.randrange(SECTOR, 3 * BLOCK_SIZE, SECTOR)
            chunk = os.urandom(min(n, size - start))
            disk[start : start + len(chunk)] = chunk
        (d / "base.raw").write_bytes(disk)
        options = "subformat=dynamic,force_size=on"
        convert = ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", options]
        subprocess.run([*convert, d / "base.raw", d / "base.vhd"], check=True)
        chain = [d / "base.vhd"]
        for level in (1, 2):
            child = d / f"delta{level}.vhd"
            changed = {b: os.urandom(BLOCK_SIZE) for b in rng.sample(range(nblocks), 6)}
            changed[nblocks - 1] = bytes(BLOCK_SIZE)  # a block rewritten with zeros
            write_vhd(child, size, changed, parent=chain[-1])
            for b, data in changed.items():
                disk[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] = data
            chain.append(child)
        # A block whose bitmap marks only its first half: vhd-lib ignores sector bitmaps
        # and takes the whole block from the newest VHD carrying it.
        half = bytes(BLOCK_SIZE // 2) + b"\x07" * (BLOCK_SIZE // 2)
        bitmap = b"\xff" * (BLOCK_SIZE // SECTOR // 16) + bytes(BLOCK_SIZE // SECTOR // 16)
        write_vhd(d / "delta3.vhd", size, {3: half}, parent=chain[-1], bitmaps={3: bitmap})
        chain.append(d / "delta3.vhd")
        disk[3 * BLOCK_SIZE : 4 * BLOCK_SIZE] = half

        restore("synthetic", d / "out.raw", d / "base.vhd")
        assert (d / "out.raw").read_bytes() == (d / "base.raw").read_bytes(), "synthetic base"
        restore("synthetic", d / "out.raw", chain[-1])
        assert (d / "out.raw").read_bytes() == disk, "synthetic chain"
        restore("merge", d / "out.raw", *chain)
        assert (d / "out.raw").read_bytes() == disk, "merged chain"
        restore("merge", d / "out.raw", chain[0], chain[1])
        restore("synthetic", d / "single.raw", chain[1])
        assert (d / "out.raw").read_bytes() == (d / "single.raw").read_bytes(), "one child"
    print("make_chain selftest: synthetic and merge match")


if __name__ == "__main__":
    if sys.argv[1:] != ["selftest"]:
        sys.exit("usage: python3 make_chain.py selftest")
    selftest()
