"""The roofline of the CPU scan: this machine's throughput for the scan's irreducible work per state element
(``benchmarks/csrc/roofline.cpp``: one exp and the multiply-adds, in registers), built with the kernels'
compiler and flags, so that a kernel's time reads as a fraction of what this CPU can do.

    python benchmarks/roofline.py            # prints the forward and backward limits, state elements per second
"""
import ctypes
import functools
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

from visionmamba.ops.scan import cpu, toolchain

SOURCE = Path(__file__).with_name("csrc") / "roofline.cpp"


@functools.cache
def library() -> ctypes.CDLL:
    """The micro-kernel, compiled once per source and toolchain into the temporary folder."""
    chain = toolchain.toolchain()
    digest = hashlib.sha1(SOURCE.read_bytes() + (cpu.CSRC / "scan_math.h").read_bytes() + chain.key().encode())
    path = Path(tempfile.gettempdir()) / f"visionmamba_roofline_{digest.hexdigest()[:10]}{toolchain.shared_library_suffix(chain.system)}"
    if not path.exists():
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # per process; cl names files by suffix
        command = toolchain.shared_library_command(chain, SOURCE, tmp, [str(cpu.CSRC)], [], hide_symbols=False,
                                                   threads=True)
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the roofline micro-kernel did not build: {proc.stderr[-1000:]}")
        tmp.replace(path)
    lib = ctypes.CDLL(str(path))
    lib.roofline_run.restype = ctypes.c_double
    lib.roofline_run.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    lib.roofline_avx512.restype = ctypes.c_int
    return lib


def run(backward: bool, steps: int, threads: int) -> Dict[str, float]:
    """One run: {"elements": state elements processed, "checksum": the kernel's result, "seconds": wall time}."""
    elements = ctypes.c_int64(0)
    start = time.perf_counter()
    checksum = library().roofline_run(int(backward), steps, threads, ctypes.byref(elements))
    return {"elements": elements.value, "checksum": checksum, "seconds": time.perf_counter() - start}


def elements_per_second(backward: bool, threads: int, seconds: float = 0.3, repeats: int = 3) -> float:
    """The machine's limit: state elements per second, the median of ``repeats`` runs of about ``seconds``."""
    steps = 1000
    while run(backward, steps, threads)["seconds"] < seconds / 4:
        steps *= 4
    timings = [run(backward, steps, threads) for _ in range(repeats)]
    return statistics.median(t["elements"] / t["seconds"] for t in timings)


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    exp = "AVX-512 exp2" if library().roofline_avx512() else "portable exp"
    print(f"roofline ({toolchain.toolchain().flags.level}, {exp}, {threads} threads): "
          f"forward {elements_per_second(False, threads) / 1e9:.2f}, "
          f"backward {elements_per_second(True, threads) / 1e9:.2f} G state elements/s")


if __name__ == "__main__":
    main()
