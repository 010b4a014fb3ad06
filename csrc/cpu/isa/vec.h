// Explicit SIMD vectors for the ISA-specific CPU kernels: GCC/Clang vector extensions of W floats,
// compiled once per ISA level (isa_*.cpp set the target), so a level never depends on what the
// compiler would auto-vectorise. The math is fast_expf/fast_tanhf of csrc/common/fast_math.h,
// lane-wise: the same polynomial, the same results at every level up to FMA contraction.
// Included only after the including file has set its target and opened its namespace; no headers
// (the constants come from csrc/common/fast_math.h, which cpu_isa.h includes before the target).
#pragma once

// Every level's unit defines all three widths' types, though each calls only its own: GCC's note that
// returning a vector wider than the unit's target changes the ABI concerns calls that never happen.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// GCC ignores vector_size on a typedef that depends on a template parameter: one type per width.
template <int W>
struct VecTypes;
// splat spells every lane out: a loop of lane stores compiles to one masked broadcast per lane.
template <>
struct VecTypes<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int I __attribute__((vector_size(16)));
  static F splat(float x) { return F{x, x, x, x}; }
};
template <>
struct VecTypes<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int I __attribute__((vector_size(32)));
  static F splat(float x) { return F{x, x, x, x, x, x, x, x}; }
};
template <>
struct VecTypes<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int I __attribute__((vector_size(64)));
  static F splat(float x) { return F{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
};

template <int W>
struct Vec {
  typedef typename VecTypes<W>::F F;
  typedef typename VecTypes<W>::I I;
  F v;

  static Vec splat(float x) { return Vec{VecTypes<W>::splat(x)}; }
  static Vec load(const float* p) {
    Vec r;
    __builtin_memcpy(&r.v, p, sizeof(F));
    return r;
  }
  void store(float* p) const { __builtin_memcpy(p, &v, sizeof(F)); }
};

template <int W>
inline typename Vec<W>::F vmax(typename Vec<W>::F a, typename Vec<W>::F b) {
  return a > b ? a : b;
}

// exp for x <= 0 (the softmax's scores minus their max or log-sum-exp, gate logits minus their max,
// -2|x| in tanh; -inf too), in 17 operations instead of a clamped range reduction's 24: no upper clamp,
// and x / ln2 rounded by adding 1.5 * 2^23, whose low mantissa bits are then the exponent.
// Exactly 0 below kExpLo. U vectors in place, each step across all of them: U independent chains in
// flight, so a CPU whose scheduler fills up with one chain's waiting operations (Zen 1's) still finds
// ready work (4 at a time: 2-5% off the attention forward there).
template <int W, int U>
inline void vexp_nonpositive_n(typename Vec<W>::F (&x)[U]) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  using namespace ::mmkernels::fast_math;
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23
  F t[U], r[U], p[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    t[u] = x[u] * kLog2e + kShift;
    r[u] = x[u] - (t[u] - kShift) * kLn2Hi;
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) r[u] = r[u] - (t[u] - kShift) * kLn2Lo;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = Vec<W>::splat(kExpP0).v * r[u] + kExpP1;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = p[u] * r[u] + kExpP2;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = p[u] * r[u] + kExpP3;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = p[u] * r[u] + kExpP4;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = p[u] * r[u] + kExpP5;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    p[u] = p[u] * r[u] * r[u] + r[u] + 1.0f;
    I bits;
    __builtin_memcpy(&bits, &t[u], sizeof(F));
    bits = (bits + 127) << 23;
    F scale;
    __builtin_memcpy(&scale, &bits, sizeof(F));
    const I under = x[u] < kExpLo;
    const F res = p[u] * scale;
    x[u] = under ? Vec<W>::splat(0.0f).v : res;
  }
}

template <int W>
inline typename Vec<W>::F vexp_nonpositive(typename Vec<W>::F x) {
  typename Vec<W>::F one[1] = {x};
  vexp_nonpositive_n<W, 1>(one);
  return one[0];
}

// tanh of U vectors in place, each step across all of them (see vexp_nonpositive_n): fast_tanhf's
// rational lane-wise, the sign put back with its bit (tanh(-0) = -0; a NaN stays NaN).
template <int W, int U>
inline void vtanh_n(typename Vec<W>::F (&x)[U]) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  using namespace ::mmkernels::fast_math;
  I sign[U];
  F ax[U], s[U], p[U], q[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    I bits;
    __builtin_memcpy(&bits, &x[u], sizeof(F));
    sign[u] = bits & (int)0x80000000u;
    bits &= 0x7fffffff;
    __builtin_memcpy(&ax[u], &bits, sizeof(F));
    ax[u] = ax[u] > kTanhClamp ? Vec<W>::splat(kTanhClamp).v : ax[u];
    s[u] = ax[u] * ax[u];
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    p[u] = Vec<W>::splat(kTanhP5).v * s[u] + kTanhP4;
    q[u] = Vec<W>::splat(kTanhQ3).v * s[u] + kTanhQ2;
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    p[u] = p[u] * s[u] + kTanhP3;
    q[u] = q[u] * s[u] + kTanhQ1;
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    p[u] = p[u] * s[u] + kTanhP2;
    q[u] = q[u] * s[u] + 1.0f;
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = p[u] * s[u] + kTanhP1;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    p[u] = p[u] * s[u] + 1.0f;
    F t = ax[u] * p[u] / q[u];
    t = t > 1.0f ? Vec<W>::splat(1.0f).v : t;
    I bits;
    __builtin_memcpy(&bits, &t, sizeof(F));
    bits |= sign[u];
    __builtin_memcpy(&x[u], &bits, sizeof(F));
  }
}
