"""A pool as the backend, end to end: the real CLI and a real mount against the fake pool.

The fake speaks XAPI's wire protocol and serves its disks with nbdkit over
TLS; its VHD heads come from qemu-img and its changed-block bitmaps from
comparing its files' bytes.  Every image vdifs builds is checked by qemu-img,
libvhdi and Xen Orchestra's vhd-lib against the fake's own disk files.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trustme

from tests.conftest import needs_fuse, needs_tool, sha, wait_for
from tests.pool.conftest import PoolCli, PoolMount, Xapi
from tests.pool.fakepool import PoolInfo
from tests.test_xo_oracle import xo_restore

pytestmark = [needs_fuse, needs_tool("qemu-img"), needs_tool("vhdimount"), needs_tool("nbdkit")]

MiB = 1 << 20
SIZE = 20 * MiB


def qemu_compare(image: Path, raw: Path, *fmt: str) -> None:
    result = subprocess.run(
        ["qemu-img", "compare", *fmt, "-F", "raw", str(image), str(raw)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def write_guest(pool: PoolInfo, uuid: str, offset: int, data: bytes) -> None:
    """What a guest does to its disk: bytes into the fake's file, then an event."""
    path = pool.control.disk_path(uuid)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    pool.control.bump(uuid)


def disk_copy(pool: PoolInfo, uuid: str, to: Path) -> Path:
    shutil.copyfile(pool.control.disk_path(uuid), to)
    return to


def new_disk(pool_cli: PoolCli, xapi: Xapi, name: str, size: int = SIZE) -> str:
    vdi = pool_cli("vdi", "create", name, "--size", str(size))
    assert xapi("VDI.get_record", xapi.ref(vdi))["cbt_enabled"], "vdifs's disks have CBT on"
    return vdi


def appears(mount: PoolMount, uuid: str, timeout: float = 10) -> bool:
    return wait_for(lambda: mount.vdi(uuid).exists(), timeout)


