// Shared input handling of the CPU cross-modal attention kernels (forward and backward).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include "../common/limits.h"
#include "../common/online_softmax.h"

namespace mmkernels::cpu {

// Everything the kernels need besides the data pointers, read once on the host.
struct CrossModalAttentionProblem {
  int64_t B = 0, Lq = 0, Hq = 0, Hkv = 0, D = 0, Dv = 0, M = 0, G = 1;
  std::vector<int64_t> Lk;      // (M,) segment lengths (padded)
  std::vector<int64_t> kv_len;  // (B*M,) valid keys, clamped to [0, Lk_m]
  std::vector<int64_t> q_len;   // (B,) valid queries, clamped to [0, Lq]
  std::vector<double> bias;     // (Hq*M,) or empty
  std::vector<double> gate_t;   // (Hq,) tanh(head_gate) or empty
  bool causal = false;

  double bias_at(int64_t h, int64_t m) const { return bias.empty() ? 0.0 : bias[h * M + m]; }
  double gate_at(int64_t h) const { return gate_t.empty() ? 1.0 : gate_t[h]; }
  // Number of keys of segment m visible to query i of sample b.
  int64_t visible(int64_t b, int64_t m, int64_t i) const {
    const int64_t kl = kv_len[b * M + m];
    return causal ? static_cast<int64_t>(causal_visible_keys(i, q_len[b], kl)) : kl;
  }
};

inline std::vector<int64_t> read_lengths(const std::optional<at::Tensor>& t, int64_t n,
                                         const char* name) {
  std::vector<int64_t> out(static_cast<size_t>(n));
  const at::Tensor c = t->to(at::kCPU, at::kLong).contiguous();
  TORCH_CHECK(c.numel() == n, name, ": expected ", n, " elements, got ", c.numel());
  const int64_t* p = c.data_ptr<int64_t>();
  std::copy(p, p + n, out.begin());
  return out;
}

inline CrossModalAttentionProblem make_problem(const at::Tensor& q, at::TensorList keys, at::TensorList values,
                               const std::optional<at::Tensor>& kv_lengths,
                               const std::optional<at::Tensor>& q_lengths,
                               const std::optional<at::Tensor>& modality_bias,
                               const std::optional<at::Tensor>& head_gate, bool causal) {
  CrossModalAttentionProblem p;
  TORCH_CHECK(q.dim() == 4, "q: expected (B, Lq, Hq, D), got ", q.sizes());
  p.B = q.size(0);
  p.Lq = q.size(1);
  p.Hq = q.size(2);
  p.D = q.size(3);
  p.M = static_cast<int64_t>(keys.size());
  TORCH_CHECK(p.M >= 1 && p.M <= kMaxSegments, "keys: expected 1 to ", kMaxSegments, " segments, got ", p.M);
  TORCH_CHECK(values.size() == keys.size(), "values: expected ", p.M, " tensors, got ",
              values.size());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble ||
                  q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q: expected float32/float64/float16/bfloat16, got ", q.scalar_type());
  for (int64_t m = 0; m < p.M; ++m) {
    const at::Tensor& k = keys[m];
    const at::Tensor& v = values[m];
    TORCH_CHECK(k.dim() == 4 && v.dim() == 4, "keys/values[", m, "]: expected 4-D tensors");
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                "keys/values[", m, "]: dtype must match q (", q.scalar_type(), ")");
    TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu(), "keys/values[", m, "]: not on CPU");
    if (m == 0) {
      p.Hkv = k.size(2);
      p.Dv = v.size(3);
    }
    TORCH_CHECK(k.size(0) == p.B && k.size(2) == p.Hkv && k.size(3) == p.D, "keys[", m,
                "]: expected (", p.B, ", Lk, ", p.Hkv, ", ", p.D, "), got ", k.sizes());
    TORCH_CHECK(v.size(0) == p.B && v.size(1) == k.size(1) && v.size(2) == p.Hkv &&
                    v.size(3) == p.Dv,
                "values[", m, "]: expected (", p.B, ", ", k.size(1), ", ", p.Hkv, ", ", p.Dv,
                "), got ", v.sizes());
    p.Lk.push_back(k.size(1));
  }
  TORCH_CHECK(p.Hkv >= 1 && p.Hq % p.Hkv == 0, "q/keys: Hq (", p.Hq,
              ") must be a multiple of Hkv (", p.Hkv, ")");
  p.G = p.Hq / p.Hkv;
  p.causal = causal;
  TORCH_CHECK(!causal || p.M == 1, "causal=True requires exactly one key/value segment");

  if (kv_lengths.has_value()) {
    TORCH_CHECK(kv_lengths->dim() == 2 && kv_lengths->size(0) == p.B &&
                    kv_lengths->size(1) == p.M,
                "kv_lengths: expected (", p.B, ", ", p.M, "), got ", kv_lengths->sizes());
    p.kv_len = read_lengths(kv_lengths, p.B * p.M, "kv_lengths");
  } else {
    p.kv_len.assign(static_cast<size_t>(p.B * p.M), 0);
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t m = 0; m < p.M; ++m) p.kv_len[b * p.M + m] = p.Lk[m];
  }
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t m = 0; m < p.M; ++m) {
      int64_t& v = p.kv_len[b * p.M + m];
      v = std::clamp<int64_t>(v, 0, p.Lk[m]);
    }
  if (q_lengths.has_value()) {
    TORCH_CHECK(q_lengths->dim() == 1 && q_lengths->size(0) == p.B, "q_lengths: expected (",
                p.B, ",), got ", q_lengths->sizes());
    p.q_len = read_lengths(q_lengths, p.B, "q_lengths");
    for (auto& v : p.q_len) v = std::clamp<int64_t>(v, 0, p.Lq);
  } else {
    p.q_len.assign(static_cast<size_t>(p.B), p.Lq);
  }
  if (modality_bias.has_value()) {
    TORCH_CHECK(modality_bias->dim() == 2 && modality_bias->size(0) == p.Hq &&
                    modality_bias->size(1) == p.M,
                "modality_bias: expected (", p.Hq, ", ", p.M, "), got ",
                modality_bias->sizes());
    const at::Tensor c = modality_bias->to(at::kCPU, at::kDouble).contiguous();
    p.bias.assign(c.data_ptr<double>(), c.data_ptr<double>() + p.Hq * p.M);
  }
  if (head_gate.has_value()) {
    TORCH_CHECK(head_gate->dim() == 1 && head_gate->size(0) == p.Hq, "head_gate: expected (",
                p.Hq, ",), got ", head_gate->sizes());
    const at::Tensor c = head_gate->to(at::kCPU, at::kDouble).contiguous();
    p.gate_t.resize(static_cast<size_t>(p.Hq));
    for (int64_t h = 0; h < p.Hq; ++h) p.gate_t[h] = std::tanh(c.data_ptr<double>()[h]);
  }
  return p;
}

