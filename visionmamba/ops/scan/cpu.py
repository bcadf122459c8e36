"""The CPU backend: a fused C++ selective scan, compiled at first use with torch's cpp_extension.

The whole contract is fused: bias, softplus, the D skip and the SiLU(z) gate, forward and backward.
Forward: one task per (batch, channel), a sequential loop over the sequence with the N states in a
SIMD-friendly inner loop. Backward: one task per (batch, block of channels); it recomputes the states of
one channel into a private L x N buffer and walks back through the sequence, so no (batch, E, L, N)
tensor is ever stored. Reductions over channels (dB, dC) go to per-block partial sums added up
afterwards in a fixed order: results are deterministic. Nothing is compiled at install time; when no
compiler is available :func:`available` is False and dispatch falls back to pure PyTorch.
"""
import hashlib
import logging
import os
import sys
from typing import Optional

import torch

from visionmamba.ops.linear import linear
from visionmamba.ops.memory import keep_freed_memory
from visionmamba.ops.scan.custom_op import compute_dtype

CHANNEL_BLOCK = 32

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// One (batch, channel) row of the scan. Sequence tensors are read through a pointer and a time stride,
// so channel-major (B, E, L) and token-major (B, L, E) layouts both work without copies; B_t and C_t
// are N contiguous values at B + t * sbc. With reverse, the row is walked from t = L-1 down to 0.
template <typename T>
struct Row {
  const T* u; int64_t su;
  const T* delta; int64_t sd;
  const T* B; const T* C; int64_t sbc;
  const T* z; int64_t sz;  // z may be null
  const T* A; T D; T bias;  // A: N values of this channel
};

// exp for float: Cody-Waite reduction and a degree-6 polynomial (max relative error 3e-7 on [-87, 0],
// measured against double exp), inlined so that the scan's lane loops vectorise without a libm call:
// 1.6x faster scan than the vector libm exp. Arguments are clamped to [-87, 88] (exp(-87) ~ 1.6e-38 stands
// for the underflowed values). Doubles use the standard exp unchanged.
static inline float vexp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;  // ln 2 split in two (Cody-Waite) so that r is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

static inline double vexp(double x) { return std::exp(x); }

// Scalar helpers taking values, not references: std::max/min on an array element's reference keeps GCC
// from vectorising the exp in the loop around them (4x slower conv measured).
template <typename T>
static inline T sigmoid(T v) {
  const T c = v > T(-80) ? v : T(-80);
  return T(1) / (T(1) + vexp(-c));
}

template <typename T>
static inline T softplus20(T x) {  // softplus with the official threshold: x itself above 20
  return x > T(20) ? x : std::log(T(1) + vexp(x < T(20) ? x : T(20)));
}

// delta_t = softplus(raw_t + bias) (threshold 20), in a loop the compiler vectorises.
template <typename T>
static inline void deltas(const Row<T>& r, bool softplus, T* out, int64_t L) {
#pragma omp simd
  for (int64_t t = 0; t < L; ++t) {
    const T x = r.delta[t * r.sd] + r.bias;
    out[t] = softplus ? softplus20(x) : x;
  }
}

template <typename T>
static inline void sigmoids(const T* x, int64_t sx, T shift, T* out, int64_t L) {
#pragma omp simd
  for (int64_t t = 0; t < L; ++t) out[t] = sigmoid(x[t * sx] + shift);
}

// y_t = scale * (<h_t, C_t> + D u_t) * silu(z_t), written to y[t * sy] (added to it with accumulate).
template <typename T>
void row_forward(const Row<T>& r, bool softplus, bool reverse, int64_t L, int64_t N, T* y, int64_t sy, T scale,
                 bool accumulate, T* __restrict h, T* __restrict dts, T* __restrict sig) {
  deltas(r, softplus, dts, L);
  if (r.z) sigmoids(r.z, r.sz, T(0), sig, L);
  std::fill(h, h + N, T(0));
  const T* __restrict A = r.A;  // locals: stores to h cannot alias them, so the n-loop vectorises
  for (int64_t i = 0; i < L; ++i) {
    const int64_t t = reverse ? L - 1 - i : i;
    const T d = dts[t], ut = r.u[t * r.su], du = d * ut;
    const T* __restrict Bn = r.B + t * r.sbc;
    const T* __restrict Cn = r.C + t * r.sbc;
    T acc = 0;
#pragma omp simd reduction(+:acc)
    for (int64_t n = 0; n < N; ++n) {
      const T hn = vexp(d * A[n]) * h[n] + du * Bn[n];
      h[n] = hn;
      acc += Cn[n] * hn;
    }
    acc = (acc + r.D * ut) * scale;
    if (r.z) acc *= r.z[t * r.sz] * sig[t];
    y[t * sy] = accumulate ? y[t * sy] + acc : acc;
  }
}

