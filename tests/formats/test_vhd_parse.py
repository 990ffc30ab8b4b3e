"""parse_vhd against images made by qemu-img and by VhdLayout, and against hostile bytes."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import tracemalloc
import uuid
from array import array
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import FUZZ_DERANDOMIZE, FUZZ_EXAMPLES
from vdifs.errors import MalformedImage, TooLarge, Unsupported
from vdifs.formats import c_vhd
from vdifs.formats.base import ImageIdentity, ParentRef, render
from vdifs.formats.vhd import VhdLayout
from vdifs.formats.vhd_parse import MAX_TABLE_ENTRIES, ParsedImage, Write, parse_vhd
from vdifs.model import BLOCK_SIZE, CHUNK_SIZE, CHUNKS_PER_BLOCK, FULL_MASK, Allocation

MiB = 1024 * 1024
GiB = 1024 * MiB
QEMU_IMG = shutil.which("qemu-img")
SYSTEM_PYTHON = "/usr/bin/python3"
needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img (qemu-utils) not installed")
IMPORT_ERRORS = (MalformedImage, TooLarge, Unsupported)

FOOTER_FIELDS = [
    *("cookie", "features", "version", "data_offset", "timestamp", "creator_application"),
    *("creator_version", "creator_host_os", "original_size", "current_size", "cylinders"),
    *("heads", "sectors_per_track", "disk_type", "checksum", "unique_id", "saved_state"),
    "reserved",
]
HEADER_FIELDS = [
    *("cookie", "data_offset", "table_offset", "version", "table_entries", "block_size"),
    *("checksum", "parent_unique_id", "parent_timestamp", "reserved", "parent_name"),
    *("locators", "reserved2"),
]


# --- helpers -------------------------------------------------------------------------------


def reader_of(image: bytes) -> Callable[[int, int], bytes]:
    def read_at(offset: int, length: int) -> bytes:
        assert offset >= 0 and length >= 0, (offset, length)
        return image[offset : offset + length]

    return read_at


def parse(image: bytes) -> ParsedImage:
    return parse_vhd(reader_of(image), len(image))


def applied(image: bytes, onto: bytes | None = None) -> bytes:
    """The disk after applying the image onto ``onto`` (zeros when None), checking the writes."""
    parsed = parse(image)
    disk = bytearray(onto if onto is not None else parsed.virtual_size)
    assert len(disk) == parsed.virtual_size
    previous_file_offset = -1
    for write in parsed.writes():
        assert write.length > 0
        assert write.file_offset > previous_file_offset, "writes ascend in file offset"
        previous_file_offset = write.file_offset
        assert write.virtual_offset >= 0 and write.virtual_offset + write.length <= len(disk)
        assert write.file_offset + write.length <= len(image) - 512
        end = write.virtual_offset + write.length
        disk[write.virtual_offset : end] = image[
            write.file_offset : write.file_offset + write.length
        ]
    return bytes(disk)


def random_chunks_content(virtual_size: int, chunks: list[int], rng: random.Random) -> bytearray:
    content = bytearray(virtual_size)
    for chunk in chunks:
        start = chunk * CHUNK_SIZE
        end = min(start + CHUNK_SIZE, virtual_size)
        content[start:end] = rng.randbytes(end - start)
    return content


def allocation_of(virtual_size: int, chunks: list[int]) -> Allocation:
    masks: dict[int, int] = {}
    for chunk in chunks:
        block, bit = divmod(chunk, CHUNKS_PER_BLOCK)
        masks[block] = masks.get(block, 0) | 1 << bit
    blocks = sorted(masks)
    return Allocation(virtual_size, array("Q", blocks), array("L", [masks[b] for b in blocks]))


def our_image(
    content: bytes | bytearray,
    chunks: list[int],
    me: ImageIdentity,
    parent: ParentRef | None = None,
) -> bytes:
    layout = VhdLayout(allocation_of(len(content), chunks), me, parent)
    view = memoryview(content)
    return render(
        layout, 0, layout.size, lambda offset, length: bytes(view[offset : offset + length])
    )


def qemu_convert(tmp_path: Path, raw: bytes, *options: str) -> bytes:
    assert QEMU_IMG is not None
    source = tmp_path / "source.raw"
    source.write_bytes(raw)
    target = tmp_path / "target.vhd"
    target.unlink(missing_ok=True)
    subprocess.run(
        [QEMU_IMG, "convert", "-f", "raw", "-O", "vpc", *options, str(source), str(target)],
        check=True,
        capture_output=True,
    )
    return target.read_bytes()


def patched(image: bytes, footer: dict[str, object] | None = None, /, **header: object) -> bytes:
    """The image with footer (both copies) and header fields replaced, checksums redone."""
    out = bytearray(image)
    if footer:
        fields = dict(zip(FOOTER_FIELDS, c_vhd.FOOTER.unpack(image[-512:]), strict=True))
        fields.update(footer)
        new_footer = bytearray(c_vhd.FOOTER.pack(*fields.values()))
        if "checksum" not in footer:
            c_vhd.CHECKSUM.pack_into(
                new_footer, 64, c_vhd.checksum(new_footer, c_vhd.FOOTER_CHECKSUM_OFFSET)
            )
        out[-512:] = new_footer
        if image[:512] == image[-512:]:
            out[:512] = new_footer
    if header:
        fields = dict(zip(HEADER_FIELDS, c_vhd.HEADER.unpack(image[512:1536]), strict=True))
        fields.update(header)
        new_header = bytearray(c_vhd.HEADER.pack(*fields.values()))
        if "checksum" not in header:
            c_vhd.CHECKSUM.pack_into(
                new_header, 36, c_vhd.checksum(new_header, c_vhd.HEADER_CHECKSUM_OFFSET)
            )
        out[512:1536] = new_header
    return bytes(out)


def header_field(image: bytes, name: str) -> object:
    return c_vhd.HEADER.unpack(image[512:1536])[HEADER_FIELDS.index(name)]


def bat_of(image: bytes) -> list[int]:
    table_offset = header_field(image, "table_offset")
    entries = header_field(image, "table_entries")
    assert isinstance(table_offset, int) and isinstance(entries, int)
    return [c_vhd.BAT_ENTRY.unpack_from(image, table_offset + 4 * i)[0] for i in range(entries)]


def with_bat_entry(image: bytes, index: int, value: int) -> bytes:
    table_offset = header_field(image, "table_offset")
    assert isinstance(table_offset, int)
    out = bytearray(image)
    c_vhd.BAT_ENTRY.pack_into(out, table_offset + 4 * index, value)
    return bytes(out)


def pyvhdi_sha256(path: Path) -> str:
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import pyvhdi"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("pyvhdi (python3-libvhdi) is not importable by /usr/bin/python3")
    script = (
        "import hashlib, sys, pyvhdi\n"
        "f = pyvhdi.file(); f.open(sys.argv[1])\n"
        "print(hashlib.sha256(f.read_buffer_at_offset(f.media_size, 0)).hexdigest())\n"
    )
    return subprocess.run(
        [SYSTEM_PYTHON, "-c", script, str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


# --- images made by qemu-img -------------------------------------------------------------------

QEMU_SIZES = [MiB + 512, 5 * MiB, 7 * MiB + 64 * 1024 + 1536]
QEMU_SUBFORMATS = {
    "dynamic": ("-o", "subformat=dynamic"),
    "fixed": ("-o", "subformat=fixed"),
    "dynamic-force-size": ("-o", "subformat=dynamic,force_size=on"),
    "fixed-force-size": ("-o", "subformat=fixed,force_size=on"),
}


@needs_qemu
@pytest.mark.parametrize("subformat", QEMU_SUBFORMATS)
@pytest.mark.parametrize("raw_size", QEMU_SIZES)
def test_qemu_images(tmp_path: Path, subformat: str, raw_size: int) -> None:
    rng = random.Random(f"{subformat}{raw_size}")
    chunk_total = -(-raw_size // CHUNK_SIZE)
    chunks = [*rng.sample(range(chunk_total), chunk_total // 2), chunk_total - 1]
    raw = bytes(random_chunks_content(raw_size, sorted(set(chunks)), rng))
    image = qemu_convert(tmp_path, raw, *QEMU_SUBFORMATS[subformat])

    parsed = parse(image)
    assert not parsed.is_delta and parsed.parent_identity is None and parsed.parent_name is None
    assert parsed.identity == image[-512 + 68 : -512 + 84]
    # qemu's own creator "qemu" rounds the size up to CHS; force_size keeps it exact.
    assert parsed.virtual_size >= raw_size
    if "force-size" in subformat:
        assert parsed.virtual_size == raw_size
    expected = raw.ljust(parsed.virtual_size, b"\0")
    assert applied(image) == expected
    if subformat.startswith("fixed"):
        assert list(parsed.writes()) == [Write(0, parsed.virtual_size, 0)]


@needs_qemu
def test_qemu_dynamic_image_skips_unallocated_blocks(tmp_path: Path) -> None:
    raw = bytearray(16 * MiB)
    raw[5 * MiB : 5 * MiB + 4096] = b"\x11" * 4096
    image = qemu_convert(tmp_path, bytes(raw), "-o", "subformat=dynamic,force_size=on")
    writes = list(parse(image).writes())
    assert len(writes) == 1
    assert writes[0].virtual_offset == 4 * MiB and writes[0].length == BLOCK_SIZE


def clear_bits(image: bytearray, cleared: Mapping[int, Iterable[int]]) -> None:
    bat = bat_of(bytes(image))
    for block, sectors in cleared.items():
        for sector in sectors:
            image[bat[block] * 512 + sector // 8] &= ~(0x80 >> sector % 8) & 0xFF


def zeroed(raw: bytes, cleared: Mapping[int, Iterable[int]]) -> bytes:
    out = bytearray(raw)
    for block, sectors in cleared.items():
        for sector in sectors:
            start = block * BLOCK_SIZE + sector * 512
            out[start : start + 512] = bytes(512)
    return bytes(out)


@needs_qemu
def test_partial_bitmaps_match_libvhdi(tmp_path: Path) -> None:
    """Clear bitmap bits of a qemu image: the writes leave out exactly what libvhdi zeroes.

    libvhdi 20210425 reads a bitmap byte with any bit set as fully present, so
    this comparison clears whole bytes (8 sectors); the next test covers bits.
    """
    rng = random.Random(11)
    raw = rng.randbytes(6 * MiB)
    image = bytearray(qemu_convert(tmp_path, raw, "-o", "subformat=dynamic,force_size=on"))
    assert all(entry != c_vhd.BAT_UNUSED for entry in bat_of(bytes(image)))
    every_other_byte = [s for s in range(4096) if s // 8 % 2]
    cleared = {0: every_other_byte, 1: range(96, 304), 2: range(4096)}
    clear_bits(image, cleared)
    expected = zeroed(raw, cleared)
    assert applied(bytes(image)) == expected
    assert len(list(parse(bytes(image)).writes())) == 256 + 2
    path = tmp_path / "partial.vhd"
    path.write_bytes(image)
    assert pyvhdi_sha256(path) == hashlib.sha256(expected).hexdigest()


@needs_qemu
def test_partial_bitmaps_by_the_bit(tmp_path: Path) -> None:
    rng = random.Random(16)
    raw = rng.randbytes(4 * MiB)
    image = bytearray(qemu_convert(tmp_path, raw, "-o", "subformat=dynamic,force_size=on"))
    cleared = {0: range(1, 4096, 2), 1: range(3, 4093)}
    clear_bits(image, cleared)
    assert applied(bytes(image)) == zeroed(raw, cleared)
    runs = [(w.virtual_offset, w.length) for w in parse(bytes(image)).writes()]
    assert runs[:2] == [(0, 512), (1024, 512)]
    assert runs[-2:] == [(BLOCK_SIZE, 3 * 512), (2 * BLOCK_SIZE - 3 * 512, 3 * 512)]
    assert len(runs) == 2048 + 2


# --- images made by VhdLayout ----------------------------------------------------------------


def test_our_full_image_writes_exactly_the_carried_chunks() -> None:
    rng = random.Random(12)
    virtual_size = 6 * MiB + CHUNK_SIZE + 1024
    chunks = [0, 1, 2, 40, 41, 95, 97]  # 97 is the last, partial chunk
    content = random_chunks_content(virtual_size, chunks, rng)
    me = ImageIdentity(rng.randbytes(16), 1_700_000_000)
    image = our_image(content, chunks, me)
    parsed = parse(image)
    assert (parsed.virtual_size, parsed.is_delta, parsed.identity) == (virtual_size, False, me.uuid)
    assert applied(image) == content
    runs = [(w.virtual_offset, w.length) for w in parsed.writes()]
    assert runs == [
        (0, 3 * CHUNK_SIZE),
        (40 * CHUNK_SIZE, 2 * CHUNK_SIZE),
        (95 * CHUNK_SIZE, CHUNK_SIZE),
        (97 * CHUNK_SIZE, 1024),
    ]


def test_our_differencing_chain_applies_onto_the_parent() -> None:
    rng = random.Random(13)
    virtual_size = 5 * MiB + 512
    total = -(-virtual_size // CHUNK_SIZE)
    base_chunks = sorted(rng.sample(range(total), 30))
    base_state = random_chunks_content(virtual_size, base_chunks, rng)
    base = ImageIdentity(rng.randbytes(16), 1_600_000_000)
    base_image = our_image(base_state, base_chunks, base)
    assert applied(base_image) == base_state

    new_state = bytearray(base_state)
    changed = sorted(set(rng.sample(range(total), 10)) | {base_chunks[0], total - 1})
    for chunk in changed:
        start, end = chunk * CHUNK_SIZE, min((chunk + 1) * CHUNK_SIZE, virtual_size)
        new_state[start:end] = (
            bytes(end - start) if chunk == base_chunks[0] else rng.randbytes(end - start)
        )
    me = ImageIdentity(rng.randbytes(16), 1_700_000_000)
    base_name = f"{uuid.UUID(bytes=base.uuid)}.vhd"
    delta = our_image(new_state, changed, me, ParentRef(base, base_name))

    parsed = parse(delta)
    assert parsed.is_delta
    assert parsed.identity == me.uuid
    assert parsed.parent_identity == base.uuid
    assert parsed.parent_name == base_name
    assert applied(delta, onto=bytes(base_state)) == new_state


def test_2000_gib_sparse_image_parses_in_little_memory() -> None:
    virtual_size = 2000 * GiB
    allocation = Allocation(
        virtual_size,
        array("Q", [0, 700_000, virtual_size // BLOCK_SIZE - 1]),
        array("L", [1, FULL_MASK, 1 << 31]),
    )
    layout = VhdLayout(allocation, ImageIdentity(bytes(16), 0))

    def read_at(offset: int, length: int) -> bytes:
        return render(layout, offset, length, lambda _offset, count: b"\x5a" * count)

    tracemalloc.start()
    try:
        parsed = parse_vhd(read_at, layout.size)
        writes = list(parsed.writes())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB
    assert [(w.virtual_offset, w.length) for w in writes] == [
        (0, CHUNK_SIZE),
        (700_000 * BLOCK_SIZE, BLOCK_SIZE),
        (virtual_size - CHUNK_SIZE, CHUNK_SIZE),
    ]


# --- refusals ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> bytes:
    """A small dynamic image: blocks 0 and 2 of a 5 MiB disk."""
    rng = random.Random(14)
    chunks = [0, 5, 64, 65]
    return our_image(
        random_chunks_content(5 * MiB, chunks, rng), chunks, ImageIdentity(rng.randbytes(16), 0)
    )


def test_sample_is_valid(sample: bytes) -> None:
    assert parse(sample).virtual_size == 5 * MiB
    assert [entry != c_vhd.BAT_UNUSED for entry in bat_of(sample)] == [True, False, True]


def damaged_cases(sample: bytes) -> dict[str, tuple[bytes, type[Exception]]]:
    bat = bat_of(sample)
    flipped_tail = bytearray(sample)
    flipped_tail[-512 + 100] ^= 1
    flipped_head = bytearray(sample)
    flipped_head[100] ^= 1
    flipped_header = bytearray(sample)
    flipped_header[512 + 700] ^= 1
    return {
        "empty": (b"", MalformedImage),
        "not-sectors": (sample + b"\0", MalformedImage),
        "truncated-tail": (sample[:-512], MalformedImage),
        "truncated-block": (sample[: bat[2] * 512 + 4096] + sample[-512:], MalformedImage),
        "footer-checksum": (bytes(flipped_tail), MalformedImage),
        "footer-cookie": (patched(sample, {"cookie": b"conectiy"}), MalformedImage),
        "head-tail-differ": (bytes(flipped_head), MalformedImage),
        "header-checksum": (bytes(flipped_header), MalformedImage),
        "header-cookie": (patched(sample, cookie=b"cxsparsf"), MalformedImage),
        "format-version-2": (patched(sample, {"version": 0x00020000}), Unsupported),
        "header-version-2": (patched(sample, version=0x00020000), Unsupported),
        "disk-type-0": (patched(sample, {"disk_type": 0}), MalformedImage),
        "disk-type-5": (patched(sample, {"disk_type": 5}), Unsupported),
        "disk-type-9": (patched(sample, {"disk_type": 9}), MalformedImage),
        "size-not-sectors": (patched(sample, {"current_size": 5 * MiB - 1}), MalformedImage),
        "size-beyond-max": (
            patched(sample, {"current_size": c_vhd.MAX_VHD_SIZE + 512}),
            TooLarge,
        ),
        "size-beyond-table": (patched(sample, {"current_size": 7 * MiB}), MalformedImage),
        "header-outside": (patched(sample, {"data_offset": len(sample) - 1024}), MalformedImage),
        "header-huge-offset": (patched(sample, {"data_offset": 2**64 - 2}), MalformedImage),
        "fixed-with-offset": (patched(sample, {"disk_type": 2}), MalformedImage),
        "block-size-odd": (patched(sample, block_size=3 * 512), MalformedImage),
        "block-size-tiny": (patched(sample, block_size=256), MalformedImage),
        "block-size-huge": (patched(sample, block_size=1 << 30), Unsupported),
        "too-many-entries": (patched(sample, table_entries=MAX_TABLE_ENTRIES + 1), TooLarge),
        "all-entries": (patched(sample, table_entries=2**32 - 1), TooLarge),
        "bat-outside": (patched(sample, table_entries=MAX_TABLE_ENTRIES), MalformedImage),
        "bat-over-header": (patched(sample, table_offset=1024), MalformedImage),
        "bat-over-footer-copy": (patched(sample, table_offset=0), MalformedImage),
        "block-past-end": (with_bat_entry(sample, 1, len(sample) // 512), MalformedImage),
        "block-over-footer": (with_bat_entry(sample, 1, len(sample) // 512 - 4097), MalformedImage),
        "block-aliasing": (with_bat_entry(sample, 1, bat[0]), MalformedImage),
        "block-half-overlap": (with_bat_entry(sample, 1, bat[0] + 100), MalformedImage),
        "block-over-bat": (with_bat_entry(sample, 1, 3), MalformedImage),
        "block-over-header": (with_bat_entry(sample, 1, 1), MalformedImage),
        "bad-parent-name": (
            patched(sample, {"disk_type": 4}, parent_name=b"\xd8\x00\x00\x41"),
            MalformedImage,
        ),
    }


def test_refusals(sample: bytes) -> None:
    for name, (image, error) in damaged_cases(sample).items():
        with pytest.raises(error):
            parse(image)
            pytest.fail(f"{name} parsed")


def test_a_differencing_sample_reports_its_parent(sample: bytes) -> None:
    parent_id = bytes(range(16))
    name = "parent é.vhd".encode("utf-16-be")
    delta = patched(sample, {"disk_type": 4}, parent_unique_id=parent_id, parent_name=name)
    parsed = parse(delta)
    assert (parsed.is_delta, parsed.parent_identity, parsed.parent_name) == (
        True,
        parent_id,
        "parent é.vhd",
    )


def test_fixed_data_offset_spellings(sample: bytes) -> None:
    fixed = bytes(5 * MiB) + sample[-512:]
    for data_offset in (2**64 - 1, 2**32 - 1):
        image = patched(fixed, {"disk_type": 2, "data_offset": data_offset})
        assert list(parse(image).writes()) == [Write(0, 5 * MiB, 0)]
    with pytest.raises(MalformedImage):
        parse(patched(fixed, {"disk_type": 2, "data_offset": 2**64 - 1, "current_size": 4 * MiB}))


# --- fuzzing -------------------------------------------------------------------------------------


def fuzz_seeds() -> dict[str, bytes]:
    rng = random.Random(15)
    seeds: dict[str, bytes] = {}
    size = 3 * MiB + 1536
    chunks = [0, 3, 31, 32, 48]
    content = random_chunks_content(size, chunks, rng)
    base = ImageIdentity(rng.randbytes(16), 0)
    seeds["dynamic"] = our_image(content, chunks, base)
    seeds["differencing"] = our_image(
        content, chunks[1:], ImageIdentity(rng.randbytes(16), 1), ParentRef(base, "base.vhd")
    )
    seeds["fixed"] = bytes(content) + patched(
        seeds["dynamic"][-512:], {"disk_type": 2, "data_offset": 2**64 - 1}
    )
    return seeds


FUZZ_SEEDS = fuzz_seeds()


def boundaries(image: bytes) -> list[int]:
    """Offsets where a structure starts or ends, for truncation."""
    points = {0, 1, 511, 512, 513, 1024, 1535, 1536, 2048, len(image) - 512, len(image) - 1}
    if image[:8] == c_vhd.FOOTER_COOKIE:
        table_offset = header_field(image, "table_offset")
        assert isinstance(table_offset, int)
        points |= {table_offset, table_offset + 512}
        for entry in bat_of(image):
            if entry != c_vhd.BAT_UNUSED:
                points |= {entry * 512, entry * 512 + 512, entry * 512 + 512 + BLOCK_SIZE}
    return sorted(p for p in points if 0 <= p <= len(image))


SEED_BOUNDARIES = {seed: boundaries(seed) for seed in FUZZ_SEEDS.values()}


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    seed = FUZZ_SEEDS[draw(st.sampled_from(sorted(FUZZ_SEEDS)))]
    image = bytearray(seed)
    is_dynamic = image[:8] == c_vhd.FOOTER_COOKIE
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["footer", "header", "bat", "bitmap", "anywhere", "field"]))
        if kind == "footer":
            offset = len(image) - 512 + draw(st.integers(0, 511))
        elif kind == "header" and is_dynamic:
            offset = 512 + draw(st.integers(0, 1023))
        elif kind == "bat" and is_dynamic:
            table_offset = header_field(bytes(image), "table_offset")
            assert isinstance(table_offset, int)
            offset = table_offset + draw(st.integers(0, 511))
        elif kind == "bitmap" and is_dynamic:
            offset = 2048 + 512 * draw(st.integers(0, 8)) + draw(st.integers(0, 511))
        else:
            offset = draw(st.integers(0, len(image) - 1))
        if kind == "field":
            # A plausible but wrong value in a named field, checksums recomputed.
            value = draw(
                st.sampled_from(
                    [0, 1, 2, 3, 4, 511, 512, 513, 1536, 2**31, 2**32 - 1, 2**63, 2**64 - 1]
                )
            )
            if is_dynamic and draw(st.booleans()):
                name = draw(st.sampled_from(["table_offset", "table_entries", "block_size"]))
                image = bytearray(patched(bytes(image), **{name: value % 2**32}))
            else:
                name = draw(st.sampled_from(["data_offset", "current_size", "disk_type"]))
                limit = 2**32 if name == "disk_type" else 2**64
                image = bytearray(patched(bytes(image), {name: value % limit}))
            continue
        replacement = draw(st.binary(min_size=1, max_size=8))
        image[offset : offset + len(replacement)] = replacement[: len(image) - offset]
    if draw(st.booleans()):
        # Fix the checksums so that the mutation reaches the checks behind them.
        tail = bytearray(image[-512:])
        c_vhd.CHECKSUM.pack_into(tail, 64, c_vhd.checksum(tail, c_vhd.FOOTER_CHECKSUM_OFFSET))
        image[-512:] = tail
        if is_dynamic:
            image[:512] = tail
            header = bytearray(image[512:1536])
            c_vhd.CHECKSUM.pack_into(header, 36, c_vhd.checksum(header, 36))
            image[512:1536] = header
    if draw(st.booleans()):
        cut = draw(st.sampled_from(SEED_BOUNDARIES[seed]) | st.integers(0, len(image)))
        image = image[:cut]
    return bytes(image)


@settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=FUZZ_DERANDOMIZE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(image=damaged_images())
def test_damaged_images_fail_cleanly(image: bytes) -> None:
    try:
        parsed = parse(image)
        writes = list(parsed.writes())
    except IMPORT_ERRORS as refused:
        event(type(refused).__name__)
        return
    event("parsed, with writes" if writes else "parsed, no writes")
    assert 0 <= parsed.virtual_size <= c_vhd.MAX_VHD_SIZE
    for write in writes:
        assert write.length > 0
        assert write.virtual_offset >= 0
        assert write.virtual_offset + write.length <= parsed.virtual_size
        assert write.file_offset >= 0
        assert write.file_offset + write.length <= len(image)


def test_read_errors_propagate(sample: bytes) -> None:
    def failing_read(offset: int, length: int) -> bytes:
        raise OSError(5, "backend gone")

    with pytest.raises(OSError):
        parse_vhd(failing_read, len(sample))
