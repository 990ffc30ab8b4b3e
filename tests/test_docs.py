"""The shell commands of docs/guide.md and docs/errors.md run, so the docs cannot rot.

Fenced blocks carry an info string:

- ```sh: runnable.  All the ``sh`` blocks of a document run in order, in one
  bash (``set -euo pipefail``), in a scratch environment: a temporary SR
  (``$VDIFS_SR``), mount point (``$MNT``), backup directory (``$BACKUP``),
  scratch mount point (``$RESTORE``) and checkout (``$VDIFS_HOME``, whose
  ``.venv/bin/vdifs`` runs this interpreter's vdifs and whose ``contrib`` is
  the repository's).  A command the docs show failing ends in
  ``  # fails: TEXT`` (it must exit non-zero and say TEXT on stderr) or
  ``  # exit N`` / ``  # exit N: TEXT`` (it must exit with status N).
- ```console: what a test machine cannot run; every command in it must match
  one of :data:`NOT_RUNNABLE`, with the reason.
- ```text and ```json: output, trees, configuration: no commands.

An HTML comment ``<!-- doc-test: crash-daemon -->`` before a block makes the
harness kill -9 the daemon serving ``$MNT`` (found by its exact command line)
before that block runs: how errors.md shows ENOTCONN and its recovery.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_tool, require_loop_device

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUN = ("guide.md", "errors.md")
MINE = (
    *RUN,
    "dev-storage.md",
    "dev-concurrency.md",
    "dev-caching.md",
    "dev-pool.md",
    "dev-serve.md",
    "dev-volumes.md",
)

INFO_STRINGS = {"sh", "console", "text", "json"}
NOT_RUNNABLE = {
    r"^/opt/vdifs/dev (setup|demo)$": "installs Debian packages and a virtualenv",
    r"^install -m 0644 \S+ /etc/systemd/system/$": "installs a systemd unit",
    r"^systemctl ": "needs systemd running as PID 1",
    r"^install -m 0755 \S+ /sbin/mount\.vdifs$": "installs into the system (tested in test_mount)",
    r"^echo .* >> /etc/fstab$": "edits the system's fstab (the helper is tested in test_mount)",
    r"^mount /mnt/vdifs$": "mounts through /etc/fstab (the helper is tested in test_mount)",
    r"^vgimportclone |^vgchange |^lvmdevices ": "LVM: lvm2 and device-mapper are not in CI",
    r"^u?mount .*/dev/restorevg/|^umount /mnt/restore$": "a logical volume (see above)",
    r"^mount -o ro,loop /mnt/vdifs/vdis/<snapshot>/lvm/": "a guest with LVM (tested in"
    " tests/test_volumes_mount.py)",
    r"^mount -t xfs ": "xfsprogs is not in CI: no XFS file system to mount",
    r"^xe ": "needs a XAPI pool (tests/pool runs the same steps against a fake pool)",
    r"--sr xapi://|/mnt/pool/|^export VDIFS_XAPI_PASSWORD=": "needs a XAPI pool (see above)",
}
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>\S*)\s*$")
FAILS = re.compile(r"^(?P<cmd>.*\S)  +# fails: (?P<text>.+)$")
EXIT = re.compile(r"^(?P<cmd>.*\S)  +# exit (?P<code>\d+)(?:: (?P<text>.+))?$")
HOOK = re.compile(r"<!-- doc-test: (?P<hook>[\w-]+) -->")


@dataclass
class Block:
    doc: str
    line: int  # of the opening fence
    info: str
    lines: list[str] = field(default_factory=list)
    hook: str | None = None

    @property
    def where(self) -> str:
        return f"docs/{self.doc}:{self.line}"


def blocks(doc: str) -> list[Block]:
    out: list[Block] = []
    current: Block | None = None
    indent = ""
    hook = None
    for n, line in enumerate((DOCS / doc).read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if current is None:
            if m := HOOK.search(line):
                hook = m["hook"]
            if fence:
                current = Block(doc, n, fence["info"], hook=hook)
                indent = fence["indent"]
                hook = None
            continue
        if fence and fence["indent"] == indent and not fence["info"]:
            out.append(current)
            current = None
            continue
        current.lines.append(line.removeprefix(indent))
    assert current is None, f"docs/{doc}: a fence opened at line {current.line} is never closed"
    return out


def logical_lines(block: Block) -> Iterator[tuple[int, str]]:
    """(doc line, command) with backslash continuations joined."""
    pending: list[str] = []
    start = 0
    for i, line in enumerate(block.lines):
        if not pending:
            start = block.line + 1 + i
        pending.append(line)
        if line.endswith("\\"):
            continue
        yield start, "\n".join(pending)
        pending = []
    assert not pending, f"{block.where}: a continuation line ends the block"


def quoted(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


PRELUDE = r"""set -Eeuo pipefail
__map() { sed -n "$1p" "$__MAP"; }
trap 'echo "@@@ FAILED (exit $?) at $(__map "$LINENO")" >&2' ERR
__ERR=$(mktemp)
__expect() {  # WHERE EXPECTED_RC TEXT RC: check an expected failure
    if [ "$2" = any ] && [ "$4" = 0 ]; then
        echo "@@@ $1: expected a failure, it succeeded" >&2; exit 97
    fi
    if [ "$2" != any ] && [ "$2" != "$4" ]; then
        echo "@@@ $1: exit status $4, expected $2:" >&2; cat "$__ERR" >&2; exit 98
    fi
    if [ -n "$3" ] && ! grep -qF -- "$3" "$__ERR"; then
        echo "@@@ $1: expected '$3' on stderr:" >&2; cat "$__ERR" >&2; exit 99
    fi
    cat "$__ERR" >&2
}
__crash_daemon() {  # kill -9 the daemon serving $MNT, found by its exact command line
    local p
    for p in /proc/[0-9]*; do
        if tr '\0' '\n' < "$p/cmdline" 2>/dev/null | grep -qxF -- "$MNT" &&
            tr '\0' '\n' < "$p/cmdline" 2>/dev/null | grep -qxF -- --foreground; then
            kill -9 "${p#/proc/}"
            sleep 0.5
            return 0
        fi
    done
    echo "@@@ no daemon serves $MNT" >&2
    return 1
}
"""


def script_for(doc: str) -> tuple[str, list[str]]:
    """The bash script running a document's sh blocks, and its line -> doc map."""
    out = PRELUDE.splitlines()
    where = ["(prelude)"] * len(out)

    def emit(text: str, loc: str) -> None:
        for line in text.splitlines():
            out.append(line)
            where.append(loc)

    for block in blocks(doc):
        if block.info != "sh":
            continue
        emit(f"echo '@@@ block {block.where}' >&2", block.where)
        if block.hook == "crash-daemon":
            emit("__crash_daemon", block.where)
        elif block.hook is not None:
            raise AssertionError(f"{block.where}: unknown doc-test hook {block.hook!r}")
        for line_no, command in logical_lines(block):
            loc = f"docs/{doc}:{line_no}"
            fails, code = FAILS.match(command), EXIT.match(command)
            if fails or code:
                match = fails or code
                assert match is not None
                rc = code["code"] if code else "any"
                text = match["text"] or ""
                emit(
                    f'if ( {match["cmd"]} ) 2>"$__ERR"; then __rc=0; else __rc=$?; fi\n'
                    f'__expect {quoted(loc)} {rc} {quoted(text)} "$__rc"',
                    loc,
                )
            else:
                emit(command, loc)
    emit("echo '@@@ done' >&2", "(end)")
    return "\n".join(out) + "\n", where