// Gradients of row_forward given dout (time stride so). Writes du, ddelta (w.r.t. the raw delta) and dz
// (added with accumulate_dz); adds dB_t, dC_t into dB/dC (time stride sdbc); returns dA (N), dD, dbias.
template <typename T>
void row_backward(const Row<T>& r, bool softplus, bool reverse, int64_t L, int64_t N, T scale,
                  const T* dout, int64_t so, T* du, int64_t sdu, T* ddelta, int64_t sdd, T* dz, int64_t sdz,
                  bool accumulate_dz, T* dB, T* dC, int64_t sdbc, T* __restrict dA, T* dD, T* dbias,
                  T* __restrict H, T* __restrict Ad, T* __restrict ys, T* __restrict g, T* __restrict dts,
                  T* __restrict zsig, T* __restrict dsp) {
  const T* __restrict A = r.A;
  deltas(r, softplus, dts, L);
  if (r.z) sigmoids(r.z, r.sz, T(0), zsig, L);
  if (softplus) sigmoids(r.delta, r.sd, r.bias, dsp, L);
  std::vector<T> zero_state(N, T(0));
  const T* zeros = zero_state.data();  // h_{-1}
  // The states, recomputed: H[i] holds h after step i, Ad[i] the decays exp(delta A) of step i (kept, not
  // recomputed in the walk back) and ys[i] the pre-gate output <h, C> + D u that the z gradient needs.
  for (int64_t i = 0; i < L; ++i) {
    const int64_t t = reverse ? L - 1 - i : i;
    const T d = dts[t], ut = r.u[t * r.su], dux = d * ut;
    const T* __restrict Bn = r.B + t * r.sbc;
    const T* __restrict Cn = r.C + t * r.sbc;
    T* __restrict cur = H + i * N;
    T* __restrict a = Ad + i * N;
    const T* __restrict prev = i > 0 ? H + (i - 1) * N : zeros;
    T y = 0;
#pragma omp simd reduction(+:y)
    for (int64_t n = 0; n < N; ++n) {
      a[n] = vexp(d * A[n]);
      cur[n] = a[n] * prev[n] + dux * Bn[n];
      y += Cn[n] * cur[n];
    }
    ys[i] = y + r.D * ut;
  }
  std::fill(g, g + N, T(0));
  std::fill(dA, dA + N, T(0));
  T accD = 0, accb = 0;
  for (int64_t i = L - 1; i >= 0; --i) {  // adjoint walk: g = dL/dh through h_i = a_i h_{i-1} + delta u B
    const int64_t t = reverse ? L - 1 - i : i;
    const T d = dts[t], ut = r.u[t * r.su];
    const T* __restrict Bn = r.B + t * r.sbc;
    const T* __restrict Cn = r.C + t * r.sbc;
    const T* __restrict cur = H + i * N;
    const T* __restrict prev = i > 0 ? H + (i - 1) * N : zeros;
    T dy = dout[t * so] * scale;
    if (r.z) {
      const T zt = r.z[t * r.sz], sg = zsig[t], y = ys[i];
      const T dzt = dy * y * sg * (T(1) + zt * (T(1) - sg));
      dz[t * sdz] = accumulate_dz ? dz[t * sdz] + dzt : dzt;
      dy *= zt * sg;
    }
    T* __restrict dBn = dB + t * sdbc;
    T* __restrict dCn = dC + t * sdbc;
    T dd = 0, duu = 0;
    const T* __restrict decay = Ad + i * N;
#pragma omp simd reduction(+:dd, duu)
    for (int64_t n = 0; n < N; ++n) {
      const T a = decay[n];
      const T hprev = prev[n];
      const T gn = g[n] + dy * Cn[n];
      dCn[n] += dy * cur[n];
      dBn[n] += gn * d * ut;
      dd += gn * (A[n] * a * hprev + ut * Bn[n]);
      duu += gn * Bn[n];
      dA[n] += gn * d * a * hprev;
      g[n] = gn * a;
    }
    if (softplus && r.delta[t * r.sd] + r.bias <= T(20)) dd *= dsp[t];
    ddelta[t * sdd] = dd;
    du[t * sdu] = duu * d + dy * r.D;
    accD += dy * ut;
    accb += dd;
  }
  *dD = accD;
  *dbias = accb;
}

template <typename T>
static const T* opt(const torch::Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; }

// Row (b, e) of the one-direction entry points: channel-major u, delta, z; time-major Bt, Ct.
template <typename T>
static Row<T> single_row(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A,
                         const torch::Tensor& Bt, const torch::Tensor& Ct, const torch::Tensor& D,
                         const torch::Tensor& z, const torch::Tensor& bias, int64_t b, int64_t e) {
  const int64_t E = u.size(1), L = u.size(2), N = A.size(1), be = b * E + e;
  const T *pD = opt<T>(D), *pz = opt<T>(z), *pb = opt<T>(bias);
  return Row<T>{u.data_ptr<T>() + be * L, 1, delta.data_ptr<T>() + be * L, 1,
                Bt.data_ptr<T>() + b * L * N, Ct.data_ptr<T>() + b * L * N, N,
                pz ? pz + be * L : nullptr, 1, A.data_ptr<T>() + e * N, pD ? pD[e] : T(0), pb ? pb[e] : T(0)};
}

// Where the bidirectional entry points find B, C and z (strided views of x_proj's and in_proj's outputs).
struct BiViews {
  int64_t c_off, sB_d, sB_b, sB_t, sz_b, sz_e, sz_t;
};

// Row (dir, b, e) of the bidirectional entry points: u, delta (2, Bsz, E, L) channel-major.
template <typename T>
static Row<T> bi_row(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& Bv,
                     const torch::Tensor& D, const torch::Tensor& z, const torch::Tensor& bias, const BiViews& v,
                     int64_t dir, int64_t b, int64_t e) {
  const int64_t Bsz = u.size(1), E = u.size(2), L = u.size(3), N = A.size(2);
  const int64_t row = (dir * Bsz + b) * E + e;
  const T* bc = Bv.data_ptr<T>() + dir * v.sB_d + b * v.sB_b;
  return Row<T>{u.data_ptr<T>() + row * L, 1, delta.data_ptr<T>() + row * L, 1, bc, bc + v.c_off, v.sB_t,
                z.data_ptr<T>() + b * v.sz_b + e * v.sz_e, v.sz_t, A.data_ptr<T>() + (dir * E + e) * N,
                D.data_ptr<T>()[dir * E + e], bias.data_ptr<T>()[dir * E + e]};
}

