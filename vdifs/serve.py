"""``vdifs serve``: XAPI's disk URLs over HTTP(S), with ranges, on trio and h11.

Routes (XAPI's names and parameters, so scripts written for a pool work by
changing the host):

- ``GET|HEAD /export_raw_vdi?vdi=UUID&format=raw|vhd|qcow2[&base=UUID]``
- ``PUT /import_raw_vdi?vdi=UUID&format=raw|vhd|qcow2`` (without ``vdi``: a new
  VDI, named by ``name_label=``, sized from the image)
- ``GET|HEAD /vdis/`` (a JSON listing) and ``/vdis/<uuid>/<file>`` for every
  file of the mount's tree

Every GET answers with ``Content-Length``, ``Accept-Ranges``, an ``ETag``
(strong for a snapshot's files, which never change), ``Last-Modified``, and
one byte range when asked (206, or 416 when none can be satisfied).  Bodies
are streamed a piece at a time, read in a worker thread, so memory stays
bounded and a slow client slows only itself.

Why h11 on trio: vdifs's filesystem already runs on trio, so the server
shares its tree, limiters and thread discipline; h11 is a small, well-kept
HTTP/1.1 state machine with no I/O of its own (hypercorn would bring ASGI,
HTTP/2 and a framework's worth of code for four routes).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import stat
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h11
import trio

from vdifs.errors import (
    AccessDenied,
    Busy,
    InvalidArgument,
    NoSpace,
    NotFound,
    PoolError,
    ReadOnly,
    TooLarge,
    Unsupported,
    VdifsError,
    WrongBase,
)
from vdifs.exports import IMAGE_FORMATS, Buffer, Export
from vdifs.fs.nodes import (
    VDIS,
    ChecksumsFile,
    DeltaImage,
    FullImage,
    Generated,
    Image,
    Link,
    Node,
    RawImage,
    UploadFile,
)
from vdifs.fs.tree import Tree
from vdifs.http_ranges import Unsatisfiable, http_date, if_range_holds, parse_range
from vdifs.imports.engine import import_file
from vdifs.limits import APPLIES, READS, nonblocking
from vdifs.serve_auth import Credentials
from vdifs.storage.backend import Backend

log = logging.getLogger(__name__)

PIECE = 1 << 20  # bytes read and sent at a time
MAX_HEADERS = 16 * 1024
RECEIVE = 256 * 1024
REFRESH_INTERVAL = 1.0
LINGER_SECONDS = 5.0  # reading an unwanted request body before closing (see _linger)
LINGER_BYTES = 256 << 20

# vdifs's errors as HTTP statuses, with XAPI's error names in the body.
_STATUS: list[tuple[type[VdifsError], int, str]] = [
    (NotFound, 404, "HANDLE_INVALID"),
    (ReadOnly, 403, "VDI_READ_ONLY"),
    (AccessDenied, 403, "PERMISSION_DENIED"),
    (Busy, 409, "VDI_IN_USE"),
    (WrongBase, 409, "VDI_INCOMPATIBLE_TYPE"),
    (TooLarge, 413, "VDI_TOO_LARGE"),
    (NoSpace, 507, "SR_FULL"),
    (Unsupported, 415, "VDI_INCOMPATIBLE_TYPE"),
    (InvalidArgument, 400, "INVALID_VALUE"),
    (PoolError, 502, "INTERNAL_ERROR"),
]


def http_status(exc: VdifsError) -> tuple[int, str]:
    for cls, status, name in _STATUS:
        if isinstance(exc, cls):
            return status, name
    return 500, "INTERNAL_ERROR"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]

    @classmethod
    def of(cls, event: h11.Request) -> Request:
        url = urllib.parse.urlsplit(event.target.decode("latin-1"))
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
        return cls(event.method.decode(), urllib.parse.unquote(url.path), query, headers)


class Reply(Exception):
    """Answer at once with this status (and body)."""

    def __init__(self, status: int, body: bytes = b"", headers: list[tuple[str, str]] = []):  # noqa: B006
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers


def _error_body(name: str, message: str) -> bytes:
    return (json.dumps({"Status": "Failure", "ErrorDescription": [name, message]}) + "\n").encode()


class Server:
    def __init__(self, backend: Backend, credentials: Credentials) -> None:
        self.backend = backend
        self.credentials = credentials
        self.tree = Tree(backend)

    async def refresh_forever(self) -> None:
        while True:
            await trio.sleep(REFRESH_INTERVAL)
            try:
                await trio.to_thread.run_sync(self.backend.data_version, limiter=READS)
                self.tree.refresh()
            except Exception:
                log.exception("could not refresh from the SR")

    # -- connections ------------------------------------------------------------------------

    async def connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        try:
            while True:
                event = await self._next(conn, stream)
                if isinstance(event, h11.ConnectionClosed) or event is None:
                    return
                if not isinstance(event, h11.Request):
                    return
                await self._answer(conn, stream, event)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            return  # the client went away
        except h11.RemoteProtocolError as exc:
            log.info("bad request: %s", exc)
            await _send_simple(conn, stream, exc.error_status_hint, b"bad request\n")
        finally:
            with trio.move_on_after(1):
                await stream.aclose()

    async def _next(self, conn: h11.Connection, stream: trio.abc.Stream) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = bytes(await stream.receive_some(RECEIVE))
            conn.receive_data(data)
            if not data and conn.their_state is not h11.DONE:
                return h11.ConnectionClosed()

    async def _answer(
        self, conn: h11.Connection, stream: trio.abc.Stream, event: h11.Request
    ) -> None:
        request = Request.of(event)
        try:
            if not self.credentials.allows(
                request.query.get("session_id"), request.headers.get("authorization")
            ):
                raise Reply(
                    401,
                    _error_body("SESSION_AUTHENTICATION_FAILED", "credentials required"),
                    [("WWW-Authenticate", 'Basic realm="vdifs"')],
                )
            if request.method in ("GET", "HEAD"):
                await self._get(conn, stream, request)
            elif request.method == "PUT" and request.path == "/import_raw_vdi":
                await self._import(conn, stream, request)
            else:
                raise Reply(405, b"method not allowed\n", [("Allow", "GET, HEAD, PUT")])
        except Reply as reply:
            await _send_simple(conn, stream, reply.status, reply.body, reply.headers)
            await self._linger(conn, stream)
        except VdifsError as exc:
            status, name = http_status(exc)
            log.info("%s %s: %s", request.method, request.path, exc)
            await _send_simple(conn, stream, status, _error_body(name, str(exc)))
            await self._linger(conn, stream)

    async def _linger(self, conn: h11.Connection, stream: trio.abc.Stream) -> None:
        """After answering a request early, read and drop the body it is still sending
        (for a while, up to a bound) before the connection closes: closing with unread
        bytes makes the kernel reset the connection, and the client may lose the answer.
        A client that sent ``Expect: 100-continue`` got no 100 and sends no body."""
        if conn.their_state is not h11.SEND_BODY:
            return
        budget = LINGER_BYTES
        with trio.move_on_after(LINGER_SECONDS):
            while budget > 0:
                data = await stream.receive_some(RECEIVE)
                if not data:
                    break
                budget -= len(data)

    async def _drain(self, conn: h11.Connection, stream: trio.abc.Stream) -> None:
        """Read what is left of a request body we do not want (bounded), or give up on
        keeping the connection."""
        budget = 1 << 20
        while conn.their_state is h11.SEND_BODY and budget > 0:
            event = await self._next(conn, stream)
            if isinstance(event, h11.Data):
                budget -= len(event.data)
            elif not isinstance(event, h11.EndOfMessage):
                break

    # -- GET ----------------------------------------------------------------------------------

    def _node(self, request: Request) -> Node:
        if request.path == "/export_raw_vdi":
            vdi = request.query.get("vdi")
            fmt = request.query.get("format", "raw")
            base = request.query.get("base")
            if vdi is None:
                raise InvalidArgument("export_raw_vdi needs vdi=UUID")
            if fmt not in IMAGE_FORMATS and fmt != "raw":
                raise InvalidArgument(f"format={fmt}: use raw, vhd or qcow2")
            self.tree.record(vdi)
            if base is not None:
                if fmt == "raw":
                    raise InvalidArgument("a raw image cannot be a delta: use vhd or qcow2")
                self.tree.record(base)
                if base not in self.tree.delta_bases(vdi):
                    raise NotFound(f"no delta of {vdi} from {base}")
                return DeltaImage(vdi, base, fmt)
            return RawImage(vdi) if fmt == "raw" else FullImage(vdi, fmt)
        parts = [p for p in request.path.split("/") if p]
        if not parts or parts[0] != "vdis":
            raise NotFound(request.path)
        node: Node = VDIS
        for name in parts[1:]:
            node = self.tree.lookup(node, name)
        return node

    async def _get(self, conn: h11.Connection, stream: trio.abc.Stream, request: Request) -> None:
        await self._drain(conn, stream)
        node = self._node(request)
        if isinstance(node, Image):
            await self._warm(node)
            export = self.tree.open_export(node, write=False)
            await self._send_export(conn, stream, request, export, self._etag(node, export))
            return
        if isinstance(node, ChecksumsFile):
            body = await trio.to_thread.run_sync(self.tree.checksums, node, limiter=APPLIES)
        elif isinstance(node, Generated):
            body = self.tree.generated(node)
        elif isinstance(node, Link | UploadFile):
            raise NotFound(request.path)
        else:  # a directory: its entries, as JSON
            entries = [
                {
                    "name": name,
                    "type": "directory" if stat.S_ISDIR(self.tree.attr(child).mode) else "file",
                }
                for name, child in self.tree.children(node)
                if not isinstance(child, UploadFile)
            ]
            body = (json.dumps(entries, indent=1) + "\n").encode()
        headers = [("Content-Type", "application/json"), ("Cache-Control", "no-cache")]
        await _send_simple(conn, stream, 200, body, headers, head=request.method == "HEAD")

    async def _warm(self, node: Node) -> None:
        if self.tree.needs_warming(node):
            await trio.to_thread.run_sync(self.tree.warm_all, [node], limiter=READS)

    def _etag(self, node: Node, export: Export) -> str:
        record = export.state.record
        tag = f"{record.state_uuid}.{export.fmt}"
        if export.base is not None:
            tag += f".from.{export.base.record.state_uuid}"
        return f'"{tag}"' if self.tree.is_immutable(node) else f'W/"{tag}"'

    async def _send_export(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        request: Request,
        export: Export,
        etag: str,
    ) -> None:
        size = export.size
        modified = http_date(export.state.record.changed_ns / 1e9)
        headers = [
            ("Content-Type", _content_type(export.fmt)),
            ("Accept-Ranges", "bytes"),
            ("ETag", etag),
            ("Last-Modified", modified),
        ]
        first, last = 0, size - 1
        status = 200
        wanted = parse_range(request.headers.get("range"), size)
        if wanted is not None and if_range_holds(request.headers.get("if-range"), etag, modified):
            if isinstance(wanted, Unsatisfiable):
                raise Reply(416, b"", [*headers, ("Content-Range", f"bytes */{size}")])
            first, last = wanted
            status = 206
            headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
        headers.append(("Content-Length", str(last - first + 1)))
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        if request.method != "HEAD":
            pin = self.backend.keep_readable(export.state.content)
            try:
                offset = first
                while offset <= last:
                    length = min(PIECE, last + 1 - offset)
                    data = await nonblocking(partial(_piece, export, offset, length))
                    # Passthrough: h11 frames the piece without copying it.
                    event = h11.Data(data=data)  # type: ignore[arg-type]
                    for piece in conn.send_with_data_passthrough(event) or ():
                        await stream.send_all(piece)
                    offset += length
            finally:
                pin.release()
        await stream.send_all(conn.send(h11.EndOfMessage()))

    # -- PUT ----------------------------------------------------------------------------------

    async def _import(
        self, conn: h11.Connection, stream: trio.abc.Stream, request: Request
    ) -> None:
        if self.tree.read_only or not self.backend.capabilities.writable:
            raise ReadOnly("this SR takes no imports")
        if "transfer-encoding" in request.headers:
            raise Reply(411, _error_body("INTERNAL_ERROR", "Cannot handle encoding: send a length"))
        try:
            size = int(request.headers["content-length"])
        except (KeyError, ValueError):
            raise Reply(411, _error_body("INTERNAL_ERROR", "Content-Length required")) from None
        fmt = request.query.get("format", "raw")
        if fmt not in ("raw", "vhd", "qcow2"):
            raise InvalidArgument(f"format={fmt}: use raw, vhd or qcow2")
        vdi = request.query.get("vdi")
        if vdi is not None and self.tree.record(vdi).is_a_snapshot:
            raise ReadOnly(f"VDI {vdi} is a snapshot: it cannot be imported into")
        name = request.query.get("name_label") or f"import-{os.getpid()}"
        path, fd = await trio.to_thread.run_sync(self.backend.scratch_file)
        try:
            if b"100-continue" in request.headers.get("expect", "").encode():
                await stream.send_all(
                    conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            received = await self._receive_body(conn, stream, fd, size)
            if received != size:
                raise InvalidArgument(f"the body ended after {received} of {size} bytes")
            file_name = f"{vdi or name}.{fmt}"
            result = await trio.to_thread.run_sync(
                lambda: import_file(
                    self.backend, fd, file_name, fmt, target=vdi, new_name=None if vdi else name
                ),
                limiter=APPLIES,
            )
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)
        self.tree.refresh()
        status = next(
            (item for item in self.backend.imports.recent(20) if item["id"] == result.id), {}
        )
        body = (json.dumps({"Status": "Success", "Value": result.target} | status) + "\n").encode()
        await _send_simple(conn, stream, 200, body, [("Content-Type", "application/json")])

    async def _receive_body(
        self, conn: h11.Connection, stream: trio.abc.Stream, fd: int, size: int
    ) -> int:
        received = 0
        pending: list[bytes] = []
        pending_bytes = 0
        while True:
            event = await self._next(conn, stream)
            if isinstance(event, h11.Data):
                pending.append(bytes(event.data))
                pending_bytes += len(event.data)
            if pending and (pending_bytes >= PIECE or not isinstance(event, h11.Data)):
                offset, data = received, b"".join(pending)
                await trio.to_thread.run_sync(os.pwrite, fd, data, offset)
                received += len(data)
                pending, pending_bytes = [], 0
            if isinstance(event, h11.EndOfMessage):
                return received
            if not isinstance(event, h11.Data):
                return received  # the client went away
            if received + pending_bytes > size:
                raise InvalidArgument("the body is longer than its Content-Length")


def _piece(export: Export, offset: int, length: int, nowait: bool) -> Buffer:
    return export.read_shared(offset, length, nowait=nowait)


def _content_type(fmt: str) -> str:
    return {"qcow2": "application/x-qemu-disk", "vhd": "application/x-vhd"}.get(
        fmt, "application/octet-stream"
    )


async def _send_simple(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    status: int,
    body: bytes,
    headers: list[tuple[str, str]] | None = None,
    *,
    head: bool = False,
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return  # a response is already under way: the connection just ends
    headers = list(headers or [])
    if not any(k.lower() == "content-length" for k, _ in headers):
        headers.append(("Content-Length", str(len(body))))
    try:
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        if body and not head:
            await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    except h11.LocalProtocolError:
        pass


def parse_listen(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit():
        raise InvalidArgument(f"--listen {text!r}: use ADDRESS:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve_forever(
    backend: Backend,
    listen: str,
    credentials: Credentials,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until interrupted; ``ready(port)`` once listening."""
    host, port = parse_listen(listen)
    context = None
    if cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
    elif key is not None:
        raise InvalidArgument("--key goes with --cert")
    server = Server(backend, credentials)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.refresh_forever)
            listeners = await trio.open_tcp_listeners(port, host=host)
            bound = listeners[0].socket.getsockname()[1]
            served: list[trio.abc.Listener[Any]] = list(listeners)
            if context is not None:
                served = [
                    trio.SSLListener(lst, context, https_compatible=True) for lst in listeners
                ]
            scheme = "https" if context is not None else "http"
            log.warning("serving %s on %s://%s:%d", backend.description, scheme, host, bound)
            if ready is not None:
                ready(bound)
            await trio.serve_listeners(server.connection, served)

    trio.run(main)
