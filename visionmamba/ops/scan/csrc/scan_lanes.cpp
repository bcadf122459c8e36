// The PyTorch entry points of the lanes kernels (scan_lanes.h, scan_lanes_backward.h): checks, A log2(e), one
// task per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "scan_lanes_backward.h"
#include "selective_scan.h"

namespace visionmamba {
namespace {

// A tensor's data as storage type S (bf16: c10::BFloat16's layout).
template <typename S>
S* data(const at::Tensor& t) {
  if constexpr (std::is_same<S, bf16>::value)
    return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>());
  else
    return t.data_ptr<S>();
}

// The forward's arguments by pointer: activations u, x_proj_out, z of storage type S, the rest of type T;
// A2 receives A log2(e) and must outlive them.
template <typename T, typename S>
lanes::BiForwardArgs<T, S> forward_args(const at::Tensor& u, const at::Tensor& x_proj_out, const at::Tensor& z,
                                        const std::vector<at::Tensor>& weights, const at::Tensor& checkpoints,
                                        std::vector<T>& A2) {
  TORCH_CHECK(weights.size() == 4, "bi_scan: weights are (W_t, A_t, D, bias)");
  const at::Tensor &W_t = weights[0], &A_t = weights[1], &D = weights[2], &bias = weights[3];
  const int64_t batch = u.size(1), L = u.size(2), E = u.size(3), N = A_t.size(1), R = W_t.size(1);
  TORCH_CHECK(z.stride(2) == 1, "bi_scan: z must have contiguous channels");
  TORCH_CHECK(x_proj_out.stride(3) == 1, "bi_scan: x_proj's output must have contiguous columns");
  TORCH_CHECK(u.is_contiguous() && W_t.is_contiguous() && A_t.is_contiguous() && D.is_contiguous() &&
                  bias.is_contiguous(),
              "bi_scan: u, W_t, A, D and bias must be contiguous");
  TORCH_CHECK(x_proj_out.scalar_type() == u.scalar_type() && z.scalar_type() == u.scalar_type(),
              "bi_scan: u, x_proj_out and z must have one dtype");
  TORCH_CHECK(W_t.scalar_type() == A_t.scalar_type() && D.scalar_type() == A_t.scalar_type() &&
                  bias.scalar_type() == A_t.scalar_type() && A_t.scalar_type() == c10::CppTypeToScalarType<T>::value,
              "bi_scan: the weights must be of the compute dtype");
  TORCH_CHECK(checkpoints.numel() == 0 ||
                  (checkpoints.is_contiguous() && checkpoints.scalar_type() == A_t.scalar_type() &&
                   checkpoints.numel() == 2 * batch * lanes::chunk_count(L) * N * E),
              "bi_scan: checkpoints must be empty or a contiguous (2, b, chunks, N, E) tensor of the compute dtype");
  A2.resize(2 * N * E);
  lanes::log2e_table(A_t.data_ptr<T>(), A2.data(), 2 * N * E);
  lanes::BiForwardArgs<T, S> args;
  args.u = data<S>(u);
  args.W_t = W_t.data_ptr<T>();
  args.A_t = A_t.data_ptr<T>();
  args.A2 = A2.data();
  args.x_proj_out = data<S>(x_proj_out);
  args.sx_dir = x_proj_out.stride(0);
  args.sx_b = x_proj_out.stride(1);
  args.sx_t = x_proj_out.stride(2);
  args.D = D.data_ptr<T>();
  args.bias = bias.data_ptr<T>();
  args.z = data<S>(z);
  args.sz_b = z.stride(0);
  args.sz_t = z.stride(1);
  args.checkpoints = checkpoints.numel() ? checkpoints.data_ptr<T>() : nullptr;
  args.task_blocks = lanes::task_blocks(batch, E, at::get_num_threads());
  args.batch = batch;
  args.L = L;
  args.E = E;
  args.N = N;
  args.R = R;
  return args;
}

template <typename T, typename S>
void run_forward(const at::Tensor& u, const at::Tensor& x_proj_out, const at::Tensor& z,
                 const std::vector<at::Tensor>& weights, const at::Tensor& out, const at::Tensor& checkpoints) {
  std::vector<T> A2;
  lanes::BiForwardArgs<T, S> args = forward_args<T, S>(u, x_proj_out, z, weights, checkpoints, A2);
  args.out = data<S>(out);
  at::parallel_for(0, lanes::bi_forward_tasks(args), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> h(lanes::bi_forward_scratch(args));
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
      std::vector<T> scratch(lanes::bi_backward_scratch(args.f));
      for (int64_t task = begin; task < end; ++task) lanes::bi_backward_task(args, task, scratch.data());
    });
  });
  return {du, ddelta, dz, dA_part, dBC_part, dD_part, dbias_part};
}

}  // namespace visionmamba