// ---------------------------------------------------------------- one direction, channel-major layout
// u, delta, z: (Bsz, E, L); A: (E, N); Bt, Ct: (Bsz, L, N); D, bias: (E,) or empty.
torch::Tensor forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt, torch::Tensor Ct,
                      torch::Tensor D, torch::Tensor z, torch::Tensor bias, bool softplus) {
  auto y = torch::empty_like(u);
  const int64_t Bsz = u.size(0), E = u.size(1), L = u.size(2), N = A.size(1);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_scan_fwd", [&] {
    using T = scalar_t;
    at::parallel_for(0, Bsz * E, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> h(N), dts(L), sig(L);
      for (int64_t be = begin; be < end; ++be) {
        const int64_t b = be / E, e = be % E;
        const Row<T> r = single_row<T>(u, delta, A, Bt, Ct, D, z, bias, b, e);
        row_forward(r, softplus, false, L, N, y.data_ptr<T>() + be * L, 1, T(1), false, h.data(), dts.data(), sig.data());
      }
    });
  });
  return y;
}

// Gradients; dB and dC are summed over channels through per-block partial buffers (fixed order).
std::vector<torch::Tensor> backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt,
                                    torch::Tensor Ct, torch::Tensor D, torch::Tensor z, torch::Tensor bias,
                                    bool softplus, torch::Tensor dout, int64_t blk) {
  const int64_t Bsz = u.size(0), E = u.size(1), L = u.size(2), N = A.size(1);
  const int64_t nblk = (E + blk - 1) / blk;
  auto du = torch::empty_like(u), ddelta = torch::empty_like(u);
  auto dz = z.numel() ? torch::empty_like(u) : torch::empty({0}, u.options());
  auto dA_part = torch::empty({Bsz, E, N}, u.options());
  auto dD_part = torch::empty({Bsz, E}, u.options()), dbias_part = torch::empty({Bsz, E}, u.options());
  auto dB_part = torch::zeros({Bsz, nblk, L, N}, u.options());
  auto dC_part = torch::zeros({Bsz, nblk, L, N}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_scan_bwd", [&] {
    using T = scalar_t;
    const bool has_z = z.numel() > 0;
    at::parallel_for(0, Bsz * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> H(L * N), Ad(L * N), ys(L), g(N), dts(L), zsig(L), dsp(L);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nblk, k = task % nblk;
        for (int64_t e = k * blk; e < std::min(E, (k + 1) * blk); ++e) {
          const int64_t be = b * E + e;
          const Row<T> r = single_row<T>(u, delta, A, Bt, Ct, D, z, bias, b, e);
          row_backward(r, softplus, false, L, N, T(1), dout.data_ptr<T>() + be * L, 1,
                       du.data_ptr<T>() + be * L, 1, ddelta.data_ptr<T>() + be * L, 1,
                       has_z ? dz.data_ptr<T>() + be * L : nullptr, 1, false,
                       dB_part.data_ptr<T>() + (b * nblk + k) * L * N, dC_part.data_ptr<T>() + (b * nblk + k) * L * N, N,
                       dA_part.data_ptr<T>() + be * N, dD_part.data_ptr<T>() + be, dbias_part.data_ptr<T>() + be,
                       H.data(), Ad.data(), ys.data(), g.data(), dts.data(), zsig.data(), dsp.data());
        }
      }
    });
  });
  return {du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part};
}

// ------------------------------------------------------------------------------------ both directions
// Forward of both directions with channels as the SIMD lanes: a task owns up to GROUP x 16 channels of one
// batch row and walks t; per step and state n it updates 16 independent states (no horizontal reduction,
// 16-wide exps). u: (2, Bsz, L, E) contiguous; xdbl: x_proj's output (2, Bsz, L, R + 2N) through strides
// (sB_d, sB_b, sB_t): dt_t in columns [0, R), B_t from R, C_t at B_t + c_off; W_t: dt_proj's weight (2, R, E),
// applied inside the kernel so that delta (as large as u) is never written; A_ne: (2, N, E); z: (Bsz, E, L)
// with contiguous channels; D, bias: (2, E). Returns (Bsz, L, E) = (y_forward + y_backward) / 2, the
// backward direction walking t = L-1 .. 0.
constexpr int64_t LANES = 16;

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define VM_AVX512 1
// One time step of 16 channels x N states in AVX-512 registers: h = exp(d A) h + du B_n; acc += C_n h.
// exp(d A) = 2^(d A log2 e) with A2 = A log2 e: f = x - floor(x) (vreduceps), a degree-5 polynomial for 2^f
// on [0, 1) (max relative error 1.6e-7 in float32 evaluation), then vscalefps multiplies by 2^floor(x),
// underflowing gradually to 0 (no clamp needed): 8 instructions per 16 exps.
static inline void states_avx512(const float* d, const float* du, float* acc, const float* A2, int64_t E,
                                 const float* Bt, const float* Ct, int64_t N, float* __restrict h) {
  const __m512 vd = _mm512_loadu_ps(d), vdu = _mm512_loadu_ps(du);
  __m512 vacc = _mm512_loadu_ps(acc), vacc2 = _mm512_setzero_ps();  // two sums: half the add-latency chain
  const __m512 c0 = _mm512_set1_ps(0.99999994039535522f), c1 = _mm512_set1_ps(0.69315308332443237f),
               c2 = _mm512_set1_ps(0.24015359580516815f), c3 = _mm512_set1_ps(0.055826339870691299f),
               c4 = _mm512_set1_ps(0.0089893406257033348f), c5 = _mm512_set1_ps(0.0018775670323520899f);
  for (int64_t n = 0; n < N; ++n) {
    const __m512 x = _mm512_mul_ps(vd, _mm512_loadu_ps(A2 + n * E));
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_fmadd_ps(c5, f, c4);
    p = _mm512_fmadd_ps(p, f, c3);
    p = _mm512_fmadd_ps(p, f, c2);
    p = _mm512_fmadd_ps(p, f, c1);
    p = _mm512_fmadd_ps(p, f, c0);
    const __m512 a = _mm512_scalef_ps(p, x);
    const __m512 hv = _mm512_fmadd_ps(a, _mm512_loadu_ps(h + n * 16), _mm512_mul_ps(vdu, _mm512_set1_ps(Bt[n])));
    _mm512_storeu_ps(h + n * 16, hv);
    if (n & 1)
      vacc2 = _mm512_fmadd_ps(_mm512_set1_ps(Ct[n]), hv, vacc2);
    else
      vacc = _mm512_fmadd_ps(_mm512_set1_ps(Ct[n]), hv, vacc);
  }
  _mm512_storeu_ps(acc, _mm512_add_ps(vacc, vacc2));
}
#endif

