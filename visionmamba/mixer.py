"""The bidirectional Mamba mixer of Vim ("bimamba v2"); the only caller of ``scan.selective_scan``.

Parameter names, shapes and registration order follow the official ``Mamba`` module so that official
state dicts load unchanged: own parameters ``A_log, D, A_b_log, D_b`` first, then ``in_proj, conv1d,
x_proj, dt_proj, conv1d_b, x_proj_b, dt_proj_b, out_proj``.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import scan


class BiMambaMixer(nn.Module):
    """Shared in/out projections, one (conv1d, x_proj, dt_proj, A_log, D) set per direction.

    Input and output (batch, L, dim). The backward direction is the forward computation applied to the
    sequence reversed in time, then reversed back; the two directions are averaged.
    """

    def __init__(
        self,
        dim: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * dim
        self.dt_rank = math.ceil(dim / 16)
        self.scan_backend = scan_backend
        inner, rank = self.d_inner, self.dt_rank

        # S4D-real initialisation: A = -(1, 2, ..., N) for every channel; D = 1.
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1)
        self.A_log = nn.Parameter(a_log.clone())
        self.D = nn.Parameter(torch.ones(inner))
        self.A_b_log = nn.Parameter(a_log.clone())
        self.D_b = nn.Parameter(torch.ones(inner))

        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(rank, inner, bias=True)
        self._init_dt_proj(dt_min, dt_max, dt_init_floor)  # here, to draw random numbers in the official order
        self.conv1d_b = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj_b = nn.Linear(inner, rank + 2 * d_state, bias=False)
        self.dt_proj_b = nn.Linear(rank, inner, bias=True)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    @torch.no_grad()
    def _init_dt_proj(self, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        """Official Mamba dt init, forward direction only (the official code forgets ``dt_proj_b``).

        Weight U(±rank^-1/2); bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max]. The
        backward direction keeps the default Linear init; its bias is zeroed later by
        :func:`visionmamba.model.init_weights`, exactly as in the official code (initial delta ln 2).
        """
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

    def _direction(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        conv1d: nn.Conv1d,
        x_proj: nn.Linear,
        dt_proj: nn.Linear,
        A_log: torch.Tensor,
        D: torch.Tensor,
    ) -> torch.Tensor:
        """One causal direction. x, z: (batch, E, L) -> gated scan output (batch, E, L)."""
        length = x.shape[-1]
        u = F.silu(conv1d(x)[..., :length])  # causal depthwise conv: keep the first L outputs
        x_dbl = x_proj(u.transpose(1, 2))  # (batch, L, rank + 2N)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # bias is added inside the scan
        return scan.selective_scan(
            u,
            delta,
            -torch.exp(A_log.float()),
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=D.float(),
            z=z,
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (batch, L, dim) -> (batch, L, dim)."""
        xz = self.in_proj(hidden).transpose(1, 2)  # (batch, 2E, L)
        x, z = xz.chunk(2, dim=1)
        y_fwd = self._direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y_bwd = self._direction(
            x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
        ).flip(-1)
        return self.out_proj(((y_fwd + y_bwd) / 2).transpose(1, 2))
