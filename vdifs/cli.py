"""The ``vdifs`` command line.

Every command prints its result on stdout (a uuid alone, or JSON with
``--json``) and any error as one line on stderr, with the exit status of the
error's class (listed in ``vdifs --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from vdifs import __version__, malloc
from vdifs.errors import (
    InvalidArgument,
    NotFound,
    StorageError,
    Unsupported,
    VdifsError,
    exit_statuses,
)
from vdifs.fs.nodes import DeltasDir, VdiDir
from vdifs.model import VdiRecord
from vdifs.storage.backend import Backend
from vdifs.storage.local import default_sr_path
from vdifs.storage.open import SrSpec

log = logging.getLogger("vdifs")

EXIT_CODES = "exit status:\n  0  success\n" + "".join(
    f"{code:>3}  {meaning}\n" for code, _errno, meaning in exit_statuses()
)


_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"10G"`` -> 10 GiB.  Suffixes are binary; ``B``/``iB`` optional."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    suffix = s[-1:] if s[-1:] in _SIZE_SUFFIXES and s[-1:] else ""
    number = s[: -len(suffix)] if suffix else s
    try:
        value = int(number)
    except ValueError:
        raise InvalidArgument(f"invalid size {text!r}: use bytes or K/M/G/T (binary)") from None
    return value * _SIZE_SUFFIXES[suffix]


def tree_lines(
    roots: list[str], children: dict[str, list[str]], label: dict[str, str], current: str | None
) -> list[str]:
    """``virsh snapshot-list --tree`` style lines, current marked with ``*``."""
    lines: list[str] = []

    def walk(node: str, prefix: str, last: bool, top: bool) -> None:
        mark = "  *" if node == current else ""
        if top:
            lines.append(f"{label[node]}{mark}")
            child_prefix = ""
        else:
            lines.append(f"{prefix}{'└── ' if last else '├── '}{label[node]}{mark}")
            child_prefix = prefix + ("    " if last else "│   ")
        kids = children.get(node, [])
        for i, kid in enumerate(kids):
            walk(kid, child_prefix, i == len(kids) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return lines


def resolve_vdi(sr: Backend, key: str) -> VdiRecord:
    """A VDI by uuid, or by name when exactly one VDI has that name."""
    try:
        return sr.get_vdi(key)
    except NotFound:
        pass
    matches = [r for r in sr.list_vdis() if r.name_label == key]
    live = [r for r in matches if not r.is_a_snapshot]
    if len(live) == 1:
        return live[0]  # snapshots share their VDI's name: the VDI is meant
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFound(f"no VDI with uuid or name {key!r}")
    raise InvalidArgument(
        f"name {key!r} is ambiguous ({len(matches)} VDIs): use a uuid: "
        + ", ".join(r.uuid for r in matches)
    )


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


class Progress:
    """A one-line progress bar on a terminal; silent elsewhere."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.2 and done < self.total:
            return
        self.last = now
        frac = done / self.total
        rate = done / max(now - self.start, 1e-6)
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r[{bar:<30}] {frac:6.1%} {_human(done)} {_human(int(rate))}/s ")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


# -- commands -------------------------------------------------------------------


def cmd_vdi_create(sr: Backend, args: argparse.Namespace) -> None:
    record = sr.create_vdi(args.name, parse_size(args.size), args.description)
    print(record.uuid)


def cmd_vdi_list(sr: Backend, args: argparse.Namespace) -> None:
    records = sr.list_vdis()
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
        return
    print(f"{'UUID':36}  {'SIZE':>10}  {'USED':>10}  {'SNAP':4}  NAME")
    for r in records:
        print(
            f"{r.uuid:36}  {_human(r.virtual_size):>10}  {_human(r.physical_utilisation):>10}"
            f"  {'yes' if r.is_a_snapshot else '':4}  {r.name_label}"
        )


def cmd_vdi_show(sr: Backend, args: argparse.Namespace) -> None:
    print(json.dumps(resolve_vdi(sr, args.vdi).to_json(), indent=2))


def cmd_vdi_snapshot(sr: Backend, args: argparse.Namespace) -> None:
    print(sr.snapshot(resolve_vdi(sr, args.vdi).uuid, args.name, args.description).uuid)


