// C++ unit tests of csrc/common (host side) and the portable GEMM of csrc/cpu/cpu_blas.
// No libtorch needed; run through ctest (see CMakeLists.txt).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../common/fast_math.h"
#include "../common/gated_fusion_math.h"
#include "../common/online_softmax.h"
#include "../cpu/cpu_blas.h"

using namespace mmkernels;

static int g_failures = 0;
#define EXPECT_NEAR(a, b, tol)                                                              \
  do {                                                                                      \
    const double _a = (a), _b = (b);                                                        \
    if (!(std::fabs(_a - _b) <= (tol))) {                                                   \
      std::fprintf(stderr, "%s:%d: EXPECT_NEAR(%s, %s) %.17g vs %.17g (tol %g)\n", __FILE__, \
                   __LINE__, #a, #b, _a, _b, (double)(tol));                                \
      ++g_failures;                                                                         \
    }                                                                                       \
  } while (0)
#define EXPECT_TRUE(c)                                                        \
  do {                                                                        \
    if (!(c)) {                                                               \
      std::fprintf(stderr, "%s:%d: EXPECT_TRUE(%s)\n", __FILE__, __LINE__, #c); \
      ++g_failures;                                                           \
    }                                                                         \
  } while (0)

static void test_online_softmax_merge() {
  std::mt19937 rng(0);
  std::normal_distribution<double> nd(0.0, 3.0);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + trial % 37;
    std::vector<double> s(n), v(n);
    for (int j = 0; j < n; ++j) s[j] = nd(rng), v[j] = nd(rng);
    // direct
    double mx = -INFINITY;
    for (double x : s) mx = std::max(mx, x);
    double l = 0, acc = 0;
    for (int j = 0; j < n; ++j) l += std::exp(s[j] - mx), acc += std::exp(s[j] - mx) * v[j];
    const double lse_ref = mx + std::log(l), out_ref = acc / l;
    // online over random chunks, merged pairwise
    const int cut = static_cast<int>(rng() % (n + 1));
    SoftmaxState<double> a = SoftmaxState<double>::empty(), b = SoftmaxState<double>::empty();
    double acc_a = 0, acc_b = 0;
    for (int j = 0; j < n; ++j) {
      SoftmaxState<double>& st = j < cut ? a : b;
      double& ac = j < cut ? acc_a : acc_b;
      const double nm = std::max(st.m, s[j]);
      const double alpha = st.rescale_factor(nm);
      const double p = std::exp(s[j] - nm);
      st.l = st.l * alpha + p;
      st.m = nm;
      ac = ac * alpha + p * v[j];
    }
    double fa = 0, fb = 0;
    a.merge(b, &fa, &fb);
    const double out = (acc_a * fa + acc_b * fb) * a.inv_l();
    EXPECT_NEAR(a.lse(), lse_ref, 1e-12 * (1 + std::fabs(lse_ref)));
    EXPECT_NEAR(out, out_ref, 1e-12 * (1 + std::fabs(out_ref)));
  }
  // empty rows: lse -inf, output 0, never NaN
  SoftmaxState<float> e = SoftmaxState<float>::empty(), e2 = SoftmaxState<float>::empty();
  float fa = -1, fb = -1;
  e.merge(e2, &fa, &fb);
  EXPECT_TRUE(std::isinf(e.lse()) && e.lse() < 0);
  EXPECT_TRUE(e.inv_l() == 0.0f && fa == 0.0f && fb == 0.0f);
  EXPECT_TRUE(exp_shifted(-INFINITY, -INFINITY) == 0.0);
}

static void test_causal() {
  // bottom-right alignment: last valid query sees all kv_len keys
  EXPECT_TRUE(causal_visible_keys(4, 5, 9) == 9);
  EXPECT_TRUE(causal_visible_keys(0, 5, 9) == 5);
  EXPECT_TRUE(causal_visible_keys(0, 5, 5) == 1);
  EXPECT_TRUE(causal_visible_keys(0, 5, 3) == 0);  // sees nothing
  EXPECT_TRUE(causal_visible_keys(4, 5, 3) == 3);
  EXPECT_TRUE(causal_visible_keys(2, 5, 0) == 0);
}

static void test_fast_math() {
  double worst_exp = 0, worst_tanh = 0;
  for (int k = -200000; k <= 200000; ++k) {
    const float x = static_cast<float>(k) * 4.4e-4f;  // [-88, 88]
    const double ref = std::exp(static_cast<double>(x));
    if (ref > 1e-37 && ref < 1e38) {
      worst_exp = std::max(worst_exp, std::fabs(fast_expf(x) - ref) / ref);
    }
    const float t = static_cast<float>(k) * 1e-4f;  // [-20, 20]
    const double tr = std::tanh(static_cast<double>(t));
    worst_tanh = std::max(worst_tanh, std::fabs(fast_tanhf(t) - tr) / std::max(std::fabs(tr), 1e-30));
  }
  EXPECT_TRUE(worst_exp < 5e-7);
  EXPECT_TRUE(worst_tanh < 4e-7);
  EXPECT_TRUE(fast_expf(-INFINITY) == 0.0f);
  EXPECT_TRUE(fast_expf(-100.0f) == 0.0f);
  EXPECT_TRUE(fast_expf(0.0f) == 1.0f);
  EXPECT_TRUE(fast_tanhf(0.0f) == 0.0f);
  EXPECT_TRUE(fast_tanhf(-0.0f) == 0.0f && std::signbit(fast_tanhf(-0.0f)));
  EXPECT_TRUE(fast_tanhf(1e-6f) == 1e-6f);  // P(0) = Q(0) = 1: tanh(x) = x to rounding near 0
  EXPECT_TRUE(std::isnan(fast_tanhf(NAN)));  // the clamp must not turn NaN into 1
  EXPECT_TRUE(fast_tanhf(INFINITY) == 1.0f && fast_tanhf(-INFINITY) == -1.0f);
  EXPECT_TRUE(fast_tanhf(9.5f) == 1.0f && fast_tanhf(-3e38f) == -1.0f);
  std::printf("fast_expf max rel err %.3g, fast_tanhf max rel err %.3g\n", worst_exp, worst_tanh);
}

// Gated fusion at one unit: fused(f, l) with gradients checked by central differences.
static double gf_fused(const std::vector<double>& f, const std::vector<double>& l, int act) {
  double mx = -INFINITY;
  for (double x : l) mx = std::max(mx, x);
  double den = 0, acc = 0;
  for (size_t m = 0; m < f.size(); ++m) den += std::exp(l[m] - mx);
  for (size_t m = 0; m < f.size(); ++m) acc += std::exp(l[m] - mx) / den * gf_act(f[m], act);
  return acc;
}

static void test_gated_fusion_math() {
  std::mt19937 rng(1);
  std::normal_distribution<double> nd(0.0, 1.5);
  for (int act : {kActTanh, kActIdentity}) {
    for (int trial = 0; trial < 50; ++trial) {
      const int M = 1 + trial % 4;
      std::vector<double> f(M), l(M), g(M), a(M), dg(M);
      for (int m = 0; m < M; ++m) f[m] = nd(rng), l[m] = nd(rng);
      double mx = -INFINITY, den = 0;
      for (double x : l) mx = std::max(mx, x);
      for (int m = 0; m < M; ++m) den += std::exp(l[m] - mx);
      const double go = nd(rng);
      double s = 0;
      for (int m = 0; m < M; ++m) {
        g[m] = std::exp(l[m] - mx) / den;
        a[m] = gf_act(f[m], act);
        dg[m] = go * a[m];
        s += g[m] * dg[m];
      }
      for (int m = 0; m < M; ++m) {
        const double dl = g[m] * (dg[m] - s);
        const double df = go * g[m] * gf_act_grad_from_out(a[m], act);
        const double h = 1e-6;
        auto fp = f, fm = f, lp = l, lm = l;
        fp[m] += h, fm[m] -= h, lp[m] += h, lm[m] -= h;
        EXPECT_NEAR(df, go * (gf_fused(fp, l, act) - gf_fused(fm, l, act)) / (2 * h), 1e-7);
        EXPECT_NEAR(dl, go * (gf_fused(f, lp, act) - gf_fused(f, lm, act)) / (2 * h), 1e-7);
      }
    }
  }
  // Gated Multimodal Unit identity: M = 2, l1 = 0 -> weight of modality 0 is sigmoid(l0).
  const double l0 = 0.7;
  const double gmu = 1.0 / (1.0 + std::exp(-l0));
  EXPECT_NEAR(gf_fused({0.3, -1.2}, {l0, 0.0}, kActTanh),
              gmu * std::tanh(0.3) + (1 - gmu) * std::tanh(-1.2), 1e-14);
  EXPECT_NEAR(tanh_grad_from_out(std::tanh(0.4)), 1.0 / std::pow(std::cosh(0.4), 2), 1e-14);
}

static void test_gemm() {
  std::mt19937 rng(2);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int trial = 0; trial < 64; ++trial) {
    const bool ta = trial & 1, tb = trial & 2;
    const int64_t M = 1 + rng() % 9, N = 1 + rng() % 11, K = rng() % 13;
    const int64_t lda = (ta ? M : K) + trial % 3, ldb = (tb ? K : N) + 1, ldc = N + 2;
    std::vector<double> A((ta ? K : M) * lda + 1), B((tb ? N : K) * ldb + 1), C(M * ldc), R(M * ldc);
    for (auto& x : A) x = nd(rng);
    for (auto& x : B) x = nd(rng);
    for (auto& x : C) x = nd(rng);
    R = C;
    const double alpha = 0.5 + trial % 2, beta = (trial % 4 == 0) ? 0.0 : 1.0;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k)
          s += (ta ? A[k * lda + i] : A[i * lda + k]) * (tb ? B[j * ldb + k] : B[k * ldb + j]);
        R[i * ldc + j] = alpha * s + beta * R[i * ldc + j];
      }
    std::vector<float> Af(A.begin(), A.end()), Bf(B.begin(), B.end()), Cf(C.begin(), C.end());
    mmkernels::cpu::gemm(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
    mmkernels::cpu::gemm(ta, tb, M, N, K, static_cast<float>(alpha), Af.data(), lda, Bf.data(),
                         ldb, static_cast<float>(beta), Cf.data(), ldc);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        EXPECT_NEAR(C[i * ldc + j], R[i * ldc + j], 1e-12);
        EXPECT_NEAR(Cf[i * ldc + j], R[i * ldc + j], 1e-4);
      }
  }
}

int main() {
  test_online_softmax_merge();
  test_causal();
  test_fast_math();
  test_gated_fusion_math();
  test_gemm();
  if (g_failures) {
    std::fprintf(stderr, "%d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("all mmkernels common tests passed\n");
  return 0;
}
