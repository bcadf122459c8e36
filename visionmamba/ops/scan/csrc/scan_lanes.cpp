// The forward of both directions of the mixer with channels as the SIMD lanes.
//
// A task owns up to kGroup x 16 channels of one batch row and walks the sequence; per step and state n it
// updates 16 independent states (no horizontal reduction, 16-wide exps). dt_proj is applied inside the
// kernel, so delta (as large as u) is never written. The walk runs in chunks of kPhaseSteps steps with
// three phases per block of 16 channels, so that only the recurrence itself is sequential: (1) for every
// step of the chunk, delta = softplus(W dt_t + bias), delta u and the D skip; (2) the N-state recurrence;
// (3) the SiLU(z) gate and the output. Phases 1 and 3 have no dependence between steps and run at full
// throughput; inside the recurrence their latency chains would stall it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "scan_math.h"
#include "selective_scan.h"

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define VM_AVX512 1
#endif

namespace visionmamba {
namespace {

constexpr int64_t kLanes = 16;       // channels per block: the SIMD lanes
constexpr int64_t kPhaseSteps = 32;  // steps per three-phase chunk
constexpr int64_t kGroup = 4;        // blocks of 16 channels per task

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
// One time step of 16 channels x N states in AVX-512 registers: h = exp(d A) h + du B_n; acc += C_n h.
// exp(d A) = 2^(d A log2 e) with A2 = A log2 e: f = x - floor(x) (vreduceps), a degree-5 polynomial for 2^f
// on [0, 1) (max relative error 1.6e-7 in float32 evaluation), then vscalefps multiplies by 2^floor(x),
// underflowing gradually to 0 (no clamp needed): 8 instructions per 16 exps.
// A2: this block's first channel of the (N, E) table; j: the step's row of the chunk buffers.
inline void states_avx512(const LaneDirection<float>& p, const float* A2, const float* Bt, ChunkBuffers<float>& buf,
                          int64_t j, float* __restrict h) {
  const float* Ct = Bt + p.N;
  const __m512 vd = _mm512_loadu_ps(buf.d + j * kLanes), vdu = _mm512_loadu_ps(buf.du + j * kLanes);
  __m512 vacc = _mm512_loadu_ps(buf.acc + j * kLanes), vacc2 = _mm512_setzero_ps();  // two sums: half the chain
  const __m512 c0 = _mm512_set1_ps(0.99999994039535522f), c1 = _mm512_set1_ps(0.69315308332443237f),
               c2 = _mm512_set1_ps(0.24015359580516815f), c3 = _mm512_set1_ps(0.055826339870691299f),
               c4 = _mm512_set1_ps(0.0089893406257033348f), c5 = _mm512_set1_ps(0.0018775670323520899f);
  for (int64_t n = 0; n < p.N; ++n) {
    const __m512 x = _mm512_mul_ps(vd, _mm512_loadu_ps(A2 + n * p.E));
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 q = _mm512_fmadd_ps(c5, f, c4);
    q = _mm512_fmadd_ps(q, f, c3);
    q = _mm512_fmadd_ps(q, f, c2);
    q = _mm512_fmadd_ps(q, f, c1);
    q = _mm512_fmadd_ps(q, f, c0);
    const __m512 a = _mm512_scalef_ps(q, x);
    const __m512 hv = _mm512_fmadd_ps(a, _mm512_loadu_ps(h + n * 16), _mm512_mul_ps(vdu, _mm512_set1_ps(Bt[n])));
    _mm512_storeu_ps(h + n * 16, hv);
    if (n & 1)
      vacc2 = _mm512_fmadd_ps(_mm512_set1_ps(Ct[n]), hv, vacc2);
    else
      vacc = _mm512_fmadd_ps(_mm512_set1_ps(Ct[n]), hv, vacc);
  }
  _mm512_storeu_ps(buf.acc + j * kLanes, _mm512_add_ps(vacc, vacc2));
}
#endif

template <typename T>
inline int64_t step_time(const LaneDirection<T>& p, int64_t i) {
  return p.reverse ? p.L - 1 - i : i;
}

// Phase 1: delta = softplus(W dt_t + bias) (two partial sums over the rank: half the dependent-FMA chain),
// delta u and the D skip, for every step of the chunk.
template <typename T, bool FULL>
void chunk_inputs(const LaneDirection<T>& p, const LaneTile& tile, ChunkBuffers<T>& buf) {
  const int64_t cnt = FULL ? kLanes : tile.width, e0 = tile.e0;
  for (int64_t j = 0; j < tile.steps; ++j) {
    const int64_t t = step_time(p, tile.i0 + j);
    const T* __restrict ut = p.u + t * p.E + e0;
    const T* __restrict dtr = p.x_proj_out + t * p.sx_t;
    T x0[kLanes], x1[kLanes];
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) x0[e] = x1[e] = T(0);
    int64_t r = 0;
    for (; r + 1 < p.R; r += 2) {
      const T a = dtr[r], b = dtr[r + 1];
      const T* __restrict W0 = p.Wt + r * p.E + e0;
      const T* __restrict W1 = W0 + p.E;
#pragma omp simd
      for (int64_t e = 0; e < cnt; ++e) {
        x0[e] += a * W0[e];
        x1[e] += b * W1[e];
      }
    }
    if (r < p.R) {
      const T a = dtr[r];
      const T* __restrict W0 = p.Wt + r * p.E + e0;
#pragma omp simd
      for (int64_t e = 0; e < cnt; ++e) x0[e] += a * W0[e];
    }
    T* __restrict dj = buf.d + j * kLanes;
    T* __restrict duj = buf.du + j * kLanes;
    T* __restrict aj = buf.acc + j * kLanes;
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) {
      dj[e] = softplus20(x0[e] + x1[e] + p.bias[e0 + e]);
      duj[e] = dj[e] * ut[e];
      aj[e] = p.D[e0 + e] * ut[e];
    }
  }
}

