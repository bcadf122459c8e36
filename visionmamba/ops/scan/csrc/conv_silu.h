// The depthwise conv (K taps) + SiLU of both directions of the mixer, one output row at a time, free of
// torch: the PyTorch op conv_silu (conv_silu.cpp) and the ONNX node ConvSiLU (onnxruntime_op.cpp,
// openvino_op.cpp) run it. Token-major: causal for direction 0, anti-causal for direction 1 (the backward
// direction's causal conv, read in reverse: no flipped copies).
#pragma once

#include <cstdint>

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

// Pre-activation of one output row (dir, b, t) over all channels: bias + the K taps (zero outside [0, L)).
template <typename T, typename S>
void conv_preact(const ConvParams<T, S>& p, int64_t dir, int64_t b, int64_t t, T* out) {
  for (int64_t e = 0; e < p.E; ++e) out[e] = p.bias[dir * p.E + e];
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t src = tap_source(p, dir, t, k);
    if (src < 0) continue;
    const S* xs = p.x + b * p.sx_b + src * p.sx_t;
    const T* wk = p.w + (dir * p.K + k) * p.E;
#pragma omp simd
    for (int64_t e = 0; e < p.E; ++e) out[e] += wk[e] * widen(xs[e]);
  }
}

// One output row (dir, b, t) of u: silu(pre-activation), E values; pre: E values of scratch (may be out when S
// is T).
template <typename T, typename S>
void conv_silu_row(const ConvParams<T, S>& p, int64_t dir, int64_t b, int64_t t, T* pre, S* out) {
  conv_preact(p, dir, b, t, pre);
#pragma omp simd
  for (int64_t e = 0; e < p.E; ++e) {
    const T v = pre[e];
    out[e] = narrow<S>(v * sigmoid(v));
  }
}

}  // namespace conv
}  // namespace visionmamba
