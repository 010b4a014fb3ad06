// Small row-major GEMM used by the CPU kernels on thread-local tiles.
// Uses the Fortran BLAS that libtorch_cpu exports (MKL's sgemm_/dgemm_ on x86 wheels) through
// weak symbols, so the extension still loads when they are absent; then (or with
// MMKERNELS_CPU_NO_BLAS=1) a portable loop kernel is used.
#pragma once

#include <cstdint>

namespace mmkernels::cpu {

// Row-major C(MxN) = alpha * op(A) op(B) + beta * C, op = transpose when ta / tb.
// lda/ldb/ldc are row strides (elements) of the matrices as stored (before op).
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
          int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

// Whether an external BLAS serves gemm() (for `python -m mmkernels.info` style reporting).
bool have_external_blas();

}  // namespace mmkernels::cpu
