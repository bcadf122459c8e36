"""The CUDA kernels of the fused scan ops (:mod:`visionmamba.ops.library`): Triton, forward and backward,
one or both directions per launch.

Layers: ``_*_kernel`` (Triton) -> ``*_launch`` (allocation, grid, arguments: one function per kernel, used
by the launchers and by ``benchmarks/gpu_static.py``, so the machine code measured is the code that runs)
-> launchers -> the op kernels, each public function named after the op it runs (same arguments and
results as the CPU kernels of ``cpu.py``; the conversions to the kernels' layouts happen here).

Designed for the hardware (the SASS each choice produced is in benchmarks/RESULTS.md, "GPU kernels"):

* Token-major: activations are (direction, batch, L, E) with the channels contiguous, so each step of a
  program loads one coalesced row of its channels; ``x`` and ``z`` are read as the strided views of
  ``in_proj``'s output they are, and the direction that runs backwards walks the rows backwards (no flip,
  no transpose, no copy).
* A thread owns whole channels: the state is a tuple of N vectors over the program's channels (one per
  state, unrolled with ``tl.static_range``), so ``y = sum_n C_n h_n`` is in-thread arithmetic: no shuffle,
  no barrier, no shared memory in the forward step. B and C of a step are scalars shared by all the
  program's channels (two per 64-bit load where they are float32 rows, as in the mixer); the next step's
  inputs are loaded before the current step's arithmetic.
* softplus(delta + bias), the D skip, the SiLU(z) gate and the halving of each direction's output are
  fused; the two directions' outputs are written side by side (over u in inference, where u is dead) and
  added by one elementwise op, no atomics (the fp32 atomic sum and its conversion pass were as much traffic
  and needed a float32 buffer the size of the output).
  The forward saves the state every CHECKPOINT_STEPS steps; the backward recomputes each chunk from its
  saved state into a program-private scratch (each thread reads back only what it wrote), then walks it
  in reverse, reading only h_t (a h_{t-1} = h_t - B_t delta_t u_t). The 2N sums over channels of a step
  (dB_t, dC_t) are one reduce-scatter within the warp: 31 shuffles, no barrier.
* ``@triton.autotune`` picks the channels per program and warps on the user's GPU (keys: channels, a
  length bucket, the state size, in the forward dt_proj's fused rank and whether states are saved, and the
  dtypes, which Triton's autotuner adds to every key). Buffers are sized for every config of the GPU list
  and each kernel finds its part by strides, so whichever config runs, after whichever trials, is right.
* Offsets scaled by the batch index are 64-bit (:func:`_program_ids`): past 2^31 elements at high
  resolution and batch; the launches run on their tensors' GPU, not the current one.

Determinism: reductions over channels, batch or time run in a fixed order within a program and go to
per-program partial buffers summed afterwards in a fixed order. The only atomics (the backward's dz) add
exactly two terms (one per direction) to a zeroed buffer, and 0 + a + b == 0 + b + a in floating point, so
results do not depend on scheduling.
"""
import os
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from visionmamba.ops.devices import current_device_of
from visionmamba.ops.library import gradients_like

CHECKPOINT_STEPS = 64  # steps between the saved states the backward restarts from


