"""Chains saved from the mount restore exactly with Xen Orchestra's own VHD code.

Xen Orchestra's vhd-lib (tests/xo, installed by ``./dev setup``) reads a
differencing chain block by block and ignores sector bitmaps; merging
writes whole blocks.  A full.vhd and two delta-from/ files, saved the way XO
keeps them (``<uuid>.vhd``, each delta naming its parent's file), are
restored with ``VhdSynthetic.fromVhdChain`` and with ``mergeVhdChain`` and
compared with the snapshots' raw.img byte for byte.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cli, Mount, fill, needs_fuse, needs_tool, sha, wait_for

XO = Path(__file__).parent / "xo"
MiB = 1 << 20

pytestmark = [needs_fuse, needs_tool("node")]


def xo_restore(*args: Path | str) -> None:
    if not (XO / "node_modules" / "vhd-lib").is_dir():
        pytest.fail("vhd-lib is not installed in tests/xo: run ./dev setup")
    result = subprocess.run(
        ["node", str(XO / "restore.mjs"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def snapshot(cli: Cli, mnt: Mount, vdi: str) -> str:
    snap = cli("vdi", "snapshot", vdi)
    assert wait_for(lambda: mnt.vdi(snap).exists(), 3)
    return snap


def test_a_chain_restores_exactly_with_vhd_lib(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    size = 9 * MiB + 512  # the last block is partial, and so is its last chunk
    vdi = cli("vdi", "create", "xo", "--size", str(size))
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    raw = mnt.vdi(vdi) / "raw.img"
    fill(raw, 0, os.urandom(5 * MiB))
    fill(raw, 7 * MiB + 4096, os.urandom(300_000))
    s1 = snapshot(cli, mnt, vdi)
    fill(raw, 1 * MiB + 512, os.urandom(512))  # one sector, in a block full of parent data
    fill(raw, 3 * MiB, bytes(700_000))  # a zeroed range
    fill(raw, size - 512, os.urandom(512))  # the last sector
    s2 = snapshot(cli, mnt, vdi)
    fill(raw, 4 * MiB + 65536 * 3, os.urandom(1000))  # one chunk of a block
    fill(raw, 6 * MiB, os.urandom(MiB))  # a block that was empty
    fill(raw, 7 * MiB + 4096, bytes(4096))  # zeros over data
    s3 = snapshot(cli, mnt, vdi)

    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copyfile(mnt.vdi(s1) / "full.vhd", backup / f"{s1}.vhd")
    shutil.copyfile(mnt.vdi(s2) / "delta-from" / f"{s1}.vhd", backup / f"{s2}.vhd")
    shutil.copyfile(mnt.vdi(s3) / "delta-from" / f"{s2}.vhd", backup / f"{s3}.vhd")

    for snap in (s1, s2, s3):
        out = tmp_path / f"synthetic-{snap}.raw"
        xo_restore("synthetic", out, backup / f"{snap}.vhd")
        assert sha(out) == sha(mnt.vdi(snap) / "raw.img"), f"VhdSynthetic of {snap}"

    merged = tmp_path / "merged.raw"
    xo_restore("merge", merged, *(backup / f"{s}.vhd" for s in (s1, s2, s3)))
    assert sha(merged) == sha(mnt.vdi(s3) / "raw.img"), "mergeVhdChain"
