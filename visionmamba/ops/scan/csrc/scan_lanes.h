// The forward of both directions of the mixer with channels as the SIMD lanes, free of torch: the PyTorch
// op (scan_lanes.cpp) and the ONNX Runtime op (onnxruntime_op.cpp) both run it.
//
// A task owns up to kGroup x 16 channels of one batch row and walks the sequence; per step and state n it
// updates 16 independent states (no horizontal reduction, 16-wide exps). dt_proj is applied inside the
// kernel, so delta (as large as u) is never written. The walk runs in chunks of kPhaseSteps steps with
// three phases per block of 16 channels, so that only the recurrence itself is sequential: (1) for every
// step of the chunk, delta = softplus(W dt_t + bias), delta u and the D skip; (2) the N-state recurrence;
// (3) the SiLU(z) gate and the output. Phases 1 and 3 have no dependence between steps and run at full
// throughput; inside the recurrence their latency chains would stall it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>
#include <vector>

#include "scan_math.h"

// A prefetch hint (rw: 1 for a line about to be written) on every compiler; MSVC has no __builtin_prefetch.
#if defined(_MSC_VER) && !defined(__clang__)
#if defined(_M_X64)
#include <xmmintrin.h>
#define VM_PREFETCH(address, rw) _mm_prefetch(reinterpret_cast<const char*>(address), _MM_HINT_T0)
#else
#define VM_PREFETCH(address, rw) ((void)(address))
#endif
#else
#define VM_PREFETCH(address, rw) __builtin_prefetch((address), (rw))
#endif

namespace visionmamba {
namespace lanes {

// Allocates on cache lines: the kernels' scratch rows are read and written as whole 64-byte vectors, which
// cost about twice as much where they straddle two lines (malloc aligns to 16 bytes only).
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const LineAllocator&) const { return true; }
  bool operator!=(const LineAllocator&) const { return false; }
};
template <typename T>
using Scratch = std::vector<T, LineAllocator<T>>;

constexpr int64_t kLanes = 16;       // channels per block: the SIMD lanes
constexpr int64_t kPhaseSteps = 32;  // steps per three-phase chunk
constexpr int64_t kSumBlocks = 4;    // blocks of 16 channels whose dB_t and dC_t the backward sums into one row

// Blocks of 16 channels per task: two sum groups where that still leaves two tasks per thread (the blocks of a
// task share the pages of each step's rows and its x_proj row: ~10% faster at L 197-1025, inputs not cached),
// one otherwise. Every sum runs in the same order either way: results do not depend on the choice.
inline int64_t task_blocks(int64_t batch, int64_t E, int64_t threads) {
  const int64_t wide = 2 * kSumBlocks * kLanes;
  return batch * ((E + wide - 1) / wide) >= 2 * threads ? 2 * kSumBlocks : kSumBlocks;
}
constexpr int64_t kMaxTaskBlocks = 2 * kSumBlocks;

// One direction of the bidirectional forward for one batch row, channels as the SIMD lanes. T: the compute
// type; S: the activations' storage (T, or bf16 for CPU bf16 inference; the weights are T); I: u's and x_proj's
// output's (S, or float in the fused core's tiles, mixer_core.h).
template <typename T, typename S = T, typename I = S>
struct LaneDirection {
  const I* u;           // (L, E)
  const T* Wt;          // dt_proj's weight, transposed (R, E): delta = softplus(W dt_t + bias) inside the kernel
  const T* A;           // (N, E)
  const T* A2;          // A log2(e) (N, E), for the base-2 exps of the AVX-512 path
  const I* x_proj_out;  // x_proj's output at t = 0: dt_t in columns [0, R), B_t from R, C_t from R + N
  int64_t sx_t;
  const T* D;     // (E,)
  const T* bias;  // (E,)
  const S* z;     // z_t: E contiguous channels at z + t * sz_t
  int64_t sz_t;
  S* out;  // (L, E): y / 2 is written (forward direction) or added (backward direction)
  T* checkpoints = nullptr;  // (chunks, N, E): the states before each chunk of kPhaseSteps steps, or none
  int64_t L;
  int64_t E;
  int64_t N;
  int64_t R;
  bool reverse;
  // u and x_proj_out hold the rows of steps [row0, row0 + kPhaseSteps) only (a token tile of the fused core,
  // mixer_core.h), or all rows (row0 0, tile false: nothing of theirs to prefetch beyond the tile)
  int64_t row0 = 0;
  bool tile = false;
};

