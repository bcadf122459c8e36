"""The ``cpu`` and ``triton`` backends: the scan and the mixer core on the fused ops of
:mod:`visionmamba.ops.library`. One code path for every device; the dispatcher runs the device's kernels
(C++ on the CPU, Triton on CUDA), and three constants of the kernel module say how to call them: whether the
activations must be float32, how often the forward keeps states for the backward, and whether inference may
hand them bfloat16 instead.
"""
import importlib
from typing import Tuple

import torch

from visionmamba.ops import library
from visionmamba.ops.linear import linear, onednn_applies
from visionmamba.ops.scan.reference import compute_dtype


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> torch.Tensor:
    """The contract of :func:`visionmamba.ops.scan.reference.selective_scan` as the op ``selective_scan``."""
    return torch.ops.visionmamba.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def bidirectional(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D) -> torch.Tensor:
    """The mixer core: same arguments and result as :func:`visionmamba.ops.scan.reference.bidirectional`
    (x, z (b, L, E) token-major, strided views of in_proj's output are fine -> (b, L, E) in x's dtype).

    conv + SiLU of both directions (op ``conv_silu``), x_proj, then the scan of both directions with dt_proj
    fused (op ``bi_scan``; ``bi_scan_`` in place over u when there is nothing to differentiate, so that of
    the block's temporaries only u is as large as the activations; ``bi_scan`` in traced graphs and
    ``bi_scan_inference`` in exported ones, whose converters want ops without side effects). Token-major throughout: no transpose,
    flip or copy of an activation. Eager CPU inference with a batch row per thread runs the three as one op,
    ``mixer_core``, in token tiles that stay in cache (:func:`_tiles_apply`).
    """
    params = (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)
    float32, checkpoint_steps, bf16_inference = kernel_constants(x.device.type)
    if float32 and bf16_inference and _bf16_inference(params):
        with torch.autocast("cpu", enabled=False):
            return _core_bf16(*params)
    if float32 and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):  # the kernels compute in float32 whatever autocast says
            return _core(float32, checkpoint_steps, *params)
    return _core(float32, checkpoint_steps, *params)


def _bf16_inference(params) -> bool:
    """True for an eager forward without gradients in bfloat16: under CPU bf16 autocast or on bf16 tensors."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_exporting():  # exported graphs keep the float32 form
        return False
    return params[0].dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu") and _cpu_autocast_dtype() == torch.bfloat16)


def _cpu_autocast_dtype() -> torch.dtype:
    try:
        return torch.get_autocast_dtype("cpu")
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype()


def _core_bf16(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D) -> torch.Tensor:
    """Inference with bfloat16 activations: conv + SiLU and the scan read and write bf16 (weights, states and
    sums float32), x_proj is a bf16 matrix product (oneDNN). Returns bf16."""
    bf16, f32 = torch.bfloat16, torch.float32
    ops = torch.ops.visionmamba
    if _tiles_apply(x):
        return ops.mixer_core(x.to(bf16), z.to(bf16), conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                              dt_proj_bias, A, D)
    u = ops.conv_silu(x.to(bf16), conv_weight.to(f32), conv_bias.to(f32))  # (2, b, L, E) bf16
    x_proj_out = _x_proj(u, x_proj_weight.to(bf16))  # (2, b, L, R + 2N): a bf16 product
    ops.bi_scan_(u, x_proj_out, dt_proj_weight.to(f32), A.to(f32), D.to(f32), z.to(bf16), dt_proj_bias.to(f32))
    return u[0]


def _core(float32: bool, checkpoint_steps: int, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
          dt_proj_bias, A, D) -> torch.Tensor:
    dtype = x.dtype
    if float32:
        ct = compute_dtype(dtype)
        x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D = (
            t.to(ct) for t in (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D))
    ops = torch.ops.visionmamba
    params = (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    if not differentiable and x.dtype == torch.float32 and _tiles_apply(x):
        return ops.mixer_core(*params).to(dtype)
    u = ops.conv_silu(x, conv_weight, conv_bias)  # (2, b, L, E)
    x_proj_out = _x_proj(u, x_proj_weight.to(u.dtype))  # (2, b, L, R + 2N)
    scan_args = (x_proj_out, dt_proj_weight, A, D, z, dt_proj_bias)
    if differentiable or torch.jit.is_tracing():  # one op whatever the tracer's checks re-trace under
        out = ops.bi_scan(u, *scan_args, checkpoint_steps)[0]
    elif torch.compiler.is_exporting():
        out = ops.bi_scan_inference(u, *scan_args)
    else:
        ops.bi_scan_(u, *scan_args)
        out = u[0]
    return out.to(dtype)


def _tiles_apply(x: torch.Tensor) -> bool:
    """Whether inference takes the CPU's fused core (op ``mixer_core``, one batch row per task): eagerly, on the
    CPU's own kernels, with at least a batch row per thread (fewer rows leave threads idle that the separate
    ops, tasked by channels, keep busy)."""
    if x.device.type != "cpu" or library.routed_to_cuda("cpu"):
        return False
    from visionmamba.ops.scan import exporting_onnx  # the package, imported by the time a model runs

    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting() or exporting_onnx():
        return False
    return x.shape[0] >= torch.get_num_threads()


def _x_proj(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """u (2, b, L, E) @ weight (2, R + 2N, E)^T per direction: through oneDNN where it applies (the CPU, in
    float32, eagerly), else as one batched product."""
    if not onednn_applies(u, weight):
        return torch.matmul(u, weight.transpose(1, 2)[:, None])
    if torch.is_grad_enabled() and (u.requires_grad or weight.requires_grad):
        return _OneDnnXProj.apply(u, weight)
    return _x_proj_onednn(u, weight)


def _x_proj_onednn(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows = u.view(2, -1, u.shape[-1])
    return torch.stack([linear(rows[i], weight[i]) for i in range(2)]).view(*u.shape[:3], weight.shape[1])


class _OneDnnXProj(torch.autograd.Function):
    """:func:`_x_proj` through oneDNN with its gradients as two batched products: per-direction linears would
    give u's gradient as a stack of two (and weight's through a transposed copy), a pass over a tensor the
    size of u more per block."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u, weight)
        return _x_proj_onednn(u, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, weight = ctx.saved_tensors
        g = grad.reshape(2, -1, grad.shape[-1])  # (2, b L, R + 2N)
        grad_u = torch.bmm(g, weight).view(u.shape) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(g.transpose(1, 2), u.view(2, -1, u.shape[-1])) if ctx.needs_input_grad[1] else None
        return grad_u, grad_w


@torch.compiler.assume_constant_result
def kernel_constants(device_type: str) -> Tuple[bool, int, bool]:
    """(FLOAT32_ACTIVATIONS, CHECKPOINT_STEPS, BF16_INFERENCE) of the kernels that run tensors of
    ``device_type``: whether they read float32 activations only, every how many steps their forward keeps
    states (0: none), and whether their inference ops also read bfloat16."""
    module = importlib.import_module(library.kernel_module(device_type))
    return module.FLOAT32_ACTIVATIONS, module.CHECKPOINT_STEPS, module.BF16_INFERENCE
