"""Glue for the kernel backends: the ``torch.library`` custom op that makes every backend one opaque,
compile-friendly operator, and the element-wise parts of the contract for a backend whose kernel
computes only the core scan (``chunked``; the ``cpu`` and ``triton`` kernels fuse them).

A *core* computes y_t = <h_t, C_t> with h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t in float32 or
float64 (inputs already upcast); its backward returns (du, ddelta, dA, dB, dC, y). The bias, softplus,
D skip and SiLU(z) gate are applied around it here, forward and backward, written out by hand.
"""
import importlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

Grads = Tuple[Optional[torch.Tensor], ...]
CoreForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CoreBackward = Callable[..., Tuple[torch.Tensor, ...]]

# backend name -> module with forward(...) and backward(...) (imported on first use).
KERNEL_MODULES: Dict[str, str] = {
    "chunked": "visionmamba.ops.scan.chunked",
    "cpu": "visionmamba.ops.scan.cpu",
    "triton": "visionmamba.ops.scan.triton",
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _delta(delta: torch.Tensor, delta_bias: Optional[torch.Tensor], softplus: bool) -> torch.Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if softplus else delta


def fused_forward(core: CoreForward, u, delta, A, B, C, D, z, delta_bias, softplus) -> torch.Tensor:
    """The whole contract around ``core``; returns u's dtype."""
    ct = compute_dtype(u.dtype)
    uf = u.to(ct)
    y = core(uf, _delta(delta.to(ct), _opt(delta_bias, ct), softplus), A.to(ct), B.to(ct), C.to(ct))
    if D is not None:
        y = y + uf * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype)


def fused_backward(core_bwd: CoreBackward, u, delta, A, B, C, D, z, delta_bias, softplus, dout) -> Grads:
    """Gradients of :func:`fused_forward` for every input (None where the input is None).

    ``core_bwd(u, delta, A, B, C, dy)`` returns (du, ddelta, dA, dB, dC, y): it recomputes the core
    output y anyway, and the gate's gradient needs it.
    """
    ct = compute_dtype(u.dtype)
    uf, dout = u.to(ct), dout.to(ct)
    raw = delta.to(ct) + (delta_bias.to(ct)[:, None] if delta_bias is not None else 0)
    d = F.softplus(raw) if softplus else raw
    if z is not None:
        zf = z.to(ct)
        sig = torch.sigmoid(zf)
        dy1 = dout * zf * sig  # out = y1 * silu(z)
    else:
        dy1 = dout
    du, ddelta, dA, dB, dC, y = core_bwd(uf, d, A.to(ct), B.to(ct), C.to(ct), dy1)
    dD = dz = None
    if D is not None:
        du = du + dy1 * D.to(ct)[:, None]
        dD = (dy1 * uf).sum((0, 2)).to(D.dtype)
        y = y + uf * D.to(ct)[:, None]
    if z is not None:
        dz = (dout * y * sig * (1 + zf * (1 - sig))).to(z.dtype)
    if softplus:
        ddelta = ddelta * torch.sigmoid(raw).masked_fill(raw > 20, 1.0)  # softplus threshold 20: identity above
    ddelta_bias = ddelta.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, dz, ddelta_bias)


def _opt(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def kernel(backend: str):
    return importlib.import_module(KERNEL_MODULES[backend])


@torch.library.custom_op("visionmamba::selective_scan", mutates_args=())
def selective_scan_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    backend: str,
) -> torch.Tensor:
    return _like(u, kernel(backend).forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus))


@selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    return torch.empty_like(u)  # outputs and gradients take the layout of the tensor they belong to


def _like(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    target = torch.empty_like(t)
    return value if value.stride() == target.stride() else target.copy_(value)


@torch.library.custom_op("visionmamba::selective_scan_backward", mutates_args=())
def selective_scan_backward_op(
    dout: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    backend: str,
) -> List[torch.Tensor]:
    grads = kernel(backend).backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout.contiguous())
    # A custom op returns tensors only: absent inputs get empty placeholders, dropped again below.
    like = [u, delta, A, B, C, D, z, delta_bias]
    return [_like(t, g) if g is not None else u.new_empty(0) for t, g in zip(like, grads)]


@selective_scan_backward_op.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    like = [u, delta, A, B, C, D, z, delta_bias]
    return [torch.empty_like(t) if t is not None else u.new_empty(0) for t in like]


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.present = [t is not None for t in (D, z, delta_bias)]
    ctx.delta_softplus, ctx.backend = delta_softplus, backend


def _backward(ctx, dout):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    grads = selective_scan_backward_op(dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ctx.backend)
    du, ddelta, dA, dB, dC, dD, dz, dbias = grads
    present_D, present_z, present_bias = ctx.present
    return (du, ddelta, dA, dB, dC, dD if present_D else None, dz if present_z else None,
            dbias if present_bias else None, None, None)


selective_scan_op.register_autograd(_backward, setup_context=_setup_context)
