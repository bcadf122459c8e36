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
#endif

}  // namespace visionmamba
