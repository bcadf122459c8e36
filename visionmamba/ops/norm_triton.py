"""Residual add + RMSNorm as one Triton kernel, forward and backward: the CUDA kernels of the pre-norm ops of
:mod:`visionmamba.ops.library` (each public function runs the op of its name).

One program normalises ROWS rows of D (a power-of-two block) features: it reads hidden (any dtype) and the
float32 residual once, writes the new residual (float32), the normalised rows (hidden's dtype) and one
reciprocal RMS per row for the backward. The backward reads dy, the residual's incoming gradient, the saved
residual and rstd once and writes both input gradients; the weight's gradient is summed per program, then
over programs in a fixed order (deterministic).
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from visionmamba.ops.devices import current_device_of

ROWS = 4


@triton.jit
def _tile(n_rows, D, s_row, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program's ROWS rows: their indices, the features', the tile's mask and its offsets (64-bit: rows x
    row stride passes 2^31 elements at large batches and resolutions, e.g. Vim-B at 2048x2048, batch 171)."""
    o_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    o_d = tl.arange(0, BLOCK_D)
    return o_r, o_d, (o_r < n_rows)[:, None] & (o_d < D)[None, :], o_r.to(tl.int64)[:, None] * s_row + o_d[None, :]


@triton.jit
def _add_rms_norm_fwd_kernel(hidden, residual, weight, y, out, rstd, n_rows, D, s_row, eps,
                             HAS_RESIDUAL: tl.constexpr, STORE_OUT: tl.constexpr, ROWS: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    o_r, o_d, m, p = _tile(n_rows, D, s_row, ROWS, BLOCK_D)
    x = tl.load(hidden + p, mask=m, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual + p, mask=m, other=0.0)
    if STORE_OUT:
        tl.store(out + p, x, mask=m)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    tl.store(rstd + o_r, r, mask=o_r < n_rows)
    w = tl.load(weight + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    tl.store(y + p, (x * r[:, None] * w[None, :]).to(y.dtype.element_ty), mask=m)


@triton.jit
def _add_rms_norm_bwd_kernel(dy, dout, out, rstd, weight, dhidden, dresidual, dw_part, n_rows, D, s_row,
                             HAS_DOUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    o_r, o_d, m, p = _tile(n_rows, D, s_row, ROWS, BLOCK_D)
    r = tl.load(rstd + o_r, mask=o_r < n_rows, other=0.0)
    xhat = tl.load(out + p, mask=m, other=0.0) * r[:, None]
    g = tl.load(dy + p, mask=m, other=0.0).to(tl.float32)
    wg = g * tl.load(weight + o_d, mask=o_d < D, other=0.0).to(tl.float32)[None, :]
    dx = r[:, None] * (wg - xhat * (tl.sum(wg * xhat, axis=1) / D)[:, None])
    if HAS_DOUT:
        dx += tl.load(dout + p, mask=m, other=0.0)
    tl.store(dhidden + p, dx.to(dhidden.dtype.element_ty), mask=m)
    if HAS_RESIDUAL:
        tl.store(dresidual + p, dx, mask=m)
    tl.store(dw_part + tl.program_id(0) * D + o_d, tl.sum(g * xhat, axis=0), mask=o_d < D)


def fwd_launch(hidden, residual, weight, eps: float, y, out, rstd):
    """(kernel, grid, arguments), for the launcher and benchmarks/gpu_static.py. ``out`` None: the new
    residual is not written (it is hidden itself, float32, and the caller keeps that)."""
    rows, dim = hidden.shape
    out_ = out if out is not None else y
    args = dict(hidden=hidden, residual=residual if residual is not None else out_, weight=weight, y=y, out=out_,
                rstd=rstd, n_rows=rows, D=dim, s_row=_row_stride(hidden, residual, y, out), eps=eps, HAS_RESIDUAL=residual is not None, STORE_OUT=out is not None,
                ROWS=ROWS, BLOCK_D=triton.next_power_of_2(dim))
    return _add_rms_norm_fwd_kernel, (triton.cdiv(rows, ROWS),), args


def bwd_launch(dy, dout, out, rstd, weight, dhidden, dresidual, dw_part):
    rows, dim = out.shape
    args = dict(dy=dy, dout=dout if dout is not None else out, out=out, rstd=rstd, weight=weight, dhidden=dhidden,
                dresidual=dresidual if dresidual is not None else out, dw_part=dw_part, n_rows=rows, D=dim,
                s_row=_row_stride(dy, dout, out, dhidden, dresidual),
                HAS_DOUT=dout is not None, HAS_RESIDUAL=dresidual is not None, ROWS=ROWS,
                BLOCK_D=triton.next_power_of_2(dim))
    return _add_rms_norm_bwd_kernel, (triton.cdiv(rows, ROWS),), args


def _row_stride(*tiles: Optional[torch.Tensor]) -> int:
    """The one row stride of the (rows, D) tensors a kernel reads and writes (features contiguous)."""
    strides = {t.stride() for t in tiles if t is not None}
    if len(strides) != 1 or next(iter(strides))[1] != 1:
        raise ValueError(f"expected (rows, D) tensors with one row stride and contiguous features, got strides {strides}")
    return next(iter(strides))[0]


def _run(launch) -> None:
    kernel, grid, args = launch
    with current_device_of(args["weight"]):
        kernel[grid](**args)


def add_rms_norm(hidden: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (..., D) any float dtype, residual (..., D) float32 or None, weight (D,) -> (normalised rows in
    hidden's dtype, the new residual in float32, rstd (rows,))."""
    dim = hidden.shape[-1]
    res = None if residual is None else residual.reshape(-1, dim).float().contiguous()
    out = torch.empty(hidden.numel() // dim, dim, device=hidden.device, dtype=torch.float32)
    y, rstd = _forward(hidden, res, out, weight, eps)
    return y, out.view(hidden.shape), rstd


def add_rms_norm_backward(dy: torch.Tensor, dout: Optional[torch.Tensor], out: torch.Tensor, rstd: torch.Tensor,
                          weight: torch.Tensor, has_residual: bool) -> List[torch.Tensor]:
    """Gradients of hidden (dy's dtype), of the residual (float32; empty without one) and of the weight."""
    dim = out.shape[-1]
    rows = out.numel() // dim
    g = dy.reshape(rows, dim).contiguous()
    d_out = None if dout is None else dout.reshape(rows, dim).float().contiguous()
    dhidden = torch.empty(rows, dim, device=dy.device, dtype=dy.dtype)
    dresidual = torch.empty(rows, dim, device=dy.device, dtype=torch.float32) if has_residual else None
    dw_part = torch.empty(triton.cdiv(rows, ROWS), dim, device=dy.device, dtype=torch.float32)
    _run(bwd_launch(g, d_out, out.reshape(rows, dim), rstd, weight, dhidden, dresidual, dw_part))
    empty = dy.new_empty(0, dtype=torch.float32)
    return [dhidden.view(out.shape), empty if dresidual is None else dresidual.view(out.shape),
            dw_part.sum(0).to(weight.dtype)]


def add_rms_norm_(hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Inference's :func:`add_rms_norm`, for a caller that owns the residual stream: residual (..., D)
    float32 contiguous becomes residual + hidden in place (each element read before it is written, by the
    same program); returns the normalised rows; no gradient. Saves a residual-sized float32 buffer per
    block (0.56 GiB for Vim-Ti at 1248x1248, batch 128)."""
    res = residual.view(-1, hidden.shape[-1])
    return _forward(hidden, res, res, weight, eps)[0]


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The first block's :func:`add_rms_norm_`: no residual yet, and a float32 hidden is the new one as it
    is, so only the normalised rows are written; no gradient."""
    return _forward(hidden, None, None, weight, eps)[0]


def _forward(hidden: torch.Tensor, residual: Optional[torch.Tensor], out: Optional[torch.Tensor], weight: torch.Tensor,
             eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel on hidden (..., D) and the (rows, D) float32 residual and new residual (either may be
    None; ``out`` may be ``residual``): (the normalised rows in hidden's shape and dtype, rstd (rows,))."""
    dim = hidden.shape[-1]
    h = hidden.reshape(-1, dim).contiguous()
    y = torch.empty(h.shape, device=h.device, dtype=hidden.dtype)
    rstd = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
    _run(fwd_launch(h, residual, weight, eps, y, out, rstd))
    return y.view(hidden.shape), rstd
