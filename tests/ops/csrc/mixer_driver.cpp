// The mixer core's forward through the torch-free kernels (conv_silu.h, scan_lanes.h), as a program: what the
// toolchain tests build with other compilers and for other architectures (aarch64 under qemu-user) and compare
// with the reference. x_proj, a plain matrix product, is done here.
//
//   mixer_driver IN OUT
//   IN:  int64 batch, L, E, N, R, K, then float32 x (b, L, E), z (b, L, E), conv weight (2, K, E), conv bias
//        (2, E), x_proj weight (2, R + 2N, E), dt_proj weight (2, E, R), dt_proj bias (2, E), A (2, E, N), D (2, E)
//   OUT: float32 (b, L, E), the core's output
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "conv_silu.h"
#include "scan_lanes.h"

namespace {

std::vector<float> take(std::FILE* f, int64_t count) {
  std::vector<float> v(static_cast<size_t>(count));
  if (count > 0 && std::fread(v.data(), sizeof(float), v.size(), f) != v.size()) {
    std::fprintf(stderr, "short input\n");
    std::exit(2);
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  std::FILE* in = std::fopen(argv[1], "rb");
  if (in == nullptr) return 2;
  int64_t dims[6];
  if (std::fread(dims, sizeof(int64_t), 6, in) != 6) return 2;
  const int64_t batch = dims[0], L = dims[1], E = dims[2], N = dims[3], R = dims[4], K = dims[5], C = R + 2 * N;
  const auto x = take(in, batch * L * E), z = take(in, batch * L * E), conv_w = take(in, 2 * K * E),
             conv_b = take(in, 2 * E), xproj_w = take(in, 2 * C * E), dt_w = take(in, 2 * E * R),
             dt_b = take(in, 2 * E), A = take(in, 2 * E * N), D = take(in, 2 * E);
  std::fclose(in);

  visionmamba::conv::ConvParams<float> p;
  p.x = x.data();
  p.sx_b = L * E;
  p.sx_t = E;
  p.w = conv_w.data();
  p.bias = conv_b.data();
  p.batch = batch;
  p.L = L;
  p.E = E;
  p.K = K;
  std::vector<float> u(static_cast<size_t>(2 * batch * L * E));
#pragma omp parallel for
  for (int64_t row = 0; row < 2 * batch * L; ++row) {
    const int64_t dir = row / (batch * L), b = (row / L) % batch, t = row % L;
    visionmamba::conv::conv_silu_row(p, dir, b, t, u.data() + row * E, u.data() + row * E);
  }

  std::vector<float> xproj(static_cast<size_t>(2 * batch * L * C));
  for (int64_t row = 0; row < 2 * batch * L; ++row) {
    const int64_t dir = row / (batch * L);
    for (int64_t c = 0; c < C; ++c) {
      double acc = 0;
      for (int64_t e = 0; e < E; ++e) acc += double(u[row * E + e]) * xproj_w[(dir * C + c) * E + e];
      xproj[row * C + c] = static_cast<float>(acc);
    }
  }

  visionmamba::lanes::BiScanInputs<float> inputs;
  inputs.u = u.data();
  inputs.x_proj_out = xproj.data();
  inputs.dt_weight = dt_w.data();
  inputs.A = A.data();
  inputs.D = D.data();
  inputs.z = z.data();
  inputs.bias = dt_b.data();
  inputs.batch = batch;
  inputs.L = L;
  inputs.E = E;
  inputs.N = N;
  inputs.R = R;
  std::vector<float> out(static_cast<size_t>(batch * L * E));
  const auto weights = visionmamba::lanes::lane_weights(inputs);
  const auto args = visionmamba::lanes::contiguous_args(inputs, weights, out.data());
  const int64_t tasks = visionmamba::lanes::bi_forward_tasks(args);
#pragma omp parallel
  {
    std::vector<float> h(static_cast<size_t>(visionmamba::lanes::bi_forward_scratch(args)));
#pragma omp for
    for (int64_t task = 0; task < tasks; ++task) visionmamba::lanes::bi_forward_task(args, task, h.data());
  }

  std::FILE* result = std::fopen(argv[2], "wb");
  if (result == nullptr || std::fwrite(out.data(), sizeof(float), out.size(), result) != out.size()) return 2;
  std::fclose(result);
  return 0;
}
