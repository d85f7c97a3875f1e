"""Keep freed memory inside the process on CPU training (glibc's allocator).

By default glibc hands large freed blocks back to the kernel (``munmap`` or a trim of the
heap), so the next step's tensors of the same sizes come back as fresh pages, each one a
page fault that the kernel must zero. A CPU training step allocates and frees the same
activations every iteration; on the project's 2-core machine about 50,000 faults a second
kept a CamVid run 15 to 20 % of its time in the kernel. Raising the mmap and trim
thresholds makes freed blocks stay in the heap for the next step to reuse. The arithmetic
does not change, only where buffers come from; the price is a resident set that stays near
its high-water mark instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size come from the heap and are reused; larger ones are mapped afresh.
(glibc's own ceiling for its dynamic threshold; in the allocator test a 256 MiB threshold
faulted thousands of pages where this one faulted none.)"""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the top of the heap is handed back only beyond this."""
TOP_PAD = 64 << 20
"""The heap grows by at least this much at a time."""


def retain_freed_memory() -> bool:
    """Ask the C library's allocator to keep freed memory for reuse (process-wide).

    Returns:
        True when the allocator accepted the settings (glibc), False where the C library
        has no ``mallopt`` or refuses it (macOS, musl, Windows): nothing changes there.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
    )
    return all(mallopt(option, value) == 1 for option, value in settings)