// One direction over channels [e0, e1) (blocks of 16, the SIMD lanes), in chunks of CHUNK steps with three
// phases per block, so that only the recurrence itself is sequential: (1) for every step of the chunk, delta
// = softplus(W dt_t + bias) (dt_proj fused: delta, as large as u, is never stored), delta u and the D skip;
// (2) the N-state recurrence; (3) the SiLU(z) gate and the output. Phases 1 and 3 have no dependence between
// steps and run at full throughput; doing them inside each step (an earlier version) left the core waiting
// on their ~200-cycle latency chains (1.6x slower). Bp: x_proj's output row at t = 0 (dt_t in columns
// [0, R), B_t from R, C_t at B_t + c_off). h: (blocks, N, 16) states.
constexpr int64_t CHUNK = 32;

template <typename T, bool FULL>
static void block_chunk(const T* u, const T* Wt, int64_t R, const T* A, const T* A2, const T* Bp, int64_t c_off,
                        int64_t sB_t, const T* Dv, const T* bias, const T* zb, int64_t sz_t, T* out, int64_t E,
                        int64_t N, int64_t e0, int64_t w, bool reverse, int64_t i0, int64_t steps, int64_t L,
                        T* __restrict h, T* __restrict d, T* __restrict du, T* __restrict acc) {
  const int64_t cnt = FULL ? LANES : w;
  for (int64_t j = 0; j < steps; ++j) {  // phase 1
    const int64_t t = reverse ? L - 1 - (i0 + j) : i0 + j;
    const T* __restrict ut = u + t * E + e0;
    const T* __restrict dtr = Bp + t * sB_t;
    T x0[LANES], x1[LANES];  // two partial sums: half the dependent-FMA chain
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) x0[e] = x1[e] = T(0);
    int64_t r = 0;
    for (; r + 1 < R; r += 2) {
      const T a = dtr[r], b = dtr[r + 1];
      const T* __restrict W0 = Wt + r * E + e0;
      const T* __restrict W1 = W0 + E;
#pragma omp simd
      for (int64_t e = 0; e < cnt; ++e) {
        x0[e] += a * W0[e];
        x1[e] += b * W1[e];
      }
    }
    if (r < R) {
      const T a = dtr[r];
      const T* __restrict W0 = Wt + r * E + e0;
#pragma omp simd
      for (int64_t e = 0; e < cnt; ++e) x0[e] += a * W0[e];
    }
    T* __restrict dj = d + j * LANES;
    T* __restrict duj = du + j * LANES;
    T* __restrict aj = acc + j * LANES;
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) {
      dj[e] = softplus20(x0[e] + x1[e] + bias[e0 + e]);
      duj[e] = dj[e] * ut[e];
      aj[e] = Dv[e0 + e] * ut[e];
    }
  }
  for (int64_t j = 0; j < steps; ++j) {  // phase 2: the recurrence
    const int64_t t = reverse ? L - 1 - (i0 + j) : i0 + j;
    if (i0 + CHUNK + j < L) {  // the next chunk's rows, whose strided addresses the hardware would not prefetch
      const int64_t p = reverse ? t - CHUNK : t + CHUNK;
      __builtin_prefetch(u + p * E + e0);
      __builtin_prefetch(zb + p * sz_t + e0);
      __builtin_prefetch(out + p * E + e0, 1);
      for (int64_t c = 0; c < R + 2 * N; c += 64 / sizeof(T)) __builtin_prefetch(Bp + p * sB_t + c);
    }
    const T* __restrict Bt = Bp + t * sB_t + R;
    const T* __restrict Ct = Bt + c_off;
    T* __restrict dj = d + j * LANES;
    T* __restrict duj = du + j * LANES;
    T* __restrict aj = acc + j * LANES;
#ifdef VM_AVX512
    if constexpr (FULL && std::is_same<T, float>::value) {
      states_avx512(dj, duj, aj, A2 + e0, E, Bt, Ct, N, h);
      continue;
    }
#endif
    for (int64_t n = 0; n < N; ++n) {
      const T bn = Bt[n], cn = Ct[n];
      const T* __restrict An = A + n * E + e0;
      T* __restrict hn = h + n * LANES;
#pragma omp simd
      for (int64_t e = 0; e < cnt; ++e) {
        const T hv = vexp(dj[e] * An[e]) * hn[e] + duj[e] * bn;
        hn[e] = hv;
        aj[e] += cn * hv;
      }
    }
  }
  for (int64_t j = 0; j < steps; ++j) {  // phase 3
    const int64_t t = reverse ? L - 1 - (i0 + j) : i0 + j;
    const T* __restrict aj = acc + j * LANES;
    const T* __restrict zt = zb + t * sz_t + e0;  // channels contiguous (checked)
    T* __restrict o = out + t * E + e0;
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) {
      const T y = T(0.5) * aj[e] * zt[e] * sigmoid(zt[e]);
      o[e] = reverse ? o[e] + y : y;
    }
  }
}

