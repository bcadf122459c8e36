// The mixer core's inference forward in token tiles, free of torch (the op mixer_core; mixer_core.cpp): one
// batch row per task, each direction walked in chunks of kPhaseSteps steps, and each chunk taken through the
// depthwise conv + SiLU, x_proj and the scan (dt_proj, D skip and gate) while its rows are in cache. Separate
// ops write u (as large as the activations, both directions) and x_proj's output to memory and read them back
// in the next op; here they live in two tiles of kPhaseSteps rows.
//
// Built from the ops' own kernels (conv_silu.h, scan_lanes.h): the tile changes where u and x_proj's output
// live, not how they are computed, so the result is that of conv_silu, x_proj and bi_scan_ but for x_proj's
// order of summation (here one sum per output, over the channels in order). The tiles are float32 whatever
// the activations' dtype: with bf16 activations (x, z and the output) u and x_proj's output are not rounded
// to bf16 on the way, as the separate ops must round them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "conv_silu.h"
#include "scan_lanes.h"

namespace visionmamba {
namespace core {

constexpr int64_t kColumnBlock = 16;  // x_proj's output columns are padded to a multiple of 16 (whole vectors)

inline int64_t padded_columns(int64_t columns) { return (columns + kColumnBlock - 1) / kColumnBlock * kColumnBlock; }

// Everything of one call. S: the activations' storage (float, or bf16 for CPU bf16 inference); weights,
// arithmetic, states and sums are float.
template <typename S>
struct CoreArgs {
  conv::ConvParams<float, S> conv;  // x (b, L, E), the conv's (2, K, E) weight and (2, E) bias
  const float* x_proj_t;            // (2, E, P): x_proj's weight transposed, zeros in the columns [R + 2N, P)
  int64_t P;                        // padded_columns(R + 2N)
  lanes::BiForwardArgs<float, S> scan;  // dt_proj, A, D, z and out (b, L, E); no u or x_proj_out (the tiles)
};

// The tiles and states one task works in (one set per thread, reused across its tasks).
template <typename S>
struct CoreScratch {
  std::vector<float> u;       // (kPhaseSteps, E): the chunk's u, in time order
  std::vector<float> x_proj;  // (kPhaseSteps, P): the chunk's x_proj output (dt_t, B_t, C_t)
  std::vector<float> pre;   // (E,): a conv row's pre-activation
  std::vector<float> sums;  // (P,): x_proj's sums of one row (portable path)
  std::vector<float> h;     // (blocks, N, 16): the states

