"""The fake pool's HTTPS front (XML-RPC, export_raw_vdi, import_raw_vdi) and its nbdkit.

One port serves what a XAPI host serves on 443 (ocaml/xapi/xapi.ml registers
the handlers): XML-RPC on ``POST /``, ``GET /export_raw_vdi``
(ocaml/xapi/export_raw_vdi.ml) and ``PUT /import_raw_vdi``
(ocaml/xapi/import_raw_vdi.ml, which hands the body to vhd-tool: ocaml/vhd-tool).
The NBD side is a real nbdkit with the Python plugin nbd_plugin.py, standing in
for xapi-nbd (ocaml/nbd/src/main.ml): TLS required, read-only, no structured
replies, 512-byte minimum block size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
import xmlrpc.client
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import trustme

from .xapi import Pool, Record

PLUGIN = Path(__file__).with_name("nbd_plugin.py")
NETWORK_ERRORS = (ConnectionError, ssl.SSLError, TimeoutError)


class ImportFailed(Exception):
    pass


class Body:
    """A PUT body read the way vhd-tool reads a socket: forward only, exactly
    Content-Length bytes."""

    def __init__(self, f: io.BufferedIOBase, length: int) -> None:
        self.f, self.left, self.pos = f, length, 0

    def read(self, n: int) -> bytes:
        if n > self.left:
            raise ImportFailed(f"the body ends at {self.pos + self.left}, wanted {n} more")
        data = self.f.read(n)
        if len(data) < n:
            raise ImportFailed("the connection closed before Content-Length bytes")
        self.left -= n
        self.pos += n
        return data

    def skip_to(self, offset: int) -> None:
        if offset < self.pos:
            raise ImportFailed(f"VHD structure at {offset} is behind the stream ({self.pos})")
        while self.pos < offset:
            self.read(min(1 << 20, offset - self.pos))

    def drain(self) -> None:
        self.skip_to(self.pos + self.left)


def write_raw(body: Body, fd: int, disk_size: int) -> None:
    if body.left > disk_size:
        raise ImportFailed(f"{body.left} bytes do not fit a {disk_size}-byte disk")
    while body.left:
        offset = body.pos
        os.pwrite(fd, body.read(min(4 << 20, body.left)), offset)


def sector_runs(bitmap: bytes, sectors: int) -> Iterator[tuple[int, int]]:
    """[start, stop) runs of sectors whose bit is set, MSB first in each byte."""
    start = None
    for i in range(sectors + 1):
        bit = i < sectors and bitmap[i >> 3] & (0x80 >> (i & 7))
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            yield start, i
            start = None


def write_vhd(body: Body, fd: int, disk_size: int) -> None:
    """Apply a dynamic/differencing VHD stream to a raw disk as vhd-tool serve
    does (ocaml/vhd-tool/src/impl.ml serve_vhd_to_raw, over ocaml-vhd's stream
    parser): footer copy, header, BAT, then each allocated block in file order;
    only sectors set in its bitmap are written. Disk type and parent locators
    are ignored (the stream is a delta to apply)."""
    footer = body.read(512)
    if footer[:8] != b"conectix":
        raise ImportFailed("Unsupported footer cookie")
    body.skip_to(struct.unpack_from(">Q", footer, 16)[0])
    header = body.read(1024)
    if header[:8] != b"cxsparse":
        raise ImportFailed("Unsupported header cookie")
    table_offset, entries, block_size = struct.unpack_from(">Q4xII", header, 16)
    body.skip_to(table_offset)
    bat = struct.unpack(f">{entries}I", body.read(4 * entries))
    sectors = block_size // 512
    bitmap_size = -(-sectors // 8 // 512) * 512
    for sector, block in sorted((s, b) for b, s in enumerate(bat) if s != 0xFFFFFFFF):
        body.skip_to(sector * 512)
        bitmap, data = body.read(bitmap_size), body.read(block_size)
        for start, stop in sector_runs(bitmap, sectors):
            offset = block * block_size + start * 512
            if offset + (stop - start) * 512 > disk_size:
                raise ImportFailed(f"block {block} writes past the end of the disk")
            os.pwrite(fd, data[start * 512 : stop * 512], offset)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, code: int, text: str, ctype: str = "text/plain", close: bool = True) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def query(self) -> tuple[str, dict[str, str], str | None]:
        url = urlsplit(self.path)
        q = dict(parse_qsl(url.query))
        cookie = self.headers.get("Cookie", "")
        cookies = dict(c.strip().partition("=")[::2] for c in cookie.split(";"))
        return url.path, q, q.get("session_id") or cookies.get("session_id")

    def do_POST(self) -> None:
        """XML-RPC; fake.* control calls answer plain XML-RPC (values, faults)."""
        if urlsplit(self.path).path not in ("/", "/RPC2"):
            return self.reply(404, "Not found")
        try:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            params, method = xmlrpc.client.loads(body)
        except Exception as e:
            return self.reply(400, f"bad XML-RPC request: {e}")
        pool = self.server.pool
        if method and method.startswith("fake."):
            try:
                out = xmlrpc.client.dumps((pool.control(method, params),), methodresponse=True)
            except Exception as e:
                out = xmlrpc.client.dumps(xmlrpc.client.Fault(1, f"{type(e).__name__}: {e}"))
        else:
            out = xmlrpc.client.dumps((pool.call(str(method), params),), methodresponse=True)
        self.reply(200, out, "text/xml", close=False)

    def do_GET(self) -> None:
        path, q, session = self.query()
        pool = self.server.pool
        if path != "/export_raw_vdi":
            return self.reply(404, "Not found")
        if not pool.http_session_ok(session, "http:export_raw_vdi"):
            return self.reply(401, "Unauthorized")
        with pool.lock:
            ref = pool.find_vdi(q.get("vdi", ""))
            rec = pool.view("VDI", ref) if ref else {}
            raw_sr = ref is not None and pool.is_raw_sr(rec["SR"])
        fmt = q.get("format", "raw")
        if ref is None:
            return self.reply(404, "VDI not found")
        if "base" in q:
            return self.reply(400, "base= not supported by the fake")
        if fmt not in ("raw", "vhd"):
            return self.reply(404, f"Unknown format {fmt}")
        if rec["type"] == "cbt_metadata":
            return self.reply(500, "VDI_INCOMPATIBLE_TYPE: cbt_metadata")
        if fmt == "vhd" and raw_sr:
            return self.reply(500, "VDI_INCOMPATIBLE_TYPE: the SR does not support VHD export")
        disk = pool.disk(rec["uuid"])
        if fmt == "raw":
            return self.send_file(disk, with_length=True)
        tmp = pool.state / "tmp" / f"{uuid.uuid4()}.vhd"
        try:  # vhd-tool streams a dynamic VHD with only the non-zero blocks allocated
            opts = "subformat=dynamic,force_size=on"
            cmd = ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", opts, str(disk), str(tmp)]
            subprocess.run(cmd, check=True, capture_output=True)
            self.send_file(tmp, with_length=False)
        finally:
            tmp.unlink(missing_ok=True)

    def send_file(self, path: Path, with_length: bool) -> None:
        """XAPI answers 200 with keep_alive false and streams (Connection: close)."""
        with open(path, "rb") as f:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if with_length:
                self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.send_header("Connection", "close")
            self.close_connection = True
            self.end_headers()
            try:
                while chunk := f.read(1 << 20):
                    self.wfile.write(chunk)
            except NETWORK_ERRORS:
                pass  # the client read what it wanted and hung up

    def do_PUT(self) -> None:
        path, q, session = self.query()
        pool = self.server.pool
        if path != "/import_raw_vdi":
            return self.reply(404, "Not found")
        if not pool.http_session_ok(session, "http:import_raw_vdi"):
            return self.reply(401, "Unauthorized")
        with pool.lock:
            ref = pool.find_vdi(q.get("vdi", ""))
            if ref is None:
                return self.reply(404, "VDI not found")
            task = q.get("task_id") or pool.task_create("", "VDI.import", "")
            if task not in pool.db["task"]:
                return self.reply(400, f"HANDLE_INVALID task {task}")
            rec, in_use = pool.view("VDI", ref), pool.in_use(ref)
        fmt, length = q.get("format", "raw"), self.headers.get("Content-Length")
        entry: Record = {"headers": dict(self.headers.items()), "format": fmt, "task": task}
        entry |= {"vdi": rec["uuid"], "size": length or "", "outcome": "pending"}
        pool.imports.append(entry)

        def fail(error: list[str], why: str, code: int = 0) -> None:
            entry["outcome"] = f"failure: {why}"
            pool.task_done(task, error)
            self.close_connection = True
            if code:
                self.reply(code, why)

        te = self.headers.get("Transfer-Encoding")
        if fmt not in ("raw", "vhd"):
            return fail(["INTERNAL_ERROR", f"Unknown format {fmt}"], "unknown format", 404)
        if te:
            why = f"Cannot handle encoding: {te}"
            return fail(["INTERNAL_ERROR", why], why, 404)
        if length is None:
            return fail(["INTERNAL_ERROR", "No Content-Length"], "no Content-Length", 411)
        # XAPI answers before it reads anything; the outcome is in the task.
        self.send_response(200)
        self.send_header("Connection", "close")
        self.send_header("task-id", task)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.close_connection = True
        if rec["type"] == "cbt_metadata":
            return fail(["VDI_INCOMPATIBLE_TYPE", ref, "cbt_metadata"], "cbt_metadata")
        if in_use:
            return fail(["VDI_IN_USE", ref, "import"], "VDI in use by a running VM")
        body = Body(self.rfile, int(length))
        try:
            fd = os.open(pool.disk(rec["uuid"]), os.O_WRONLY)
            try:
                size = os.fstat(fd).st_size
                (write_raw if fmt == "raw" else write_vhd)(body, fd, size)
            finally:
                os.close(fd)
            body.drain()
        except (ImportFailed, OSError) as e:  # vhd_tool_wrapper.ml: any failure -> VDI_IO_ERROR
            return fail(["VDI_IO_ERROR", "Device I/O errors"], str(e))
        entry["outcome"] = "success"
        pool.task_done(task, result=f"<value>{ref}</value>")


class Server(ThreadingHTTPServer):
    """Threaded, so that event.from can block; TLS handshakes happen in the threads."""

    daemon_threads = True

    def __init__(self, pool: Pool, ctx: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.pool, self.ctx = pool, ctx

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers, then body
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        try:
            Handler(tls, client_address, self)
        except NETWORK_ERRORS:
            pass
        finally:
            try:  # send close_notify: streamed bodies end at the connection's end
                tls.settimeout(2)
                tls.unwrap()
            except (OSError, ValueError):
                pass
            tls.close()


class Nbdkit:
    """nbdkit on a fixed port; (re)started from the main thread only, because
    --exit-with-parent follows the thread that forked (nbdkit-captive(1))."""

    def __init__(self, state: Path, tls: Path) -> None:
        self.state, self.tls = state, tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.delay_ms = 0
        self.port = free_port()
        self.requests: queue.Queue[tuple[str, int, list[BaseException], threading.Event]]
        self.requests = queue.Queue()

    def start(self, delay_ms: int) -> None:
        if self.proc and self.proc.poll() is None and delay_ms == self.delay_ms:
            return
        self.stop()
        self.delay_ms = delay_ms
        pidfile = self.state / "nbdkit.pid"
        pidfile.unlink(missing_ok=True)
        delay = ["--filter=delay"] if delay_ms else []
        cmd = [
            "nbdkit", "--foreground", "--exit-with-parent", "--port", str(self.port),
            "--ipaddr", "127.0.0.1", "--tls=require", f"--tls-certificates={self.tls}",
            "--no-sr", "--pidfile", str(pidfile), "--filter=blocksize-policy", *delay,
            "python", str(PLUGIN), f"state={self.state}", "blocksize-minimum=512",
            "blocksize-error-policy=error", *([f"delay-read={delay_ms}ms"] if delay_ms else []),
        ]  # fmt: skip
        with open(self.state / "nbdkit.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while not pidfile.exists():  # written once nbdkit accepts connections
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nbdkit did not start, see {self.state / 'nbdkit.log'}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def control(self, action: str, delay_ms: int) -> None:
        """Called from request threads: run in the main thread and wait."""
        errors: list[BaseException] = []
        done = threading.Event()
        self.requests.put((action, delay_ms, errors, done))
        done.wait(30)
        if errors:
            raise errors[0]

    def serve(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                action, delay_ms, errors, done = self.requests.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.stop() if action == "stop" else self.start(delay_ms)
            except Exception as e:
                errors.append(e)
            done.set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.pool.fakepool", description=__doc__)
    ap.add_argument("--state", type=Path, required=True, help="directory for disks and TLS")
    ap.add_argument("--nbd-delay-ms", type=int, default=0, help="delay every NBD read")
    args = ap.parse_args(argv)
    state: Path = args.state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    (state / "ready.json").unlink(missing_ok=True)
    pool = Pool(state)

    https_ca = trustme.CA()
    https_ca.cert_pem.write_to_path(str(state / "https-ca.pem"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    https_ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    tls = state / "nbd-tls"  # nbdkit-tls(1) layout; a CA of its own, like a host's cert
    tls.mkdir(exist_ok=True)
    nbd_ca = trustme.CA()
    leaf = nbd_ca.issue_cert("localhost", "127.0.0.1")
    nbd_ca.cert_pem.write_to_path(str(tls / "ca-cert.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tls / "server-cert.pem"))
    leaf.private_key_pem.write_to_path(str(tls / "server-key.pem"))
    pool.nbd_cert = leaf.cert_chain_pems[0].bytes().decode()
    pool.other_cert = nbd_ca.issue_cert("localhost").cert_chain_pems[0].bytes().decode()

    nbd = Nbdkit(state, tls)
    nbd.start(args.nbd_delay_ms)
    pool.nbd_port, pool.nbd_control = nbd.port, nbd.control
    server = Server(pool, ctx)
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    write_atomically(state / "password", pool.password, 0o600)
    ready = {
        "url": f"https://127.0.0.1:{server.server_address[1]}", "ca": str(state / "https-ca.pem"),
        "user": "root", "password": pool.password, "nbd_port": nbd.port, "pid": os.getpid(),
    }  # fmt: skip
    write_atomically(state / "ready.json", json.dumps(ready))
    print(f"fake pool ready: {ready['url']}, NBD on {nbd.port}", file=sys.stderr, flush=True)
    try:
        nbd.serve(stop)
    finally:
        server.shutdown()
        nbd.stop()
