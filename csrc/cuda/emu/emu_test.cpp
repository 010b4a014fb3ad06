// CPU emulation test of the CUDA kernels (no GPU needed): runs the kernel templates through
// emu.h and compares them with a naive double-precision reference of DESIGN.md 2.1 / 2.2, whose
// backward formulas are themselves checked by finite differences.
//   g++ -std=c++20 -O2 -pthread -I/usr/local/cuda/include -Icsrc/cuda/emu \
//       csrc/cuda/emu/emu_test.cpp -o /tmp/emu_test && /tmp/emu_test
#define MMK_CUDA_EMULATE 1
#include "../cuda_common.cuh"
#include "../cross_modal_attention_bwd_kernels.cuh"
#include "../cross_modal_attention_fwd_kernels.cuh"
#include "../gated_fusion_kernels.cuh"

#include <cstdio>
#include <random>
#include <string>
#include <type_traits>

using namespace mmkernels::cuda;

static std::mt19937 rng(1234);
static double urand() { return std::uniform_real_distribution<double>(-1.0, 1.0)(rng); }
static int failures = 0;

template <typename T> T cast_to(double x);
template <> float cast_to<float>(double x) { return (float)x; }
template <> __half cast_to<__half>(double x) { return __float2half((float)x); }
template <> __nv_bfloat16 cast_to<__nv_bfloat16>(double x) { return __float2bfloat16((float)x); }
template <typename T> double cast_from(T x);
template <> double cast_from<float>(float x) { return x; }
template <> double cast_from<__half>(__half x) { return __half2float(x); }
template <> double cast_from<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// A 4-D tensor (d0, d1, d2, d3) stored with arbitrary strides (last dim contiguous).
template <typename T>
struct T4 {
  int64_t n[4];
  int64_t s[4];
  std::vector<T> buf;
  T* data() { return buf.data(); }
  int64_t off(int64_t a, int64_t b, int64_t c, int64_t d) const { return a * s[0] + b * s[1] + c * s[2] + d; }
  double at(int64_t a, int64_t b, int64_t c, int64_t d) const { return cast_from<T>(buf[off(a, b, c, d)]); }
};

// permuted: store as (d0, d2, d1, d3 + pad) to make it non-contiguous.
template <typename T>
T4<T> make4(int64_t a, int64_t b, int64_t c, int64_t d, bool permuted, int pad, bool fill) {
  T4<T> t;
  t.n[0] = a; t.n[1] = b; t.n[2] = c; t.n[3] = d;
  const int64_t dp = d + pad;
  if (permuted) { t.s[3] = 1; t.s[1] = dp; t.s[2] = b * dp; t.s[0] = c * b * dp; }
  else { t.s[3] = 1; t.s[2] = dp; t.s[1] = c * dp; t.s[0] = b * c * dp; }
  t.buf.assign(std::max<int64_t>(1, a * b * c * dp), cast_to<T>(fill ? 0.0 : 777.0));
  if (fill)
    for (int64_t i = 0; i < a; ++i) for (int64_t j = 0; j < b; ++j) for (int64_t k = 0; k < c; ++k) for (int64_t l = 0; l < d; ++l)
      t.buf[t.off(i, j, k, l)] = cast_to<T>(urand());
  return t;
}

struct Case {
  std::string name;
  int B, Lq, Hq, Hkv, D, Dv;
  std::vector<int> Lk;
  bool use_kvl, use_ql, use_bias, use_gate, causal, permuted;
  int pad;
  bool use_mask = false;  // kv_masks: random keys, a masked run of whole tiles, a sample with none
};

struct RefOut {
  std::vector<double> out, out_raw, lse;                    // out (B,Lq,Hq,Dv); lse (B,Hq,Lq)
  std::vector<double> dq;                                   // (B,Lq,Hq,D)
  std::vector<std::vector<double>> dk, dv;                  // (B,Lk,Hkv,D/Dv)
  std::vector<double> dbias, dgate;
};

struct Inputs {
  std::vector<double> q;                      // (B,Lq,Hq,D) dense double copy
  std::vector<std::vector<double>> k, v;      // (B,Lk,Hkv,*)
  std::vector<int64_t> kvl, ql;
  std::vector<std::vector<uint8_t>> mask;     // (M)(B, Lk), 1 = attend
  std::vector<double> bias, gate, gout, glse;
};

