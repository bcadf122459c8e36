"""Process memory: keep freed CPU memory for reuse (glibc), and peak-memory readings for reports.

Why :func:`keep_freed_memory`: glibc serves blocks above its mmap threshold (dynamic, at most 32 MiB) with
fresh ``mmap`` pages and trims the heap top once more than twice that is free, so a forward pass that
allocates and frees the same large activations layer after layer pays a page fault per 4 KiB, every
layer (the measured cost on Vim-Ti is in ``benchmarks/RESULTS.md``). Two ``mallopt`` settings remove it:
blocks up to 256 MiB come from the heap, and the heap keeps up to 2 GiB of free memory for reuse (never
more than the process has already used at its peak). The CPU scan kernels apply them when they load.
``VISIONMAMBA_KEEP_FREED_MEMORY=0`` leaves the allocator alone; other C libraries (musl) and preloaded
allocators (jemalloc, tcmalloc) are left as they are.
"""
import ctypes
import functools
import os
import sys
from typing import Optional

import torch

from visionmamba.ops.rss import peak_rss_mb

ENV = "VISIONMAMBA_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = (2 << 30) - 1  # an int


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


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the settings above (once per process); True when they are in effect."""
    libc = _glibc() if os.environ.get(ENV, "1") != "0" else None
    if libc is None:
        return False
    # some glibc versions refuse mmap thresholds above 32 MiB: then take that cap
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
    return mmap_ok and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocated-memory counter, or the process's VmHWM (Linux; a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def available_memory_mb(device: torch.device) -> float:
    """Memory a new allocation can still get: free CUDA memory on ``device``, or the system's MemAvailable
    (Linux; elsewhere infinity, i.e. unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:")) / 1024
    except (OSError, StopIteration):
        return float("inf")
