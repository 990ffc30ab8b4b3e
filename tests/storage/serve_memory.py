"""Mount an in-memory backend holding a known disk.

Usage: ``python -m tests.storage.serve_memory MNT OUT.json``.

The disk (``recipe``) is made again by the test to check what the mount
shows; OUT.json names the VDI and its two snapshots.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from tests.storage.memory import MemoryBackend
from vdifs.fs import mount
from vdifs.model import CHUNK_SIZE

SIZE = 9 * (1 << 20) + 512


def recipe() -> list[dict[int, bytes]]:
    """The chunks written before each snapshot (S1, then S2)."""
    rng = random.Random(16)
    first = {c: rng.randbytes(CHUNK_SIZE) for c in (0, 1, 2, 31, 32, 70, 144)}
    second = {1: rng.randbytes(CHUNK_SIZE), 32: bytes(CHUNK_SIZE), 100: rng.randbytes(CHUNK_SIZE)}
    return [first, second]


def disk_after(steps: int) -> bytes:
    disk = bytearray(SIZE)
    for chunks in recipe()[:steps]:
        for chunk, data in chunks.items():
            end = min(SIZE, (chunk + 1) * CHUNK_SIZE)
            disk[chunk * CHUNK_SIZE : end] = data[: end - chunk * CHUNK_SIZE]
    return bytes(disk)


def main() -> None:
    mountpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
    backend = MemoryBackend()
    uuid = backend.create_vdi("memory-disk", SIZE).uuid
    snaps = []
    for chunks in recipe():
        with backend.writer(uuid) as writer:
            for chunk, data in chunks.items():
                writer.write_chunk(chunk, data)
            writer.commit()
        snaps.append(backend.snapshot(uuid).uuid)
    out.write_text(json.dumps({"vdi": uuid, "s1": snaps[0], "s2": snaps[1]}))
    mount.serve(backend, mountpoint, {"auto_unmount"})


if __name__ == "__main__":
    main()
