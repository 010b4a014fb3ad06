// fp32 gated fusion over positions [n0, n1) with explicit vectors of W floats (see vec.h); the
// row kernels of csrc/cpu/gated_fusion.cpp, with the same semantics: softmax over the present
// modalities of the logits, a -inf logit (or an absent modality) takes no part, a gate of exactly
// 0 is selected out rather than multiplied (a NaN feature of a non-participant never reaches the
// result or the gradients). Included by isa_*.cpp inside their namespace, after vec.h.
#pragma once

using ::mmkernels::cpu::GatedFusionRows;
using ::mmkernels::cpu::kMaxVecModalities;

template <int W>
struct GfChunk {
  typedef typename Vec<W>::F F;
  // Logits and features of position n, columns [h, h + W), read through a padded copy for the
  // tail (padding: logit -inf, feature 0).
  static F load(const float* p, long long h, long long H, float pad) {
    if (h + W <= H) return Vec<W>::load(p + h).v;
    float buf[W];
    for (int i = 0; i < W; ++i) buf[i] = h + i < H ? p[h + i] : pad;
    return Vec<W>::load(buf).v;
  }
  static void store(float* p, long long h, long long H, F x) {
    if (h + W <= H) {
      Vec<W> t{x};
      t.store(p + h);
      return;
    }
    float buf[W];
    Vec<W> t{x};
    t.store(buf);
    for (int i = 0; i < W && h + i < H; ++i) p[h + i] = buf[i];
  }
};

// Chunks taken U at a time: every exp and tanh step runs across U independent vectors (see
// vexp_nonpositive_n), then the rest of a row one at a time.
constexpr int kGfChunks = 4;

// Gates of the present modalities, chunks [h, h + U W), into g[m] (exactly 0 for non-participants);
// false if none is present.
template <int W, int U>
inline bool gf_gates(const GatedFusionRows& a, long long n, long long h, typename Vec<W>::F (*g)[U]) {
  typedef typename Vec<W>::F F;
  const float ninf = -__builtin_inff();
  const F vninf = Vec<W>::splat(ninf).v, zero = Vec<W>::splat(0.0f).v;
  F mx[U];
  for (int u = 0; u < U; ++u) mx[u] = vninf;
  bool any = false;
  for (long long m = 0; m < a.M; ++m) {
    if (a.present && !a.present[m * a.N + n]) {
      for (int u = 0; u < U; ++u) g[m][u] = vninf;
      continue;
    }
    any = true;
    const float* l = a.l + (m * a.N + n) * a.H;
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      g[m][u] = GfChunk<W>::load(l, h + u * W, a.H, ninf);
      mx[u] = vmax<W>(mx[u], g[m][u]);
    }
  }
  if (!any) return false;
  F den[U];
  for (int u = 0; u < U; ++u) den[u] = zero;
  for (long long m = 0; m < a.M; ++m) {
    F e[U];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) e[u] = g[m][u] - mx[u];
    vexp_nonpositive_n<W, U>(e);
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      g[m][u] = g[m][u] == vninf ? zero : e[u];  // an all -inf lane: -inf - -inf is NaN
      den[u] += g[m][u];
    }
  }
  F inv[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) inv[u] = den[u] > zero ? 1.0f / den[u] : zero;
  for (long long m = 0; m < a.M; ++m)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) g[m][u] *= inv[u];
  return true;
}

