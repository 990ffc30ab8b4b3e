"""vdifs.storage.xapi.nbd against a real nbdkit set up like xapi-nbd.

nbdkit serves a sparse 64 MiB file with TLS required (certificates from trustme),
one strict export name ``/<uuid>?session_id=OpaqueRef:...`` as VDI.get_nbd_info
hands out, no structured replies and EINVAL for reads not aligned to 512 bytes,
as xapi-nbd does; the delay filter adds latency.  A small in-test server covers
what nbdkit cannot mimic: no NBD_FLAG_NO_ZEROES (xapi-nbd does not offer it) and
error replies.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_tool
from vdifs.storage.xapi.nbd import (
    IHAVEOPT,
    NBD_CMD_DISC,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_OPT_EXPORT_NAME,
    NBD_SIMPLE_REPLY_MAGIC,
    NBDMAGIC,
    REQUEST,
    SIMPLE_REPLY,
    NbdConnection,
    NbdError,
    NbdReader,
    NbdTarget,
)

trustme = pytest.importorskip("trustme")
pytestmark = needs_tool("nbdkit")  # installed by ./dev setup

MiB = 1 << 20
SIZE = 64 * MiB
UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
SESSION = "OpaqueRef:5ec2e7-not-to-be-logged"
EXPORT = f"/{UUID}?session_id={SESSION}"
# Random data at a few places of a sparse file, some unaligned or across segments.
EXTENTS = [(0, MiB), (5 * MiB + 1000, 3 * MiB), (31 * MiB - 100_000, 2 * MiB), (63 * MiB, MiB)]


@dataclass
class Pki:
    dir: Path
    ca_pem: str
    leaf_pem: str  # issued for "localhost"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    d = tmp_path_factory.mktemp("certs")
    ca.cert_pem.write_to_path(str(d / "ca-cert.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(d / "server-cert.pem"))
    leaf.private_key_pem.write_to_path(str(d / "server-key.pem"))
    return Pki(d, ca.cert_pem.bytes().decode(), leaf.cert_chain_pems[0].bytes().decode())


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("disk") / "disk.raw"
    rng = random.Random(42)
    with path.open("wb") as f:
        f.truncate(SIZE)
        for offset, length in EXTENTS:
            f.seek(offset)
            f.write(rng.randbytes(length))
    return path


@pytest.fixture(scope="module")
def content(disk: Path) -> bytes:
    return disk.read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nbdkit:
    """nbdkit on 127.0.0.1 set up like xapi-nbd; stop() kills it, start() again reuses the port."""

    def __init__(self, tmp: Path, disk: Path, pki: Pki, *, delay_ms: int = 0) -> None:
        self.tmp, self.port, self.pki = tmp, free_port(), pki
        delay = ["--filter=delay"] if delay_ms else []
        self.argv = [
            "nbdkit", "--foreground", "--exit-with-parent", "--port", str(self.port),
            "--ipaddr", "127.0.0.1", "--pidfile", str(tmp / "nbdkit.pid"),
            "--tls=require", f"--tls-certificates={pki.dir}", "--no-sr",
            "--filter=exportname", "--filter=blocksize-policy", *delay,
            "file", f"file={disk}", "exportname-strict=true", f"exportname={EXPORT}",
            "blocksize-minimum=512", "blocksize-error-policy=error",
            *([f"delay-read={delay_ms}ms"] if delay_ms else []),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        pidfile = self.tmp / "nbdkit.pid"
        pidfile.unlink(missing_ok=True)
        with (self.tmp / "nbdkit.log").open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit did not start: {(self.tmp / 'nbdkit.log').read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def target(self, **changes: Any) -> NbdTarget:
        """What VDI.get_nbd_info would give; ``changes`` replace fields."""
        target = NbdTarget("127.0.0.1", self.port, EXPORT, self.pki.leaf_pem, "localhost")
        return dataclasses.replace(target, **changes)


def _server(tmp: Path, disk: Path, pki: Pki, delay_ms: int = 0) -> Iterator[Nbdkit]:
    server = Nbdkit(tmp, disk, pki, delay_ms=delay_ms)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, disk: Path, pki: Pki) -> Iterator[Nbdkit]:
    yield from _server(tmp_path_factory.mktemp("nbdkit"), disk, pki)


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory, disk: Path, pki: Pki) -> Iterator[Nbdkit]:
    """20 ms of latency for every read."""
    yield from _server(tmp_path_factory.mktemp("nbdkit-slow"), disk, pki, delay_ms=20)


def read(reader: NbdReader | NbdConnection, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    reader.read_into(offset, memoryview(buf))
    return bytes(buf)


# -- 1. handshake over TLS, reads --------------------------------------------------------


@pytest.mark.parametrize("pin", ["leaf", "ca"])
def test_tls_aligned_reads(server: Nbdkit, pki: Pki, content: bytes, pin: str) -> None:
    cert = pki.leaf_pem if pin == "leaf" else pki.ca_pem
    rng = random.Random(1)
    with NbdConnection(server.target(cert_pem=cert)) as conn:
        assert conn.size == SIZE
        for offset, length in [(0, 4096), (5 * MiB, 5 * MiB + 512), (SIZE - 512, 512)]:
            assert read(conn, offset, length) == content[offset : offset + length]
        for _ in range(40):
            length = rng.randrange(1, 6 * MiB // 512) * 512  # some split in 2 MiB requests
            offset = rng.randrange(0, (SIZE - length) // 512 + 1) * 512
            assert read(conn, offset, length) == content[offset : offset + length]
        with pytest.raises(ValueError, match="aligned"):
            read(conn, 100, 512)
        with pytest.raises(ValueError, match="past"):
            read(conn, SIZE, 512)


def test_reader_unaligned_reads(server: Nbdkit, content: bytes) -> None:
    rng = random.Random(2)
    with NbdReader(server.target, SIZE, connections=2) as reader:
        for _ in range(200):
            length = rng.randrange(1, 3 * MiB)
            offset = rng.randrange(0, SIZE - length + 1)
            assert read(reader, offset, length) == content[offset : offset + length]
        assert read(reader, SIZE - 1, 1) == content[-1:]
        with pytest.raises(ValueError):
            read(reader, SIZE - 10, 11)
    # A size that is not a multiple of 512: the last partial sector reads as zeros.
    with NbdReader(server.target, SIZE - 100) as reader:
        tail = read(reader, SIZE - 1000, 900)
        assert tail == content[SIZE - 1000 : SIZE - 512] + bytes(412)


# -- 2. refusals ------------------------------------------------------------------------


def test_wrong_export_refused(server: Nbdkit) -> None:
    other = f"/{UUID[::-1]}?session_id={SESSION}"
    with pytest.raises(NbdError, match="refused the export") as err:
        NbdConnection(server.target(exportname=other))
    assert err.value.errno == errno.EIO
    assert f"127.0.0.1:{server.port}/{UUID[::-1]}" in str(err.value)
    assert SESSION not in str(err.value) and "OpaqueRef" not in repr(server.target())


def test_certificate_of_another_ca_refused(server: Nbdkit) -> None:
    other = trustme.CA().issue_cert("localhost").cert_chain_pems[0].bytes().decode()
    with pytest.raises(NbdError, match=r"certificate .* did not verify") as err:
        NbdConnection(server.target(cert_pem=other))
    assert err.value.errno == errno.EACCES


def test_subject_mismatch_refused(server: Nbdkit) -> None:
    with pytest.raises(NbdError, match=r"certificate .* did not verify") as err:
        NbdConnection(server.target(subject="xcp-host.example.org"))
    assert err.value.errno == errno.EACCES and "xcp-host.example.org" in str(err.value)


def test_plain_tcp_to_tls_server_refused(server: Nbdkit) -> None:
    with pytest.raises(NbdError, match=r"refused the export.*TLS required") as err:
        NbdConnection(server.target(cert_pem=None, subject=None))
    assert err.value.errno == errno.EIO


def test_nothing_listening(server: Nbdkit) -> None:
    target = NbdTarget("127.0.0.1", free_port(), EXPORT, None, None)
    with pytest.raises(NbdError, match="cannot connect") as err:
        NbdConnection(target)
    assert err.value.errno == errno.ECONNREFUSED


def test_silent_server_times_out() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # never accepts, never speaks
        target = NbdTarget("127.0.0.1", listener.getsockname()[1], EXPORT, None, None)
        start = time.monotonic()
        with pytest.raises(NbdError, match="timed out") as err:
            NbdConnection(target, timeout=0.5)
        assert err.value.errno == errno.EIO and time.monotonic() - start < 5


# -- xapi-nbd's ways that nbdkit lacks: no NBD_FLAG_NO_ZEROES, error replies --------------


def _recvn(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk
        data += chunk
    return data


def test_without_no_zeroes_and_error_replies() -> None:
    data = random.Random(3).randbytes(8 * MiB)
    seen: list[object] = []

    def serve(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE))
            seen.append(struct.unpack(">I", _recvn(conn, 4))[0])
            _, option, length = struct.unpack(">QII", _recvn(conn, 16))
            seen.append((option, _recvn(conn, length).decode()))
            conn.sendall(struct.pack(">QH", len(data), 1) + bytes(124))
            while True:
                _, _, kind, handle, offset, length = REQUEST.unpack(_recvn(conn, REQUEST.size))
                if kind == NBD_CMD_DISC:
                    seen.append("disc")
                    return
                if offset == 7 * MiB:  # as xapi-nbd answers a read it cannot do
                    conn.sendall(SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, errno.EINVAL, handle))
                else:
                    reply = SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, handle)
                    conn.sendall(reply + data[offset : offset + length])

    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=serve, args=(listener,))
        thread.start()
        target = NbdTarget("127.0.0.1", listener.getsockname()[1], EXPORT, None, None)
        with NbdConnection(target, timeout=5) as conn:
            assert conn.size == len(data)
            assert read(conn, 512, 5 * MiB) == data[512 : 512 + 5 * MiB]  # 3 requests
            with pytest.raises(NbdError) as err:
                read(conn, 5 * MiB, 2 * MiB + 4096)  # the second request fails
            assert err.value.errno == errno.EINVAL and SESSION not in str(err.value)
            assert read(conn, 0, 4096) == data[:4096]  # an error reply leaves it usable
        thread.join(5)
    assert seen == [NBD_FLAG_C_FIXED_NEWSTYLE, (NBD_OPT_EXPORT_NAME, EXPORT), "disc"]


# -- 3. several connections, several threads --------------------------------------------


def test_reader_concurrent_and_sequential(server: Nbdkit, content: bytes) -> None:
    calls = 0

    def connect() -> NbdTarget:
        nonlocal calls
        calls += 1
        return server.target()

    errors: list[BaseException] = []
    digest = hashlib.sha256()

    def random_reads(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(60):
                length = rng.randrange(1, 512 * 1024)
                offset = rng.randrange(0, SIZE - length + 1)
                assert read(reader, offset, length) == content[offset : offset + length]
        except BaseException as e:
            errors.append(e)

    def sequential() -> None:
        try:
            for offset in range(0, SIZE, 128 * 1024):
                digest.update(read(reader, offset, 128 * 1024))
        except BaseException as e:
            errors.append(e)

    with NbdReader(connect, SIZE, connections=4) as reader:
        threads = [threading.Thread(target=random_reads, args=(i,)) for i in range(6)]
        threads.append(threading.Thread(target=sequential))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert digest.hexdigest() == hashlib.sha256(content).hexdigest()
        stats = dict(reader.stats)
    assert stats["readahead_hits"] > 0 and stats["readahead"] > 0
    assert calls == stats["connects"] <= 4
    assert stats["reconnects"] == 0 and stats["errors"] == 0


def test_one_fetch_for_concurrent_requests(slow_server: Nbdkit, content: bytes) -> None:
    barrier = threading.Barrier(8)
    results: list[bytes] = []

    def one(i: int) -> None:
        barrier.wait()
        results.append(read(reader, 6 * MiB + i * 4096, 4096))

    with NbdReader(slow_server.target, SIZE, connections=4, readahead=0) as reader:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == sorted(
            content[6 * MiB + i * 4096 : 6 * MiB + (i + 1) * 4096] for i in range(8)
        )
        assert reader.stats["fetches"] == 1 and reader.stats["cache_hits"] == 7


def test_readahead_only_where_wanted(server: Nbdkit, content: bytes) -> None:
    asked: list[tuple[int, int]] = []

    def wanted(offset: int, length: int) -> bool:
        asked.append((offset, length))
        return offset < 4 * MiB

    with NbdReader(server.target, SIZE, segment=MiB, wanted=wanted) as reader:
        for offset in range(0, 8 * MiB, 256 * 1024):
            assert read(reader, offset, 256 * 1024) == content[offset : offset + 256 * 1024]
        time.sleep(0.2)
        assert asked and all(length == MiB for _, length in asked)
        assert 0 < reader.stats["readahead"] <= 3  # segments 1 to 3 only
        assert reader.stats["fetches"] == 8


# -- 4. the server dies mid-read, then comes back ---------------------------------------


def test_killed_mid_read_then_recovers(
    tmp_path: Path, disk: Path, pki: Pki, content: bytes
) -> None:
    server = Nbdkit(tmp_path, disk, pki, delay_ms=1000)
    server.start()
    calls = 0

    def connect() -> NbdTarget:
        nonlocal calls
        calls += 1
        return server.target()

    try:
        with NbdReader(connect, SIZE, connections=2, readahead=0, timeout=5) as reader:
            outcome: list[BaseException | None] = []

            def reading() -> None:
                try:
                    read(reader, 10 * MiB, 4096)
                    outcome.append(None)
                except BaseException as e:
                    outcome.append(e)

            thread = threading.Thread(target=reading)
            start = time.monotonic()
            thread.start()
            time.sleep(0.5)
            server.stop()
            thread.join(10)
            assert not thread.is_alive() and time.monotonic() - start < 5
            [error] = outcome
            assert isinstance(error, NbdError) and error.errno == errno.EIO, error
            assert SESSION not in str(error)
            assert reader.stats["reconnects"] == 1

            server.start()  # same port
            before = calls
            assert read(reader, 63 * MiB + 5, 10_000) == content[63 * MiB + 5 : 63 * MiB + 10_005]
            assert calls == before + 1
    finally:
        server.stop()


# -- 5. latency: connections in parallel ------------------------------------------------


def _throughput(make: Callable[[], NbdReader], length: int) -> float:
    with make() as reader:
        read(reader, 0, MiB)  # the first read: one connection, no read-ahead yet
        start = time.monotonic()
        for offset in range(MiB, length, MiB):
            read(reader, offset, MiB)
        return (length - MiB) / (time.monotonic() - start) / 1e6


def test_connections_beat_latency(slow_server: Nbdkit, capsys: pytest.CaptureFixture[str]) -> None:
    """The one timing assertion: it checks that parallelism exists at all (ideal: 4x).

    Segments of 512 KiB keep latency, not TLS on a loaded CPU, the bottleneck."""

    def reader(connections: int, readahead: int) -> Callable[[], NbdReader]:
        return lambda: NbdReader(
            slow_server.target, SIZE, connections=connections, readahead=readahead, segment=MiB // 2
        )

    one = _throughput(reader(1, 0), SIZE)
    four = _throughput(reader(4, 8), SIZE)
    with capsys.disabled():
        print(f"\nNBD at 20 ms: 1 connection {one:.0f} MB/s, 4 connections {four:.0f} MB/s")
    assert four >= 2.5 * one
