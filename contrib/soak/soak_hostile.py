"""Hostile uploads that must fail with the documented errno and change nothing
(:class:`Hostile`)."""

from __future__ import annotations

import errno
import os
import random
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from soak_base import errno_in, errno_name, sha_file
from soak_model import CHUNK, SKIP, Disk, Failure, MiB, model_sha
from soak_uploads import Uploads

# A writer that uploads part of a file, says so, and waits to be killed.
PARTIAL_WRITER = """
import os, sys, time
src, dest, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
sent = 0
with open(src, "rb") as f:
    while sent < limit and (data := f.read(min(1 << 20, limit - sent))):
        os.write(fd, data)
        sent += len(data)
print("ready", flush=True)
time.sleep(600)
"""


class Hostile(Uploads):
    """Refused uploads: the documented errno, the target byte-identical."""

    # -- hostile uploads ----------------------------------------------------------------

    def valid_vhd(self, rng: random.Random) -> Path:
        snap = self.pick_snap(rng)
        out = self.images / f"valid-{next(self.names)}.vhd"
        exported = snap is not None and (
            self.cli("export", snap.uuid, str(out), "--format", "vhd").returncode == 0
        )
        if exported:
            return out
        if not self.qemu:
            raise Failure("no snapshot to export and no qemu-img")
        raw = self.images / f"valid-{next(self.names)}.raw"
        raw.write_bytes(rng.randbytes(rng.randint(1, 4 * MiB)))
        self.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on",
                  str(raw), str(out)])  # fmt: skip
        raw.unlink()
        return out

    def hostile_image(self, case: str, rng: random.Random) -> tuple[Path, set[int]]:
        """A file for a hostile case, and the errnos it may fail with."""
        out = self.images / f"{case}-{next(self.names)}"
        einval = {errno.EINVAL}
        if case in ("truncated-vhd", "footerless-vhd", "checksum-vhd", "header-checksum-vhd"):
            valid = self.valid_vhd(rng)
            data = bytearray(valid.read_bytes())
            valid.unlink()
            if case == "truncated-vhd":
                data = data[: rng.randrange(1, len(data) - 1)]
            elif case == "footerless-vhd":
                data = data[:-512]
            elif case == "checksum-vhd":
                at = rng.choice((0, len(data) - 512)) + 64 + rng.randrange(4)
                data[at] ^= 1 << rng.randrange(8)
            else:
                data[512 + 36 + rng.randrange(4)] ^= 0xFF
            out = out.with_suffix(".vhd")
            out.write_bytes(bytes(data))
            return out, einval
        if case == "empty-vhd":
            out = out.with_suffix(".vhd")
            out.write_bytes(b"")
            return out, einval
        if case == "garbage-qcow2":
            out = out.with_suffix(".qcow2")
            out.write_bytes(b"\0" + rng.randbytes(rng.randint(1, 300_000)))
            return out, einval
        if case == "magic-garbage-qcow2":
            out = out.with_suffix(".qcow2")
            out.write_bytes(b"QFI\xfb" + rng.randbytes(rng.randint(100, 300_000)))
            return out, {errno.EINVAL, errno.EOPNOTSUPP, errno.EFBIG}
        if case == "short-raw":
            # A raw file has no trailer: a short one may be a copy cut short.
            out = out.with_suffix(".raw")
            out.write_bytes(rng.randbytes(rng.randint(1, 8 * MiB)))
            return out, einval
        if case == "polyglot-qcow2":
            # A qcow2 that is also a fixed VHD: it reads as two different disks.
            valid = self.valid_vhd(rng)
            footer = valid.read_bytes()[-512:]
            valid.unlink()
            qcow2 = self.images / f"{case}-{next(self.names)}.qcow2"
            cmd = ["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(self.size)]
            if self.run(cmd).returncode != 0:
                raise Failure(f"{shlex.join(cmd)} failed")
            qcow2_bytes = qcow2.read_bytes()
            qcow2.unlink()
            fixed = bytearray(footer)
            fixed[60:64] = (2).to_bytes(4, "big")  # disk type: fixed
            fixed[16:24] = (0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")  # data offset: none
            size = len(qcow2_bytes) + (-len(qcow2_bytes) % 512)
            fixed[40:48] = fixed[48:56] = size.to_bytes(8, "big")
            fixed[64:68] = bytes(4)
            fixed[64:68] = ((~sum(fixed)) & 0xFFFFFFFF).to_bytes(4, "big")
            out = out.with_suffix(rng.choice((".qcow2", ".vhd")))
            out.write_bytes(qcow2_bytes.ljust(size, b"\0") + bytes(fixed))
            return out, einval
        if case == "too-big-raw":
            out = out.with_suffix(".raw")
            with open(out, "wb") as f:
                f.write(rng.randbytes(rng.randint(1, MiB)))
                f.truncate(self.size + rng.randint(1, 2 * MiB))
            return out, {errno.EFBIG}
        if case in ("too-big-vhd", "too-big-qcow2", "zstd-qcow2"):
            fmt = "vpc" if case == "too-big-vhd" else "qcow2"
            out = out.with_suffix(".vhd" if fmt == "vpc" else ".qcow2")
            size = self.size + CHUNK * rng.randint(1, 64) if case != "zstd-qcow2" else self.size
            opts = {"vpc": "force_size=on", "qcow2": "cluster_size=65536"}[fmt]
            if case == "zstd-qcow2":
                opts = "compression_type=zstd"
            cmd = ["qemu-img", "create", "-q", "-f", fmt, "-o", opts, str(out), str(size)]
            if self.run(cmd).returncode != 0:
                raise Failure(f"{shlex.join(cmd)} failed")
            return out, {errno.EOPNOTSUPP} if case == "zstd-qcow2" else {errno.EFBIG}
        raise AssertionError(case)

    def hostile(self, case: str, target: Disk, rng: random.Random) -> str:
        """A refused upload: the documented errno, the target byte-identical."""
        image, codes = self.hostile_image(case, rng)
        tool = rng.choice(self.tools)
        name = f"{target.uuid}{image.suffix}"
        try:
            with target.lock:
                if target.tainted:
                    return SKIP
                before = self.target_sha(target)
                code, text = self.upload(tool, image, name, target)
                after = sha_file(self.vdi_path(target.uuid, "raw.img"))[0]
                if after != before:
                    target.tainted = True
                    raise Failure(f"{case} by {tool} changed {target.name} ({code}: {text})")
                if code not in codes:
                    raise Failure(
                        f"{case} by {tool} into {target.name}: errno {code} ({text!r}),"
                        f" expected {sorted(errno_name(c) for c in codes)}"
                    )
                self.check_status(name, tool, "failed", code)
                if tool != "cli" and name in os.listdir(self.mnt / "import"):
                    raise Failure(f"{case} by {tool}: the refused {name} stays in import/")
        finally:
            image.unlink(missing_ok=True)
        return errno_name(code)

    def target_sha(self, target: Disk) -> str:
        want = model_sha(target.state())
        sha = sha_file(self.vdi_path(target.uuid, "raw.img"))[0]
        if sha != want:
            target.tainted = True
            raise Failure(f"{target.name} differs from the model before a hostile upload")
        return sha

    def wrong_base(self, rng: random.Random) -> str:
        """A delta into a VDI that never held its base: EINVAL (exit 10), nothing changed."""
        assert self.hostile_disk is not None
        target = self.hostile_disk
        snap = self.pick_snap(rng, lambda s: bool(self.lineage(s)))
        if snap is None:
            return SKIP
        bases = [b for b in self.lineage(snap) if b.state == "alive"]
        if not bases:
            return SKIP
        base = rng.choice(bases)
        fmt = rng.choice(("vhd", "qcow2"))
        with self.pinned(snap, base) as ok:
            if not ok:
                return SKIP
            image = self.image_of(snap, fmt, rng, base)
        tool = rng.choice(self.tools)
        name = f"{target.uuid}.{fmt}"
        try:
            with target.lock:
                before = self.target_sha(target)
                code, text = self.upload(tool, image, name, target)
                if sha_file(self.vdi_path(target.uuid, "raw.img"))[0] != before:
                    target.tainted = True
                    raise Failure(f"a delta onto the wrong base by {tool} changed {target.name}")
                if code != errno.EINVAL:
                    raise Failure(f"a delta onto the wrong base by {tool}: {code} ({text!r})")
                self.check_status(name, tool, "failed", code)
        finally:
            image.unlink()
        return "EINVAL"

    def killed_writer(self, target: Disk, rng: random.Random) -> str:
        """An upload whose writer is killed midway is not applied."""
        if rng.random() < 0.5 or not self.snaps:
            image = self.images / f"killed-{next(self.names)}.raw"
            image.write_bytes(rng.randbytes(self.size))
        else:
            image = self.valid_vhd(rng)
        name = f"{target.uuid}{image.suffix}"
        limit = rng.randint(1, max(1, image.stat().st_size - 1024))
        try:
            with target.lock:
                if target.tainted:
                    return SKIP
                before = self.target_sha(target)
                dest = self.mnt / "import" / name
                cmd = [sys.executable, "-c", PARTIAL_WRITER, str(image), str(dest), str(limit)]
                proc = self.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                try:
                    assert proc.stdout is not None and proc.stderr is not None
                    timer = threading.Timer(60, proc.kill)
                    timer.start()
                    line = proc.stdout.readline()
                    timer.cancel()
                    proc.kill()
                    proc.wait()
                    err = proc.stderr.read().decode(errors="replace")
                finally:
                    self.reap(proc)
                if line.strip() != b"ready":
                    if errno_in(err) == errno.EINVAL and image.suffix == ".vhd":
                        # A streamed VHD may be refused before the kill: still nothing applied.
                        self.stats.note("killed writer refused before the kill")
                    else:
                        raise Failure(f"the partial writer failed: {err.strip()}")
                deadline = time.monotonic() + 10
                while (status := self.import_status(name)) is None or status["state"] == "running":
                    if time.monotonic() > deadline:
                        raise Failure(f"the killed upload of {name} is still {status}")
                    time.sleep(0.05)
                if status["state"] != "failed":
                    raise Failure(f"the killed upload of {name} ended {status['state']}")
                if sha_file(self.vdi_path(target.uuid, "raw.img"))[0] != before:
                    target.tainted = True
                    raise Failure(f"a killed upload of {limit} bytes changed {target.name}")
        finally:
            image.unlink(missing_ok=True)
        return "refused"

    def hostile_new(self, rng: random.Random) -> str:
        """A truncated VHD as a new VDI: EINVAL and no VDI."""
        name = f"soak-bad-{next(self.names)}"
        image, codes = self.hostile_image(rng.choice(("truncated-vhd", "footerless-vhd")), rng)
        tool = rng.choice(self.tools)
        try:
            with self.new_vdi_lock:
                code, text = self.upload(tool, image, f"{name}.vhd", None)
        finally:
            image.unlink()
        if code not in codes:
            raise Failure(f"a truncated VHD as new VDI {name} by {tool}: {code} ({text!r})")
        time.sleep(0.6)  # the mount shows a new VDI within 0.5 s
        if name in os.listdir(self.mnt / "by-name"):
            raise Failure(f"a refused upload created VDI {name}")
        return "EINVAL"

    def hostile_loop(self, rng: random.Random) -> None:
        assert self.hostile_disk is not None
        cases = [
            "truncated-vhd",
            "footerless-vhd",
            "checksum-vhd",
            "header-checksum-vhd",
            "empty-vhd",
            "garbage-qcow2",
            "magic-garbage-qcow2",
            "too-big-raw",
            "short-raw",
        ]
        if self.qemu:
            cases += ["too-big-vhd", "too-big-qcow2", "zstd-qcow2", "polyglot-qcow2"]
        while not self.stop.is_set():
            r = rng.random()
            target = self.hostile_disk
            if rng.random() < 0.3:
                target = rng.choice(self.targets + self.live)
            if r < 0.75:
                case = rng.choice(cases)
                self.op(f"hostile-{case}", self.hostile, case, target, rng)
            elif r < 0.85:
                self.op("hostile-wrong-base", self.wrong_base, rng)
            elif r < 0.95:
                self.op("hostile-killed-writer", self.killed_writer, target, rng)
            else:
                self.op("hostile-new-vdi", self.hostile_new, rng)
