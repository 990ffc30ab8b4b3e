"""Images applied as they arrive give exactly what a whole-file import gives.

In-process (no FUSE): an upload is fed the way the mount feeds it, in pieces
of any size, and compared with ``run_import`` of the same bytes.  Hostile
variants (truncated, bytes changed) must be refused by both or applied
identically by both; a refusal leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FUZZ_DERANDOMIZE, FUZZ_EXAMPLES, needs_tool
from vdifs.errors import VdifsError
from vdifs.exports import DiskState, Export
from vdifs.imports.engine import run_import
from vdifs.imports.uploads import Uploads
from vdifs.storage.local import LocalSR

pytestmark = needs_tool("qemu-img")

MiB = 1 << 20


@pytest.fixture(scope="module")
def sr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSR]:
    sr = LocalSR(tmp_path_factory.mktemp("streaming") / "sr")
    yield sr
    sr.close()


@pytest.fixture(scope="module")
def seeds(sr: LocalSR, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, bytes]]:
    """vdifs' own VHD and qcow2 (tables first) and qemu-img's (tables between the data)."""
    tmp = tmp_path_factory.mktemp("seeds")
    rng = random.Random(7)
    raw = bytearray(3 * MiB + 512)
    for _ in range(12):
        at = rng.randrange(len(raw) - 70_000)
        raw[at : at + 70_000] = rng.randbytes(70_000)
    (tmp / "disk.raw").write_bytes(raw)
    with open(tmp / "disk.raw", "rb") as f:
        source = run_import(
            sr,
            name="disk.raw",
            fmt="raw",
            read_at=lambda o, n: os.pread(f.fileno(), n, o),
            size=len(raw),
            target=None,
            new_name="source",
        ).target
    state = DiskState(*sr.state(source))
    out = {}
    for fmt in ("vhd", "qcow2"):
        export = Export(sr, state, fmt)
        out[f"vdifs.{fmt}"] = (fmt, bytes(export.read(0, export.size)))
    for name, fmt, options in [
        ("qemu.qcow2", "qcow2", ["-O", "qcow2"]),
        ("qemu-v2.qcow2", "qcow2", ["-O", "qcow2", "-o", "compat=0.10"]),
        ("qemu.vhd", "vhd", ["-O", "vpc", "-o", "force_size=on"]),
    ]:
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", *options, tmp / "disk.raw", tmp / name],
            check=True,
        )
        out[name] = (fmt, (tmp / name).read_bytes())
    # Files that are two things at once, made by qemu-img: a fixed VHD whose
    # data begins with a dynamic VHD (an LV holding a VHD), and qcow2 images
    # with a fixed VHD's footer appended (a polyglot), under either extension.
    inner = out["qemu.vhd"][1]
    (tmp / "inner.raw").write_bytes(inner.ljust(len(inner) + 4 * MiB, b"\0"))
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on",
         tmp / "inner.raw", tmp / "holder.vhd"],
        check=True,
    )  # fmt: skip
    out["fixed-holding-a-vhd.vhd"] = ("vhd", (tmp / "holder.vhd").read_bytes())
    for name in ("qemu.qcow2", "vdifs.qcow2"):
        qcow2 = out[name][1]
        padded = qcow2.ljust(-(-len(qcow2) // 512) * 512, b"\0")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on",
             tmp / "footer.vhd", str(len(padded))],
            check=True,
        )  # fmt: skip
        polyglot = padded + (tmp / "footer.vhd").read_bytes()[-512:]
        out[f"polyglot-{name}"] = ("qcow2", polyglot)
        out[f"polyglot-{name}.vhd"] = ("vhd", polyglot)
    return out


REFUSED = {"fixed-holding-a-vhd.vhd"} | {
    f"polyglot-{name}{ext}" for name in ("qemu.qcow2", "vdifs.qcow2") for ext in ("", ".vhd")
}


def disk_bytes(sr: LocalSR, uuid: str) -> bytes:
    state = DiskState(*sr.state(uuid))
    export = Export(sr, state, "raw")
    return bytes(export.read(0, export.size))


Outcome = tuple[int, bytes | None]
"""An import's verdict: the errno (0 for success) and the disk it made."""


def whole(sr: LocalSR, fmt: str, image: bytes) -> Outcome:
    try:
        result = run_import(
            sr,
            name=f"whole.{fmt}",
            fmt=fmt,
            read_at=lambda o, n: image[o : o + n],
            size=len(image),
            target=None,
            new_name="whole",
        )
    except VdifsError as exc:
        return exc.errno, None
    return 0, disk_bytes(sr, result.target)


