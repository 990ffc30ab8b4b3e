"""A small blocking NBD client for xapi-nbd, and a reader over several connections.

XCP-ng and XenServer serve VDIs over NBD with xapi-nbd (xapi-project/xen-api,
ocaml/xapi-nbd; protocol code in xapi-project/nbd, lib/protocol.mli and
lib/server.ml): the fixed newstyle handshake with only NBD_OPT_EXPORT_NAME,
NBD_OPT_ABORT, NBD_OPT_LIST and NBD_OPT_STARTTLS (no NBD_OPT_GO), simple replies
only, EINVAL for reads not aligned to 512 bytes, at most 16 connections per host,
and TLS required on networks with purpose "nbd".  ``VDI.get_nbd_info`` gives the
address, port, export name ``/<vdi-uuid>?session_id=<OpaqueRef>``, the host's
certificate (PEM, often self-signed) and the subject to check in it.  The
protocol is https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md.

Why a client of our own rather than libnbd: Debian 12's python3-libnbd (1.14)
has no ``set_tls_hostname`` and takes certificates only as a directory, so it can
neither pin the certificate nor check the subject that get_nbd_info gives; and it
is a system package, outside the virtualenv.  What we need is small: the
handshake, NBD_CMD_READ and NBD_CMD_DISC.

One connection is bound by latency (Xen Orchestra measured 260 MB/s falling to
11 MB/s at 50 ms), so :class:`NbdReader` fetches aligned segments over several
connections, reads ahead when reads are sequential, and keeps a small LRU cache.

Errors are :class:`NbdError`.  Its errno: EIO for transport and protocol errors
(connection closed or reset, timeout, malformed reply, export refused); the
server's errno for an error reply; the connect() errno (ECONNREFUSED, ...) when
the TCP connection cannot be made; EACCES when the server's certificate does not
verify against the pinned one or its subject (retrying will not help).  Messages
name ``address:port/<vdi-uuid>``, never the session id.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Handshake (proto.md, "Fixed newstyle negotiation").
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
NBD_REP_MAGIC = 0x0003E889045565A9
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_STARTTLS = 5
NBD_REP_ACK = 1
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERRORS = {1: "UNSUP", 2: "POLICY", 3: "INVALID", 4: "PLATFORM", 5: "TLS_REQD",
                  6: "UNKNOWN", 7: "SHUTDOWN", 8: "BLOCK_SIZE_REQD", 9: "TOO_BIG"}  # fmt: skip
# Transmission (proto.md, "Transmission phase").
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_CMD_READ = 0
NBD_CMD_DISC = 2

HELLO = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length of the data that follows
OPTION_REPLY = struct.Struct(">QIII")  # NBD_REP_MAGIC, option, reply type, length
EXPORT_INFO = struct.Struct(">QH")  # size, transmission flags (+ 124 zeroes without NO_ZEROES)
REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle

SECTOR = 512  # xapi-nbd answers EINVAL to anything else
MAX_REQUEST = 2 << 20  # bytes per NBD_CMD_READ; bigger reads are split and pipelined
MAX_PIPELINE = 16  # requests in flight on one connection
MAX_CONNECTIONS = 16  # xapi-nbd's limit per host


class NbdError(OSError):
    """An NBD failure; ``errno`` as described in the module docstring."""


class _ConnectionLost(NbdError):
    """The connection broke (it is discarded): worth one retry on a new one."""


def _redact(text: str) -> str:
    return re.sub(r"session_id=[^&\s'\"]*", "session_id=...", text)


@dataclass(frozen=True)
class NbdTarget:
    """Where and how to reach one export: one record of ``VDI.get_nbd_info``.

    ``cert_pem`` and ``subject`` both None mean plain TCP (a network with purpose
    "insecure_nbd"); otherwise TLS is required, trusting exactly ``cert_pem``.
    """

    address: str
    port: int
    exportname: str = field(repr=False)  # carries a session id: never in messages or logs
    cert_pem: str | None = field(repr=False)
    subject: str | None

    @property
    def tls(self) -> bool:
        return self.cert_pem is not None or self.subject is not None

    @property
    def where(self) -> str:
        """``address:port/<vdi-uuid>``, for messages."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        path = _redact(self.exportname.split("?", 1)[0])
        return f"{host}:{self.port}{'' if path.startswith('/') else '/'}{path}"

    def tls_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_pem is None:
            ctx.load_default_certs()
            return ctx
        try:
            ctx.load_verify_locations(cadata=self.cert_pem)
        except (ssl.SSLError, ValueError) as e:
            raise NbdError(
                errno.EINVAL, f"the certificate given for {self.where} is not PEM"
            ) from e
        # The pinned certificate is the trust anchor even when it is a leaf (self-signed
        # or not), as xapi hands out the host's own certificate.
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return ctx


