"""The daemon's model of the tree, in-process."""

from __future__ import annotations

import gc
import time
import weakref
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pytest

from vdifs.fs.tree import Tree
from vdifs.model import CHUNK_SIZE
from vdifs.storage.local import LocalSR

MiB = 1 << 20


def test_a_disk_written_all_day_keeps_one_state_in_memory(sr: LocalSR) -> None:
    uuid = sr.create_vdi("busy", 64 * MiB).uuid
    tree = Tree(sr)
    first = tree.state(uuid)
    start = first.record.generation
    assert tree.export(uuid, "vhd").state is first
    gone = weakref.ref(first)
    del first
    for i in range(20):  # each commit is a new generation of the disk
        with sr.writer(uuid) as writer:
            writer.write_chunk(i, bytes([i + 1]) * CHUNK_SIZE)
            writer.commit()
        tree.refresh(force=True)
        for fmt in ("raw", "vhd", "qcow2"):
            assert tree.export(uuid, fmt).state.record.generation == start + i + 1
        assert tree.export(uuid, "raw").read(i * CHUNK_SIZE, 2) == bytes([i + 1]) * 2
    gc.collect()
    assert gone() is None, "a superseded state is still cached"


def test_snapshot_xml_creation_time_is_utc_in_any_time_zone(
    sr: LocalSR, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mktime() - timezone was an hour off while daylight saving time applied."""
    vm = sr.vms.create("web")
    snap = sr.vms.snapshot(vm.uuid, "summer")
    with sr.transaction() as db:
        db.execute(
            "UPDATE vms SET snapshot_time = '2026-07-01T12:00:00Z' WHERE uuid = ?", (snap.uuid,)
        )
    summer_noon = int(datetime(2026, 7, 1, 12, tzinfo=UTC).timestamp())
    for zone in ("Europe/Berlin", "America/New_York", "UTC"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        xml = ET.fromstring(Tree(sr).snapshot_xml(snap.uuid))
        assert xml.findtext("creationTime") == str(summer_noon), zone
    monkeypatch.delenv("TZ")
    time.tzset()
