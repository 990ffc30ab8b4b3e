"""A snapshot's files' digests, in ``sha256sum``'s format: the SHA256SUMS files.

A snapshot's exports are the same bytes on every read and every mount, so
their digests are computed once, when first asked, and kept by the backend:
a copy made years later verifies with plain ``sha256sum -c``, without vdifs.
The size of a SHA256SUMS file is known without its digests (every line is 64
hex digits, two spaces, a name), so ``stat`` never computes one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from vdifs.exports import Export

HEX_DIGITS = 64
PIECE = 4 << 20


def sums_size(names: Sequence[str]) -> int:
    return sum(HEX_DIGITS + 2 + len(name.encode()) + 1 for name in names)


def sums_text(names: Sequence[str], digests: dict[str, str]) -> bytes:
    return "".join(f"{digests[name]}  {name}\n" for name in names).encode()


def file_digest(export: Export, progress: Callable[[int], None] | None = None) -> str:
    """sha256 of an export's bytes, read front to back (hashlib releases the GIL)."""
    digest = hashlib.sha256()
    offset = 0
    while offset < export.size:
        data = export.read(offset, PIECE)
        if not data:
            break
        digest.update(data)
        offset += len(data)
        if progress is not None:
            progress(len(data))
    return digest.hexdigest()
