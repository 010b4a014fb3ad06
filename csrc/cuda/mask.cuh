// Masking and bias shared by every attention kernel body (forward, dQ, dK/dV) and so by every tile
// policy: which keys of a segment a query row sees, and the modality bias in the log2 units the
// kernels' exp2 works in. The causal rule is the CPU kernels' one
// (causal_visible_keys in csrc/common/online_softmax.h): bottom-right aligned on the valid lengths.
#pragma once

#include <cstdint>

#include "cuda_common.cuh"

namespace mmkernels {
namespace cuda {

// Causal: query row i (of q_len valid rows) sees key j (of kv_len valid keys) iff j <= i + offset.
__device__ __forceinline__ int64_t causal_offset(int64_t kv_len, int64_t q_len) { return kv_len - q_len; }

// Whether query row `row` sees key `col` (absolute positions), given the caller's in-range test.
// Row and Col keep the caller's index types (32-bit in the inner loops): widening them here
// costs registers (spills in the 64x64 forward).
template <typename Row, typename Col>
__device__ __forceinline__ bool key_visible(const AttnParams& p, bool in_range, Row row, Col col, int64_t offset) {
  return in_range && (!p.causal || col <= row + offset);
}

// The key mask of sample b in segment m (kv_masks), or none: every key.
struct KeyMask {
  const uint8_t* row;  // nullptr: no mask
  __device__ __forceinline__ bool keeps(int64_t j) const { return row == nullptr || row[j] != 0; }
};

__device__ __forceinline__ KeyMask key_mask(const AttnParams& p, int b, int m) {
  const Segment& s = p.seg[m];
  return {s.mask ? s.mask + (int64_t)b * s.mask_sb : nullptr};
}

// Whether any of the n keys from j0 is kept, the same answer in every thread of the CTA (a block
// barrier when there is a mask: call from uniform control flow). Tiles it says no to are skipped.
__device__ __forceinline__ bool tile_has_key(const KeyMask& km, int64_t j0, int n) {
  if (km.row == nullptr) return true;  // uniform: no barrier needed
  bool any = false;
  for (int j = threadIdx.x; j < n; j += blockDim.x) any |= km.row[j0 + j] != 0;
  return __syncthreads_or(any) != 0;
}

// modality_bias[h, m] in log2 units (0 without a bias).
__device__ __forceinline__ float bias_log2(const AttnParams& p, int h, int m) {
  return p.bias ? p.bias[h * p.num_seg + m] * kLog2e : 0.f;
}

}  // namespace cuda
}  // namespace mmkernels
