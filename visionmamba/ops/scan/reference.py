"""The specification: the selective scan as a plain loop over the sequence, and Vim's bidirectional mixer
core written plainly around it. Every other backend is tested against these two functions.

Imports only torch. Computes in float32 (float64 inputs stay float64, so tests can use it as a float64
oracle too) and returns the dtype of the input.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scan computes in for inputs of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def step_sizes(delta: torch.Tensor, delta_bias: Optional[torch.Tensor],
               softplus: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """delta + delta_bias (per channel, in delta's dtype), through ``softplus`` when given: the scan's delta."""
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    return softplus(delta) if softplus is not None else delta


def skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor]) -> torch.Tensor:
    """y + D u, then times silu(z) (each when given), in y's dtype: the scan's output around the recurrence."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


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
    compute = compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    delta = step_sizes(delta, delta_bias, F.softplus if delta_softplus else None)
    batch, channels, _ = u.shape
    # (batch, E, L, N): per-step decay and input injection; unbind keeps the backward cheap.
    decay = torch.exp(delta.unsqueeze(-1) * A[:, None, :])
    inject = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
    h = u.new_zeros(batch, channels, A.shape[1])
    ys = []
    for decay_t, inject_t, c_t in zip(decay.unbind(2), inject.unbind(2), C.unbind(2)):
        h = decay_t * h + inject_t
        ys.append(torch.bmm(h, c_t.unsqueeze(-1)).squeeze(-1))
    return skip_and_gate(torch.stack(ys, dim=-1), u, D, z).to(out_dtype)


def bidirectional(
    x: torch.Tensor,
    z: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    *,
    scan: Callable[..., torch.Tensor] = selective_scan,
) -> torch.Tensor:
    """Vim's bidirectional mixer core, the specification of every fused one: per direction d (0 forward,
    1 backward, the backward one on the sequence reversed in time)

        u     = silu(causal depthwise conv(x; conv_weight[d], conv_bias[d]))      (batch, L, E)
        dt, B, C = split(u x_proj_weight[d]^T, [R, N, N])                          (batch, L, R / N / N)
        delta = softplus(dt dt_proj_weight[d]^T + dt_proj_bias[d])                 (batch, L, E)
        h_t   = exp(delta_t A[d]) h_{t-1} + delta_t B_t u_t                        h: (batch, E, N)
        y_d   = (<h_t, C_t> + D[d] u_t) * silu(z_t)                                (batch, L, E)

    and the result is (y_0 + flip(y_1)) / 2, (batch, L, E) in x's dtype. x, z token-major (strided views of
    in_proj's output are fine); the parameters of the two directions stacked on a leading axis of 2:
    conv_weight (2, E, K), conv_bias (2, E), x_proj_weight (2, R + 2N, E), dt_proj_weight (2, E, R),
    dt_proj_bias (2, E), A (2, E, N) (= -exp(A_log)), D (2, E). ``scan`` is the one-direction scan (another
    backend's, for the unfused paths); it adds the bias and applies the softplus itself.
    """
    length, channels, taps = x.shape[1], x.shape[2], conv_weight.shape[-1]
    rank, state = dt_proj_weight.shape[-1], A.shape[-1]

    def direction(x: torch.Tensor, z: torch.Tensor, d: int) -> torch.Tensor:
        u = F.conv1d(x.transpose(1, 2), conv_weight[d][:, None], conv_bias[d], padding=taps - 1, groups=channels)
        u = F.silu(u[..., :length])  # (batch, E, L): the causal part of the padded convolution
        dt, B, C = F.linear(u.transpose(1, 2), x_proj_weight[d]).split([rank, state, state], dim=-1)
        delta = F.linear(dt, dt_proj_weight[d]).transpose(1, 2)  # (batch, E, L); bias and softplus in the scan
        y = scan(u, delta, A[d], B.transpose(1, 2), C.transpose(1, 2), D=D[d], z=z.transpose(1, 2),
                 delta_bias=dt_proj_bias[d], delta_softplus=True)
        return y.transpose(1, 2)

    return (direction(x, z, 0) + direction(x.flip(1), z.flip(1), 1).flip(1)) / 2
