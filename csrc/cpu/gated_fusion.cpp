// CPU kernels of mmkernels::gated_fusion_fwd / gated_fusion_bwd.
// Inputs are (M, N, H); one pass over memory each way, parallel over N, vectorised over H
// (each position's M x H slab is processed in registers / L1-resident row buffers).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "../common/fast_math.h"
#include "../common/gated_fusion_math.h"
#include "cpu_isa.h"
#include "cpu_memory.h"

namespace mmkernels::cpu {
namespace {

template <typename acc_t>
inline void act_row(const acc_t* f, acc_t* a, int64_t H, int64_t activation) {
  if (activation == kActTanh) {
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) a[h] = fast_tanh(f[h]);
  } else {
    for (int64_t h = 0; h < H; ++h) a[h] = f[h];
  }
}

template <typename scalar_t, typename acc_t>
inline const acc_t* to_acc(const scalar_t* src, acc_t* buf, int64_t H) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    (void)buf;
    (void)H;
    return src;
  } else {
    for (int64_t h = 0; h < H; ++h) buf[h] = static_cast<acc_t>(src[h]);
    return buf;
  }
}

// Computes the gates of position n into g (M x H rows; absent modalities get 0 rows).
// Returns false when no modality is present (then g is all 0). A gate of exactly 0 marks a
// modality that takes no part at that unit (absent, a -inf logit, or a weight that underflowed):
// the kernels select it out rather than multiply, so that its features, NaN or inf, never
// reach the result or the gradients (0 * NaN).
template <typename scalar_t, typename acc_t>
inline bool gates_row(const scalar_t* lp, int64_t sM, int64_t M, int64_t H, const bool* pres,
                      int64_t n, int64_t sPm, acc_t* g, acc_t* tmp, acc_t* mx, acc_t* den) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  bool any = false;
  for (int64_t h = 0; h < H; ++h) mx[h] = ninf;
  for (int64_t m = 0; m < M; ++m) {
    if (pres && !pres[m * sPm + n]) continue;
    any = true;
    const acc_t* l = to_acc<scalar_t, acc_t>(lp + m * sM, tmp, H);
    acc_t* gm = g + m * H;
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) {
      gm[h] = l[h];
      mx[h] = l[h] > mx[h] ? l[h] : mx[h];
    }
  }
  if (!any) {
    for (int64_t i = 0; i < M * H; ++i) g[i] = 0;
    return false;
  }
  for (int64_t h = 0; h < H; ++h) den[h] = 0;
  for (int64_t m = 0; m < M; ++m) {
    acc_t* gm = g + m * H;
    if (pres && !pres[m * sPm + n]) {
      for (int64_t h = 0; h < H; ++h) gm[h] = 0;
      continue;
    }
    // A -inf logit takes no part, also where every logit of the unit is -inf (mx = -inf).
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) {
      const acc_t e = gm[h] == ninf ? acc_t(0) : fast_exp(gm[h] - mx[h]);
      gm[h] = e;
      den[h] += e;
    }
  }
  for (int64_t h = 0; h < H; ++h) den[h] = den[h] > acc_t(0) ? acc_t(1) / den[h] : acc_t(0);
  for (int64_t m = 0; m < M; ++m) {
    acc_t* gm = g + m * H;
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) gm[h] *= den[h];
  }
  return true;
}

template <typename scalar_t>
void gf_fwd_impl(const at::Tensor& f, const at::Tensor& l, const bool* pres, int64_t activation,
                 at::Tensor& fused, at::Tensor* gates) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = f.size(0), N = f.size(1), H = f.size(2);
  const scalar_t* fp = f.data_ptr<scalar_t>();
  const scalar_t* lp = l.data_ptr<scalar_t>();
  scalar_t* op = fused.data_ptr<scalar_t>();
  scalar_t* gp = gates ? gates->data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, M * H));
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (M <= kMaxVecModalities) {  // the explicitly vectorised kernels of the CPU's ISA level
      const GatedFusionRows rows{fp, lp, pres, M, N, H, static_cast<int>(activation)};
      const CpuIsaKernels& isa = current_kernels();
      at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { isa.gated_fusion_fwd(rows, op, gp, n0, n1); });
      return;
    }
  }
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> g(M * H), tmp(H), mx(H), den(H), a(H), acc(H);
    for (int64_t n = n0; n < n1; ++n) {
      const bool any = gates_row<scalar_t, acc_t>(lp + n * H, N * H, M, H, pres, n, N, g.data(),
                                                  tmp.data(), mx.data(), den.data());
      for (int64_t h = 0; h < H; ++h) acc[h] = 0;
      if (any) {
        for (int64_t m = 0; m < M; ++m) {
          if (pres && !pres[m * N + n]) continue;
          const acc_t* fr = to_acc<scalar_t, acc_t>(fp + (m * N + n) * H, tmp.data(), H);
          act_row<acc_t>(fr, a.data(), H, activation);
          const acc_t* gm = g.data() + m * H;
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) acc[h] += gm[h] != acc_t(0) ? gm[h] * a[h] : acc_t(0);
        }
      }
      scalar_t* o = op + n * H;
      for (int64_t h = 0; h < H; ++h) o[h] = static_cast<scalar_t>(acc[h]);
      if (gp) {
        for (int64_t m = 0; m < M; ++m) {
          scalar_t* dst = gp + (m * N + n) * H;
          const acc_t* gm = g.data() + m * H;
          for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<scalar_t>(gm[h]);
        }
      }
    }
  });
}

