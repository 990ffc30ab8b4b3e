"""Writes into a pool's VDI: staged here, then sent to XAPI as one VHD.

The import engine has validated the whole upload and hands over its chunks;
they are staged in a sparse scratch file.  The commit then

1. refuses a VDI that a running VM uses (XAPI would write under the guest);
2. snapshots the target, because XAPI has no rollback: a failed or wrong
   import is undone from that snapshot, which the import's status names;
3. sends a dynamic VHD of exactly the staged chunks to ``import_raw_vdi``:
   XAPI's vhd-tool writes only the sectors whose bitmap bit is set
   (xapi-project/xen-api ``ocaml/vhd-tool/src/impl.ml`` ``serve_vhd_to_raw``),
   so a delta changes what it carries and nothing else.  A full image also
   carries, as zeros, every block the target held that the image does not;
4. waits for XAPI's task: the HTTP status says nothing of the outcome.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid as uuidlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from vdifs.errors import Busy, InvalidArgument, ReadOnly, VdifsError
from vdifs.formats.base import Data, ImageIdentity, Meta, Zero
from vdifs.formats.vhd import VhdLayout
from vdifs.model import (
    BLOCK_SIZE,
    CHUNK_SIZE,
    CHUNKS_PER_BLOCK,
    Allocation,
    VdiRecord,
    ceil_div,
    check_name,
)

if TYPE_CHECKING:
    from vdifs.storage.xapi.pool import PoolBackend

log = logging.getLogger(__name__)

SEND_PIECE = 1 << 20


class PoolWriter:
    """Implements :class:`vdifs.storage.backend.Writer` for a pool's VDI."""

    def __init__(
        self,
        pool: PoolBackend,
        uuid: str | None,
        *,
        replace: bool,
        new_vdi: tuple[str, int] | None,
    ) -> None:
        self.pool = pool
        self.replace = replace
        self.new_vdi = new_vdi
        if new_vdi is not None:
            name, size = new_vdi
            check_name(name)
            if size <= 0:
                raise InvalidArgument("a VDI needs a size above zero")
            self.uuid = ""  # XAPI names it at VDI.create, at commit
            self.virtual_size = ceil_div(size, BLOCK_SIZE) * BLOCK_SIZE  # as SM rounds it
        else:
            assert uuid is not None
            record = pool.get_vdi(uuid)
            if record.is_a_snapshot:
                raise ReadOnly(f"VDI {uuid} is a snapshot and cannot change")
            pool.check_not_in_use(uuid)
            self.uuid = uuid
            self.virtual_size = record.virtual_size
        self.expect_generation: int | None = None
        self.import_identity: bytes | None = None
        self.import_name: str | None = None
        self.chunks_written = 0
        self.notes: list[str] = []
        self._path, self._fd = pool.scratch_file()
        self._written = bytearray()  # one bit per chunk: bounded by the disk's chunk count
        self._done = False

    # -- staging ----------------------------------------------------------------------

    def grow(self, size: int) -> None:
        if size < self.virtual_size:
            raise InvalidArgument("a disk can only grow")
        self.virtual_size = ceil_div(size, BLOCK_SIZE) * BLOCK_SIZE

    def _mark(self, chunk: int) -> None:
        byte, bit = divmod(chunk, 8)
        if byte >= len(self._written):
            self._written.extend(bytes(byte + 1 - len(self._written)))
        self._written[byte] |= 1 << bit

    def _is_written(self, chunk: int) -> bool:
        byte, bit = divmod(chunk, 8)
        return byte < len(self._written) and bool(self._written[byte] >> bit & 1)

    def write_chunk(self, chunk: int, data: bytes | bytearray | memoryview) -> None:
        self.write_chunks(chunk, bytes(data).ljust(CHUNK_SIZE, b"\0"))

    def write_chunks(self, first: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        count, rest = divmod(len(view), CHUNK_SIZE)
        if (
            rest
            or first < 0
            or (first + count) * CHUNK_SIZE > ceil_div(self.virtual_size, CHUNK_SIZE) * CHUNK_SIZE
        ):
            raise InvalidArgument("chunks outside the disk")
        os.pwrite(self._fd, view, first * CHUNK_SIZE)
        for chunk in range(first, first + count):
            self._mark(chunk)
        self.chunks_written += count

    def staged_chunk(self, chunk: int) -> bytes | None:
        if not self._is_written(chunk):
            return None
        return os.pread(self._fd, CHUNK_SIZE, chunk * CHUNK_SIZE).ljust(CHUNK_SIZE, b"\0")

    def _allocation(self, extra: Allocation | None) -> Allocation:
        """The staged chunks (and ``extra``'s, to be zeroed) as one allocation."""
        masks: dict[int, int] = {}
        for byte, bits in enumerate(self._written):
            if bits:
                for bit in range(8):
                    if bits >> bit & 1:
                        block, index = divmod(byte * 8 + bit, CHUNKS_PER_BLOCK)
                        masks[block] = masks.get(block, 0) | 1 << index
        if extra is not None:
            for block, mask in zip(extra.blocks, extra.masks, strict=True):
                masks[block] = masks.get(block, 0) | mask
        out = Allocation(self.virtual_size)
        limit = ceil_div(self.virtual_size, CHUNK_SIZE)
        for block in sorted(masks):
            mask = masks[block]
            tail = limit - block * CHUNKS_PER_BLOCK
            if tail <= 0:
                continue
            if tail < CHUNKS_PER_BLOCK:
                mask &= (1 << tail) - 1
            out.blocks.append(block)
            out.masks.append(mask)
        return out

    def _body(self, layout: VhdLayout) -> Iterator[bytes]:
        for offset in range(0, layout.size, SEND_PIECE):
            piece = bytearray()
            for segment in layout.segments(offset, SEND_PIECE):
                match segment:
                    case Meta(data):
                        piece += data
                    case Zero(length):
                        piece += bytes(length)
                    case Data(virtual_offset, length):
                        got = os.pread(self._fd, length, virtual_offset)
                        piece += got.ljust(length, b"\0")  # the sparse file's unwritten tail
            yield bytes(piece)

    # -- committing --------------------------------------------------------------------

    def commit(self) -> VdiRecord:
        if self._done:
            raise RuntimeError("writer already finished")
        self._done = True
        pool = self.pool
        try:
            if self.new_vdi is not None:
                record = pool.create_vdi(self.new_vdi[0], self.virtual_size)
                self.uuid = record.uuid
                extra = None  # a new VDI reads as zeros
            else:
                record = self._check_target()
                safety = pool.snapshot(
                    self.uuid,
                    name=f"{record.name_label} (before import)",
                    description=f"taken by vdifs before importing {self.import_name}",
                )
                self.notes.append(
                    f"before the import, VDI {self.uuid} was snapshotted as {safety.uuid}:"
                    " to undo it, import that snapshot's full.vhd back; delete it when done"
                )
                if self.virtual_size > record.virtual_size:
                    record = pool.resize(self.uuid, self.virtual_size)
                extra = None
                if self.replace:
                    _, current = pool.state(self.uuid)
                    extra = current.allocation()
            layout = VhdLayout(
                self._allocation(extra), ImageIdentity(uuidlib.uuid4().bytes, 0), None
            )
            try:
                pool.session.import_raw(pool.ref(self.uuid), "vhd", layout.size, self._body(layout))
            except VdifsError as exc:
                pool.forget(self.uuid)
                if self.new_vdi is not None:
                    with contextlib.suppress(VdifsError):
                        pool.destroy(self.uuid)
                    raise
                raise type(exc)(f"{exc}; " + " ".join(self.notes)) from None
            pool.forget(self.uuid)
            pool.reload()
            return pool.get_vdi(self.uuid)
        finally:
            self._cleanup()

    def _check_target(self) -> VdiRecord:
        self.pool.reload()
        record = self.pool.get_vdi(self.uuid)
        if record.is_a_snapshot:
            raise ReadOnly(f"VDI {self.uuid} is a snapshot and cannot change")
        if self.expect_generation is not None and record.generation != self.expect_generation:
            raise Busy(f"VDI {self.uuid} changed while the import ran; nothing applied")
        self.pool.check_not_in_use(self.uuid)
        return record

    def abort(self) -> None:
        self._done = True
        self._cleanup()

    def _cleanup(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            with contextlib.suppress(OSError):
                self._path.unlink()

    def __enter__(self) -> PoolWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()
