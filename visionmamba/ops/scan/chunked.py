"""The portable pure-PyTorch backend: the scan in chunks, closed form inside a chunk, state carried between.

Inside a chunk of T steps, with S_t the cumulative sum of delta_s A (non-positive, decreasing),
    h_t = exp(S_t) h_0 + sum_{s<=t} exp(S_t - S_s) delta_s B_s u_s,
evaluated as a masked T x T "segment sum": every exponent is <= 0, so nothing overflows however large
delta grows (the single-cumsum trick exp(S_t) * cumsum(exp(-S_s) ...) overflows once sum |delta A| passes
~80). The backward recomputes each chunk from its start state (batch, E, N) and applies hand-written
gradients inside the chunk only (:class:`_ChunkedScan`, an autograd Function): memory is O(batch E N L / T)
plus one chunk's terms, never batch x E x N x L.

The core computes y_t = <h_t, C_t> only; the rest of the contract (delta bias, softplus, D skip, SiLU(z)
gate) is applied around it, forward and backward written out by hand (:func:`forward`, :func:`backward`).
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F

from visionmamba.ops.scan import reference
from visionmamba.ops.scan.reference import compute_dtype, skip_and_gate, step_sizes

CLOSED_FORM_STEPS = 16  # chunk length: the T x T segment sums cost O(T^2) per chunk


def _chunk_terms(u, delta, A, B, C, h0):
    """Shared by forward and backward: (x, W, exp(S), h, y) for one chunk (see the module docstring)."""
    length = u.shape[-1]
    S = (delta.unsqueeze(-1) * A[:, None, :]).cumsum(2)  # (b, E, T, N), non-positive, decreasing
    x = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (b, E, T, N)
    causal = torch.ones(length, length, dtype=torch.bool, device=u.device).tril()
    # (b, E, t, s, N), in place on one temporary (no autograd records these: the backward is hand-written)
    W = (S.unsqueeze(3) - S.unsqueeze(2)).masked_fill_(~causal[:, :, None], float("-inf")).exp_()
    eS = S.exp()
    h = (W * x.unsqueeze(2)).sum(3) + eS * h0.unsqueeze(2)
    y = (h * C.transpose(1, 2).unsqueeze(1)).sum(-1)
    return x, W, eS, h, y


def _chunk(u, delta, A, B, C, h0) -> Tuple[torch.Tensor, torch.Tensor]:
    """One chunk. u, delta (b, E, T); A (E, N); B, C (b, N, T); h0 (b, E, N) -> y (b, E, T), h_T (b, E, N)."""
    _, _, _, h, y = _chunk_terms(u, delta, A, B, C, h0)
    return y, h[:, :, -1]


def _chunk_backward(u, delta, A, B, C, h0, dy, dh_end):
    """Hand-written gradients of :func:`_chunk` given dL/dy (b, E, T) and dL/dh_T (b, E, N).

    Returns y and (du, ddelta, dA, dB, dC, dh0).
    """
    x, W, eS, h, y = _chunk_terms(u, delta, A, B, C, h0)
    Bt, Ct = B.transpose(1, 2).unsqueeze(1), C.transpose(1, 2).unsqueeze(1)  # (b, 1, T, N)
    dh = dy.unsqueeze(-1) * Ct
    dh[:, :, -1] += dh_end
    dC = (dy.unsqueeze(-1) * h).sum(1).transpose(1, 2)
    dx = (W * dh.unsqueeze(3)).sum(2)  # over t >= s
    dseg = W * dh.unsqueeze(3) * x.unsqueeze(2)  # d/d(S_t - S_s)
    dS = dseg.sum(3) - dseg.sum(2) + dh * eS * h0.unsqueeze(2)
    dh0 = (dh * eS).sum(2)
    ddA = dS.flip(2).cumsum(2).flip(2)  # S is a cumulative sum of delta * A
    dx_B = (dx * Bt).sum(-1)
    ddelta = (ddA * A[:, None, :]).sum(-1) + dx_B * u
    dA = (ddA * delta.unsqueeze(-1)).sum((0, 2))
    dB = (dx * (delta * u).unsqueeze(-1)).sum(1).transpose(1, 2)
    return y, (dx_B * delta, ddelta, dA, dB, dC, dh0)


def _bounds(length: int) -> List[Tuple[int, int]]:
    return [(start, min(start + CLOSED_FORM_STEPS, length)) for start in range(0, length, CLOSED_FORM_STEPS)]


def _forward_with_states(u, delta, A, B, C) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys, starts = [], []
    for lo, hi in _bounds(u.shape[-1]):
        starts.append(h)
        y, h = _chunk(u[..., lo:hi], delta[..., lo:hi], A, B[..., lo:hi], C[..., lo:hi], h)
        ys.append(y)
    return torch.cat(ys, dim=-1), starts


def core_forward(u, delta, A, B, C) -> torch.Tensor:
    """y_t = <h_t, C_t> for inputs already in the compute dtype, delta final (bias and softplus applied)."""
    with torch.no_grad():
        return _forward_with_states(u, delta, A, B, C)[0]


def core_backward(u, delta, A, B, C, dy) -> Tuple[torch.Tensor, ...]:
    """(du, ddelta, dA, dB, dC, y) of :func:`core_forward` given dL/dy; y is recomputed anyway."""
    with torch.no_grad():
        _, starts = _forward_with_states(u, delta, A, B, C)
    y, du, ddelta, dB, dC = (torch.empty_like(t) for t in (u, u, delta, B, C))
    dA = torch.zeros_like(A)
    carry = torch.zeros_like(starts[0])  # dL/dh at the end of the chunk
    for (lo, hi), h0 in zip(reversed(_bounds(u.shape[-1])), reversed(starts)):
        y[..., lo:hi], grads = _chunk_backward(
            u[..., lo:hi], delta[..., lo:hi], A, B[..., lo:hi], C[..., lo:hi], h0, dy[..., lo:hi], carry
        )
        du[..., lo:hi], ddelta[..., lo:hi], g_A, dB[..., lo:hi], dC[..., lo:hi], carry = grads
        dA += g_A
    return du, ddelta, dA, dB, dC, y


def forward(u, delta, A, B, C, D, z, delta_bias, softplus) -> torch.Tensor:
    """The whole contract around :func:`core_forward`; returns u's dtype."""
    ct = compute_dtype(u.dtype)
    uf = u.to(ct)
    delta = step_sizes(delta.to(ct), delta_bias, F.softplus if softplus else None)
    return skip_and_gate(core_forward(uf, delta, A.to(ct), B.to(ct), C.to(ct)), uf, D, z).to(u.dtype)


