"""find_volume_groups against volume groups made by LVM2's own tools, and against hostile bytes.

LVM runs on loop devices of sparse files, confined by its own configuration
(``LVM_SYSTEM_DIR`` in the test's directory: only the test's loop devices
pass the filter, no devices file, no backups or archives in /etc/lvm, lock
files in the test's directory).  The kernel may have no device-mapper, so
volumes are never activated (``--driverloaded n``): where each volume's
bytes lie is taken from LVM's reports (``lvs --segments`` PE ranges,
``pvs`` pe_start, ``vgs`` extent size), striped ones dealt out as dm-stripe
does, data is written there, and read back through the extents that
find_volume_groups gives.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import shutil
import string
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FUZZ_DERANDOMIZE, FUZZ_EXAMPLES, needs_tool, require_loop_device
from tests.formats.test_partitions import make_disk, run, sfdisk_json
from vdifs.formats import c_lvm
from vdifs.formats.lvm import (
    MAX_EXTENTS,
    MAX_METADATA_READ,
    LogicalVolume,
    VolumeGroup,
    find_volume_groups,
    read_volume,
    scan,
)
from vdifs.formats.partitions import read_table

MiB = 1024 * 1024
SECTOR = 512
needs_lvm = needs_tool("lvcreate")

LVM_CONF = """\
devices {{
    filter = [ {accept} "r|.*|" ]
    use_devicesfile = 0
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
    hints = "none"
    scan_lvs = 0
}}
backup {{
    backup = 0
    archive = 0
}}
global {{
    locking_dir = "{lock}"
}}
activation {{
    udev_sync = 0
    udev_rules = 0
    monitoring = 0
}}
"""
NO_DM = ("--driverloaded", "n")
"""Activation off: LVM then never asks for device-mapper, which this kernel may not have."""


# --- LVM, confined ------------------------------------------------------------------------------


class Lvm:
    """LVM2 commands that see only the given devices and leave nothing on the host."""

    def __init__(self, workdir: Path, devices: Sequence[str]) -> None:
        workdir.mkdir(exist_ok=True)
        (workdir / "lock").mkdir(exist_ok=True)
        accept = "".join(f'"a|^{re.escape(device)}$|", ' for device in devices)
        (workdir / "lvm.conf").write_text(LVM_CONF.format(accept=accept, lock=workdir / "lock"))
        self.env = {
            **os.environ,
            "LVM_SYSTEM_DIR": str(workdir),
            "LVM_SUPPRESS_FD_WARNINGS": "1",
        }

    def __call__(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            ["lvm", *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"lvm {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return result.stdout

    def lvcreate(
        self, vg: str, name: str, size: str, *pvs: str, options: Sequence[str] = ()
    ) -> None:
        """A volume, allocated on ``pvs`` (``/dev/loopN[:first-last]``) if given."""
        self("lvcreate", *NO_DM, "-an", "-Zn", "-Wn", "-L", size, "-n", name, *options, vg, *pvs)

    def report(self, command: str, fields: Sequence[str], *args: str) -> list[dict[str, str]]:
        as_json = ("--reportformat", "json", "--units", "b", "--nosuffix")
        out = self(command, *as_json, "-o", ",".join(fields), *args)
        (rows,) = json.loads(out)["report"][0].values()
        return list(rows)

    def deactivate(self, vg: str) -> None:
        self("vgchange", *NO_DM, "-an", vg, check=False)


@contextlib.contextmanager
def loop_devices() -> Iterator[Callable[..., str]]:
    """``attach(path, offset=0, size=None)`` -> a loop device, all detached at the end."""
    require_loop_device()
    attached: list[str] = []

    def attach(path: Path, offset: int = 0, size: int | None = None) -> str:
        cmd = ["losetup", "--find", "--show", "--offset", str(offset)]
        if size is not None:
            cmd += ["--sizelimit", str(size)]
        device = run(*cmd, str(path)).strip()
        attached.append(device)
        return device

    try:
        yield attach
    finally:
        for device in reversed(attached):
            run("losetup", "--detach", device, check=False)


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# --- what LVM says ------------------------------------------------------------------------------

Piece = tuple[int, int, int]
"""(volume offset, length, disk offset), bytes."""


class LvmLayout(NamedTuple):
    name: str
    uuid: str
    seqno: int
    extent_size: int
    volumes: dict[str, list[Piece]]
    segments: dict[str, int]


def merged(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for piece in sorted(pieces):
        if out and out[-1][0] + out[-1][1] == piece[0] and out[-1][2] + out[-1][1] == piece[2]:
            out[-1] = (out[-1][0], out[-1][1] + piece[1], out[-1][2])
        else:
            out.append(piece)
    return out


def lvm_layout(lvm: Lvm, vg: str, device_offsets: dict[str, int]) -> LvmLayout:
    """Where LVM says every visible volume of ``vg`` lies on the disk."""
    (group,) = lvm.report("vgs", ["vg_name", "vg_uuid", "vg_seqno", "vg_extent_size"], vg)
    extent = int(group["vg_extent_size"])
    pe_start = {
        pv["pv_name"]: int(pv["pe_start"])
        for pv in lvm.report("pvs", ["pv_name", "pe_start", "vg_name"])
        if pv["vg_name"] == vg
    }
    fields = ["lv_name", "segtype", "seg_start_pe", "seg_size_pe", "stripe_size", "seg_pe_ranges"]
    volumes: dict[str, list[Piece]] = {}
    segments: dict[str, int] = {}
    for seg in lvm.report("lvs", fields, "--segments", vg):
        assert seg["segtype"] in ("linear", "striped"), seg
        bases = []
        for pe_range in seg["seg_pe_ranges"].split():
            device, first_last = pe_range.rsplit(":", 1)
            first = int(first_last.split("-")[0])
            bases.append(device_offsets[device] + pe_start[device] + first * extent)
        lv_start = int(seg["seg_start_pe"]) * extent
        size = int(seg["seg_size_pe"]) * extent
        if len(bases) == 1:
            pieces = [(lv_start, size, bases[0])]
        else:
            # dm-stripe: chunk k of the segment is chunk k // n of stripe k % n.
            chunk = int(seg["stripe_size"])
            pieces = [
                (lv_start + k * chunk, chunk, bases[k % len(bases)] + k // len(bases) * chunk)
                for k in range(size // chunk)
            ]
        volumes.setdefault(seg["lv_name"], []).extend(pieces)
        segments[seg["lv_name"]] = segments.get(seg["lv_name"], 0) + 1
    return LvmLayout(
        group["vg_name"],
        group["vg_uuid"],
        int(group["vg_seqno"]),
        extent,
        {name: merged(pieces) for name, pieces in volumes.items()},
        segments,
    )


# --- what find_volume_groups says ------------------------------------------------------------


def file_reader(path: Path) -> Callable[[int, int], bytes]:
    size = path.stat().st_size

    def read_at(offset: int, length: int) -> bytes:
        assert offset >= 0 and length >= 0 and offset + length <= size, (offset, length, size)
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return read_at


def pieces_of(volume: LogicalVolume) -> list[Piece]:
    return [(e.lv_offset, e.length, e.device_offset) for e in volume.extents]


def check_group(group: VolumeGroup, expected: LvmLayout) -> None:
    assert (group.name, group.uuid, group.seqno) == (expected.name, expected.uuid, expected.seqno)
    assert group.extent_size == expected.extent_size
    assert {v.name: pieces_of(v) for v in group.volumes} == expected.volumes
    for volume in group.volumes:
        assert volume.size == sum(length for _, length, _ in expected.volumes[volume.name])
    assert f"{group.name} {{" in group.metadata_text and group.uuid in group.metadata_text


def check_data(disk: Path, group: VolumeGroup, expected: LvmLayout, seed: str) -> None:
    """Data written where LVM says each volume is reads back through our extents."""
    rng = random.Random(seed)
    contents = {}
    with open(disk, "r+b") as f:
        for name, pieces in expected.volumes.items():
            data = rng.randbytes(sum(length for _, length, _ in pieces))
            contents[name] = data
            for lv_offset, length, disk_offset in pieces:
                f.seek(disk_offset)
                f.write(data[lv_offset : lv_offset + length])
    read_at = file_reader(disk)
    for volume in group.volumes:
        assert read_volume(read_at, volume, 0, volume.size) == contents[volume.name], volume.name
        middle = volume.size // 2 - 1000
        piece = read_volume(read_at, volume, middle, 300_000)
        assert piece == contents[volume.name][middle : middle + 300_000]


# --- volume groups made by LVM -------------------------------------------------------------------


@needs_lvm
def test_linear_volumes_with_several_segments(tmp_path: Path) -> None:
    disk = sparse(tmp_path / "disk.img", 64 * MiB)
    with loop_devices() as attach:
        device = attach(disk)
        lvm = Lvm(tmp_path / "lvm", [device])
        try:
            lvm("pvcreate", device)
            lvm("vgcreate", "-s", "1M", "vgtest", device)
            lvm.lvcreate("vgtest", "root", "8M")
            lvm.lvcreate("vgtest", "a", "4M")
            lvm.lvcreate("vgtest", "b", "6M")
            lvm("lvremove", *NO_DM, "-y", "vgtest/a")
            # c fills the hole a left and goes on further: two segments.
            lvm.lvcreate("vgtest", "c", "10M", f"{device}:8-11", f"{device}:30-35")
            lvm("lvextend", *NO_DM, "-L", "+3M", "vgtest/root")
            expected = lvm_layout(lvm, "vgtest", {device: 0})
        finally:
            lvm.deactivate("vgtest")
    assert expected.segments == {"root": 2, "b": 1, "c": 2}
    groups = find_volume_groups([(0, disk.stat().st_size)], file_reader(disk))
    assert len(groups) == 1
    (group,) = groups
    check_group(group, expected)
    assert [v.name for v in group.volumes] == ["root", "b", "c"]
    assert group.notes == ()
    check_data(disk, group, expected, "linear")


@needs_lvm
@needs_tool("sfdisk")
def test_striped_and_spanning_volumes_on_two_partitions(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    make_disk(disk, 100 * MiB, "label: gpt\n,40MiB\n,40MiB\n,\n")
    _, listed = sfdisk_json(disk)
    with loop_devices() as attach:
        devices = [attach(disk, listed[n].start, listed[n].size) for n in (1, 2)]
        offsets = {device: listed[n].start for device, n in zip(devices, (1, 2), strict=True)}
        lvm = Lvm(tmp_path / "lvm", devices)
        try:
            lvm("pvcreate", *devices)
            lvm("vgcreate", "-s", "1M", "vgs", *devices)
            lvm.lvcreate("vgs", "st", "8M", options=["-i2", "-I64k"])
            lvm.lvcreate("vgs", "lin", "4M", devices[1])
            lvm.lvcreate("vgs", "st2", "6M", options=["-i2", "-I128k"])
            lvm.lvcreate("vgs", "span", "50M")  # more than one PV holds: on both
            expected = lvm_layout(lvm, "vgs", offsets)
        finally:
            lvm.deactivate("vgs")
    assert expected.segments["span"] == 2
    table = read_table(file_reader(disk), disk.stat().st_size)
    ranges = [(0, disk.stat().st_size)] + [(p.start, p.size) for p in table.partitions]
    result = scan(ranges, file_reader(disk))
    assert result.notes == ()
    (group,) = result.volume_groups
    check_group(group, expected)
    assert len(next(v for v in group.volumes if v.name == "st").extents) == 8 * MiB // (64 * 1024)
    check_data(disk, group, expected, "striped")


MDA_OFFSET = 4096
"""Where pvcreate puts the first metadata area (after the label sectors)."""


def committed_text_location(disk: Path, pv_offset: int = 0) -> tuple[int, int, int]:
    """(text offset, text size, area size) of the committed metadata, read by hand."""
    with open(disk, "rb") as f:
        f.seek(pv_offset + MDA_OFFSET)
        header = f.read(SECTOR)
    assert header[4:20] == b" LVM2 x[5A%r0N*>"
    area_size = struct.unpack_from("<Q", header, 32)[0]
    offset, size = struct.unpack_from("<QQ", header, 40)
    return offset, size, area_size


@needs_lvm
def test_metadata_wrapping_round_the_circular_buffer(tmp_path: Path) -> None:
    disk = sparse(tmp_path / "disk.img", 48 * MiB)
    tags = [f"tag{i}_" + "x" * 1000 for i in range(6)]
    with loop_devices() as attach:
        device = attach(disk)
        lvm = Lvm(tmp_path / "lvm", [device])
        try:
            # The smallest metadata area LVM accepts, and a big text: a few commits wrap.
            lvm("pvcreate", "--metadatasize", "32k", "--dataalignment", "64k", device)
            lvm("vgcreate", "-s", "1M", "vgwrap", device)
            lvm("vgchange", *NO_DM, *(a for tag in tags for a in ("--addtag", tag)), "vgwrap")
            for i in range(40):
                lvm.lvcreate("vgwrap", f"lv{i}", "1M")
                offset, size, area_size = committed_text_location(disk)
                if offset + size > area_size:
                    break
            else:
                pytest.fail("LVM's metadata never wrapped")
            expected = lvm_layout(lvm, "vgwrap", {device: 0})
        finally:
            lvm.deactivate("vgwrap")
    (group,) = find_volume_groups([(0, disk.stat().st_size)], file_reader(disk))
    check_group(group, expected)
    assert all(tag in group.metadata_text for tag in tags)
    check_data(disk, group, expected, "wrap")


@needs_lvm
@needs_tool("sfdisk")
def test_volume_groups_of_one_name(tmp_path: Path) -> None:
    """Two VGs called vgdup on two disks, and two on the partitions of one disk.

    The host's LVM would refuse to see both at once: each is made with only its
    own device attached.
    """
    expected: dict[str, LvmLayout] = {}
    disks = [sparse(tmp_path / f"disk{i}.img", 32 * MiB) for i in (1, 2)]
    shared = tmp_path / "shared.img"
    make_disk(shared, 64 * MiB, "label: dos\n,30MiB\n,30MiB\n")
    _, listed = sfdisk_json(shared)
    places: list[tuple[Path, int, int | None]] = [(disks[0], 0, None), (disks[1], 0, None)]
    places += [(shared, listed[n].start, listed[n].size) for n in (1, 2)]
    for i, (path, offset, size) in enumerate(places):
        with loop_devices() as attach:
            device = attach(path, offset, size)
            lvm = Lvm(tmp_path / f"lvm{i}", [device])
            try:
                lvm("pvcreate", device)
                lvm("vgcreate", "-s", "1M", "vgdup", device)
                lvm.lvcreate("vgdup", f"only{i}", f"{i + 2}M")
                layout = lvm_layout(lvm, "vgdup", {device: offset})
            finally:
                lvm.deactivate("vgdup")
        expected[layout.uuid] = layout
    assert len(expected) == 4

    for path in disks:
        (group,) = find_volume_groups([(0, path.stat().st_size)], file_reader(path))
        check_group(group, expected[group.uuid])
        assert group.notes == ()
    table = read_table(file_reader(shared), shared.stat().st_size)
    groups = find_volume_groups(
        [(0, shared.stat().st_size)] + [(p.start, p.size) for p in table.partitions],
        file_reader(shared),
    )
    assert [g.name for g in groups] == ["vgdup", "vgdup"] and groups[0].uuid != groups[1].uuid
    for group in groups:
        check_group(group, expected[group.uuid])
        (note,) = group.notes
        assert "other volume group(s) named 'vgdup'" in note


def lvm_uuid(rng: random.Random) -> str:
    chars = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(32))
    return "-".join(chars[a:b] for a, b in pairwise((0, 6, 10, 14, 18, 22, 26, 32)))


def lv_text(rng: random.Random, name: str, visible: bool, segment: list[str]) -> str:
    status = '"READ", "WRITE", "VISIBLE"' if visible else '"READ", "WRITE"'
    body = "".join(f"\t\t\t\t{line}\n" for line in segment)
    return (
        f'\t\t{name} {{\n\t\t\tid = "{lvm_uuid(rng)}"\n\t\t\tstatus = [{status}]\n'
        f"\t\t\tflags = []\n\t\t\tsegment_count = 1\n"
        f"\t\t\tsegment1 {{\n{body}\t\t\t}}\n\t\t}}\n"
    )


def linear(count: int, pe: int) -> list[str]:
    return [
        "start_extent = 0",
        f"extent_count = {count}",
        'type = "striped"',
        "stripe_count = 1",
        f'stripes = ["pv0", {pe}]',
    ]


SNAPSHOT_SEGMENT = [
    *("start_extent = 0", "extent_count = 4", 'type = "snapshot"', "chunk_size = 8"),
    *('origin = "orig"', 'cow_store = "snap"'),
]
RAID1_SEGMENT = [
    *("start_extent = 0", "extent_count = 4", 'type = "raid1"', "device_count = 2"),
    "region_size = 1024",
    'raids = ["r1_rmeta_0", "r1_rimage_0", "r1_rmeta_1", "r1_rimage_1"]',
]
THIN_POOL_SEGMENT = [
    *("start_extent = 0", "extent_count = 4", 'type = "thin-pool"', 'metadata = "pool_tmeta"'),
    *('pool = "pool_tdata"', "transaction_id = 1", "chunk_size = 128", 'discards = "passdown"'),
    "zero_new_blocks = 1",
]
THIN_SEGMENT = [
    *("start_extent = 0", "extent_count = 16", 'type = "thin"', 'thin_pool = "pool"'),
    *("transaction_id = 0", "device_id = 1"),
]


@needs_lvm
def test_volumes_lvm_maps_with_device_mapper_targets_are_listed_not_mapped(
    tmp_path: Path,
) -> None:
    """Snapshot, raid1 and thin volumes, written by vgcfgrestore (LVM cannot create them
    without device-mapper) and accepted by LVM's own lvs."""
    rng = random.Random(3)
    disk = sparse(tmp_path / "disk.img", 64 * MiB)
    added = "".join(
        lv_text(rng, name, visible, segment)
        for name, visible, segment in [
            ("snap", False, linear(4, 8)),  # the store: hidden (lvs names the snapshot after it)
            ("snapshot0", False, SNAPSHOT_SEGMENT),
            ("r1", True, RAID1_SEGMENT),
            ("r1_rmeta_0", False, linear(1, 12)),
            ("r1_rimage_0", False, linear(4, 13)),
            ("r1_rmeta_1", False, linear(1, 17)),
            ("r1_rimage_1", False, linear(4, 18)),
            ("pool", True, THIN_POOL_SEGMENT),
            ("thin", True, THIN_SEGMENT),
            ("pool_tmeta", False, linear(1, 22)),
            ("pool_tdata", False, linear(4, 23)),
            ("lvol0_pmspare", False, linear(1, 27)),
        ]
    )
    with loop_devices() as attach:
        device = attach(disk)
        lvm = Lvm(tmp_path / "lvm", [device])
        try:
            lvm("pvcreate", device)
            lvm("vgcreate", "-s", "1M", "vgx", device)
            lvm.lvcreate("vgx", "orig", "4M")
            lvm.lvcreate("vgx", "plain", "4M")
            backup = tmp_path / "vgx.txt"
            lvm("vgcfgbackup", "-f", str(backup), "vgx")
            text = backup.read_text()
            end = text.rindex("\t}\n\n}")  # the end of logical_volumes
            backup.write_text(text[:end] + added + text[end:])
            lvm("vgcfgrestore", "--force", "-f", str(backup), "vgx")
            shown = {row["lv_name"] for row in lvm.report("lvs", ["lv_name"], "vgx")}
            assert shown == {"orig", "plain", "snap", "r1", "pool", "thin"}
            expected = lvm_layout_of(lvm, "vgx", device, ["orig", "plain"])
        finally:
            lvm.deactivate("vgx")
    (group,) = find_volume_groups([(0, disk.stat().st_size)], file_reader(disk))
    assert [v.name for v in group.volumes] == ["orig", "plain"]
    assert {v.name: pieces_of(v) for v in group.volumes} == expected
    notes = "\n".join(group.notes)
    assert "snap: a snapshot of orig (copy-on-write): not mapped" in notes
    assert "r1: segment type 'raid1' is not mapped" in notes
    assert "pool: segment type 'thin-pool' is not mapped" in notes
    assert "thin: segment type 'thin' is not mapped" in notes
    assert "hidden sub-volumes not shown: r1_rmeta_0" in notes


