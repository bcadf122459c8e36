// The PyTorch entry point of the lanes forward (scan_lanes.h): checks, A log2(e), one task per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "scan_lanes.h"
#include "selective_scan.h"

namespace visionmamba {

void bi_forward(const at::Tensor& u, const at::Tensor& W_t, const at::Tensor& A_t, const at::Tensor& x_proj_out,
                const at::Tensor& D, const at::Tensor& z, const at::Tensor& bias, const at::Tensor& out) {
  const int64_t batch = u.size(1), L = u.size(2), E = u.size(3), N = A_t.size(1), R = W_t.size(1);
  TORCH_CHECK(z.stride(2) == 1, "bi_forward: z must have contiguous channels");
  TORCH_CHECK(x_proj_out.stride(3) == 1, "bi_forward: x_proj's output must have contiguous columns");
  TORCH_CHECK(u.is_contiguous() && W_t.is_contiguous() && A_t.is_contiguous(),
              "bi_forward: u, W_t, A must be contiguous");
  TORCH_CHECK(out.is_contiguous() && out.numel() == batch * L * E && out.scalar_type() == u.scalar_type(),
              "bi_forward: out must be a contiguous (b, L, E) tensor of u's dtype");
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_bi_forward", [&] {
    using T = scalar_t;
    std::vector<T> A2(2 * N * E);
    lanes::log2e_table(A_t.data_ptr<T>(), A2.data(), 2 * N * E);
    lanes::BiForwardArgs<T> args;
    args.u = u.data_ptr<T>();
    args.W_t = W_t.data_ptr<T>();
    args.A_t = A_t.data_ptr<T>();
    args.A2 = A2.data();
    args.x_proj_out = x_proj_out.data_ptr<T>();
    args.sx_dir = x_proj_out.stride(0);
    args.sx_b = x_proj_out.stride(1);
    args.sx_t = x_proj_out.stride(2);
    args.D = D.data_ptr<T>();
    args.bias = bias.data_ptr<T>();
    args.z = z.data_ptr<T>();
    args.sz_b = z.stride(0);
    args.sz_t = z.stride(1);
    args.out = out.data_ptr<T>();
    args.batch = batch;
    args.L = L;
    args.E = E;
    args.N = N;
    args.R = R;
    at::parallel_for(0, lanes::bi_forward_tasks(args), 1, [&](int64_t begin, int64_t end) {
      std::vector<T> h(lanes::bi_forward_scratch(args));
      for (int64_t task = begin; task < end; ++task) lanes::bi_forward_task(args, task, h.data());
    });
  });
}

}  // namespace visionmamba