static RefOut reference(const Case& c, const Inputs& in, double scale, bool need_grad) {
  const int M = (int)c.Lk.size(), G = c.Hq / c.Hkv;
  RefOut r;
  r.out.assign((size_t)c.B * c.Lq * c.Hq * c.Dv, 0.0);
  r.out_raw = r.out;
  r.lse.assign((size_t)c.B * c.Hq * c.Lq, -INFINITY);
  r.dq.assign((size_t)c.B * c.Lq * c.Hq * c.D, 0.0);
  for (int m = 0; m < M; ++m) {
    r.dk.emplace_back((size_t)c.B * c.Lk[m] * c.Hkv * c.D, 0.0);
    r.dv.emplace_back((size_t)c.B * c.Lk[m] * c.Hkv * c.Dv, 0.0);
  }
  r.dbias.assign((size_t)c.Hq * M, 0.0);
  r.dgate.assign(c.Hq, 0.0);
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hq; ++h) {
      const int hk = h / G;
      const double t = c.use_gate ? std::tanh(in.gate[h]) : 1.0;
      const int64_t qlen = c.use_ql ? std::min<int64_t>(std::max<int64_t>(in.ql[b], 0), c.Lq) : c.Lq;
      for (int i = 0; i < qlen; ++i) {
        struct K { int m, j; double s; };
        std::vector<K> ks;
        for (int m = 0; m < M; ++m) {
          const int64_t kvlen = c.use_kvl ? std::min<int64_t>(std::max<int64_t>(in.kvl[b * M + m], 0), c.Lk[m]) : c.Lk[m];
          for (int j = 0; j < kvlen; ++j) {
            if (c.causal && j > i + kvlen - qlen) continue;
            if (c.use_mask && !in.mask[m][(size_t)b * c.Lk[m] + j]) continue;
            double s = 0;
            for (int d = 0; d < c.D; ++d)
              s += in.q[(((size_t)b * c.Lq + i) * c.Hq + h) * c.D + d] * in.k[m][(((size_t)b * c.Lk[m] + j) * c.Hkv + hk) * c.D + d];
            s = s * scale + (c.use_bias ? in.bias[h * M + m] : 0.0);
            ks.push_back({m, j, s});
          }
        }
        if (ks.empty()) continue;
        double mx = -INFINITY;
        for (auto& e : ks) mx = std::max(mx, e.s);
        double l = 0;
        for (auto& e : ks) l += std::exp(e.s - mx);
        const double lse = mx + std::log(l);
        r.lse[((size_t)b * c.Hq + h) * c.Lq + i] = lse;
        std::vector<double> oraw(c.Dv, 0.0);
        for (auto& e : ks) {
          const double p = std::exp(e.s - lse);
          for (int d = 0; d < c.Dv; ++d) oraw[d] += p * in.v[e.m][(((size_t)b * c.Lk[e.m] + e.j) * c.Hkv + hk) * c.Dv + d];
        }
        const size_t ob = (((size_t)b * c.Lq + i) * c.Hq + h) * c.Dv;
        for (int d = 0; d < c.Dv; ++d) { r.out_raw[ob + d] = oraw[d]; r.out[ob + d] = t * oraw[d]; }
        if (!need_grad) continue;
        // backward
        double Di = 0, godot = 0;
        for (int d = 0; d < c.Dv; ++d) { Di += t * in.gout[ob + d] * oraw[d]; godot += in.gout[ob + d] * oraw[d]; }
        Di -= in.glse[((size_t)b * c.Hq + h) * c.Lq + i];
        r.dgate[h] += (1 - t * t) * godot;
        for (auto& e : ks) {
          const double p = std::exp(e.s - lse);
          const size_t vb = (((size_t)b * c.Lk[e.m] + e.j) * c.Hkv + hk) * c.Dv;
          const size_t kb = (((size_t)b * c.Lk[e.m] + e.j) * c.Hkv + hk) * c.D;
          double dp = 0;
          for (int d = 0; d < c.Dv; ++d) {
            dp += t * in.gout[ob + d] * in.v[e.m][vb + d];
            r.dv[e.m][vb + d] += p * t * in.gout[ob + d];
          }
          const double ds = p * (dp - Di);
          r.dbias[h * M + e.m] += ds;
          const size_t qb = (((size_t)b * c.Lq + i) * c.Hq + h) * c.D;
          for (int d = 0; d < c.D; ++d) {
            r.dq[qb + d] += scale * ds * in.k[e.m][kb + d];
            r.dk[e.m][kb + d] += scale * ds * in.q[qb + d];
          }
        }
      }
    }
  return r;
}

static double loss(const Case& c, const Inputs& in, double scale) {
  RefOut r = reference(c, in, scale, false);
  double L = 0;
  for (size_t i = 0; i < r.out.size(); ++i) L += r.out[i] * in.gout[i];
  for (size_t i = 0; i < r.lse.size(); ++i) if (std::isfinite(r.lse[i])) L += r.lse[i] * in.glse[i];
  return L;
}

