"""The fused residual add + RMSNorm kernel against its formula, forward and every gradient (Triton's CPU
interpreter without a GPU), and the blocks using it on the Triton path."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py switches the interpreter on before triton is imported"
pytest.importorskip("triton")

from helpers import assert_close  # noqa: E402
from visionmamba.ops import norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, with_residual", [((2, 5, 24), True), ((1, 1, 24), False), ((3, 7, 40), True)])
def test_fused_add_rms_norm_matches_the_formula_forward_and_backward(dtype, shape, with_residual):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
    residual = torch.randn(*shape, generator=g).to(DEVICE) if with_residual else None
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE)
    dy = torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
    dres = torch.randn(*shape, generator=g).to(DEVICE)

    def run(fn, cast):
        leaves = [t.detach().clone().to(cast(t)).requires_grad_(True) for t in (hidden, residual, weight) if t is not None]
        h, *rest = leaves
        res, w = (rest if with_residual else [None, *rest])
        y, out = fn(h, res, w, 1e-5)
        grads = torch.autograd.grad([y, out], leaves, [dy.to(y.dtype), dres.to(out.dtype)])
        return y, out, grads

    y, out, grads = run(norm.fused, lambda t: t.dtype)
    ref_y, ref_out, ref_grads = run(norm.reference, lambda t: torch.float64)
    assert y.dtype == dtype and out.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(y, ref_y, rtol_max=tol, name="normalised")
    assert_close(out, ref_out, rtol_max=1e-6, name="residual")
    for name, got, want in zip(["hidden", "residual", "weight"] if with_residual else ["hidden", "weight"], grads, ref_grads):
        assert_close(got, want, rtol_max=tol * 10, name=f"grad {name}")
