"""Inputs and tolerances shared by the scan backend tests."""
import torch

from helpers import assert_close
from visionmamba.ops.scan import reference

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# dtype of the inputs -> (forward bound, gradient bound), relative to the reference's max |value|.
TOLERANCE = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2)}


def scan_inputs(batch, channels, length, state, dtype, seed=0, delta_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = dict(
        u=r(batch, channels, length), delta=r(batch, channels, length) * delta_scale, A=-torch.exp(r(channels, state) * 0.5),
        B=r(batch, state, length), C=r(batch, state, length), D=r(channels), z=r(batch, channels, length),
        delta_bias=r(channels) * 0.1,
    )
    # Sequence tensors take the test dtype; A, D and delta_bias are float32 parameters unless testing float64.
    param = torch.float64 if dtype == torch.float64 else torch.float32
    return {k: v.to(param if k in ("A", "D", "delta_bias") else dtype) for k, v in inputs.items()}


def check_against_reference(run, inputs, dtype, *, softplus=True):
    """run(**inputs, delta_softplus=...) vs the reference on the same (rounded) inputs in float64."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    out = run(**leaves, delta_softplus=softplus)
    assert out.dtype == inputs["u"].dtype
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in inputs.items()}
    ref = reference.selective_scan(**ref_leaves, delta_softplus=softplus)
    fwd_tol, grad_tol = TOLERANCE[dtype]
    assert_close(out, ref, rtol_max=fwd_tol, name="forward")
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, list(ref_leaves.values()), dout)
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert got.dtype == inputs[name].dtype, name
        assert_close(got, want, rtol_max=grad_tol, name=f"grad {name}")
