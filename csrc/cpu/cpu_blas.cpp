#include "cpu_blas.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

extern "C" {
// Fortran BLAS (LP64), as exported by libtorch_cpu's MKL / OpenBLAS. Weak: may be null.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc)
    __attribute__((weak));
}

namespace mmkernels::cpu {
namespace {

bool blas_disabled() {
  static const bool disabled = [] {
    const char* v = std::getenv("MMKERNELS_CPU_NO_BLAS");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return disabled;
}

// Portable fallback: C = alpha * op(A) op(B) + beta * C, row-major.
template <typename T>
void gemm_loops(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (beta == T(0)) {
      std::fill(c, c + N, T(0));
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
  }
  if (K == 0 || alpha == T(0)) return;
  if (!tb) {
    // rows of B are contiguous along N: axpy form, vectorises over j.
    for (int64_t i = 0; i < M; ++i) {
      T* c = C + i * ldc;
      for (int64_t k = 0; k < K; ++k) {
        const T a = alpha * (ta ? A[k * lda + i] : A[i * lda + k]);
        const T* b = B + k * ldb;
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
      }
    }
  } else {
    // B is (N x K): dot products along k.
    for (int64_t i = 0; i < M; ++i) {
      T* c = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) {
        const T* b = B + j * ldb;
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        int64_t k = 0;
        if (!ta) {
          const T* a = A + i * lda;
          for (; k + 4 <= K; k += 4) {
            s0 += a[k] * b[k];
            s1 += a[k + 1] * b[k + 1];
            s2 += a[k + 2] * b[k + 2];
            s3 += a[k + 3] * b[k + 3];
          }
          for (; k < K; ++k) s0 += a[k] * b[k];
        } else {
          for (; k < K; ++k) s0 += A[k * lda + i] * b[k];
        }
        c[j] += alpha * ((s0 + s1) + (s2 + s3));
      }
    }
  }
}

template <typename T, typename F>
void gemm_dispatch(F* blas, bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha,
                   const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  // Leading dimensions of the column-major view; BLAS requires ld >= max(1, rows).
  const int64_t need_a = std::max<int64_t>(1, ta ? M : K);
  const int64_t need_b = std::max<int64_t>(1, tb ? K : N);
  const bool fits = lda >= need_a && ldb >= need_b && ldc >= N && K > 0 && M < (1LL << 31) &&
                    N < (1LL << 31) && K < (1LL << 31) && lda < (1LL << 31) &&
                    ldb < (1LL << 31) && ldc < (1LL << 31);
  if (blas != nullptr && fits && !blas_disabled()) {
    // Row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T-view ... : swap A/B and M/N.
    const char tA = ta ? 'T' : 'N';
    const char tB = tb ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    blas(&tB, &tA, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  gemm_loops<T>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_dispatch<float>(&sgemm_ ? sgemm_ : nullptr, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta,
                       C, ldc);
}

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
          int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  gemm_dispatch<double>(&dgemm_ ? dgemm_ : nullptr, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta,
                        C, ldc);
}

bool have_external_blas() { return (&sgemm_ != nullptr) && !blas_disabled(); }

}  // namespace mmkernels::cpu
