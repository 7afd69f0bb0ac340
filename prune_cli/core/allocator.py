"""Keep freed memory in the process (glibc malloc), so that large tensors don't page-fault anew.

With glibc's default, dynamic settings, freeing a large block can return its pages to the OS
(top-of-heap trimming, or ``munmap`` of an ``mmap``-ed block), and the next tensor of that size
faults every 4 KiB page in again, zero-filled by the kernel. Calibration allocates and frees
tensors of tens of MB per block, so a run can spend seconds in the kernel: measured with the
bundled model (32 x 512 windows, 2 cores), DSnoT on Wanda at 60% took 4.1 million minor page
faults and 7 s of system time (52.8 s wall), and a Wanda run after it in the same process
4.2 million (46.0 s instead of 41.0 s). With :func:`keep_freed_memory` (same script, same order,
with the every-16th-token guard Gram of the time): no faults after the first run, 0.2 s of
system time; Wanda 38.2 s, DSnoT 44.3 s, Wanda 39.8 s, DSnoT 44.5 s.

The cost: freed memory stays with the process (reused by later tensors) instead of going back
to the OS, so the resident size stays at its peak; for a command-line run that is the peak anyway.
Only the ``prune-cli`` entry point (and the benchmarks that stand in for it) call this: a library
should not change its host process's allocator. Set any ``MALLOC_*`` tunable in the environment to
keep glibc's own behaviour under your control (then nothing is changed here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes: the heap top is kept
TOP_PAD = 256 << 20  # grow the heap 256 MiB at a time
MMAP_THRESHOLD = 32 << 20  # glibc's maximum (a fixed value turns off its dynamic adjustment)
MMAP_MAX = 0  # and no block is mmap-ed at all: even blocks above 32 MiB come from the kept heap


def keep_freed_memory() -> bool:
    """Set glibc's trim threshold, top pad and mmap threshold to fixed values (which also turns
    off their dynamic adjustment) and serve every block from the heap (``M_MMAP_MAX = 0``; glibc
    still falls back to ``mmap`` if the heap cannot grow). Returns whether they were set: ``False`` off Linux/glibc, or
    when the environment already sets a ``MALLOC_*`` tunable or ``GLIBC_TUNABLES``."""
    if not sys.platform.startswith("linux"):
        return False
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_MMAP_MAX, MMAP_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)
