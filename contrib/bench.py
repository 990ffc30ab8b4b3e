"""Benchmark vdifs against its peers on the same data.

Run as root on Debian 12 after the README set-up::

    .venv/bin/python contrib/bench.py [--quick] [--size 4G] [--runs 3] [--no-pool]
    .venv/bin/python contrib/bench.py --pool [--quick] [--pool-size 1G] [--runs 3]

``--pool`` runs only the pool section (see below); a full run includes it
(1-1.5 minutes more, most of it setting up the 1 GiB disk) unless ``--no-pool``.

It measures the vdifs that ``.venv`` imports (the checkout).  To pin a copy
while the checkout changes, run it from another directory with the copy first
on PYTHONPATH (``git archive HEAD vdifs | tar -x -C /tmp/pinned``).

Nothing is installed: a missing peer is skipped with the Debian package that
provides it (``apt-get install xmount``, ``qemu-system-common`` for
qemu-storage-daemon, ``qemu-utils`` for qemu-img) and its ratios print n/a.

The test disk
    A sparse raw file ``disk.raw`` (``--size``, default 4 GiB; ``--quick``:
    512 MiB) in which about half of the 2 MiB blocks hold random data; a
    quarter of those are only partly written (a run of 64 KiB chunks, the
    last one sometimes cut at a 4 KiB boundary).  Every 64 KiB chunk is
    unique (a 16-byte tag followed by a slice of a random pool), so the SR's
    content addressing cannot deduplicate anything.  It is imported with
    ``vdifs import`` into a VDI of a temporary SR and snapshotted as S1; then
    about 5 % of the blocks are rewritten (half of them whole, half a random
    run of chunks; some of them blocks that were empty), imported again, and
    snapshotted as S2.  ``disk.raw`` then holds S2's content, which is what the peers
    serve.  Before measuring, S2's raw.img is compared with disk.raw byte for
    byte, and (except with --quick) the copies of full.vhd / full.qcow2
    used below with ``qemu-img compare``.

Caches
    Every path is read with its *own* page cache evicted just before the run:
    ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the file being read (vdifs
    snapshot files are opened with keep_cache, so they would otherwise be
    served by the kernel), checked with ``fincore`` where available.  The
    backing stores (the SR's packs, disk.raw, the image copies) are kept warm
    and re-read into the page cache at the start of each round: the numbers
    compare the FUSE daemons, not the virtual disk under them.  A global
    ``echo 1 > /proc/sys/vm/drop_caches`` would also evict those and make every
    path as slow as the disk.

What is measured (MB = 10**6 bytes, ``--runs`` rounds)
    Each round runs every path once.  Paths are grouped with the peers they
    are compared with (raw.img with the qemu-storage-daemon raw export,
    full.vhd with xmount, ...) and a group runs back to back, so a ratio
    compares measurements taken moments apart; the groups' order rotates by
    one each round and the order inside a group alternates.  Ratios are
    computed per round; the report gives each one's median, min-max and
    every round (see "Ratios" below).

    vdifs (SR mounted once with ``vdifs mount``):
      * ``dd bs=1M`` of S2's raw.img, full.vhd, full.qcow2, delta-from/S1.vhd
        and delta-from/S1.qcow2: file bytes read per second;
      * ``sha256sum`` of full.vhd through a second mount of the SR with
        vdifs' default options (and through the main mount when
        --mount-options are set), and in the same group of the VHD copy in
        the page cache: the hasher's own limit; each says how much of its
        wall time sha256sum spent on the CPU.  Debian's sha256sum is
        CPU-bound (110-160 MB/s on the 2-CPU machine of docs/performance.md)
        and reads 32 KiB at a time, so their ratio tells how much the FUSE
        path slows a CPU-bound reader of small buffers;
      * 4 ``dd`` readers at once on S1 and S2's full.vhd and full.qcow2:
        total bytes / wall time;
      * 2000 random 64 KiB ``os.pread`` of raw.img (fixed seed): IOPS;
      * ``ls -lR`` of a fresh mount of a separate SR with 1000 empty VDIs,
        and of the same tree's shape served from dicts by pyfuse3 alone;
      * import by ``cp`` of S2's VHD and qcow2 (copied out of the mount) into
        ``import/<name>.vhd|.qcow2`` of a fresh, empty SR mounted for that run
        (fresh, so no chunk is deduplicated): virtual bytes per second, timed
        until ``cp`` returns, i.e. after close() applied and fsynced the
        import;
      * the floor of that import: ``cp`` of the same VHD and qcow2, timed the
        same way, into contrib/bench_nullfs.py, a pyfuse3 file system mounted
        and run as vdifs is (the same FUSE options, main loop, no writeback
        cache, an upload's FileInfo flags) that counts the bytes written and
        discards them (the count must equal the image's size): what FUSE and
        pyfuse3 alone cost before vdifs parses, hashes or stores anything.
        Virtual bytes per second, like the imports; it runs in their groups;
      * daemon peak RSS: VmHWM of each vdifs daemon just before it unmounts
        (the main mount after all rounds, the import and ls mounts each run).

    peers, on disk.raw (= S2):
      * xmount ``--in raw --out vhd`` (a fixed VHD: raw plus a footer);
      * qemu-storage-daemon FUSE exports of disk.raw and of the qcow2 copy
        (the disk as qemu decodes it from the qcow2);
      * ``qemu-img convert -O vpc`` and ``-O qcow2`` of disk.raw to a file
        (output bytes per second; written to the page cache, not fsynced);
      * ``qemu-img convert -O raw`` of the VHD and qcow2 copies (virtual
        bytes per second, including an fsync of the output, since a vdifs
        import is durable when close() returns);
      * random 64 KiB reads of the qemu-storage-daemon raw export;
      * ``dd bs=1M`` of disk.raw from the page cache: the limit.

Ratios (the RESULT line)
    Each ratio below is computed per round (the RSS figures and
    delta_vhd_bytes_ratio are single figures).  The report prints a table of them: the median of
    the rounds, the target where there is one (``TARGETS``), min-max and
    every round.  Then a warning for each whose rounds differ by more than
    1.5 times (max / min), to be read as noise, and a line sorting the
    targets into met (median and every round), met at the median only (a
    round outside; raw_vs_qsd's rounds have a bound of their own, >= 1.5),
    missed, and n/a; a missed target with a floor (``FLOORS``: the ratio of
    the same path with vdifs' own work left out) says whether the floor
    misses it too, i.e. whether vdifs could meet it at all on this machine.

    The RESULT line gives each ratio's median under its key, ``<key>_min``
    and ``<key>_max`` for each per-round ratio with a target, and
    ``spread_warnings`` (how many warnings were printed).

    vhd_vs_xmount       vdifs full.vhd MB/s / xmount vhd MB/s (>= 2.0)
    https_vs_fuse_vhd   full.vhd by curl from ``vdifs serve`` (HTTPS) MB/s / the same
                        file read through the FUSE mount MB/s
    raw_vs_qsd          vdifs raw.img MB/s / qemu-storage-daemon raw MB/s
                        (>= 2.0, and no round below 1.5)
    qcow2_vs_qsd        vdifs full.qcow2 MB/s / qemu-storage-daemon qcow2 MB/s (>= 2.0)
    delta_cost_ratio    time to read delta-from/S1.vhd, divided by the time
                        vdifs would need to read only the changed bytes (the
                        64 KiB chunks S2 rewrote, counted while writing them)
                        at the speed it reads S2's raw.img in the same round.
                        1.0 means a delta costs no more than its payload
                        (target <= 1.5).  A
                        VHD carries whole 2 MiB blocks, so the delta file is
                        larger than its payload (delta_vhd_bytes_ratio); only
                        serving it faster than raw.img makes up for that.
                        delta_qcow2_cost_ratio is the same for the qcow2
                        delta, whose file carries 64 KiB clusters.
    import_vhd_vs_qemu_img  vdifs cp-import of the VHD MB/s / ``qemu-img convert
                        -f vpc -O raw`` MB/s (>= 1.0); the qcow2 pair is
                        import_qcow2_vs_qemu_img (>= 1.0).  import_vs_qemu_img
                        repeats the VHD's median (older scripts read it)
    import_floor_vhd_vs_qemu_img  the null FS's cp of the VHD MB/s / the same
                        qemu-img MB/s: the floor of import_vhd_vs_qemu_img.
                        Below 1.0, pyfuse3's write path alone is slower than
                        qemu-img's whole conversion, and no change to vdifs
                        can bring the import to 1.0 on this machine;
                        import_floor_qcow2_vs_qemu_img is the qcow2's
    import_vhd_vs_floor vdifs cp-import of the VHD MB/s / the null FS's: the
                        share of the floor's speed vdifs keeps
    sha256_vs_page_cache  sha256sum of full.vhd MB/s, through a second mount of
                        the SR with vdifs' default options (buffered: the
                        kernel reads ahead in 1 MiB requests), / sha256sum of
                        the VHD copy in the page cache MB/s (>= 0.8)
    sha256_mount_options_vs_page_cache  the same through the main mount's
                        --mount-options (direct_io by default: every 32 KiB
                        read() is one FUSE round trip that sha256sum waits for)
    rss_mib             the largest VmHWM of any vdifs daemon, MiB (< 200)
    ls_lr_1000_s        seconds for ``ls -lR`` of the 1000-VDI mount (< 1.0)
    ls_lr_floor_s       seconds for ``ls -lR`` of the same tree's shape served by
                        contrib/bench_nullfs.py --tree (pyfuse3 with no work
                        behind it, on a fresh mount each round): the floor
                        under ls_lr_1000_s; ls_lr_vs_floor is their ratio

    Context, not targets: vhd_wall_vs_xmount (xmount's time to read its fixed
    VHD / vdifs' time to read full.vhd: a sparse disk's backup takes less time
    even at a lower MB/s), vhd_vs_qemu_img_convert, raw_vs_page_cache,
    rand_vs_qsd; then size_mib, runs and the vdifs MB/s medians.

The pool section
    vdifs reading a XAPI pool's VDI over NBD (``--sr xapi://...``), against
    libnbd's ``nbdcopy`` reading the same export.  The pool is the test
    suite's fake (tests/pool/fakepool: XAPI's XML-RPC over HTTPS, and nbdkit
    with TLS, a Python plugin and no structured replies, like xapi-nbd)
    running on this host, so the network is loopback and both paths share
    the server's costs; it needs nbdkit and nbdkit-plugin-python, libnbd-bin
    (nbdcopy, nbdinfo), qemu-img and the test extra (trustme), else the
    section is skipped with what is missing and its ratios print n/a.

    Two fake pools: one serves NBD reads at once, the other delays each by
    20 ms (nbdkit's delay filter, ``delay-read``).  On each, a VDI is filled
    with random bytes in every block (fully allocated: full.vhd is the disk
    plus 0.03 % of VHD metadata, so both tools carry the same bytes) and
    snapshotted; the pool is mounted with the same ``--mount-options``.  The
    undelayed disk is ``--pool-size`` (1 GiB; ``--quick``: 256 MiB); the
    delayed one 128 MiB per CPU, at least 256 MiB and at most 512 MiB: nbdcopy
    gives each of its threads (one per CPU) 128 MiB of work at a time and opens
    one connection per thread at most, so on a 128 MiB disk it reads through
    one connection whatever --connections says (measured: 4 connections of one
    2 MiB request each read 84 MB/s at 20 ms on 128 MiB, 298 MB/s on 512).  Before
    timing, the snapshot's raw.img must hash (sha256) like the fake's disk
    file, full.vhd must be at least the disk's size, ``qemu-img compare``
    must find the disk in full.vhd (not with --quick), ``nbdinfo`` must show
    an export without structured replies (no block status: nbdcopy reads
    every byte, none is skipped as a hole), and the bytes nbdcopy streams to
    a pipe must hash like the disk.

    Measured, each round, MB/s of the bytes each tool read (dd's own count
    of full.vhd's bytes; the export's size for nbdcopy), process start and
    NBD/TLS connection set-up included for both (vdifs' daemon keeps its
    connections open between reads, as a mounted pool does):
      * ``dd bs=1M`` of the snapshot's full.vhd in the vdifs mount, its
        page cache evicted first like every path above (vdifs keeps only
        a 32 MiB cache of NBD segments, which a sequential read of a larger
        disk evicts before it comes back to them);
      * ``nbdcopy URI null:`` with its defaults (up to 4 connections, one
        per CPU, 64 requests of 256 KiB in flight on each);
      * at 20 ms only: ``nbdcopy --connections=1 --requests=1
        --request-size=2097152``, a client with one request in flight at a
        time, given vdifs' own 2 MiB segment as its request size (larger
        requests pay the delay fewer times).
    The backing disk files are re-read into the page cache at the start of
    each round.  The 0 ms and the 20 ms paths are two groups, rotated and
    alternated like the others.

    pool_vhd_vs_nbdcopy               vdifs full.vhd MB/s / nbdcopy MB/s, 0 ms (>= 0.8)
    pool_client_vs_nbdcopy            vdifs's NBD client alone (one connection, no FUSE)
                                      / nbdcopy, 0 ms: the floor of Python's TLS reads,
                                      under pool_vhd_vs_nbdcopy's target
    pool_vhd_vs_nbdcopy_20ms          the same at 20 ms
    pool_vhd_vs_one_connection_20ms   vdifs full.vhd MB/s / the one-request
                                      nbdcopy MB/s, 20 ms (target >= 4)
    pool_rss_mib                      the largest VmHWM of the pool mounts' daemons
    The pool ratios are reported like the others; the RESULT line adds the
    pool's disk sizes and MB/s medians.  rss_mib above stays the local
    section's.

Whatever happens (an error, Ctrl-C, SIGTERM) every mount is unmounted, the
daemons started here are stopped and the temporary directory is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import operator
import os
import random
import re
import resource
import shutil
import signal
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, TypeAlias
from urllib.parse import urlsplit

MIB = 1 << 20
BLOCK = 2 * MIB
CHUNK = 64 * 1024
CHUNKS_PER_BLOCK = BLOCK // CHUNK
MB = 1e6
POOL_SIZE = 64 * MIB
RANDOM_READS = 2000
RANDOM_READ_SIZE = 64 * 1024
SMALL_VDIS = 1000
SMALL_VDI_SIZE = 64 * MIB
SEED = 20240601
MOUNT_WAIT = 20.0

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
VDIFS = str(VENV_BIN / "vdifs") if (VENV_BIN / "vdifs").exists() else "vdifs"
MOUNT_OPTIONS: list[str] = []  # set from --mount-options

PEER_PACKAGES = {
    "xmount": "xmount",
    "qemu-storage-daemon": "qemu-system-common",
    "qemu-img": "qemu-utils",
}
# The pool section: the fake pool's NBD server, nbdcopy, and qemu-img (which makes
# the VHD heads the fake's /export_raw_vdi sends).
POOL_PACKAGES = {"nbdkit": "nbdkit", "nbdcopy": "libnbd-bin", "nbdinfo": "libnbd-bin",
                 "qemu-img": "qemu-utils"}  # fmt: skip
POOL_DISK = 1 << 30  # --pool-size: the disk read without delay (--quick: 256 MiB)
POOL_DISK_QUICK = 256 * MIB
# The disk read with DELAY_MS of NBD read delay: 128 MiB per connection nbdcopy's defaults
# open here (see the docstring), else it reads through fewer.
DELAY_DISK = 128 * MIB * min(4, max(2, os.cpu_count() or 2))
DELAY_MS = 20
ONE_REQUEST = 2 * MIB  # the one-connection peer's request size: vdifs' segment size
NBD_TARGETS: dict[str, Any] = {}  # snapshot uuid -> NbdTarget, for the client-alone probe
NULLFS = Path(__file__).resolve().with_name("bench_nullfs.py")  # the import's floor

# A ratio: each round's value, a single figure (an RSS, a size ratio), or None (n/a).
Figure: TypeAlias = list[float] | float | None
COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "<": operator.lt
}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """A ratio's target: its median ``op bound``, and each round ``op rounds`` (or, without
    ``rounds``, ``op bound`` like the median, for the target to be met in every round)."""

    op: str
    bound: float
    rounds: float | None = None

    def met_by(self, value: float, *, one_round: bool = False) -> bool:
        bound = self.rounds if one_round and self.rounds is not None else self.bound
        return COMPARE[self.op](value, bound)

    def worst(self, values: list[float]) -> float:
        return min(values) if self.op == ">=" else max(values)

    def __str__(self) -> str:
        text = f"{self.op} {self.bound}"
        return text if self.rounds is None else f"{text}, rounds {self.op} {self.rounds}"


TARGETS = {
    "vhd_vs_xmount": Target(">=", 2.0),
    "raw_vs_qsd": Target(">=", 2.0, rounds=1.5),
    "qcow2_vs_qsd": Target(">=", 2.0),
    "delta_cost_ratio": Target("<=", 1.5),
    "import_vhd_vs_qemu_img": Target(">=", 1.0),
    "import_qcow2_vs_qemu_img": Target(">=", 1.0),
    "sha256_vs_page_cache": Target(">=", 0.8),
    "rss_mib": Target("<", 200),
    "ls_lr_1000_s": Target("<", 1.0),
    "pool_vhd_vs_nbdcopy": Target(">=", 0.8),
    "pool_vhd_vs_one_connection_20ms": Target(">=", 4.0),
}
# A target's floor: the same comparison with vdifs' own work left out (pyfuse3's write
# path alone, vdifs's NBD client alone).  A floor that misses the target too means no
# change to vdifs can meet it on this machine.
FLOORS = {
    "import_vhd_vs_qemu_img": "import_floor_vhd_vs_qemu_img",
    "import_qcow2_vs_qemu_img": "import_floor_qcow2_vs_qemu_img",
    "pool_vhd_vs_nbdcopy": "pool_client_vs_nbdcopy",
    "ls_lr_1000_s": "ls_lr_floor_s",
}
REPEATS = {"import_vhd_vs_qemu_img": "import_vs_qemu_img"}  # also in RESULT under that key
SPREAD_WARNING = 1.5  # rounds whose max / min exceeds this: the figure is noise
MEDIAN_ONLY = "met at the median only"  # a target's status when a round falls outside

T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """``"4G"`` -> bytes (binary suffixes K, M, G, T)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text[-1:] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run a command, return its stdout; raise with its stderr on failure."""
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr.strip()}")
    return str(result.stdout)


def timed(cmd: list[str]) -> float:
    """Seconds a command takes (its output discarded)."""
    start = time.perf_counter()
    run(cmd)
    return time.perf_counter() - start


def mounted(path: Path) -> bool:
    """Whether ``path`` (a directory or a file) is a mount point."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == target:
                return True
    return False


