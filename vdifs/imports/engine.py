"""Applying an uploaded VHD, qcow2 or raw image to a VDI, in one transaction.

The engine reads an image through an injected ``read_at`` (a staged upload
in the SR, or the user's file for ``vdifs import``), lets the format's parser
validate it and list its writes, assembles them into 64 KiB chunks and hands
those to a backend :class:`~vdifs.storage.backend.Writer`.  Nothing touches the
target until the writer commits; any error before that drops what was
staged.  Every attempt is recorded in the SR's ``imports`` table, which the
mount shows as ``import/.status/`` and the CLI as ``vdifs import-status``.
"""

from __future__ import annotations

import errno as errno_module
import logging
import os
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Protocol

from vdifs.errors import (
    InvalidArgument,
    MalformedImage,
    NotFound,
    ReadOnly,
    TooLarge,
    VdifsError,
    WrongBase,
)
from vdifs.formats import c_qcow2
from vdifs.formats.vhd_parse import is_vhd_footer
from vdifs.model import CHUNK_SIZE, SECTOR_SIZE, VdiRecord
from vdifs.storage.backend import Backend, ContentMap, Writer

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".vhd": "vhd", ".qcow2": "qcow2", ".raw": "raw", ".img": "raw"}
OPEN_CHUNK_LIMIT = 1024  # partly written chunks held in memory (64 MiB) before spilling
READ_PIECE = 1 << 20


class ImageWrite(Protocol):
    @property
    def virtual_offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def file_offset(self) -> int | None: ...


class ParsedImage(Protocol):
    @property
    def virtual_size(self) -> int: ...
    @property
    def is_delta(self) -> bool: ...
    @property
    def identity(self) -> bytes | None: ...
    @property
    def parent_identity(self) -> bytes | None: ...
    @property
    def parent_name(self) -> str | None: ...
    @property
    def geometry_slack(self) -> int: ...
    def writes(self) -> Iterator[Any]: ...


ReadAt = Callable[[int, int], bytes]


@dataclass(frozen=True)
class ImportName:
    """What a file name in ``import/`` asks for."""

    fmt: str
    target: str | None  # an existing VDI's uuid
    new_name: str | None  # or the name of a VDI to create


def parse_import_name(name: str, known_uuids: set[str] | None = None) -> ImportName | None:
    """``<uuid>.vhd`` applies into that VDI, ``<name>.vhd`` creates ``<name>``.

    Any other name (an editor's or rsync's temporary file) returns None: it
    is staged until renamed onto a valid name.
    """
    stem, dot, ext = name.rpartition(".")
    fmt = IMAGE_EXTENSIONS.get(f".{ext.lower()}") if dot else None
    if fmt is None or not stem or stem.startswith("."):
        return None
    try:
        is_uuid = str(uuidlib.UUID(stem)) == stem.lower()
    except ValueError:
        is_uuid = False
    if is_uuid:
        if known_uuids is not None and stem.lower() not in known_uuids:
            # A mistyped target must not quietly become a new VDI named like a uuid.
            raise NotFound(
                f"no VDI {stem}: to create a new VDI, name the file after its name_label"
            )
        return ImportName(fmt, stem.lower(), None)
    return ImportName(fmt, None, stem)


def parse_image(fmt: str, read_at: ReadAt, size: int) -> ParsedImage | None:
    """The parsed image, or None for raw (which has no structure)."""
    if fmt == "vhd":
        from vdifs.formats.vhd_parse import parse_vhd

        return parse_vhd(read_at, size)
    if fmt == "qcow2":
        from vdifs.formats.qcow2_parse import parse_qcow2

        return parse_qcow2(read_at, size)
    if fmt == "raw":
        return None
    raise InvalidArgument(f"unknown format {fmt!r}")


@dataclass(slots=True)
class _OpenChunk:
    """A partly written chunk: its bytes, and how many of them writes have set."""

    data: bytearray
    filled: int = 0


