// The PyTorch entry points of the lanes kernels (scan_lanes.h, scan_lanes_backward.h): checks, A log2(e), one
// task per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "scan_lanes_backward.h"
#include "selective_scan.h"
#include "tensor_args.h"

namespace visionmamba {
namespace {

using tensor_args::data;
using tensor_args::forward_args;

template <typename T, typename S>
void run_forward(const at::Tensor& u, const at::Tensor& x_proj_out, const at::Tensor& z,
                 const std::vector<at::Tensor>& weights, const at::Tensor& out, const at::Tensor& checkpoints) {
  std::vector<T> A2;
  lanes::BiForwardArgs<T, S> args = forward_args<T, S>(u, x_proj_out, z, weights, checkpoints, A2);
  args.out = data<S>(out);
  at::parallel_for(0, lanes::bi_forward_tasks(args), 1, [&](int64_t begin, int64_t end) {
    lanes::Scratch<T> h(lanes::bi_forward_scratch(args));
    for (int64_t task = begin; task < end; ++task) lanes::bi_forward_task(args, task, h.data());
  });
}

}  // namespace

void bi_forward(const at::Tensor& u, const at::Tensor& x_proj_out, const at::Tensor& z,
                const std::vector<at::Tensor>& weights, const at::Tensor& out, const at::Tensor& checkpoints) {
  TORCH_CHECK(out.is_contiguous() && out.numel() == u.size(1) * u.size(2) * u.size(3) &&
                  out.scalar_type() == u.scalar_type(),
              "bi_forward: out must be a contiguous (b, L, E) tensor of u's dtype");
  if (u.scalar_type() == at::kBFloat16) {  // bf16 activations, float32 weights and arithmetic
    run_forward<float, bf16>(u, x_proj_out, z, weights, out, checkpoints);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_bi_forward", [&] {
    run_forward<scalar_t, scalar_t>(u, x_proj_out, z, weights, out, checkpoints);
  });
}

std::vector<at::Tensor> bi_backward(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& x_proj_out,
                                    const at::Tensor& z, const std::vector<at::Tensor>& weights,
                                    const at::Tensor& checkpoints) {
  TORCH_CHECK(weights.size() == 4, "bi_backward: weights are (W_t, A_t, D, bias)");
  const int64_t batch = u.size(1), L = u.size(2), E = u.size(3), N = weights[1].size(1);
  const int64_t groups = (E + lanes::kSumBlocks * lanes::kLanes - 1) / (lanes::kSumBlocks * lanes::kLanes);
  TORCH_CHECK(checkpoints.numel() == 2 * batch * lanes::chunk_count(L) * N * E,
              "bi_backward: needs the forward's checkpoints");
  TORCH_CHECK(dout.is_contiguous() && dout.numel() == batch * L * E && dout.scalar_type() == u.scalar_type(),
              "bi_backward: dout must be a contiguous (b, L, E) tensor of u's dtype");
  auto du = at::empty_like(u), ddelta = at::empty_like(u);
  auto dz = at::empty({batch, L, E}, u.options());
  auto dA_part = at::empty({batch, 2, N, E}, u.options());
  auto dD_part = at::empty({batch, 2, E}, u.options()), dbias_part = at::empty({batch, 2, E}, u.options());
  auto dBC_part = at::zeros({groups, 2, batch, L, 2 * N}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_bi_backward", [&] {
    using T = scalar_t;
    std::vector<T> A2;
    lanes::BiBackwardArgs<T> args;
    args.f = forward_args<T, T>(u, x_proj_out, z, weights, checkpoints, A2);
    args.dout = dout.data_ptr<T>();
    args.du = du.data_ptr<T>();
    args.ddelta = ddelta.data_ptr<T>();
    args.dz = dz.data_ptr<T>();
    args.dA = dA_part.data_ptr<T>();
    args.dD = dD_part.data_ptr<T>();
    args.dbias = dbias_part.data_ptr<T>();
    args.dBC = dBC_part.data_ptr<T>();
    at::parallel_for(0, lanes::bi_forward_tasks(args.f), 1, [&](int64_t begin, int64_t end) {
      lanes::Scratch<T> scratch(lanes::bi_backward_scratch(args.f));
      for (int64_t task = begin; task < end; ++task) lanes::bi_backward_task(args, task, scratch.data());
    });
  });
  return {du, ddelta, dz, dA_part, dBC_part, dD_part, dbias_part};
}

}  // namespace visionmamba
