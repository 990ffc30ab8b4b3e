"""The in-memory backend mounted through the kernel: the seam carries a second backend.

Its full.vhd, full.qcow2 and delta-from/ files are checked by qemu-img and
libvhdi against the disk the test knows, and an upload is applied into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_tool, sha, wait_for
from tests.storage.serve_memory import disk_after

pytestmark = [needs_fuse, needs_tool("qemu-img"), needs_tool("vhdimount")]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def memory_mount(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    mnt, info = tmp_path / "mnt", tmp_path / "uuids.json"
    mnt.mkdir()
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.storage.serve_memory", str(mnt), str(info)],
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 20
        while not (os.path.ismount(mnt) and info.exists()):
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the memory mount did not come up"
            time.sleep(0.05)
        yield mnt, json.loads(info.read_text())
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
    assert proc.returncode == 0, (tmp_path / "daemon.log").read_text()


def qemu_compare(image: Path, raw: Path, *fmt: str) -> None:
    result = subprocess.run(
        ["qemu-img", "compare", *fmt, "-F", "raw", str(image), str(raw)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_memory_backend_through_the_mount(
    memory_mount: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    mnt, uuids = memory_mount
    vdi, s1, s2 = uuids["vdi"], uuids["s1"], uuids["s2"]
    assert sorted(os.listdir(mnt / "vdis")) == sorted(uuids.values())
    raw1, raw2 = tmp_path / "s1.raw", tmp_path / "s2.raw"
    raw1.write_bytes(disk_after(1))
    raw2.write_bytes(disk_after(2))
    assert sha(mnt / "vdis" / s1 / "raw.img") == sha(raw1)
    assert sha(mnt / "vdis" / s2 / "raw.img") == sha(raw2)
    qemu_compare(mnt / "vdis" / s2 / "full.vhd", raw2, "-f", "vpc")
    qemu_compare(mnt / "vdis" / s2 / "full.qcow2", raw2, "-f", "qcow2")
    subprocess.run(["qemu-img", "check", str(mnt / "vdis" / s2 / "full.qcow2")], check=True)
    # Chains saved the usual way, opened by qemu (qcow2) and libvhdi (VHD).
    chain = tmp_path / "chain"
    chain.mkdir()
    for fmt in ("qcow2", "vhd"):
        shutil.copyfile(mnt / "vdis" / s1 / f"full.{fmt}", chain / f"{s1}.{fmt}")
        shutil.copyfile(mnt / "vdis" / s2 / "delta-from" / f"{s1}.{fmt}", chain / f"{s2}.{fmt}")
    qemu_compare(chain / f"{s2}.qcow2", raw2)
    layers = tmp_path / "layers"
    layers.mkdir()
    subprocess.run(["vhdimount", str(chain / f"{s2}.vhd"), str(layers)], check=True)
    try:
        assert wait_for(lambda: (layers / "vhdi2").exists(), 5)
        assert sha(layers / "vhdi1") == sha(raw1)
        assert sha(layers / "vhdi2") == sha(raw2)
    finally:
        subprocess.run(["fusermount3", "-u", str(layers)], check=False)
    # A restore through import/ lands in the memory backend.
    restored = raw2.read_bytes()[::-1]
    (tmp_path / "new.raw").write_bytes(restored)
    subprocess.run(
        ["cp", str(tmp_path / "new.raw"), str(mnt / "import" / f"{vdi}.raw")], check=True
    )
    assert sha(mnt / "vdis" / vdi / "raw.img") == hashlib.sha256(restored).hexdigest()
    status = json.loads((mnt / "import" / ".status" / f"{vdi}.raw.json").read_text())
    assert status["state"] == "done"