def lvm_layout_of(lvm: Lvm, vg: str, device: str, names: list[str]) -> dict[str, list[Piece]]:
    """The linear volumes among others LVM cannot report segments of without device-mapper."""
    extent = int(lvm.report("vgs", ["vg_extent_size"], vg)[0]["vg_extent_size"])
    (pv,) = lvm.report("pvs", ["pe_start"], device)
    out: dict[str, list[Piece]] = {}
    for name in names:
        (seg,) = lvm.report("lvs", ["seg_pe_ranges", "seg_size_pe"], "--segments", f"{vg}/{name}")
        first = int(seg["seg_pe_ranges"].rsplit(":", 1)[1].split("-")[0])
        start = int(pv["pe_start"]) + first * extent
        out[name] = [(0, int(seg["seg_size_pe"]) * extent, start)]
    return out


@needs_lvm
def test_second_metadata_area_when_the_first_is_damaged(tmp_path: Path) -> None:
    disk = sparse(tmp_path / "disk.img", 64 * MiB)
    with loop_devices() as attach:
        device = attach(disk)
        lvm = Lvm(tmp_path / "lvm", [device])
        try:
            lvm("pvcreate", "--pvmetadatacopies", "2", device)
            lvm("vgcreate", "-s", "1M", "vg2", device)
            lvm.lvcreate("vg2", "data", "12M")
            expected = lvm_layout(lvm, "vg2", {device: 0})
        finally:
            lvm.deactivate("vg2")
    read_at = file_reader(disk)
    (group,) = find_volume_groups([(0, disk.stat().st_size)], read_at)
    check_group(group, expected)
    with open(disk, "r+b") as f:
        f.seek(MDA_OFFSET + 8)
        f.write(b"\xff")
    result = scan([(0, disk.stat().st_size)], read_at)
    (group,) = result.volume_groups
    check_group(group, expected)
    assert any(f"metadata area at {MDA_OFFSET}: header checksum" in n for n in result.notes)


