"""``vdifs serve`` through real clients: curl, qemu's curl block driver, nbdkit's curl plugin.

The server runs as a user starts it (the real CLI, HTTPS with a trustme
certificate); what it serves is compared with what ``vdifs export`` writes
and with the SR's raw.img, never with a second reading of our own code.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.conftest import Cli, needs_tool, sha
from vdifs.storage.local import LocalSR

pytestmark = [needs_tool("curl"), needs_tool("qemu-img")]

MiB = 1 << 20
TOKEN = "s3cret-token"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Served:
    url: str
    ca: Path
    port: int
    vdi: str
    snap: str
    base: str
    tmp: Path

    def curl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            ["curl", "-sS", "--cacert", str(self.ca), *args],
            capture_output=True,
            check=False,
            timeout=120,
        )
        if check:
            assert result.returncode == 0, result.stderr.decode()
        return result

    def status(self, *args: str) -> int:
        out = self.curl("-o", "/dev/null", "-w", "%{http_code}", *args).stdout
        return int(out)


@pytest.fixture
def served(sr_path: Path, cli: Cli, tmp_path: Path) -> Iterator[Served]:
    vdi = cli("vdi", "create", "web", "--size", str(9 * MiB + 512))
    sr = LocalSR(sr_path)
    try:
        with sr.writer(vdi) as w:
            for chunk in (0, 5, 33, 100):
                w.write_chunk(chunk, os.urandom(65536))
            w.commit()
        base = sr.snapshot(vdi, "monday").uuid
        with sr.writer(vdi) as w:
            w.write_chunk(5, os.urandom(65536))
            w.write_chunk(140, os.urandom(100))
            w.commit()
        snap = sr.snapshot(vdi, "tuesday").uuid
    finally:
        sr.close()
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    (tmp_path / "tokens").write_text(f"# tokens\n{TOKEN}\n")
    users = tmp_path / "htpasswd"
    for flag, user in (("-B", "bcrypt-user"), ("-m", "md5-user"), ("-s", "sha-user")):
        line = subprocess.run(
            ["htpasswd", "-nb", flag, user, "pw-" + user], capture_output=True, text=True
        ).stdout.strip()
        with open(users, "a") as f:
            f.write(line + "\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vdifs",
            "--sr",
            str(sr_path),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cert",
            str(tmp_path / "server.pem"),
            "--token-file",
            str(tmp_path / "tokens"),
            "--htpasswd",
            str(users),
        ],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "serve.log", "wb"),  # noqa: SIM115
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("listening on port"), (tmp_path / "serve.log").read_text()
        port = int(line.split()[-1])
        yield Served(
            f"https://localhost:{port}", tmp_path / "ca.pem", port, vdi, snap, base, tmp_path
        )
    finally:
        proc.terminate()
        proc.wait(10)


def bearer() -> tuple[str, str]:
    return "-H", f"Authorization: Bearer {TOKEN}"


def test_exports_ranges_and_resume(served: Served, cli: Cli, tmp_path: Path) -> None:
    vhd = tmp_path / "cli.vhd"
    cli("export", served.snap, str(vhd), "--format", "vhd")
    url = f"{served.url}/export_raw_vdi?vdi={served.snap}&format=vhd&session_id={TOKEN}"
    got = tmp_path / "got.vhd"
    served.curl("-o", str(got), url)
    assert sha(got) == sha(vhd)
    # The tree's own path, with a bearer token; HEAD and the headers a resumer needs.
    head = served.curl("-I", *bearer(), f"{served.url}/vdis/{served.snap}/full.vhd").stdout
    headers = {
        k.lower(): v
        for k, v in (line.split(": ", 1) for line in head.decode().splitlines()[1:] if ": " in line)
    }
    assert int(headers["content-length"]) == vhd.stat().st_size
    assert headers["accept-ranges"] == "bytes" and headers["etag"].startswith('"')
    # One range, then a download cut half-way and resumed with curl -C -.
    part = served.curl("-r", "1000-1999", url).stdout
    assert part == vhd.read_bytes()[1000:2000]
    half = tmp_path / "resumed.vhd"
    served.curl("-r", f"0-{vhd.stat().st_size // 2}", "-o", str(half), url)
    served.curl("-C", "-", "-o", str(half), url)
    assert sha(half) == sha(vhd)
    # A delta by XAPI's base= parameter.
    delta = tmp_path / "delta.vhd"
    cli("export", served.snap, str(delta), "--format", "vhd", "--base", served.base)
    served.curl("-o", str(tmp_path / "d.vhd"), f"{url}&base={served.base}")
    assert sha(tmp_path / "d.vhd") == sha(delta)
    listing = json.loads(served.curl(*bearer(), f"{served.url}/vdis/{served.snap}/").stdout)
    assert {"full.vhd", "raw.img", "info.json"} <= {e["name"] for e in listing}


def test_qemu_and_nbdkit_read_over_https(served: Served, tmp_path: Path, sr_path: Path) -> None:
    raw_url = f"{served.url}/export_raw_vdi?vdi={served.snap}&format=raw&session_id={TOKEN}"
    spec = {"file.driver": "https", "file.url": raw_url, "file.sslverify": False}
    out = tmp_path / "qemu.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", f"json:{json.dumps(spec)}", "-O", "raw", str(out)],
        check=True,
        timeout=120,
    )
    cli_raw = tmp_path / "cli.raw"
    Cli(sr_path)("export", served.snap, str(cli_raw))
    assert sha(out) == sha(cli_raw)
    vhd_spec = dict(spec, **{"file.url": raw_url.replace("format=raw", "format=vhd")})
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", "vpc", f"json:{json.dumps(vhd_spec)}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["format"] == "vpc"
    if subprocess.run(["which", "nbdkit"], capture_output=True).returncode == 0:
        sock = tmp_path / "nbd.sock"
        nbdkit = subprocess.Popen(
            ["nbdkit", "-f", "-U", str(sock), "curl", f"url={raw_url}", "sslverify=false"]
        )
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            via = tmp_path / "nbd.raw"
            subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", str(via)], check=True)
            assert sha(via) == sha(cli_raw)
        finally:
            nbdkit.terminate()
            nbdkit.wait(10)


def test_uploads_restore_and_refusals(served: Served, cli: Cli, tmp_path: Path) -> None:
    image = tmp_path / "tuesday.vhd"
    cli("export", served.snap, str(image), "--format", "vhd")
    put = f"{served.url}/import_raw_vdi?vdi={served.vdi}&format=vhd"
    # Into a snapshot: 403 with XAPI's error name.
    result = served.curl(
        "-T", str(image), "-w", "%{http_code}", *bearer(), put.replace(served.vdi, served.snap)
    )
    assert result.stdout.endswith(b"403") and b"VDI_READ_ONLY" in result.stdout
    # A restore that the SR then holds.
    cli("import", served.vdi, str(tmp_path / "tuesday.vhd"))  # the same content
    cli("export", served.base, str(tmp_path / "monday.vhd"), "--format", "vhd")
    status = json.loads(served.curl("-T", str(tmp_path / "monday.vhd"), *bearer(), put).stdout)
    assert status["state"] == "done" and status["Value"] == served.vdi
    cli("export", served.vdi, str(tmp_path / "now.raw"))
    cli("export", served.base, str(tmp_path / "monday.raw"))
    assert sha(tmp_path / "now.raw") == sha(tmp_path / "monday.raw")
    # A new VDI from an upload, named by name_label.
    new = json.loads(
        served.curl(
            "-T",
            str(image),
            *bearer(),
            f"{served.url}/import_raw_vdi?format=vhd&name_label=restored",
        ).stdout
    )
    assert cli.json("vdi", "show", new["Value"])["name_label"] == "restored"
    # A truncated image is refused; nothing changes.
    (tmp_path / "cut.vhd").write_bytes(image.read_bytes()[:-4096])
    result = served.curl("-T", str(tmp_path / "cut.vhd"), "-w", "%{http_code}", *bearer(), put)
    assert result.stdout.endswith(b"400")
    cli("export", served.vdi, str(tmp_path / "after.raw"))
    assert sha(tmp_path / "after.raw") == sha(tmp_path / "monday.raw")


def test_credentials_and_hostile_ranges(served: Served) -> None:
    url = f"{served.url}/vdis/{served.snap}/raw.img"
    assert served.status(url) == 401
    assert served.status("-H", "Authorization: Bearer wrong", url) == 401
    assert served.status(f"{url}?session_id=wrong") == 401
    for user in ("bcrypt-user", "md5-user", "sha-user"):
        assert served.status("-u", f"{user}:pw-{user}", "-r", "0-0", url) == 206, user
        assert served.status("-u", f"{user}:nope", url) == 401, user
    assert served.status("-u", f"anyone:{TOKEN}", "-r", "0-0", url) == 206
    size = 9 * MiB + 512
    for header, expected in (
        ("bytes=0-0," * 100 + "1-1", 200),  # many ranges: the whole body
        ("bytes=-0", 416),
        ("bytes=99999999999999999999-", 416),
        (f"bytes={size}-", 416),
        ("bytes=5-2", 200),  # invalid: ignored
        ("bytes=-5", 206),
        ("lines=1-2", 200),
    ):
        assert served.status(*bearer(), "-H", f"Range: {header}", url) == expected, header
    etag = '"not-this-one"'
    assert served.status(*bearer(), "-H", "Range: bytes=0-9", "-H", f"If-Range: {etag}", url) == 200


def test_a_slow_client_does_not_hold_up_the_others(served: Served, tmp_path: Path) -> None:
    context = ssl.create_default_context(cafile=str(served.ca))
    slow = context.wrap_socket(
        socket.create_connection(("127.0.0.1", served.port)), server_hostname="localhost"
    )
    try:
        slow.sendall(
            f"GET /vdis/{served.snap}/raw.img?session_id={TOKEN} HTTP/1.1\r\n"
            "Host: localhost\r\n\r\n".encode()
        )
        assert slow.recv(100).startswith(b"HTTP/1.1 200")  # then it stops reading
        started = time.monotonic()
        for _ in range(3):
            served.curl(
                "-o",
                str(tmp_path / "fast.img"),
                *bearer(),
                f"{served.url}/vdis/{served.snap}/raw.img",
            )
        assert time.monotonic() - started < 30
        assert (tmp_path / "fast.img").stat().st_size == 9 * MiB + 512
    finally:
        slow.close()