def backward(u, delta, A, B, C, D, z, delta_bias, softplus, dout):
    """Gradients of :func:`forward` for every input (None where the input is None)."""
    ct = compute_dtype(u.dtype)
    uf, dout = u.to(ct), dout.to(ct)
    raw = delta.to(ct) + (delta_bias.to(ct)[:, None] if delta_bias is not None else 0)
    d = F.softplus(raw) if softplus else raw
    if z is not None:
        zf = z.to(ct)
        sig = torch.sigmoid(zf)
        dy1 = dout * zf * sig  # out = y1 * silu(z)
    else:
        dy1 = dout
    du, ddelta, dA, dB, dC, y = core_backward(uf, d, A.to(ct), B.to(ct), C.to(ct), dy1)
    dD = dz = None
    if D is not None:
        du = du + dy1 * D.to(ct)[:, None]
        dD = (dy1 * uf).sum((0, 2)).to(D.dtype)
        y = y + uf * D.to(ct)[:, None]
    if z is not None:
        dz = (dout * y * sig * (1 + zf * (1 - sig))).to(z.dtype)
    if softplus:
        ddelta = ddelta * torch.sigmoid(raw).masked_fill(raw > 20, 1.0)  # softplus threshold 20: identity above
    ddelta_bias = ddelta.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, dz, ddelta_bias)


class _ChunkedScan(torch.autograd.Function):
    """:func:`forward` with :func:`backward` as its gradient (nothing but the inputs is saved)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.softplus = softplus
        return forward(u, delta, A, B, C, D, z, delta_bias, softplus)

    @staticmethod
    def backward(ctx, dout):
        return (*backward(*ctx.saved_tensors, ctx.softplus, dout), None)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> torch.Tensor:
    """The contract of :func:`visionmamba.ops.scan.reference.selective_scan`, in chunks."""
    return _ChunkedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def bidirectional(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D) -> torch.Tensor:
    """The reference mixer core (:func:`visionmamba.ops.scan.reference.bidirectional`) on this scan."""
    return reference.bidirectional(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D,
                                   scan=selective_scan)
