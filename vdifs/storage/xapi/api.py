"""XenAPI over XML-RPC and HTTPS, and XAPI's two HTTP handlers for disk bytes.

Why not the PyPI ``XenAPI`` package: it offers certificate checking only as
all or nothing (``ignore_ssl``), while a pool usually presents a self-signed
certificate that the user pins with ``--ca``; and its proxy object is not
safe to share between threads.  This module is the standard library's
``xmlrpc.client`` with an SSL context, one proxy per thread and a re-login
when XAPI says ``SESSION_INVALID`` (what the PyPI client does as well).

XAPI's conventions, from xapi-project/xen-api (``ocaml/idl`` and
``ocaml/xapi/server_helpers.ml``): every call returns a struct, ``{"Status":
"Success", "Value": ...}`` or ``{"Status": "Failure", "ErrorDescription":
[code, params...]}``; int64 fields travel as decimal strings; the session
reference is the first argument of every call but the login.

The password is held in this object only: it is never put in a URL, a
message or a log line.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import threading
import time
import urllib.parse
import xmlrpc.client
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
)

log = logging.getLogger(__name__)

NULL_REF = "OpaqueRef:NULL"
ORIGINATOR = "vdifs"
DEFAULT_TIMEOUT = 60.0

# XAPI's error codes (ocaml/xapi-consts/api_errors.ml) and what they mean to a user.
_FAILURES: dict[str, type[VdifsError]] = {
    "SESSION_AUTHENTICATION_FAILED": AccessDenied,
    "RBAC_PERMISSION_DENIED": AccessDenied,
    "HANDLE_INVALID": NotFound,
    "UUID_INVALID": NotFound,
    "VDI_NO_CBT_METADATA": NotFound,
    "VDI_IN_USE": Busy,
    "OTHER_OPERATION_IN_PROGRESS": Busy,
    "VM_BAD_POWER_STATE": Busy,
    "VDI_READ_ONLY": ReadOnly,
    "SR_FULL": NoSpace,
    "VDI_TOO_LARGE": TooLarge,
    "VDI_TOO_SMALL": InvalidArgument,
    "OPERATION_NOT_ALLOWED": InvalidArgument,
    "VDI_INCOMPATIBLE_TYPE": InvalidArgument,
    "MESSAGE_METHOD_UNKNOWN": Unsupported,
}


def failure(description: list[Any], doing: str) -> VdifsError:
    """The error for XAPI's ``ErrorDescription``; ``.xapi_code`` keeps XAPI's code."""
    code = str(description[0]) if description else "UNKNOWN"
    params = ", ".join(str(p) for p in description[1:] if str(p))
    exc = _FAILURES.get(code, PoolError)(
        f"{doing}: XAPI {code}" + (f" ({params})" if params else "")
    )
    exc.xapi_code = code  # type: ignore[attr-defined]
    return exc


def xapi_code(exc: BaseException) -> str | None:
    return getattr(exc, "xapi_code", None)


@dataclass(frozen=True)
class PoolAddress:
    """``xapi://user@host[:port][/?sr=<sr-uuid>]``: where the pool master answers."""

    host: str
    port: int
    user: str
    sr: str | None = None

    @classmethod
    def parse(cls, text: str) -> PoolAddress:
        url = urllib.parse.urlsplit(text)
        if url.scheme != "xapi" or not url.hostname:
            raise InvalidArgument(f"not a pool address: {text!r} (xapi://user@host[:port])")
        if url.password is not None:
            raise InvalidArgument(
                "no password in the address: use $VDIFS_XAPI_PASSWORD or --password-file"
            )
        query = urllib.parse.parse_qs(url.query)
        unknown = set(query) - {"sr"}
        if unknown or url.path not in ("", "/"):
            raise InvalidArgument(f"unknown parts in the pool address: {text!r}")
        try:
            port = url.port or 443
        except ValueError:
            raise InvalidArgument(f"bad port in the pool address: {text!r}") from None
        return cls(url.hostname, port, url.username or "root", query.get("sr", [None])[0])

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def __str__(self) -> str:
        return f"xapi://{self.user}@{self.host}:{self.port}" + (
            f"/?sr={self.sr}" if self.sr else ""
        )


def client_context(ca: Path | None) -> ssl.SSLContext:
    """TLS for the pool's HTTPS: the system's CAs, or exactly ``ca`` (a pinned certificate).

    A pool's certificate is often self-signed: the file may hold that very
    certificate, which then verifies on its own (partial chain).
    """
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