template <typename T>
static void lanes_direction(const T* u, const T* Wt, int64_t R, const T* A, const T* A2, const T* Bp, int64_t c_off,
                            int64_t sB_t, const T* Dv, const T* bias, const T* zb, int64_t sz_t, T* out,
                            int64_t L, int64_t E, int64_t N, int64_t e0, int64_t e1, bool reverse, T* __restrict h) {
  const int64_t nb = (e1 - e0 + LANES - 1) / LANES;
  std::fill(h, h + nb * N * LANES, T(0));
  alignas(64) T d[CHUNK * LANES], du[CHUNK * LANES], acc[CHUNK * LANES];
  for (int64_t i0 = 0; i0 < L; i0 += CHUNK) {
    const int64_t steps = std::min(CHUNK, L - i0);
    for (int64_t k = 0; k < nb; ++k) {
      const int64_t eb = e0 + k * LANES, w = std::min(LANES, e1 - eb);
      if (w == LANES)
        block_chunk<T, true>(u, Wt, R, A, A2, Bp, c_off, sB_t, Dv, bias, zb, sz_t, out, E, N, eb, w, reverse, i0,
                             steps, L, h + k * N * LANES, d, du, acc);
      else
        block_chunk<T, false>(u, Wt, R, A, A2, Bp, c_off, sB_t, Dv, bias, zb, sz_t, out, E, N, eb, w, reverse, i0,
                              steps, L, h + k * N * LANES, d, du, acc);
    }
  }
}

constexpr int64_t GROUP = 4;  // blocks of 16 channels per task

torch::Tensor bi_forward(torch::Tensor u, torch::Tensor W_t, torch::Tensor A_ne, torch::Tensor xdbl, int64_t c_off,
                         int64_t sB_d, int64_t sB_b, int64_t sB_t,
                         torch::Tensor D, torch::Tensor z, int64_t sz_b, int64_t sz_e, int64_t sz_t, torch::Tensor bias) {
  const int64_t Bsz = u.size(1), L = u.size(2), E = u.size(3), N = A_ne.size(1), R = W_t.size(1);
  TORCH_CHECK(sz_e == 1, "bi_forward: z must have contiguous channels");
  TORCH_CHECK(u.is_contiguous() && W_t.is_contiguous(), "bi_forward: u and W_t must be contiguous");
  const int64_t span = GROUP * LANES, ngrp = (E + span - 1) / span;
  auto out = torch::empty({Bsz, L, E}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_biscan_fwd", [&] {
    using T = scalar_t;
    std::vector<T> A2(2 * N * E);  // A log2(e), for the base-2 exps of the AVX-512 path
    for (int64_t i = 0; i < 2 * N * E; ++i) A2[i] = A_ne.data_ptr<T>()[i] * T(1.4426950408889634);
    at::parallel_for(0, Bsz * ngrp, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> h(GROUP * N * LANES);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / ngrp, e0 = (task % ngrp) * span, e1 = std::min(E, e0 + span);
        for (int64_t dir = 0; dir < 2; ++dir) {
          const T* pu = u.data_ptr<T>() + (dir * Bsz + b) * L * E;
          const T* pW = W_t.data_ptr<T>() + dir * R * E;
          const T* pA = A_ne.data_ptr<T>() + dir * N * E;
          const T* pA2 = A2.data() + dir * N * E;
          const T* pB = xdbl.data_ptr<T>() + dir * sB_d + b * sB_b;
          const T* pD = D.data_ptr<T>() + dir * E;
          const T* pbias = bias.data_ptr<T>() + dir * E;
          const T* pz = z.data_ptr<T>() + b * sz_b;
          T* po = out.data_ptr<T>() + b * L * E;
          lanes_direction<T>(pu, pW, R, pA, pA2, pB, c_off, sB_t, pD, pbias, pz, sz_t, po, L, E, N, e0, e1, dir == 1, h.data());
        }
      }
    });
  });
  return out;
}

