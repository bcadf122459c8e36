// The backward of both directions of the mixer with channels as the SIMD lanes, in the forward's layout and
// tasks (scan_lanes.h), free of torch.
//
// The forward saves each block's states before every chunk of kPhaseSteps steps (the checkpoints). The backward
// walks the chunks from the last to the first, and within a chunk the task's blocks of 16 channels in turn,
// each block-chunk in three phases: (1) the chunk's inputs (delta, the softplus derivative, delta u, u); (2)
// its states and decays exp(delta A), recomputed from the chunk's checkpoint into buffers that stay in cache,
// with the pre-gate output <C, h> + D u that the z gradient needs; (3) the adjoint walk back through the chunk,
// g = dL/dh carried to the block's previous chunk (under AVX-512 in three passes: the gate of every step, the
// walk, then the per-step gradients, so that only the walk is sequential). The walk reads the decays (no
// second exp) and forms the delta gradient as sum_n A_n g_n a_n h_n' + u sum_n g_n B_n, the second sum being
// the one du needs anyway.
// dA, dD and d(bias) are sums over steps, kept per lane; dB_t and dC_t are sums over channels, reduced over
// the 16 lanes at every step and added to the task's (L, 2N) partial rows.
#pragma once

#include "scan_lanes.h"

namespace visionmamba {
namespace lanes {

// The gradients of bi_forward (contiguous, token-major like its inputs).
template <typename T>
struct BiBackwardArgs {
  BiForwardArgs<T> f;  // the forward's inputs and its checkpoints (f.out is not used)
  const T* dout;       // (b, L, E)
  T* du;               // (2, b, L, E)
  T* ddelta;           // (2, b, L, E): the gradient of x = W dt_t + bias, delta before its softplus
  T* dz;               // (b, L, E)
  T* dA;               // (b, 2, N, E): one row per batch row (summed by the caller)
  T* dD;               // (b, 2, E)
  T* dbias;            // (b, 2, E)
  T* dBC;  // (sum groups, 2, b, L, 2N), zero on entry: dB_t and dC_t summed over each kSumBlocks x 16 channels
};

// One direction's gradients for one batch row.
template <typename T>
struct LaneGrads {
  const T* dout;  // (L, E)
  T* du;          // (L, E)
  T* ddelta;      // (L, E)
  T* dz;          // (L, E): written by the forward direction, added to by the backward one
  T* dA;          // (N, E)
  T* dD;          // (E,)
  T* dbias;       // (E,)
  T* dBC;         // (L, 2N): added to; the task's first sum group
  int64_t dBC_group_stride;  // to the next sum group's rows
};

// The per-step values of one chunk of one block: the forward's (acc: the pre-gate output <C_t, h_t> + D u_t)
// and the backward's own.
template <typename T>
struct BackwardBuffers {
  ChunkBuffers<T> c;
  BackwardInputs<T> b;
};

// A block's scratch, carved from the thread's: the chunk's states and the carried sums.
template <typename T>
struct BlockScratch {
  T* hs;  // (kPhaseSteps + 1, N, 16): the states before the chunk and after each of its steps
  T* a;   // (kPhaseSteps, N, 16): each step's decays exp(delta A)
  T* g;   // (N, 16): the adjoint dL/dh
  T* dA;  // (N, 16)
  T* pB;  // (N, 16): this step's dB terms per lane, before the sum over lanes
  T* pC;  // (N, 16)
  alignas(64) T dD[kLanes];  // whole cache lines: the AVX-512 walk reads and writes them every step
  alignas(64) T dbias[kLanes];
};

// One step of one block as phases 1 and 2 left it, for the walk back.
template <typename T>
struct StepValues {
  const T* d;     // 16 values each: delta, delta u, u, the softplus derivative, the pre-gate output
  const T* du;
  const T* u;
  const T* dsp;
  const T* y;
  const T* prev;  // (N, 16): the states before the step
  const T* cur;   // (N, 16): after it
  const T* a;     // (N, 16): the step's decays
  const T* Bt;    // B_t (N values), then C_t
};

// Values of the thread scratch one task needs.
template <typename T>
int64_t bi_backward_scratch(const BiForwardArgs<T>& a) {
  return (2 * kPhaseSteps + 3 + 2 * a.task_blocks) * a.N * kLanes;  // hs, pB, pC, decays, each block's g and dA
}

#ifdef VM_AVX512
// Lane n of the result is the sum of the 16 lanes of v[n]: a transpose-and-add tree (45 instructions for 16
// sums, against ~8 per sum reduced one by one). The inputs are taken in the order 4 (i % 4) + i / 4, which
// makes the tree's output come out in order.
inline __m512 lane_sums16(const __m512* v) {
  __m512 c[8], e[4], g[2];
  for (int k = 0; k < 8; ++k) {  // 256-bit halves: c[k] holds 8 partial sums of two vectors
    const __m512 a = v[4 * ((2 * k) % 4) + (2 * k) / 4], b = v[4 * ((2 * k + 1) % 4) + (2 * k + 1) / 4];
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int k = 0; k < 4; ++k)  // 128-bit lanes: 4 partial sums of four vectors
    e[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k)  // pairs within the 128-bit lanes
    g[k] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * k], e[2 * k + 1], 0x44), _mm512_shuffle_ps(e[2 * k], e[2 * k + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], 0x88), _mm512_shuffle_ps(g[0], g[1], 0xDD));
}