SFDISK_SHIM = '''#!{python}
"""Stands in for sfdisk where fdisk is not installed (not in CI's packages).

Handles what the guide does: `sfdisk -q FILE` with one `start=S, type=T` line
on stdin makes a DOS label holding that one partition, up to the end.
"""
import os, re, struct, sys

path = sys.argv[-1]
spec = dict(re.findall(r"(\\w+)=(\\w+)", sys.stdin.read()))
start, ptype = int(spec["start"]), int(spec["type"], 16)
sectors = os.stat(path).st_size // 512
entry = struct.pack("<B3sB3sII", 0, b"\\xfe\\xff\\xff", ptype, b"\\xfe\\xff\\xff", start,
                    sectors - start)
mbr = bytearray(512)
mbr[440:444] = os.urandom(4)
mbr[446:462] = entry
mbr[510:512] = b"\\x55\\xaa"
fd = os.open(path, os.O_WRONLY)
os.pwrite(fd, bytes(mbr), 0)
os.fsync(fd)
os.close(fd)
'''


class Scratch:
    """A scratch environment for one document, torn down whatever happens."""

    def __init__(self) -> None:
        # Under /tmp and world-traversable: the guide reads the mount as nobody.
        self.root = Path(tempfile.mkdtemp(prefix="vdifs-docs-", dir="/tmp"))
        self.root.chmod(0o755)
        home = self.root / "home"
        venv_bin = home / ".venv" / "bin"
        venv_bin.mkdir(parents=True)
        wrapper = venv_bin / "vdifs"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vdifs "$@"\n')
        wrapper.chmod(0o755)
        (home / "contrib").symlink_to(ROOT / "contrib")
        shims = self.root / "shims"
        shims.mkdir()
        if shutil.which("sfdisk") is None:
            shim = shims / "sfdisk"
            shim.write_text(SFDISK_SHIM.replace("{python}", sys.executable))
            shim.chmod(0o755)
        for name in ("work", "tmp"):
            (self.root / name).mkdir()
        self.env = {
            "PATH": f"{shims}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            "HOME": str(home),
            "TMPDIR": str(self.root / "tmp"),
            "LANG": "C.UTF-8",
            "VDIFS_HOME": str(home),
            "VDIFS_SR": str(self.root / "sr"),
            "MNT": str(self.root / "mnt"),
            "BACKUP": str(self.root / "backup"),
            "RESTORE": str(self.root / "restore"),
        }

    def run(self, doc: str) -> tuple[int, str, list[str]]:
        text, where = script_for(doc)
        script = self.root / f"{doc}.sh"
        script.write_text(text)
        line_map = self.root / f"{doc}.map"
        line_map.write_text("\n".join(where) + "\n")
        log = self.root / f"{doc}.log"
        with open(log, "wb") as out:
            proc = subprocess.run(
                ["bash", str(script)],
                cwd=self.root / "work",
                env={**self.env, "__MAP": str(line_map)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=240,
                check=False,
            )
        return proc.returncode, log.read_text(errors="replace"), where

    def _mounts(self) -> list[tuple[str, str]]:
        found = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            path = fields[1].replace("\\040", " ")
            if path.startswith(str(self.root)):
                found.append((path, fields[2]))
        return sorted(found, key=lambda m: -len(m[0]))

    def _daemons(self) -> list[int]:
        pids = []
        sr = str(self.root / "sr")
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if b"vdifs" in argv and sr.encode() in argv:
                    pids.append(int(proc.name))
        return pids

    def close(self) -> None:
        for path, fstype in self._mounts():
            if fstype.startswith("fuse"):
                subprocess.run(["fusermount3", "-u", "-z", path], check=False)
            else:
                subprocess.run(["umount", "-l", path], check=False)
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False)
        for line in loops.stdout.splitlines():
            if str(self.root) in line:
                subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)
        deadline = time.monotonic() + 10
        while self._daemons() and time.monotonic() < deadline:
            time.sleep(0.1)  # unmounted daemons exit by themselves
        for pid in self._daemons():  # daemons the docs started on this SR, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    env = Scratch()
    try:
        yield env
    finally:
        env.close()


