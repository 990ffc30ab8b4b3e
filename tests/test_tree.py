"""The daemon's model of the tree, in-process."""

from __future__ import annotations

import gc
import weakref

from vdifs.formats.base import CHUNK_SIZE
from vdifs.fs.tree import Tree
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