// Phase 3's state loop for 16 channels at one step, in groups of 8 states: the adjoint update, dA, the lane
// sums of dB_t and dC_t (one transpose-and-add tree for both, added to dbc), and the sums over n that delta
// and u need (returned in dd, duu; delta's u B_t term is u * duu).
inline void walk_step_avx512(const LaneDirection<float>& p, const StepValues<float>& v, int64_t e0, __m512 dy,
                             BlockScratch<float>& s, float* dbc, __m512& dd, __m512& duu) {
  const float *A = p.A + e0, *Bt = v.Bt, *Ct = v.Bt + p.N;
  const __m512 vd = _mm512_load_ps(v.d), vdu = _mm512_load_ps(v.du);
  __m512 dd2 = _mm512_setzero_ps(), duu2 = _mm512_setzero_ps();
  dd = duu = _mm512_setzero_ps();
  for (int64_t n0 = 0; n0 < p.N; n0 += 8) {
    const int64_t count = std::min<int64_t>(8, p.N - n0);
    __m512 parts[16];  // dB terms of the group's states, then dC terms
#pragma GCC unroll 8
    for (int64_t i = 0; i < 8; ++i) {
      const int64_t n = n0 + i;
      if (i >= count) {
        parts[i] = parts[8 + i] = _mm512_setzero_ps();
        continue;
      }
      const __m512 gn = _mm512_fmadd_ps(dy, _mm512_set1_ps(Ct[n]), _mm512_loadu_ps(s.g + n * 16));
      const __m512 ga = _mm512_mul_ps(gn, _mm512_loadu_ps(v.a + n * 16));  // the adjoint carried back
      const __m512 q = _mm512_mul_ps(ga, _mm512_loadu_ps(v.prev + n * 16));  // dL/d(delta A_n), per lane
      parts[i] = _mm512_mul_ps(gn, vdu);
      parts[8 + i] = _mm512_mul_ps(dy, _mm512_loadu_ps(v.cur + n * 16));
      if (i & 1) {  // two sums each: half the dependent chain
        dd2 = _mm512_fmadd_ps(_mm512_loadu_ps(A + n * p.E), q, dd2);
        duu2 = _mm512_fmadd_ps(gn, _mm512_set1_ps(Bt[n]), duu2);
      } else {
        dd = _mm512_fmadd_ps(_mm512_loadu_ps(A + n * p.E), q, dd);
        duu = _mm512_fmadd_ps(gn, _mm512_set1_ps(Bt[n]), duu);
      }
      _mm512_storeu_ps(s.dA + n * 16, _mm512_fmadd_ps(vd, q, _mm512_loadu_ps(s.dA + n * 16)));
      _mm512_storeu_ps(s.g + n * 16, ga);
    }
    const __m512 sums = lane_sums16(parts), high = _mm512_shuffle_f32x4(sums, sums, 0x4E);
    const __mmask16 m = static_cast<__mmask16>((1u << count) - 1u);
    _mm512_mask_storeu_ps(dbc + n0, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dbc + n0), sums));
    _mm512_mask_storeu_ps(dbc + p.N + n0, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dbc + p.N + n0), high));
  }
  dd = _mm512_add_ps(dd, dd2);
  duu = _mm512_add_ps(duu, duu2);
}

