"""The pyfuse3 adapter: inodes in, model calls, attributes and errnos out.

Every handler resolves its inode or handle to a tree node, calls the model,
and builds attributes in :meth:`VdifsOperations._entry`.  Errors are mapped in
one place (:func:`_errors`): a :class:`VdifsError` becomes its errno; any other
exception is a bug, logged with its traceback and answered with EIO so that
one bad request never ends the mount (pyfuse3 handlers may raise nothing
but FUSEError).

Threads: reads first try the page cache on the event loop (``RWF_NOWAIT``);
only a read that would wait for the disk goes to a worker thread, once per
request.  Commits (hashing, fsync) always run in a thread, each purpose under
its own limiter (:mod:`vdifs.limits`).  ``import/`` is the imports layer's
(:class:`~vdifs.imports.directory.ImportDirectory`): its handlers only pass on.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from vdifs.errors import NotFound, ReadOnly, VdifsError
from vdifs.exports import Buffer, Export
from vdifs.fs.nodes import (
    ROOT,
    ChecksumsFile,
    DeltaImage,
    FullImage,
    Generated,
    ImportDir,
    Node,
    RawImage,
    SnapshotsDir,
    UploadFile,
    VmSnapshotsDir,
)
from vdifs.fs.tree import SnapshotFolder, Tree
from vdifs.fs.window import Windows
from vdifs.imports.directory import ImportDirectory
from vdifs.imports.uploads import Upload
from vdifs.limits import APPLIES, READS, nonblocking
from vdifs.livedisk import DIRTY_LIMIT, Fetched, LiveDisk, NeedsFetch
from vdifs.model import ceil_div
from vdifs.storage.backend import Pin

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

RENAME_EXCHANGE = 2  # linux/fs.h
REFRESH_INTERVAL = 0.5  # seconds between checks for changes made by other processes
BLKSIZE = 1 << 20


def _errors(
    handler: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except VdifsError as exc:
            log.debug("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.warning("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("bug in %s; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


async def on_live_disk(call: Callable[[Fetched | None], T]) -> T:
    """Run a live disk's read or write on the loop, fetching what it lacks in a thread."""
    fetched = None
    while True:
        try:
            return call(fetched)
        except NeedsFetch as need:
            fetched = await trio.to_thread.run_sync(need.fetch, limiter=READS)


@dataclass
class Handle:
    node: Node
    export: Export | None = None  # pinned at open for read-only views
    live: LiveDisk | None = None  # a live raw.img opened for writing or reading
    upload: Upload | None = None  # a file being written into import/
    writing: bool = False  # opened for writing (an upload has one such handle at most)
    data: bytes | None = None  # small generated files (info.json), pinned at open
    pins: Pin | None = None  # keeps the data an open export reads from being reclaimed


