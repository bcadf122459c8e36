// The kernels' argument structs from tensors, with their checks: what the PyTorch entry points (scan_lanes.cpp,
// conv_silu.cpp, mixer_core.cpp) hand the torch-free kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "conv_silu.h"
#include "scan_lanes.h"

namespace visionmamba {
namespace tensor_args {

// A tensor's data as storage type S (bf16: c10::BFloat16's layout).
template <typename S>
inline S* data(const at::Tensor& t) {
  if constexpr (std::is_same<S, bf16>::value)
    return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>());
  else
    return t.data_ptr<S>();
}

// The scan's weights, z and sizes by pointer (z of storage type S, the weights of type T), without u,
// x_proj_out or checkpoints; A2 receives A log2(e) and must outlive them.
template <typename T, typename S>
inline lanes::BiForwardArgs<T, S> weight_args(const at::Tensor& z, const std::vector<at::Tensor>& weights,
                                              int64_t batch, int64_t L, std::vector<T>& A2) {
  TORCH_CHECK(weights.size() == 4, "bi_scan: weights are (W_t, A_t, D, bias)");
  const at::Tensor &W_t = weights[0], &A_t = weights[1], &D = weights[2], &bias = weights[3];
  const int64_t E = A_t.size(2), N = A_t.size(1), R = W_t.size(1);
  TORCH_CHECK(z.dim() == 3 && z.size(0) == batch && z.size(1) == L && z.size(2) == E && z.stride(2) == 1,
              "bi_scan: z must be (b, L, E) with contiguous channels");
  TORCH_CHECK(W_t.is_contiguous() && A_t.is_contiguous() && D.is_contiguous() && bias.is_contiguous(),
              "bi_scan: W_t, A, D and bias must be contiguous");
  TORCH_CHECK(W_t.scalar_type() == A_t.scalar_type() && D.scalar_type() == A_t.scalar_type() &&
                  bias.scalar_type() == A_t.scalar_type() && A_t.scalar_type() == c10::CppTypeToScalarType<T>::value,
              "bi_scan: the weights must be of the compute dtype");
  A2.resize(2 * N * E);
  lanes::log2e_table(A_t.data_ptr<T>(), A2.data(), 2 * N * E);
  lanes::BiForwardArgs<T, S> args;
  args.u = nullptr;
  args.x_proj_out = nullptr;
  args.W_t = W_t.data_ptr<T>();
  args.A_t = A_t.data_ptr<T>();
  args.A2 = A2.data();
  args.D = D.data_ptr<T>();
  args.bias = bias.data_ptr<T>();
  args.z = data<S>(z);
  args.sz_b = z.stride(0);
  args.sz_t = z.stride(1);
  args.task_blocks = lanes::task_blocks(batch, E, at::get_num_threads());
  args.batch = batch;
  args.L = L;
  args.E = E;
  args.N = N;
  args.R = R;
  return args;
}

// The forward's arguments by pointer: activations u, x_proj_out, z of storage type S, the rest of type T;
// A2 receives A log2(e) and must outlive them.
template <typename T, typename S>
inline lanes::BiForwardArgs<T, S> forward_args(const at::Tensor& u, const at::Tensor& x_proj_out, const at::Tensor& z,
                                               const std::vector<at::Tensor>& weights, const at::Tensor& checkpoints,
                                               std::vector<T>& A2) {
  lanes::BiForwardArgs<T, S> args = weight_args<T, S>(z, weights, u.size(1), u.size(2), A2);
  const int64_t batch = args.batch, L = args.L, E = args.E, N = args.N;
  TORCH_CHECK(u.is_contiguous() && u.size(3) == E, "bi_scan: u must be a contiguous (2, b, L, E) tensor");
  TORCH_CHECK(x_proj_out.stride(3) == 1, "bi_scan: x_proj's output must have contiguous columns");
  TORCH_CHECK(x_proj_out.scalar_type() == u.scalar_type() && z.scalar_type() == u.scalar_type(),
              "bi_scan: u, x_proj_out and z must have one dtype");
  TORCH_CHECK(checkpoints.numel() == 0 ||
                  (checkpoints.is_contiguous() && checkpoints.scalar_type() == weights[1].scalar_type() &&
                   checkpoints.numel() == 2 * batch * lanes::chunk_count(L) * N * E),
              "bi_scan: checkpoints must be empty or a contiguous (2, b, chunks, N, E) tensor of the compute dtype");
  args.u = data<S>(u);
  args.x_proj_out = data<S>(x_proj_out);
  args.sx_dir = x_proj_out.stride(0);
  args.sx_b = x_proj_out.stride(1);
  args.sx_t = x_proj_out.stride(2);
  args.checkpoints = checkpoints.numel() ? checkpoints.data_ptr<T>() : nullptr;
  return args;
}

template <typename T, typename S = T>
inline conv::ConvParams<T, S> conv_params(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  TORCH_CHECK(x.stride(2) == 1, "conv: x must have contiguous channels");
  TORCH_CHECK(w.is_contiguous() && bias.is_contiguous(), "conv: w and bias must be contiguous");
  TORCH_CHECK(w.scalar_type() == bias.scalar_type() && w.scalar_type() == c10::CppTypeToScalarType<T>::value,
              "conv: w and bias must be of the compute dtype");
  conv::ConvParams<T, S> p;
  p.x = data<S>(x);
  p.sx_b = x.stride(0);
  p.sx_t = x.stride(1);
  p.w = w.data_ptr<T>();
  p.bias = bias.data_ptr<T>();
  p.batch = x.size(0);
  p.L = x.size(1);
  p.E = w.size(2);
  p.K = w.size(1);
  return p;
}

}  // namespace tensor_args
}  // namespace visionmamba