# --- hand-made PVs: limits and the fuzzer -----------------------------------------------------


def synthetic_pv(text: str, size: int = 8 * MiB, mda_size: int = 64 * 1024) -> bytearray:
    """A PV as pvcreate lays it out (label in sector 1, one metadata area at 4096) holding
    ``text``; for limits LVM's tools will not produce and as a fuzzing seed."""
    image = bytearray(size)
    label = bytearray(SECTOR)
    c_lvm.LABEL_HEADER.pack_into(label, 0, b"LABELONE", 1, 0, 32, b"LVM2 001")
    c_lvm.PV_HEADER.pack_into(label, 32, b"A" * 32, size)
    struct.pack_into("<4Q", label, 72, MiB, 0, 0, 0)
    struct.pack_into("<4Q", label, 104, MDA_OFFSET, mda_size, 0, 0)
    struct.pack_into("<I", label, 16, c_lvm.calc_crc(label[20:]))
    image[SECTOR : 2 * SECTOR] = label
    set_metadata(image, text.encode(), mda_size=mda_size)
    return image


def set_metadata(
    image: bytearray, text: bytes, offset: int = SECTOR, mda_size: int | None = None
) -> None:
    """Write ``text`` (and its NUL) into the metadata area at 4096, wrapping if it must,
    with every checksum right."""
    header = bytearray(SECTOR)
    if mda_size is None:
        mda_size = struct.unpack_from("<Q", image, MDA_OFFSET + 32)[0]
    data = text + b"\0"
    first = data[: mda_size - offset]
    image[MDA_OFFSET + offset : MDA_OFFSET + offset + len(first)] = first
    rest = data[len(first) :]
    image[MDA_OFFSET + SECTOR : MDA_OFFSET + SECTOR + len(rest)] = rest
    c_lvm.MDA_HEADER.pack_into(header, 0, 0, c_lvm.FMTT_MAGIC, 1, MDA_OFFSET, mda_size)
    c_lvm.RAW_LOCN.pack_into(header, 40, offset, len(data), c_lvm.calc_crc(data), 0)
    struct.pack_into("<I", header, 0, c_lvm.calc_crc(header[4:]))
    image[MDA_OFFSET : MDA_OFFSET + SECTOR] = header


