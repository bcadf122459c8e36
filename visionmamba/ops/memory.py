"""Keep freed CPU memory in the process (glibc) instead of returning it to the OS after every tensor.

Why: glibc serves blocks above its mmap threshold (dynamic, at most 32 MiB) with fresh ``mmap`` pages and
trims the heap top once more than twice that is free, so a forward pass that allocates and frees the same
large activations layer after layer pays a page fault per 4 KiB, every layer. Measured on Vim-Ti, batch 8,
2 cores (a KVM guest, where faults are dear): ~250,000 faults per forward at 512x512 (930 -> 590 ms once
they are gone) and ~1.5 million at 1024x1024 (4.1 -> 2.4 s), with the same peak resident memory. The fix
is two ``mallopt`` settings: blocks up to 256 MiB come from the heap, and the heap keeps up to 2 GiB of
free memory for reuse (never more than the process has already used at its peak).

:func:`keep_freed_memory` applies them once per process; the CPU kernels call it when they load.
``VISIONMAMBA_KEEP_FREED_MEMORY=0`` leaves the allocator alone. Other C libraries (musl) or preloaded
allocators (jemalloc, tcmalloc) are left as they are.
"""
import ctypes
import os
import sys
from typing import Optional

ENV = "VISIONMAMBA_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = (2 << 30) - 1  # an int

_applied: Optional[bool] = None


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):  # not glibc
        return None
    version.restype = ctypes.c_char_p
    return libc if version() else None


def keep_freed_memory() -> bool:
    """Apply the settings above once; True when they are in effect."""
    global _applied
    if _applied is None:
        _applied = False
        libc = _glibc() if os.environ.get(ENV, "1") != "0" else None
        if libc is not None:
            # some glibc versions refuse mmap thresholds above 32 MiB: then take that cap
            mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
            _applied = mmap_ok and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied
