// Online-softmax state and merge math shared by the CPU and CUDA attention kernels.
//
// A row's partial softmax over a set of logits s_j is summarised by
//   m = max_j s_j   (-inf when the set is empty)
//   l = sum_j exp(s_j - m)   (0 when empty)
// Two partial states over disjoint sets merge exactly; the final log-sum-exp is m + log(l),
// -inf for an empty row (never NaN).
#pragma once

#include <cmath>
#include <limits>

#include "macros.h"

namespace mmkernels {

template <typename T>
MMK_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// exp(a - b) where b is the running max; returns 0 when a == -inf (including b == -inf).
template <typename T>
MMK_HD T exp_shifted(T a, T b) {
  return a == neg_inf<T>() ? T(0) : std::exp(a - b);
}

template <typename T>
struct SoftmaxState {
  T m;  // running max
  T l;  // running sum of exp(s - m)

  MMK_HD static SoftmaxState empty() { return {neg_inf<T>(), T(0)}; }

  // Factor by which an accumulator built against the old max must be rescaled when the max
  // becomes new_m (new_m >= m). 0 when the old state is empty.
  MMK_HD T rescale_factor(T new_m) const { return exp_shifted(m, new_m); }

  // Merge another partial state; returns (alpha_self, alpha_other): the factors by which this
  // state's and the other's accumulators must be multiplied to be expressed against the merged max.
  MMK_HD void merge(const SoftmaxState& o, T* alpha_self, T* alpha_other) {
    T nm = m > o.m ? m : o.m;
    T a = exp_shifted(m, nm);
    T b = exp_shifted(o.m, nm);
    l = l * a + o.l * b;
    m = nm;
    if (alpha_self) *alpha_self = a;
    if (alpha_other) *alpha_other = b;
  }

  // log-sum-exp of the row: -inf if empty.
  MMK_HD T lse() const { return (l > T(0)) ? m + std::log(l) : neg_inf<T>(); }

  // 1 / l, or 0 for an empty row (so the output row is exactly 0).
  MMK_HD T inv_l() const { return (l > T(0)) ? T(1) / l : T(0); }
};

// Causal masking, bottom-right aligned on the valid lengths: query i (< q_len) sees key j iff
// j <= i + (kv_len - q_len). Returns the number of visible keys (clamped to [0, kv_len]).
MMK_HD long long causal_visible_keys(long long i, long long q_len, long long kv_len) {
  long long lim = i + 1 + (kv_len - q_len);
  if (lim < 0) lim = 0;
  if (lim > kv_len) lim = kv_len;
  return lim;
}

}  // namespace mmkernels
