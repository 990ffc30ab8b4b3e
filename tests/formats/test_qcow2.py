"""Qcow2Layout against qemu-img and libqcow, never only against ourselves.

Each image is checked by the outside tools: ``qemu-img check`` (refcounts,
leaks), ``qemu-img info`` (virtual size, backing chain), ``qemu-img compare``
and ``convert`` (byte equality with the raw disk), ``qcowinfo`` and pyqcow
(an independent reader).  The property test then pins down the segment
contract for arbitrary reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import tracemalloc
from array import array
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdifs.errors import InvalidArgument, TooLarge
from vdifs.formats import c_qcow2
from vdifs.formats.base import Data, ImageIdentity, Meta, ParentRef, ReadVirtual, Zero, render
from vdifs.formats.qcow2 import Qcow2Layout
from vdifs.model import BLOCK_SIZE, CHUNK_SIZE, CHUNKS_PER_BLOCK, FULL_MASK, Allocation

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
SYSTEM_PYTHON = "/usr/bin/python3"
WRITE_WINDOW = 8 * MiB
"""How much of an image is rendered at once when writing it to a file."""

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


# --- building disks and images ---


def allocation_of(virtual_size: int, chunks: Iterable[int]) -> Allocation:
    """An allocation carrying the given chunk numbers."""
    masks_by_block: dict[int, int] = {}
    for chunk in sorted(set(chunks)):
        block, bit = divmod(chunk, CHUNKS_PER_BLOCK)
        masks_by_block[block] = masks_by_block.get(block, 0) | 1 << bit
    return Allocation(
        virtual_size,
        array("Q", masks_by_block),
        array("L", masks_by_block.values()),
    )


def carried_chunks(allocation: Allocation) -> list[int]:
    return [
        block * CHUNKS_PER_BLOCK + bit
        for block, mask in zip(allocation.blocks, allocation.masks, strict=True)
        for bit in range(CHUNKS_PER_BLOCK)
        if mask >> bit & 1
    ]


def identity(tag: int, timestamp: int = 1_700_000_000) -> ImageIdentity:
    return ImageIdentity(uuid=bytes([tag]) * 16, timestamp=timestamp)


def file_reader(path: Path) -> ReadVirtual:
    def read(offset: int, length: int) -> bytes:
        with path.open("rb") as f:
            data = os.pread(f.fileno(), length, offset)
        assert len(data) == length, "read past the end of the raw disk"
        return data

    return read


def write_raw(path: Path, virtual_size: int, chunk_contents: dict[int, bytes]) -> None:
    """A sparse raw disk: the given chunk contents, zeros elsewhere."""
    with path.open("wb") as f:
        f.truncate(virtual_size)
        for chunk, content in chunk_contents.items():
            offset = chunk * CHUNK_SIZE
            os.pwrite(f.fileno(), content[: virtual_size - offset], offset)


def random_chunks(rng: random.Random, virtual_size: int, chunks: Iterable[int]) -> dict[int, bytes]:
    """Random chunk contents, zero past the end of the disk (as a later, grown disk sees them)."""
    contents = {}
    for chunk in chunks:
        inside = min(CHUNK_SIZE, virtual_size - chunk * CHUNK_SIZE)
        contents[chunk] = rng.randbytes(inside) + bytes(CHUNK_SIZE - inside)
    return contents


def write_image(path: Path, layout: Qcow2Layout, read_virtual: ReadVirtual) -> None:
    """Write an image to a sparse file: non-Zero segments only, then the exact size."""
    with path.open("wb") as f:
        for window in range(0, layout.size, WRITE_WINDOW):
            position = window
            for segment in layout.segments(window, WRITE_WINDOW):
                if isinstance(segment, Zero):
                    position += segment.length
                    continue
                data = (
                    segment.data
                    if isinstance(segment, Meta)
                    else read_virtual(segment.virtual_offset, segment.length)
                )
                os.pwrite(f.fileno(), data, position)
                position += len(data)
        f.truncate(layout.size)


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)


def qemu_check(path: Path) -> dict[str, object]:
    result = run("qemu-img", "check", "--output=json", path)
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("leaks", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    return report


def qemu_info(path: Path, *extra: str) -> object:
    result = run("qemu-img", "info", "--output=json", *extra, path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def qemu_compare(image: Path, raw: Path) -> None:
    result = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, raw)
    assert result.returncode == 0, result.stdout + result.stderr


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


PYQCOW_SHA256 = """
import hashlib, sys
import pyqcow
image = pyqcow.file()
image.open(sys.argv[1])
digest = hashlib.sha256()
remaining = image.get_media_size()
while remaining:
    data = image.read_buffer(min(remaining, 4 << 20))
    digest.update(data)
    remaining -= len(data)
