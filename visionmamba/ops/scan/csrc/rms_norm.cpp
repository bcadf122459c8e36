// The pre-norm step of a Vim block on the CPU (the ops add_rms_norm, add_rms_norm_, rms_norm and
// add_rms_norm_backward; the math is visionmamba/ops/norm.py's reference): out = residual + hidden in float32,
// rstd = 1 / sqrt(mean(out^2) + eps) per row, y = out rstd weight in hidden's dtype. One task walks whole rows:
// each row is read once, summed while it is in cache and normalised in a second pass over it, where plain
// operators run five passes over the whole tensor and keep temporaries of its size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "scan_math.h"
#include "selective_scan.h"

namespace visionmamba {
namespace {

constexpr int64_t kRowBlock = 64;  // rows per task; the weight gradient's partial sums are per block (fixed order)

// A tensor's data as storage type S (bf16: c10::BFloat16's layout), or null for an empty (absent) tensor.
template <typename S>
S* data_or_null(const at::Tensor& t) {
  if (t.numel() == 0) return nullptr;
  if constexpr (std::is_same<S, bf16>::value)
    return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>());
  else
    return t.data_ptr<S>();
}

template <typename S>
struct NormForward {
  const S* hidden;        // (rows, D)
  const float* residual;  // (rows, D) or null
  const float* weight;    // (D,)
  S* y;                   // (rows, D)
  float* out;             // (rows, D), or null without a residual (the caller keeps hidden itself); may be residual
  float* rstd;            // (rows,) or null
  float eps;
  int64_t rows;
  int64_t D;
};

// One row; HAS_RESIDUAL: residual is present; STORE_OUT: out is (it must be when residual is).
template <typename S, bool HAS_RESIDUAL, bool STORE_OUT>
void forward_row(const NormForward<S>& p, int64_t row) {
  const S* h = p.hidden + row * p.D;
  const float* r = p.residual + (HAS_RESIDUAL ? row * p.D : 0);
  float* o = p.out + (STORE_OUT ? row * p.D : 0);  // may be r: each element is read before it is written
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t d = 0; d < p.D; ++d) {
    float v = widen(h[d]);
    if constexpr (HAS_RESIDUAL) v += r[d];
    if constexpr (STORE_OUT) o[d] = v;
    squares += v * v;
  }
  const float inv = 1.0f / std::sqrt(squares / static_cast<float>(p.D) + p.eps);
  if (p.rstd) p.rstd[row] = inv;
  S* y = p.y + row * p.D;
#pragma omp simd
  for (int64_t d = 0; d < p.D; ++d) {
    const float v = STORE_OUT ? o[d] : widen(h[d]);
    y[d] = narrow<S>(v * inv * p.weight[d]);
  }
}

template <typename S>
struct NormBackward {
  const S* dy;         // (rows, D)
  const float* dout;   // (rows, D): the new residual's own gradient, or null
  const float* out;    // (rows, D): the forward's new residual
  const float* rstd;   // (rows,)
  const float* weight;  // (D,)
  S* dhidden;          // (rows, D)
  float* dresidual;    // (rows, D) or null (no residual)
  float* dw_part;      // (blocks, D): sum over each block's rows of dy xhat
  int64_t rows;
  int64_t D;
};

// dx = rstd (w dy - xhat mean(w dy xhat)) (+ dout), xhat = out rstd; dw += dy xhat. HAS_DOUT: dout is present;
// HAS_RESIDUAL: dresidual is (it gets dx too).
template <typename S, bool HAS_DOUT, bool HAS_RESIDUAL>
void backward_row(const NormBackward<S>& p, int64_t row, float* __restrict dw) {
  const S* g = p.dy + row * p.D;
  const float* x = p.out + row * p.D;
  const float r = p.rstd[row];
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < p.D; ++d) dot += widen(g[d]) * p.weight[d] * x[d];
  const float mean = dot * r / static_cast<float>(p.D);
  const float* dout = p.dout + (HAS_DOUT ? row * p.D : 0);
  S* dh = p.dhidden + row * p.D;
  float* dres = p.dresidual + (HAS_RESIDUAL ? row * p.D : 0);
#pragma omp simd
  for (int64_t d = 0; d < p.D; ++d) {
    const float gv = widen(g[d]), xhat = x[d] * r;
    float dx = r * (gv * p.weight[d] - xhat * mean);
    if constexpr (HAS_DOUT) dx += dout[d];
    dh[d] = narrow<S>(dx);
    if constexpr (HAS_RESIDUAL) dres[d] = dx;
    dw[d] += gv * xhat;
  }
}

int64_t row_blocks(int64_t rows) { return (rows + kRowBlock - 1) / kRowBlock; }

void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.numel() == 0 || (t.is_contiguous() && t.sizes() == like.sizes()),
              "rms_norm: ", name, " must be empty or contiguous and shaped like hidden");
}