def wait_until(check: Callable[[], bool], what: str, timeout: float = MOUNT_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def evict(path: Path) -> None:
    """Drop one file's page cache (keeps the backing stores warm)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if shutil.which("fincore"):
        resident = run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(path)])
        if resident.strip() not in ("", "0"):
            say(f"warning: {resident.strip()} bytes of {path} stayed cached")


def warm(paths: list[Path]) -> None:
    """Read files into the page cache."""
    for path in paths:
        run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "status=none"])


def vm_hwm_mib(pid: int) -> float:
    """Peak resident set size of a process, MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for init to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def same_content(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (read side by side, 4 MiB at a time)."""
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            chunk = fa.read(4 * MIB)
            if chunk != fb.read(4 * MIB):
                return False
            if not chunk:
                return True


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 * MIB)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


# -- the test disk ----------------------------------------------------------------------


class DataSource:
    """Incompressible, never-repeating 64 KiB chunks, fast to make.

    A chunk is a 16-byte tag (generation, chunk index) followed by a slice of
    a random pool, so no two chunks of the disk are equal.
    """

    def __init__(self, rng: random.Random) -> None:
        self.pool = rng.randbytes(POOL_SIZE)
        self.rng = rng

    def chunks(self, generation: int, first_chunk: int, count: int) -> bytes:
        parts = []
        for chunk in range(first_chunk, first_chunk + count):
            start = self.rng.randrange(POOL_SIZE - CHUNK)
            parts.append(struct.pack("<QQ", generation, chunk))
            parts.append(self.pool[start : start + CHUNK - 16])
        return b"".join(parts)


def write_initial(path: Path, size: int, rng: random.Random, data: DataSource) -> int:
    """S1's content: half the blocks with data, a quarter of those partial.

    Returns the number of data bytes written.
    """
    with open(path, "wb") as f:
        f.truncate(size)
    written = 0
    fd = os.open(path, os.O_WRONLY)
    try:
        for block in range(size // BLOCK):
            if rng.random() >= 0.5:
                continue
            first, count, cut = 0, CHUNKS_PER_BLOCK, 0
            if rng.random() < 0.25:
                first = rng.randrange(CHUNKS_PER_BLOCK)
                count = rng.randint(1, CHUNKS_PER_BLOCK - first)
                cut = rng.choice([0, rng.randrange(1, 16) * 4096])  # last chunk partly
            payload = data.chunks(1, block * CHUNKS_PER_BLOCK + first, count)
            if cut:
                payload = payload[: -CHUNK + cut]
            os.pwrite(fd, payload, block * BLOCK + first * CHUNK)
            written += len(payload)
    finally:
        os.close(fd)
    return written


def write_changes(path: Path, size: int, rng: random.Random, data: DataSource) -> int:
    """S2's changes: about 5 % of the blocks rewritten, whole or in part.

    Returns the bytes of the 64 KiB chunks that changed (every chunk written
    here gets a new tag, so it differs from S1 whatever it held).
    """
    blocks = size // BLOCK
    changed = 0
    fd = os.open(path, os.O_WRONLY)
    try:
        for block in sorted(rng.sample(range(blocks), max(1, round(blocks * 0.05)))):
            first, count = 0, CHUNKS_PER_BLOCK
            if rng.random() < 0.5:
                first = rng.randrange(CHUNKS_PER_BLOCK)
                count = rng.randint(1, CHUNKS_PER_BLOCK - first)
            payload = data.chunks(2, block * CHUNKS_PER_BLOCK + first, count)
            os.pwrite(fd, payload, block * BLOCK + first * CHUNK)
            changed += count * CHUNK
    finally:
        os.close(fd)
    return changed


# -- processes, mounts and their cleanup --------------------------------------------


@dataclass
class VdifsMount:
    sr: Path | list[str]
    mountpoint: Path
    pid: int


@dataclass
class Resources:
    """Everything started here, to stop and remove whatever happens."""

    workdir: Path
    vdifs_mounts: list[VdifsMount] = field(default_factory=list)
    fuse_mounts: list[Path] = field(default_factory=list)  # xmount, the null FS
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)  # qsd, the null FS
    pools: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # fake pools

    def mount_vdifs(
        self,
        sr: Path | list[str],
        mountpoint: Path,
        env: dict[str, str] | None = None,
        mount_options: list[str] | None = None,
    ) -> VdifsMount:
        """Mount an SR directory, or a pool given as its global options (``--sr xapi://...``,
        ``--ca``, ``--password-file``), with ``--mount-options`` unless told otherwise."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        options = sr if isinstance(sr, list) else ["--sr", str(sr)]
        extra = MOUNT_OPTIONS if mount_options is None else mount_options
        run([VDIFS, *options, "mount", str(mountpoint), *extra], env)
        pid = daemon_pid(mountpoint)
        mount = VdifsMount(sr, mountpoint, pid)
        self.vdifs_mounts.append(mount)
        return mount

    def unmount_vdifs(self, mount: VdifsMount) -> None:
        if mounted(mount.mountpoint):
            try:
                run([VDIFS, "umount", str(mount.mountpoint)])
            except RuntimeError:
                run(["fusermount3", "-u", "-z", str(mount.mountpoint)])
        with contextlib.suppress(RuntimeError):
            wait_until(lambda: not alive(mount.pid), "the vdifs daemon to exit", 10)
        if alive(mount.pid):
            os.kill(mount.pid, signal.SIGTERM)
        if mount in self.vdifs_mounts:
            self.vdifs_mounts.remove(mount)

    def start_daemon(self, what: str, cmd: list[str], mountpoint: Path) -> None:
        """Start a FUSE daemon that serves ``mountpoint`` in the foreground (its output
        in a log of the work directory); return once it is mounted.  close() stops it."""
        log_path = self.workdir / f"{mountpoint.name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # Ctrl-C reaches the benchmark, which stops it
            )
        self.processes.append(proc)

        def up() -> bool:
            if proc.poll() is not None:
                text = log_path.read_text(errors="replace")
                raise RuntimeError(f"{what} exited: {text.strip()}")
            return mounted(mountpoint)

        wait_until(up, f"{what} to mount {mountpoint}")

    def start_qsd(self, image: Path, driver: str, export: Path) -> None:
        export.touch()
        self.start_daemon(
            "qemu-storage-daemon",
            [
                "qemu-storage-daemon",
                "--blockdev",
                f"driver=file,node-name=f,filename={image},read-only=on",
                "--blockdev",
                f"driver={driver},node-name=d,file=f,read-only=on",
                "--export",
                f"type=fuse,id=e,node-name=d,mountpoint={export},writable=off",
            ],
            export,
        )

    def start_nullfs(self, mountpoint: Path) -> Path:
        """contrib/bench_nullfs.py on ``mountpoint``: unmounted at close, then stopped."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.start_daemon("the null FS", [sys.executable, str(NULLFS), str(mountpoint)], mountpoint)
        self.fuse_mounts.append(mountpoint)
        return mountpoint

    def start_treefs(self, tree: Path, mountpoint: Path) -> None:
        """contrib/bench_nullfs.py --tree on ``mountpoint`` (the caller unmounts it)."""
        cmd = [sys.executable, str(NULLFS), "--tree", str(tree), str(mountpoint)]
        self.start_daemon("the tree FS", cmd, mountpoint)
        self.fuse_mounts.append(mountpoint)

    def start_xmount(self, image: Path, mountpoint: Path) -> Path:
        mountpoint.mkdir(parents=True, exist_ok=True)
        run(["xmount", "--in", "raw", str(image), "--out", "vhd", str(mountpoint)])
        self.fuse_mounts.append(mountpoint)
        wait_until(lambda: mounted(mountpoint), "the xmount mount")
        return mountpoint / f"{image.stem}.vhd"

    def close(self) -> None:
        for path in reversed(self.fuse_mounts):
            if mounted(path):
                subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for mount in list(self.vdifs_mounts):
            try:
                self.unmount_vdifs(mount)
            except Exception as exc:  # keep cleaning up
                say(f"unmounting {mount.mountpoint}: {exc}")
                subprocess.run(["fusermount3", "-u", "-z", str(mount.mountpoint)], check=False)
                if alive(mount.pid):
                    os.kill(mount.pid, signal.SIGKILL)
        try:  # after the vdifs mounts of the pools: their daemons exit cleanly
            self.pools.close()
        except Exception as exc:  # keep cleaning up
            say(f"stopping the fake pools: {exc}")
        for path in self.workdir.rglob("*"):
            # A file export left mounted would make rmtree fail.
            if mounted(path):
                subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def daemon_pid(mountpoint: Path) -> int:
    """The pid of the vdifs daemon serving ``mountpoint`` (from /proc)."""
    wanted = str(mountpoint)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if wanted in args and "mount" in args and any("vdifs" in a for a in args):
            return int(entry.name)
    raise RuntimeError(f"no vdifs daemon found for {mountpoint}")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so that cleanup runs."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# -- measurements --------------------------------------------------------------------


@dataclass
class Probe:
    """One path measured once per round."""

    key: str
    label: str
    unit: str
    measure: Callable[[], float]
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)


def dd_mbps(path: Path) -> float:
    """``dd bs=1M`` of a file, cache evicted first: MB/s of file bytes."""
    evict(path)
    size = path.stat().st_size
    seconds = timed(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"])
    return size / seconds / MB


def dd_cached_mbps(path: Path) -> float:
    """``dd bs=1M`` of a file already in the page cache."""
    warm([path])
    size = path.stat().st_size
    seconds = timed(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"])
    return size / seconds / MB


def sha256sum_mbps(path: Path, expected: str, *, cached: bool = False) -> float:
    if not cached:
        evict(path)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = run(["sha256sum", str(path)])
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.split()[0] != expected:
        raise RuntimeError(f"sha256sum of {path} is {out.split()[0]}, expected {expected}")
    # A CPU-bound hasher: its CPU time says whether it waited for its reads.
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    say(f"  sha256sum of {path.name}: {cpu:.2f} s of CPU in {seconds:.2f} s")
    return path.stat().st_size / seconds / MB


def capture_tree(root: Path) -> list[list[object]]:
    """Every entry under ``root`` (itself first): relative path, mode, size,
    mtime and link target, for contrib/bench_nullfs.py --tree."""
    entries: list[list[object]] = []
    for top, dirs, files in os.walk(root):
        if top == str(root):
            st = os.lstat(top)
            entries.append(["", st.st_mode, st.st_size, st.st_mtime_ns, None])
        for name in sorted(dirs + files):
            path = os.path.join(top, name)
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            relative = os.path.relpath(path, root)
            entries.append([relative, st.st_mode, st.st_size, st.st_mtime_ns, target])
    return entries


def parallel_dd_mbps(paths: list[Path]) -> float:
    """Readers at once, one per file: total MB/s over the wall time."""
    for path in paths:
        evict(path)
    total = sum(p.stat().st_size for p in paths)
    start = time.perf_counter()
    procs = [
        subprocess.Popen(["dd", f"if={p}", "of=/dev/null", "bs=1M", "status=none"]) for p in paths
    ]
    codes = [p.wait() for p in procs]
    seconds = time.perf_counter() - start
    if any(codes):
        raise RuntimeError(f"parallel dd failed: exit statuses {codes}")
    return total / seconds / MB


def random_read_iops(path: Path, size: int) -> float:
    """RANDOM_READS reads of 64 KiB at aligned offsets from a fixed seed."""
    rng = random.Random(SEED)
    offsets = [
        rng.randrange(size // RANDOM_READ_SIZE) * RANDOM_READ_SIZE for _ in range(RANDOM_READS)
    ]
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for offset in offsets:
            if len(os.pread(fd, RANDOM_READ_SIZE, offset)) != RANDOM_READ_SIZE:
                raise RuntimeError(f"short read of {path} at {offset}")
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    return RANDOM_READS / seconds


def qemu_img_convert_mbps(src: Path, src_fmt: str, dst: Path, dst_fmt: str) -> float:
    """``qemu-img convert`` to a file: MB/s of the output file's bytes."""
    start = time.perf_counter()
    run(["qemu-img", "convert", "-f", src_fmt, "-O", dst_fmt, str(src), str(dst)])
    seconds = time.perf_counter() - start
    size = dst.stat().st_size
    dst.unlink()
    return size / seconds / MB


def timed_cp(source: Path, target: Path) -> float:
    """Seconds ``cp`` takes, after an ``os.sync``: as in qemu_img_restore_mbps, the copy
    (an import's durability) must not pay for other files' dirty pages."""
    os.sync()
    return timed(["cp", str(source), str(target)])


def qemu_img_restore_mbps(src: Path, src_fmt: str, dst: Path, virtual_size: int) -> float:
    """``qemu-img convert -O raw`` plus an fsync of the output: virtual MB/s."""
    os.sync()  # an fsync must not pay for other files' dirty pages (ext4 data=ordered)
    start = time.perf_counter()
    run(["qemu-img", "convert", "-f", src_fmt, "-O", "raw", str(src), str(dst)])
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    dst.unlink()
    return virtual_size / seconds / MB


# -- the pool section -------------------------------------------------------------------


def fakepool_module() -> Any:
    """tests.pool.fakepool from the checkout (it needs trustme, from the test extra)."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))  # last: a pinned vdifs first on PYTHONPATH still wins
    from tests.pool import fakepool

    return fakepool


def pool_missing() -> list[str]:
    """What the pool section lacks to run here (empty: it can run)."""
    missing = [
        f"{tool} (apt-get install {package})"
        for tool, package in POOL_PACKAGES.items()
        if shutil.which(tool) is None
    ]
    plugin = ["nbdkit", "python", "--version"]
    if shutil.which("nbdkit") and subprocess.run(plugin, capture_output=True).returncode:
        missing.append("nbdkit's python plugin (apt-get install nbdkit-plugin-python)")
    try:
        fakepool_module()
    except ImportError as exc:
        missing.append(f"the fake pool: {exc} (pip install -e '.[test]')")
    return missing


def dd_counted_mbps(path: Path) -> float:
    """``dd bs=1M`` of a file, cache evicted first: MB/s of the bytes dd reports it read."""
    evict(path)
    start = time.perf_counter()
    result = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=1M"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    seconds = time.perf_counter() - start
    copied = re.search(r"^(\d+) bytes", result.stderr, re.MULTILINE)
    if result.returncode or copied is None:
        raise RuntimeError(f"dd of {path}: exit {result.returncode}: {result.stderr.strip()}")
    if int(copied[1]) != path.stat().st_size:
        raise RuntimeError(f"dd read {copied[1]} bytes of {path}, not {path.stat().st_size}")
    return int(copied[1]) / seconds / MB


def nbdcopy_mbps(uri: str, size: int, *options: str) -> float:
    """``nbdcopy URI null:``: MB/s of the export's bytes.  The fake's NBD server, like
    xapi-nbd, has no structured replies, hence no block status: nbdcopy reads every
    byte (checked once by PoolDisk.check)."""
    return size / timed(["nbdcopy", *options, uri, "null:"]) / MB


def https_mbps(url: str, ca: Path, size: int) -> float:
    """``curl`` of an export to /dev/null: MB/s of the file's bytes."""
    return size / timed(["curl", "-sS", "--cacert", str(ca), "-o", "/dev/null", url]) / MB


def nbd_client_mbps(target: Any, size: int) -> float:
    """vdifs's own NBD client alone (``vdifs.storage.xapi.nbd``), one connection, one
    2 MiB request at a time, no FUSE, no cache: the floor of the pool's read path in
    Python (TLS records are read one ``SSL_read`` at a time, under the GIL)."""
    from vdifs.storage.xapi.nbd import NbdConnection

    buf = memoryview(bytearray(ONE_REQUEST))
    start = time.perf_counter()
    with NbdConnection(target) as conn:
        for offset in range(0, size - size % ONE_REQUEST, ONE_REQUEST):
            conn.read_into(offset, buf)
    return (size - size % ONE_REQUEST) / (time.perf_counter() - start) / MB


@dataclass
class PoolDisk:
    """A snapshot of a fully allocated VDI on a fake pool: mounted by vdifs, and the
    NBD export nbdcopy reads."""

    delay_ms: int
    size: int
    snapshot: str
    disk: Path  # the fake's file of the snapshot: what its nbdkit serves
    mount: VdifsMount
    uri: str = field(repr=False)  # carries a session id

    @property
    def vhd(self) -> Path:
        return self.mount.mountpoint / "vdis" / self.snapshot / "full.vhd"

    @property
    def raw_img(self) -> Path:
        return self.mount.mountpoint / "vdis" / self.snapshot / "raw.img"

    def check(self, compare: bool) -> None:
        """Every path reads the snapshot's bytes, and nbdcopy reads all of them."""
        say(f"checking the {self.delay_ms} ms pool's snapshot: raw.img, full.vhd, nbdcopy")
        expected = sha256_file(self.disk)
        if sha256_file(self.raw_img) != expected:
            raise RuntimeError(f"{self.raw_img} differs from the fake's disk: wrong bytes")
        if self.vhd.stat().st_size < self.size:
            raise RuntimeError(f"{self.vhd} is smaller than the disk: not every block carried")
        if compare:
            run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(self.vhd), str(self.disk)])
        info = json.loads(run(["nbdinfo", "--json", self.uri]))
        export = info["exports"][0]
        if info["structured"] or export["export-size"] != self.size:
            raise RuntimeError(f"unexpected NBD export: {json.dumps(info)}")
        if not export["can_multi_conn"]:
            raise RuntimeError("the NBD export does not allow multi-conn: nbdcopy uses one")
        digest, count = hashlib.sha256(), 0
        cmd = ["nbdcopy", f"--request-size={ONE_REQUEST}", self.uri, "-"]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(4 * MIB):
                digest.update(chunk)
                count += len(chunk)
        if proc.returncode or count != self.size or digest.hexdigest() != expected:
            raise RuntimeError(f"nbdcopy read {count} bytes, exit {proc.returncode}, other bytes")


