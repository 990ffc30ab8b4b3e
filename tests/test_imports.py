"""import/ and vdifs import: restores through the real mount and CLI.

Images come from our own exports and from qemu-img; every refusal must leave
the target byte-identical and say why through close()'s errno and the status.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Cli, Mount, export_sha, fill, needs_fuse, needs_tool, sha, wait_for

pytestmark = [needs_fuse, needs_tool("qemu-img")]

MiB = 1 << 20


def appear(mnt: Mount, uuid: str) -> None:
    assert wait_for(lambda: mnt.vdi(uuid).exists(), 3)


def copy_in(src: Path, dest: Path) -> int:
    """cp semantics: the errno of write or close, 0 on success."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(src, "rb") as f:
            while data := f.read(MiB):
                os.write(fd, data)
    except OSError as exc:
        # A streamed VHD is refused as soon as its head arrives: write fails,
        # and close() repeats the error.
        with contextlib.suppress(OSError):
            os.close(fd)
        return exc.errno or -1
    try:
        os.close(fd)
    except OSError as exc:
        return exc.errno or -1
    return 0


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def source(cli: Cli, mnt: Mount) -> tuple[str, str, str]:
    """A VDI with snapshots S1 and S2 (S2 = S1 plus changes, some zeroed)."""
    vdi = cli("vdi", "create", "src", "--size", "20M")
    appear(mnt, vdi)
    raw = mnt.vdi(vdi) / "raw.img"
    fill(raw, 0, os.urandom(5 * MiB))
    fill(raw, 9 * MiB + 512, os.urandom(100_000))
    s1 = cli("vdi", "snapshot", vdi)
    fill(raw, 3 * MiB, os.urandom(2 * MiB + 7))
    fill(raw, 0, bytes(MiB))
    fill(raw, 19 * MiB, os.urandom(MiB))
    s2 = cli("vdi", "snapshot", vdi)
    appear(mnt, s2)
    return vdi, s1, s2


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_full_then_delta_round_trip_through_the_mount(
    cli: Cli, mnt: Mount, source: tuple[str, str, str], tmp_path: Path, fmt: str
) -> None:
    _vdi, s1, s2 = source
    full, delta = tmp_path / f"{s1}.{fmt}", tmp_path / f"{s2}.{fmt}"
    shutil.copyfile(mnt.vdi(s1) / f"full.{fmt}", full)
    shutil.copyfile(mnt.vdi(s2) / "delta-from" / f"{s1}.{fmt}", delta)
    target = cli("vdi", "create", "restore", "--size", "20M")
    appear(mnt, target)
    fill(mnt.vdi(target) / "raw.img", 12 * MiB, os.urandom(MiB))  # junk the full must clear
    subprocess.run(["cp", str(full), str(mnt.path / "import" / f"{target}.{fmt}")], check=True)
    assert wait_for(lambda: sha(mnt.vdi(target) / "raw.img") == sha(mnt.vdi(s1) / "raw.img"), 3)
    subprocess.run(["cp", str(delta), str(mnt.path / "import" / f"{target}.{fmt}")], check=True)
    assert wait_for(lambda: sha(mnt.vdi(target) / "raw.img") == sha(mnt.vdi(s2) / "raw.img"), 3)
    status = json.loads((mnt.path / "import" / ".status" / f"{target}.{fmt}.json").read_text())
    assert status["state"] == "done" and status["chunks_applied"] > 0
    assert status["bytes_received"] == delta.stat().st_size
    # Once applied, an empty stub keeps the name a while (rsync stats it after close).
    stub = mnt.path / "import" / f"{target}.{fmt}"
    assert stub.stat().st_size == 0
    assert stub.read_bytes() == b""


