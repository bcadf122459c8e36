"""The pre-norm step of a Vim block: ``residual + hidden`` (float32) and its RMSNorm in one pass.

The official code runs this as one fused kernel (``layer_norm_fn(..., prenorm=True, residual_in_fp32=True,
is_rms_norm=True)``); :func:`fused` runs it as the ops ``add_rms_norm`` (``add_rms_norm_`` and ``rms_norm`` in
place, for inference) of :mod:`visionmamba.ops.library`, whose kernels are Triton's on CUDA and C++ on the CPU:
the blocks use it on those scan paths. :func:`reference` is the formula it is tested against (elsewhere the
blocks keep timm's ``RmsNorm``).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from visionmamba.ops import library  # noqa: F401  (declares the ops)


def reference(hidden: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + hidden) * weight in hidden's dtype, residual + hidden in float32 (or wider)).
    Without a residual (the first block) the new residual is ``hidden`` itself."""
    wide = torch.promote_types(hidden.dtype, torch.float32)
    out = hidden.to(wide) if residual is None else residual + hidden
    return F.rms_norm(out, (out.shape[-1],), weight.to(out.dtype), eps).to(hidden.dtype), out


def fused(hidden: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
          inplace: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference` as one kernel, forward and backward (a float32 residual; the Triton and CPU paths).
    With ``inplace`` (for a caller that owns the residual stream: the model's own block loop) and nothing
    to differentiate, the residual is updated in place and returned (the first block's float32 hidden
    becomes the residual as it is)."""
    ops = torch.ops.visionmamba
    eps = float(eps)
    if inplace and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, residual, weight))):
        if residual is None and _float32_rows(hidden):
            return ops.rms_norm(hidden, weight, eps), hidden
        if residual is not None and _float32_rows(residual) and residual.shape == hidden.shape:
            return ops.add_rms_norm_(hidden, residual, weight, eps), residual
    y, out, _ = ops.add_rms_norm(hidden, residual, weight, eps)
    return y, out


def _float32_rows(t: torch.Tensor) -> bool:
    """A tensor the kernel can use as the residual in place: float32, contiguous."""
    return t.dtype == torch.float32 and t.is_contiguous()
