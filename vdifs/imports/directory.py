"""``import/`` as the FUSE adapter sees it: one async call per request.

An upload goes through these states (:class:`~vdifs.imports.uploads.State`;
:class:`~vdifs.imports.uploads.Uploads` keeps the names)::

    RECEIVING --(last close of a valid name, or rename onto one)--> APPLYING
    APPLYING  --(committed; last handle closed)--> DONE: an empty stub for a minute
              --(refused or failed)-------------> FAILED: gone, its record in .status/
    RECEIVING --(a write failed, or unlink)--> FAILED: nothing applied
    DONE      --(opened for writing)--> RECEIVING again, from zero bytes

This module owns what happens around those transitions on the event loop:
each upload's write pipeline (writes answered once queued, stored behind the
reply), the one task applying it off the loop, and every ``close()`` of the
upload getting that import's outcome, whichever flush started it.  Blocking
work runs in threads under :data:`vdifs.limits.UPLOADS` and
:data:`vdifs.limits.APPLIES`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio

from vdifs.errors import Busy
from vdifs.imports.engine import ImportResult, record_import_digest
from vdifs.imports.pipeline import WritePipeline
from vdifs.imports.uploads import State, Upload, Uploads, apply_or_explain, still_open_by
from vdifs.limits import APPLIES, UPLOADS

log = logging.getLogger(__name__)


class ImportDirectory:
    def __init__(self, uploads: Uploads, refresh: Callable[[], Awaitable[None]]) -> None:
        self.uploads = uploads
        self._refresh = refresh  # shows an applied import's new state in the tree
        self._pipelines: dict[int, WritePipeline] = {}  # by id() of an open upload
        self._applying: dict[int, trio.Event] = {}  # by id() of an upload being applied
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Pipelines store writes in tasks of ``nursery``."""
        self._nursery = nursery

    # -- opening and closing ---------------------------------------------------------

    async def create(self, name: str, pid: int) -> Upload:
        upload = self.uploads.create(name, pid)
        upload.handles += 1
        return upload

    async def open(self, name: str, pid: int, *, write: bool, truncate: bool) -> Upload:
        upload = self.uploads.get(name)
        await self._settle(upload)
        if write:
            self.uploads.open_for_writing(upload, pid, truncate=truncate)
        upload.handles += 1
        return upload

    async def flush(self, upload: Upload) -> None:
        """A close() of one descriptor: the last one of a complete upload applies it."""
        await self._settle(upload)
        if upload.state is not State.RECEIVING:
            await self._outcome(upload)
        elif (
            upload.ready
            and upload.handles == 1
            and not any(
                still_open_by(pid, upload.name, self.uploads.mountpoint) for pid in upload.writers
            )
        ):
            await self._apply(upload)

    async def release(self, upload: Upload, *, writing: bool) -> None:
        if upload.handles == 1 and upload.ready:
            # Its last flush thought another descriptor still open: never leave a
            # complete upload unapplied and its target locked (the status says why).
            with contextlib.suppress(Exception):
                await self._apply(upload)
        self.uploads.release(upload, writing=writing)
        if upload.handles == 0:
            pipeline = self._pipelines.pop(id(upload), None)
            if pipeline is not None:
                pipeline.close()  # settled by the flush that came first

    # -- data ----------------------------------------------------------------------------

    async def read(self, upload: Upload, offset: int, size: int) -> bytes:
        await self._settle(upload)
        return upload.read(offset, size)

    async def write(self, upload: Upload, offset: int, data: bytes) -> int:
        """Answered once queued: storing (hashing, a streamed image's parsing) runs
        behind the reply while the next write arrives (vdifs.imports.pipeline)."""
        pipeline = self._pipelines.get(id(upload))
        if pipeline is None:
            assert self._nursery is not None, "start() first"
            pipeline = WritePipeline(upload.store, self._nursery, UPLOADS)
            self._pipelines[id(upload)] = pipeline
        pipeline.raise_error()
        upload.accept(offset, len(data))
        await pipeline.write(offset, data)
        return len(data)

    async def truncate(self, name: str, size: int) -> None:
        upload = self.uploads.get(name)
        await self._settle(upload)
        # Blocking: growing a streamed image applies the new zeros.
        await trio.to_thread.run_sync(upload.truncate, size, limiter=UPLOADS)

    # -- names -----------------------------------------------------------------------------

    async def rename(self, old: str, new: str, renamed: Callable[[Upload], None]) -> None:
        """rsync's temporary file onto its final name: applied if complete and closed.

        ``renamed`` is called once the name has changed, before the apply.
        """
        upload = self.uploads.rename(old, new)
        renamed(upload)
        if upload.ready and upload.handles == 0:
            try:
                await self._apply(upload)
            finally:
                self.uploads.finish(upload)

    async def unlink(self, name: str) -> None:
        upload = self.uploads.get(name)
        if id(upload) in self._applying:
            raise Busy(f"{name} is being applied")  # its staged data is being read
        with contextlib.suppress(Exception):
            await self._settle(upload)  # its queued writes go nowhere: only wait for them
        upload.state = State.FAILED  # never apply what was deleted
        self.uploads.remove(upload)

    # -- applying --------------------------------------------------------------------------

    async def _settle(self, upload: Upload) -> None:
        """Wait for an upload's queued writes; a write that failed fails the upload."""
        pipeline = self._pipelines.get(id(upload))
        if pipeline is None:
            return
        try:
            await pipeline.settle()
        except BaseException as exc:
            await trio.to_thread.run_sync(upload.abandon, exc, limiter=UPLOADS)
            raise

    async def _apply(self, upload: Upload) -> None:
        """Apply off the loop; the import's error becomes this call's errno."""
        # Marked before the first await: a second flush of the same file (another
        # descriptor closed meanwhile) waits for this one in _outcome.
        upload.state = State.APPLYING
        done = self._applying[id(upload)] = trio.Event()
        try:
            result = await trio.to_thread.run_sync(apply_or_explain, upload, limiter=APPLIES)
        finally:
            del self._applying[id(upload)]
            done.set()
            await self._refresh()
        log.info("imported %s into %s", upload.name, result.target)
        assert self._nursery is not None
        self._nursery.start_soon(self._digest, result)

    async def _digest(self, result: ImportResult) -> None:
        """The restored disk's sha256 into the import's status, after the import."""
        try:
            await trio.to_thread.run_sync(
                record_import_digest, self.uploads.sr, result, limiter=APPLIES
            )
        except Exception as exc:  # the import stands; only its digest is missing
            log.warning("no sha256 for import %d: %s", result.id, exc)

    async def _outcome(self, upload: Upload) -> None:
        """For a flush of an upload already applied or being applied: its outcome.

        A process that forks while writing into import/ (its child's exec
        closes an inherited descriptor) sends a second flush, which may come
        first and start the import: the writer's own close() must still wait
        for it and get its error.
        """
        done = self._applying.get(id(upload))
        if done is not None:
            await done.wait()
        if upload.error is not None:
            raise upload.error
