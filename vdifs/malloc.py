"""glibc's malloc, told to keep the megabyte buffers of the data path.

Every FUSE write arrives as a new 1 MiB ``bytes``, and every image read
fills a new ``bytearray`` of up to 1 MiB.  With glibc's defaults the
thresholds adapt: such buffers come from the heap, and once a few of them
are freed together the heap's top is trimmed (given back to the kernel) and
grown again for the next ones, so every megabyte is faulted in afresh.  A
cp of a 570 MB VHD into ``import/`` took 66,000 page faults in the daemon
(0.2 s of system time here, far more on VMs that reclaim a guest's freed
memory, where re-faulting runs at about 250 MB/s); with fixed thresholds it
takes 6,300.  Freed memory up to TRIM_THRESHOLD stays in the process for
reuse, which bounds what this costs.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20  # buffers below this come from the heap, and are reused
TRIM_THRESHOLD = 16 << 20  # free heap kept at the top: a write pipeline's worth and more


def tune() -> bool:
    """Fix glibc's thresholds, unless the environment sets them; False if not glibc."""
    if "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False  # the administrator's choice wins
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