// The next chunk's rows, whose strided addresses the hardware prefetcher would not guess.
template <typename T>
inline void prefetch_next_chunk(const LaneDirection<T>& p, int64_t e0, int64_t t) {
  const int64_t q = p.reverse ? t - kPhaseSteps : t + kPhaseSteps;
  __builtin_prefetch(p.u + q * p.E + e0);
  __builtin_prefetch(p.z + q * p.sz_t + e0);
  __builtin_prefetch(p.out + q * p.E + e0, 1);
  for (int64_t c = 0; c < p.R + 2 * p.N; c += 64 / sizeof(T)) __builtin_prefetch(p.x_proj_out + q * p.sx_t + c);
}

// Phase 2: the recurrence over the chunk; h: this block's (N, 16) states.
template <typename T, bool FULL>
void chunk_recurrence(const LaneDirection<T>& p, const LaneTile& tile, ChunkBuffers<T>& buf, T* __restrict h) {
  const int64_t cnt = FULL ? kLanes : tile.width, e0 = tile.e0;
  for (int64_t j = 0; j < tile.steps; ++j) {
    const int64_t t = step_time(p, tile.i0 + j);
    if (tile.i0 + kPhaseSteps + j < p.L) prefetch_next_chunk(p, e0, t);
    const T* __restrict Bt = p.x_proj_out + t * p.sx_t + p.R;
    const T* __restrict Ct = Bt + p.N;
#ifdef VM_AVX512
    if constexpr (FULL && std::is_same<T, float>::value) {
      states_avx512(p, p.A2 + e0, Bt, buf, j, h);
      continue;
    }
#endif
    T* __restrict dj = buf.d + j * kLanes;
    T* __restrict duj = buf.du + j * kLanes;
    T* __restrict aj = buf.acc + j * kLanes;
    for (int64_t n = 0; n < p.N; ++n) {
      const T bn = Bt[n], cn = Ct[n];
      const T* __restrict An = p.A + n * p.E + e0;
      T* __restrict hn = h + n * kLanes;
#pragma omp simd
      for (int64_t e = 0; e < cnt; ++e) {
        const T hv = vexp(dj[e] * An[e]) * hn[e] + duj[e] * bn;
        hn[e] = hv;
        aj[e] += cn * hv;
      }
    }
  }
}

