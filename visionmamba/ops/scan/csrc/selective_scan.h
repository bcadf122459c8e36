// The CPU selective-scan kernels: parameter structs and the entry points bound in bindings.cpp.
//
// Layouts (batch b, channels E, length L, states N, dt rank R; "2" stacks the forward and the backward
// direction of the bidirectional mixer):
//   one direction (the custom-op contract): u, delta, z (b, E, L) channel-major; A (E, N);
//     BC (b, L, 2N) time-major: B_t then C_t; D (E,) or empty; z empty for no gate.
//   bidirectional forward (scan_lanes.h): u (2, b, L, E) token-major; W_t (2, R, E); A_t (2, N, E);
//     x_proj_out: x_proj's output (2, b, L, R + 2N) (dt_t, B_t, C_t per row); z (b, L, E) with contiguous
//     channels; D, bias (2, E).
//   bidirectional backward (scan_lanes.cpp): the forward's layouts, dout (b, L, E), and the states the
//     forward saved every 32 steps, checkpoints (2, b, chunks, N, E).
//   conv (conv_silu.cpp): x (b, L, E) with contiguous channels (a strided view is fine); w (2, K, E)
//     taps-major; bias (2, E).
// Every kernel computes in the dtype of its inputs (float32 or float64; bfloat16 activations in float32). Reductions over channels or batch
// go to per-task partial buffers that the caller sums in a fixed order: results are deterministic.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace visionmamba {

// One (batch, channel) row of the recurrence. Sequence values are read through a pointer and a time
// stride, so channel-major and token-major layouts both work without copies; B_t and C_t are N
// contiguous values at B + t * sbc and C + t * sbc.
template <typename T>
struct Row {
  const T* u;
  int64_t su;
  const T* delta;  // before bias and softplus
  int64_t sd;
  const T* B;
  const T* C;
  int64_t sbc;
  const T* z;  // null: no gate
  int64_t sz;
  const T* A;  // the N values of this channel
  T D;
  T bias;
  int64_t L;
  int64_t N;
  bool softplus;
};

// Where the gradients of one row go: du, ddelta (w.r.t. the raw delta) and dz through time strides; dB_t,
// dC_t added to the N values at
// dB + t * sdbc; dA (N values), dD and dbias written.
template <typename T>
struct RowGrads {
  const T* dout;
  int64_t so;
  T* du;
  int64_t sdu;
  T* ddelta;
  int64_t sdd;
  T* dz;
  int64_t sdz;
  T* dB;
  T* dC;
  int64_t sdbc;
  T* dA;
  T* dD;
  T* dbias;
};

// Work buffers of one thread for the backward of one row: the recomputed states H and decays Ad (L x N),
// the pre-gate outputs ys, the adjoint state g, and per-step delta, sigmoid(z) and softplus'(delta).
template <typename T>
struct RowScratch {
  RowScratch(int64_t L, int64_t N) : H(L * N), Ad(L * N), ys(L), g(N), dts(L), zsig(L), dsoftplus(L), zeros(N) {}
  std::vector<T> H, Ad, ys, g, dts, zsig, dsoftplus, zeros;
};

// ------------------------------------------------------------------------------------------ entry points
// One direction (scan_rows.cpp). Returns y (b, E, L).
at::Tensor scan_forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& BC,
                        const at::Tensor& D, const at::Tensor& z, bool softplus);
// Returns du, ddelta, dz, dA_part (b, E, N), dBC_part (b, blocks, L, 2N), dD_part (b, E), dbias_part (b, E).
std::vector<at::Tensor> scan_backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& BC, const at::Tensor& D, const at::Tensor& z, bool softplus,
                                      const at::Tensor& dout);

// Both directions (scan_lanes.cpp): writes (y_forward + y_backward) / 2 into out (b, L, E), contiguous. out may
// be u[0]: each task reads the rows of u[0] it owns before it writes them (in-place inference). checkpoints:
// (2, b, chunks, N, E) to receive the states before every chunk of kPhaseSteps steps, or an empty tensor.
// weights: the scan's (W_t, A_t, D, bias). Activations (u, x_proj_out, z, out) may be bfloat16 with float32
// weights (inference: read and written as bf16, computed in float32).
void bi_forward(const at::Tensor& u, const at::Tensor& x_proj_out, const at::Tensor& z,
                const std::vector<at::Tensor>& weights, const at::Tensor& out, const at::Tensor& checkpoints);
// Gradients of bi_forward from its checkpoints (scan_lanes.cpp), token-major: du, ddelta (2, b, L, E) (ddelta:
// of W dt + bias, before the softplus), dz (b, L, E), dA_part (b, 2, N, E), dBC_part (groups, 2, b, L, 2N) in
// x_proj's column order, dD_part, dbias_part (b, 2, E).
std::vector<at::Tensor> bi_backward(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& x_proj_out,
                                    const at::Tensor& z, const std::vector<at::Tensor>& weights,
                                    const at::Tensor& checkpoints);

// The mixer core's inference forward in token tiles (mixer_core.cpp): conv + SiLU (conv_w (2, K, E), conv_b (2, E)),
// x_proj (x_proj_t: its weight transposed, (2, E, P), zero columns from R + 2N to P, the next multiple of 16) and
// bi_forward's scan with weights (W_t, A_t, D, bias), from x, z (b, L, E) into out (b, L, E), contiguous.
// x, z, out: float32, or bfloat16 with float32 weights and arithmetic.
void mixer_core(const at::Tensor& x, const at::Tensor& conv_w, const at::Tensor& conv_b, const at::Tensor& x_proj_t,
                const at::Tensor& z, const std::vector<at::Tensor>& weights, const at::Tensor& out);

// Depthwise conv + SiLU of both directions (conv_silu.cpp): returns u (2, b, L, E).
at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias);
// Returns dx (b, L, E), dw_part (b, 2, K, E), db_part (b, 2, E) (partial sums over the batch).
std::vector<at::Tensor> conv_backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                                      const at::Tensor& du);

// The pre-norm step (rms_norm.cpp; absent tensors are empty): y = (residual + hidden) rstd weight in hidden's
// dtype (float32 or bfloat16), the new residual into out (float32; may be residual itself, or absent without a
// residual), rstd (rows,) unless absent. hidden, residual, y, out: contiguous (rows, D); weight float32 (D,).
void rms_norm_forward(const at::Tensor& hidden, const at::Tensor& residual, const at::Tensor& weight, double eps,
                      const at::Tensor& y, const at::Tensor& out, const at::Tensor& rstd);
// Its gradients: dhidden (dy's dtype) and dresidual (float32, absent without a residual) get dx (+ dout, the new
// residual's own gradient, unless absent); dw_part (ceil(rows / 64), D) the weight gradient per block of 64 rows.
void rms_norm_backward(const at::Tensor& dy, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& rstd,
                       const at::Tensor& weight, const at::Tensor& dhidden, const at::Tensor& dresidual,
                       const at::Tensor& dw_part);

}  // namespace visionmamba