# -- the benchmark ----------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, res: Resources) -> None:
        self.size: int = args.size
        self.quick: bool = args.quick
        self.runs: int = args.runs
        self.res = res
        self.work = res.workdir
        self.peers = {name: shutil.which(name) is not None for name in PEER_PACKAGES}
        self.probes: dict[str, Probe] = {}
        self.groups: list[list[Probe]] = []
        self.rss: dict[str, list[float]] = {}
        self.changed_bytes = 0
        self.load: list[float] = []
        self.local: bool = not args.pool  # the local-SR section (everything but the pool)
        self.pool: bool = args.pool or not args.no_pool  # the pool section
        self.pool_size: int = args.pool_size
        self.pool_disks: list[PoolDisk] = []  # DELAY_MS = 0, then DELAY_MS

    # -- set-up ----------------------------------------------------------------------

    def vdifs(self, sr: Path, *args: str) -> str:
        return run([VDIFS, "--sr", str(sr), *args]).strip()

    def build(self) -> None:
        if self.pool and (missing := pool_missing()):
            say(f"the pool section is skipped (its ratios print n/a): no {', '.join(missing)}")
            self.pool = False
        if self.local:
            self.build_local()
        if self.pool:
            self.build_pool()

    def build_local(self) -> None:
        rng = random.Random(SEED)
        self.raw = self.work / "disk.raw"
        self.sr = self.work / "sr"
        say(f"writing a {self.size / MIB:.0f} MiB test disk")
        data = DataSource(rng)
        written = write_initial(self.raw, self.size, rng, data)
        say(f"  {written / MIB:.0f} MiB of data; importing it as S1")
        vdi = self.vdifs(self.sr, "vdi", "create", "bench", "--size", str(self.size))
        self.vdifs(self.sr, "import", vdi, str(self.raw))
        self.s1 = self.vdifs(self.sr, "vdi", "snapshot", vdi, "--name", "S1")
        self.changed_bytes = write_changes(self.raw, self.size, rng, data)
        say(f"  {self.changed_bytes / MIB:.1f} MiB of chunks changed; importing them as S2")
        self.vdifs(self.sr, "import", vdi, str(self.raw))
        self.s2 = self.vdifs(self.sr, "vdi", "snapshot", vdi, "--name", "S2")

        self.mount = self.res.mount_vdifs(self.sr, self.work / "mnt")
        # sha256sum's 32 KiB reads: through vdifs' default mount (the page cache
        # reads ahead), and through --mount-options if they differ (direct_io:
        # one FUSE round trip per read(), which a small-buffer reader waits for).
        self.default_mount = (
            self.res.mount_vdifs(self.sr, self.work / "mnt-default", mount_options=[])
            if MOUNT_OPTIONS
            else self.mount
        )
        d1 = self.mount.mountpoint / "vdis" / self.s1
        d2 = self.mount.mountpoint / "vdis" / self.s2
        self.f = {
            "raw": d2 / "raw.img",
            "vhd": d2 / "full.vhd",
            "qcow2": d2 / "full.qcow2",
            "delta_vhd": d2 / "delta-from" / f"{self.s1}.vhd",
            "delta_qcow2": d2 / "delta-from" / f"{self.s1}.qcow2",
            "s1_vhd": d1 / "full.vhd",
            "s1_qcow2": d1 / "full.qcow2",
        }
        self.default_vhd = self.default_mount.mountpoint / "vdis" / self.s2 / "full.vhd"
        say("checking S2's raw.img against disk.raw")
        if not same_content(self.f["raw"], self.raw):
            raise RuntimeError("S2's raw.img differs from disk.raw: vdifs returned wrong bytes")
        self.vhd_copy = self.work / "s2.vhd"
        self.qcow2_copy = self.work / "s2.qcow2"
        say("copying S2's full.vhd and full.qcow2 out of the mount (the images to import)")
        for source, copy in ((self.f["vhd"], self.vhd_copy), (self.f["qcow2"], self.qcow2_copy)):
            run(["dd", f"if={source}", f"of={copy}", "bs=1M", "status=none"])
        self.vhd_sha = sha256_file(self.vhd_copy)
        if self.peers["qemu-img"] and not self.quick:
            for copy, fmt in ((self.vhd_copy, "vpc"), (self.qcow2_copy, "qcow2")):
                run(["qemu-img", "compare", "-f", fmt, "-F", "raw", str(copy), str(self.raw)])
            say("  qemu-img compare: full.vhd and full.qcow2 hold disk.raw")

        self.small_sr = self.work / "sr-1000"
        self.tree_json = self.work / "tree-1000.json"  # its tree's shape, for the floor
        self.tree_mounts = itertools.count(1)
        self.build_small_vdis()
        self.start_peers()

    def build_small_vdis(self) -> None:
        """A separate SR with SMALL_VDIS empty VDIs, made in-process (fast)."""
        try:
            from vdifs.storage.local import LocalSR
        except ImportError:  # another interpreter than the project's virtualenv
            sys.path.insert(0, str(REPO))
            from vdifs.storage.local import LocalSR

        start = time.perf_counter()
        sr = LocalSR(self.small_sr)
        sr.db.execute("PRAGMA synchronous=OFF")  # set-up only: durability is not measured
        for n in range(SMALL_VDIS):
            sr.create_vdi(f"vdi-{n:04d}", SMALL_VDI_SIZE)
        sr.close()
        say(f"created {SMALL_VDIS} VDIs in {time.perf_counter() - start:.1f} s")
        # The floor under ls -lR: the same tree's shape, served by pyfuse3 from dicts.
        mount = self.res.mount_vdifs(self.small_sr, self.work / "mnt-1000")
        try:
            tree = capture_tree(mount.mountpoint)
        finally:
            self.res.unmount_vdifs(mount)
        self.tree_json.write_text(json.dumps(tree))

    def start_serve(self) -> None:
        """``vdifs serve`` over HTTPS on the same SR, beside the mount: S2's full.vhd
        by curl against the same file read through FUSE."""
        import trustme

        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.work / "serve-ca.pem"))
        ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(
            str(self.work / "serve.pem")
        )
        (self.work / "serve-tokens").write_text("bench-token\n")
        log = open(self.work / "serve.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [VDIFS, "--sr", str(self.sr), "serve", "--listen", "127.0.0.1:0",
             "--cert", str(self.work / "serve.pem"),
             "--token-file", str(self.work / "serve-tokens")],
            stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
        self.res.processes.append(proc)
        assert proc.stdout is not None
        port = int(proc.stdout.readline().decode().split()[-1])
        self.serve_url = (
            f"https://localhost:{port}/export_raw_vdi?vdi={self.s2}&format=vhd"
            "&session_id=bench-token"
        )
        run(["curl", "-sS", "--cacert", str(self.work / "serve-ca.pem"), self.serve_url,
             "-o", str(self.work / "https.vhd")])  # fmt: skip
        if sha256_file(self.work / "https.vhd") != self.vhd_sha:
            raise RuntimeError("full.vhd over HTTPS differs from the mount's")
        (self.work / "https.vhd").unlink()

    def start_peers(self) -> None:
        for name, present in self.peers.items():
            if not present:
                say(f"{name} not found: apt-get install {PEER_PACKAGES[name]} (skipped; n/a)")
        if self.peers["xmount"]:
            self.xmount_vhd = self.res.start_xmount(self.raw, self.work / "xmount")
        if shutil.which("curl"):
            self.start_serve()
        self.nullfs = self.res.start_nullfs(self.work / "nullfs")
        self.null_copies = itertools.count(1)  # a new file each copy, as each import creates
        if self.peers["qemu-storage-daemon"]:
            self.qsd_raw = self.work / "qsd-raw"
            self.qsd_qcow2 = self.work / "qsd-qcow2"
            self.res.start_qsd(self.raw, "raw", self.qsd_raw)
            self.res.start_qsd(self.qcow2_copy, "qcow2", self.qsd_qcow2)

    def build_pool(self) -> None:
        """Two fake pools (NBD reads undelayed, and delayed by DELAY_MS), a snapshot of
        a fully allocated VDI on each, each pool mounted by vdifs; checked once."""
        fakepool = fakepool_module()
        for delay_ms, size in ((0, self.pool_size), (DELAY_MS, DELAY_DISK)):
            say(f"a fake pool with {delay_ms} ms of NBD read delay, a {size / MIB:.0f} MiB VDI")
            state = self.work / f"pool-{delay_ms}ms"
            info = self.res.pools.enter_context(fakepool.running_pool(state, delay_ms))
            port = urlsplit(info.url).port
            cli = ["--sr", f"xapi://{info.user}@127.0.0.1:{port}", "--ca", str(info.ca)]
            cli += ["--password-file", str(state / "password")]
            # A pool's daemon log, NBD scratch and import journal: in the fake's directory.
            env = {**os.environ, "XDG_CACHE_HOME": str(state / "cache")}
            env["XDG_STATE_HOME"] = str(state / "state")
            vdi = run([VDIFS, *cli, "vdi", "create", "bench", "--size", str(size)], env).strip()
            path = Path(info.control.disk_path(vdi))
            if path.stat().st_size != size:
                raise RuntimeError(f"the fake made a {path.stat().st_size}-byte disk, not {size}")
            rng = random.Random(SEED + delay_ms)
            with open(path, "r+b") as f:  # what a guest wrote: every block, random bytes
                for offset in range(0, size, 4 * MIB):
                    f.write(rng.randbytes(min(4 * MIB, size - offset)))
            info.control.bump(vdi)
            snapshot = run([VDIFS, *cli, "vdi", "snapshot", vdi], env).strip()
            mount = self.res.mount_vdifs(cli, self.work / f"mnt-pool-{delay_ms}ms", env)
            disk = PoolDisk(
                delay_ms, size, snapshot, Path(info.control.disk_path(snapshot)), mount,
                self.nbd_uri(fakepool, info, snapshot, state / "pinned"),
            )  # fmt: skip
            wait_until(disk.vhd.exists, f"{snapshot} to appear in the pool mount")
            disk.check(compare=not self.quick)
            self.pool_disks.append(disk)

    @staticmethod
    def nbd_uri(fakepool: Any, info: Any, snapshot: str, pinned: Path) -> str:
        """nbdcopy's URI of a VDI's export, as ``VDI.get_nbd_info`` describes it (a
        session of its own; the host's certificate pinned as ca-cert.pem)."""
        proxy = info.proxy()

        def value(result: dict[str, Any]) -> Any:
            if result["Status"] != "Success":
                raise RuntimeError(f"XenAPI: {result['ErrorDescription']}")
            return result["Value"]

        session = value(proxy.session.login_with_password(info.user, info.password, "1.0", ""))
        ref = value(proxy.VDI.get_by_uuid(session, snapshot))
        nbd = value(proxy.VDI.get_nbd_info(session, ref))[0]
        pinned.mkdir(exist_ok=True)
        (pinned / "ca-cert.pem").write_text(nbd["cert"])
        from vdifs.storage.xapi.nbd import NbdTarget

        NBD_TARGETS[snapshot] = NbdTarget(
            nbd["address"], int(nbd["port"]), nbd["exportname"], nbd["cert"], nbd["subject"]
        )
        return str(fakepool.nbd_uri(nbd["address"], nbd["port"], nbd["exportname"], pinned))

    # -- the paths ---------------------------------------------------------------------

    def probe(self, key: str, label: str, unit: str, measure: Callable[[], float]) -> list[Probe]:
        probe = Probe(key, label, unit, measure)
        self.probes[key] = probe
        return [probe]

    def peer(
        self, tool: str, key: str, label: str, unit: str, measure: Callable[[], float]
    ) -> list[Probe]:
        """A peer's probe, or nothing when the peer is not installed.

        A missing peer's paths (``self.xmount_vhd``, ``self.qsd_raw``, ...) are
        never set, so a ``measure`` that uses one must read it when called
        (a lambda), not when the probes are defined (``partial``).
        """
        return self.probe(key, label, unit, measure) if self.peers[tool] else []

    def define_probes(self) -> None:
        """Every path, grouped with the peers it is compared with.

        A group runs back to back, so that a ratio compares two measurements
        taken moments apart even when other processes load the machine.
        """
        if self.local:
            self.define_local_probes()
        if self.pool:
            self.define_pool_probes()

    def define_local_probes(self) -> None:
        f, out = self.f, self.work / "qemu-img.out"
        kib = f"{RANDOM_READ_SIZE // 1024} KiB"
        qsd, qi = "qemu-storage-daemon", "qemu-img"
        four = [f["vhd"], f["s1_vhd"], f["qcow2"], f["s1_qcow2"]]
        self.groups = [
            self.probe("cache", "dd of disk.raw, page cache (limit)", "MB/s",
                       partial(dd_cached_mbps, self.raw)),
            self.probe("raw", "vdifs raw.img", "MB/s", partial(dd_mbps, f["raw"]))
            + self.peer(qsd, "qsd_raw", "qemu-storage-daemon FUSE raw", "MB/s",
                        lambda: dd_mbps(self.qsd_raw)),
            self.probe("vhd", "vdifs full.vhd", "MB/s", partial(dd_mbps, f["vhd"]))
            + (self.probe("https_vhd", "vdifs serve: full.vhd by curl over HTTPS", "MB/s",
                          lambda: https_mbps(self.serve_url, self.work / "serve-ca.pem",
                                             f["vhd"].stat().st_size))
               if shutil.which("curl") else [])
            + self.peer("xmount", "xmount", "xmount --out vhd (a fixed VHD)", "MB/s",
                        lambda: dd_mbps(self.xmount_vhd))
            + self.peer(qi, "qi_vpc", "qemu-img convert raw -> vpc file", "MB/s",
                        partial(qemu_img_convert_mbps, self.raw, "raw", out, "vpc")),
            self.probe("qcow2", "vdifs full.qcow2", "MB/s", partial(dd_mbps, f["qcow2"]))
            + self.peer(qsd, "qsd_qcow2", "qemu-storage-daemon FUSE qcow2", "MB/s",
                        lambda: dd_mbps(self.qsd_qcow2))
            + self.peer(qi, "qi_qcow2", "qemu-img convert raw -> qcow2 file", "MB/s",
                        partial(qemu_img_convert_mbps, self.raw, "raw", out, "qcow2")),
            self.probe("delta_vhd", "vdifs delta-from/S1.vhd", "MB/s",
                       partial(dd_mbps, f["delta_vhd"]))
            + self.probe("delta_qcow2", "vdifs delta-from/S1.qcow2", "MB/s",
                         partial(dd_mbps, f["delta_qcow2"])),
            self.probe("sha_vhd", "sha256sum vdifs full.vhd, default mount", "MB/s",
                       partial(sha256sum_mbps, self.default_vhd, self.vhd_sha))
            + (self.probe("sha_vhd_options",
                          f"sha256sum vdifs full.vhd, {' '.join(MOUNT_OPTIONS)}", "MB/s",
                          partial(sha256sum_mbps, f["vhd"], self.vhd_sha))
               if MOUNT_OPTIONS else [])
            + self.probe("sha_cache", "sha256sum of the VHD copy, page cache (limit)", "MB/s",
                         partial(sha256sum_mbps, self.vhd_copy, self.vhd_sha, cached=True)),
            self.probe("four", "vdifs 4 readers (S1+S2 full.vhd+full.qcow2)", "MB/s",
                       partial(parallel_dd_mbps, four)),
            self.probe("rand", f"vdifs raw.img random {kib} reads", "IOPS",
                       partial(random_read_iops, f["raw"], self.size))
            + self.peer(qsd, "qsd_rand", f"qemu-storage-daemon raw random {kib} reads", "IOPS",
                        lambda: random_read_iops(self.qsd_raw, self.size)),
            self.probe("ls", f"vdifs ls -lR of a fresh mount, {SMALL_VDIS} VDIs", "s", self.ls_lr)
            + self.probe("ls_floor", "ls -lR of the same tree from dicts (pyfuse3 alone)", "s",
                         self.ls_lr_floor),
            self.import_group(self.vhd_copy, "vhd", "VHD", "vpc", out),
            self.import_group(self.qcow2_copy, "qcow2", "qcow2", "qcow2", out),
        ]  # fmt: skip

    def import_group(
        self, image: Path, fmt: str, name: str, qemu_fmt: str, out: Path
    ) -> list[Probe]:
        """An image imported by vdifs, restored by qemu-img (to ``out``), and copied into
        the null FS: the floor of vdifs' import, pyfuse3's write path alone."""
        restore = partial(qemu_img_restore_mbps, image, qemu_fmt, out, self.size)
        floor = f"pyfuse3 write path alone: cp of the {name} into a null FS"
        return (
            self.probe(f"imp_{fmt}", f"vdifs cp of the {name} into import/", "MB/s",
                       partial(self.cp_import, image, fmt))
            + self.peer("qemu-img", f"qi_imp_{fmt}",
                        f"qemu-img convert {qemu_fmt} -> raw file, fsync", "MB/s", restore)
            + self.probe(f"null_{fmt}", floor, "MB/s", partial(self.cp_null, image))
        )  # fmt: skip

    def define_pool_probes(self) -> None:
        fast, slow = self.pool_disks
        one = ["--connections=1", "--requests=1", f"--request-size={ONE_REQUEST}"]
        ms = f"{DELAY_MS} ms"
        self.groups += [
            self.probe("pool_vhd", "vdifs pool full.vhd, 0 ms", "MB/s",
                       partial(dd_counted_mbps, fast.vhd))
            + self.probe("pool_nbdcopy", "nbdcopy of the export to null:, 0 ms", "MB/s",
                         partial(nbdcopy_mbps, fast.uri, fast.size))
            + self.probe("pool_client", "vdifs NBD client alone, 1 conn, 2 MiB, 0 ms", "MB/s",
                         partial(nbd_client_mbps, NBD_TARGETS[fast.snapshot], fast.size)),
            self.probe("pool_vhd_20ms", f"vdifs pool full.vhd, {ms}", "MB/s",
                       partial(dd_counted_mbps, slow.vhd))
            + self.probe("pool_nbdcopy_20ms", f"nbdcopy of the export to null:, {ms}", "MB/s",
                         partial(nbdcopy_mbps, slow.uri, slow.size))
            + self.probe("pool_one_20ms", f"nbdcopy, 1 connection, 1 request of 2 MiB, {ms}",
                         "MB/s", partial(nbdcopy_mbps, slow.uri, slow.size, *one)),
        ]  # fmt: skip

    def ls_lr(self) -> float:
        mount = self.res.mount_vdifs(self.small_sr, self.work / "mnt-1000")
        try:
            start = time.perf_counter()
            out = run(["ls", "-lR", str(mount.mountpoint)])
            seconds = time.perf_counter() - start
            if out.count("raw.img") != SMALL_VDIS:
                raise RuntimeError(f"ls -lR listed {out.count('raw.img')} raw.img files")
            self.rss.setdefault("ls", []).append(vm_hwm_mib(mount.pid))
        finally:
            self.res.unmount_vdifs(mount)
        return seconds

    def ls_lr_floor(self) -> float:
        """``ls -lR`` of a fresh contrib/bench_nullfs.py --tree mount of the same tree."""
        mountpoint = self.work / f"treefs-{next(self.tree_mounts)}"
        mountpoint.mkdir()
        self.res.start_treefs(self.tree_json, mountpoint)
        try:
            start = time.perf_counter()
            out = run(["ls", "-lR", str(mountpoint)])
            seconds = time.perf_counter() - start
            if out.count("raw.img") != SMALL_VDIS:
                raise RuntimeError(f"ls -lR of the tree listed {out.count('raw.img')} raw.img")
        finally:
            run(["fusermount3", "-u", str(mountpoint)])  # the daemon then ends by itself
        return seconds

    def cp_import(self, source: Path, fmt: str) -> float:
        """cp an image into import/ of a fresh SR: virtual MB/s until cp returns."""
        sr = self.work / "sr-import"
        mount = self.res.mount_vdifs(sr, self.work / "mnt-import")
        try:
            seconds = timed_cp(source, mount.mountpoint / "import" / f"restored.{fmt}")
            self.rss.setdefault(f"import_{fmt}", []).append(vm_hwm_mib(mount.pid))
            restored = mount.mountpoint / "by-name" / "restored"
            wait_until(restored.exists, "the restored VDI to appear", 5)
            if (restored / "raw.img").stat().st_size < self.size:
                raise RuntimeError("the restored VDI is smaller than the disk")
        finally:
            self.res.unmount_vdifs(mount)
            shutil.rmtree(sr, ignore_errors=True)
        return self.size / seconds / MB

    def cp_null(self, source: Path) -> float:
        """cp an image into the null FS, timed like cp_import: virtual MB/s."""
        copy = self.nullfs / f"copy-{next(self.null_copies)}{source.suffix}"
        seconds = timed_cp(source, copy)
        counted, size = copy.stat().st_size, source.stat().st_size  # its size: bytes counted
        if counted != size:
            raise RuntimeError(f"the null FS counted {counted} bytes of {source}, not {size}")
        return self.size / seconds / MB

    # -- rounds, ratios and the report ---------------------------------------------------

    def measure(self) -> None:
        backing = [d.disk for d in self.pool_disks]  # what the fake pools' nbdkit read
        if self.local:
            backing += [*sorted((self.sr / "packs").glob("*.pack")), self.raw]
            backing += [self.vhd_copy, self.qcow2_copy]
        self.load = [os.getloadavg()[0]]
        if self.load[0] > 0.5:
            say(f"warning: load average {self.load[0]:.2f}: other processes compete for the CPUs")
        for round_no in range(self.runs):
            warm(backing)
            # Rotate the groups each round; inside a group, alternate the order.
            shift = round_no % len(self.groups)
            for group in self.groups[shift:] + self.groups[:shift]:
                for probe in group if round_no % 2 == 0 else reversed(group):
                    self.run_probe(probe, round_no)
        if self.local:
            self.rss["main"] = [vm_hwm_mib(self.mount.pid)]
        for disk in self.pool_disks:
            self.rss[f"pool {disk.delay_ms} ms"] = [vm_hwm_mib(disk.mount.pid)]
        self.load.append(os.getloadavg()[0])

    def run_probe(self, probe: Probe, round_no: int) -> None:
        value = probe.measure()
        probe.values.append(value)
        say(f"round {round_no + 1}/{self.runs}: {probe.label}: {value:.3g} {probe.unit}")

    def ratio(self, mine: str, theirs: str) -> list[float] | None:
        """Each round's ``mine / theirs``; None (n/a) when either was not measured."""
        if mine not in self.probes or theirs not in self.probes:
            return None
        a, b = self.probes[mine].values, self.probes[theirs].values
        return [x / y for x, y in zip(a, b, strict=True)]

    def delta_cost(self, key: str) -> list[float]:
        """Each round's time to read the delta / its payload at raw.img's speed."""
        raw, delta = self.probes["raw"].values, self.probes[key].values
        size = self.f[key].stat().st_size
        return [(size / d) / (self.changed_bytes / r) for d, r in zip(delta, raw, strict=True)]

    def figures(self) -> dict[str, Figure]:
        """The local section's ratios, then the pool section's (n/a when it was skipped)."""
        figures = self.local_figures() if self.local else {}
        return figures | self.pool_figures()

    def pool_figures(self) -> dict[str, Figure]:
        pool_rss = [v for k, values in self.rss.items() if k.startswith("pool") for v in values]
        return {
            "pool_vhd_vs_nbdcopy": self.ratio("pool_vhd", "pool_nbdcopy"),
            "pool_vhd_vs_nbdcopy_20ms": self.ratio("pool_vhd_20ms", "pool_nbdcopy_20ms"),
            "pool_vhd_vs_one_connection_20ms": self.ratio("pool_vhd_20ms", "pool_one_20ms"),
            "pool_client_vs_nbdcopy": self.ratio("pool_client", "pool_nbdcopy"),
            "pool_rss_mib": max(pool_rss) if pool_rss else None,
        }

    def local_figures(self) -> dict[str, Figure]:
        xmount_wall = self.ratio("vhd", "xmount")
        if xmount_wall is not None:
            size_ratio = self.xmount_vhd.stat().st_size / self.f["vhd"].stat().st_size
            xmount_wall = [r * size_ratio for r in xmount_wall]
        return {
            "vhd_vs_xmount": self.ratio("vhd", "xmount"),
            "https_vs_fuse_vhd": self.ratio("https_vhd", "vhd"),
            "raw_vs_qsd": self.ratio("raw", "qsd_raw"),
            "qcow2_vs_qsd": self.ratio("qcow2", "qsd_qcow2"),
            "delta_cost_ratio": self.delta_cost("delta_vhd"),
            "delta_qcow2_cost_ratio": self.delta_cost("delta_qcow2"),
            "delta_vhd_bytes_ratio": self.f["delta_vhd"].stat().st_size / self.changed_bytes,
            "import_vhd_vs_qemu_img": self.ratio("imp_vhd", "qi_imp_vhd"),
            "import_floor_vhd_vs_qemu_img": self.ratio("null_vhd", "qi_imp_vhd"),
            "import_qcow2_vs_qemu_img": self.ratio("imp_qcow2", "qi_imp_qcow2"),
            "import_floor_qcow2_vs_qemu_img": self.ratio("null_qcow2", "qi_imp_qcow2"),
            "import_vhd_vs_floor": self.ratio("imp_vhd", "null_vhd"),
            "sha256_vs_page_cache": self.ratio("sha_vhd", "sha_cache"),
            "sha256_mount_options_vs_page_cache": self.ratio("sha_vhd_options", "sha_cache"),
            "vhd_wall_vs_xmount": xmount_wall,
            "vhd_vs_qemu_img_convert": self.ratio("vhd", "qi_vpc"),
            "raw_vs_page_cache": self.ratio("raw", "cache"),
            "rand_vs_qsd": self.ratio("rand", "qsd_rand"),
            "rss_mib": max(max(v) for k, v in self.rss.items() if not k.startswith("pool")),
            "ls_lr_1000_s": list(self.probes["ls"].values),
            "ls_lr_floor_s": list(self.probes["ls_floor"].values),
            "ls_lr_vs_floor": self.ratio("ls", "ls_floor"),
        }

    def report(self) -> None:
        figures = self.figures()
        print()
        disk = f"disk {self.size / MIB:.0f} MiB, " if self.local else ""
        print(
            f"vdifs benchmark: {disk}{self.runs} runs, "
            f"{os.cpu_count()} CPUs, kernel {os.uname().release}, "
            f"load average {self.load[0]:.2f} before / {self.load[1]:.2f} after"
        )
        print(f"vdifs code: {code_version()}; mount options: {' '.join(MOUNT_OPTIONS) or 'none'}")
        if self.local:
            print(
                f"S2 changed {self.changed_bytes / MIB:.1f} MiB; delta-from/S1.vhd is "
                f"{self.f['delta_vhd'].stat().st_size / MIB:.1f} MiB, full.vhd "
                f"{self.f['vhd'].stat().st_size / MIB:.1f} MiB"
            )
        for d in self.pool_disks:
            print(
                f"pool, {d.delay_ms} ms NBD read delay: a fully allocated {d.size / MIB:.0f} MiB "
                f"snapshot, full.vhd {d.vhd.stat().st_size / MIB:.2f} MiB"
            )
        print()
        print("ratios (the median of the rounds, the target, min-max and each round):")
        print("\n".join(ratio_table(figures)))
        warnings = spread_warnings(figures)
        print("\n".join(["", *warnings, target_summary(figures)]))
        print()
        width = max(len(p.label) for p in self.probes.values())
        print(f"{'path':{width}}  {'median':>10}  unit  runs")
        for p in self.probes.values():
            runs = " ".join(f"{v:.4g}" for v in p.values)
            print(f"{p.label:{width}}  {p.median:10.4g}  {p.unit:4}  {runs}")
        for name, values in self.rss.items():
            label = f"vdifs daemon peak RSS ({name} mount)"
            runs = " ".join(f"{v:.4g}" for v in values)
            print(f"{label:{width}}  {max(values):10.4g}  MiB   {runs}")
        print()
        extras: dict[str, float | int | None] = {"spread_warnings": len(warnings)}
        extras |= {"size_mib": self.size / MIB} if self.local else {}
        extras["runs"] = self.runs
        if self.local:
            extras |= {
                "raw_mbps": self.probes["raw"].median,
                "vhd_mbps": self.probes["vhd"].median,
                "qcow2_mbps": self.probes["qcow2"].median,
            }
        extras |= {
            "pool_size_mib": self.pool_size / MIB if self.pool else None,
            "pool_delay_size_mib": DELAY_DISK / MIB if self.pool else None,
        }
        for key in ("pool_vhd", "pool_nbdcopy", "pool_vhd_20ms", "pool_nbdcopy_20ms",
                    "pool_one_20ms"):  # fmt: skip
            extras[f"{key}_mbps"] = self.probes[key].median if key in self.probes else None
        fields = {**result_fields(figures), **extras}
        print("RESULT " + " ".join(f"{k}={fmt_value(v)}" for k, v in fields.items()))


