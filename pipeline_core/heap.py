"""Giving the heap pages that batches freed back to the OS, once enough of them pile up.

glibc malloc keeps freed pages in its per-thread arenas, and batches of varying shapes rarely reuse them: without
trimming, the model process of a 2000-row embedding run grew to over 1 GiB. `malloc_trim(0)` hands the pages back,
but after every batch it cost 5-10% (the next batch faults them in again), so it runs only when the resident size
has grown by `slack` since the last trim: with 128 MiB it trimmed after about 40% of batches, at no cost measurable
on this machine's noise (benchmarks/RESULTS.md). Where there is no glibc (musl, macOS) or no /proc, it does nothing.
"""

from __future__ import annotations

import ctypes
import os

SLACK_BYTES = 128 << 20


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


def resident_bytes() -> int | None:
    """This process's resident set size, read from /proc (a few microseconds; no psutil needed)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    def __init__(self, slack_bytes: int = SLACK_BYTES):
        self.malloc_trim = _load_malloc_trim()
        self.slack = slack_bytes
        self.floor: int | None = None  # resident bytes right after the last trim
        self.trims = 0

    def after_batch(self) -> None:
        if self.malloc_trim is None:
            return
        resident = resident_bytes()
        if resident is None:
            return
        if self.floor is None or resident > self.floor + self.slack:
            self.malloc_trim(0)
            self.trims += 1
            self.floor = resident_bytes()
