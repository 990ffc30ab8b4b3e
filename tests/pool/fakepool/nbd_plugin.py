"""nbdkit Python plugin: serves the fake pool's disks the way xapi-nbd does.

xapi-nbd (xapi-project/xen-api, ocaml/nbd/src/main.ml) takes the export name
``/<vdi-uuid>?session_id=<ref>`` handed out by VDI.get_nbd_info, checks the
session with XAPI, plugs a read-only VBD into dom0 and serves the block device.
Here the session check is a file ``<state>/sessions/<ref>`` written by the fake
XAPI, and the "block device" is ``<state>/disks/<uuid>.raw`` (moved away by
VDI.data_destroy). Runs inside nbdkit's embedded interpreter: stdlib only.
"""

import os
import uuid
from typing import NoReturn
from urllib.parse import parse_qs

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's embedded Python

API_VERSION = 2
STATE = ""


def config(key: str, value: str) -> None:
    global STATE
    if key != "state":
        raise RuntimeError(f"unknown parameter {key}")
    STATE = value


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL


def _refuse(why: str) -> NoReturn:
    nbdkit.set_error(1)  # EPERM
    raise RuntimeError(why)


def open(readonly: bool) -> dict[str, int]:
    name = nbdkit.export_name()
    path, _, query = name.partition("?")
    session = parse_qs(query).get("session_id", [""])[0]
    try:  # reject anything that is not exactly /<uuid> and OpaqueRef:<uuid>
        vdi = str(uuid.UUID(path[1:]))
        ok = path == "/" + vdi and session == "OpaqueRef:" + str(uuid.UUID(session[10:]))
    except ValueError:
        ok = False
    if not ok:
        _refuse(f"bad export name {name!r}")
    if not os.path.exists(os.path.join(STATE, "sessions", session)):
        _refuse("SESSION_INVALID")
    try:
        fd = os.open(os.path.join(STATE, "disks", vdi + ".raw"), os.O_RDONLY)
    except FileNotFoundError:
        _refuse(f"VDI {vdi} has no readable data")
    return {"fd": fd, "size": os.fstat(fd).st_size}


def get_size(h: dict[str, int]) -> int:
    return h["size"]


def can_multi_conn(h: dict[str, int]) -> bool:
    return True


def pread(h: dict[str, int], buf: bytearray, offset: int, flags: int) -> None:
    n = os.preadv(h["fd"], [buf], offset)
    if n < len(buf):  # the file shrank under us: the rest reads as zeros
        buf[n:] = bytes(len(buf) - n)


def close(h: dict[str, int]) -> None:
    os.close(h["fd"])
