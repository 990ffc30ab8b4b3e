"""contrib/soak, short: load, hostile uploads and snapshot churn through a real mount.

The long run is on demand: ``.venv/bin/python contrib/soak --seconds 600``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, Mount, fill, needs_fuse, needs_tool, wait_for

pytestmark = [needs_fuse, needs_tool("qemu-img"), pytest.mark.slow, pytest.mark.mount]

MiB = 1 << 20
SOAK = Path(__file__).resolve().parent.parent / "contrib" / "soak"
SECONDS = int(os.environ.get("VDIFS_SOAK_SECONDS", "35"))


def summary(stdout: str) -> dict[str, str]:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("SOAK "), stdout[-3000:]
    return dict(item.split("=", 1) for item in last.split()[1:])


def test_soak_through_the_mount(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, str(SOAK), "--seconds", str(SECONDS), "--seed", "7",
         "--sr", str(cli.sr), "--mount", str(mnt.path), "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=SECONDS + 400,
    )  # fmt: skip
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    fields = summary(result.stdout)
    assert fields["ok"] == "1" and fields["errors"] == "0", report
    assert int(fields["ops"]) > 100, report
    assert float(fields["rss_growth_mib"]) < 50, report  # nan (daemon not found) fails too
    for kind in ("read-raw", "read-range", "write", "snapshot", "snapshot-delete", "hostile-"):
        assert f"\n{kind}" in result.stdout, f"no {kind} operation ran\n{report}"
    # On an SR it did not create, the soak removes what it made, and its temporary files.
    assert cli.json("vdi", "list", "--json") == []
    assert os.listdir(work) == []
    assert os.path.ismount(mnt.path)  # a mount it was given stays


def test_soak_cleans_up_on_ctrl_c(tmp_path: Path) -> None:
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(SOAK), "--seconds", "600", "--workdir", str(tmp_path),
             "--vdis", "1", "--targets", "1", "--size", "16M"],
            stdout=stdout,
            stderr=stderr,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while b"ops=" not in err.read_bytes():  # the load runs
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)
        assert len(mounts_under(tmp_path)) == 1
        assert len(processes_using(tmp_path)) >= 2  # the soak and its daemon
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 130, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert summary(out.read_text())["ok"] == "0"
    assert mounts_under(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err", "out"]
    assert processes_using(tmp_path) == []


def test_a_read_only_handle_keeps_its_state(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    """A handle opened before an import must not read half of it (found by the soak)."""
    vdi = cli("vdi", "create", "torn", "--size", "4M")
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    old, new = tmp_path / "old.raw", tmp_path / "new.raw"
    old.write_bytes(b"X" * (4 * MiB))
    new.write_bytes(b"Y" * (4 * MiB))
    subprocess.run(["cp", str(old), str(mnt.path / "import" / f"{vdi}.raw")], check=True)
    before = os.open(mnt.vdi(vdi) / "raw.img", os.O_RDONLY)  # pins all X
    try:
        subprocess.run(["cp", str(new), str(mnt.path / "import" / f"{vdi}.raw")], check=True)
        after = os.open(mnt.vdi(vdi) / "raw.img", os.O_RDONLY)  # pins all Y
        try:
            os.pread(after, 2 * MiB, 2 * MiB)  # another reader reads the second half
        finally:
            os.close(after)
        seen = os.pread(before, 4 * MiB, 0)
    finally:
        os.close(before)
    assert seen.count(b"Y") == 0, f"{seen.count(b'Y')} bytes of the later import"


def test_a_writer_reads_its_own_writes(cli: Cli, mnt: Mount) -> None:
    """A VM writing its disk while a backup reads it must read back what it wrote."""
    vdi = cli("vdi", "create", "vm-disk", "--size", "4M")
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    raw = mnt.vdi(vdi) / "raw.img"
    fill(raw, 0, b"A" * 65536)
    writer = os.open(raw, os.O_RDWR)
    try:
        os.pwrite(writer, b"B" * 65536, 0)
        reader = os.open(raw, os.O_RDONLY)  # the backup
        try:
            os.pread(reader, 4096, 0)
        finally:
            os.close(reader)
        os.fsync(writer)
        seen = os.pread(writer, 4096, 0)
    finally:
        os.close(writer)
    assert seen == b"B" * 4096


def test_opening_the_sr_while_a_pack_is_being_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every vdifs command opens the SR: it must not fail on another process's new pack."""
    from vdifs.storage.local import LocalSR

    LocalSR(tmp_path / "sr").close()
    temporary = tmp_path / "sr" / "packs" / "0000abcd.pack.new"
    temporary.write_bytes(b"")
    listdir = os.scandir

    def racing_scandir(path: Any) -> Any:
        entries = list(listdir(path))
        temporary.unlink(missing_ok=True)  # ChunkWriter._open_pack: link, then unlink
        return iter(entries)

    monkeypatch.setattr(os, "scandir", racing_scandir)
    LocalSR(tmp_path / "sr").close()


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [p for p in (line.split()[4] for line in f) if p.startswith(str(path))]


def processes_using(path: Path) -> list[int]:
    """Processes whose command line names something under path: the daemon, cp, rsync..."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(path) in argv:
                found.append(int(entry))
    return found
