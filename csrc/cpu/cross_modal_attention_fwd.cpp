// CPU forward of mmkernels::cross_modal_attention_fwd: blocked online-softmax attention over M key segments.
// Parallel over (batch, kv head, query block) tasks; each task stacks the G query heads that
// share its kv head into one row block so every K/V tile is read once per task. Q·K^T and P·V
// are small GEMMs on thread-local tiles; key blocks past the valid length are never visited.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/fast_math.h"
#include "../common/online_softmax.h"
#include "cross_modal_attention_common.h"
#include "cpu_blas.h"
#include "cpu_isa.h"

namespace mmkernels::cpu {
namespace {

constexpr int64_t kFwdRows = 64;   // target query rows (positions x grouped heads) per task
constexpr int64_t kFwdKeys = 256;  // key block

template <typename scalar_t>
void cross_modal_attention_fwd_impl(const CrossModalAttentionProblem& p, const at::Tensor& q, at::TensorList keys,
                  at::TensorList values, double scale_d, at::Tensor& out, at::Tensor& lse,
                  at::Tensor* out_raw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = p.B, Lq = p.Lq, Hq = p.Hq, Hkv = p.Hkv, D = p.D, Dv = p.Dv, M = p.M,
                G = p.G;
  const int64_t BQ = std::max<int64_t>(1, kFwdRows / G);  // query positions per task
  const int64_t nqb = (Lq + BQ - 1) / BQ;
  const int64_t R_max = BQ * G;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const CpuIsaKernels& isa = current_kernels();

  const scalar_t* qp = q.data_ptr<scalar_t>();
  const int64_t sqb = q.stride(0), sql = q.stride(1), sqh = q.stride(2);
  std::vector<const scalar_t*> kp(M), vp(M);
  std::vector<int64_t> skb(M), skl(M), skh(M), svb(M), svl(M), svh(M);
  for (int64_t m = 0; m < M; ++m) {
    kp[m] = keys[m].data_ptr<scalar_t>();
    vp[m] = values[m].data_ptr<scalar_t>();
    skb[m] = keys[m].stride(0), skl[m] = keys[m].stride(1), skh[m] = keys[m].stride(2);
    svb[m] = values[m].stride(0), svl[m] = values[m].stride(1), svh[m] = values[m].stride(2);
  }
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* orp = out_raw ? out_raw->data_ptr<scalar_t>() : nullptr;
  acc_t* lp = lse.data_ptr<acc_t>();

  struct Scratch {
    std::vector<acc_t> Qb, S, acc, Kt, Vt, mrow, lrow, brow, mbias;
    std::vector<int64_t> lim;
  };
  auto make_scratch = [&] {
    return Scratch{std::vector<acc_t>(R_max * D), std::vector<acc_t>(R_max * kFwdKeys),
                   std::vector<acc_t>(R_max * Dv), std::vector<acc_t>(kFwdKeys * D),
                   std::vector<acc_t>(kFwdKeys * Dv), std::vector<acc_t>(R_max),
                   std::vector<acc_t>(R_max), std::vector<acc_t>(R_max),
                   std::vector<acc_t>(kFwdKeys), std::vector<int64_t>(R_max)};
  };
  parallel_tasks(B * Hkv * nqb, make_scratch, [&](int64_t t, Scratch& sc) {
    auto& Qb = sc.Qb; auto& S = sc.S; auto& acc = sc.acc; auto& Kt = sc.Kt; auto& Vt = sc.Vt;
    auto& mrow = sc.mrow; auto& lrow = sc.lrow; auto& brow = sc.brow; auto& lim = sc.lim;
    acc_t* mbias = sc.mbias.data();
    {
      const int64_t b = t / (Hkv * nqb);
      const int64_t kvh = (t / nqb) % Hkv;
      const int64_t i0 = (t % nqb) * BQ;
      const int64_t i1 = std::min(Lq, i0 + BQ);
      const int64_t ql = p.q_len[b];
      const int64_t iv1 = std::min(i1, ql);
      const int64_t R = std::max<int64_t>(0, iv1 - i0) * G;  // valid rows, row r <-> (i, g)

      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = i0 + r / G, h = kvh * G + r % G;
        const scalar_t* src = qp + b * sqb + i * sql + h * sqh;
        acc_t* dst = Qb.data() + r * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]) * scale;
        mrow[r] = ninf;
        lrow[r] = 0;
      }
      std::fill(acc.begin(), acc.begin() + R * Dv, acc_t(0));

      for (int64_t m = 0; m < M && R > 0; ++m) {
        int64_t maxlim = 0;
        for (int64_t r = 0; r < R; ++r) {
          lim[r] = p.visible(b, m, i0 + r / G);
          maxlim = std::max(maxlim, lim[r]);
          brow[r] = static_cast<acc_t>(p.bias_at(kvh * G + r % G, m));
        }
        const scalar_t* kbase = kp[m] + b * skb[m] + kvh * skh[m];
        const scalar_t* vbase = vp[m] + b * svb[m] + kvh * svh[m];
        const bool* mask = p.mask_row(b, m);
        for (int64_t j0 = 0; j0 < maxlim; j0 += kFwdKeys) {
          const int64_t n = std::min(kFwdKeys, maxlim - j0);
          if (!mask_bias(mbias, mask, j0, n)) continue;  // a fully masked block changes nothing
          int64_t ldk, ldv;
          const acc_t* Kp = load_rows<scalar_t, acc_t>(kbase, skl[m], j0, n, D, Kt.data(), &ldk);
          const acc_t* Vp = load_rows<scalar_t, acc_t>(vbase, svl[m], j0, n, Dv, Vt.data(), &ldv);
          gemm(false, true, R, n, D, acc_t(1), Qb.data(), D, Kp, ldk, acc_t(0), S.data(),
               kFwdKeys);
          for (int64_t r = 0; r < R; ++r) {
            acc_t* s = S.data() + r * kFwdKeys;
            const int64_t lr = std::clamp<int64_t>(lim[r] - j0, 0, n);
            if (mask) add_mask_bias(s, mbias, lr);
            acc_t mx = ninf;
            if constexpr (std::is_same_v<acc_t, float>) {
              mx = isa.row_max(s, lr);
            } else {
#pragma omp simd reduction(max : mx)
              for (int64_t j = 0; j < lr; ++j) mx = s[j] > mx ? s[j] : mx;
            }
            const acc_t nm = std::max(mrow[r], mx + brow[r]);
            if (lr == 0 || nm == ninf) {
              for (int64_t j = 0; j < n; ++j) s[j] = 0;
              continue;
            }
            const acc_t c = nm - brow[r];
            acc_t sum = 0;
            if constexpr (std::is_same_v<acc_t, float>) {
              sum = isa.exp_sum(s, lr, c);
            } else {
#pragma omp simd reduction(+ : sum)
              for (int64_t j = 0; j < lr; ++j) {
                const acc_t e = fast_exp(s[j] - c);
                s[j] = e;
                sum += e;
              }
            }
            for (int64_t j = lr; j < n; ++j) s[j] = 0;
            const acc_t alpha = mrow[r] == ninf ? acc_t(0) : fast_exp(mrow[r] - nm);
            lrow[r] = lrow[r] * alpha + sum;
            mrow[r] = nm;
            if (alpha != acc_t(1)) {
              acc_t* a = acc.data() + r * Dv;
              for (int64_t d = 0; d < Dv; ++d) a[d] *= alpha;
            }
          }
          gemm(false, false, R, Dv, n, acc_t(1), S.data(), kFwdKeys, Vp, ldv, acc_t(1),
               acc.data(), Dv);
        }
      }

      // Finalise valid rows, zero padded rows.
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = kvh * G + g;
          scalar_t* o = op + ((b * Lq + i) * Hq + h) * Dv;
          scalar_t* orow = orp ? orp + ((b * Lq + i) * Hq + h) * Dv : nullptr;
          acc_t* l_out = lp + (b * Hq + h) * Lq + i;
          if (i >= iv1) {
            for (int64_t d = 0; d < Dv; ++d) o[d] = scalar_t(0);
            if (orow)
              for (int64_t d = 0; d < Dv; ++d) orow[d] = scalar_t(0);
            *l_out = ninf;
            continue;
          }
          const int64_t r = (i - i0) * G + g;
          const bool has = lrow[r] > acc_t(0);
          const acc_t inv = has ? acc_t(1) / lrow[r] : acc_t(0);
          *l_out = has ? mrow[r] + std::log(lrow[r]) : ninf;
          const acc_t* a = acc.data() + r * Dv;
          const acc_t gt = static_cast<acc_t>(p.gate_at(h));
          if (orow) {
            for (int64_t d = 0; d < Dv; ++d) {
              const acc_t v = a[d] * inv;
              orow[d] = static_cast<scalar_t>(v);
              o[d] = static_cast<scalar_t>(v * gt);
            }
          } else {
            for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<scalar_t>(a[d] * inv);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_modal_attention_fwd_cpu(
    const at::Tensor& q_in, at::TensorList keys_in, at::TensorList values_in,
    const std::optional<at::Tensor>& kv_lengths, const std::optional<at::Tensor>& q_lengths,
    const std::optional<at::Tensor>& modality_bias, const std::optional<at::Tensor>& head_gate,
    double scale, bool causal, const std::optional<at::TensorList>& kv_masks) {
  const CrossModalAttentionProblem p = make_problem(q_in, keys_in, values_in, kv_lengths, q_lengths,
                                    modality_bias, head_gate, causal, kv_masks);
  const at::Tensor q = last_dim_contiguous(q_in);
  std::vector<at::Tensor> keys, values;
  for (int64_t m = 0; m < p.M; ++m) {
    keys.push_back(last_dim_contiguous(keys_in[m]));
    values.push_back(last_dim_contiguous(values_in[m]));
  }
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({p.B, p.Lq, p.Hq, p.Dv}, q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(acc_type));
  at::Tensor out_raw;
  if (head_gate.has_value()) {
    out_raw = at::empty({p.B, p.Lq, p.Hq, p.Dv}, q.options());
  } else {
    out_raw = at::empty({0}, q.options());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cross_modal_attention_fwd_cpu", [&] {
    cross_modal_attention_fwd_impl<scalar_t>(p, q, keys, values, scale, out, lse,
                           head_gate.has_value() ? &out_raw : nullptr);
  });
  return {out, lse, out_raw};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) { m.impl("cross_modal_attention_fwd", &cross_modal_attention_fwd_cpu); }

}  // namespace mmkernels::cpu
