"""Every Triton kernel compiles for sm_80 and sm_90 without spilling, and the scans keep their static
targets: no GPU needed (benchmarks/gpu_static.py reads the machine code Triton builds for those targets)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
KERNELS = ("scan_fwd", "scan_fwd_infer", "scan_bwd", "conv_fwd", "conv_bwd", "conv_dx", "add_rms_norm_fwd", "add_rms_norm_bwd")


@pytest.fixture(scope="module")
def static_table():
    # A fresh process: this one runs Triton's interpreter, which compiles nothing.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_static.py")], capture_output=True,
                          text=True, env=env, timeout=600)
    return done


def rows(table: str):
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 13 and cells[0] in KERNELS:
            yield cells


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(static_table):
    assert static_table.returncode == 0, static_table.stdout[-3000:] + static_table.stderr[-3000:]
    found = list(rows(static_table.stdout))
    kinds = {(r[0], r[1], r[2]) for r in found}
    for kernel in KERNELS:
        for arch in ("sm_80", "sm_90"):
            for dtype in ("fp32", "bf16"):
                assert (kernel, arch, dtype) in kinds
    assert all(r[5] == "0" for r in found), "local-memory spills"


def resident_warps(row) -> int:
    """Warps an SM holds of this config (programs x warps a program): what hides the step's latencies. At
    least 8 under Triton 3.6 and 3.8 alike (3.6's 4-warp forward fits 3 programs, 3.8's 4)."""
    return int(row[7]) * int(row[3].split("warps=")[1])


def forward_target(kernel: str) -> float:
    """Thread-instructions per state-element-step (from ~110): 10, the MUFU bound. Triton 3.6 (the lent
    GPUs' version) builds the inference scan to 10.6, its extra instructions outside the MUFU work: the
    gap RESULTS.md states, held here so that it cannot grow unnoticed."""
    version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    return 10.6 if kernel == "scan_fwd_infer" and version < (3, 8) else 10.0


def test_forward_scan_meets_its_static_target_on_sm90(static_table):
    forward = [r for r in rows(static_table.stdout) if r[0] in ("scan_fwd", "scan_fwd_infer") and r[1] == "sm_90"]
    assert forward
    for r in forward:
        assert float(r[12]) <= forward_target(r[0]), r
        assert r[10] == "0", r  # no barrier in the step loop
        assert resident_warps(r) >= 8, r


def test_backward_scan_meets_its_static_target_on_sm90(static_table):
    backward = {r[3]: r for r in rows(static_table.stdout) if r[0] == "scan_bwd" and r[1] == "sm_90"}
    assert backward
    for r in backward.values():
        assert r[10] == "0 + 0", r  # no barrier in either step loop
        assert r[11] == "0 + 31", r  # the reduce-scatter of dB and dC: 31 shuffles a step
        assert resident_warps(r) >= 8, r
    # the configuration the autotuner has for sm_90-class GPUs (two channels a thread), from ~260
    assert float(backward["BLOCK_E=64, warps=1"][12]) <= 30.0
