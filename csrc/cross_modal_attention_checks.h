// Argument checks of the cross_modal_attention ops, shared by the CPU and CUDA kernels: one
// place for every shape, dtype and device rule and its message. What each device then does with
// the arguments (reading lengths on the host, packing device pointers) stays beside its kernels.
// Host only (torch headers); the Python entry point checks the same rules first with friendlier
// messages, so these guard the raw ops (torch.ops.mmkernels.*).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "common/limits.h"

namespace mmkernels {

struct CrossModalAttentionSizes {
  int64_t B = 0, Lq = 0, Hq = 0, Hkv = 0, D = 0, Dv = 0, M = 0, G = 1;
  std::vector<int64_t> Lk;  // (M,) padded segment lengths
};

inline bool is_float_dtype(at::ScalarType st, bool float64) {
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (float64 && st == at::kDouble);
}

// max_head_dim: the largest D and Dv the backend runs (0: any); float64: whether it runs fp64.
inline CrossModalAttentionSizes check_cross_modal_attention_args(
    const at::Tensor& q, at::TensorList keys, at::TensorList values,
    const std::optional<at::Tensor>& kv_lengths, const std::optional<at::Tensor>& q_lengths,
    const std::optional<at::Tensor>& modality_bias, const std::optional<at::Tensor>& head_gate, bool causal,
    int64_t max_head_dim, bool float64) {
  const char* dtypes = float64 ? "float32/float64/float16/bfloat16" : "float32/float16/bfloat16";
  CrossModalAttentionSizes s;
  TORCH_CHECK(q.dim() == 4, "q: expected (B, Lq, Hq, D), got ", q.sizes());
  TORCH_CHECK(is_float_dtype(q.scalar_type(), float64), "q: expected ", dtypes, ", got ", q.scalar_type());
  s.B = q.size(0), s.Lq = q.size(1), s.Hq = q.size(2), s.D = q.size(3);
  s.M = static_cast<int64_t>(keys.size());
  TORCH_CHECK(s.M >= 1 && s.M <= kMaxSegments, "keys: expected 1 to ", kMaxSegments, " segments, got ", s.M);
  TORCH_CHECK(values.size() == keys.size(), "values: expected ", s.M, " tensors, got ", values.size());
  for (int64_t m = 0; m < s.M; ++m) {
    const at::Tensor& k = keys[m];
    const at::Tensor& v = values[m];
    TORCH_CHECK(k.dim() == 4 && v.dim() == 4, "keys/values[", m, "]: expected 4-D tensors");
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "keys/values[", m,
                "]: dtype must match q (", q.scalar_type(), ")");
    TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "keys/values[", m, "]: expected q's device ",
                q.device());
    if (m == 0) s.Hkv = k.size(2), s.Dv = v.size(3);
    TORCH_CHECK(k.size(0) == s.B && k.size(2) == s.Hkv && k.size(3) == s.D, "keys[", m, "]: expected (", s.B,
                ", Lk, ", s.Hkv, ", ", s.D, "), got ", k.sizes());
    TORCH_CHECK(v.size(0) == s.B && v.size(1) == k.size(1) && v.size(2) == s.Hkv && v.size(3) == s.Dv, "values[",
                m, "]: expected (", s.B, ", ", k.size(1), ", ", s.Hkv, ", ", s.Dv, "), got ", v.sizes());
    s.Lk.push_back(k.size(1));
  }
  TORCH_CHECK(s.Hkv >= 1 && s.Hq % s.Hkv == 0, "q/keys: Hq (", s.Hq, ") must be a multiple of Hkv (", s.Hkv, ")");
  s.G = s.Hq / s.Hkv;
  if (max_head_dim > 0) {
    TORCH_CHECK(s.D >= 1 && s.D <= max_head_dim && s.Dv >= 1 && s.Dv <= max_head_dim,
                "q/values: head dims D and Dv must be in [1, ", max_head_dim, "], got D=", s.D, " Dv=", s.Dv);
  }
  TORCH_CHECK(!causal || s.M == 1, "causal=True requires exactly one key/value segment, got ", s.M);
  const auto check_lengths = [&](const std::optional<at::Tensor>& t, const char* name, std::vector<int64_t> shape) {
    if (!t.has_value() || !t->defined()) return;
    TORCH_CHECK(t->device() == q.device(), name, ": expected q's device ", q.device());
    TORCH_CHECK(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong, name, ": expected int32/int64, got ",
                t->scalar_type());
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), name, ": expected ", at::IntArrayRef(shape), ", got ",
                t->sizes());
  };
  check_lengths(kv_lengths, "kv_lengths", {s.B, s.M});
  check_lengths(q_lengths, "q_lengths", {s.B});
  const auto check_param = [&](const std::optional<at::Tensor>& t, const char* name, std::vector<int64_t> shape) {
    if (!t.has_value() || !t->defined()) return;
    TORCH_CHECK(t->device() == q.device(), name, ": expected q's device ", q.device());
    TORCH_CHECK(is_float_dtype(t->scalar_type(), float64), name, ": expected ", dtypes, ", got ", t->scalar_type());
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), name, ": expected ", at::IntArrayRef(shape), ", got ",
                t->sizes());
  };
  check_param(modality_bias, "modality_bias", {s.Hq, s.M});
  check_param(head_gate, "head_gate", {s.Hq});
  return s;
}

// kv_masks: None or M bool (B, Lk_m) tensors on q's device.
inline void check_kv_masks(const std::optional<at::TensorList>& kv_masks, const at::Tensor& q,
                           const CrossModalAttentionSizes& s) {
  if (!kv_masks.has_value()) return;
  TORCH_CHECK(static_cast<int64_t>(kv_masks->size()) == s.M, "kv_masks: expected ", s.M, " masks, got ",
              kv_masks->size());
  for (int64_t m = 0; m < s.M; ++m) {
    const at::Tensor& t = (*kv_masks)[m];
    TORCH_CHECK(t.scalar_type() == at::kBool, "kv_masks[", m, "]: expected bool, got ", t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), "kv_masks[", m, "]: expected q's device ", q.device());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == s.B && t.size(1) == s.Lk[m], "kv_masks[", m, "]: expected (", s.B, ", ",
                s.Lk[m], "), got ", t.sizes());
  }
}

}  // namespace mmkernels