class Applier:
    """Turns writes at any alignment into whole chunks for a backend Writer.

    A chunk that a write covers whole goes to the writer at once.  A partly
    covered chunk starts from its current content (the writer's staged copy,
    else zeros for a full image or the target's content for a delta) and waits
    in memory until writes have filled all of it (a streamed VHD splits nearly
    every chunk across two FUSE writes), :meth:`settle` says nothing more will
    come for it, or more than :data:`OPEN_CHUNK_LIMIT` are waiting.  A chunk
    stored early is read back from the writer's staged copy if more of it
    arrives: early is only slower.
    """

    def __init__(self, sr: Backend, writer: Writer, base: ContentMap | None) -> None:
        self.sr = sr
        self.writer = writer
        self.base = base  # None: a full image, whatever is not written is zero
        self.open: dict[int, _OpenChunk] = {}
        self.bytes_applied = 0

    def _current(self, chunk: int) -> bytearray:
        staged = self.writer.staged_chunk(chunk)
        if staged is not None:
            return bytearray(staged)
        if self.base is None:
            return bytearray(CHUNK_SIZE)
        current = bytearray(CHUNK_SIZE)
        self.sr.read_into(self.base, chunk * CHUNK_SIZE, memoryview(current))
        return current

    def _store(self, chunk: int) -> None:
        self.writer.write_chunk(chunk, self.open.pop(chunk).data)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        limit = self.writer.virtual_size
        if offset + len(view) > limit:
            # An image a little larger than its disk (VHD geometry rounding):
            # what lies past the disk's end must be zeros.
            keep = max(0, limit - offset)
            if bytes(view[keep:]) != bytes(len(view) - keep):
                raise TooLarge(f"the image holds data past the disk's end at byte {limit}")
            self.bytes_applied += len(view) - keep
            view = view[:keep]
        pos = 0
        while pos < len(view):
            chunk, within = divmod(offset + pos, CHUNK_SIZE)
            whole = (len(view) - pos) // CHUNK_SIZE if within == 0 else 0
            if whole:
                if self.open:
                    for c in range(chunk, chunk + whole):
                        self.open.pop(c, None)
                self.writer.write_chunks(chunk, view[pos : pos + whole * CHUNK_SIZE])
                pos += whole * CHUNK_SIZE
                continue
            take = min(CHUNK_SIZE - within, len(view) - pos)
            held = self.open.get(chunk)
            if held is None:
                held = self.open[chunk] = _OpenChunk(self._current(chunk))
            held.data[within : within + take] = view[pos : pos + take]
            # Parsed images write each byte once: full means complete.
            held.filled += take
            if held.filled >= CHUNK_SIZE:
                self._store(chunk)
            elif len(self.open) > OPEN_CHUNK_LIMIT:
                self._store(next(iter(self.open)))
            pos += take
        self.bytes_applied += len(view)

    def settle(self, start: int, end: int) -> None:
        """No more writes will come for the bytes in [start, end): store their open chunks."""
        for chunk in [c for c in self.open if start <= c * CHUNK_SIZE < end]:
            self._store(chunk)

    def finish(self) -> None:
        for chunk in list(self.open):
            self._store(chunk)


@dataclass
class ImportResult:
    id: int
    target: str
    chunks_applied: int
    bytes_applied: int
    seconds: float
    generation: int = 0
    """The target's generation the import made (its digest is of that state)."""


def _inflate(read_at: ReadAt, write: Any) -> bytes:
    from vdifs.formats.qcow2_parse import inflate_cluster

    return inflate_cluster(read_at(write.file_offset, write.compressed_length), write.length)


def check_base(
    sr: Backend,
    target: VdiRecord,
    target_map: ContentMap,
    parsed: ParsedImage,
    name: str,
) -> None:
    """Refuse a delta unless the target holds exactly the base it was made on.

    The target holds the base when the image most recently imported into it,
    unchanged since, is that base; or when a snapshot of this SR is that
    base and the target's blocks are the snapshot's.
    """
    parent_id = parsed.parent_identity
    parent_file = PurePosixPath(parsed.parent_name or "").name
    parent_stem = parent_file.rpartition(".")[0] or parent_file
    identity, last_name, generation = sr.last_import(target.uuid)
    if generation == target.generation and (
        (parent_id is not None and identity == parent_id)
        or (parent_id is None and parent_file and parent_file == last_name)
    ):
        return
    for record in sr.list_vdis():
        if not record.is_a_snapshot:
            continue
        named = record.state_uuid.bytes == parent_id or (
            parent_id is None and parent_stem == record.uuid
        )
        if named:
            if not target_map.diff(sr.state(record.uuid)[1]).blocks:
                return
            raise WrongBase(
                f"{name} is a delta whose base is snapshot {record.uuid}, but VDI {target.uuid}"
                " does not hold that base's content (use vdifs import --force to apply it anyway)"
            )
    what = f"parent {uuidlib.UUID(bytes=parent_id)}" if parent_id else f"backing {parent_file!r}"
    raise WrongBase(
        f"{name} is a delta ({what}) and VDI {target.uuid} does not hold its base: import the"
        " base first, or use vdifs import --force"
    )


