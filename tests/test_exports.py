"""full.vhd, full.qcow2 and delta-from/ through the real mount, checked by
tools we did not write (qemu-img, libvhdi's vhdimount, libqcow's qcowinfo)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, Mount, fill, needs_fuse, needs_tool, sha, wait_for

pytestmark = [needs_fuse, needs_tool("qemu-img")]

MiB = 1 << 20


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def identical(fmt: str, image: Path, raw: Path) -> None:
    result = qemu_img("compare", "-f", fmt, "-F", "raw", str(image), str(raw))
    assert result.returncode == 0, result.stdout + result.stderr


def make_disk(cli: Cli, mnt: Mount, size: str, writes: list[tuple[int, bytes]]) -> str:
    vdi = cli("vdi", "create", "disk", "--size", size)
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    for offset, data in writes:
        fill(mnt.vdi(vdi) / "raw.img", offset, data)
    return vdi


def snapshot(cli: Cli, mnt: Mount, vdi: str) -> str:
    snap = cli("vdi", "snapshot", vdi)
    assert wait_for(lambda: mnt.vdi(snap).exists(), 3)
    return snap


@pytest.mark.parametrize(
    ("size", "writes"),
    [
        ("64M", [(0, os.urandom(MiB)), (10 * MiB + 4096, os.urandom(3 * MiB))]),
        ("5M", []),  # empty, not a 2 MiB multiple
        (f"{5 * MiB + 512}", [(5 * MiB - 1000, os.urandom(1512))]),  # data in the partial tail
        ("4M", [(0, os.urandom(4 * MiB))]),  # full
    ],
)
def test_full_images_match_raw(cli: Cli, mnt: Mount, size: str, writes: Any) -> None:
    vdi = make_disk(cli, mnt, size, writes)
    snap = snapshot(cli, mnt, vdi)
    d = mnt.vdi(snap)
    raw = d / "raw.img"
    for fmt, name in (("vpc", "full.vhd"), ("qcow2", "full.qcow2")):
        info = json.loads(qemu_img("info", "--output=json", "-f", fmt, str(d / name)).stdout)
        assert info["virtual-size"] == raw.stat().st_size
        identical(fmt, d / name, raw)
    check = qemu_img("check", "-f", "qcow2", str(d / "full.qcow2"))
    assert check.returncode == 0 and "No errors" in check.stdout, check.stdout
    # Exact size in ls -l before reading; the same bytes in every read.
    for name in ("full.vhd", "full.qcow2"):
        assert (d / name).stat().st_size == len((d / name).read_bytes())
        assert sha(d / name) == sha(d / name)


@needs_tool("vhdimount")
def test_vhd_chain_three_deep_through_libvhdi(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    vdi = make_disk(cli, mnt, "24M", [(0, os.urandom(6 * MiB))])
    s1 = snapshot(cli, mnt, vdi)
    fill(mnt.vdi(vdi) / "raw.img", 2 * MiB + 512, os.urandom(70000))
    fill(mnt.vdi(vdi) / "raw.img", 0, bytes(MiB))  # a region that became zero
    s2 = snapshot(cli, mnt, vdi)
    fill(mnt.vdi(vdi) / "raw.img", 20 * MiB, os.urandom(MiB))
    s3 = snapshot(cli, mnt, vdi)
    backup = tmp_path / "backup"
    backup.mkdir()
    # The documented naming: <snapshot>.vhd for the full, then each delta as
    # <snapshot>.vhd, copied from that snapshot's delta-from/<previous>.vhd.
    shutil.copyfile(mnt.vdi(s1) / "full.vhd", backup / f"{s1}.vhd")
    shutil.copyfile(mnt.vdi(s2) / "delta-from" / f"{s1}.vhd", backup / f"{s2}.vhd")
    shutil.copyfile(mnt.vdi(s3) / "delta-from" / f"{s2}.vhd", backup / f"{s3}.vhd")
    info = subprocess.run(
        ["vhdiinfo", str(backup / f"{s3}.vhd")], capture_output=True, text=True, check=True
    ).stdout
    assert "Differential" in info and f"{s2}.vhd" in info
    view = tmp_path / "view"
    view.mkdir()
    subprocess.run(["vhdimount", str(backup / f"{s3}.vhd"), str(view)], check=True)
    try:
        assert wait_for(lambda: any(view.iterdir()), 5)
        newest = sorted(view.iterdir())[-1]
        assert sha(newest) == sha(mnt.vdi(s3) / "raw.img")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(view)], check=False)


def test_qcow2_chain_through_qemu(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    vdi = make_disk(cli, mnt, "700M", [(0, os.urandom(2 * MiB)), (600 * MiB, os.urandom(MiB))])
    s1 = snapshot(cli, mnt, vdi)
    fill(mnt.vdi(vdi) / "raw.img", 650 * MiB + 7, os.urandom(100000))
    fill(mnt.vdi(vdi) / "raw.img", 0, bytes(65536))
    s2 = snapshot(cli, mnt, vdi)
    fill(mnt.vdi(vdi) / "raw.img", 100 * MiB, os.urandom(MiB))
    s3 = snapshot(cli, mnt, vdi)
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copyfile(mnt.vdi(s1) / "full.qcow2", backup / f"{s1}.qcow2")
    shutil.copyfile(mnt.vdi(s2) / "delta-from" / f"{s1}.qcow2", backup / f"{s2}.qcow2")
    shutil.copyfile(mnt.vdi(s3) / "delta-from" / f"{s2}.qcow2", backup / f"{s3}.qcow2")
    for snap in (s1, s2, s3):
        check = qemu_img("check", str(backup / f"{snap}.qcow2"))
        assert check.returncode == 0, check.stdout + check.stderr
    chain = json.loads(
        qemu_img("info", "--backing-chain", "--output=json", str(backup / f"{s3}.qcow2")).stdout
    )
    assert [Path(i["filename"]).name for i in chain] == [f"{s}.qcow2" for s in (s3, s2, s1)]
    identical("qcow2", backup / f"{s3}.qcow2", mnt.vdi(s3) / "raw.img")
    identical("qcow2", backup / f"{s2}.qcow2", mnt.vdi(s2) / "raw.img")
    # The delta carries only what changed: far smaller than the full image.
    assert (backup / f"{s3}.qcow2").stat().st_size < 3 * MiB


def test_bytes_are_deterministic_across_mounts(cli: Cli, mount_factory: Any) -> None:
    vdi = cli("vdi", "create", "det", "--size", "32M")
    m = mount_factory()
    fill(m.vdi(vdi) / "raw.img", MiB, os.urandom(3 * MiB))
    snap = cli("vdi", "snapshot", vdi)
    fill(m.vdi(vdi) / "raw.img", 9 * MiB, os.urandom(MiB))
    snap2 = cli("vdi", "snapshot", vdi)
    assert wait_for(lambda: m.vdi(snap2).exists(), 3)
    names = ["full.vhd", "full.qcow2", f"delta-from/{snap}.vhd", f"delta-from/{snap}.qcow2"]
    first = {n: sha(m.vdi(snap2) / n) for n in names}
    assert m.stop() == 0
    m2 = mount_factory(name="again")
    assert {n: sha(m2.vdi(snap2) / n) for n in names} == first
    # The full and every delta of one snapshot carry the same identity, and a
    # delta's parent is its base's identity (VHD footer uuid at offset 68).
    full_id = (m2.vdi(snap2) / "full.vhd").read_bytes()[68:84]
    delta = (m2.vdi(snap2) / "delta-from" / f"{snap}.vhd").read_bytes()
    assert delta[68:84] == full_id
    base_id = (m2.vdi(snap) / "full.vhd").read_bytes()[68:84]
    assert delta[512 + 40 : 512 + 56] == base_id


def test_cli_export_writes_the_same_bytes(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    vdi = make_disk(cli, mnt, "16M", [(4096, os.urandom(2 * MiB))])
    s1 = snapshot(cli, mnt, vdi)
    fill(mnt.vdi(vdi) / "raw.img", 8 * MiB, os.urandom(MiB))
    s2 = snapshot(cli, mnt, vdi)
    for fmt in ("vhd", "qcow2"):
        out = tmp_path / f"full.{fmt}"
        cli("export", s2, str(out), "--format", fmt)
        assert sha(out) == sha(mnt.vdi(s2) / f"full.{fmt}")
        out = tmp_path / f"delta.{fmt}"
        cli("export", s2, str(out), "--format", fmt, "--base", s1)
        assert sha(out) == sha(mnt.vdi(s2) / "delta-from" / f"{s1}.{fmt}")
    raw = subprocess.run(
        ["python3", "-m", "vdifs", "--sr", str(cli.sr), "export", s2, "-", "--format", "raw"],
        capture_output=True,
        check=True,
    ).stdout
    assert hashlib.sha256(raw).hexdigest() == sha(mnt.vdi(s2) / "raw.img")


def test_small_reads_in_any_order_get_the_right_bytes(
    cli: Cli, mount_factory: Any, tmp_path: Path
) -> None:
    # With direct_io every read() reaches the daemon as it is, and small reads
    # in order are answered from a megabyte read ahead (vdifs.fs.window).
    vdi = cli("vdi", "create", "small", "--size", "9M")
    m = mount_factory("direct_io")
    assert wait_for(lambda: m.vdi(vdi).exists(), 3)
    fill(m.vdi(vdi) / "raw.img", 12345, os.urandom(5 * MiB))
    snap = snapshot(cli, m, vdi)
    names = ["full.vhd", "full.qcow2", "raw.img"]
    expected = {}
    for name in names:
        fmt = name.rpartition(".")[2].replace("img", "raw")
        out = tmp_path / name
        cli("export", snap, str(out), "--format", fmt)
        expected[name] = out.read_bytes()

    def pieces(fd: int, offset: int, size: int, count: int) -> bytes:
        return b"".join(os.pread(fd, size, offset + i * size) for i in range(count))

    for name in names:
        want = expected[name]
        fd = os.open(m.vdi(snap) / name, os.O_RDONLY)
        try:
            # tar's 10 KiB records, to the end and past it (the last one short).
            got = pieces(fd, 0, 10240, -(-len(want) // 10240) + 2)
            assert got == want, name
            # 32 KiB from an odd offset, then back to an earlier offset.
            assert pieces(fd, 777, 32768, 70) == want[777 : 777 + 70 * 32768], name
            assert os.pread(fd, 4096, 5000) == want[5000:9096], name
            assert pieces(fd, 5000 + 4096, 4096, 300) == want[9096 : 9096 + 300 * 4096], name
            assert os.pread(fd, 100, len(want) - 50) == want[-50:], name
        finally:
            os.close(fd)

    # More readers than the daemon keeps windows for, taking turns.
    want = expected["full.vhd"]
    fds = [os.open(m.vdi(snap) / "full.vhd", os.O_RDONLY) for _ in range(40)]
    try:
        for step in range(0, 3 * MiB, 65536):
            for n, fd in enumerate(fds):
                offset = n * 4096 + step
                assert os.pread(fd, 65536, offset) == want[offset : offset + 65536]
    finally:
        for fd in fds:
            os.close(fd)
    assert m.warnings() == [], m.log.read_text()


def daemon_rss_peak_kib(mnt: Mount) -> int:
    assert mnt.proc is not None
    status = Path(f"/proc/{mnt.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


def test_huge_sparse_disks(cli: Cli, mnt: Mount) -> None:
    """2000 GiB: full.vhd read end to end; 16 TiB: no VHD, a qcow2 qemu accepts."""
    big = cli("vdi", "create", "big", "--size", "2000G")
    huge = cli("vdi", "create", "huge", "--size", "16T")
    assert wait_for(lambda: mnt.vdi(huge).exists(), 3)
    for vdi in (big, huge):
        for offset in (0, 1000 << 30, (2000 << 30) - MiB):
            fill(mnt.vdi(vdi) / "raw.img", offset, os.urandom(65536))
    assert "full.vhd" in os.listdir(mnt.vdi(big))
    assert "full.vhd" not in os.listdir(mnt.vdi(huge))
    assert "full.qcow2" in os.listdir(mnt.vdi(huge))
    with open(mnt.vdi(big) / "full.vhd", "rb") as f:
        total = 0
        while chunk := f.read(4 * MiB):
            total += len(chunk)
    assert total == (mnt.vdi(big) / "full.vhd").stat().st_size
    info = json.loads(qemu_img("info", "--output=json", str(mnt.vdi(big) / "full.vhd")).stdout)
    assert info["virtual-size"] == 2000 << 30
    check = qemu_img("check", "-f", "qcow2", str(mnt.vdi(huge) / "full.qcow2"))
    assert check.returncode == 0, check.stdout + check.stderr
    with open(mnt.vdi(huge) / "full.qcow2", "rb") as f:
        total = 0
        while chunk := f.read(4 * MiB):
            total += len(chunk)
    assert total == (mnt.vdi(huge) / "full.qcow2").stat().st_size
    assert daemon_rss_peak_kib(mnt) < 200 * 1024


@needs_tool("qcowinfo")
def test_libqcow_opens_full_qcow2(cli: Cli, mnt: Mount) -> None:
    vdi = make_disk(cli, mnt, "8M", [(0, os.urandom(MiB))])
    result = subprocess.run(
        ["qcowinfo", str(mnt.vdi(vdi) / "full.qcow2")], capture_output=True, text=True
    )
    assert result.returncode == 0 and "8388608" in result.stdout.replace(" ", ""), result.stdout
