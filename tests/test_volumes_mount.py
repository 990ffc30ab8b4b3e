"""File-level restore without losetup: partitions and LVM volumes as files of the mount.

A guest disk is made with the real tools (sfdisk, mkfs.ext4 -d, LVM's own
pvcreate/vgcreate/lvcreate without device-mapper), imported into a VDI and
snapshotted; each partition and volume file is compared byte for byte with
the place sfdisk and LVM report, then mounted read-only through a loop
device and a file read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cli, Mount, needs_fuse, needs_tool, require_loop_device, sha, wait_for
from tests.formats.test_lvm import NO_DM, Lvm, loop_devices, lvm_layout
from tests.formats.test_partitions import make_disk, run

pytestmark = [
    needs_fuse,
    needs_tool("sfdisk"),
    needs_tool("lvcreate"),
    needs_tool("mkfs.ext4"),
    needs_tool("debugfs"),
]

MiB = 1 << 20
DISK = 64 * MiB
P1 = (1 * MiB, 12 * MiB)  # (start, size) in bytes
P5_START = 14 * MiB  # the logical partition inside the extended one, a PV


def ext4_image(path: Path, size: int, files: dict[str, bytes], tmp: Path) -> Path:
    content = tmp / f"{path.name}-content"
    content.mkdir()
    for name, data in files.items():
        (content / name).write_bytes(data)
    with open(path, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-d", str(content), str(path))
    return path


def write_at(disk: Path, offset: int, data: bytes) -> None:
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(data)


def guest_disk(tmp: Path, vg: str, secret: bytes) -> tuple[Path, dict[str, list[tuple[int, int]]]]:
    """An MBR disk: p1 an ext4 file system, p5 (logical) an LVM PV whose volume
    ``root`` (two segments) holds another ext4. Returns it and where each lies."""
    disk = make_disk(
        tmp / f"{vg}-disk.img",
        DISK,
        "label: dos\n"
        f"start={P1[0] // 512}, size={P1[1] // 512}, type=83\n"
        f"start={(P5_START - MiB) // 512}, type=5\n"
        f"start={P5_START // 512}, type=8e\n",
    )
    write_at(
        disk, P1[0], ext4_image(tmp / "p1.ext4", P1[1], {"hello.txt": b"p1\n"}, tmp).read_bytes()
    )
    part_size = DISK - P5_START
    with loop_devices() as attach:
        device = attach(disk, offset=P5_START, size=part_size)
        lvm = Lvm(tmp / f"lvm-{vg}", [device])
        try:
            lvm("pvcreate", device)
            lvm("vgcreate", "-s", "1M", vg, device)
            lvm.lvcreate(vg, "gap", "2M")
            lvm.lvcreate(vg, "root", "8M")
            lvm("lvremove", *NO_DM, "-y", f"{vg}/gap")
            lvm("lvextend", *NO_DM, "-L", "+10M", f"{vg}/root")  # a second segment, after a hole
            layout = lvm_layout(lvm, vg, {device: P5_START})
        finally:
            lvm.deactivate(vg)
    root = ext4_image(tmp / f"{vg}-root.ext4", 18 * MiB, {"etc-passwd": secret}, tmp).read_bytes()
    for lv_offset, length, disk_offset in layout.volumes["root"]:
        write_at(disk, disk_offset, root[lv_offset : lv_offset + length])
    runs = {"root": [(d, n) for _, n, d in layout.volumes["root"]], "p1": [P1]}
    return disk, runs


def bytes_at(disk: Path, runs: list[tuple[int, int]]) -> bytes:
    with open(disk, "rb") as f:
        out = b""
        for offset, length in runs:
            f.seek(offset)
            out += f.read(length)
        return out


def read_back(image: Path, name: str) -> bytes:
    """debugfs reads the file system inside the file: no loop device, no mount."""
    return subprocess.run(
        ["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True, check=True
    ).stdout


def test_partitions_and_logical_volumes_are_files(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    disk, runs = guest_disk(tmp_path, "vgguest", b"root:x:0:0::/root:/bin/sh\n")
    vdi = cli("import", "guest", str(disk), "--create", "--format", "raw")
    snap = cli("vdi", "snapshot", vdi)
    assert wait_for(lambda: mnt.vdi(snap).exists(), 3)
    parts = mnt.vdi(snap) / "partitions"
    assert sorted(os.listdir(parts)) == ["p1.img", "p5.img", "table.json"]  # p2: extended
    table = json.loads((parts / "table.json").read_text())
    assert table["scheme"] == "mbr"
    assert [p["number"] for p in table["partitions"]] == [1, 2, 5]
    assert sha(parts / "p1.img") == hashlib.sha256(bytes_at(disk, runs["p1"])).hexdigest()
    assert (parts / "p5.img").stat().st_size == DISK - P5_START
    assert read_back(parts / "p1.img", "hello.txt") == b"p1\n"

    root = mnt.vdi(snap) / "lvm" / "vgguest" / "root.img"
    assert sorted(os.listdir(root.parent)) == ["metadata.txt", "root.img"]
    assert "vgguest" in (root.parent / "metadata.txt").read_text()
    assert root.stat().st_size == 18 * MiB
    assert sha(root) == hashlib.sha256(bytes_at(disk, runs["root"])).hexdigest()
    assert read_back(root, "etc-passwd") == b"root:x:0:0::/root:/bin/sh\n"

    # The guide's recipe: a read-only loop mount of the volume, a file copied out.
    require_loop_device()
    target = tmp_path / "restore"
    target.mkdir()
    mounted = subprocess.run(["mount", "-o", "ro,loop", str(root), str(target)], check=False)
    if mounted.returncode != 0:
        pytest.fail("mount -o ro,loop of root.img failed")
    try:
        assert (target / "etc-passwd").read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_two_disks_with_one_volume_group_name(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    """The host's LVM would refuse two VGs named alike; each disk shows its own."""
    uuids = []
    for n in (1, 2):
        work = tmp_path / f"d{n}"
        work.mkdir()
        disk, _ = guest_disk(work, "vgdup", f"disk {n}\n".encode())
        uuids.append(cli("import", f"dup{n}", str(disk), "--create", "--format", "raw"))
    for n, vdi in enumerate(uuids, 1):
        root = mnt.vdi(vdi) / "lvm" / "vgdup" / "root.img"
        assert wait_for(root.exists, 3)
        assert read_back(root, "etc-passwd") == f"disk {n}\n".encode()


