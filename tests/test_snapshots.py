"""Snapshot trees, checkpoints, VMs: through the real CLI and the real mount."""

from __future__ import annotations

import errno
import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, Mount, fill, needs_fuse, pread, sha, wait_for

pytestmark = needs_fuse

MiB = 1 << 20


def appear(mnt: Mount, uuid: str) -> None:
    assert wait_for(lambda: mnt.vdi(uuid).exists(), 3)


def test_delete_in_the_middle_keeps_everything_else(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    vdi = cli("vdi", "create", "chain", "--size", "16M")
    appear(mnt, vdi)
    raw = mnt.vdi(vdi) / "raw.img"
    snaps = []
    for i in range(3):
        fill(raw, i * 3 * MiB + 100, os.urandom(MiB))
        snaps.append(cli("vdi", "snapshot", vdi, "--name", f"s{i + 1}"))
    s1, s2, s3 = snaps
    appear(mnt, s3)
    before = {u: sha(mnt.vdi(u) / "raw.img") for u in (s1, s3, vdi)}
    delta_before = sha(mnt.vdi(s3) / "delta-from" / f"{s1}.vhd")
    assert cli.json("vdi", "show", s3)["parent"] == s2
    assert cli("vdi", "snapshot-delete", s2) == s2
    assert wait_for(lambda: not mnt.vdi(s2).exists(), 3)
    assert {u: sha(mnt.vdi(u) / "raw.img") for u in (s1, s3, vdi)} == before
    assert cli.json("vdi", "show", s3)["parent"] == s1  # re-parented
    assert sha(mnt.vdi(s3) / "delta-from" / f"{s1}.vhd") == delta_before
    # The delta between survivors still round-trips through import.
    restored = cli("vdi", "create", "restored", "--size", "16M")
    appear(mnt, restored)
    shutil.copyfile(mnt.vdi(s1) / "full.vhd", tmp_path / f"{s1}.vhd")
    shutil.copyfile(mnt.vdi(s3) / "delta-from" / f"{s1}.vhd", tmp_path / f"{s3}.vhd")
    cli("import", restored, str(tmp_path / f"{s1}.vhd"))
    cli("import", restored, str(tmp_path / f"{s3}.vhd"))
    assert wait_for(lambda: sha(mnt.vdi(restored) / "raw.img") == before[s3], 3)


def test_snapshots_dir_links_and_current(cli: Cli, mnt: Mount) -> None:
    vdi = cli("vdi", "create", "links", "--size", "4M")
    a = cli("vdi", "snapshot", vdi, "--name", "nightly")
    b = cli("vdi", "snapshot", vdi, "--name", "nightly")
    c = cli("vdi", "snapshot", vdi, "--name", "weekly")
    appear(mnt, c)
    snapdir = mnt.vdi(vdi) / "snapshots"
    names = sorted(os.listdir(snapdir))
    assert names == sorted(["current", f"nightly~{a[:8]}", f"nightly~{b[:8]}", "weekly"])
    assert os.readlink(snapdir / "weekly") == f"../../{c}"
    assert os.readlink(snapdir / "current") == f"../../{c}"
    assert json.loads((snapdir / "weekly" / "info.json").read_text())["uuid"] == c
    tree = cli("vdi", "snapshot-list", vdi, "--tree")
    assert tree.splitlines()[-1].strip().endswith("(live) links")
    assert "*" in tree.splitlines()[-2]


def test_deleted_snapshot_keeps_open_files_readable(cli: Cli, mnt: Mount) -> None:
    vdi = cli("vdi", "create", "open", "--size", "8M")
    appear(mnt, vdi)
    data = os.urandom(2 * MiB)
    fill(mnt.vdi(vdi) / "raw.img", 0, data)
    snap = cli("vdi", "snapshot", vdi)
    appear(mnt, snap)
    with open(mnt.vdi(snap) / "raw.img", "rb") as f, open(mnt.vdi(snap) / "full.vhd", "rb") as g:
        head = g.read(512)
        cli("vdi", "snapshot-delete", snap)
        assert wait_for(lambda: snap not in os.listdir(mnt.path / "vdis"), 3)
        assert f.read(2 * MiB) == data  # what it opened, never another disk's data
        g.seek(0)
        assert g.read(512) == head


def test_vm_snapshot_is_coherent_across_three_disks_and_revert(cli: Cli, mnt: Mount) -> None:
    vm = cli("vm", "create", "web")
    disks = {}
    for dev in ("xvda", "xvdb", "xvdc"):
        disks[dev] = cli("vdi", "create", f"web-{dev}", "--size", "4M")
        cli("vm", "attach", vm, disks[dev], "--device", dev)
    for u in disks.values():
        appear(mnt, u)
    contents = {}
    for dev, u in disks.items():
        contents[dev] = os.urandom(MiB)
        fill(mnt.vdi(u) / "raw.img", 0, contents[dev])
    snap = cli("vm", "snapshot", vm, "--name", "before-upgrade", "--description", "pre")
    record = cli.json("vm", "show", snap)
    assert record["is_a_snapshot"] and record["snapshot_of"] == vm
    times = {cli.json("vdi", "show", u)["snapshot_time"] for u in record["disks"].values()}
    assert len(times) == 1  # one transaction, one instant
    for u in disks.values():
        fill(mnt.vdi(u) / "raw.img", 0, os.urandom(MiB))  # the "upgrade"
    # The tree shows the VM and its snapshot.
    vm_dir = mnt.path / "vms" / vm
    assert wait_for(lambda: (vm_dir / "snapshots" / "before-upgrade").exists(), 3)
    assert os.readlink(vm_dir / "disks" / "xvda") == f"../../../vdis/{disks['xvda']}"
    assert os.readlink(vm_dir / "current") == "snapshots/before-upgrade"
    xml = ET.fromstring((vm_dir / "snapshots" / "before-upgrade" / "snapshot.xml").read_text())
    assert xml.findtext("name") == "before-upgrade" and xml.findtext("description") == "pre"
    assert {d.get("name") for d in xml.iter("disk")} == set(disks)
    snap_disk = vm_dir / "snapshots" / "before-upgrade" / "disks" / "xvdb"
    assert pread(snap_disk / "raw.img", 0, MiB) == contents["xvdb"]
    # Revert: same VM uuid, new disk uuids holding the snapshot's bytes.
    cli("vm", "revert", "before-upgrade")
    after = cli.json("vm", "show", vm)
    assert after["uuid"] == vm and after["current_snapshot"] == snap
    for dev, u in after["disks"].items():
        assert u != disks[dev]
        appear(mnt, u)
        assert pread(mnt.vdi(u) / "raw.img", 0, MiB) == contents[dev]
        assert cli.json("vdi", "show", record["disks"][dev])["snapshot_of"] == u
    assert cli.json("vm", "show", snap)["disks"] == record["disks"]  # the snapshot is intact
    assert cli("vm", "snapshot-current", vm) == snap


def test_branches_after_revert(cli: Cli) -> None:
    vm = cli("vm", "create", "branchy")
    cli("vm", "attach", vm, cli("vdi", "create", "d", "--size", "1M"), "--device", "xvda")
    a = cli("vm", "snapshot", vm, "--name", "a")
    b = cli("vm", "snapshot", vm, "--name", "b")
    cli("vm", "revert", a)
    c = cli("vm", "snapshot", vm, "--name", "c")
    assert cli.json("vm", "show", b)["parent"] == a
    assert cli.json("vm", "show", c)["parent"] == a
    assert sorted(cli.json("vm", "show", a)["children"]) == sorted([b, c])
    tree = cli("vm", "snapshot-list", vm, "--tree").splitlines()
    assert tree[0].startswith("a ") and any("c " in line and "*" in line for line in tree)
    assert len(cli.json("vm", "snapshot-list", vm, "--json")) == 3
    # Delete a with default policy: children re-parented to the root.
    cli("vm", "snapshot-delete", a)
    assert cli.json("vm", "show", b)["parent"] is None
    ambiguous = cli.run("vm", "revert", "nope", check=False)
    assert ambiguous.returncode == 3


def test_delete_subtree_and_children_only(cli: Cli) -> None:
    vdi = cli("vdi", "create", "t", "--size", "1M")
    s1 = cli("vdi", "snapshot", vdi)
    s2 = cli("vdi", "snapshot", vdi)
    s3 = cli("vdi", "snapshot", vdi)
    assert cli("vdi", "snapshot-delete", s1, "--children-only").split() == [s3, s2]
    assert cli.json("vdi", "show", s1)["uuid"] == s1
    s4 = cli("vdi", "snapshot", vdi)
    assert cli.json("vdi", "show", vdi)["current"] == s4
    assert sorted(cli("vdi", "snapshot-delete", s1, "--children").split()) == sorted([s1, s4])
    assert cli.json("vdi", "show", vdi)["current"] is None


def test_data_destroy_keeps_the_delta_base(cli: Cli, mnt: Mount, tmp_path: Path) -> None:
    vdi = cli("vdi", "create", "cbt", "--size", "8M")
    appear(mnt, vdi)
    fill(mnt.vdi(vdi) / "raw.img", 0, os.urandom(3 * MiB))
    s1 = cli("vdi", "snapshot", vdi)
    appear(mnt, s1)
    shutil.copyfile(mnt.vdi(s1) / "full.vhd", tmp_path / f"{s1}.vhd")  # last night's backup
    fill(mnt.vdi(vdi) / "raw.img", MiB, os.urandom(MiB))
    s2 = cli("vdi", "snapshot", vdi)
    cli("vdi", "data-destroy", s1)
    assert wait_for(lambda: os.listdir(mnt.vdi(s1)) == ["info.json"], 3)
    info = json.loads((mnt.vdi(s1) / "info.json").read_text())
    assert info["type"] == "cbt_metadata" and info["physical_utilisation"] == 0
    appear(mnt, s2)
    assert f"{s1}.vhd" in os.listdir(mnt.vdi(s2) / "delta-from")
    shutil.copyfile(mnt.vdi(s2) / "delta-from" / f"{s1}.vhd", tmp_path / f"{s2}.vhd")
    restored = cli("vdi", "create", "r", "--size", "8M")
    cli("import", restored, str(tmp_path / f"{s1}.vhd"))
    cli("import", restored, str(tmp_path / f"{s2}.vhd"))
    appear(mnt, restored)
    assert sha(mnt.vdi(restored) / "raw.img") == sha(mnt.vdi(s2) / "raw.img")
    bad = cli.run("export", s1, str(tmp_path / "x.vhd"), "--format", "vhd", check=False)
    assert bad.returncode == 3 and "checkpoint" in bad.stderr


def test_snapshot_admin_off_by_default(cli: Cli, mnt: Mount) -> None:
    vdi = cli("vdi", "create", "guarded", "--size", "1M")
    snap = cli("vdi", "snapshot", vdi, "--name", "keep")
    appear(mnt, snap)
    snapdir = mnt.vdi(vdi) / "snapshots"
    with pytest.raises(OSError) as exc:
        os.mkdir(snapdir / "new")
    assert exc.value.errno == errno.EPERM
    with pytest.raises(OSError):
        shutil.rmtree(snapdir / "keep")
    assert cli.json("vdi", "show", snap)["uuid"] == snap


def test_snapshot_admin_mkdir_rename_rmdir(cli: Cli, mount_factory: Any) -> None:
    vdi = cli("vdi", "create", "admin", "--size", "2M")
    vm = cli("vm", "create", "adminvm")
    cli("vm", "attach", vm, vdi, "--device", "xvda")
    m = mount_factory("snapshot_admin")
    snapdir = m.vdi(vdi) / "snapshots"
    fill(m.vdi(vdi) / "raw.img", 0, b"before")
    os.mkdir(snapdir / "by-mkdir")
    assert (snapdir / "by-mkdir").is_dir() and not (snapdir / "by-mkdir").is_symlink()
    (snap,) = cli.json("vdi", "show", vdi)["snapshots"]
    assert cli.json("vdi", "show", snap)["name_label"] == "by-mkdir"
    assert pread(snapdir / "by-mkdir" / "raw.img", 0, 6) == b"before"
    child = cli("vdi", "snapshot", vdi, "--name", "child")
    os.rename(snapdir / "by-mkdir", snapdir / "renamed")
    assert cli.json("vdi", "show", snap)["name_label"] == "renamed"
    with pytest.raises(OSError) as exc:
        os.mkdir(snapdir / "renamed")
    assert exc.value.errno == errno.EEXIST
    os.rmdir(snapdir / "renamed")  # removes that point only, never its children
    assert cli.run("vdi", "show", snap, check=False).returncode == 3
    assert cli.json("vdi", "show", child)["parent"] is None
    vm_snaps = m.path / "vms" / vm / "snapshots"
    os.mkdir(vm_snaps / "vm-point")
    assert len(cli.json("vm", "snapshot-list", vm, "--json")) == 1
    os.rmdir(vm_snaps / "vm-point")
    assert cli.json("vm", "snapshot-list", vm, "--json") == []
    assert m.stop() == 0


def test_gc_spares_what_open_handles_read(cli: Cli, mnt: Mount, sr_path: Path) -> None:
    vdi = cli("vdi", "create", "gone", "--size", "4M")
    appear(mnt, vdi)
    data = os.urandom(2 * MiB)
    fill(mnt.vdi(vdi) / "raw.img", 0, data)
    snap = cli("vdi", "snapshot", vdi)
    appear(mnt, snap)
    with open(mnt.vdi(snap) / "raw.img", "rb") as f:
        cli("vdi", "destroy", vdi)
        cli("vdi", "snapshot-delete", snap)
        assert cli("sr", "gc").startswith("removed 0 ")  # pinned by the open file
        assert f.read() == data + bytes(2 * MiB)
    assert wait_for(lambda: not cli("sr", "gc").startswith("removed 0 "), 3)
    assert list((sr_path / "packs").glob("*.pack")) == []
