"""The CPU's fused inference core (op ``mixer_core``: conv + SiLU, x_proj and the scan in token tiles) against
the reference in float64, against the separate ops it replaces, and where the mixer takes it."""
import pytest
import torch

from helpers import assert_close
from visionmamba.ops import library, scan
from visionmamba.ops.scan import cpu, fused, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C++ CPU kernels do not build here")


def core_inputs(batch, length, channels, state, rank, seed=0, dtype=torch.float32):
    """(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D); x and z are views of
    one (b, L, 2E) tensor, as in the mixer."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x, z = r(batch, length, 2 * channels).chunk(2, dim=-1)
    return [x, z, r(2, channels, 4) * 0.3, r(2, channels) * 0.1, r(2, rank + 2 * state, channels) / channels**0.5,
            r(2, channels, rank) / rank**0.5, r(2, channels) * 0.1, -torch.exp(r(2, channels, state) * 0.3),
            1 + 0.1 * r(2, channels)]


def separate_ops(x, z, conv_weight, conv_bias, x_proj_weight, dt_weight, dt_bias, A, D):
    """What the mixer ran before the fused core: conv_silu, x_proj, bi_scan_."""
    ops = torch.ops.visionmamba
    u = ops.conv_silu(x, conv_weight, conv_bias)
    ops.bi_scan_(u, fused._x_proj(u, x_proj_weight.to(u.dtype)), dt_weight, A, D, z, dt_bias)
    return u[0]


# (batch, L, E, N, R): one step; one chunk less one; not a chunk multiple with E not a multiple of 16; Vim-Ti's
# core; x_proj's columns past 48 (two passes of its register blocks) and N other than 16 (the general recurrence)
SHAPES = [(3, 1, 37, 16, 3), (1, 31, 16, 16, 1), (2, 70, 37, 16, 3), (2, 197, 192, 16, 12), (2, 45, 40, 12, 24)]


@pytest.mark.parametrize("batch, length, channels, state, rank", SHAPES)
def test_fused_core_matches_the_float64_reference_and_the_separate_ops(batch, length, channels, state, rank):
    inputs = core_inputs(batch, length, channels, state, rank)
    with torch.no_grad():
        got = torch.ops.visionmamba.mixer_core(*inputs)
        want = reference.bidirectional(*(t.double() for t in inputs))
        separate = separate_ops(*inputs)
    assert got.dtype == torch.float32 and got.shape == (batch, length, channels)
    assert_close(got, want, rtol_max=2e-6, name="fused core vs float64")
    # the same kernels on the same u: x_proj's order of summation is the only difference
    assert_close(got, separate, rtol_max=1e-6, name="fused core vs separate ops")


def test_steep_decays_underflow_to_zero_as_in_the_reference():
    inputs = core_inputs(2, 70, 37, 16, 3, seed=1)
    inputs[6] = inputs[6] + 60.0  # dt_proj bias: delta ~ 60, most exp(delta A) underflow
    inputs[7] = inputs[7] * torch.arange(1, 17)
    with torch.no_grad():
        assert_close(torch.ops.visionmamba.mixer_core(*inputs), reference.bidirectional(*(t.double() for t in inputs)),
                     rtol_max=2e-6, name="steep")


@pytest.mark.parametrize("length", [1, 37, 70])
def test_bf16_fused_core_equals_the_separate_bf16_ops(length):
    inputs = core_inputs(2, length, 40, 16, 5, seed=2)
    acts = [t.to(torch.bfloat16) for t in inputs[:2]]
    with torch.no_grad():
        got = torch.ops.visionmamba.mixer_core(*acts, *inputs[2:])
        want = separate_ops(*acts, *inputs[2:])
        exact = reference.bidirectional(*(t.double() for t in [*acts, *inputs[2:]]))
    assert got.dtype == torch.bfloat16
    # the separate ops round u, x_proj's weight and its output to bf16, the fused core keeps them float32; both
    # round the output twice: within 4 bf16 ulps of the output's scale (0.4% measured)
    atol = 4 * 2.0**-8 * exact.abs().max().item()
    assert_close(got.float(), want.float(), atol=atol, name="bf16 fused vs separate")
    assert_close(got.float(), exact, atol=atol, name="bf16 fused vs float64")


def test_fused_core_is_the_same_on_one_and_several_threads():
    """A task is a batch row, whatever the thread count: results cannot change with it."""
    inputs = core_inputs(5, 70, 40, 16, 5, seed=3)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(torch.ops.visionmamba.mixer_core(*inputs))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_the_mixer_takes_the_fused_core_in_eager_cpu_inference_only(monkeypatch):
    calls = []
    original = cpu.mixer_core
    monkeypatch.setattr(cpu, "mixer_core", lambda *a: calls.append(a[0].dtype) or original(*a))
    inputs = core_inputs(2, 20, 16, 16, 2)
    with torch.no_grad():
        out = scan.bidirectional(*inputs, backend="cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scan.bidirectional(*inputs, backend="cpu")
        scan.bidirectional(*(t.double() for t in inputs), backend="cpu")  # float64: the separate ops
    assert calls == [torch.float32, torch.bfloat16]
    assert_close(out, reference.bidirectional(*(t.double() for t in inputs)), rtol_max=2e-6, name="mixer")
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    scan.bidirectional(*leaves, backend="cpu").sum().backward()  # training: the separate ops and their backward
    assert len(calls) == 2 and all(t.grad is not None for t in leaves)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # fewer batch rows than threads: the separate ops
    with torch.no_grad():
        scan.bidirectional(*inputs, backend="cpu")
    assert len(calls) == 2


def test_the_fused_core_refuses_other_dtypes_in_one_line():
    inputs = core_inputs(1, 5, 16, 16, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="mixer_core runs float32 or bfloat16 activations, got torch.float64"):
        cpu.mixer_core(*inputs)
    assert library.KERNELS["mixer_core"] == {"cpu": "visionmamba.ops.scan.cpu"}