// Step t's row of u and of x_proj_out.
template <typename T, typename S, typename I>
inline const I* u_row(const LaneDirection<T, S, I>& p, int64_t t) {
  return p.u + (t - p.row0) * p.E;
}
template <typename T, typename S, typename I>
inline const I* x_proj_row(const LaneDirection<T, S, I>& p, int64_t t) {
  return p.x_proj_out + (t - p.row0) * p.sx_t;
}

// Both directions of the mixer over a batch: the layouts of bi_forward in selective_scan.h, by pointer and
// stride. u, W_t, A_t, A2 and out are contiguous; x_proj_out and z have contiguous last axes.
template <typename T, typename S = T>
struct BiForwardArgs {
  const S* u;           // (2, b, L, E)
  const T* W_t;         // (2, R, E)
  const T* A_t;         // (2, N, E)
  const T* A2;          // A_t log2(e) (2, N, E)
  const S* x_proj_out;  // (2, b, L, R + 2N) at strides sx_dir, sx_b, sx_t, 1
  int64_t sx_dir;
  int64_t sx_b;
  int64_t sx_t;
  const T* D;     // (2, E)
  const T* bias;  // (2, E)
  const S* z;     // (b, L, E) at strides sz_b, sz_t, 1
  int64_t sz_b;
  int64_t sz_t;
  S* out;  // (b, L, E); may be u's first direction (each task reads its rows before it writes them)
  T* checkpoints = nullptr;  // (2, b, chunks, N, E): the states the backward restarts from, or none
  int64_t task_blocks = kSumBlocks;  // blocks of 16 channels per task (task_blocks())
  int64_t batch;
  int64_t L;
  int64_t E;
  int64_t N;
  int64_t R;
};

inline int64_t chunk_count(int64_t L) { return (L + kPhaseSteps - 1) / kPhaseSteps; }

// The per-step values of one chunk of one block: delta, delta u, and the accumulated output.
template <typename T>
struct ChunkBuffers {
  alignas(64) T d[kPhaseSteps * kLanes];
  alignas(64) T du[kPhaseSteps * kLanes];
  alignas(64) T acc[kPhaseSteps * kLanes];
};

// The channels [e0, e0 + width) of a direction and the steps [i0, i0 + steps) of its walk.
struct LaneTile {
  int64_t e0;
  int64_t width;
  int64_t i0;
  int64_t steps;
};

#ifdef VM_AVX512
// One time step of 16 channels x N states in AVX-512 registers: cur = exp(d A) prev + du B_n (prev may be
// cur: the forward updates its states in place); acc += C_n cur. The exps by exp2_avx512 (scan_math.h) with
// A2 = A log2 e. A2: this block's first channel of the (N, E) table; j: the step's row of the chunk buffers;
// decays: where the backward keeps the step's exp(d A) ((N, 16)), or null.
template <typename S, typename I>
inline void states_avx512(const LaneDirection<float, S, I>& p, const float* A2, const I* Bt, ChunkBuffers<float>& buf,
                          int64_t j, const float* prev, float* cur, float* decays = nullptr) {
  const I* Ct = Bt + p.N;
  const __m512 vd = _mm512_loadu_ps(buf.d + j * kLanes), vdu = _mm512_loadu_ps(buf.du + j * kLanes);
  __m512 vacc = _mm512_loadu_ps(buf.acc + j * kLanes), vacc2 = _mm512_setzero_ps();  // two sums: half the chain
  for (int64_t n = 0; n < p.N; ++n) {
    const __m512 a = exp2_avx512(_mm512_mul_ps(vd, _mm512_loadu_ps(A2 + n * p.E)));
    if (decays) _mm512_storeu_ps(decays + n * 16, a);
    const __m512 du_b = _mm512_mul_ps(vdu, _mm512_set1_ps(widen(Bt[n])));
    const __m512 hv = _mm512_fmadd_ps(a, _mm512_loadu_ps(prev + n * 16), du_b);
    _mm512_storeu_ps(cur + n * 16, hv);
    if (n & 1)
      vacc2 = _mm512_fmadd_ps(_mm512_set1_ps(widen(Ct[n])), hv, vacc2);
    else
      vacc = _mm512_fmadd_ps(_mm512_set1_ps(widen(Ct[n])), hv, vacc);
  }
  _mm512_storeu_ps(buf.acc + j * kLanes, _mm512_add_ps(vacc, vacc2));
}
#endif