class ImportJob:
    """One import, in phases: :meth:`prepare` (checks, no writes), applying
    (through :attr:`applier`), :meth:`commit`; :meth:`fail` drops everything.

    Every job is recorded in the SR's ``imports`` table from its start to its
    outcome.  A streamed VHD drives the same phases as its bytes arrive.
    """

    def __init__(
        self,
        sr: Backend,
        *,
        name: str,
        fmt: str,
        target: str | None,
        new_name: str | None = None,
        force: bool = False,
        received: int = 0,
        data_written: bool = True,
    ) -> None:
        self.sr = sr
        self.data_written = data_written  # False: only a size was set (truncate)
        self.name = name
        self.fmt = fmt
        self.target = target
        self.new_name = new_name
        self.force = force
        self.started = time.monotonic()
        self.id = sr.imports.start(name, target, fmt, received)
        self.writer: Writer | None = None
        self._applier: Applier | None = None
        self.finished = False
        self.notes: list[str] = []  # what the status record should say besides the outcome

    @property
    def applier(self) -> Applier:
        assert self._applier is not None, "prepare() first"
        return self._applier

    def prepare(self, parsed: ParsedImage | None, image_size: int) -> None:
        """Check sizes, the target and a delta's base; open the writer."""
        sr, name, target = self.sr, self.name, self.target
        is_delta = parsed is not None and parsed.is_delta
        if target is None:
            if is_delta:
                raise InvalidArgument(
                    f"{name} is a delta: it can only be imported into the VDI holding its base"
                )
            if image_size == 0:
                raise InvalidArgument(f"{name} is empty: nothing to create a VDI from")
            self._check_written(image_size)
            writer = sr.writer(
                None, replace=True, new_vdi=(self.new_name or name, image_size), bulk=True
            )
            base_map = None
        else:
            record, target_map = sr.state(target)
            if record.is_a_snapshot:
                raise ReadOnly(f"VDI {target} is a snapshot: it cannot be imported into")
            grow_to = self._check_size(parsed, image_size, record)
            self._check_written(image_size)
            if is_delta and not self.force:
                assert parsed is not None
                check_base(sr, record, target_map, parsed, name)
            # A full image replaces the disk; raw and deltas change what they carry.
            replace = parsed is not None and not is_delta
            writer = sr.writer(target, replace=replace, bulk=True)
            writer.expect_generation = record.generation
            if grow_to is not None:
                writer.grow(grow_to)
            base_map = None if replace else target_map
        writer.import_identity = parsed.identity if parsed is not None else None
        writer.import_name = PurePosixPath(name).name
        self.writer = writer
        self._applier = Applier(sr, writer, base_map)

    def _check_written(self, image_size: int) -> None:
        if not self.data_written and image_size:
            # A size alone (truncate, or cp of an image that is all holes) would
            # zero the disk: refused rather than guessed at.
            raise InvalidArgument(
                f"nothing was written into {self.name}, only its size was set (a truncate?):"
                " an upload carries the image's bytes"
            )

    def _check_size(
        self, parsed: ParsedImage | None, image_size: int, record: VdiRecord
    ) -> int | None:
        """Refuse an image whose size does not fit the disk; the size to grow it to, if any."""
        disk_size = record.virtual_size
        sizes = f"{self.name} holds {image_size} bytes but VDI {record.uuid} has {disk_size}"
        if parsed is None and image_size != disk_size:
            # A raw file has no trailer: its size is the only sign that the copy was whole.
            if image_size > disk_size:
                raise TooLarge(sizes)
            raise InvalidArgument(
                f"{sizes}: a raw image must be exactly the disk's size (a shorter file may be"
                " a copy cut short)"
            )
        if image_size <= disk_size:
            return None
        assert parsed is not None
        if parsed.is_delta:
            # The disk was resized between the base and this delta (VDI.resize).
            self.notes.append(
                f"VDI {record.uuid} grew from {disk_size} to {image_size} bytes:"
                " the delta's disk had been resized"
            )
            return image_size
        if image_size - disk_size < parsed.geometry_slack:
            self.notes.append(
                f"the image's size, {image_size} bytes, is its CHS geometry rounded up"
                f" {image_size - disk_size} bytes past the disk's end (qemu-img without"
                " force_size); nothing past the disk's end held data"
            )
            return None
        raise TooLarge(sizes)

    def commit(self, received: int | None = None) -> ImportResult:
        writer = self.writer
        assert writer is not None
        self.applier.finish()
        record = writer.commit()
        self.notes += writer.notes
        self.finished = True
        seconds = time.monotonic() - self.started
        self.sr.imports.end(
            self.id,
            "done",
            None,
            0,
            writer.chunks_written,
            seconds,
            record.uuid,
            received,
            "; ".join(self.notes) or None,
        )
        log.info(
            "import %s into %s: %d chunks in %.2f s",
            self.name,
            record.uuid,
            writer.chunks_written,
            seconds,
        )
        return ImportResult(
            self.id,
            record.uuid,
            writer.chunks_written,
            self.applier.bytes_applied,
            seconds,
            record.generation,
        )

    def cancel(self) -> None:
        """Forget this job entirely (a streamed upload fell back to a whole parse)."""
        if self.writer is not None:
            self.writer.abort()
        self.finished = True
        self.sr.imports.forget(self.id)

    def fail(self, exc: BaseException, received: int | None = None) -> None:
        """Drop what was staged and record why; the target is as it was."""
        if self.finished:
            return
        self.finished = True
        if self.writer is not None:
            self.writer.abort()
        if isinstance(exc, VdifsError):
            message, code = str(exc), exc.errno
        else:
            message, code = f"internal error: {exc!r}", errno_module.EIO
        seconds = time.monotonic() - self.started
        self.sr.imports.end(self.id, "failed", message, code, 0, seconds, None, received)


