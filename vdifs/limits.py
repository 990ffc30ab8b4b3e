"""One limiter per purpose for blocking work that leaves the trio loop.

Separate budgets, so that one kind of work never starves another: four
uploads being hashed and stored at once must not hold up a reader whose bytes
are not in the page cache.
"""

from __future__ import annotations

import trio

READS = trio.CapacityLimiter(4)
"""Reads that would wait for the disk (or the network): exports, live-disk fetches."""
UPLOADS = trio.CapacityLimiter(2)
"""Storing the writes of files in import/ (hashing, packs), truncating and abandoning them."""
APPLIES = trio.CapacityLimiter(2)
"""Applying a whole import at close, committing a live disk's buffered writes."""
