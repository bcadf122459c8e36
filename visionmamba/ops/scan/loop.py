"""The scan as a loop that exported graphs keep: PyTorch's ``scan`` operator over chunks of steps.

Why: the reference loop is unrolled by every tracer (one graph per sequence length, and an export of
Vim-Ti at 224 that never finishes); the kernel backends are custom ops no other runtime knows. Written
with :func:`torch._higher_order_ops.scan.scan`, the recurrence stays a loop: ``torch.export`` keeps it for
any sequence length and ``torch.onnx`` writes it as one ONNX ``Scan`` node, so one exported file serves
every batch size and resolution.

The layout is chosen for runtimes that execute one elementwise operator at a time (ONNX Runtime): the
state is (sequences, N, E) so that E, the longest axis, is contiguous and every broadcast is along a
leading axis; each loop iteration runs :data:`STEPS_PER_ITERATION` steps unrolled (the per-iteration
cost of ``Scan`` is then paid once per 8 steps); step inputs are sliced with keep-dim splits (no
squeezes); the output contraction <h_t, C_t> is a small matrix product per step. The bidirectional core
runs both directions as one scan: time-major (L, batch, 2E) with the backward direction reversed in time,
so the per-direction projections are single matrix products with block-diagonal weights.

Forward and backward (autograd through the scan operator) match the reference; it is the backend the
exporters use, not a fast path for PyTorch itself.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch._higher_order_ops.scan import scan_op

from visionmamba.ops.scan.reference import compute_dtype, skip_and_gate, step_sizes

STEPS_PER_ITERATION = 8  # measured best in ONNX Runtime at Vim-Ti shapes among 1, 4, 8, 16 (benchmarks/RESULTS.md)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus(x) = log(1 + exp(x)) from operators every runtime vectorises (ONNX Runtime's own Softplus is
    scalar code; benchmarks/RESULTS.md). Equal to F.softplus to rounding: above its
    threshold of 20 the log term is below half an ulp of x."""
    return x.clamp_min(0) + torch.log(1 + torch.exp(-x.abs()))


