"""The data path's megabyte buffers are reused, not faulted in again and again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from vdifs import malloc

# Eight 1 MiB buffers at a time, as a write pipeline holds them, freed together.
CHURN = """
import resource, sys
from vdifs import malloc
if sys.argv[1] == "tuned":
    assert malloc.tune()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    buffers = [b"x" * (1 << 20) for _ in range(8)]
    del buffers
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    # Without the caller's MALLOC_* settings: both runs start from glibc's defaults.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, env=env
    )
    return int(out.stdout)


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the C library is not glibc: no mallopt to tune"
)
def test_tuned_malloc_keeps_freed_buffers() -> None:
    default, tuned = page_faults("default"), page_faults("tuned")
    # Untuned, each round trims the heap and faults its 8 MiB in again
    # (50 x 2048 pages); tuned, the first round's pages are reused.
    assert tuned < 4096 < default


def test_the_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert malloc.tune() is False