template <typename T, typename S, typename I>
inline int64_t step_time(const LaneDirection<T, S, I>& p, int64_t i) {
  return p.reverse ? p.L - 1 - i : i;
}

// The next chunk's rows, whose strided addresses the hardware prefetcher would not guess.
template <typename T, typename S, typename I>
inline void prefetch_next_chunk(const LaneDirection<T, S, I>& p, int64_t e0, int64_t t) {
  const int64_t q = p.reverse ? t - kPhaseSteps : t + kPhaseSteps;
  VM_PREFETCH(p.z + q * p.sz_t + e0, 0);
  VM_PREFETCH(p.out + q * p.E + e0, 1);
  if (p.tile) return;
  VM_PREFETCH(u_row(p, q) + e0, 0);
  for (int64_t c = 0; c < p.R + 2 * p.N; c += 64 / sizeof(I)) VM_PREFETCH(x_proj_row(p, q) + c, 0);
}

#ifdef VM_AVX512
constexpr int64_t kRegisterStates = 16;  // N of every Vim model: the recurrence keeps its states in registers

// Phase 2 for 16 channels and N = kRegisterStates: states_avx512 with the 16 state vectors held in registers
// for the whole chunk instead of loaded and stored every step. h: the states before the chunk. states: where
// the backward's recomputation stores each step's states ((steps, N, 16); h is then left as it was), or null
// for the forward (h gets the states after the chunk; the next chunk's rows are fetched meanwhile). decays:
// where the backward keeps each step's exp(d A) ((steps, N, 16)), or null.
template <typename S, typename I>
inline void register_recurrence_avx512(const LaneDirection<float, S, I>& p, const LaneTile& tile,
                                       ChunkBuffers<float>& buf, float* __restrict h,
                                       float* __restrict states = nullptr, float* __restrict decays = nullptr) {
  const float* A2 = p.A2 + tile.e0;
  __m512 hr[kRegisterStates];
#pragma GCC unroll 16
  for (int64_t n = 0; n < kRegisterStates; ++n) hr[n] = _mm512_loadu_ps(h + n * kLanes);
  for (int64_t j = 0; j < tile.steps; ++j) {
    const int64_t t = step_time(p, tile.i0 + j);
    if (!states && tile.i0 + kPhaseSteps + j < p.L) prefetch_next_chunk(p, tile.e0, t);
    const I* __restrict Bt = x_proj_row(p, t) + p.R;
    const I* __restrict Ct = Bt + kRegisterStates;
    const __m512 vd = _mm512_load_ps(buf.d + j * kLanes), vdu = _mm512_load_ps(buf.du + j * kLanes);
    __m512 vacc = _mm512_load_ps(buf.acc + j * kLanes), vacc2 = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int64_t n = 0; n < kRegisterStates; ++n) {
      const __m512 a = exp2_avx512(_mm512_mul_ps(vd, _mm512_loadu_ps(A2 + n * p.E)));
      if (decays) _mm512_storeu_ps(decays + (j * kRegisterStates + n) * kLanes, a);
      hr[n] = _mm512_fmadd_ps(a, hr[n], _mm512_mul_ps(vdu, _mm512_set1_ps(widen(Bt[n]))));
      if (states) _mm512_storeu_ps(states + (j * kRegisterStates + n) * kLanes, hr[n]);
      if (n & 1)
        vacc2 = _mm512_fmadd_ps(_mm512_set1_ps(widen(Ct[n])), hr[n], vacc2);
      else
        vacc = _mm512_fmadd_ps(_mm512_set1_ps(widen(Ct[n])), hr[n], vacc);
    }
    _mm512_store_ps(buf.acc + j * kLanes, _mm512_add_ps(vacc, vacc2));
  }
  if (states) return;
