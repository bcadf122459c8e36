// Depthwise conv (K taps) + SiLU of both directions of the mixer, token-major: causal for direction 0,
// anti-causal for direction 1 (the backward direction's causal conv, read in reverse: no flipped copies).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "conv_silu.h"
#include "selective_scan.h"
#include "tensor_args.h"

namespace visionmamba {
namespace {

using conv::conv_preact;
using conv::conv_silu_row;
using conv::ConvParams;
using conv::tap_source;
using tensor_args::conv_params;
using tensor_args::data;

// u (2, b, L, E) = silu(pre-activation), stored as S.
template <typename T, typename S>
void conv_forward_rows(const ConvParams<T, S>& p, S* pu) {
  at::parallel_for(0, 2 * p.batch * p.L, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> pre(p.E);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t dir = row / (p.batch * p.L), b = (row / p.L) % p.batch, t = row % p.L;
      conv_silu_row(p, dir, b, t, pre.data(), pu + row * p.E);
    }
  });
}

// Where the conv gradients go: dx (b, L, E), and per-batch-row partial sums dw (b, 2, K, E) and db (b, 2, E).
template <typename T>
struct ConvGrads {
  const T* du;
  T* dx;
  T* dw;
  T* db;
};

// The gradients of direction dir of batch row b (one task owns a batch row: its dx rows are its own). pre, gr:
// E values of scratch each (the step's pre-activation and du silu'(pre), used by the step's taps only).
template <typename T>
void conv_backward_direction(const ConvParams<T>& p, const ConvGrads<T>& o, int64_t dir, int64_t b, T* pre, T* gr) {
  for (int64_t t = 0; t < p.L; ++t) {
    conv_preact(p, dir, b, t, pre);
    const int64_t row = (dir * p.batch + b) * p.L + t;
    T* db = o.db + (b * 2 + dir) * p.E;
#pragma omp simd
    for (int64_t e = 0; e < p.E; ++e) {
      const T sg = sigmoid(pre[e]);
      gr[e] = o.du[row * p.E + e] * sg * (T(1) + pre[e] * (T(1) - sg));
      db[e] += gr[e];
    }
    for (int64_t k = 0; k < p.K; ++k) {
      const int64_t src = tap_source(p, dir, t, k);
      if (src < 0) continue;
      const T* xs = p.x + b * p.sx_b + src * p.sx_t;
      T* dxs = o.dx + (b * p.L + src) * p.E;
      T* dw = o.dw + ((b * 2 + dir) * p.K + k) * p.E;
      const T* wk = p.w + (dir * p.K + k) * p.E;
#pragma omp simd
      for (int64_t e = 0; e < p.E; ++e) {
        dw[e] += gr[e] * xs[e];
        dxs[e] += wk[e] * gr[e];
      }
    }
  }
}

}  // namespace

at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  if (x.scalar_type() == at::kBFloat16) {  // bf16 in and out, float32 weights and arithmetic
    auto u = at::empty({2, x.size(0), x.size(1), w.size(2)}, x.options());
    conv_forward_rows(conv_params<float, bf16>(x, w, bias), reinterpret_cast<bf16*>(u.data_ptr<at::BFloat16>()));
    return u;
  }
  auto u = at::empty({2, x.size(0), x.size(1), w.size(2)}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "visionmamba_conv_forward",
                             [&] { conv_forward_rows(conv_params<scalar_t>(x, w, bias), u.data_ptr<scalar_t>()); });
  return u;
}

std::vector<at::Tensor> conv_backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                                      const at::Tensor& du) {
  const int64_t batch = x.size(0), L = x.size(1), K = w.size(1), E = w.size(2);
  auto dx = at::zeros({batch, L, E}, w.options());
  auto dw_part = at::zeros({batch, 2, K, E}, w.options()), db_part = at::zeros({batch, 2, E}, w.options());
  TORCH_CHECK(du.is_contiguous(), "conv_backward: du must be contiguous");
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "visionmamba_conv_backward", [&] {
    using T = scalar_t;
    const auto p = conv_params<T>(x, w, bias);
    const ConvGrads<T> grads{du.data_ptr<T>(), dx.data_ptr<T>(), dw_part.data_ptr<T>(), db_part.data_ptr<T>()};
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> pre(E), gr(E);
      for (int64_t b = begin; b < end; ++b)
        for (int64_t dir = 0; dir < 2; ++dir) conv_backward_direction(p, grads, dir, b, pre.data(), gr.data());
    });
  });
  return {dx, dw_part, db_part};
}

}  // namespace visionmamba
