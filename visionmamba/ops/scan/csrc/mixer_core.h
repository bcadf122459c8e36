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
#include <cstring>
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
  const uint16_t* x_proj_pairs = nullptr;  // (2, E / 2, P, 2) bf16 (pack_bf16_pairs), or none: float products
  lanes::BiForwardArgs<float, S> scan;  // dt_proj, A, D, z and out (b, L, E); no u or x_proj_out (the tiles)
};

// The tiles and states one task works in (one set per thread, reused across its tasks).
template <typename S>
struct CoreScratch {
  lanes::Scratch<float> u;       // (kPhaseSteps, E): the chunk's u, in time order
  lanes::Scratch<float> x_proj;  // (kPhaseSteps, P): the chunk's x_proj output (dt_t, B_t, C_t)
  lanes::Scratch<float> pre;   // (E,): a conv row's pre-activation
  lanes::Scratch<float> sums;  // (P,): x_proj's sums of one row (portable path)
  lanes::Scratch<uint16_t> u_pairs;  // (kPhaseSteps, E rounded up to even) bf16: u for bf16 products, or none
  lanes::Scratch<float> h;     // (blocks, N, 16): the states

  explicit CoreScratch(const CoreArgs<S>& a)
      : u(lanes::kPhaseSteps * a.scan.E), x_proj(lanes::kPhaseSteps * a.P), pre(a.scan.E), sums(a.P),
        u_pairs(a.x_proj_pairs ? lanes::kPhaseSteps * ((a.scan.E + 1) / 2 * 2) : 0),
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

#if defined(VM_AVX512) && (defined(__GNUC__) || defined(__clang__))
#define VM_BF16_DOT 1
// AVX-512 BF16 (vdpbf16ps: 32 bf16 multiply-adds into 16 floats), compiled for it function by function: the
// build's level (x86-64-v4) does not include it, and the caller checks has_bf16_dot() first.
#define VM_TARGET_BF16 __attribute__((target("avx512bf16,avx512f,avx512bw,avx512dq,avx512vl")))

inline bool has_bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

// x_proj's weight (E, P) as bf16 pairs of channels for vdpbf16ps: packed[e2][c][k] = w[2 e2 + k][c] (zero past
// E), rounded to nearest even.
inline void pack_bf16_pairs(const float* w, int64_t E, int64_t P, uint16_t* packed) {
  for (int64_t e2 = 0; e2 < (E + 1) / 2; ++e2)
    for (int64_t c = 0; c < P; ++c)
      for (int64_t k = 0; k < 2; ++k) {
        const int64_t e = 2 * e2 + k;
        packed[(e2 * P + c) * 2 + k] = e < E ? narrow<bf16>(w[e * P + c]).bits : 0;
      }
}

// x_proj_block_avx512 with bf16 pairs: rows (ROWS, 2 pairs) bf16, w packed by pack_bf16_pairs.
template <int ROWS, int VECTORS>
VM_TARGET_BF16 inline void x_proj_block_bf16(const uint16_t* rows, int64_t pairs, const uint16_t* w, int64_t P,
                                             float* out) {
  __m512 acc[ROWS][VECTORS];
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < VECTORS; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t e2 = 0; e2 < pairs; ++e2) {
    __m512bh wv[VECTORS];
#pragma GCC unroll 4
    for (int j = 0; j < VECTORS; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + (e2 * P + j * 16) * 2);
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      int32_t pair;
      std::memcpy(&pair, rows + (i * pairs + e2) * 2, sizeof pair);
      const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int j = 0; j < VECTORS; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], b, wv[j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < VECTORS; ++j) _mm512_storeu_ps(out + i * P + j * 16, acc[i][j]);
}

template <int VECTORS>
VM_TARGET_BF16 void x_proj_columns_bf16(const uint16_t* rows, int64_t steps, int64_t pairs, const uint16_t* w,
                                        int64_t P, float* out) {
  int64_t r = 0;
  for (; r + 8 <= steps; r += 8) x_proj_block_bf16<8, VECTORS>(rows + r * 2 * pairs, pairs, w, P, out + r * P);
  for (; r < steps; ++r) x_proj_block_bf16<1, VECTORS>(rows + r * 2 * pairs, pairs, w, P, out + r * P);
}

