"""Float32 matrix products on the CPU through oneDNN instead of the BLAS behind ``F.linear``.

Why: torch's CPU ``F.linear`` in float32 calls MKL's sgemm, which on AMD processors takes a generic code
path; oneDNN (shipped inside torch, used by torch.compile's CPU freezing path) computes the same float32
results to rounding at about twice the speed on Vim's projection shapes there (measured figures in
``benchmarks/RESULTS.md``). :class:`Linear` is ``nn.Linear`` (same parameters, state-dict keys and
initialisation) whose forward takes that route where it applies: float32 CPU tensors outside autocast,
tracing, scripting, compiling, export and Python dispatch modes. oneDNN's call has a larger fixed cost than
MKL's, repaid from a few hundred rows up. Everywhere else it is ``F.linear`` unchanged.
``VISIONMAMBA_ONEDNN_LINEAR=0`` turns the route off.
"""
import functools
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ENV = "VISIONMAMBA_ONEDNN_LINEAR"


@functools.cache
def _op_works() -> bool:
    """Whether torch has the oneDNN linear op and it computes what ``F.linear`` does (checked once)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        # fixed values, not torch.randn: this runs at first use, and must not move the global RNG
        # (a resumed training run would draw different random numbers from the uninterrupted one)
        x = torch.linspace(-1, 1, 15).view(3, 5)
        w, b = torch.linspace(-2, 1, 20).view(4, 5), torch.linspace(0, 1, 4)
        return torch.backends.mkldnn.is_available() and torch.allclose(
            op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5
        )
    except (AttributeError, RuntimeError):
        return False


def _autocasting() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


def _dispatch_mode():
    """The active Python dispatch mode (FLOP counters, fake tensors, ...): those see ``aten.linear``'s
    decomposition and may not know the oneDNN op, so they get ``F.linear``."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        return _get_current_dispatch_mode()
    except ImportError:  # pragma: no cover - a future torch without the helper
        return None


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when :func:`linear` would run oneDNN for these arguments."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 2
        and x.numel() > 0
        and type(x) is torch.Tensor
        and os.environ.get(ENV, "1") != "0"
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
        and not _autocasting()
        and _dispatch_mode() is None
        and _op_works()
    )


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """oneDNN forward and input gradient (2x MKL's speed there too); the weight gradient, whose operands
    would need transposed copies, stays with torch's matmul. (The op has no autograd of its own.)"""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t().contiguous(), None)
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = rows.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where :func:`onednn_applies`."""
    if not onednn_applies(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _OneDnnLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (drop-in: same parameters and keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Give every plain ``nn.Linear`` of ``model`` this module's forward, in place (parameters untouched).

    For like-for-like comparisons: e.g. timm's DeiT with the same matrix-product route as Vim.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
    return model
