"""Files being written into ``import/``: staging, naming, and when to apply.

An upload is staged in a sparse scratch file of the backend as it arrives.
It is applied (see :mod:`vdifs.imports.engine`) when the last handle of a
validly named upload is closed, or when a staged file is renamed onto a valid
name (rsync's temporary file).  Applying is blocking work: the adapter runs
:meth:`Upload.apply` in a thread and turns its error into the errno of
``close()`` or ``rename()``.

One import per target: the backend's import lock is held from the moment an
upload names a target until it is applied or discarded, so a second upload
(or a concurrent ``vdifs import``) gets EBUSY.

One writer per upload: a second open for writing of a name that is being
written gets EBUSY, and the first upload goes on unharmed.

An upload name is used once.  A refused upload leaves ``import/`` at once; an
applied one leaves an empty stub for :data:`SETTLED_SECONDS`, so that tools
which stat or set the times of the file after closing it (``rsync
--inplace``) succeed.  The stub holds nothing: writing into it, with or
without ``O_TRUNC``, starts a new upload from zero bytes.  Opened without
``O_TRUNC`` (``truncate``, ``cat >>``, ``dd conv=notrunc``, ``rsync
--inplace``), the new upload must write the file's first bytes or it is
refused: so what was applied is never applied again with holes as zeros,
while ``rsync --inplace`` of a whole image works.  Opening the stub for
writing and closing it unwritten (``touch``) leaves it as it was.

Every upload carries a whole image, its holes being zeros, and a raw file
must be exactly the disk's size (:mod:`vdifs.imports.engine`): separate ``dd
conv=notrunc`` runs into one name never add up to a disk (write into a live
VDI's ``raw.img`` to change part of a disk).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from vdifs.errors import Busy, InvalidArgument, NameTooLong, NotFound, ReadOnly, TooLarge
from vdifs.imports.engine import (
    ImportJob,
    ImportName,
    ImportResult,
    file_reader,
    parse_import_name,
    record_interrupted,
    record_not_applied,
    run_import,
)
from vdifs.imports.streaming import ImageStream, Qcow2Stream, VhdStream
from vdifs.model import check_name
from vdifs.storage.backend import Backend, Pin

log = logging.getLogger(__name__)

MAX_UPLOAD_SIZE = 64 << 40  # the SR's largest disk plus any image's metadata
SETTLED_SECONDS = 60.0  # an applied upload stays listed this long (rsync stats it after close)
PF_EXITING = 0x4  # linux/sched.h: the task is exiting
STREAMS: dict[str, type[ImageStream]] = {"vhd": VhdStream, "qcow2": Qcow2Stream}


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


def still_open_by(pid: int, name: str, mountpoint: str | None = None) -> bool:
    """Whether a process holds another descriptor of ``import/<name>``.

    ``close()`` of one of several descriptors of a file (dd dup2()s its
    output onto stdout and closes the original) also sends a FUSE flush: it
    must not start the import.  procfs lists the descriptors left; readlink
    is answered by procfs, never by this filesystem, so this cannot deadlock.
    With the mountpoint known, only that very path counts: ``cp
    ~/import/disk.raw <mnt>/import/disk.raw`` still holds its source open.
    """
    suffix = f"{mountpoint or ''}/import/{name}"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, PermissionError):
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        target = target.removesuffix(" (deleted)")
        if target == suffix if mountpoint else target.endswith(suffix):
            return True
    return False


class State(enum.Enum):
    """Where an upload is in its life (see vdifs.imports.directory)."""

    RECEIVING = "receiving"  # bytes arriving; applied when its last writer closes it
    APPLYING = "applying"  # an attempt was made (or is under way): never applied again
    FAILED = "failed"  # refused, failed, abandoned or unlinked: leaves import/ at once
    DONE = "done"  # applied and its data dropped: an empty stub until it expires


@dataclass
class Upload:
    sr: Backend
    name: str
    path: Path
    fd: int
    request: ImportName | None
    lock: Pin | None = None
    size: int = 0
    handles: int = 0
    write_handles: int = 0  # at most one: a second writer gets EBUSY
    dirty: bool = False  # an attempt to apply at close (created, written or truncated)
    start_written: bool = False  # byte 0 was written
    any_written: bool = False  # some bytes were written, not only a size set
    reopened: bool = False  # an applied name reopened without O_TRUNC: must write byte 0
    state: State = State.RECEIVING
    writers: set[int] = field(default_factory=set)
    mtime_ns: int = field(default_factory=time.time_ns)
    settled_ns: int = 0  # when it became DONE: the stub expires after SETTLED_SECONDS
    error: BaseException | None = None  # why, for every close() of the upload
    stream: ImageStream | None = None  # an image applied as it arrives

    def start_stream(self) -> None:
        """Apply a validly named VHD or qcow2 while it arrives (see vdifs.imports.streaming)."""
        request = self.request
        self.stream = None
        if request is None or request.fmt not in STREAMS:
            return

        def make_job() -> ImportJob:
            return ImportJob(
                self.sr,
                name=self.name,
                fmt=request.fmt,
                target=request.target,
                new_name=request.new_name,
            )

        self.stream = STREAMS[request.fmt](make_job, self.fd)

    def accept(self, offset: int, length: int) -> None:
        """Account for a write about to be stored (on the event loop, in arrival order)."""
        if offset + length > MAX_UPLOAD_SIZE:
            raise TooLarge(f"an upload may not exceed {MAX_UPLOAD_SIZE} bytes")
        self.size = max(self.size, offset + length)
        self.dirty = True
        self.start_written = self.start_written or (offset == 0 and length > 0)
        self.any_written = self.any_written or length > 0
        self.mtime_ns = time.time_ns()

    def store(self, offset: int, data: bytes) -> None:
        """Stage and stream an accepted write (blocking: hashing, storing)."""
        stream = self.stream
        staged = stream is None or stream.wants_staged(offset, len(data))
        if staged and os.pwrite(self.fd, data, offset) != len(data):
            raise OSError(errno.ENOSPC, "short write to the staging file")
        if stream is not None:
            stream.feed(offset, data)

    def abandon(self, exc: BaseException) -> None:
        """A write could not be stored: nothing will be applied, and the records say why."""
        if self.state is not State.RECEIVING:
            return
        self.state = State.FAILED
        self.error = exc
        stream = self.stream
        if stream is not None and stream.state == "failed":
            return  # the stream recorded its own failure
        if stream is not None:
            stream.close()
        if self.request is not None:
            err = getattr(exc, "errno", None) or errno.EIO
            record_not_applied(
                self.sr, self.name, self.request, self.size, f"a write failed: {exc}", err
            )

    def read(self, offset: int, length: int) -> bytes:
        length = min(length, max(0, self.size - offset))
        return os.pread(self.fd, length, offset) if length else b""

    def truncate(self, size: int) -> None:
        if self.state is State.DONE:
            raise Busy(f"{self.name} was applied: write a new file to import again")
        if self.state is not State.RECEIVING:
            raise Busy(f"{self.name} is being applied, or failed")
        if size > MAX_UPLOAD_SIZE:
            raise TooLarge(f"an upload may not exceed {MAX_UPLOAD_SIZE} bytes")
        if self.stream is not None:
            self.stream.truncated_to(size)
        os.ftruncate(self.fd, size)
        self.size = size
        self.start_written = self.start_written and size > 0
        self.any_written = self.any_written and size > 0
        self.dirty = True
        self.mtime_ns = time.time_ns()

    @property
    def ready(self) -> bool:
        """Validly named and holding data not yet applied."""
        return self.request is not None and self.dirty and self.state is State.RECEIVING

    def apply(self) -> ImportResult:
        """Parse and apply (blocking).  Raises the import's VdifsError."""
        assert self.request is not None
        self.state = State.APPLYING
        request = self.request
        if self.reopened and not self.start_written:
            # An applied name opened again without O_TRUNC and written elsewhere than
            # at its start (truncate, cat >>, dd conv=notrunc): never a new image,
            # and applying its holes as zeros would wipe the disk.
            error = InvalidArgument(
                f"{self.name} was already applied; it was opened again and its first bytes"
                " were not written (a truncate, an append or a dd into part of the file?):"
                " an upload carries a whole image; write part of a disk into its raw.img"
            )
            record_not_applied(self.sr, self.name, request, self.size, str(error), error.errno)
            raise error
        stream = self.stream
        if stream is not None and stream.state in ("streaming", "failed"):
            return stream.finish(self.size, file_reader(self.fd))
        if stream is not None:
            stream.close()
        return run_import(
            self.sr,
            name=self.name,
            fmt=request.fmt,
            read_at=file_reader(self.fd),
            size=self.size,
            target=request.target,
            new_name=request.new_name,
            data_written=self.any_written,
        )

    def discard(self) -> None:
        """Drop the staged data and the target lock."""
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class Uploads:
    """The ``import/`` directory's live entries."""

    def __init__(self, sr: Backend, read_only: bool = False, mountpoint: str | None = None) -> None:
        self.sr = sr
        self.read_only = read_only
        self.mountpoint = mountpoint  # where import/ is, to tell its files from namesakes
        self.entries: dict[str, Upload] = {}

    def _request(self, name: str) -> ImportName | None:
        if len(name.encode("utf-8", "surrogateescape")) > 255:
            raise NameTooLong(f"a file name holds at most 255 bytes: {name[:40]!r}...")
        if "/" in name or "\0" in name:
            raise InvalidArgument(f"invalid file name {name!r}")
        known = {r.uuid for r in self.sr.list_vdis()}
        request = parse_import_name(name, known)
        if request is not None and request.new_name is not None:
            check_name(request.new_name)  # refused at create, before any byte is sent
        if (
            request is not None
            and request.target is not None
            and (self.sr.get_vdi(request.target).is_a_snapshot)
        ):
            raise ReadOnly(f"VDI {request.target} is a snapshot: it cannot be imported into")
        return request

    def _lock(self, request: ImportName | None) -> Pin | None:
        if request is None:
            return None
        key = request.target if request.target is not None else f"new-{request.new_name}"
        return self.sr.import_lock(key)

    def _staging(self, request: ImportName | None) -> tuple[Path, int, Pin | None]:
        """A scratch file and the target's import lock, both or neither."""
        path, fd = self.sr.scratch_file()
        try:
            return path, fd, self._lock(request)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise

    def _take_name(self, name: str) -> None:
        """Free a name for a new upload: a settled stub gives way, a live one does not."""
        existing = self.entries.get(name)
        if existing is None:
            return
        if existing.state is not State.DONE:
            raise Busy(f"{name} is already being uploaded")
        self.remove(existing)

    def create(self, name: str, pid: int) -> Upload:
        if self.read_only:
            raise ReadOnly("the mount is read-only")
        self._take_name(name)
        request = self._request(name)
        path, fd, lock = self._staging(request)
        # A created file is an attempt even if nothing is written: an empty
        # image is refused, never silently ignored.
        upload = Upload(self.sr, name, path, fd, request, lock, dirty=True, write_handles=1)
        upload.start_stream()
        upload.writers.add(pid)
        self.entries[name] = upload
        return upload

    def open_for_writing(self, upload: Upload, pid: int, *, truncate: bool = False) -> None:
        """A writer opens an existing name: EBUSY while another writes it.

        A stub of an applied upload becomes a new upload of the same name,
        starting from zero bytes whatever the open flags (see the module
        docstring); until something is written it is no attempt.
        """
        if upload.write_handles:
            raise Busy(f"{upload.name} is being written by another process")
        if upload.state is State.APPLYING:
            raise Busy(f"{upload.name} is being applied")
        if upload.state in (State.DONE, State.FAILED):
            request = self._request(upload.name)
            upload.discard()  # a failed upload a reader still holds: its data goes now
            upload.path, upload.fd, upload.lock = self._staging(request)
            upload.request = request
            upload.start_written = upload.any_written = False
            # With O_TRUNC (cp) a new upload, even if nothing is written (an empty
            # image is refused); without, nothing until written, and then from byte 0.
            upload.dirty = truncate
            upload.reopened = not truncate
            upload.error = None
            upload.size = 0
            upload.state = State.RECEIVING
            upload.writers = set()
            upload.start_stream()
        elif truncate:
            upload.truncate(0)
        upload.writers.add(pid)
        upload.write_handles += 1

    def release(self, upload: Upload, *, writing: bool) -> None:
        """A handle of an upload was closed (after its flush)."""
        upload.handles -= 1
        if writing:
            upload.write_handles -= 1
        if upload.handles == 0 and (upload.state is not State.RECEIVING or not upload.dirty):
            self.finish(upload)

    def visible(self) -> list[str]:
        """Names in import/ (stubs of applied uploads expire)."""
        now = time.time_ns()
        for upload in list(self.entries.values()):
            if (
                upload.state is State.DONE
                and upload.handles == 0
                and now - upload.settled_ns > SETTLED_SECONDS * 1e9
            ):
                self.remove(upload)
        return sorted(self.entries)

    def get(self, name: str) -> Upload:
        try:
            return self.entries[name]
        except KeyError:
            raise NotFound(name) from None

    def rename(self, old: str, new: str) -> Upload:
        upload = self.get(old)
        if upload.state is not State.RECEIVING:
            raise Busy(f"{old} was already applied")
        if upload.stream is not None and upload.stream.applied_any:
            # Its data went to the import as it arrived, not to the staging file.
            raise Busy(f"{old} is being applied as it arrives: rename it before writing it")
        self._take_name(new)
        request = self._request(new)
        lock = self._lock(request)
        if upload.lock is not None:
            upload.lock.release()
        upload.lock = lock
        upload.request = request
        upload.name = new
        if upload.stream is not None:
            upload.stream.close()
            upload.stream = None  # renamed after the fact: parse the staged whole
        upload.dirty = upload.dirty or upload.size > 0
        del self.entries[old]
        self.entries[new] = upload
        return upload

    def remove(self, upload: Upload) -> None:
        if self.entries.get(upload.name) is upload:
            del self.entries[upload.name]
        upload.discard()

    def finish(self, upload: Upload) -> None:
        """After an attempt (done or failed) with no handle left: data goes, a stub stays.

        The stub keeps the name and size visible for a while, so that tools
        that stat, chmod or utime the file after closing it (rsync) succeed.
        """
        if upload.handles == 0 and upload.state is not State.DONE:
            if upload.state is State.FAILED:
                self.remove(upload)  # the same copy can be tried again at once
                return
            # Applied, or a stub opened for writing and closed unwritten: a stub again.
            upload.discard()
            upload.size = 0
            upload.state = State.DONE
            upload.settled_ns = time.time_ns()

    def close_all(self) -> None:
        for upload in list(self.entries.values()):
            self.remove(upload)


def apply_or_explain(upload: Upload) -> ImportResult:
    """Apply, unless the writer was killed mid-way; leaves the upload APPLYING or FAILED."""
    killed = [pid for pid in upload.writers if writer_was_killed(pid)]
    if killed:
        upload.state = State.FAILED
        record_interrupted(upload.sr, upload.name, upload.request, upload.size)
        upload.error = InvalidArgument(
            f"{upload.name}: the writer (pid {killed[0]}) was killed; not applied"
        )
        raise upload.error
    try:
        return upload.apply()
    except BaseException as exc:
        upload.state = State.FAILED
        upload.error = exc
        raise
