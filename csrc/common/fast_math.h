// Branch-free float exp/tanh written so that GCC/Clang auto-vectorise loops calling them
// (-O3; AVX2/FMA with -march=native). Host only. Max relative error of fast_expf ~2e-7 in
// the normal range; returns exactly 0 for x < -87.3 (including -inf), +inf above 88.7.
#pragma once

#include <cstdint>
#include <cstring>

namespace mmkernels {

// The constants of fast_expf and fast_tanhf, shared with their vector forms (csrc/cpu/isa/vec.h).
namespace fast_math {
constexpr float kExpHi = 88.3762626647949f;  // above: +inf (clamped here, overflows in the scale)
constexpr float kExpLo = -87.3365447504f;    // below: exactly 0
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;       // ln 2 = kLn2Hi - kLn2Lo (Cody-Waite split)
constexpr float kLn2Lo = -2.12194440e-4f;
// Cephes polynomial for exp(r) on [-ln2/2, ln2/2]: 1 + r + r^2 (((((P0 r + P1) r + P2) r + P3) r + P4) r + P5)
constexpr float kExpP0 = 1.9875691500E-4f, kExpP1 = 1.3981999507E-3f, kExpP2 = 8.3334519073E-3f,
                kExpP3 = 4.1665795894E-2f, kExpP4 = 1.6666665459E-1f, kExpP5 = 5.0000001201E-1f;
// tanh: below kTanhSeries the odd Taylor series x (1 + x^2 (T1 + x^2 (T2 + x^2 T3))) avoids 1 - e's cancellation
constexpr float kTanhSeries = 0.0625f;
constexpr float kTanhT1 = -0.333333333f, kTanhT2 = 0.133333333f, kTanhT3 = -0.0539682540f;
}  // namespace fast_math

inline float fast_expf(float x) {
  using namespace fast_math;
  const bool under = x < kExpLo;
  float xc = x > kExpHi ? kExpHi : x;
  xc = xc < kExpLo ? kExpLo : xc;
  // exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 (Cody-Waite split).
  float n = __builtin_floorf(xc * kLog2e + 0.5f);
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kExpP0;
  p = p * r + kExpP1;
  p = p * r + kExpP2;
  p = p * r + kExpP3;
  p = p * r + kExpP4;
  p = p * r + kExpP5;
  p = p * r * r + r + 1.0f;
  int32_t e = static_cast<int32_t>(n) + 127;
  uint32_t bits = static_cast<uint32_t>(e) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float res = p * scale;
  return under ? 0.0f : res;
}

inline double fast_exp(double x) { return __builtin_exp(x); }
inline float fast_exp(float x) { return fast_expf(x); }

// tanh(x) = sign(x) * (1 - e) / (1 + e), e = exp(-2|x|). Absolute error < 1e-7;
// relative error ~1e-7 near 0 through the series branch.
inline float fast_tanhf(float x) {
  using namespace fast_math;
  float ax = x < 0.0f ? -x : x;
  float e = fast_expf(-2.0f * ax);
  float t = (1.0f - e) / (1.0f + e);
  float x2 = ax * ax;
  float ts = ax * (1.0f + x2 * (kTanhT1 + x2 * (kTanhT2 + x2 * kTanhT3)));
  t = ax < kTanhSeries ? ts : t;
  return x < 0.0f ? -t : t;
}

inline double fast_tanh(double x) { return __builtin_tanh(x); }
inline float fast_tanh(float x) { return fast_tanhf(x); }

}  // namespace mmkernels
