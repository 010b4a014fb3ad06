// The two CPU backward paths of mmkernels::cross_modal_attention_bwd and what they share:
// fp32 accumulation on the level's register tiles (cross_modal_attention_bwd_tiles.cpp), fp64 on BLAS
// products (cross_modal_attention_bwd.cpp, which also holds the op's entry point).
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/core/ScalarType.h>

#include <vector>

#include "cross_modal_attention_common.h"

namespace mmkernels::cpu {

constexpr int64_t kBwdRows = 64;   // row block (query positions x grouped heads)
constexpr int64_t kBwdKeys = 128;  // key block


// The per-task partials reduced over the batch in a fixed order (deterministic).
template <typename acc_t>
inline void reduce_partials(const CrossModalAttentionProblem& p, const std::vector<double>& gb_part,
                     const std::vector<double>& gg_part, at::Tensor& gbias, at::Tensor& ggate) {
  const int64_t B = p.B, Hq = p.Hq, M = p.M;
  acc_t* gbp = gbias.data_ptr<acc_t>();
  acc_t* ggp = ggate.data_ptr<acc_t>();
  if (!p.bias.empty()) {
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t m = 0; m < M; ++m) {
        double s = 0;
        for (int64_t b = 0; b < B; ++b) s += gb_part[(b * Hq + h) * M + m];
        gbp[h * M + m] = static_cast<acc_t>(s);
      }
  }
  if (!p.gate_t.empty()) {
    for (int64_t h = 0; h < Hq; ++h) {
      double s = 0;
      for (int64_t b = 0; b < B; ++b) s += gg_part[b * Hq + h];
      const double tt = p.gate_t[h];
      ggp[h] = static_cast<acc_t>((1.0 - tt * tt) * s);
    }
  }
}

// What both paths read per query row: q, grad_out and out_ungated as stored, lse and grad_lse in acc_t.
// Pointers and strides are read once here: tensor accessors per row cost more than the row's work at
// small head dims.
template <typename scalar_t, typename acc_t>
struct BwdRowReader {
  struct Rows {
    const scalar_t* data;
    int64_t sb, sl, sh;
    const scalar_t* at(int64_t b, int64_t i, int64_t h) const { return data + b * sb + i * sl + h * sh; }
  };
  at::Tensor lse, glse;
  const acc_t* lsep;
  const acc_t* glp = nullptr;
  int64_t sgl0 = 0, sgl1 = 0, sgl2 = 0;
  Rows q, go, o_raw;
  int64_t D, Dv, Hq;

  static Rows rows_of(const at::Tensor& t) { return Rows{t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2)}; }

  BwdRowReader(const at::Tensor& q_, const at::Tensor& go_, const at::Tensor& o_raw_, const at::Tensor& lse_in,
               const at::Tensor* glse_in)
      : q(rows_of(q_)), go(rows_of(go_)), o_raw(rows_of(o_raw_)), D(q_.size(3)), Dv(go_.size(3)), Hq(q_.size(2)) {
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    lse = lse_in.to(lse_in.options().dtype(acc_type)).contiguous();
    lsep = lse.data_ptr<acc_t>();
    if (glse_in) {
      glse = glse_in->to(glse_in->options().dtype(acc_type));
      glp = glse.data_ptr<acc_t>(), sgl0 = glse.stride(0), sgl1 = glse.stride(1), sgl2 = glse.stride(2);
    }
  }

  // Query row (b, i) of head h with the head's gate gt: put_q(d, q * scale) for d < D and
  // put_do(d, gt * grad_out) for d < Dv; returns dot(grad_out, out_ungated) (the gate's gradient
  // partial) and sets *lse_out and *di_out = gt * dot - grad_lse (FlashAttention-2's D_i).
  template <typename PutQ, typename PutDo>
  acc_t read(int64_t b, int64_t i, int64_t h, int64_t Lq, acc_t scale, acc_t gt, PutQ&& put_q, PutDo&& put_do,
             acc_t* lse_out, acc_t* di_out) const {
    const scalar_t* qs = q.at(b, i, h);
    const scalar_t* gs = go.at(b, i, h);
    const scalar_t* os = o_raw.at(b, i, h);
    for (int64_t d = 0; d < D; ++d) put_q(d, static_cast<acc_t>(qs[d]) * scale);
    acc_t dot = 0;
    for (int64_t d = 0; d < Dv; ++d) {
      const acc_t gv = static_cast<acc_t>(gs[d]);
      dot += gv * static_cast<acc_t>(os[d]);
      put_do(d, gt * gv);
    }
    *lse_out = lsep[(b * Hq + h) * Lq + i];
    *di_out = gt * dot - (glp ? glp[b * sgl0 + h * sgl1 + i * sgl2] : acc_t(0));
    return dot;
  }
};

// Rows [from, to) of a gradient (row stride ld, W elements each) set to zero: keys no query sees.
template <typename scalar_t>
inline void zero_grad_rows(scalar_t* base, int64_t ld, int64_t W, int64_t from, int64_t to) {
  for (int64_t j = from; j < to; ++j)
    for (int64_t d = 0; d < W; ++d) base[j * ld + d] = scalar_t(0);
}

// dQ of sample b's query heads sharing kv head kvh from a task's rows (row r <-> position r / G, head
// kvh * G + r % G; element d is value(r, d)) times scale; positions from ql on get 0.
template <typename scalar_t, typename acc_t, typename Value>
inline void write_dq_rows(const CrossModalAttentionProblem& p, at::Tensor& dq, int64_t b, int64_t kvh, int64_t ql,
                          acc_t scale, Value&& value) {
  const int64_t sl = dq.stride(1), sh = dq.stride(2), D = p.D;
  scalar_t* base = dq.data_ptr<scalar_t>() + b * dq.stride(0) + kvh * p.G * sh;
  for (int64_t i = 0; i < p.Lq; ++i) {
    for (int64_t g = 0; g < p.G; ++g) {
      scalar_t* dst = base + i * sl + g * sh;
      const int64_t r = i * p.G + g;
      if (i >= ql) {
        for (int64_t d = 0; d < D; ++d) dst[d] = scalar_t(0);
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(value(r, d) * scale);
      }
    }
  }
}

// What both paths read and write: the op's inputs with unit-stride last dims, grad_lse where given, and
// the outputs, allocated by the entry point (dq, dk, dv uninitialised; gbias, ggate zeroed).
struct BwdTensors {
  at::Tensor go;
  const at::Tensor* glse;
  at::Tensor q;
  std::vector<at::Tensor> keys, values;
  at::Tensor o_raw, lse;
  double scale;
  at::Tensor dq;
  std::vector<at::Tensor> dk, dv;
  at::Tensor gbias, ggate;
};

// The fp32-accumulation path (float, half, bfloat16).
template <typename scalar_t>
void cross_modal_attention_bwd_tiles(const CrossModalAttentionProblem& p, BwdTensors& io);

}  // namespace mmkernels::cpu