class VdifsOperations(pyfuse3.Operations):
    enable_writeback_cache = False  # keep per-write errors and ordering (see docs)

    def __init__(self, tree: Tree, *, direct_io_images: bool = False) -> None:
        super().__init__()
        self.tree = tree
        # -o direct_io: images skip the page cache, for streaming readers.
        self.direct_io_images = direct_io_images
        self._inodes: dict[Node, int] = {ROOT: pyfuse3.ROOT_INODE}
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: ROOT}
        self._handles: dict[int, Handle] = {}
        self._listings: dict[int, tuple[Node, list[tuple[int, str, Node]]]] = {}
        self._windows = Windows()  # small in-order reads, read ahead
        self._next_fh = 1
        self._live: dict[str, LiveDisk] = {}
        self._flush_locks: dict[str, trio.Lock] = {}
        self.imports = ImportDirectory(tree.uploads, self._refresh)
        self.uid = os.geteuid()
        self.gid = os.getegid()

    def start(self, nursery: trio.Nursery) -> None:
        """Run the background tasks (SR watching, stored writes) in ``nursery``."""
        self.imports.start(nursery)
        nursery.start_soon(self.watch_sr)

    # -- inodes ----------------------------------------------------------------

    def _inode(self, node: Node) -> int:
        ino = self._inodes.get(node)
        if ino is None:
            ino = len(self._nodes) + 1
            while ino in self._nodes:
                ino += 1
            self._inodes[node] = ino
            self._nodes[ino] = node
        return ino

    def _node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = self.tree.attr(node)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self._inode(node)
        entry.generation = 0
        entry.entry_timeout = attr.timeout
        entry.attr_timeout = attr.timeout
        entry.st_mode = attr.mode
        entry.st_nlink = 2 if attr.mode & 0o040000 else 1
        entry.st_uid = self.uid
        entry.st_gid = self.gid
        entry.st_rdev = 0
        entry.st_size = attr.size
        entry.st_blksize = BLKSIZE
        entry.st_blocks = attr.blocks
        entry.st_atime_ns = attr.mtime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.mtime_ns
        return entry

    async def _warm(self, nodes: list[Node]) -> None:
        """Read what these nodes' attributes need from the disks (partition tables, LVM
        metadata) or a remote backend (maps), off the loop."""
        if any(map(self.tree.needs_warming, nodes)):
            await trio.to_thread.run_sync(self.tree.warm_all, nodes, limiter=READS)
            await self._refresh()  # what the backend learnt may show in records

    # -- lookups and attributes --------------------------------------------------

    @_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        text = os.fsdecode(name)
        if text == ".":
            return self._entry(parent)
        await self._warm([parent])  # a disk's partitions/ and lvm/ are read from it
        node = self.tree.lookup(parent, text)
        await self._warm([node])
        return self._entry(node)

    @_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        try:
            await self._warm([node])
            return self._entry(node)
        except NotFound:
            # Deleted while open: the handle keeps reading the state it pinned.
            for handle in self._handles.values():
                if handle.node == node and handle.export is not None:
                    return self._pinned_entry(inode, handle.export)
            raise

    def _pinned_entry(self, inode: int, export: Export) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.st_mode = 0o100400
        entry.st_nlink = 1
        entry.st_uid = self.uid
        entry.st_gid = self.gid
        entry.st_size = export.size
        entry.st_blksize = BLKSIZE
        entry.st_blocks = ceil_div(export.allocated_bytes, 512)
        mtime = export.state.record.changed_ns
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = mtime
        entry.attr_timeout = entry.entry_timeout = 0
        return entry

    @_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if isinstance(node, UploadFile):
            # Uploads take truncation (O_TRUNC, rsync); modes and times are ignored.
            if fields.update_size:
                await self.imports.truncate(node.name, attr.st_size)
            return self._entry(node)
        if fields.update_size and attr.st_size != self.tree.attr(node).size:
            # A disk's size is fixed; truncation (cp's O_TRUNC) would destroy it.
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._entry(node)  # times are derived from the SR: ignore touch

    @_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        target = self.tree.attr(self._node(inode)).target
        if target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(target)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inodes stay for the life of the mount: numbers are never reused.
        pass

    @_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        block_size, blocks, free = await trio.to_thread.run_sync(self.tree.sr.space)
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = block_size
        data.f_blocks = blocks
        data.f_bfree = data.f_bavail = free
        data.f_files = len(self._nodes) + 1000
        data.f_ffree = 1000
        data.f_favail = 1000
        data.f_namemax = 255
        return data

    # -- directories ---------------------------------------------------------------

    @_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not self.tree.attr(node).mode & 0o040000:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._listings[fh] = (node, [])
        return fh

    @_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Entries are ordered by inode, and start_id is "the next inode to list":
        # stable while entries come and go (no repeats, no skips).  A listing is
        # computed when it starts (or restarts: rewinddir) and kept for the
        # calls that continue it.
        node, entries = self._listings[fh]
        if start_id == 0 or not entries:
            await self._warm([node])
            entries[:] = sorted(
                (self._inode(child), name, child) for name, child in self.tree.children(node)
            )
            await self._warm([child for _, _, child in entries])
        for ino, name, child in entries:
            if ino < start_id:
                continue
            try:
                entry = self._entry(child)
            except VdifsError:
                continue  # vanished since the listing
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry, ino + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._listings.pop(fh, None)

    # -- files -----------------------------------------------------------------------

    def _live_disk(self, uuid: str) -> LiveDisk:
        disk = self._live.get(uuid)
        if disk is None:
            disk = LiveDisk(self.tree.sr, uuid, lambda: self.tree.export(uuid, "raw"))
            self._live[uuid] = disk
            self._flush_locks[uuid] = trio.Lock()
        return disk

    @_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        write = flags & os.O_ACCMODE != os.O_RDONLY
        fh = self._next_fh
        self._next_fh += 1
        if isinstance(node, Generated):
            if write:
                raise ReadOnly("generated files are read-only")
            self._handles[fh] = Handle(node, data=self.tree.generated(node))
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False)
        if isinstance(node, ChecksumsFile):
            if write:
                raise ReadOnly("SHA256SUMS is read-only")
            # The first open reads every file it lists (vdifs checksum does it ahead).
            data = await trio.to_thread.run_sync(self.tree.checksums, node, limiter=APPLIES)
            self._handles[fh] = Handle(node, data=data)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)
        if isinstance(node, UploadFile):
            # libfuse negotiates atomic O_TRUNC: truncation arrives here, not in setattr.
            upload = await self.imports.open(
                node.name, ctx.pid, write=write, truncate=bool(flags & os.O_TRUNC)
            )
            self._handles[fh] = Handle(node, upload=upload, writing=write)
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False)
        if flags & os.O_TRUNC:
            # A disk's size is fixed: truncating raw.img would destroy it.
            raise pyfuse3.FUSEError(errno.EPERM)
        await self._warm([node])
        export: Export | None = self.tree.open_export(node, write=write)
        immutable = self.tree.is_immutable(node)
        live = None
        live_raw = isinstance(node, RawImage) and not immutable
        if isinstance(node, RawImage) and live_raw and write:
            # A writer reads through its write buffer.  A read-only open of a
            # live disk pins the state at open, like an ephemeral snapshot: a
            # reader never sees half of an import.
            live = self._live_disk(node.uuid)
            live.open_handles += 1
            export = None
        pins = None
        if export is not None:
            pins = self.tree.sr.keep_readable(export.state.content)
        self._handles[fh] = Handle(node, export, live, pins=pins)
        # Snapshot files never change: keep their page cache across opens.  A
        # read-only open of a live raw.img reads the state it pinned, which the
        # kernel's page cache (one per inode, shared with the disk's writers)
        # cannot hold apart: it bypasses the cache (1 MiB requests, no shared mmap).
        # With -o direct_io, images (full.*, delta-from/*) bypass the page cache:
        # 1 MiB requests for streaming readers (cp, qemu-img: measured 1.5x to
        # 3.9x faster, docs/performance.md), but one request per read() for
        # small-buffer readers (sha256sum): so it is an option, not the default.
        pinned_live = live_raw and live is None
        image = isinstance(node, FullImage | DeltaImage)
        direct = pinned_live or (self.direct_io_images and image)
        return pyfuse3.FileInfo(fh=fh, keep_cache=immutable and not direct, direct_io=direct)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles[fh]
        if handle.data is not None:
            return handle.data[off : off + size]
        if handle.upload is not None:
            return await self.imports.read(handle.upload, off, size)
        # pyfuse3 replies from any buffer: the bytearray goes out without a copy.
        if handle.live is not None:
            live = handle.live
            return cast(bytes, await on_live_disk(lambda fetched: live.read(off, size, fetched)))
        export = handle.export
        assert export is not None

        async def read_at(offset: int, length: int) -> Buffer:
            return await nonblocking(
                lambda nowait: export.read_shared(offset, length, nowait=nowait)
            )

        # Small reads in order are served from bytes read ahead (vdifs.fs.window).
        return cast(bytes, await self._windows.get(fh, export.size).read(off, size, read_at))

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        if handle.upload is not None:
            return await self.imports.write(handle.upload, off, buf)
        live = handle.live
        if live is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        written = await on_live_disk(lambda fetched: live.write(off, buf, fetched))
        if live.dirty_bytes >= DIRTY_LIMIT:
            await self._flush_live(live)
        return written

    async def _flush_live(self, live: LiveDisk) -> None:
        async with self._flush_locks[live.uuid]:
            if not live.begin_flush():
                return
            ok = False
            changed: set[str] = set()
            try:
                await trio.to_thread.run_sync(live.commit, limiter=APPLIES)
                ok = True
            finally:
                # The new state is in place before the buffer lets go of the chunks.
                changed = self.tree.refresh()
                live.end_flush(ok=ok)
            # The writer's own raw.img pages already hold what it wrote.
            await self._invalidate_changed(changed, keep_raw_of=live.uuid)

    @_errors
    async def flush(self, fh: int) -> None:
        handle = self._handles[fh]
        if handle.live is not None:
            await self._flush_live(handle.live)
        if handle.upload is not None:
            await self.imports.flush(handle.upload)

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.flush(fh)

    @_errors
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        self._windows.drop(fh)
        if handle.pins is not None:
            handle.pins.release()
        if handle.upload is not None:
            await self.imports.release(handle.upload, writing=handle.writing)
        live = handle.live
        if live is not None:
            live.open_handles -= 1
            await self._flush_live(live)
            if live.open_handles == 0 and not live.dirty:
                self._live.pop(live.uuid, None)

    # -- import/ ------------------------------------------------------------------------

    def _import_dir(self, inode: int) -> None:
        if not isinstance(self._node(inode), ImportDir):
            raise pyfuse3.FUSEError(errno.EACCES if not self.tree.read_only else errno.EROFS)

    @_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._import_dir(parent_inode)
        upload = await self.imports.create(os.fsdecode(name), ctx.pid)
        node = UploadFile(upload.name)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(node, upload=upload, writing=True)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False), self._entry(node)

    @_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old, new = os.fsdecode(name_old), os.fsdecode(name_new)
        if isinstance(self._node(parent_inode_old), SnapshotsDir | VmSnapshotsDir):
            await self._rename_snapshot(parent_inode_old, old, parent_inode_new, new, flags)
            return
        self._import_dir(parent_inode_old)
        self._import_dir(parent_inode_new)
        await self.imports.rename(old, new, lambda upload: self._moved(upload, old, new))

    def _moved(self, upload: Upload, old: str, new: str) -> None:
        """The inode follows an upload to its new name (before it is applied)."""
        ino = self._inodes.pop(UploadFile(old), None)
        if ino is not None:
            self._inodes[UploadFile(new)] = ino
            self._nodes[ino] = UploadFile(new)
            for handle in self._handles.values():
                if handle.upload is upload:
                    handle.node = UploadFile(new)

    async def _rename_snapshot(
        self, parent_old: int, old: str, parent_new: int, new: str, flags: int
    ) -> None:
        folder = self._snapshot_folder(parent_old)
        if parent_new != parent_old:
            raise pyfuse3.FUSEError(errno.EXDEV)
        if flags & RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await trio.to_thread.run_sync(self.tree.rename_snapshot, folder, old, new)
        await self._refresh()

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._import_dir(parent_inode)
        await self.imports.unlink(os.fsdecode(name))

    # -- snapshots/ with -o snapshot_admin ---------------------------------------------

    def _snapshot_folder(self, parent_inode: int) -> SnapshotFolder:
        node = self._node(parent_inode)
        if not isinstance(node, SnapshotsDir | VmSnapshotsDir):
            # Directories are made only under snapshots/: nowhere else is writable.
            raise pyfuse3.FUSEError(errno.EROFS if self.tree.read_only else errno.EACCES)
        if self.tree.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not self.tree.snapshot_admin:
            # Off by default: an rm -rf on a backup host must not destroy anything.
            raise pyfuse3.FUSEError(errno.EPERM)
        return node

    @_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        folder = self._snapshot_folder(parent_inode)
        node = await trio.to_thread.run_sync(
            self.tree.take_snapshot, folder, os.fsdecode(name), limiter=APPLIES
        )
        await self._refresh()
        return self._entry(node)

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        folder = self._snapshot_folder(parent_inode)
        snap = await trio.to_thread.run_sync(
            self.tree.delete_snapshot, folder, os.fsdecode(name), limiter=APPLIES
        )
        log.info("snapshot %s deleted through rmdir", snap)
        await self._refresh()

    # -- watching the SR ----------------------------------------------------------------

    async def _invalidate(self, uuid: str, *, skip_raw: bool = False) -> None:
        """Drop the kernel's cached pages and attributes of a changed VDI's files.

        Off the loop, always: the kernel waits for page locks held by reads
        that only this loop can answer (measured: a deadlock otherwise).
        """
        inodes = [
            ino
            for node in self.tree.inode_nodes_of(uuid)
            if not (skip_raw and isinstance(node, RawImage))
            and (ino := self._inodes.get(node)) is not None
        ]
        if inodes:
            await trio.to_thread.run_sync(_invalidate_inodes, inodes)

    async def watch_sr(self) -> None:
        """Show changes made by other processes (the CLI) within a second."""
        while True:
            await trio.sleep(REFRESH_INTERVAL)
            try:
                await self._refresh()
            except Exception:
                log.exception("could not refresh from the SR")

    async def _refresh(self) -> None:
        """Reload the SR's records and drop what the kernel cached of changed VDIs."""
        await self._invalidate_changed(self.tree.refresh())

    async def _invalidate_changed(self, changed: set[str], keep_raw_of: str | None = None) -> None:
        for uuid in changed:
            if uuid in self._live and self._live[uuid].dirty:
                continue  # our own buffered writes stay visible
            await self._invalidate(uuid, skip_raw=uuid == keep_raw_of)


def _invalidate_inodes(inodes: list[int]) -> None:
    for ino in inodes:
        with contextlib.suppress(OSError):  # the kernel had nothing cached
            pyfuse3.invalidate_inode(ino, attr_only=False)
