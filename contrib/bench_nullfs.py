"""pyfuse3 alone, for contrib/bench.py: the floors under vdifs' import and listing.

::

    .venv/bin/python contrib/bench_nullfs.py MOUNTPOINT
    .venv/bin/python contrib/bench_nullfs.py --tree TREE.json MOUNTPOINT

Serves MOUNTPOINT in the foreground until it is unmounted (``fusermount3 -u``)
or sent SIGTERM, SIGINT or SIGHUP, and prints nothing unless something fails.

Without ``--tree`` it is a null file system: its root directory accepts a
file of any name (create, open for writing, truncation, flush, fsync,
release) and discards every write after counting its bytes: a file's size is
the count of the bytes written to it since it was created or truncated, and
reading it returns nothing.  So ``cp`` of an image into it costs what vdifs'
``import/`` costs in FUSE and pyfuse3 before vdifs parses, hashes or stores
anything: the floor under the import ratios.

With ``--tree`` it serves, read-only, the shape of a tree captured from a
vdifs mount (``TREE.json``: ``[path, mode, size, mtime_ns, link target]`` per
entry, the root first): every attribute built once, directories listed from
lists, links from a dict.  ``ls -lR`` of it sends the requests ``ls -lR`` of
that vdifs mount sends (OPENDIR, READDIRPLUS, RELEASEDIR, READLINK), answered
with no work: the floor under ``ls_lr_1000_s``.  Entries are listed by inode
and continue at "the next inode", as vdifs lists them, with vdifs' one-second
timeouts for a live VDI's files.

Both are mounted and run as vdifs mounts an SR: the same FUSE options
(``BASE_OPTIONS``), the same ``pyfuse3.main`` task limits, no writeback
cache, an upload's FileInfo flags and vdifs' st_blksize (cp's buffer size).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import stat
import sys
import time

import pyfuse3
import trio

from vdifs.fs.mount import BASE_OPTIONS
from vdifs.fs.ops import BLKSIZE


class NullOperations(pyfuse3.Operations):
    enable_writeback_cache = False  # as vdifs: every write reaches the daemon

    def __init__(self) -> None:
        super().__init__()
        self.inodes: dict[str, int] = {}  # file name -> inode
        self.sizes: dict[int, int] = {}  # inode -> bytes written since created or truncated
        self.handles: dict[int, int] = {}  # fh -> inode
        self.next_fh = itertools.count(1)
        self.uid, self.gid = os.geteuid(), os.getegid()
        self.mtime_ns = time.time_ns()

    def entry(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode, entry.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            entry.st_mode, entry.st_nlink = stat.S_IFREG | 0o644, 1
            entry.st_size = self.sizes[inode]
        entry.st_uid, entry.st_gid = self.uid, self.gid
        entry.st_blksize = BLKSIZE
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self.mtime_ns
        entry.attr_timeout = entry.entry_timeout = 0  # stat asks: the count, not a cache
        return entry

    def file(self, inode: int) -> int:
        if inode not in self.sizes:
            raise pyfuse3.FUSEError(errno.ENOENT if inode != pyfuse3.ROOT_INODE else errno.EISDIR)
        return inode

    def new_handle(self, inode: int) -> pyfuse3.FileInfo:
        fh = next(self.next_fh)
        self.handles[fh] = inode
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False)  # as an upload's

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self.entry(pyfuse3.ROOT_INODE)
        try:
            return self.entry(self.inodes[os.fsdecode(name)])
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            self.file(inode)
        return self.entry(inode)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size:  # truncation keeps at most that many of the bytes counted
            self.sizes[self.file(inode)] = min(self.sizes[inode], attr.st_size)
        return self.entry(inode)  # modes and times are ignored, as by an upload

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        inode = self.inodes.setdefault(os.fsdecode(name), pyfuse3.ROOT_INODE + 1 + len(self.inodes))
        self.sizes[inode] = 0
        return self.new_handle(inode), self.entry(inode)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_TRUNC:  # libfuse negotiates atomic O_TRUNC: it arrives here
            self.sizes[self.file(inode)] = 0
        return self.new_handle(self.file(inode))

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return b""  # a sink: nothing is kept

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.sizes[self.handles[fh]] += len(buf)
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def release(self, fh: int) -> None:
        del self.handles[fh]


class TreeOperations(pyfuse3.Operations):
    """A captured tree's shape, served from dicts (see the module docstring)."""

    TIMEOUT = 1.0  # vdifs' MUTABLE_TIMEOUT: the listing's VDIs are live

    def __init__(self, entries: list[list[object]]) -> None:
        super().__init__()
        uid, gid = os.geteuid(), os.getegid()
        inodes: dict[str, int] = {}
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.listings: dict[int, list[tuple[int, bytes]]] = {}
        self.names: dict[int, dict[bytes, int]] = {}
        self.targets: dict[int, bytes] = {}
        for number, (path, mode, size, mtime_ns, target) in enumerate(entries):
            assert isinstance(path, str) and isinstance(mode, int) and isinstance(size, int)
            assert isinstance(mtime_ns, int)
            inode = inodes[path] = pyfuse3.ROOT_INODE + number
            attr = pyfuse3.EntryAttributes()
            attr.st_ino, attr.st_mode, attr.st_size = inode, mode, size
            attr.st_nlink = 2 if stat.S_ISDIR(mode) else 1
            attr.st_uid, attr.st_gid, attr.st_blksize = uid, gid, BLKSIZE
            attr.st_blocks = -(-size // 512)
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime_ns
            attr.attr_timeout = attr.entry_timeout = self.TIMEOUT
            self.attrs[inode] = attr
            if stat.S_ISDIR(mode):
                self.listings[inode], self.names[inode] = [], {}
            if isinstance(target, str):
                self.targets[inode] = os.fsencode(target)
            if path:
                parent = inodes[path.rpartition("/")[0]]
                name = os.fsencode(path.rpartition("/")[2])
                self.listings[parent].append((inode, name))
                self.names[parent][name] = inode

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self.attrs[parent_inode]
        try:
            return self.attrs[self.names[parent_inode][name]]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs[inode]

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for inode, name in self.listings[fh]:
            if inode >= start_id and not pyfuse3.readdir_reply(
                token, name, self.attrs[inode], inode + 1
            ):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.targets[inode]


async def serve() -> bool:
    """Serve until unmounted (False) or signalled (True: the mount is still there)."""
    async with trio.open_nursery() as nursery:
        stopped = trio.Event()

        async def stop_on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for _ in sigs:
                    stopped.set()
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signals)
        await pyfuse3.main(min_tasks=2, max_tasks=64)  # as vdifs.fs.mount
        nursery.cancel_scope.cancel()
    return stopped.is_set()


def main() -> int:
    args = sys.argv[1:]
    ops: pyfuse3.Operations = NullOperations()
    if len(args) == 3 and args[0] == "--tree":
        with open(args[1]) as f:
            ops = TreeOperations(json.load(f))
        args = args[2:]
    if len(args) != 1:
        print(f"usage: {sys.argv[0]} [--tree TREE.json] MOUNTPOINT", file=sys.stderr)
        return 2
    pyfuse3.init(ops, args[0], set(BASE_OPTIONS))
    signalled = False
    try:
        signalled = trio.run(serve)
    finally:
        pyfuse3.close(unmount=signalled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