#pragma GCC unroll 16
  for (int64_t n = 0; n < kRegisterStates; ++n) _mm512_storeu_ps(h + n * kLanes, hr[n]);
}
#endif

// x = W dt_t + bias, delta before its softplus, for the channels [e0, e0 + cnt) of step t (two partial sums over
// the rank: half the dependent-FMA chain).
template <typename T, typename S, typename I>
inline void raw_deltas(const LaneDirection<T, S, I>& p, int64_t t, int64_t e0, int64_t cnt, T* __restrict x) {
  const I* __restrict dtr = x_proj_row(p, t);
  T x0[kLanes], x1[kLanes];
#pragma omp simd
  for (int64_t e = 0; e < cnt; ++e) x0[e] = x1[e] = T(0);
  int64_t r = 0;
  for (; r + 1 < p.R; r += 2) {
    const T a = widen(dtr[r]), b = widen(dtr[r + 1]);
    const T* __restrict W0 = p.Wt + r * p.E + e0;
    const T* __restrict W1 = W0 + p.E;
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) {
      x0[e] += a * W0[e];
      x1[e] += b * W1[e];
    }
  }
  if (r < p.R) {
    const T a = widen(dtr[r]);
    const T* __restrict W0 = p.Wt + r * p.E + e0;
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) x0[e] += a * W0[e];
  }
#pragma omp simd
  for (int64_t e = 0; e < cnt; ++e) x[e] = x0[e] + x1[e] + p.bias[e0 + e];
}

// What the backward's phase 1 also keeps per step: u and the softplus derivative d delta / dx (sigmoid(x), 1
// above the threshold 20).
template <typename T>
struct BackwardInputs {
  alignas(64) T u[kPhaseSteps * kLanes];
  alignas(64) T dsp[kPhaseSteps * kLanes];
  // the AVX-512 walk's per-step values between its passes: dy = dL/dy before the gate, sum_n A_n q_n and
  // sum_n g_n B_n (scan_lanes_backward.h)
  alignas(64) T dy[kPhaseSteps * kLanes];
  alignas(64) T dd[kPhaseSteps * kLanes];
  alignas(64) T duu[kPhaseSteps * kLanes];
};