// Phase 3 for 16 channels in three passes, so that only the adjoint walk is sequential: the gate of every step
// (dz, and dy = dL/dy before the gate), the walk back, then du, ddelta, dD and d(bias) of every step.
inline void walk_back_avx512(const LaneDirection<float>& p, const LaneGrads<float>& o, const LaneTile& tile,
                             BackwardBuffers<float>& buf, BlockScratch<float>& s) {
  const int64_t e0 = tile.e0, NL = p.N * kLanes;
  const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  for (int64_t j = 0; j < tile.steps; ++j) {
    const int64_t t = step_time(p, tile.i0 + j);
    const __m512 zv = _mm512_loadu_ps(p.z + t * p.sz_t + e0), sg = sigmoid_avx512(zv);
    const __m512 dyr = _mm512_mul_ps(half, _mm512_loadu_ps(o.dout + t * p.E + e0));
    const __m512 dzv = _mm512_mul_ps(_mm512_mul_ps(dyr, _mm512_load_ps(buf.c.acc + j * kLanes)),
                                     _mm512_mul_ps(sg, _mm512_fmadd_ps(zv, _mm512_sub_ps(one, sg), one)));
    float* dzt = o.dz + t * p.E + e0;
    _mm512_storeu_ps(dzt, p.reverse ? _mm512_add_ps(_mm512_loadu_ps(dzt), dzv) : dzv);
    _mm512_store_ps(buf.b.dy + j * kLanes, _mm512_mul_ps(dyr, _mm512_mul_ps(zv, sg)));
  }
  for (int64_t j = tile.steps - 1; j >= 0; --j) {
    const int64_t t = step_time(p, tile.i0 + j), k = j * kLanes;
    const StepValues<float> v{buf.c.d + k, buf.c.du + k, buf.b.u + k, buf.b.dsp + k, buf.c.acc + k,
                              s.hs + j * NL, s.hs + (j + 1) * NL, s.a + j * NL, x_proj_row(p, t) + p.R};
    __m512 dd, duu;
    walk_step_avx512(p, v, e0, _mm512_load_ps(buf.b.dy + k), s, o.dBC + t * 2 * p.N, dd, duu);
    _mm512_store_ps(buf.b.dd + k, dd);
    _mm512_store_ps(buf.b.duu + k, duu);
  }
  const __m512 D = _mm512_loadu_ps(p.D + e0);
  __m512 dD = _mm512_loadu_ps(s.dD), dbias = _mm512_loadu_ps(s.dbias);
  for (int64_t j = 0; j < tile.steps; ++j) {
    const int64_t t = step_time(p, tile.i0 + j), k = j * kLanes;
    const __m512 vu = _mm512_load_ps(buf.b.u + k), duu = _mm512_load_ps(buf.b.duu + k);
    const __m512 dy = _mm512_load_ps(buf.b.dy + k);
    const __m512 ddv =
        _mm512_mul_ps(_mm512_fmadd_ps(vu, duu, _mm512_load_ps(buf.b.dd + k)), _mm512_load_ps(buf.b.dsp + k));
    _mm512_storeu_ps(o.ddelta + t * p.E + e0, ddv);
    _mm512_storeu_ps(o.du + t * p.E + e0, _mm512_fmadd_ps(duu, _mm512_load_ps(buf.c.d + k), _mm512_mul_ps(dy, D)));
    dD = _mm512_fmadd_ps(dy, vu, dD);
    dbias = _mm512_add_ps(ddv, dbias);
  }
  _mm512_storeu_ps(s.dD, dD);
  _mm512_storeu_ps(s.dbias, dbias);
}
#endif

// The gate's part of step t: dz (written or added) and dy = dL/dy before the gate; y is the pre-gate output.
template <typename T>
inline void gate_backward(const LaneDirection<T>& p, const LaneGrads<T>& o, int64_t t, int64_t e0, int64_t cnt,
                          const T* __restrict y, T* __restrict dy) {
  const T* __restrict zt = p.z + t * p.sz_t + e0;
  const T* __restrict dot = o.dout + t * p.E + e0;
  T* __restrict dzt = o.dz + t * p.E + e0;
  T dzs[kLanes];
#pragma omp simd
  for (int64_t e = 0; e < cnt; ++e) {
    const T zv = zt[e], sg = sigmoid(zv), dyr = T(0.5) * dot[e];  // the two directions are averaged
    dzs[e] = dyr * y[e] * sg * (T(1) + zv * (T(1) - sg));
    dy[e] = dyr * zv * sg;
  }
  if (p.reverse) {
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) dzt[e] += dzs[e];
  } else {
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) dzt[e] = dzs[e];
  }
}

