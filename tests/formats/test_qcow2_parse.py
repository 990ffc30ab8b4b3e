"""parse_qcow2 against what qemu-img and qemu-io write, and against hostile bytes.

The oracle is ``qemu-img convert -O raw``: applying the parsed writes onto
zeros (a full image) or onto the base's raw bytes (a delta) must give exactly
what qemu reads from the image.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FUZZ_DERANDOMIZE, FUZZ_EXAMPLES
from tests.formats.test_qcow2 import allocation_of, identity, random_chunks, write_raw
from vdifs.errors import MalformedImage, TooLarge, Unsupported
from vdifs.formats import c_qcow2, qcow2_parse
from vdifs.formats.base import ParentRef, render
from vdifs.formats.qcow2 import Qcow2Layout
from vdifs.formats.qcow2_parse import (
    MAX_IMPORT_VIRTUAL_SIZE,
    ParsedQcow2,
    Write,
    inflate_cluster,
    parse_qcow2,
)
from vdifs.model import CHUNK_SIZE

KiB = 1024
MiB = 1024 * KiB

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img and qemu-io (qemu-utils) are needed",
)


def run(*args: str | Path) -> None:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"


def parse_file(path: Path) -> ParsedQcow2:
    data = path.read_bytes()
    return parse_bytes(data)


def parse_bytes(data: bytes) -> ParsedQcow2:
    def read_at(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return parse_qcow2(read_at, len(data))


def apply_writes(data: bytes, parsed: ParsedQcow2, base: bytes | None = None) -> bytes:
    """What an importer does: the writes onto zeros, or onto the base for a delta."""
    disk = bytearray(parsed.virtual_size)
    if base is not None:
        disk[: len(base)] = base[: parsed.virtual_size]
    for write in parsed.writes():
        assert write.virtual_offset + write.length <= parsed.virtual_size
        if write.file_offset is None:
            content = bytes(write.length)
        elif write.compressed_length:
            end = write.file_offset + write.compressed_length
            assert end <= len(data)
            content = inflate_cluster(data[write.file_offset : end], write.length)
        else:
            assert write.file_offset + write.length <= len(data)
            content = data[write.file_offset : write.file_offset + write.length]
        disk[write.virtual_offset : write.virtual_offset + write.length] = content
    return bytes(disk)


def qemu_raw(image: Path, tmp_path: Path) -> bytes:
    out = tmp_path / f"{image.name}.qemu.raw"
    run("qemu-img", "convert", "-O", "raw", image, out)
    return out.read_bytes()


def assert_ascending(writes: list[Write]) -> None:
    offsets = [w.file_offset for w in writes if w.file_offset is not None]
    assert offsets == sorted(offsets)


def sample_raw(tmp_path: Path, virtual_size: int, seed: int = 0) -> Path:
    """Random data in scattered clusters, a compressible run, zeros elsewhere."""
    rng = random.Random(seed)
    clusters = -(-virtual_size // CHUNK_SIZE)
    chunks = sorted({0, clusters - 1, *(rng.randrange(clusters) for _ in range(12))})
    contents = random_chunks(rng, virtual_size, chunks)
    contents[clusters // 2] = b"compressible " * (CHUNK_SIZE // 13) + bytes(CHUNK_SIZE % 13)
    raw = tmp_path / f"disk{seed}.raw"
    write_raw(raw, virtual_size, contents)
    return raw


# --- images qemu wrote ---

CONVERT_CASES = {
    "v3": [],
    "v2": ["-o", "compat=0.10"],
    "v3 compressed": ["-c"],
    "v2 compressed": ["-c", "-o", "compat=0.10"],
    "512-byte clusters": ["-o", "cluster_size=512"],
    "2 MiB clusters compressed": ["-c", "-o", "cluster_size=2M"],
    "lazy refcounts": ["-o", "lazy_refcounts=on"],
}


@pytest.mark.parametrize("case", CONVERT_CASES, ids=list(CONVERT_CASES))
@pytest.mark.parametrize("virtual_size", [5 * MiB + 512, 3 * MiB])
def test_converted_images(tmp_path: Path, case: str, virtual_size: int) -> None:
    raw = sample_raw(tmp_path, virtual_size)
    image = tmp_path / "image.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", *CONVERT_CASES[case], raw, image)
    data = image.read_bytes()
    parsed = parse_bytes(data)
    assert parsed.virtual_size == virtual_size
    assert not parsed.is_delta and parsed.parent_name is None
    assert parsed.identity is None and parsed.parent_identity is None
    writes = list(parsed.writes())
    assert_ascending(writes)
    if "compressed" in case:
        assert any(w.compressed_length for w in writes)
    assert apply_writes(data, parsed) == raw.read_bytes()


def test_metadata_after_data_and_scattered_clusters(tmp_path: Path) -> None:
    """qemu-io writes in random order: data out of virtual order, L2 tables in between.

    4 KiB clusters make one L2 table map only 2 MiB, so a 24 MiB disk needs 12.
    """
    cluster = 4096
    virtual_size = 24 * MiB
    image = tmp_path / "scattered.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", image,
        str(virtual_size))  # fmt: skip
    rng = random.Random(5)
    commands = []
    for _ in range(60):
        offset = rng.randrange(virtual_size // cluster) * cluster
        length = min(cluster * rng.randint(1, 3), virtual_size - offset)
        commands += ["-c", f"write -P {rng.randrange(1, 256)} {offset} {length}"]
    commands += ["-c", f"write -P 7 {virtual_size - 512} 512"]
    run("qemu-io", *commands, image)
    data = image.read_bytes()
    parsed = parse_bytes(data)
    writes = list(parsed.writes())
    assert_ascending(writes)
    virtual_order = [w.virtual_offset for w in writes]
    assert virtual_order != sorted(virtual_order), "the data should be out of virtual order"
    assert apply_writes(data, parsed) == qemu_raw(image, tmp_path)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_overlay_with_data_and_zero_clusters(tmp_path: Path, compat: str) -> None:
    raw = sample_raw(tmp_path, 4 * MiB, seed=1)
    base = tmp_path / "base.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", "-o", f"compat={compat}", raw, base)
    top = tmp_path / "top.qcow2"
    run(
        "qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat}",
        "-b", base.name, "-F", "qcow2", top,
    )  # fmt: skip
    # The base has data in cluster 0: zero it in the top, plus fresh data elsewhere.
    run(
        "qemu-io",
        "-c", "write -P 0xab 0 64k",
        "-c", "write -z 1M 64k",
        "-c", "write -z 0 32k",  # a partial zero write: qemu copies, then zeros
        "-c", "write -z 3M 128k",
        "-c", "write -P 0x11 2M 512",
        top,
    )  # fmt: skip
    data = top.read_bytes()
    parsed = parse_bytes(data)
    assert parsed.is_delta and parsed.parent_name == base.name
    writes = list(parsed.writes())
    if compat == "1.1":
        assert any(w.file_offset is None for w in writes)  # v3 zero clusters
    assert_ascending(writes)
    assert apply_writes(data, parsed, raw.read_bytes()) == qemu_raw(top, tmp_path)


@pytest.mark.parametrize("unmap", [False, True])
def test_zero_clusters_in_a_full_image_read_as_zeros(tmp_path: Path, unmap: bool) -> None:
    raw = sample_raw(tmp_path, 2 * MiB, seed=2)
    image = tmp_path / "full.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", raw, image)
    run("qemu-io", "-c", f"write -z {'-u ' if unmap else ''}0 1M", image)
    data = image.read_bytes()
    parsed = parse_bytes(data)
    assert not any(w.file_offset is None for w in parsed.writes())
    assert apply_writes(data, parsed) == qemu_raw(image, tmp_path)


# --- images vdifs wrote ---


def test_our_full_and_delta_images(tmp_path: Path) -> None:
    rng = random.Random(9)
    size = 3 * MiB + 512
    base_contents = random_chunks(rng, size, [0, 5, 48])
    write_raw(tmp_path / "v0.raw", size, base_contents)
    changes = {5: bytes(CHUNK_SIZE), **random_chunks(rng, size, [7, 48])}
    write_raw(tmp_path / "v1.raw", size, {**base_contents, **changes})
    base_raw = (tmp_path / "v0.raw").read_bytes()
    top_raw = (tmp_path / "v1.raw").read_bytes()

    def read_from(raw: bytes) -> Callable[[int, int], bytes]:
        return lambda offset, length: raw[offset : offset + length]

    base_layout = Qcow2Layout(allocation_of(size, base_contents), identity(1))
    base_image = render(base_layout, 0, base_layout.size, read_from(base_raw))
    parsed = parse_bytes(base_image)
    assert (parsed.identity, parsed.parent_identity, parsed.is_delta) == (
        bytes([1]) * 16,
        None,
        False,
    )
    assert apply_writes(base_image, parsed) == base_raw

    parent = ParentRef(identity(1), f"{(bytes([1]) * 16).hex()}.qcow2")
    delta_layout = Qcow2Layout(allocation_of(size, changes), identity(2), parent)
    delta_image = render(delta_layout, 0, delta_layout.size, read_from(top_raw))
    parsed = parse_bytes(delta_image)
    assert parsed.is_delta and parsed.parent_name == parent.file_name
    assert (parsed.identity, parsed.parent_identity) == (bytes([2]) * 16, bytes([1]) * 16)
    writes = list(parsed.writes())
    assert [w.file_offset for w in writes] == sorted(w.file_offset or 0 for w in writes)
    assert apply_writes(delta_image, parsed, base_raw) == top_raw
    # Two runs: chunk 5 (zeros, carried) with nothing next to it, then chunks 7 and 48.
    assert [(w.virtual_offset, w.length) for w in writes] == [
        (5 * CHUNK_SIZE, CHUNK_SIZE),
        (7 * CHUNK_SIZE, CHUNK_SIZE),
        (48 * CHUNK_SIZE, 512),
    ]


# --- refusals ---


def header_with(data: bytes, fmt: str, offset: int, value: int) -> bytes:
    patched = bytearray(data)
    struct.pack_into(fmt, patched, offset, value)
    return bytes(patched)


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    tmp_path = tmp_path_factory.mktemp("small")
    raw = sample_raw(tmp_path, 3 * MiB, seed=3)
    image = tmp_path / "small.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", raw, image)
    return image.read_bytes()


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["-o", "data_file={dir}/data.raw"], "external data file"),
        (["-o", "extended_l2=on"], "extended L2"),
        (["-o", "compression_type=zstd"], "zstd"),
        (
            [
                "--object",
                "secret,id=sec0,data=secret",
                "-o",
                "encrypt.format=aes,encrypt.key-secret=sec0",
            ],
            "encrypted",
        ),
        (
            [
                "--object",
                "secret,id=sec0,data=secret",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0",
            ],
            "encrypted",
        ),
    ],
    ids=["external data file", "extended L2", "zstd", "AES", "LUKS"],
)
def test_unsupported_features_from_qemu(tmp_path: Path, options: list[str], reason: str) -> None:
    image = tmp_path / "image.qcow2"
    options = [o.replace("{dir}", str(tmp_path)) for o in options]
    result = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *options, str(image), "1M"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"this qemu-img cannot create it: {result.stderr.strip()}")
    with pytest.raises(Unsupported, match=reason):
        parse_file(image)


INCOMPATIBLE = c_qcow2.HEADER_V2.size  # offset 72


def test_unknown_incompatible_bit_is_refused(small_image: bytes) -> None:
    image = header_with(small_image, ">Q", INCOMPATIBLE, 1 << 9)
    with pytest.raises(Unsupported, match="bit 9"):
        parse_bytes(image)


def test_dirty_bit_is_fine_and_corrupt_bit_is_not(small_image: bytes) -> None:
    parsed = parse_bytes(header_with(small_image, ">Q", INCOMPATIBLE, c_qcow2.INCOMPAT_DIRTY))
    assert parsed.virtual_size == 3 * MiB
    with pytest.raises(MalformedImage, match="corrupt"):
        parse_bytes(header_with(small_image, ">Q", INCOMPATIBLE, c_qcow2.INCOMPAT_CORRUPT))


def l1_offset_of(image: bytes) -> int:
    return int(c_qcow2.HEADER_V2.unpack_from(image)[8])


def first_l2_offset(image: bytes) -> int:
    (entry,) = c_qcow2.TABLE_ENTRY.unpack_from(image, l1_offset_of(image))
    return int(entry & c_qcow2.L1_OFFSET_MASK)


def first_data_entry_offset(image: bytes) -> int:
    """File offset of the first non-zero L2 entry."""
    l2 = first_l2_offset(image)
    for index in range(CHUNK_SIZE // 8):
        if c_qcow2.TABLE_ENTRY.unpack_from(image, l2 + index * 8)[0]:
            return l2 + index * 8
    raise AssertionError("no data cluster")


def with_first_data_entry(img: bytes, change: Callable[[int], int], offset_delta: int = 0) -> bytes:
    """Rewrite the first non-zero L2 entry (or the entry after it) as ``change(entry)``."""
    where = first_data_entry_offset(img)
    return header_with(img, ">Q", where + offset_delta, change(_entry_at(img, where)))


MALFORMED: dict[str, tuple[Callable[[bytes], bytes], type[Exception], str | None]] = {
    "bad magic": (lambda img: b"QFI\xfa" + img[4:], MalformedImage, "magic"),
    "version 1": (lambda img: header_with(img, ">I", 4, 1), Unsupported, "version 1"),
    "version 4": (lambda img: header_with(img, ">I", 4, 4), Unsupported, "version 4"),
    "256-byte clusters": (
        lambda img: header_with(img, ">I", 20, 8),
        MalformedImage,
        "cluster_bits",
    ),
    "4 MiB clusters": (lambda img: header_with(img, ">I", 20, 22), MalformedImage, "cluster_bits"),
    "short header_length": (
        lambda img: header_with(img, ">I", 100, 100),
        MalformedImage,
        "header_length",
    ),
    "odd virtual size": (
        lambda img: header_with(img, ">Q", 24, 3 * MiB + 1),
        MalformedImage,
        "512",
    ),
    "beyond the import limit": (
        lambda img: header_with(img, ">Q", 24, MAX_IMPORT_VIRTUAL_SIZE + 512),
        TooLarge,
        "import limit",
    ),
    "2 EiB": (lambda img: header_with(img, ">Q", 24, 1 << 61), TooLarge, None),
    "L1 too small": (lambda img: header_with(img, ">I", 36, 0), MalformedImage, "too small"),
    "L1 at 0": (lambda img: header_with(img, ">Q", 40, 0), MalformedImage, "L1 table"),
    "L1 past EOF": (lambda img: header_with(img, ">Q", 40, 1 << 40), MalformedImage, "L1 table"),
    "L1 unaligned": (
        lambda img: header_with(img, ">Q", 40, CHUNK_SIZE + 8),
        MalformedImage,
        "L1 table",
    ),
    "refcount table at 0": (
        lambda img: header_with(img, ">Q", 48, 0),
        MalformedImage,
        "refcount table",
    ),
    "no refcount table": (
        lambda img: header_with(img, ">I", 56, 0),
        MalformedImage,
        "refcount table",
    ),
    "backing name inside the header": (
        lambda img: header_with(img, ">Q", 8, 80),
        MalformedImage,
        "backing file",
    ),
    "backing name too long": (
        lambda img: header_with(header_with(img, ">Q", 8, 512), ">I", 16, 1024),
        MalformedImage,
        "backing file",
    ),
    "last cluster cut off": (lambda img: img[: len(img) - CHUNK_SIZE], MalformedImage, None),
    "cut after the header": (lambda img: img[:112], MalformedImage, None),
    "shorter than a header": (lambda img: img[:60], MalformedImage, "too short"),
    "L2 table on the refcount table": (
        lambda img: header_with(img, ">Q", l1_offset_of(img), CHUNK_SIZE),
        MalformedImage,
        "overlaps",
    ),
    "L2 table on the L1 table": (
        lambda img: header_with(img, ">Q", l1_offset_of(img), l1_offset_of(img)),
        MalformedImage,
        "overlaps",
    ),
    "L1 entries sharing an L2 table": (
        lambda img: header_with(
            header_with(
                header_with(img, ">Q", 24, 1024 * MiB),  # a disk that needs two L1 entries
                ">I",
                36,
                2,
            ),
            ">Q",
            l1_offset_of(img) + 8,
            first_l2_offset(img),
        ),
        MalformedImage,
        "share",
    ),
    "L1 reserved bits": (
        lambda img: header_with(img, ">Q", l1_offset_of(img), first_l2_offset(img) | 1),
        MalformedImage,
        "reserved",
    ),
    "data on the L1 table": (
        lambda img: with_first_data_entry(img, lambda _entry: l1_offset_of(img)),
        MalformedImage,
        "overlaps",
    ),
    "data on the header (compressed)": (
        lambda img: with_first_data_entry(img, lambda _entry: c_qcow2.OFLAG_COMPRESSED | 100),
        MalformedImage,
        "overlaps",
    ),
    "data mapped twice": (
        lambda img: with_first_data_entry(img, lambda entry: entry, offset_delta=8),
        MalformedImage,
        "twice",
    ),
    "data unaligned": (
        lambda img: with_first_data_entry(img, lambda entry: entry + 512),
        MalformedImage,
        "offset",
    ),
    "data past EOF": (
        lambda img: with_first_data_entry(img, lambda entry: entry + (1 << 40)),
        MalformedImage,
        "offset",
    ),
    "L2 reserved bits": (
        lambda img: with_first_data_entry(img, lambda entry: entry | 2),
        MalformedImage,
        "reserved",
    ),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_headers_and_tables(small_image: bytes, case: str) -> None:
    mutate, error, message = MALFORMED[case]
    with pytest.raises(error, match=message):
        parse_bytes(mutate(small_image))


def _entry_at(image: bytes, offset: int) -> int:
    return int(c_qcow2.TABLE_ENTRY.unpack_from(image, offset)[0])


def test_inflate_cluster_bounds_and_errors() -> None:
    import zlib

    deflater = zlib.compressobj(9, zlib.DEFLATED, -12)
    packed = deflater.compress(bytes(CHUNK_SIZE)) + deflater.flush()
    assert inflate_cluster(packed, CHUNK_SIZE) == bytes(CHUNK_SIZE)
    assert inflate_cluster(packed, 512) == bytes(512)  # output bounded by the length asked
    with pytest.raises(MalformedImage):
        inflate_cluster(packed, 2 * CHUNK_SIZE)  # too little data
    with pytest.raises(MalformedImage):
        inflate_cluster(b"\xff" * 64, CHUNK_SIZE)
    with pytest.raises(MalformedImage):
        inflate_cluster(packed, 1 << 30)


# --- fuzzing ---


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Small valid images of each kind the parser reads."""
    tmp_path = tmp_path_factory.mktemp("fuzz")
    raw = sample_raw(tmp_path, 1 * MiB + 512, seed=4)
    seeds = []
    for name, options in [
        ("v3", []),
        ("v2", ["-o", "compat=0.10"]),
        ("compressed", ["-c", "-o", "cluster_size=4096"]),
    ]:
        image = tmp_path / f"{name}.qcow2"
        run("qemu-img", "convert", "-O", "qcow2", *options, raw, image)
        seeds.append(image.read_bytes())
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "v3.qcow2", "-F", "qcow2", top)
    run("qemu-io", "-c", "write -P 1 0 64k", "-c", "write -z 512k 64k", top)
    seeds.append(top.read_bytes())
    raw_bytes = raw.read_bytes()
    layout = Qcow2Layout(
        allocation_of(len(raw_bytes), [0, 3, 16]), identity(1), ParentRef(identity(2), "b.qcow2")
    )
    seeds.append(render(layout, 0, layout.size, lambda o, n: raw_bytes[o : o + n]))
    return seeds