def test_a_disk_without_a_table_and_a_live_disk_that_changes(
    cli: Cli, mnt: Mount, tmp_path: Path
) -> None:
    vdi = cli("vdi", "create", "blank", "--size", str(16 * MiB))
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    # Never written: nothing to show (and nothing for ls -lR to walk).
    assert "partitions" not in os.listdir(mnt.vdi(vdi))
    assert not (mnt.vdi(vdi) / "lvm").exists()
    # Data without a table: the directories come, saying so.
    with open(mnt.vdi(vdi) / "raw.img", "r+b") as f:
        f.seek(MiB)
        f.write(b"\xab" * 65536)
    assert wait_for(lambda: (mnt.vdi(vdi) / "partitions").exists(), 5)
    assert os.listdir(mnt.vdi(vdi) / "partitions") == ["table.json"]
    table = json.loads((mnt.vdi(vdi) / "partitions" / "table.json").read_text())
    assert table["scheme"] == "none"
    assert os.listdir(mnt.vdi(vdi) / "lvm") == []
    # sfdisk writes a table into the live disk: the tree follows.
    image = tmp_path / "table.img"
    make_disk(image, 16 * MiB, "label: gpt\nstart=2048, size=8192, name=data\n")
    with open(mnt.vdi(vdi) / "raw.img", "r+b") as f:
        f.write(image.read_bytes()[: 64 * 1024])
        f.seek(16 * MiB - 64 * 1024)
        f.write(image.read_bytes()[-64 * 1024 :])
    assert wait_for(lambda: "p1.img" in os.listdir(mnt.vdi(vdi) / "partitions"), 5)
    table = json.loads((mnt.vdi(vdi) / "partitions" / "table.json").read_text())
    assert table["scheme"] == "gpt" and table["partitions"][0]["name"] == "data"