class NbdConnection:
    """One connection to one export, blocking; the handshake happens in the constructor.

    Thread-safe (a lock serialises requests), but meant to be used by one thread at a
    time.  Any transport or protocol error closes it (``broken`` becomes True).
    """

    def __init__(self, target: NbdTarget, *, timeout: float = 30.0) -> None:
        self.target = target
        self.where = target.where
        self.timeout = timeout
        self.broken = False
        self.size = 0
        self.flags = 0
        self._lock = threading.Lock()
        self._handle = 0
        self._closed = False
        try:
            sock = socket.create_connection((target.address, target.port), timeout=timeout)
        except OSError as e:
            code = e.errno or (errno.ETIMEDOUT if isinstance(e, TimeoutError) else errno.EIO)
            why = e.strerror or str(e) or "timed out"
            raise NbdError(code, f"cannot connect to {self.where}: {why}") from e
        self._sock: socket.socket = sock
        with self._guard("handshake with"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._handshake()
        log.debug("NBD connection to %s: %d bytes, flags %#x", self.where, self.size, self.flags)

    def __enter__(self) -> NbdConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turns any failure inside into NbdError, closing the connection."""
        try:
            yield
        except BaseException as e:
            self.broken = True
            self._sock.close()
            if isinstance(e, NbdError):
                raise
            if isinstance(e, ssl.SSLCertVerificationError):
                raise NbdError(
                    errno.EACCES,
                    f"TLS certificate of {self.where} did not verify against the pinned"
                    f" certificate and subject {self.target.subject!r}: {e.verify_message}",
                ) from e
            if isinstance(e, EOFError):
                raise NbdError(errno.EIO, f"{what} {self.where}: {e}") from e
            if isinstance(e, TimeoutError):
                why = f"timed out ({self.timeout:g} s)"
                raise NbdError(errno.EIO, f"{what} {self.where}: {why}") from e
            if isinstance(e, OSError):
                raise NbdError(errno.EIO, f"{what} {self.where}: {e.strerror or e}") from e
            raise

    def _recv_into(self, view: memoryview) -> None:
        while view:
            n = self._sock.recv_into(view)
            if n == 0:
                raise EOFError("the server closed the connection")
            view = view[n:]

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _option(self, option: int, data: bytes) -> None:
        self._sock.sendall(OPTION.pack(IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option: int, head: bytes = b"") -> tuple[int, bytes]:
        head += self._recv(OPTION_REPLY.size - len(head))
        magic, opt, reply, length = OPTION_REPLY.unpack(head)
        if magic != NBD_REP_MAGIC or opt != option or length > 1 << 16:
            raise NbdError(errno.EIO, f"{self.where}: malformed option reply")
        return reply, self._recv(length)

    def _refused(self, what: str, reply: int, data: bytes) -> NbdError:
        name = NBD_REP_ERRORS.get(reply & ~NBD_REP_FLAG_ERROR, str(reply))
        reason = f": {_redact(data.decode(errors='replace'))}" if data else ""
        return NbdError(errno.EIO, f"{self.where} refused {what}: NBD_REP_ERR_{name}{reason}")

    def _handshake(self) -> None:
        magic, opt_magic, hflags = HELLO.unpack(self._recv(HELLO.size))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdError(errno.EIO, f"{self.where} is not a newstyle NBD server")
        if not hflags & NBD_FLAG_FIXED_NEWSTYLE:
            raise NbdError(errno.EIO, f"{self.where} lacks fixed newstyle negotiation")
        no_zeroes = hflags & NBD_FLAG_NO_ZEROES
        cflags = NBD_FLAG_C_FIXED_NEWSTYLE | (NBD_FLAG_C_NO_ZEROES if no_zeroes else 0)
        self._sock.sendall(CLIENT_FLAGS.pack(cflags))
        if self.target.tls:  # STARTTLS's ACK, then the rest of the haggling inside TLS
            self._option(NBD_OPT_STARTTLS, b"")
            reply, data = self._option_reply(NBD_OPT_STARTTLS)
            if reply != NBD_REP_ACK:
                raise self._refused("TLS (NBD_OPT_STARTTLS)", reply, data)
            hostname = self.target.subject or self.target.address
            self._sock = self.target.tls_context().wrap_socket(self._sock, server_hostname=hostname)
        self._option(NBD_OPT_EXPORT_NAME, self.target.exportname.encode())
        # A refused NBD_OPT_EXPORT_NAME has no error reply in the spec: the server closes the
        # connection (xapi-nbd, nbdkit); take an option reply too, should a server send one.
        try:
            head = self._recv(8)
            if int.from_bytes(head, "big") == NBD_REP_MAGIC:
                raise self._refused("the export", *self._option_reply(NBD_OPT_EXPORT_NAME, head))
        except (EOFError, ConnectionResetError):
            raise NbdError(
                errno.EIO,
                f"{self.where} refused the export (closed the connection: unknown VDI, expired"
                f" session{'' if self.target.tls else ', or TLS required'})",
            ) from None
        self.size, self.flags = EXPORT_INFO.unpack(head + self._recv(2))
        if not no_zeroes:
            self._recv(124)

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Reads ``len(buf)`` bytes at ``offset`` (both multiples of 512) into ``buf``."""
        view = memoryview(buf).cast("B")
        if offset % SECTOR or len(view) % SECTOR:
            raise ValueError(f"NBD read of {len(view)} bytes at {offset}: not 512-aligned")
        if offset < 0 or offset + len(view) > self.size:
            raise ValueError(f"NBD read of {len(view)} bytes at {offset}: past {self.size}")
        failed: list[tuple[int, int, int]] = []  # (offset, length, errno) of error replies
        with self._lock:
            if self.broken or self._closed:
                raise NbdError(errno.EIO, f"the connection to {self.where} is closed")
            with self._guard(f"reading {len(view)} bytes at {offset} from"):
                batch = MAX_REQUEST * MAX_PIPELINE
                for pos in range(0, len(view), batch):
                    failed += self._pipeline(offset + pos, view[pos : pos + batch])
        if failed:
            at, length, error = failed[0]
            raise NbdError(
                error,
                f"{self.where}: error reading {length} bytes at {at}: {os.strerror(error)}",
            )

    def _pipeline(self, offset: int, view: memoryview) -> list[tuple[int, int, int]]:
        """Sends one NBD_CMD_READ per MAX_REQUEST bytes, then takes the replies in any order."""
        pending: dict[int, tuple[int, memoryview]] = {}
        requests = []
        for pos in range(0, len(view), MAX_REQUEST):
            handle = self._handle = self._handle + 1
            part, at = view[pos : pos + MAX_REQUEST], offset + pos
            pending[handle] = (at, part)
            requests.append(REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, handle, at, len(part)))
        self._sock.sendall(b"".join(requests))
        failed = []
        while pending:
            magic, error, handle = SIMPLE_REPLY.unpack(self._recv(SIMPLE_REPLY.size))
            if magic != NBD_SIMPLE_REPLY_MAGIC or handle not in pending:
                raise NbdError(errno.EIO, f"{self.where}: malformed reply")
            at, part = pending.pop(handle)
            if error:  # an error reply carries no data
                failed.append((at, len(part), error))
            else:
                self._recv_into(part)
        return failed

    def close(self) -> None:
        """Sends NBD_CMD_DISC (if the connection still works), then closes."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.broken:
                with contextlib.suppress(OSError):
                    self._sock.sendall(REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0))
            self._sock.close()


class _Fetch:
    """One segment being fetched; others wanting it wait on ``done``."""

    def __init__(self, readahead: bool) -> None:
        self.readahead = readahead
        self.done = threading.Event()
        self.data: bytearray | None = None
        self.error: BaseException | None = None


class NbdReader:
    """Reads one export through up to `connections` NBD connections, with a bounded cache
    of aligned segments and sequential read-ahead.

    ``connect`` is called for every new connection (the export name carries a session
    id that changes after a re-login); its exceptions propagate except on the retry
    after a broken connection (then NbdError(EIO)).  ``wanted(offset, length)`` says
    whether a range holds data: read-ahead skips segments where it is False.  Memory
    is bounded by ``segment * (cache_segments + connections + threads reading)``.
    """

    def __init__(
        self,
        connect: Callable[[], NbdTarget],
        size: int,
        *,
        connections: int = 4,
        segment: int = 2 << 20,
        cache_segments: int = 16,
        readahead: int = 8,
        timeout: float = 30.0,
        wanted: Callable[[int, int], bool] | None = None,
        max_age: float | None = None,
    ) -> None:
        if not 1 <= connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be 1 to {MAX_CONNECTIONS} (xapi-nbd's limit)")
        if segment <= 0 or segment % SECTOR or cache_segments < 1 or readahead < 0:
            raise ValueError("bad segment, cache_segments or readahead")
        self.size = size
        self._connect = connect
        self._end = size - size % SECTOR  # readable over NBD; the rest reads as zeros
        self._segment = segment
        self._segments = -(-self._end // segment)
        self._cache_segments = cache_segments
        self._readahead = min(readahead, cache_segments // 2)  # room for what is being read
        self._window = min(max(self._readahead, connections - 1), cache_segments // 2)
        self._connections = connections
        self._timeout = timeout
        self._wanted = wanted
        self._max_age = max_age  # a live disk changes under us: cached segments expire
        self._stamps: dict[int, float] = {}  # segment -> when it was fetched
        self._lock = threading.Condition()
        self._idle: list[NbdConnection] = []
        self._open: dict[NbdConnection, int] = {}  # every open connection: its generation
        self._opening = 0
        self._generation = 0  # bumped when a connection breaks: older idle ones are dropped
        self._cache: OrderedDict[int, bytearray] = OrderedDict()
        self._prefetched: set[int] = set()  # cached by read-ahead, not read yet
        self._inflight: dict[int, _Fetch] = {}
        self._queued: set[int] = set()
        self._ends: deque[int] = deque(maxlen=16)  # where recent reads ended
        self._closed = False
        self._executor = ThreadPoolExecutor(connections, "nbd-readahead")
        self.stats: dict[str, int] = dict.fromkeys(
            ("requests", "bytes", "fetches", "fetched_bytes", "cache_hits", "readahead",
             "readahead_hits", "connects", "reconnects", "errors"), 0,
        )  # fmt: skip

    def __enter__(self) -> NbdReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections ----------------------------------------------------------------------

    def _acquire(self) -> NbdConnection:
        stale: list[NbdConnection] = []
        try:
            with self._lock:
                while True:
                    if self._closed:
                        raise NbdError(errno.EIO, "the NBD reader is closed")
                    while self._idle:
                        conn = self._idle.pop()
                        if self._open[conn] == self._generation:
                            return conn
                        del self._open[conn]
                        stale.append(conn)
                    if len(self._open) + self._opening < self._connections:
                        self._opening += 1
                        generation = self._generation
                        break
                    self._lock.wait()
        finally:
            for conn in stale:
                conn.close()
        try:
            conn = NbdConnection(self._connect(), timeout=self._timeout)
            if conn.size < self._end:
                conn.close()
                raise NbdError(errno.EIO, f"{conn.where} has {conn.size} bytes, not {self.size}")
        except BaseException:
            with self._lock:
                self._opening -= 1
                self._lock.notify()
            raise
        with self._lock:
            self._opening -= 1
            self._open[conn] = generation
            self.stats["connects"] += 1
        return conn

    def _release(self, conn: NbdConnection) -> None:
        with self._lock:
            generation = self._open.get(conn)
            if not (conn.broken or self._closed) and generation == self._generation:
                self._idle.append(conn)
                self._lock.notify()
                return
            self._open.pop(conn, None)
            if conn.broken and generation == self._generation:
                self._generation += 1  # the server may have restarted: retry on new ones
            self._lock.notify()
        conn.close()

    def _read(self, offset: int, data: bytearray) -> None:
        conn = self._acquire()
        try:
            conn.read_into(offset, memoryview(data))
        except NbdError as e:
            if conn.broken:
                raise _ConnectionLost(errno.EIO, e.strerror) from e
            raise
        finally:
            self._release(conn)

    # -- segments -------------------------------------------------------------------------

    def _fetch(self, idx: int) -> bytearray:
        """Reads segment ``idx``; one retry on a new connection if the connection breaks."""
        offset = idx * self._segment
        data = bytearray(min(self._segment, self._end - offset))
        try:
            self._read(offset, data)
        except _ConnectionLost as e:
            if self._closed:
                raise
            log.info("%s; reconnecting", e.strerror)
            with self._lock:
                self.stats["reconnects"] += 1
            try:
                self._read(offset, data)
            except Exception as retry:
                why = retry.strerror if isinstance(retry, OSError) else repr(retry)
                raise NbdError(errno.EIO, f"{e.strerror}; retry failed: {why}") from retry
        return data

    def _get(self, idx: int, *, readahead: bool = False) -> bytearray | None:
        """Segment ``idx`` from the cache, a fetch in flight, or fetched now.

        Read-ahead (``readahead``) gets None when the segment is there or coming."""
        if idx * self._segment >= self._end:
            return bytearray()
        while True:
            with self._lock:
                if self._closed:
                    raise NbdError(errno.EIO, "the NBD reader is closed")
                fetch = self._inflight.get(idx)
                data = self._cache.get(idx) if fetch is None else None
                if data is not None and self._expired(idx):
                    del self._cache[idx]
                    data = None
                if readahead and (data is not None or fetch is not None):
                    return None
                if data is not None:
                    self._cache.move_to_end(idx)
                    self._hit(idx)
                    return data
                if fetch is None:
                    fetch = self._inflight[idx] = _Fetch(readahead)
                    break
            fetch.done.wait()
            if fetch.data is not None:
                with self._lock:
                    self._hit(idx)
                return fetch.data
            if not fetch.readahead:  # read-ahead errors are dropped: fetch it ourselves
                e = fetch.error
                if isinstance(e, OSError):
                    raise NbdError(e.errno or errno.EIO, e.strerror or str(e)) from e
                raise NbdError(errno.EIO, repr(e)) from e
        try:
            fetch.data = self._fetch(idx)
        except BaseException as e:
            with self._lock:
                del self._inflight[idx]
                self.stats["errors"] += not readahead
            fetch.error = e
            fetch.done.set()
            raise
        with self._lock:
            del self._inflight[idx]
            self._cache[idx] = fetch.data
            self._stamps[idx] = time.monotonic()
            if readahead:
                self._prefetched.add(idx)
            while len(self._cache) > self._cache_segments:
                evicted = self._cache.popitem(last=False)[0]
                self._prefetched.discard(evicted)
                self._stamps.pop(evicted, None)
            self.stats["fetches"] += 1
            self.stats["fetched_bytes"] += len(fetch.data)
            self.stats["readahead"] += readahead
        fetch.done.set()
        return fetch.data

    def _expired(self, idx: int) -> bool:  # under the lock
        return (
            self._max_age is not None
            and time.monotonic() - self._stamps.get(idx, 0.0) > self._max_age
        )

    def _hit(self, idx: int) -> None:  # under the lock
        self.stats["cache_hits"] += 1
        if idx in self._prefetched:
            self._prefetched.discard(idx)
            self.stats["readahead_hits"] += 1

    def _schedule(self, first: int, last: int) -> None:
        """Fetches segments first..last in the background, skipping what is not wanted."""
        for idx in range(first, min(last, self._segments - 1) + 1):
            with self._lock:
                cached = idx in self._cache and not self._expired(idx)
                busy = cached or idx in self._inflight or idx in self._queued
                if busy or self._closed:
                    continue
            offset = idx * self._segment
            length = min(self._segment, self._end - offset)
            if self._wanted is not None and not self._wanted(offset, length):
                continue
            with self._lock:
                if not self._closed and idx not in self._queued:
                    self._queued.add(idx)
                    self._executor.submit(self._background, idx)

    def _background(self, idx: int) -> None:
        with self._lock:
            self._queued.discard(idx)
        try:
            self._get(idx, readahead=True)
        except Exception as e:  # dropped: the foreground read retries and reports
            log.debug("read-ahead of segment %d failed: %s", idx, e)

    # -- the API --------------------------------------------------------------------------

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Reads ``len(buf)`` bytes at ``offset`` (any alignment, within ``size``)."""
        view, first, last, sequential = self._start(offset, buf)
        ahead = last + (self._readahead if sequential else 0)
        for idx in range(first, last + 1):
            self._schedule(idx + 1, min(ahead, idx + self._window))
            data = self._get(idx)
            assert data is not None
            self._copy(idx, data, offset, view)

    def read_cached(self, offset: int, buf: memoryview) -> bool:
        """Like :meth:`read_into` if every segment needed is cached (read-ahead put
        it there), at once and without blocking; False, having read nothing, if not.

        An event loop serves in-order reads this way, leaving it only for misses."""
        view = memoryview(buf).cast("B")
        n, seg = len(view), self._segment
        if not n or offset < 0 or offset + n > self.size:
            return False
        first, last = offset // seg, (offset + n - 1) // seg
        with self._lock:
            if self._closed:
                return False
            segments = []
            for idx in range(first, last + 1):
                data = self._cache.get(idx)
                if data is None or self._expired(idx):
                    return False
                segments.append(data)
            for idx in range(first, last + 1):
                self._cache.move_to_end(idx)
                self._hit(idx)
        sequential = self._start(offset, view)[3]
        ahead = last + (self._readahead if sequential else 0)
        self._schedule(last + 1, min(ahead, last + self._window))
        for idx, data in zip(range(first, last + 1), segments, strict=True):
            self._copy(idx, data, offset, view)
        return True

    def _start(self, offset: int, buf: memoryview) -> tuple[memoryview, int, int, bool]:
        """Checks and counts a read; whether it continues an earlier one (in order)."""
        view = memoryview(buf).cast("B")
        n, seg = len(view), self._segment
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"read of {n} bytes at {offset}: past the size {self.size}")
        first, last = offset // seg, (offset + max(n, 1) - 1) // seg
        with self._lock:
            if self._closed:
                raise NbdError(errno.EIO, "the NBD reader is closed")
            self.stats["requests"] += 1
            self.stats["bytes"] += n
            # Sequential: starts where a recent read ended, or in the segment after.
            sequential = any(end <= offset < (end // seg + 2) * seg for end in self._ends)
            self._ends.append(offset + n)
        return view, first, (last if n else first - 1), sequential

    def _copy(self, idx: int, data: bytearray, offset: int, view: memoryview) -> None:
        start, seg = idx * self._segment, self._segment
        lo, hi = max(offset, start), min(offset + len(view), start + seg)
        mid = max(lo, min(hi, start + len(data)))  # past what NBD can read: zeros
        view[lo - offset : mid - offset] = memoryview(data)[lo - start : mid - start]
        view[mid - offset : hi - offset] = bytes(hi - mid)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stops read-ahead and closes idle connections; busy ones close when done."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
            for conn in idle:
                del self._open[conn]
            self._cache.clear()
            self._prefetched.clear()
            self._lock.notify_all()
        self._executor.shutdown(wait=False, cancel_futures=True)
        for conn in idle:
            conn.close()