def vg_text(lvs: str, extent_size: int = 2048, pe_count: int = 7) -> str:
    return f"""\
vg0 {{
id = "VGVGVG-aaaa-bbbb-cccc-dddd-eeee-ffffff"
seqno = 3
format = "lvm2" # a comment, and "a string" with \\" in it = {{ [
status = ["RESIZEABLE", "READ", "WRITE"]
extent_size = {extent_size}
physical_volumes {{
pv0 {{
id = "AAAAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAAAA"
device = "/dev/vda"
dev_size = 16384
pe_start = 2048
pe_count = {pe_count}
}}
}}
logical_volumes {{
{lvs}
}}
}}
contents = "Text Format Volume Group"
version = 1
description = "with an escaped \\"quote\\" and a \\\\ backslash"
"""


def lv(name: str, segments: str) -> str:
    return f'{name} {{\nid = "x"\nstatus = ["READ", "WRITE", "VISIBLE"]\n{segments}\n}}\n'


def segment(n: int, start: int, count: int, stripes: str, stripe_size: int = 0) -> str:
    stripe_count = stripes.count(",") // 2 + 1
    size = f"stripe_size = {stripe_size}\n" if stripe_size else ""
    return (
        f"segment{n} {{\nstart_extent = {start}\nextent_count = {count}\n"
        f'type = "striped"\nstripe_count = {stripe_count}\n{size}stripes = [{stripes}]\n}}\n'
    )


