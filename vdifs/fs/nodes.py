"""The kinds of entry in the tree, one small frozen dataclass each.

A node names an entry by what it shows, never by its path, so the adapter can
give each one a stable inode (nodes are hashable and compare by value).  A
directory that appears at two paths gets two nodes: a snapshot's folder under
``vdis/`` (:class:`VdiDir`) and under its VDI's ``snapshots/`` in admin mode
(:class:`SnapshotView`), because Linux keeps one dentry per directory inode.
"""

from __future__ import annotations

from dataclasses import dataclass

# -- directories -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Root:
    pass


@dataclass(frozen=True, slots=True)
class VdisDir:
    """``vdis/``"""


@dataclass(frozen=True, slots=True)
class VmsDir:
    """``vms/``"""


@dataclass(frozen=True, slots=True)
class ByNameDir:
    """``by-name/``"""


@dataclass(frozen=True, slots=True)
class ImportDir:
    """``import/``"""


@dataclass(frozen=True, slots=True)
class StatusDir:
    """``import/.status/``"""


@dataclass(frozen=True, slots=True)
class VdiDir:
    """``vdis/<uuid>/``"""

    uuid: str


@dataclass(frozen=True, slots=True)
class SnapshotView:
    """``vdis/<owner>/snapshots/<name>/`` with ``-o snapshot_admin``: snapshot ``snap``."""

    owner: str
    snap: str


@dataclass(frozen=True, slots=True)
class DeltasDir:
    """``delta-from/`` of a VDI; ``view``: the one inside a :class:`SnapshotView`."""

    uuid: str
    view: bool = False


@dataclass(frozen=True, slots=True)
class SnapshotsDir:
    """``vdis/<vdi>/snapshots/``"""

    vdi: str


@dataclass(frozen=True, slots=True)
class PartitionsDir:
    """``vdis/<uuid>/partitions/``"""

    uuid: str
    view: bool = False


@dataclass(frozen=True, slots=True)
class LvmDir:
    """``vdis/<uuid>/lvm/``"""

    uuid: str
    view: bool = False


@dataclass(frozen=True, slots=True)
class VgDir:
    """``vdis/<uuid>/lvm/<vg>/``"""

    uuid: str
    vg: str


@dataclass(frozen=True, slots=True)
class VmDir:
    uuid: str


@dataclass(frozen=True, slots=True)
class VmDisksDir:
    vm: str


@dataclass(frozen=True, slots=True)
class VmSnapshotsDir:
    vm: str


@dataclass(frozen=True, slots=True)
class VmSnapshotDir:
    vm: str
    snap: str


@dataclass(frozen=True, slots=True)
class VmSnapshotDisksDir:
    snap: str


# -- symbolic links --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NameLink:
    """``by-name/<name>``"""

    name: str


@dataclass(frozen=True, slots=True)
class SnapshotLink:
    """``vdis/<vdi>/snapshots/<name>`` (without snapshot_admin)"""

    vdi: str
    snap: str


@dataclass(frozen=True, slots=True)
class CurrentLink:
    """``vdis/<vdi>/snapshots/current``"""

    vdi: str


@dataclass(frozen=True, slots=True)
class VmDiskLink:
    vm: str
    device: str


@dataclass(frozen=True, slots=True)
class VmSnapshotDiskLink:
    snap: str
    device: str


@dataclass(frozen=True, slots=True)
class VmCurrentLink:
    vm: str


# -- files -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChecksumsFile:
    """A snapshot's ``SHA256SUMS`` (its images), or its ``delta-from/SHA256SUMS``."""

    uuid: str
    deltas: bool = False


@dataclass(frozen=True, slots=True)
class InfoFile:
    """``vdis/<uuid>/info.json``"""

    uuid: str


@dataclass(frozen=True, slots=True)
class StatusFile:
    """``import/.status/<name>.json``"""

    name: str


@dataclass(frozen=True, slots=True)
class VmInfoFile:
    uuid: str


@dataclass(frozen=True, slots=True)
class VmSnapshotInfoFile:
    uuid: str


@dataclass(frozen=True, slots=True)
class VmSnapshotXml:
    uuid: str


@dataclass(frozen=True, slots=True)
class RawImage:
    uuid: str


@dataclass(frozen=True, slots=True)
class FullImage:
    uuid: str
    fmt: str


@dataclass(frozen=True, slots=True)
class DeltaImage:
    uuid: str
    base: str
    fmt: str


@dataclass(frozen=True, slots=True)
class PartitionImage:
    """``partitions/p<N>.img``: the partition's bytes of raw.img."""

    uuid: str
    name: str


@dataclass(frozen=True, slots=True)
class LvImage:
    """``lvm/<vg>/<lv>.img``: a logical volume's bytes, through its extents."""

    uuid: str
    vg: str
    name: str


@dataclass(frozen=True, slots=True)
class PartitionTableFile:
    """``partitions/table.json``"""

    uuid: str


@dataclass(frozen=True, slots=True)
class LvmNotesFile:
    """``lvm/notes.txt``: what was found and not mapped, and why."""

    uuid: str


@dataclass(frozen=True, slots=True)
class VgMetadataFile:
    """``lvm/<vg>/metadata.txt``: the volume group's metadata as found."""

    uuid: str
    vg: str


@dataclass(frozen=True, slots=True)
class UploadFile:
    """``import/<name>``"""

    name: str


Dir = (
    Root
    | VdisDir
    | VmsDir
    | ByNameDir
    | ImportDir
    | StatusDir
    | VdiDir
    | SnapshotView
    | DeltasDir
    | SnapshotsDir
    | PartitionsDir
    | LvmDir
    | VgDir
    | VmDir
    | VmDisksDir
    | VmSnapshotsDir
    | VmSnapshotDir
    | VmSnapshotDisksDir
)
Link = NameLink | SnapshotLink | CurrentLink | VmDiskLink | VmSnapshotDiskLink | VmCurrentLink
Generated = (
    InfoFile
    | StatusFile
    | VmInfoFile
    | VmSnapshotInfoFile
    | VmSnapshotXml
    | PartitionTableFile
    | LvmNotesFile
    | VgMetadataFile
)
Volume = PartitionImage | LvImage
Image = RawImage | FullImage | DeltaImage | PartitionImage | LvImage
VolumeNode = (
    PartitionsDir | LvmDir | VgDir | Volume | PartitionTableFile | LvmNotesFile | VgMetadataFile
)
Node = Dir | Link | Generated | Image | UploadFile | ChecksumsFile

ROOT = Root()
VDIS = VdisDir()
VMS = VmsDir()
BY_NAME = ByNameDir()
IMPORT = ImportDir()
STATUS_DIR = StatusDir()
PRIVATE_DIRS = (ImportDir, StatusDir)
