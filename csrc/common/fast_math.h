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
// tanh(x) = x P(x^2) / Q(x^2) for |x| <= kTanhClamp, P(0) = Q(0) = 1 (so tanh(x) = x to rounding near 0),
// +-1 beyond: 9 multiply-adds and a divide, about half the operations of exp(-2|x|) and (1 - e) / (1 + e)
// (1.3 against 1.8 ns a value in 8-wide vectors on a Zen 1 core, scratch loop). The coefficients
// minimise the relative error of the rational over [0, 9] (Lawson-weighted linearised least squares,
// fitted in double by scripts/fit_tanh_coefficients.py; 6e-8 before float rounding). Above 9, tanh rounds to 1
// in float.
constexpr float kTanhClamp = 9.0f;
constexpr float kTanhP1 = 0.12922502f, kTanhP2 = 0.0029241345f, kTanhP3 = 9.295425e-06f, kTanhP4 = -1.2854191e-08f,
                kTanhP5 = 1.8418746e-11f;
constexpr float kTanhQ1 = 0.46255803f, kTanhQ2 = 0.023777368f, kTanhQ3 = 0.00022854746f;
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

// Max relative error 3.7e-7 (6 ulp, near saturation), as the exp-based form it replaced; a NaN stays NaN
// (the clamp and the cap compare so that NaN fails them), tanh(-0) = -0.
inline float fast_tanhf(float x) {
  using namespace fast_math;
  float ax = x < 0.0f ? -x : x;
  ax = ax > kTanhClamp ? kTanhClamp : ax;
  const float s = ax * ax;
  float p = kTanhP5;
  p = p * s + kTanhP4;
  p = p * s + kTanhP3;
  p = p * s + kTanhP2;
  p = p * s + kTanhP1;
  p = p * s + 1.0f;
  float q = kTanhQ3;
  q = q * s + kTanhQ2;
  q = q * s + kTanhQ1;
  q = q * s + 1.0f;
  float t = ax * p / q;
  t = t > 1.0f ? 1.0f : t;
  return x < 0.0f ? -t : t;
}

inline double fast_tanh(double x) { return __builtin_tanh(x); }
inline float fast_tanh(float x) { return fast_tanhf(x); }

}  // namespace mmkernels