#ifdef VM_AVX512
// Phase 1 for 16 channels (chunk_inputs below): the softplus and the softplus derivative share one exp.
template <typename S, typename I>
inline void chunk_inputs_avx512(const LaneDirection<float, S, I>& p, const LaneTile& tile, ChunkBuffers<float>& buf,
                                BackwardInputs<float>* extra) {
  const int64_t e0 = tile.e0;
  const __m512 bias = _mm512_loadu_ps(p.bias + e0), D = _mm512_loadu_ps(p.D + e0);
  for (int64_t j = 0; j < tile.steps; ++j) {
    const int64_t t = step_time(p, tile.i0 + j);
    const I* __restrict dtr = x_proj_row(p, t);
    __m512 x0 = bias, x1 = _mm512_setzero_ps();  // two partial sums over the rank: half the dependent chain
    int64_t r = 0;
    for (; r + 1 < p.R; r += 2) {
      x0 = _mm512_fmadd_ps(_mm512_set1_ps(widen(dtr[r])), _mm512_loadu_ps(p.Wt + r * p.E + e0), x0);
      x1 = _mm512_fmadd_ps(_mm512_set1_ps(widen(dtr[r + 1])), _mm512_loadu_ps(p.Wt + (r + 1) * p.E + e0), x1);
    }
    if (r < p.R) x0 = _mm512_fmadd_ps(_mm512_set1_ps(widen(dtr[r])), _mm512_loadu_ps(p.Wt + r * p.E + e0), x0);
    const __m512 x = _mm512_add_ps(x0, x1), u = load16(u_row(p, t) + e0);
    __m512 decay;  // exp(-|x|)
    const __m512 d = softplus_avx512(x, decay);
    _mm512_store_ps(buf.d + j * kLanes, d);
    _mm512_store_ps(buf.du + j * kLanes, _mm512_mul_ps(d, u));
    _mm512_store_ps(buf.acc + j * kLanes, _mm512_mul_ps(D, u));
    if (extra) {  // sigmoid(x) = 1 / (1 + exp(-x)) = exp(x) / (1 + exp(x))
      const __m512 rcp = reciprocal_avx512(_mm512_add_ps(_mm512_set1_ps(1.0f), decay));
      const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
      _mm512_store_ps(extra->u + j * kLanes, u);
      _mm512_store_ps(extra->dsp + j * kLanes, _mm512_mask_mul_ps(rcp, negative, rcp, decay));
    }
  }
}

// Phase 3 for 16 channels (chunk_output below).
template <typename S, typename I>
inline void chunk_output_avx512(const LaneDirection<float, S, I>& p, const LaneTile& tile,
                                const ChunkBuffers<float>& buf) {
  const int64_t e0 = tile.e0;
  for (int64_t j = 0; j < tile.steps; ++j) {
    const int64_t t = step_time(p, tile.i0 + j);
    const __m512 z = load16(p.z + t * p.sz_t + e0);
    S* __restrict o = p.out + t * p.E + e0;
    __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_load_ps(buf.acc + j * kLanes)),
                             _mm512_mul_ps(z, sigmoid_avx512(z)));
    if (p.reverse) y = _mm512_add_ps(load16(o), y);
    store16(o, y);
  }
}
#endif

// Phase 1: delta = softplus(W dt_t + bias), delta u and the D skip, for every step of the chunk (and, given
// extra, the backward's values).
template <typename T, typename S, bool FULL, typename I>
void chunk_inputs(const LaneDirection<T, S, I>& p, const LaneTile& tile, ChunkBuffers<T>& buf,
                  BackwardInputs<T>* extra = nullptr) {
#ifdef VM_AVX512
  if constexpr (FULL && std::is_same<T, float>::value) {
    chunk_inputs_avx512(p, tile, buf, extra);
    return;
  }
#endif
  const int64_t cnt = FULL ? kLanes : tile.width, e0 = tile.e0;
  for (int64_t j = 0; j < tile.steps; ++j) {
    const int64_t t = step_time(p, tile.i0 + j);
    const I* __restrict ut = u_row(p, t) + e0;
    T x[kLanes];
    raw_deltas(p, t, e0, cnt, x);
    T* __restrict dj = buf.d + j * kLanes;
    T* __restrict duj = buf.du + j * kLanes;
    T* __restrict aj = buf.acc + j * kLanes;
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) {
      dj[e] = softplus20(x[e]);
      duj[e] = dj[e] * widen(ut[e]);
      aj[e] = p.D[e0 + e] * widen(ut[e]);
    }
    if (extra) {
      T* __restrict uj = extra->u + j * kLanes;
      T* __restrict sj = extra->dsp + j * kLanes;
#pragma omp simd
      for (int64_t e = 0; e < cnt; ++e) {
        uj[e] = widen(ut[e]);
        sj[e] = x[e] > T(20) ? T(1) : sigmoid(x[e]);
      }
    }
  }
}