// Phase 3: the SiLU(z) gate and the average of the two directions.
template <typename T, bool FULL>
void chunk_output(const LaneDirection<T>& p, const LaneTile& tile, const ChunkBuffers<T>& buf) {
  const int64_t cnt = FULL ? kLanes : tile.width, e0 = tile.e0;
  for (int64_t j = 0; j < tile.steps; ++j) {
    const int64_t t = step_time(p, tile.i0 + j);
    const T* __restrict aj = buf.acc + j * kLanes;
    const T* __restrict zt = p.z + t * p.sz_t + e0;
    T* __restrict o = p.out + t * p.E + e0;
#pragma omp simd
    for (int64_t e = 0; e < cnt; ++e) {
      const T y = T(0.5) * aj[e] * zt[e] * sigmoid(zt[e]);
      o[e] = p.reverse ? o[e] + y : y;
    }
  }
}

template <typename T, bool FULL>
void block_chunk(const LaneDirection<T>& p, const LaneTile& tile, ChunkBuffers<T>& buf, T* __restrict h) {
  chunk_inputs<T, FULL>(p, tile, buf);
  chunk_recurrence<T, FULL>(p, tile, buf, h);
  chunk_output<T, FULL>(p, tile, buf);
}

// One direction over the channels [e0, e1); h: (blocks, N, 16) states.
template <typename T>
void lanes_direction(const LaneDirection<T>& p, int64_t e0, int64_t e1, T* __restrict h) {
  const int64_t blocks = (e1 - e0 + kLanes - 1) / kLanes;
  std::fill(h, h + blocks * p.N * kLanes, T(0));
  ChunkBuffers<T> buf;
  for (int64_t i0 = 0; i0 < p.L; i0 += kPhaseSteps) {
    const int64_t steps = std::min(kPhaseSteps, p.L - i0);
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t eb = e0 + k * kLanes;
      const LaneTile tile{eb, std::min(kLanes, e1 - eb), i0, steps};
      T* hk = h + k * p.N * kLanes;
      if (tile.width == kLanes)
        block_chunk<T, true>(p, tile, buf, hk);
      else
        block_chunk<T, false>(p, tile, buf, hk);
    }
  }
}

}  // namespace

void bi_forward(const at::Tensor& u, const at::Tensor& W_t, const at::Tensor& A_t, const at::Tensor& x_proj_out,
                const at::Tensor& D, const at::Tensor& z, const at::Tensor& bias, const at::Tensor& out) {
  const int64_t batch = u.size(1), L = u.size(2), E = u.size(3), N = A_t.size(1), R = W_t.size(1);
  TORCH_CHECK(z.stride(2) == 1, "bi_forward: z must have contiguous channels");
  TORCH_CHECK(x_proj_out.stride(3) == 1, "bi_forward: x_proj's output must have contiguous columns");
  TORCH_CHECK(u.is_contiguous() && W_t.is_contiguous() && A_t.is_contiguous(),
              "bi_forward: u, W_t, A must be contiguous");
  TORCH_CHECK(out.is_contiguous() && out.numel() == batch * L * E && out.scalar_type() == u.scalar_type(),
              "bi_forward: out must be a contiguous (b, L, E) tensor of u's dtype");
  const int64_t span = kGroup * kLanes, groups = (E + span - 1) / span;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_bi_forward", [&] {
    using T = scalar_t;
    std::vector<T> A2(2 * N * E);  // A log2(e), for the base-2 exps of the AVX-512 path
    for (int64_t i = 0; i < 2 * N * E; ++i) A2[i] = A_t.data_ptr<T>()[i] * T(1.4426950408889634);
    const auto direction = [&](int64_t dir, int64_t b) {  // direction dir of batch row b
      return LaneDirection<T>{u.data_ptr<T>() + (dir * batch + b) * L * E,
                              W_t.data_ptr<T>() + dir * R * E,
                              A_t.data_ptr<T>() + dir * N * E,
                              A2.data() + dir * N * E,
                              x_proj_out.data_ptr<T>() + dir * x_proj_out.stride(0) + b * x_proj_out.stride(1),
                              x_proj_out.stride(2),
                              D.data_ptr<T>() + dir * E,
                              bias.data_ptr<T>() + dir * E,
                              z.data_ptr<T>() + b * z.stride(0),
                              z.stride(1),
                              out.data_ptr<T>() + b * L * E,
                              L,
                              E,
                              N,
                              R,
                              dir == 1};
    };
    at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> h(kGroup * N * kLanes);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / groups, e0 = (task % groups) * span, e1 = std::min(E, e0 + span);
        for (int64_t dir = 0; dir < 2; ++dir) lanes_direction<T>(direction(dir, b), e0, e1, h.data());
      }
    });
  });
}

}  // namespace visionmamba
