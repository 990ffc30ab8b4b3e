"""vdifs: virtual disks, snapshots and deltas as plain files."""

__version__ = "0.1.0"