def median_of(figure: Figure) -> float | None:
    """A figure's median over its rounds (a single figure, or None, as it is)."""
    return statistics.median(figure) if isinstance(figure, list) else figure


def target_status(target: Target, figure: Figure) -> str:
    """Whether a figure meets its target: "met" (the median and every round), "met at the
    median only", "missed" or "n/a"."""
    median = median_of(figure)
    if median is None:
        return "n/a"
    if not target.met_by(median):
        return "missed"
    rounds = figure if isinstance(figure, list) else [median]
    if all(target.met_by(value, one_round=True) for value in rounds):
        return "met"
    return MEDIAN_ONLY


def ratio_table(figures: dict[str, Figure]) -> list[str]:
    """A line a ratio: its median, its target, min-max and each round."""
    width = max(len(key) for key in figures)
    lines = []
    for key, figure in figures.items():
        target = TARGETS.get(key, "")
        line = f"  {key:{width}}  {fmt_value(median_of(figure)):>7}  {target!s:22}"
        if isinstance(figure, list):
            spread = f"{fmt_value(min(figure))}-{fmt_value(max(figure))}"
            line += f"  {spread:13}  " + " ".join(map(fmt_value, figure))
        lines.append(line.rstrip())
    return lines


def spread_warnings(figures: dict[str, Figure]) -> list[str]:
    """A warning for each ratio whose rounds differ by more than SPREAD_WARNING times."""
    warnings = []
    for key, figure in figures.items():
        if not isinstance(figure, list):
            continue
        low, high = min(figure), max(figure)
        if high > SPREAD_WARNING * low:
            warnings.append(
                f"warning: {key}: rounds differ by {high / low:.2f}x (min {fmt_value(low)}, "
                f"max {fmt_value(high)}): read this figure as noise"
            )
    return warnings