template <typename scalar_t>
void gf_bwd_impl(const at::Tensor& gf, const at::Tensor* gg, const at::Tensor& f,
                 const at::Tensor& l, const bool* pres, int64_t activation, at::Tensor& df,
                 at::Tensor& dl) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = f.size(0), N = f.size(1), H = f.size(2);
  const scalar_t* fp = f.data_ptr<scalar_t>();
  const scalar_t* lp = l.data_ptr<scalar_t>();
  const scalar_t* gfp = gf.data_ptr<scalar_t>();
  const scalar_t* ggp = gg ? gg->data_ptr<scalar_t>() : nullptr;
  scalar_t* dfp = df.data_ptr<scalar_t>();
  scalar_t* dlp = dl.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, M * H));
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (M <= kMaxVecModalities) {
      const GatedFusionRows rows{fp, lp, pres, M, N, H, static_cast<int>(activation)};
      const CpuIsaKernels& isa = current_kernels();
      at::parallel_for(0, N, grain,
                       [&](int64_t n0, int64_t n1) { isa.gated_fusion_bwd(rows, gfp, ggp, dfp, dlp, n0, n1); });
      return;
    }
  }
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> g(M * H), a(M * H), dg(M * H), tmp(H), tmp2(H), mx(H), den(H), s(H);
    for (int64_t n = n0; n < n1; ++n) {
      const bool any = gates_row<scalar_t, acc_t>(lp + n * H, N * H, M, H, pres, n, N, g.data(),
                                                  tmp.data(), mx.data(), den.data());
      if (!any) {
        for (int64_t m = 0; m < M; ++m) {
          scalar_t* d1 = dfp + (m * N + n) * H;
          scalar_t* d2 = dlp + (m * N + n) * H;
          for (int64_t h = 0; h < H; ++h) d1[h] = d2[h] = scalar_t(0);
        }
        continue;
      }
      const acc_t* go = to_acc<scalar_t, acc_t>(gfp + n * H, tmp2.data(), H);
      for (int64_t h = 0; h < H; ++h) s[h] = 0;
      for (int64_t m = 0; m < M; ++m) {
        acc_t* am = a.data() + m * H;
        acc_t* dgm = dg.data() + m * H;
        const acc_t* gm = g.data() + m * H;
        const acc_t* fr = to_acc<scalar_t, acc_t>(fp + (m * N + n) * H, tmp.data(), H);
        act_row<acc_t>(fr, am, H, activation);
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) dgm[h] = go[h] * am[h];
        if (ggp) {
          const acc_t* ggr = to_acc<scalar_t, acc_t>(ggp + (m * N + n) * H, tmp.data(), H);
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) dgm[h] += ggr[h];
        }
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) s[h] += gm[h] != acc_t(0) ? gm[h] * dgm[h] : acc_t(0);
      }
      for (int64_t m = 0; m < M; ++m) {
        const acc_t* am = a.data() + m * H;
        const acc_t* dgm = dg.data() + m * H;
        const acc_t* gm = g.data() + m * H;
        scalar_t* d1 = dfp + (m * N + n) * H;
        scalar_t* d2 = dlp + (m * N + n) * H;
        if (activation == kActTanh) {
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) {
            const bool part = gm[h] != acc_t(0);
            d1[h] = static_cast<scalar_t>(part ? go[h] * gm[h] * (acc_t(1) - am[h] * am[h]) : acc_t(0));
            d2[h] = static_cast<scalar_t>(part ? gm[h] * (dgm[h] - s[h]) : acc_t(0));
          }
        } else {
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) {
            const bool part = gm[h] != acc_t(0);
            d1[h] = static_cast<scalar_t>(part ? go[h] * gm[h] : acc_t(0));
            d2[h] = static_cast<scalar_t>(part ? gm[h] * (dgm[h] - s[h]) : acc_t(0));
          }
        }
      }
    }
  });
}

