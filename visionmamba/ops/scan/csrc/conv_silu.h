// The depthwise conv (K taps) + SiLU of both directions of the mixer, one output row at a time, free of
// torch: the PyTorch op conv_silu (conv_silu.cpp) and the ONNX node ConvSiLU (onnxruntime_op.cpp,
// openvino_op.cpp) run it. Token-major: causal for direction 0, anti-causal for direction 1 (the backward
// direction's causal conv, read in reverse: no flipped copies).
#pragma once

#include <cstdint>
#include <type_traits>

#include "scan_math.h"

namespace visionmamba {
namespace conv {

// The depthwise conv + SiLU of both directions (causal for 0, anti-causal for 1). T: the compute type and the
// weights'; S: x's storage (T, or bf16 for CPU bf16 inference).
template <typename T, typename S = T>
struct ConvParams {
  const S* x;  // x_t (b, t) at x + b * sx_b + t * sx_t, E contiguous channels
  int64_t sx_b;
  int64_t sx_t;
  const T* w;     // (2, K, E)
  const T* bias;  // (2, E)
  int64_t batch;
  int64_t L;
  int64_t E;
  int64_t K;
};

// The row of x a tap reads for output step t (or -1 outside [0, L)).
template <typename T, typename S>
inline int64_t tap_source(const ConvParams<T, S>& p, int64_t dir, int64_t t, int64_t k) {
  const int64_t src = t + (dir == 0 ? 1 : -1) * (k - (p.K - 1));
  return src >= 0 && src < p.L ? src : -1;
}

// Pre-activation of one output row (dir, b, t) over the channels [e0, E): bias + the K taps (zero outside
// [0, L)), into out[e0, E).
template <typename T, typename S>
void conv_preact(const ConvParams<T, S>& p, int64_t dir, int64_t b, int64_t t, T* out, int64_t e0 = 0) {
  for (int64_t e = e0; e < p.E; ++e) out[e] = p.bias[dir * p.E + e];
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t src = tap_source(p, dir, t, k);
    if (src < 0) continue;
    const S* xs = p.x + b * p.sx_b + src * p.sx_t;
    const T* wk = p.w + (dir * p.K + k) * p.E;
#pragma omp simd
    for (int64_t e = e0; e < p.E; ++e) out[e] += wk[e] * widen(xs[e]);
  }
}

#ifdef VM_AVX512
// conv_silu_row's channels in whole vectors of 16 (float weights and arithmetic): returns how many it wrote.
template <typename S, typename O>
int64_t conv_silu_vectors_avx512(const ConvParams<float, S>& p, int64_t dir, int64_t b, int64_t t, O* out) {
  constexpr int64_t kMaxTaps = 16;  // more (no Vim has more than 4) are left to the portable loop
  if (p.K > kMaxTaps) return 0;
  const float* wk[kMaxTaps];  // the taps inside [0, L): their weights and x rows
  const S* xk[kMaxTaps];
  int64_t taps = 0;
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t src = tap_source(p, dir, t, k);
    if (src < 0) continue;
    wk[taps] = p.w + (dir * p.K + k) * p.E;
    xk[taps++] = p.x + b * p.sx_b + src * p.sx_t;
  }
  const int64_t whole = p.E / 16 * 16;
  for (int64_t e = 0; e < whole; e += 16) {
    __m512 acc = _mm512_loadu_ps(p.bias + dir * p.E + e);
    for (int64_t k = 0; k < taps; ++k) acc = _mm512_fmadd_ps(_mm512_loadu_ps(wk[k] + e), load16(xk[k] + e), acc);
    store16(out + e, _mm512_mul_ps(acc, sigmoid_avx512(acc)));
  }
  return whole;
}
#endif

// One output row (dir, b, t) of u: silu(pre-activation), E values stored as O (x's type S, or float for the
// fused core's tiles); pre: E values of scratch (may be out when O is T).
template <typename T, typename S, typename O = S>
void conv_silu_row(const ConvParams<T, S>& p, int64_t dir, int64_t b, int64_t t, T* pre, O* out) {
  int64_t e0 = 0;
#ifdef VM_AVX512
  if constexpr (std::is_same<T, float>::value) e0 = conv_silu_vectors_avx512(p, dir, b, t, out);
#endif
  if (e0 == p.E) return;
  conv_preact(p, dir, b, t, pre, e0);
#pragma omp simd
  for (int64_t e = e0; e < p.E; ++e) {
    const T v = pre[e];
    out[e] = narrow<O>(v * sigmoid(v));
  }
}

}  // namespace conv
}  // namespace visionmamba