def target_summary(figures: dict[str, Figure]) -> str:
    """One line: the targets met, met at the median only, missed, and n/a."""
    by_status: dict[str, list[str]] = {s: [] for s in ("met", MEDIAN_ONLY, "missed", "n/a")}
    for key, target in TARGETS.items():
        if key in figures:  # else the other section's (--pool)
            status = target_status(target, figures[key])
            by_status[status].append(key + target_note(key, status, figures))
    listed = (f"{status}: {', '.join(keys)}" for status, keys in by_status.items() if keys)
    return "targets " + "; ".join(listed)


def target_note(key: str, status: str, figures: dict[str, Figure]) -> str:
    """What the summary adds to a target not met in every round: its median, its worst
    round, and whether the floor of a missed one meets it."""
    target, figure = TARGETS[key], figures[key]
    if status in ("met", "n/a"):
        return ""
    note = f" {fmt_value(median_of(figure))}"
    if status == MEDIAN_ONLY and isinstance(figure, list):
        note += f" (a round at {fmt_value(target.worst(figure))})"
    floor = median_of(figures.get(FLOORS.get(key, "")))
    if status == "missed" and floor is not None:
        reach = "meets it" if target.met_by(floor) else "misses it too"
        note += f" (its floor {FLOORS[key]} {fmt_value(floor)} {reach})"
    return note