def test_backup_chain_and_restore_through_the_mount(
    pool: PoolInfo, pool_cli: PoolCli, xapi: Xapi, pool_mount: PoolMount, tmp_path: Path
) -> None:
    vdi = new_disk(pool_cli, xapi, "web")
    write_guest(pool, vdi, 0, os.urandom(3 * MiB))
    write_guest(pool, vdi, 9 * MiB + 4096, os.urandom(300_000))
    s1 = pool_cli("vdi", "snapshot", vdi)
    raw1 = disk_copy(pool, s1, tmp_path / "s1.raw")
    assert appears(pool_mount, s1)

    # The tree: user disks only, XAPI's fields in info.json.
    names = os.listdir(pool_mount.path / "vdis")
    assert vdi in names and s1 in names
    info = json.loads((pool_mount.vdi(vdi) / "info.json").read_text())
    assert info["cbt_enabled"] is True and info["xapi_type"] == "user"
    for uuid in names:
        label = json.loads((pool_mount.vdi(uuid) / "info.json").read_text())["name_label"]
        assert not label.endswith(".iso"), "an ISO library's VDI is not a disk"

    # Full images of a snapshot, checked by qemu-img and libvhdi; stable bytes.
    snap = pool_mount.vdi(s1)
    assert sha(snap / "raw.img") == sha(raw1)
    qemu_compare(snap / "full.vhd", raw1, "-f", "vpc")
    qemu_compare(snap / "full.qcow2", raw1, "-f", "qcow2")
    subprocess.run(["vhdiinfo", str(snap / "full.vhd")], check=True, capture_output=True)
    assert sha(snap / "full.vhd") == sha(snap / "full.vhd")
    assert os.stat(snap / "full.vhd").st_size < SIZE // 2, "unallocated blocks are not carried"

    # More writes, a zeroed range, then a CBT delta (a second later: XAPI's snapshot
    # times have one-second resolution, and deltas run from older to newer).
    time.sleep(1.05 - time.time() % 1)
    write_guest(pool, vdi, 1 * MiB + 512, os.urandom(512))
    write_guest(pool, vdi, 9 * MiB + 4096, bytes(65536))  # zeros over data travel as zeros
    write_guest(pool, vdi, 15 * MiB, os.urandom(MiB))
    s2 = pool_cli("vdi", "snapshot", vdi)
    raw2 = disk_copy(pool, s2, tmp_path / "s2.raw")
    assert appears(pool_mount, s2)
    assert os.listdir(pool_mount.vdi(s1) / "delta-from") == [], "CBT runs forward only"
    delta = pool_mount.vdi(s2) / "delta-from" / f"{s1}.vhd"
    assert delta.exists()

    backup = tmp_path / "backup"
    backup.mkdir()
    for fmt in ("vhd", "qcow2"):
        shutil.copyfile(snap / f"full.{fmt}", backup / f"{s1}.{fmt}")
        shutil.copyfile(pool_mount.vdi(s2) / "delta-from" / f"{s1}.{fmt}", backup / f"{s2}.{fmt}")
    qemu_compare(backup / f"{s2}.qcow2", raw2)
    out = tmp_path / "xo.raw"
    xo_restore("synthetic", out, backup / f"{s2}.vhd")
    assert sha(out) == sha(raw2), "Xen Orchestra's vhd-lib restores the chain"
    layers = tmp_path / "layers"
    layers.mkdir()
    subprocess.run(["vhdimount", str(backup / f"{s2}.vhd"), str(layers)], check=True)
    try:
        assert wait_for(lambda: (layers / "vhdi2").exists(), 5)
        assert sha(layers / "vhdi2") == sha(raw2)
    finally:
        subprocess.run(["fusermount3", "-u", str(layers)], check=False)

    # A checkpoint: the data goes, the delta base stays; bytes do not change.
    delta_sha = sha(backup / f"{s2}.vhd")
    pool_cli("vdi", "data-destroy", s1)
    assert wait_for(lambda: os.listdir(pool_mount.vdi(s1)) == ["info.json"], 10)
    assert sha(delta) == delta_sha
    full2 = sha(pool_mount.vdi(s2) / "full.vhd")

    # Remounted, a snapshot's images have the same bytes.
    pool_mount.stop()
    pool_cli("mount", str(pool_mount.path))
    assert sha(pool_mount.vdi(s2) / "full.vhd") == full2
    assert sha(pool_mount.vdi(s2) / "delta-from" / f"{s1}.vhd") == delta_sha

    # Restore into a new VDI of the pool's default SR.
    shutil.copyfile(pool_mount.vdi(s2) / "full.vhd", tmp_path / "restore.vhd")
    subprocess.run(
        ["cp", str(tmp_path / "restore.vhd"), str(pool_mount.path / "import" / "restored.vhd")],
        check=True,
    )
    status = json.loads((pool_mount.path / "import" / ".status" / "restored.vhd.json").read_text())
    assert status["state"] == "done", status
    restored = status["target"]
    assert sha(Path(pool.control.disk_path(restored))) == sha(raw2)

    # A damaged disk restored from its last snapshot, with a snapshot taken first.
    write_guest(pool, vdi, 0, os.urandom(4 * MiB))
    damaged = disk_copy(pool, vdi, tmp_path / "damaged.raw")
    subprocess.run(
        ["cp", str(tmp_path / "restore.vhd"), str(pool_mount.path / "import" / f"{vdi}.vhd")],
        check=True,
    )
    status = json.loads((pool_mount.path / "import" / ".status" / f"{vdi}.vhd.json").read_text())
    assert status["state"] == "done", status
    assert sha(Path(pool.control.disk_path(vdi))) == sha(raw2)
    safety = status["notes"].split("snapshotted as ")[1].split(":")[0]
    assert sha(Path(pool.control.disk_path(safety))) == sha(damaged)

    # A delta applied onto the disk that holds its base.
    write_guest(pool, vdi, 5 * MiB, os.urandom(2 * MiB))
    s3 = pool_cli("vdi", "snapshot", vdi)
    raw3 = disk_copy(pool, s3, tmp_path / "s3.raw")
    assert appears(pool_mount, s3)
    shutil.copyfile(pool_mount.vdi(s3) / "delta-from" / f"{s2}.vhd", tmp_path / "d3.vhd")
    subprocess.run(
        ["cp", str(tmp_path / "restore.vhd"), str(pool_mount.path / "import" / f"{vdi}.vhd")],
        check=True,
    )
    assert sha(Path(pool.control.disk_path(vdi))) == sha(raw2)
    subprocess.run(
        ["cp", str(tmp_path / "d3.vhd"), str(pool_mount.path / "import" / f"{vdi}.vhd")],
        check=True,
    )
    assert sha(Path(pool.control.disk_path(vdi))) == sha(raw3)
    uploads = [i for i in pool.control.imports() if i.get("format") == "vhd"]
    assert uploads and all("transfer-encoding" not in map(str.lower, i["headers"]) for i in uploads)


