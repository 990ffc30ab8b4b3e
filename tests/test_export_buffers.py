"""An export's read buffers start uncleared (vdifs.exports._new_buffer): every byte
of every image must still be written, zeros included.  Poisoned buffers show any
byte a read leaves as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vdifs import exports
from vdifs.exports import DiskState, Export
from vdifs.model import CHUNK_SIZE
from vdifs.storage.local import LocalSR

MiB = 1 << 20


def poisoned(size: int) -> bytearray:
    return bytearray(b"\xee" * size)


@pytest.fixture
def sr(tmp_path: Path) -> LocalSR:
    backend = LocalSR(tmp_path / "sr")
    yield backend
    backend.close()


def test_every_byte_is_written(sr: LocalSR, monkeypatch: pytest.MonkeyPatch) -> None:
    uuid = sr.create_vdi("d", 9 * MiB + 512).uuid
    with sr.writer(uuid) as writer:  # data, a partial block, a hole, the partial tail
        for chunk in (0, 1, 5, 40, 144):
            writer.write_chunk(chunk, os.urandom(CHUNK_SIZE)[: min(CHUNK_SIZE, 512 + chunk)])
        writer.commit()
    base = sr.snapshot(uuid).uuid
    with sr.writer(uuid) as writer:
        writer.write_chunk(3, os.urandom(CHUNK_SIZE))
        writer.write_chunk(40, bytes(CHUNK_SIZE))  # zeroed since the base
        writer.commit()
    snap = sr.snapshot(uuid).uuid

    def state(vdi: str) -> DiskState:
        return DiskState(*sr.state(vdi))

    cases = [(fmt, None) for fmt in ("raw", "vhd", "qcow2")] + [
        (fmt, base) for fmt in ("vhd", "qcow2")
    ]
    for fmt, delta_base in cases:
        export = Export(sr, state(snap), fmt, state(delta_base) if delta_base else None)
        pieces = [(0, export.size), (export.size - 700, 700), (3 * MiB + 17, MiB)]
        with monkeypatch.context() as m:
            m.setattr(exports, "_new_buffer", bytearray)  # cleared: the reference
            clean = [bytes(export.read(offset, length)) for offset, length in pieces]
        with monkeypatch.context() as m:
            m.setattr(exports, "_new_buffer", poisoned)
            dirty = [bytes(export.read(offset, length)) for offset, length in pieces]
        assert dirty == clean, (fmt, delta_base)