def scan_states(delta: torch.Tensor, du: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                steps: int = STEPS_PER_ITERATION) -> torch.Tensor:
    """y_t = <h_t, C_t> with h_t = exp(delta_t A) h_{t-1} + B_t (delta_t u_t), h_{-1} = 0, for every sequence.

    Time-major: delta, du (L, S, E); B, C (L, S, N); A (S, N, E) (or broadcastable to it). L must be a
    multiple of ``steps``, the steps per loop iteration (pad at the end: later steps never change earlier
    outputs). Returns y (L, S, E).
    """
    length, seqs, channels = delta.shape
    state = B.shape[-1]
    A = A.contiguous()  # the state takes A's layout, and the loop needs it equal to the start state's

    def chunks(t: torch.Tensor, axis: int) -> torch.Tensor:  # (L, S, F) -> (L / steps, steps, S, F) with a unit axis
        return t.reshape(length // steps, steps, seqs, t.shape[-1]).unsqueeze(axis)

    def body(h: torch.Tensor, A: torch.Tensor, deltas: torch.Tensor, dus: torch.Tensor, Bs: torch.Tensor, Cs: torch.Tensor):
        deltas, dus, Bs, Cs = (t.split(1) for t in (deltas, dus, Bs, Cs))  # each (1, S, ., .)
        ys = []
        for k in range(steps):
            h = torch.exp(deltas[k] * A) * h + torch.matmul(Bs[k], dus[k])  # (1, S, N, E)
            ys.append(torch.matmul(Cs[k], h))  # (1, S, 1, E)
        return [h, A.clone(), torch.cat(ys)]

    h0 = delta.new_zeros(1, seqs, state, channels)
    xs = [chunks(delta, -2), chunks(du, -2), chunks(B, -1), chunks(C, -2)]
    # A rides along as a loop-carried value, not an outer one: torch.onnx writes an outer input as a name the
    # Scan body reads from the enclosing graph, which OpenVINO cannot read ("Number of Scan node inputs ...")
    _, _, y = scan_op(body, [h0, A], xs, ())
    return y.reshape(length, seqs, channels)


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
    """One direction, the contract of :func:`visionmamba.ops.scan.reference.selective_scan`."""
    out_dtype, compute = u.dtype, compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    delta = step_sizes(delta, delta_bias, softplus if delta_softplus else None)
    length = u.shape[-1]
    pad = (0, 0, 0, 0, 0, -length % STEPS_PER_ITERATION)

    def time_major(t: torch.Tensor) -> torch.Tensor:  # (batch, F, L) -> (L + pad, batch, F)
        return F.pad(t.permute(2, 0, 1), pad)

    y = scan_states(time_major(delta), time_major(delta * u), A.t(), time_major(B), time_major(C))
    return skip_and_gate(y[:length].permute(1, 2, 0), u, D, z).to(out_dtype)


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
) -> torch.Tensor:
    """Vim's mixer core, the contract of :func:`visionmamba.ops.scan.reference.bidirectional`, both
    directions in one scan over the time-major stream (L, batch, 2E) (forward channels, then the backward
    direction's, reversed in time). The depthwise convolution runs channel-major as one grouped Conv (faster
    in ONNX Runtime than shifted slices of the time-major stream: 0.58 vs 0.61 s per Vim-Ti batch of 8)."""
    out_dtype, compute = x.dtype, compute_dtype(x.dtype)
    batch, length, channels = x.shape
    taps, rank, state = conv_weight.shape[-1], dt_proj_weight.shape[-1], A.shape[-1]
    x = x.to(compute).transpose(1, 2)  # (batch, E, L)
    # causal zero history in front, the chunk padding behind (it only follows the real steps)
    stream = F.pad(torch.cat([x, x.flip(-1)], 1), (taps - 1, -length % STEPS_PER_ITERATION))
    u = F.conv1d(stream, conv_weight.to(compute).reshape(2 * channels, 1, taps), conv_bias.to(compute).reshape(-1),
                 groups=2 * channels).permute(2, 0, 1)  # time-major
    padded = u.shape[0]
    u = F.silu(u)  # (Lp, batch, 2E)
    dbc = F.linear(u, torch.block_diag(*x_proj_weight.to(compute)))  # (Lp, batch, 2(R + 2N))
    dt, B, C = dbc.unflatten(-1, (2, rank + 2 * state)).split([rank, state, state], dim=-1)
    delta = F.linear(dt.flatten(-2), torch.block_diag(*dt_proj_weight.to(compute)), dt_proj_bias.to(compute).reshape(-1))
    delta = softplus(delta)

    def per_sequence(t: torch.Tensor) -> torch.Tensor:  # (Lp, batch, 2F) or (Lp, batch, 2, F) -> (Lp, 2 batch, F)
        return t.reshape(padded, 2 * batch, t.shape[-1] // 2 if t.dim() == 3 else t.shape[-1])

    y = scan_states(per_sequence(delta), per_sequence(delta * u), A.to(compute).transpose(1, 2).repeat(batch, 1, 1),
                    per_sequence(B), per_sequence(C))
    y = (y.reshape(padded, batch, 2 * channels) + u * D.to(compute).reshape(-1))[:length].unflatten(-1, (2, channels))
    y = (y[:, :, 0] + y[:, :, 1].flip(0)) / 2  # the backward direction back in forward time
    return (y * F.silu(z.to(compute).transpose(0, 1))).transpose(0, 1).to(out_dtype)


def bi_scan(u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
            z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The op ``bi_scan``'s contract for inference (:mod:`visionmamba.ops.library`) as one scan: u (2, b, L, E);
    x_proj_out (2, b, L, R + 2N); dt_weight (2, E, R); A (2, E, N); D, bias (2, E); z (b, L, E) -> (b, L, E).
    The body of the ONNX node ``visionmamba.BiSelectiveScan`` in runtimes without its kernel."""
    _, batch, length, channels = u.shape
    rank, state = dt_weight.shape[-1], A.shape[-1]
    compute = compute_dtype(u.dtype)
    u, x_proj_out = (torch.cat([t[:1], t[1:].flip(2)]).to(compute) for t in (u, x_proj_out))  # direction 1 reversed
    dt, B, C = x_proj_out.split([rank, state, state], dim=-1)
    delta = softplus(torch.matmul(dt, dt_weight.to(compute).transpose(1, 2)[:, None]) + bias.to(compute)[:, None, None])

    def per_sequence(t: torch.Tensor) -> torch.Tensor:  # (2, b, L, F) -> (L + pad, 2b, F), time-major
        t = t.permute(2, 0, 1, 3).reshape(length, 2 * batch, t.shape[-1])
        return F.pad(t, (0, 0, 0, 0, 0, -length % STEPS_PER_ITERATION))

    A_seq = A.to(compute).transpose(1, 2)[:, None].expand(2, batch, state, channels).reshape(2 * batch, state, channels)
    y = scan_states(per_sequence(delta), per_sequence(delta * u), A_seq, per_sequence(B), per_sequence(C))
    y = y[:length].reshape(length, 2, batch, channels).permute(1, 2, 0, 3) + u * D.to(compute)[:, None, None]
    y = (y[0] + y[1].flip(1)) / 2  # the backward direction back in forward time
    return (y * F.silu(z.to(compute))).to(z.dtype)
