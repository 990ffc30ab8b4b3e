"""contrib/vdifs-backup and contrib/vdifs-restore end to end, against a real mount.

Several "nights" with changes in between: chains, retention, the snapshots
the backup keeps as the next base, and restores that must equal every
snapshot that was backed up (checked by the restore script against the
manifest and here against what the disk held that night), and the SHA256SUMS
each chain carries, for coreutils' sha256sum and for vdifs-restore.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, Mount, fill, needs_fuse, needs_tool, sha, wait_for

pytestmark = [needs_fuse, needs_tool("qemu-img")]

MiB = 1 << 20
CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
BACKUP = CONTRIB / "vdifs-backup"
RESTORE = CONTRIB / "vdifs-restore"


class Scripts:
    """Runs the contrib scripts with this interpreter's vdifs first on PATH."""

    def __init__(self, tmp_path: Path, sr: Path) -> None:
        self.bin = tmp_path / "bin"
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "vdifs"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vdifs "$@"\n')
        wrapper.chmod(0o755)
        self.env = {
            k: v for k, v in os.environ.items() if k not in ("VDIFS_MOUNT", "VDIFS_BACKUP_DIR")
        }
        self.env["PATH"] = f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        self.env["VDIFS_SR"] = str(sr)

    def run(self, script: Path, *args: str, rc: int | None = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(script), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=300,
            check=False,
        )
        if rc is not None:
            assert result.returncode == rc, (
                f"{script.name} {' '.join(args)} exited {result.returncode}, not {rc}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def backup(self, *args: str, rc: int | None = 0) -> subprocess.CompletedProcess[str]:
        return self.run(BACKUP, *args, rc=rc)

    def restore(self, *args: str, rc: int | None = 0) -> subprocess.CompletedProcess[str]:
        return self.run(RESTORE, *args, rc=rc)


@pytest.fixture
def scripts(tmp_path: Path, sr_path: Path) -> Scripts:
    return Scripts(tmp_path, sr_path)


def chains(backup: Path, vdi: str) -> list[Path]:
    return sorted(p for p in (backup / vdi).iterdir() if p.is_dir())


def entries(chain: Path) -> list[dict[str, str]]:
    """The manifest's entries: seq, snapshot, file, base, file_sha, raw_sha, time."""
    keys = ("seq", "snapshot", "file", "base", "file_sha", "raw_sha", "time")
    lines = (chain / "manifest").read_text().splitlines()
    assert lines[0] == "vdifs-backup-manifest 1"
    return [
        dict(zip(keys, line.split()[1:], strict=True))
        for line in lines
        if line.startswith("entry ")
    ]


def sha256sum_check(chain: Path) -> subprocess.CompletedProcess[str]:
    """The chain checked by coreutils alone, as one would years later without vdifs."""
    return subprocess.run(
        ["sha256sum", "-c", "--strict", "SHA256SUMS"],
        cwd=chain,
        capture_output=True,
        text=True,
        check=False,
    )


def assert_sums_match(chain: Path) -> None:
    """SHA256SUMS lists every image of the manifest, in order, and sha256sum -c passes."""
    recorded = entries(chain)
    sums = "".join(f"{e['file_sha']}  {e['file']}\n" for e in recorded)
    assert (chain / "SHA256SUMS").read_text() == sums
    check = sha256sum_check(chain)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.splitlines() == [f"{e['file']}: OK" for e in recorded]


def flip_a_byte(path: Path) -> bytes:
    """Damage a saved image as bit rot would; return what it held."""
    data = path.read_bytes()
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    path.chmod(0o600)
    path.write_bytes(bytes(damaged))
    return data


def snapshots_of(cli: Cli, vdi: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = cli.json("vdi", "snapshot-list", vdi, "--json")
    return records


def night(mnt: Mount, vdi: str, n: int) -> str:
    """Change the disk as a day of use would; return the sha256 of its content."""
    raw = mnt.vdi(vdi) / "raw.img"
    slots = raw.stat().st_size // MiB - 1
    rng = n * 7919
    fill(raw, (rng % slots) * MiB + 4096 * n, os.urandom(300_000))
    fill(raw, ((rng // 3) % slots) * MiB, os.urandom(65536))
    if n % 3 == 0:
        fill(raw, 0, bytes(MiB))  # a region that became zero
    return sha(raw)


def make_vdi(cli: Cli, mnt: Mount, name: str, size: str = "24M") -> str:
    vdi = cli("vdi", "create", name, "--size", size)
    assert wait_for(lambda: mnt.vdi(vdi).exists(), 3)
    fill(mnt.vdi(vdi) / "raw.img", 0, os.urandom(3 * MiB))
    return vdi


def test_help_and_usage(scripts: Scripts, tmp_path: Path) -> None:
    for script in (BACKUP, RESTORE):
        out = scripts.run(script, "--help").stdout
        assert out.startswith(f"usage: {script.name}") and "exit status" in out
        assert scripts.run(script, "--no-such-option", rc=2).stderr.strip().endswith("--help)")
    assert "name at least one VDI" in scripts.backup("-d", str(tmp_path), rc=2).stderr
    assert "backup directory" in scripts.backup("web", rc=2).stderr
    assert "vhd or qcow2" in scripts.backup("-d", str(tmp_path), "-f", "raw", "web", rc=2).stderr
    assert "--full-every" in scripts.backup("-d", "x", "-n", "0", "web", rc=2).stderr
    assert "chain directory" in scripts.restore(rc=2).stderr
    both = scripts.restore("--create", "a", "--into", "b", str(tmp_path), rc=2)
    assert "exclude" in both.stderr
    not_mounted = tmp_path / "not-mounted"
    not_mounted.mkdir()
    result = scripts.backup("-m", str(not_mounted), "-d", str(tmp_path / "b"), "web", rc=1)
    assert "not a vdifs mount" in result.stderr


def test_nightly_vhd_chains_retention_and_restores(
    cli: Cli, mnt: Mount, scripts: Scripts, tmp_path: Path
) -> None:
    vdi = make_vdi(cli, mnt, "web")
    backup = tmp_path / "backup"
    opts = ["-m", str(mnt.path), "-d", str(backup), "--full-every", "3", "--keep", "2"]
    if shutil.which("vhdimount"):
        opts.append("--verify-chain")  # vhdimount the chain, cmp with the snapshot
    expected = []
    for n in range(1, 8):
        expected.append(night(mnt, vdi, n))
        scripts.backup(*opts, "web")  # by name: resolved through by-name/
        newest = entries(chains(backup, vdi)[-1])[-1]
        # Only the newest backup snapshot stays, as the next delta's base.
        assert [s["uuid"] for s in snapshots_of(cli, vdi)] == [newest["snapshot"]]
        assert newest["raw_sha"] == expected[-1]
    # Nights 1-3, 4-6 and 7 made three chains; --keep 2 removed the first.
    kept = chains(backup, vdi)
    assert [c.name[:6] for c in kept] == ["000002", "000003"]
    middle = entries(kept[0])
    assert [e["raw_sha"] for e in middle] == expected[3:6]
    assert [e["base"] for e in middle] == ["-", middle[0]["snapshot"], middle[1]["snapshot"]]
    for e in middle:
        assert e["file"] == f"{e['snapshot']}.vhd"
        assert sha(kept[0] / e["file"]) == e["file_sha"]
    assert sorted(p.name for p in kept[0].iterdir()) == sorted(
        ["manifest", "SHA256SUMS"] + [e["file"] for e in middle]
    )
    for chain in kept:
        assert_sums_match(chain)
    if shutil.which("vhdiinfo"):
        info = subprocess.run(
            ["vhdiinfo", str(kept[0] / middle[2]["file"])], capture_output=True, text=True
        ).stdout
        assert "Differential" in info and f"{middle[1]['snapshot']}.vhd" in info
    # Restore the whole middle chain into a new VDI (verifying after each entry),
    # then only its first two entries.
    out = scripts.restore("-m", str(mnt.path), str(kept[0]))
    restored = out.stdout.strip()
    assert out.stderr.count("matches snapshot") == 3
    assert cli.json("vdi", "show", restored)["name_label"] == "web-restored"
    assert wait_for(lambda: mnt.vdi(restored).exists(), 3)
    assert sha(mnt.vdi(restored) / "raw.img") == expected[5]
    partial = scripts.restore("--create", "tuesday", "--upto", "2", str(kept[0])).stdout.strip()
    assert wait_for(lambda: mnt.vdi(partial).exists(), 3)
    assert sha(mnt.vdi(partial) / "raw.img") == expected[4]
    by_uuid = scripts.restore("--upto", middle[0]["snapshot"], "--verify", "last", str(kept[0]))
    assert by_uuid.stderr.count("matches snapshot") == 1
    # The newest chain, through import/, into an existing VDI holding junk.
    target = make_vdi(cli, mnt, "target")
    result = scripts.restore("-m", str(mnt.path), "--via", "mount", "--into", target, str(kept[1]))
    assert result.stdout.strip() == target
    assert wait_for(lambda: sha(mnt.vdi(target) / "raw.img") == expected[6], 3)


@needs_tool("qemu-io")
def test_qcow2_verify_chain_checkpoint_base_and_gc(
    cli: Cli, mnt: Mount, scripts: Scripts, tmp_path: Path
) -> None:
    vdi = make_vdi(cli, mnt, "db", "20M")
    backup = tmp_path / "backup"
    opts = ["-m", str(mnt.path), "-d", str(backup), "-f", "qcow2", "--verify-chain"]
    opts += ["--base", "checkpoint", "--full-every", "10"]
    expected = []
    for n in range(1, 4):
        expected.append(night(mnt, vdi, n))
        scripts.backup(*opts, vdi)
        (snap,) = snapshots_of(cli, vdi)
        assert snap["data_destroyed"] and snap["type"] == "cbt_metadata"
        assert wait_for(lambda s=snap: os.listdir(mnt.vdi(s["uuid"])) == ["info.json"], 3)
    cli("sr", "gc")
    expected.append(night(mnt, vdi, 4))
    scripts.backup(*opts, vdi)  # a delta from a checkpoint whose data may be gone
    (chain,) = chains(backup, vdi)
    recorded = entries(chain)
    assert [e["raw_sha"] for e in recorded] == expected
    names = json.loads(
        subprocess.run(
            [
                "qemu-img",
                "info",
                "--backing-chain",
                "--output=json",
                str(chain / recorded[-1]["file"]),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert [Path(i["filename"]).name for i in reversed(names)] == [e["file"] for e in recorded]
    for e in recorded:
        subprocess.run(["qemu-img", "check", "-q", str(chain / e["file"])], check=True)
    assert_sums_match(chain)
    out = scripts.restore("-m", str(mnt.path), "--via", "mount", "--create", "db-again", str(chain))
    restored = out.stdout.strip()
    assert out.stderr.count("matches snapshot") == 4
    assert wait_for(lambda: mnt.vdi(restored).exists(), 3)
    assert sha(mnt.vdi(restored) / "raw.img") == expected[-1]


def test_failures_are_loud_and_leave_no_trace(
    cli: Cli, mnt: Mount, scripts: Scripts, tmp_path: Path
) -> None:
    vdi = make_vdi(cli, mnt, "app", "8M")
    backup = tmp_path / "backup"
    opts = ["-m", str(mnt.path), "-d", str(backup)]
    # An unknown VDI fails the run, but the others are still backed up.
    result = scripts.backup(*opts, "no-such-vdi", "app", rc=1)
    assert "no-such-vdi: no such VDI" in result.stderr
    (chain,) = chains(backup, vdi)
    assert len(entries(chain)) == 1
    # A snapshot cannot be backed up as such.
    (base,) = snapshots_of(cli, vdi)
    assert "is a snapshot" in scripts.backup(*opts, base["uuid"], rc=1).stderr
    # A check that fails: the new snapshot is deleted, nothing is recorded.
    fake = scripts.bin / "qemu-img"
    fake.write_text("#!/bin/sh\necho 'fake corruption' >&2\nexit 3\n")
    fake.chmod(0o755)
    night(mnt, vdi, 1)
    result = scripts.backup(*opts, "-f", "qcow2", "app", rc=1)
    assert "qemu-img check finds errors" in result.stderr
    fake.unlink()
    assert [s["uuid"] for s in snapshots_of(cli, vdi)] == [base["uuid"]]
    assert [c.name for c in chains(backup, vdi)] == [chain.name]
    assert sorted(p.name for p in chain.iterdir()) == sorted(
        ["manifest", "SHA256SUMS", f"{base['uuid']}.vhd"]
    )
    assert_sums_match(chain)
    # Another run holding the VDI's lock.
    with open(backup / vdi / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert "another vdifs-backup" in scripts.backup(*opts, "app", rc=1).stderr
    # The base vanished (someone deleted it): the next backup is a full, saying why.
    cli("vdi", "snapshot-delete", base["uuid"])
    result = scripts.backup(*opts, "app")
    assert f"snapshot {base['uuid']} is gone" in result.stderr
    first, second = chains(backup, vdi)
    assert len(entries(second)) == 1
    # A damaged backup file: restore refuses before importing anything.
    scripts.backup(*opts, "app")
    flip_a_byte(second / entries(second)[1]["file"])
    before = len(cli.json("vdi", "list", "--json"))
    result = scripts.restore(str(second), rc=1)
    assert "is damaged" in result.stderr and "nothing imported" in result.stderr
    assert len(cli.json("vdi", "list", "--json")) == before
    # ...but the intact entry before it still restores.
    scripts.restore("--upto", "1", str(second))
    # Restoring into a snapshot is refused.
    (newest,) = snapshots_of(cli, vdi)
    assert "read-only" in scripts.restore("--into", newest["uuid"], str(first), rc=1).stderr
    # Without raw.img checksums, a restore says it could not verify.
    scripts.backup(*opts, "--full", "--raw-sha256", "never", "app")
    unchecked = chains(backup, vdi)[-1]
    assert entries(unchecked)[0]["raw_sha"] == "-"
    assert "not verified" in scripts.restore(str(unchecked)).stderr


def test_sha256sums_travel_with_the_chain(
    cli: Cli, mnt: Mount, scripts: Scripts, tmp_path: Path
) -> None:
    vdi = make_vdi(cli, mnt, "files", "8M")
    backup = tmp_path / "backup"
    opts = ["-m", str(mnt.path), "-d", str(backup)]
    expected = []
    for n in range(1, 4):
        expected.append(night(mnt, vdi, n))
        scripts.backup(*opts, "files")
        (chain,) = chains(backup, vdi)
        assert_sums_match(chain)  # rewritten whole at every backup
    recorded = entries(chain)
    # The raw.img digests stay in the manifest only: they are of no file there.
    assert [e["raw_sha"] for e in recorded] == expected
    assert sorted(p.name for p in chain.iterdir()) == sorted(
        ["manifest", "SHA256SUMS"] + [e["file"] for e in recorded]
    )
    full, delta, last = (chain / e["file"] for e in recorded)
    target = make_vdi(cli, mnt, "target", "8M")
    before = sha(mnt.vdi(target) / "raw.img")
    vdis = len(cli.json("vdi", "list", "--json"))

    def refused() -> str:
        """vdifs-restore fails, and neither the target nor the SR changed."""
        result = scripts.restore("-m", str(mnt.path), "--into", target, str(chain), rc=1)
        assert "nothing imported" in result.stderr and "imported " not in result.stderr
        assert sha(mnt.vdi(target) / "raw.img") == before
        assert len(cli.json("vdi", "list", "--json")) == vdis
        return result.stderr

    # One byte flipped in a delta: sha256sum -c and vdifs-restore both name it.
    intact = flip_a_byte(delta)
    check = sha256sum_check(chain)
    assert check.returncode == 1 and f"{delta.name}: FAILED" in check.stdout
    stderr = refused()
    assert f"{delta} is damaged" in stderr and "SHA256SUMS says" in stderr
    delta.write_bytes(intact)
    # SHA256SUMS is checked on its own: one that disagrees with the manifest
    # about an intact file stops the restore too.
    sums = (chain / "SHA256SUMS").read_text()
    want = recorded[0]["file_sha"]
    (chain / "SHA256SUMS").write_text(sums.replace(want, want[::-1]))
    assert f"{full} matches the manifest but not SHA256SUMS" in refused()
    (chain / "SHA256SUMS").write_text(sums.replace(f"{want}  {full.name}\n", ""))
    assert f"SHA256SUMS does not list {full.name}" in refused()
    (chain / "SHA256SUMS").write_text(sums + "not a checksum line\n")
    assert "line 4 is not" in refused()
    (chain / "SHA256SUMS").write_text(sums)
    # A listed file missing: named, unless the restore stops before it.
    last.rename(tmp_path / last.name)
    assert f"{last} is missing" in refused()
    scripts.restore("--into", target, "--upto", "2", str(chain))
    assert wait_for(lambda: sha(mnt.vdi(target) / "raw.img") == expected[1], 3)
    (tmp_path / last.name).rename(last)
    # A chain from an older vdifs-backup, without SHA256SUMS, still restores,
    # with a warning, and the manifest still catches a damaged file.
    (chain / "SHA256SUMS").unlink()
    out = scripts.restore(str(chain))
    assert "warning" in out.stderr and "no SHA256SUMS" in out.stderr
    assert "3 file(s)" in out.stderr and "match the manifest" in out.stderr
    restored = out.stdout.strip()
    assert wait_for(lambda: mnt.vdi(restored).exists(), 3)
    assert sha(mnt.vdi(restored) / "raw.img") == expected[2]
    intact = flip_a_byte(last)
    result = scripts.restore(str(chain), rc=1)
    assert f"{last} is damaged" in result.stderr and "the manifest says" in result.stderr
    last.write_bytes(intact)
    # Its next backup gives it a SHA256SUMS listing every image, the old ones too.
    night(mnt, vdi, 4)
    scripts.backup(*opts, "files")
    assert chains(backup, vdi) == [chain] and len(entries(chain)) == 4
    assert_sums_match(chain)


def test_a_dead_daemon_is_reported(cli: Cli, mount_factory: Any, scripts: Scripts) -> None:
    cli("vdi", "create", "x", "--size", "1M")
    m = mount_factory()
    m.kill9()
    try:
        result = scripts.backup("-m", str(m.path), "-d", str(m.path.parent / "b"), "x", rc=1)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False)
    assert "disconnected" in result.stderr and "fusermount3 -u -z" in result.stderr
