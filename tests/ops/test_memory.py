"""visionmamba.malloc: freed large CPU tensors are reused instead of page-faulted in again."""
import subprocess
import sys

import pytest

from visionmamba.ops import memory as malloc

SCRIPT = r"""
import resource, sys, torch
from visionmamba.ops import memory as malloc
if sys.argv[1] == "tuned":
    assert malloc.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):  # the heap settles within a few rounds
    torch.empty(64 << 18).fill_(1.0)  # 64 MiB, allocated and freed
start = faults()
for _ in range(6):
    torch.empty(64 << 18).fill_(1.0)
print((faults() - start) / 6)
"""


@pytest.mark.skipif(malloc._glibc() is None, reason="needs glibc")
def test_large_blocks_are_reused_without_page_faults():
    def faults_per_block(mode):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    pages = (64 << 20) // 4096
    assert faults_per_block("default") > pages / 2  # glibc maps 64 MiB afresh each time
    assert faults_per_block("tuned") < 100


def test_opt_out(monkeypatch):
    monkeypatch.setattr(malloc, "_applied", None)
    monkeypatch.setenv(malloc.ENV, "0")
    assert malloc.keep_freed_memory() is False
