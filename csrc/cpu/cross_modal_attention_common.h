// Shared input handling of the CPU cross-modal attention kernels (forward and backward).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../cross_modal_attention_checks.h"
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
  std::vector<at::Tensor> masks;  // (M,) contiguous bool (B, Lk_m), or empty: every key within kv_len
  std::vector<int64_t> key_start;  // (B*M,) first kept key, or empty without masks (see read_key_masks)
  std::vector<int64_t> key_end;    // (B*M,) end of the kept keys, or empty without masks
  std::vector<uint8_t> masked;     // (B*M,) whether the mask of (b, m) is still needed in [key_start, key_end)
  bool causal = false;

  double bias_at(int64_t h, int64_t m) const { return bias.empty() ? 0.0 : bias[h * M + m]; }
  double gate_at(int64_t h) const { return gate_t.empty() ? 1.0 : gate_t[h]; }
  // Key mask of sample b in segment m (True = attend), or nullptr when there are none or it keeps
  // every key of [first_key, key_end).
  const bool* mask_row(int64_t b, int64_t m) const {
    return masks.empty() || !masked[b * M + m] ? nullptr : masks[m].data_ptr<bool>() + b * Lk[m];
  }
  // The first key of segment m that sample b keeps (0 without masks): key blocks start there, and the
  // keys before it get zero gradients, so left padding costs no partly masked block and no mask.
  int64_t first_key(int64_t b, int64_t m) const { return key_start.empty() ? 0 : key_start[b * M + m]; }
  // Number of keys of segment m visible to query i of sample b (before the key mask).
  int64_t visible(int64_t b, int64_t m, int64_t i) const {
    const int64_t kl = kv_len[b * M + m];
    const int64_t n = causal ? static_cast<int64_t>(causal_visible_keys(i, q_len[b], kl)) : kl;
    return key_end.empty() ? n : std::min(n, key_end[b * M + m]);
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

// Per (b, m), from its key mask: the first kept key and the end of the kept keys (one past the last True
// within kv_len). Every query's visible keys end at the latter (blocks past it are skipped) and the key
// blocks start at the former; the mask itself is still needed only where it hides a key between the two
// (not for right or left padding, or both: an encoder's or a left-padded decoder's padding mask then
// costs no mask bias and no gather). kv_len itself is left alone: it sets the causal offset, which the
// masks must not move.
inline void read_key_masks(CrossModalAttentionProblem& p) {
  p.key_start.assign(static_cast<size_t>(p.B * p.M), 0);
  p.key_end.assign(static_cast<size_t>(p.B * p.M), 0);
  p.masked.assign(static_cast<size_t>(p.B * p.M), 0);
  bool any_needed = false;
  for (int64_t m = 0; m < p.M; ++m) {
    const bool* base = p.masks[m].data_ptr<bool>();
    for (int64_t b = 0; b < p.B; ++b) {
      const bool* row = base + b * p.Lk[m];
      const int64_t n = p.kv_len[b * p.M + m];
      int64_t end = n;
      while (end > 0 && !row[end - 1]) --end;
      int64_t start = 0;
      while (start < end && !row[start]) ++start;
      int64_t run = start;
      while (run < end && row[run]) ++run;
      p.key_start[b * p.M + m] = start;
      p.key_end[b * p.M + m] = end;
      p.masked[b * p.M + m] = run < end;
      any_needed = any_needed || run < end;
    }
  }
  if (!any_needed) p.masks.clear();
}

inline CrossModalAttentionProblem make_problem(const at::Tensor& q, at::TensorList keys, at::TensorList values,
                               const std::optional<at::Tensor>& kv_lengths,
                               const std::optional<at::Tensor>& q_lengths,
                               const std::optional<at::Tensor>& modality_bias,
                               const std::optional<at::Tensor>& head_gate, bool causal,
                               const std::optional<at::TensorList>& kv_masks) {
  CrossModalAttentionProblem p;
  const CrossModalAttentionSizes s = check_cross_modal_attention_args(
      q, keys, values, kv_lengths, q_lengths, modality_bias, head_gate, causal, /*max_head_dim=*/0, /*float64=*/true);
  check_kv_masks(kv_masks, q, s);
  if (kv_masks.has_value())
    for (const at::Tensor& t : *kv_masks) p.masks.push_back(t.contiguous());
  p.B = s.B, p.Lq = s.Lq, p.Hq = s.Hq, p.Hkv = s.Hkv, p.D = s.D, p.Dv = s.Dv, p.M = s.M, p.G = s.G;
  p.Lk = s.Lk;
  p.causal = causal;

  if (kv_lengths.has_value()) {
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
    p.q_len = read_lengths(q_lengths, p.B, "q_lengths");
    for (auto& v : p.q_len) v = std::clamp<int64_t>(v, 0, p.Lq);
  } else {
    p.q_len.assign(static_cast<size_t>(p.B), p.Lq);
  }
  if (!p.masks.empty()) read_key_masks(p);
  if (modality_bias.has_value()) {
    const at::Tensor c = modality_bias->to(at::kCPU, at::kDouble).contiguous();
    p.bias.assign(c.data_ptr<double>(), c.data_ptr<double>() + p.Hq * p.M);
  }
  if (head_gate.has_value()) {
    const at::Tensor c = head_gate->to(at::kCPU, at::kDouble).contiguous();
    p.gate_t.resize(static_cast<size_t>(p.Hq));
    for (int64_t h = 0; h < p.Hq; ++h) p.gate_t[h] = std::tanh(c.data_ptr<double>()[h]);
  }
  return p;
}

// The key mask of keys [j0, j0 + n) as an additive bias: 0 where kept, -inf where masked (exp
// gives exactly 0). Built once per key block; adding it to each row's scores is a plain vector add.
// Returns whether any key of the block is kept (without a mask: every key, and nothing is written).
template <typename acc_t>
inline bool mask_bias(acc_t* out, const bool* mask, int64_t j0, int64_t n) {
  if (mask == nullptr) return true;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  bool any = false;
  for (int64_t j = 0; j < n; ++j) {
    out[j] = mask[j0 + j] ? acc_t(0) : ninf;
    any = any || mask[j0 + j];
  }
  return any;
}

template <typename acc_t>
inline void add_mask_bias(acc_t* __restrict__ s, const acc_t* __restrict__ bias, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] += bias[j];
}

