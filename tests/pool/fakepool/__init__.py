"""A fake XCP-ng/XenServer pool speaking XAPI's wire protocol, for end-to-end tests.

It imitates, from public sources (xapi-project/xen-api), what a pool backend
talks to: XML-RPC over HTTPS, ``/export_raw_vdi`` and ``/import_raw_vdi``, and
xapi-nbd's NBD exports (served by a real nbdkit). It never imports vdifs, so its
answers cannot agree with vdifs by construction. See server.py and xapi.py.

``running_pool(dir)`` starts ``python -m tests.pool.fakepool --state DIR`` and
yields a PoolInfo; ``info.control`` calls the ``fake.*`` test hooks, which are
plain XML-RPC (they return values and raise xmlrpc.client.Fault), e.g.
``info.control.create_vm("vm", "Running", {"xvda": vdi_uuid})`` calls
``fake.create_vm``.

NBD clients (libnbd's nbdinfo/nbdcopy) reach an export with this URI: the
export name ``/<uuid>?session_id=<ref>`` goes, percent-encoded, after the
authority's "/" (the first "/" of the path is not part of the name, see
nbd_connect_uri(3)); ``tls-certificates`` names a directory whose
``ca-cert.pem`` is either the CA or the pinned server certificate from
VDI.get_nbd_info (GnuTLS accepts a trusted end certificate)::

    nbds://127.0.0.1:PORT//<uuid>%3Fsession_id%3DOpaqueRef%3A<uuid>?tls-certificates=DIR

(see ``nbd_uri`` below).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class PoolInfo:
    url: str
    ca: str
    user: str
    password: str
    nbd_port: int
    state_dir: Path
    control: Any  # Control: control.<name>(...) calls fake.<name>(...)

    def proxy(self) -> xmlrpc.client.ServerProxy:
        """A new XML-RPC proxy to the pool, verifying its certificate with the CA."""
        return xmlrpc.client.ServerProxy(self.url, context=self.ssl_context())

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)


class Control:
    """``fake.*`` calls: ``control.bump(uuid)`` is ``fake.bump(uuid)``. A new
    connection per call, so that any thread may use it."""

    def __init__(self, url: str, ca: str) -> None:
        self._url, self._ca = url, ca

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        ctx = ssl.create_default_context(cafile=self._ca)
        fake = xmlrpc.client.ServerProxy(self._url, context=ctx).fake
        return fake if name == "fake" else getattr(fake, name)


def nbd_uri(address: str, port: int | str, exportname: str, tls_dir: Path) -> str:
    """The libnbd URI (nbdinfo, nbdcopy) of an export from VDI.get_nbd_info."""
    return f"nbds://{address}:{port}/{quote(exportname, safe='/')}?tls-certificates={tls_dir}"


@contextlib.contextmanager
def running_pool(state_dir: Path, nbd_delay_ms: int = 0) -> Iterator[PoolInfo]:
    """Run the fake pool as a subprocess until the block exits (deadline 20 s to start)."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    ready = state_dir / "ready.json"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tests.pool.fakepool", "--state", str(state_dir)]
    cmd += ["--nbd-delay-ms", str(nbd_delay_ms)]
    with open(state_dir / "fakepool.log", "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (state_dir / "fakepool.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the fake pool did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        control = Control(info["url"], info["ca"])
        fields = {k: info[k] for k in ("url", "ca", "user", "password", "nbd_port")}
        yield PoolInfo(**fields, state_dir=state_dir, control=control)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