// The step's dB_t and dC_t terms, summed over the lanes, added to the task's row.
template <typename T>
inline void add_lane_sums(const LaneDirection<T>& p, int64_t cnt, const T* __restrict pB, const T* __restrict pC,
                          T* __restrict dbc) {
  for (int64_t n = 0; n < p.N; ++n) {
    T sb = 0, sc = 0;
#pragma omp simd reduction(+ : sb, sc)
    for (int64_t e = 0; e < cnt; ++e) {
      sb += pB[n * kLanes + e];
      sc += pC[n * kLanes + e];
    }
    dbc[n] += sb;
    dbc[p.N + n] += sc;
  }
}

// Phase 3's state loop at one step (the portable form of walk_step_avx512): the adjoint update, dA, the
// per-lane dB_t and dC_t terms, and the sums over n that delta and u need (added to dd, duu; delta's u B_t
// term is u * duu, added by the caller).
template <typename T>
inline void walk_states(const LaneDirection<T>& p, const StepValues<T>& v, int64_t e0, int64_t cnt,
                        const T* __restrict dy, BlockScratch<T>& s, T* __restrict dd, T* __restrict duu) {
  const T *__restrict Bt = v.Bt, *__restrict Ct = v.Bt + p.N, *__restrict dj = v.d, *__restrict duj = v.du;
  const T *__restrict prev = v.prev, *__restrict cur = v.cur, *__restrict decays = v.a;
  T* __restrict g = s.g;
  T* __restrict dA = s.dA;
  T* __restrict pB = s.pB;
  T* __restrict pC = s.pC;
  for (int64_t n = 0; n < p.N; ++n) {
    const T bn = Bt[n], cn = Ct[n];
    const T* __restrict An = p.A + n * p.E + e0;
    const int64_t k = n * kLanes;
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) {
      const T a = decays[k + e], ahp = a * prev[k + e];
      const T gn = g[k + e] + dy[e] * cn, q = gn * ahp;  // q: dL/d(delta A_n)
      pC[k + e] = dy[e] * cur[k + e];
      pB[k + e] = gn * duj[e];
      dd[e] += An[e] * q;
      duu[e] += gn * bn;
      dA[k + e] += dj[e] * q;
      g[k + e] = gn * a;
    }
  }
}

// Phase 3: the adjoint walk back through the chunk, through h_t = a_t h_{t-1} + delta_t u_t B_t.
template <typename T, bool FULL>
void walk_back_chunk(const LaneDirection<T>& p, const LaneGrads<T>& o, const LaneTile& tile,
                     BackwardBuffers<T>& buf, BlockScratch<T>& s) {
#ifdef VM_AVX512
  if constexpr (FULL && std::is_same<T, float>::value) {
    walk_back_avx512(p, o, tile, buf, s);
    return;
  }
#endif
  const int64_t cnt = FULL ? kLanes : tile.width, e0 = tile.e0, NL = p.N * kLanes;
  for (int64_t j = tile.steps - 1; j >= 0; --j) {
    const int64_t t = step_time(p, tile.i0 + j);
    const int64_t k = j * kLanes;
    const StepValues<T> v{buf.c.d + k,   buf.c.du + k,       buf.b.u + k,  buf.b.dsp + k,
                          buf.c.acc + k, s.hs + j * NL, s.hs + (j + 1) * NL, s.a + j * NL,
                          x_proj_row(p, t) + p.R};
    T dy[kLanes], dd[kLanes], duu[kLanes];
    gate_backward(p, o, t, e0, cnt, v.y, dy);
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) dd[e] = duu[e] = T(0);
    walk_states(p, v, e0, cnt, dy, s, dd, duu);
    add_lane_sums(p, cnt, s.pB, s.pC, o.dBC + t * 2 * p.N);
    T* __restrict ddt = o.ddelta + t * p.E + e0;
    T* __restrict dut = o.du + t * p.E + e0;
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) {
      const T ddv = (dd[e] + v.u[e] * duu[e]) * v.dsp[e];
      ddt[e] = ddv;
      dut[e] = duu[e] * v.d[e] + dy[e] * p.D[e0 + e];
      s.dD[e] += dy[e] * v.u[e];
      s.dbias[e] += ddv;
    }
  }
}

template <typename T, bool FULL>
void backward_chunk(const LaneDirection<T>& p, const LaneGrads<T>& o, const LaneTile& tile, BackwardBuffers<T>& buf,
                    BlockScratch<T>& s) {
  chunk_inputs<T, T, FULL>(p, tile, buf.c, &buf.b);
  chunk_recurrence<T, T, FULL>(p, tile, buf.c, s.hs, s.hs + p.N * kLanes, s.a);  // from the checkpoint
  walk_back_chunk<T, FULL>(p, o, tile, buf, s);
}

