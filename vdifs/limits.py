"""One limiter per purpose for blocking work that leaves the trio loop.

Separate budgets, so that one kind of work never starves another: four
uploads being hashed and stored at once must not hold up a reader whose bytes
are not in the page cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from vdifs.storage.backend import WouldBlock

T = TypeVar("T")

READS = trio.CapacityLimiter(4)
"""Reads that would wait for the disk (or the network): exports, live-disk fetches."""
UPLOADS = trio.CapacityLimiter(2)
"""Storing the writes of files in import/ (hashing, packs), truncating and abandoning them."""
APPLIES = trio.CapacityLimiter(2)
"""Applying a whole import at close, committing a live disk's buffered writes."""


async def nonblocking(fn: Callable[[bool], T]) -> T:
    """Run ``fn(nowait=True)`` on the loop; if it would block, ``fn(False)`` in a
    thread under READS: a read from the page cache costs no thread hop, any
    other exactly one (docs/dev-concurrency.md)."""
    try:
        return fn(True)
    except WouldBlock:
        return await trio.to_thread.run_sync(fn, False, limiter=READS)
