"""Uploads of valid images into import/ with every tool (:class:`Uploads`)."""

from __future__ import annotations

import hashlib
import os
import random
import shlex
import shutil
import time
from pathlib import Path

from soak_base import EXIT_ERRNO, copy_in, errno_in, errno_name, sha_file
from soak_load import Load
from soak_model import SKIP, Disk, Failure, MiB, Snap, model_sha, write_bytes, write_model


class Uploads(Load):
    """Valid images uploaded into import/ by every tool: the target must then hold them."""

    # -- uploads --------------------------------------------------------------------------

    def upload(self, tool: str, src: Path, name: str, target: Disk | None) -> tuple[int, str]:
        """Copy src into import/name with tool: (errno or 0, what the tool said)."""
        started = self.elapsed()
        code, text = self._upload(tool, src, name, target)
        if code != 0 and tool != "cli" and (status := self.import_status(name)):
            text += f" [import/.status: {status.get('state')}: {status.get('error')}]"
        if target is not None:
            if code != 0:
                text += f" [{target.name} lately: {'; '.join(target.trail)}]"
            result = errno_name(code) if code else "ok"
            target.trail.append(f"{started:.1f}s {tool} {src.name} -> {result}")
        return code, text

    def _upload(self, tool: str, src: Path, name: str, target: Disk | None) -> tuple[int, str]:
        dest = self.mnt / "import" / name
        self.stats.note(f"tool {tool}")
        if tool == "python":
            code = copy_in(src, dest)
            return code, os.strerror(code) if code > 0 else ""
        if tool == "cli":
            if target is None:
                args = ["import", "--create", name.rsplit(".", 1)[0], str(src)]
            else:
                args = ["import", target.uuid, str(src)]
            result = self.cli(*args)
            text = result.stderr.decode(errors="replace").strip()
            if result.returncode == 0:
                return 0, text
            return EXIT_ERRNO.get(result.returncode, -result.returncode), text
        # -I: rsync must not skip a file whose size and time match the applied stub.
        commands = {
            "cp": ["cp", str(src), str(dest)],
            "rsync": ["rsync", "-I", str(src), str(dest)],
            "rsync-inplace": ["rsync", "-I", "--inplace", str(src), str(dest)],
            "dd": ["dd", f"if={src}", f"of={dest}", "bs=1M", "status=none"],
        }
        result = self.run(commands[tool])
        text = result.stderr.decode(errors="replace").strip()
        if result.returncode == 0:
            return 0, text
        return errno_in(text), text

    def verify_target(self, disk: Disk, tool: str, what: str) -> None:
        """The target holds the model: at once after the mount's close(), soon after the CLI
        (the daemon sees another process's commits when it next polls the SR)."""
        want = model_sha(disk.state())
        path = self.vdi_path(disk.uuid, "raw.img")
        sha, size, _ = sha_file(path)
        deadline = time.monotonic() + 5
        while (sha, size) != (want, self.size) and time.monotonic() < deadline:
            time.sleep(0.1)
            sha, size, _ = sha_file(path)
            if sha == want and tool != "cli":
                raise Failure(f"{tool} of {what}: {disk.name} showed stale content at first")
        if (sha, size) != (want, self.size):
            disk.tainted = True
            raise Failure(f"{tool} of {what}: {disk.name} does not hold what was imported")
        disk.committed = disk.version  # the mount shows it now (`vdifs import`: within 1 s)

    def check_status(self, name: str, tool: str, state: str, code: int = 0) -> None:
        if tool == "cli":
            return
        status = self.import_status(name)
        if status is None or status.get("state") != state:
            raise Failure(f"import/.status/{name}.json after {tool}: {status}")
        if code and status.get("errno") != code:
            raise Failure(f"import/.status/{name}.json after {tool}: errno {status.get('errno')}")

    def image_of(self, snap: Snap, fmt: str, rng: random.Random, base: Snap | None = None) -> Path:
        """A file holding snap (or its delta from base) as fmt, made one of several ways."""
        ext = "raw" if fmt == "raw" else fmt
        out = self.images / f"{snap.uuid}-{next(self.names)}.{ext}"
        if base is not None:
            source = rng.choice(("mount", "export"))
            rel = f"delta-from/{base.uuid}.{fmt}"
        else:
            source = rng.choice(("mount", "export", "qemu") if self.qemu else ("mount", "export"))
            rel = "raw.img" if fmt == "raw" else f"full.{fmt}"
        self.stats.note(f"image from {source}")
        started = time.monotonic()
        if source == "qemu" and fmt == "raw":
            write_model(snap.chunks, out)
        elif source == "qemu":
            raw = self.images / f"{out.name}.model"
            write_model(snap.chunks, raw)
            opts = {
                "vhd": [
                    ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
                    ["-O", "vpc", "-o", "subformat=fixed,force_size=on"],
                ],
                "qcow2": [
                    ["-O", "qcow2"],
                    ["-O", "qcow2", "-c"],
                    ["-O", "qcow2", "-o", "compat=0.10"],
                    ["-O", "qcow2", "-o", "cluster_size=16384"],
                ],
            }[fmt]
            cmd = ["qemu-img", "convert", "-f", "raw", *rng.choice(opts), str(raw), str(out)]
            result = self.run(cmd)
            raw.unlink()
            if result.returncode != 0:
                raise Failure(f"{shlex.join(cmd)}: {result.stderr.decode(errors='replace')}")
            self.timed("make-image-qemu", started)
            return out
        elif source == "mount":
            shutil.copyfile(self.vdi_path(snap.uuid, rel), out)
        else:
            args = [snap.uuid, str(out), "--format", fmt] + (["--base", base.uuid] if base else [])
            self.cli_ok("export", *args)
        self.timed(f"make-image-{source}", started)
        want = self.expect(snap, rel, base)
        sha, size, _ = sha_file(out)
        if want is None or (sha, size) != (want.sha, want.size):
            raise Failure(f"{source} of {snap.uuid}/{rel} differs from what was expected")
        if fmt != "raw" and base is None and self.qemu and rng.random() < 0.25:
            self.verify_with_qemu(snap, out, fmt)
        return out

    def verify_with_qemu(self, snap: Snap, image: Path, fmt: str) -> None:
        """qemu-img reads an export of ours as the model says."""
        started = time.monotonic()
        raw = self.images / f"{image.name}.model"
        write_model(snap.chunks, raw)
        try:
            qfmt = "vpc" if fmt == "vhd" else fmt
            cmd = ["qemu-img", "compare", "-q", "-f", qfmt, "-F", "raw", str(image), str(raw)]
            result = self.run(cmd)
            if result.returncode != 0:
                raise Failure(f"qemu-img compare {snap.uuid} {fmt}: exit {result.returncode}")
        finally:
            raw.unlink()
        self.timed("qemu-compare", started)

    def upload_full(self, target: Disk, fmt: str, rng: random.Random) -> str:
        snap = self.pick_snap(rng)
        if snap is None:
            return SKIP
        with self.pinned(snap) as ok:
            if not ok:
                return SKIP
            image = self.image_of(snap, fmt, rng)
        tool = rng.choice(self.tools)
        try:
            with target.lock:
                if target.tainted:
                    return SKIP
                code, text = self.upload(tool, image, f"{target.uuid}.{image.suffix[1:]}", target)
                if code != 0:
                    target.tainted = True
                    raise Failure(f"{tool} of {snap.uuid} {fmt} into {target.name}: {text}")
                target.chunks = list(snap.chunks)
                target.bump(committed=tool != "cli")
                target.holds = snap.uuid
                self.check_status(f"{target.uuid}.{image.suffix[1:]}", tool, "done")
                self.verify_target(target, tool, f"a full {fmt}")
        finally:
            image.unlink()
        return "ok"

    def upload_delta(self, target: Disk, fmt: str, rng: random.Random) -> str:
        """A full of base B (unless the target holds it), then S's delta-from/B."""
        snap = self.pick_snap(rng, lambda s: len([b for b in self.lineage(s)
                                                  if b.state == "alive"]) > 0)  # fmt: skip
        if snap is None:
            return SKIP
        bases = [b for b in self.lineage(snap) if b.state == "alive"]
        if not bases:
            return SKIP
        base = rng.choice(bases)
        images: list[Path] = []
        with self.pinned(snap, base) as ok:
            if not ok:
                return SKIP
            try:
                with target.lock:
                    if target.tainted:
                        return SKIP
                    if target.holds == base.uuid:
                        self.stats.note("delta onto the base an import left")
                    else:
                        images.append(self.image_of(base, fmt, rng))
                        tool = rng.choice(self.tools)
                        code, text = self.upload(tool, images[-1], f"{target.uuid}.{fmt}", target)
                        if code != 0:
                            target.tainted = True
                            raise Failure(f"{tool} of base {base.uuid} into {target.name}: {text}")
                        target.chunks = list(base.chunks)
                        target.bump(committed=tool != "cli")
                        target.holds = base.uuid
                        self.verify_target(target, tool, f"a full {fmt} (a delta's base)")
                    images.append(self.image_of(snap, fmt, rng, base))
                    tool = rng.choice(self.tools)
                    code, text = self.upload(tool, images[-1], f"{target.uuid}.{fmt}", target)
                    if code != 0:
                        target.tainted = True
                        raise Failure(
                            f"{tool} of the delta {snap.uuid} from {base.uuid} into"
                            f" {target.name} holding its base: {text}"
                        )
                    target.chunks = list(snap.chunks)
                    target.bump(committed=tool != "cli")
                    target.holds = snap.uuid
                    self.check_status(f"{target.uuid}.{fmt}", tool, "done")
                    self.verify_target(target, tool, f"a delta {fmt}")
            finally:
                for image in images:
                    image.unlink(missing_ok=True)
        return "ok"

    def upload_new(self, rng: random.Random) -> str:
        """import/<new name>.<fmt> makes a new VDI holding the image; then destroy it."""
        name = f"soak-new-{next(self.names)}"
        snap = self.pick_snap(rng) if rng.random() < 0.6 else None
        if snap is not None:
            fmt = rng.choice(("vhd", "qcow2", "raw"))
            with self.pinned(snap) as ok:
                if not ok:
                    return SKIP
                image = self.image_of(snap, fmt, rng)
            want, size = snap.raw_sha, self.size
        else:
            length = rng.randint(1, 4 * MiB) // 512 * 512 or 512
            wseed = rng.getrandbits(40) | 1
            image = self.images / f"{name}.raw"
            image.write_bytes(write_bytes(0, length, wseed))
            want, size = hashlib.sha256(image.read_bytes()).hexdigest(), length
        tool = rng.choice(self.tools)
        try:
            with self.new_vdi_lock:
                code, text = self.upload(tool, image, f"{name}{image.suffix}", None)
        finally:
            image.unlink()
        if code != 0:
            raise Failure(f"{tool} of {image.suffix} as a new VDI {name}: {text}")
        link = self.mnt / "by-name" / name
        if not self.appear(link / "raw.img"):
            raise Failure(f"new VDI {name} did not appear in by-name/")
        uuid = os.readlink(link).rsplit("/", 1)[-1]
        self.created.append(uuid)
        sha, got, _ = sha_file(link / "raw.img")
        if (sha, got) != (want, size):
            raise Failure(f"new VDI {name} from {tool}: {got} bytes, not what was imported")
        self.cli_ok("vdi", "destroy", uuid)
        self.gone.add(uuid)
        if not self.vanish(self.vdi_path(uuid)):
            raise Failure(f"destroyed VDI {uuid} still listed after 10 s")
        return "ok"

    def uploader(self, rng: random.Random) -> None:
        while not self.stop.is_set():
            target = rng.choice(self.targets)
            r = rng.random()
            if r < 0.4:
                fmt = rng.choice(("vhd", "qcow2", "raw"))
                self.op(f"upload-{fmt}", self.upload_full, target, fmt, rng)
            elif r < 0.75:
                fmt = rng.choice(("vhd", "qcow2"))
                self.op(f"upload-delta-{fmt}", self.upload_delta, target, fmt, rng)
            else:
                self.op("upload-new-vdi", self.upload_new, rng)
