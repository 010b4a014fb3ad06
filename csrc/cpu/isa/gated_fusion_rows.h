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

// Gates of the present modalities into g (exactly 0 for non-participants); false if none is present.
template <int W>
inline bool gf_gates(const GatedFusionRows& a, long long n, long long h, typename Vec<W>::F* g) {
  typedef typename Vec<W>::F F;
  const float ninf = -__builtin_inff();
  const F vninf = Vec<W>::splat(ninf).v, zero = Vec<W>::splat(0.0f).v;
  F mx = vninf;
  bool any = false;
  for (long long m = 0; m < a.M; ++m) {
    if (a.present && !a.present[m * a.N + n]) {
      g[m] = vninf;
      continue;
    }
    any = true;
    g[m] = GfChunk<W>::load(a.l + (m * a.N + n) * a.H, h, a.H, ninf);
    mx = vmax<W>(mx, g[m]);
  }
  if (!any) return false;
  F den = zero;
  for (long long m = 0; m < a.M; ++m) {
    const F e = g[m] == vninf ? zero : vexp<W>(g[m] - mx);
    g[m] = e;
    den += e;
  }
  const F inv = den > zero ? 1.0f / den : zero;
  for (long long m = 0; m < a.M; ++m) g[m] *= inv;
  return true;
}

template <int W>
void gated_fusion_fwd_rows(const GatedFusionRows& a, float* fused, float* gates, long long n0, long long n1) {
  typedef typename Vec<W>::F F;
  const F zero = Vec<W>::splat(0.0f).v;
  F g[kMaxVecModalities];
  for (long long n = n0; n < n1; ++n)
    for (long long h = 0; h < a.H; h += W) {
      F acc = zero;
      if (gf_gates<W>(a, n, h, g)) {
        for (long long m = 0; m < a.M; ++m) {
          if (a.present && !a.present[m * a.N + n]) continue;
          const F x = GfChunk<W>::load(a.f + (m * a.N + n) * a.H, h, a.H, 0.0f);
          const F y = a.act == 0 ? vtanh<W>(x) : x;
          acc += g[m] != zero ? g[m] * y : zero;
        }
      } else {
        for (long long m = 0; m < a.M; ++m) g[m] = zero;
      }
      GfChunk<W>::store(fused + n * a.H, h, a.H, acc);
      if (gates)
        for (long long m = 0; m < a.M; ++m) GfChunk<W>::store(gates + (m * a.N + n) * a.H, h, a.H, g[m]);
    }
}

template <int W>
void gated_fusion_bwd_rows(const GatedFusionRows& a, const float* grad_fused, const float* grad_gates, float* df,
                           float* dl, long long n0, long long n1) {
  typedef typename Vec<W>::F F;
  const F zero = Vec<W>::splat(0.0f).v;
  F g[kMaxVecModalities], y[kMaxVecModalities], dg[kMaxVecModalities];
  for (long long n = n0; n < n1; ++n)
    for (long long h = 0; h < a.H; h += W) {
      const bool any = gf_gates<W>(a, n, h, g);
      const F go = GfChunk<W>::load(grad_fused + n * a.H, h, a.H, 0.0f);
      F s = zero;
      for (long long m = 0; m < a.M; ++m) {
        const bool present = any && !(a.present && !a.present[m * a.N + n]);
        if (!present) {
          g[m] = y[m] = dg[m] = zero;
          continue;
        }
        const F x = GfChunk<W>::load(a.f + (m * a.N + n) * a.H, h, a.H, 0.0f);
        y[m] = a.act == 0 ? vtanh<W>(x) : x;
        dg[m] = go * y[m];
        if (grad_gates) dg[m] += GfChunk<W>::load(grad_gates + (m * a.N + n) * a.H, h, a.H, 0.0f);
        s += g[m] != zero ? g[m] * dg[m] : zero;
      }
      for (long long m = 0; m < a.M; ++m) {
        const typename Vec<W>::I part = g[m] != zero;
        const F dact = a.act == 0 ? 1.0f - y[m] * y[m] : Vec<W>::splat(1.0f).v;
        const F d_f = part ? go * g[m] * dact : zero;
        const F d_l = part ? g[m] * (dg[m] - s) : zero;
        GfChunk<W>::store(df + (m * a.N + n) * a.H, h, a.H, d_f);
        GfChunk<W>::store(dl + (m * a.N + n) * a.H, h, a.H, d_l);
      }
    }
}
