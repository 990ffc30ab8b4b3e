"""import/ never loses data through a sequence of ordinary commands.

Every sequence of commands that all return 0 leaves the disk equal to one
complete image the user wrote; anything else fails at open, write or close
with an errno and a status record.  Each test runs real commands (cp, dd,
truncate, cat, touch, rsync, qemu-img) against the real mount and checks the
disk's sha256 after the whole sequence, not only the exit statuses.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Cli, Mount, fill, needs_fuse, needs_tool, sha, wait_for
from tests.test_xo_oracle import xo_restore
from vdifs.imports.uploads import State, Uploads
from vdifs.storage.local import LocalSR

pytestmark = [needs_fuse, needs_tool("qemu-img")]

MiB = 1 << 20
SIZE = 64 * MiB


def sh(command: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def qemu_convert(raw: Path, out: Path, fmt: str, options: str | None = None) -> None:
    """qemu-img convert of a raw file (the peer that makes the images under test)."""
    opts = ["-o", options] if options else []
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, str(raw), str(out)], check=True
    )


def status(mnt: Mount, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(
        (mnt.path / "import" / ".status" / f"{name}.json").read_text()
    )
    return data


@pytest.fixture
def disk(cli: Cli, mnt: Mount, tmp_path: Path) -> tuple[str, Path, Path]:
    """A 64 MiB VDI restored from src.raw by cp: (uuid, its raw.img, src.raw)."""
    uuid = cli("vdi", "create", "t", "--size", "64M")
    assert wait_for(lambda: mnt.vdi(uuid).exists(), 3)
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(SIZE))
    assert sh(f"cp {src} {mnt.path}/import/{uuid}.raw").returncode == 0
    raw = mnt.vdi(uuid) / "raw.img"
    assert sha(raw) == sha(src)
    return uuid, raw, src


def test_an_applied_name_is_never_applied_again(
    mnt: Mount, disk: tuple[str, Path, Path], tmp_path: Path
) -> None:
    uuid, raw, src = disk
    name = mnt.path / "import" / f"{uuid}.raw"
    want = sha(src)
    # The stub left by the import holds nothing: there is nothing to grow or append to.
    assert name.stat().st_size == 0
    truncated = sh(f"truncate -s 64M {name}")
    assert truncated.returncode != 0, truncated
    assert "Invalid argument" in truncated.stderr
    assert sha(raw) == want
    half = tmp_path / "h.raw"
    half.write_bytes(os.urandom(SIZE // 2))
    assert sh(f"cat {half} >> {name}").returncode != 0
    assert sha(raw) == want
    assert sh(f"cp {half} {name}").returncode != 0  # half a disk: refused
    assert sh(f"cat {half} >> {name}").returncode != 0
    assert sha(raw) == want
    record = status(mnt, f"{uuid}.raw")
    assert record["state"] == "failed" and record["errno_name"] == "EINVAL"


def test_dd_pieces_into_one_name_never_add_up(
    mnt: Mount, disk: tuple[str, Path, Path], tmp_path: Path
) -> None:
    """Separate dd runs are separate uploads: each is refused, none zeroes the disk."""
    uuid, raw, src = disk
    name = mnt.path / "import" / f"{uuid}.raw"
    piece = tmp_path / "piece"
    piece.write_bytes(os.urandom(MiB))
    for mib in reversed(range(64)):
        result = sh(f"dd if={piece} of={name} bs=1M seek={mib} conv=notrunc status=none")
        assert result.returncode != 0, (mib, result)
    assert sh(f"truncate -s 64M {name}").returncode != 0
    assert sha(raw) == sha(src)
    # In order, from the start, piece by piece: each run is still one short file.
    for mib in range(3):
        assert sh(f"dd if={piece} of={name} bs=1M seek={mib} conv=notrunc status=none").returncode
    assert sha(raw) == sha(src)


def test_touch_after_an_import_locks_nothing(
    cli: Cli, mnt: Mount, disk: tuple[str, Path, Path], tmp_path: Path
) -> None:
    uuid, raw, src = disk
    name = mnt.path / "import" / f"{uuid}.vhd"
    image = tmp_path / "x.vhd"
    qemu_convert(src, image, "vpc", "force_size=on")
    assert sh(f"cp {image} {name}").returncode == 0
    assert sh(f"touch {name}").returncode == 0  # opened for writing, closed unwritten
    assert sha(raw) == sha(src)
    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(SIZE))
    cli("import", uuid, str(other))  # not left locked (exit 6 before)
    assert wait_for(lambda: sha(raw) == sha(other), 3)
    assert sh(f"cp {image} {name}").returncode == 0  # nor for uploads
    assert sha(raw) == sha(src)


def test_a_second_writer_gets_ebusy_and_the_first_goes_on(
    cli: Cli, mnt: Mount, tmp_path: Path
) -> None:
    uuid = cli("vdi", "create", "busy", "--size", "64M")
    assert wait_for(lambda: mnt.vdi(uuid).exists(), 3)
    name = mnt.path / "import" / f"{uuid}.raw"
    first, second = os.urandom(SIZE), os.urandom(MiB)
    (tmp_path / "b.raw").write_bytes(second)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, first[: SIZE // 2])
        dd = sh(f"dd if={tmp_path / 'b.raw'} of={name} bs=1M count=1 conv=notrunc status=none")
        assert dd.returncode != 0 and "busy" in dd.stderr.lower(), dd
        cp = sh(f"cp {tmp_path / 'b.raw'} {name}")
        assert cp.returncode != 0 and "busy" in cp.stderr.lower(), cp
        with pytest.raises(OSError) as exc:
            os.open(name, os.O_WRONLY | os.O_APPEND)
        assert exc.value.errno == errno.EBUSY
        os.write(fd, first[SIZE // 2 :])
    finally:
        os.close(fd)
    assert sha(mnt.vdi(uuid) / "raw.img") == sha_bytes(first)


def sha_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("length", [SIZE - 1, SIZE - 512, SIZE // 2, 1])
def test_a_raw_file_must_be_the_whole_disk(
    mnt: Mount, disk: tuple[str, Path, Path], tmp_path: Path, length: int
) -> None:
    uuid, raw, src = disk
    short = tmp_path / "short.raw"
    short.write_bytes(os.urandom(length))
    result = sh(f"cp {short} {mnt.path}/import/{uuid}.raw")
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    assert sha(raw) == sha(src)
    record = status(mnt, f"{uuid}.raw")
    assert record["state"] == "failed" and "exactly the disk's size" in str(record["error"])


def test_qemu_img_default_vhd_restores_into_a_disk_of_the_same_size(
    mnt: Mount, disk: tuple[str, Path, Path], tmp_path: Path
) -> None:
    """Without force_size qemu-img rounds the size up to a CHS geometry (16 KiB here)."""
    uuid, raw, src = disk
    fill(raw, 0, bytes(MiB))  # something the import must restore
    for subformat in ("dynamic", "fixed"):
        image = tmp_path / f"chs-{subformat}.vhd"
        qemu_convert(src, image, "vpc", f"subformat={subformat}")
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(image)],
                capture_output=True,
                check=True,
            ).stdout
        )
        assert SIZE < info["virtual-size"] < SIZE + MiB  # the case at hand
        result = sh(f"cp {image} {mnt.path}/import/{uuid}.vhd")
        assert result.returncode == 0, result
        assert sha(raw) == sha(src)
        record = status(mnt, f"{uuid}.vhd")
        assert record["state"] == "done" and "geometry" in str(record["notes"])
        fill(raw, 0, bytes(MiB))
    # Data past the disk's end is refused: it would be lost.
    image = tmp_path / "chs-fixed.vhd"
    with open(image, "r+b") as f:
        f.seek(SIZE + 100)
        f.write(b"\1")
    result = sh(f"cp {image} {mnt.path}/import/{uuid}.vhd")
    assert result.returncode != 0 and "too large" in result.stderr.lower()
    assert sha(raw) != sha(src)  # untouched: still the zeroed first MiB
    record = status(mnt, f"{uuid}.vhd")
    assert record["state"] == "failed" and record["errno_name"] == "EFBIG"


@needs_tool("rsync")
def test_cp_and_rsync_agree_on_a_fixed_vhd_holding_a_vhd(
    mnt: Mount, disk: tuple[str, Path, Path], tmp_path: Path
) -> None:
    """qemu reads such a file as the inner VHD, the specification as the outer one."""
    uuid, raw, src = disk
    inner = tmp_path / "inner.vhd"
    qemu_convert(src, inner, "vpc", "force_size=on")
    lv = tmp_path / "lv.raw"
    lv.write_bytes(inner.read_bytes().ljust(SIZE + 8 * MiB, b"\0"))  # an LV holding a VHD
    outer = tmp_path / "outer.vhd"
    qemu_convert(lv, outer, "vpc", "subformat=fixed,force_size=on")
    fill(raw, 0, bytes(MiB))
    before = sha(raw)
    for command in ("cp", "rsync", "rsync --inplace"):
        result = sh(f"{command} {outer} {mnt.path}/import/{uuid}.vhd")
        assert result.returncode != 0, (command, result)
        assert sha(raw) == before, command
        record = status(mnt, f"{uuid}.vhd")
        assert record["state"] == "failed" and record["errno_name"] == "EINVAL", command


def test_a_file_valid_as_two_formats_is_refused(
    mnt: Mount, disk: tuple[str, Path, Path], tmp_path: Path
) -> None:
    uuid, raw, src = disk
    qcow2 = tmp_path / "x.qcow2"
    qemu_convert(src, qcow2, "qcow2")
    data = qcow2.read_bytes()
    data += bytes(-len(data) % 512)
    footer = tmp_path / "footer.vhd"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on",
         str(footer), str(len(data))],
        check=True,
    )  # fmt: skip
    polyglot = tmp_path / "polyglot"
    polyglot.write_bytes(data + footer.read_bytes()[-512:])
    fill(raw, 0, bytes(MiB))
    before = sha(raw)
    for ext in ("qcow2", "vhd"):
        name = f"{uuid}.{ext}"
        shutil.copyfile(polyglot, tmp_path / name)
        result = sh(f"cp {tmp_path / name} {mnt.path}/import/{name}")
        assert result.returncode != 0 and "Invalid argument" in result.stderr, (ext, result)
        assert sha(raw) == before
        assert "two different disks" in str(status(mnt, name)["error"])


def test_every_vdi_has_one_by_name_entry(cli: Cli, mnt: Mount) -> None:
    first = cli("vdi", "create", "dup", "--size", "1M")
    second = cli("vdi", "create", "dup", "--size", "1M")
    third = cli("vdi", "create", f"dup~{first[:8]}", "--size", "1M")
    fourth = cli("vdi", "create", f"dup~{first}", "--size", "1M")
    long_name = "%" * 255  # escaped, three bytes a character
    fifth = cli("vdi", "create", long_name, "--size", "1M")
    sixth = cli("vdi", "create", "é" * 127, "--size", "1M")  # 254 bytes
    seventh = cli("vdi", "create", "é" * 127, "--size", "1M")
    uuids = {first, second, third, fourth, fifth, sixth, seventh}
    by_name = mnt.path / "by-name"
    assert wait_for(lambda: len(os.listdir(by_name)) == len(uuids), 3)
    targets = {}
    for entry in os.listdir(by_name):
        assert len(os.fsencode(entry)) <= 255, entry
        targets[entry] = Path(os.readlink(by_name / entry)).name
        assert (by_name / entry / "info.json").exists()
    assert sorted(targets.values()) == sorted(uuids)  # one entry each, no VDI twice
    assert targets[f"dup~{first[:8]}"] == third  # a name held once is shown as it is
    assert targets[f"dup~{first}"] == fourth


def test_resize_and_a_chain_across_it(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    vdi = cli("vdi", "create", "grow", "--size", "5M")
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    raw = mnt.vdi(vdi) / "raw.img"
    fill(raw, 0, os.urandom(5 * MiB))
    s1 = cli("vdi", "snapshot", vdi)
    assert cli("vdi", "resize", vdi, "9M") == str(9 * MiB)
    assert wait_for(lambda: raw.stat().st_size == 9 * MiB, 3)
    info_json = mnt.vdi(vdi) / "info.json"
    assert wait_for(lambda: json.loads(info_json.read_text())["virtual_size"] == 9 * MiB, 3)
    assert (raw.read_bytes()[5 * MiB :]) == bytes(4 * MiB)  # the new bytes are zeros
    fill(raw, 7 * MiB, os.urandom(MiB))
    fill(raw, 0, os.urandom(4096))
    s2 = cli("vdi", "snapshot", vdi)
    assert wait_for(lambda: mnt.vdi(s2).exists(), 3)
    assert (mnt.vdi(s1) / "raw.img").stat().st_size == 5 * MiB  # snapshots keep theirs
    # Refusals: shrinking, and snapshots.
    assert cli.run("vdi", "resize", vdi, "8M", check=False).returncode != 0
    assert cli.run("vdi", "resize", s1, "10M", check=False).returncode != 0
    for fmt in ("vhd", "qcow2"):
        backup = tmp_path / fmt
        backup.mkdir()
        shutil.copyfile(mnt.vdi(s1) / f"full.{fmt}", backup / f"{s1}.{fmt}")
        shutil.copyfile(mnt.vdi(s2) / "delta-from" / f"{s1}.{fmt}", backup / f"{s2}.{fmt}")
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(backup / f"{s2}.{fmt}")],
                capture_output=True,
                check=True,
            ).stdout
        )
        assert info["virtual-size"] == 9 * MiB  # the delta carries the new size
        if fmt == "qcow2":  # qemu follows a qcow2 chain; its vpc driver ignores parents
            subprocess.run(
                ["qemu-img", "compare", "-F", "raw", str(backup / f"{s2}.{fmt}"),
                 str(mnt.vdi(s2) / "raw.img")],
                check=True,
            )  # fmt: skip
        elif shutil.which("node"):  # Xen Orchestra's vhd-lib follows the VHD chain
            xo_restore("synthetic", tmp_path / "xo.raw", backup / f"{s2}.{fmt}")
            assert sha(tmp_path / "xo.raw") == sha(mnt.vdi(s2) / "raw.img")
        # Restore: the full makes a 5 MiB disk, the delta grows it.
        name = f"restored-{fmt}"
        assert sh(f"cp {backup / f'{s1}.{fmt}'} {mnt.path}/import/{name}.{fmt}").returncode == 0
        restored = mnt.path / "by-name" / name
        assert wait_for(restored.exists, 3)
        uuid = Path(os.readlink(restored)).name
        assert sh(f"cp {backup / f'{s2}.{fmt}'} {mnt.path}/import/{uuid}.{fmt}").returncode == 0
        assert sha(restored / "raw.img") == sha(mnt.vdi(s2) / "raw.img")
        assert "grew" in str(status(mnt, f"{uuid}.{fmt}")["notes"])


def test_a_streamed_upload_cannot_be_renamed_under_its_writer(
    mnt: Mount, disk: tuple[str, Path, Path], tmp_path: Path
) -> None:
    """Its blocks went to the import as they arrived: a rename would apply holes."""
    uuid, raw, src = disk
    image = tmp_path / "x.vhd"
    qemu_convert(src, image, "vpc", "force_size=on")
    fill(raw, 0, bytes(MiB))
    other = cli_vdi(mnt, raw)
    name = mnt.path / "import" / f"{uuid}.vhd"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, image.read_bytes())
        with pytest.raises(OSError) as exc:
            os.rename(name, mnt.path / "import" / f"{other}.vhd")
        assert exc.value.errno == errno.EBUSY
    finally:
        os.close(fd)
    assert sha(raw) == sha(src)


def cli_vdi(mnt: Mount, like: Path) -> str:
    """Another VDI of the same size (a rename target)."""
    result = subprocess.run(
        [sys.executable, "-m", "vdifs", "--sr", str(mnt.sr), "vdi", "create", "other",
         "--size", str(like.stat().st_size)],
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    uuid = result.stdout.strip()
    assert wait_for(lambda: mnt.vdi(uuid).exists(), 3)
    return uuid


def test_a_source_named_like_the_upload_does_not_stop_the_import(
    mnt: Mount, disk: tuple[str, Path, Path], tmp_path: Path
) -> None:
    """cp ~/import/<uuid>.raw <mnt>/import/<uuid>.raw closes its source last."""
    uuid, raw, _src = disk
    folder = tmp_path / "import"
    folder.mkdir()
    source = folder / f"{uuid}.raw"
    source.write_bytes(os.urandom(SIZE))
    assert sh(f"cp {source} {mnt.path}/import/{uuid}.raw").returncode == 0
    assert sha(raw) == sha(source)
    assert sh(f"cp {source} {mnt.path}/import/{uuid}.raw").returncode == 0  # not left locked


def test_a_temporary_file_truncated_to_nothing_carries_nothing(
    mnt: Mount, disk: tuple[str, Path, Path]
) -> None:
    uuid, raw, src = disk
    temp = mnt.path / "import" / ".upload.part"
    assert sh(f"echo x > {temp} && truncate -s 0 {temp} && truncate -s 64M {temp}").returncode == 0
    with pytest.raises(OSError) as exc:
        os.rename(temp, mnt.path / "import" / f"{uuid}.raw")
    assert exc.value.errno == errno.EINVAL
    assert sha(raw) == sha(src)


def test_a_failed_upload_a_reader_still_holds_gives_way_to_a_new_copy(sr: LocalSR) -> None:
    """In process: a write that failed leaves the upload FAILED while a reader holds it."""
    uuid = sr.create_vdi("t", MiB).uuid
    uploads = Uploads(sr)
    upload = uploads.create(f"{uuid}.raw", os.getpid())
    upload.handles = 2  # the writer and a reader
    upload.abandon(OSError(errno.ENOSPC, "the disk filled up"))
    assert upload.state is State.FAILED
    uploads.release(upload, writing=True)  # the writer goes; the reader stays
    assert f"{uuid}.raw" in uploads.entries
    uploads.open_for_writing(upload, os.getpid(), truncate=True)  # a new cp
    assert upload.state is State.RECEIVING and upload.error is None and upload.size == 0
    data = os.urandom(MiB)
    upload.accept(0, len(data))
    upload.store(0, data)
    upload.apply()
    _record, content = sr.state(uuid)
    buf = bytearray(MiB)
    sr.read_into(content, 0, memoryview(buf))
    assert bytes(buf) == data
    upload.handles = 0
    uploads.close_all()
