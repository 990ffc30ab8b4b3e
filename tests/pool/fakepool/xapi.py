"""The fake pool's database and its XenAPI calls, answered the way XAPI does.

Conventions imitated (xapi-project/xen-api: ocaml/idl/datamodel*.ml,
ocaml/xapi-consts/api_errors.ml, ocaml/xapi/api_server.ml): every call answers
``{"Status": "Success", "Value": v}`` or ``{"Status": "Failure",
"ErrorDescription": [code, params...]}``, never an XML-RPC fault; refs are
``OpaqueRef:<uuid>``; int64 fields travel as decimal strings; void calls return
"". Every ``Class.get_<field>``, ``get_record``, ``get_all``, ``get_all_records``
and ``get_by_uuid`` is answered generically from the records; the set-valued
back references (VDI.VBDs, VDI.snapshots, VM.VBDs, VM.snapshots, VM.children,
SR.VDIs) are computed from the forward ones, as XAPI's database does.
Disks are sparse raw files ``<state>/disks/<uuid>.raw``.
"""

from __future__ import annotations

import base64
import copy
import inspect
import os
import secrets
import shutil
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from xmlrpc.client import DateTime

NULL = "OpaqueRef:NULL"
EPOCH = DateTime("19700101T00:00:00Z")
CBT_BLOCK = 64 * 1024  # SM's CBT granularity (sm: drivers/cbtutil.py)
VHD_BLOCK = 2 * 1024 * 1024  # sm: drivers/vhdutil.py VHD_BLOCK_SIZE
Record = dict[str, Any]
CLASSES = ("pool", "host", "SR", "VDI", "VBD", "VM", "task")
BACKREFS = {  # (class, field) -> (class holding the forward reference, its field)
    ("VDI", "VBDs"): ("VBD", "VDI"),
    ("VDI", "snapshots"): ("VDI", "snapshot_of"),
    ("VM", "VBDs"): ("VBD", "VM"),
    ("VM", "snapshots"): ("VM", "snapshot_of"),
    ("VM", "children"): ("VM", "parent"),
    ("SR", "VDIs"): ("VDI", "SR"),
}
SETTABLE = {"name_label", "name_description"}
METHODS: dict[str, Callable[..., Any]] = {}


class XapiError(Exception):
    """A XAPI failure: the ErrorDescription list."""

    def __init__(self, *description: object) -> None:
        super().__init__(*description)
        self.description = [str(d) for d in description]


def api(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        METHODS[name] = fn
        return fn

    return register


def new_ref() -> str:
    return f"OpaqueRef:{uuid.uuid4()}"


def now() -> DateTime:
    return DateTime(time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime()))


