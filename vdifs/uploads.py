"""Files being written into ``import/``: staging, naming, and when to apply.

An upload is staged in a sparse file under the SR's ``staging/`` as it
arrives.  It is applied (see :mod:`vdifs.imports`) when the last handle of a
validly named upload is closed, or when a staged file is renamed onto a valid
name (rsync's temporary file).  Applying is blocking work: the adapter runs
:meth:`Upload.apply` in a thread and turns its error into the errno of
``close()`` or ``rename()``.

One import per target: a per-target ``flock`` in ``staging/`` is held from
the moment an upload names a target until it is applied or discarded, so a
second upload (or a concurrent ``vdifs import``) gets EBUSY.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from vdifs.errors import Busy, InvalidArgument, NotFound, ReadOnly, TooLarge
from vdifs.imports import (
    ImportName,
    ImportResult,
    file_reader,
    parse_import_name,
    record_interrupted,
    run_import,
)
from vdifs.storage.local import LocalSR

log = logging.getLogger(__name__)

MAX_UPLOAD_SIZE = 64 << 40  # the SR's largest disk plus any image's metadata
PF_EXITING = 0x4  # linux/sched.h: the task is exiting


def target_lock(sr: LocalSR, key: str) -> int:
    """Hold the one-import-per-target lock; raises Busy if someone else does."""
    fd = os.open(sr.staging_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(f"an import into {key} is already in progress") from None
    return fd


def writer_was_killed(pid: int) -> bool:
    """Whether a process is exiting on a signal (``cp`` killed mid-way).

    A killed writer's files are still closed (and flushed) by the kernel; an
    upload cut short that way must not be applied.  /proc/<pid>/stat shows
    the exiting flag and the exit code while the task closes its files.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    flags = int(fields[6])
    exit_code = int(fields[49]) if len(fields) > 49 else 0
    return bool(flags & PF_EXITING) and (exit_code & 0x7F) != 0


@dataclass
class Upload:
    sr: LocalSR
    name: str
    path: Path
    fd: int
    request: ImportName | None
    lock_fd: int | None = None
    size: int = 0
    handles: int = 0
    dirty: bool = False
    applied: bool = False
    writers: set[int] = field(default_factory=set)
    mtime_ns: int = field(default_factory=time.time_ns)

    def write(self, offset: int, data: bytes) -> int:
        end = offset + len(data)
        if end > MAX_UPLOAD_SIZE:
            raise TooLarge(f"an upload may not exceed {MAX_UPLOAD_SIZE} bytes")
        written = os.pwrite(self.fd, data, offset)
        self.size = max(self.size, offset + written)
        self.dirty = True
        self.mtime_ns = time.time_ns()
        return written

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, min(length, max(0, self.size - offset)), offset)

    def truncate(self, size: int) -> None:
        if size > MAX_UPLOAD_SIZE:
            raise TooLarge(f"an upload may not exceed {MAX_UPLOAD_SIZE} bytes")
        os.ftruncate(self.fd, size)
        self.size = size
        self.dirty = True
        self.mtime_ns = time.time_ns()

    @property
    def ready(self) -> bool:
        """Validly named and holding data not yet applied."""
        return self.request is not None and self.dirty and not self.applied

    def apply(self) -> ImportResult:
        """Parse and apply (blocking).  Raises the import's VdifsError."""
        assert self.request is not None
        self.applied = True
        request = self.request
        return run_import(
            self.sr,
            name=self.name,
            fmt=request.fmt,
            read_at=file_reader(self.fd),
            size=self.size,
            target=request.target,
            new_name=request.new_name,
        )

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


class Uploads:
    """The ``import/`` directory's live entries."""

    def __init__(self, sr: LocalSR, read_only: bool = False) -> None:
        self.sr = sr
        self.read_only = read_only
        self.entries: dict[str, Upload] = {}
        self.remove_stale()

    def remove_stale(self) -> None:
        """Staging files of a daemon that died are garbage: nobody can finish them."""
        for entry in os.scandir(self.sr.staging_dir):
            if not entry.name.endswith(".upload"):
                continue
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            finally:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)

    def _request(self, name: str) -> ImportName | None:
        if "/" in name or "\0" in name or len(name.encode()) > 255:
            raise InvalidArgument(f"invalid file name {name!r}")
        known = {r.uuid for r in self.sr.list_vdis()}
        request = parse_import_name(name, known)
        if (
            request is not None
            and request.target is not None
            and (self.sr.get_vdi(request.target).is_a_snapshot)
        ):
            raise ReadOnly(f"VDI {request.target} is a snapshot: it cannot be imported into")
        return request

    def _lock(self, request: ImportName | None) -> int | None:
        if request is None:
            return None
        key = request.target if request.target is not None else f"new-{request.new_name}"
        return target_lock(self.sr, key)

    def create(self, name: str, pid: int) -> Upload:
        if self.read_only:
            raise ReadOnly("the mount is read-only")
        if name in self.entries:
            raise Busy(f"{name} is already being uploaded")
        request = self._request(name)
        lock_fd = self._lock(request)
        path = self.sr.staging_dir / f"{secrets.token_hex(8)}.upload"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # marks it live for remove_stale in other processes
        upload = Upload(self.sr, name, path, fd, request, lock_fd)
        upload.writers.add(pid)
        self.entries[name] = upload
        return upload

    def get(self, name: str) -> Upload:
        try:
            return self.entries[name]
        except KeyError:
            raise NotFound(name) from None

    def rename(self, old: str, new: str) -> Upload:
        upload = self.get(old)
        if new in self.entries:
            raise Busy(f"{new} is already being uploaded")
        request = self._request(new)
        lock_fd = self._lock(request)
        if upload.lock_fd is not None:
            os.close(upload.lock_fd)
        upload.lock_fd = lock_fd
        upload.request = request
        upload.name = new
        upload.applied = False
        upload.dirty = upload.dirty or upload.size > 0
        del self.entries[old]
        self.entries[new] = upload
        return upload

    def remove(self, upload: Upload) -> None:
        if self.entries.get(upload.name) is upload:
            del self.entries[upload.name]
        upload.discard()

    def finish(self, upload: Upload) -> None:
        """After an attempt (done or failed) with no handle left: the entry goes."""
        if upload.handles == 0:
            self.remove(upload)

    def close_all(self) -> None:
        for upload in list(self.entries.values()):
            self.remove(upload)


def apply_or_explain(upload: Upload) -> ImportResult:
    """Apply, unless the writer was killed mid-way; always leaves ``upload.applied``."""
    killed = [pid for pid in upload.writers if writer_was_killed(pid)]
    if killed:
        upload.applied = True
        record_interrupted(upload.sr, upload.name, upload.request, upload.size)
        raise InvalidArgument(
            f"{upload.name}: the writer (pid {killed[0]}) was killed; not applied"
        )
    return upload.apply()
