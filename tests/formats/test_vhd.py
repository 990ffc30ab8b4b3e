"""VhdLayout checked against qemu-img and libvhdi, never only against ourselves."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import time
import tracemalloc
import uuid
from array import array
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdifs.errors import TooLarge
from vdifs.formats import c_vhd
from vdifs.formats.base import Data, ImageIdentity, Meta, ParentRef, Zero, render
from vdifs.formats.vhd import VhdLayout
from vdifs.model import BLOCK_SIZE, CHUNK_SIZE, CHUNKS_PER_BLOCK, FULL_MASK, SECTOR_SIZE, Allocation

MiB = 1024 * 1024
GiB = 1024 * MiB
QEMU_IMG = shutil.which("qemu-img")
VHDIINFO = shutil.which("vhdiinfo")
VHDIMOUNT = shutil.which("vhdimount")
FUSERMOUNT = shutil.which("fusermount3")
SYSTEM_PYTHON = "/usr/bin/python3"
TIMESTAMP = 1_700_000_000

needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img (qemu-utils) not installed")
needs_vhdiinfo = pytest.mark.skipif(VHDIINFO is None, reason="vhdiinfo (libvhdi-utils) missing")

# Reads a chain of VHDs (oldest first) with libvhdi and prints the leaf's
# sha256, media size and disk type.
PYVHDI_READ_CHAIN = r"""
import hashlib, sys, pyvhdi
files = []
for path in sys.argv[1:]:
    image = pyvhdi.file()
    image.open(path)
    if files:
        image.set_parent(files[-1])
    files.append(image)
leaf = files[-1]
digest = hashlib.sha256()
offset = 0
while offset < leaf.media_size:
    length = min(1 << 22, leaf.media_size - offset)
    digest.update(leaf.read_buffer_at_offset(length, offset))
    offset += length
