"""Residual add + RMSNorm in one pass per row, forward and backward: the CPU kernels of the pre-norm ops of
:mod:`visionmamba.ops.library` (each public function runs the op of its name; the C++ is ``scan/csrc/rms_norm.cpp``,
built with the scan's kernels). The same contract as :mod:`visionmamba.ops.norm_triton`: hidden float32 or
bfloat16, the residual float32, the weight's gradient summed per block of rows in a fixed order (deterministic).
"""
from typing import List, Optional, Tuple

import torch

from visionmamba.ops.scan.cpu import load

ROW_BLOCK = 64  # rows per partial sum of the weight's gradient (kRowBlock in rms_norm.cpp)


def _rows(t: Optional[torch.Tensor], dim: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``t`` as contiguous (rows, dim) rows (of ``dtype`` if given), or an empty tensor for an absent one."""
    if t is None:
        return torch.empty(0)
    t = t.reshape(-1, dim)
    return (t if dtype is None else t.to(dtype)).contiguous()


def add_rms_norm(hidden: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (..., D) float32 or bfloat16, residual (..., D) or None, weight (D,) -> (normalised rows in
    hidden's dtype, the new residual in float32, rstd (rows,))."""
    dim = hidden.shape[-1]
    h = _rows(hidden, dim)
    out = torch.empty(h.shape, dtype=torch.float32)
    y, rstd = torch.empty_like(h), torch.empty(h.shape[0], dtype=torch.float32)
    load().rms_norm_forward(h, _rows(residual, dim, torch.float32), weight.float().contiguous(), eps, y, out, rstd)
    return y.view(hidden.shape), out.view(hidden.shape), rstd


def add_rms_norm_backward(dy: torch.Tensor, dout: Optional[torch.Tensor], out: torch.Tensor, rstd: torch.Tensor,
                          weight: torch.Tensor, has_residual: bool) -> List[torch.Tensor]:
    """Gradients of hidden (dy's dtype), of the residual (float32; empty without one) and of the weight."""
    dim = out.shape[-1]
    g, res = _rows(dy, dim), _rows(out, dim, torch.float32)
    dhidden = torch.empty_like(g)
    dresidual = torch.empty(res.shape, dtype=torch.float32) if has_residual else torch.empty(0)
    dw_part = torch.empty(-(-res.shape[0] // ROW_BLOCK), dim, dtype=torch.float32)
    load().rms_norm_backward(g, _rows(dout, dim, torch.float32), res, rstd.float().contiguous(),
                             weight.float().contiguous(), dhidden, dresidual, dw_part)
    return [dhidden.view(out.shape), dresidual.view(out.shape) if has_residual else dresidual,
            dw_part.sum(0).to(weight.dtype)]


def add_rms_norm_(hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Inference's :func:`add_rms_norm` for a caller that owns the residual stream: residual (..., D) float32
    contiguous becomes residual + hidden in place; returns the normalised rows; no gradient."""
    dim = hidden.shape[-1]
    h, res = _rows(hidden, dim), residual.view(-1, dim)
    y = torch.empty_like(h)
    load().rms_norm_forward(h, res, weight.float().contiguous(), eps, y, res, torch.empty(0))
    return y.view(hidden.shape)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The first block's :func:`add_rms_norm_`: no residual yet, and a float32 hidden is the new one as it is,
    so only the normalised rows are written; no gradient."""
    h = _rows(hidden, hidden.shape[-1])
    y = torch.empty_like(h)
    load().rms_norm_forward(h, torch.empty(0), weight.float().contiguous(), eps, y, torch.empty(0), torch.empty(0))
    return y.view(hidden.shape)
