"""A dynamic or differencing VHD applied while it is being written.

``cp backup.vhd import/<uuid>.vhd`` writes front to back.  Once the footer
copy, header and BAT have arrived, the image is validated as a file of the
smallest size that can hold its blocks, the import is prepared (sizes, the
delta's base), and from then on each block is applied to the writer as soon
as its last byte arrives.  Blocks that arrived before the first was applied
are punched out of the staging file; later ones never reach it (only the
footer does), so the upload never sits whole on disk and memory holds at
most one block.
``close()`` only checks the end (the footer must repeat the copy at offset
0, every block must have arrived) and commits.

Anything else (a fixed VHD, metadata far from the start, a write behind the
stream before any block was applied) falls back to staging the whole upload
and parsing it at close.  A write behind the stream *after* blocks were
applied cannot be honoured and fails the upload with EINVAL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable, Iterator

from vdifs.errors import MalformedImage, VdifsError
from vdifs.formats import c_vhd
from vdifs.formats.vhd_parse import (
    BlockSpan,
    NotStreamable,
    ParsedImage,
    metadata_length,
    parse_vhd,
    streamed_size,
)
from vdifs.imports import ImportJob, ImportResult

log = logging.getLogger(__name__)

MAX_STREAM_BLOCK = 16 * 1024 * 1024  # larger VHD blocks are staged: memory per upload stays small

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


class VhdStream:
    """Feeds a sequentially written VHD into an :class:`ImportJob`."""

    def __init__(self, make_job: Callable[[], ImportJob], staging_fd: int) -> None:
        self.make_job = make_job
        self.staging_fd = staging_fd
        self.state = "head"  # head -> streaming -> (finish); or off; or failed
        self.error: VdifsError | None = None
        self.pos = 0  # every byte below this has arrived (or was skipped over: zeros)
        self.head = bytearray()
        self.head_needed = c_vhd.FOOTER_SIZE
        self.job: ImportJob | None = None
        self.parsed: ParsedImage | None = None
        self.presumed_size = 0
        self._spans: Iterator[BlockSpan] = iter(())
        self.span: BlockSpan | None = None
        self.block = bytearray()
        self.applied_any = False
        self.staged_end = 0  # staged bytes lie below this offset

    @property
    def active(self) -> bool:
        return self.state in ("head", "streaming")

    # -- feeding -------------------------------------------------------------------

    def wants_staged(self, offset: int, length: int) -> bool:
        """Whether these bytes must reach the staging file.

        Once a block has been applied the upload can no longer fall back to
        staging, so block bytes are only needed in memory: staging them
        would cost a copy and a punch.  The footer (at the end) is staged.
        """
        if (
            self.state == "streaming"
            and self.applied_any
            and offset + length <= self.presumed_size - c_vhd.FOOTER_SIZE
        ):
            return False
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
            if offset > self.pos:
                # Skipped bytes are zeros (rsync --inplace writes only what differs).
                self._take(bytes(offset - self.pos))
            self._take(data)
        except VdifsError as exc:
            self._fail(exc)
            raise

    def _behind(self, offset: int) -> None:
        if self.applied_any:
            self._fail(
                MalformedImage(
                    f"the upload went back to byte {offset} after blocks past it were applied:"
                    " write VHD images front to back (cp, dd, rsync), or use vdifs import"
                )
            )
            assert self.error is not None
            raise self.error
        self._stop_streaming("a write went back in the file")

    def _take(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            if self.state == "head":
                view = self._take_head(view)
            elif self.state == "streaming":
                view = self._take_blocks(view)
            else:
                self.pos += len(view)
                return

    def _take_head(self, view: memoryview) -> memoryview:
        take = max(0, self.head_needed - len(self.head))
        self.head += view[:take]
        self.pos += min(take, len(view))
        rest = view[take:]
        if len(self.head) < self.head_needed:
            return rest
        try:
            needed = metadata_length(self.head)
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
        if first is not None and (
            first.bitmap_offset < head_end or first.end - first.bitmap_offset > MAX_STREAM_BLOCK
        ):
            self._stop_streaming("blocks inside the metadata, or too large to hold")
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
        if span is not None:
            self.block = bytearray(span.end - span.bitmap_offset)

    def _take_blocks(self, view: memoryview) -> memoryview:
        span = self.span
        if span is None or self.pos + len(view) <= span.bitmap_offset:
            self.pos += len(view)  # padding, or what follows the last block (the footer)
            return view[len(view) :]
        if self.pos < span.bitmap_offset:
            skip = span.bitmap_offset - self.pos
            self.pos += skip
            view = view[skip:]
        start = self.pos - span.bitmap_offset
        take = min(len(view), span.end - self.pos)
        self.block[start : start + take] = view[:take]
        self.pos += take
        if self.pos == span.end:
            self._apply_block(span)
            self._next_span(next(self._spans, None))
        return view[take:]

    def _apply_block(self, span: BlockSpan) -> None:
        assert self.job is not None and self.parsed is not None
        block = self.block
        applier = self.job.applier
        for write in self.parsed.block_writes(span, bytes(block[: span.bitmap_size])):
            at = write.file_offset - span.bitmap_offset
            applier.write(write.virtual_offset, memoryview(block)[at : at + write.length])
        if span.bitmap_offset < self.staged_end:
            punch_hole(self.staging_fd, span.bitmap_offset, span.end - span.bitmap_offset)
        self.applied_any = True

    # -- outcomes ----------------------------------------------------------------------

    def _stop_streaming(self, why: str) -> None:
        log.debug("VHD upload staged whole: %s", why)
        if self.job is not None:
            self.job.cancel()
            self.job = None
        self.state = "off"
        self.head = bytearray()
        self.block = bytearray()

    def _fail(self, exc: VdifsError) -> None:
        self.state = "failed"
        self.error = exc
        self.block = bytearray()
        job = self.job if self.job is not None else self.make_job()
        job.fail(exc, received=self.pos)

    def truncated_to(self, size: int) -> None:
        """The upload was truncated: below the stream, that is a step back."""
        if self.active and size < self.pos:
            self._behind(size)

    def finish(self, size: int, read_at: Callable[[int, int], bytes]) -> ImportResult:
        """At close: check the end of the file and commit."""
        if self.state == "failed":
            assert self.error is not None
            raise self.error
        assert self.state == "streaming" and self.job is not None
        try:
            if self.span is not None or size < self.presumed_size or size % c_vhd.SECTOR_SIZE:
                raise MalformedImage(
                    f"the VHD ended at byte {size} before all its blocks had arrived"
                )
            footer = read_at(size - c_vhd.FOOTER_SIZE, c_vhd.FOOTER_SIZE)
            if footer != bytes(self.head[: c_vhd.FOOTER_SIZE]):
                raise MalformedImage("the footer at the end differs from the copy at offset 0")
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


def staging_reader(fd: int) -> Callable[[int, int], bytes]:
    def read_at(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    return read_at