// The fp32 paths gather a segment's unmasked keys into packed blocks when at least this fraction of
// its visible keys is masked (holes from padded patches, left padding): the masked keys are then neither
// read nor computed, for the price of copying the kept rows. Not under causal masking, where each row
// sees its own prefix of key positions.
constexpr double kCompactMaskedFraction = 0.125;

// The positions below `visible` that `mask` keeps, into `kept`; false (and kept unspecified) where too
// few are masked for gathering to pay (kCompactMaskedFraction).
inline bool compact_keys(const bool* mask, int64_t visible, std::vector<int>& kept) {
  int64_t n_kept = 0;
  for (int64_t j = 0; j < visible; ++j) n_kept += mask[j];
  if (visible == 0 || static_cast<double>(visible - n_kept) < kCompactMaskedFraction * static_cast<double>(visible))
    return false;
  kept.resize(n_kept);
  for (int64_t j = 0, c = 0; j < visible; ++j)
    if (mask[j]) kept[c++] = static_cast<int>(j);
  return true;
}

// Rows rows[0..n) of a (B, L, H, W) tensor at fixed (b, h) (from `base`), as a packed float matrix n x W.
template <typename scalar_t>
inline void pack_rows(const scalar_t* base, int64_t row_stride, const int* rows, int64_t n, int64_t W, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* src = base + rows[j] * row_stride;
    float* dst = out + j * W;
    if constexpr (std::is_same_v<scalar_t, float>) {
      std::memcpy(dst, src, W * sizeof(float));
    } else {
      for (int64_t d = 0; d < W; ++d) dst[d] = static_cast<float>(src[d]);
    }
  }
}

// Make the last dim unit-stride (the kernels use strides for every other dim).
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// Data pointer and strides of each segment's (B, L, H, W) keys or values.
template <typename scalar_t>
struct SegmentTensors {
  std::vector<const scalar_t*> data;
  std::vector<int64_t> sb, sl, sh;  // batch, row (position) and head strides
  explicit SegmentTensors(at::TensorList ts) {
    for (const at::Tensor& t : ts) {
      data.push_back(t.data_ptr<scalar_t>());
      sb.push_back(t.stride(0)), sl.push_back(t.stride(1)), sh.push_back(t.stride(2));
    }
  }
  // Row 0 of segment m at (b, h); row j is at row_stride(m) * j from it.
  const scalar_t* rows(int64_t m, int64_t b, int64_t h) const { return data[m] + b * sb[m] + h * sh[m]; }
  int64_t row_stride(int64_t m) const { return sl[m]; }
};

// Rows [j0, j0 + n) of a (B, L, H, W) tensor at fixed (b, h), as an acc_t matrix: a direct
// pointer when no conversion is needed and the row stride is at least W, otherwise a copy
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

constexpr size_t kKeptScratchBytes = size_t(4) << 20;

template <typename T>
void trim_scratch(std::vector<T>& v) {
  if (v.capacity() * sizeof(T) > kKeptScratchBytes) std::vector<T>().swap(v);
}

// Runs body(task, scratch) for task in [0, n) on the intra-op thread pool with dynamic
// scheduling (tasks differ in cost through padding, and a busy machine may stall one thread).
// Each worker's `Scratch` (tile buffers) is its thread's own, kept from call to call and sized by
// size_scratch(scratch) (vectors resized: they only grow): no allocation per call once grown. Freeing
// per call also let glibc trim its heap, so that the next op's outputs page-faulted in again.
// Results do not depend on which worker runs a task, so the kernels stay deterministic.
// Scratch sized by the input's length (not by a tile) calls trim_scratch on it from trim(): a buffer
// past kKeptScratchBytes is freed after the call rather than kept by the thread.
template <typename Scratch, typename SizeScratch, typename Body>
void parallel_tasks(int64_t n, const SizeScratch& size_scratch, const Body& body) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    static thread_local Scratch scratch;
    size_scratch(scratch);
    if constexpr (std::is_invocable_v<const Body&, int64_t, int64_t, Scratch&>) {
      // body(task, upcoming, scratch): each worker claims its next task one ahead (-1: none), so a task
      // can prefetch what the next one reads first.
      int64_t t = next.fetch_add(1);
      while (t < n) {
        const int64_t upcoming = next.fetch_add(1);
        body(t, upcoming < n ? upcoming : int64_t(-1), scratch);
        t = upcoming;
      }
    } else {
      for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) body(t, scratch);
    }
    scratch.trim();
  });
}

}  // namespace mmkernels::cpu