static void check(const std::string& what, double got, double want, double tol) {
  if (!(std::fabs(got - want) <= tol * (1 + std::fabs(want)))) {
    if (failures < 40) std::printf("  MISMATCH %s: got %.7g want %.7g\n", what.c_str(), got, want);
    ++failures;
  }
}

// Finite-difference check of the reference backward on a few coordinates.
static void fd_check(const Case& c, Inputs in, double scale) {
  RefOut r = reference(c, in, scale, true);
  const double eps = 1e-6;
  auto fd = [&](double& x) {
    const double x0 = x;
    x = x0 + eps; double lp = loss(c, in, scale);
    x = x0 - eps; double lm = loss(c, in, scale);
    x = x0;
    return (lp - lm) / (2 * eps);
  };
  for (int rep = 0; rep < 3; ++rep) {
    size_t i = rng() % in.q.size();
    check("fd dq", r.dq[i], fd(in.q[i]), 1e-5);
    size_t m = rng() % in.k.size();
    size_t j = 0;
    if (!in.k[m].empty()) {
      j = rng() % in.k[m].size();
      check("fd dk", r.dk[m][j], fd(in.k[m][j]), 1e-5);
      j = rng() % in.v[m].size();
      check("fd dv", r.dv[m][j], fd(in.v[m][j]), 1e-5);
    }
    if (c.use_bias) { j = rng() % in.bias.size(); check("fd dbias", r.dbias[j], fd(in.bias[j]), 1e-5); }
    if (c.use_gate) { j = rng() % in.gate.size(); check("fd dgate", r.dgate[j], fd(in.gate[j]), 1e-5); }
  }
}