INTERESTING_WORDS = [
    0,
    1,
    511,
    512,
    CHUNK_SIZE,
    CHUNK_SIZE * 3,
    CHUNK_SIZE * 5 + 8,
    1 << 31,
    (1 << 32) - 1,
    1 << 40,
    (1 << 63) | CHUNK_SIZE * 4,
    (1 << 63) | CHUNK_SIZE * 6,
    (1 << 62) | (3 << 54) | (CHUNK_SIZE * 5 + 100),
    (1 << 62) | (255 << 54) | 0x1234,
    1 | (1 << 63),
    1 | (CHUNK_SIZE * 7),
    (1 << 64) - 1,
]
HEADER_FIELDS = [(">I", 4), (">Q", 8), (">I", 16), (">I", 20), (">Q", 24), (">I", 32), (">I", 36)]
HEADER_FIELDS += [(">Q", 40), (">Q", 48), (">I", 56), (">Q", 72), (">I", 96), (">I", 100)]


@st.composite
def mutations(draw: st.DrawFn, size: int) -> tuple[str, int, int, str]:
    kind = draw(st.sampled_from(["field", "word", "byte", "truncate"]))
    if kind == "field":
        fmt, offset = draw(st.sampled_from(HEADER_FIELDS))
        bits = 32 if fmt == ">I" else 64
        value = draw(st.sampled_from(INTERESTING_WORDS) | st.integers(0, (1 << bits) - 1))
        return kind, offset, value % (1 << bits), fmt
    if kind == "word":  # a table entry or extension field, anywhere in the metadata
        offset = draw(st.integers(0, min(size, 6 * CHUNK_SIZE) // 8 - 1)) * 8
        return kind, offset, draw(st.sampled_from(INTERESTING_WORDS)), ">Q"
    if kind == "byte":
        return (
            kind,
            draw(st.integers(0, min(size, 6 * CHUNK_SIZE) - 1)),
            draw(st.integers(0, 255)),
            ">B",
        )
    boundary = draw(
        st.sampled_from([60, 72, 104, 112, 512, 4096])
        | st.integers(1, max(1, size // CHUNK_SIZE)).map(lambda c: c * CHUNK_SIZE)
        | st.integers(0, size)
    )
    return kind, min(boundary, size), 0, ""


def apply_mutation(image: bytearray, mutation: tuple[str, int, int, str]) -> bytearray:
    kind, offset, value, fmt = mutation
    if kind == "truncate":
        return image[:offset]
    if offset + struct.calcsize(fmt) <= len(image):
        struct.pack_into(fmt, image, offset, value)
    return image


def check_parse_outcome(image: bytes) -> None:
    """Either a parse whose writes stay inside the file and the disk, or a VdifsError we allow."""
    try:
        parsed = parse_bytes(image)
        for write in parsed.writes():
            assert write.virtual_offset >= 0
            assert write.length > 0
            assert write.virtual_offset + write.length <= parsed.virtual_size
            if write.file_offset is None:
                continue
            extent = write.compressed_length or write.length
            assert write.file_offset >= 0 and write.file_offset + extent <= len(image)
            if write.compressed_length:
                chunk = image[write.file_offset : write.file_offset + extent]
                with contextlib.suppress(MalformedImage):
                    assert len(inflate_cluster(chunk, write.length)) == write.length
    except (MalformedImage, TooLarge, Unsupported):
        pass


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=FUZZ_DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzzed_images_fail_cleanly(fuzz_seeds: list[bytes], data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(fuzz_seeds))
    image = bytearray(seed)
    for mutation in data.draw(st.lists(mutations(len(seed)), min_size=1, max_size=4)):
        image = apply_mutation(image, mutation)
    check_parse_outcome(bytes(image))


def test_every_truncation_at_a_structure_boundary(fuzz_seeds: list[bytes]) -> None:
    for seed in fuzz_seeds:
        boundaries = {0, 60, 72, 104, 112, len(seed) - 1}
        boundaries |= set(range(512, len(seed), 512))
        for size in sorted(boundaries):
            check_parse_outcome(seed[:size])


def test_small_scan_windows_give_the_same_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fuzz_seeds: list[bytes]
) -> None:
    """Files past one scan window (256 GiB) are sorted in passes: force many tiny ones."""
    raw = sample_raw(tmp_path, 3 * MiB, seed=6)
    images = []
    for options in ([], ["-c", "-o", "cluster_size=4096"]):
        path = tmp_path / "image.qcow2"
        run("qemu-img", "convert", "-O", "qcow2", *options, raw, path)
        images.append(path.read_bytes())
    whole = [apply_writes(image, parse_bytes(image)) for image in images]
    monkeypatch.setattr(qcow2_parse, "SCAN_WINDOW_CLUSTERS", 3)
    for image, expected in zip(images, whole, strict=True):
        parsed = parse_bytes(image)
        assert_ascending(list(parsed.writes()))
        assert apply_writes(image, parsed) == expected == raw.read_bytes()
    for seed in fuzz_seeds:
        check_parse_outcome(seed)
    aliased = bytearray(images[0])
    entry_offset = first_data_entry_offset(images[0])
    struct.pack_into(">Q", aliased, entry_offset + 8, _entry_at(images[0], entry_offset))
    with pytest.raises(MalformedImage, match="twice"):
        parse_bytes(bytes(aliased))


def test_our_sparse_16_tib_image() -> None:
    """Far offsets, many L2 tables: each carried chunk comes back as one write."""
    virtual_size = 16 * 1024**4
    rng = random.Random(8)
    chunks = sorted({rng.randrange(virtual_size // CHUNK_SIZE) for _ in range(40)})
    layout = Qcow2Layout(allocation_of(virtual_size, chunks), identity(3))
    image = render(layout, 0, layout.size, lambda offset, length: bytes(length))
    parsed = parse_bytes(image)
    assert parsed.virtual_size == virtual_size and parsed.identity == bytes([3]) * 16
    writes = list(parsed.writes())
    assert_ascending(writes)
    runs = [(w.virtual_offset, w.length) for w in writes]
    assert sum(length for _offset, length in runs) == len(chunks) * CHUNK_SIZE
    assert {offset // CHUNK_SIZE for offset, _length in runs} <= set(chunks)
