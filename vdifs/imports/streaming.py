"""Images applied while they are being written into ``import/``.

``cp backup.vhd import/<uuid>.vhd`` writes front to back.  Once an image's
metadata has arrived, it is validated against a presumed file size (the
smallest, or largest, the metadata allows), the import is prepared (sizes,
the delta's base), and from then on data is applied as it arrives:

- a dynamic or differencing VHD (:class:`VhdStream`): a block's sector
  bitmap precedes its data, so once the bitmap is in, the block's runs of
  present sectors are applied straight from the writes.  What arrived
  before the first run was applied is punched out of the staging file;
  later block bytes never reach it (only the footer does).
- a qcow2 whose L1 and L2 tables come first (vdifs' own exports, and any
  image whose tables end within
  :data:`~vdifs.formats.qcow2_parse.MAX_STREAM_HEAD`, such as qemu-img's),
  run by run (:class:`Qcow2Stream`).  Its head is staged; data past it never is.

So the upload never sits whole on disk, memory holds at most a VHD block's
bitmap, and ``close()`` only checks the end and commits.

Anything else (a fixed VHD, metadata far from the start, compressed qcow2
clusters, a write behind the stream before anything was applied) falls back
to staging the whole upload and parsing it at close.  A write behind the
stream *after* data was applied cannot be honoured and fails the upload
with EINVAL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable, Iterator

from vdifs.errors import MalformedImage, VdifsError
from vdifs.formats import c_vhd
from vdifs.formats.base import NotStreamable
from vdifs.formats.qcow2_parse import Write as Qcow2Write
from vdifs.formats.qcow2_parse import metadata_length as qcow2_metadata_length
from vdifs.formats.qcow2_parse import parse_qcow2
from vdifs.formats.qcow2_parse import streamed_size as qcow2_streamed_size
from vdifs.formats.vhd_parse import BlockSpan, ParsedImage, parse_vhd, streamed_size
from vdifs.formats.vhd_parse import Write as VhdWrite
from vdifs.formats.vhd_parse import metadata_length as vhd_metadata_length
from vdifs.imports.engine import (
    ImageWrite,
    ImportJob,
    ImportResult,
    apply_write,
    check_inside,
    refuse_polyglot,
)

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free a staged range (it reads as zeros afterwards); False where unsupported."""
    result = _libc.fallocate(
        ctypes.c_int(fd),
        ctypes.c_int(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE),
        ctypes.c_long(offset),
        ctypes.c_long(length),
    )
    return result == 0


class _Head(Exception):
    """The presumed-size parse asked for bytes the head does not hold."""


_ZEROS = memoryview(bytes(1 << 20))
SECTOR_SIZE = c_vhd.SECTOR_SIZE