# -- the docs' structure -------------------------------------------------------------


@pytest.mark.parametrize("doc", RUN)
def test_every_fence_is_labelled(doc: str) -> None:
    found = blocks(doc)
    assert sum(b.info == "sh" for b in found) >= 5
    for block in found:
        assert block.info in INFO_STRINGS, f"{block.where}: info string {block.info!r}"
        if block.info in ("text", "json"):
            assert block.hook is None


@pytest.mark.parametrize("doc", RUN)
def test_console_blocks_hold_only_what_ci_cannot_run(doc: str) -> None:
    for block in blocks(doc):
        if block.info != "console":
            continue
        for line_no, command in logical_lines(block):
            if not command.strip() or command.lstrip().startswith("#"):
                continue
            reasons = [why for pattern, why in NOT_RUNNABLE.items() if re.search(pattern, command)]
            assert reasons, (
                f"docs/{doc}:{line_no}: {command!r} could run in a test: move it to an sh block"
            )


@pytest.mark.parametrize("doc", MINE)
def test_links_resolve(doc: str) -> None:
    text = (DOCS / doc).read_text()
    anchors = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", text, re.M)
    }
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (DOCS / path).resolve().exists(), f"docs/{doc}: broken link {target}"
        elif anchor:
            assert anchor in anchors, f"docs/{doc}: no heading for #{anchor}"


# Options the guide names that belong to other tools.
OTHER_TOOLS = {"--adddev", "--devicesfile", "--delete", "--inplace", "--sparse"}


def prose(doc: str) -> str:
    """The document without its fenced blocks."""
    out, inside = [], False
    for line in (DOCS / doc).read_text().splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            out.append(line)
    return "\n".join(out)


def test_options_named_in_the_guide_exist() -> None:
    helps = [
        subprocess.run([str(ROOT / "contrib" / s), "--help"], capture_output=True, text=True).stdout
        for s in ("vdifs-backup", "vdifs-restore")
    ]
    commands = (
        [],
        ["mount"],
        ["umount"],
        ["import"],
        ["import-status"],
        ["checksum"],
        ["sr", "verify"],
        ["serve"],
        ["vdi", "snapshot"],
        ["vdi", "clone"],
    )
    for args in commands:
        helps.append(
            subprocess.run(
                [sys.executable, "-m", "vdifs", *args, "--help"], capture_output=True, text=True
            ).stdout
        )
    named = set(re.findall(r"`[^`]*?(--[a-z0-9-]+)", prose("guide.md"))) - OTHER_TOOLS
    assert named
    for option in sorted(named):
        assert any(re.search(rf"{option}\b", h) for h in helps), f"no {option} in any --help"


# -- running them ----------------------------------------------------------------------


@needs_fuse
@needs_tool("qemu-img")
@needs_tool("vhdimount")
@needs_tool("losetup")
@needs_tool("mkfs.ext4")
@pytest.mark.parametrize("doc", RUN)
def test_doc_runs(doc: str, scratch: Scratch) -> None:
    require_loop_device()
    rc, log, _where = scratch.run(doc)
    tail = "\n".join(log.splitlines()[-60:])
    assert rc == 0, f"{doc}: the shell commands failed (exit {rc}):\n{tail}"
    ran = set(re.findall(r"@@@ block (\S+)", log))
    expected = {b.where for b in blocks(doc) if b.info == "sh"}
    assert ran == expected and "@@@ done" in log, tail