  explicit CoreScratch(const CoreArgs<S>& a)
      : u(lanes::kPhaseSteps * a.scan.E), x_proj(lanes::kPhaseSteps * a.P), pre(a.scan.E), sums(a.P),
        h((a.scan.E + lanes::kLanes - 1) / lanes::kLanes * a.scan.N * lanes::kLanes) {}
};

#ifdef VM_AVX512
// ROWS rows of x_proj's output, VECTORS x 16 of its columns: ROWS x VECTORS sums in registers over the E channels.
template <int ROWS, int VECTORS>
inline void x_proj_block_avx512(const float* rows, int64_t E, const float* w, int64_t P, float* out) {
  __m512 acc[ROWS][VECTORS];
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < VECTORS; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t e = 0; e < E; ++e) {
    __m512 wv[VECTORS];
#pragma GCC unroll 4
    for (int j = 0; j < VECTORS; ++j) wv[j] = _mm512_loadu_ps(w + e * P + j * 16);
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      const __m512 b = _mm512_set1_ps(rows[i * E + e]);
#pragma GCC unroll 4
      for (int j = 0; j < VECTORS; ++j) acc[i][j] = _mm512_fmadd_ps(b, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < VECTORS; ++j) _mm512_storeu_ps(out + i * P + j * 16, acc[i][j]);
}

template <int VECTORS>
inline void x_proj_columns_avx512(const float* rows, int64_t steps, int64_t E, const float* w, int64_t P, float* out) {
  int64_t r = 0;
  for (; r + 8 <= steps; r += 8) x_proj_block_avx512<8, VECTORS>(rows + r * E, E, w, P, out + r * P);
  for (; r < steps; ++r) x_proj_block_avx512<1, VECTORS>(rows + r * E, E, w, P, out + r * P);
}
#endif

// out (steps, P) = rows (steps, E) @ w (E, P); sums: P floats of scratch.
inline void x_proj_tile(const float* rows, int64_t steps, int64_t E, const float* w, int64_t P, float* out,
                        float* sums) {
#ifdef VM_AVX512
  for (int64_t c = 0; c < P; c += 3 * kColumnBlock) {  // up to 3 vectors of columns at a time: 24 sums in registers
    const int64_t vectors = std::min<int64_t>(3, (P - c) / kColumnBlock);
    if (vectors == 3)
      x_proj_columns_avx512<3>(rows, steps, E, w + c, P, out + c);
    else if (vectors == 2)
      x_proj_columns_avx512<2>(rows, steps, E, w + c, P, out + c);
    else
      x_proj_columns_avx512<1>(rows, steps, E, w + c, P, out + c);
  }
#else
  for (int64_t r = 0; r < steps; ++r) {
    std::fill(sums, sums + P, 0.0f);
    for (int64_t e = 0; e < E; ++e) {
      const float b = rows[r * E + e];
      const float* __restrict we = w + e * P;
#pragma omp simd
      for (int64_t c = 0; c < P; ++c) sums[c] += b * we[c];
    }
    std::copy(sums, sums + P, out + r * P);
  }
#endif
}

// One direction of batch row b: per chunk, conv + SiLU into the u tile, x_proj into its tile, then the chunk
// of the scan for every block of 16 channels (the order of lanes_direction: results do not depend on tiling).
template <typename S>
void core_direction(const CoreArgs<S>& a, int64_t dir, int64_t b, CoreScratch<S>& s) {
  const int64_t L = a.scan.L, E = a.scan.E, N = a.scan.N, blocks = (E + lanes::kLanes - 1) / lanes::kLanes;
  lanes::LaneDirection<float, S, float> p = lanes::direction_of<float, S, float>(a.scan, dir, b);
  p.u = s.u.data();
  p.x_proj_out = s.x_proj.data();
  p.sx_t = a.P;
  p.tile = true;
  std::fill(s.h.begin(), s.h.end(), 0.0f);
  const float* x_proj_t = a.x_proj_t + dir * E * a.P;
  lanes::ChunkBuffers<float> buf;
  for (int64_t i0 = 0; i0 < L; i0 += lanes::kPhaseSteps) {
    const int64_t steps = std::min(lanes::kPhaseSteps, L - i0);
    p.row0 = dir == 0 ? i0 : L - i0 - steps;  // the tiles' rows in time order, whichever way the walk goes
    for (int64_t r = 0; r < steps; ++r) conv::conv_silu_row(a.conv, dir, b, p.row0 + r, s.pre.data(), &s.u[r * E]);
    x_proj_tile(s.u.data(), steps, E, x_proj_t, a.P, s.x_proj.data(), s.sums.data());
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t eb = k * lanes::kLanes;
      const lanes::LaneTile tile{eb, std::min(lanes::kLanes, E - eb), i0, steps};
      float* hk = s.h.data() + k * N * lanes::kLanes;
      if (tile.width == lanes::kLanes)
        lanes::block_chunk<float, S, true>(p, tile, buf, hk);
      else
        lanes::block_chunk<float, S, false>(p, tile, buf, hk);
    }
  }
}

// One task: both directions of batch row b (the backward direction adds to what the forward wrote).
template <typename S>
void core_task(const CoreArgs<S>& a, int64_t b, CoreScratch<S>& s) {
  for (int64_t dir = 0; dir < 2; ++dir) core_direction(a, dir, b, s);
}

}  // namespace core
}  // namespace visionmamba
