// CPU backward of mmkernels::cross_modal_attention_bwd (FlashAttention-2 math, probabilities recomputed from lse).
// Parallel over (batch, kv head) tasks: a task owns the dK/dV rows of its kv head and the dQ
// rows of the G query heads sharing it, so there are no races and no float atomics; per-task
// partials of grad_bias / grad_gate are reduced afterwards in a fixed order (deterministic).
// This file: the op's entry point and the fp64 path (BLAS products on row-major tiles); fp32
// accumulation is in cross_modal_attention_bwd_tiles.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/fast_math.h"
#include "cross_modal_attention_bwd.h"
#include "cross_modal_attention_common.h"
#include "cpu_blas.h"
#include "cpu_memory.h"

namespace mmkernels::cpu {
namespace {

// fp64: BLAS products on row-major tiles.
template <typename scalar_t>
void cross_modal_attention_bwd_gemm(const CrossModalAttentionProblem& p, BwdTensors& io) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = p.B, Lq = p.Lq, Hq = p.Hq, Hkv = p.Hkv, D = p.D, Dv = p.Dv, M = p.M,
                G = p.G;
  const acc_t scale = static_cast<acc_t>(io.scale);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  const BwdRowReader<scalar_t, acc_t> rows(io.q, io.go, io.o_raw, io.lse, io.glse);
  const SegmentTensors<scalar_t> ks(io.keys), vs(io.values);
  std::vector<scalar_t*> dkp(M), dvp(M);
  for (int64_t m = 0; m < M; ++m) {
    dkp[m] = io.dk[m].data_ptr<scalar_t>();
    dvp[m] = io.dv[m].data_ptr<scalar_t>();
  }

  // Per-task partials: grad_bias (B, Hq, M), grad_gate dot products (B, Hq).
  std::vector<double> gb_part(static_cast<size_t>(B * Hq * M), 0.0);
  std::vector<double> gg_part(static_cast<size_t>(B * Hq), 0.0);