// Gradients of bi_forward, from channel-major copies: u, delta (2, Bsz, E, L), dout (Bsz, E, L); A (2, E, N);
// dB and dC go to per-channel-block partials of x_proj's output layout (2N columns).
std::vector<torch::Tensor> bi_backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bv,
                                       int64_t c_off, int64_t sB_d, int64_t sB_b, int64_t sB_t,
                                       torch::Tensor D, torch::Tensor z, int64_t sz_b, int64_t sz_e,
                                       int64_t sz_t, torch::Tensor bias, torch::Tensor dout, int64_t blk) {
  const int64_t Bsz = u.size(1), E = u.size(2), L = u.size(3), N = A.size(2);
  const int64_t nblk = (E + blk - 1) / blk;
  const BiViews views{c_off, sB_d, sB_b, sB_t, sz_b, sz_e, sz_t};
  auto du = torch::empty_like(u), ddelta = torch::empty_like(u);
  auto dz = torch::empty({Bsz, E, L}, u.options());
  auto dA_part = torch::empty({Bsz, 2, E, N}, u.options());
  auto dD_part = torch::empty({Bsz, 2, E}, u.options()), dbias_part = torch::empty({Bsz, 2, E}, u.options());
  auto dBC_part = torch::zeros({nblk, 2, Bsz, L, 2 * N}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_biscan_bwd", [&] {
    using T = scalar_t;
    at::parallel_for(0, Bsz * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> H(L * N), Ad(L * N), ys(L), g(N), dts(L), zsig(L), dsp(L);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nblk, k = task % nblk;
        for (int64_t e = k * blk; e < std::min(E, (k + 1) * blk); ++e) {
          for (int64_t dir = 0; dir < 2; ++dir) {
            const int64_t row = (dir * Bsz + b) * E + e;
            const Row<T> r = bi_row<T>(u, delta, A, Bv, D, z, bias, views, dir, b, e);
            T* dbc = dBC_part.data_ptr<T>() + ((k * 2 + dir) * Bsz + b) * L * 2 * N;
            const int64_t i = (b * 2 + dir) * E + e;
            row_backward(r, true, dir == 1, L, N, T(0.5), dout.data_ptr<T>() + (b * E + e) * L, 1,
                         du.data_ptr<T>() + row * L, 1, ddelta.data_ptr<T>() + row * L, 1,
                         dz.data_ptr<T>() + (b * E + e) * L, 1, dir == 1, dbc, dbc + N, 2 * N,
                         dA_part.data_ptr<T>() + i * N, dD_part.data_ptr<T>() + i, dbias_part.data_ptr<T>() + i,
                         H.data(), Ad.data(), ys.data(), g.data(), dts.data(), zsig.data(), dsp.data());
          }
        }
      }
    });
  });
  return {du, ddelta, dz, dA_part, dBC_part, dD_part, dbias_part};
}

// Depthwise conv (K taps) + SiLU for both directions: causal for 0, anti-causal for 1, no flipped copies.
// x: (Bsz, L, E) with row stride sx_t; w: (2, K, E) (taps major: contiguous over channels); bias: (2, E)
// -> u: (2, Bsz, L, E).
// Pre-activation of one output row (dir, b, t) over all channels: bias + the K taps (zero outside [0, L)).
template <typename T>
static inline void conv_preact(const T* px, int64_t sx_b, int64_t sx_t, const T* pw, const T* pb, int64_t dir,
                               int64_t b, int64_t t, int64_t L, int64_t E, int64_t K, T* out) {
  const int64_t sign = dir == 0 ? 1 : -1;
  for (int64_t e = 0; e < E; ++e) out[e] = pb[dir * E + e];
  for (int64_t k = 0; k < K; ++k) {
    const int64_t src = t + sign * (k - (K - 1));
    if (src < 0 || src >= L) continue;
    const T* xs = px + b * sx_b + src * sx_t;
    const T* wk = pw + (dir * K + k) * E;
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) out[e] += wk[e] * xs[e];
  }
}

template <typename T>
void conv_fwd_impl(const T* px, int64_t sx_b, int64_t sx_t, const T* pw, const T* pb, T* pu,
                   int64_t Bsz, int64_t L, int64_t E, int64_t K) {
  at::parallel_for(0, 2 * Bsz * L, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t dir = row / (Bsz * L), b = (row / L) % Bsz, t = row % L;
      T* out = pu + row * E;
      conv_preact(px, sx_b, sx_t, pw, pb, dir, b, t, L, E, K, out);
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) {
        const T v = out[e];
        out[e] = v * sigmoid(v);
      }
    }
  });
}

torch::Tensor conv_forward(torch::Tensor x, int64_t sx_b, int64_t sx_t, torch::Tensor w, torch::Tensor bias, int64_t Bsz, int64_t L) {
  const int64_t K = w.size(1), E = w.size(2);
  auto u = torch::empty({2, Bsz, L, E}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "visionmamba_conv_fwd", [&] {
    conv_fwd_impl<scalar_t>(x.data_ptr<scalar_t>(), sx_b, sx_t, w.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                            u.data_ptr<scalar_t>(), Bsz, L, E, K);
  });
  return u;
}

template <typename T>
void conv_bwd_impl(const T* px, int64_t sx_b, int64_t sx_t, const T* pw, const T* pb, const T* pdu, T* pg, T* pdx,
                   T* pdw, T* pdb, int64_t Bsz, int64_t L, int64_t E, int64_t K) {
  at::parallel_for(0, Bsz, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> pre(E);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t dir = 0; dir < 2; ++dir) {
        const int64_t sign = dir == 0 ? 1 : -1;
        for (int64_t t = 0; t < L; ++t) {  // g = du * silu'(pre-activation), then dw, db and dx
          conv_preact(px, sx_b, sx_t, pw, pb, dir, b, t, L, E, K, pre.data());
          const int64_t row = (dir * Bsz + b) * L + t;
          T* gr = pg + row * E;
          T* db = pdb + (b * 2 + dir) * E;
#pragma omp simd
          for (int64_t e = 0; e < E; ++e) {
            const T sg = sigmoid(pre[e]);
            gr[e] = pdu[row * E + e] * sg * (T(1) + pre[e] * (T(1) - sg));
            db[e] += gr[e];
          }
          for (int64_t k = 0; k < K; ++k) {
            const int64_t src = t + sign * (k - (K - 1));
            if (src < 0 || src >= L) continue;
            const T* xs = px + b * sx_b + src * sx_t;
            T* dxs = pdx + (b * L + src) * E;
            T* dw = pdw + ((b * 2 + dir) * K + k) * E;
            const T* wk = pw + (dir * K + k) * E;
#pragma omp simd
            for (int64_t e = 0; e < E; ++e) {
              dw[e] += gr[e] * xs[e];
              dxs[e] += wk[e] * gr[e];
            }
          }
        }
      }
    }
  });
}