// Make the last dim unit-stride (the kernels use strides for every other dim).
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// Rows [j0, j0 + n) of a (B, L, H, W) tensor at fixed (b, h), as an acc_t matrix: a direct
// pointer when no conversion is needed and the row stride is BLAS-compatible, otherwise a copy
// into `buf` (n x W, ld = W).
template <typename scalar_t, typename acc_t>
inline const acc_t* load_rows(const scalar_t* base, int64_t row_stride, int64_t j0, int64_t n,
                              int64_t W, acc_t* buf, int64_t* ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (row_stride >= W && row_stride > 0) {
      *ld = row_stride;
      return base + j0 * row_stride;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* src = base + (j0 + j) * row_stride;
    acc_t* dst = buf + j * W;
    for (int64_t d = 0; d < W; ++d) dst[d] = static_cast<acc_t>(src[d]);
  }
  *ld = W;
  return buf;
}

// Runs body(task, scratch) for task in [0, n) on the intra-op thread pool with dynamic
// scheduling (tasks differ in cost through padding, and a busy machine may stall one thread).
// Each worker builds one `Scratch` (thread-local tile buffers) with make_scratch(). Results do
// not depend on which worker runs a task, so the kernels stay deterministic.
template <typename MakeScratch, typename Body>
void parallel_tasks(int64_t n, const MakeScratch& make_scratch, const Body& body) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) body(t, scratch);
  });
}

}  // namespace mmkernels::cpu
