// Softmax pieces shared by the attention kernels: the 8-lane row reductions of the thread layout
// tid = rg * 8 + cg (the 8 threads of a query row are consecutive lanes), and the probability of a
// logit from its row's log-sum-exp that the backward kernels recompute. All in log2 units: the
// kernels work with exp2 (logits scaled by scale * log2(e), lse by log2(e)).
#pragma once

#include "cuda_common.cuh"

namespace mmkernels {
namespace cuda {

__device__ __forceinline__ float row_max8(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
}

__device__ __forceinline__ float row_sum8(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x + __shfl_xor_sync(0xffffffffu, x, 4);
}

// P = exp2(s * scale_log2 + bias2 - lse2) for a visible key, 0 otherwise (masked keys and rows
// without keys, whose lse is -inf, never reach exp2).
__device__ __forceinline__ float prob_from_lse(bool visible, float s, float scale_log2, float bias2, float lse2) {
  return visible ? exp2f(s * scale_log2 + bias2 - lse2) : 0.f;
}

}  // namespace cuda
}  // namespace mmkernels