// Phase 2: the recurrence over the chunk; h: this block's (N, 16) states before it. states: null in the forward
// (h is updated in place, the next chunk's rows fetched meanwhile), or where the backward's recomputation keeps
// each step's states ((steps, N, 16)); decays: null, or where it keeps each step's exp(d A) ((steps, N, 16)).
template <typename T, typename S, bool FULL, typename I>
void chunk_recurrence(const LaneDirection<T, S, I>& p, const LaneTile& tile, ChunkBuffers<T>& buf, T* h,
                      T* states = nullptr, T* decays = nullptr) {
#ifdef VM_AVX512
  if constexpr (FULL && std::is_same<T, float>::value) {
    if (p.N == kRegisterStates) {
      register_recurrence_avx512(p, tile, buf, h, states, decays);
      return;
    }
  }
#endif
  const int64_t cnt = FULL ? kLanes : tile.width, e0 = tile.e0, NL = p.N * kLanes;
  for (int64_t j = 0; j < tile.steps; ++j) {
    const int64_t t = step_time(p, tile.i0 + j);
    if (!states && tile.i0 + kPhaseSteps + j < p.L) prefetch_next_chunk(p, e0, t);
    const I* __restrict Bt = x_proj_row(p, t) + p.R;
    const I* __restrict Ct = Bt + p.N;
    const T* prev = states && j > 0 ? states + (j - 1) * NL : h;  // may be cur (in place): no __restrict
    T* cur = states ? states + j * NL : h;
#ifdef VM_AVX512
    if constexpr (FULL && std::is_same<T, float>::value) {
      states_avx512(p, p.A2 + e0, Bt, buf, j, prev, cur, decays ? decays + j * NL : nullptr);
      continue;
    }
#endif
    T* __restrict dj = buf.d + j * kLanes;
    T* __restrict duj = buf.du + j * kLanes;
    T* __restrict aj = buf.acc + j * kLanes;
    T* __restrict decays_j = decays ? decays + j * NL : nullptr;
    for (int64_t n = 0; n < p.N; ++n) {
      const T bn = widen(Bt[n]), cn = widen(Ct[n]);
      const T* __restrict An = p.A + n * p.E + e0;
#pragma omp simd
      for (int64_t e = 0; e < cnt; ++e) {
        const T a = vexp(dj[e] * An[e]), hv = a * prev[n * kLanes + e] + duj[e] * bn;
        if (decays_j) decays_j[n * kLanes + e] = a;  // loop-invariant: the compiler unswitches it
        cur[n * kLanes + e] = hv;
        aj[e] += cn * hv;
      }
    }
  }
}

// Phase 3: the SiLU(z) gate and the average of the two directions.
template <typename T, typename S, bool FULL, typename I>
void chunk_output(const LaneDirection<T, S, I>& p, const LaneTile& tile, const ChunkBuffers<T>& buf) {
#ifdef VM_AVX512
  if constexpr (FULL && std::is_same<T, float>::value) {
    chunk_output_avx512(p, tile, buf);
    return;
  }
#endif
  const int64_t cnt = FULL ? kLanes : tile.width, e0 = tile.e0;
  for (int64_t j = 0; j < tile.steps; ++j) {
    const int64_t t = step_time(p, tile.i0 + j);
    const T* __restrict aj = buf.acc + j * kLanes;
    const S* __restrict zt = p.z + t * p.sz_t + e0;
    S* __restrict o = p.out + t * p.E + e0;
    T y[kLanes];
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) {
      const T zv = widen(zt[e]);
      y[e] = T(0.5) * aj[e] * zv * sigmoid(zv);
    }
    if (p.reverse) {
#pragma omp simd
      for (int64_t e = 0; e < cnt; ++e) o[e] = narrow<S>(widen(o[e]) + y[e]);
    } else {
#pragma omp simd
      for (int64_t e = 0; e < cnt; ++e) o[e] = narrow<S>(y[e]);
    }
  }
}