template <typename T, int DPAD>
static void run_case(const Case& c, double tol) {
  std::printf("case %s (DPAD %d, %s)\n", c.name.c_str(), DPAD, sizeof(T) == 4 ? "fp32" : "16-bit");
  const int M = (int)c.Lk.size();
  const double scale = 1.0 / std::sqrt((double)c.D);
  T4<T> q = make4<T>(c.B, c.Lq, c.Hq, c.D, c.permuted, c.pad, true);
  std::vector<T4<T>> K, V;
  Inputs in;
  in.q.resize((size_t)c.B * c.Lq * c.Hq * c.D);
  for (int b = 0; b < c.B; ++b) for (int i = 0; i < c.Lq; ++i) for (int h = 0; h < c.Hq; ++h) for (int d = 0; d < c.D; ++d)
    in.q[(((size_t)b * c.Lq + i) * c.Hq + h) * c.D + d] = q.at(b, i, h, d);
  for (int m = 0; m < M; ++m) {
    K.push_back(make4<T>(c.B, c.Lk[m], c.Hkv, c.D, c.permuted && m == 0, c.pad, true));
    V.push_back(make4<T>(c.B, c.Lk[m], c.Hkv, c.Dv, false, m == 1 ? c.pad : 0, true));
    in.k.emplace_back((size_t)c.B * c.Lk[m] * c.Hkv * c.D);
    in.v.emplace_back((size_t)c.B * c.Lk[m] * c.Hkv * c.Dv);
    for (int b = 0; b < c.B; ++b) for (int j = 0; j < c.Lk[m]; ++j) for (int h = 0; h < c.Hkv; ++h) {
      for (int d = 0; d < c.D; ++d) in.k[m][(((size_t)b * c.Lk[m] + j) * c.Hkv + h) * c.D + d] = K[m].at(b, j, h, d);
      for (int d = 0; d < c.Dv; ++d) in.v[m][(((size_t)b * c.Lk[m] + j) * c.Hkv + h) * c.Dv + d] = V[m].at(b, j, h, d);
    }
  }
  for (int b = 0; b < c.B; ++b) {
    for (int m = 0; m < M; ++m) {
      int64_t L = (int64_t)(rng() % (c.Lk[m] + 1));
      if (b == 0 && m == 0) L = c.Lk[m];
      if (b == 1 && m == 0) L = 0;
      if (rng() % 5 == 0) L = c.Lk[m] + 3;  // out of range: clamped
      in.kvl.push_back(L);
    }
    int64_t Lq = (int64_t)(rng() % (c.Lq + 1));
    if (b == 0) Lq = c.Lq;
    in.ql.push_back(Lq);
  }
  for (int m = 0; m < M; ++m) {
    in.mask.emplace_back((size_t)c.B * c.Lk[m]);
    for (int b = 0; b < c.B; ++b)
      for (int j = 0; j < c.Lk[m]; ++j) {
        bool keep = rng() % 10 < 6;
        if (b == 0 && j < 70) keep = false;  // whole key tiles masked out
        if (b == 1 && m == 0) keep = false;  // a segment without any key
        in.mask[m][(size_t)b * c.Lk[m] + j] = keep;
      }
  }
  for (int i = 0; i < c.Hq * M; ++i) in.bias.push_back(urand());
  for (int i = 0; i < c.Hq; ++i) in.gate.push_back(urand());
  in.gout.resize((size_t)c.B * c.Lq * c.Hq * c.Dv);
  for (auto& x : in.gout) x = cast_from<T>(cast_to<T>(urand()));
  in.glse.resize((size_t)c.B * c.Hq * c.Lq);
  for (auto& x : in.glse) x = urand();
  std::vector<float> bias_f(in.bias.begin(), in.bias.end()), gate_f(in.gate.begin(), in.gate.end());
  for (int i = 0; i < (int)gate_f.size(); ++i) in.gate[i] = gate_f[i];
  for (int i = 0; i < (int)bias_f.size(); ++i) in.bias[i] = bias_f[i];

  if (sizeof(T) == 4) fd_check(c, in, scale);
  RefOut ref = reference(c, in, scale, true);

  AttnParams p{};
  for (int m = 0; m < M; ++m) {
    Segment& s = p.seg[m];
    s.k = K[m].data(); s.v = V[m].data();
    s.k_sb = K[m].s[0]; s.k_sl = K[m].s[1]; s.k_sh = K[m].s[2];
    s.v_sb = V[m].s[0]; s.v_sl = V[m].s[1]; s.v_sh = V[m].s[2];
    s.len = c.Lk[m];
    if (c.use_mask) { s.mask = in.mask[m].data(); s.mask_sb = c.Lk[m]; }
    s.vec4 = (c.D % 4 == 0 && c.Dv % 4 == 0 && K[m].s[0] % 4 == 0 && K[m].s[1] % 4 == 0 && K[m].s[2] % 4 == 0 &&
              V[m].s[0] % 4 == 0 && V[m].s[1] % 4 == 0 && V[m].s[2] % 4 == 0);
  }
  p.num_seg = M; p.B = c.B; p.Lq = c.Lq; p.Hq = c.Hq; p.Hkv = c.Hkv; p.D = c.D; p.Dv = c.Dv;
  p.scale = (float)scale; p.scale_log2 = (float)(scale * 1.4426950408889634); p.causal = c.causal;
  p.kv_lengths = c.use_kvl ? in.kvl.data() : nullptr;
  p.q_lengths = c.use_ql ? in.ql.data() : nullptr;
  p.bias = c.use_bias ? bias_f.data() : nullptr;
  p.gate = c.use_gate ? gate_f.data() : nullptr;
  p.q = q.data(); p.q_sb = q.s[0]; p.q_sl = q.s[1]; p.q_sh = q.s[2];
  p.q_vec4 = c.D % 4 == 0 && q.s[0] % 4 == 0 && q.s[1] % 4 == 0 && q.s[2] % 4 == 0;

  // ---- forward
  std::vector<T> out((size_t)c.B * c.Lq * c.Hq * c.Dv, cast_to<T>(555.0)), outu = out;
  std::vector<float> lse((size_t)c.B * c.Hq * c.Lq, 555.f);
  {
    using C = FwdSimtTiles<T, DPAD>;
    dim3 grid((c.Lq + C::BM - 1) / C::BM, c.Hq, c.B);
    T* outp = out.data(); T* outup = c.use_gate ? outu.data() : nullptr; float* lsep = lse.data();
    mmk_emu::launch(grid, dim3(kFwdThreads), C::smem_bytes(),
                    [&] { cross_modal_attention_fwd_kernel<C, T>(p, outp, outup, lsep); });
  }
  if constexpr (!std::is_same_v<T, float> && DPAD <= 128) {  // tensor-core variant: same checks below
    using C = FwdTensorCoreTiles<T, DPAD>;
    std::vector<T> out2(out.size(), cast_to<T>(555.0)), outu2 = out2;
    std::vector<float> lse2(lse.size(), 555.f);
    dim3 grid((c.Lq + C::BM - 1) / C::BM, c.Hq, c.B);
    T* outp = out2.data(); T* outup = c.use_gate ? outu2.data() : nullptr; float* lsep = lse2.data();
    mmk_emu::launch(grid, dim3(kFwdThreads), C::smem_bytes(),
                    [&] { cross_modal_attention_fwd_kernel<C, T>(p, outp, outup, lsep); });
    for (size_t i = 0; i < out.size(); ++i) check("tc out", cast_from<T>(out2[i]), ref.out[i], tol);
    if (c.use_gate)
      for (size_t i = 0; i < out.size(); ++i) check("tc out_ungated", cast_from<T>(outu2[i]), ref.out_raw[i], tol);
    for (size_t i = 0; i < lse.size(); ++i) {
      if (std::isinf(ref.lse[i])) { if (!(std::isinf(lse2[i]) && lse2[i] < 0)) check("tc lse -inf", lse2[i], -1e30, 0); }
      else check("tc lse", lse2[i], ref.lse[i], 1e-5);
    }
    double e_tc = 0, e_simt = 0, e_round = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      e_tc = std::max(e_tc, std::fabs(cast_from<T>(out2[i]) - ref.out[i]));
      e_simt = std::max(e_simt, std::fabs(cast_from<T>(out[i]) - ref.out[i]));
      e_round = std::max(e_round, std::fabs(cast_from<T>(cast_to<T>(ref.out[i])) - ref.out[i]));
    }
    std::printf("  tensor-core fwd checked: max err tc %.3g simt %.3g (rounding the exact result: %.3g)\n", e_tc, e_simt, e_round);
  }
  for (size_t i = 0; i < out.size(); ++i) check("out[" + std::to_string(i) + "]", cast_from<T>(out[i]), ref.out[i], tol);
  if (c.use_gate)
    for (size_t i = 0; i < out.size(); ++i) check("out_ungated", cast_from<T>(outu[i]), ref.out_raw[i], tol);
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(ref.lse[i])) { if (!(std::isinf(lse[i]) && lse[i] < 0)) { check("lse -inf[" + std::to_string(i) + "]", lse[i], -1e30, 0); } }
    else check("lse[" + std::to_string(i) + "]", lse[i], ref.lse[i], tol);
  }

  // ---- backward (kernels fed with the kernel's own forward outputs, like the op)
  std::vector<T> go(in.gout.size());
  for (size_t i = 0; i < go.size(); ++i) go[i] = cast_to<T>(in.gout[i]);
  std::vector<float> glse(in.glse.begin(), in.glse.end());
  std::vector<float> delta(lse.size(), 999.f), rowdot(lse.size(), 999.f);
  const T* oraw = c.use_gate ? outu.data() : out.data();
  {
    const int64_t rows = (int64_t)c.B * c.Lq * c.Hq;
    dim3 grid((unsigned)((rows + 3) / 4));
    const T* gop = go.data(); const float* gl = glse.data(); float* dp = delta.data(); float* rp = rowdot.data();
    if (rows > 0)
      mmk_emu::launch(grid, dim3(kBwdThreads), 0, [&] {
        cross_modal_attention_bwd_pre_kernel<T>(gop, oraw, gl, p.gate, p.q_lengths, c.B, c.Lq, c.Hq, c.Dv, dp, rp);
      });
  }
  constexpr bool TC_OK = !std::is_same_v<T, float> && DPAD <= 128;
  for (int tc = 0; tc < (TC_OK ? 2 : 1); ++tc) {
  std::vector<T4<T>> dK, dV;
    double e_dq = 0, e_dk = 0, e_dv = 0;
  for (int m = 0; m < M; ++m) {
    dK.push_back(make4<T>(c.B, c.Lk[m], c.Hkv, c.D, false, 0, false));
    dV.push_back(make4<T>(c.B, c.Lk[m], c.Hkv, c.Dv, false, 0, false));
    Segment& s = p.seg[m];
    s.dk = dK[m].data(); s.dv = dV[m].data();
    s.dk_sb = dK[m].s[0]; s.dk_sl = dK[m].s[1]; s.dk_sh = dK[m].s[2];
    s.dv_sb = dV[m].s[0]; s.dv_sl = dV[m].s[1]; s.dv_sh = dV[m].s[2];
  }
  const bool go_vec4 = c.Dv % 4 == 0;
  // dK/dV and dQ through the same launcher for either tile policy
  T4<T> dQ = make4<T>(c.B, c.Lq, c.Hq, c.D, true, 1, false);
  std::vector<float> bias_part;
  auto run_bwd = [&](auto dkdv_tiles, auto dq_tiles) {
    using KT = typename decltype(dkdv_tiles)::type;
    using QT = typename decltype(dq_tiles)::type;
    AttnParams pk = p;
    int64_t total = 0;
    for (int m = 0; m < M; ++m) { pk.seg[m].blk_start = total; total += (c.Lk[m] + KT::BN - 1) / KT::BN; }
    const float* lsep = lse.data(); const float* dp = delta.data(); const T* gop = go.data();
    if (total > 0)
      mmk_emu::launch(dim3((unsigned)total, c.Hkv, c.B), dim3(kBwdThreads), KT::smem_bytes(),
                      [&] { cross_modal_attention_bwd_dkdv_kernel<KT, T>(pk, gop, go_vec4, lsep, dp); });
    const int64_t nqb = (c.Lq + QT::BM - 1) / QT::BM;
    bias_part.assign((size_t)c.Hq * M * c.B * nqb, 0.f);
    T* dqp = dQ.data(); float* bp = c.use_bias ? bias_part.data() : nullptr;
    if (nqb > 0)
      mmk_emu::launch(dim3((unsigned)nqb, c.Hq, c.B), dim3(kBwdThreads), QT::smem_bytes(), [&] {
        cross_modal_attention_bwd_dq_kernel<QT, T>(p, gop, go_vec4, lsep, dp, dqp, dQ.s[0], dQ.s[1], dQ.s[2], bp, nqb);
      });
    return nqb;
  };
  int64_t nqb = 0;
  if constexpr (TC_OK) {
    if (tc) nqb = run_bwd(std::type_identity<DkdvTensorCoreTiles<T, DPAD>>(), std::type_identity<DqTensorCoreTiles<T, DPAD>>());
  }
  if (!tc) nqb = run_bwd(std::type_identity<DkdvSimtTiles<T, DPAD>>(), std::type_identity<DqSimtTiles<T, DPAD>>());
  {
    if (c.use_bias)
      for (int hm = 0; hm < c.Hq * M; ++hm) {
        double s = 0;
        for (int64_t x = 0; x < c.B * nqb; ++x) s += bias_part[hm * c.B * nqb + x];
        check("dbias[" + std::to_string(hm) + "]", s, ref.dbias[hm], tol * 4);
      }
  }
  for (int b = 0; b < c.B; ++b) for (int i = 0; i < c.Lq; ++i) for (int h = 0; h < c.Hq; ++h) for (int d = 0; d < c.D; ++d)
  { const double want = ref.dq[(((size_t)b * c.Lq + i) * c.Hq + h) * c.D + d];
    check(tc ? "tc dq" : "dq", dQ.at(b, i, h, d), want, tol * 2); e_dq = std::max(e_dq, std::fabs(dQ.at(b, i, h, d) - want)); }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < c.B; ++b) for (int j = 0; j < c.Lk[m]; ++j) for (int h = 0; h < c.Hkv; ++h) {
      for (int d = 0; d < c.D; ++d)
      { const double want = ref.dk[m][(((size_t)b * c.Lk[m] + j) * c.Hkv + h) * c.D + d];
        check(std::string(tc ? "tc " : "") + "dk m" + std::to_string(m) + " b" + std::to_string(b) + " j" + std::to_string(j), dK[m].at(b, j, h, d), want, tol * 2);
        e_dk = std::max(e_dk, std::fabs(dK[m].at(b, j, h, d) - want)); }
      for (int d = 0; d < c.Dv; ++d)
      { const double want = ref.dv[m][(((size_t)b * c.Lk[m] + j) * c.Hkv + h) * c.Dv + d];
        check(std::string(tc ? "tc " : "") + "dv m" + std::to_string(m) + " b" + std::to_string(b) + " j" + std::to_string(j), dV[m].at(b, j, h, d), want, tol * 2);
        e_dv = std::max(e_dv, std::fabs(dV[m].at(b, j, h, d) - want)); }
    }
    std::printf("  bwd%s max err dq %.3g dk %.3g dv %.3g\n", tc ? " (tensor cores)" : "", e_dq, e_dk, e_dv);
  }
  if (c.use_gate)
    for (int h = 0; h < c.Hq; ++h) {
      double s = 0;
      for (int b = 0; b < c.B; ++b) for (int i = 0; i < c.Lq; ++i) s += rowdot[((size_t)b * c.Hq + h) * c.Lq + i];
      const double t = std::tanh((double)gate_f[h]);
      check("dgate", s * (1 - t * t), ref.dgate[h], tol * 4);
    }
}

