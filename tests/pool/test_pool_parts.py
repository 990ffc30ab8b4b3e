"""The pool backend's pure parts: addresses, CBT bitmaps, records, scratch space."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from vdifs.errors import InvalidArgument
from vdifs.model import CHUNK_SIZE, Allocation
from vdifs.storage.xapi.api import PoolAddress
from vdifs.storage.xapi.pool import _scratch_dir, bitmap_allocation, block_allocation
from vdifs.storage.xapi.records import build_view, xapi_time

MiB = 1 << 20


def test_pool_addresses() -> None:
    a = PoolAddress.parse("xapi://backup@pool-master")
    assert (a.host, a.port, a.user, a.sr) == ("pool-master", 443, "backup", None)
    b = PoolAddress.parse("xapi://root@10.0.0.1:8443/?sr=abc")
    assert (b.port, b.sr, b.base_url) == (8443, "abc", "https://10.0.0.1:8443")
    for bad in ("http://host", "xapi://root:secret@host", "xapi://host/?colour=blue"):
        with pytest.raises(InvalidArgument):
            PoolAddress.parse(bad)


def chunks_of(allocation: Allocation) -> list[int]:
    return [
        block * 32 + bit
        for block, mask in zip(allocation.blocks, allocation.masks, strict=True)
        for bit in range(32)
        if mask >> bit & 1
    ]


def test_cbt_bitmaps_are_most_significant_bit_first() -> None:
    size = 5 * MiB  # 80 chunks: 10 bitmap bytes
    bitmap = bytearray(10)
    for chunk in (0, 7, 8, 33, 79):
        bitmap[chunk >> 3] |= 0x80 >> (chunk & 7)
    assert chunks_of(bitmap_allocation(bytes(bitmap), size)) == [0, 7, 8, 33, 79]
    # Bits past the disk (a bitmap of a larger disk, a padded last byte) are dropped.
    assert chunks_of(bitmap_allocation(b"\xff" * 12, 3 * CHUNK_SIZE)) == [0, 1, 2]


def test_bat_blocks_of_other_sizes_become_chunks() -> None:
    assert chunks_of(block_allocation(2 * MiB, [1], 6 * MiB)) == list(range(32, 64))
    assert chunks_of(block_allocation(512 * 1024, [1], 6 * MiB)) == list(range(8, 16))
    assert chunks_of(block_allocation(2 * MiB, [2], 5 * MiB)) == list(range(64, 80))


def test_which_vdis_a_pool_shows() -> None:
    srs = {
        "OpaqueRef:sr": {"uuid": "sr", "type": "ext", "content_type": "user"},
        "OpaqueRef:iso": {"uuid": "iso", "type": "iso", "content_type": "iso"},
    }

    def vdi(uuid: str, sr: str = "OpaqueRef:sr", **fields: object) -> dict[str, object]:
        return {"uuid": uuid, "SR": sr, "type": "user", "virtual_size": str(MiB)} | fields

    vdis = {
        "OpaqueRef:a": vdi("a", cbt_enabled=True, snapshots=["OpaqueRef:s"]),
        "OpaqueRef:s": vdi(
            "s",
            is_a_snapshot=True,
            snapshot_of="OpaqueRef:a",
            cbt_enabled=True,
            snapshot_time="20261207T21:00:00Z",
        ),
        "OpaqueRef:c": vdi("c", type="cbt_metadata", is_a_snapshot=True, cbt_enabled=True),
        "OpaqueRef:iso": vdi("debian", sr="OpaqueRef:iso"),
        "OpaqueRef:sys": vdi("sys", type="system"),
    }
    view = build_view(vdis, srs, {}, {}, only_sr=None, previous=None, now_ns=1)
    assert sorted(view.vdis) == ["a", "c", "s"]
    a, s, c = view.vdis["a"], view.vdis["s"], view.vdis["c"]
    assert a.snapshots == ("s",) and s.snapshot_of == "a" and c.data_destroyed
    assert s.lineage == a.lineage == "a"
    assert s.snapshot_time == "2026-12-07T21:00:00Z" == xapi_time("20261207T21:00:00Z")
    assert s.changed_ns == 1796677200 * 10**9  # the snapshot's time: the same on every host
    # A live VDI's generation moves when XAPI's record of it does, and only then.
    again = build_view(vdis, srs, {}, {}, only_sr=None, previous=view, now_ns=2)
    assert again.vdis["a"] is view.vdis["a"]
    vdis["OpaqueRef:a"] = vdi("a", cbt_enabled=True, physical_utilisation=str(MiB))
    moved = build_view(vdis, srs, {}, {}, only_sr=None, previous=again, now_ns=3)
    assert moved.vdis["a"].generation == a.generation + 1
    assert build_view(vdis, srs, {}, {}, only_sr="other", previous=None, now_ns=1).vdis == {}


def test_scratch_left_by_a_dead_process_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / "vdifs-stale"
    stale.mkdir()
    (stale / "x.upload").write_bytes(b"left over")
    live = tmp_path / "vdifs-live"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        mine = _scratch_dir(tmp_path)
        assert not stale.exists() and live.exists() and mine.path.exists()
        assert mine.path.name.startswith("vdifs-")
        mine.cleanup()
        assert not mine.path.exists()
    finally:
        os.close(fd)
