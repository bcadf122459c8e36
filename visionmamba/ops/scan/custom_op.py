"""The one-direction scan of the kernel backends as the ``torch.library`` custom op
``visionmamba::selective_scan`` (with its backward op and autograd), so that ``torch.compile(fullgraph=True)``
sees one opaque operator whatever backend runs it.

A kernel backend is the module ``visionmamba.ops.scan.<name>`` with
``forward(u, delta, A, B, C, D, z, delta_bias, softplus) -> y`` and
``backward(u, delta, A, B, C, D, z, delta_bias, softplus, dout) -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``
(None for absent inputs), both on the contract of :func:`visionmamba.ops.scan.reference.selective_scan`.
"""
import importlib
from types import ModuleType
from typing import List, Optional

import torch


def kernel_module(backend: str) -> ModuleType:
    """The module of a kernel backend (imported on first use)."""
    return importlib.import_module(f"{__package__}.{backend}")


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
    return _like(u, kernel_module(backend).forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus))


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
    grads = kernel_module(backend).backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout.contiguous())
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


def register_backward(op, backward_op, *, saved_outputs: int = 0) -> None:
    """Autograd for a kernel custom op whose gradients come from another custom op:
    ``backward_op(grad, *inputs, *outputs[1 : 1 + saved_outputs])`` returns one gradient per tensor input.

    ``saved_outputs`` counts auxiliary outputs after the first (e.g. states kept for the backward), which are
    not differentiable; the op's first output is the one the gradient ``grad`` belongs to. Non-tensor inputs
    (sizes, flags) are passed to ``backward_op`` as they were given and get no gradient.
    """

    def setup_context(ctx, inputs, output) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        ctx.is_tensor = [isinstance(x, torch.Tensor) for x in inputs]
        ctx.constants = [None if t else x for t, x in zip(ctx.is_tensor, inputs)]
        ctx.save_for_backward(*(x for x in inputs if isinstance(x, torch.Tensor)), *outputs[1 : 1 + saved_outputs])

    def backward(ctx, grad, *unused):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if t else c for t, c in zip(ctx.is_tensor, ctx.constants)]
        grads = iter(backward_op(grad.contiguous(), *inputs, *saved))
        return tuple(next(grads) if t else None for t in ctx.is_tensor)

    op.register_autograd(backward, setup_context=setup_context)