class _Transport(xmlrpc.client.SafeTransport):
    def __init__(self, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(context=context)
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPSConnection:
        connection = super().make_connection(host)
        connection.timeout = self._timeout
        return connection


class Session:
    """A logged-in XenAPI session, usable from any thread."""

    def __init__(
        self,
        address: PoolAddress,
        password: str,
        *,
        ca: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.address = address
        self._password = password
        self.context = client_context(ca)
        self.timeout = timeout
        self._local = threading.local()
        self._login_lock = threading.Lock()
        self.ref = ""
        self.login()

    def __repr__(self) -> str:
        return f"Session({self.address})"

    def _proxy(self) -> xmlrpc.client.ServerProxy:
        proxy = getattr(self._local, "proxy", None)
        if proxy is None:
            proxy = self._local.proxy = xmlrpc.client.ServerProxy(
                self.address.base_url + "/",
                transport=_Transport(self.context, self.timeout),
                allow_none=False,
            )
        return proxy

    def _raw(self, method: str, *args: Any) -> dict[str, Any]:
        """One call, with transport failures turned into errors a user can read."""
        where = self.address.base_url
        try:
            result = getattr(self._proxy(), method)(*args)
        except ssl.SSLCertVerificationError as exc:
            raise AccessDenied(
                f"the pool's certificate at {where} did not verify ({exc.verify_message});"
                " pass the pool's certificate with --ca"
            ) from None
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
            self._local.proxy = None  # the connection may be half-used: start afresh
            raise PoolError(f"{method}: the pool at {where} did not answer: {exc}") from None
        except xmlrpc.client.Fault as exc:
            raise PoolError(f"{method}: XML-RPC fault from {where}: {exc.faultString}") from None
        if not isinstance(result, dict) or "Status" not in result:
            raise PoolError(f"{method}: {where} is not a XenAPI server")
        return result

    def login(self) -> None:
        with self._login_lock:
            result = self._raw(
                "session.login_with_password",
                self.address.user,
                self._password,
                "1.0",
                ORIGINATOR,
            )
            if result["Status"] != "Success":
                raise failure(result.get("ErrorDescription", []), f"login as {self.address.user}")
            self.ref = result["Value"]

    def call(self, method: str, *args: Any) -> Any:
        """``method(session, *args)``'s value; a session that expired is renewed once."""
        for attempt in (1, 2):
            session = self.ref
            result = self._raw(method, session, *args)
            if result["Status"] == "Success":
                return result.get("Value")
            description = result.get("ErrorDescription", [])
            if description and description[0] == "SESSION_INVALID":
                description = ["SESSION_INVALID"]  # its parameter is the session: a secret
            if attempt == 1 and description == ["SESSION_INVALID"]:
                log.info("XAPI session expired: logging in again")
                with self._login_lock:
                    stale = self.ref == session
                if stale:
                    self.login()
                continue
            raise failure(description, method)
        raise AssertionError("unreachable")

    def logout(self) -> None:
        try:
            self._raw("session.logout", self.ref)
        except VdifsError as exc:
            log.info("logout: %s", exc)

    # -- XAPI's HTTP handlers ---------------------------------------------------------

    def _http(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            self.address.host, self.address.port, context=self.context, timeout=self.timeout
        )

    def _query(self, **params: str) -> str:
        return urllib.parse.urlencode({"session_id": self.ref, **params})

    def export_head(self, vdi_ref: str, read: Callable[[Callable[[int], bytes]], Any]) -> Any:
        """Open ``GET /export_raw_vdi?format=vhd`` and pass ``read(n)`` of its body to
        ``read``; the stream is closed as soon as ``read`` returns (Xen Orchestra reads
        a VHD's footer, header and BAT this way, then the blocks over NBD)."""
        connection = self._http()
        try:
            try:
                connection.request(
                    "GET", "/export_raw_vdi?" + self._query(vdi=vdi_ref, format="vhd")
                )
                response = connection.getresponse()
            except ssl.SSLCertVerificationError as exc:
                raise AccessDenied(f"the pool's certificate did not verify: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                raise PoolError(f"export_raw_vdi: {exc}") from None
            if response.status != 200:
                body = response.read(4096).decode("utf-8", "replace").strip()
                raise ExportRefused(f"export_raw_vdi answered {response.status}: {body}")
            return read(response.read)
        finally:
            connection.close()

    def import_raw(
        self, vdi_ref: str, fmt: str, size: int, body: Iterable[bytes | memoryview]
    ) -> None:
        """``PUT /import_raw_vdi`` of ``size`` bytes, then wait for its task.

        XAPI answers 200 before it reads the body and reports a failed import
        only in its task (``ocaml/xapi/import_raw_vdi.ml``), so the task's
        outcome is the result; XAPI refuses ``Transfer-Encoding``: a length is sent.
        """
        task = self.call("task.create", f"vdifs import into {vdi_ref}", "")
        sent_error: Exception | None = None
        try:
            connection = self._http()
            try:
                connection.putrequest(
                    "PUT",
                    "/import_raw_vdi?" + self._query(vdi=vdi_ref, format=fmt, task_id=task),
                    skip_accept_encoding=True,
                )
                connection.putheader("Content-Length", str(size))
                connection.putheader("Content-Type", "application/octet-stream")
                connection.endheaders()
                for piece in body:
                    connection.send(piece)
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                sent_error = exc  # the task says why, if XAPI stopped reading
            finally:
                connection.close()
            record = self.wait_task(task)
            if record["status"] != "success":
                raise failure(record.get("error_info") or ["IMPORT_FAILED"], "import_raw_vdi")
            if sent_error is not None:
                raise PoolError(f"import_raw_vdi: the upload broke off: {sent_error}")
        finally:
            try:
                self.call("task.destroy", task)
            except VdifsError as exc:
                log.info("task.destroy: %s", exc)

    def wait_task(self, task: str, deadline: float = 3600.0) -> dict[str, Any]:
        """Poll a task until it is no longer pending."""
        start = time.monotonic()
        delay = 0.05
        while True:
            record: dict[str, Any] = self.call("task.get_record", task)
            if record["status"] not in ("pending", "cancelling"):
                return record
            if time.monotonic() - start > deadline:
                raise PoolError(f"task {task} still pending after {deadline:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


class ExportRefused(PoolError):
    """``export_raw_vdi`` refused the VHD format (a raw SR): allocation is unknown."""