def run_import(
    sr: Backend,
    *,
    name: str,
    fmt: str,
    read_at: ReadAt,
    size: int,
    target: str | None,
    new_name: str | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    data_written: bool = True,
) -> ImportResult:
    """Validate and apply one whole image; record the outcome whatever it is."""
    job = ImportJob(
        sr,
        name=name,
        fmt=fmt,
        target=target,
        new_name=new_name,
        force=force,
        received=size,
        data_written=data_written,
    )
    try:
        parsed = parse_image(fmt, read_at, size)
        if parsed is not None:
            tail = read_at(size - SECTOR_SIZE, SECTOR_SIZE) if size >= SECTOR_SIZE else b""
            refuse_polyglot(fmt, read_at(0, SECTOR_SIZE), tail)
        job.prepare(parsed, size if parsed is None else parsed.virtual_size)
        if parsed is None:
            for offset in range(0, size, READ_PIECE):
                data = read_at(offset, min(READ_PIECE, size - offset))
                if len(data) != min(READ_PIECE, size - offset):
                    raise MalformedImage(f"{name} ended early at byte {offset + len(data)}")
                job.applier.write(offset, data)
                if progress:
                    progress(offset + len(data))
        else:
            _apply_writes(parsed, read_at, job.applier, progress)
        return job.commit()
    except BaseException as exc:
        job.fail(exc)
        raise


def _apply_writes(
    parsed: ParsedImage, read_at: ReadAt, applier: Applier, progress: Callable[[int], None] | None
) -> None:
    for write in parsed.writes():
        apply_write(applier, write, read_at, parsed.virtual_size)
        if progress and write.file_offset is not None:
            progress(write.file_offset + write.length)


