"""The Triton kernels' offsets past 2^31 elements, without allocating 2^31 elements.

At Vim-B 1248x1248, batch 128 (and Vim-S / Vim-Ti at 2048 from batch 86 / 171) a batch index times a batch
stride passes 2^31; in 32-bit arithmetic it wraps and the kernel reads and writes somewhere else. Here
every tensor a kernel indexes by batch (or by row, for the norm) is a view into one large allocation whose
batch stride is just above 2^30, so the third batch starts past 2^31 while the stride itself is a 32-bit
argument, as Vim-B's are. Only the pages the kernels touch are ever backed by memory (a few MB of the
12.9 GB reserved). Each kernel's results on those views must equal its results on compact tensors.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py switches the interpreter on before triton is imported"
triton = pytest.importorskip("triton")

from visionmamba.ops import norm_triton  # noqa: E402
from visionmamba.ops.scan import triton as kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("cuda_kernels")  # conftest.py: CPU tensors run the Triton kernels too
BATCH = 3
STRIDE = 2**30 + 2**20  # a 32-bit stride; batch 2 starts at 2^31 + 2^21


class Spread:
    """Views of compact tensors with a batch stride of STRIDE elements, carved one after the other out of
    each batch's slab of one float32 allocation (reserved, not touched)."""

    def __init__(self):
        self.base = torch.empty(BATCH * STRIDE, device=DEVICE)
        self.used = 0

    def __call__(self, t: torch.Tensor, batch_dim: int) -> torch.Tensor:
        inner = [s for i, s in enumerate(t.shape) if i != batch_dim]
        strides, step = [], 1
        for size in reversed(inner):
            strides.insert(0, step)
            step *= size
        strides.insert(batch_dim, STRIDE)
        assert self.used + step <= STRIDE and t.shape[batch_dim] == BATCH
        view = self.base.as_strided(t.shape, strides, self.used)
        self.used += -(-step // 16) * 16  # 64-byte aligned, as allocations are
        return view.copy_(t)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def scan_tensors(length=5, channels=40, state=4):
    """Inputs of a bidirectional scan, batch BATCH: (name, tensor, batch axis or None)."""
    return [
        ("u", randn(2, BATCH, length, channels, seed=1), 1), ("delta", randn(2, BATCH, length, channels, seed=2) * 0.5, 1),
        ("A", -torch.exp(randn(2, state, channels, seed=3) * 0.3), None), ("B", randn(2, BATCH, length, state, seed=4), 1),
        ("C", randn(2, BATCH, length, state, seed=5), 1), ("D", randn(2, channels, seed=6), None),
        ("z", randn(BATCH, length, channels, seed=7), 0), ("bias", randn(2, channels, seed=8) * 0.1, None),
    ]


def test_scan_forward_and_backward_past_2_31_elements():
    spread = Spread()
    compact = {name: t for name, t, _ in scan_tensors()}
    far = {name: t if axis is None else spread(t, axis) for name, t, axis in scan_tensors()}
    steps = 4  # two chunks and a partial one: the saved states are indexed by batch too
    results = []
    for inputs, place in ((compact, lambda t, axis: t), (far, spread)):
        u = inputs["u"]
        chunks = triton.cdiv(u.shape[2], steps)
        ys = place(torch.zeros_like(compact["u"]), 1)
        states = place(torch.zeros(2, BATCH, chunks, 4, u.shape[3], device=DEVICE), 1)
        args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "bias")]
        kernels._run(kernels.scan_fwd_launch(*args[:8], True, ys, states, steps))
        dout = place(randn(BATCH, u.shape[2], u.shape[3], seed=9), 0)
        # du, ddelta, dBC_part and dz by batch; the per-program partial sums and the scratch stay compact
        du, ddelta, dA_part, dBC_part, dD_part, dbias_part, dz, scratch = kernels.scan_bwd_buffers(
            u, inputs["A"], inputs["z"], steps)
        grads = [place(du.zero_(), 1), place(ddelta.zero_(), 1), dA_part, place(dBC_part, 1), dD_part, dbias_part,
                 place(dz, 0), scratch]
        kernels._run(kernels.scan_bwd_launch(*args[:8], True, states, dout, steps, grads))
        results.append([ys, states, *(g for i, g in enumerate(grads) if i != 7)])
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got.cpu(), want.cpu())
    assert results[0][0].abs().sum() > 0


