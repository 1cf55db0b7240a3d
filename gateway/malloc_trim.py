"""Give memory the allocator holds but no longer uses back to the OS, periodically (glibc only).

A gateway's large allocations are request and response bodies: a long-context call carries
hundreds of KiB of prompt text. After a busy minute they are freed, but glibc's malloc keeps the
freed pages in its heaps (its mmap threshold also rises after the first large free, so later large
bodies come from the heap too). RSS then follows the highest in-flight volume seen so far rather
than what is live: measured on a soak, Python's live objects at idle were back to their size at
minute 1 while the process still held tens of MiB that one `malloc_trim(0)` returned
(docs/benchmarks.md, Soak run 3). Trimming every `PYTHIA_MALLOC_TRIM_INTERVAL_S` keeps RSS close
to what is in use; on a C library without `malloc_trim` (musl, macOS) this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

from gateway.tasks import PeriodicTask

log = logging.getLogger("pythia.malloc_trim")


def find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim(pad)`, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return,unused-ignore]


class MallocTrimmer:
    """Calls `malloc_trim(0)` every `interval_s` seconds (0 = never)."""

    def __init__(self, interval_s: float, trim: Callable[[int], int] | None = None) -> None:
        self.interval_s = interval_s
        self.trim = trim if trim is not None else find_malloc_trim()
        self.trims = 0
        self._periodic = PeriodicTask("pythia-malloc-trim", interval_s, self._trim_in_thread, log)

    @property
    def active(self) -> bool:
        return self.interval_s > 0 and self.trim is not None

    def trim_now(self) -> bool:
        """One trim; True when the allocator released memory."""
        if self.trim is None:
            return False
        self.trims += 1
        return bool(self.trim(0))

    async def start(self) -> None:
        if self.active:
            self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def _trim_in_thread(self) -> None:
        await asyncio.to_thread(self.trim_now)  # ctypes drops the GIL: the loop keeps serving