def test_synthetic_pv_wrapped_text_and_two_segments() -> None:
    text = vg_text(
        lv("a", segment(1, 0, 2, '"pv0", 4') + segment(2, 2, 1, '"pv0", 0'))
        + lv("b", segment(1, 0, 2, '"pv0", 1'))
    )
    image = synthetic_pv(text, mda_size=4096)
    # Put the text 200 bytes before the end of the area: it wraps back to offset 512.
    set_metadata(image, text.encode(), offset=4096 - 200)
    result = scan([(0, len(image))], memory_reader(image))
    assert result.notes == ()
    (group,) = result.volume_groups
    assert group.metadata_text == text and group.extent_size == MiB and group.seqno == 3
    a, b = group.volumes
    base = 2048 * SECTOR
    assert pieces_of(a) == [(0, 2 * MiB, base + 4 * MiB), (2 * MiB, MiB, base)]
    assert pieces_of(b) == [(0, 2 * MiB, base + MiB)]
    assert list(a.runs(MiB + 10, 2 * MiB)) == [
        (base + 5 * MiB + 10, MiB - 10),
        (base, MiB),
    ]


def test_refusals_are_noted() -> None:
    text = vg_text(
        lv("past_pe_count", segment(1, 0, 10, '"pv0", 0'))
        + lv("gap", segment(1, 0, 1, '"pv0", 0') + segment(2, 2, 1, '"pv0", 1'))
        + lv("missing_pv", segment(1, 0, 1, '"pv9", 0'))
        + lv("odd_stripes", segment(1, 0, 3, '"pv0", 0, "pv0", 3', 128))
        + lv("outside_device", segment(1, 0, 3, '"pv0", 6'))
        + lv("fine", segment(1, 0, 2, '"pv0", 2')),
        pe_count=9,  # one more extent than the 8 MiB device holds after pe_start
    )
    image = synthetic_pv(text, size=8 * MiB)
    (group,) = scan([(0, len(image))], memory_reader(image)).volume_groups
    assert [v.name for v in group.volumes] == ["fine"]
    notes = "\n".join(group.notes)
    assert "PV pv0: 9 extents from sector 2048 do not fit its device" in notes
    assert "past_pe_count: extents 0+10 past the 9 of pv0" in notes
    assert "gap: segments leave a gap or overlap at extent 1" in notes
    assert "missing_pv: on pv9, which is not a PV found on this disk" in notes
    assert "odd_stripes: a segment of 3 extents" in notes
    assert "outside_device: extents 6+3 of pv0 lie past the end of its device" in notes


