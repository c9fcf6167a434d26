"""What the process's allocator does with freed host memory during CPU training.

glibc's malloc hands large blocks (from 128 KiB, its threshold adapting up to 32 MiB)
straight to the system with mmap and returns them with munmap when freed, and trims the
top of its heap back to the system too. A training step allocates and frees the same
activation-sized tensors every step, so every step then faults every page of them back
in (measured effect in docs/performance.md). `keep_freed_memory` makes glibc keep freed memory in the heap
for reuse (the resident size then stays at the step's peak). jemalloc, tcmalloc and
mimalloc keep freed memory already; with one of them preloaded this changes nothing that
is used.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["keep_freed_memory"]

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap (and are reused); larger ones are still mapped.
MMAP_THRESHOLD = 1 << 30
# Free memory at the top of the heap is returned to the system only beyond this.
TRIM_THRESHOLD = (1 << 31) - 1
# glibc's environment settings of what keep_freed_memory sets (respected when present).
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_TUNABLES = ("mmap_threshold", "trim_threshold", "top_pad", "mmap_max")

_applied = False


def _user_tuned() -> bool:
    """Whether the environment already sets glibc's thresholds for freed memory."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return (any(k in os.environ for k in _ENV)
            or any(f"glibc.malloc.{t}" in tunables for t in _TUNABLES))


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks below 1 GiB in the heap for reuse instead of
    returning them to the system. Process-wide and idempotent; call it before the first
    large allocations. Returns True when the setting is in effect, False where it does
    not apply (not Linux with glibc) or the environment sets these thresholds itself
    (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_`,
    `MALLOC_MMAP_MAX_` or their `GLIBC_TUNABLES`), which are then left as they are."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or _user_tuned():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Older glibc caps the threshold at half its heap size: 32 MiB on 64-bit systems.
    if not any(mallopt(_M_MMAP_THRESHOLD, t) == 1 for t in (MMAP_THRESHOLD, 32 << 20)):
        return False
    if mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        log.warning("keep_freed_memory: glibc refused a trim threshold of %d bytes", TRIM_THRESHOLD)
        return False
    _applied = True
    return True