def _print_tree(
    items: list[Any], current: str | None, live_label: str | None, as_json: bool, tree: bool
) -> None:
    """Shared by VDI and VM snapshot listings (records with uuid/name/parent)."""

    if as_json:
        print(json.dumps([i.to_json() for i in items], indent=2))
        return
    if not tree:
        print(f"{'UUID':36}  {'TIME':20}  {'CUR':3}  NAME")
        for i in items:
            mark = "*" if i.uuid == current else ""
            print(f"{i.uuid:36}  {i.snapshot_time or '':20}  {mark:3}  {i.name_label}")
        return
    uuids = {i.uuid for i in items}
    children: dict[str, list[str]] = {}
    label = {i.uuid: f"{i.name_label}  {i.snapshot_time}  {i.uuid}" for i in items}
    roots = []
    for i in items:
        if i.parent in uuids:
            children.setdefault(i.parent, []).append(i.uuid)
        else:
            roots.append(i.uuid)
    if live_label is not None:
        label["(live)"] = live_label
        if current is not None and current in uuids:
            children.setdefault(current, []).append("(live)")
        else:
            roots.append("(live)")
    for line in tree_lines(roots, children, label, current):
        print(line)


def cmd_vdi_snapshot_list(sr: Backend, args: argparse.Namespace) -> None:
    vdi = resolve_vdi(sr, args.vdi)
    snaps = [sr.get_vdi(u) for u in vdi.snapshots]
    live = None if vdi.is_a_snapshot else f"(live) {vdi.name_label}"
    _print_tree(snaps, vdi.current, live, args.json, args.tree)


def cmd_vdi_snapshot_delete(sr: Backend, args: argparse.Namespace) -> None:
    snap = resolve_vdi(sr, args.snapshot)
    for uuid in sr.delete_snapshot(
        snap.uuid, children=args.children, only_children=args.children_only
    ):
        print(uuid)


def cmd_vdi_data_destroy(sr: Backend, args: argparse.Namespace) -> None:
    sr.data_destroy(resolve_vdi(sr, args.snapshot).uuid)


def cmd_vm_create(sr: Backend, args: argparse.Namespace) -> None:
    metadata = ""
    if args.metadata:
        metadata = sys.stdin.read() if args.metadata == "-" else Path(args.metadata).read_text()
    print(sr.vms.create(args.name, args.description, metadata).uuid)


def cmd_vm_attach(sr: Backend, args: argparse.Namespace) -> None:
    vms = sr.vms
    vms.attach(
        vms.resolve(args.vm, snapshot=False).uuid, resolve_vdi(sr, args.vdi).uuid, args.device
    )


def cmd_vm_detach(sr: Backend, args: argparse.Namespace) -> None:
    vms = sr.vms
    vms.detach(vms.resolve(args.vm, snapshot=False).uuid, args.device)


def cmd_vm_list(sr: Backend, args: argparse.Namespace) -> None:
    records = sr.vms.all(snapshots=False)
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
        return
    print(f"{'UUID':36}  {'DISKS':5}  {'SNAPS':5}  NAME")
    for r in records:
        print(f"{r.uuid:36}  {len(r.disks):5}  {len(r.snapshots):5}  {r.name_label}")


def cmd_vm_show(sr: Backend, args: argparse.Namespace) -> None:
    print(json.dumps(sr.vms.resolve(args.vm).to_json(), indent=2))


def cmd_vm_destroy(sr: Backend, args: argparse.Namespace) -> None:
    vms = sr.vms
    vms.destroy(vms.resolve(args.vm, snapshot=False).uuid)


def cmd_vm_snapshot(sr: Backend, args: argparse.Namespace) -> None:
    vms = sr.vms
    vm = vms.resolve(args.vm, snapshot=False)
    print(vms.snapshot(vm.uuid, args.name, args.description).uuid)


def cmd_vm_snapshot_list(sr: Backend, args: argparse.Namespace) -> None:
    vms = sr.vms
    vm = vms.resolve(args.vm, snapshot=False)
    snaps = [vms.get(u) for u in vm.snapshots]
    _print_tree(snaps, vm.current, f"(now) {vm.name_label}", args.json, args.tree)


def cmd_vm_snapshot_current(sr: Backend, args: argparse.Namespace) -> None:
    vms = sr.vms
    vm = vms.resolve(args.vm, snapshot=False)
    if vm.current is None:
        raise NotFound(f"VM {vm.uuid} has no current snapshot")
    print(vm.current)