  struct Scratch {
    std::vector<acc_t> Qs, dO, dQ, Di, lrow;
    std::vector<int64_t> lim;
    std::vector<acc_t> S, dP, dKt, dVt, Kt, Vt, mbias;
    void trim() {
      for (auto* v : {&Qs, &dO, &dQ}) trim_scratch(*v);
    }
  };
  auto size_scratch = [&](Scratch& sc) {
    sc.S.resize(kBwdRows * kBwdKeys);
    sc.dP.resize(kBwdRows * kBwdKeys);
    sc.dKt.resize(kBwdKeys * D);
    sc.dVt.resize(kBwdKeys * Dv);
    sc.Kt.resize(kBwdKeys * D);
    sc.Vt.resize(kBwdKeys * Dv);
    sc.mbias.resize(kBwdKeys);
  };
  parallel_tasks<Scratch>(B * Hkv, size_scratch, [&](int64_t t, Scratch& sc) {
    auto& Qs = sc.Qs; auto& dO = sc.dO; auto& dQ = sc.dQ; auto& Di = sc.Di; auto& lrow = sc.lrow;
    auto& lim = sc.lim; auto& S = sc.S; auto& dP = sc.dP; auto& dKt = sc.dKt; auto& dVt = sc.dVt;
    auto& Kt = sc.Kt; auto& Vt = sc.Vt;
    {
      const int64_t b = t / Hkv, kvh = t % Hkv;
      const int64_t ql = p.q_len[b];
      const int64_t R = ql * G;  // valid rows, row r <-> (i = r / G, g = r % G)
      Qs.resize(R * D);
      dO.resize(R * Dv);
      dQ.assign(R * D, acc_t(0));
      Di.resize(R);
      lrow.resize(R);
      lim.resize(R);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = r / G, h = kvh * G + r % G;
        const acc_t dot = rows.read(
            b, i, h, Lq, scale, static_cast<acc_t>(p.gate_at(h)), [&](int64_t d, acc_t v) { Qs[r * D + d] = v; },
            [&](int64_t d, acc_t v) { dO[r * Dv + d] = v; }, &lrow[r], &Di[r]);
        gg_part[b * Hq + h] += static_cast<double>(dot);
      }

      for (int64_t m = 0; m < M; ++m) {
        int64_t maxlim = 0;
        for (int64_t r = 0; r < R; ++r) {
          lim[r] = lrow[r] == ninf ? 0 : p.visible(b, m, r / G);
          maxlim = std::max(maxlim, lim[r]);
        }
        const scalar_t* kbase = ks.rows(m, b, kvh);
        const scalar_t* vbase = vs.rows(m, b, kvh);
        const bool* mask = p.mask_row(b, m);
        // Output grads: (B, Lk, Hkv, W) with the strides of empty_like(input) (unit last dim).
        const int64_t Lk = p.Lk[m];
        const at::Tensor& dkm = io.dk[m];
        const at::Tensor& dvm = io.dv[m];
        scalar_t* dk0 = dkp[m] + b * dkm.stride(0) + kvh * dkm.stride(2);
        scalar_t* dv0 = dvp[m] + b * dvm.stride(0) + kvh * dvm.stride(2);
        const int64_t dks = dkm.stride(1), dvs = dvm.stride(1);
        auto dk_row = [&](int64_t j) { return dk0 + j * dks; };
        auto dv_row = [&](int64_t j) { return dv0 + j * dvs; };
        // The keys before the first kept one get zero grads like those past the last visible one.
        const int64_t first = std::min(p.first_key(b, m), maxlim);
        zero_grad_rows(dk0, dks, D, 0, first);
        zero_grad_rows(dv0, dvs, Dv, 0, first);
        for (int64_t j0 = first; j0 < maxlim; j0 += kBwdKeys) {
          const int64_t n = std::min(kBwdKeys, maxlim - j0);
          std::fill(dKt.begin(), dKt.begin() + n * D, acc_t(0));
          std::fill(dVt.begin(), dVt.begin() + n * Dv, acc_t(0));
          if (mask_bias(sc.mbias.data(), mask, j0, n)) {  // a fully masked block only gets zero grads
            int64_t ldk, ldv;
            const acc_t* Kp = load_rows<scalar_t, acc_t>(kbase, ks.row_stride(m), j0, n, D, Kt.data(), &ldk);
            const acc_t* Vp = load_rows<scalar_t, acc_t>(vbase, vs.row_stride(m), j0, n, Dv, Vt.data(), &ldv);
            // Rows are ordered by query position, so (causal) visibility is nondecreasing in r
            // except for rows with lse = -inf; skip leading blocks that see nothing.
            int64_t rstart = 0;
            if (p.causal) {
              while (rstart < R && lim[rstart] <= j0) ++rstart;
              rstart = (rstart / kBwdRows) * kBwdRows;
            }
            for (int64_t r0 = rstart; r0 < R; r0 += kBwdRows) {
              const int64_t rb = std::min(kBwdRows, R - r0);
              gemm(false, true, rb, n, D, acc_t(1), Qs.data() + r0 * D, D, Kp, ldk, acc_t(0),
                   S.data(), kBwdKeys);
              gemm(false, true, rb, n, Dv, acc_t(1), dO.data() + r0 * Dv, Dv, Vp, ldv, acc_t(0),
                   dP.data(), kBwdKeys);
              for (int64_t rr = 0; rr < rb; ++rr) {
                const int64_t r = r0 + rr;
                acc_t* s = S.data() + rr * kBwdKeys;
                acc_t* dp = dP.data() + rr * kBwdKeys;
                const int64_t lr = std::clamp<int64_t>(lim[r] - j0, 0, n);
                if (mask) add_mask_bias(s, sc.mbias.data(), lr);
                const int64_t h = kvh * G + r % G;
                const acc_t c = lrow[r] - static_cast<acc_t>(p.bias_at(h, m));
                const acc_t di = Di[r];
                acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
                for (int64_t j = 0; j < lr; ++j) {
                  const acc_t pj = fast_exp(s[j] - c);
                  const acc_t ds = pj * (dp[j] - di);
                  s[j] = pj;
                  dp[j] = ds;
                  sum += ds;
                }
                for (int64_t j = lr; j < n; ++j) s[j] = dp[j] = 0;
                gb_part[(b * Hq + h) * M + m] += static_cast<double>(sum);
              }
              // dV += P^T dO ; dK += dS^T Qs (Qs carries the scale) ; dQ += dS K (scaled at end)
              gemm(true, false, n, Dv, rb, acc_t(1), S.data(), kBwdKeys, dO.data() + r0 * Dv, Dv,
                   acc_t(1), dVt.data(), Dv);
              gemm(true, false, n, D, rb, acc_t(1), dP.data(), kBwdKeys, Qs.data() + r0 * D, D,
                   acc_t(1), dKt.data(), D);
              gemm(false, false, rb, D, n, acc_t(1), dP.data(), kBwdKeys, Kp, ldk, acc_t(1),
                   dQ.data() + r0 * D, D);
            }
          }
          for (int64_t j = 0; j < n; ++j) {
            scalar_t* a = dk_row(j0 + j);
            scalar_t* v = dv_row(j0 + j);
            for (int64_t d = 0; d < D; ++d) a[d] = static_cast<scalar_t>(dKt[j * D + d]);
            for (int64_t d = 0; d < Dv; ++d) v[d] = static_cast<scalar_t>(dVt[j * Dv + d]);
          }
        }
        zero_grad_rows(dk0, dks, D, maxlim, Lk);
        zero_grad_rows(dv0, dvs, Dv, maxlim, Lk);
      }

      write_dq_rows<scalar_t, acc_t>(p, io.dq, b, kvh, ql, scale, [&](int64_t r, int64_t d) { return dQ[r * D + d]; });
    }
  });

