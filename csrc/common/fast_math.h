// Branch-free float exp/tanh written so that GCC/Clang auto-vectorise loops calling them
// (-O3; AVX2/FMA with -march=native). Host only. Max relative error of fast_expf ~2e-7 in
// the normal range; returns exactly 0 for x < -87.3 (including -inf), +inf above 88.7.
#pragma once

#include <cstdint>
#include <cstring>

namespace mmkernels {

inline float fast_expf(float x) {
  const float hi = 88.3762626647949f;
  const float lo = -87.3365447504f;
  const bool under = x < lo;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 (Cody-Waite split).
  float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  // Cephes polynomial for exp(r) on [-ln2/2, ln2/2].
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
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
  float ax = x < 0.0f ? -x : x;
  float e = fast_expf(-2.0f * ax);
  float t = (1.0f - e) / (1.0f + e);
  // Small |x|: odd Taylor series avoids the cancellation in 1 - e.
  float x2 = ax * ax;
  float ts = ax * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * -0.0539682540f)));
  t = ax < 0.0625f ? ts : t;
  return x < 0.0f ? -t : t;
}

inline double fast_tanh(double x) { return __builtin_tanh(x); }
inline float fast_tanh(float x) { return fast_tanhf(x); }

}  // namespace mmkernels
