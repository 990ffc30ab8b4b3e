"""The fake pool (tests/pool/fakepool) behaves like XAPI where vdifs looks at it.

Checked against independent tools, never against vdifs: nbdinfo/nbdcopy (libnbd)
for the NBD exports, qemu-img for the VHDs, and bytes read here for the CBT bitmaps.
"""

from __future__ import annotations

import base64
import http.client
import json
import struct
import subprocess
import threading
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from tests.pool.fakepool import PoolInfo, nbd_uri, running_pool

MiB = 1 << 20


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolInfo]:
    with running_pool(tmp_path_factory.mktemp("fakepool")) as info:
        yield info


class Api:
    """A logged-in XenAPI session: api(method, *args) -> Value, or AssertionError."""

    def __init__(self, fake: PoolInfo) -> None:
        self.fake, self.proxy = fake, fake.proxy()
        login: Any = self.proxy.session.login_with_password(fake.user, fake.password, "1.0", "")
        self.session: str = login["Value"]

    def raw(self, method: str, *args: Any) -> dict[str, Any]:
        result: dict[str, Any] = getattr(self.proxy, method)(self.session, *args)
        return result

    def __call__(self, method: str, *args: Any) -> Any:
        result = self.raw(method, *args)
        assert result["Status"] == "Success", result
        return result["Value"]

    def error(self, method: str, *args: Any) -> list[str]:
        result = self.raw(method, *args)
        assert result["Status"] == "Failure", result
        return list(result["ErrorDescription"])

    def sr(self, name: str) -> str:
        return next(r for r, sr in self("SR.get_all_records").items() if sr["name_label"] == name)

    def new_disk(self, size: int, sr: str = "Local storage") -> tuple[str, str]:
        record = {
            "name_label": "disk", "name_description": "", "SR": self.sr(sr),
            "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False,
            "other_config": {}, "xenstore_data": {}, "sm_config": {}, "tags": [],
        }  # fmt: skip
        ref = self("VDI.create", record)
        return ref, self("VDI.get_uuid", ref)


@pytest.fixture
def api(fake: PoolInfo) -> Api:
    return Api(fake)


def write(fake: PoolInfo, vdi_uuid: str, offset: int, data: bytes) -> None:
    with open(fake.control.disk_path(vdi_uuid), "r+b") as f:
        f.seek(offset)
        f.write(data)
    fake.control.bump(vdi_uuid)


def pinned_uri(api: Api, ref: str, where: Path) -> str:
    """The form the benchmark uses: get_nbd_info's certificate pinned as ca-cert.pem."""
    info = api("VDI.get_nbd_info", ref)[0]
    where.mkdir(exist_ok=True)
    (where / "ca-cert.pem").write_text(info["cert"])
    return nbd_uri(info["address"], info["port"], info["exportname"], where)


def nbdinfo(uri: str) -> subprocess.CompletedProcess[str]:
    cmd = ["nbdinfo", "--json", uri]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)


