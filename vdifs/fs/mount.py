"""Running the filesystem: mount options, the trio main loop, signals, unmount.

The daemon unmounts only after a clean exit (a signal, ``vdifs umount``).  If
it dies, the mount is left "transport endpoint is not connected" so readers
fail loudly instead of seeing an empty tree that ``rsync --delete`` would copy.
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import trio

from vdifs.errors import Busy, InvalidArgument
from vdifs.fs.ops import VdifsOperations
from vdifs.fs.tree import Tree
from vdifs.storage.backend import Backend
from vdifs.storage.open import SrSpec

log = logging.getLogger(__name__)

BASE_OPTIONS = frozenset(
    {"fsname=vdifs", "subtype=vdifs", "default_permissions", "nosuid", "nodev"}
)
PASSTHROUGH = frozenset({"ro", "rw", "allow_other", "allow_root", "auto_unmount", "debug"})
VDIFS_OPTIONS = frozenset({"snapshot_admin", "direct_io"})  # ours, not passed to FUSE
MOUNT_WAIT_SECONDS = 20


def mount_state(path: Path) -> str:
    """``"none"``, ``"alive"`` or ``"dead"`` (a FUSE mount whose daemon is gone: ENOTCONN).

    /proc/self/mountinfo is read rather than asking os.path.ismount, which
    cannot stat a dead mount and would call it "not mounted".
    """
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = {line.split()[4].replace("\\040", " ") for line in f}
    if target not in points:
        return "none"
    try:
        os.statvfs(target)  # never answered from a cache, unlike stat
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return "dead"
        raise
    return "alive"


def check_free(mountpoint: Path) -> None:
    state = mount_state(mountpoint)
    if state == "none" and not mountpoint.is_dir():
        raise InvalidArgument(f"mount point {mountpoint} is not a directory")
    if state == "dead":
        raise Busy(
            f"{mountpoint} still holds a mount whose daemon died (ENOTCONN):"
            f" run 'vdifs umount {mountpoint}' first"
        )
    if state == "alive":
        raise Busy(f"{mountpoint} is already a mount point")


def parse_options(text: str | None) -> set[str]:
    """``-o a,b`` -> FUSE options, refusing anything we would not honour."""
    options = set()
    for opt in filter(None, (text or "").split(",")):
        if opt not in PASSTHROUGH | VDIFS_OPTIONS:
            known = ", ".join(sorted(PASSTHROUGH | VDIFS_OPTIONS))
            raise InvalidArgument(f"unknown mount option {opt!r}; known: {known}")
        if opt != "rw":
            options.add(opt)
    return options


READ_AHEAD_KB = 1024  # 1 MiB read requests instead of 128 KiB: about 1.7x (performance.md)


def raise_read_ahead(mountpoint: Path) -> None:
    """Ask the kernel for 1 MiB read requests on this mount (root only).

    pyfuse3 cannot set max_readahead, and the kernel resets the mount's bdi
    read_ahead_kb during the INIT handshake, so this runs once the daemon
    has been serving for a moment.  The device numbers come from
    /proc/self/mountinfo: the daemon never stats its own mount.
    """
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        devices = [line.split()[2] for line in f if line.split()[4] == target]
    if not devices:
        return
    try:
        Path(f"/sys/class/bdi/{devices[-1]}/read_ahead_kb").write_text(f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.info("could not raise read-ahead on %s: %s", mountpoint, exc)


async def _serve(ops: VdifsOperations, mountpoint: Path) -> None:
    async with trio.open_nursery() as nursery:
        ops.start(nursery)
        nursery.start_soon(_after_init, mountpoint)
        nursery.start_soon(_stop_on_signals)
        await pyfuse3.main(min_tasks=2, max_tasks=64)
        nursery.cancel_scope.cancel()


async def _after_init(mountpoint: Path) -> None:
    await trio.sleep(0.5)  # INIT is the first request pyfuse3.main answers
    await trio.to_thread.run_sync(raise_read_ahead, mountpoint)


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def serve_foreground(spec: SrSpec, mountpoint: Path, options: set[str]) -> None:
    """Mount the SR ``spec`` names and serve until unmounted or signalled."""
    check_free(mountpoint)
    sr = spec.open()
    try:
        serve(sr, mountpoint, options)
    finally:
        sr.close()


def serve(backend: Backend, mountpoint: Path, options: set[str]) -> None:
    """Mount any backend and serve until unmounted or signalled."""
    faulthandler.register(signal.SIGUSR1)
    tree = Tree(
        backend,
        read_only="ro" in options,
        snapshot_admin="snapshot_admin" in options,
        mountpoint=os.path.realpath(mountpoint),
    )
    ops = VdifsOperations(tree, direct_io_images="direct_io" in options)
    pyfuse3.init(ops, str(mountpoint), set(BASE_OPTIONS | (options - VDIFS_OPTIONS)))
    log.info("serving %s on %s", backend.description, mountpoint)
    try:
        trio.run(_serve, ops, mountpoint)
    except BaseException:
        log.exception("the filesystem stopped on an error; leaving the mount disconnected")
        pyfuse3.close(unmount=False)
        raise
    pyfuse3.close(unmount=True)
    tree.uploads.close_all()


def mount_background(spec: SrSpec, mountpoint: Path, option_text: str | None, debug: bool) -> None:
    """Start a foreground daemon detached, return once the mount answers."""
    parse_options(option_text)  # refuse bad options before forking anything
    check_free(mountpoint)
    if spec.is_pool:
        spec.open().close()  # a wrong address, password or certificate fails here, clearly
    spec.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = spec.log_dir / ("pool-daemon.log" if spec.is_pool else "daemon.log")
    cmd = [sys.executable, "-m", "vdifs", *spec.args()]
    if debug:
        cmd.append("--debug")
    cmd += ["mount", str(mountpoint), "--foreground"]
    if option_text:
        cmd += ["-o", option_text]
    with open(log_path, "ab") as logfile:
        start = logfile.tell()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + MOUNT_WAIT_SECONDS
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
            return
        if proc.poll() is not None:
            with open(log_path, "rb") as f:
                f.seek(start)
                tail = f.read().decode(errors="replace").strip().splitlines()
            reason = tail[-1] if tail else f"exit status {proc.returncode}"
            raise InvalidArgument(f"the mount daemon failed: {reason}")
        time.sleep(0.05)
    proc.terminate()
    raise Busy(f"the mount did not come up within {MOUNT_WAIT_SECONDS} s (see {log_path})")


def unmount(mountpoint: Path, *, lazy: bool = False) -> None:
    """Unmount; a dead mount (its daemon gone) is detached as well."""
    if mount_state(mountpoint) == "none":
        raise InvalidArgument(f"{mountpoint} is not mounted")
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mountpoint)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise Busy(result.stderr.strip() or f"could not unmount {mountpoint}")
