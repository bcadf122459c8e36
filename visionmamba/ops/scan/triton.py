"""Triton backend: fused selective-scan kernels, forward and backward, one or both directions per launch.

Layers: ``_*_kernel`` (Triton) -> ``_launch_*`` (allocation, grids, strides) -> ``torch.library`` custom ops
with fake shapes and backward ops -> public functions with shape docstrings (``forward``/``backward`` for the custom op, ``bidirectional``, the
mixer core, token-major in and out).

* Scan: one program per (batch, block of channels, direction); the state (BLOCK_E, N) stays in registers
  and the program walks the sequence, forwards for direction 0 and backwards (through the indices, no
  flipped copies) for direction 1. softplus(delta + bias), the D skip, the SiLU(z) gate and the average of
  the two directions are fused. The states at every CHECKPOINT_STEPS-th step are saved; the backward
  recomputes each chunk from its start state, then walks it in reverse.
* Depthwise conv + SiLU, causal for direction 0 and anti-causal for direction 1, in one launch.

Determinism: reductions over channels, batch or time go to per-program partial buffers summed afterwards
in a fixed order. The only atomics add exactly two terms (one per direction) to a zeroed buffer, and
0 + a + b == 0 + b + a in floating point, so results do not depend on scheduling.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from visionmamba.ops.scan.custom_op import register_backward

CHECKPOINT_STEPS = 64  # steps between the saved states the backward restarts from
BLOCK_E = 16
CONV_BLOCK_E = 16
CONV_BLOCK_T = 64


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _scan_fwd_kernel(
    u, delta, A, B, C, D, z, bias, out, states,
    L, E, N, n_chunks, scale,
    s_u_d, s_u_b, s_u_e, s_u_t,
    s_dt_d, s_dt_b, s_dt_e, s_dt_t,
    s_B_d, s_B_b, s_B_n, s_B_t,
    s_C_d, s_C_b, s_C_n, s_C_t,
    s_z_b, s_z_e, s_z_t,
    s_o_b, s_o_e, s_o_t,
    s_h_d, s_h_b, s_h_e, s_h_c,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BIDIR: tl.constexpr,
):
    i_b, i_eb, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_e = i_eb * BLOCK_E + tl.arange(0, BLOCK_E)
    o_n = tl.arange(0, BLOCK_N)
    m_e, m_n = o_e < E, o_n < N
    m_en = m_e[:, None] & m_n[None, :]
    b_A = tl.load(A + i_d * E * N + o_e[:, None] * N + o_n[None, :], mask=m_en, other=0.0).to(tl.float32)
    if HAS_D:
        b_D = tl.load(D + i_d * E + o_e, mask=m_e, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(bias + i_d * E + o_e, mask=m_e, other=0.0).to(tl.float32)
    h = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    # This program's rows; step t adds t times the time stride.
    p_h = states + i_d * s_h_d + i_b * s_h_b + o_e[:, None] * s_h_e + o_n[None, :]
    p_u = u + i_d * s_u_d + i_b * s_u_b + o_e * s_u_e
    p_dt = delta + i_d * s_dt_d + i_b * s_dt_b + o_e * s_dt_e
    p_B = B + i_d * s_B_d + i_b * s_B_b + o_n * s_B_n
    p_C = C + i_d * s_C_d + i_b * s_C_b + o_n * s_C_n
    p_z = z + i_b * s_z_b + o_e * s_z_e
    p_o = out + i_b * s_o_b + o_e * s_o_e
    for i in range(0, L):
        t = i + (L - 1 - 2 * i) * i_d  # direction 1 reads the sequence backwards
        if i % CHUNK == 0:
            tl.store(p_h + (i // CHUNK) * s_h_c, h, mask=m_en)
        b_u = tl.load(p_u + t * s_u_t, mask=m_e, other=0.0).to(tl.float32)
        b_dt = tl.load(p_dt + t * s_dt_t, mask=m_e, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_dt = b_dt + b_bias
        if SOFTPLUS:
            b_dt = _softplus(b_dt)
        b_B = tl.load(p_B + t * s_B_t, mask=m_n, other=0.0).to(tl.float32)
        b_C = tl.load(p_C + t * s_C_t, mask=m_n, other=0.0).to(tl.float32)
        h = tl.exp(b_dt[:, None] * b_A) * h + (b_dt * b_u)[:, None] * b_B[None, :]
        b_y = tl.sum(h * b_C[None, :], axis=1)
        if HAS_D:
            b_y += b_D * b_u
        if HAS_Z:
            b_z = tl.load(p_z + t * s_z_t, mask=m_e, other=0.0).to(tl.float32)
            b_y = b_y * b_z * tl.sigmoid(b_z)
        if BIDIR:
            tl.atomic_add(p_o + t * s_o_t, b_y * scale, mask=m_e)
        else:
            tl.store(p_o + t * s_o_t, (b_y * scale).to(out.dtype.element_ty), mask=m_e)


@triton.jit
def _scan_bwd_kernel(
    u, delta, A, B, C, D, z, bias, states, scratch, dout,
    du, ddelta, dA_part, dB_part, dC_part, dD_part, dbias_part, dz,
    L, E, N, n_chunks, scale,
    s_u_d, s_u_b, s_u_e, s_u_t,
    s_dt_d, s_dt_b, s_dt_e, s_dt_t,
    s_B_d, s_B_b, s_B_n, s_B_t,
    s_C_d, s_C_b, s_C_n, s_C_t,
    s_z_b, s_z_e, s_z_t,
    s_o_b, s_o_e, s_o_t,
    s_h_d, s_h_b, s_h_e, s_h_c,
    s_g_d, s_g_b, s_g_e, s_g_t,
    s_p_d, s_p_b, s_p_k, s_p_n,
    s_dz_b, s_dz_e, s_dz_t,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BIDIR: tl.constexpr,
):
    i_b, i_eb, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_e = i_eb * BLOCK_E + tl.arange(0, BLOCK_E)
    o_n = tl.arange(0, BLOCK_N)
    m_e, m_n = o_e < E, o_n < N
    m_en = m_e[:, None] & m_n[None, :]
    b_A = tl.load(A + i_d * E * N + o_e[:, None] * N + o_n[None, :], mask=m_en, other=0.0).to(tl.float32)
    if HAS_D:
        b_D = tl.load(D + i_d * E + o_e, mask=m_e, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(bias + i_d * E + o_e, mask=m_e, other=0.0).to(tl.float32)
    p_h = states + i_d * s_h_d + i_b * s_h_b + o_e[:, None] * s_h_e + o_n[None, :]
    p_u = u + i_d * s_u_d + i_b * s_u_b + o_e * s_u_e
    p_dt = delta + i_d * s_dt_d + i_b * s_dt_b + o_e * s_dt_e
    p_B = B + i_d * s_B_d + i_b * s_B_b + o_n * s_B_n
    p_C = C + i_d * s_C_d + i_b * s_C_b + o_n * s_C_n
    p_z = z + i_b * s_z_b + o_e * s_z_e
    p_do = dout + i_b * s_o_b + o_e * s_o_e
    p_dz = dz + i_b * s_dz_b + o_e * s_dz_e
    p_g = i_d * s_g_d + i_b * s_g_b + o_e * s_g_e  # offsets into du and ddelta
    # Private scratch of this program: the states of one chunk, (CHUNK, BLOCK_E, BLOCK_N).
    p_s = scratch + ((i_d * tl.num_programs(0) + i_b) * tl.num_programs(1) + i_eb) * CHUNK * BLOCK_E * BLOCK_N
    p_s = p_s + tl.arange(0, BLOCK_E)[:, None] * BLOCK_N + o_n[None, :]
    p_part = i_d * s_p_d + i_b * s_p_b + i_eb * s_p_k + o_n * s_p_n
    g = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    acc_dA = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    acc_dD = tl.zeros([BLOCK_E], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_E], dtype=tl.float32)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        steps = tl.minimum(CHUNK, L - c * CHUNK)
        h = tl.load(p_h + c * s_h_c, mask=m_en, other=0.0)
        for j in range(0, steps):  # recompute the chunk's states
            i = c * CHUNK + j
            t = i + (L - 1 - 2 * i) * i_d
            b_u = tl.load(p_u + t * s_u_t, mask=m_e, other=0.0).to(tl.float32)
            b_dt = tl.load(p_dt + t * s_dt_t, mask=m_e, other=0.0).to(tl.float32)
            if HAS_BIAS:
                b_dt = b_dt + b_bias
            if SOFTPLUS:
                b_dt = _softplus(b_dt)
            b_B = tl.load(p_B + t * s_B_t, mask=m_n, other=0.0).to(tl.float32)
            h = tl.exp(b_dt[:, None] * b_A) * h + (b_dt * b_u)[:, None] * b_B[None, :]
            tl.store(p_s + j * BLOCK_E * BLOCK_N, h)
        tl.debug_barrier()
        for jj in range(0, steps):  # walk the chunk backwards
            j = steps - 1 - jj
            i = c * CHUNK + j
            t = i + (L - 1 - 2 * i) * i_d
            b_u = tl.load(p_u + t * s_u_t, mask=m_e, other=0.0).to(tl.float32)
            b_raw = tl.load(p_dt + t * s_dt_t, mask=m_e, other=0.0).to(tl.float32)
            if HAS_BIAS:
                b_raw = b_raw + b_bias
            b_dt = b_raw
            if SOFTPLUS:
                b_dt = _softplus(b_raw)
            b_B = tl.load(p_B + t * s_B_t, mask=m_n, other=0.0).to(tl.float32)
            b_C = tl.load(p_C + t * s_C_t, mask=m_n, other=0.0).to(tl.float32)
            b_do = tl.load(p_do + t * s_o_t, mask=m_e, other=0.0).to(tl.float32) * scale
            h_t = tl.load(p_s + j * BLOCK_E * BLOCK_N)
            if j > 0:
                h_prev = tl.load(p_s + (j - 1) * BLOCK_E * BLOCK_N)
            else:
                h_prev = tl.load(p_h + c * s_h_c, mask=m_en, other=0.0)
            a = tl.exp(b_dt[:, None] * b_A)
            b_dy = b_do
            if HAS_Z:
                b_y = tl.sum(h_t * b_C[None, :], axis=1)
                if HAS_D:
                    b_y += b_D * b_u
                b_z = tl.load(p_z + t * s_z_t, mask=m_e, other=0.0).to(tl.float32)
                sig = tl.sigmoid(b_z)
                b_dy = b_do * b_z * sig
                b_dz = b_do * b_y * sig * (1.0 + b_z * (1.0 - sig))
                if BIDIR:
                    tl.atomic_add(p_dz + t * s_dz_t, b_dz, mask=m_e)
                else:
                    tl.store(p_dz + t * s_dz_t, b_dz.to(dz.dtype.element_ty), mask=m_e)
            gt = g + b_dy[:, None] * b_C[None, :]
            tl.store(dC_part + p_part + t * N, tl.sum(b_dy[:, None] * h_t, axis=0), mask=m_n)
            tl.store(dB_part + p_part + t * N, tl.sum(gt * (b_dt * b_u)[:, None], axis=0), mask=m_n)
            b_ddt = tl.sum(gt * (b_A * a * h_prev + b_u[:, None] * b_B[None, :]), axis=1)
            b_du = tl.sum(gt * b_B[None, :], axis=1) * b_dt
            if HAS_D:
                b_du += b_dy * b_D
                acc_dD += b_dy * b_u
            acc_dA += gt * b_dt[:, None] * a * h_prev
            if SOFTPLUS:
                b_ddt = b_ddt * tl.where(b_raw > 20.0, 1.0, tl.sigmoid(b_raw))
            acc_db += b_ddt
            tl.store(ddelta + p_g + t * s_g_t, b_ddt, mask=m_e)
            tl.store(du + p_g + t * s_g_t, b_du, mask=m_e)
            g = gt * a
        tl.debug_barrier()
    p_acc = (i_d * tl.num_programs(0) + i_b) * E + o_e
    tl.store(dA_part + p_acc[:, None] * N + o_n[None, :], acc_dA, mask=m_en)
    tl.store(dD_part + p_acc, acc_dD, mask=m_e)
    tl.store(dbias_part + p_acc, acc_db, mask=m_e)


@triton.jit
def _conv_preact(x, w, bias, i_b, o_e, o_t, m_e, L, E, s_x_b, s_x_e, s_x_t, d: tl.constexpr, K: tl.constexpr,
                 BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pre-activation (BLOCK_E, BLOCK_T) of direction d: bias + the K taps, causal for d = 0, anti-causal for 1."""
    acc = tl.zeros([BLOCK_E, BLOCK_T], dtype=tl.float32) + tl.load(bias + d * E + o_e, mask=m_e, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(K):
        src = o_t + (1 - 2 * d) * (k - (K - 1))
        m_src = (src >= 0) & (src < L)
        b_x = tl.load(x + i_b * s_x_b + o_e[:, None] * s_x_e + src[None, :] * s_x_t, mask=m_e[:, None] & m_src[None, :], other=0.0)
        b_w = tl.load(w + (d * E + o_e) * K + k, mask=m_e, other=0.0).to(tl.float32)
        acc += b_w[:, None] * b_x.to(tl.float32)
    return acc


@triton.jit
def _conv_fwd_kernel(
    x, w, bias, u, L, E,
    s_x_b, s_x_e, s_x_t,
    K: tl.constexpr, NDIR: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i_b, i_eb, i_tb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_e = i_eb * BLOCK_E + tl.arange(0, BLOCK_E)
    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    m_e, m_t = o_e < E, o_t < L
    for d in tl.static_range(NDIR):
        acc = _conv_preact(x, w, bias, i_b, o_e, o_t, m_e, L, E, s_x_b, s_x_e, s_x_t, d, K, BLOCK_E, BLOCK_T)
        b_u = acc * tl.sigmoid(acc)
        p_u = u + ((d * tl.num_programs(0) + i_b) * E + o_e[:, None]) * L + o_t[None, :]
        tl.store(p_u, b_u.to(u.dtype.element_ty), mask=m_e[:, None] & m_t[None, :])


@triton.jit
def _conv_bwd_kernel(
    x, w, bias, du, g, dw_part, db_part, L, E,
    s_x_b, s_x_e, s_x_t,
    K: tl.constexpr, NDIR: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """g = du * silu'(pre-activation), stored; partial sums of dw and db per (direction, batch, time block)."""
    i_b, i_eb, i_tb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_e = i_eb * BLOCK_E + tl.arange(0, BLOCK_E)
    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    m_e, m_t = o_e < E, o_t < L
    m_et = m_e[:, None] & m_t[None, :]
    for d in tl.static_range(NDIR):
        acc = _conv_preact(x, w, bias, i_b, o_e, o_t, m_e, L, E, s_x_b, s_x_e, s_x_t, d, K, BLOCK_E, BLOCK_T)
        p = ((d * tl.num_programs(0) + i_b) * E + o_e[:, None]) * L + o_t[None, :]
        sig = tl.sigmoid(acc)
        b_g = tl.load(du + p, mask=m_et, other=0.0).to(tl.float32) * sig * (1.0 + acc * (1.0 - sig))
        tl.store(g + p, b_g, mask=m_et)
        p_part = ((d * tl.num_programs(0) + i_b) * tl.num_programs(2) + i_tb) * E + o_e
        tl.store(db_part + p_part, tl.sum(b_g, axis=1), mask=m_e)
        for k in tl.static_range(K):
            src = o_t + (1 - 2 * d) * (k - (K - 1))
            m_src = (src >= 0) & (src < L)
            b_x = tl.load(x + i_b * s_x_b + o_e[:, None] * s_x_e + src[None, :] * s_x_t, mask=m_e[:, None] & m_src[None, :], other=0.0)
            tl.store(dw_part + p_part * K + k, tl.sum(b_g * b_x.to(tl.float32), axis=1), mask=m_e)


@triton.jit
def _conv_dx_kernel(
    w, g, dx, L, E,
    K: tl.constexpr, NDIR: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """dx[t] = sum over directions and taps of w[d, k] * g[d, t'] for every output t' that read x[t]."""
    i_b, i_eb, i_tb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_e = i_eb * BLOCK_E + tl.arange(0, BLOCK_E)
    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    m_e, m_t = o_e < E, o_t < L
    acc = tl.zeros([BLOCK_E, BLOCK_T], dtype=tl.float32)
    for d in tl.static_range(NDIR):
        for k in tl.static_range(K):
            dst = o_t - (1 - 2 * d) * (k - (K - 1))
            m_dst = (dst >= 0) & (dst < L)
            p = ((d * tl.num_programs(0) + i_b) * E + o_e[:, None]) * L + dst[None, :]
            b_g = tl.load(g + p, mask=m_e[:, None] & m_dst[None, :], other=0.0)
            b_w = tl.load(w + (d * E + o_e) * K + k, mask=m_e, other=0.0).to(tl.float32)
            acc += b_w[:, None] * b_g
    tl.store(dx + (i_b * E + o_e[:, None]) * L + o_t[None, :], acc.to(dx.dtype.element_ty), mask=m_e[:, None] & m_t[None, :])


# ------------------------------------------------------------------------------------------- launchers
def _launch_scan_fwd(u, delta, A, B, C, D, z, bias, softplus: bool, out: torch.Tensor, steps: int) -> torch.Tensor:
    """u, delta: (ndir, b, E, L); A (ndir, E, N); B, C (ndir, b, N, L); D, bias (ndir, E); z, out (b, E, L).

    With two directions ``out`` must be a zeroed float32 tensor; it receives (y_0 + y_1) / 2.
    Returns the states at every ``steps``-th step, (ndir, b, E, n_chunks, N).
    """
    ndir, batch, channels, length = u.shape
    state = A.shape[-1]
    n_chunks = triton.cdiv(length, steps)
    states = torch.empty(ndir, batch, channels, n_chunks, state, device=u.device, dtype=torch.float32)
    grid = (batch, triton.cdiv(channels, BLOCK_E), ndir)
    z_ = z if z is not None else out
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else A, z_, bias if bias is not None else A, out, states,
        length, channels, state, n_chunks, 0.5 if ndir == 2 else 1.0,
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *z_.stride(), *out.stride(),
        *states.stride()[:4],
        BLOCK_E=BLOCK_E, BLOCK_N=triton.next_power_of_2(state), CHUNK=steps,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus, BIDIR=ndir == 2,
    )
    return states


def _launch_scan_bwd(u, delta, A, B, C, D, z, bias, softplus, states, dout, steps: int):
    """Gradients of :func:`_launch_scan_fwd`, each in float32 with its input's shape (None if absent)."""
    ndir, batch, channels, length = u.shape
    state = A.shape[-1]
    n_chunks = states.shape[3]
    n_eblk = triton.cdiv(channels, BLOCK_E)
    block_n = triton.next_power_of_2(state)
    f32 = dict(device=u.device, dtype=torch.float32)
    scratch = torch.empty(ndir * batch * n_eblk * steps * BLOCK_E * block_n, **f32)
    du, ddelta = torch.empty(ndir, batch, channels, length, **f32), torch.empty(ndir, batch, channels, length, **f32)
    dA_part = torch.empty(ndir, batch, channels, state, **f32)
    dB_part = torch.empty(ndir, batch, n_eblk, length, state, **f32)
    dC_part = torch.empty(ndir, batch, n_eblk, length, state, **f32)
    dD_part, dbias_part = torch.empty(ndir, batch, channels, **f32), torch.empty(ndir, batch, channels, **f32)
    dz = (torch.zeros if ndir == 2 else torch.empty)(batch, channels, length, **f32) if z is not None else None
    z_ = z if z is not None else dout
    _scan_bwd_kernel[(batch, n_eblk, ndir)](
        u, delta, A, B, C, D if D is not None else A, z_, bias if bias is not None else A, states, scratch, dout,
        du, ddelta, dA_part, dB_part, dC_part, dD_part, dbias_part, dz if dz is not None else du,
        length, channels, state, n_chunks, 0.5 if ndir == 2 else 1.0,
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *z_.stride(), *dout.stride(),
        *states.stride()[:4], *du.stride(), *(dB_part.stride()[:3] + (1,)),
        *(dz.stride() if dz is not None else (0, 0, 0)),
        BLOCK_E=BLOCK_E, BLOCK_N=block_n, CHUNK=steps,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus, BIDIR=ndir == 2,
    )
    dB = dB_part.sum(2).transpose(2, 3)
    dC = dC_part.sum(2).transpose(2, 3)
    return (du, ddelta, dA_part.sum(1), dB, dC, dD_part.sum(1) if D is not None else None, dz,
            dbias_part.sum(1) if bias is not None else None)


def _conv_grid(batch: int, channels: int, length: int):
    return (batch, triton.cdiv(channels, CONV_BLOCK_E), triton.cdiv(length, CONV_BLOCK_T))


def _launch_conv_fwd(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (b, E, L) (any strides); w (ndir, E, K); bias (ndir, E) -> silu(conv) (ndir, b, E, L) in x's dtype."""
    batch, channels, length = x.shape
    ndir, _, taps = w.shape
    u = torch.empty(ndir, batch, channels, length, device=x.device, dtype=x.dtype)
    _conv_fwd_kernel[_conv_grid(batch, channels, length)](
        x, w, bias, u, length, channels, *x.stride(),
        K=taps, NDIR=ndir, BLOCK_E=CONV_BLOCK_E, BLOCK_T=CONV_BLOCK_T,
    )
    return u


def _launch_conv_bwd(x, w, bias, du):
    batch, channels, length = x.shape
    ndir, _, taps = w.shape
    grid = _conv_grid(batch, channels, length)
    f32 = dict(device=x.device, dtype=torch.float32)
    g = torch.empty(ndir, batch, channels, length, **f32)
    dw_part = torch.empty(ndir, batch, grid[2], channels, taps, **f32)
    db_part = torch.empty(ndir, batch, grid[2], channels, **f32)
    _conv_bwd_kernel[grid](
        x, w, bias, du.contiguous(), g, dw_part, db_part, length, channels, *x.stride(),
        K=taps, NDIR=ndir, BLOCK_E=CONV_BLOCK_E, BLOCK_T=CONV_BLOCK_T,
    )
    dx = torch.empty(batch, channels, length, device=x.device, dtype=x.dtype)
    _conv_dx_kernel[grid](w, g, dx, length, channels, K=taps, NDIR=ndir, BLOCK_E=CONV_BLOCK_E, BLOCK_T=CONV_BLOCK_T)
    return dx, dw_part.sum((1, 2)).to(w.dtype), db_part.sum((1, 2)).to(bias.dtype)


# --------------------------------------------------------------------------------- custom ops (the mixer)
# The launches as torch.library custom ops (fake shapes for tracing, a backward op for autograd), so that
# torch.compile(fullgraph=True) and torch.export see each as one opaque operator.
@torch.library.custom_op("visionmamba::triton_conv_silu", mutates_args=())
def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (b, E, L) (any strides); weight (2, E, K); bias (2, E) -> silu(conv) (2, b, E, L) in x's dtype."""
    return _launch_conv_fwd(x, weight, bias)


@conv_silu.register_fake
def _(x, weight, bias):
    return x.new_empty((2, *x.shape))


@torch.library.custom_op("visionmamba::triton_conv_silu_backward", mutates_args=())
def conv_silu_backward(du: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> List[torch.Tensor]:
    return list(_launch_conv_bwd(x, weight, bias, du))


@conv_silu_backward.register_fake
def _(du, x, weight, bias):
    return [t.new_empty(t.shape) for t in (x, weight, bias)]


@torch.library.custom_op("visionmamba::triton_bi_scan", mutates_args=())
def bi_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: torch.Tensor, z: torch.Tensor, bias: torch.Tensor, steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both directions in one launch: out = (y_fwd + y_bwd) / 2, each y = (scan + D u) * silu(z), as (b, E, L)
    in z's dtype; and the states at every ``steps``-th step (2, b, E, chunks, N) the backward restarts from."""
    out = torch.zeros(z.shape, device=z.device, dtype=torch.float32)
    states = _launch_scan_fwd(u, delta, A, B, C, D, z, bias, True, out, steps)
    return out.to(z.dtype), states


@bi_scan.register_fake
def _(u, delta, A, B, C, D, z, bias, steps):
    chunks = (u.shape[-1] + steps - 1) // steps
    return z.new_empty(z.shape), u.new_empty((2, u.shape[1], u.shape[2], chunks, A.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("visionmamba::triton_bi_scan_backward", mutates_args=())
def bi_scan_backward(dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     C: torch.Tensor, D: torch.Tensor, z: torch.Tensor, bias: torch.Tensor, steps: int,
                     states: torch.Tensor) -> List[torch.Tensor]:
    inputs = (u, delta, A, B, C, D, z, bias)
    grads = _launch_scan_bwd(*inputs, True, states, dout, steps)
    return [gr.to(t.dtype).contiguous() for gr, t in zip(grads, inputs)]


@bi_scan_backward.register_fake
def _(dout, u, delta, A, B, C, D, z, bias, steps, states):
    return [t.new_empty(t.shape) for t in (u, delta, A, B, C, D, z, bias)]


register_backward(conv_silu, conv_silu_backward)
register_backward(bi_scan, bi_scan_backward, saved_outputs=1)


# --------------------------------------------------------------------------------------- public functions
def forward(u, delta, A, B, C, D, z, delta_bias, softplus) -> torch.Tensor:
    """One direction (the custom-op contract): u, delta, z (b, E, L); A (E, N); B, C (b, N, L) -> (b, E, L)."""
    out = torch.empty_like(u)
    _launch_scan_fwd(
        u[None], delta[None], A.float()[None], B[None], C[None], _opt1(D), z, _opt1(delta_bias), softplus, out,
        CHECKPOINT_STEPS,
    )
    return out


def backward(u, delta, A, B, C, D, z, delta_bias, softplus, dout):
    out = torch.empty_like(u)
    inputs = (u[None], delta[None], A.float()[None], B[None], C[None], _opt1(D), z, _opt1(delta_bias), softplus)
    states = _launch_scan_fwd(*inputs, out, CHECKPOINT_STEPS)
    du, ddelta, dA, dB, dC, dD, dz, dbias = _launch_scan_bwd(*inputs, states, dout, CHECKPOINT_STEPS)
    cast = lambda gr, t: None if t is None else gr.reshape(t.shape).to(t.dtype)  # noqa: E731
    return (cast(du, u), cast(ddelta, delta), cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), cast(dz, z),
            cast(dbias, delta_bias))


def _opt1(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()[None]


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
    """The fused bidirectional mixer core. Same arguments and result as
    :func:`visionmamba.ops.scan.reference.bidirectional`: x, z (b, L, E) token-major (strided views of
    in_proj's output are fine) -> (b, L, E) in x's dtype. (The kernels read channel-major views of them.)
    """
    x, z = x.transpose(1, 2), z.transpose(1, 2)  # (b, E, L) views
    rank, state = dt_proj_weight.shape[-1], A.shape[-1]
    u = conv_silu(x, conv_weight, conv_bias)  # (2, b, E, L)
    x_dbl = torch.matmul(u.transpose(2, 3), x_proj_weight.to(u.dtype).transpose(1, 2)[:, None])  # (2, b, L, R + 2N)
    dt, B, C = x_dbl.split([rank, state, state], dim=-1)
    delta = torch.matmul(dt, dt_proj_weight.to(dt.dtype).transpose(1, 2)[:, None]).transpose(2, 3)  # (2, b, E, L)
    out, _ = bi_scan(u, delta, A, B.transpose(2, 3), C.transpose(2, 3), D, z, dt_proj_bias, CHECKPOINT_STEPS)
    return out.transpose(1, 2)
