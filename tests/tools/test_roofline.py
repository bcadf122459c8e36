"""The roofline's micro-kernel (benchmarks/roofline.py) does the work it counts: its element count is threads x
steps x chains x lanes, and its checksum is that of the same recurrence computed here."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import roofline  # noqa: E402

CHAINS, LANES = 8, 16


def expected_checksum(backward: bool, steps: int, threads: int, base2: bool) -> float:
    """The micro-kernel's recurrence in float32 NumPy: delta drifts each step; forward h = a h + b, y += c h;
    backward also dh = a dh + c d and the sums of dh h, dh b and h d."""
    f = np.float32
    total = 0.0
    for seed in range(threads):
        e = np.arange(LANES)
        d = (f(0.01) * (1 + (e + seed) % 7)).astype(f)
        b, c = (f(0.5) + f(0.01) * e).astype(f), (f(0.25) - f(0.01) * e).astype(f)
        A = (-1.0 - 0.125 * np.arange(CHAINS, dtype=f))[:, None].astype(f) * np.ones(LANES, f)
        h, dh, acc, gA, gB = (np.zeros((CHAINS, LANES), f) for _ in range(5))
        for _ in range(steps):
            d = (d * f(0.99999) + f(1e-6)).astype(f)
            a = (np.exp2(d * A) if base2 else np.exp(d * A)).astype(f)
            h = (a * h + b).astype(f)
            if backward:
                dh = (a * dh + c * d).astype(f)
                gA, gB, acc = gA + dh * h, gB + dh * b, acc + h * d
            else:
                acc = acc + c * h
        total += float(acc.astype(np.float64).sum() + gA.astype(np.float64).sum() + gB.astype(np.float64).sum())
    return total


@pytest.fixture(params=["this-cpu", "AVX2"])
def build(request, monkeypatch):
    """The micro-kernel as built for this CPU, and as an AVX2 machine builds it (the portable exp)."""
    if request.param == "AVX2":
        if torch.backends.cpu.get_cpu_capability() != "AVX512":
            pytest.skip("this CPU builds the AVX2 variant already")
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    roofline.library.cache_clear()
    yield request.param
    roofline.library.cache_clear()


@pytest.mark.parametrize("backward", [False, True])
def test_the_micro_kernel_does_the_work_it_counts(backward, build):
    steps, threads = 300, 2
    result = roofline.run(backward, steps, threads)
    assert result["elements"] == threads * steps * CHAINS * LANES
    avx512 = bool(roofline.library().roofline_avx512())
    assert avx512 == (build != "AVX2" and torch.backends.cpu.get_cpu_capability() == "AVX512")
    expected = expected_checksum(backward, steps, threads, base2=avx512)
    assert result["checksum"] == pytest.approx(expected, rel=2e-4)


def test_the_limit_is_a_rate():
    rate = roofline.elements_per_second(False, threads=1, seconds=0.05, repeats=1)
    assert 1e7 < rate < 1e12  # state elements per second: between a slow ARM core and a whole server