def test_striped_chunk_limit() -> None:
    text = vg_text(
        lv("many", segment(1, 0, 4, '"pv0", 0, "pv0", 2', 1)), extent_size=MAX_EXTENTS // 2
    )
    image = synthetic_pv(text, size=8 * MiB)
    # 4 extents of 256 MiB on an 8 MiB device do not fit; say the device is large.
    result = scan([(0, 4 * 1024 * MiB)], sparse_reader(image, 4 * 1024 * MiB))
    (group,) = result.volume_groups
    assert group.volumes == ()
    assert any("stripe chunks: more than the limit" in n for n in group.notes), group.notes


def test_parser_limits() -> None:
    deep = "a {\n" * 40 + "}\n" * 40
    for text, expected in (
        (vg_text("") + deep, "nested deeper"),
        ("vg0 {\nid = 99999999999999999999999999999999999999999999\n}\n", "is not a value"),
        ('vg0 {\nid = "unterminated\n}\n', "unexpected"),
        ("vg0 {\nseqno = [1, 2\n", "unterminated list"),
        ("just = 1\n", "without a volume group"),
        ('vg0 {\n}\ncontents = "Something else"\n', "another kind"),
    ):
        image = synthetic_pv(text)
        result = scan([(0, len(image))], memory_reader(image))
        assert result.volume_groups == ()
        assert any(expected in note for note in result.notes), (expected, result.notes)


