// The scan one (batch, channel) row at a time: the one-direction forward and backward of the custom op.
//
// Forward: one task per (batch, channel), a sequential walk over the sequence with the N states in a
// SIMD-friendly inner loop. Backward: one task per (batch, block of channels); it recomputes the states of
// one row into a private L x N buffer and walks back through the sequence, so no (batch, E, L, N) tensor
// is ever stored. dB and dC, summed over channels, go to per-block partial buffers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "scan_math.h"
#include "selective_scan.h"

namespace visionmamba {
namespace {

constexpr int64_t kBackwardChannels = 32;  // channels per backward task (one dB/dC partial buffer each)

// delta_t = softplus(raw_t + bias) (threshold 20), in a loop the compiler vectorises.
template <typename T>
inline void deltas(const Row<T>& r, T* out) {
#pragma omp simd
  for (int64_t t = 0; t < r.L; ++t) {
    const T x = r.delta[t * r.sd] + r.bias;
    out[t] = r.softplus ? softplus20(x) : x;
  }
}

template <typename T>
inline void sigmoids(const T* x, int64_t sx, T shift, T* out, int64_t L) {
#pragma omp simd
  for (int64_t t = 0; t < L; ++t) out[t] = sigmoid(x[t * sx] + shift);
}

// y_t = (<h_t, C_t> + D u_t) * silu(z_t), written to y[t * sy]; h, dts, sig: N, L, L values.
template <typename T>
void row_forward(const Row<T>& r, T* y, int64_t sy, T* __restrict h, T* __restrict dts, T* __restrict sig) {
  deltas(r, dts);
  if (r.z) sigmoids(r.z, r.sz, T(0), sig, r.L);
  std::fill(h, h + r.N, T(0));
  const T* __restrict A = r.A;  // locals: stores to h cannot alias them, so the n-loop vectorises
  for (int64_t t = 0; t < r.L; ++t) {
    const T d = dts[t], ut = r.u[t * r.su], du = d * ut;
    const T* __restrict Bn = r.B + t * r.sbc;
    const T* __restrict Cn = r.C + t * r.sbc;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < r.N; ++n) {
      const T hn = vexp(d * A[n]) * h[n] + du * Bn[n];
      h[n] = hn;
      acc += Cn[n] * hn;
    }
    acc += r.D * ut;
    if (r.z) acc *= r.z[t * r.sz] * sig[t];
    y[t * sy] = acc;
  }
}

// The states, recomputed: H[t] holds h after step t, Ad[t] the decays exp(delta A) of step t (kept, not
// recomputed in the walk back) and ys[t] the pre-gate output <h, C> + D u that the z gradient needs.
template <typename T>
void recompute_states(const Row<T>& r, RowScratch<T>& s) {
  const T* __restrict A = r.A;
  for (int64_t t = 0; t < r.L; ++t) {
    const T d = s.dts[t], ut = r.u[t * r.su], dux = d * ut;
    const T* __restrict Bn = r.B + t * r.sbc;
    const T* __restrict Cn = r.C + t * r.sbc;
    T* __restrict cur = s.H.data() + t * r.N;
    T* __restrict a = s.Ad.data() + t * r.N;
    const T* __restrict prev = t > 0 ? s.H.data() + (t - 1) * r.N : s.zeros.data();
    T y = 0;
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < r.N; ++n) {
      a[n] = vexp(d * A[n]);
      cur[n] = a[n] * prev[n] + dux * Bn[n];
      y += Cn[n] * cur[n];
    }
    s.ys[t] = y + r.D * ut;
  }
}

// Gradients of one row (see RowGrads): the adjoint walk g = dL/dh through h_t = a_t h_{t-1} + delta u B.
template <typename T>
void row_backward(const Row<T>& r, const RowGrads<T>& o, RowScratch<T>& s) {
  const T* __restrict A = r.A;
  deltas(r, s.dts.data());
  if (r.z) sigmoids(r.z, r.sz, T(0), s.zsig.data(), r.L);
  if (r.softplus) sigmoids(r.delta, r.sd, r.bias, s.dsoftplus.data(), r.L);
  recompute_states(r, s);
  T* __restrict g = s.g.data();
  std::fill(g, g + r.N, T(0));
  std::fill(o.dA, o.dA + r.N, T(0));
  T accD = 0, accb = 0;
  for (int64_t t = r.L - 1; t >= 0; --t) {
    const T d = s.dts[t], ut = r.u[t * r.su];
    const T* __restrict Bn = r.B + t * r.sbc;
    const T* __restrict Cn = r.C + t * r.sbc;
    const T* __restrict cur = s.H.data() + t * r.N;
    const T* __restrict prev = t > 0 ? s.H.data() + (t - 1) * r.N : s.zeros.data();
    T dy = o.dout[t * o.so];
    if (r.z) {
      const T zt = r.z[t * r.sz], sg = s.zsig[t], y = s.ys[t];
      const T dzt = dy * y * sg * (T(1) + zt * (T(1) - sg));
      o.dz[t * o.sdz] = dzt;
      dy *= zt * sg;
    }
    T* __restrict dBn = o.dB + t * o.sdbc;
    T* __restrict dCn = o.dC + t * o.sdbc;
    T* __restrict dA = o.dA;
    T dd = 0, duu = 0;
    const T* __restrict decay = s.Ad.data() + t * r.N;
#pragma omp simd reduction(+ : dd, duu)
    for (int64_t n = 0; n < r.N; ++n) {
      const T a = decay[n];
      const T hprev = prev[n];
      const T gn = g[n] + dy * Cn[n];
      dCn[n] += dy * cur[n];
      dBn[n] += gn * d * ut;
      dd += gn * (A[n] * a * hprev + ut * Bn[n]);
      duu += gn * Bn[n];
      dA[n] += gn * d * a * hprev;
      g[n] = gn * a;
    }
    if (r.softplus && r.delta[t * r.sd] + r.bias <= T(20)) dd *= s.dsoftplus[t];
    o.ddelta[t * o.sdd] = dd;
    o.du[t * o.sdu] = duu * d + dy * r.D;
    accD += dy * ut;
    accb += dd;
  }
  *o.dD = accD;
  *o.dbias = accb;
}

