"""read_table against disks partitioned by sfdisk and read back by Linux, and against hostile bytes.

Each table is checked against ``sfdisk --json`` (libfdisk) and against the
partition devices of a read-only loop device.  Where the kernel has no MBR or
GPT parser of its own (``losetup -P`` then creates no partition), the devices
are added with ``partx -a``, which parses with libblkid, a third reader: the
assertion messages say which one was used.  File systems written into the
partitions by mkfs.ext4 and mkfs.vfat/mtools are read back out of the bytes
read_table points at, as a file-level restore would.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FUZZ_DERANDOMIZE, FUZZ_EXAMPLES, needs_tool, require_loop_device
from vdifs.formats import c_partitions
from vdifs.formats.partitions import MAX_EBRS, PartitionTable, read_table

MiB = 1024 * 1024
SECTOR = 512
needs_sfdisk = needs_tool("sfdisk")

GPT_ATTRIBUTE_NAMES = {"RequiredPartition": 0, "NoBlockIOProtocol": 1, "LegacyBIOSBootable": 2}
"""How sfdisk spells GPT attribute bits 0-2; others are ``GUID:n[,m...]``."""


# --- helpers -------------------------------------------------------------------------------------


def run(*cmd: str, input: str | None = None, check: bool = True) -> str:
    result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr}")
    return result.stdout


def make_disk(path: Path, size: int, script: str) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path), input=script)
    return path


class Listed(NamedTuple):
    """A partition as ``sfdisk --json`` lists it, start and size in bytes."""

    start: int
    size: int
    fields: dict[str, Any]


def sfdisk_json(path: Path) -> tuple[dict[str, Any], dict[int, Listed]]:
    """The table as libfdisk reads it, and its partitions by number."""
    table = json.loads(run("sfdisk", "--json", str(path)))["partitiontable"]
    assert table["sectorsize"] == SECTOR
    partitions = {}
    for entry in table.get("partitions", []):
        number = int(entry["node"][len(str(path)) :])
        partitions[number] = Listed(entry["start"] * SECTOR, entry["size"] * SECTOR, entry)
    return table, partitions


def mkfs_ext4(disk: Path, offset: int, size: int, files: Path) -> None:
    """An ext4 file system holding the files of ``files`` at ``offset`` of the disk."""
    run(
        "mkfs.ext4",
        "-q",
        "-F",
        "-E",
        f"offset={offset}",
        "-d",
        str(files),
        str(disk),
        f"{size // 1024}k",
    )


def reader(path: Path) -> tuple[Callable[[int, int], bytes], int]:
    data = path.read_bytes()
    size = len(data)

    def read_at(offset: int, length: int) -> bytes:
        assert offset >= 0 and length >= 0 and offset + length <= size, (offset, length, size)
        return data[offset : offset + length]

    return read_at, size


def table_of(path: Path) -> PartitionTable:
    read_at, size = reader(path)
    return read_table(read_at, size)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def sha_range(path: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(length, 4 * MiB))
            assert chunk, f"{path} ends before {offset + length}"
            digest.update(chunk)
            length -= len(chunk)
    return digest.hexdigest()


def extract(path: Path, offset: int, length: int, target: Path) -> Path:
    with open(path, "rb") as source, open(target, "wb") as out:
        source.seek(offset)
        out.write(source.read(length))
    return target


def _partition_devices(loop: str) -> dict[int, tuple[Path, int, int]]:
    """number -> (device node, start, size) of the partitions Linux knows on a loop device."""
    name = os.path.basename(loop)
    found = {}
    for entry in os.listdir(f"/sys/block/{name}"):
        if entry.startswith(f"{name}p"):
            sys_dir = Path(f"/sys/block/{name}/{entry}")
            start = int((sys_dir / "start").read_text()) * SECTOR
            size = int((sys_dir / "size").read_text()) * SECTOR
            found[int(entry[len(name) + 1 :])] = (Path("/dev") / entry, start, size)
    return found


@contextlib.contextmanager
def linux_partitions(path: Path) -> Iterator[tuple[str, dict[int, tuple[Path, int, int]]]]:
    """The partition devices Linux makes for a disk image, and who parsed the table."""
    require_loop_device()
    loop = run("losetup", "--partscan", "--read-only", "--show", "--find", str(path)).strip()
    try:
        oracle = "the kernel (losetup -P)"
        parts = _partition_devices(loop)
        if not parts:
            # This kernel has no partition parser of its own (CONFIG_MSDOS_PARTITION,
            # CONFIG_EFI_PARTITION unset): libblkid parses, BLKPG adds the devices.
            run("partx", "--add", loop, check=False)
            oracle = "libblkid (partx -a: the kernel has no MBR/GPT parser)"
            parts = _partition_devices(loop)
        deadline = time.monotonic() + 5
        while not all(node.exists() for node, _, _ in parts.values()):
            assert time.monotonic() < deadline, f"partition nodes of {loop} did not appear"
            time.sleep(0.02)
        yield oracle, parts
    finally:
        run("losetup", "--detach", loop, check=False)


def check_against_linux(path: Path, table: PartitionTable) -> str:
    """Same numbers, starts, sizes and bytes as the partition devices; returns the oracle."""
    with linux_partitions(path) as (oracle, devices):
        assert set(devices) == {p.number for p in table.partitions}, oracle
        for p in table.partitions:
            node, start, size = devices[p.number]
            assert start == p.start, (oracle, p)
            if p.is_extended:
                # Linux shows only the first 1 KiB of an extended partition.
                assert size == 2 * SECTOR, (oracle, p, size)
            else:
                assert size == p.size, (oracle, p, size)
            assert sha_range(node, 0, size) == sha_range(path, p.start, size), (oracle, p)
    return oracle


def gpt_attributes(spelled: str) -> int:
    bits = 0
    for word in spelled.split():
        if word.startswith("GUID:"):
            for bit in word[5:].split(","):
                bits |= 1 << int(bit)
        else:
            bits |= 1 << GPT_ATTRIBUTE_NAMES[word]
    return bits


def check_against_sfdisk(path: Path, table: PartitionTable) -> None:
    label, expected = sfdisk_json(path)
    assert table.scheme == {"dos": "mbr", "gpt": "gpt"}[label["label"]]
    assert table.disk_id == label["id"].lower()
    assert {p.number for p in table.partitions} == set(expected)
    for p in table.partitions:
        listed = expected[p.number]
        entry = listed.fields
        assert (p.start, p.size) == (listed.start, listed.size), (p, entry)
        if table.scheme == "mbr":
            assert p.type == f"0x{int(entry['type'], 16):02x}"
            assert p.attributes == (0x80 if entry.get("bootable") else 0)
            assert (p.name, p.uuid) == ("", None)
        else:
            assert p.type == entry["type"].lower()
            assert p.uuid == entry["uuid"].lower()
            assert p.name == entry.get("name", "")
            assert p.attributes == gpt_attributes(entry.get("attrs", ""))


# --- MBR ---------------------------------------------------------------------------------------

MBR_SCRIPT = """\
label: dos
label-id: 0x12345678
1MiB,8MiB,83,*
,8MiB,c
,,5
,4MiB,83
,4MiB,82
,,83
"""


@needs_sfdisk
@needs_tool("mkfs.ext4")
@needs_tool("mkfs.vfat")
@needs_tool("mcopy")
def test_mbr_primaries_and_logical_partitions(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "mbr.img", 64 * MiB, MBR_SCRIPT)
    _, expected = sfdisk_json(disk)
    files = tmp_path / "files"
    files.mkdir()
    (files / "hello.txt").write_text("hello from p1\n")
    p1, p2, p5 = expected[1], expected[2], expected[5]
    mkfs_ext4(disk, p1.start, p1.size, files)
    (files / "hello.txt").write_text("hello from p5\n")
    mkfs_ext4(disk, p5.start, p5.size, files)
    run("mkfs.vfat", f"--offset={p2.start // SECTOR}", str(disk), str(p2.size // 1024))
    (tmp_path / "FAT.TXT").write_text("hello from p2\n")
    run("mcopy", "-i", f"{disk}@@{p2.start}", str(tmp_path / "FAT.TXT"), "::/")

    table = table_of(disk)
    assert table.scheme == "mbr" and table.disk_id == "0x12345678"
    assert [p.number for p in table.partitions] == [1, 2, 3, 5, 6, 7]
    assert [p.number for p in table.partitions if p.is_extended] == [3]
    assert table.notes == ()
    check_against_sfdisk(disk, table)
    check_against_linux(disk, table)

    by_number = {p.number: p for p in table.partitions}
    for number, text in ((1, "hello from p1\n"), (5, "hello from p5\n")):
        p = by_number[number]
        image = extract(disk, p.start, p.size, tmp_path / f"p{number}.img")
        assert run("debugfs", "-R", "cat /hello.txt", str(image)) == text
    p = by_number[2]
    image = extract(disk, p.start, p.size, tmp_path / "p2.img")
    assert run("mtype", "-i", str(image), "::/FAT.TXT") == "hello from p2\n"
    json.dumps(table.to_json())


def ebr_chain(disk: Path) -> list[int]:
    """Sectors of the EBRs, followed independently of read_table (first extended slot)."""
    data = disk.read_bytes()
    entries = [struct.unpack_from("<B3sB3sII", data, 446 + 16 * i) for i in range(4)]
    extended = next(e for e in entries if e[2] == 0x05)
    chain = [extended[4]]
    while True:
        link = struct.unpack_from("<B3sB3sII", data, chain[-1] * SECTOR + 446 + 16)
        if link[2] == 0:
            return chain
        chain.append(extended[4] + link[4])


@needs_sfdisk
def test_ebr_chain_that_loops_stops(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "loop.img", 64 * MiB, MBR_SCRIPT)
    chain = ebr_chain(disk)
    assert len(chain) == 3
    # The last EBR's link points back to the first one (relative offset 0).
    with open(disk, "r+b") as f:
        f.seek(chain[-1] * SECTOR + 446 + 16)
        f.write(struct.pack("<B3sB3sII", 0, b"\0" * 3, 0x05, b"\0" * 3, 0, 2048))
    table = table_of(disk)
    assert [p.number for p in table.partitions] == [1, 2, 3, 5, 6, 7]
    assert any("loops back" in note for note in table.notes), table.notes


@needs_sfdisk
def test_partitions_past_the_end_are_dropped_or_clipped(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "cut.img", 64 * MiB, MBR_SCRIPT)
    _, expected = sfdisk_json(disk)
    p7_start = expected[7].start
    for size, dropped in ((p7_start, True), (p7_start + 3 * MiB + 512, False)):
        os.truncate(disk, size)
        table = table_of(disk)
        assert all(p.end <= size for p in table.partitions)
        numbers = [p.number for p in table.partitions]
        assert numbers == ([1, 2, 3, 5, 6] if dropped else [1, 2, 3, 5, 6, 7])
        by_number = {p.number: p for p in table.partitions}
        assert by_number[3].end == size  # the extended partition, clipped
        notes = " ".join(table.notes)
        if dropped:
            assert "7 start past the end" in notes and "3 end past the end" in notes
        else:
            assert by_number[7].size == 3 * MiB + 512
            assert "3, 7 end past the end" in notes


@needs_sfdisk
@needs_tool("mkfs.ext4")
@needs_tool("mkfs.vfat")
@pytest.mark.parametrize("kind", ["unformatted", "ext4", "vfat"])
def test_disks_without_a_table(tmp_path: Path, kind: str) -> None:
    disk = tmp_path / "plain.img"
    with open(disk, "wb") as f:
        f.truncate(16 * MiB)
    if kind == "ext4":
        run("mkfs.ext4", "-q", "-F", str(disk))
    elif kind == "vfat":
        run("mkfs.vfat", str(disk))
    table = table_of(disk)
    assert table.partitions == ()
    libfdisk = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True)
    if kind == "vfat":
        # mkfs.fat leaves the table area of its boot sector zero and ends it in 55AA:
        # libfdisk, like Linux, reads that as an empty MBR.
        assert table.scheme == "mbr"
        assert json.loads(libfdisk.stdout)["partitiontable"].get("partitions", []) == []
    else:
        assert table.scheme == "none"
        assert libfdisk.returncode != 0 and "does not contain a recognized" in libfdisk.stderr
    with linux_partitions(disk) as (_, devices):
        assert devices == {}


def test_tiny_disks() -> None:
    for size in (0, 1, 511, 512, 513, 1023):
        table = read_table(lambda offset, length: bytes(length), size)
        assert table.scheme == "none" and table.partitions == ()


# --- GPT ---------------------------------------------------------------------------------------

GPT_SCRIPT = """\
label: gpt
label-id: 01234567-89AB-CDEF-0123-456789ABCDEF
{disk}1 : start=2048, size=16384, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system", attrs="RequiredPartition LegacyBIOSBootable"
{disk}2 : start=18432, size=32768, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root fs", uuid=11111111-2222-3333-4444-555555555555, attrs="GUID:60,62"
{disk}5 : start=51200, size=8192, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name="swap é ü"
"""  # noqa: E501


def make_gpt(tmp_path: Path, name: str = "gpt.img") -> Path:
    disk = tmp_path / name
    return make_disk(disk, 64 * MiB, GPT_SCRIPT.format(disk=disk))


@needs_sfdisk
@needs_tool("mkfs.ext4")
def test_gpt_with_names(tmp_path: Path) -> None:
    disk = make_gpt(tmp_path)
    files = tmp_path / "files"
    files.mkdir()
    (files / "hello.txt").write_text("hello from the GPT root\n")
    mkfs_ext4(disk, 18432 * SECTOR, 32768 * SECTOR, files)
    table = table_of(disk)
    assert table.scheme == "gpt"
    assert table.disk_id == "01234567-89ab-cdef-0123-456789abcdef"
    assert [(p.number, p.name) for p in table.partitions] == [
        (1, "EFI system"),
        (2, "root fs"),
        (5, "swap é ü"),
    ]
    assert table.partitions[0].attributes == 0b101
    assert table.partitions[1].attributes == (1 << 60) | (1 << 62)
    assert table.notes == ()
    check_against_sfdisk(disk, table)
    check_against_linux(disk, table)
    root = table.partitions[1]
    image = extract(disk, root.start, root.size, tmp_path / "p2.img")
    assert run("debugfs", "-R", "cat /hello.txt", str(image)) == "hello from the GPT root\n"
    json.dumps(table.to_json())


GPT_HEADER_DISK_GUID = SECTOR + 56
GPT_PRIMARY_ENTRY_NAME = 2 * SECTOR + 128 + 56  # entry 2's name


@needs_sfdisk
@pytest.mark.parametrize("damage", ["header", "entry array"])
def test_damaged_primary_gpt_uses_the_backup(tmp_path: Path, damage: str) -> None:
    disk = make_gpt(tmp_path)
    good = table_of(disk)
    flip(disk, GPT_HEADER_DISK_GUID if damage == "header" else GPT_PRIMARY_ENTRY_NAME)
    table = table_of(disk)
    assert table.partitions == good.partitions and table.disk_id == good.disk_id
    assert table.scheme == "gpt"
    expected_reason = "header CRC32" if damage == "header" else "entry array CRC32"
    assert any(
        "primary GPT is unusable" in note and expected_reason in note and "backup" in note
        for note in table.notes
    ), table.notes
    # libfdisk says "The primary GPT table is corrupt, but the backup appears OK" and uses it.
    check_against_sfdisk(disk, table)
    check_against_linux(disk, table)


@needs_sfdisk
def test_damaged_backup_gpt_is_noted(tmp_path: Path) -> None:
    disk = make_gpt(tmp_path)
    good = table_of(disk)
    flip(disk, 64 * MiB - SECTOR + 56)
    table = table_of(disk)
    assert table.partitions == good.partitions
    assert any("backup GPT at LBA" in note and "unusable" in note for note in table.notes)


@needs_sfdisk
def test_both_gpts_damaged_means_no_partitions(tmp_path: Path) -> None:
    disk = make_gpt(tmp_path)
    flip(disk, GPT_HEADER_DISK_GUID)
    flip(disk, 64 * MiB - SECTOR + 56)
    table = table_of(disk)
    assert table.scheme == "none" and table.partitions == ()
    assert any("no usable GPT" in note for note in table.notes), table.notes
    with linux_partitions(disk) as (oracle, devices):
        assert devices == {}, oracle


@needs_sfdisk
def test_gpt_without_protective_mbr_is_ignored(tmp_path: Path) -> None:
    disk = make_gpt(tmp_path)
    with open(disk, "r+b") as f:
        f.write(bytes(SECTOR))
    table = table_of(disk)
    assert table.scheme == "none" and table.partitions == ()
    assert any("no MBR signature" in note for note in table.notes)


@needs_sfdisk
def test_hybrid_mbr_follows_the_gpt(tmp_path: Path) -> None:
    disk = make_gpt(tmp_path)
    good = table_of(disk)
    # A hybrid MBR: besides the 0xEE entry, a 0x83 entry over GPT partition 2, in slot 2.
    with open(disk, "r+b") as f:
        f.seek(446 + 16)
        f.write(struct.pack("<B3sB3sII", 0, b"\0" * 3, 0x83, b"\0" * 3, 18432, 32768))
    table = table_of(disk)
    assert table.scheme == "gpt" and table.partitions == good.partitions
    assert any("hybrid MBR" in note for note in table.notes)


def test_gpt_entries_crossing_or_past_the_end_and_overlapping() -> None:
    """Hand-made GPT (CRCs right) on a 1 MiB disk."""
    size = MiB
    entries = [
        (1, 40, 100, "a"),
        (2, 90, 120, "overlaps 1"),
        (3, 2000, 3000, "crosses the end"),
        (4, 5000, 6000, "past the end"),
        (6, 300, 200, "backwards"),
    ]
    image = bytearray(size)
    write_gpt(image, {index: (first, last, name) for index, first, last, name in entries})
    table = read_table(memory_reader(image), size)
    assert table.scheme == "gpt"
    assert [(p.number, p.start // SECTOR) for p in table.partitions] == [
        (1, 40),
        (2, 90),
        (3, 2000),
    ]
    assert table.partitions[2].end == size
    notes = " ".join(table.notes)
    for expected in ("4 start past the end", "3 end past the end", "1 and 2", "6 end before"):
        assert expected in notes, table.notes


# --- hand-made tables, for the fuzzer ------------------------------------------------------------


def memory_reader(
    image: bytes | bytearray, disk_size: int | None = None
) -> Callable[[int, int], bytes]:
    size = len(image) if disk_size is None else disk_size

    def read_at(offset: int, length: int) -> bytes:
        assert offset >= 0 and length >= 0 and offset + length <= size, (offset, length, size)
        return bytes(image[offset : offset + length])

    return read_at


def write_gpt(image: bytearray, entries: dict[int, tuple[int, int, str]], count: int = 128) -> None:
    """A protective MBR and both GPTs (entry index from 1: (first, last, name))."""
    sectors = len(image) // SECTOR
    array = bytearray(count * 128)
    for index, (first, last, name) in entries.items():
        struct.pack_into(
            "<16s16sQQQ72s",
            array,
            (index - 1) * 128,
            b"\x11" * 16,
            bytes([index]) * 16,
            first,
            last,
            0,
            name.encode("utf-16-le"),
        )
    array_sectors = len(array) // SECTOR
    struct.pack_into("<B3sB3sII", image, 446, 0, b"\0" * 3, 0xEE, b"\0" * 3, 1, sectors - 1)
    image[510:512] = b"\x55\xaa"
    for my_lba, other_lba, array_lba in (
        (1, sectors - 1, 2),
        (sectors - 1, 1, sectors - 1 - array_sectors),
    ):
        image[array_lba * SECTOR : array_lba * SECTOR + len(array)] = array
        header = bytearray(
            c_partitions.GPT_HEADER.pack(
                b"EFI PART",
                0x10000,
                92,
                0,
                0,
                my_lba,
                other_lba,
                34,
                sectors - 34,
                b"\x22" * 16,
                array_lba,
                count,
                128,
                zlib.crc32(array),
            )
        )
        struct.pack_into("<I", header, 16, zlib.crc32(header))
        image[my_lba * SECTOR : my_lba * SECTOR + 92] = header


def fix_gpt_crcs(image: bytearray, lba: int) -> None:
    """Recompute the CRCs of the GPT header at ``lba`` (as far as its fields allow)."""
    start = lba * SECTOR
    if start + SECTOR > len(image):
        return
    header = c_partitions.GPT_HEADER.unpack_from(image, start)
    header_size, array_lba, count, entry_size = header[2], header[10], header[11], header[12]
    array_size = count * entry_size
    if array_size <= 2 * MiB and array_lba * SECTOR + array_size <= len(image):
        array = image[array_lba * SECTOR : array_lba * SECTOR + array_size]
        struct.pack_into("<I", image, start + 88, zlib.crc32(array))
    if 92 <= header_size <= SECTOR:
        struct.pack_into("<I", image, start + 16, 0)
        crc = zlib.crc32(image[start : start + header_size])
        struct.pack_into("<I", image, start + 16, crc)


FUZZ_DISK = 2 * MiB


@functools.cache
def fuzz_seeds() -> dict[str, bytes]:
    """Small disks: an MBR with logical partitions by sfdisk, a GPT by sfdisk, a hand-made GPT."""
    seeds = {}
    hand = bytearray(FUZZ_DISK)
    write_gpt(hand, {1: (34, 99, "one"), 2: (100, 1999, "two"), 9: (2000, 4000, "nine")}, 16)
    seeds["hand-gpt"] = bytes(hand)
    if shutil.which("sfdisk"):
        with tempfile.TemporaryDirectory() as tmp:
            disk = Path(tmp) / "d.img"
            make_disk(disk, FUZZ_DISK, "label: dos\n,100\n,100,c,*\n,,5\n,200\n,200,82\n,200\n")
            seeds["sfdisk-mbr"] = disk.read_bytes()
            disk.unlink()
            make_disk(
                disk,
                FUZZ_DISK,
                f"label: gpt\n{disk}1 : start=34, size=100, name=a\n"
                f"{disk}3 : start=200, size=1000, name=b\n",
            )
            seeds["sfdisk-gpt"] = disk.read_bytes()
    return seeds


def interesting_offsets(image: bytes) -> list[int]:
    """Bytes worth damaging: MBR entries, EBRs, GPT headers and the first GPT entries."""
    sectors = len(image) // SECTOR
    offsets = list(range(440, 512))
    offsets += list(range(SECTOR, SECTOR + 92)) + list(range(2 * SECTOR, 2 * SECTOR + 4 * 128))
    offsets += list(range((sectors - 1) * SECTOR, (sectors - 1) * SECTOR + 92))
    for lba in range(sectors):
        if image[lba * SECTOR + 510 : lba * SECTOR + 512] == b"\x55\xaa" and lba:
            offsets += list(range(lba * SECTOR + 446, lba * SECTOR + 512))
    return offsets


U32_EDGES = [0, 1, 2, 33, 34, 0x7F, 0x80, 0xFF, 0x1000, 0x7FFF_FFFF, 0xFFFF_FFFE, 0xFFFF_FFFF]


@st.composite
def damaged_disks(draw: st.DrawFn) -> tuple[bytearray, int]:
    seeds = fuzz_seeds()
    image = bytearray(seeds[draw(st.sampled_from(sorted(seeds)))])
    offsets = interesting_offsets(bytes(image))
    for _ in range(draw(st.integers(1, 6))):
        how = draw(st.sampled_from(["byte", "u32", "u64", "ebr-link"]))
        offset = draw(st.sampled_from(offsets))
        if how == "byte":
            image[offset] = draw(st.integers(0, 255))
        elif how == "u32":
            struct.pack_into("<I", image, offset - offset % 4, draw(st.sampled_from(U32_EDGES)))
        elif how == "u64":
            value = draw(st.sampled_from([0, 1, 2**32, 2**63, 2**64 - 1, len(image) // SECTOR]))
            struct.pack_into("<Q", image, offset - offset % 8, value)
        else:  # an extended link to anywhere, loops included
            lba = draw(st.integers(0, len(image) // SECTOR - 1))
            target = draw(st.sampled_from([0, 1, lba, 0xFFFF_FFFF]))
            struct.pack_into(
                "<B3sB3sII",
                image,
                lba * SECTOR + 446 + 16,
                0,
                b"\0" * 3,
                0x05,
                b"\0" * 3,
                target,
                draw(st.sampled_from([1, 100, 0xFFFF_FFFF])),
            )
            image[lba * SECTOR + 510 : lba * SECTOR + 512] = b"\x55\xaa"
    if draw(st.booleans()):
        # Keep the GPTs' CRCs right so that the checks behind them are reached.
        fix_gpt_crcs(image, 1)
        fix_gpt_crcs(image, len(image) // SECTOR - 1)
    disk_size = draw(
        st.sampled_from([len(image), len(image) - SECTOR, len(image) // 2, 4096, 1000])
    )
    return image, disk_size


@settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=FUZZ_DERANDOMIZE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(disk=damaged_disks())
def test_damaged_tables_never_raise(disk: tuple[bytearray, int]) -> None:
    image, disk_size = disk
    reads: list[tuple[int, int]] = []
    inner = memory_reader(image, disk_size)

    def read_at(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return inner(offset, length)

    started = time.monotonic()
    table = read_table(read_at, disk_size)
    assert time.monotonic() - started < 2
    assert table.scheme in ("mbr", "gpt", "none")
    assert len(reads) <= MAX_EBRS + 8
    assert sum(length for _, length in reads) <= 3 * c_partitions.MAX_GPT_ENTRY_ARRAY
    numbers = [p.number for p in table.partitions]
    assert numbers == sorted(set(numbers))
    for p in table.partitions:
        assert 0 <= p.start < p.end <= disk_size and p.size > 0
        assert p.number >= 1
    if table.scheme == "none":
        assert table.partitions == () and table.disk_id is None
    json.dumps(table.to_json())


def test_long_ebr_chain_is_bounded() -> None:
    """A chain of 1000 EBRs, each with a data partition: numbers stop at 255."""
    sectors = 4096
    image = bytearray(sectors * SECTOR)
    struct.pack_into("<B3sB3sII", image, 446, 0, b"\0" * 3, 0x05, b"\0" * 3, 2, sectors - 2)
    image[510:512] = b"\x55\xaa"
    for i in range(1000):
        ebr = 2 + 2 * i
        if ebr + 2 >= sectors:
            break
        base = ebr * SECTOR
        struct.pack_into("<B3sB3sII", image, base + 446, 0, b"\0" * 3, 0x83, b"\0" * 3, 1, 1)
        struct.pack_into(
            "<B3sB3sII", image, base + 462, 0, b"\0" * 3, 0x05, b"\0" * 3, 2 * i + 2, 2
        )
        image[base + 510 : base + 512] = b"\x55\xaa"
    table = read_table(memory_reader(image), len(image))
    logical = [p.number for p in table.partitions if p.number >= 5]
    assert logical == list(range(5, 256))
    assert any("more than 255 partitions" in note for note in table.notes), table.notes


def test_random_sectors_never_raise() -> None:
    rng = random.Random(7)
    for _ in range(200):
        image = bytearray(rng.randbytes(64 * SECTOR))
        image[510:512] = b"\x55\xaa"
        for slot in range(4):
            image[446 + 16 * slot] = rng.choice([0, 0x80])
            image[446 + 16 * slot + 4] = rng.choice([0x05, 0x0F, 0x85, 0xEE, 0x83, 0])
        table = read_table(memory_reader(image), len(image))
        assert all(p.end <= len(image) for p in table.partitions)