template <typename S>
void run_forward(const at::Tensor& hidden, const at::Tensor& residual, const at::Tensor& weight, double eps,
                 const at::Tensor& y, const at::Tensor& out, const at::Tensor& rstd) {
  const NormForward<S> p{data_or_null<S>(hidden), data_or_null<float>(residual), weight.data_ptr<float>(),
                         data_or_null<S>(y),      data_or_null<float>(out),      data_or_null<float>(rstd),
                         static_cast<float>(eps), hidden.size(0),                hidden.size(1)};
  const auto rows = [&](auto row_fn) {
    at::parallel_for(0, row_blocks(p.rows), 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin * kRowBlock; row < std::min(p.rows, end * kRowBlock); ++row) row_fn(p, row);
    });
  };
  if (p.residual)
    rows(forward_row<S, true, true>);
  else if (p.out)
    rows(forward_row<S, false, true>);
  else
    rows(forward_row<S, false, false>);
}

template <typename S>
void run_backward(const at::Tensor& dy, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& rstd,
                  const at::Tensor& weight, const at::Tensor& dhidden, const at::Tensor& dresidual,
                  const at::Tensor& dw_part) {
  const NormBackward<S> p{data_or_null<S>(dy),         data_or_null<float>(dout),      out.data_ptr<float>(),
                          rstd.data_ptr<float>(),      weight.data_ptr<float>(),       data_or_null<S>(dhidden),
                          data_or_null<float>(dresidual), dw_part.data_ptr<float>(), out.size(0), out.size(1)};
  const auto blocks = [&](auto row_fn) {
    at::parallel_for(0, row_blocks(p.rows), 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        float* dw = p.dw_part + block * p.D;
        std::fill(dw, dw + p.D, 0.0f);
        for (int64_t row = block * kRowBlock; row < std::min(p.rows, (block + 1) * kRowBlock); ++row)
          row_fn(p, row, dw);
      }
    });
  };
  if (p.dout && p.dresidual)
    blocks(backward_row<S, true, true>);
  else if (p.dout)
    blocks(backward_row<S, true, false>);
  else if (p.dresidual)
    blocks(backward_row<S, false, true>);
  else
    blocks(backward_row<S, false, false>);
}

}  // namespace

void rms_norm_forward(const at::Tensor& hidden, const at::Tensor& residual, const at::Tensor& weight, double eps,
                      const at::Tensor& y, const at::Tensor& out, const at::Tensor& rstd) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "rms_norm: hidden must be contiguous (rows, D)");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat && weight.numel() == hidden.size(1),
              "rms_norm: weight must be float32 (D,)");
  TORCH_CHECK(y.scalar_type() == hidden.scalar_type() && y.is_contiguous() && y.sizes() == hidden.sizes(),
              "rms_norm: y must be contiguous, shaped and typed like hidden");
  for (const at::Tensor* t : {&residual, &out})
    TORCH_CHECK(t->numel() == 0 || t->scalar_type() == at::kFloat, "rms_norm: the residuals are float32");
  check_rows(residual, hidden, "residual");
  check_rows(out, hidden, "out");
  TORCH_CHECK(residual.numel() == 0 || out.numel() != 0, "rms_norm: with a residual, out must be given");
  TORCH_CHECK(rstd.numel() == 0 || (rstd.scalar_type() == at::kFloat && rstd.numel() == hidden.size(0)),
              "rms_norm: rstd must be empty or float32 (rows,)");
  if (hidden.scalar_type() == at::kBFloat16) {
    run_forward<bf16>(hidden, residual, weight, eps, y, out, rstd);
    return;
  }
  TORCH_CHECK(hidden.scalar_type() == at::kFloat, "rms_norm: hidden must be float32 or bfloat16");
  run_forward<float>(hidden, residual, weight, eps, y, out, rstd);
}

void rms_norm_backward(const at::Tensor& dy, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& rstd,
                       const at::Tensor& weight, const at::Tensor& dhidden, const at::Tensor& dresidual,
                       const at::Tensor& dw_part) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "rms_norm_backward: out must be contiguous float32 (rows, D)");
  TORCH_CHECK(dy.is_contiguous() && dy.sizes() == out.sizes() && dhidden.is_contiguous() &&
                  dhidden.sizes() == out.sizes() && dhidden.scalar_type() == dy.scalar_type(),
              "rms_norm_backward: dy and dhidden must be contiguous, shaped like out, of one dtype");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == out.size(0) && weight.scalar_type() == at::kFloat &&
                  weight.numel() == out.size(1),
              "rms_norm_backward: rstd (rows,) and weight (D,) must be float32");
  TORCH_CHECK(dw_part.is_contiguous() && dw_part.scalar_type() == at::kFloat &&
                  dw_part.numel() == row_blocks(out.size(0)) * out.size(1),
              "rms_norm_backward: dw_part must be float32 (row blocks, D)");
  for (const at::Tensor* t : {&dout, &dresidual})
    TORCH_CHECK(t->numel() == 0 || t->scalar_type() == at::kFloat, "rms_norm_backward: the residuals are float32");
  check_rows(dout, out, "dout");
  check_rows(dresidual, out, "dresidual");
  if (dy.scalar_type() == at::kBFloat16) {
    run_backward<bf16>(dy, dout, out, rstd, weight, dhidden, dresidual, dw_part);
    return;
  }
  TORCH_CHECK(dy.scalar_type() == at::kFloat, "rms_norm_backward: dy must be float32 or bfloat16");
  run_backward<float>(dy, dout, out, rstd, weight, dhidden, dresidual, dw_part);
}

}  // namespace visionmamba