class ImageStream:
    """Feeds a sequentially written image into an :class:`ImportJob` (shared machinery).

    States: ``head`` (metadata arriving) -> ``streaming`` -> finished by
    :meth:`finish`; or ``off`` (staged whole, parsed at close); or ``failed``.
    """

    def __init__(self, make_job: Callable[[], ImportJob], staging_fd: int) -> None:
        self.make_job = make_job
        self.staging_fd = staging_fd
        self.state = "head"
        self.error: VdifsError | None = None
        self.pos = 0  # every byte below this has arrived (or was skipped over: zeros)
        self.job: ImportJob | None = None
        self.applied_any = False  # past this, falling back to staging is impossible
        self.staged_end = 0  # staged bytes lie below this offset
        self.tail = b""  # the last sector fed, ending at tail_end: a polyglot's VHD footer?
        self.tail_end = 0

    @property
    def active(self) -> bool:
        return self.state in ("head", "streaming")

    # -- what each format defines ----------------------------------------------------

    def wants_staged(self, offset: int, length: int) -> bool:
        """Whether these bytes must reach the staging file (asked before :meth:`feed`)."""
        raise NotImplementedError

    def _take_head(self, view: memoryview) -> memoryview:
        raise NotImplementedError

    def _take_body(self, view: memoryview) -> memoryview:
        raise NotImplementedError

    def _check_end(self, size: int, read_at: Callable[[int, int], bytes]) -> None:
        """At close: refuse an image whose end does not match what streamed."""
        raise NotImplementedError

    def _feed_run(self, write: ImageWrite, view: memoryview, limit: int) -> tuple[memoryview, bool]:
        """Apply the bytes of ``view`` (at ``self.pos``) that belong to ``write``.

        Bytes before the run are skipped over.  Returns what is left of
        ``view`` and whether the run is complete.
        """
        assert self.job is not None and write.file_offset is not None
        if self.pos < write.file_offset:
            skip = min(len(view), write.file_offset - self.pos)
            self.pos += skip
            view = view[skip:]
            if not len(view):
                return view, False
        check_inside(write, limit)
        start = self.pos - write.file_offset
        take = min(len(view), write.length - start)
        self.job.applier.write(write.virtual_offset + start, view[:take])
        self.applied_any = True
        self.pos += take
        return view[take:], start + take == write.length

    # -- feeding -------------------------------------------------------------------

    def _stage(self, offset: int, length: int) -> bool:
        self.staged_end = max(self.staged_end, offset + length)
        return True

    def feed(self, offset: int, data: bytes) -> None:
        """Take bytes just written at ``offset``; raises the upload's error if it failed."""
        if self.state == "failed":
            assert self.error is not None
            raise self.error
        if not self.active:
            return
        if offset < self.pos:
            self._behind(offset)
            return
        try:
            while self.pos < offset and self.active:
                # Skipped bytes are zeros (rsync --inplace writes only what differs).
                self._take(_ZEROS[: min(len(_ZEROS), offset - self.pos)])
            self._remember_tail(offset, data)
            self._take(memoryview(data))
        except VdifsError as exc:
            self._fail(exc)
            raise

    def _remember_tail(self, offset: int, data: bytes) -> None:
        """Keep the sector that ends the file so far (fed in order, gaps as zeros)."""
        if len(data) >= SECTOR_SIZE:
            self.tail = bytes(data[-SECTOR_SIZE:])
        else:
            gap = bytes(min(SECTOR_SIZE, max(0, offset - self.tail_end)))
            self.tail = (self.tail + gap + bytes(data))[-SECTOR_SIZE:]
        self.tail_end = offset + len(data)

    def last_sector(self, size: int) -> bytes:
        """The file's last sector once it is ``size`` bytes (fed in order up to there)."""
        padded = self.tail + bytes(min(SECTOR_SIZE, max(0, size - self.tail_end)))
        return padded[-SECTOR_SIZE:] if size >= SECTOR_SIZE else b""

    def _behind(self, offset: int) -> None:
        if self.applied_any:
            self._fail(
                MalformedImage(
                    f"the upload went back to byte {offset} after data past it was applied:"
                    " write images front to back (cp, dd, rsync), or use vdifs import"
                )
            )
            assert self.error is not None
            raise self.error
        self._stop_streaming("a write went back in the file")

    def _take(self, view: memoryview) -> None:
        while len(view):
            if self.state == "head":
                view = self._take_head(view)
            elif self.state == "streaming":
                view = self._take_body(view)
            else:
                self.pos += len(view)
                return

    # -- outcomes ----------------------------------------------------------------------

    def _stop_streaming(self, why: str) -> None:
        log.debug("upload staged whole: %s", why)
        if self.job is not None:
            self.job.cancel()
            self.job = None
        self.state = "off"
        self._release()

    def _release(self) -> None:
        """Drop what the stream holds in memory."""

    def _fail(self, exc: VdifsError) -> None:
        self.state = "failed"
        self.error = exc
        self._release()
        job = self.job if self.job is not None else self.make_job()
        job.fail(exc, received=self.pos)

    def truncated_to(self, size: int) -> None:
        """The upload was truncated or extended (blocking: extending applies zeros).

        Below the stream that is a step back.  Beyond it, the new bytes are
        zeros: ``cp`` copies a sparse image's trailing hole so, seeking past
        it and setting the size at the end.
        """
        if not self.active:
            return
        if size < self.pos:
            self._behind(size)
        elif size > self.pos:
            self.feed(size, b"")

    def finish(self, size: int, read_at: Callable[[int, int], bytes]) -> ImportResult:
        """At close: check the end of the file and commit."""
        if self.state == "failed":
            assert self.error is not None
            raise self.error
        assert self.state == "streaming" and self.job is not None
        try:
            self._check_end(size, read_at)
            return self.job.commit(received=size)
        except BaseException as exc:
            self.job.fail(exc, received=size)
            self.state = "failed"
            self.error = exc if isinstance(exc, VdifsError) else None
            raise

    def close(self) -> None:
        """The upload went away without finishing: drop what was staged."""
        if self.job is not None and not self.job.finished:
            self.job.cancel()