def test_a_delta_goes_only_onto_its_base(
    cli: Cli, mnt: Mount, source: tuple[str, str, str], tmp_path: Path
) -> None:
    _vdi, s1, s2 = source
    delta = tmp_path / "d.vhd"
    shutil.copyfile(mnt.vdi(s2) / "delta-from" / f"{s1}.vhd", delta)
    other = cli("vdi", "create", "other", "--size", "20M")
    appear(mnt, other)
    before = sha(mnt.vdi(other) / "raw.img")
    assert copy_in(delta, mnt.path / "import" / f"{other}.vhd") == errno.EINVAL
    assert sha(mnt.vdi(other) / "raw.img") == before
    status = json.loads((mnt.path / "import" / ".status" / f"{other}.vhd.json").read_text())
    assert status["state"] == "failed" and "base" in status["error"]
    assert copy_in(delta, mnt.path / "import" / "brand-new.vhd") == errno.EINVAL
    refused = cli.run("import", other, str(delta), check=False)
    assert refused.returncode == 10 and "--force" in refused.stderr
    cli("import", other, str(delta), "--force")  # the deliberate override
    # A clone of S1 holds S1's blocks: the delta applies.
    clone = cli("vdi", "clone", s1)
    cli("import", clone, str(delta))
    appear(mnt, clone)
    assert sha(mnt.vdi(clone) / "raw.img") == sha(mnt.vdi(s2) / "raw.img")