  reduce_partials<acc_t>(p, gb_part, gg_part, io.gbias, io.ggate);
}

// Gradient buffer with the layout of torch.empty_like(input) (what the fake kernel returns:
// strides preserved for dense inputs, contiguous otherwise), last dim unit-stride.
at::Tensor grad_like(const at::Tensor& t) {
  at::Tensor g = at::empty_like(t);
  if (g.dim() > 0 && g.size(-1) > 1 && g.stride(-1) != 1) g = at::empty(t.sizes(), t.options());
  return g;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>
cross_modal_attention_bwd_cpu(const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_lse,
            const at::Tensor& q_in, at::TensorList keys_in, at::TensorList values_in,
            const at::Tensor& out_raw_in, const at::Tensor& lse,
            const std::optional<at::Tensor>& kv_lengths,
            const std::optional<at::Tensor>& q_lengths,
            const std::optional<at::Tensor>& modality_bias,
            const std::optional<at::Tensor>& head_gate, double scale, bool causal,
            const std::optional<at::TensorList>& kv_masks) {
  const CrossModalAttentionProblem p = make_problem(q_in, keys_in, values_in, kv_lengths, q_lengths,
                                    modality_bias, head_gate, causal, kv_masks);
  TORCH_CHECK(grad_out_in.dim() == 4 && grad_out_in.size(0) == p.B &&
                  grad_out_in.size(1) == p.Lq && grad_out_in.size(2) == p.Hq &&
                  grad_out_in.size(3) == p.Dv,
              "grad_out: expected (", p.B, ", ", p.Lq, ", ", p.Hq, ", ", p.Dv, "), got ",
              grad_out_in.sizes());
  TORCH_CHECK(out_raw_in.sizes() == grad_out_in.sizes(), "out_ungated: expected ",
              grad_out_in.sizes(), ", got ", out_raw_in.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.Hq &&
                  lse.size(2) == p.Lq,
              "lse: expected (", p.B, ", ", p.Hq, ", ", p.Lq, "), got ", lse.sizes());
  if (grad_lse.has_value())
    TORCH_CHECK(grad_lse->sizes() == lse.sizes(), "grad_lse: expected ", lse.sizes(), ", got ",
                grad_lse->sizes());
  const auto dt = q_in.scalar_type();
  const auto acc_type = dt == at::kDouble ? at::kDouble : at::kFloat;
  BwdTensors io{last_dim_contiguous(grad_out_in.to(dt)), grad_lse.has_value() ? &*grad_lse : nullptr,
                last_dim_contiguous(q_in), {}, {}, last_dim_contiguous(out_raw_in.to(dt)), lse, scale,
                grad_like(q_in), {}, {},
                at::zeros({p.Hq, p.M}, q_in.options().dtype(acc_type)),
                at::zeros({p.Hq}, q_in.options().dtype(acc_type))};
  populate_pages(io.dq);
  for (int64_t m = 0; m < p.M; ++m) {
    io.keys.push_back(last_dim_contiguous(keys_in[m]));
    io.values.push_back(last_dim_contiguous(values_in[m]));
    io.dk.push_back(grad_like(keys_in[m]));
    io.dv.push_back(grad_like(values_in[m]));
    populate_pages(io.dk.back());
    populate_pages(io.dv.back());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "cross_modal_attention_bwd_cpu", [&] {
    if constexpr (std::is_same_v<at::opmath_type<scalar_t>, float>) {
      cross_modal_attention_bwd_tiles<scalar_t>(p, io);
    } else {
      cross_modal_attention_bwd_gemm<scalar_t>(p, io);
    }
  });
  return {io.dq, io.dk, io.dv, io.gbias, io.ggate};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) { m.impl("cross_modal_attention_bwd", &cross_modal_attention_bwd_cpu); }

}  // namespace mmkernels::cpu