def streamed(sr: LocalSR, fmt: str, image: bytes, pieces: list[int]) -> Outcome:
    """Feed an upload as the mount does (accept, then store) and close it."""
    upload = Uploads(sr).create(f"streamed.{fmt}", os.getpid())
    try:
        offset, turn = 0, 0
        while offset < len(image):
            piece = image[offset : offset + pieces[turn % len(pieces)]]
            upload.accept(offset, len(piece))
            upload.store(offset, piece)
            offset, turn = offset + len(piece), turn + 1
        result = upload.apply()
    except VdifsError as exc:
        upload.abandon(exc)
        return exc.errno, None
    finally:
        upload.discard()
    return 0, disk_bytes(sr, result.target)


def test_uploads_stream_and_match_whole_imports(
    sr: LocalSR, seeds: dict[str, tuple[str, bytes]]
) -> None:
    for name, (fmt, image) in seeds.items():
        expected = whole(sr, fmt, image)
        if name in REFUSED:  # the same verdict whichever way the file arrives
            assert expected == (errno.EINVAL, None), name
            for pieces in ([MiB], [4096, 70_000, 1], [len(image)]):
                assert streamed(sr, fmt, image, pieces) == expected, (name, pieces)
            continue
        assert expected[0] == 0, name
        upload = Uploads(sr).create(f"probe.{fmt}", os.getpid())
        for offset in range(0, len(image), MiB):
            upload.accept(offset, len(image[offset : offset + MiB]))
            upload.store(offset, image[offset : offset + MiB])
        assert upload.stream is not None and upload.stream.state == "streaming", name
        upload.stream.close()
        upload.discard()
        for pieces in ([MiB], [4096, 70_000, 1], [len(image)]):
            assert streamed(sr, fmt, image, pieces) == expected, (name, pieces)


@settings(
    max_examples=max(FUZZ_EXAMPLES // 10, 20),  # each example imports twice
    deadline=None,
    derandomize=FUZZ_DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_hostile_uploads_stream_like_whole_imports(
    sr: LocalSR, seeds: dict[str, tuple[str, bytes]], data: st.DataObject
) -> None:
    fmt, seed = seeds[data.draw(st.sampled_from(sorted(seeds)))]
    image = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["truncate", "byte", "word"]))
        if kind == "truncate":
            image = image[: data.draw(st.integers(0, len(image)))]
        elif image:
            at = data.draw(st.integers(0, min(len(image), 256 * 1024) - 1))
            if kind == "byte":
                image[at] = data.draw(st.integers(0, 255))
            else:
                image[at : at + 8] = data.draw(st.binary(min_size=8, max_size=8))
    pieces = data.draw(st.lists(st.integers(1, 3 * MiB), min_size=1, max_size=4))
    files_before = sorted(p.name for p in (sr.path / "packs").iterdir())
    expected = whole(sr, fmt, bytes(image))
    assert streamed(sr, fmt, bytes(image), pieces) == expected
    if expected[1] is None:  # refused by both: no pack left behind
        assert sorted(p.name for p in (sr.path / "packs").iterdir()) == files_before


def test_a_streamed_vhd_holds_few_partly_written_chunks(sr: LocalSR) -> None:
    """Block data starts a sector past a bitmap, so nearly every chunk arrives
    split across two writes: each must be stored once complete, not held until
    the end (a 4 GiB upload held 64 MiB of them)."""
    rng = random.Random(3)
    raw = rng.randbytes(16 * MiB)
    source = run_import(
        sr,
        name="full.raw",
        fmt="raw",
        read_at=lambda o, n: raw[o : o + n],
        size=len(raw),
        target=None,
        new_name="split-chunks",
    ).target
    export = Export(sr, DiskState(*sr.state(source)), "vhd")
    image = bytes(export.read(0, export.size))
    upload = Uploads(sr).create("split.vhd", os.getpid())
    most_open = 0
    try:
        for offset in range(0, len(image), MiB):
            piece = image[offset : offset + MiB]
            upload.accept(offset, len(piece))
            upload.store(offset, piece)
            stream = upload.stream
            assert stream is not None and stream.state == "streaming"
            if stream.job is not None:
                most_open = max(most_open, len(stream.job.applier.open))
        result = upload.apply()
    finally:
        upload.discard()
    assert most_open <= 2
    assert disk_bytes(sr, result.target) == raw