def cmd_vm_revert(sr: Backend, args: argparse.Namespace) -> None:
    vms = sr.vms
    vm = vms.revert(vms.resolve(args.snapshot, snapshot=True).uuid)
    for device, vdi in sorted(vm.disks.items()):
        print(f"{device} {vdi}")


def cmd_vm_snapshot_delete(sr: Backend, args: argparse.Namespace) -> None:
    vms = sr.vms
    snap = vms.resolve(args.snapshot, snapshot=True)
    for uuid in vms.delete_snapshot(
        snap.uuid, children=args.children, only_children=args.children_only
    ):
        print(uuid)


def cmd_vdi_clone(sr: Backend, args: argparse.Namespace) -> None:
    print(sr.clone(resolve_vdi(sr, args.vdi).uuid, args.name).uuid)


def cmd_vdi_destroy(sr: Backend, args: argparse.Namespace) -> None:
    sr.destroy(resolve_vdi(sr, args.vdi).uuid)


def cmd_vdi_resize(sr: Backend, args: argparse.Namespace) -> None:
    record = sr.resize(resolve_vdi(sr, args.vdi).uuid, parse_size(args.size))
    print(record.virtual_size)


def cmd_vdi_rename(sr: Backend, args: argparse.Namespace) -> None:
    sr.set_name(resolve_vdi(sr, args.vdi).uuid, args.name)


def cmd_checksum(sr: Backend, args: argparse.Namespace) -> None:
    """Compute and keep a snapshot's digests ahead of time; print its SHA256SUMS files."""
    from vdifs.fs.nodes import ChecksumsFile
    from vdifs.fs.tree import Tree

    record = resolve_vdi(sr, args.snapshot)
    if not record.is_a_snapshot or record.data_destroyed:
        raise InvalidArgument(
            f"{record.uuid} is not a snapshot with data: only snapshots' files never change"
        )
    tree = Tree(sr)
    files = [ChecksumsFile(record.uuid), ChecksumsFile(record.uuid, deltas=True)]
    files = [f for f in files if tree.checksum_names(f)]
    progress: Callable[[int], None] | None = None
    if args.progress and sys.stderr.isatty():
        total = 0
        for f in files:
            for name in tree.checksum_names(f):
                node = tree.lookup(
                    DeltasDir(record.uuid) if f.deltas else VdiDir(record.uuid), name
                )
                total += tree.attr(node).size
        bar, done = Progress(total, sys.stderr), [0]

        def progress(n: int) -> None:
            done[0] += n
            bar(done[0])

    for f in files:
        text = tree.checksums(f, progress).decode()
        prefix = "delta-from/" if f.deltas else ""
        sys.stdout.write("".join(f"{line[:66]}{prefix}{line[66:]}\n" for line in text.splitlines()))


def cmd_export(sr: Backend, args: argparse.Namespace) -> None:
    from vdifs.exports import DiskState, Export

    state = DiskState(*sr.state(resolve_vdi(sr, args.vdi).uuid))
    base = DiskState(*sr.state(resolve_vdi(sr, args.base).uuid)) if args.base else None
    export = Export(sr, state, args.format, base)
    progress: Callable[[int], None] | None = None
    if args.progress and sys.stderr.isatty():
        progress = Progress(export.size, sys.stderr)
    if args.file == "-":
        out = sys.stdout.buffer
        export.copy_to(out.write, progress)
        out.flush()
        return
    target = Path(args.file)
    tmp = target.with_name(f".{target.name}.partial")
    try:
        with open(tmp, "wb") as f:
            export.copy_to(f.write, progress)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cmd_import(sr: Backend, args: argparse.Namespace) -> None:
    from vdifs.imports.engine import IMAGE_EXTENSIONS, import_file

    path = Path(args.file)
    fmt = args.format
    if fmt == "auto":
        guessed = IMAGE_EXTENSIONS.get(path.suffix.lower())
        if guessed is None:
            raise InvalidArgument(
                f"cannot tell the format of {path.name} from its extension (.vhd, .qcow2, .raw,"
                " .img); vdifs never guesses from content: pass --format"
            )
        fmt = guessed
    target = None if args.create else resolve_vdi(sr, args.vdi).uuid
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        progress = Progress(size, sys.stderr) if args.progress and sys.stderr.isatty() else None
        result = import_file(
            sr,
            fd,
            path.name,
            fmt,
            target=target,
            new_name=args.vdi if args.create else None,
            force=args.force,
            progress=progress,
        )
    finally:
        os.close(fd)
    print(result.target)