print(image.get_media_size(), digest.hexdigest())
"""


def pyqcow_sha256(path: Path) -> tuple[int, str]:
    result = run(SYSTEM_PYTHON, "-c", PYQCOW_SHA256, path)
    if result.returncode != 0 and "No module named 'pyqcow'" in result.stderr:
        pytest.skip("python3-libqcow is not installed")
    assert result.returncode == 0, result.stderr
    size, digest = result.stdout.split()
    return int(size), digest


def make_full(
    tmp_path: Path, name: str, virtual_size: int, chunks: Iterable[int], seed: int = 0
) -> tuple[Path, Path, Qcow2Layout]:
    """Raw disk plus its full qcow2, written through Qcow2Layout."""
    rng = random.Random(seed)
    raw = tmp_path / f"{name}.raw"
    write_raw(raw, virtual_size, random_chunks(rng, virtual_size, chunks))
    allocation = allocation_of(virtual_size, chunks)
    layout = Qcow2Layout(allocation, identity(seed + 1))
    image = tmp_path / f"{name}.qcow2"
    write_image(image, layout, file_reader(raw))
    return raw, image, layout


# --- single images ---


SIZE_CASES = {
    "1MiB+512 with the last partial cluster": (MiB + 512, [0, 3, 16]),
    "5MiB sparse": (5 * MiB, [1, 2, 40, 79]),
    "5MiB fully allocated": (5 * MiB, range(80)),
    "700MiB needs a second L2 table": (
        700 * MiB + 512,
        [0, 1, 31, 32, 8191, 8192, 8193, 700 * MiB // CHUNK_SIZE],
    ),
    "empty 5MiB": (5 * MiB, []),
    "zero bytes": (0, []),
    "one sector": (512, [0]),
}


@needs_qemu
@pytest.mark.parametrize("case", SIZE_CASES, ids=list(SIZE_CASES))
def test_full_image_matches_raw(tmp_path: Path, case: str) -> None:
    virtual_size, chunks = SIZE_CASES[case]
    raw, image, layout = make_full(tmp_path, "full", virtual_size, chunks)

    assert image.stat().st_size == layout.size
    qemu_check(image)
    info = qemu_info(image)
    assert isinstance(info, dict)
    assert info["virtual-size"] == virtual_size
    assert info["cluster-size"] == CHUNK_SIZE
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert "backing-filename" not in info
    qemu_compare(image, raw)


@needs_qemu
def test_layout_order_is_metadata_then_ascending_data(tmp_path: Path) -> None:
    """qcow-stream-tool's constraint: data clusters last, contiguous, in virtual order."""
    virtual_size, chunks = SIZE_CASES["700MiB needs a second L2 table"]
    _raw, image, layout = make_full(tmp_path, "full", virtual_size, chunks)
    result = run("qemu-img", "map", "--output=json", image)
    assert result.returncode == 0, result.stderr
    extents = [e for e in json.loads(result.stdout) if e["data"]]
    host_offsets = [e["offset"] for e in extents]
    assert host_offsets == sorted(host_offsets)
    data_clusters = sum(-(-e["length"] // CHUNK_SIZE) for e in extents)
    assert data_clusters == len(chunks)
    assert host_offsets[0] == layout.size - data_clusters * CHUNK_SIZE
    assert layout.allocated_bytes == layout.size - (CHUNK_SIZE - 512)  # last cluster's tail


@needs_qemu
@pytest.mark.parametrize("case", ["1MiB+512 with the last partial cluster", "5MiB sparse"])
def test_libqcow_reads_the_same_bytes(tmp_path: Path, case: str) -> None:
    virtual_size, chunks = SIZE_CASES[case]
    raw, image, _layout = make_full(tmp_path, "full", virtual_size, chunks)
    result = run("qcowinfo", image)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"({virtual_size} bytes)" in result.stdout
    assert pyqcow_sha256(image) == (virtual_size, sha256_of(raw))


def test_header_fields_and_identity_extension() -> None:
    layout = Qcow2Layout(allocation_of(5 * MiB, [3]), identity(7, timestamp=1234))
    header = render(layout, 0, CHUNK_SIZE, lambda offset, length: bytes(length))
    v2 = c_qcow2.HEADER_V2.unpack_from(header)
    incompatible, compatible, autoclear, refcount_order, header_length = (
        c_qcow2.HEADER_V3_TAIL.unpack_from(header, c_qcow2.HEADER_V2.size)
    )
    assert v2[:2] == (c_qcow2.MAGIC, 3)
    assert v2[2:4] == (0, 0)  # no backing file
    assert v2[4] == 16 and v2[5] == 5 * MiB
    assert (incompatible, compatible, autoclear) == (0, 0, 0)
    assert (refcount_order, header_length) == (4, 112)
    magic, length = c_qcow2.EXTENSION_HEADER.unpack_from(header, 112)
    assert (magic, length) == (c_qcow2.EXT_VDIFS_IDENTITY, 24)
    assert c_qcow2.VDIFS_IDENTITY_FULL.unpack_from(header, 120) == (b"\x07" * 16, 1234)
    assert header[144:152] == bytes(8)  # end of extensions


def test_output_is_deterministic() -> None:
    allocation = allocation_of(9 * MiB, [0, 5, 100])

    def read(offset: int, length: int) -> bytes:
        return bytes(length)

    first = Qcow2Layout(allocation, identity(1))
    second = Qcow2Layout(allocation, identity(1))
    assert render(first, 0, first.size, read) == render(second, 0, second.size, read)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="uuid"):
        Qcow2Layout(allocation_of(MiB, []), ImageIdentity(b"short", 0))
    with pytest.raises(ValueError, match="past the virtual size"):
        Qcow2Layout(allocation_of(MiB, [16]), identity(1))
    with pytest.raises(ValueError, match="ascending"):
        Qcow2Layout(Allocation(8 * MiB, array("Q", [2, 1]), array("L", [1, 1])), identity(1))
    with pytest.raises(InvalidArgument, match="plain file name"):
        Qcow2Layout(allocation_of(MiB, []), identity(1), ParentRef(identity(2), "../x.qcow2"))
    with pytest.raises(TooLarge):
        Qcow2Layout(Allocation(4 * 1024 * TiB), identity(1))


# --- chains ---


@needs_qemu
def test_delta_chains_two_and_three_deep(tmp_path: Path) -> None:
    """base <- delta1 <- delta2, each delta saved beside its base under the base's name."""
    rng = random.Random(42)
    base_size = 20 * MiB + 512
    grown_size = 24 * MiB  # the disk grew between the base and the last delta
    base_chunks = random_chunks(rng, base_size, [0, 1, 2, 17, 100, base_size // CHUNK_SIZE])
    base_identity = identity(1)
    write_raw(tmp_path / "v0.raw", base_size, base_chunks)
    base_layout = Qcow2Layout(allocation_of(base_size, base_chunks), base_identity)
    base_image = tmp_path / f"{base_identity.uuid.hex()}.qcow2"
    write_image(base_image, base_layout, file_reader(tmp_path / "v0.raw"))

    # Version 1: rewrite chunk 1, zero chunk 2 (carried as zeros), add chunk 50 and the tail.
    v1_chunks = dict(base_chunks)
    v1_changes = {1: rng.randbytes(CHUNK_SIZE), 2: bytes(CHUNK_SIZE), 50: rng.randbytes(CHUNK_SIZE)}
    v1_changes.update(random_chunks(rng, base_size, [base_size // CHUNK_SIZE]))
    v1_chunks.update(v1_changes)
    # Version 2: grown disk, rewrite chunk 0, write past the old end.
    v2_chunks = dict(v1_chunks)
    v2_changes = {0: rng.randbytes(CHUNK_SIZE), 370: rng.randbytes(CHUNK_SIZE)}
    v2_chunks.update(v2_changes)

    chain = [base_image]
    parent_identity = base_identity
    for version, (size, contents, changes) in enumerate(
        [(base_size, v1_chunks, v1_changes), (grown_size, v2_chunks, v2_changes)], start=1
    ):
        raw = tmp_path / f"v{version}.raw"
        write_raw(raw, size, contents)
        delta_identity = identity(version + 1)
        layout = Qcow2Layout(
            allocation_of(size, changes),
            delta_identity,
            ParentRef(parent_identity, chain[-1].name),
        )
        image = tmp_path / f"{delta_identity.uuid.hex()}.qcow2"
        write_image(image, layout, file_reader(raw))
        chain.append(image)
        parent_identity = delta_identity

        qemu_check(image)
        info = qemu_info(image, "--backing-chain")
        assert isinstance(info, list)
        assert [entry["filename"] for entry in info] == [str(p) for p in reversed(chain)]
        assert info[0]["backing-filename"] == chain[-2].name
        assert info[0]["backing-filename-format"] == "qcow2"
        assert info[0]["virtual-size"] == size
        qemu_compare(image, raw)
        converted = tmp_path / f"v{version}.converted"
        result = run("qemu-img", "convert", "-O", "raw", image, converted)
        assert result.returncode == 0, result.stderr
        assert sha256_of(converted) == sha256_of(raw)
    qemu_check(base_image)


def test_delta_header_names_its_parent() -> None:
    parent = ParentRef(identity(9), "0909.qcow2")
    layout = Qcow2Layout(allocation_of(MiB, [1]), identity(3), parent)
    header = render(layout, 0, CHUNK_SIZE, lambda offset, length: bytes(length))
    backing_offset, backing_size = struct.unpack_from(">QI", header, 8)
    assert header[backing_offset : backing_offset + backing_size] == b"0909.qcow2"
    magic, length = c_qcow2.EXTENSION_HEADER.unpack_from(header, 112)
    assert (magic, length) == (c_qcow2.EXT_BACKING_FORMAT, 5)
    assert header[120:125] == b"qcow2"
    magic, length = c_qcow2.EXTENSION_HEADER.unpack_from(header, 128)
    assert (magic, length) == (c_qcow2.EXT_VDIFS_IDENTITY, c_qcow2.VDIFS_IDENTITY_DELTA.size)
    uuid, _timestamp, parent_uuid = c_qcow2.VDIFS_IDENTITY_DELTA.unpack_from(header, 136)
    assert (uuid, parent_uuid) == (b"\x03" * 16, b"\x09" * 16)


# --- the segment contract, for any allocation and any read ---


def pattern_reader(offset: int, length: int) -> bytes:
    """Virtual disk bytes that differ everywhere: each 8-byte word holds its own offset."""
    first_word = offset // 8
    words = array("Q", range(first_word, -(-(offset + length) // 8) + 1))
    raw = words.tobytes()
    skip = offset - first_word * 8
    return raw[skip : skip + length]


@st.composite
def allocations(draw: st.DrawFn) -> Allocation:
    """Up to 1.5 GiB disks (so up to three L2 tables) with a few carried chunks and runs."""
    virtual_size = draw(st.integers(0, 3 * 512 * MiB // 512)) * 512
    virtual_clusters = -(-virtual_size // CHUNK_SIZE)
    if virtual_clusters == 0:
        return Allocation(0)
    near_edges = st.sampled_from(
        sorted({0, virtual_clusters - 1, min(8191, virtual_clusters - 1), virtual_clusters // 2})
    )
    chunks = draw(st.lists(st.integers(0, virtual_clusters - 1) | near_edges, max_size=40))
    # Runs of neighbours too, across block edges (reads serve a run as one Data).
    for first, count in draw(
        st.lists(st.tuples(st.integers(0, virtual_clusters - 1), st.integers(1, 70)), max_size=4)
    ):
        chunks += range(first, min(first + count, virtual_clusters))
    return allocation_of(virtual_size, chunks)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(allocation=allocations(), data=st.data())
def test_segments_of_any_range_match_the_whole_image(
    allocation: Allocation, data: st.DataObject
) -> None:
    layout = Qcow2Layout(allocation, identity(5))
    whole = render(layout, 0, layout.size, pattern_reader)
    assert len(whole) == layout.size
    carried = set(carried_chunks(allocation))
    for _ in range(8):
        offset = data.draw(st.integers(0, layout.size + CHUNK_SIZE))
        length = data.draw(st.integers(0, 3 * CHUNK_SIZE) | st.integers(0, layout.size))
        segments = list(layout.segments(offset, length))
        assert render(layout, offset, length, pattern_reader) == whole[offset : offset + length]
        for previous, segment in pairwise(segments):
            assert not (isinstance(previous, Zero) and isinstance(segment, Zero))
            assert not (isinstance(previous, Meta) and isinstance(segment, Meta))
        for segment in segments:
            if isinstance(segment, Data):
                assert segment.length > 0
                assert segment.virtual_offset + segment.length <= allocation.virtual_size
                first = segment.virtual_offset // CHUNK_SIZE
                last = (segment.virtual_offset + segment.length - 1) // CHUNK_SIZE
                assert all(chunk in carried for chunk in range(first, last + 1))
            elif isinstance(segment, Zero):
                assert segment.length > 0
    non_zero = sum(
        len(s.data) if isinstance(s, Meta) else s.length
        for s in layout.segments(0, layout.size)
        if not isinstance(s, Zero)
    )
    assert non_zero <= layout.allocated_bytes <= layout.size


# --- scale ---


def scattered_allocation(virtual_size: int, count: int, seed: int) -> Allocation:
    rng = random.Random(seed)
    virtual_clusters = virtual_size // CHUNK_SIZE
    chunks = {rng.randrange(virtual_clusters) for _ in range(count)} | {0, virtual_clusters - 1}
    return allocation_of(virtual_size, chunks)


@needs_qemu
def test_sparse_16_tib_disk(tmp_path: Path) -> None:
    virtual_size = 16 * TiB
    allocation = scattered_allocation(virtual_size, 60, seed=3)
    layout = Qcow2Layout(allocation, identity(4))
    l2_tables = len({chunk // 8192 for chunk in carried_chunks(allocation)})
    l1_clusters = 16 * TiB // (512 * MiB) * 8 // CHUNK_SIZE
    metadata_clusters = 1 + 1 + 1 + l1_clusters + l2_tables
    assert layout.size == (metadata_clusters + allocation.chunk_count) * CHUNK_SIZE

    metadata_size = metadata_clusters * CHUNK_SIZE
    tracemalloc.start()
    try:
        for offset in range(0, metadata_size, 3 * CHUNK_SIZE + 8):
            for _segment in layout.segments(offset, 3 * CHUNK_SIZE + 8):
                pass
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MiB

    image = tmp_path / "big.qcow2"
    write_image(image, layout, pattern_reader)
    qemu_check(image)
    info = qemu_info(image)
    assert isinstance(info, dict) and info["virtual-size"] == virtual_size
    result = run("qemu-img", "map", "--output=json", image)
    assert result.returncode == 0, result.stderr
    mapped = [(e["start"], e["length"]) for e in json.loads(result.stdout) if e["data"]]
    expected = [(chunk * CHUNK_SIZE, CHUNK_SIZE) for chunk in carried_chunks(allocation)]
    assert _merge_runs(mapped) == _merge_runs(expected)
    # Spot-check the bytes of a few carried clusters through qemu itself.
    for chunk in carried_chunks(allocation)[:3]:
        offset = chunk * CHUNK_SIZE
        assert qemu_read(image, offset, CHUNK_SIZE, tmp_path) == pattern_reader(offset, CHUNK_SIZE)


def qemu_read(image: Path, offset: int, length: int, tmp_path: Path) -> bytes:
    """Bytes of a qcow2's virtual disk as qemu reads them (a raw window over the image)."""
    out = tmp_path / "window.raw"
    window = (
        f"driver=raw,offset={offset},size={length},file.driver=qcow2,file.file.filename={image}"
    )
    result = run("qemu-img", "convert", "--image-opts", window, "-O", "raw", out)
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


def _merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in sorted(runs):
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    return merged


def test_reads_of_a_large_disk_stay_small() -> None:
    """A full 2 TiB disk (1M blocks): exact size, cheap reads anywhere, little memory."""
    blocks = 1 << 20
    allocation = Allocation(
        blocks * BLOCK_SIZE, array("Q", range(blocks)), array("L", [FULL_MASK]) * blocks
    )
    layout = Qcow2Layout(allocation, identity(6))
    data_clusters = blocks * CHUNKS_PER_BLOCK
    # header + 1 refcount table cluster + 1 L1 cluster (4096 entries) + 4096 L2 tables + data
    # = 33_558_531 clusters, which 1025 refcount blocks of 32768 entries cover with themselves.
    assert layout.size == (33_558_531 + 1025) * CHUNK_SIZE
    data_start = layout.size - data_clusters * CHUNK_SIZE
    assert layout.allocated_bytes == layout.size

    tracemalloc.start()
    try:
        probes = [0, CHUNK_SIZE, data_start - 3 * CHUNK_SIZE, data_start - 100, layout.size - 10]
        for offset in probes:
            segments = list(layout.segments(offset, 2 * MiB))
            assert sum(len(s.data) if isinstance(s, Meta) else s.length for s in segments) == min(
                2 * MiB, layout.size - offset
            )
        middle = data_start + 123_456 * CHUNK_SIZE + 100
        assert list(layout.segments(middle, 4 * MiB)) == [Data(123_456 * CHUNK_SIZE + 100, 4 * MiB)]
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB
