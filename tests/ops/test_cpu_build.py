"""The C++ kernels' build: named by instruction-set level, so machines that share a cache never run (or
rebuild) each other's binaries; the non-AVX-512 build computes what the reference does."""
import platform
import subprocess
import sys

import pytest
import torch

from visionmamba.ops.scan import cpu, toolchain


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 instruction-set levels")
def test_the_build_is_named_and_compiled_for_the_cpu_level(monkeypatch):
    names = {}
    for capability, level in (("AVX512", "x86-64-v4"), ("AVX2", "x86-64-v3"), ("DEFAULT", "x86-64")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda capability=capability: capability)
        flags = toolchain.toolchain().flags
        assert flags.level == level and f"-march={level}" in flags.cflags and "-march=native" not in flags.cflags
        names[level] = cpu.extension_name()
        assert level.replace("-", "_") in names[level]
    assert len(set(names.values())) == 3  # three cache entries: no machine loads another's binary


CHECK = """
import torch
from visionmamba.ops import scan
from visionmamba.ops.scan import toolchain
assert toolchain.toolchain().flags.level == "x86-64-v3", toolchain.toolchain()
g = torch.Generator().manual_seed(0)
x, z = torch.randn(2, 21, 2 * 37, generator=g).chunk(2, -1)
p = [torch.randn(2, 37, 4, generator=g) * .3, torch.randn(2, 37, generator=g) * .1, torch.randn(2, 3 + 32, 37, generator=g) / 6,
     torch.randn(2, 37, 3, generator=g) / 2, torch.randn(2, 37, generator=g) * .1, -torch.exp(torch.randn(2, 37, 16, generator=g) * .3),
     1 + .1 * torch.randn(2, 37, generator=g)]
leaves = [t.clone().requires_grad_(True) for t in (x, z, *p)]
out = scan.bidirectional(*leaves, backend="cpu")
ref_leaves = [t.clone().requires_grad_(True) for t in (x, z, *p)]
ref = scan.bidirectional(*ref_leaves, backend="reference")
assert (out - ref).abs().max() <= 2e-5 * ref.abs().max(), (out - ref).abs().max()
for a, b in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(ref.sum(), ref_leaves)):
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
torch.set_num_threads(1)
with torch.no_grad():  # inference: the fused core (op mixer_core) with its portable x_proj, float32 and bf16
    fused = torch.ops.visionmamba.mixer_core(x, z, *p)
    assert (fused - ref).abs().max() <= 2e-5 * ref.abs().max(), (fused - ref).abs().max()
    half = torch.ops.visionmamba.mixer_core(x.bfloat16(), z.bfloat16(), *p).float()
    assert (half - ref).abs().max() <= 2e-2 * ref.abs().max(), (half - ref).abs().max()
print("ok")
"""


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="the AVX2 build differs only on AVX-512 CPUs")
def test_the_avx2_build_matches_the_reference():
    """What a machine without AVX-512 runs (the portable exp, no AVX-512 intrinsics), built and checked here."""
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "ATEN_CPU_CAPABILITY": "avx2"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