class VhdStream(ImageStream):
    """A dynamic or differencing VHD, run by run as each block's bytes arrive.

    A block's sector bitmap precedes its data, so once the bitmap has come,
    the block's runs of present sectors are known and its data is applied
    straight from the writes; only the bitmap is held in memory.
    """

    def __init__(self, make_job: Callable[[], ImportJob], staging_fd: int) -> None:
        super().__init__(make_job, staging_fd)
        self.head = bytearray()
        self.head_needed = c_vhd.FOOTER_SIZE
        self.parsed: ParsedImage | None = None
        self.presumed_size = 0
        self._spans: Iterator[BlockSpan] = iter(())
        self.span: BlockSpan | None = None
        self.bitmap = bytearray()
        self._runs: Iterator[VhdWrite] = iter(())
        self.run: VhdWrite | None = None

    def wants_staged(self, offset: int, length: int) -> bool:
        """Block bytes are only applied once data has started to apply (staging
        them would cost a copy and a punch); the footer is staged.
        """
        if (
            self.state == "streaming"
            and self.applied_any
            and offset + length <= self.presumed_size - c_vhd.FOOTER_SIZE
        ):
            return False
        return self._stage(offset, length)

    def _take_head(self, view: memoryview) -> memoryview:
        take = max(0, self.head_needed - len(self.head))
        self.head += view[:take]
        self.pos += min(take, len(view))
        rest = view[take:]
        if len(self.head) < self.head_needed:
            return rest
        try:
            needed = vhd_metadata_length(self.head)
        except NotStreamable as exc:
            self._stop_streaming(str(exc))
            self.pos += len(rest)
            return rest[len(rest) :]
        if needed > len(self.head):
            self.head_needed = needed
            return rest
        self._start(len(self.head))
        return rest

    def _start(self, head_end: int) -> None:
        head = bytes(self.head)
        self.presumed_size = streamed_size(head)
        footer_at = self.presumed_size - c_vhd.FOOTER_SIZE

        def read_head(offset: int, length: int) -> bytes:
            if offset == footer_at and length == c_vhd.FOOTER_SIZE:
                return head[: c_vhd.FOOTER_SIZE]  # checked against the real footer at the end
            if offset + length > len(head):
                raise _Head
            return head[offset : offset + length]

        try:
            parsed = parse_vhd(read_head, self.presumed_size)
        except _Head:
            self._stop_streaming("metadata outside the head")
            return
        spans = parsed.blocks()
        first = next(spans, None)
        if first is not None and first.bitmap_offset < head_end:
            self._stop_streaming("blocks inside the metadata")
            return
        job = self.make_job()
        self.job = job
        job.prepare(parsed, parsed.virtual_size)
        self.parsed = parsed
        self._spans = spans
        self._next_span(first)
        self.state = "streaming"
        self.head = bytearray(head[: c_vhd.FOOTER_SIZE])  # keep only the footer copy

    def _next_span(self, span: BlockSpan | None) -> None:
        self.span = span
        self.bitmap = bytearray()
        self.run = None

    def _take_body(self, view: memoryview) -> memoryview:
        span = self.span
        if span is None or self.pos + len(view) <= span.bitmap_offset:
            self.pos += len(view)  # padding, or what follows the last block (the footer)
            return view[len(view) :]
        if self.pos < span.bitmap_offset:
            skip = span.bitmap_offset - self.pos
            self.pos += skip
            view = view[skip:]
        if self.pos < span.data_offset:
            take = min(len(view), span.data_offset - self.pos)
            self.bitmap += view[:take]
            self.pos += take
            view = view[take:]
            if self.pos == span.data_offset:
                assert self.parsed is not None
                self._runs = self.parsed.block_writes(span, bytes(self.bitmap))
                self.run = next(self._runs, None)
            return view
        run = self.run
        if run is None:  # absent sectors up to the end of the block
            take = min(len(view), span.end - self.pos)
            self.pos += take
            view = view[take:]
        else:
            assert self.parsed is not None
            view, done = self._feed_run(run, view, self.parsed.virtual_size)
            if done:
                self.run = next(self._runs, None)
        if self.pos == span.end:
            self._end_block(span)
        return view

    def _end_block(self, span: BlockSpan) -> None:
        assert self.job is not None
        # A block appears once: chunks it left partly written are final.
        start = span.block * span.block_size
        self.job.applier.settle(start, start + span.block_size)
        if span.bitmap_offset < self.staged_end:
            punch_hole(self.staging_fd, span.bitmap_offset, span.end - span.bitmap_offset)
        self.applied_any = True
        self._next_span(next(self._spans, None))

    def _release(self) -> None:
        self.bitmap = bytearray()
        if self.state != "streaming":
            self.head = bytearray()

    def _check_end(self, size: int, read_at: Callable[[int, int], bytes]) -> None:
        if self.span is not None or size < self.presumed_size or size % c_vhd.SECTOR_SIZE:
            raise MalformedImage(f"the VHD ended at byte {size} before all its blocks had arrived")
        footer = read_at(size - c_vhd.FOOTER_SIZE, c_vhd.FOOTER_SIZE)
        if footer != bytes(self.head[: c_vhd.FOOTER_SIZE]):
            raise MalformedImage("the footer at the end differs from the copy at offset 0")