def refuse_polyglot(fmt: str, first_sector: bytes, last_sector: bytes) -> None:
    """Refuse a file that is a valid image in both formats: it reads as two disks.

    A qcow2 image with a fixed VHD's footer appended, or a fixed VHD whose
    data starts with a qcow2 header, means different bytes to different
    readers; like OpenStack's format inspector, vdifs accepts neither.
    """
    if fmt == "qcow2" and is_vhd_footer(last_sector):
        raise MalformedImage(
            "the file is a qcow2 image that also ends with a VHD footer: it reads as two"
            " different disks; refused"
        )
    if (
        fmt == "vhd"
        and first_sector[:4] == c_qcow2.MAGIC
        and int.from_bytes(first_sector[4:8], "big") in (c_qcow2.VERSION_2, c_qcow2.VERSION_3)
    ):
        raise MalformedImage(
            "the file is a fixed VHD whose data starts with a qcow2 header: it reads as two"
            " different disks; refused (import its data as raw if that disk is what you mean)"
        )


def check_inside(write: ImageWrite, limit: int) -> None:
    if write.virtual_offset < 0 or write.virtual_offset + write.length > limit:
        raise MalformedImage("the image writes outside its virtual size")


def apply_write(
    applier: Applier, write: ImageWrite, read_at: ReadAt, limit: int, length: int | None = None
) -> None:
    """Apply one write of a parsed image; only its first ``length`` bytes, if given."""
    check_inside(write, limit)
    length = write.length if length is None else length
    if write.file_offset is None:
        for pos in range(0, length, READ_PIECE):
            applier.write(write.virtual_offset + pos, bytes(min(READ_PIECE, length - pos)))
    elif getattr(write, "compressed_length", 0):
        applier.write(write.virtual_offset, _inflate(read_at, write))
    else:
        for pos in range(0, length, READ_PIECE):
            n = min(READ_PIECE, length - pos)
            data = read_at(write.file_offset + pos, n)
            if len(data) != n:
                raise MalformedImage("the image ended inside a data block")
            applier.write(write.virtual_offset + pos, data)


# -- the status record ------------------------------------------------------------


def record_interrupted(sr: Backend, name: str, request: ImportName | None, size: int) -> None:
    """Record an upload whose writer died before finishing it."""
    record_not_applied(
        sr,
        name,
        request,
        size,
        "the upload was interrupted (its writer was killed); nothing was applied",
        errno_module.EINVAL,
    )


def record_not_applied(
    sr: Backend, name: str, request: ImportName | None, size: int, error: str, errno: int
) -> None:
    """Record an upload that failed before its import could start or finish."""
    fmt = request.fmt if request is not None else "unknown"
    target = request.target if request is not None else None
    import_id = sr.imports.start(name, target, fmt, size)
    sr.imports.end(import_id, "failed", error, errno, 0, 0.0)


def record_import_digest(sr: Backend, result: ImportResult) -> str | None:
    """The sha256 of the disk as the import left it, into the import's status (so
    ``vdifs import-status`` tells whether a restore equals a backed-up raw.img's
    digest). It reads the whole disk: the mount runs it after the import, in the
    background; None if the disk changed again first."""
    from vdifs.checksums import file_digest
    from vdifs.exports import DiskState, Export

    record, content = sr.state(result.target)
    if record.generation != result.generation:
        return None
    pin = sr.keep_readable(content)
    try:
        digest = file_digest(Export(sr, DiskState(record, content), "raw"))
    finally:
        pin.release()
    sr.imports.record_digest(result.id, digest)
    return digest


def import_file(
    sr: Backend,
    fd: int,
    name: str,
    fmt: str,
    *,
    target: str | None,
    new_name: str | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import a whole file (``vdifs import``, ``vdifs serve``'s PUT), holding the
    target's import lock: into VDI ``target``, or a new VDI ``new_name``."""
    lock = sr.import_lock(target if target is not None else f"new-{new_name}")
    try:
        result = run_import(
            sr,
            name=name,
            fmt=fmt,
            read_at=file_reader(fd),
            size=os.fstat(fd).st_size,
            target=target,
            new_name=new_name,
            force=force,
            progress=progress,
        )
        record_import_digest(sr, result)
        return result
    finally:
        lock.release()


def file_reader(fd: int) -> ReadAt:
    def read_at(offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise MalformedImage("negative offset in image")
        return os.pread(fd, length, offset)

    return read_at