def data_blocks(fd: int, size: int) -> Iterator[int]:
    """Indexes of the 64 KiB blocks of [0, size) holding data (SEEK_DATA/SEEK_HOLE)."""
    end, pos = min(size, os.fstat(fd).st_size), 0
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        if start >= end:
            return
        pos = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        yield from range(start // CBT_BLOCK, (pos - 1) // CBT_BLOCK + 1)


def changed_blocks(path_from: Path, path_to: Path, size: int) -> bytes:
    """The bitmap SM's list_changed_blocks returns, computed by comparing bytes:
    one bit per 64 KiB of ``size``, MSB first; past a file's end reads zeros."""
    nblocks = -(-size // CBT_BLOCK)
    bitmap = bytearray(-(-nblocks // 8))
    with open(path_from, "rb") as fa, open(path_to, "rb") as fb:
        a, b = fa.fileno(), fb.fileno()
        for i in sorted(set(data_blocks(a, size)) | set(data_blocks(b, size))):
            off = i * CBT_BLOCK
            n = min(CBT_BLOCK, size - off)
            if os.pread(a, n, off).ljust(n, b"\0") != os.pread(b, n, off).ljust(n, b"\0"):
                bitmap[i >> 3] |= 0x80 >> (i & 7)
    return bytes(bitmap)


class Pool:
    """One host, three SRs, a control domain and a template; all state in memory.

    ``lock`` is a Condition: every change bumps ``generation`` and wakes the
    event.from waiters (ocaml/xapi/xapi_event.ml)."""

    def __init__(self, state: Path) -> None:
        self.state = state
        for sub in ("disks", "cbt", "sessions", "tmp"):
            shutil.rmtree(state / sub, ignore_errors=True)
            (state / sub).mkdir(parents=True)
        self.lock = threading.Condition(threading.RLock())
        self.db: dict[str, dict[str, Record]] = {c: {} for c in CLASSES}
        self.sessions: set[str] = set()
        self.password = secrets.token_urlsafe(18)
        self.generation = 0
        self.log: list[tuple[str, str, str]] = []  # log[g - 1] = (class, op, ref)
        self.calls: list[str] = []
        self.imports: list[Record] = []
        self.nbd_port = 0
        self.nbd_cert = self.other_cert = ""
        self.cert_mismatch = False
        self.nbd_control: Callable[[str, int], None] = lambda action, delay: None
        with self.lock:
            host = self._add("host", name_label="fake", hostname="fake", address="127.0.0.1")
            self.local_sr = self._sr("Local storage", "ext", "user", {})
            self.raw_sr = self._sr("Raw storage", "lvm", "user", {"fake-raw": "true"})
            iso_sr = self._sr("ISO library", "iso", "iso", {})
            self._add(
                "pool", name_label="fake", master=host, default_SR=self.local_sr, other_config={}
            )
            self._new_vdi(iso_sr, 64 << 20, name_label="debian.iso", read_only=True)
            dom0 = {"is_control_domain": True, "power_state": "Running"}
            self._new_vm("Control domain on host: fake", **dom0)
            self._new_vm("Debian Bookworm 12", is_a_template=True)

    # -- records -------------------------------------------------------------
    def _emit(self, cls: str, op: str, ref: str) -> None:
        self.generation += 1
        self.log.append((cls, op, ref))
        self.lock.notify_all()

    def _add(self, cls: str, **fields: Any) -> str:
        ref = new_ref()
        self.db[cls][ref] = {"uuid": str(uuid.uuid4()), "name_description": "", **fields}
        self._emit(cls, "add", ref)
        return ref

    def _delete(self, cls: str, ref: str) -> None:
        del self.db[cls][ref]
        self._emit(cls, "del", ref)

    def _get(self, cls: str, ref: str) -> Record:
        try:
            return self.db[cls][ref]
        except (KeyError, TypeError):
            raise XapiError("HANDLE_INVALID", cls, ref) from None

    def _sr(self, name: str, type_: str, content: str, other: dict[str, str]) -> str:
        return self._add(
            "SR", name_label=name, type=type_, content_type=content, shared=False,
            physical_size=str(100 << 30), other_config=other, sm_config={},
        )  # fmt: skip

    def _back(self, cls: str, ref: str, field: str) -> list[str]:
        src, key = BACKREFS[cls, field]
        return [r for r, rec in self.db[src].items() if rec[key] == ref]

    def view(self, cls: str, ref: str) -> Record:
        """A copy of the record as XAPI would send it, derived fields filled in."""
        rec = dict(self._get(cls, ref))
        for (c, field), _ in BACKREFS.items():
            if c == cls:
                rec[field] = self._back(cls, ref, field)
        if cls == "VDI":
            disk = self.disk(rec["uuid"])  # a data-destroyed VDI keeps only its CBT log
            used = disk.stat().st_blocks * 512 if disk.exists() else 0
            rec["physical_utilisation"] = str(used)
        elif cls == "VBD":
            vm = self.db["VM"].get(rec["VM"], {})
            rec["currently_attached"] = vm.get("power_state") == "Running"
        elif cls == "SR":
            vdis = [self.view("VDI", v) for v in rec["VDIs"]]
            rec["physical_utilisation"] = str(sum(int(v["physical_utilisation"]) for v in vdis))
            rec["virtual_allocation"] = str(sum(int(v["virtual_size"]) for v in vdis))
        return rec

    def disk(self, vdi_uuid: str) -> Path:
        return self.state / "disks" / f"{vdi_uuid}.raw"

    def data_path(self, vdi: Record) -> Path:
        """Where the bytes are, data-destroyed VDIs included (kept only to compute CBT)."""
        hidden = vdi["type"] == "cbt_metadata"
        return self.state / "cbt" / f"{vdi['uuid']}.raw" if hidden else self.disk(vdi["uuid"])

    def is_raw_sr(self, sr: str) -> bool:
        return self.db["SR"][sr]["other_config"].get("fake-raw") == "true"

    def find_vdi(self, ref_or_uuid: str) -> str | None:
        """HTTP handlers take a ref or a uuid (ocaml/xapi/importexport.ml vdi_of_req)."""
        if ref_or_uuid in self.db["VDI"]:
            return ref_or_uuid
        return next((r for r, v in self.db["VDI"].items() if v["uuid"] == ref_or_uuid), None)

    def in_use(self, vdi: str) -> bool:
        """Plugged into a running VM: XAPI refuses offline operations (xapi_vdi.ml)."""
        vms = (self.db["VM"][self.db["VBD"][vbd]["VM"]] for vbd in self._back("VDI", vdi, "VBDs"))
        return any(vm["power_state"] == "Running" for vm in vms)

    def _new_vdi(self, sr: str, size: int, source: Record | None = None, **fields: Any) -> str:
        vdi_uuid = str(uuid.uuid4())
        path = self.disk(vdi_uuid)
        if source is None:
            with open(path, "wb") as f:
                f.truncate(size)
        else:
            src = str(self.disk(source["uuid"]))
            subprocess.run(["cp", "--sparse=always", "--reflink=auto", src, str(path)], check=True)
        rec: Record = {
            "uuid": vdi_uuid, "name_label": "", "name_description": "", "SR": sr,
            "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False,
            "is_a_snapshot": False, "snapshot_of": NULL, "snapshot_time": EPOCH,
            "cbt_enabled": False, "managed": True, "missing": False, "sm_config": {},
            "other_config": {}, "xenstore_data": {}, "tags": [], "current_operations": {},
            "allowed_operations": [], "is_tools_iso": False, "location": vdi_uuid,
            "parent": NULL, "on_boot": "persist", "allow_caching": False,
        }  # fmt: skip
        rec.update(fields)
        ref = new_ref()
        self.db["VDI"][ref] = rec
        self._emit("VDI", "add", ref)
        return ref

    def _copy_vdi(self, ref: str, **fields: Any) -> str:
        src = self._get("VDI", ref)
        if src["type"] == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", ref, "cbt_metadata")
        keep = ("name_label", "name_description", "type", "sm_config", "other_config", "tags")
        inherited = copy.deepcopy({k: src[k] for k in (*keep, "xenstore_data")})
        return self._new_vdi(src["SR"], int(src["virtual_size"]), src, **(inherited | fields))

    def _new_vm(self, name: str, **fields: Any) -> str:
        rec = {
            "name_label": name, "power_state": "Halted", "is_a_template": False,
            "is_control_domain": False, "is_a_snapshot": False, "snapshot_of": NULL,
            "snapshot_time": EPOCH, "parent": NULL, "other_config": {}, "tags": [],
            "current_operations": {}, "allowed_operations": [],
        }  # fmt: skip
        return self._add("VM", **(rec | fields))

    def _new_vbd(self, vm: str, vdi: str, userdevice: str, device: str) -> str:
        return self._add(
            "VBD", VM=vm, VDI=vdi, device=device, userdevice=userdevice, type="Disk", mode="RW",
            bootable=userdevice == "0", empty=False, unpluggable=True, other_config={},
        )  # fmt: skip

    def _vm_disks(self, vm: str) -> list[Record]:
        vbds = (self.db["VBD"][v] for v in self._back("VM", vm, "VBDs"))
        return [v for v in vbds if v["type"] == "Disk" and v["VDI"] != NULL]

    # -- dispatch ------------------------------------------------------------
    def call(self, method: str, params: tuple[Any, ...]) -> Record:
        """One XML-RPC call -> the XAPI envelope (ocaml/xapi/api_server.ml)."""
        try:
            with self.lock:
                self.calls.append(method)
                return {"Status": "Success", "Value": self._call(method, list(params))}
        except XapiError as e:
            return {"Status": "Failure", "ErrorDescription": e.description}
        except Exception as e:  # a bug in the fake: say so, as XAPI would
            traceback.print_exc()
            return {"Status": "Failure", "ErrorDescription": ["INTERNAL_ERROR", repr(e)]}

    def _call(self, method: str, args: list[Any]) -> Any:
        cls, _, verb = method.partition(".")
        fn = METHODS.get(method)
        generic = cls in CLASSES and (verb.startswith(("get_", "set_")) or verb == "get_all")
        if (fn is None and not generic) or method.startswith("fake."):
            raise XapiError("MESSAGE_METHOD_UNKNOWN", method)
        if method != "session.login_with_password" and (not args or args[0] not in self.sessions):
            raise XapiError("SESSION_INVALID", args[0] if args else "")
        if fn is None:
            return self._generic(method, cls, verb, args[1:])
        try:
            inspect.signature(fn).bind(self, *args)
        except TypeError:
            want = len(inspect.signature(fn).parameters) - 1
            raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, want, len(args)) from None
        return fn(self, *args)

    def _generic(self, method: str, cls: str, verb: str, args: list[Any]) -> Any:
        if verb == "get_all" and not args:
            return list(self.db[cls])
        if verb == "get_all_records" and not args:
            return {ref: self.view(cls, ref) for ref in self.db[cls]}
        if verb == "get_by_uuid" and len(args) == 1:
            found = [r for r, rec in self.db[cls].items() if rec["uuid"] == args[0]]
            if not found:
                raise XapiError("UUID_INVALID", cls, args[0])
            return found[0]
        if verb == "get_by_name_label" and len(args) == 1:
            return [r for r, rec in self.db[cls].items() if rec.get("name_label") == args[0]]
        if verb == "get_record" and len(args) == 1:
            return self.view(cls, args[0])
        field = verb[4:]
        if verb.startswith("get_") and len(args) == 1 and field in self.view(cls, args[0]):
            return self.view(cls, args[0])[field]
        if verb.startswith("set_") and len(args) == 2 and field in SETTABLE:
            self._get(cls, args[0])[field] = str(args[1])
            self._emit(cls, "mod", args[0])
            return ""
        raise XapiError("MESSAGE_METHOD_UNKNOWN", method)

    # -- session, pool, task, event -----------------------------------------
    @api("session.login_with_password")
    def login(self, user: str, password: str, version: str = "", originator: str = "") -> str:
        if user != "root" or password != self.password:
            raise XapiError("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
        ref = new_ref()
        self.sessions.add(ref)
        (self.state / "sessions" / ref).touch()  # what the NBD plugin checks
        return ref

    @api("session.logout")
    def logout(self, s: str) -> str:
        self.sessions.discard(s)
        (self.state / "sessions" / s).unlink(missing_ok=True)
        return ""

    @api("task.create")
    def task_create(self, s: str, label: str, description: str) -> str:
        return self._add(
            "task", name_label=label, name_description=description, status="pending",
            progress=0.0, result="", error_info=[], created=now(), finished=EPOCH,
            other_config={}, allowed_operations=[], current_operations={}, subtask_of=NULL,
        )  # fmt: skip

    def task_done(self, task: str, error: list[str] | None = None, result: str = "") -> None:
        """TaskHelper.complete / TaskHelper.failed (ocaml/xapi/taskHelper.ml)."""
        with self.lock:
            rec = self._get("task", task)
            ok = error is None
            rec.update(status="success" if ok else "failure", progress=1.0, finished=now())
            rec.update(result=result if ok else "", error_info=error or [])
            self._emit("task", "mod", task)

    @api("task.destroy")
    def task_destroy(self, s: str, task: str) -> str:
        self._get("task", task)
        self._delete("task", task)
        return ""

    @api("event.from")
    def event_from(self, s: str, classes: list[str], token: str, timeout: float) -> Record:
        """Blocks until something of ``classes`` changed after ``token`` or the
        timeout passed; token "" replays every current object as "add", as
        XAPI does for a new client (ocaml/xapi/xapi_event.ml, from)."""
        wanted = {c.lower() for c in classes}
        try:
            since = int(token.split(",")[0]) if token else -1
        except ValueError:
            raise XapiError("EVENT_FROM_TOKEN_PARSE_FAILURE", token) from None
        deadline = time.monotonic() + float(timeout)
        while True:
            latest: dict[tuple[str, str], tuple[int, str]] = {}
            if since < 0:
                for c in CLASSES:
                    latest.update({(c, r): (self.generation, "add") for r in self.db[c]})
            for g, (c, op, r) in enumerate(self.log[since:] if since >= 0 else [], since + 1):
                first = latest.get((c, r), (0, op))[1]
                latest[c, r] = (g, "del" if op == "del" else "add" if first == "add" else "mod")
            events = []
            for (c, r), (g, op) in sorted(latest.items(), key=lambda kv: kv[1][0]):
                if "*" in wanted or c.lower() in wanted:
                    ev: Record = {"id": str(g), "class": c.lower(), "operation": op, "ref": r}
                    if r in self.db[c]:
                        ev["snapshot"] = self.view(c, r)
                    events.append(ev)
            left = deadline - time.monotonic()
            if events or left <= 0:
                break
            since = self.generation
            self.lock.wait(left)
        counts = {c.lower(): len(self.db[c]) for c in CLASSES if c.lower() in wanted}
        return {"events": events, "valid_ref_counts": counts, "token": self.token()}

    def token(self) -> str:
        return f"{self.generation:020d},{0:020d}"

    # -- VDI -------------------------------------------------------------------
    @api("VDI.create")
    def vdi_create(self, s: str, record: Record) -> str:
        sr = str(record.get("SR", NULL))
        self._get("SR", sr)
        if record.get("type") == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", "", "cbt_metadata")
        size = int(record.get("virtual_size", "0"))
        if self.db["SR"][sr]["type"] == "ext":
            size = -(-max(size, 1) // VHD_BLOCK) * VHD_BLOCK  # vhdutil.validate_and_round_vhd_size
        keys = ("name_label", "name_description", "type", "sharable", "read_only")
        maps = ("other_config", "xenstore_data", "sm_config", "tags")
        fields = {k: record[k] for k in keys + maps if k in record}
        return self._new_vdi(sr, size, **fields)

    @api("VDI.snapshot")
    def vdi_snapshot(self, s: str, vdi: str, driver_params: Record | None = None) -> str:
        src = self._get("VDI", vdi)
        return self._copy_vdi(
            vdi, read_only=True, is_a_snapshot=True, snapshot_of=vdi, snapshot_time=now(),
            cbt_enabled=src["cbt_enabled"],
        )  # fmt: skip

    @api("VDI.clone")
    def vdi_clone(self, s: str, vdi: str, driver_params: Record | None = None) -> str:
        return self._copy_vdi(vdi)

    @api("VDI.destroy")
    def vdi_destroy(self, s: str, vdi: str) -> str:
        rec = self._get("VDI", vdi)
        if self.in_use(vdi):
            raise XapiError("VDI_IN_USE", vdi, "destroy")
        for vbd in self._back("VDI", vdi, "VBDs"):
            self._delete("VBD", vbd)
        self.data_path(rec).unlink(missing_ok=True)
        self._delete("VDI", vdi)
        return ""

    @api("VDI.data_destroy")
    def vdi_data_destroy(self, s: str, vdi: str) -> str:
        """Keeps only the CBT metadata (xapi_vdi.ml check_operation_error, _data_destroy);
        the fake hides the bytes in <state>/cbt/ to keep answering list_changed_blocks."""
        rec = self._get("VDI", vdi)
        if rec["type"] == "cbt_metadata":
            return ""
        if not rec["is_a_snapshot"]:
            raise XapiError("OPERATION_NOT_ALLOWED", f"VDI is not a snapshot: {vdi}")
        if not rec["cbt_enabled"]:
            raise XapiError("VDI_NO_CBT_METADATA", vdi)
        if self.in_use(vdi):
            raise XapiError("VDI_IN_USE", vdi, "data_destroy")
        for vbd in self._back("VDI", vdi, "VBDs"):
            self._delete("VBD", vbd)
        path = self.disk(rec["uuid"])
        rec["type"] = "cbt_metadata"
        os.replace(path, self.data_path(rec))
        self._emit("VDI", "mod", vdi)
        return ""

    @api("VDI.resize")
    def vdi_resize(self, s: str, vdi: str, size: str) -> str:
        rec = self._get("VDI", vdi)
        if rec["type"] == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
        if self.in_use(vdi):
            raise XapiError("VDI_IN_USE", vdi, "resize")
        new = int(size)
        if self.db["SR"][rec["SR"]]["type"] == "ext":
            new = -(-new // VHD_BLOCK) * VHD_BLOCK
        if new < int(rec["virtual_size"]):  # sm: XE_SR_ERRORCODES.xml VDISize
            opterr = "VDI Invalid size [opterr=shrinking not allowed]"
            raise XapiError("SR_BACKEND_FAILURE_79", "", opterr, "")
        os.truncate(self.disk(rec["uuid"]), new)
        rec["virtual_size"] = str(new)
        self._emit("VDI", "mod", vdi)
        return ""

    def _set_cbt(self, vdi: str, on: bool) -> str:
        rec = self._get("VDI", vdi)
        if rec["is_a_snapshot"]:
            raise XapiError("OPERATION_NOT_ALLOWED", f"VDI is a snapshot: {vdi}")
        if rec["type"] not in ("user", "system"):
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, rec["type"])
        rec["cbt_enabled"] = on
        self._emit("VDI", "mod", vdi)
        return ""

    @api("VDI.enable_cbt")
    def vdi_enable_cbt(self, s: str, vdi: str) -> str:
        return self._set_cbt(vdi, True)

    @api("VDI.disable_cbt")
    def vdi_disable_cbt(self, s: str, vdi: str) -> str:
        return self._set_cbt(vdi, False)

    def family(self, vdi: str) -> str:
        """The root of the snapshot_of chain: a VDI and all its snapshots share it."""
        seen = set()
        while vdi in self.db["VDI"] and self.db["VDI"][vdi]["snapshot_of"] != NULL:
            seen.add(vdi)
            vdi = self.db["VDI"][vdi]["snapshot_of"]
            if vdi in seen:
                break
        return vdi

    @api("VDI.list_changed_blocks")
    def vdi_list_changed_blocks(self, s: str, vdi_from: str, vdi_to: str) -> str:
        """SM's CBT answer (sm: drivers/cbtutil.py, blktap2 CBT log), computed by
        comparing the bytes of the two disks instead of from a change log."""
        a, b = self._get("VDI", vdi_from), self._get("VDI", vdi_to)
        if self.in_use(vdi_to):
            raise XapiError("VDI_IN_USE", vdi_to, "list_changed_blocks")
        for ref, rec in ((vdi_from, a), (vdi_to, b)):
            if not rec["cbt_enabled"]:
                raise XapiError("VDI_NO_CBT_METADATA", ref)
        if self.family(vdi_from) != self.family(vdi_to):
            why = "Failed to calculate changed blocks for given VDIs. "
            why += "[opterr=Source and target VDI are unrelated]"
            raise XapiError("SR_BACKEND_FAILURE_460", "", why, "")
        paths, size = (self.data_path(a), self.data_path(b)), int(b["virtual_size"])
        self.lock.release()  # comparing may take a while: let other calls run
        try:
            return base64.b64encode(changed_blocks(*paths, size)).decode()
        finally:
            self.lock.acquire()

    @api("VDI.get_nbd_info")
    def vdi_get_nbd_info(self, s: str, vdi: str) -> list[Record]:
        """xapi_vdi.ml _get_nbd_info: one entry per NBD-enabled host address;
        the port is an int64, so a string on the wire."""
        rec = self._get("VDI", vdi)
        if rec["type"] == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
        cert = self.other_cert if self.cert_mismatch else self.nbd_cert
        return [{
            "address": "127.0.0.1", "port": str(self.nbd_port), "cert": cert,
            "exportname": f"/{rec['uuid']}?session_id={s}", "subject": "localhost",
        }]  # fmt: skip

    # -- VM --------------------------------------------------------------------
    @api("VM.snapshot")
    def vm_snapshot(self, s: str, vm: str, new_name: str, ignore_vdis: Sequence[str] = ()) -> str:
        """ocaml/xapi/xapi_vm_snapshot.ml snapshot + xapi_vm_clone.ml: disks snapshotted,
        the snapshot's parent is the VM's previous parent, the VM's parent the snapshot."""
        rec = self._get("VM", vm)
        if rec["is_a_snapshot"] or rec["is_a_template"] or rec["is_control_domain"]:
            raise XapiError("OPERATION_NOT_ALLOWED", f"cannot snapshot {vm}")
        fields = {k: rec[k] for k in ("name_description", "other_config", "tags", "parent")}
        snap = self._new_vm(
            new_name, **fields, is_a_snapshot=True, snapshot_of=vm, snapshot_time=now()
        )
        for vbd in self._vm_disks(vm):
            if vbd["VDI"] not in ignore_vdis:
                vdi = self.vdi_snapshot(s, vbd["VDI"])
                self._new_vbd(snap, vdi, vbd["userdevice"], vbd["device"])
        rec["parent"] = snap
        self._emit("VM", "mod", vm)
        return snap

    @api("VM.revert")
    def vm_revert(self, s: str, snapshot: str) -> str:
        """xapi_vm_snapshot.ml revert_vbds: the VM's disks are destroyed and
        replaced by clones of the snapshot's, and every snapshot of an old disk
        now names the clone in snapshot_of (so CBT chains continue)."""
        snap = self._get("VM", snapshot)
        if not snap["is_a_snapshot"]:
            raise XapiError("ONLY_REVERT_SNAPSHOT")
        vm = snap["snapshot_of"]
        rec = self._get("VM", vm)
        if rec["power_state"] != "Halted":
            raise XapiError("VM_BAD_POWER_STATE", vm, "halted", rec["power_state"].lower())
        disks = [(vbd, self.db["VDI"][vbd["VDI"]]) for vbd in self._vm_disks(snapshot)]
        for vbd, snap_vdi in disks:
            if snap_vdi["type"] == "cbt_metadata":
                raise XapiError("VDI_INCOMPATIBLE_TYPE", vbd["VDI"], "cbt_metadata")
        replaced = {snap_vdi["snapshot_of"] for _, snap_vdi in disks}
        for vbd_ref in self._back("VM", vm, "VBDs"):  # disks without a snapshot: detached
            vdi = self.db["VBD"][vbd_ref]["VDI"]
            self._delete("VBD", vbd_ref)
            if vdi in replaced and vdi in self.db["VDI"]:
                self.vdi_destroy(s, vdi)
        for vbd, snap_vdi in disks:
            old = snap_vdi["snapshot_of"]
            clone = self._copy_vdi(vbd["VDI"], cbt_enabled=snap_vdi["cbt_enabled"])
            for other in self.db["VDI"].values():
                if other["snapshot_of"] == old:
                    other["snapshot_of"] = clone
            self._new_vbd(vm, clone, vbd["userdevice"], vbd["device"])
        rec["parent"] = snapshot
        self._emit("VM", "mod", vm)
        return ""

    @api("VM.destroy")
    def vm_destroy(self, s: str, vm: str) -> str:
        rec = self._get("VM", vm)
        if rec["power_state"] != "Halted":
            raise XapiError("VM_BAD_POWER_STATE", vm, "halted", rec["power_state"].lower())
        for vbd in self._back("VM", vm, "VBDs"):
            self._delete("VBD", vbd)
        for child in self._back("VM", vm, "children"):
            self.db["VM"][child]["parent"] = rec["parent"]
        self._delete("VM", vm)
        return ""

    # -- fake.*: control methods for tests (plain XML-RPC: values and faults) ---
    def control(self, method: str, args: tuple[Any, ...]) -> Any:
        with self.lock:
            return getattr(self, "fake_" + method.removeprefix("fake."))(*args)

    def _by_uuid(self, cls: str, uuid_: str) -> tuple[str, Record]:
        ref = self._generic("", cls, "get_by_uuid", [uuid_])
        return ref, self.db[cls][ref]

    def fake_expire_sessions(self) -> bool:
        for s in list(self.sessions):
            self.logout(s)
        return True

    def fake_create_vm(self, name: str, power_state: str, disks: dict[str, str]) -> str:
        vm = self._new_vm(name, power_state=power_state.capitalize())
        for device, vdi_uuid in sorted(disks.items()):
            number = int(device) if device.isdigit() else ord(device[-1]) - ord("a")
            dev = "xvd" + chr(ord("a") + number) if device.isdigit() else device
            self._new_vbd(vm, self._by_uuid("VDI", vdi_uuid)[0], str(number), dev)
        return str(self.db["VM"][vm]["uuid"])

    def fake_set_power_state(self, vm_uuid: str, state: str) -> bool:
        ref, rec = self._by_uuid("VM", vm_uuid)
        rec["power_state"] = state.capitalize()
        self._emit("VM", "mod", ref)
        for vbd in self._back("VM", ref, "VBDs"):
            self._emit("VBD", "mod", vbd)
        return True

    def fake_disk_path(self, vdi_uuid: str) -> str:
        self._by_uuid("VDI", vdi_uuid)
        return str(self.disk(vdi_uuid))

    def fake_bump(self, vdi_uuid: str) -> bool:
        self._emit("VDI", "mod", self._by_uuid("VDI", vdi_uuid)[0])
        return True

    def fake_kill_nbd(self) -> bool:
        self.nbd_control("stop", 0)
        return True

    def fake_start_nbd(self, delay_ms: int = 0) -> bool:
        self.nbd_control("start", delay_ms)
        return True

    def fake_nbd_cert_mismatch(self, on: bool) -> bool:
        self.cert_mismatch = bool(on)
        return True

    def fake_calls(self) -> list[str]:
        return list(self.calls)

    def fake_imports(self) -> list[Record]:
        return [dict(i) for i in self.imports]

    # The HTTP handlers' look-ups, under the lock.
    def http_session_ok(self, session: str | None, what: str) -> bool:
        with self.lock:
            self.calls.append(what)
            return session in self.sessions
