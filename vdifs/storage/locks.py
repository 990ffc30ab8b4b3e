"""The one-import-per-target lock, as a flock on a file named by the target."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from vdifs.errors import Busy


def import_lock_fd(directory: Path, key: str) -> int:
    """A descriptor holding the lock of ``key`` (a VDI uuid, or ``new-<name>``); closing
    it releases the lock. Busy if another process or descriptor holds it."""
    # Hashed: a key may be a VDI name of up to 255 bytes, longer than a file name allows.
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    fd = os.open(directory / f"{digest}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(f"an import into {key} is already in progress") from None
    return fd