void check_gf_inputs(const at::Tensor& f, const at::Tensor& l,
                     const std::optional<at::Tensor>& present, int64_t activation) {
  TORCH_CHECK(f.dim() == 3, "features: expected (M, N, H), got ", f.sizes());
  TORCH_CHECK(l.sizes() == f.sizes(), "gate_logits: expected ", f.sizes(), ", got ", l.sizes());
  TORCH_CHECK(l.scalar_type() == f.scalar_type(), "gate_logits: dtype must match features");
  TORCH_CHECK(activation == kActTanh || activation == kActIdentity,
              "activation: expected 0 (tanh) or 1 (identity), got ", activation);
  if (present.has_value()) {
    TORCH_CHECK(present->dim() == 2 && present->size(0) == f.size(0) &&
                    present->size(1) == f.size(1),
                "present: expected (", f.size(0), ", ", f.size(1), "), got ", present->sizes());
  }
}

std::tuple<at::Tensor, at::Tensor> gated_fusion_fwd_cpu(const at::Tensor& features,
                                                        const at::Tensor& gate_logits,
                                                        const std::optional<at::Tensor>& present,
                                                        int64_t activation, bool return_gates) {
  check_gf_inputs(features, gate_logits, present, activation);
  const at::Tensor f = features.contiguous();
  const at::Tensor l = gate_logits.contiguous();
  at::Tensor pres;
  if (present.has_value()) pres = present->to(at::kBool).contiguous();
  const int64_t M = f.size(0), N = f.size(1), H = f.size(2);
  at::Tensor fused = at::empty({N, H}, f.options());
  at::Tensor gates = return_gates ? at::empty({M, N, H}, f.options()) : at::empty({0}, f.options());
  advise_hugepages(fused);
  advise_hugepages(gates);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "gated_fusion_fwd",
                                  [&] {
                                    gf_fwd_impl<scalar_t>(
                                        f, l, pres.defined() ? pres.data_ptr<bool>() : nullptr,
                                        activation, fused, return_gates ? &gates : nullptr);
                                  });
  return {fused, gates};
}

std::tuple<at::Tensor, at::Tensor> gated_fusion_bwd_cpu(
    const at::Tensor& grad_fused, const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& features, const at::Tensor& gate_logits,
    const std::optional<at::Tensor>& present, int64_t activation) {
  check_gf_inputs(features, gate_logits, present, activation);
  const at::Tensor f = features.contiguous();
  const at::Tensor l = gate_logits.contiguous();
  const int64_t M = f.size(0), N = f.size(1), H = f.size(2);
  TORCH_CHECK(grad_fused.dim() == 2 && grad_fused.size(0) == N && grad_fused.size(1) == H,
              "grad_fused: expected (", N, ", ", H, "), got ", grad_fused.sizes());
  const at::Tensor gfc = grad_fused.to(f.scalar_type()).contiguous();
  at::Tensor ggc;
  if (grad_gates.has_value()) {
    TORCH_CHECK(grad_gates->sizes() == f.sizes(), "grad_gates: expected ", f.sizes(), ", got ",
                grad_gates->sizes());
    ggc = grad_gates->to(f.scalar_type()).contiguous();
  }
  at::Tensor pres;
  if (present.has_value()) pres = present->to(at::kBool).contiguous();
  at::Tensor df = at::empty({M, N, H}, f.options());
  at::Tensor dl = at::empty({M, N, H}, f.options());
  advise_hugepages(df);
  advise_hugepages(dl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "gated_fusion_bwd",
                                  [&] {
                                    gf_bwd_impl<scalar_t>(
                                        gfc, ggc.defined() ? &ggc : nullptr, f, l,
                                        pres.defined() ? pres.data_ptr<bool>() : nullptr,
                                        activation, df, dl);
                                  });
  return {df, dl};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("gated_fusion_fwd", &gated_fusion_fwd_cpu);
  m.impl("gated_fusion_bwd", &gated_fusion_bwd_cpu);
}

}  // namespace mmkernels::cpu
