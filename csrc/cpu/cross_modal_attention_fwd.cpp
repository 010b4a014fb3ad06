// CPU forward of mmkernels::cross_modal_attention_fwd: blocked online-softmax attention over M key segments.
// Parallel over (batch, kv head, query block) tasks; each task stacks the G query heads that
// share its kv head into one row block so every K/V tile is read once per task; key blocks past the
// valid length are never visited. fp32 accumulation (float, half, bfloat16) runs the chosen level's
// register tiles (isa/attention_tiles.h); fp64 runs BLAS products on thread-local tiles.
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
#include "cross_modal_attention_common.h"
#include "cpu_blas.h"
#include "cpu_isa.h"

namespace mmkernels::cpu {
namespace {

constexpr int64_t kFwdRows = 64;   // target query rows (positions x grouped heads) per task
constexpr int64_t kFwdKeys = 256;  // key block of the fp64 path
// Key block of the vector path: 128 keys while a block's keys and values (n x (D + Dv) floats) take
// at most 64 KiB, else 64, so that they stay in L2 beside the scores and the query tile (at D 128 on
// Zen 1, 512 KiB of L2: 64 keys took 5-7% off the forward; at D 64, 128 keys are the faster).
inline int64_t tile_keys(int64_t D, int64_t Dv) {
  return (D + Dv) * static_cast<int64_t>(sizeof(float)) * 128 <= (64 << 10) ? 128 : 64;
}

// Both paths' tasks: (batch, kv head, block of BQ query positions), the G query heads sharing the kv
// head stacked into rows r <-> (position i0 + r / G, head kvh * G + r % G).
struct QueryTasks {
  int64_t BQ, nqb, count;
  explicit QueryTasks(const CrossModalAttentionProblem& p)
      : BQ(std::max<int64_t>(1, kFwdRows / p.G)), nqb((p.Lq + BQ - 1) / BQ), count(p.B * p.Hkv * nqb) {}
  struct Task {
    int64_t b, kvh, i0, i1, iv1, R;  // positions [i0, i1), valid below iv1; R valid rows
  };
  Task at(const CrossModalAttentionProblem& p, int64_t t) const {
    Task k;
    k.b = t / (p.Hkv * nqb);
    k.kvh = (t / nqb) % p.Hkv;
    k.i0 = (t % nqb) * BQ;
    k.i1 = std::min(p.Lq, k.i0 + BQ);
    k.iv1 = std::min(k.i1, p.q_len[k.b]);
    k.R = std::max<int64_t>(0, k.iv1 - k.i0) * p.G;
    return k;
  }
};

// Writes the outputs of query positions [i0, i1) of (b, kv head kvh) from the tile's running rows
// (row r <-> position i0 + r / G, head kvh * G + r % G; its output element d at acc[r * ld_row + d * ld_dim]);
// positions from iv1 on are padding. out_raw (the ungated output) is written when given.
template <typename scalar_t, typename acc_t>
void finalise_rows(const CrossModalAttentionProblem& p, int64_t b, int64_t kvh, int64_t i0, int64_t i1,
                   int64_t iv1, const acc_t* lrow, const acc_t* mrow, const acc_t* acc, int64_t ld_row,
                   int64_t ld_dim, at::Tensor& out, at::Tensor& lse, at::Tensor* out_raw) {
  const int64_t Lq = p.Lq, Hq = p.Hq, Dv = p.Dv, G = p.G;
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* orp = out_raw ? out_raw->data_ptr<scalar_t>() : nullptr;
  acc_t* lp = lse.data_ptr<acc_t>();
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
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
      const acc_t* a = acc + r * ld_row;
      const acc_t gt = static_cast<acc_t>(p.gate_at(h));
      if (orow) {
        for (int64_t d = 0; d < Dv; ++d) {
          const acc_t v = a[d * ld_dim] * inv;
          orow[d] = static_cast<scalar_t>(v);
          o[d] = static_cast<scalar_t>(v * gt);
        }
      } else {
        for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<scalar_t>(a[d * ld_dim] * inv);
      }
    }
  }
}