def test_a_disk_in_use_by_a_running_vm_is_not_written(
    pool: PoolInfo, pool_cli: PoolCli, xapi: Xapi, pool_mount: PoolMount, tmp_path: Path
) -> None:
    vdi = new_disk(pool_cli, xapi, "db")
    write_guest(pool, vdi, 0, os.urandom(MiB))
    vm = pool.control.create_vm("db-server", "Running", {"xvda": vdi})
    assert wait_for(lambda: (pool_mount.path / "vms" / vm).exists(), 10)
    assert os.readlink(pool_mount.path / "vms" / vm / "disks" / "xvda").endswith(vdi)
    before = sha(Path(pool.control.disk_path(vdi)))
    (tmp_path / "new.raw").write_bytes(os.urandom(SIZE))
    result = subprocess.run(
        ["cp", str(tmp_path / "new.raw"), str(pool_mount.path / "import" / f"{vdi}.raw")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0 and os.strerror(errno.EBUSY) in result.stderr
    assert sha(Path(pool.control.disk_path(vdi))) == before
    # raw.img of a pool VDI is read-only: the pool's disks change through import/ only.
    with pytest.raises(OSError) as caught:
        open(pool_mount.vdi(vdi) / "raw.img", "r+b").close()
    assert caught.value.errno in (errno.EROFS, errno.EACCES)

    # A VM snapshot: every disk at one instant; revert needs the VM halted.
    snap = pool_cli("vm", "snapshot", vm, "--name", "nightly")
    assert wait_for(lambda: (pool_mount.path / "vms" / vm / "snapshots" / "nightly").exists(), 10)
    result = pool_cli.run("vm", "revert", snap, check=False)
    assert result.returncode == 6, result.stderr  # Busy: VM_BAD_POWER_STATE
    # XAPI refuses changed blocks onto a disk in use: no delta is listed, none fails.
    assert os.listdir(pool_mount.vdi(vdi) / "delta-from") == []
    pool.control.set_power_state(vm, "Halted")
    disk_snap = json.loads(pool_cli("vm", "show", snap))["disks"]["xvda"]
    assert wait_for(
        lambda: f"{disk_snap}.vhd" in os.listdir(pool_mount.vdi(vdi) / "delta-from"), 10
    )
    write_guest(pool, vdi, 0, os.urandom(MiB))
    pool_cli("vm", "revert", snap)
    disk = json.loads(pool_cli("vm", "show", vm))["disks"]["xvda"]
    assert sha(Path(pool.control.disk_path(disk))) == before


def test_credentials_and_certificates_are_checked(
    pool: PoolInfo, tmp_path: Path, pool_cli: PoolCli
) -> None:
    wrong = PoolCli(pool, password="not-the-password")
    result = wrong.run("vdi", "list", check=False)
    assert result.returncode == 13, result.stderr
    assert "SESSION_AUTHENTICATION_FAILED" in result.stderr
    assert "not-the-password" not in result.stderr + result.stdout
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = wrong.run("mount", str(mnt), check=False)
    assert result.returncode == 13 and not os.path.ismount(mnt), result.stderr

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    result = PoolCli(pool, ca=other).run("vdi", "list", check=False)
    assert result.returncode == 13 and "certificate" in result.stderr, result.stderr

    password_file = tmp_path / "password"
    password_file.write_text(pool.password + "\n")
    by_file = PoolCli(pool, password_file=password_file)
    assert by_file.run("vdi", "list").returncode == 0


def test_nbd_failures_are_eio_then_recover(
    pool: PoolInfo, pool_cli: PoolCli, xapi: Xapi, pool_mount: PoolMount, tmp_path: Path
) -> None:
    vdi = new_disk(pool_cli, xapi, "nbd")
    write_guest(pool, vdi, 0, os.urandom(8 * MiB))
    snap = pool_cli("vdi", "snapshot", vdi)
    raw = disk_copy(pool, snap, tmp_path / "snap.raw")
    assert appears(pool_mount, snap)
    image = pool_mount.vdi(snap) / "raw.img"

    pool.control.nbd_cert_mismatch(True)  # not the certificate get_nbd_info vouches for
    try:
        with pytest.raises(OSError) as caught:
            _read_direct(image)
        assert caught.value.errno == errno.EACCES
    finally:
        pool.control.nbd_cert_mismatch(False)

    pool.control.kill_nbd()
    try:
        with pytest.raises(OSError) as caught:
            _read_direct(image)
        assert caught.value.errno == errno.EIO
    finally:
        pool.control.start_nbd(0)
    assert _read_direct(image) == raw.read_bytes()

    pool.control.expire_sessions()  # vdifs logs in again, for XenAPI and NBD alike
    assert _read_direct(image) == raw.read_bytes()
    assert pool_cli("vdi", "show", snap)


def _read_direct(path: Path) -> bytes:
    """Read a whole file past the page cache (O_DIRECT), so each read reaches vdifs."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        size = os.fstat(fd).st_size
        buf = mmap.mmap(-1, 1 << 20)
        out = bytearray()
        while len(out) < size:
            got = os.preadv(fd, [buf], len(out))
            if got <= 0:
                break
            out += buf[:got]
        return bytes(out[:size])
    finally:
        os.close(fd)


def test_new_snapshots_appear_without_vdifs(
    pool: PoolInfo, pool_cli: PoolCli, xapi: Xapi, pool_mount: PoolMount
) -> None:
    vdi = new_disk(pool_cli, xapi, "events")
    ref = xapi("VDI.snapshot", xapi.ref(vdi), {})  # taken by XO or xe, not by vdifs
    snap = xapi("VDI.get_uuid", ref)
    assert appears(pool_mount, snap, timeout=5), "event.from shows it within seconds"
    links = [os.readlink(p) for p in (pool_mount.vdi(vdi) / "snapshots").iterdir()]
    assert f"../../{snap}" in links


def test_a_raw_sr_counts_every_block_and_one_sr_can_be_chosen(
    pool: PoolInfo, xapi: Xapi, tmp_path: Path
) -> None:
    srs = xapi("SR.get_all_records")
    raw_sr = next(ref for ref, sr in srs.items() if sr["name_label"] == "Raw storage")
    ref = xapi(
        "VDI.create",
        {
            "name_label": "raw-disk",
            "name_description": "",
            "SR": raw_sr,
            "virtual_size": str(6 * MiB),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
            "xenstore_data": {},
            "sm_config": {},
            "tags": [],
        },
    )
    vdi = xapi("VDI.get_uuid", ref)
    write_guest(pool, vdi, 2 * MiB, os.urandom(4096))
    only_raw = PoolCli(pool, sr=srs[raw_sr]["uuid"])
    listed = json.loads(only_raw("vdi", "list", "--json"))
    assert [r["uuid"] for r in listed] == [vdi], "?sr= shows that SR's disks only"

    mountpoint = tmp_path / "raw-mnt"
    mountpoint.mkdir()
    only_raw("mount", str(mountpoint))
    mount = PoolMount(only_raw, mountpoint)
    try:
        image = mount.vdi(vdi) / "full.vhd"
        # XAPI gives no VHD export here: every block is carried (3 blocks of 2 MiB).
        assert os.stat(image).st_size == 2048 + 3 * (512 + 2 * MiB) + 512
        qemu_compare(image, disk_copy(pool, vdi, tmp_path / "raw.raw"), "-f", "vpc")
        info = json.loads((mount.vdi(vdi) / "info.json").read_text())
        assert info["allocation"].startswith("unknown"), info
    finally:
        mount.stop()


def test_the_cli_exports_and_imports_without_a_mount(
    pool: PoolInfo, pool_cli: PoolCli, xapi: Xapi, tmp_path: Path
) -> None:
    vdi = new_disk(pool_cli, xapi, "cli", 6 * MiB)
    write_guest(pool, vdi, 3 * MiB, os.urandom(MiB))
    snap = pool_cli("vdi", "snapshot", vdi, "--name", "cli-snap")
    raw = disk_copy(pool, snap, tmp_path / "snap.raw")
    pool_cli("export", snap, str(tmp_path / "snap.vhd"), "--format", "vhd")
    qemu_compare(tmp_path / "snap.vhd", raw, "-f", "vpc")
    write_guest(pool, vdi, 0, os.urandom(MiB))
    pool_cli("import", vdi, str(tmp_path / "snap.vhd"))
    assert sha(Path(pool.control.disk_path(vdi))) == sha(raw)
    statuses = json.loads(pool_cli("import-status", "--json"))
    assert statuses[0]["state"] == "done" and "snapshotted as" in statuses[0]["notes"]


def test_more_disks_read_at_once_than_readers_kept(
    pool: PoolInfo, pool_cli: PoolCli, xapi: Xapi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers of other VDIs evict one in use (xapi-nbd's 16 connections per host):
    its reads go on through a fresh one, never EIO."""
    import threading

    from vdifs.storage.xapi import pool as pool_module
    from vdifs.storage.xapi.api import PoolAddress

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    snaps = []
    for n in range(pool_module.READERS + 2):
        vdi = new_disk(pool_cli, xapi, f"many{n}", 8 * MiB)
        write_guest(pool, vdi, 0, os.urandom(8 * MiB))
        snaps.append(pool_cli("vdi", "snapshot", vdi))
    expected = {s: Path(pool.control.disk_path(s)).read_bytes() for s in snaps}
    backend = pool_module.PoolBackend(
        PoolAddress.parse(f"xapi://{pool.user}@127.0.0.1:{urlsplit(pool.url).port}"),
        pool.password,
        ca=Path(pool.ca),
        scratch=tmp_path / "cache",
    )
    errors: list[BaseException] = []

    def read_all(snap: str) -> None:
        try:
            _, content = backend.state(snap)
            for _ in range(3):
                for offset in range(0, 8 * MiB, MiB):
                    buf = bytearray(MiB)
                    backend.read_into(content, offset, memoryview(buf))
                    assert buf == expected[snap][offset : offset + MiB]
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=read_all, args=(s,)) for s in snaps]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        # Deterministically: the reader of snaps[0] is evicted in the middle of a read.
        _, first = backend.state(snaps[0])
        reader = backend._reader(first)
        original = reader.read_into

        def evicted_meanwhile(offset: int, buf: memoryview) -> None:
            for other in snaps[1 : 1 + pool_module.READERS]:
                backend._reader(backend.state(other)[1])
            assert reader.closed
            original(offset, buf)

        reader.read_into = evicted_meanwhile  # type: ignore[method-assign]
        buf = bytearray(MiB)
        backend.read_into(first, 3 * MiB, memoryview(buf))
        assert buf == expected[snaps[0]][3 * MiB : 4 * MiB]
    finally:
        backend.close()