// Returns dx (Bsz, L, E), dw_part (Bsz, 2, K, E), db_part (Bsz, 2, E) (partial sums over the batch).
std::vector<torch::Tensor> conv_backward(torch::Tensor x, int64_t sx_b, int64_t sx_t, torch::Tensor w, torch::Tensor bias,
                                         torch::Tensor du, int64_t Bsz, int64_t L) {
  const int64_t K = w.size(1), E = w.size(2);
  auto gpre = torch::empty({2, Bsz, L, E}, w.options());
  auto dx = torch::zeros({Bsz, L, E}, w.options());
  auto dw_part = torch::zeros({Bsz, 2, K, E}, w.options()), db_part = torch::zeros({Bsz, 2, E}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "visionmamba_conv_bwd", [&] {
    conv_bwd_impl<scalar_t>(x.data_ptr<scalar_t>(), sx_b, sx_t, w.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                            du.data_ptr<scalar_t>(), gpre.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                            dw_part.data_ptr<scalar_t>(), db_part.data_ptr<scalar_t>(), Bsz, L, E, K);
  });
  return {dx, dw_part, db_part};
}
"""

_extension = None
_build_error: Optional[str] = None


def _load():
    """Compile (once per source version; cached by torch under TORCH_EXTENSIONS_DIR) and import the kernel."""
    global _extension, _build_error
    if _extension is None and _build_error is None:
        digest = hashlib.sha1((_SOURCE + torch.__version__).encode()).hexdigest()[:10]
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "no CUDA runtime found" is expected on CPU machines
        try:
            from torch.utils.cpp_extension import _get_build_directory, load_inline

            name = f"visionmamba_scan_cpu_{digest}"
            if not os.path.exists(os.path.join(_get_build_directory(name, False), f"{name}.so")):
                print("visionmamba: compiling the C++ CPU scan once (about a minute; cached afterwards)", file=sys.stderr)
            _extension = load_inline(
                name=name,
                cpp_sources=_SOURCE,
                functions=["forward", "backward", "bi_forward", "bi_backward", "conv_forward", "conv_backward"],
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=bool(os.environ.get("VISIONMAMBA_VERBOSE_BUILD")),
            )
        except Exception as err:  # no compiler, no ninja, headers missing: reported once by the dispatcher
            lines = str(err).strip().splitlines() or [""]
            _build_error = f"{type(err).__name__}: " + next((line for line in lines if "error" in line), lines[-1])
        finally:
            quiet.setLevel(level)
    if _extension is None:
        raise RuntimeError(f"the C++ CPU scan could not be built ({_build_error})")
    keep_freed_memory()  # the CPU path's large activations would otherwise be page-faulted in anew each layer
    return _extension


def available() -> bool:
    """True when the kernel builds (the first call compiles it, about a minute)."""
    try:
        _load()
        return True
    except RuntimeError:
        return False


def _prepare(u, delta, A, B, C, D, z, delta_bias):
    """Everything in one compute dtype, contiguous; B and C time-major; absent inputs as empty tensors."""
    ct = compute_dtype(u.dtype)
    empty = u.new_empty(0, dtype=ct)
    cast = lambda t: empty if t is None else t.to(ct).contiguous()  # noqa: E731
    return (cast(u), cast(delta), cast(A), B.to(ct).transpose(1, 2).contiguous(), C.to(ct).transpose(1, 2).contiguous(),
            cast(D), cast(z), cast(delta_bias))


def forward(u, delta, A, B, C, D, z, delta_bias, softplus) -> torch.Tensor:
    """The whole contract (bias, softplus, D skip, SiLU gate) in one fused pass; returns u's dtype."""
    if u.device.type != "cpu":
        raise ValueError(f"the 'cpu' scan backend needs CPU tensors, got {u.device}; use backend='auto'")
    return _load().forward(*_prepare(u, delta, A, B, C, D, z, delta_bias), softplus).to(u.dtype)


def backward(u, delta, A, B, C, D, z, delta_bias, softplus, dout):
    du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part = _load().backward(
        *_prepare(u, delta, A, B, C, D, z, delta_bias), softplus, dout.to(compute_dtype(u.dtype)).contiguous(), CHANNEL_BLOCK
    )
    return (
        du.to(u.dtype), ddelta.to(delta.dtype), dA_part.sum(0).to(A.dtype),
        dB_part.sum(1).transpose(1, 2).to(B.dtype), dC_part.sum(1).transpose(1, 2).to(C.dtype),
        None if D is None else dD_part.sum(0).to(D.dtype), None if z is None else dz.to(z.dtype),
        None if delta_bias is None else dbias_part.sum(0).to(delta_bias.dtype),
    )