class Qcow2Stream(ImageStream):
    """A qcow2 whose tables lead the file, run of clusters by run of clusters.

    The head (header, L1 and L2 tables) is staged and parsed from the staging
    file; once streaming, nothing more is staged: each write's bytes go to the
    import as they arrive, so there is nothing to fall back to and a step
    back fails the upload.
    """

    def __init__(self, make_job: Callable[[], ImportJob], staging_fd: int) -> None:
        super().__init__(make_job, staging_fd)
        self.head_needed = 0
        self.virtual_size = 0
        self._writes: Iterator[Qcow2Write] = iter(())
        self.write: Qcow2Write | None = None

    def wants_staged(self, offset: int, length: int) -> bool:
        return self.state != "streaming" and self._stage(offset, length)

    def _read_staged(self, offset: int, length: int) -> bytes:
        if offset + length > self.pos:
            raise _Head
        return os.pread(self.staging_fd, length, offset)

    def _take_head(self, view: memoryview) -> memoryview:
        self.pos += len(view)  # already staged: wants_staged said so
        if self.pos < self.head_needed:
            return view[len(view) :]
        try:
            needed = qcow2_metadata_length(self._read_staged, self.pos)
        except NotStreamable as exc:
            self._stop_streaming(str(exc))
            return view[len(view) :]
        if needed > self.pos:
            self.head_needed = needed
        else:
            self._start()
        return view[len(view) :]

    def _start(self) -> None:
        try:
            presumed = qcow2_streamed_size(self._read_staged, self.pos)
            parsed = parse_qcow2(self._read_staged, presumed)
        except (_Head, VdifsError) as exc:
            # Nothing is applied yet: the whole-file parse at close gives the verdict.
            self._stop_streaming(f"the head does not parse on its own: {exc}")
            return
        if parsed.compressed:
            self._stop_streaming("compressed clusters end where the file does")
            return
        job = self.make_job()
        self.job = job
        job.prepare(parsed, parsed.virtual_size)
        self.virtual_size = parsed.virtual_size
        self.state = "streaming"
        self.applied_any = True
        self._writes = parsed.writes()
        self._next_write()

    def _next_write(self) -> None:
        """Move to the next write, applying zero runs and bytes already staged."""
        assert self.job is not None
        applier = self.job.applier
        while (write := next(self._writes, None)) is not None:
            if write.file_offset is not None and write.file_offset + write.length > self.pos:
                self.write = write
                if write.file_offset < self.pos:  # it began inside the staged head
                    length = self.pos - write.file_offset
                    apply_write(applier, write, self._read_staged, self.virtual_size, length)
                return
            apply_write(applier, write, self._read_staged, self.virtual_size)
        self.write = None

    def _take_body(self, view: memoryview) -> memoryview:
        write = self.write
        if write is None:
            self.pos += len(view)  # after the last run
            return view[len(view) :]
        # Zero runs (no file offset) were all applied at the start.
        view, done = self._feed_run(write, view, self.virtual_size)
        if done:
            self._next_write()
        return view

    def _check_end(self, size: int, read_at: Callable[[int, int], bytes]) -> None:
        if self.write is not None:
            raise MalformedImage(
                f"the qcow2 image ended at byte {size} before all its data had arrived"
            )
        refuse_polyglot("qcow2", b"", self.last_sector(size))
