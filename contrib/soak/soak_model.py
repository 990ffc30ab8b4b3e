"""The soak's model: every VDI's content as a recipe per 64 KiB chunk (layers of seeded
pseudo-random bytes), so any state's bytes and checksums can be computed."""

from __future__ import annotations

import errno
import functools
import hashlib
import random
import threading
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
CHUNK = 64 * 1024
RANGE = 64 * 1024
ZERO_CHUNK = bytes(CHUNK)
GONE = (errno.ENOENT, errno.ESTALE)
HISTORY = 256  # versions of a live VDI kept for readers that hold a file open
SKIP = "skip"  # an operation that found nothing to do: not counted


Layer = tuple[int, int, int]  # offset in the chunk, length, seed (0: zeros)
Recipe = tuple[Layer, ...]
Chunks = tuple[Recipe, ...]


class Failure(Exception):
    """Something vdifs must not do: counted as an error."""


# -- the model --------------------------------------------------------------------


def piece(seed: int, length: int) -> bytes:
    return bytes(length) if seed == 0 else random.Random(seed).randbytes(length)


@functools.lru_cache(maxsize=1024)
def render(recipe: Recipe) -> bytes:
    if not recipe:
        return ZERO_CHUNK
    buf = bytearray(CHUNK)
    for off, length, seed in recipe:
        buf[off : off + length] = piece(seed, length)
    return bytes(buf)


def overlay(recipe: Recipe, off: int, length: int, seed: int) -> Recipe:
    if off == 0 and length == CHUNK:
        return () if seed == 0 else ((0, CHUNK, seed),)
    end = off + length
    kept = tuple(lay for lay in recipe if not (off <= lay[0] and lay[0] + lay[1] <= end))
    return (*kept, (off, length, seed))


def split(offset: int, length: int, wseed: int) -> list[tuple[int, int, int, int]]:
    """A write as (chunk index, offset in the chunk, length, seed) pieces."""
    out = []
    pos, end = offset, offset + length
    while pos < end:
        idx, off = divmod(pos, CHUNK)
        n = min(CHUNK - off, end - pos)
        out.append((idx, off, n, 0 if wseed == 0 else (wseed << 32) | idx))
        pos += n
    return out


def write_bytes(offset: int, length: int, wseed: int) -> bytes:
    return b"".join(piece(seed, n) for _, _, n, seed in split(offset, length, wseed))


def model_range(chunks: Chunks, offset: int, length: int) -> bytes:
    out = bytearray()
    pos, end = offset, min(offset + length, len(chunks) * CHUNK)
    while pos < end:
        idx, off = divmod(pos, CHUNK)
        n = min(CHUNK - off, end - pos)
        out += render(chunks[idx])[off : off + n]
        pos += n
    return bytes(out)


def model_sha(chunks: Chunks) -> str:
    h = hashlib.sha256()
    for recipe in chunks:
        h.update(render(recipe))
    return h.hexdigest()


def write_model(chunks: Chunks, path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(len(chunks) * CHUNK)
        for idx, recipe in enumerate(chunks):
            if recipe:
                f.seek(idx * CHUNK)
                f.write(render(recipe))


def apply_write(chunks: list[Recipe], offset: int, length: int, wseed: int) -> None:
    for idx, off, n, seed in split(offset, length, wseed):
        chunks[idx] = overlay(chunks[idx], off, n, seed)


def first_difference(got: bytes, want: bytes) -> str:
    n = min(len(got), len(want))
    at = next((i for i in range(n) if got[i] != want[i]), n)
    what = "zeros" if not any(got) else "data"
    return f"got {len(got)} bytes ({what}), expected {len(want)}; first difference at +{at}"


class Disk:
    """A VDI of ours and the model of its content."""

    def __init__(self, uuid: str, name: str, size: int, role: str) -> None:
        self.uuid, self.name, self.size, self.role = uuid, name, size, role
        self.lock = threading.Lock()  # writes, imports, snapshots, locked reads
        self.chunks: list[Recipe] = [()] * (size // CHUNK)
        self.version = 0
        self.committed = 0  # the latest version known to be committed
        self.history: dict[int, Chunks] = {0: tuple(self.chunks)}
        self.holds: str | None = None  # the snapshot whose content an import left here
        self.tainted = False  # a write failed midway: the model is unknown
        self.recent: deque[tuple[int, int]] = deque(maxlen=64)  # (version, offset) written
        self.trail: deque[str] = deque(maxlen=8)  # what happened to it lately, for errors

    def bump(self, committed: bool = True) -> None:
        self.version += 1
        self.history[self.version] = tuple(self.chunks)
        self.history.pop(self.version - HISTORY, None)
        if committed:
            self.committed = self.version

    def state(self) -> Chunks:
        return tuple(self.chunks)


@dataclass
class Snap:
    uuid: str
    disk: Disk
    chunks: Chunks
    raw_sha: str
    state: str = "alive"  # alive, checkpointing, checkpoint, deleting, deleted
    pins: int = 0  # an upload uses its files
    readers: int = 0


@dataclass
class Expect:
    sha: str
    size: int


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    notes: Counter[str] = field(default_factory=Counter)

    def record(self, kind: str, seconds: float, outcome: str) -> None:
        with self.lock:
            self.latency[kind].append(seconds)
            self.outcomes[kind][outcome] += 1

    def note(self, what: str) -> None:
        with self.lock:
            self.notes[what] += 1

    def total(self) -> int:
        with self.lock:
            return sum(sum(c.values()) for c in self.outcomes.values())
