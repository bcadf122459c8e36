// Scalar math shared by the CPU scan kernels, written so that GCC vectorises the loops around it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define VM_AVX512 1
#endif

namespace visionmamba {

// exp for float: Cody-Waite reduction and a degree-6 polynomial (max relative error 3e-7 on [-87, 0],
// measured against double exp), inlined so that the scan's lane loops vectorise without a libm call.
// Arguments are clamped to [-87, 88] (exp(-87) ~ 1.6e-38 stands for the underflowed values).
static inline float vexp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;  // ln 2 split in two (Cody-Waite) so that r is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Doubles (the float64 test oracle path) use the standard exp unchanged.
static inline double vexp(double x) { return std::exp(x); }

// The helpers take values, not references: std::max/min on an array element's reference keeps GCC from
// vectorising the exp in the loop around them.
template <typename T>
static inline T sigmoid(T v) {
  const T c = v > T(-80) ? v : T(-80);
  return T(1) / (T(1) + vexp(-c));
}

// softplus with the official threshold: x itself above 20.
template <typename T>
static inline T softplus20(T x) {
  return x > T(20) ? x : std::log(T(1) + vexp(x < T(20) ? x : T(20)));
}

// bfloat16 storage: the upper half of a float32's bits (c10::BFloat16's layout). CPU bf16 inference keeps its
// activations so and computes in float32; widen and narrow are plain bit operations, so the loops around
// them still vectorise.
struct bf16 {
  uint16_t bits;
};

static inline float widen(float v) { return v; }
static inline double widen(double v) { return v; }
static inline float widen(bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// v in the storage type S: itself, or bf16 rounded to nearest even (NaN stays a quiet NaN).
template <typename S>
static inline S narrow(float v);
template <>
inline float narrow<float>(float v) {
  return v;
}
template <>
inline bf16 narrow<bf16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t rounded = bits + 0x7FFFu + ((bits >> 16) & 1u);
  return bf16{static_cast<uint16_t>(nan ? 0x7FC0u : rounded >> 16)};
}
template <typename S>
static inline S narrow(double v) {
  return v;
}

#ifdef VM_AVX512
// 2^x for 16 floats: f = x - floor(x) (vreduceps), a degree-5 polynomial for 2^f on [0, 1) (max relative
// error 1.6e-7 in float32 evaluation), then vscalefps multiplies by 2^floor(x), underflowing gradually to 0
// (no clamp needed): 8 instructions per 16 exps. exp(y) is exp2_avx512(y log2 e).
static inline __m512 exp2_avx512(__m512 x) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(0.0018775670323520899f), f, _mm512_set1_ps(0.0089893406257033348f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.055826339870691299f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.24015359580516815f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.69315308332443237f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.99999994039535522f));
  return _mm512_scalef_ps(q, x);
}

// 1 / d for 16 floats: the 14-bit estimate and one Newton step (relative error ~1e-8, against a division's
// throughput of one per ~16 cycles).
static inline __m512 reciprocal_avx512(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

// sigmoid() above for 16 floats: 1 / (1 + exp(-x)), x clamped at -80.
static inline __m512 sigmoid_avx512(__m512 x) {
  const __m512 c = _mm512_max_ps(x, _mm512_set1_ps(-80.0f));
  return reciprocal_avx512(
      _mm512_add_ps(_mm512_set1_ps(1.0f), exp2_avx512(_mm512_mul_ps(c, _mm512_set1_ps(-1.4426950408889634f)))));
}

// log(1 + t) for 16 floats t in [0, 1]: 1 + t = m 2^k with m in (0.75, 1.5] (f = m - 1 exact: t itself, or
// (t - 1) / 2), then log(1 + f) = f - f^2 / 2 + f^3 P(f), P of degree 7 fitted on [-0.25, 0.5] (max relative
// error 1.3e-7 in float32 evaluation).
static inline __m512 log1p_unit_avx512(__m512 t) {
  const __mmask16 half = _mm512_cmp_ps_mask(t, _mm512_set1_ps(0.5f), _CMP_GT_OQ);
  const __m512 f = _mm512_mask_mul_ps(t, half, _mm512_sub_ps(t, _mm512_set1_ps(1.0f)), _mm512_set1_ps(0.5f));
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(-0.0527724027633667f), f, _mm512_set1_ps(0.11013726145029068f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(-0.1307515799999237f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.14371420443058014f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(-0.16647551953792572f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.1999714970588684f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(-0.25000178813934326f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.33333346247673035f));
  const __m512 f2 = _mm512_mul_ps(f, f);
  const __m512 r = _mm512_fmadd_ps(_mm512_mul_ps(f2, f), q, _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), f2, f));
  return _mm512_mask_add_ps(r, half, r, _mm512_set1_ps(0.69314718055994531f));
}

// softplus for 16 floats as max(x, 0) + log(1 + exp(-|x|)): equal to softplus20() (above 20 the log term is
// below half an ulp of x); also returns exp(-|x|), from which the caller can form sigmoid(x).
static inline __m512 softplus_avx512(__m512 x, __m512& t) {
  const __m512 ax = _mm512_abs_ps(x);
  t = exp2_avx512(_mm512_mul_ps(ax, _mm512_set1_ps(-1.4426950408889634f)));
  return _mm512_add_ps(_mm512_max_ps(x, _mm512_setzero_ps()), log1p_unit_avx512(t));
}

// 16 values of storage type S as floats, and back (bf16 rounded to nearest even, NaN kept quiet).
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const bf16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void store16(bf16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
#endif

}  // namespace visionmamba