template <typename scalar_t>
void cross_modal_attention_fwd_gemm(const CrossModalAttentionProblem& p, const at::Tensor& q, at::TensorList keys,
                  at::TensorList values, double scale_d, at::Tensor& out, at::Tensor& lse,
                  at::Tensor* out_raw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = p.D, Dv = p.Dv, M = p.M, G = p.G;
  const QueryTasks tasks(p);
  const int64_t R_max = tasks.BQ * G;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  const SegmentTensors<scalar_t> qs(q), ks(keys), vs(values);  // q: one "segment"

  struct Scratch {
    std::vector<acc_t> Qb, S, acc, Kt, Vt, mrow, lrow, brow, mbias;
    std::vector<int64_t> lim;
    void trim() {}  // sized by tiles only
  };
  auto size_scratch = [&](Scratch& sc) {
    sc.Qb.resize(R_max * D), sc.S.resize(R_max * kFwdKeys), sc.acc.resize(R_max * Dv);
    sc.Kt.resize(kFwdKeys * D), sc.Vt.resize(kFwdKeys * Dv), sc.mrow.resize(R_max);
    sc.lrow.resize(R_max), sc.brow.resize(R_max), sc.mbias.resize(kFwdKeys), sc.lim.resize(R_max);
  };
  parallel_tasks<Scratch>(tasks.count, size_scratch, [&](int64_t t, Scratch& sc) {
    auto& Qb = sc.Qb; auto& S = sc.S; auto& acc = sc.acc; auto& Kt = sc.Kt; auto& Vt = sc.Vt;
    auto& mrow = sc.mrow; auto& lrow = sc.lrow; auto& brow = sc.brow; auto& lim = sc.lim;
    acc_t* mbias = sc.mbias.data();
    {
      const auto [b, kvh, i0, i1, iv1, R] = tasks.at(p, t);

      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = i0 + r / G, h = kvh * G + r % G;
        const scalar_t* src = qs.rows(0, b, h) + i * qs.row_stride(0);
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
        const scalar_t* kbase = ks.rows(m, b, kvh);
        const scalar_t* vbase = vs.rows(m, b, kvh);
        const bool* mask = p.mask_row(b, m);
        for (int64_t j0 = p.first_key(b, m); j0 < maxlim; j0 += kFwdKeys) {
          const int64_t n = std::min(kFwdKeys, maxlim - j0);
          if (!mask_bias(mbias, mask, j0, n)) continue;  // a fully masked block changes nothing
          int64_t ldk, ldv;
          const acc_t* Kp = load_rows<scalar_t, acc_t>(kbase, ks.row_stride(m), j0, n, D, Kt.data(), &ldk);
          const acc_t* Vp = load_rows<scalar_t, acc_t>(vbase, vs.row_stride(m), j0, n, Dv, Vt.data(), &ldv);
          gemm(false, true, R, n, D, acc_t(1), Qb.data(), D, Kp, ldk, acc_t(0), S.data(),
               kFwdKeys);
          for (int64_t r = 0; r < R; ++r) {
            acc_t* s = S.data() + r * kFwdKeys;
            const int64_t lr = std::clamp<int64_t>(lim[r] - j0, 0, n);
            if (mask) add_mask_bias(s, mbias, lr);
            acc_t mx = ninf;
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j < lr; ++j) mx = s[j] > mx ? s[j] : mx;
            const acc_t nm = std::max(mrow[r], mx + brow[r]);
            if (lr == 0 || nm == ninf) {
              for (int64_t j = 0; j < n; ++j) s[j] = 0;
              continue;
            }
            const acc_t c = nm - brow[r];
            acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < lr; ++j) {
              const acc_t e = fast_exp(s[j] - c);
              s[j] = e;
              sum += e;
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

      finalise_rows<scalar_t, acc_t>(p, b, kvh, i0, i1, iv1, lrow.data(), mrow.data(), acc.data(), Dv, 1, out, lse,
                                     out_raw);
    }
  });
}

// fp32 accumulation (float, half, bfloat16 inputs): the level's vector kernels (isa/attention_tiles.h)
// on each task's query tile held transposed; half and bfloat16 keys and values are converted per block.
template <typename scalar_t>
void cross_modal_attention_fwd_tiles(const CrossModalAttentionProblem& p, const at::Tensor& q,
                                     at::TensorList keys, at::TensorList values, double scale_d,
                                     at::Tensor& out, at::Tensor& lse, at::Tensor* out_raw) {
  const int64_t D = p.D, Dv = p.Dv, M = p.M, G = p.G;
  const QueryTasks tasks(p);
  const CpuIsaKernels& isa = current_kernels();
  const int64_t block_keys = tile_keys(D, Dv);
  const int64_t width = isa.width;
  const int64_t rp_max = (tasks.BQ * G + width - 1) / width * width;
  const float scale = static_cast<float>(scale_d);
  const float ninf = -std::numeric_limits<float>::infinity();

  const SegmentTensors<scalar_t> qs(q), ks(keys), vs(values);  // q: one "segment"

  struct Scratch {
    std::vector<float> qt, st, acc_t, Kt, Vt, row_max, row_sum, row_bias, alpha, mbias;
    std::vector<int> limit, kept;
    std::vector<int64_t> visible;
    void trim() { trim_scratch(kept); }
  };
  auto size_scratch = [&](Scratch& sc) {
    sc.qt.resize(D * rp_max), sc.st.resize(block_keys * rp_max), sc.acc_t.resize(rp_max * Dv);
    sc.Kt.resize(block_keys * D), sc.Vt.resize(block_keys * Dv), sc.row_max.resize(rp_max);
    sc.row_sum.resize(rp_max), sc.row_bias.resize(rp_max), sc.alpha.resize(rp_max);
    sc.mbias.resize(block_keys), sc.limit.resize(rp_max), sc.visible.resize(rp_max);
  };
  parallel_tasks<Scratch>(tasks.count, size_scratch, [&](int64_t t, int64_t upcoming, Scratch& sc) {
    const auto [b, kvh, i0, i1, iv1, R] = tasks.at(p, t);
    // The upcoming task's first block (segment 0 from key 0), prefetched during this task's last block.
    const QueryTasks::Task up = tasks.at(p, upcoming < 0 ? 0 : upcoming);
    const int64_t b_up = up.b, kvh_up = up.kvh;
    const int64_t n_up = upcoming < 0 ? 0 : std::min(block_keys, p.kv_len[b_up * M]);
    const int64_t rp = (R + width - 1) / width * width;

    float* qt = sc.qt.data();
    // Row r <-> (position i0 + i, head g of the group), counted instead of divided (see the backward).
    for (int64_t r = 0, i = 0, g = 0; r < rp; ++r, g = g + 1 == G ? (++i, 0) : g + 1) {
      if (r < R) {
        const scalar_t* src = qs.rows(0, b, kvh * G + g) + (i0 + i) * qs.row_stride(0);
        for (int64_t d = 0; d < D; ++d) qt[d * rp + r] = static_cast<float>(src[d]) * scale;
      } else {
        for (int64_t d = 0; d < D; ++d) qt[d * rp + r] = 0.f;
      }
      sc.row_max[r] = ninf;
      sc.row_sum[r] = 0.f;
    }
    std::fill(sc.acc_t.begin(), sc.acc_t.begin() + Dv * rp, 0.f);

    AttnFwdBlock blk{};
    blk.qt = qt, blk.rp = rp, blk.D = D, blk.Dv = Dv;
    blk.limit = sc.limit.data(), blk.row_bias = sc.row_bias.data(), blk.st = sc.st.data();
    blk.row_max = sc.row_max.data(), blk.row_sum = sc.row_sum.data(), blk.alpha = sc.alpha.data();
    blk.acc_t = sc.acc_t.data();
    for (int64_t m = 0; m < M && R > 0; ++m) {
      int64_t max_visible = 0;
      for (int64_t r = 0, i = 0, g = 0; r < rp; ++r, g = g + 1 == G ? (++i, 0) : g + 1) {
        sc.visible[r] = r < R ? p.visible(b, m, i0 + i) : 0;
        sc.row_bias[r] = r < R ? static_cast<float>(p.bias_at(kvh * G + g, m)) : 0.f;
        max_visible = std::max(max_visible, sc.visible[r]);
      }
      const scalar_t* kbase = ks.rows(m, b, kvh);
      const scalar_t* vbase = vs.rows(m, b, kvh);
      const bool* mask = p.mask_row(b, m);
      if (mask != nullptr && !p.causal &&
          compact_keys(mask, max_visible, sc.kept)) {  // every row sees keys [0, max_visible): gather the kept
        const int64_t kept = static_cast<int64_t>(sc.kept.size());
        for (int64_t c0 = 0; c0 < kept; c0 += block_keys) {
          const int64_t n = std::min(block_keys, kept - c0);
          const int* rows = sc.kept.data() + c0;
          pack_rows<scalar_t>(kbase, ks.row_stride(m), rows, n, D, sc.Kt.data());
          pack_rows<scalar_t>(vbase, vs.row_stride(m), rows, n, Dv, sc.Vt.data());
          blk.k = sc.Kt.data(), blk.v = sc.Vt.data(), blk.ldk = D, blk.ldv = Dv, blk.n = n;
          blk.mask_bias = nullptr;
          const int64_t n_next = std::min(block_keys, kept - c0 - block_keys);
          blk.next_n = std::max<int64_t>(n_next, 0);
          blk.next_rows = n_next > 0 ? rows + block_keys : nullptr;
          blk.next_k = n_next > 0 ? kbase : nullptr, blk.next_v = n_next > 0 ? vbase : nullptr;
          blk.next_k_stride = ks.row_stride(m) * sizeof(scalar_t), blk.next_v_stride = vs.row_stride(m) * sizeof(scalar_t);
          blk.next_row_bytes_k = D * sizeof(scalar_t), blk.next_row_bytes_v = Dv * sizeof(scalar_t);
          for (int64_t r = 0; r < rp; ++r) sc.limit[r] = sc.visible[r] > 0 ? static_cast<int>(n) : 0;
          isa.attention_fwd_block(blk);
        }
        continue;
      }
      blk.next_rows = nullptr;
      for (int64_t j0 = p.first_key(b, m); j0 < max_visible; j0 += block_keys) {
        const int64_t n = std::min(block_keys, max_visible - j0);
        if (!mask_bias(sc.mbias.data(), mask, j0, n)) continue;  // a fully masked block changes nothing
        // The next block: this segment's, the start of the next segment's, or the upcoming task's first.
        const bool last = j0 + block_keys >= max_visible;
        const bool next_task = last && m + 1 == M;
        const int64_t mn = next_task ? 0 : last ? m + 1 : m;
        const int64_t bn = next_task ? b_up : b, kvhn = next_task ? kvh_up : kvh;
        const int64_t next = last ? 0 : j0 + block_keys;
        const int64_t n_next = next_task ? n_up
                               : std::min(block_keys, (last ? p.kv_len[b * M + mn] : max_visible) - next);
        int64_t ldk, ldv;
        blk.k = load_rows<scalar_t, float>(kbase, ks.row_stride(m), j0, n, D, sc.Kt.data(), &ldk);
        blk.v = load_rows<scalar_t, float>(vbase, vs.row_stride(m), j0, n, Dv, sc.Vt.data(), &ldv);
        blk.ldk = ldk, blk.ldv = ldv;
        blk.next_n = std::max<int64_t>(n_next, 0);
        blk.next_k = n_next > 0 ? ks.rows(mn, bn, kvhn) + next * ks.row_stride(mn) : nullptr;
        blk.next_v = n_next > 0 ? vs.rows(mn, bn, kvhn) + next * vs.row_stride(mn) : nullptr;
        blk.next_k_stride = n_next > 0 ? ks.row_stride(mn) * sizeof(scalar_t) : 0;
        blk.next_v_stride = n_next > 0 ? vs.row_stride(mn) * sizeof(scalar_t) : 0;
        blk.next_row_bytes_k = D * sizeof(scalar_t), blk.next_row_bytes_v = Dv * sizeof(scalar_t);
        blk.n = n;
        blk.mask_bias = mask ? sc.mbias.data() : nullptr;
        for (int64_t r = 0; r < rp; ++r)
          sc.limit[r] = static_cast<int>(std::clamp<int64_t>(sc.visible[r] - j0, 0, n));
        isa.attention_fwd_block(blk);
      }
    }
    finalise_rows<scalar_t, float>(p, b, kvh, i0, i1, iv1, sc.row_sum.data(), sc.row_max.data(),
                                   sc.acc_t.data(), 1, rp, out, lse, out_raw);
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
    at::Tensor* raw = head_gate.has_value() ? &out_raw : nullptr;
    if constexpr (std::is_same_v<at::opmath_type<scalar_t>, float>) {
      cross_modal_attention_fwd_tiles<scalar_t>(p, q, keys, values, scale, out, lse, raw);
    } else {
      cross_modal_attention_fwd_gemm<scalar_t>(p, q, keys, values, scale, out, lse, raw);
    }
  });
  return {out, lse, out_raw};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) { m.impl("cross_modal_attention_fwd", &cross_modal_attention_fwd_cpu); }

}  // namespace mmkernels::cpu