template <typename T, typename S, bool FULL, typename I>
void block_chunk(const LaneDirection<T, S, I>& p, const LaneTile& tile, ChunkBuffers<T>& buf, T* __restrict h) {
  chunk_inputs<T, S, FULL>(p, tile, buf);
  chunk_recurrence<T, S, FULL>(p, tile, buf, h);
  chunk_output<T, S, FULL>(p, tile, buf);
}

// The states of a block before the chunk that starts at step tile.i0, for the backward to restart from.
template <typename T, typename S, typename I>
void save_states(const LaneDirection<T, S, I>& p, const LaneTile& tile, const T* h) {
  T* dst = p.checkpoints + tile.i0 / kPhaseSteps * p.N * p.E + tile.e0;
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t e = 0; e < tile.width; ++e) dst[n * p.E + e] = h[n * kLanes + e];
}

// The chunk of steps [i0, i0 + kPhaseSteps) (or to L) over the channels [e0, e1), block by block; h: the
// blocks' (blocks, N, 16) states, kept (with the states before the chunk saved) when p has checkpoints.
template <typename T, typename S, typename I>
void blocks_chunk(const LaneDirection<T, S, I>& p, int64_t e0, int64_t e1, int64_t i0, ChunkBuffers<T>& buf,
                  T* __restrict h) {
  const int64_t blocks = (e1 - e0 + kLanes - 1) / kLanes, steps = std::min(kPhaseSteps, p.L - i0);
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t eb = e0 + k * kLanes;
    const LaneTile tile{eb, std::min(kLanes, e1 - eb), i0, steps};
    T* hk = h + k * p.N * kLanes;
    if (p.checkpoints) save_states(p, tile, hk);
    if (tile.width == kLanes)
      block_chunk<T, S, true>(p, tile, buf, hk);
    else
      block_chunk<T, S, false>(p, tile, buf, hk);
  }
}

// One direction over the channels [e0, e1); h: (blocks, N, 16) states.
template <typename T, typename S, typename I>
void lanes_direction(const LaneDirection<T, S, I>& p, int64_t e0, int64_t e1, T* __restrict h) {
  std::fill(h, h + (e1 - e0 + kLanes - 1) / kLanes * p.N * kLanes, T(0));
  ChunkBuffers<T> buf;
  for (int64_t i0 = 0; i0 < p.L; i0 += kPhaseSteps) blocks_chunk(p, e0, e1, i0, buf, h);
}


// A log2(e): the base-2 exponents of the AVX-512 path.
template <typename T>
void log2e_table(const T* A, T* A2, int64_t count) {
  for (int64_t i = 0; i < count; ++i) A2[i] = A[i] * T(1.4426950408889634);
}

// Tasks of bi_forward: (batch row, group of task_blocks x 16 channels) pairs, independent of each other.
template <typename T, typename S>
int64_t bi_forward_tasks(const BiForwardArgs<T, S>& a) {
  const int64_t span = a.task_blocks * kLanes;
  return a.batch * ((a.E + span - 1) / span);
}

// Values of the state scratch one task needs (reused across the tasks one thread runs).
template <typename T, typename S>
int64_t bi_forward_scratch(const BiForwardArgs<T, S>& a) {
  return a.task_blocks * a.N * kLanes;
}

// Direction dir of batch row b of the mixer's layouts (the forward's and the backward's view of one walk).
// I other than S: u and x_proj_out are left for the caller's tiles (mixer_core.h).
template <typename T, typename S, typename I = S>
LaneDirection<T, S, I> direction_of(const BiForwardArgs<T, S>& a, int64_t dir, int64_t b) {
  LaneDirection<T, S, I> p;
  p.u = nullptr;
  p.x_proj_out = nullptr;
  if constexpr (std::is_same<I, S>::value) {
    if (a.u) p.u = a.u + (dir * a.batch + b) * a.L * a.E;  // none: the fused core's tiles
    if (a.x_proj_out) p.x_proj_out = a.x_proj_out + dir * a.sx_dir + b * a.sx_b;
  }
  p.Wt = a.W_t + dir * a.R * a.E;
  p.A = a.A_t + dir * a.N * a.E;
  p.A2 = a.A2 + dir * a.N * a.E;
  p.sx_t = a.sx_t;
  p.D = a.D + dir * a.E;
  p.bias = a.bias + dir * a.E;
  p.z = a.z + b * a.sz_b;
  p.sz_t = a.sz_t;
  p.out = a.out + b * a.L * a.E;
  p.checkpoints = a.checkpoints ? a.checkpoints + (dir * a.batch + b) * chunk_count(a.L) * a.N * a.E : nullptr;
  p.L = a.L;
  p.E = a.E;
  p.N = a.N;
  p.R = a.R;
  p.reverse = dir == 1;
  return p;
}

