"""visionmamba.ops.memory: freed large CPU tensors are reused instead of page-faulted in again; peak readings."""
import subprocess
import sys

import pytest

from visionmamba.ops import memory

SCRIPT = r"""
import resource, sys, torch
from visionmamba.ops import memory
if sys.argv[1] == "tuned":
    assert memory.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):  # the heap settles within a few rounds
    torch.empty(64 << 18).fill_(1.0)  # 64 MiB, allocated and freed
start = faults()
for _ in range(6):
    torch.empty(64 << 18).fill_(1.0)
print((faults() - start) / 6)
"""


@pytest.mark.skipif(memory._glibc() is None, reason="needs glibc")
def test_large_blocks_are_reused_without_page_faults():
    def faults_per_block(mode):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    pages = (64 << 20) // 4096
    assert faults_per_block("default") > pages / 2  # glibc maps 64 MiB afresh each time
    assert faults_per_block("tuned") < 100


def test_opt_out(monkeypatch):
    memory.keep_freed_memory.cache_clear()
    monkeypatch.setenv(memory.ENV, "0")
    try:
        assert memory.keep_freed_memory() is False
    finally:
        memory.keep_freed_memory.cache_clear()


PEAK_SCRIPT = r"""
import torch
from visionmamba.ops import memory
device = torch.device("cpu")
memory.reset_peak_memory(device)
before = memory.peak_memory_mb(device)
block = torch.ones(256 << 18)  # 256 MiB, touched
print(memory.peak_memory_mb(device) - before)
"""


def test_peak_memory_reading_follows_a_large_block():
    # a fresh process: in a long test run the allocator may hand back pages that are already resident
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) >= 200