print(digest.hexdigest(), leaf.media_size, leaf.disk_type)
"""


@cache
def have_pyvhdi() -> bool:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import pyvhdi"], capture_output=True)
    return probe.returncode == 0


def pyvhdi_read(chain: list[Path]) -> tuple[str, int, int]:
    if not have_pyvhdi():
        pytest.skip("pyvhdi (python3-libvhdi) is not importable by /usr/bin/python3")
    out = subprocess.run(
        [SYSTEM_PYTHON, "-c", PYVHDI_READ_CHAIN, *map(str, chain)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1]), int(out[2])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(1 << 22):
            digest.update(piece)
    return digest.hexdigest()


def qemu_info(path: Path) -> dict[str, object]:
    assert QEMU_IMG is not None
    out = subprocess.run(
        [QEMU_IMG, "info", "--output=json", "-f", "vpc", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info: dict[str, object] = json.loads(out)
    return info


def qemu_compare(vhd: Path, raw: Path) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None
    return subprocess.run(
        [QEMU_IMG, "compare", "-f", "vpc", "-F", "raw", str(vhd), str(raw)],
        capture_output=True,
        text=True,
    )


def vhdiinfo(path: Path) -> str:
    assert VHDIINFO is not None
    return subprocess.run([VHDIINFO, str(path)], capture_output=True, text=True, check=True).stdout


# --- building disks -----------------------------------------------------------------


def chunk_count(virtual_size: int) -> int:
    return -(-virtual_size // CHUNK_SIZE)


def allocation_of(virtual_size: int, chunks: Iterable[int]) -> Allocation:
    """The allocation carrying exactly ``chunks`` (global chunk indexes)."""
    masks_by_block: dict[int, int] = {}
    for chunk in chunks:
        assert chunk < chunk_count(virtual_size)
        block, bit = divmod(chunk, CHUNKS_PER_BLOCK)
        masks_by_block[block] = masks_by_block.get(block, 0) | 1 << bit
    blocks = sorted(masks_by_block)
    return Allocation(
        virtual_size, array("Q", blocks), array("L", (masks_by_block[b] for b in blocks))
    )


def carried_chunks(allocation: Allocation) -> set[int]:
    return {
        block * CHUNKS_PER_BLOCK + bit
        for block, mask in zip(allocation.blocks, allocation.masks, strict=True)
        for bit in range(CHUNKS_PER_BLOCK)
        if mask >> bit & 1
    }


def chunk_range(virtual_size: int, chunk: int) -> slice:
    return slice(chunk * CHUNK_SIZE, min((chunk + 1) * CHUNK_SIZE, virtual_size))


def random_content(virtual_size: int, chunks: Iterable[int], rng: random.Random) -> bytearray:
    """Random bytes in ``chunks``, zeros elsewhere."""
    content = bytearray(virtual_size)
    for chunk in chunks:
        span = chunk_range(virtual_size, chunk)
        content[span] = rng.randbytes(span.stop - span.start)
    return content


def identity(rng: random.Random, timestamp: int = TIMESTAMP) -> ImageIdentity:
    return ImageIdentity(rng.randbytes(16), timestamp)


def reader_of(content: bytes | bytearray) -> Callable[[int, int], bytes]:
    view = memoryview(content)

    def read(offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= len(content)
        return bytes(view[offset : offset + length])

    return read


def write_image(path: Path, layout: VhdLayout, read_virtual: Callable[[int, int], bytes]) -> None:
    """Render the image in pieces, as a FUSE read loop would."""
    step = 3 * MiB + 1234  # deliberately not aligned to anything
    with path.open("wb") as f:
        for offset in range(0, layout.size, step):
            f.write(render(layout, offset, step, read_virtual))
    assert path.stat().st_size == layout.size


def file_reader(path: Path) -> Callable[[int, int], bytes]:
    """Read the virtual disk from a raw file, as the storage layer would."""
    size = path.stat().st_size

    def read(offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= size
        with path.open("rb") as f:
            return os.pread(f.fileno(), length, offset)

    return read


def build_full(
    tmp_path: Path, virtual_size: int, chunks: Iterable[int], rng: random.Random, name: str = "full"
) -> tuple[Path, Path, VhdLayout]:
    """A raw file (sparse: random carried chunks, holes elsewhere) and its full VHD."""
    chunks = sorted(set(chunks))
    raw = tmp_path / f"{name}.raw"
    with raw.open("wb") as f:
        f.truncate(virtual_size)
        for chunk in chunks:
            span = chunk_range(virtual_size, chunk)
            os.pwrite(f.fileno(), rng.randbytes(span.stop - span.start), span.start)
    layout = VhdLayout(allocation_of(virtual_size, chunks), identity(rng))
    vhd = tmp_path / f"{name}.vhd"
    write_image(vhd, layout, file_reader(raw))
    return vhd, raw, layout


# --- full (dynamic) images ---------------------------------------------------------------

SIZE_CASES = {
    # name: (virtual size, chooser of carried chunks from all chunk indexes)
    "1MiB+512-empty": (MiB + 512, lambda n, rng: []),
    "1MiB+512-full": (MiB + 512, lambda n, rng: range(n)),
    "2MiB-full": (2 * MiB, lambda n, rng: range(n)),
    "5MiB-random": (5 * MiB, lambda n, rng: rng.sample(range(n), n // 3)),
    "5MiB-empty": (5 * MiB, lambda n, rng: []),
    "last-partial-block": (6 * MiB + CHUNK_SIZE + 1024, lambda n, rng: [0, n - 2, n - 1]),
    "last-partial-chunk-only": (4 * MiB + 1536, lambda n, rng: [n - 1]),
    "64MiB-full": (64 * MiB, lambda n, rng: range(n)),
    "64MiB-sparse": (64 * MiB, lambda n, rng: rng.sample(range(n), 40)),
}


@needs_qemu
@pytest.mark.parametrize("case", SIZE_CASES)
def test_full_image_matches_raw_in_qemu_and_libvhdi(tmp_path: Path, case: str) -> None:
    virtual_size, choose = SIZE_CASES[case]
    rng = random.Random(case)
    vhd, raw, _ = build_full(tmp_path, virtual_size, choose(chunk_count(virtual_size), rng), rng)

    info = qemu_info(vhd)
    assert info["format"] == "vpc"
    assert info["virtual-size"] == virtual_size
    compared = qemu_compare(vhd, raw)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert "identical" in compared.stdout

    if VHDIINFO is not None:
        text = vhdiinfo(vhd)
        assert "Disk type\t\t: Dynamic" in text
        assert f"({virtual_size} bytes)" in text
    digest, media_size, disk_type = pyvhdi_read([vhd])
    assert (digest, media_size, disk_type) == (sha256_file(raw), virtual_size, 3)


@needs_qemu
def test_qemu_trusts_current_size_where_chs_would_be_short(tmp_path: Path) -> None:
    """10 GiB is 40 KiB more than its CHS geometry: qemu must still see 10 GiB."""
    virtual_size = 10 * GiB
    geometry = c_vhd.geometry_for(virtual_size)
    assert geometry == (20805, 16, 63)
    chs_size = geometry.cylinders * geometry.heads * geometry.sectors_per_track * SECTOR_SIZE
    assert chs_size < virtual_size
    rng = random.Random(10)
    last_chunk = chunk_count(virtual_size) - 1
    vhd, raw, _ = build_full(tmp_path, virtual_size, [0, last_chunk], rng)
    assert qemu_info(vhd)["virtual-size"] == virtual_size
    compared = qemu_compare(vhd, raw)
    assert compared.returncode == 0, compared.stdout + compared.stderr


# --- structure -----------------------------------------------------------------------------


def parse_structures(image: bytes) -> tuple[tuple[object, ...], tuple[object, ...], list[int]]:
    """Footer and header fields and BAT values, read with the c_vhd structs."""
    footer = c_vhd.FOOTER.unpack(image[-512:])
    header = c_vhd.HEADER.unpack(image[512:1536])
    table_offset = header[2]
    assert isinstance(table_offset, int)
    entries = header[4]
    assert isinstance(entries, int)
    bat = [
        c_vhd.BAT_ENTRY.unpack_from(image, table_offset + 4 * i)[0]
        for i in range(c_vhd.round_up_to_sector(4 * entries) // 4)
    ]
    return footer, header, bat


def test_structure_fields_checksums_and_bitmaps() -> None:
    rng = random.Random(1)
    virtual_size = 4 * MiB + 3 * CHUNK_SIZE + 512  # last chunk holds one sector
    chunks = [1, 2, 33, 67]  # block 0 chunks 1,2; block 1 chunk 1; block 2 chunk 3 (partial)
    me = ImageIdentity(rng.randbytes(16), c_vhd.VHD_EPOCH_UNIX + 12345)
    layout = VhdLayout(allocation_of(virtual_size, chunks), me)
    image = render(layout, 0, layout.size, lambda offset, length: b"\x01" * length)
    assert len(image) == layout.size
    assert image[:512] == image[-512:]

    footer, header, bat = parse_structures(image)
    assert footer[0] == c_vhd.FOOTER_COOKIE
    assert footer[1:4] == (2, 0x00010000, 512)
    assert footer[4] == 12345
    assert footer[5] == c_vhd.CREATOR_APPLICATION
    assert footer[8] == footer[9] == virtual_size
    assert tuple(footer[10:13]) == c_vhd.geometry_for(virtual_size)
    assert footer[13] == c_vhd.DISK_TYPE_DYNAMIC
    assert footer[14] == c_vhd.checksum(image[-512:], c_vhd.FOOTER_CHECKSUM_OFFSET)
    assert footer[15] == me.uuid
    assert header[0] == c_vhd.HEADER_COOKIE
    assert header[1] == 0xFFFF_FFFF_FFFF_FFFF
    assert header[2] == 1536  # no locator data for a dynamic disk
    assert header[4:6] == (3, BLOCK_SIZE)
    assert header[6] == c_vhd.checksum(image[512:1536], c_vhd.HEADER_CHECKSUM_OFFSET)
    assert header[7] == bytes(16)
    data_start = 1536 + 512
    stride = 512 + BLOCK_SIZE
    assert bat[:3] == [(data_start + k * stride) // 512 for k in range(3)]
    assert bat[3:] == [c_vhd.BAT_UNUSED] * 125

    def bitmap(k: int) -> bytes:
        return image[data_start + k * stride : data_start + k * stride + 512]

    assert bitmap(0) == bytes(16) + b"\xff" * 32 + bytes(512 - 48)
    assert bitmap(1) == bytes(16) + b"\xff" * 16 + bytes(512 - 32)
    assert bitmap(2) == bytes(48) + b"\x80" + bytes(512 - 49)
    # Data of non-carried chunks is zero; carried chunk data is the disk's.
    block_2_data = image[data_start + 2 * stride + 512 : data_start + 3 * stride]
    assert block_2_data == bytes(3 * CHUNK_SIZE) + b"\x01" * 512 + bytes(
        BLOCK_SIZE - 3 * CHUNK_SIZE - 512
    )


def test_same_inputs_give_same_bytes() -> None:
    rng = random.Random(2)
    allocation = allocation_of(7 * MiB + 512, rng.sample(range(chunk_count(7 * MiB)), 20))
    me, base = identity(rng), identity(rng)
    parent = ParentRef(base, f"{uuid.UUID(bytes=base.uuid)}.vhd")
    content = rng.randbytes(allocation.virtual_size)

    def image(who: ImageIdentity) -> bytes:
        layout = VhdLayout(allocation, who, parent)
        return render(layout, 0, layout.size, reader_of(content))

    assert image(me) == image(me)
    assert image(me) != image(identity(rng))


def test_segments_are_merged() -> None:
    allocation = allocation_of(4 * MiB, [0, 1, 2, 5, 32, 33])
    layout = VhdLayout(allocation, identity(random.Random(3)))
    segments = list(layout.segments(0, layout.size))
    kinds = [type(s).__name__ for s in segments]
    # prologue, BAT, bitmap | chunks 0-2 | zero | chunk 5 | zero | bitmap | chunks 32-33 | zero
    # | footer
    assert kinds == ["Meta", "Data", "Zero", "Data", "Zero", "Meta", "Data", "Zero", "Meta"]
    assert segments[1] == Data(0, 3 * CHUNK_SIZE)
    assert segments[6] == Data(BLOCK_SIZE, 2 * CHUNK_SIZE)


def test_refuses_bad_allocations() -> None:
    me = identity(random.Random(4))
    with pytest.raises(ValueError):
        VhdLayout(Allocation(2 * MiB, array("Q", [1]), array("L", [1])), me)
    with pytest.raises(ValueError):
        VhdLayout(Allocation(8 * MiB, array("Q", [2, 1]), array("L", [1, 1])), me)
    with pytest.raises(ValueError):
        VhdLayout(Allocation(8 * MiB), ImageIdentity(b"short", 0))


# --- differencing chains ---------------------------------------------------------------------


def next_state(previous: bytearray, rng: random.Random) -> tuple[bytearray, list[int]]:
    """Change, zero and newly fill some chunks; return the state and the chunks that differ."""
    virtual_size = len(previous)
    current = bytearray(previous)
    chunks = range(chunk_count(virtual_size))
    nonzero = [c for c in chunks if any(previous[chunk_range(virtual_size, c)])]
    for chunk in rng.sample(nonzero, min(3, len(nonzero))):  # become zero
        span = chunk_range(virtual_size, chunk)
        current[span] = bytes(span.stop - span.start)
    for chunk in rng.sample(list(chunks), 12):  # rewritten or newly written
        span = chunk_range(virtual_size, chunk)
        current[span] = rng.randbytes(span.stop - span.start)
    current[-512:] = rng.randbytes(512)  # always touch the last, partial block
    differing = [
        c
        for c in chunks
        if current[chunk_range(virtual_size, c)] != previous[chunk_range(virtual_size, c)]
    ]
    return current, differing


def masked(content: bytes | bytearray, chunks: Iterable[int]) -> bytearray:
    """What a reader ignoring parents and bitmaps (qemu) sees in a delta."""
    out = bytearray(len(content))
    for chunk in chunks:
        span = chunk_range(len(content), chunk)
        out[span] = content[span]
    return out


def build_chain(
    tmp_path: Path, virtual_size: int, depth: int, rng: random.Random
) -> list[tuple[Path, Path, VhdLayout, list[int]]]:
    """A full image and ``depth - 1`` deltas, each named ``<uuid>.vhd`` with its raw state."""
    chain: list[tuple[Path, Path, VhdLayout, list[int]]] = []
    state = random_content(virtual_size, rng.sample(range(chunk_count(virtual_size)), 30), rng)
    chunks = [
        c for c in range(chunk_count(virtual_size)) if any(state[chunk_range(virtual_size, c)])
    ]
    parent: ParentRef | None = None
    for generation in range(depth):
        if generation:
            state, chunks = next_state(state, rng)
        me = identity(rng, TIMESTAMP + generation)
        layout = VhdLayout(allocation_of(virtual_size, chunks), me, parent)
        vhd = tmp_path / f"{uuid.UUID(bytes=me.uuid)}.vhd"
        raw = tmp_path / f"state{generation}.raw"
        raw.write_bytes(state)
        write_image(vhd, layout, reader_of(state))
        chain.append((vhd, raw, layout, chunks))
        parent = ParentRef(me, vhd.name)
    return chain


@pytest.fixture(scope="module")
def chain(
    tmp_path_factory: pytest.TempPathFactory,
) -> list[tuple[Path, Path, VhdLayout, list[int]]]:
    return build_chain(tmp_path_factory.mktemp("chain"), 9 * MiB + 512, 3, random.Random(5))


def test_chain_reads_newest_state_in_libvhdi(
    chain: list[tuple[Path, Path, VhdLayout, list[int]]],
) -> None:
    paths = [vhd for vhd, *_ in chain]
    for depth in range(1, len(chain) + 1):
        raw = chain[depth - 1][1]
        digest, media_size, disk_type = pyvhdi_read(paths[:depth])
        assert digest == sha256_file(raw), f"depth {depth}"
        assert media_size == raw.stat().st_size
        assert disk_type == (3 if depth == 1 else 4)


def test_chain_structure(chain: list[tuple[Path, Path, VhdLayout, list[int]]]) -> None:
    for generation in range(1, len(chain)):
        parent_vhd = chain[generation - 1][0]
        vhd, _, _, chunks = chain[generation]
        image = vhd.read_bytes()
        footer, header, bat = parse_structures(image)
        assert footer[13] == c_vhd.DISK_TYPE_DIFFERENCING
        assert header[7] == parent_vhd.read_bytes()[-512:][68:84]  # the parent's footer uuid
        assert header[8] == c_vhd.unix_to_vhd_time(TIMESTAMP + generation - 1)
        name, locators = header[10], header[11]
        assert isinstance(name, bytes) and isinstance(locators, bytes)
        assert name.decode("utf-16-be").rstrip("\0") == parent_vhd.name
        platform, space, length, _, offset = c_vhd.PARENT_LOCATOR.unpack_from(locators, 0)
        assert platform == c_vhd.PLATFORM_MACX
        assert locators[c_vhd.PARENT_LOCATOR.size :] == bytes(7 * c_vhd.PARENT_LOCATOR.size)
        assert image[offset : offset + length] == f"file://./{parent_vhd.name}".encode()
        assert space * 512 >= length
        assert header[2] == offset + space * 512  # the BAT follows the locator data
        used = [entry for entry in bat if entry != c_vhd.BAT_UNUSED]
        assert used == sorted(used)
        assert len(used) == len({c // CHUNKS_PER_BLOCK for c in chunks})
        # A delta carries whole blocks (as vhd-tool does): every sector inside the
        # disk is marked, whichever chunks of the block differ.
        virtual_size = vhd.with_name(f"state{generation}.raw").stat().st_size
        for block, entry in enumerate(bat):
            if entry == c_vhd.BAT_UNUSED:
                continue
            bitmap = image[entry * 512 : entry * 512 + 512]
            assert any(c // CHUNKS_PER_BLOCK == block for c in chunks)
            for bit in range(CHUNKS_PER_BLOCK):
                span = chunk_range(virtual_size, block * CHUNKS_PER_BLOCK + bit)
                sectors = max(0, span.stop - span.start) // 512
                expected = b"\xff" * (sectors // 8) + bytes([0xFF00 >> (sectors % 8) & 0xFF])
                assert bitmap[bit * 16 : bit * 16 + 16] == expected[:16].ljust(16, b"\0")


def test_chain_parent_fields_in_vhdiinfo(
    chain: list[tuple[Path, Path, VhdLayout, list[int]]],
) -> None:
    if VHDIINFO is None:
        pytest.skip("vhdiinfo (libvhdi-utils) missing")
    base_vhd, delta_vhd = chain[0][0], chain[1][0]
    text = vhdiinfo(delta_vhd)
    assert "Disk type\t\t: Differential" in text
    assert f"Parent identifier\t: {base_vhd.stem}" in text
    assert f"Parent filename\t\t: {base_vhd.name}" in text


@needs_qemu
def test_delta_in_qemu_is_the_carried_chunks(
    chain: list[tuple[Path, Path, VhdLayout, list[int]]],
) -> None:
    """qemu ignores parents and bitmaps: a delta holds its blocks whole, zeros elsewhere."""
    for vhd, raw, _, chunks in chain[1:]:
        blocks = {c // CHUNKS_PER_BLOCK for c in chunks}
        whole = [b * CHUNKS_PER_BLOCK + c for b in sorted(blocks) for c in range(CHUNKS_PER_BLOCK)]
        expected = raw.with_suffix(".masked")
        expected.write_bytes(masked(raw.read_bytes(), whole))
        assert qemu_info(vhd)["virtual-size"] == raw.stat().st_size
        compared = qemu_compare(vhd, expected)
        assert compared.returncode == 0, compared.stdout + compared.stderr


def test_chain_through_vhdimount(
    tmp_path: Path, chain: list[tuple[Path, Path, VhdLayout, list[int]]]
) -> None:
    """vhdimount finds parents by the unicode name, relative to the child."""
    if VHDIMOUNT is None or FUSERMOUNT is None or not os.path.exists("/dev/fuse"):
        pytest.skip("vhdimount, fusermount3 or /dev/fuse missing")
    leaf_vhd, leaf_raw = chain[-1][0], chain[-1][1]
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mounted = subprocess.run([VHDIMOUNT, str(leaf_vhd), str(mountpoint)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"vhdimount could not mount here: {mounted.stderr.decode(errors='replace')}")
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        names = sorted(os.listdir(mountpoint))
        assert len(names) == len(chain)  # vhdi1 = the root ... vhdiN = the merged leaf
        merged = mountpoint / names[-1]
        assert sha256_file(merged) == sha256_file(leaf_raw)
    finally:
        subprocess.run([FUSERMOUNT, "-u", str(mountpoint)], check=False)


# --- segments as a random-access reader --------------------------------------------------------

PATTERN = random.Random(6).randbytes(8 * MiB)


@st.composite
def allocations(draw: st.DrawFn) -> Allocation:
    virtual_size = draw(st.integers(1, 8 * MiB // SECTOR_SIZE)) * SECTOR_SIZE
    block_count = -(-virtual_size // BLOCK_SIZE)
    blocks = sorted(draw(st.sets(st.integers(0, block_count - 1), max_size=block_count)))
    masks = []
    for block in blocks:
        valid_chunks = min(CHUNKS_PER_BLOCK, chunk_count(virtual_size - block * BLOCK_SIZE))
        valid_mask = (1 << valid_chunks) - 1
        masks.append(draw(st.integers(1, FULL_MASK)) & valid_mask or 1)
    return Allocation(virtual_size, array("Q", blocks), array("L", masks))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(allocation=allocations(), data=st.data())
def test_random_reads_match_one_pass_render(allocation: Allocation, data: st.DataObject) -> None:
    layout = VhdLayout(allocation, ImageIdentity(bytes(range(16)), TIMESTAMP))
    read_virtual = reader_of(PATTERN[: allocation.virtual_size])
    whole = render(layout, 0, layout.size, read_virtual)
    assert len(whole) == layout.size
    carried = carried_chunks(allocation)
    for _ in range(8):
        offset = data.draw(st.integers(0, layout.size + 1000), label="offset")
        length = data.draw(st.integers(0, 3 * MiB), label="length")
        segments = list(layout.segments(offset, length))
        assert sum(len(s.data) if isinstance(s, Meta) else s.length for s in segments) == max(
            0, min(offset + length, layout.size) - offset
        )
        for segment in segments:
            if isinstance(segment, Data):
                assert segment.length > 0
                assert segment.virtual_offset + segment.length <= allocation.virtual_size
                first = segment.virtual_offset // CHUNK_SIZE
                last = (segment.virtual_offset + segment.length - 1) // CHUNK_SIZE
                assert all(c in carried for c in range(first, last + 1))
            elif isinstance(segment, Zero):
                assert segment.length > 0
        assert render(layout, offset, length, read_virtual) == whole[offset : offset + length]


# --- very large disks ---------------------------------------------------------------------


def sparse_2000_gib() -> Allocation:
    virtual_size = 2000 * GiB
    last_block = virtual_size // BLOCK_SIZE - 1
    return Allocation(
        virtual_size, array("Q", [0, 500_000, last_block]), array("L", [1, FULL_MASK, 1 << 31])
    )


def test_2000_gib_sparse_disk_is_cheap() -> None:
    allocation = sparse_2000_gib()
    started = time.monotonic()
    layout = VhdLayout(allocation, identity(random.Random(7)))
    entries = allocation.virtual_size // BLOCK_SIZE
    bat_size = entries * 4
    assert layout.size == 1536 + bat_size + 3 * (512 + BLOCK_SIZE) + 512
    assert time.monotonic() - started < 0.5

    tracemalloc.start()
    try:
        bat_slice = render(layout, 1536 + 499_712 * 4, 64 * 1024, reader_of(b""))
        footer = render(layout, layout.size - 512, 4096, reader_of(b""))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MiB
    entries_read = [c_vhd.BAT_ENTRY.unpack_from(bat_slice, 4 * i)[0] for i in range(16384)]
    block_500000_sector = (1536 + bat_size + 512 + BLOCK_SIZE) // 512
    assert entries_read[500_000 - 499_712] == block_500000_sector
    assert entries_read.count(c_vhd.BAT_UNUSED) == 16383
    assert footer == render(layout, 0, 512, reader_of(b""))
    assert c_vhd.FOOTER.unpack(footer)[9] == allocation.virtual_size


@needs_qemu
def test_2000_gib_sparse_disk_in_qemu(tmp_path: Path) -> None:
    allocation = sparse_2000_gib()
    layout = VhdLayout(allocation, identity(random.Random(8)))
    vhd = tmp_path / "big.vhd"

    def read_virtual(offset: int, length: int) -> bytes:
        return b"\xab" * length

    write_image(vhd, layout, read_virtual)
    assert qemu_info(vhd)["virtual-size"] == allocation.virtual_size
    assert QEMU_IMG is not None
    last_block_offset = allocation.virtual_size - BLOCK_SIZE
    mapped = subprocess.run(
        [QEMU_IMG, "map", "--output=json", "-f", "vpc", str(vhd)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data_extents = [
        (extent["start"], extent["length"]) for extent in json.loads(mapped) if extent["data"]
    ]
    assert data_extents == [
        (0, BLOCK_SIZE),
        (500_000 * BLOCK_SIZE, BLOCK_SIZE),
        (last_block_offset, BLOCK_SIZE),
    ]


def test_million_blocks_are_served_lazily() -> None:
    block_count = 1_000_000
    allocation = Allocation(
        block_count * BLOCK_SIZE,
        array("Q", range(block_count)),
        array("L", [FULL_MASK]) * block_count,
    )
    layout = VhdLayout(allocation, identity(random.Random(9)))
    middle_block = 654_321
    bitmap_offset = (
        1536 + c_vhd.round_up_to_sector(block_count * 4) + middle_block * (512 + BLOCK_SIZE)
    )
    tracemalloc.start()
    try:
        segments = list(layout.segments(bitmap_offset - 8, 512 + 8 + 4096))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB
    assert segments == [
        Data(middle_block * BLOCK_SIZE - 8, 8),
        Meta(b"\xff" * 512),
        Data(middle_block * BLOCK_SIZE, 4096),
    ]
    assert layout.allocated_bytes >= block_count * BLOCK_SIZE


def test_beyond_the_vhd_limit_is_too_large() -> None:
    me = identity(random.Random(10))
    VhdLayout(Allocation(c_vhd.MAX_VHD_SIZE), me)  # exactly the limit is fine
    with pytest.raises(TooLarge):
        VhdLayout(Allocation(c_vhd.MAX_VHD_SIZE + SECTOR_SIZE), me)
