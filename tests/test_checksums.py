"""SHA256SUMS: checksums that travel with the backup, checked by coreutils' sha256sum."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import Cli, Mount, fill, needs_fuse, sha, wait_for
from vdifs.storage.local import LocalSR

pytestmark = needs_fuse

MiB = 1 << 20


def snapshot(cli: Cli, mnt: Mount, vdi: str) -> str:
    snap = cli("vdi", "snapshot", vdi)
    assert wait_for(lambda: mnt.vdi(snap).exists(), 3)
    return snap


def stored(sr_path: Path, uuid: str) -> dict[str, str]:
    sr = LocalSR(sr_path)
    try:
        return sr.stored_digests(uuid, sr.get_vdi(uuid).generation)
    finally:
        sr.close()


def sha256sum_check(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sha256sum", "-c", "--strict", "SHA256SUMS"],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_snapshots_sums_verify_its_copies(
    cli: Cli, mnt: Mount, sr_path: Path, tmp_path: Path, mount_factory: object
) -> None:
    vdi = cli("vdi", "create", "web", "--size", str(6 * MiB + 512))
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    fill(mnt.vdi(vdi) / "raw.img", 0, os.urandom(2 * MiB))
    s1 = snapshot(cli, mnt, vdi)
    fill(mnt.vdi(vdi) / "raw.img", 4 * MiB, os.urandom(MiB))
    s2 = snapshot(cli, mnt, vdi)
    assert not (mnt.vdi(vdi) / "SHA256SUMS").exists(), "a live VDI has no SHA256SUMS"

    sums = mnt.vdi(s1) / "SHA256SUMS"
    size = sums.stat().st_size
    assert stored(sr_path, s1) == {}, "stat computes nothing"
    text = sums.read_text()
    assert len(text) == size
    assert [line.split("  ")[1] for line in text.splitlines()] == [
        "raw.img",
        "full.vhd",
        "full.qcow2",
    ]
    assert len(stored(sr_path, s1)) == 3, "computed once, kept in the SR"

    # A copy verifies with plain sha256sum, years later, without vdifs.
    backup = tmp_path / "backup"
    backup.mkdir()
    for name in ("raw.img", "full.vhd", "full.qcow2", "SHA256SUMS"):
        shutil.copyfile(mnt.vdi(s1) / name, backup / name)
    assert sha256sum_check(backup).returncode == 0
    with open(backup / "full.vhd", "r+b") as f:
        f.seek(3000)
        byte = f.read(1)
        f.seek(3000)
        f.write(bytes([byte[0] ^ 1]))
    result = sha256sum_check(backup)
    assert result.returncode != 0 and "full.vhd: FAILED" in result.stdout

    # The deltas of a snapshot have theirs.
    deltas = mnt.vdi(s2) / "delta-from"
    lines = (deltas / "SHA256SUMS").read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == [f"{s1}.vhd", f"{s1}.qcow2"]
    chain = tmp_path / "chain"
    chain.mkdir()
    for name in (f"{s1}.vhd", f"{s1}.qcow2", "SHA256SUMS"):
        shutil.copyfile(deltas / name, chain / name)
    assert sha256sum_check(chain).returncode == 0

    # vdifs checksum computes ahead of time and prints the same lines.
    fill(mnt.vdi(vdi) / "raw.img", MiB, os.urandom(MiB))
    s3 = snapshot(cli, mnt, vdi)
    printed = cli("checksum", s3)
    assert len(stored(sr_path, s3)) == 3 + 2 * 2  # its images, and deltas from s1 and s2
    assert printed.splitlines()[0].endswith("  raw.img")
    assert any(line.endswith(f"  delta-from/{s2}.vhd") for line in printed.splitlines())
    assert (mnt.vdi(s3) / "SHA256SUMS").read_text() == "\n".join(printed.splitlines()[:3]) + "\n"
    sha_raw = printed.splitlines()[0].split()[0]
    assert sha_raw == sha(mnt.vdi(s3) / "raw.img")
    assert cli.run("checksum", vdi, check=False).returncode == 2  # a live VDI

    # Equal across remounts (the digests are of deterministic bytes).
    first = sums.read_bytes()
    mnt.stop()
    again = mount_factory(name="again")  # type: ignore[operator]
    assert (again.vdi(s1) / "SHA256SUMS").read_bytes() == first


def test_an_import_records_the_restored_disks_sha256(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    vdi = cli("vdi", "create", "restore", "--size", str(4 * MiB))
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(4 * MiB))
    # Through import/: the digest follows the import, in the background.
    shutil.copyfile(image, mnt.path / "import" / f"{vdi}.raw")
    status = mnt.path / "import" / ".status" / f"{vdi}.raw.json"
    assert wait_for(lambda: "sha256" in json.loads(status.read_text()), 10)
    assert json.loads(status.read_text())["sha256"] == sha(image)
    # Through the CLI: vdifs import-status shows it.
    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(4 * MiB))
    cli("import", vdi, str(other))
    latest = cli.json("import-status", "--json")[0]
    assert latest["sha256"] == sha(other) == sha(mnt.vdi(vdi) / "raw.img")
