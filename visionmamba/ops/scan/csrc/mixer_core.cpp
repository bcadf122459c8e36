// The PyTorch entry point of the fused inference core (mixer_core.h): checks, one batch row per task.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "mixer_core.h"
#include "selective_scan.h"
#include "tensor_args.h"

namespace visionmamba {
namespace {

template <typename S>
void run_core(const at::Tensor& x, const at::Tensor& conv_w, const at::Tensor& conv_b, const at::Tensor& x_proj_t,
              const at::Tensor& z, const std::vector<at::Tensor>& weights, const at::Tensor& out) {
  std::vector<float> A2;
  core::CoreArgs<S> a;
  a.conv = tensor_args::conv_params<float, S>(x, conv_w, conv_b);
  a.scan = tensor_args::weight_args<float, S>(z, weights, x.size(0), x.size(1), A2);
  const int64_t E = a.scan.E, columns = a.scan.R + 2 * a.scan.N;
  TORCH_CHECK(a.conv.E == E && x.size(2) == E, "mixer_core: x, the conv and the scan must have one channel count");
  TORCH_CHECK(x_proj_t.is_contiguous() && x_proj_t.scalar_type() == at::kFloat && x_proj_t.dim() == 3 &&
                  x_proj_t.size(0) == 2 && x_proj_t.size(1) == E && x_proj_t.size(2) == core::padded_columns(columns),
              "mixer_core: x_proj_t must be a contiguous float32 (2, E, P) tensor, P = R + 2N padded to 16");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == x.scalar_type() && z.scalar_type() == x.scalar_type() &&
                  out.numel() == x.size(0) * x.size(1) * E,
              "mixer_core: out must be a contiguous (b, L, E) tensor of x's dtype, as z is");
  a.x_proj_t = x_proj_t.data_ptr<float>();
  a.P = x_proj_t.size(2);
  std::vector<uint16_t> pairs;  // bf16 activations on a CPU with bf16 dot products: x_proj as bf16 products
  if (std::is_same<S, bf16>::value && core::has_bf16_dot()) {
    const int64_t per_direction = (E + 1) / 2 * 2 * a.P;
    pairs.resize(2 * per_direction);
    for (int64_t dir = 0; dir < 2; ++dir)
      core::pack_bf16_pairs(a.x_proj_t + dir * E * a.P, E, a.P, pairs.data() + dir * per_direction);
    a.x_proj_pairs = pairs.data();
  }
  a.scan.out = tensor_args::data<S>(out);
  at::parallel_for(0, a.scan.batch, 1, [&](int64_t begin, int64_t end) {
    core::CoreScratch<S> scratch(a);
    for (int64_t b = begin; b < end; ++b) core::core_task(a, b, scratch);
  });
}

}  // namespace

void mixer_core(const at::Tensor& x, const at::Tensor& conv_w, const at::Tensor& conv_b, const at::Tensor& x_proj_t,
                const at::Tensor& z, const std::vector<at::Tensor>& weights, const at::Tensor& out) {
  if (x.scalar_type() == at::kBFloat16) {
    run_core<bf16>(x, conv_w, conv_b, x_proj_t, z, weights, out);
    return;
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat, "mixer_core: x must be float32 or bfloat16");
  run_core<float>(x, conv_w, conv_b, x_proj_t, z, weights, out);
}

}  // namespace visionmamba