// One direction's gradients over the channels [e0, e1): chunks from the last, and in each chunk the blocks of 16
// channels in turn (as the forward walks), so that the blocks' reads and writes of a row follow each other
// while its lines are in cache. Each block carries its own adjoint and sums from chunk to chunk.
template <typename T>
void lanes_direction_backward(const LaneDirection<T>& p, const LaneGrads<T>& o, int64_t e0, int64_t e1,
                              T* scratch) {
  const int64_t NL = p.N * kLanes, blocks = (e1 - e0 + kLanes - 1) / kLanes;
  BlockScratch<T> s[kMaxTaskBlocks];
  T* carried = scratch + (2 * kPhaseSteps + 3) * NL;  // after hs, pB, pC and the decays, which the blocks share
  for (int64_t k = 0; k < blocks; ++k) {
    s[k].hs = scratch;
    s[k].pB = scratch + (kPhaseSteps + 1) * NL;
    s[k].pC = s[k].pB + NL;
    s[k].a = s[k].pC + NL;
    s[k].g = carried + 2 * k * NL;
    s[k].dA = s[k].g + NL;
    std::fill(s[k].g, s[k].g + 2 * NL, T(0));
    std::fill(s[k].dD, s[k].dD + kLanes, T(0));
    std::fill(s[k].dbias, s[k].dbias + kLanes, T(0));
  }
  BackwardBuffers<T> buf;
  for (int64_t c = chunk_count(p.L) - 1; c >= 0; --c) {
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t eb = e0 + k * kLanes;
      const LaneTile tile{eb, std::min(kLanes, e1 - eb), c * kPhaseSteps, std::min(kPhaseSteps, p.L - c * kPhaseSteps)};
      const T* saved = p.checkpoints + c * p.N * p.E + eb;
      for (int64_t n = 0; n < p.N; ++n)
        for (int64_t e = 0; e < tile.width; ++e) scratch[n * kLanes + e] = saved[n * p.E + e];
      LaneGrads<T> block = o;  // its dB/dC rows: those of its sum group
      block.dBC += k / kSumBlocks * o.dBC_group_stride;
      if (tile.width == kLanes)
        backward_chunk<T, true>(p, block, tile, buf, s[k]);
      else
        backward_chunk<T, false>(p, block, tile, buf, s[k]);
    }
  }
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t eb = e0 + k * kLanes, width = std::min(kLanes, e1 - eb);
    for (int64_t n = 0; n < p.N; ++n)
      for (int64_t e = 0; e < width; ++e) o.dA[n * p.E + eb + e] = s[k].dA[n * kLanes + e];
    for (int64_t e = 0; e < width; ++e) {
      o.dD[eb + e] = s[k].dD[e];
      o.dbias[eb + e] = s[k].dbias[e];
    }
  }
}

// One task of the backward, the forward's (batch row, group of channels): both directions of its channels.
template <typename T>
void bi_backward_task(const BiBackwardArgs<T>& a, int64_t task, T* scratch) {
  const BiForwardArgs<T>& f = a.f;
  const int64_t span = f.task_blocks * kLanes, groups = (f.E + span - 1) / span;
  const int64_t b = task / groups, e0 = task % groups * span, e1 = std::min(f.E, e0 + span);
  const int64_t sum_group = e0 / (kSumBlocks * kLanes);
  for (int64_t dir = 0; dir < 2; ++dir) {
    const LaneDirection<T> p = direction_of(f, dir, b);
    const int64_t row = (dir * f.batch + b) * f.L * f.E, part = b * 2 + dir;
    LaneGrads<T> o;
    o.dout = a.dout + b * f.L * f.E;
    o.du = a.du + row;
    o.ddelta = a.ddelta + row;
    o.dz = a.dz + b * f.L * f.E;
    o.dA = a.dA + part * f.N * f.E;
    o.dD = a.dD + part * f.E;
    o.dbias = a.dbias + part * f.E;
    o.dBC = a.dBC + ((sum_group * 2 + dir) * f.batch + b) * f.L * 2 * f.N;
    o.dBC_group_stride = 2 * f.batch * f.L * 2 * f.N;
    lanes_direction_backward(p, o, e0, e1, scratch);
  }
}

}  // namespace lanes
}  // namespace visionmamba