def cmd_import_status(sr: Backend, args: argparse.Namespace) -> None:
    items = sr.imports.recent(args.limit)
    if args.json:
        print(json.dumps(items, indent=2))
        return
    for item in items:
        outcome = item["state"]
        if item["error"]:
            outcome += f" ({item.get('errno_name', '')}: {item['error']})"
        target = item["target"] or "(a new VDI)"
        print(f"{item['id']:>5}  {item['started']}  {item['name']} -> {target}  {outcome}")


def cmd_mount(sr: Backend | None, args: argparse.Namespace) -> None:
    from vdifs.fs import mount

    if args.foreground:
        options = mount.parse_options(args.options)
        mount.serve_foreground(args.spec, Path(args.mountpoint), options)
    else:
        mount.mount_background(args.spec, Path(args.mountpoint), args.options, args.debug)


def cmd_serve(sr: Backend, args: argparse.Namespace) -> None:
    from vdifs.serve import serve_forever
    from vdifs.serve_auth import Credentials

    credentials = Credentials.load(args.token_file, args.htpasswd)
    if args.cert is None:
        print("vdifs: serving plain HTTP: pass --cert and --key for HTTPS", file=sys.stderr)
    logging.getLogger().setLevel(logging.DEBUG if args.debug else logging.INFO)

    def ready(port: int) -> None:
        print(f"listening on port {port}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        serve_forever(sr, args.listen, credentials, cert=args.cert, key=args.key, ready=ready)


def cmd_umount(sr: Backend | None, args: argparse.Namespace) -> None:
    from vdifs.fs import mount

    mount.unmount(Path(args.mountpoint), lazy=args.lazy)


def cmd_sr_info(sr: Backend, args: argparse.Namespace) -> None:
    records = sr.list_vdis()
    info = {
        **sr.info(),
        "vdis": sum(not r.is_a_snapshot for r in records),
        "snapshots": sum(r.is_a_snapshot for r in records),
    }
    print(json.dumps(info, indent=2))


def cmd_sr_gc(sr: Backend, args: argparse.Namespace) -> None:
    if not sr.capabilities.garbage_collection:
        raise Unsupported(f"{sr.description} reclaims unused data by itself")
    objects, freed = sr.garbage_collect()
    print(f"removed {objects} unused data object(s), {_human(freed)} freed")


_DAMAGE = {
    "corrupt": "its content does not match its digest",
    "unreadable": "the disk failed to read it (EIO)",
    "missing": "its bytes are gone (pack file missing or truncated)",
}


def cmd_sr_verify(sr: Backend, args: argparse.Namespace) -> None:
    verify = getattr(sr, "verify", None)  # the embedded SR's: a pool's storage is XAPI's to check
    if verify is None:
        raise Unsupported(f"{sr.description} has no chunk digests for vdifs to check")
    uuids = [resolve_vdi(sr, key).uuid for key in args.vdis]
    bar: Progress | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(total, sys.stderr)
        bar(done)

    report = verify(uuids, progress if args.progress and sys.stderr.isatty() else None)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for chunk in report.damaged:
            print(
                f"damaged chunk {chunk.chunk_id:016x}: {_DAMAGE.get(chunk.reason, chunk.reason)}"
                f" (packs/{chunk.pack:08x}.pack at byte {chunk.offset})"
            )
            for use in chunk.uses:
                kind = "snapshot" if use.is_a_snapshot else "VDI"
                ranges = ", ".join(f"{start}-{end - 1}" for start, end in use.ranges)
                print(f"  {kind:8} {use.uuid}  bytes {ranges}  {use.name_label}")
            if not chunk.uses:
                print("  used by no VDI or snapshot (a write of the same content would reuse it)")
        if report.unverifiable:
            print(f"{report.unverifiable} chunk(s) have no recorded digest: not checked")
        print(
            f"checked {report.chunks} chunk(s) ({_human(report.bytes)}) in {report.packs}"
            f" pack(s) in {report.seconds:.1f} s: {len(report.damaged)} damaged"
        )
    if report.damaged:
        raise StorageError(
            f"the SR is damaged: {len(report.damaged)} of {report.chunks} chunk(s) checked"
            " failed (listed on stdout)"
        )


def cmd_demo(sr: Backend, args: argparse.Namespace) -> None:
    """Fill an empty SR with a small demo disk and two snapshots, then mount it."""
    from vdifs.fs import mount

    if not sr.list_vdis():
        record = sr.create_vdi("demo-disk", 64 << 20, "a demo disk made by 'vdifs demo'")
        with sr.writer(record.uuid) as w:
            for chunk in range(0, 1024, 7):
                w.write_chunk(chunk, (f"vdifs demo chunk {chunk}\n" * 2000).encode()[:65536])
            w.commit()
        sr.snapshot(record.uuid, "demo-monday")
        with sr.writer(record.uuid) as w:
            for chunk in range(3, 1024, 50):
                w.write_chunk(chunk, (f"changed on tuesday {chunk}\n" * 3000).encode()[:65536])
            w.commit()
        sr.snapshot(record.uuid, "demo-tuesday")
    mountpoint = Path(args.mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    if not os.path.ismount(mountpoint):
        mount.mount_background(args.spec, mountpoint, None, args.debug)
    print(
        f"vdifs is mounted on {mountpoint} (SR {args.spec.text}); try: ls -l {mountpoint}/vdis/*/"
    )
    print(f"unmount with: vdifs umount {mountpoint}")


# -- the parser -------------------------------------------------------------------


def add_delete_scope(parser: argparse.ArgumentParser) -> None:
    """--children / --children-only, as libvirt's snapshot-delete has them."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--children", action="store_true", help="also delete its descendants")
    group.add_argument("--children-only", action="store_true", help="delete only its descendants")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdifs",
        description="Virtual disks, snapshots and deltas as plain files (FUSE).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vdifs {__version__}")
    parser.add_argument(
        "--sr",
        default=None,
        help="SR directory (default: $VDIFS_SR, else ~/.local/share/vdifs/sr),"
        " or a pool: xapi://user@host[:port][/?sr=SR-UUID]",
    )
    parser.add_argument(
        "--ca",
        type=Path,
        help="a pool's certificate (or its CA) in PEM, when the system's CAs do not vouch for it",
    )
    parser.add_argument(
        "--password-file",
        type=Path,
        help="a file whose first line is the pool's password (else $VDIFS_XAPI_PASSWORD)",
    )
    parser.add_argument("--debug", action="store_true", help="log debugging detail to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        parent: Any, name: str, fn: Callable[..., None], help_text: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        return p

    vdi = sub.add_parser("vdi", help="create, list, snapshot, clone and destroy VDIs")
    vdi_sub = vdi.add_subparsers(dest="vdi_command", required=True, metavar="ACTION")
    p = add(vdi_sub, "create", cmd_vdi_create, "create an empty VDI; prints its uuid")
    p.add_argument("name", help="name_label")
    p.add_argument("--size", required=True, help="virtual size: bytes or K/M/G/T (binary)")
    p.add_argument("--description", default="", help="name_description")
    p = add(vdi_sub, "list", cmd_vdi_list, "list VDIs and snapshots")
    p.add_argument("--json", action="store_true", help="a JSON array of the records")
    p = add(vdi_sub, "show", cmd_vdi_show, "one VDI's record as JSON")
    p.add_argument("vdi", help="uuid (or an unambiguous name)")
    p = add(vdi_sub, "snapshot", cmd_vdi_snapshot, "snapshot a VDI; prints the snapshot's uuid")
    p.add_argument("vdi", help="uuid (or an unambiguous name)")
    p.add_argument("--name", help="the snapshot's name_label (default: the VDI's)")
    p.add_argument("--description", help="the snapshot's name_description")
    p = add(vdi_sub, "snapshot-list", cmd_vdi_snapshot_list, "a VDI's snapshots")
    p.add_argument("vdi", help="uuid (or an unambiguous name)")
    p.add_argument("--tree", action="store_true", help="as a tree, current marked with *")
    p.add_argument("--json", action="store_true", help="a JSON array of the records")
    p = add(
        vdi_sub,
        "snapshot-delete",
        cmd_vdi_snapshot_delete,
        "delete a snapshot (its children are re-parented); prints what was deleted",
    )
    p.add_argument("snapshot", help="uuid (or an unambiguous name)")
    add_delete_scope(p)
    p = add(
        vdi_sub,
        "data-destroy",
        cmd_vdi_data_destroy,
        "free a snapshot's data but keep it as a delta base (XAPI VDI.data_destroy)",
    )
    p.add_argument("snapshot", help="uuid (or an unambiguous name)")
    p = add(vdi_sub, "clone", cmd_vdi_clone, "a writable copy of a VDI; prints its uuid")
    p.add_argument("vdi", help="uuid (or an unambiguous name)")
    p.add_argument("--name", help="the clone's name_label (default: the source's)")
    p = add(vdi_sub, "destroy", cmd_vdi_destroy, "destroy a VDI (its snapshots stay)")
    p.add_argument("vdi", help="uuid")
    p = add(
        vdi_sub,
        "resize",
        cmd_vdi_resize,
        "grow a VDI (XAPI VDI.resize); its snapshots keep their size; prints the new size",
    )
    p.add_argument("vdi", help="uuid (or an unambiguous name)")
    p.add_argument("size", help="the new virtual size: bytes or K/M/G/T (binary), not smaller")
    p = add(vdi_sub, "rename", cmd_vdi_rename, "set a VDI's name_label")
    p.add_argument("vdi", help="uuid (or an unambiguous name)")
    p.add_argument("name", help="new name_label")

    vm = sub.add_parser("vm", help="VMs: disks at devices, coherent snapshots, revert")
    vm_sub = vm.add_subparsers(dest="vm_command", required=True, metavar="ACTION")
    p = add(vm_sub, "create", cmd_vm_create, "create a VM; prints its uuid")
    p.add_argument("name")
    p.add_argument("--description", default="")
    p.add_argument("--metadata", help="a file (or - for stdin) holding the VM's config document")
    p = add(vm_sub, "attach", cmd_vm_attach, "attach a VDI at a device name")
    p.add_argument("vm")
    p.add_argument("vdi")
    p.add_argument("--device", required=True, help="xvda, xvdb, ...")
    p = add(vm_sub, "detach", cmd_vm_detach, "detach the disk at a device name (the VDI stays)")
    p.add_argument("vm")
    p.add_argument("device")
    p = add(vm_sub, "list", cmd_vm_list, "list VMs")
    p.add_argument("--json", action="store_true")
    p = add(vm_sub, "show", cmd_vm_show, "a VM's or VM snapshot's record as JSON")
    p.add_argument("vm")
    p = add(vm_sub, "destroy", cmd_vm_destroy, "forget a VM (its VDIs and snapshots stay)")
    p.add_argument("vm")
    p = add(
        vm_sub,
        "snapshot",
        cmd_vm_snapshot,
        "snapshot the VM's metadata and all its disks in one transaction; prints its uuid",
    )
    p.add_argument("vm")
    p.add_argument("--name", help="default: the UTC time")
    p.add_argument("--description", default="")
    p = add(vm_sub, "snapshot-list", cmd_vm_snapshot_list, "a VM's snapshots")
    p.add_argument("vm")
    p.add_argument("--tree", action="store_true", help="as a tree, current marked with *")
    p.add_argument("--json", action="store_true")
    p = add(vm_sub, "snapshot-current", cmd_vm_snapshot_current, "the VM's current snapshot")
    p.add_argument("vm")
    p = add(
        vm_sub,
        "revert",
        cmd_vm_revert,
        "replace the VM's disks with clones of a snapshot's disks; prints device and new VDI",
    )
    p.add_argument("snapshot", help="VM snapshot uuid (or an unambiguous name)")
    p = add(vm_sub, "snapshot-delete", cmd_vm_snapshot_delete, "delete a VM snapshot")
    p.add_argument("snapshot")
    add_delete_scope(p)

    p = add(sub, "export", cmd_export, "write a VDI as raw, VHD or qcow2 (xe vdi-export)")
    p.add_argument("vdi", help="uuid (or an unambiguous name)")
    p.add_argument("file", help="output file, or - for stdout")
    p.add_argument("--format", choices=("raw", "vhd", "qcow2"), default="raw")
    p.add_argument("--base", help="export only what changed since this snapshot (a delta)")
    p.add_argument("--progress", action="store_true", help="show a progress bar on a terminal")

    p = add(
        sub,
        "checksum",
        cmd_checksum,
        "compute and keep a snapshot's sha256 digests (its SHA256SUMS files); print them",
    )
    p.add_argument("snapshot", help="uuid (or an unambiguous name)")
    p.add_argument("--progress", action="store_true", help="show a progress bar on a terminal")

    p = add(sub, "import", cmd_import, "apply a VHD, qcow2 or raw file to a VDI (xe vdi-import)")
    p.add_argument("vdi", help="target uuid (or unambiguous name); with --create, the new name")
    p.add_argument("file", help="the image file")
    p.add_argument(
        "--format",
        choices=("auto", "raw", "vhd", "qcow2"),
        default="auto",
        help="auto (default) takes the file's extension; content is never guessed",
    )
    p.add_argument("--create", action="store_true", help="create a new VDI sized from the image")
    p.add_argument(
        "--force",
        action="store_true",
        help="apply a delta even if the target does not hold the base it names",
    )
    p.add_argument("--progress", action="store_true", help="show a progress bar on a terminal")
    p = add(sub, "import-status", cmd_import_status, "the outcome of recent imports")
    p.add_argument("--json", action="store_true", help="a JSON array, newest first")
    p.add_argument("--limit", type=int, default=20, help="how many (default 20)")

    p = add(sub, "mount", cmd_mount, "mount the SR's tree on MOUNTPOINT")
    p.add_argument("mountpoint")
    p.add_argument("--foreground", "-f", action="store_true", help="serve in the foreground")
    p.add_argument(
        "-o",
        dest="options",
        metavar="OPTIONS",
        help="comma-separated: ro, allow_other, allow_root, auto_unmount, debug,"
        " snapshot_admin, direct_io (images bypass the page cache: fastest for cp/qemu-img)",
    )
    p = add(
        sub,
        "serve",
        cmd_serve,
        "serve XAPI's export_raw_vdi/import_raw_vdi URLs and the tree's files over HTTP(S)",
    )
    p.add_argument("--listen", required=True, help="ADDRESS:PORT (port 0: any free one)")
    p.add_argument("--cert", type=Path, help="TLS certificate chain (PEM): serve HTTPS")
    p.add_argument("--key", type=Path, help="its private key (PEM)")
    p.add_argument("--token-file", type=Path, help="a file of tokens, one per line")
    p.add_argument("--htpasswd", type=Path, help="an Apache htpasswd file of users")
    p = add(sub, "umount", cmd_umount, "unmount a vdifs mount")
    p.add_argument("mountpoint")
    p.add_argument("--lazy", "-z", action="store_true", help="detach even if busy")

    sr_parser = sub.add_parser("sr", help="SR housekeeping")
    sr_sub = sr_parser.add_subparsers(dest="sr_command", required=True, metavar="ACTION")
    add(sr_sub, "info", cmd_sr_info, "summary of the SR as JSON")
    add(sr_sub, "gc", cmd_sr_gc, "free data no VDI or snapshot uses any more")
    p = add(
        sr_sub,
        "verify",
        cmd_sr_verify,
        "re-read stored data and check it against its digests; list what damage affects",
    )
    p.add_argument(
        "vdis", nargs="*", metavar="UUID", help="check only the data these VDIs or snapshots use"
    )
    p.add_argument("--progress", action="store_true", help="show a progress bar on a terminal")
    p.add_argument("--json", action="store_true", help="the report as JSON")

    p = add(sub, "demo", cmd_demo, "create a demo disk (if the SR is empty) and mount it")
    p.add_argument("--mountpoint", default="/mnt/vdifs")
    return parser


NEEDS_NO_SR = {cmd_mount, cmd_umount}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    malloc.tune()  # imports and reads allocate megabyte buffers: keep them (see the module)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "mount" and args.foreground:
        logging.getLogger().setLevel(logging.DEBUG if args.debug else logging.INFO)
    try:
        args.spec = SrSpec(str(args.sr or default_sr_path()), args.ca, args.password_file)
        if args.fn in NEEDS_NO_SR:
            args.fn(None, args)
        else:
            sr = args.spec.open()
            try:
                args.fn(sr, args)
            finally:
                sr.close()
    except VdifsError as exc:
        print(f"vdifs: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:
        print("vdifs: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        print(f"vdifs: {exc}", file=sys.stderr)
        return 1
    return 0