template <typename T>
const T* optional_ptr(const at::Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

// Row (b, e) of the one-direction layout (see selective_scan.h).
template <typename T>
Row<T> single_row(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& BC,
                  const at::Tensor& D, const at::Tensor& z, bool softplus, int64_t be) {
  const int64_t E = u.size(1), L = u.size(2), N = A.size(1), b = be / E, e = be % E;
  const T *pD = optional_ptr<T>(D), *pz = optional_ptr<T>(z);
  const T* bc = BC.data_ptr<T>() + b * L * 2 * N;
  Row<T> r;
  r.u = u.data_ptr<T>() + be * L;
  r.su = 1;
  r.delta = delta.data_ptr<T>() + be * L;
  r.sd = 1;
  r.B = bc;
  r.C = bc + N;
  r.sbc = 2 * N;
  r.z = pz ? pz + be * L : nullptr;
  r.sz = 1;
  r.A = A.data_ptr<T>() + e * N;
  r.D = pD ? pD[e] : T(0);
  r.bias = T(0);
  r.L = L;
  r.N = N;
  r.softplus = softplus;
  return r;
}

}  // namespace

at::Tensor scan_forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& BC,
                        const at::Tensor& D, const at::Tensor& z, bool softplus) {
  auto y = at::empty_like(u);
  const int64_t rows = u.size(0) * u.size(1), L = u.size(2), N = A.size(1);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_scan_forward", [&] {
    using T = scalar_t;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> h(N), dts(L), sig(L);
      for (int64_t be = begin; be < end; ++be) {
        const Row<T> r = single_row<T>(u, delta, A, BC, D, z, softplus, be);
        row_forward(r, y.data_ptr<T>() + be * L, 1, h.data(), dts.data(), sig.data());
      }
    });
  });
  return y;
}

std::vector<at::Tensor> scan_backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& BC, const at::Tensor& D, const at::Tensor& z, bool softplus,
                                      const at::Tensor& dout) {
  const int64_t batch = u.size(0), E = u.size(1), L = u.size(2), N = A.size(1);
  const int64_t blocks = (E + kBackwardChannels - 1) / kBackwardChannels;
  auto du = at::empty_like(u), ddelta = at::empty_like(u);
  auto dz = z.numel() ? at::empty_like(u) : at::empty({0}, u.options());
  auto dA_part = at::empty({batch, E, N}, u.options());
  auto dD_part = at::empty({batch, E}, u.options()), dbias_part = at::empty({batch, E}, u.options());
  auto dBC_part = at::zeros({batch, blocks, L, 2 * N}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "visionmamba_scan_backward", [&] {
    using T = scalar_t;
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
      RowScratch<T> scratch(L, N);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, k = task % blocks;
        T* dbc = dBC_part.data_ptr<T>() + task * L * 2 * N;
        for (int64_t e = k * kBackwardChannels; e < std::min(E, (k + 1) * kBackwardChannels); ++e) {
          const int64_t be = b * E + e;
          RowGrads<T> grads;
          grads.dout = dout.data_ptr<T>() + be * L;
          grads.so = 1;
          grads.du = du.data_ptr<T>() + be * L;
          grads.sdu = 1;
          grads.ddelta = ddelta.data_ptr<T>() + be * L;
          grads.sdd = 1;
          grads.dz = z.numel() ? dz.data_ptr<T>() + be * L : nullptr;
          grads.sdz = 1;
          grads.dB = dbc;
          grads.dC = dbc + N;
          grads.sdbc = 2 * N;
          grads.dA = dA_part.data_ptr<T>() + be * N;
          grads.dD = dD_part.data_ptr<T>() + be;
          grads.dbias = dbias_part.data_ptr<T>() + be;
          row_backward(single_row<T>(u, delta, A, BC, D, z, softplus, be), grads, scratch);
        }
      }
    });
  });
  return {du, ddelta, dz, dA_part, dBC_part, dD_part, dbias_part};
}

}  // namespace visionmamba
