// Branch-free float exp/log for the CPU kernels. std::exp/std::log calls stop GCC from vectorizing a
// loop; these inline forms vectorize (SSE2, or AVX2 + FMA when setup.py enables x86-64-v3).
// Accuracy: about 1 ulp over the ranges used (Cephes polynomials). exp flushes results below
// FLT_MIN to 0 (the probabilities those would be contribute nothing in float32); NaN propagates.
// The double overloads forward to libm, for the float64 path that gradcheck uses. Forced inline: GCC may
// otherwise call them out of line from a loop it vectorizes, and run it scalar.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace xtoken {
namespace cpu_math {

inline float bits_to_float(int32_t i) { return __builtin_bit_cast(float, i); }

inline int32_t float_to_bits(float f) { return __builtin_bit_cast(int32_t, f); }

__attribute__((always_inline)) inline float exp(float x) {
  constexpr float kHi = 88.3762626647949f;
  constexpr float kLo = -87.3365447504019f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float xc = x > kHi ? kHi : x;
  xc = xc < kLo ? kLo : xc;
  const float n = (xc * kLog2e + kRound) - kRound;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r * r + r) + 1.0f;
  const int32_t ni = static_cast<int32_t>(n == n ? n : 0.0f);
  float out = y * bits_to_float((ni + 127) << 23);
  out = x < kLo ? 0.0f : out;
  out = x > kHi ? std::numeric_limits<float>::infinity() : out;
  return x != x ? x : out;
}

__attribute__((always_inline)) inline float log(float x) {
  constexpr float kMinNormal = 1.17549435e-38f;
  const bool denormal = x < kMinNormal;
  const float xs = denormal ? x * 8388608.0f : x;  // scale denormals by 2^23
  const int32_t bits = float_to_bits(xs);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126) - (denormal ? 23.0f : 0.0f);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  float out = (m + y) + e * 0.693359375f;
  out = x == 0.0f ? -std::numeric_limits<float>::infinity() : out;
  out = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : out;
  out = x == std::numeric_limits<float>::infinity() ? x : out;
  return x != x ? x : out;
}

inline double exp(double x) { return std::exp(x); }
inline double log(double x) { return std::log(x); }

// Element conversions between the logits' dtype T and the accumulation type A that the vectorizer can
// see through (c10's own conversions go through branches and calls, which keep bf16/fp16 loops scalar).
template <typename A, typename T>
inline A load(T x) {
  return static_cast<A>(x);
}

template <>
inline float load<float, c10::BFloat16>(c10::BFloat16 x) {
  return bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(x.x) << 16));
}

// IEEE half -> float with integer operations only (normals, subnormals, inf and NaN).
template <>
inline float load<float, c10::Half>(c10::Half x) {
  const uint32_t h = x.x;
  const uint32_t shifted = (h & 0x7fffu) << 13;  // exponent and mantissa in float position
  const uint32_t exponent = shifted & 0x0f800000u;
  uint32_t bits = shifted + ((127u - 15u) << 23);
  bits = exponent == 0x0f800000u ? bits + ((128u - 16u) << 23) : bits;  // inf, NaN
  // Subnormal or zero: let the FPU normalize it.
  const float subnormal = bits_to_float(static_cast<int32_t>(bits + (1u << 23))) - bits_to_float(113 << 23);
  bits = exponent == 0 ? static_cast<uint32_t>(float_to_bits(subnormal)) : bits;
  return bits_to_float(static_cast<int32_t>(bits | ((h & 0x8000u) << 16)));
}

template <typename T, typename A>
inline T store(A x) {
  return static_cast<T>(x);
}

template <>
inline c10::BFloat16 store<c10::BFloat16, float>(float x) {  // round to nearest even, NaN stays NaN
  const uint32_t u = static_cast<uint32_t>(float_to_bits(x));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}

// float -> IEEE half, rounding to nearest even (overflow to inf, NaN stays NaN), integer operations only.
template <>
inline c10::Half store<c10::Half, float>(float x) {
  const uint32_t all = static_cast<uint32_t>(float_to_bits(x));
  const uint32_t sign = all & 0x80000000u;
  const uint32_t f = all ^ sign;
  // Subnormal results: add a magic number so the FPU rounds the mantissa into place.
  const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t subnormal =
      static_cast<uint32_t>(float_to_bits(bits_to_float(static_cast<int32_t>(f)) + bits_to_float(static_cast<int32_t>(magic)))) -
      magic;
  const uint32_t normal = (f + ((15u - 127u) << 23) + 0xfffu + ((f >> 13) & 1u)) >> 13;
  uint32_t h = f < (113u << 23) ? subnormal : normal;
  h = f >= ((127u + 16u) << 23) ? (f > 0x7f800000u ? 0x7e00u : 0x7c00u) : h;
  return c10::Half(static_cast<uint16_t>(h | (sign >> 16)), c10::Half::from_bits());
}

}  // namespace cpu_math
}  // namespace xtoken
