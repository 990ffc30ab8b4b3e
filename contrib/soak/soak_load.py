"""Readers, writers and snapshot churn (:class:`Load`)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO

from soak_base import SoakBase, sha_file
from soak_model import (
    CHUNK,
    GONE,
    RANGE,
    SKIP,
    Disk,
    Expect,
    Failure,
    MiB,
    Snap,
    apply_write,
    first_difference,
    model_range,
    model_sha,
    write_bytes,
)

# A writer holding uncommitted writes in another process: the soak's own fork()s would
# flush (commit) an open descriptor of its own, as the child closes its copy at exec.
DIRTY_WRITER = """
import os, sys
path, offset, data = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "rb").read()
fd = os.open(path, os.O_WRONLY)
os.pwrite(fd, data, offset)
print("ready", flush=True)
sys.stdin.readline()
os.close(fd)
print("closed", flush=True)
"""


def pipes(proc: subprocess.Popen[bytes]) -> tuple[IO[bytes], IO[bytes], IO[bytes]]:
    """stdin, stdout and stderr of a child spawned with the three piped."""
    assert proc.stdin and proc.stdout and proc.stderr
    return proc.stdin, proc.stdout, proc.stderr


class Load(SoakBase):
    """Snapshot churn, readers and writers."""

    # -- snapshots --------------------------------------------------------------------

    def register(self, snap: Snap) -> None:
        with self.reg_lock:
            self.snaps[snap.uuid] = snap
            self.every_snap.append(snap.uuid)

    def pick_snap(
        self, rng: random.Random, pred: Callable[[Snap], bool] | None = None
    ) -> Snap | None:
        with self.reg_lock:
            found = [s for s in self.snaps.values() if s.state == "alive" and (not pred or pred(s))]
        return rng.choice(found) if found else None

    def lineage(self, snap: Snap) -> list[Snap]:
        """Other snapshots of snap's VDI: delta-from/ names them."""
        with self.reg_lock:
            return [
                s
                for s in self.snaps.values()
                if s.disk is snap.disk and s is not snap and s.state in ("alive", "checkpoint")
            ]

    @contextlib.contextmanager
    def pinned(self, *snaps: Snap) -> Iterator[bool]:
        """Keep snapshots from deletion while an upload uses them."""
        with self.reg_lock:
            ok = all(s.state == "alive" for s in snaps)
            if ok:
                for s in snaps:
                    s.pins += 1
        try:
            yield ok
        finally:
            if ok:
                with self.reg_lock:
                    for s in snaps:
                        s.pins -= 1

    @contextlib.contextmanager
    def reading(self, snap: Snap) -> Iterator[None]:
        with self.reg_lock:
            snap.readers += 1
        try:
            yield
        finally:
            with self.reg_lock:
                snap.readers -= 1

    def take_snapshot(self, disk: Disk, rng: random.Random | None = None) -> str:
        """With rng: while another process holds uncommitted writes, which it must not hold."""
        with disk.lock:
            if disk.tainted:
                return SKIP
            helper = None
            if rng is not None:
                length = rng.randint(1, 4 * CHUNK)
                offset, wseed = rng.randrange(self.size - length + 1), rng.getrandbits(40) | 1
                data = self.images / f"dirty-{next(self.names)}.bin"
                data.write_bytes(write_bytes(offset, length, wseed))
                raw = str(self.vdi_path(disk.uuid, "raw.img"))
                helper = self.spawn(
                    [sys.executable, "-c", DIRTY_WRITER, raw, str(offset), str(data)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                stdin, stdout, stderr = pipes(helper)
                timer = threading.Timer(60, helper.kill)
                timer.start()
            try:
                if helper is not None and stdout.readline() != b"ready\n":
                    disk.tainted = True
                    helper.wait()
                    raise Failure(f"the dirty writer failed: {stderr.read()!r}")
                name = f"soak-{next(self.names)}"
                started = time.monotonic()
                uuid = self.cli_ok("vdi", "snapshot", disk.uuid, "--name", name)
                self.timed("cli-snapshot", started)
                disk.trail.append(f"{started - self.started:.1f}s snapshot {uuid}")
                chunks = disk.state()
            finally:
                if helper is not None:
                    try:
                        stdin.write(b"go\n")  # close(): commits, after the snapshot
                        stdin.close()
                        closed = stdout.readline()
                        helper.wait()
                        err = stderr.read().decode(errors="replace").strip()
                    finally:
                        timer.cancel()
                        self.reap(helper)
                        data.unlink()
                    if closed != b"closed\n" or helper.returncode != 0:
                        disk.tainted = True
                        raise Failure(f"the dirty writer's close() failed: {err}")
                    apply_write(disk.chunks, offset, length, wseed)
                    disk.bump()
        snap = Snap(uuid, disk, chunks, model_sha(chunks))
        if not self.appear(self.vdi_path(uuid, "raw.img")):
            self.every_snap.append(uuid)
            raise Failure(f"snapshot {uuid} of {disk.name} did not appear within 10 s")
        self.register(snap)
        return "ok"

    def delete_snapshot(self, snap: Snap) -> str:
        with self.reg_lock:
            if snap.state not in ("alive", "checkpoint") or snap.pins:
                return SKIP
            snap.state = "deleting"
            if snap.readers:
                self.delete_while_read += 1
        snap.disk.trail.append(f"{self.elapsed():.1f}s snapshot-delete {snap.uuid}")
        self.cli_ok("vdi", "snapshot-delete", snap.uuid)
        with self.reg_lock:
            snap.state = "deleted"
            del self.snaps[snap.uuid]
            self.gone.add(snap.uuid)
        if not self.vanish(self.vdi_path(snap.uuid)):
            raise Failure(f"deleted snapshot {snap.uuid} still listed after 10 s")
        return "ok"

    def checkpoint(self, snap: Snap) -> str:
        with self.reg_lock:
            if snap.state != "alive" or snap.pins:
                return SKIP
            snap.state = "checkpointing"
        snap.disk.trail.append(f"{self.elapsed():.1f}s data-destroy {snap.uuid}")
        self.cli_ok("vdi", "data-destroy", snap.uuid)
        with self.reg_lock:
            snap.state = "checkpoint"
        if not self.vanish(self.vdi_path(snap.uuid, "raw.img")):
            raise Failure(f"checkpoint {snap.uuid} still shows raw.img after 10 s")
        return "ok"

    def gc(self) -> str:
        """`vdifs sr gc` while nothing is written or imported (docs/dev-storage.md asks so:
        a commit deduplicated against data gc retires fails with EBUSY); readers of
        deleted snapshots go on (their open views pin their packs)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.new_vdi_lock)
            for disk in self.disks:
                stack.enter_context(disk.lock)
            self.cli_ok("sr", "gc")
        return "ok"

    def snapshotter(self, rng: random.Random) -> None:
        while not self.stop.wait(rng.uniform(0.2, 1.2)):
            disk = rng.choice(self.live + self.targets)
            with self.reg_lock:
                own = [s for s in self.snaps.values() if s.disk is disk]
                every = list(self.snaps.values())
            r = rng.random()
            if r < 0.05:
                self.op("sr-gc", self.gc)
            elif r < 0.12 and (alive := [s for s in own if s.state == "alive"])[2:]:
                self.op("checkpoint", self.checkpoint, rng.choice(alive[:-1]))
            elif r < 0.45 and len(own) < self.args.max_snapshots:
                self.op("snapshot", self.take_snapshot, disk)
            elif r < 0.55 and len(own) < self.args.max_snapshots and disk.role == "live":
                self.op("snapshot-dirty", self.take_snapshot, disk, rng)
            elif every:
                victims = [s for s in every if len([o for o in every if o.disk is s.disk]) > 2]
                read = [s for s in victims if s.readers]
                pool = read if read and rng.random() < 0.7 else victims
                if pool:
                    self.op("snapshot-delete", self.delete_snapshot, rng.choice(pool))

    # -- readers ------------------------------------------------------------------------

    def may_vanish(self, snap: Snap, base: Snap | None = None) -> bool:
        return snap.state != "alive" or (base is not None and base.state in ("deleting", "deleted"))

    def expect(self, snap: Snap, rel: str, base: Snap | None) -> Expect | None:
        """What a file of a snapshot holds: the model for raw.img, else `vdifs export`."""
        if rel == "raw.img":
            return Expect(snap.raw_sha, self.size)
        key = (snap.uuid, rel)
        with self.reg_lock:
            known = self.expected.get(key)
        if known is not None:
            return known
        fmt = rel.rsplit(".", 1)[1]
        args = [snap.uuid, "--format", fmt] + (["--base", base.uuid] if base else [])
        started = time.monotonic()
        code, sha, size, err = self.export_sha(*args)
        self.timed("cli-export", started)
        if code != 0:
            if code == 3 and self.may_vanish(snap, base):
                return None
            raise Failure(f"vdifs export {' '.join(args)} exited {code}: {err}")
        with self.reg_lock:
            known = self.expected.setdefault(key, Expect(sha, size))
        if known.sha != sha:
            raise Failure(f"two exports of {snap.uuid}/{rel} differ")
        return known

    def read_file(self, snap: Snap, rel: str, base: Snap | None, bufsize: int) -> str:
        want = self.expect(snap, rel, base)
        if want is None:
            return "vanished"
        path = self.vdi_path(snap.uuid, rel)
        with self.reading(snap):
            try:
                sha, size, st_size = sha_file(path, bufsize)
            except OSError as exc:
                if exc.errno in GONE and self.may_vanish(snap, base):
                    return "vanished"
                raise
        if (sha, size) != (want.sha, want.size):
            raise Failure(
                f"{snap.uuid}/{rel} ({snap.state}): read {size} bytes sha256 {sha[:16]},"
                f" expected {want.size} bytes {want.sha[:16]}"
            )
        if st_size != size:
            raise Failure(f"{snap.uuid}/{rel}: st_size {st_size} but {size} bytes read")
        return "ok"

    def offsets(self, rng: random.Random, count: int) -> list[int]:
        if rng.random() < 0.25:
            # In order, as sha256sum or tar read: the daemon's read windows.
            start = rng.randrange(max(1, self.size - count * RANGE))
            return [min(start + i * RANGE, self.size - 1) for i in range(count)]
        out = []
        for _ in range(count):
            r = rng.random()
            if r < 0.4:
                out.append(rng.randrange(self.size // CHUNK) * CHUNK)
            elif r < 0.85:
                out.append(rng.randrange(self.size - RANGE + 1))
            else:
                out.append(max(0, self.size - rng.randint(1, 2 * RANGE)))
        return out

    def read_ranges(self, snap: Snap, rng: random.Random) -> str:
        path = self.vdi_path(snap.uuid, "raw.img")
        with self.reading(snap):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                if exc.errno in GONE and self.may_vanish(snap):
                    return "vanished"
                raise
            try:
                for off in self.offsets(rng, rng.randint(1, 16)):
                    try:
                        data = os.pread(fd, RANGE, off)
                    except OSError as exc:
                        if exc.errno in GONE and self.may_vanish(snap):
                            return "vanished"
                        raise
                    want = model_range(snap.chunks, off, RANGE)
                    if data != want:
                        raise Failure(
                            f"{snap.uuid}/raw.img ({snap.state}) at {off}: "
                            + first_difference(data, want)
                        )
                    if rng.random() < 0.3:
                        time.sleep(0.02)  # give the deleter a chance to strike
            finally:
                os.close(fd)
        return "ok"

    def read_live_locked(self, disk: Disk, rng: random.Random) -> str:
        with disk.lock:
            if disk.tainted:
                return SKIP
            fd = os.open(self.vdi_path(disk.uuid, "raw.img"), os.O_RDONLY)
            try:
                for off in self.offsets(rng, rng.randint(1, 8)):
                    data = os.pread(fd, RANGE, off)
                    want = model_range(disk.state(), off, RANGE)
                    if data != want:
                        raise Failure(
                            f"live {disk.name} at {off} (v{disk.version}): "
                            + first_difference(data, want)
                        )
            finally:
                os.close(fd)
        return "ok"

    def read_live_pinned(self, disk: Disk, rng: random.Random) -> str:
        """Without the lock: a read-only handle reads the state committed at its open.

        Two handles, the second opened a little later (writes commit meanwhile), read
        the same ranges, mostly where writers were lately, in either order: each must
        keep showing one state of its own window of versions.
        """
        if disk.tainted:
            return SKIP
        path = self.vdi_path(disk.uuid, "raw.img")
        handles: list[tuple[int, str, int, int]] = []  # fd, name, window
        candidates: list[set[int]] = []
        try:
            for name in ("first", "second"):
                low = disk.committed
                fd = os.open(path, os.O_RDONLY)
                handles.append((fd, name, low, disk.version + 1))
                candidates.append(set(range(low, disk.version + 2)))
                time.sleep(rng.random() * 0.3)  # writes commit meanwhile
            offsets = self.offsets(rng, rng.randint(1, 8))
            since = handles[0][2]  # written between the opens, else lately
            recent = [o for v, o in disk.recent if v > since] or [o for _, o in disk.recent]
            for i in range(len(offsets)):
                if recent and rng.random() < 0.7:
                    offsets[i] = min(rng.choice(recent), self.size - RANGE)
            for off in offsets:
                order = [0, 1] if rng.random() < 0.5 else [1, 0]
                for h in order:
                    fd, name, low, high = handles[h]
                    data = os.pread(fd, RANGE, off)

                    def matching(data: bytes = data, off: int = off, h: int = h) -> set[int]:
                        return {
                            v
                            for v in candidates[h]
                            if (c := disk.history.get(v)) is not None
                            and model_range(c, off, RANGE) == data
                        }

                    found = matching()
                    if not found and high not in disk.history:
                        with disk.lock:  # a write committed but not yet in the model
                            pass
                        found = matching()
                    if not found and not disk.tainted:
                        shows = [v for v, c in list(disk.history.items())
                                 if model_range(c, off, RANGE) == data]  # fmt: skip
                        raise Failure(
                            f"live {disk.name}: the {name} of two read-only handles, opened"
                            f" at v{low}..v{high}, read {RANGE} bytes at {off} of version(s)"
                            f" {shows[-5:] or '?'} after version(s) {sorted(candidates[h])}"
                        )
                    candidates[h] = found
        finally:
            for fd, *_ in handles:
                os.close(fd)
        return "ok"

    def read_live_whole(self, disk: Disk, bufsize: int) -> str:
        with disk.lock:
            if disk.tainted:
                return SKIP
            sha, size, _ = sha_file(self.vdi_path(disk.uuid, "raw.img"), bufsize)
            if (sha, size) != (model_sha(disk.state()), self.size):
                raise Failure(f"live {disk.name} (v{disk.version}): raw.img differs from the model")
        return "ok"

    def read_info(self, snap: Snap) -> str:
        try:
            info = json.loads(self.vdi_path(snap.uuid, "info.json").read_text())
        except OSError as exc:
            if exc.errno in GONE and snap.state in ("deleting", "deleted"):
                return "vanished"
            raise
        if snap.state != "alive":
            return "ok"
        wrong = {
            key: info.get(key)
            for key, want in (
                ("uuid", snap.uuid),
                ("virtual_size", self.size),
                ("is_a_snapshot", True),
                ("snapshot_of", snap.disk.uuid),
            )
            if info.get(key) != want
        }
        if wrong:
            raise Failure(f"{snap.uuid}/info.json: {wrong}")
        return "ok"

    def reader(self, rng: random.Random) -> None:
        while not self.stop.is_set():
            r = rng.random()
            bufsize = rng.choice((4096, 128 * 1024, MiB, 4 * MiB))
            if r < 0.4:
                snap = self.pick_snap(rng)
                if snap is None:
                    time.sleep(0.1)
                    continue
                rel, base, label = rng.choice(
                    [("raw.img", None, "raw"), ("full.vhd", None, "vhd")]
                    + [("full.qcow2", None, "qcow2")]
                    + [
                        (f"delta-from/{b.uuid}.{fmt}", b, f"delta-{fmt}")
                        for b in self.lineage(snap)
                        for fmt in ("vhd", "qcow2")
                    ]
                )
                self.op(f"read-{label}", self.read_file, snap, rel, base, bufsize)
            elif r < 0.65:
                snap = self.pick_snap(rng)
                if snap is not None:
                    self.op("read-range", self.read_ranges, snap, rng)
            elif r < 0.8:
                disk = rng.choice(self.live + self.targets)
                self.op("read-live-pinned", self.read_live_pinned, disk, rng)
            elif r < 0.9:
                disk = rng.choice(self.live + self.targets)
                self.op("read-live-range", self.read_live_locked, disk, rng)
            elif r < 0.93:
                self.op("read-live-whole", self.read_live_whole, rng.choice(self.live), bufsize)
            else:
                snap = self.pick_snap(rng)
                if snap is not None:
                    self.op("read-info", self.read_info, snap)

    # -- writers ------------------------------------------------------------------------

    def write(self, disk: Disk, rng: random.Random) -> str:
        writes = []
        nchunks = self.size // CHUNK
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            r = rng.random()
            if r < 0.4:
                length = rng.randint(1, 3 * CHUNK)
                offset = rng.randrange(self.size - length + 1)
            elif r < 0.8:
                n = rng.randint(1, 16)
                offset, length = rng.randrange(nchunks - n + 1) * CHUNK, n * CHUNK
            elif r < 0.9:
                length = rng.choice((rng.randint(1, 2 * CHUNK), CHUNK * rng.randint(1, 8)))
                offset = rng.randrange((self.size - length) // CHUNK + 1) * CHUNK
                if rng.random() < 0.5:
                    offset = rng.randrange(self.size - length + 1)
                writes.append((offset, length, 0))  # zeros
                continue
            else:
                length = rng.randint(1, CHUNK)
                offset = self.size - length
            writes.append((offset, length, rng.getrandbits(40) | 1))
        fsync = rng.random() < 0.8
        readback = rng.random() < 0.3
        with disk.lock:
            if disk.tainted:
                return SKIP
            try:
                fd = os.open(self.vdi_path(disk.uuid, "raw.img"), os.O_RDWR)
                try:
                    for offset, length, wseed in writes:
                        done = os.pwrite(fd, write_bytes(offset, length, wseed), offset)
                        if done != length:
                            raise Failure(f"pwrite of {length} bytes at {offset} wrote {done}")
                        # A version per pwrite: any fork() of this process commits what
                        # was written so far (the child's close() of its copy is a flush).
                        apply_write(disk.chunks, offset, length, wseed)
                        disk.bump(committed=False)
                        disk.recent.append((disk.version, offset))
                    if readback:  # a writer reads its own writes, committed or not
                        for offset, length, _ in writes:
                            want = model_range(disk.state(), offset, length)
                            got = os.pread(fd, length, offset)
                            if got != want:
                                raise Failure(
                                    f"{disk.name}: the writer's handle reads back at {offset}: "
                                    + first_difference(got, want)
                                )
                    if fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            except BaseException:
                disk.tainted = True
                raise
            disk.committed = disk.version
        return "ok"

    def write_past_end(self, disk: Disk, rng: random.Random) -> str:
        """Beyond the end: ENOSPC; across it: a short write (or ENOSPC, nothing written)."""
        across = rng.random() < 0.5
        inside = rng.randint(1, 4096) if across else 0
        offset = self.size - inside if across else self.size + rng.randint(0, 10 * MiB)
        length = inside + rng.randint(1, 8192)
        wseed = rng.getrandbits(40) | 1
        data = write_bytes(offset, inside, wseed) + b"\xee" * (length - inside)
        with disk.lock:
            if disk.tainted:
                return SKIP
            fd = os.open(self.vdi_path(disk.uuid, "raw.img"), os.O_WRONLY)
            try:
                try:
                    done: int | None = os.pwrite(fd, data, offset)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    done = None
                if done is not None and (not across or done != inside):
                    disk.tainted = True
                    raise Failure(f"pwrite of {length} at {offset} (size {self.size}) -> {done}")
                os.fsync(fd)
            finally:
                os.close(fd)
            if done:
                apply_write(disk.chunks, offset, done, wseed)
                disk.bump()
        return "ENOSPC" if done is None else "short"

    def writer(self, rng: random.Random) -> None:
        while not self.stop.is_set():
            disk = rng.choice(self.live)
            if rng.random() < 0.05:
                self.op("write-past-end", self.write_past_end, disk, rng)
            else:
                self.op("write", self.write, disk, rng)
            time.sleep(rng.random() * self.args.write_pause)
