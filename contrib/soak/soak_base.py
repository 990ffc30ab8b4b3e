"""The soak's plumbing: the mount, the `vdifs` CLI, children, errors and the state shared
by every kind of operation (:class:`SoakBase`)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import importlib.util
import itertools
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from soak_model import (
    CHUNK,
    SKIP,
    Disk,
    Expect,
    Failure,
    MiB,
    Snap,
    Stats,
    apply_write,
    write_bytes,
)


def _exit_statuses() -> list[tuple[int, int, str]]:
    try:
        from vdifs.errors import exit_statuses
    except ImportError:  # a Python without vdifs (running --vdifs CMD): the checkout's table
        spec = importlib.util.spec_from_file_location("vdifs_errors", CHECKOUT / "vdifs/errors.py")
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        statuses: list[tuple[int, int, str]] = module.exit_statuses()
        return statuses
    return exit_statuses()


CHECKOUT = Path(__file__).resolve().parents[2]
# What `vdifs` exits with, as the errno the mount would give (docs/errors.md).
EXIT_ERRNO = {status: code for status, code, _ in _exit_statuses()}
KNOWN_ERRNOS = (
    errno.EINVAL,
    errno.EFBIG,
    errno.EOPNOTSUPP,
    errno.EBUSY,
    errno.EROFS,
    errno.ENOSPC,
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
    errno.ENOTCONN,
)


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def is_mount(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].replace("\\040", " ") == target for line in f)


def find_daemon(mountpoint: Path) -> int | None:
    """The pid of the vdifs daemon serving mountpoint, from /proc/*/cmdline."""
    target = os.path.realpath(mountpoint)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        args = argv.split("\0")
        if "mount" not in args or not any("vdifs" in a for a in args[:4]):
            continue
        if any(a and os.path.realpath(a) == target for a in args[args.index("mount") + 1 :]):
            return int(entry)
    return None


def option_after(pid: int, option: str) -> str | None:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    return args[args.index(option) + 1] if option in args[:-1] else None


def errno_name(code: int) -> str:
    return "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode.get(code, str(code))


def errno_in(text: str) -> int:
    """The errno whose message a tool printed (cp, dd, rsync), or -1."""
    for code in KNOWN_ERRNOS:
        if os.strerror(code) in text:
            return code
    return -1


def sha_file(path: Path, bufsize: int = MiB) -> tuple[str, int, int]:
    """(sha256, bytes read, st_size) of a file, read front to back."""
    h = hashlib.sha256()
    n = 0
    buf = bytearray(bufsize)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        while k := f.readinto(buf):
            h.update(view[:k])
            n += k
    return h.hexdigest(), n, size


def copy_in(src: Path, dest: Path) -> int:
    """What cp does, with the errno of write() or close(); 0 on success."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(src, "rb") as f:
            while data := f.read(MiB):
                os.write(fd, data)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.close(fd)
        return exc.errno or -1
    try:
        os.close(fd)
    except OSError as exc:
        return exc.errno or -1
    return 0


class SoakBase:
    """The state and plumbing every kind of operation uses; the layers below build on it:
    Load (snapshots, readers, writers) < Uploads < Hostile < __main__.Soak (the run)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size: int = args.size
        self.rng = random.Random(f"{args.seed}:main")
        self.stop = threading.Event()
        self.interrupted = False
        self.stats = Stats()
        self.errors: list[str] = []
        self.known: list[str] = []  # errors matching --known: reported, not counted
        self.errors_lock = threading.Lock()
        self.started = time.monotonic()
        self.children: set[subprocess.Popen[bytes]] = set()
        self.children_lock = threading.Lock()
        self.reg_lock = threading.RLock()
        self.new_vdi_lock = threading.Lock()  # imports into new VDIs, kept apart from gc
        self.snaps: dict[str, Snap] = {}
        self.every_snap: list[str] = []
        self.expected: dict[tuple[str, str], Expect] = {}
        self.busy: dict[int, tuple[str, float]] = {}
        self.disks: list[Disk] = []
        self.live: list[Disk] = []
        self.targets: list[Disk] = []
        self.hostile_disk: Disk | None = None
        self.created: list[str] = []  # VDIs we made, for the cleanup of a given SR
        self.gone: set[str] = set()  # those of them and of our snapshots deleted since
        self.names = itertools.count(1)
        self.threads: list[threading.Thread] = []
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_pid: int | None = None
        self.log_path: Path | None = None
        self.log_offset = 0
        self.rss: dict[str, float] = {}
        self.rss_samples: list[int] = []
        self.sampling = threading.Event()
        self.tools = ["cp", "dd", "python", "cli"]
        if shutil.which("rsync"):
            self.tools += ["rsync", "rsync-inplace"]
        self.qemu = shutil.which("qemu-img") is not None
        self.tmp = Path(tempfile.mkdtemp(prefix="vdifs-soak-", dir=args.workdir))
        self.images = self.tmp / "images"
        self.images.mkdir()
        self.vdifs_cmd = self.find_vdifs()
        self.own_sr = args.sr is None
        self.sr = Path(args.sr).resolve() if args.sr else self.tmp / "sr"
        self.mnt = Path(args.mount).resolve() if args.mount else self.tmp / "mnt"
        self.delete_while_read = 0

    # -- plumbing -------------------------------------------------------------------

    def find_vdifs(self) -> list[str]:
        if self.args.vdifs:
            return shlex.split(self.args.vdifs)
        try:
            import vdifs  # noqa: F401

            return [sys.executable, "-m", "vdifs"]
        except ImportError:
            pass
        venv = CHECKOUT / ".venv" / "bin" / "vdifs"
        if venv.exists():
            return [str(venv)]
        found = shutil.which("vdifs")
        if found is None:
            raise SystemExit("soak: vdifs not found (use --vdifs CMD)")
        return [found]

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def error(self, kind: str, message: str) -> bool:
        """Record an unexpected outcome; False if it is a --known one (or interrupted)."""
        if self.interrupted:
            return False
        line = f"[{self.elapsed():7.1f}s] {kind}: {message.rstrip()}"
        if any(re.search(pattern, line) for pattern in self.args.known):
            with self.errors_lock:
                self.known.append(line)
            print(f"soak: KNOWN {line}", file=sys.stderr, flush=True)
            return False
        with self.errors_lock:
            self.errors.append(line)
            count = len(self.errors)
        print(f"soak: ERROR {line}", file=sys.stderr, flush=True)
        if count >= self.args.max_errors:
            self.stop.set()
        return True

    def spawn(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        with self.children_lock:
            self.children.add(proc)
        return proc

    def reap(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        with self.children_lock:
            self.children.discard(proc)

    def run(self, cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        proc = self.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Failure(f"{shlex.join(cmd)} still ran after {timeout} s") from None
        finally:
            self.reap(proc)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        return self.run([*self.vdifs_cmd, "--sr", str(self.sr), *args], timeout)

    def cli_ok(self, *args: str) -> str:
        result = self.cli(*args)
        if result.returncode != 0:
            raise Failure(
                f"vdifs {' '.join(args)} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout.decode().strip()

    def export_sha(self, *args: str) -> tuple[int, str, int, str]:
        """(exit status, sha256, size, stderr) of `vdifs export ... -`."""
        cmd = [*self.vdifs_cmd, "--sr", str(self.sr), "export", *args, "-"]
        with tempfile.TemporaryFile() as errfile:
            proc = self.spawn(cmd, stdout=subprocess.PIPE, stderr=errfile)
            timer = threading.Timer(300, proc.kill)
            timer.start()
            h = hashlib.sha256()
            n = 0
            try:
                assert proc.stdout is not None
                while data := proc.stdout.read(MiB):
                    h.update(data)
                    n += len(data)
                proc.wait()
            finally:
                timer.cancel()
                self.reap(proc)
            errfile.seek(0)
            err = errfile.read().decode(errors="replace").strip()
        return proc.returncode, h.hexdigest(), n, err

    def timed(self, kind: str, started: float) -> None:
        """The latency of a step within operations (not counted as an operation)."""
        self.stats.record(f"step:{kind}", time.monotonic() - started, "ok")

    def op(self, kind: str, fn: Callable[..., str | None], *args: Any) -> None:
        """Run one operation: count its outcome, time it, catch what it raises."""
        if kind in self.args.skip or any(
            s.endswith("*") and kind.startswith(s[:-1]) for s in self.args.skip
        ):
            time.sleep(0.01)
            return
        ident = threading.get_ident()
        started = time.monotonic()
        self.busy[ident] = (kind, started)
        outcome = "error"
        try:
            outcome = fn(*args) or "ok"
        except Failure as exc:
            outcome = "error" if self.error(kind, str(exc)) else "known"
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                self.error(kind, f"the daemon is gone (ENOTCONN): {exc}")
                self.stop.set()
            else:
                outcome = "error" if self.error(kind, f"{type(exc).__name__}: {exc}") else "known"
        except Exception:
            outcome = "error" if self.error(kind, traceback.format_exc()) else "known"
        finally:
            self.busy.pop(ident, None)
        if outcome != SKIP:
            self.stats.record(kind, time.monotonic() - started, outcome)

    def vdi_path(self, uuid: str, rel: str = "") -> Path:
        path = self.mnt / "vdis" / uuid
        return path / rel if rel else path

    def appear(self, path: Path, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def vanish(self, path: Path, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while path.exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def import_status(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.mnt / "import" / ".status" / f"{name}.json").read_text())
        except FileNotFoundError:
            return None

    # -- setup and teardown ---------------------------------------------------------

    def start_mount(self) -> None:
        if is_mount(self.mnt):
            if self.args.sr is None:
                pid = find_daemon(self.mnt)
                given = option_after(pid, "--sr") if pid else None
                self.sr = Path(given or os.environ.get("VDIFS_SR", "")).resolve()
                if not given and "VDIFS_SR" not in os.environ:
                    raise SystemExit("soak: give --sr for the SR mounted there")
                self.own_sr = False
            self.daemon_pid = find_daemon(self.mnt)
            if self.daemon_pid is not None:
                with contextlib.suppress(OSError):
                    log = Path(os.readlink(f"/proc/{self.daemon_pid}/fd/2"))
                    if log.is_file():
                        self.log_path = log
        else:
            self.mnt.mkdir(parents=True, exist_ok=True)
            self.sr.mkdir(parents=True, exist_ok=True)
            self.log_path = self.tmp / "daemon.log"
            cmd = [*self.vdifs_cmd, "--sr", str(self.sr), "mount", str(self.mnt), "--foreground"]
            with open(self.log_path, "ab") as logfile:
                self.daemon = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=logfile,
                    start_new_session=True,
                )
            self.daemon_pid = self.daemon.pid
            deadline = time.monotonic() + 20
            while not is_mount(self.mnt):
                if self.daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"soak: the mount did not come up: {self.log_path}")
                time.sleep(0.05)
        if self.log_path is not None:
            self.log_offset = self.log_path.stat().st_size
        if self.daemon_pid is not None:
            self.rss["mounted"] = proc_status(self.daemon_pid)["VmRSS"]

    def new_disk(self, name: str, role: str) -> Disk:
        uuid = self.cli_ok("vdi", "create", name, "--size", str(self.size))
        self.created.append(uuid)
        disk = Disk(uuid, name, self.size, role)
        if not self.appear(self.vdi_path(uuid, "raw.img")):
            raise Failure(f"VDI {uuid} did not appear on the mount")
        self.disks.append(disk)
        return disk

    def fill(self, disk: Disk, rng: random.Random, share: float) -> None:
        """Write extents over about `share` of the disk, one fsync at the end."""
        nchunks = self.size // CHUNK
        fd = os.open(self.vdi_path(disk.uuid, "raw.img"), os.O_WRONLY)
        try:
            idx = 0
            while idx < nchunks:
                run = rng.randint(1, 32)
                if rng.random() < share:
                    n = min(run, nchunks - idx)
                    wseed = rng.getrandbits(40) | 1
                    os.pwrite(fd, write_bytes(idx * CHUNK, n * CHUNK, wseed), idx * CHUNK)
                    apply_write(disk.chunks, idx * CHUNK, n * CHUNK, wseed)
                idx += run
            os.fsync(fd)
        finally:
            os.close(fd)
        disk.bump()

    def kill_children(self) -> None:
        with self.children_lock:
            children = list(self.children)
        for proc in children:
            with contextlib.suppress(OSError):
                proc.kill()

    def cleanup(self) -> None:
        self.stop.set()
        self.sampling.set()
        if self.interrupted:
            self.kill_children()  # cp, rsync, vdifs: their threads then finish at once
        deadline = time.monotonic() + 60
        stuck = []
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread.name)
        self.kill_children()
        if stuck:
            self.error("shutdown", f"threads still blocked after 60 s: {', '.join(stuck)}")
            self.dump_daemon_stacks()
            if self.daemon is not None:
                self.daemon.kill()  # unblocks the requests they wait for
        if not self.own_sr and not self.args.keep:
            with contextlib.suppress(Exception):
                self.remove_our_vdis()
        if self.daemon is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False,
                           capture_output=True)  # fmt: skip
            try:
                self.daemon.wait(15)
            except subprocess.TimeoutExpired:
                self.daemon.terminate()
                try:
                    self.daemon.wait(5)
                except subprocess.TimeoutExpired:
                    self.daemon.kill()
                    self.daemon.wait(5)
            if self.daemon.returncode not in (0, None) and not self.interrupted:
                self.error("daemon", f"the daemon exited {self.daemon.returncode}")
        if self.args.keep:
            print(f"soak: kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def remove_our_vdis(self) -> None:
        """On an SR that is not ours: delete what the soak created."""
        for uuid in self.every_snap:
            if uuid not in self.gone:
                self.cli("vdi", "snapshot-delete", uuid, timeout=60)
        for uuid in self.created:
            if uuid not in self.gone:
                self.cli("vdi", "destroy", uuid, timeout=60)
        self.cli("sr", "gc", timeout=120)

    def dump_daemon_stacks(self) -> None:
        """The daemon registers faulthandler on SIGUSR1: its stacks go to its log."""
        if self.daemon_pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.daemon_pid, signal.SIGUSR1)
            print(f"soak: the daemon's stacks are in {self.log_path}", file=sys.stderr)