def test_images_made_by_qemu_img(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(24 * MiB)
        for offset in (0, 5 * MiB + 4096, 17 * MiB - 512):
            f.seek(offset)
            f.write(os.urandom(700_000))
    expected = hashlib.sha256(raw.read_bytes()).hexdigest()
    images = {
        "dynamic.vhd": ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
        "fixed.vhd": ["-O", "vpc", "-o", "subformat=fixed,force_size=on"],
        "plain.qcow2": ["-O", "qcow2"],
        "v2.qcow2": ["-O", "qcow2", "-o", "compat=0.10"],
        "compressed.qcow2": ["-O", "qcow2", "-c"],
    }
    for name, opts in images.items():
        image = tmp_path / name
        qemu_img("convert", "-f", "raw", *opts, str(raw), str(image))
        target = cli("vdi", "create", name, "--size", "24M")
        appear(mnt, target)
        assert copy_in(image, mnt.path / "import" / f"{target}{image.suffix}") == 0, name
        assert wait_for(lambda t=target: sha(mnt.vdi(t) / "raw.img") == expected, 3), name
    # A qemu-img overlay applies as a delta onto the image imported before it.
    base = tmp_path / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    subprocess.run(
        ["qemu-io", "-c", "write -P 0xab 1M 100k", "-c", "write -z 0 64k", str(top)],
        check=True,
        capture_output=True,
    )
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-O", "raw", str(top), str(flat))
    target = cli("vdi", "create", "overlay", "--size", "24M")
    cli("import", target, str(base))
    cli("import", target, str(top))
    appear(mnt, target)
    assert sha(mnt.vdi(target) / "raw.img") == hashlib.sha256(flat.read_bytes()).hexdigest()


def test_small_clusters_written_out_of_order(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    """A qcow2 of 4 KiB clusters allocated in a guest's order (here: backwards, then
    scattered) fills each 64 KiB chunk in many writes, in any order."""
    image = tmp_path / "guest.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(image), "8M")
    writes = [
        f"write -P {n % 251 + 1} {at} 4096" for n, at in enumerate(range(2 * MiB - 4096, -1, -4096))
    ]
    writes += [f"write -P {n % 13 + 7} {(n * 37 % 1536) * 4096 + 2 * MiB} 4096" for n in range(300)]
    for start in range(0, len(writes), 200):  # qemu-io's argument list, in batches
        args = [a for w in writes[start : start + 200] for a in ("-c", w)]
        subprocess.run(
            ["qemu-io", "-f", "qcow2", *args, str(image)], check=True, capture_output=True
        )
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(image), str(flat))
    expected = hashlib.sha256(flat.read_bytes()).hexdigest()
    by_cli = cli("vdi", "create", "by-cli", "--size", "8M")
    cli("import", by_cli, str(image))
    by_cp = cli("vdi", "create", "by-cp", "--size", "8M")
    appear(mnt, by_cp)
    assert copy_in(image, mnt.path / "import" / f"{by_cp}.qcow2") == 0
    for uuid in (by_cli, by_cp):
        assert wait_for(lambda u=uuid: sha(mnt.vdi(u) / "raw.img") == expected, 3), uuid


def test_new_vdi_from_an_image_and_a_raw_lookalike(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    raw = tmp_path / "x.raw"
    raw.write_bytes(os.urandom(3 * MiB + 512))
    assert copy_in(raw, mnt.path / "import" / "fresh.img") == 0
    assert wait_for(lambda: "fresh" in os.listdir(mnt.path / "by-name"), 3)
    fresh = mnt.path / "by-name" / "fresh" / "raw.img"
    assert fresh.stat().st_size == 3 * MiB + 512
    assert sha(fresh) == sha(raw)
    # The name decides the format: a raw disk that starts like a qcow2 stays raw.
    lookalike = tmp_path / "look.raw"
    qemu_img("create", "-f", "qcow2", str(tmp_path / "q.qcow2"), "1M")
    lookalike.write_bytes((tmp_path / "q.qcow2").read_bytes().ljust(MiB, b"\0"))
    assert copy_in(lookalike, mnt.path / "import" / "lookalike.raw") == 0
    assert wait_for(lambda: "lookalike" in os.listdir(mnt.path / "by-name"), 3)
    assert sha(mnt.path / "by-name" / "lookalike" / "raw.img") == sha(lookalike)


def test_refusals_leave_the_target_unchanged(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    target = cli("vdi", "create", "victim", "--size", "8M")
    appear(mnt, target)
    fill(mnt.vdi(target) / "raw.img", 0, os.urandom(2 * MiB))
    before = sha(mnt.vdi(target) / "raw.img")
    good = tmp_path / "good.vhd"
    small_raw = tmp_path / "small.raw"
    small_raw.write_bytes(os.urandom(4 * MiB))
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", str(small_raw), str(good))
    data = good.read_bytes()
    corrupt_checksum = bytearray(data)
    corrupt_checksum[64] ^= 0xFF
    big = tmp_path / "big.raw"
    big.write_bytes(b"\1" * (9 * MiB))
    too_big_vhd = tmp_path / "too-big.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", str(big), str(too_big_vhd))
    cases = {
        "truncated.vhd": (data[: len(data) // 2], errno.EINVAL),
        "footerless.vhd": (data[:-512], errno.EINVAL),
        "checksum.vhd": (bytes(corrupt_checksum), errno.EINVAL),
        "empty.vhd": (b"", errno.EINVAL),
        "garbage.qcow2": (os.urandom(70_000), errno.EINVAL),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        suffix = path.suffix
        assert copy_in(path, mnt.path / "import" / f"{target}{suffix}") == expected, name
        assert sha(mnt.vdi(target) / "raw.img") == before, name
    assert copy_in(big, mnt.path / "import" / f"{target}.raw") == errno.EFBIG
    assert copy_in(too_big_vhd, mnt.path / "import" / f"{target}.vhd") == errno.EFBIG
    assert sha(mnt.vdi(target) / "raw.img") == before
    # The CLI reports the same, with a status the user can read back.
    failed = cli.run("import", target, str(big), check=False)
    assert failed.returncode == 7 and failed.stderr.startswith("vdifs: ")
    history = cli.json("import-status", "--json")
    assert history[0]["state"] == "failed" and history[0]["errno_name"] == "EFBIG"
    refused = cli.run("import", target, str(tmp_path / "checksum.vhd"), "--format", "auto",
                      check=False)  # fmt: skip
    assert refused.returncode == 2
    noext = tmp_path / "disk"
    noext.write_bytes(b"x")
    guess = cli.run("import", target, str(noext), check=False)
    assert guess.returncode == 2 and "never guesses" in guess.stderr


def test_snapshot_target_is_read_only_at_open(
    cli: Cli, mnt: Mount, source: tuple[str, str, str]
) -> None:
    _vdi, s1, _s2 = source
    with pytest.raises(OSError) as exc:
        os.open(mnt.path / "import" / f"{s1}.vhd", os.O_WRONLY | os.O_CREAT, 0o600)
    assert exc.value.errno == errno.EROFS


def test_one_import_per_target(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    target = cli("vdi", "create", "busy", "--size", "4M")
    appear(mnt, target)
    fd = os.open(mnt.path / "import" / f"{target}.raw", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as exc:
            os.open(mnt.path / "import" / f"{target}.vhd", os.O_WRONLY | os.O_CREAT, 0o600)
        assert exc.value.errno == errno.EBUSY
        other = tmp_path / "x.raw"
        other.write_bytes(b"\2" * 4096)
        cli_busy = cli.run("import", target, str(other), check=False)
        assert cli_busy.returncode == 6
        os.write(fd, b"\3" * (4 * MiB))
    finally:
        os.close(fd)
    assert wait_for(lambda: (mnt.vdi(target) / "raw.img").read_bytes() == b"\3" * (4 * MiB), 3)


def test_rsync_rsync_inplace_dd_and_cp(
    cli: Cli, mnt: Mount, source: tuple[str, str, str], tmp_path: Path
) -> None:
    _vdi, s1, _s2 = source
    image = tmp_path / "s1.vhd"
    shutil.copyfile(mnt.vdi(s1) / "full.vhd", image)
    expected = sha(mnt.vdi(s1) / "raw.img")
    commands = {
        "rsync": ["rsync", str(image), "{dest}"],
        "rsync-inplace": ["rsync", "--inplace", str(image), "{dest}"],
        "dd": ["dd", f"if={image}", "of={dest}", "bs=1M", "status=none"],
        "cp": ["cp", str(image), "{dest}"],
    }
    for tool, command in commands.items():
        if shutil.which(command[0]) is None:
            continue
        target = cli("vdi", "create", tool, "--size", "20M")
        appear(mnt, target)
        dest = str(mnt.path / "import" / f"{target}.vhd")
        subprocess.run([c.replace("{dest}", dest) for c in command], check=True)
        assert wait_for(lambda t=target: sha(mnt.vdi(t) / "raw.img") == expected, 3), tool
    # rsync's temporary file never stays behind or becomes an import by itself.
    assert [n for n in os.listdir(mnt.path / "import") if n.startswith(".")] == [".status"]
    # rsync --inplace over the same name again, as a nightly job would.
    target = cli("vdi", "create", "again", "--size", "20M")
    appear(mnt, target)
    dest = str(mnt.path / "import" / f"{target}.vhd")
    for _ in range(2):
        subprocess.run(["rsync", "--inplace", str(image), dest], check=True)
        assert wait_for(lambda t=target: sha(mnt.vdi(t) / "raw.img") == expected, 3)


def test_interrupted_cp_changes_nothing(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    target = cli("vdi", "create", "interrupted", "--size", "64M")
    appear(mnt, target)
    before = sha(mnt.vdi(target) / "raw.img")
    big = tmp_path / "big.raw"
    big.write_bytes(os.urandom(60 * MiB))
    dest = mnt.path / "import" / f"{target}.raw"
    proc = subprocess.Popen(["dd", f"if={big}", f"of={dest}", "bs=64k", "status=none"])
    assert wait_for(lambda: dest.exists() and dest.stat().st_size > 0, 5, 0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert sha(mnt.vdi(target) / "raw.img") == before
    status = json.loads((mnt.path / "import" / ".status" / f"{target}.raw.json").read_text())
    assert status["state"] == "failed" and "interrupted" in status["error"]


def test_reimport_of_the_same_content_makes_an_empty_delta(
    cli: Cli, mnt: Mount, source: tuple[str, str, str], tmp_path: Path
) -> None:
    vdi, _s1, s2 = source
    image = tmp_path / "s2.qcow2"
    shutil.copyfile(mnt.vdi(s2) / "full.qcow2", image)
    clone = cli("vdi", "clone", s2)
    before = cli("vdi", "snapshot", clone)
    cli("import", clone, str(image))
    after = cli("vdi", "snapshot", clone)
    appear(mnt, after)
    delta = mnt.vdi(after) / "delta-from" / f"{before}.qcow2"
    # Opened without its backing file: only what the delta itself carries.
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(delta)}}
    info = subprocess.run(
        ["qemu-img", "map", "--output=json", f"json:{json.dumps(spec)}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert all(not extent["data"] for extent in json.loads(info.stdout))
    del vdi


def test_concurrent_readers_see_old_content_until_commit(
    cli: Cli, mnt: Mount, tmp_path: Path
) -> None:
    target = cli("vdi", "create", "readers", "--size", "16M")
    appear(mnt, target)
    fill(mnt.vdi(target) / "raw.img", 0, b"\7" * (16 * MiB))
    old = sha(mnt.vdi(target) / "raw.img")
    new = tmp_path / "new.raw"
    new.write_bytes(b"\x09" * (16 * MiB))
    seen: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(sha(mnt.vdi(target) / "raw.img"))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert copy_in(new, mnt.path / "import" / f"{target}.raw") == 0
        time.sleep(1.5)
    finally:
        stop.set()
        thread.join()
    assert seen <= {old, hashlib.sha256(new.read_bytes()).hexdigest()}


def staged_bytes(sr: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in (sr / "staging").glob("*.upload"))


def upload_watching_staging(image: Path, dest: Path, sr: Path) -> int:
    """Write an image in 1 MiB pieces; the largest staging footprint seen."""
    staged_peak = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(image, "rb") as f:
        while data := f.read(MiB):
            os.write(fd, data)
            staged_peak = max(staged_peak, staged_bytes(sr))
    os.close(fd)
    return staged_peak


def test_a_sequential_vhd_is_applied_as_it_arrives(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(128 * MiB)
        for offset in range(0, 128 * MiB, 4 * MiB):
            f.seek(offset)
            f.write(os.urandom(3 * MiB))
    image = tmp_path / "disk.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", str(raw), str(image))
    target = cli("vdi", "create", "streamed", "--size", "128M")
    appear(mnt, target)
    staged_peak = upload_watching_staging(image, mnt.path / "import" / f"{target}.vhd", cli.sr)
    # Never staged whole: applied blocks are punched out of the staging file.
    assert staged_peak < 16 * MiB, staged_peak
    assert sha(mnt.vdi(target) / "raw.img") == hashlib.sha256(raw.read_bytes()).hexdigest()
    # Going back after blocks were applied cannot be honoured: EINVAL, nothing applied.
    before = sha(mnt.vdi(target) / "raw.img")
    fd = os.open(mnt.path / "import" / f"{target}.vhd", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    data = image.read_bytes()
    os.write(fd, data[: 40 * MiB])
    with pytest.raises(OSError) as exc:
        os.pwrite(fd, b"\0" * 512, 0)  # queued: its error comes at the latest at fsync/close
        os.fsync(fd)
    assert exc.value.errno == errno.EINVAL
    with contextlib.suppress(OSError):
        os.close(fd)
    assert sha(mnt.vdi(target) / "raw.img") == before
    status = json.loads((mnt.path / "import" / ".status" / f"{target}.vhd.json").read_text())
    assert status["state"] == "failed" and "front to back" in status["error"]
    assert staged_bytes(cli.sr) == 0


def test_a_qcow2_with_its_tables_first_is_applied_as_it_arrives(
    cli: Cli, mnt: Mount, tmp_path: Path
) -> None:
    vdi = cli("vdi", "create", "src", "--size", "128M")
    appear(mnt, vdi)
    for offset in range(0, 128 * MiB, 4 * MiB):
        fill(mnt.vdi(vdi) / "raw.img", offset, os.urandom(3 * MiB))
    s1 = cli("vdi", "snapshot", vdi)
    fill(mnt.vdi(vdi) / "raw.img", 8 * MiB, bytes(2 * MiB))  # zero clusters in the delta
    fill(mnt.vdi(vdi) / "raw.img", 50 * MiB + 512, os.urandom(MiB))
    s2 = cli("vdi", "snapshot", vdi)
    appear(mnt, s2)
    full, delta = tmp_path / "full.qcow2", tmp_path / "delta.qcow2"
    shutil.copyfile(mnt.vdi(s1) / "full.qcow2", full)
    shutil.copyfile(mnt.vdi(s2) / "delta-from" / f"{s1}.qcow2", delta)
    target = cli("vdi", "create", "streamed", "--size", "128M")
    appear(mnt, target)
    upload = mnt.path / "import" / f"{target}.qcow2"
    # vdifs writes all qcow2 tables first: the data is never staged whole.
    assert upload_watching_staging(full, upload, cli.sr) < 16 * MiB
    assert wait_for(lambda: sha(mnt.vdi(target) / "raw.img") == sha(mnt.vdi(s1) / "raw.img"), 3)
    assert upload_watching_staging(delta, upload, cli.sr) < 16 * MiB
    assert wait_for(lambda: sha(mnt.vdi(target) / "raw.img") == sha(mnt.vdi(s2) / "raw.img"), 3)
    status = json.loads((mnt.path / "import" / ".status" / f"{target}.qcow2.json").read_text())
    assert status["state"] == "done" and status["bytes_received"] == delta.stat().st_size

    # Cut short: refused at close, nothing applied.
    before = sha(mnt.vdi(target) / "raw.img")
    short = tmp_path / "short.qcow2"
    short.write_bytes(full.read_bytes()[: 40 * MiB])
    assert copy_in(short, upload) == errno.EINVAL
    status = json.loads((mnt.path / "import" / ".status" / f"{target}.qcow2.json").read_text())
    assert "before all its data had arrived" in status["error"]
    # Going back once data is applied cannot be honoured: EINVAL, nothing applied.
    fd = os.open(upload, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(fd, full.read_bytes()[: 40 * MiB])
    with pytest.raises(OSError) as exc:
        os.pwrite(fd, b"\0" * 512, 0)
        os.fsync(fd)
    assert exc.value.errno == errno.EINVAL
    with contextlib.suppress(OSError):
        os.close(fd)
    assert sha(mnt.vdi(target) / "raw.img") == before
    assert staged_bytes(cli.sr) == 0


def test_a_qemu_img_qcow2_and_overlay_stream_through_the_mount(
    cli: Cli, mnt: Mount, tmp_path: Path
) -> None:
    """qemu-img puts L2 tables between the data: the head is staged until they have come."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(24 * MiB)
        for offset in (0, 5 * MiB + 4096, 17 * MiB - 512):
            f.seek(offset)
            f.write(os.urandom(700_000))
    target = cli("vdi", "create", "overlay", "--size", "24M")
    appear(mnt, target)
    # Named as the upload will be: a foreign overlay names its base by file name.
    base = tmp_path / f"{target}.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    subprocess.run(
        ["qemu-io", "-c", "write -P 0xab 1M 100k", "-c", "write -z 0 64k", str(top)],
        check=True,
        capture_output=True,
    )
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-O", "raw", str(top), str(flat))
    assert copy_in(base, mnt.path / "import" / base.name) == 0
    assert wait_for(lambda: sha(mnt.vdi(target) / "raw.img") == sha(raw), 3)
    result = copy_in(top, mnt.path / "import" / base.name)
    status = json.loads((mnt.path / "import" / ".status" / f"{base.name}.json").read_text())
    assert result == 0, status["error"]
    assert wait_for(lambda: sha(mnt.vdi(target) / "raw.img") == sha(flat), 3)


def test_sizes_are_fresh_right_after_an_import(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    target = cli("vdi", "create", "fresh", "--size", "8M")
    appear(mnt, target)
    before = (mnt.vdi(target) / "full.vhd").stat().st_size  # cached by the kernel now
    raw = tmp_path / "x.raw"
    raw.write_bytes(os.urandom(8 * MiB))
    assert copy_in(raw, mnt.path / "import" / f"{target}.raw") == 0
    out = tmp_path / "copy.vhd"
    shutil.copyfile(mnt.vdi(target) / "full.vhd", out)  # no wait: must not be cut short
    assert out.stat().st_size > before
    subprocess.run(
        ["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(out), str(raw)], check=True
    )


def test_a_mistyped_uuid_is_not_a_new_vdi(cli: Cli, mnt: Mount) -> None:
    with pytest.raises(OSError) as exc:
        os.open(
            mnt.path / "import" / "01234567-89ab-cdef-0123-456789abcdef.raw",
            os.O_WRONLY | os.O_CREAT,
            0o600,
        )
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(OSError) as exc:
        os.mkdir(mnt.path / "vdis" / "new")
    assert exc.value.errno == errno.EACCES


def test_a_failed_upload_can_be_retried_at_once(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    target = cli("vdi", "create", "retry", "--size", "4M")
    appear(mnt, target)
    bad = tmp_path / "bad.raw"
    bad.write_bytes(b"x" * (5 * MiB))  # larger than the VDI
    assert copy_in(bad, mnt.path / "import" / f"{target}.raw") == errno.EFBIG
    assert f"{target}.raw" not in os.listdir(mnt.path / "import")
    good = tmp_path / "good.raw"
    good.write_bytes(b"y" * (4 * MiB))
    assert copy_in(good, mnt.path / "import" / f"{target}.raw") == 0


def test_restore_after_checkpoint_and_gc(cli: Cli, tmp_path: Path) -> None:
    vdi = cli("vdi", "create", "cbt", "--size", "4M")
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(os.urandom(4 * MiB))
    b.write_bytes(a.read_bytes()[: 2 * MiB] + os.urandom(2 * MiB))
    cli("import", vdi, str(a))
    s1 = cli("vdi", "snapshot", vdi)
    cli("export", s1, str(tmp_path / "s1.vhd"), "--format", "vhd")
    cli("import", vdi, str(b))
    s2 = cli("vdi", "snapshot", vdi)
    cli("export", s2, str(tmp_path / "s2.vhd"), "--format", "vhd", "--base", s1)
    cli("vdi", "data-destroy", s1)
    cli("vdi", "destroy", vdi)
    cli("sr", "gc")
    restored = cli("import", "--create", "r", str(tmp_path / "s1.vhd"))
    cli("import", restored, str(tmp_path / "s2.vhd"))
    assert export_sha(cli, restored) == hashlib.sha256(b.read_bytes()).hexdigest()
    assert cli("vdi", "snapshot", "r") and cli("vdi", "snapshot", "r")  # names resolve to the VDI


def test_close_reports_the_outcome_when_a_forked_child_closes_too(
    cli: Cli, mnt: Mount, tmp_path: Path
) -> None:
    """A child that inherits the descriptor closes it too (its exec does): two flushes.

    Whichever comes first applies the upload; the writer's own close() must
    still return that import's outcome, never success for a refused image
    nor before the import is recorded.
    """
    target = cli("vdi", "create", "forked", "--size", "8M")
    appear(mnt, target)
    raw = tmp_path / "x.raw"
    raw.write_bytes(os.urandom(8 * MiB))
    image = tmp_path / "x.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", str(raw), str(image))
    good = image.read_bytes()
    for attempt in range(12):
        data = good if attempt % 2 else good[: len(good) // 2]  # truncated: refused
        name = f"{target}.vhd"
        fd = os.open(mnt.path / "import" / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        child = os.fork()
        if child == 0:  # the child's copy closes at once, racing the parent's close
            try:
                os.close(fd)  # it may be the one that applies (and gets the error)
            finally:
                os._exit(0)
        try:
            os.close(fd)
            outcome = 0
        except OSError as exc:
            outcome = exc.errno or -1
        os.waitpid(child, 0)
        status = json.loads((mnt.path / "import" / ".status" / f"{name}.json").read_text())
        if data is good:
            assert outcome == 0 and status["state"] == "done", (attempt, status)
            assert sha(mnt.vdi(target) / "raw.img") == sha(raw)
        else:
            assert outcome == errno.EINVAL and status["state"] == "failed", (attempt, status)


@needs_tool("fallocate")
def test_cp_of_an_image_ending_in_a_hole(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    """cp seeks over a sparse source's trailing hole and sets the size at the end."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(os.urandom(2 * MiB - 32 * 1024))  # the last cluster ends in zeros
    image = tmp_path / "sparse.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    subprocess.run(
        ["fallocate", "--punch-hole", "--offset", str(image.stat().st_size - 32 * 1024),
         "--length", str(32 * 1024), str(image)],
        check=True,
    )  # fmt: skip
    qemu_img("compare", "-f", "qcow2", "-F", "raw", str(image), str(raw))
    for name in ("sparse-new.qcow2", "sparse-again.qcow2"):
        subprocess.run(["cp", "--sparse=always", str(image), str(mnt.path / "import" / name)],
                       check=True)  # fmt: skip
        restored = mnt.path / "by-name" / name.removesuffix(".qcow2") / "raw.img"
        assert wait_for(restored.exists, 3)
        assert sha(restored) == sha(raw)