def checkpoint_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved states for activations of ``dtype``: the kernels compute in float32."""
    return torch.float32
FLOAT32_ACTIVATIONS = False  # the kernels read the activations in their own dtype (bf16 under autocast)
BF16_INFERENCE = False  # (it reads every activation dtype: the float32 rule does not apply)
# Inference computes delta = dt dt_proj in the scan when dt_proj's rank is at most this: at Vim-Ti's 12 the
# forward stays under its MUFU bound (9.8 instructions per state-element-step against 10.0 on sm_90), at
# Vim-S's 24 and Vim-B's 48 it would not (11.5, 13.1), so there delta is written out (benchmarks/gpu_static.py).
FUSED_DT_RANK = 16
CONV_BLOCK_E = 32
CONV_BLOCK_T = 32
LOG2E = 1.4426950408889634
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
# Triton's interpreter has no libdevice: there the softplus takes the precise log2 (same formula).
FAST_MATH = not INTERPRETER


def scan_configs(backward: bool, interpreter: bool = INTERPRETER) -> List[triton.Config]:
    """Channels per thread x warps. The forward takes two or four channels per thread (one leaves the N
    scalar B and C loads of a step shared by too few channels: 11.3 instructions per state-element-step
    against 9.1 and 8.4) and one, two or four warps. The backward takes one warp (its sums over channels
    are a reduce-scatter within the warp; across warps they would need a barrier a step) and two or one
    channels per thread (four spill). The interpreter, where there is nothing to tune, runs the first."""
    pairs = [(2, 1), (4, 1), (2, 2), (2, 4)] if not backward else [(2, 1), (1, 1)]
    if interpreter:
        pairs = pairs[:1]
    return [triton.Config({"BLOCK_E": 32 * per_thread * warps}, num_warps=warps) for per_thread, warps in pairs]


def _fitting_configs(configs: List[triton.Config], named_args: Dict, **kwargs) -> List[triton.Config]:
    """Configs whose channel block is not larger than needed (keeps the smallest if none fits). Triton's
    autotuner passes the positional arguments as ``named_args`` and the keyword ones (all of ours: the
    launches pass keywords) as ``kwargs``."""
    args = {**named_args, **kwargs}
    if args.get("DT_RANK"):  # the dt_proj rows take registers: two channels a thread, at least 4 programs an SM
        configs = [c for c in configs if c.kwargs["BLOCK_E"] <= 64 * c.num_warps and c.num_warps <= 2] or configs
    need = triton.next_power_of_2(args["E"])
    fitting = [c for c in configs if c.kwargs["BLOCK_E"] <= max(need, 32)]
    return fitting or configs[:1]


def length_bucket(length: int) -> int:
    """Autotune key: the next power of two of the sequence length (224: 256, 1248: 8192)."""
    return triton.next_power_of_2(max(int(length), 1))


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    """log(1 + exp(x)), x itself above 20 (as torch's softplus), and its derivative sigmoid(x) from the
    same exp (the forward's callers drop it, and the compiler with it)."""
    e = tl.exp2(tl.minimum(x, 20.0) * 1.4426950408889634)
    y = 1.0 + e
    if FAST:
        log2 = libdevice.fast_log2f(y)  # MUFU.LG2: one instruction, |error| < 2^-22 on [1, 5e8]
        sig = libdevice.fast_dividef(e, y)  # MUFU.RCP and a multiply: y is in [1, 5e8]
    else:
        log2 = tl.log2(y)
        sig = e / y
    return tl.where(x > 20.0, x, log2 * 0.6931471805599453), tl.where(x > 20.0, 1.0, sig)


@triton.jit
def _step_delta(raw, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """A step's delta from the loaded one, as every loop computes it (the backward's recomputation must
    repeat the forward's arithmetic): plus the bias, through softplus; and d delta / d raw (1 without
    softplus)."""
    if HAS_BIAS:
        raw = raw + bias
    grad = 1.0
    if SOFTPLUS:
        raw, grad = _softplus(raw, FAST)
    return raw, grad


@triton.jit
def _filled(value, N: tl.constexpr):
    """A tuple of N references to ``value`` (the initial state, the zeroed accumulators)."""
    out = ()
    for n in tl.static_range(N):
        out = out + (value,)
    return out


@triton.jit
def _row_tuple(ptr, stride, offsets, mask, N: tl.constexpr, factor: tl.constexpr = 1.0):
    """N rows ``ptr + n * stride + offsets`` (times ``factor``) as a tuple of float32 vectors."""
    out = ()
    for n in tl.static_range(N):
        row = tl.load(ptr + n * stride + offsets, mask=mask, other=0.0).to(tl.float32)
        if factor != 1.0:
            row = row * factor
        out = out + (row,)
    return out


@triton.jit
def _scalar_tuple(ptr, stride, N: tl.constexpr, PAIRS: tl.constexpr):
    """N scalars ``ptr[n * stride]`` as float32 (B or C of one step: the same for every channel). With
    PAIRS (float32, stride 1, 8-byte aligned rows: the mixer's B and C) two per 64-bit load, split by bit
    casts that cost no instruction: N / 2 loads a step instead of N."""
    out = ()
    if PAIRS:
        p64 = ptr.to(tl.pointer_type(tl.int64))
        for n in tl.static_range(N // 2):
            bits = tl.load(p64 + n)
            low = (bits & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
            out = out + (low, (bits >> 32).to(tl.int32).to(tl.float32, bitcast=True))
    else:
        for n in tl.static_range(N):
            out = out + (tl.load(ptr + n * stride).to(tl.float32),)
    return out


@triton.jit
def _store_tuple(ptr, stride, offsets, values, mask, N: tl.constexpr):
    for n in tl.static_range(N):
        tl.store(ptr + n * stride + offsets, values[n], mask=mask)


@triton.jit
def _lane_sums(values, V: tl.constexpr, BLOCK_E: tl.constexpr, q: tl.constexpr):
    """Sums over the program's channels of values[32 q] .. values[32 q + 31] (each a [BLOCK_E] vector), as
    one [32] vector: element l holds the sum of values[32 q + l] (zero past V). A butterfly reduce-scatter:
    each lane first adds its own channels, then five exchanges halve the values a lane carries (w = 16, 8,
    4, 2, 1: the lane keeps one half, sends the other to lane ^ w and adds what it receives), so 32 sums
    cost 31 exchanges instead of 32 all-reduces of five each. On a GPU ``tl.gather`` within a warp is one
    SHFL; the order of the additions is fixed, so the sums are deterministic."""
    lane = tl.arange(0, 32)
    cur = ()
    for k in tl.static_range(32):
        if 32 * q + k < V:
            rows = tl.reshape(values[32 * q + k], [32, BLOCK_E // 32], can_reorder=True)  # any partition will do
            cur = cur + (tl.sum(rows, axis=1),)
        else:
            cur = cur + (tl.zeros([32], dtype=tl.float32),)
    cur = _exchange(cur, lane, 16)
    cur = _exchange(cur, lane, 8)
    cur = _exchange(cur, lane, 4)
    cur = _exchange(cur, lane, 2)
    return _exchange(cur, lane, 1)[0]


@triton.jit
def _exchange(cur, lane, w: tl.constexpr):
    """One level of :func:`_lane_sums`: 2w partial sums per lane in, w out."""
    upper = (lane & w) != 0
    new = ()
    for k in tl.static_range(w):
        keep = tl.where(upper, cur[k + w], cur[k])
        send = tl.where(upper, cur[k], cur[k + w])
        new = new + (keep + tl.gather(send, lane ^ w, 0),)
    return new


@triton.jit
def _load_delta_input(ptr, stride, mask, DT_RANK: tl.constexpr, DT_PAIRS: tl.constexpr):
    """What a forward step loads for delta: its row over the program's channels, or with DT_RANK the
    DT_RANK scalars of the low-rank dt that ``_delta_from_input`` turns into it."""
    if DT_RANK == 0:
        loaded = tl.load(ptr, mask=mask, other=0.0)
    else:
        loaded = _scalar_tuple(ptr, stride, DT_RANK, DT_PAIRS)
    return loaded


@triton.jit
def _delta_from_input(loaded, W, DT_RANK: tl.constexpr):
    """delta as float32 over the program's channels: the loaded row, or dt W (dt_proj: DT_RANK FMAs)."""
    if DT_RANK == 0:
        delta = loaded.to(tl.float32)
    else:
        delta = loaded[0] * W[0]
        for r in tl.static_range(1, DT_RANK):
            delta += loaded[r] * W[r]
    return delta


@triton.jit
def _program_ids():
    """(batch, channel block, direction) of a scan program. The batch index is int64, so every offset it
    scales is 64-bit: batch x batch stride passes 2^31 elements in the paper's high-resolution regime
    (2 x batch x L x E: Vim-B at 1248x1248, batch 128). The direction (0 or 1) times a stride that fits in
    32 bits cannot overflow, and stays 32-bit with the step's time (64-bit there would cost instructions
    in every step); so do the offsets within a sequence (step x row stride), which the launches check."""
    return tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)


@triton.jit
def _time(i, L, i_d):
    """The sequence position of step i: forwards for direction 0, backwards for direction 1."""
    return i + (L - 1 - 2 * i) * i_d


@triton.jit
def _program_inputs(u, delta, A, B, C, D, z, bias, E, i_b, i_e, i_d, s_u_d, s_u_b, s_u_e, s_dt_d, s_dt_b, s_dt_e,
                    s_B_d, s_B_b, s_C_d, s_C_b, s_z_b, s_z_e, BLOCK_E: tl.constexpr, N: tl.constexpr):
    """What a scan program (batch i_b, channel block i_e, direction i_d) reads, for the forward and the
    backward alike (the backward's recomputation must repeat the forward's arithmetic exactly): its
    channels and their mask, A scaled by log2 e (exp(delta A) = exp2(delta A2)), D, the bias, and the row
    pointers of u, delta, B, C and z at step 0."""
    o_e = i_e * BLOCK_E + tl.arange(0, BLOCK_E)
    m_e = o_e < E
    A2 = _row_tuple(A + i_d * N * E, E, o_e, m_e, N, 1.4426950408889634)
    b_D = tl.load(D + i_d * E + o_e, mask=m_e, other=0.0).to(tl.float32)
    b_bias = tl.load(bias + i_d * E + o_e, mask=m_e, other=0.0).to(tl.float32)
    p_u = u + i_d * s_u_d + i_b * s_u_b + o_e * s_u_e
    p_dt = delta + i_d * s_dt_d + i_b * s_dt_b + o_e * s_dt_e
    p_B = B + i_d * s_B_d + i_b * s_B_b
    p_C = C + i_d * s_C_d + i_b * s_C_b
    p_z = z + i_b * s_z_b + o_e * s_z_e
    return o_e, m_e, A2, b_D, b_bias, p_u, p_dt, p_B, p_C, p_z


# The autotuner runs every config that survives pruning into the same buffers before the one it picks
# (tests/ops/test_scan_triton.py does the same in the interpreter). restore_value: the trials must not leave
# their output where the inference path keeps it (over u, which every trial reads). The key holds what the
# pruning reads (E, DT_RANK) and what changes the work a step (N, SAVE_STATES).
@triton.autotune(configs=scan_configs(backward=False), key=["E", "L_BUCKET", "N", "DT_RANK", "SAVE_STATES"],
                 restore_value=["ys"],
                 prune_configs_by={"early_config_prune": _fitting_configs})
@triton.jit
def _scan_fwd_kernel(
    u, delta, A, B, C, D, z, bias, ys, states, W,
    L, E, n_chunks, scale,
    s_u_d, s_u_b, s_u_t, s_u_e,
    s_dt_d, s_dt_b, s_dt_t, s_dt_e,
    s_B_d, s_B_b, s_B_t, s_B_n,
    s_C_d, s_C_b, s_C_t, s_C_n,
    s_z_b, s_z_t, s_z_e,
    s_o_d, s_o_b, s_o_t, s_o_e,
    s_h_d, s_h_b, s_h_c,
    L_BUCKET,
    BLOCK_E: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr, FAST: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BC_PAIRS: tl.constexpr, SAVE_STATES: tl.constexpr, DT_RANK: tl.constexpr, DT_PAIRS: tl.constexpr,
):
    """Grid (batch, channel blocks, directions). u, delta (ndir, b, L, E), or with DT_RANK delta's low-rank
    factor dt (ndir, b, L, DT_RANK) and W (ndir, DT_RANK, E) float32, delta = dt W per step (inference:
    delta is never written out); A (ndir, N, E); B, C (ndir, b, L, N);
    D, bias (ndir, E); z (b, L, E); ys (ndir, b, L, E): each direction's scale * y, written at the step that
    read u and delta there (so ys may be u itself); states (ndir, b, n_chunks, N, E) float32, written at each
    chunk start if SAVE_STATES (not when nothing will run the backward)."""
    i_b, i_e, i_d = _program_ids()
    o_e, m_e, A2, b_D, b_bias, p_u, p_dt, p_B, p_C, p_z = _program_inputs(
        u, delta, A, B, C, D, z, bias, E, i_b, i_e, i_d, s_u_d, s_u_b, s_u_e, s_dt_d, s_dt_b, s_dt_e,
        s_B_d, s_B_b, s_C_d, s_C_b, s_z_b, s_z_e, BLOCK_E, N)
    p_o = ys + i_d * s_o_d + i_b * s_o_b + o_e * s_o_e
    p_h = states + i_d * s_h_d + i_b * s_h_b
    W_dt = A2  # unused without DT_RANK
    if DT_RANK > 0:
        p_dt = delta + i_d * s_dt_d + i_b * s_dt_b  # one row of DT_RANK scalars a step, shared by the channels
        W_dt = _row_tuple(W + i_d * DT_RANK * E, E, o_e, m_e, DT_RANK)
    h = _filled(tl.zeros([BLOCK_E], dtype=tl.float32), N)
    # step 0's inputs; every step then loads the next one's before its own arithmetic
    t = _time(0, L, i_d)
    n_u = tl.load(p_u + t * s_u_t, mask=m_e, other=0.0)
    n_dt = _load_delta_input(p_dt + t * s_dt_t, s_dt_e, m_e, DT_RANK, DT_PAIRS)
    n_z = tl.load(p_z + t * s_z_t, mask=m_e, other=0.0)
    n_B = _scalar_tuple(p_B + t * s_B_t, s_B_n, N, BC_PAIRS)
    n_C = _scalar_tuple(p_C + t * s_C_t, s_C_n, N, BC_PAIRS)
    for c in range(0, n_chunks):
        if SAVE_STATES:
            _store_tuple(p_h + c * s_h_c, E, o_e, h, m_e, N)
        for j in range(0, tl.minimum(CHUNK, L - c * CHUNK)):
            b_u, b_dt, b_z, b_B, b_C, cur = n_u.to(tl.float32), _delta_from_input(n_dt, W_dt, DT_RANK), n_z.to(tl.float32), n_B, n_C, t
            t = _time(tl.minimum(c * CHUNK + j + 1, L - 1), L, i_d)  # the last step reloads itself
            n_u = tl.load(p_u + t * s_u_t, mask=m_e, other=0.0)
            n_dt = _load_delta_input(p_dt + t * s_dt_t, s_dt_e, m_e, DT_RANK, DT_PAIRS)
            n_z = tl.load(p_z + t * s_z_t, mask=m_e, other=0.0)
            n_B = _scalar_tuple(p_B + t * s_B_t, s_B_n, N, BC_PAIRS)
            n_C = _scalar_tuple(p_C + t * s_C_t, s_C_n, N, BC_PAIRS)
            b_dt, _ = _step_delta(b_dt, b_bias, HAS_BIAS, SOFTPLUS, FAST)
            b_dtu = b_dt * b_u
            b_y = tl.zeros([BLOCK_E], dtype=tl.float32)
            if HAS_D:
                b_y = b_D * b_u
            new = ()
            for n in tl.static_range(N):
                h_n = tl.exp2(b_dt * A2[n]) * h[n] + b_B[n] * b_dtu
                b_y += h_n * b_C[n]
                new = new + (h_n,)
            h = new
            if HAS_Z:
                b_y = b_y * b_z * tl.sigmoid(b_z)
            tl.store(p_o + cur * s_o_t, (b_y * scale).to(ys.dtype.element_ty), mask=m_e)


# reset_to_zero: dz sums both directions' atomics; a trial's dBC_part rows a larger block leaves unwritten
# would otherwise be summed with the picked config's.
@triton.autotune(configs=scan_configs(backward=True), key=["E", "L_BUCKET", "N"], reset_to_zero=["dz", "dBC_part"],
                 prune_configs_by={"early_config_prune": _fitting_configs})
@triton.jit
def _scan_bwd_kernel(
    u, delta, A, B, C, D, z, bias, states, scratch, dout,
    du, ddelta, dA_part, dBC_part, dD_part, dbias_part, dz,
    L, E, n_chunks, scale,
    s_u_d, s_u_b, s_u_t, s_u_e,
    s_dt_d, s_dt_b, s_dt_t, s_dt_e,
    s_B_d, s_B_b, s_B_t, s_B_n,
    s_C_d, s_C_b, s_C_t, s_C_n,
    s_z_b, s_z_t, s_z_e,
    s_o_b, s_o_t, s_o_e,
    s_h_d, s_h_b, s_h_c,
    s_g_d, s_g_b, s_g_t,
    s_p_d, s_p_b, s_p_e, s_p_t,
    s_dz_b, s_dz_t,
    L_BUCKET,
    BLOCK_E: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr, FAST: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BIDIR: tl.constexpr,
    BC_PAIRS: tl.constexpr,
):
    """Gradients of :func:`_scan_fwd_kernel`. du, ddelta (ndir, b, L, E) in u's dtype; dz (b, L, E);
    partial sums per program: dA_part (ndir, b, N, E), dD_part and dbias_part (ndir, b, E), dBC_part
    (ndir, b, >= channel blocks, L, 2N): dB then dC of each step, summed over this program's channels
    (found by its strides: the buffer has rows for the smallest block of any config, this launch uses
    the first cdiv(E, BLOCK_E)).

    Each reverse step reads only h_t: a h_{t-1} = h_t - B_t dt_t u_t (one FMA, exact to rounding), so the
    state before the step is neither reloaded nor kept. The 2N sums over channels of a step (dB_t, dC_t)
    are one reduce-scatter (:func:`_lane_sums`) and one coalesced store."""
    i_b, i_e, i_d = _program_ids()
    o_e, m_e, A2, b_D, b_bias, p_u, p_dt, p_B, p_C, p_z = _program_inputs(
        u, delta, A, B, C, D, z, bias, E, i_b, i_e, i_d, s_u_d, s_u_b, s_u_e, s_dt_d, s_dt_b, s_dt_e,
        s_B_d, s_B_b, s_C_d, s_C_b, s_z_b, s_z_e, BLOCK_E, N)
    p_do = dout + i_b * s_o_b + o_e * s_o_e
    p_h = states + i_d * s_h_d + i_b * s_h_b
    p_du = du + i_d * s_g_d + i_b * s_g_b + o_e  # du and ddelta: the same strides, channels contiguous
    p_ddt = ddelta + i_d * s_g_d + i_b * s_g_b + o_e
    p_dz = dz + i_b * s_dz_b + o_e
    # This program's scratch: the states after each step of one chunk, (CHUNK, N, BLOCK_E).
    p_s = scratch + ((i_d * tl.num_programs(0) + i_b) * tl.num_programs(1) + i_e) * CHUNK * N * BLOCK_E
    o_s = tl.arange(0, BLOCK_E)
    o_v = tl.arange(0, 32)
    p_part = dBC_part + i_d * s_p_d + i_b * s_p_b + i_e * s_p_e
    zero = tl.zeros([BLOCK_E], dtype=tl.float32)
    g = _filled(zero, N)
    acc_dA = _filled(zero, N)
    acc_dD = zero
    acc_db = zero
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        steps = tl.minimum(CHUNK, L - c * CHUNK)
        h = _row_tuple(p_h + c * s_h_c, E, o_e, m_e, N)
        for j in range(0, steps):  # recompute the chunk's states (the same arithmetic as the forward)
            t = _time(c * CHUNK + j, L, i_d)
            b_u = tl.load(p_u + t * s_u_t, mask=m_e, other=0.0).to(tl.float32)
            b_dt = tl.load(p_dt + t * s_dt_t, mask=m_e, other=0.0).to(tl.float32)
            b_B = _scalar_tuple(p_B + t * s_B_t, s_B_n, N, BC_PAIRS)
            b_dt, _ = _step_delta(b_dt, b_bias, HAS_BIAS, SOFTPLUS, FAST)
            b_dtu = b_dt * b_u
            new = ()
            for n in tl.static_range(N):
                new = new + (tl.exp2(b_dt * A2[n]) * h[n] + b_B[n] * b_dtu,)
            h = new
            _store_tuple(p_s + j * N * BLOCK_E, BLOCK_E, o_s, h, o_s < BLOCK_E, N)
        for jj in range(0, steps):  # walk the chunk backwards
            j = steps - 1 - jj
            t = _time(c * CHUNK + j, L, i_d)
            b_u = tl.load(p_u + t * s_u_t, mask=m_e, other=0.0).to(tl.float32)
            b_dt = tl.load(p_dt + t * s_dt_t, mask=m_e, other=0.0).to(tl.float32)
            b_B = _scalar_tuple(p_B + t * s_B_t, s_B_n, N, BC_PAIRS)
            b_C = _scalar_tuple(p_C + t * s_C_t, s_C_n, N, BC_PAIRS)
            b_do = tl.load(p_do + t * s_o_t, mask=m_e, other=0.0).to(tl.float32) * scale
            h_t = _row_tuple(p_s + j * N * BLOCK_E, BLOCK_E, o_s, o_s < BLOCK_E, N)
            b_dt, d_softplus = _step_delta(b_dt, b_bias, HAS_BIAS, SOFTPLUS, FAST)
            b_dtu = b_dt * b_u
            b_dy = b_do
            if HAS_Z:
                b_y = tl.zeros([BLOCK_E], dtype=tl.float32)
                if HAS_D:
                    b_y = b_D * b_u
                for n in tl.static_range(N):
                    b_y += h_t[n] * b_C[n]
                b_z = tl.load(p_z + t * s_z_t, mask=m_e, other=0.0).to(tl.float32)
                sig = tl.sigmoid(b_z)
                b_dy = b_do * b_z * sig
                b_dz = b_do * b_y * sig * (1.0 + b_z * (1.0 - sig))
                if BIDIR:
                    tl.atomic_add(p_dz + t * s_dz_t, b_dz, mask=m_e, sem="relaxed")
                else:
                    tl.store(p_dz + t * s_dz_t, b_dz.to(dz.dtype.element_ty), mask=m_e)
            b_ddt = zero
            b_gB = zero
            new_g = ()
            new_dA = ()
            dB_t = ()
            dC_t = ()
            for n in tl.static_range(N):
                a = tl.exp2(b_dt * A2[n])
                gt = g[n] + b_dy * b_C[n]
                dB_t = dB_t + (gt * b_dtu,)
                dC_t = dC_t + (b_dy * h_t[n],)
                s = gt * (h_t[n] - b_B[n] * b_dtu)  # gt * a * h_{t-1}
                b_ddt += s * A2[n]  # times ln 2 below: sum_n s A_n
                new_dA = new_dA + (acc_dA[n] + s * b_dt,)
                b_gB += gt * b_B[n]
                new_g = new_g + (gt * a,)
            g = new_g
            acc_dA = new_dA
            for q in tl.static_range((2 * N + 31) // 32):
                sums = _lane_sums(dB_t + dC_t, 2 * N, BLOCK_E, q)
                tl.store(p_part + t * s_p_t + 32 * q + o_v, sums, mask=32 * q + o_v < 2 * N)
            b_ddt = b_ddt * 0.6931471805599453 + b_gB * b_u
            b_du = b_gB * b_dt
            if HAS_D:
                b_du += b_dy * b_D
                acc_dD += b_dy * b_u
            if SOFTPLUS:
                b_ddt = b_ddt * d_softplus
            acc_db += b_ddt
            tl.store(p_ddt + t * s_g_t, b_ddt.to(ddelta.dtype.element_ty), mask=m_e)
            tl.store(p_du + t * s_g_t, b_du.to(du.dtype.element_ty), mask=m_e)
    p_acc = (i_d * tl.num_programs(0) + i_b) * E + o_e
    _store_tuple(dA_part + (i_d * tl.num_programs(0) + i_b) * N * E, E, o_e, acc_dA, m_e, N)
    tl.store(dD_part + p_acc, acc_dD, mask=m_e)
    tl.store(dbias_part + p_acc, acc_db, mask=m_e)


@triton.jit
def _conv_preact(x, w, bias, i_b, o_t, o_e, m_e, L, E, s_x_b, s_x_t, s_x_e, d: tl.constexpr, K: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Pre-activation (BLOCK_T, BLOCK_E) of direction d: bias + the K taps, causal for d = 0, anti-causal for 1."""
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32) + tl.load(bias + d * E + o_e, mask=m_e, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        src = o_t + (1 - 2 * d) * (k - (K - 1))
        m_src = (src >= 0) & (src < L)
        b_x = tl.load(x + i_b * s_x_b + src[:, None] * s_x_t + o_e[None, :] * s_x_e, mask=m_src[:, None] & m_e[None, :], other=0.0)
        b_w = tl.load(w + (d * E + o_e) * K + k, mask=m_e, other=0.0).to(tl.float32)
        acc += b_w[None, :] * b_x.to(tl.float32)
    return acc


@triton.jit
def _conv_tile(BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """A conv program's batch (int64: see :func:`_program_ids`), steps and channels."""
    i_b = tl.program_id(0).to(tl.int64)
    return i_b, tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T), tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)


@triton.jit
def _conv_fwd_kernel(
    x, w, bias, u, L, E,
    s_x_b, s_x_t, s_x_e,
    s_u_d, s_u_b, s_u_t,
    K: tl.constexpr, NDIR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """u (ndir, b, L, E), channels contiguous = silu(depthwise conv of x (b, L, E)), a (time, channel) tile
    per program."""
    i_b, o_t, o_e = _conv_tile(BLOCK_T, BLOCK_E)
    m_t, m_e = o_t < L, o_e < E
    for d in tl.static_range(NDIR):
        acc = _conv_preact(x, w, bias, i_b, o_t, o_e, m_e, L, E, s_x_b, s_x_t, s_x_e, d, K, BLOCK_T, BLOCK_E)
        p_u = u + d * s_u_d + i_b * s_u_b + o_t[:, None] * s_u_t + o_e[None, :]
        tl.store(p_u, (acc * tl.sigmoid(acc)).to(u.dtype.element_ty), mask=m_t[:, None] & m_e[None, :])


@triton.jit
def _conv_bwd_kernel(
    x, w, bias, du, g, dw_part, db_part, L, E,
    s_x_b, s_x_t, s_x_e,
    s_du_d, s_du_b, s_du_t,
    s_g_d, s_g_b, s_g_t,
    K: tl.constexpr, NDIR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """g = du * silu'(pre-activation), stored (both (ndir, b, L, E), channels contiguous); partial sums of
    dw and db per (direction, batch, time block)."""
    i_b, o_t, o_e = _conv_tile(BLOCK_T, BLOCK_E)
    m_t, m_e = o_t < L, o_e < E
    m_te = m_t[:, None] & m_e[None, :]
    for d in tl.static_range(NDIR):
        acc = _conv_preact(x, w, bias, i_b, o_t, o_e, m_e, L, E, s_x_b, s_x_t, s_x_e, d, K, BLOCK_T, BLOCK_E)
        sig = tl.sigmoid(acc)
        p_du = du + d * s_du_d + i_b * s_du_b + o_t[:, None] * s_du_t + o_e[None, :]
        b_g = tl.load(p_du, mask=m_te, other=0.0).to(tl.float32) * sig * (1.0 + acc * (1.0 - sig))
        tl.store(g + d * s_g_d + i_b * s_g_b + o_t[:, None] * s_g_t + o_e[None, :], b_g, mask=m_te)
        p_part = ((d * tl.num_programs(0) + i_b) * tl.num_programs(1) + tl.program_id(1)) * E + o_e
        tl.store(db_part + p_part, tl.sum(b_g, axis=0), mask=m_e)
        for k in tl.static_range(K):
            src = o_t + (1 - 2 * d) * (k - (K - 1))
            m_src = (src >= 0) & (src < L)
            b_x = tl.load(x + i_b * s_x_b + src[:, None] * s_x_t + o_e[None, :] * s_x_e, mask=m_src[:, None] & m_e[None, :], other=0.0)
            tl.store(dw_part + p_part * K + k, tl.sum(b_g * b_x.to(tl.float32), axis=0), mask=m_e)


@triton.jit
def _conv_dx_kernel(
    w, g, dx, L, E,
    s_g_d, s_g_b, s_g_t,
    s_dx_b, s_dx_t,
    K: tl.constexpr, NDIR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dx[t] = sum over directions and taps of w[d, k] * g[d, t'] for every output t' that read x[t]."""
    i_b, o_t, o_e = _conv_tile(BLOCK_T, BLOCK_E)
    m_t, m_e = o_t < L, o_e < E
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for d in tl.static_range(NDIR):
        for k in tl.static_range(K):
            dst = o_t - (1 - 2 * d) * (k - (K - 1))
            m_dst = (dst >= 0) & (dst < L)
            p_g = g + d * s_g_d + i_b * s_g_b + dst[:, None] * s_g_t + o_e[None, :]
            b_g = tl.load(p_g, mask=m_dst[:, None] & m_e[None, :], other=0.0)
            b_w = tl.load(w + (d * E + o_e) * K + k, mask=m_e, other=0.0).to(tl.float32)
            acc += b_w[None, :] * b_g
    tl.store(dx + i_b * s_dx_b + o_t[:, None] * s_dx_t + o_e[None, :], acc.to(dx.dtype.element_ty),
             mask=m_t[:, None] & m_e[None, :])


# ------------------------------------------------------------------------------------------- launches
# Each returns (kernel, grid, arguments): the launchers run it, benchmarks/gpu_static.py compiles it.
Launch = Tuple[object, object, Dict[str, object]]


def _flags(B, C, D, z, bias, softplus: bool) -> Dict[str, object]:
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
                FAST=FAST_MATH, BC_PAIRS=_pairs(B) and _pairs(C))


def _pairs(t: torch.Tensor) -> bool:
    """Can the kernels read two float32 of the last axis per 64-bit load (see ``_scalar_tuple``)?"""
    return (t.dtype == torch.float32 and t.shape[-1] % 2 == 0 and t.stride(-1) == 1
            and all(s % 2 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 8 == 0)


def scan_fwd_launch(u, delta, A, B, C, D, z, bias, softplus: bool, ys, states, steps: int,
                    dt_weight: Optional[torch.Tensor] = None) -> Launch:
    """u, delta, ys (ndir, b, L, E) and B, C (ndir, b, L, N) any strides; A (ndir, N, E) contiguous; D, bias
    (ndir, E); z (b, L, E); states (ndir, b, chunks, N, E) float32 contiguous, chunks = ceil(L / steps), or 0
    to save none. ys receives each direction's y, halved with two directions (the output is ys.sum(0)).
    With ``dt_weight`` (ndir, R, E) float32 contiguous, ``delta`` is its low-rank factor (ndir, b, L, R)."""
    ndir, batch, length, channels = u.shape
    state = A.shape[1]
    z_ = z if z is not None else ys[0]
    _check_rows(length, u, delta, B, C, z, ys)
    args = dict(
        u=u, delta=delta, A=A, B=B, C=C, D=D if D is not None else A, z=z_, bias=bias if bias is not None else A,
        ys=ys, states=states, W=dt_weight if dt_weight is not None else A, L=length, E=channels, n_chunks=triton.cdiv(length, steps), scale=0.5 if ndir == 2 else 1.0,
        **_strides("s_u", "dbte", u), **_strides("s_dt", "dbte", delta), **_strides("s_B", "dbtn", B),
        **_strides("s_C", "dbtn", C), **_strides("s_z", "bte", z_), **_strides("s_o", "dbte", ys),
        **_strides("s_h", "dbc", states), L_BUCKET=length_bucket(length), N=state, CHUNK=steps,
        SAVE_STATES=states.shape[2] > 0, DT_RANK=0 if dt_weight is None else dt_weight.shape[1],
        DT_PAIRS=dt_weight is not None and _pairs(delta), **_flags(B, C, D, z, bias, softplus),
    )
    grid = lambda meta: (batch, triton.cdiv(channels, meta["BLOCK_E"]), ndir)  # noqa: E731
    return _scan_fwd_kernel, grid, args


def scan_bwd_launch(u, delta, A, B, C, D, z, bias, softplus: bool, states, dout, steps: int, grads) -> Launch:
    """The backward of :func:`scan_fwd_launch`; ``grads`` from :func:`scan_bwd_buffers`."""
    ndir, batch, length, channels = u.shape
    state = A.shape[1]
    z_ = z if z is not None else dout
    du, ddelta, dA_part, dBC_part, dD_part, dbias_part, dz, scratch = grads
    _check_rows(length, u, delta, B, C, z, dout, du, dz, dBC_part)
    if du.stride() != ddelta.stride():
        raise ValueError(f"du and ddelta must share their strides, got {du.stride()} and {ddelta.stride()}")
    args = dict(
        u=u, delta=delta, A=A, B=B, C=C, D=D if D is not None else A, z=z_, bias=bias if bias is not None else A,
        states=states, scratch=scratch, dout=dout, du=du, ddelta=ddelta, dA_part=dA_part, dBC_part=dBC_part,
        dD_part=dD_part, dbias_part=dbias_part, dz=dz if dz is not None else du,
        L=length, E=channels, n_chunks=states.shape[2], scale=0.5 if ndir == 2 else 1.0,
        **_strides("s_u", "dbte", u), **_strides("s_dt", "dbte", delta), **_strides("s_B", "dbtn", B),
        **_strides("s_C", "dbtn", C), **_strides("s_z", "bte", z_), **_strides("s_o", "bte", dout),
        **_strides("s_h", "dbc", states), **_strides("s_g", "dbt", _channels_contiguous(du)),
        **_strides("s_p", "dbet", _channels_contiguous(dBC_part)), **_strides("s_dz", "bt", dz if dz is not None else dout),
        L_BUCKET=length_bucket(length), N=state, CHUNK=steps, BIDIR=ndir == 2, **_flags(B, C, D, z, bias, softplus),
    )
    grid = lambda meta: (batch, triton.cdiv(channels, meta["BLOCK_E"]), ndir)  # noqa: E731
    return _scan_bwd_kernel, grid, args


def scan_bwd_buffers(u, A, z, steps: int):
    """Outputs and scratch of the backward, sized for whichever config of the GPU list the autotuner picks
    (the kernel finds its rows by the strides, so the interpreter's one config uses the same buffers)."""
    ndir, batch, length, channels = u.shape
    state = A.shape[1]
    f32 = dict(device=u.device, dtype=torch.float32)
    blocks = [c.kwargs["BLOCK_E"] for c in scan_configs(backward=True, interpreter=False) + _scan_bwd_kernel.configs]
    n_blocks = triton.cdiv(channels, min(blocks))  # the most partial rows; unused rows stay zero
    padded = max(triton.cdiv(channels, b) * b for b in blocks)  # channels the programs cover
    du = torch.empty(ndir, batch, length, channels, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(ndir, batch, length, channels, device=u.device, dtype=u.dtype)
    dBC_part = torch.zeros(ndir, batch, n_blocks, length, 2 * state, **f32)
    dz = torch.zeros(batch, length, channels, **f32) if z is not None else None
    scratch = torch.empty(ndir * batch * padded * steps * state, **f32)
    return (du, ddelta, torch.empty(ndir, batch, state, channels, **f32), dBC_part,
            torch.empty(ndir, batch, channels, **f32), torch.empty(ndir, batch, channels, **f32), dz, scratch)


def _strides(prefix: str, axes: str, t: torch.Tensor) -> Dict[str, int]:
    return {f"{prefix}_{a}": s for a, s in zip(axes, t.stride())}


def _channels_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t``, checked to have its last axis contiguous (the kernels index it without a stride)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"expected the last axis contiguous, got strides {tuple(t.stride())}")
    return t


def _check_rows(length: int, *tensors: Optional[torch.Tensor]) -> None:
    """The kernels' 64-bit offsets are the batch ones (:func:`_program_ids`); a step's offset within a
    sequence, step x row stride (+ channel), is 32-bit. Checked here, not wrapped silently."""
    for t in tensors:
        if t is not None and t.dim() >= 2 and (length + 1) * max(abs(t.stride(-2)), 1) >= 2**31:
            raise ValueError(f"sequence of {length} steps with a row stride of {t.stride(-2)}: the offsets within a "
                             "sequence pass 2^31 elements; use a smaller image or embedding")


def _conv_grid(batch: int, length: int, channels: int):
    return (batch, triton.cdiv(length, CONV_BLOCK_T), triton.cdiv(channels, CONV_BLOCK_E))


def conv_fwd_launch(x, w, bias, u) -> Launch:
    batch, length, channels = x.shape
    ndir, _, taps = w.shape
    _check_rows(length, x, u)
    args = dict(x=x, w=w, bias=bias, u=u, L=length, E=channels, **_strides("s_x", "bte", x),
                **_strides("s_u", "dbt", _channels_contiguous(u)), K=taps, NDIR=ndir, BLOCK_T=CONV_BLOCK_T,
                BLOCK_E=CONV_BLOCK_E)
    return _conv_fwd_kernel, _conv_grid(batch, length, channels), args


def conv_bwd_launch(x, w, bias, du, g, dw_part, db_part) -> Launch:
    batch, length, channels = x.shape
    ndir, _, taps = w.shape
    _check_rows(length, x, du, g)
    args = dict(x=x, w=w, bias=bias, du=du, g=g, dw_part=dw_part, db_part=db_part, L=length, E=channels,
                **_strides("s_x", "bte", x), **_strides("s_du", "dbt", _channels_contiguous(du)),
                **_strides("s_g", "dbt", _channels_contiguous(g)), K=taps, NDIR=ndir, BLOCK_T=CONV_BLOCK_T,
                BLOCK_E=CONV_BLOCK_E)
    return _conv_bwd_kernel, _conv_grid(batch, length, channels), args


def conv_dx_launch(w, g, dx) -> Launch:
    batch, length, channels = dx.shape
    ndir, _, taps = w.shape
    _check_rows(length, g, dx)
    args = dict(w=w, g=g, dx=dx, L=length, E=channels, **_strides("s_g", "dbt", _channels_contiguous(g)),
                **_strides("s_dx", "bt", _channels_contiguous(dx)), K=taps, NDIR=ndir, BLOCK_T=CONV_BLOCK_T,
                BLOCK_E=CONV_BLOCK_E)
    return _conv_dx_kernel, _conv_grid(batch, length, channels), args


def _run(launch: Launch) -> None:
    kernel, grid, args = launch
    with current_device_of(next(v for v in args.values() if isinstance(v, torch.Tensor))):
        kernel[grid](**args)


# ------------------------------------------------------------------------------------------- launchers
def _scan_fwd(u, delta, A, B, C, D, z, bias, softplus: bool, ys: torch.Tensor, steps: int,
              save_states: bool = True, dt_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Runs the forward; returns the states at every ``steps``-th step, (ndir, b, chunks, N, E) (no chunks
    without ``save_states``)."""
    ndir, batch, length, channels = u.shape
    chunks = triton.cdiv(length, steps) if save_states else 0
    states = torch.empty(ndir, batch, chunks, A.shape[1], channels, device=u.device, dtype=torch.float32)
    _run(scan_fwd_launch(u, delta, A, B, C, D, z, bias, softplus, ys, states, steps, dt_weight))
    return states


def _scan_bwd(u, delta, A, B, C, D, z, bias, softplus, states, dout, steps: int):
    """Gradients of :func:`_scan_fwd`: du, ddelta in u's dtype, (ndir, b, L, E); dA (ndir, N, E); dB, dC
    (ndir, b, L, N); dD, dbias (ndir, E); dz (b, L, E) float32 (None for absent inputs)."""
    grads = scan_bwd_buffers(u, A, z, steps)
    _run(scan_bwd_launch(u, delta, A, B, C, D, z, bias, softplus, states, dout, steps, grads))
    du, ddelta, dA_part, dBC_part, dD_part, dbias_part, dz, _ = grads
    state = A.shape[1]
    dB, dC = dBC_part[..., :state].sum(2), dBC_part[..., state:].sum(2)
    return (du, ddelta, dA_part.sum(1), dB, dC, dD_part.sum(1) if D is not None else None,
            dz, dbias_part.sum(1) if bias is not None else None)


def _conv_fwd(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (b, L, E) (any strides); w (ndir, E, K); bias (ndir, E) -> silu(conv) (ndir, b, L, E) in x's dtype."""
    batch, length, channels = x.shape
    u = torch.empty(w.shape[0], batch, length, channels, device=x.device, dtype=x.dtype)
    _run(conv_fwd_launch(x, w, bias, u))
    return u


def _conv_bwd(x, w, bias, du):
    batch, length, channels = x.shape
    ndir, _, taps = w.shape
    grid = _conv_grid(batch, length, channels)
    f32 = dict(device=x.device, dtype=torch.float32)
    g = torch.empty(ndir, batch, length, channels, **f32)
    dw_part = torch.empty(ndir, batch, grid[1], channels, taps, **f32)
    db_part = torch.empty(ndir, batch, grid[1], channels, **f32)
    _run(conv_bwd_launch(x, w, bias, du.contiguous(), g, dw_part, db_part))
    dx = torch.empty(batch, length, channels, device=x.device, dtype=x.dtype)
    _run(conv_dx_launch(w, g, dx))
    return dx, dw_part.sum((1, 2)).to(w.dtype), db_part.sum((1, 2)).to(bias.dtype)


# ------------------------------------------------------------------------------------------ the op kernels
def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (b, L, E) (any strides); weight (2, E, K); bias (2, E) -> silu(conv) (2, b, L, E) in x's dtype."""
    return _conv_fwd(x, weight, bias)


def conv_silu_backward(du: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> List[torch.Tensor]:
    return list(_conv_bwd(x, weight, bias, du))


def _kernel_inputs(x_proj_out: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor):
    """The op's (x_proj_out, dt_weight, A (2, E, N)) as the kernels read them: delta = dt dt_weight (2, b, L, E)
    in x_proj_out's dtype, B and C (2, b, L, N) as float32 views of one copy (their N scalar loads per step
    then need no conversion), A (2, N, E) float32 contiguous."""
    state = A.shape[-1]
    dt, BC = x_proj_out.split([dt_weight.shape[-1], 2 * state], dim=-1)
    B, C = BC.float().split([state, state], dim=-1)
    delta = torch.matmul(dt, dt_weight.to(dt.dtype).transpose(1, 2)[:, None])
    return delta, B, C, A.float().transpose(1, 2).contiguous()


def bi_scan(u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
            z: torch.Tensor, bias: torch.Tensor, checkpoint_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both directions in one launch (shapes as in ``cpu.bi_scan``; any strides). Returns out = y_fwd / 2 +
    y_bwd / 2, each y = (scan + D u) * silu(z) rounded to z's dtype before the sum (as the official code adds
    its two directions' outputs), (b, L, E), and the states every ``checkpoint_steps`` steps
    (2, b, chunks, N, E) the backward restarts from."""
    if checkpoint_steps < 1:
        raise ValueError(f"the CUDA kernels restart the backward from checkpoints: checkpoint_steps >= 1, got {checkpoint_steps}")
    delta, B, C, A_t = _kernel_inputs(x_proj_out, dt_weight, A)
    ys = torch.empty((2, *z.shape), device=z.device, dtype=z.dtype)
    states = _scan_fwd(u, delta, A_t, B, C, D, z, bias, True, ys, checkpoint_steps)
    return ys[0] + ys[1], states


def bi_scan_backward(dout: torch.Tensor, u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor,
                     A: torch.Tensor, D: torch.Tensor, z: torch.Tensor, bias: torch.Tensor, checkpoint_steps: int,
                     checkpoints: torch.Tensor) -> List[torch.Tensor]:
    """The gradients of :func:`bi_scan` for its seven tensors, contiguous, in their dtypes; delta is
    recomputed (one small matrix product) rather than kept."""
    delta, B, C, A_t = _kernel_inputs(x_proj_out, dt_weight, A)
    du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_bwd(u, delta, A_t, B, C, D, z, bias, True, checkpoints, dout,
                                                      checkpoint_steps)
    dt = x_proj_out[..., : dt_weight.shape[-1]]
    ddelta = ddelta.to(dt.dtype)
    ddt = torch.matmul(ddelta, dt_weight.to(dt.dtype)[:, None])  # (2, b, L, R)
    dx_proj_out = torch.cat([ddt, dB.to(dt.dtype), dC.to(dt.dtype)], dim=-1)
    ddt_weight = torch.einsum("dble,dblr->der", ddelta, dt)
    grads = (du, dx_proj_out, ddt_weight, dA.transpose(1, 2), dD, dz, dbias)
    return [g.to(t.dtype).contiguous() for g, t in zip(grads, (u, x_proj_out, dt_weight, A, D, z, bias))]


def bi_scan_(u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
             z: torch.Tensor, bias: torch.Tensor) -> None:
    """:func:`bi_scan` without a backward, in place: each direction's halved output is written over u (each
    thread reads u at a step before writing there), then u[0] += u[1]; no states. Up to rank FUSED_DT_RANK
    delta = dt dt_weight is computed per step (R FMAs a channel), never written out. At 1248x1248, batch 128,
    a Vim-Ti block's scan then allocates nothing, where bi_scan's delta and output take 1.7 GB."""
    rank, state = dt_weight.shape[-1], A.shape[-1]
    if rank <= FUSED_DT_RANK:
        dt, B, C = x_proj_out.float().split([rank, state, state], dim=-1)
        W_t = dt_weight.float().transpose(1, 2).contiguous()
        A_t = A.float().transpose(1, 2).contiguous()
        _scan_fwd(u, dt, A_t, B, C, D, z, bias, True, u, CHECKPOINT_STEPS, save_states=False, dt_weight=W_t)
        del dt, B, C
    else:
        delta, B, C, A_t = _kernel_inputs(x_proj_out, dt_weight, A)
        _scan_fwd(u, delta, A_t, B, C, D, z, bias, True, u, CHECKPOINT_STEPS, save_states=False)
        del delta, B, C
    u[0].add_(u[1])


def bi_scan_inference(u: torch.Tensor, x_proj_out: torch.Tensor, dt_weight: torch.Tensor, A: torch.Tensor,
                      D: torch.Tensor, z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`bi_scan_` on a copy of u, returned (the op of traced and exported graphs)."""
    u = u.clone()
    bi_scan_(u, x_proj_out, dt_weight, A, D, z, bias)
    return u[0].to(z.dtype)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> torch.Tensor:
    """One direction: u, delta, z (b, E, L); A (E, N); B, C (b, N, L) -> (b, E, L) in u's dtype and layout.
    The kernels read them as token-major views (slower strided loads: the mixer path is token-major)."""
    out = torch.empty_like(u)
    _scan_fwd(*_one_direction(u, delta, A, B, C, D, z, delta_bias), delta_softplus, out.transpose(1, 2)[None],
              CHECKPOINT_STEPS)
    return out


def selective_scan_backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> List[torch.Tensor]:
    """The gradients of :func:`selective_scan` for its eight tensors (empty placeholders for absent ones)."""
    inputs = _one_direction(u, delta, A, B, C, D, z, delta_bias)
    states = _scan_fwd(*inputs, delta_softplus, torch.empty_like(u).transpose(1, 2)[None], CHECKPOINT_STEPS)
    du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_bwd(*inputs, delta_softplus, states, dout.transpose(1, 2),
                                                      CHECKPOINT_STEPS)
    grads = (du[0].transpose(1, 2), ddelta[0].transpose(1, 2), dA[0].t(), dB[0].transpose(1, 2),
             dC[0].transpose(1, 2), _first(dD), None if dz is None else dz.transpose(1, 2), _first(dbias))
    return gradients_like((u, delta, A, B, C, D, z, delta_bias), grads)


def _one_direction(u, delta, A, B, C, D, z, delta_bias):
    """The one-direction contract's tensors as the kernels' (1, b, L, ...) views."""
    tm = lambda t: t.transpose(1, 2)[None]  # noqa: E731
    return (tm(u), tm(delta), A.float().t().contiguous()[None], tm(B), tm(C), _opt1(D),
            None if z is None else z.transpose(1, 2), _opt1(delta_bias))


def _first(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t[0]


def _opt1(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()[None]
