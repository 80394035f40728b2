"""The C allocator's policy for large blocks on CPU, set once per training process.

glibc serves a freed block of up to 32 MB from its heap the next time, raising its mmap
threshold to the largest block freed so far. Training frees and reallocates activation and
dequantization buffers of ever-different sizes every step, so the heap fragments and the
resident size grows far beyond what is in use: on SmolLM2-135M with qlora (batch 16) the
process held 3.9 GB for 2.2 GB in use. A fixed threshold maps every block at or above it
on its own and returns it to the system when freed, so the resident size follows the memory
in use (2.3 GB there), for some page-fault time per step. `cpu_mmap_threshold_kb` in the run
config sets it; 0 keeps glibc's own policy.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h


def set_mmap_threshold(kilobytes: int) -> bool:
    """Fix glibc's mmap threshold; False where the C library is not glibc (nothing changes)."""
    if kilobytes <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, kilobytes * 1024))
