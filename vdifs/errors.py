"""One exception hierarchy for vdifs, and the errno each class means.

Every error a user can meet is a :class:`VdifsError`.  The FUSE adapter maps
them to ``FUSEError(exc.errno)`` in one place; the CLI prints ``str(exc)`` on
one line and exits with ``exc.exit_code`` (the table: :func:`exit_statuses`).
Anything that is not a
``VdifsError`` is a bug: the FUSE adapter logs it with its traceback and
answers EIO, so one bad request never kills the mount.
"""

from __future__ import annotations

import errno


class VdifsError(Exception):
    """Base class: a failure the user can understand and act on."""

    errno: int = errno.EIO
    exit_code: int = 1
    meaning = "unexpected error (a bug: run with --debug and report it)"


class NotFound(VdifsError):
    errno = errno.ENOENT
    exit_code = 3
    meaning = "not found"


class AlreadyExists(VdifsError):
    errno = errno.EEXIST
    exit_code = 4
    meaning = "already exists"


class ReadOnly(VdifsError):
    """Writing to a snapshot, or to a read-only mount."""

    errno = errno.EROFS
    exit_code = 5
    meaning = "read-only (a snapshot, or a read-only mount)"


class Busy(VdifsError):
    errno = errno.EBUSY
    exit_code = 6
    meaning = "busy (already mounted, an import in progress)"


class InvalidArgument(VdifsError):
    """A malformed request: a bad size, name or option."""

    errno = errno.EINVAL
    exit_code = 2
    meaning = "invalid argument or usage"


class NameTooLong(InvalidArgument):
    errno = errno.ENAMETOOLONG


class MalformedImage(InvalidArgument):
    """An uploaded image does not follow its format: truncated, corrupt, hostile."""


class TooLarge(VdifsError):
    """Beyond a format's limits or beyond the target disk."""

    errno = errno.EFBIG
    exit_code = 7
    meaning = "too large (beyond a format's or the disk's limits)"


class Unsupported(VdifsError):
    """A valid image that uses a feature vdifs cannot apply safely."""

    errno = errno.EOPNOTSUPP
    exit_code = 8
    meaning = "unsupported image feature"


class NoSpace(VdifsError):
    errno = errno.ENOSPC
    exit_code = 9
    meaning = "no space left in the SR"


class WrongBase(VdifsError):
    """A delta whose parent is not what the target holds."""

    errno = errno.EINVAL
    exit_code = 10
    meaning = "a delta does not apply onto the target's content"


class StorageError(VdifsError):
    """The SR itself is damaged or unreadable (a missing block object)."""

    errno = errno.EIO
    exit_code = 11
    meaning = "the SR is damaged (a missing block object)"


class PoolError(VdifsError):
    """A pool (XAPI) failed a request or could not be reached."""

    errno = errno.EIO
    exit_code = 12
    meaning = "the pool failed a request or could not be reached (the message says which)"


class AccessDenied(VdifsError):
    """A wrong password, or a certificate that does not verify."""

    errno = errno.EACCES
    exit_code = 13
    meaning = "access denied (a wrong password, or a certificate that does not verify)"


def exit_statuses() -> list[tuple[int, int, str]]:
    """``(exit status, errno, meaning)`` of every error class, by exit status: the one table
    behind ``vdifs --help``, docs/errors.md and the soak's expectations."""
    seen: dict[int, tuple[int, int, str]] = {}
    pending: list[type[VdifsError]] = [VdifsError]
    while pending:
        cls = pending.pop(0)
        seen.setdefault(cls.exit_code, (cls.exit_code, cls.errno, cls.meaning))
        pending += cls.__subclasses__()
    return sorted(seen.values())