# ------------------------------------------------------------------------- both directions, fused
class _ConvSiLU(torch.autograd.Function):
    """x (b, L, E) token-major (a strided view is fine); w (2, E, K); bias (2, E) -> u (2, b, L, E)."""

    @staticmethod
    def forward(ctx, x, w, bias):
        taps_major = w.transpose(1, 2).contiguous()  # (2, K, E)
        ctx.save_for_backward(x, taps_major, bias)
        return _load().conv_forward(x, x.stride(0), x.stride(1), taps_major, bias.contiguous(), x.shape[0], x.shape[1])

    @staticmethod
    def backward(ctx, du):
        x, taps_major, bias = ctx.saved_tensors
        dx, dw_part, db_part = _load().conv_backward(
            x, x.stride(0), x.stride(1), taps_major, bias.contiguous(), du.contiguous(), x.shape[0], x.shape[1]
        )
        return dx, dw_part.sum(0).transpose(1, 2), db_part.sum(0)


class _BiScan(torch.autograd.Function):
    """Both directions, dt_proj included: u (2, b, L, E) contiguous; dt, B, C views (2, b, L, R / N / N) into
    x_proj's (2, b, L, R + 2N) output; dt_weight (2, E, R); z (b, E, L) (a strided view is fine); A (2, E, N);
    D, bias (2, E) -> (y_fwd + y_bwd) / 2 as (b, L, E). The forward vectorises over channels and computes
    delta = dt_weight dt inside the kernel; the backward recomputes delta and works on channel-major copies."""

    @staticmethod
    def forward(ctx, u, dt, dt_weight, A, B, C, D, z, bias):
        if z.stride(1) != 1:  # the kernel reads z_t as contiguous channels (in the mixer it is a view that does)
            z = z.transpose(1, 2).contiguous().transpose(1, 2)
        if dt.stride() != B.stride() or B.data_ptr() - dt.data_ptr() != dt.shape[-1] * dt.element_size():
            raise ValueError("dt, B and C must be consecutive column slices of one (2, batch, L, R + 2N) tensor")
        u = u.contiguous()
        ctx.save_for_backward(u, dt, dt_weight, A, B, C, D, z, bias)
        A_ne = A.transpose(1, 2).contiguous()  # (2, N, E): channels contiguous, the lanes
        W_t = dt_weight.transpose(1, 2).contiguous()  # (2, R, E)
        return _load().bi_forward(u, W_t, A_ne, dt, _c_offset(B, C), *B.stride()[:3], D, z, *z.stride(), bias)

    @staticmethod
    def backward(ctx, dout):
        u, dt, dt_weight, A, B, C, D, z, bias = ctx.saved_tensors
        state = A.shape[-1]
        u_c = u.transpose(2, 3).contiguous()  # (2, b, E, L)
        delta_c = dt_weight.unsqueeze(1) @ dt.transpose(2, 3)  # (2, b, E, L), as the forward computed it
        du, ddelta, dz, dA_part, dBC_part, dD_part, dbias_part = _load().bi_backward(
            u_c, delta_c, A, B, _c_offset(B, C), *B.stride()[:3], D, z, *z.stride(), bias,
            dout.transpose(1, 2).contiguous(), CHANNEL_BLOCK,
        )
        dBC = dBC_part.sum(0)
        ddt = ddelta.transpose(2, 3) @ dt_weight.unsqueeze(1)  # (2, b, L, R)
        ddt_weight = torch.einsum("dbel,dblr->der", ddelta, dt)
        return (du.transpose(2, 3), ddt, ddt_weight, dA_part.sum(0), dBC[..., :state], dBC[..., state:],
                dD_part.sum(0), dz, dbias_part.sum(0))


def _c_offset(B: torch.Tensor, C: torch.Tensor) -> int:
    """Elements from B_t to C_t: B and C are column slices of one (2, b, L, P) tensor (x_proj's output)."""
    if B.stride() != C.stride() or B.stride(-1) != 1 or B.dtype != C.dtype:
        raise ValueError("B and C must be column slices of one (2, batch, L, P) tensor with contiguous states")
    return (C.data_ptr() - B.data_ptr()) // B.element_size()


def bidirectional(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D) -> torch.Tensor:
    """The mixer core on the CPU: no flips, no layout copies in the forward. The conv, x_proj, dt_proj and
    the scan all run token-major, vectorised over channels.

    Same arguments and result as :func:`visionmamba.scan.bidirectional` (x, z (b, E, L) -> (b, E, L)).
    """
    with torch.autocast("cpu", enabled=False):  # the kernels compute in float32 whatever autocast says
        return _bidirectional(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)


def _bidirectional(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D) -> torch.Tensor:
    dtype = x.dtype
    ct = compute_dtype(dtype)
    x_t = x.transpose(1, 2).to(ct)  # (b, L, E): a view of in_proj's output
    if x_t.stride(2) != 1:
        x_t = x_t.contiguous()
    rank, state = dt_proj_weight.shape[-1], A.shape[-1]
    batch, length, inner = x_t.shape
    u_t = _ConvSiLU.apply(x_t, conv_weight.to(ct), conv_bias.to(ct))  # (2, b, L, E)
    x_proj_weight = x_proj_weight.to(ct)
    rows = u_t.view(2, batch * length, inner)
    x_dbl = torch.stack([linear(rows[i], x_proj_weight[i]) for i in range(2)]).view(2, batch, length, -1)
    dt, B, C = x_dbl[..., :rank], x_dbl[..., rank : rank + state], x_dbl[..., rank + state :]
    out = _BiScan.apply(u_t, dt, dt_proj_weight.to(ct), A.to(ct).contiguous(), B, C, D.to(ct).contiguous(), z.to(ct),
                        dt_proj_bias.to(ct).contiguous())
    return out.transpose(1, 2).to(dtype)  # (b, E, L) view of token-major rows: out_proj reads them as they are