def request(fake: PoolInfo, method: str, path: str, query: dict[str, str], body: bytes = b"",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    url = urlsplit(fake.url)
    conn = http.client.HTTPSConnection("127.0.0.1", url.port, context=fake.ssl_context())
    try:
        conn.putrequest(method, f"{path}?{urlencode(query)}", skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def put(fake: PoolInfo, api: Api, ref: str, fmt: str, body: bytes, **hdrs: str) -> tuple[int, str]:
    task = api("task.create", "import", "")
    query = {"session_id": api.session, "vdi": ref, "format": fmt, "task_id": task}
    headers = hdrs or {"Content-Length": str(len(body))}
    status, _, _ = request(fake, "PUT", "/import_raw_vdi", query, body, headers)
    return status, task


def test_login_and_envelopes(fake: PoolInfo, api: Api) -> None:
    proxy = fake.proxy()
    bad: Any = proxy.session.login_with_password("root", "wrong", "1.0", "test")
    assert bad == {
        "Status": "Failure",
        "ErrorDescription": ["SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"],
    }
    assert api.session.startswith("OpaqueRef:")
    bad_ref = "OpaqueRef:nope"
    assert api.error("VDI.get_record", bad_ref) == ["HANDLE_INVALID", "VDI", bad_ref]
    assert api.error("VDI.frobnicate") == ["MESSAGE_METHOD_UNKNOWN", "VDI.frobnicate"]
    expired: Any = proxy.VDI.get_all(bad_ref)
    assert expired["ErrorDescription"] == ["SESSION_INVALID", bad_ref]
    assert "session.login_with_password" in fake.control.calls()


def test_records_look_like_xapi(api: Api) -> None:
    pool = api("pool.get_all")[0]
    srs = api("SR.get_all_records")
    assert srs[api("pool.get_default_SR", pool)]["name_label"] == "Local storage"
    assert {sr["content_type"] for sr in srs.values()} == {"user", "iso"}
    iso = next(sr for sr in srs.values() if sr["type"] == "iso")
    assert api("VDI.get_name_label", iso["VDIs"][0]) == "debian.iso"
    vms = api("VM.get_all_records").values()
    assert any(vm["is_control_domain"] for vm in vms) and any(vm["is_a_template"] for vm in vms)

    ref, _ = api.new_disk(3 * MiB + 5)
    rec = api("VDI.get_record", ref)
    assert rec["virtual_size"] == str(4 * MiB)  # int64 as a string, rounded to 2 MiB as SM does
    assert rec["physical_utilisation"] == "0" and isinstance(rec["physical_utilisation"], str)
    assert rec["snapshot_time"].value == "19700101T00:00:00Z"
    assert rec["snapshot_of"] == "OpaqueRef:NULL" and rec["VBDs"] == [] and not rec["read_only"]
    raw_ref, _ = api.new_disk(3 * MiB + 512, sr="Raw storage")
    assert api("VDI.get_virtual_size", raw_ref) == str(3 * MiB + 512)
    api("VDI.resize", raw_ref, str(5 * MiB))
    assert api("VDI.get_virtual_size", raw_ref) == str(5 * MiB)


def expected_bitmap(a: bytes, b: bytes) -> bytes:
    """The CBT bitmap computed here: 64 KiB blocks of b's size, MSB first."""
    blocks = -(-len(b) // 65536)
    bitmap = bytearray(-(-blocks // 8))
    for i in range(blocks):
        chunk = slice(i * 65536, (i + 1) * 65536)
        if a[chunk].ljust(len(b[chunk]), b"\0") != b[chunk]:
            bitmap[i >> 3] |= 0x80 >> (i & 7)
    return bytes(bitmap)


def test_snapshots_and_changed_blocks(fake: PoolInfo, api: Api) -> None:
    ref, vdi = api.new_disk(8 * MiB)
    write(fake, vdi, 100_000, b"guest data" * 1000)
    api("VDI.enable_cbt", ref)
    api("VDI.enable_cbt", ref)  # idempotent
    snap_a = api("VDI.snapshot", ref, {})
    write(fake, vdi, 0, b"\1")
    write(fake, vdi, 5 * MiB + 65535, b"\2\3")  # straddles two blocks
    api("VDI.resize", ref, str(10 * MiB))
    write(fake, vdi, 10 * MiB - 1, b"\4")
    snap_b = api("VDI.snapshot", ref, {})
    rec = api("VDI.get_record", snap_b)
    assert rec["is_a_snapshot"] and rec["read_only"] and rec["snapshot_of"] == ref
    assert rec["cbt_enabled"] and rec["snapshot_time"].value != "19700101T00:00:00Z"
    assert set(api("VDI.get_snapshots", ref)) == {snap_a, snap_b}

    path = fake.control.disk_path
    a, b = (Path(path(api("VDI.get_uuid", s))).read_bytes() for s in (snap_a, snap_b))
    want = expected_bitmap(a, b)
    assert len(want) == 20 and want != bytes(20)
    assert base64.b64decode(api("VDI.list_changed_blocks", snap_a, snap_b)) == want

    api("VDI.data_destroy", snap_a)
    api("VDI.data_destroy", snap_a)  # idempotent
    assert api("VDI.get_type", snap_a) == "cbt_metadata"
    assert base64.b64decode(api("VDI.list_changed_blocks", snap_a, snap_b)) == want
    assert api.error("VDI.get_nbd_info", snap_a) == [
        "VDI_INCOMPATIBLE_TYPE", snap_a, "cbt_metadata"
    ]  # fmt: skip
    assert api.error("VDI.data_destroy", ref)[0] == "OPERATION_NOT_ALLOWED"
    clone = api("VDI.clone", snap_b, {})
    assert api("VDI.get_snapshot_of", clone) == "OpaqueRef:NULL"
    assert api.error("VDI.list_changed_blocks", snap_b, clone) == ["VDI_NO_CBT_METADATA", clone]
    api("VDI.enable_cbt", clone)
    assert api.error("VDI.list_changed_blocks", snap_b, clone)[0] == "SR_BACKEND_FAILURE_460"
    api("VDI.destroy", ref)  # its snapshots stay, still one family
    assert api("VDI.get_snapshot_of", snap_b) == ref
    assert base64.b64decode(api("VDI.list_changed_blocks", snap_a, snap_b)) == want


def test_nbdinfo_and_nbdcopy_over_tls(fake: PoolInfo, api: Api, tmp_path: Path) -> None:
    """The URI form that works with libnbd 1.14 (nbdinfo, nbdcopy):
    ``nbds://127.0.0.1:PORT//<uuid>%3Fsession_id%3DOpaqueRef%3A<uuid>?tls-certificates=DIR``
    -- the export name, percent-encoded, after the path's first "/", and DIR
    holding ca-cert.pem = the certificate from VDI.get_nbd_info (or the CA)."""
    ref, vdi = api.new_disk(4 * MiB)
    write(fake, vdi, 3 * MiB, b"hello over NBD")
    uri = pinned_uri(api, ref, tmp_path / "pin")
    assert uri.startswith(f"nbds://127.0.0.1:{fake.nbd_port}//{vdi}%3Fsession_id%3DOpaqueRef%3A")
    done = nbdinfo(uri)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    export = info["exports"][0]
    assert info["TLS"] and not info["structured"] and export["is_read_only"]
    assert export["export-size"] == 4 * MiB and export["block_size_minimum"] == 512
    subprocess.run(["nbdcopy", uri, str(tmp_path / "copy.raw")], check=True, timeout=20)
    assert (tmp_path / "copy.raw").read_bytes() == Path(fake.control.disk_path(vdi)).read_bytes()

    fake.control.nbd_cert_mismatch(True)
    try:
        refused = nbdinfo(pinned_uri(api, ref, tmp_path / "other"))
        assert refused.returncode != 0 and "certificate" in refused.stderr
    finally:
        fake.control.nbd_cert_mismatch(False)

    fake.control.kill_nbd()
    assert nbdinfo(uri).returncode != 0
    fake.control.start_nbd(0)
    assert nbdinfo(uri).returncode == 0

    fake.control.expire_sessions()
    assert api.error("VDI.get_record", ref) == ["SESSION_INVALID", api.session]
    log = fake.state_dir / "nbdkit.log"
    seen = log.stat().st_size
    refused = nbdinfo(uri)
    assert refused.returncode != 0 and "export" in refused.stderr
    assert "SESSION_INVALID" in log.read_text()[seen:]  # the plugin's refusal


def test_nbd_delay(tmp_path: Path) -> None:
    with running_pool(tmp_path / "slow", nbd_delay_ms=300) as fake:
        api = Api(fake)
        ref, _ = api.new_disk(2 * MiB)
        start = time.monotonic()
        uri = pinned_uri(api, ref, tmp_path / "pin")
        subprocess.run(["nbdcopy", uri, str(tmp_path / "copy.raw")], check=True, timeout=20)
        assert time.monotonic() - start >= 0.3


def test_export_raw_vdi(fake: PoolInfo, api: Api, tmp_path: Path) -> None:
    ref, vdi = api.new_disk(6 * MiB)
    write(fake, vdi, 2 * MiB + 4096, b"\xaa" * 70000)
    disk = fake.control.disk_path(vdi)
    query = {"session_id": api.session, "vdi": ref, "format": "vhd"}
    status, headers, body = request(fake, "GET", "/export_raw_vdi", query)
    assert status == 200 and "Content-Length" not in headers
    (tmp_path / "e.vhd").write_bytes(body)
    cmd = ["qemu-img", "info", "--output=json", str(tmp_path / "e.vhd")]
    info = json.loads(subprocess.run(cmd, capture_output=True, check=True).stdout)
    assert info["format"] == "vpc" and info["virtual-size"] == 6 * MiB
    assert info["actual-size"] < 3 * MiB  # zero blocks left out of the BAT
    cmd = ["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(tmp_path / "e.vhd"), disk]
    subprocess.run(cmd, check=True, capture_output=True)

    status, headers, body = request(
        fake, "GET", "/export_raw_vdi", query | {"vdi": vdi, "format": "raw"}
    )
    assert status == 200 and headers["Content-Length"] == str(6 * MiB)
    assert body == Path(disk).read_bytes()
    assert request(fake, "GET", "/export_raw_vdi", query | {"session_id": "OpaqueRef:x"})[0] == 401
    assert request(fake, "GET", "/export_raw_vdi", query | {"vdi": "OpaqueRef:x"})[0] == 404
    assert request(fake, "GET", "/export_raw_vdi", query | {"base": ref})[0] == 400
    raw_ref, _ = api.new_disk(MiB, sr="Raw storage")
    status, _, body = request(fake, "GET", "/export_raw_vdi", query | {"vdi": raw_ref})
    assert status == 500 and body.startswith(b"VDI_INCOMPATIBLE_TYPE")


def vhd_of(raw: Path, tmp_path: Path) -> bytes:
    vhd = tmp_path / (raw.name + ".vhd")
    opts = "subformat=dynamic,force_size=on"
    cmd = ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", opts, str(raw), str(vhd)]
    subprocess.run(cmd, check=True, capture_output=True)
    return vhd.read_bytes()


def test_import_vhd_and_raw(fake: PoolInfo, api: Api, tmp_path: Path) -> None:
    source = tmp_path / "source.raw"
    data = bytearray(8 * MiB)
    data[3 * MiB : 3 * MiB + 5000] = b"\x55" * 5000
    data[7 * MiB - 3 :] = b"end" + bytes(MiB)
    source.write_bytes(data)
    ref, vdi = api.new_disk(8 * MiB)
    status, task = put(fake, api, ref, "vhd", vhd_of(source, tmp_path))
    assert status == 200 and api("task.get_status", task) == "success"
    cmd = ["qemu-img", "compare", "-f", "raw", "-F", "raw", fake.control.disk_path(vdi)]
    subprocess.run([*cmd, str(source)], check=True, capture_output=True)
    assert fake.control.imports()[-1]["outcome"] == "success"

    # Only sectors set in a block's bitmap are written; unallocated blocks are untouched.
    write(fake, vdi, 0, b"\x11" * 8 * MiB)
    vhd = bytearray(vhd_of(source, tmp_path))
    header = struct.unpack_from(">Q", vhd, 16)[0]
    table, entries = struct.unpack_from(">Q4xI", vhd, header + 16)
    bat = struct.unpack_from(f">{entries}I", vhd, table)
    assert bat[0] == bat[2] == 0xFFFFFFFF  # blocks of zeros are not in the VHD
    vhd[bat[1] * 512] = 0  # block 1 (3 MiB is in it): its first 8 sectors now unset
    assert put(fake, api, ref, "vhd", bytes(vhd))[0] == 200
    got = Path(fake.control.disk_path(vdi)).read_bytes()
    assert got[: 2 * MiB + 4096] == b"\x11" * (2 * MiB + 4096)
    assert got[2 * MiB + 4096 : 4 * MiB] == bytes(data[2 * MiB + 4096 : 4 * MiB])
    assert got[4 * MiB : 6 * MiB] == b"\x11" * 2 * MiB

    assert put(fake, api, ref, "raw", b"\x22" * MiB)[0] == 200
    assert Path(fake.control.disk_path(vdi)).read_bytes()[: MiB + 1] == b"\x22" * MiB + b"\x11"
    status, task = put(fake, api, ref, "vhd", b"not a vhd".ljust(1024))
    assert api("task.get_error_info", task) == ["VDI_IO_ERROR", "Device I/O errors"]
    assert fake.control.imports()[-1]["outcome"] == "failure: Unsupported footer cookie"


def test_import_refusals(fake: PoolInfo, api: Api) -> None:
    ref, vdi = api.new_disk(2 * MiB)
    chunked = b"4\r\nabcd\r\n0\r\n\r\n"
    status, task = put(fake, api, ref, "raw", chunked, **{"Transfer-Encoding": "chunked"})
    assert status == 404 and api("task.get_status", task) == "failure"
    assert api("task.get_error_info", task) == ["INTERNAL_ERROR", "Cannot handle encoding: chunked"]
    assert fake.control.imports()[-1]["headers"]["Transfer-Encoding"] == "chunked"

    vm = fake.control.create_vm("busy", "Running", {"xvda": vdi})
    status, task = put(fake, api, ref, "raw", b"x" * 512)
    assert status == 200 and api("task.get_error_info", task) == ["VDI_IN_USE", ref, "import"]
    assert api.error("VDI.destroy", ref) == ["VDI_IN_USE", ref, "destroy"]
    vbd = api("VDI.get_VBDs", ref)[0]
    assert api("VBD.get_currently_attached", vbd) and api("VBD.get_device", vbd) == "xvda"
    fake.control.set_power_state(vm, "Halted")
    assert not api("VBD.get_currently_attached", vbd)
    api("VDI.destroy", ref)


def test_vm_snapshot_and_revert(fake: PoolInfo, api: Api) -> None:
    ref, vdi = api.new_disk(2 * MiB)
    api("VDI.enable_cbt", ref)
    vm = api("VM.get_by_uuid", fake.control.create_vm("web", "Halted", {"xvda": vdi}))
    write(fake, vdi, 0, b"before")
    snap = api("VM.snapshot", vm, "nightly")
    rec = api("VM.get_record", snap)
    assert rec["is_a_snapshot"] and rec["snapshot_of"] == vm and rec["power_state"] == "Halted"
    assert api("VM.get_parent", vm) == snap and api("VM.get_snapshots", vm) == [snap]
    snap_vbd = api("VBD.get_record", rec["VBDs"][0])
    assert snap_vbd["device"] == "xvda" and not snap_vbd["currently_attached"]
    assert api("VDI.get_snapshot_of", snap_vbd["VDI"]) == ref
    assert "VM.snapshot" in fake.control.calls()

    write(fake, vdi, 0, b"after!")
    api("VM.revert", snap)
    assert api.error("VDI.get_record", ref)[0] == "HANDLE_INVALID"  # replaced by a clone
    (new_vbd,) = api("VM.get_VBDs", vm)
    new = api("VBD.get_VDI", new_vbd)
    new_uuid = api("VDI.get_uuid", new)
    assert Path(fake.control.disk_path(new_uuid)).read_bytes()[:6] == b"before"
    assert api("VDI.get_snapshot_of", snap_vbd["VDI"]) == new  # the CBT chain continues
    assert (
        api("VDI.list_changed_blocks", snap_vbd["VDI"], new) == base64.b64encode(bytes(4)).decode()
    )
    assert api("VM.get_parent", vm) == snap

    vm_uuid = api("VM.get_uuid", vm)
    fake.control.set_power_state(vm_uuid, "Running")
    assert api.error("VM.revert", snap) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    fake.control.set_power_state(vm_uuid, "Halted")
    api("VM.destroy", snap)
    assert api("VM.get_snapshots", vm) == [] and api("VDI.get_record", snap_vbd["VDI"])


def test_event_from_blocks_until_a_change(fake: PoolInfo, api: Api) -> None:
    first = api("event.from", ["vdi"], "", 5.0)
    assert first["events"] and {e["operation"] for e in first["events"]} == {"add"}
    quiet = api("event.from", ["vdi"], first["token"], 0.2)
    assert quiet["events"] == [] and quiet["token"] == first["token"]
    ref, vdi = api.new_disk(MiB)
    added = api("event.from", ["vdi"], first["token"], 5.0)
    assert [(e["class"], e["operation"], e["ref"]) for e in added["events"]] == [
        ("vdi", "add", ref)
    ]

    got: list[Any] = []
    other = Api(fake)
    wait = lambda: got.append(other("event.from", ["vdi"], added["token"], 10.0))  # noqa: E731
    waiter = threading.Thread(target=wait)
    start = time.monotonic()
    waiter.start()
    time.sleep(0.3)
    fake.control.bump(vdi)  # answered while event.from waits
    waiter.join(10)
    assert time.monotonic() - start < 5
    (event,) = got[0]["events"]
    assert event["operation"] == "mod" and event["ref"] == ref
    assert event["snapshot"]["uuid"] == vdi and got[0]["token"] != added["token"]


def test_tasks(api: Api) -> None:
    task = api("task.create", "backup", "nightly")
    rec = api("task.get_record", task)
    assert rec["status"] == "pending" and rec["error_info"] == [] and rec["name_label"] == "backup"
    api("task.destroy", task)
    assert api.error("task.get_status", task) == ["HANDLE_INVALID", "task", task]


def test_control_errors_are_faults(fake: PoolInfo) -> None:
    with pytest.raises(xmlrpc.client.Fault):
        fake.control.disk_path("no-such-uuid")