template <int W, int U>
inline void gf_fwd_chunks(const GatedFusionRows& a, float* fused, float* gates, long long n, long long h) {
  typedef typename Vec<W>::F F;
  const F zero = Vec<W>::splat(0.0f).v;
  F g[kMaxVecModalities][U], acc[U];
  for (int u = 0; u < U; ++u) acc[u] = zero;
  if (gf_gates<W, U>(a, n, h, g)) {
    for (long long m = 0; m < a.M; ++m) {
      if (a.present && !a.present[m * a.N + n]) continue;
      const float* f = a.f + (m * a.N + n) * a.H;
      F y[U];
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) y[u] = GfChunk<W>::load(f, h + u * W, a.H, 0.0f);
      if (a.act == 0) vtanh_n<W, U>(y);
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) acc[u] += g[m][u] != zero ? g[m][u] * y[u] : zero;
    }
  } else {
    for (long long m = 0; m < a.M; ++m)
      for (int u = 0; u < U; ++u) g[m][u] = zero;
  }
  for (int u = 0; u < U; ++u) GfChunk<W>::store(fused + n * a.H, h + u * W, a.H, acc[u]);
  if (gates)
    for (long long m = 0; m < a.M; ++m)
      for (int u = 0; u < U; ++u) GfChunk<W>::store(gates + (m * a.N + n) * a.H, h + u * W, a.H, g[m][u]);
}

template <int W>
void gated_fusion_fwd_rows(const GatedFusionRows& a, float* fused, float* gates, long long n0, long long n1) {
  for (long long n = n0; n < n1; ++n) {
    long long h = 0;
    for (; h + kGfChunks * W <= a.H; h += kGfChunks * W) gf_fwd_chunks<W, kGfChunks>(a, fused, gates, n, h);
    for (; h < a.H; h += W) gf_fwd_chunks<W, 1>(a, fused, gates, n, h);
  }
}

template <int W, int U>
inline void gf_bwd_chunks(const GatedFusionRows& a, const float* grad_fused, const float* grad_gates, float* df,
                          float* dl, long long n, long long h) {
  typedef typename Vec<W>::F F;
  const F zero = Vec<W>::splat(0.0f).v, one = Vec<W>::splat(1.0f).v;
  F g[kMaxVecModalities][U], y[kMaxVecModalities][U], dg[kMaxVecModalities][U], go[U], s[U];
  const bool any = gf_gates<W, U>(a, n, h, g);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    go[u] = GfChunk<W>::load(grad_fused + n * a.H, h + u * W, a.H, 0.0f);
    s[u] = zero;
  }
  for (long long m = 0; m < a.M; ++m) {
    const bool present = any && !(a.present && !a.present[m * a.N + n]);
    if (!present) {
      for (int u = 0; u < U; ++u) g[m][u] = y[m][u] = dg[m][u] = zero;
      continue;
    }
    const float* f = a.f + (m * a.N + n) * a.H;
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) y[m][u] = GfChunk<W>::load(f, h + u * W, a.H, 0.0f);
    if (a.act == 0) vtanh_n<W, U>(y[m]);
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      dg[m][u] = go[u] * y[m][u];
      if (grad_gates) dg[m][u] += GfChunk<W>::load(grad_gates + (m * a.N + n) * a.H, h + u * W, a.H, 0.0f);
      s[u] += g[m][u] != zero ? g[m][u] * dg[m][u] : zero;
    }
  }
  for (long long m = 0; m < a.M; ++m)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const typename Vec<W>::I part = g[m][u] != zero;
      const F dact = a.act == 0 ? 1.0f - y[m][u] * y[m][u] : one;
      const F d_f = part ? go[u] * g[m][u] * dact : zero;
      const F d_l = part ? g[m][u] * (dg[m][u] - s[u]) : zero;
      GfChunk<W>::store(df + (m * a.N + n) * a.H, h + u * W, a.H, d_f);
      GfChunk<W>::store(dl + (m * a.N + n) * a.H, h + u * W, a.H, d_l);
    }
}

template <int W>
void gated_fusion_bwd_rows(const GatedFusionRows& a, const float* grad_fused, const float* grad_gates, float* df,
                           float* dl, long long n0, long long n1) {
  for (long long n = n0; n < n1; ++n) {
    long long h = 0;
    for (; h + kGfChunks * W <= a.H; h += kGfChunks * W)
      gf_bwd_chunks<W, kGfChunks>(a, grad_fused, grad_gates, df, dl, n, h);
    for (; h < a.H; h += W) gf_bwd_chunks<W, 1>(a, grad_fused, grad_gates, df, dl, n, h);
  }
}