def result_fields(figures: dict[str, Figure]) -> dict[str, float | int | None]:
    """The RESULT line's ratios: each median, and min and max of those with a target."""
    fields: dict[str, float | int | None] = {}
    for key, figure in figures.items():
        fields[key] = median_of(figure)
        if key in TARGETS and not isinstance(figure, float):  # measured per round, or n/a
            fields[f"{key}_min"] = min(figure) if figure else None
            fields[f"{key}_max"] = max(figure) if figure else None
        if key in REPEATS:
            fields[REPEATS[key]] = fields[key]
    return fields


def code_version() -> str:
    """Which vdifs the daemons run: the checkout's commit, or another copy."""
    where = Path(run([sys.executable, "-c", "import vdifs; print(vdifs.__file__)"]).strip())
    if not where.is_relative_to(REPO):
        return f"the copy in {where.parent}"
    try:
        commit = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
        dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--", "vdifs"]).strip()
    except (RuntimeError, FileNotFoundError):
        return f"{REPO} (not a git checkout)"
    return commit + (" with uncommitted changes in vdifs/" if dirty else "")


def fmt_value(value: float | int | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller disks: 512 MiB, the pool's 256 MiB"
    )
    parser.add_argument(
        "--mount-options",
        default="direct_io",
        help="vdifs -o options (default direct_io, the backup-host setting; '' for none)",
    )
    parser.add_argument("--size", default=None, help="virtual disk size, e.g. 4G (default 4G)")
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians are reported")
    sections = parser.add_mutually_exclusive_group()
    sections.add_argument("--pool", action="store_true", help="the pool section only")
    sections.add_argument("--no-pool", action="store_true", help="skip the pool section")
    parser.add_argument(
        "--pool-size", default=None, help="the pool's undelayed disk (default 1G; --quick 256M)"
    )
    args = parser.parse_args()
    if args.mount_options:
        MOUNT_OPTIONS[:] = ["-o", args.mount_options]
    size_text = args.size or ("512M" if args.quick else "4G")
    args.size = parse_size(size_text)
    if args.size <= 0 or args.size % BLOCK:
        parser.error("--size must be a positive multiple of 2 MiB")
    default_pool_size = POOL_DISK_QUICK if args.quick else POOL_DISK
    args.pool_size = parse_size(args.pool_size) if args.pool_size else default_pool_size
    if args.pool_size <= 0 or args.pool_size % BLOCK:
        parser.error("--pool-size must be a positive multiple of 2 MiB")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if os.geteuid() != 0:
        parser.error("run as root (FUSE mounts of peers, page-cache control)")
    for tool in ("dd", "cp", "ls", "sha256sum", "fusermount3"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is missing")
    if args.pool and (missing := pool_missing()):
        parser.error(f"the pool section needs {', '.join(missing)}")

    workdir = Path(tempfile.mkdtemp(prefix="vdifs-bench-"))
    res = Resources(workdir)
    try:
        with interruptible():
            bench = Bench(args, res)
            bench.build()
            bench.define_probes()
            bench.measure()
            bench.report()
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        return 130
    finally:
        res.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