// x_proj_tile with bf16 products (sums in float32): u's rows rounded to bf16 pairs into u_pairs (steps rows of
// E rounded up to even), times w packed by pack_bf16_pairs.
VM_TARGET_BF16 inline void x_proj_tile_bf16(const float* u, int64_t steps, int64_t E, const uint16_t* w, int64_t P,
                                            float* out, uint16_t* u_pairs) {
  const int64_t pairs = (E + 1) / 2;
  for (int64_t r = 0; r < steps; ++r) {
    const float* src = u + r * E;
    uint16_t* dst = u_pairs + r * 2 * pairs;
    int64_t e = 0;
    for (; e + 32 <= E; e += 32)  // 32 floats to bf16, rounded to nearest even; the upper half from the first operand
      _mm512_storeu_si512(dst + e, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + e + 16), _mm512_loadu_ps(src + e)));
    for (; e < 2 * pairs; ++e) dst[e] = e < E ? narrow<bf16>(src[e]).bits : 0;
  }
  for (int64_t c = 0; c < P; c += 3 * kColumnBlock) {
    const int64_t vectors = std::min<int64_t>(3, (P - c) / kColumnBlock);
    if (vectors == 3)
      x_proj_columns_bf16<3>(u_pairs, steps, pairs, w + 2 * c, P, out + c);
    else if (vectors == 2)
      x_proj_columns_bf16<2>(u_pairs, steps, pairs, w + 2 * c, P, out + c);
    else
      x_proj_columns_bf16<1>(u_pairs, steps, pairs, w + 2 * c, P, out + c);
  }
}
#else
inline bool has_bf16_dot() { return false; }
inline void pack_bf16_pairs(const float*, int64_t, int64_t, uint16_t*) {}
#endif

// One direction of batch row b: per chunk, conv + SiLU into the u tile, x_proj into its tile, then the chunk
// of the scan for every block of 16 channels (lanes_direction's blocks_chunk: results do not depend on tiling).
template <typename S>
void core_direction(const CoreArgs<S>& a, int64_t dir, int64_t b, CoreScratch<S>& s) {
  const int64_t L = a.scan.L, E = a.scan.E;
  lanes::LaneDirection<float, S, float> p = lanes::direction_of<float, S, float>(a.scan, dir, b);
  p.u = s.u.data();
  p.x_proj_out = s.x_proj.data();
  p.sx_t = a.P;
  p.tile = true;
  std::fill(s.h.begin(), s.h.end(), 0.0f);
  const float* x_proj_t = a.x_proj_t + dir * E * a.P;
  const uint16_t* x_proj_pairs = a.x_proj_pairs ? a.x_proj_pairs + dir * ((E + 1) / 2 * 2) * a.P : nullptr;
  lanes::ChunkBuffers<float> buf;
  for (int64_t i0 = 0; i0 < L; i0 += lanes::kPhaseSteps) {
    const int64_t steps = std::min(lanes::kPhaseSteps, L - i0);
    p.row0 = dir == 0 ? i0 : L - i0 - steps;  // the tiles' rows in time order, whichever way the walk goes
    for (int64_t r = 0; r < steps; ++r) conv::conv_silu_row(a.conv, dir, b, p.row0 + r, s.pre.data(), &s.u[r * E]);
#ifdef VM_BF16_DOT
    if (x_proj_pairs)
      x_proj_tile_bf16(s.u.data(), steps, E, x_proj_pairs, a.P, s.x_proj.data(), s.u_pairs.data());
    else
#endif
      x_proj_tile(s.u.data(), steps, E, x_proj_t, a.P, s.x_proj.data(), s.sums.data());
    lanes::blocks_chunk(p, 0, E, i0, buf, s.h.data());
  }
}

// One task: both directions of batch row b (the backward direction adds to what the forward wrote).
template <typename S>
void core_task(const CoreArgs<S>& a, int64_t b, CoreScratch<S>& s) {
  for (int64_t dir = 0; dir < 2; ++dir) core_direction(a, dir, b, s);
}

}  // namespace core
}  // namespace visionmamba
