"""The mounted tree through the kernel, with the real daemon and CLI."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Cli,
    Mount,
    fill,
    needs_fuse,
    needs_tool,
    pread,
    require_loop_device,
    wait_for,
)

pytestmark = needs_fuse


def test_tree_and_info_json(cli: Cli, mnt: Mount) -> None:
    vdi = cli("vdi", "create", "web", "--size", "10M")
    assert wait_for(lambda: (mnt.path / "vdis" / vdi).exists(), 3)
    assert sorted(os.listdir(mnt.path)) == ["by-name", "import", "vdis", "vms"]
    assert sorted(os.listdir(mnt.vdi(vdi))) == [
        "delta-from",
        "full.qcow2",
        "full.vhd",
        "info.json",
        "raw.img",
        "snapshots",
    ]  # partitions/ and lvm/ come with the disk's first data (test_volumes_mount.py)
    assert not (mnt.vdi(vdi) / "partitions").exists()
    info = json.loads((mnt.vdi(vdi) / "info.json").read_text())
    assert info["uuid"] == vdi and info["virtual_size"] == 10 << 20
    assert (mnt.vdi(vdi) / "raw.img").stat().st_size == 10 << 20
    assert os.readlink(mnt.path / "by-name" / "web") == f"../vdis/{vdi}"
    assert (mnt.path / "by-name" / "web" / "raw.img").exists()


def test_write_snapshot_overwrite_read_both(cli: Cli, mnt: Mount) -> None:
    vdi = cli("vdi", "create", "disk", "--size", "16M")
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    raw = mnt.vdi(vdi) / "raw.img"
    pattern_a = os.urandom(3 << 20)
    fill(raw, 1 << 20, pattern_a)
    fill(raw, 12345, b"partial chunk write")  # not aligned to anything
    snap = cli("vdi", "snapshot", vdi)
    pattern_b = os.urandom(3 << 20)
    fill(raw, 1 << 20, pattern_b)
    assert wait_for(lambda: mnt.vdi(snap).exists(), 3)
    snap_raw = mnt.vdi(snap) / "raw.img"
    assert pread(snap_raw, 1 << 20, 3 << 20) == pattern_a
    assert pread(snap_raw, 12345, 19) == b"partial chunk write"
    assert pread(raw, 1 << 20, 3 << 20) == pattern_b
    assert pread(raw, 12345, 19) == b"partial chunk write"
    # A snapshot is read-only.
    with pytest.raises(OSError) as exc:
        os.open(snap_raw, os.O_WRONLY)
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    # Reads past the end are short; sizes are exact.
    assert pread(raw, (16 << 20) - 10, 100) == bytes(10)
    assert pread(raw, 16 << 20, 100) == b""


def test_st_blocks_is_honest(cli: Cli, mnt: Mount) -> None:
    vdi = cli("vdi", "create", "sparse", "--size", "64M")
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    raw = mnt.vdi(vdi) / "raw.img"
    assert raw.stat().st_blocks == 0
    fill(raw, 0, os.urandom(1 << 20))
    assert wait_for(lambda: raw.stat().st_blocks * 512 == 1 << 20, 3)
    du = subprocess.run(["du", "-k", str(raw)], capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) == 1024


def test_cli_changes_show_within_a_second(cli: Cli, mnt: Mount) -> None:
    vdi = cli("vdi", "create", "first", "--size", "1M")
    assert wait_for(lambda: vdi in os.listdir(mnt.path / "vdis"), 1.5)
    cli("vdi", "rename", vdi, "renamed")
    assert wait_for(lambda: "renamed" in os.listdir(mnt.path / "by-name"), 1.5)
    cli("vdi", "destroy", vdi)
    assert wait_for(lambda: vdi not in os.listdir(mnt.path / "vdis"), 1.5)


def test_concurrent_readers(cli: Cli, mnt: Mount, sr_path: Path) -> None:
    vdi = cli("vdi", "create", "busy", "--size", "32M")
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    data = os.urandom(32 << 20)
    fill(mnt.vdi(vdi) / "raw.img", 0, data)
    snap = cli("vdi", "snapshot", vdi)
    assert wait_for(lambda: mnt.vdi(snap).exists(), 3)
    expected = hashlib.sha256(data).hexdigest()
    results: list[Any] = []

    def reader(name: str) -> None:
        try:
            h = hashlib.sha256((mnt.vdi(snap) / name).read_bytes()).hexdigest()
            results.append(h if name == "raw.img" else "ok")
            os.listdir(mnt.vdi(snap))
        except Exception as exc:
            results.append(exc)

    threads = [
        threading.Thread(target=reader, args=(n,))
        for n in ["raw.img", "full.vhd", "raw.img", "full.qcow2", "raw.img", "info.json"]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count(expected) == 3 and results.count("ok") == 3, results


@needs_tool("mkfs.ext4")
@needs_tool("losetup")
def test_losetup_mkfs_files_survive_snapshot(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    require_loop_device()
    vdi = cli("vdi", "create", "fs", "--size", "64M")
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    raw = mnt.vdi(vdi) / "raw.img"
    loop = subprocess.run(["losetup", "--find", "--show", str(raw)], capture_output=True, text=True)
    assert loop.returncode == 0, loop.stderr
    dev = loop.stdout.strip()
    inner = tmp_path / "inner"
    inner.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
        subprocess.run(["mount", dev, str(inner)], check=True)
        payload = os.urandom(5 << 20)
        (inner / "hello.bin").write_bytes(payload)
        subprocess.run(["umount", str(inner)], check=True)
    finally:
        subprocess.run(["umount", str(inner)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", dev], check=False)
    snap = cli("vdi", "snapshot", vdi)
    assert wait_for(lambda: mnt.vdi(snap).exists(), 3)
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(mnt.vdi(snap) / "raw.img")],
        capture_output=True,
        text=True,
        check=True,
    )
    dev = loop.stdout.strip()
    try:
        subprocess.run(["mount", "-o", "ro,noload", dev, str(inner)], check=True)
        assert (inner / "hello.bin").read_bytes() == payload
    finally:
        subprocess.run(["umount", str(inner)], check=False)
        subprocess.run(["losetup", "-d", dev], check=False)


def test_kill_9_gives_enotconn_and_remount_serves_same_data(
    cli: Cli, mount_factory: Any, tmp_path: Path
) -> None:
    vdi = cli("vdi", "create", "durable", "--size", "8M")
    m = mount_factory()
    data = os.urandom(1 << 20)
    fill(m.vdi(vdi) / "raw.img", 4096, data)  # fsync: durable from here on
    m.kill9()
    with pytest.raises(OSError) as exc:
        os.listdir(m.path)
    assert exc.value.errno == errno.ENOTCONN
    # Mounting over it is refused with the way out; vdifs umount detaches it.
    again = cli.run("mount", str(m.path), check=False)
    assert again.returncode == 6 and "vdifs umount" in again.stderr
    cli("umount", str(m.path))
    m2 = mount_factory(name="mnt2")
    assert pread(m2.vdi(vdi) / "raw.img", 4096, 1 << 20) == data
    assert m2.stop() == 0


def test_read_only_mount(cli: Cli, mount_factory: Any) -> None:
    vdi = cli("vdi", "create", "ro", "--size", "1M")
    m = mount_factory("ro")
    with pytest.raises(OSError) as exc:
        os.open(m.vdi(vdi) / "raw.img", os.O_WRONLY)
    assert exc.value.errno == errno.EROFS
    assert m.stop() == 0


def test_background_mount_and_umount(cli: Cli, tmp_path: Path) -> None:
    vdi = cli("vdi", "create", "bg", "--size", "1M")
    mountpoint = tmp_path / "bg"
    mountpoint.mkdir()
    try:
        cli("mount", str(mountpoint))
        assert os.path.ismount(mountpoint)  # ready when the command returns
        assert (mountpoint / "vdis" / vdi / "raw.img").exists()
        again = cli.run("mount", str(mountpoint), check=False)
        assert again.returncode == 6 and "already" in again.stderr
        cli("umount", str(mountpoint))
        assert wait_for(lambda: not os.path.ismount(mountpoint), 5)
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def test_cp_sparse_keeps_holes(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    vdi = cli("vdi", "create", "holes", "--size", "32M")
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    fill(mnt.vdi(vdi) / "raw.img", 8 << 20, os.urandom(1 << 20))
    out = tmp_path / "copy.img"
    # st_blocks < st_size tells cp the source is sparse: it writes holes for zeros.
    subprocess.run(["cp", "--sparse=auto", str(mnt.vdi(vdi) / "raw.img"), str(out)], check=True)
    assert out.stat().st_size == 32 << 20
    assert out.stat().st_blocks * 512 < 4 << 20


def test_fstab_mount_helper(cli: Cli, tmp_path: Path) -> None:
    vdi = cli("vdi", "create", "fstab", "--size", "1M")
    helper = Path(__file__).parent.parent / "contrib" / "mount.vdifs"
    mountpoint = tmp_path / "fstab"
    mountpoint.mkdir()
    env = dict(os.environ, VDIFS_BIN=str(Path(sys.executable).parent / "vdifs"))
    typo = subprocess.run(
        [str(helper), str(cli.sr), str(mountpoint), "-o", "rw,nofail,readonly"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert typo.returncode != 0 and "unknown option 'readonly'" in typo.stderr
    subprocess.run(
        [str(helper), str(cli.sr), str(mountpoint), "-o", "ro,nofail,_netdev,x-systemd.automount"],
        env=env,
        check=True,
    )
    try:
        assert os.path.ismount(mountpoint)
        with pytest.raises(OSError) as exc:
            os.open(mountpoint / "vdis" / vdi / "raw.img", os.O_WRONLY)
        assert exc.value.errno == errno.EROFS
    finally:
        cli("umount", str(mountpoint))