def test_vdifs_serve_on_a_pool(
    pool: PoolInfo, pool_cli: PoolCli, xapi: Xapi, tmp_path: Path
) -> None:
    """The HTTPS side serves a pool as it serves the embedded SR."""
    import trustme

    vdi = new_disk(pool_cli, xapi, "served", 6 * MiB)
    write_guest(pool, vdi, MiB, os.urandom(2 * MiB))
    snap = pool_cli("vdi", "snapshot", vdi)
    raw = disk_copy(pool, snap, tmp_path / "snap.raw")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    (tmp_path / "tokens").write_text("pool-token\n")
    env = {
        **os.environ,
        "VDIFS_XAPI_PASSWORD": pool.password,
        "XDG_CACHE_HOME": str(Path(pool.state_dir) / "cache"),
        "XDG_STATE_HOME": str(Path(pool.state_dir) / "state"),
    }
    port = urlsplit(pool.url).port
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "vdifs", "--sr", f"xapi://{pool.user}@127.0.0.1:{port}"),
            *("--ca", str(pool.ca), "serve", "--listen", "127.0.0.1:0"),
            *("--cert", str(tmp_path / "server.pem"), "--token-file", str(tmp_path / "tokens")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert server.stdout is not None
        listening = int(server.stdout.readline().decode().split()[-1])
        url = (
            f"https://localhost:{listening}/export_raw_vdi?vdi={snap}&format=vhd"
            "&session_id=pool-token"
        )
        got = tmp_path / "got.vhd"
        subprocess.run(
            ["curl", "-sSf", "--cacert", str(tmp_path / "ca.pem"), "-o", str(got), url],
            check=True,
            timeout=60,
        )
        qemu_compare(got, raw, "-f", "vpc")
        pool_cli("export", snap, str(tmp_path / "cli.vhd"), "--format", "vhd")
        assert sha(got) == sha(tmp_path / "cli.vhd")
    finally:
        server.terminate()
        server.wait(10)
