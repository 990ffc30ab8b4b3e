"""A VDI state (+ an optional base) + a format -> an :class:`Export`.

An export knows its exact size before any byte is read and serves
``read(offset, length)`` by walking the format layout's segments: generated
metadata is copied, zeros are zeros, data ranges are read from the SR through
the pinned block map.  Exports are immutable: they describe one state of the
disk, so an open file handle keeps reading the state it opened.
"""

from __future__ import annotations

import ctypes
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from vdifs.errors import InvalidArgument, NotFound, TooLarge
from vdifs.formats.base import ImageIdentity, Layout, Meta, ParentRef, Zero
from vdifs.model import CHUNK_SIZE, Allocation, VdiRecord
from vdifs.storage.backend import Backend, ContentMap

FORMATS = ("raw", "vhd", "qcow2")
ZEROS = bytes(1 << 20)  # shared by reads of ranges that hold no data (the largest FUSE read)
Buffer = bytes | bytearray | memoryview
IMAGE_FORMATS = ("vhd", "qcow2")
MAX_VHD_SIZE = 2040 << 30  # VHD's limit (XAPI max_vhd_size, qemu refuses more)


def _uncleared_buffers() -> Callable[[int], bytearray]:
    """How to make a bytearray whose bytes are not zeroed first (each read
    writes all of them).

    ``bytearray(n)`` clears the megabyte a FUSE read then overwrites: 7 % of
    the daemon's time reading full.vhd.  CPython's C API makes one uncleared.
    """
    try:
        make = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except AttributeError:  # not CPython: cleared buffers
        return bytearray
    make.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
    make.restype = ctypes.py_object
    return lambda size: cast(bytearray, make(None, size))


_new_buffer = _uncleared_buffers()


class LayoutFactory(Protocol):
    def __call__(
        self, allocation: Allocation, identity: ImageIdentity, parent: ParentRef | None = None
    ) -> Layout: ...


def layout_class(fmt: str) -> LayoutFactory:
    module, name = {"vhd": ("vhd", "VhdLayout"), "qcow2": ("qcow2", "Qcow2Layout")}[fmt]
    cls: LayoutFactory = getattr(importlib.import_module(f"vdifs.formats.{module}"), name)
    return cls


def format_supports(fmt: str, virtual_size: int) -> bool:
    """Whether a disk of this size can be shown in this format."""
    return not (fmt == "vhd" and virtual_size > MAX_VHD_SIZE)


def identity_of(record: VdiRecord) -> ImageIdentity:
    return ImageIdentity(uuid=record.state_uuid.bytes, timestamp=record.state_time)


@dataclass(frozen=True)
class DiskState:
    """A VDI record with the block map of that very state."""

    record: VdiRecord
    content: ContentMap


class Export:
    """Bytes of one image of one disk state."""

    def __init__(
        self,
        backend: Backend,
        state: DiskState,
        fmt: str,
        base: DiskState | None = None,
        *,
        view: Layout | None = None,
    ) -> None:
        """``view``: a layout over the raw disk (a partition, a logical volume)."""
        if fmt not in FORMATS:
            raise InvalidArgument(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
        if not format_supports(fmt, state.record.virtual_size):
            raise TooLarge(
                f"a VHD holds at most 2040 GiB; VDI {state.record.uuid} is larger: use qcow2"
            )
        if state.record.data_destroyed:
            raise NotFound(
                f"snapshot {state.record.uuid} is a checkpoint: its data was destroyed"
                " (it still serves as a delta base)"
            )
        if fmt == "raw" and base is not None:
            raise InvalidArgument("a raw image cannot be a delta: use vhd or qcow2")
        self.backend = backend
        self.state = state
        self.fmt = fmt
        self.base = base
        self.layout: Layout | None = view
        if fmt != "raw":
            record = state.record
            if base is None:
                allocation = state.content.allocation()
                parent = None
            else:
                allocation = state.content.diff(base.content)
                parent = ParentRef(identity_of(base.record), f"{base.record.uuid}.{fmt}")
            self.layout = layout_class(fmt)(allocation, identity_of(record), parent)

    @property
    def size(self) -> int:
        if self.layout is None:
            return self.state.record.virtual_size
        return self.layout.size

    @property
    def allocated_bytes(self) -> int:
        if self.layout is None:
            return self.state.content.chunk_count * CHUNK_SIZE
        return self.layout.allocated_bytes

    def read(self, offset: int, length: int, *, nowait: bool = False) -> bytearray:
        """Bytes at ``offset``, short at the end of the file.

        With ``nowait`` a read that would wait for the disk raises
        :class:`vdifs.storage.backend.WouldBlock` instead.
        """
        end = min(offset + length, self.size)
        if offset >= end:
            return bytearray()
        # One buffer, filled in place (every byte: it starts uncleared) and handed
        # to FUSE as is: no copies.  A backend's read_into fills all it is given.
        buf = _new_buffer(end - offset)
        view = memoryview(buf)
        content = self.state.content
        if self.layout is None:
            self.backend.read_into(content, offset, view, nowait=nowait)
            return buf
        pos = 0
        for seg in self.layout.segments(offset, end - offset):
            if isinstance(seg, Meta):
                view[pos : pos + len(seg.data)] = seg.data
                pos += len(seg.data)
            elif isinstance(seg, Zero):
                for start in range(pos, pos + seg.length, len(ZEROS)):
                    stop = min(start + len(ZEROS), pos + seg.length)
                    view[start:stop] = ZEROS[: stop - start]
                pos += seg.length
            else:
                self.backend.read_into(
                    content, seg.virtual_offset, view[pos : pos + seg.length], nowait=nowait
                )
                pos += seg.length
        if pos != len(buf):
            raise AssertionError(f"layout covered {pos} of {len(buf)} bytes at {offset}")
        return buf

    def read_shared(self, offset: int, length: int, *, nowait: bool = False) -> Buffer:
        """:meth:`read` for a reader that only passes the bytes on (FUSE, HTTP).

        A range of the raw disk known to hold no data (half of a sparse
        disk's raw.img) is a view of one shared block of zeros: no buffer to
        allocate, fill and copy.  The bytes must not be changed.
        """
        end = min(offset + length, self.size)
        if (
            self.layout is None
            and 0 < end - offset <= len(ZEROS)
            and not self.state.content.holds_data(offset, end - offset)
        ):
            return memoryview(ZEROS)[: end - offset]
        return self.read(offset, length, nowait=nowait)

    def copy_to(
        self,
        write: Callable[[bytearray], object],
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream the whole image front to back (``vdifs export``)."""
        step = 4 << 20
        done = 0
        while done < self.size:
            data = self.read(done, step)
            write(data)
            done += len(data)
            if progress is not None:
                progress(done)
