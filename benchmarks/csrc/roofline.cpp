// The machine's own limit for the selective scan's irreducible work per state element, for the roofline of
// benchmarks/bench_scan.py: built with the kernels' compiler and flags, with their exp (the AVX-512 exp2 where
// the kernels use it, the portable vexp otherwise), on values that stay in registers (no memory traffic).
//
// Per state element and step, the forward does one multiply (delta A), one exp and two multiply-adds
// (h = a h + delta u B; y += C h); the backward one multiply and one exp (a, recomputed), and five multiply-adds
// (h recomputed, dh = a dh + C dy, and the gradient sums of A, B and C) plus one multiply (C dy).
// Each thread runs kChains independent chains of 16 lanes so that the latency of one chain is hidden by the
// others, as the kernels' 16 states per lane block are. delta changes every step (d = 0.99999 d + 1e-6).
#include <cstdint>

#include "scan_math.h"

namespace {

constexpr int kChains = 8;
constexpr int kLanes = 16;

template <bool BACKWARD>
double run_thread(int64_t steps, int seed) {
  alignas(64) float d[kLanes], b[kLanes], c[kLanes];
  alignas(64) float A[kChains][kLanes], h[kChains][kLanes], dh[kChains][kLanes], acc[kChains][kLanes],
      gA[kChains][kLanes], gB[kChains][kLanes];
  for (int e = 0; e < kLanes; ++e) {
    d[e] = 0.01f * (1 + (e + seed) % 7);
    b[e] = 0.5f + 0.01f * e;
    c[e] = 0.25f - 0.01f * e;
  }
  for (int k = 0; k < kChains; ++k)
    for (int e = 0; e < kLanes; ++e) {
      A[k][e] = -1.0f - 0.125f * k;
      h[k][e] = dh[k][e] = acc[k][e] = gA[k][e] = gB[k][e] = 0.0f;
    }
  for (int64_t t = 0; t < steps; ++t) {
    // delta changes every step, as the kernels' does (one add per 16 lanes, shared by the chains): the exps
    // cannot be hoisted out of the loop
#pragma omp simd
    for (int e = 0; e < kLanes; ++e) d[e] = d[e] * 0.99999f + 1e-6f;
#ifdef VM_AVX512
    const __m512 vd = _mm512_load_ps(d), vb = _mm512_load_ps(b), vc = _mm512_load_ps(c);
    for (int k = 0; k < kChains; ++k) {
      // A log2(e) is folded into A: the same instruction count as the kernel's states_avx512
      const __m512 a = visionmamba::exp2_avx512(_mm512_mul_ps(vd, _mm512_load_ps(A[k])));
      const __m512 hv = _mm512_fmadd_ps(a, _mm512_load_ps(h[k]), vb);
      _mm512_store_ps(h[k], hv);
      if (BACKWARD) {
        const __m512 dhv = _mm512_fmadd_ps(a, _mm512_load_ps(dh[k]), _mm512_mul_ps(vc, vd));
        _mm512_store_ps(dh[k], dhv);
        _mm512_store_ps(gA[k], _mm512_fmadd_ps(dhv, hv, _mm512_load_ps(gA[k])));
        _mm512_store_ps(gB[k], _mm512_fmadd_ps(dhv, vb, _mm512_load_ps(gB[k])));
        _mm512_store_ps(acc[k], _mm512_fmadd_ps(hv, vd, _mm512_load_ps(acc[k])));
      } else {
        _mm512_store_ps(acc[k], _mm512_fmadd_ps(vc, hv, _mm512_load_ps(acc[k])));
      }
    }
#else
    for (int k = 0; k < kChains; ++k) {
#pragma omp simd
      for (int e = 0; e < kLanes; ++e) {
        const float a = visionmamba::vexp(d[e] * A[k][e]);
        const float hv = a * h[k][e] + b[e];
        h[k][e] = hv;
        if (BACKWARD) {
          const float dhv = a * dh[k][e] + c[e] * d[e];
          dh[k][e] = dhv;
          gA[k][e] += dhv * hv;
          gB[k][e] += dhv * b[e];
          acc[k][e] += hv * d[e];
        } else {
          acc[k][e] += c[e] * hv;
        }
      }
    }
#endif
  }
  double sum = 0;
  for (int k = 0; k < kChains; ++k)
    for (int e = 0; e < kLanes; ++e) sum += double(acc[k][e]) + double(gA[k][e]) + double(gB[k][e]);
  return sum;
}

}  // namespace

extern "C" {

// Runs `threads` threads of `steps` steps each; returns the sum of their results (a checksum the optimiser
// cannot drop) and writes the state elements processed to *elements.
double roofline_run(int backward, int64_t steps, int threads, int64_t* elements) {
  double total = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static, 1)
  for (int i = 0; i < threads; ++i) total += backward ? run_thread<true>(steps, i) : run_thread<false>(steps, i);
  *elements = static_cast<int64_t>(threads) * steps * kChains * kLanes;
  return total;
}

int roofline_avx512() {
#ifdef VM_AVX512
  return 1;
#else
  return 0;
#endif
}
}
