"""The selective scan as a plain loop over the sequence: the specification every backend is tested against.

Imports only torch. Computes in float32 (float64 inputs stay float64, so tests can use it as a float64
oracle too) and returns the dtype of ``u``.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Mamba-1 selective scan, one direction, state h_{-1} = 0.

    Shapes: u, delta, z (batch, E, L); A (E, N); B, C (batch, N, L); D, delta_bias (E,).
    Returns y (batch, E, L) in u's dtype, where

        delta <- softplus(delta + delta_bias)                 (if delta_softplus; threshold 20)
        h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      h: (batch, E, N)
        y_t    = <h_t, C_t> + D * u_t
        y      = y * silu(z)
    """
    out_dtype = u.dtype
    compute = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, channels, _ = u.shape
    # (batch, E, L, N): per-step decay and input injection; unbind keeps the backward cheap.
    decay = torch.exp(delta.unsqueeze(-1) * A[:, None, :])
    inject = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
    h = u.new_zeros(batch, channels, A.shape[1])
    ys = []
    for decay_t, inject_t, c_t in zip(decay.unbind(2), inject.unbind(2), C.unbind(2)):
        h = decay_t * h + inject_t
        ys.append(torch.bmm(h, c_t.unsqueeze(-1)).squeeze(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(out_dtype)
