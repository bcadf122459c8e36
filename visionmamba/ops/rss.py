"""This process's peak resident memory, read as each platform offers it. Imports neither torch nor the
rest of the package, so that ``tools/onnx_point.py`` can load it by path in a process without torch."""
import os
import sys


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB: Linux's VmHWM (which can be reset), else ``ru_maxrss``
    (kilobytes on Linux and the BSDs, bytes on macOS), else Windows' peak working set."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        pass
    if os.name == "nt":
        import ctypes
        from ctypes import wintypes

        class Counters(ctypes.Structure):
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                        ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                        *((name, ctypes.c_size_t) for name in ("QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                                                               "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage",
                                                               "PagefileUsage", "PeakPagefileUsage"))]

        counters = Counters(cb=ctypes.sizeof(Counters))
        ctypes.windll.psapi.GetProcessMemoryInfo(ctypes.windll.kernel32.GetCurrentProcess(), ctypes.byref(counters),
                                                 counters.cb)
        return counters.PeakWorkingSetSize / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