def test_conv_forward_and_backward_past_2_31_elements():
    spread = Spread()
    length, channels, taps = 40, 36, 4  # two time blocks, two channel blocks, both partial
    w, bias = randn(2, channels, taps, seed=1) * 0.3, randn(2, channels, seed=2) * 0.1
    results = []
    for place in (lambda t, axis: t, spread):
        x = place(randn(BATCH, length, channels, seed=3), 0)
        u = place(torch.zeros(2, BATCH, length, channels, device=DEVICE), 1)
        kernels._run(kernels.conv_fwd_launch(x, w, bias, u))
        du = place(randn(2, BATCH, length, channels, seed=4), 1)
        g = place(torch.zeros(2, BATCH, length, channels, device=DEVICE), 1)
        parts = triton.cdiv(length, kernels.CONV_BLOCK_T)
        dw_part = torch.zeros(2, BATCH, parts, channels, taps, device=DEVICE)
        db_part = torch.zeros(2, BATCH, parts, channels, device=DEVICE)
        kernels._run(kernels.conv_bwd_launch(x, w, bias, du, g, dw_part, db_part))
        dx = place(torch.zeros(BATCH, length, channels, device=DEVICE), 0)
        kernels._run(kernels.conv_dx_launch(w, g, dx))
        results.append([u, g, dw_part, db_part, dx])
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got.cpu(), want.cpu())


def test_add_rms_norm_forward_and_backward_past_2_31_elements():
    spread = Spread()  # here the rows are what the stride spaces out
    dim = 48
    weight = randn(dim, seed=1)
    results = []
    for place in (lambda t, axis: t, spread):
        hidden, residual = place(randn(BATCH, dim, seed=2), 0), place(randn(BATCH, dim, seed=3), 0)
        y, out = place(torch.zeros(BATCH, dim, device=DEVICE), 0), place(torch.zeros(BATCH, dim, device=DEVICE), 0)
        rstd = torch.zeros(BATCH, device=DEVICE)
        norm_triton._run(norm_triton.fwd_launch(hidden, residual, weight, 1e-5, y, out, rstd))
        dy, dout = place(randn(BATCH, dim, seed=4), 0), place(randn(BATCH, dim, seed=5), 0)
        dhidden, dresidual = place(torch.zeros(BATCH, dim, device=DEVICE), 0), place(torch.zeros(BATCH, dim, device=DEVICE), 0)
        dw_part = torch.zeros(1, dim, device=DEVICE)
        norm_triton._run(norm_triton.bwd_launch(dy, dout, out, rstd, weight, dhidden, dresidual, dw_part))
        results.append([y, out, rstd, dhidden, dresidual, dw_part])
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got.cpu(), want.cpu())


def test_offsets_within_a_sequence_that_would_pass_2_31_are_refused():
    u = torch.empty(1, 1, 2**21, 2**10, device="meta")  # 2^31 elements in one sequence
    with pytest.raises(ValueError, match="2\\^31"):
        kernels._check_rows(u.shape[2], u)


def test_vim_b_at_1248_batch_128_is_the_regime_tested_here():
    """The launches' real arguments for Vim-B at 1248x1248, batch 128 (meta tensors: nothing allocated):
    every stride is a 32-bit argument, the batch-scaled offsets pass 2^31 (z and x, views of in_proj's
    (b, L, 2E) output: 127 x 18.7M), and no in-sequence offset is refused: what the tests above exercise."""
    b, L, E, N, R, K = 128, (1248 // 16) ** 2 + 1, 1536, 16, 48, 4
    m = dict(device="meta")
    x, z = torch.empty(b, L, 2 * E, **m).chunk(2, dim=-1)
    u, delta = torch.empty(2, b, L, E, **m), torch.empty(2, b, L, E, **m)
    x_dbl = torch.empty(2, b, L, R + 2 * N, **m)
    B, C = x_dbl[..., R:R + N], x_dbl[..., R + N:]
    A, D = torch.empty(2, N, E, **m), torch.empty(2, E, **m)
    states = torch.empty(2, b, triton.cdiv(L, 64), N, E, **m)
    w = torch.empty(2, E, K, **m)
    grads = kernels.scan_bwd_buffers(u, A, z, 64)
    launches = [
        kernels.scan_fwd_launch(u, delta, A, B, C, D, z, D, True, u, states, 64),
        kernels.scan_bwd_launch(u, delta, A, B, C, D, z, D, True, states, z, 64, grads),
        kernels.conv_fwd_launch(x, w, D, u),
        kernels.conv_bwd_launch(x, w, D, u, u, grads[2], grads[2]),
        kernels.conv_dx_launch(w, u, x),
    ]
    largest = 0
    for _, _, args in launches:
        strides = {k: v for k, v in args.items() if k.startswith("s_")}
        assert all(abs(s) < 2**31 for s in strides.values()), strides
        largest = max([largest] + [(b - 1) * s for k, s in strides.items() if k.endswith("_b")])
    assert largest >= 2**31