def memory_reader(image: bytes | bytearray) -> Callable[[int, int], bytes]:
    def read_at(offset: int, length: int) -> bytes:
        assert offset >= 0 and length >= 0 and offset + length <= len(image), (offset, length)
        return bytes(image[offset : offset + length])

    return read_at


def sparse_reader(image: bytes | bytearray, size: int) -> Callable[[int, int], bytes]:
    """The image followed by zeros up to ``size``."""

    def read_at(offset: int, length: int) -> bytes:
        assert offset >= 0 and length >= 0 and offset + length <= size, (offset, length)
        return bytes(image[offset : offset + length]).ljust(length, b"\0")

    return read_at


@functools.cache
def fuzz_seeds() -> dict[str, bytes]:
    """A synthetic PV, and a PV made by LVM when loop devices work (8 MiB each)."""
    text = vg_text(
        lv("a", segment(1, 0, 2, '"pv0", 4') + segment(2, 2, 1, '"pv0", 0'))
        + lv("s", segment(1, 0, 2, '"pv0", 1, "pv0", 3', 64))
    )
    seeds = {"synthetic": bytes(synthetic_pv(text, size=8 * MiB, mda_size=8192))}
    loop = subprocess.run(["losetup", "--find"], capture_output=True, check=False)
    if shutil.which("lvcreate") and loop.returncode == 0:
        with tempfile.TemporaryDirectory() as tmp:
            disk = sparse(Path(tmp) / "pv.img", 8 * MiB)
            with loop_devices() as attach:
                device = attach(disk)
                lvm = Lvm(Path(tmp) / "lvm", [device])
                try:
                    lvm("pvcreate", device)
                    lvm("vgcreate", "-s", "1M", "vgf", device)
                    lvm.lvcreate("vgf", "one", "2M")
                    lvm.lvcreate("vgf", "two", "2M", options=["-i1"])
                finally:
                    lvm.deactivate("vgf")
            seeds["lvm"] = disk.read_bytes()
    return seeds


