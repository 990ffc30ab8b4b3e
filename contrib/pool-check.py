#!/usr/bin/env python3
"""Check vdifs against a real XCP-ng/XenServer pool: a snapshot's full.vhd from a vdifs
mount against XAPI's own ``xe vdi-export format=vhd`` of the same snapshot.

    contrib/pool-check.py --mount /mnt/pool --snapshot <snapshot-uuid> \\
        [--xe "xe -s pool-master -u root -pwf /root/.pool-password"] [--keep DIR]

It checks, with qemu-img (not vdifs's code):

1. content: ``qemu-img compare`` of the two VHDs (every byte of the disk);
2. allocation: ``qemu-img map`` of both lists the same data extents (vdifs
   carries the blocks XAPI's export carries);
3. stability: the mount's full.vhd has the same sha256 when read twice.

It needs room for one export of the snapshot (``--keep`` or a temporary
directory) and the ``xe`` CLI (on the master, or ``xe -s`` from elsewhere).
Exit status 0 when all three hold. vdifs's test suite runs against a fake
pool only; run this before relying on a new XAPI version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def data_extents(image: Path) -> list[tuple[int, int]]:
    """(offset, length) of the extents qemu reads as data, merged."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "vpc", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    merged: list[tuple[int, int]] = []
    for extent in json.loads(out):
        if not extent["data"]:
            continue
        start, length = extent["start"], extent["length"]
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mount", type=Path, required=True, help="a vdifs mount of the pool")
    parser.add_argument("--snapshot", required=True, help="a snapshot's uuid")
    parser.add_argument("--xe", default="xe", help="the xe command (with -s/-u/-pwf if remote)")
    parser.add_argument("--keep", type=Path, help="keep XAPI's export in this directory")
    args = parser.parse_args()

    ours = args.mount / "vdis" / args.snapshot / "full.vhd"
    if not ours.exists():
        print(f"pool-check: {ours} does not exist", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        where = args.keep or Path(scratch)
        theirs = where / f"{args.snapshot}.xapi.vhd"
        subprocess.run(
            [
                *shlex.split(args.xe),
                "vdi-export",
                f"uuid={args.snapshot}",
                f"filename={theirs}",
                "format=vhd",
            ],
            check=True,
        )
        failures = []
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "vpc", "-F", "vpc", str(theirs), str(ours)],
            capture_output=True,
            text=True,
            check=False,
        )
        if compare.returncode != 0:
            failures.append(f"content differs: {compare.stdout.strip()} {compare.stderr.strip()}")
        if data_extents(theirs) != data_extents(ours):
            failures.append("allocation differs: qemu-img map lists other data extents")
        if sha256(ours) != sha256(ours):
            failures.append("full.vhd changed between two reads")
    for failure in failures:
        print(f"pool-check: FAIL: {failure}", file=sys.stderr)
    if not failures:
        print(f"pool-check: {args.snapshot}: full.vhd matches xe vdi-export format=vhd")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
