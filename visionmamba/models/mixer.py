"""The bidirectional Mamba mixer of Vim ("bimamba v2"): the projections and parameters around the scan's
mixer core (:func:`visionmamba.ops.scan.bidirectional`, written plainly in
:func:`visionmamba.ops.scan.reference.bidirectional`).

Parameter names, shapes and registration order follow the official ``Mamba`` module so that official
state dicts load unchanged: own parameters ``A_log, D, A_b_log, D_b`` first, then ``in_proj, conv1d,
x_proj, dt_proj, conv1d_b, x_proj_b, dt_proj_b, out_proj``.
"""
import math
from typing import Optional, Union

import torch
import torch.nn as nn
from timm.models import register_notrace_module

from visionmamba.ops import scan
from visionmamba.ops.linear import Linear


@register_notrace_module  # a leaf for torch.fx: the scan dispatch is Python
class BiMambaMixer(nn.Module):
    """Shared in/out projections, one (conv1d, x_proj, dt_proj, A_log, D) set per direction.

    Input and output (batch, L, dim); E = expand * dim, N = d_state, R = dt_rank. Per direction d (the
    backward one on the sequence reversed in time, its output reversed back):

        x, z  = split(in_proj(hidden))                                       (batch, L, E) each
        u     = silu(conv1d_d(x))            dt, B, C = split(x_proj_d(u))     (batch, L, E) / (R, N, N)
        delta = softplus(dt_proj_d(dt))      A = -exp(A_log_d)                 (batch, L, E), A (E, N)
        h_t   = exp(delta_t A) h_{t-1} + delta_t B_t u_t                       h: (batch, E, N)
        y_d   = (<h_t, C_t> + D_d u_t) * silu(z_t)                             (batch, L, E)
        out   = out_proj((y_0 + y_1) / 2)                                      (batch, L, dim)

    Everything between in_proj and out_proj is :meth:`core`, the scan's fused mixer core, specified by
    :func:`visionmamba.ops.scan.reference.bidirectional`. Everything stays token-major: x and z are views
    of ``in_proj``'s output, the core's output goes to ``out_proj`` as it is.
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
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * dim
        self.dt_rank = math.ceil(dim / 16)
        self.dt_init = (dt_min, dt_max, dt_init_floor)
        self.scan_backend = scan_backend
        inner, rank = self.d_inner, self.dt_rank

        self.A_log = nn.Parameter(torch.empty(inner, d_state, **dd))
        self.D = nn.Parameter(torch.empty(inner, **dd))
        self.A_b_log = nn.Parameter(torch.empty(inner, d_state, **dd))
        self.D_b = nn.Parameter(torch.empty(inner, **dd))
        self._init_state_parameters()

        self.in_proj = Linear(dim, 2 * inner, bias=False, **dd)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1, **dd)
        self.x_proj = Linear(inner, rank + 2 * d_state, bias=False, **dd)
        self.dt_proj = Linear(rank, inner, bias=True, **dd)
        self._init_dt_proj()  # here, to draw random numbers in the official order
        self.conv1d_b = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1, **dd)
        self.x_proj_b = Linear(inner, rank + 2 * d_state, bias=False, **dd)
        self.dt_proj_b = Linear(rank, inner, bias=True, **dd)
        self.out_proj = Linear(inner, dim, bias=False, **dd)

    @torch.no_grad()
    def _init_state_parameters(self) -> None:
        """S4D-real initialisation: A = -(1, 2, ..., N) for every channel (stored as log(-A)); D = 1."""
        a_log = torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device))
        for log_a, skip in ((self.A_log, self.D), (self.A_b_log, self.D_b)):
            log_a.copy_(a_log.expand_as(log_a))
            skip.fill_(1.0)

    @torch.no_grad()
    def _init_dt_proj(self) -> None:
        """Official Mamba dt init, forward direction only (the official code forgets ``dt_proj_b``).

        Weight U(±rank^-1/2); bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max]. The
        backward direction keeps the default Linear init; its bias is zeroed later by
        :func:`visionmamba.models.vim.official_init`, exactly as in the official code (initial delta ln 2).
        """
        dt_min, dt_max, dt_init_floor = self.dt_init
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        bias = self.dt_proj.bias
        dt = torch.exp(torch.rand(self.d_inner, device=bias.device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        bias._no_reinit = True

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw every parameter anew in construction order (the modules' defaults, then the dt init)."""
        self._init_state_parameters()
        for module in (self.in_proj, self.conv1d, self.x_proj, self.dt_proj):
            module.reset_parameters()
        self._init_dt_proj()
        for module in (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.out_proj):
            module.reset_parameters()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (batch, L, dim) -> (batch, L, dim)."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (batch, L, E) each
        return self.out_proj(self.core(x, z))

    @torch.jit.ignore
    def core(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The scan's mixer core of both directions, with this mixer's parameters stacked per direction:
        x, z (batch, L, E) -> (batch, L, E). (Python for TorchScript: the dispatch picks a backend.)"""
        return scan.bidirectional(
            x,
            z,
            torch.stack([self.conv1d.weight[:, 0], self.conv1d_b.weight[:, 0]]),
            torch.stack([self.conv1d.bias, self.conv1d_b.bias]),
            torch.stack([self.x_proj.weight, self.x_proj_b.weight]),
            torch.stack([self.dt_proj.weight, self.dt_proj_b.weight]),
            torch.stack([self.dt_proj.bias, self.dt_proj_b.bias]).float(),
            -torch.exp(torch.stack([self.A_log, self.A_b_log]).float()),
            torch.stack([self.D, self.D_b]).float(),
            backend=self.scan_backend,
        )