// One task of bi_forward: both directions of its channels; h holds bi_forward_scratch values.
template <typename T, typename S>
void bi_forward_task(const BiForwardArgs<T, S>& a, int64_t task, T* h) {
  const int64_t span = a.task_blocks * kLanes, groups = (a.E + span - 1) / span;
  const int64_t b = task / groups, e0 = (task % groups) * span, e1 = std::min(a.E, e0 + span);
  for (int64_t dir = 0; dir < 2; ++dir) lanes_direction(direction_of(a, dir, b), e0, e1, h);
}

// The inputs of the ONNX node BiSelectiveScan (the op bi_scan's layouts), contiguous, for the runtimes' kernels.
template <typename T>
struct BiScanInputs {
  const T* u;           // (2, b, L, E)
  const T* x_proj_out;  // (2, b, L, R + 2N)
  const T* dt_weight;   // (2, E, R)
  const T* A;           // (2, E, N)
  const T* D;           // (2, E)
  const T* z;           // (b, L, E)
  const T* bias;        // (2, E)
  int64_t batch;
  int64_t L;
  int64_t E;
  int64_t N;
  int64_t R;
};

// dt_proj's weight and A with channels as the contiguous lanes, and A log2(e).
template <typename T>
struct LaneWeights {
  std::vector<T> W_t;  // (2, R, E)
  std::vector<T> A_t;  // (2, N, E)
  std::vector<T> A2;   // (2, N, E)
};

// (2, rows, cols) -> (2, cols, rows).
template <typename T>
std::vector<T> transposed_pairs(const T* t, int64_t rows, int64_t cols) {
  std::vector<T> out(2 * rows * cols);
  for (int64_t d = 0; d < 2; ++d)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) out[(d * cols + c) * rows + r] = t[(d * rows + r) * cols + c];
  return out;
}

template <typename T>
LaneWeights<T> lane_weights(const BiScanInputs<T>& in) {
  LaneWeights<T> w{transposed_pairs(in.dt_weight, in.E, in.R), transposed_pairs(in.A, in.E, in.N), {}};
  w.A2.resize(w.A_t.size());
  log2e_table(w.A_t.data(), w.A2.data(), static_cast<int64_t>(w.A2.size()));
  return w;
}

// The lanes forward's arguments for contiguous inputs; w must outlive them.
template <typename T>
BiForwardArgs<T> contiguous_args(const BiScanInputs<T>& in, const LaneWeights<T>& w, T* out) {
  BiForwardArgs<T> a;
  a.u = in.u;
  a.W_t = w.W_t.data();
  a.A_t = w.A_t.data();
  a.A2 = w.A2.data();
  a.x_proj_out = in.x_proj_out;
  a.sx_t = in.R + 2 * in.N;
  a.sx_b = in.L * a.sx_t;
  a.sx_dir = in.batch * a.sx_b;
  a.D = in.D;
  a.bias = in.bias;
  a.z = in.z;
  a.sz_t = in.E;
  a.sz_b = in.L * in.E;
  a.out = out;
  a.batch = in.batch;
  a.L = in.L;
  a.E = in.E;
  a.N = in.N;
  a.R = in.R;
  return a;
}

}  // namespace lanes
}  // namespace visionmamba
