"""Shared fixtures: an SR in a temporary directory, the real CLI, real mounts.

Mount fixtures run the real daemon (``python -m vdifs mount --foreground``)
through the kernel, wait for it with a deadline, and always unmount lazily in
teardown, escalating to kill.  They skip, with the reason, where FUSE is not
available.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vdifs.storage.local import LocalSR

# Fuzzing: a fixed, deterministic run in the suite; a long random one on demand:
#   VDIFS_FUZZ_EXAMPLES=50000 .venv/bin/pytest tests/formats -k fuzz
FUZZ_EXAMPLES = int(os.environ.get("VDIFS_FUZZ_EXAMPLES", "400"))
FUZZ_DERANDOMIZE = "VDIFS_FUZZ_EXAMPLES" not in os.environ

FUSE_MISSING = (
    "FUSE is not available (/dev/fuse or fusermount3 missing)"
    if not (os.path.exists("/dev/fuse") and shutil.which("fusermount3"))
    else None
)
needs_fuse = pytest.mark.skipif(FUSE_MISSING is not None, reason=FUSE_MISSING or "")


def needs_tool(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed")


def require_loop_device() -> None:
    """Skip when the machine has no free loop device (a container without
    /dev/loop-control): an environment reason. Any later losetup failure,
    such as one on raw.img, is a test failure."""
    probe = subprocess.run(["losetup", "--find"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no loop devices here: {probe.stderr.strip()}")


class Cli:
    """The real ``vdifs`` command against one SR."""

    def __init__(self, sr: Path) -> None:
        self.sr = sr

    def invocation(self) -> tuple[list[str], dict[str, str] | None]:
        """The global options before the command, and its environment (None: ours)."""
        return ["--sr", str(self.sr)], None

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        options, env = self.invocation()
        result = subprocess.run(
            [sys.executable, "-m", "vdifs", *options, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
            env=env,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"vdifs {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def __call__(self, *args: str) -> str:
        return self.run(*args).stdout.strip()

    def json(self, *args: str) -> Any:
        return json.loads(self(*args))


class Mount:
    """A running daemon serving an SR on a mount point."""

    def __init__(self, sr: Path, mountpoint: Path, log: Path, options: str | None = None) -> None:
        self.sr = sr
        self.path = mountpoint
        self.log = log
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mount:
        cmd = [sys.executable, "-m", "vdifs", "--sr", str(self.sr), "mount", str(self.path), "-f"]
        if self.options:
            cmd += ["-o", self.options]
        with open(self.log, "ab") as logfile:
            self.proc = subprocess.Popen(cmd, stdout=logfile, stderr=logfile)
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode}: {self.log.read_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"mount did not come up: {self.log.read_text()}")
            time.sleep(0.02)
        return self

    def stop(self) -> int | None:
        """Unmount cleanly; returns the daemon's exit status."""
        if self.proc is None:
            return None
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                code = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait(5)
        self.proc = None
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def vdi(self, uuid: str) -> Path:
        return self.path / "vdis" / uuid

    def warnings(self) -> list[str]:
        return [
            line
            for line in self.log.read_text(errors="replace").splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line
        ]


@pytest.fixture
def sr_path(tmp_path: Path) -> Path:
    return tmp_path / "sr"


@pytest.fixture
def sr(sr_path: Path) -> Iterator[LocalSR]:
    repo = LocalSR(sr_path)
    yield repo
    repo.close()


@pytest.fixture
def cli(sr_path: Path) -> Cli:
    return Cli(sr_path)


@pytest.fixture
def mount_factory(tmp_path: Path, sr_path: Path) -> Iterator[Any]:
    mounts: list[Mount] = []

    def make(options: str | None = None, name: str = "mnt") -> Mount:
        mountpoint = tmp_path / name
        mountpoint.mkdir(exist_ok=True)
        m = Mount(sr_path, mountpoint, tmp_path / f"{name}.log", options).start()
        mounts.append(m)
        return m

    yield make
    for m in mounts:
        with contextlib.suppress(Exception):
            m.stop()
        if os.path.ismount(m.path):
            subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False)


@pytest.fixture
def mnt(mount_factory: Any) -> Iterator[Mount]:
    if FUSE_MISSING:
        pytest.skip(FUSE_MISSING)
    m = mount_factory()
    yield m
    assert m.warnings() == [], m.log.read_text()


def sha(path: Path) -> str:
    """sha256 of a file, read in pieces (raw.img of a large disk included)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def export_sha(cli: Cli, uuid: str) -> str:
    """sha256 of a VDI's bytes through vdifs export (no mount involved)."""
    out = subprocess.run(
        [sys.executable, "-m", "vdifs", "--sr", str(cli.sr), "export", uuid, "-"],
        capture_output=True,
        check=True,
    ).stdout
    return hashlib.sha256(out).hexdigest()


def fill(path: Path, offset: int, data: bytes) -> None:
    """pwrite into an existing file without truncating it (dd conv=notrunc)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def pread(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
