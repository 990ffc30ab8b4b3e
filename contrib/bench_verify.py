"""What checking chunks on read costs the embedded SR's read path.

    .venv/bin/python contrib/bench_verify.py [--size 1G] [--rounds 5] [--dir /var/tmp]

Self-contained: it makes a temporary SR under ``--dir`` holding one VDI of
``--size`` random (never deduplicated) data, reads all of its pack files once
so the page cache is warm, then times ``LocalSR.read_into`` over the whole
disk in requests of 1 MiB (an export's, or ``-o direct_io``'s) and 128 KiB
(the kernel's readahead through the mount), and its first 128 MiB in
requests of 4 KiB (single pages: where a per-request cost shows most), in
four ways:

``off``
    ``verify_reads = False``: the read path without any checking.
``first read``
    a new ``LocalSR`` each round: every chunk is hashed (SHA-256) and compared
    with its recorded digest, one digest query per request: what a daemon pays
    the first time it reads each chunk.
``checked``
    the same object again: every chunk is marked checked, a read costs an
    ``fstat`` of the pack and a look at its bitmap: what the daemon pays from
    then on (the design chosen, docs/dev-storage.md, "Integrity").
``hash every read``
    ``off`` plus a SHA-256 of every 64 KiB read (no digest lookup): a lower
    bound of the cost of checking every read, the design not chosen.

Each round runs every way once, back to back, in an order that rotates each
round; the ratio to ``off`` and the time added to each request are taken per
round, and the medians are printed (MB = 10**6 bytes).  The SR is deleted at
the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from vdifs.model import CHUNK_SIZE
from vdifs.storage.local import LocalSR
from vdifs.storage.local.blockmap import BlockMap
from vdifs.storage.local.layout import chunk_digest

REQUESTS = (1 << 20, 128 << 10, 4 << 10)
SMALL_SPAN = 128 << 20  # what 4 KiB requests read
WAYS = ("off", "first read", "checked", "hash every read")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text[-1:] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def make_sr(path: Path, size: int) -> str:
    """One VDI of ``size`` bytes, every chunk different."""
    sr = LocalSR(path)
    try:
        record = sr.create_vdi("bench", size)
        rng = random.Random(1)
        run = 256  # chunks per write_chunks: 16 MiB
        with sr.writer(record.uuid, bulk=True) as w:
            for first in range(0, size // CHUNK_SIZE, run):
                count = min(run, size // CHUNK_SIZE - first)
                w.write_chunks(first, rng.randbytes(count * CHUNK_SIZE))
            w.commit()
        return record.uuid
    finally:
        sr.close()


def warm(path: Path) -> None:
    for pack in (path / "packs").iterdir():
        with open(pack, "rb") as f:
            while f.read(8 << 20):
                pass


def span(content: BlockMap, request: int) -> int:
    """How much of the disk requests of this size read."""
    return content.virtual_size if request >= CHUNK_SIZE else min(content.virtual_size, SMALL_SPAN)


def read_all(sr: LocalSR, content: BlockMap, request: int, hash_it: bool = False) -> float:
    """Seconds to read the disk (or its first SMALL_SPAN bytes) in ``request``-byte reads."""
    buf = bytearray(request)
    view = memoryview(buf)
    size = span(content, request)
    began = time.perf_counter()
    for offset in range(0, size, request):
        piece = view[: min(request, size - offset)]
        sr.read_into(content, offset, piece)
        if hash_it:
            for at in range(0, len(piece), CHUNK_SIZE):
                chunk_digest(piece[at : at + CHUNK_SIZE])
    return time.perf_counter() - began


def hash_speed(seconds: float = 1.0) -> float:
    """MB/s of chunk_digest on 64 KiB pieces, for reference."""
    data = random.Random(2).randbytes(CHUNK_SIZE)
    done = 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        for _ in range(256):
            chunk_digest(data)
        done += 256 * CHUNK_SIZE
    return done / (time.perf_counter() - began) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="the disk's size (default 1G)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--dir", default="/var/tmp", help="where the temporary SR goes")
    args = parser.parse_args()
    size = parse_size(args.size)
    root = Path(tempfile.mkdtemp(prefix="vdifs-bench-verify-", dir=args.dir))
    try:
        print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs")
        print(f"SHA-256 of 64 KiB pieces: {hash_speed():.0f} MB/s (one thread)")
        began = time.monotonic()
        uuid = make_sr(root / "sr", size)
        print(f"SR of {size >> 20} MiB made in {time.monotonic() - began:.1f} s under {root}")
        results: dict[tuple[int, str], list[float]] = {}
        ratios: dict[tuple[int, str], list[float]] = {}
        added: dict[tuple[int, str], list[float]] = {}  # µs per request over off
        plain = LocalSR(root / "sr")
        plain.verify_reads = False
        _record, content = plain.state(uuid)
        warm(root / "sr")
        read_all(plain, content, 1 << 20)  # descriptors open, caches warm
        for n in range(args.rounds):
            order = WAYS[n % len(WAYS) :] + WAYS[: n % len(WAYS)]
            for request in REQUESTS:
                fresh = LocalSR(root / "sr")
                times: dict[str, float] = {}
                runs: dict[str, Callable[[], float]] = {
                    "off": partial(read_all, plain, content, request),
                    "first read": partial(read_all, fresh, content, request),
                    "checked": partial(read_all, fresh, content, request),
                    "hash every read": partial(read_all, plain, content, request, True),
                }
                ways = list(order)
                if ways.index("checked") < ways.index("first read"):
                    ways.remove("checked")  # "checked" is the same object's second pass
                    ways.insert(ways.index("first read") + 1, "checked")
                for way in ways:
                    times[way] = runs[way]()
                fresh.close()
                calls = span(content, request) // request
                for way, seconds in times.items():
                    mbs = span(content, request) / seconds / 1e6
                    results.setdefault((request, way), []).append(mbs)
                    ratios.setdefault((request, way), []).append(times["off"] / seconds)
                    extra = (seconds - times["off"]) / calls * 1e6
                    added.setdefault((request, way), []).append(extra)
        plain.close()
        print("\nLocalSR.read_into, page cache warm, medians of")
        print(f"{args.rounds} rounds: MB/s; per round, the ratio to off and the µs it adds")
        print("to each request:")
        for request in REQUESTS:
            print(f"  requests of {request >> 10} KiB over {span(content, request) >> 20} MiB")
            for way in WAYS:
                mbs = statistics.median(results[request, way])
                ratio = statistics.median(ratios[request, way])
                extra = statistics.median(added[request, way])
                print(f"    {way:16} {mbs:8.0f} MB/s   x{ratio:.2f}  {extra:+8.1f} µs/request")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