// ---------------------------------------------------------------- gated fusion
template <typename T, int V, int MC>
// edges: positions whose present logits are all -inf at some units, and NaN features of
// absent modalities and of -inf logits; neither may reach the results (gives 0, never NaN).
static void run_gf(int M, int N, int H, bool use_present, int act, bool grad_gates, bool edges = false) {
  std::printf("gated fusion M=%d N=%d H=%d V=%d MC=%d present=%d act=%d edges=%d\n", M, N, H, V, MC, use_present, act,
              edges);
  const size_t E = (size_t)M * N * H;
  std::vector<T> f(E), l(E), gg(E), gfz((size_t)N * H);
  std::vector<double> fd(E), ld(E), ggd(E), gfd((size_t)N * H);
  for (size_t i = 0; i < E; ++i) { f[i] = cast_to<T>(2 * urand()); fd[i] = cast_from<T>(f[i]); l[i] = cast_to<T>(3 * urand()); ld[i] = cast_from<T>(l[i]); gg[i] = cast_to<T>(urand()); ggd[i] = cast_from<T>(gg[i]); }
  for (size_t i = 0; i < gfz.size(); ++i) { gfz[i] = cast_to<T>(urand()); gfd[i] = cast_from<T>(gfz[i]); }
  std::vector<uint8_t> pres_u((size_t)M * N);
  for (int n = 0; n < N; ++n) for (int m = 0; m < M; ++m) pres_u[(size_t)m * N + n] = (n % 5 == 0) ? 0 : (rng() % 3 != 0);
  bool pres_b[4096];
  for (size_t i = 0; i < pres_u.size(); ++i) pres_b[i] = pres_u[i];
  const bool* pres = use_present ? pres_b : nullptr;
  if (edges) {
    for (int n = 0; n < N; ++n)
      for (int m = 0; m < M; ++m)
        for (int h = 0; h < H; ++h) {
          const size_t i = ((size_t)m * N + n) * H + h;
          const bool absent = pres && !pres[(size_t)m * N + n];
          if ((n % 3 == 1 && h < 2) || (m == 1 && h == H - 1)) { l[i] = cast_to<T>(-INFINITY); ld[i] = -INFINITY; }
          if (absent || ld[i] == -INFINITY) { f[i] = cast_to<T>(NAN); fd[i] = NAN; }
        }
  }
  std::vector<T> fused((size_t)N * H), gates(E), df(E), dl(E);
  const int64_t chunks = (int64_t)N * H / V;
  dim3 grid((unsigned)std::max<int64_t>(1, std::min<int64_t>(3, (chunks + kGfThreads - 1) / kGfThreads)));
  mmk_emu::launch(grid, dim3(kGfThreads), 0, [&] {
    gf_fwd_kernel<T, V, MC>(f.data(), l.data(), pres, M, N, H, act, fused.data(), gates.data());
  });
  mmk_emu::launch(grid, dim3(kGfThreads), 0, [&] {
    gf_bwd_kernel<T, V, MC>(gfz.data(), grad_gates ? gg.data() : nullptr, f.data(), l.data(), pres, M, N, H, act, df.data(), dl.data());
  });
  const double tol = sizeof(T) == 4 ? 1e-5 : 2e-2;
  for (int n = 0; n < N; ++n)
    for (int h = 0; h < H; ++h) {
      double mx = -INFINITY;
      for (int m = 0; m < M; ++m) if (!pres || pres[(size_t)m * N + n]) mx = std::max(mx, ld[((size_t)m * N + n) * H + h]);
      std::vector<double> g(M, 0.0), a(M, 0.0), dg(M, 0.0);
      double sum = 0;
      for (int m = 0; m < M; ++m) {
        const size_t i = ((size_t)m * N + n) * H + h;
        if ((pres && !pres[(size_t)m * N + n]) || ld[i] == -INFINITY) continue;  // takes no part
        a[m] = act == 0 ? std::tanh(fd[i]) : fd[i];
        dg[m] = gfd[(size_t)n * H + h] * a[m] + (grad_gates ? ggd[i] : 0.0);
        g[m] = std::exp(ld[i] - mx);
        sum += g[m];
      }
      double out = 0, S = 0;
      for (int m = 0; m < M; ++m) { g[m] = sum > 0 ? g[m] / sum : 0.0; out += g[m] * a[m]; S += g[m] * dg[m]; }
      check("fused", cast_from<T>(fused[(size_t)n * H + h]), out, tol);
      for (int m = 0; m < M; ++m) {
        const size_t i = ((size_t)m * N + n) * H + h;
        check("gates", cast_from<T>(gates[i]), g[m], tol);
        check("dl", cast_from<T>(dl[i]), g[m] * (dg[m] - S), tol);
        check("df", cast_from<T>(df[i]), gfd[(size_t)n * H + h] * g[m] * (act == 0 ? 1 - a[m] * a[m] : 1.0), tol);
      }
    }
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  // name, B, Lq, Hq, Hkv, D, Dv, Lk, kvl, ql, bias, gate, causal, permuted, pad
  run_case<float, 64>({"basic M2 GQA pad", 3, 37, 4, 2, 40, 24, {23, 70}, true, true, true, true, false, true, 2}, 1e-4);
  run_case<float, 64>({"vec4 M1 causal", 3, 70, 2, 1, 64, 64, {90}, true, true, false, true, true, false, 0}, 1e-4);
  run_case<float, 64>({"quick mask", 3, 9, 2, 1, 16, 16, {130, 9}, true, true, true, false, false, false, 0, true}, 1e-4);
  if (!quick) {
    run_case<float, 64>({"causal Lq>Lk full", 2, 41, 2, 2, 16, 8, {30}, false, false, true, false, true, false, 0}, 1e-4);
    run_case<float, 128>({"D96 Dv128 M3", 2, 33, 2, 1, 96, 128, {5, 40, 17}, true, true, true, false, false, true, 4}, 1e-4);
    run_case<float, 256>({"D256 M2", 2, 20, 2, 2, 256, 200, {18, 7}, true, false, true, true, false, false, 0}, 1e-4);
    run_case<__half, 64>({"half basic", 2, 19, 2, 1, 32, 32, {13, 9}, true, true, true, true, false, false, 0}, 1e-3);
    run_case<__half, 64>({"half causal tc", 3, 70, 2, 1, 64, 64, {90}, true, true, false, true, true, false, 0}, 1e-3);
    run_case<__nv_bfloat16, 128>({"bf16 D128", 2, 19, 2, 2, 128, 72, {33}, true, true, false, true, false, false, 0}, 8e-3);
    run_case<__nv_bfloat16, 64>({"bf16 causal tc", 2, 70, 2, 1, 64, 48, {100}, true, true, true, false, true, true, 0}, 8e-3);
    run_case<__half, 128>({"half D128 M3 tc", 2, 65, 2, 2, 128, 128, {40, 3, 33}, true, true, true, true, false, false, 0}, 1e-3);
    run_case<float, 64>({"Lq0-ish rows", 2, 1, 1, 1, 8, 8, {1, 0}, true, true, true, true, false, false, 0}, 1e-4);
    // key masks (kv_masks), with lengths, causal, both tile policies
    run_case<float, 64>({"mask M2", 3, 21, 4, 2, 32, 24, {150, 40}, true, true, true, true, false, true, 2, true}, 1e-4);
    run_case<float, 128>({"mask causal D96", 3, 40, 2, 1, 96, 80, {170}, false, true, false, true, true, false, 0, true},
                         1e-4);
    run_case<__half, 64>({"half mask tc", 3, 33, 2, 1, 64, 64, {140, 20}, true, true, true, true, false, false, 0, true},
                         1e-3);
    run_case<__nv_bfloat16, 128>({"bf16 causal mask tc", 3, 70, 2, 2, 128, 128, {150}, false, false, true, false, true,
                                  false, 0, true}, 8e-3);
    // every segment slot up to MAX_SEGMENTS
    run_case<float, 64>({"M5 GQA", 2, 9, 4, 2, 16, 16, {3, 11, 1, 7, 20}, true, true, true, true, false, false, 0}, 1e-4);
    run_case<float, 64>({"M6", 2, 5, 2, 1, 16, 8, {4, 2, 9, 1, 6, 3}, true, true, true, false, false, true, 2}, 1e-4);
    run_case<float, 64>({"M7", 2, 4, 2, 2, 8, 8, {2, 5, 1, 3, 8, 2, 6}, true, false, true, true, false, false, 0}, 1e-4);
    run_case<float, 64>({"M8", 2, 6, 2, 1, 16, 16, {5, 1, 4, 9, 2, 7, 3, 12}, true, true, true, true, false, false, 0}, 1e-4);
    run_case<__nv_bfloat16, 64>({"bf16 M8 tc", 2, 33, 2, 1, 64, 64, {5, 17, 4, 9, 2, 30, 3, 12}, true, true, true, true,
                                 false, false, 0}, 8e-3);
  }
  run_gf<float, 4, kGfCache>(3, 10, 8, true, 0, true);
  run_gf<float, 1, kGfCache>(2, 7, 5, false, 1, false);
  run_gf<float, 4, 0>(6, 9, 12, true, 0, true);
  run_gf<float, 1, 0>(5, 6, 3, true, 1, true);
  run_gf<__half, 4, kGfCache>(2, 5, 8, true, 0, true);
  for (int act = 0; act < 2; ++act) {
    run_gf<float, 4, kGfCache>(3, 10, 8, true, act, true, true);
    run_gf<float, 1, 0>(6, 9, 5, true, act, true, true);
  }
  std::printf(failures ? "FAILED: %d mismatches\n" : "ALL OK\n", failures);
  return failures ? 1 : 0;
}