TEXT_NOISE = [
    *("{", "}", "[", "]", '"', "=", "#", ",", "\n", "\0", "\\", "-1", "0", "99999999999999999999"),
    *("pv0", "segment1 {", 'type = "thin"', "stripe_count = 1000000"),
]


NUMBER_NOISE = [0, 1, 2, 3, -1, 7, 8, 64, 2048, 2**32, 2**63, 2**64, 10**31]


def committed_text(image: bytearray) -> bytes | None:
    offset, size = struct.unpack_from("<QQ", image, MDA_OFFSET + 40)
    area = struct.unpack_from("<Q", image, MDA_OFFSET + 32)[0]
    if not (offset >= SECTOR and size > 0 and offset + size <= area <= 2 * MiB):
        return None
    return bytes(image[MDA_OFFSET + offset : MDA_OFFSET + offset + size]).split(b"\0")[0]


@st.composite
def damaged_pvs(draw: st.DrawFn) -> bytearray:
    seeds = fuzz_seeds()
    image = bytearray(seeds[draw(st.sampled_from(sorted(seeds)))])
    text = committed_text(image)
    if text is not None and draw(st.booleans()):
        # Change the text and write it back with every checksum right: the parser's turn.
        pieces = text.decode(errors="replace")
        for _ in range(draw(st.integers(1, 4))):
            numbers = list(re.finditer(r"-?[0-9]+", pieces))
            if draw(st.booleans()) and numbers:  # a number changed: the mapping's turn
                number = draw(st.sampled_from(numbers))
                digits = str(draw(st.sampled_from(NUMBER_NOISE)))
                pieces = pieces[: number.start()] + digits + pieces[number.end() :]
            else:  # syntax
                at = draw(st.integers(0, len(pieces)))
                cut = draw(st.integers(0, 20))
                pieces = pieces[:at] + draw(st.sampled_from(TEXT_NOISE)) + pieces[at + cut :]
        area = struct.unpack_from("<Q", image, MDA_OFFSET + 32)[0]
        offset = draw(st.sampled_from([SECTOR, area - 100, area - SECTOR]))
        data = pieces.encode()[: area - 2 * SECTOR]
        set_metadata(image, data, offset=offset)
    for _ in range(draw(st.integers(0 if text is not None else 1, 4))):
        region = draw(st.sampled_from(["label", "mda header", "raw_locn"]))
        offset = {
            "label": draw(st.integers(SECTOR, 2 * SECTOR - 1)),
            "mda header": draw(st.integers(MDA_OFFSET, MDA_OFFSET + 39)),
            "raw_locn": draw(st.integers(MDA_OFFSET + 40, MDA_OFFSET + 87)),
        }[region]
        if draw(st.booleans()):
            image[offset] = draw(st.integers(0, 255))
        else:
            value = draw(st.sampled_from([0, 1, 511, 512, 4096, 2**32 - 1, 2**63, 2**64 - 1]))
            struct.pack_into("<Q", image, offset - offset % 8, value)
        if draw(st.booleans()):  # checksums made right again, so the checks behind them run
            struct.pack_into(
                "<I", image, SECTOR + 16, c_lvm.calc_crc(image[SECTOR + 20 : 2 * SECTOR])
            )
            header = image[MDA_OFFSET : MDA_OFFSET + SECTOR]
            struct.pack_into("<I", image, MDA_OFFSET, c_lvm.calc_crc(header[4:]))
    return image


@settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=FUZZ_DERANDOMIZE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(image=damaged_pvs(), extra=st.sampled_from([[], [(1024 * 1024, 2 * 1024 * 1024)]]))
def test_damaged_pvs_never_raise(image: bytearray, extra: list[tuple[int, int]]) -> None:
    devices = [(0, len(image)), *extra]
    read_bytes = 0
    inner = memory_reader(image)

    def read_at(offset: int, length: int) -> bytes:
        nonlocal read_bytes
        assert any(o <= offset and offset + length <= o + s for o, s in devices), (offset, length)
        read_bytes += length
        return inner(offset, length)

    started = time.monotonic()
    result = scan(devices, read_at)
    assert time.monotonic() - started < 5
    assert read_bytes <= MAX_METADATA_READ + 64 * 1024
    for group in result.volume_groups:
        assert group.extent_size > 0
        for volume in group.volumes:
            assert volume.size > 0 and volume.extents
            position = 0
            for extent in volume.extents:
                assert extent.lv_offset == position and extent.length > 0
                assert any(
                    o <= extent.device_offset and extent.device_offset + extent.length <= o + s
                    for o, s in devices
                ), extent
                position += extent.length
            assert position == volume.size
