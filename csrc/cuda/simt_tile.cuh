// The two products of the SIMT tile policies (forward, dK/dV, dQ), over fp32 tiles in shared memory
// with the thread layout tid = rg * 8 + cg: a thread's rows r0 + i (consecutive) against columns
// c0 + 8 j (the 8 lanes of its row group).
#pragma once

#include "cuda_common.cuh"

namespace mmkernels {
namespace cuda {

// s[i][j] = sum_{d < n4} A[(r0 + i) * lda + d] * B[(c0 + 8 j) * ldb + d]; n4 a multiple of 4 (the
// tiles are zero-padded to it). S = Q K^T and dP = dO V^T (and their transposes in dK/dV).
template <int NI, int NJ>
__device__ __forceinline__ void simt_dots(float (&s)[NI][NJ], const float* A, int lda, int r0, const float* B,
                                          int ldb, int c0, int n4) {
#pragma unroll
  for (int i = 0; i < NI; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j) s[i][j] = 0.f;
#pragma unroll 2
  for (int d = 0; d < n4; d += 4) {
    float4 a[NI], b[NJ];
#pragma unroll
    for (int i = 0; i < NI; ++i) a[i] = *reinterpret_cast<const float4*>(A + (r0 + i) * lda + d);
#pragma unroll
    for (int j = 0; j < NJ; ++j) b[j] = *reinterpret_cast<const float4*>(B + (c0 + 8 * j) * ldb + d);
#pragma unroll
    for (int i = 0; i < NI; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) s[i][j] += a[i].x * b[j].x + a[i].y * b[j].y + a[i].z * b[j].z + a[i].w * b[j].w;
  }
}

// acc[i][k * 4 + e] += sum_{j < n} P[(r0 + i) * ldp + j] * V[j * ldv + k * 32 + c4 + e], k < DC: O += P V
// in the forward, dQ += dS K in the backward (output columns k * 32 + c4 + e, c4 = cg * 4).
template <int NI, int DC>
__device__ __forceinline__ void simt_accumulate(float (&acc)[NI][DC * 4], const float* P, int ldp, int r0,
                                                const float* V, int ldv, int c4, int n) {
#pragma unroll 4
  for (int j = 0; j < n; ++j) {
    float pj[NI];
#pragma unroll
    for (int i = 0; i < NI; ++i) pj[i] = P[(r0 + i) * ldp + j];
#pragma unroll
    for (int k = 0; k < DC; ++k) {
      const float4 v = *reinterpret_cast<const float4*>(V + j * ldv + k * 32 + c4);
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        acc[i][k * 4 + 0] += pj[i] * v.x;
        acc[i][k * 4 + 1] += pj[i] * v.y;
        acc[i][k * 4 + 2] += pj[i] * v.z;
        acc[i][k * 4 + 3] += pj[i] * v.w;
      }
    }
  }
}

}  // namespace cuda
}  // namespace mmkernels
