#!/usr/bin/env python3
"""soak: load, hostile uploads and snapshot churn against a real vdifs mount.

Proves that nothing is lost while everything happens at once.  It mounts vdifs
on a fresh SR (or uses the mount given), creates a few VDIs full of data and
snapshots them, then runs concurrently, for --seconds:

- readers: sha256 of a snapshot's raw.img, full.vhd, full.qcow2 and
  delta-from/<base>.vhd|.qcow2 against the model (raw.img) or `vdifs export`
  of the same state (a snapshot's files never change), random 64 KiB ranges
  of snapshots and live VDIs against the model, two read-only handles of a
  live raw.img opened apart (each keeps the state of its open), info.json;
- writers: pwrite (+ fsync, or close alone) into live VDIs' raw.img, read
  back through the writer's handle, and writes at and past the end (ENOSPC);
- uploads of valid images (made by `vdifs export`, copied from the mount, or
  made by `qemu-img convert` from the model) into import/ with cp, rsync
  (temp + rename), rsync --inplace, dd, plain write() and `vdifs import`:
  fulls, deltas onto their base, new VDIs; the target must then hold exactly
  the image's content;
- hostile uploads (truncated and footerless VHDs, corrupt checksums, garbage
  qcow2, empty files, images and raw files larger or shorter than the VDI,
  a qcow2 with a VHD footer appended, zstd qcow2,
  deltas onto the wrong base, writers killed mid-upload, a truncated image
  as a new VDI) that must fail with the documented errno and leave the
  target byte-identical;
- snapshots taken (some while another process holds uncommitted writes,
  which the snapshot must not hold), deleted (preferably while readers read
  them), turned into checkpoints (data-destroy); `vdifs sr gc` while nothing
  is written or imported (docs/dev-storage.md).

The model: every VDI's content is a recipe per 64 KiB chunk (layers of seeded
pseudo-random bytes), so any state's bytes and checksums can be computed.
Every check compares with it.  A reader of a snapshot being deleted must get
the right bytes or ENOENT/ESTALE, never other data.

At the end: operations, outcomes and latency percentiles per kind, the
daemon's RSS (start, end, peak VmHWM, growth) and every unexpected error; the
last line is machine-readable:

    SOAK ok=1 errors=0 ops=N rss_growth_mib=X

Exit status: 0 if nothing unexpected happened, 1 otherwise, 130 if
interrupted.  It cleans up (its children, the mount it made, its temporary
directory; on a given SR the VDIs and snapshots it made) on errors and
Ctrl-C alike.  --skip KIND leaves an operation out; --known REGEX reports
matching errors apart without counting them (a known bug, until it is fixed).

    .venv/bin/python contrib/soak --seconds 120
    .venv/bin/python contrib/soak --seconds 600 --sr /var/lib/vdifs/sr --mount /mnt/vdifs

The package: soak_model (the recipes), soak_base (mount, CLI, children, shared state),
soak_load (snapshots, readers, writers), soak_uploads, soak_hostile, soak_report.
Imports are flat (``import soak_model``): `python contrib/soak` puts this directory first
on sys.path, and mypy, given it in pyproject.toml, finds them the same way, with no hack.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from soak_base import proc_status
from soak_hostile import Hostile
from soak_model import CHUNK, Failure, MiB
from soak_report import report


class Soak(Hostile):
    """The whole soak: set-up, the load threads, the watchers and the final checks."""

    def setup(self) -> None:
        rng = random.Random(f"{self.args.seed}:setup")
        for i in range(self.args.vdis):
            disk = self.new_disk(f"soak-live-{i}", "live")
            self.fill(disk, rng, 0.5)
            self.live.append(disk)
        for i in range(self.args.targets):
            disk = self.new_disk(f"soak-target-{i}", "target")
            self.fill(disk, rng, 0.2)
            self.targets.append(disk)
        self.hostile_disk = self.new_disk("soak-hostile", "hostile")
        self.fill(self.hostile_disk, rng, 0.3)
        for disk in self.live:
            self.op("snapshot", self.take_snapshot, disk)
            self.op("write", self.write, disk, rng)
            self.op("snapshot", self.take_snapshot, disk)
        if self.errors:
            raise Failure("the setup failed")

    # -- watching -------------------------------------------------------------------------

    def sampler(self) -> None:
        while not self.sampling.wait(0.2):
            if self.daemon_pid is None:
                return
            try:
                self.rss_samples.append(proc_status(self.daemon_pid)["VmRSS"])
            except OSError:
                if not self.stop.is_set():
                    self.error("daemon", f"daemon {self.daemon_pid} is gone")
                    self.stop.set()
                return

    def watchdog(self) -> None:
        while not self.stop.wait(1):
            now = time.monotonic()
            for kind, since in list(self.busy.values()):
                if now - since > self.args.stuck:
                    self.error(kind, f"no answer for {now - since:.0f} s: stuck")
                    self.dump_daemon_stacks()
                    self.stop.set()
                    return

    def start_thread(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    # -- the run -----------------------------------------------------------------------

    def final_checks(self) -> None:
        """After the load: every VDI and snapshot still holds what it should."""
        for disk in self.disks:
            if not disk.tainted:
                self.op("final-vdi", self.read_live_whole, disk, MiB)
        with self.reg_lock:
            snaps = [s for s in self.snaps.values() if s.state == "alive"]
            keys = dict(self.expected)
        for snap in snaps:
            self.op("final-snapshot", self.read_file, snap, "raw.img", None, MiB)
        by_uuid = {s.uuid: s for s in snaps}
        with self.reg_lock:
            checkpoints = {s.uuid: s for s in self.snaps.values() if s.state == "checkpoint"}
        for (uuid, rel), _ in keys.items():
            if uuid not in by_uuid:
                continue
            base = None
            if rel.startswith("delta-from/"):
                base = by_uuid.get(rel[11:].rsplit(".", 1)[0]) or checkpoints.get(
                    rel[11:].rsplit(".", 1)[0]
                )
                if base is None:
                    continue
            self.op("final-export", self.read_file, by_uuid[uuid], rel, base, MiB)
        leftovers = [n for n in os.listdir(self.mnt / "import") if n.startswith(".")]
        if leftovers != [".status"]:
            self.error("final", f"left in import/: {leftovers}")
        staging = self.sr / "staging"
        if staging.is_dir():
            staged = [p.name for p in staging.glob("*.upload")]
            if staged:
                self.error("final", f"staged uploads left in the SR: {staged}")
        if self.log_path is not None:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode(errors="replace")
            bad = [
                line
                for line in text.splitlines()
                if " WARNING " in line or " ERROR " in line or "Traceback" in line
            ]
            for line in bad[:20]:
                self.error("daemon-log", line)

    def run_soak(self) -> None:
        self.start_mount()
        self.setup()
        if self.daemon_pid is not None:
            self.rss["start"] = proc_status(self.daemon_pid)["VmRSS"]
            self.start_thread("rss", self.sampler)
        self.start_thread("watchdog", self.watchdog)
        seed = self.args.seed
        roles: list[tuple[str, Callable[[random.Random], None], int]] = [
            ("reader", self.reader, self.args.readers),
            ("writer", self.writer, self.args.writers),
            ("uploader", self.uploader, self.args.uploaders),
            ("hostile", self.hostile_loop, 1),
            ("snapshotter", self.snapshotter, 1),
        ]
        for role, fn, count in roles:
            for i in range(count):
                self.start_thread(f"{role}-{i}", fn, random.Random(f"{seed}:{role}:{i}"))
        load_started = time.monotonic()
        deadline = load_started + self.args.seconds
        next_report = load_started + 10
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                break
            self.stop.wait(min(1.0, deadline - now))
            if time.monotonic() >= next_report:
                next_report += 10
                rss = f"{self.rss_samples[-1] / MiB:.0f} MiB" if self.rss_samples else "?"
                print(
                    f"soak: {time.monotonic() - load_started:5.0f}s ops={self.stats.total()}"
                    f" errors={len(self.errors)} snapshots={len(self.snaps)} daemon_rss={rss}",
                    file=sys.stderr,
                    flush=True,
                )
        self.stop.set()
        for thread in self.threads:
            if thread.name not in ("rss",):
                thread.join(60)
        time.sleep(1)
        if self.daemon_pid is not None:
            status = proc_status(self.daemon_pid)
            self.rss["end"] = status["VmRSS"]
            self.rss["hwm"] = status["VmHWM"]
        self.sampling.set()
        self.final_checks()


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Load, hostile uploads and snapshot churn against a vdifs mount;"
        " checks that nothing is lost. The last line: SOAK ok=.. errors=.. ops=.."
        " rss_growth_mib=..",
        epilog="exit status: 0 nothing unexpected, 1 errors, 130 interrupted",
    )
    parser.add_argument("--seconds", type=float, default=120, help="load duration (120)")
    parser.add_argument("--seed", type=int, default=1, help="RNG seed (1)")
    parser.add_argument("--sr", help="SR directory (default: a fresh temporary one)")
    parser.add_argument(
        "--mount",
        help="mount point: used as is if vdifs is mounted there, else the SR is mounted"
        " on it (default: a temporary one)",
    )
    parser.add_argument("--vdifs", help="the vdifs command (default: python -m vdifs)")
    parser.add_argument("--workdir", help="where temporary files go (default: $TMPDIR)")
    parser.add_argument("--size", type=parse_size, default=64 * MiB, help="VDI size (64M)")
    parser.add_argument("--vdis", type=int, default=3, help="live VDIs written to (3)")
    parser.add_argument("--targets", type=int, default=2, help="upload target VDIs (2)")
    parser.add_argument("--readers", type=int, default=3, help="reader threads (3)")
    parser.add_argument("--writers", type=int, default=2, help="writer threads (2)")
    parser.add_argument("--uploaders", type=int, default=1, help="uploader threads (1)")
    parser.add_argument("--write-pause", type=float, default=0.05,
                        help="at most this many seconds between writes (0.05)")  # fmt: skip
    parser.add_argument("--max-snapshots", type=int, default=6, help="per VDI (6)")
    parser.add_argument("--stuck", type=float, default=90,
                        help="an operation taking longer is a hang (90 s)")  # fmt: skip
    parser.add_argument("--max-errors", type=int, default=50, help="stop after N errors (50)")
    parser.add_argument(
        "--skip",
        type=lambda text: [k for k in text.split(",") if k],
        default=[],
        help="operation kinds not to run, comma-separated (a trailing * matches a prefix)",
    )
    parser.add_argument(
        "--known",
        action="append",
        default=[],
        metavar="REGEX",
        help="an error matching REGEX is a known bug: reported apart, not counted (repeatable)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.size % CHUNK or args.size < 4 * MiB:
        parser.error("--size must be a multiple of 64 KiB, at least 4M")

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    soak = Soak(args)
    status = 1
    try:
        try:
            soak.run_soak()
            status = 1 if soak.errors else 0
        except KeyboardInterrupt:
            soak.interrupted = True
            status = 130
            print("soak: interrupted, cleaning up", file=sys.stderr)
        except Failure as exc:
            soak.error("setup", str(exc))
        except SystemExit as exc:
            print(exc, file=sys.stderr)
            status = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        soak.cleanup()
    if status == 0 and soak.errors:
        status = 1
    print(report(soak, status), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
