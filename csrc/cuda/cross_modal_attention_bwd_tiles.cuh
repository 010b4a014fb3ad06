// Tile policies of the backward kernels (cross_modal_attention_bwd_kernels.cuh): the products of
// a tile and where their operands live. The kernel bodies own the traversal, the masking and the
// softmax gradient; a policy owns S, dP and the gradient accumulation:
//   *SimtTiles         fp32 tiles in shared memory, products and accumulators in registers;
//   *TensorCoreTiles   16-bit tiles and WMMA 16x16x16 fragments with fp32 accumulation (fp16/bf16,
//                      head dims <= 128, sm_80+). The 16-bit operands made from fp32 values (t*P, dS)
//                      are split into hi + lo parts (two MMAs) so they add no rounding error beyond
//                      fp32's; dO stays unscaled (t is applied in fp32).
// Every policy uses the thread layout tid = rg * 8 + cg for the element-wise part of a tile.
#pragma once

#include <cstdint>

#include "cuda_common.cuh"
#include "simt_tile.cuh"

namespace mmkernels {
namespace cuda {

constexpr int kBwdThreads = 128;

// ------------------------------------------------------------------ tensor-core helpers
// Write a 16x16 fp32 fragment (times mul) to a strided global tile through a per-warp staging
// buffer: rows r < nrows, cols c < ncols. All 32 lanes of the warp must call it.
template <typename T, typename Frag>
__device__ __forceinline__ void store_frag_global(const Frag& f, float* stage, T* g, int64_t row_stride, int nrows,
                                                  int ncols, float mul) {
  nvcuda::wmma::store_matrix_sync(stage, f, 16, nvcuda::wmma::mem_row_major);
  __syncwarp();
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < 256; e += 32) {
    const int r = e >> 4, c = e & 15;
    if (r < nrows && c < ncols) g[r * row_stride + c] = from_f<T>(stage[e] * mul);
  }
  __syncwarp();
}

template <typename T>
__device__ __forceinline__ void split_store(T* hi_p, T* lo_p, float x) {
  const T hi = from_f<T>(x);
  *hi_p = hi;
  *lo_p = from_f<T>(x - to_f(hi));
}

// ------------------------------------------------------------------ dK / dV
// One CTA owns BN keys of one segment; it walks query tiles of BMQ rows. Thread owns key rows
// rg*TN + a (a < TN) and score columns (queries) cg + 8*c (c < TQ).
template <typename T, int DPAD>
struct DkdvSimtTiles {
  // shared memory stays under 99 KB (the sm_86/89 opt-in limit)
  static constexpr int BN = DPAD <= 64 ? 64 : (DPAD <= 128 ? 32 : 16);  // keys per CTA
  static constexpr int BMQ = DPAD <= 128 ? 32 : 16;                    // queries per tile
  static constexpr int TN = BN / 16, TQ = BMQ / 8, DC = DPAD / 32;
  static constexpr int KS = DPAD + 4, PS = BMQ + 4;
  static constexpr bool kTensorCores = false;
  static_assert(BN % 16 == 0 && BMQ % 8 == 0 && DPAD % 32 == 0, "tile shape");

  static constexpr size_t smem_bytes() {
    return sizeof(float) * (2 * size_t(BN) * KS + 2 * size_t(BMQ) * KS + 2 * size_t(BN) * PS + 2 * size_t(BMQ));
  }

  // The tiles at fixed offsets from one base pointer.
  float* sm;
  int rg, cg;
  float accK[TN][DC * 4], accV[TN][DC * 4];
  // S and dP of one tile, declared in the caller's loop body (their lifetime is one tile).
  struct Products {
    float s[TN][TQ], dp[TN][TQ];
  };
  __device__ __forceinline__ float* Ks() const { return sm; }
  __device__ __forceinline__ float* Vs() const { return sm + BN * KS; }
  __device__ __forceinline__ float* Qs() const { return sm + 2 * BN * KS; }
  __device__ __forceinline__ float* dOs() const { return sm + 2 * BN * KS + BMQ * KS; }
  __device__ __forceinline__ float* Ps() const { return sm + 2 * BN * KS + 2 * BMQ * KS; }
  __device__ __forceinline__ float* dSs() const { return sm + 2 * BN * KS + 2 * BMQ * KS + BN * PS; }
  __device__ __forceinline__ float* lse_s() const { return sm + 2 * BN * KS + 2 * BMQ * KS + 2 * BN * PS; }
  __device__ __forceinline__ float* del_s() const { return lse_s() + BMQ; }

  __device__ __forceinline__ DkdvSimtTiles(float4* smem, int rg_, int cg_) : sm(reinterpret_cast<float*>(smem)), rg(rg_), cg(cg_) {
#pragma unroll
    for (int a = 0; a < TN; ++a)
#pragma unroll
      for (int c = 0; c < DC * 4; ++c) {
        accK[a][c] = 0.f;
        accV[a][c] = 0.f;
      }
  }

  __device__ __forceinline__ void load_kv(const T* k, int64_t k_stride, const T* v, int64_t v_stride, int rows, int D,
                                          int Dv, bool vec) {
    load_tile<T, BN, DPAD, KS, kBwdThreads>(Ks(), k, k_stride, rows, D, vec);
    load_tile<T, BN, DPAD, KS, kBwdThreads>(Vs(), v, v_stride, rows, Dv, vec);
  }

  // dO is stored as t * dO: dP and dV then carry the gate.
  __device__ __forceinline__ void load_q_do(const T* q, int64_t q_stride, bool q_vec, const T* go, int64_t go_stride,
                                            bool go_vec, int rows, int D, int Dv, float t) {
    load_tile<T, BMQ, DPAD, KS, kBwdThreads>(Qs(), q, q_stride, rows, D, q_vec);
    load_tile<T, BMQ, DPAD, KS, kBwdThreads>(dOs(), go, go_stride, rows, Dv, go_vec, t);
  }

  // S^T = K Q^T and dP^T = V dO^T
  __device__ __forceinline__ void products(Products& pr, int D, int Dv) const {
    simt_dots<TN, TQ>(pr.s, Ks(), KS, rg * TN, Qs(), KS, cg, (D + 3) & ~3);
    simt_dots<TN, TQ>(pr.dp, Vs(), KS, rg * TN, dOs(), KS, cg, (Dv + 3) & ~3);
  }

  __device__ __forceinline__ float score(const Products& pr, int a, int c) const { return pr.s[a][c]; }
  __device__ __forceinline__ float dprob(const Products& pr, int a, int c) const { return pr.dp[a][c]; }

  __device__ __forceinline__ void store_p_ds(int a, int c, float pv, float ds) {
    const int at = (rg * TN + a) * PS + cg + 8 * c;
    Ps()[at] = pv;
    dSs()[at] = ds;
  }

  // dV += P^T (t dO), dK += dS^T Q  (the caller synced: P and dS of the whole tile are stored)
  __device__ __forceinline__ void accumulate(int /*D*/, int /*Dv*/) {
#pragma unroll 2
    for (int il = 0; il < BMQ; ++il) {
      float pa[TN], da[TN];
#pragma unroll
      for (int a = 0; a < TN; ++a) {
        pa[a] = Ps()[(rg * TN + a) * PS + il];
        da[a] = dSs()[(rg * TN + a) * PS + il];
      }
#pragma unroll
      for (int k = 0; k < DC; ++k) {
        const float4 ov = *reinterpret_cast<const float4*>(dOs() + il * KS + k * 32 + cg * 4);
        const float4 qv = *reinterpret_cast<const float4*>(Qs() + il * KS + k * 32 + cg * 4);
#pragma unroll
        for (int a = 0; a < TN; ++a) {
          accV[a][k * 4 + 0] += pa[a] * ov.x;
          accV[a][k * 4 + 1] += pa[a] * ov.y;
          accV[a][k * 4 + 2] += pa[a] * ov.z;
          accV[a][k * 4 + 3] += pa[a] * ov.w;
          accK[a][k * 4 + 0] += da[a] * qv.x;
          accK[a][k * 4 + 1] += da[a] * qv.y;
          accK[a][k * 4 + 2] += da[a] * qv.z;
          accK[a][k * 4 + 3] += da[a] * qv.w;
        }
      }
    }
  }

  // Key rows j0 + r < len of the block (rows past kv_lengths get 0): dk, dv point at key row j0.
  __device__ __forceinline__ void store(T* dk, int64_t dk_sl, T* dv, int64_t dv_sl, int64_t rows, int D, int Dv,
                                        float scale) {
#pragma unroll
    for (int a = 0; a < TN; ++a) {
      const int r = rg * TN + a;
      if (r >= rows) continue;
#pragma unroll
      for (int k = 0; k < DC; ++k)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = k * 32 + cg * 4 + e;
          if (c < D) dk[r * dk_sl + c] = from_f<T>(accK[a][k * 4 + e] * scale);
          if (c < Dv) dv[r * dv_sl + c] = from_f<T>(accV[a][k * 4 + e]);
        }
    }
  }
};

// Warp w computes the 16x16 fragment (key rows 16*(w & 1), queries 16*(w >> 1)) of S^T and dP^T,
// and accumulates dK/dV for key rows 16*(w & 1) over column half (w >> 1).
template <typename T, int DPAD>
struct DkdvTensorCoreTiles {
  static constexpr int BN = 32, BMQ = 32;
  static constexpr int TN = BN / 16, TQ = BMQ / 8;
  static constexpr int HS = DPAD + 8, SS = BMQ + 4, PS = BMQ + 8;
  static constexpr int CF = DPAD / 32;  // column fragments per warp (each warp: half of the columns)
  static constexpr bool kTensorCores = true;
  static_assert(BN == 32 && BMQ % 16 == 0 && DPAD % 32 == 0 && kBwdThreads == 128, "tile shape");
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  struct Products {};  // S and dP go through shared memory

  static constexpr size_t smem_bytes() {
    return sizeof(float) * (2 * size_t(BN) * SS + 4 * 256 + 2 * size_t(BMQ)) +
           sizeof(T) * (size_t(2 * BN + 2 * BMQ) * HS + 4 * size_t(BN) * PS);
  }

  float *Sf, *dPf, *stage, *lse_p, *del_p;
  __device__ __forceinline__ float* lse_s() const { return lse_p; }
  __device__ __forceinline__ float* del_s() const { return del_p; }
  T *Kh, *Vh, *Qh, *dOh, *Phi, *Plo, *dShi, *dSlo;
  int rg, cg, rk, ch;
  float t;
  Acc accK[CF], accV[CF];

  __device__ __forceinline__ DkdvTensorCoreTiles(float4* smem, int rg_, int cg_) : rg(rg_), cg(cg_), t(1.f) {
    const int warp = threadIdx.x >> 5;
    rk = warp & 1;
    ch = warp >> 1;
    Sf = reinterpret_cast<float*>(smem);
    dPf = Sf + BN * SS;
    float* stage_all = dPf + BN * SS;
    stage = stage_all + warp * 256;
    lse_p = stage_all + 4 * 256;
    del_p = lse_p + BMQ;
    Kh = reinterpret_cast<T*>(del_p + BMQ);
    Vh = Kh + BN * HS;
    Qh = Vh + BN * HS;
    dOh = Qh + BMQ * HS;
    Phi = dOh + BMQ * HS;
    Plo = Phi + BN * PS;
    dShi = Plo + BN * PS;
    dSlo = dShi + BN * PS;
#pragma unroll
    for (int c = 0; c < CF; ++c) {
      nvcuda::wmma::fill_fragment(accK[c], 0.f);
      nvcuda::wmma::fill_fragment(accV[c], 0.f);
    }
  }

  __device__ __forceinline__ void load_kv(const T* k, int64_t k_stride, const T* v, int64_t v_stride, int rows, int D,
                                          int Dv, bool vec) {
    load_tile_raw<T, BN, DPAD, HS, kBwdThreads>(Kh, k, k_stride, rows, D, vec);
    load_tile_raw<T, BN, DPAD, HS, kBwdThreads>(Vh, v, v_stride, rows, Dv, vec);
  }

  __device__ __forceinline__ void load_q_do(const T* q, int64_t q_stride, bool q_vec, const T* go, int64_t go_stride,
                                            bool go_vec, int rows, int D, int Dv, float t_) {
    t = t_;
    load_tile_raw<T, BMQ, DPAD, HS, kBwdThreads>(Qh, q, q_stride, rows, D, q_vec);
    load_tile_raw<T, BMQ, DPAD, HS, kBwdThreads>(dOh, go, go_stride, rows, Dv, go_vec);
  }

  // S^T = K Q^T and dP^T = V dO^T, one 16x16 fragment per warp; read across warps afterwards.
  __device__ __forceinline__ void products(Products&, int D, int Dv) {
    using namespace nvcuda;
    const int DK = (D + 15) / 16, DVK = (Dv + 15) / 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> cs, cp;
    wmma::fill_fragment(cs, 0.f);
    wmma::fill_fragment(cp, 0.f);
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
    for (int k = 0; k < DK; ++k) {
      wmma::load_matrix_sync(a, Kh + rk * 16 * HS + k * 16, HS);
      wmma::load_matrix_sync(bf, Qh + ch * 16 * HS + k * 16, HS);
      wmma::mma_sync(cs, a, bf, cs);
    }
    for (int k = 0; k < DVK; ++k) {
      wmma::load_matrix_sync(a, Vh + rk * 16 * HS + k * 16, HS);
      wmma::load_matrix_sync(bf, dOh + ch * 16 * HS + k * 16, HS);
      wmma::mma_sync(cp, a, bf, cp);
    }
    wmma::store_matrix_sync(Sf + rk * 16 * SS + ch * 16, cs, SS, wmma::mem_row_major);
    wmma::store_matrix_sync(dPf + rk * 16 * SS + ch * 16, cp, SS, wmma::mem_row_major);
    __syncthreads();
  }

  __device__ __forceinline__ float score(const Products&, int a, int c) const { return Sf[(rg * TN + a) * SS + cg + 8 * c]; }
  __device__ __forceinline__ float dprob(const Products&, int a, int c) const { return t * dPf[(rg * TN + a) * SS + cg + 8 * c]; }

  __device__ __forceinline__ void store_p_ds(int a, int c, float pv, float ds) {
    const int at = (rg * TN + a) * PS + cg + 8 * c;
    split_store(Phi + at, Plo + at, t * pv);
    split_store(dShi + at, dSlo + at, ds);
  }

  // dV += (t P)^T dO, dK += dS^T Q for this warp's key rows and column half
  __device__ __forceinline__ void accumulate(int D, int Dv) {
    using namespace nvcuda;
    const int DK = (D + 15) / 16, DVK = (Dv + 15) / 16;
#pragma unroll
    for (int c = 0; c < CF; ++c) {
      const int dn = ch * CF + c;
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
      if (dn < DVK) {
#pragma unroll
        for (int k = 0; k < BMQ / 16; ++k) {
          wmma::load_matrix_sync(bf, dOh + k * 16 * HS + dn * 16, HS);
          wmma::load_matrix_sync(a, Phi + rk * 16 * PS + k * 16, PS);
          wmma::mma_sync(accV[c], a, bf, accV[c]);
          wmma::load_matrix_sync(a, Plo + rk * 16 * PS + k * 16, PS);
          wmma::mma_sync(accV[c], a, bf, accV[c]);
        }
      }
      if (dn < DK) {
#pragma unroll
        for (int k = 0; k < BMQ / 16; ++k) {
          wmma::load_matrix_sync(bf, Qh + k * 16 * HS + dn * 16, HS);
          wmma::load_matrix_sync(a, dShi + rk * 16 * PS + k * 16, PS);
          wmma::mma_sync(accK[c], a, bf, accK[c]);
          wmma::load_matrix_sync(a, dSlo + rk * 16 * PS + k * 16, PS);
          wmma::mma_sync(accK[c], a, bf, accK[c]);
        }
      }
    }
  }

  __device__ __forceinline__ void store(T* dk, int64_t dk_sl, T* dv, int64_t dv_sl, int64_t rows, int D, int Dv,
                                        float scale) {
    const int nrows = (int)clamp_len(rows - rk * 16, 16);
    dk += rk * 16 * dk_sl;
    dv += rk * 16 * dv_sl;
#pragma unroll
    for (int c = 0; c < CF; ++c) {
      const int col = (ch * CF + c) * 16;
      if (col < D) store_frag_global<T>(accK[c], stage, dk + col, dk_sl, nrows, D - col, scale);
      if (col < Dv) store_frag_global<T>(accV[c], stage, dv + col, dv_sl, nrows, Dv - col, 1.f);
    }
  }
};

// ------------------------------------------------------------------ dQ
// One CTA owns BM query rows of one head; it walks key tiles of BN keys over every segment. Thread
// owns query rows rg*TM + i (i < TM) and score columns (keys) cg + 8*jj (jj < TN).
template <typename T, int DPAD>
struct DqSimtTiles {
  static constexpr int BM = DPAD <= 64 ? 64 : (DPAD <= 128 ? 32 : 16);  // queries per CTA
  static constexpr int BN = DPAD <= 128 ? 32 : 16;                      // keys per tile
  static constexpr int TM = BM / 16, TN = BN / 8, DC = DPAD / 32;
  static constexpr int KS = DPAD + 4, PS = BN + 4;
  static constexpr bool kTensorCores = false;
  static_assert(BM % 16 == 0 && BN % 8 == 0 && DPAD % 32 == 0, "tile shape");

  static constexpr size_t smem_bytes() {
    return sizeof(float) * (2 * size_t(BM) * KS + 2 * size_t(BN) * KS + size_t(BM) * PS + 2 * size_t(BM) + kBwdThreads / 32);
  }

  float* sm;  // the tiles at fixed offsets from it
  int rg, cg;
  float acc[TM][DC * 4];
  struct Products {  // see DkdvSimtTiles
    float s[TM][TN], dp[TM][TN];
  };
  __device__ __forceinline__ float* Qs() const { return sm; }
  __device__ __forceinline__ float* dOs() const { return sm + BM * KS; }
  __device__ __forceinline__ float* Ks() const { return sm + 2 * BM * KS; }
  __device__ __forceinline__ float* Vs() const { return sm + 2 * BM * KS + BN * KS; }
  __device__ __forceinline__ float* dSs() const { return sm + 2 * BM * KS + 2 * BN * KS; }
  __device__ __forceinline__ float* lse_s() const { return dSs() + BM * PS; }
  __device__ __forceinline__ float* del_s() const { return lse_s() + BM; }
  __device__ __forceinline__ float* red() const { return del_s() + BM; }

  __device__ __forceinline__ DqSimtTiles(float4* smem, int rg_, int cg_) : sm(reinterpret_cast<float*>(smem)), rg(rg_), cg(cg_) {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int c = 0; c < DC * 4; ++c) acc[i][c] = 0.f;
  }

  // dO is stored as t * dO: dP then carries the gate.
  __device__ __forceinline__ void load_q_do(const T* q, int64_t q_stride, bool q_vec, const T* go, int64_t go_stride,
                                            bool go_vec, int rows, int D, int Dv, float t) {
    load_tile<T, BM, DPAD, KS, kBwdThreads>(Qs(), q, q_stride, rows, D, q_vec);
    load_tile<T, BM, DPAD, KS, kBwdThreads>(dOs(), go, go_stride, rows, Dv, go_vec, t);
  }

  __device__ __forceinline__ void load_kv(const T* k, int64_t k_stride, const T* v, int64_t v_stride, int rows, int D,
                                          int Dv, bool vec) {
    load_tile<T, BN, DPAD, KS, kBwdThreads>(Ks(), k, k_stride, rows, D, vec);
    load_tile<T, BN, DPAD, KS, kBwdThreads>(Vs(), v, v_stride, rows, Dv, vec);
  }

  // S = Q K^T and dP = (t dO) V^T
  __device__ __forceinline__ void products(Products& pr, int D, int Dv) const {
    simt_dots<TM, TN>(pr.s, Qs(), KS, rg * TM, Ks(), KS, cg, (D + 3) & ~3);
    simt_dots<TM, TN>(pr.dp, dOs(), KS, rg * TM, Vs(), KS, cg, (Dv + 3) & ~3);
  }

  __device__ __forceinline__ float score(const Products& pr, int i, int jj) const { return pr.s[i][jj]; }
  __device__ __forceinline__ float dprob(const Products& pr, int i, int jj) const { return pr.dp[i][jj]; }
  __device__ __forceinline__ void store_ds(int i, int jj, float ds) { dSs()[(rg * TM + i) * PS + cg + 8 * jj] = ds; }

  // dQ += dS K (dS of every row of the tile is read: the whole CTA syncs first)
  __device__ __forceinline__ void accumulate_dq(int /*D*/) {
    __syncthreads();
    simt_accumulate<TM, DC>(acc, dSs(), PS, rg * TM, Ks(), KS, cg * 4, BN);
  }

  // Rows q0 + r < Lq of the block; dq points at (b, row 0, h).
  __device__ __forceinline__ void store(T* dq, int64_t dq_sl, int q0, int Lq, int D, float scale) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t row = q0 + rg * TM + i;
      if (row >= Lq) continue;
#pragma unroll
      for (int k = 0; k < DC; ++k)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = k * 32 + cg * 4 + e;
          if (c < D) dq[row * dq_sl + c] = from_f<T>(acc[i][k * 4 + e] * scale);
        }
    }
  }
};

// Warp w owns query rows 16w..16w+15 for the MMAs and (rg = tid / 8) for the element-wise part,
// so only __syncwarp is needed between the two.
template <typename T, int DPAD>
struct DqTensorCoreTiles {
  static constexpr int BM = 64, BN = 32;
  static constexpr int TM = BM / 16, TN = BN / 8;
  static constexpr int HS = DPAD + 8, SS = BN + 4, PS = BN + 8;
  static constexpr int NF = DPAD / 16;  // dQ column fragments per warp
  static constexpr bool kTensorCores = true;
  static_assert(BM == 64 && BN % 16 == 0 && DPAD % 16 == 0 && kBwdThreads == 128, "tile shape");
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  struct Products {};  // S and dP go through shared memory

  static constexpr size_t smem_bytes() {
    return sizeof(float) * (2 * size_t(BM) * SS + 4 * 256 + 2 * size_t(BM) + 32) +
           sizeof(T) * (size_t(2 * BM + 2 * BN) * HS + 2 * size_t(BM) * PS);
  }

  float *Sf, *dPf, *stage, *lse_p, *del_p, *red_p;
  __device__ __forceinline__ float* lse_s() const { return lse_p; }
  __device__ __forceinline__ float* del_s() const { return del_p; }
  __device__ __forceinline__ float* red() const { return red_p; }
  T *Qh, *dOh, *Kh, *Vh, *dShi, *dSlo;
  int rg, cg, warp;
  float t;
  Acc acc[NF];

  __device__ __forceinline__ DqTensorCoreTiles(float4* smem, int rg_, int cg_) : rg(rg_), cg(cg_), t(1.f) {
    warp = threadIdx.x >> 5;
    Sf = reinterpret_cast<float*>(smem);
    dPf = Sf + BM * SS;
    float* stage_all = dPf + BM * SS;
    stage = stage_all + warp * 256;
    lse_p = stage_all + 4 * 256;
    del_p = lse_p + BM;
    red_p = del_p + BM;  // 32 floats reserved
    Qh = reinterpret_cast<T*>(red_p + 32);
    dOh = Qh + BM * HS;
    Kh = dOh + BM * HS;
    Vh = Kh + BN * HS;
    dShi = Vh + BN * HS;
    dSlo = dShi + BM * PS;
#pragma unroll
    for (int f = 0; f < NF; ++f) nvcuda::wmma::fill_fragment(acc[f], 0.f);
  }

  __device__ __forceinline__ void load_q_do(const T* q, int64_t q_stride, bool q_vec, const T* go, int64_t go_stride,
                                            bool go_vec, int rows, int D, int Dv, float t_) {
    t = t_;
    load_tile_raw<T, BM, DPAD, HS, kBwdThreads>(Qh, q, q_stride, rows, D, q_vec);
    load_tile_raw<T, BM, DPAD, HS, kBwdThreads>(dOh, go, go_stride, rows, Dv, go_vec);
  }

  __device__ __forceinline__ void load_kv(const T* k, int64_t k_stride, const T* v, int64_t v_stride, int rows, int D,
                                          int Dv, bool vec) {
    load_tile_raw<T, BN, DPAD, HS, kBwdThreads>(Kh, k, k_stride, rows, D, vec);
    load_tile_raw<T, BN, DPAD, HS, kBwdThreads>(Vh, v, v_stride, rows, Dv, vec);
  }

  // S = Q K^T, dP = dO V^T for this warp's rows
  __device__ __forceinline__ void products(Products&, int D, int Dv) {
    using namespace nvcuda;
    const int DK = (D + 15) / 16, DVK = (Dv + 15) / 16;
#pragma unroll
    for (int n = 0; n < BN / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> cs, cp;
      wmma::fill_fragment(cs, 0.f);
      wmma::fill_fragment(cp, 0.f);
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
      for (int k = 0; k < DK; ++k) {
        wmma::load_matrix_sync(a, Qh + 16 * warp * HS + k * 16, HS);
        wmma::load_matrix_sync(bf, Kh + n * 16 * HS + k * 16, HS);
        wmma::mma_sync(cs, a, bf, cs);
      }
      for (int k = 0; k < DVK; ++k) {
        wmma::load_matrix_sync(a, dOh + 16 * warp * HS + k * 16, HS);
        wmma::load_matrix_sync(bf, Vh + n * 16 * HS + k * 16, HS);
        wmma::mma_sync(cp, a, bf, cp);
      }
      wmma::store_matrix_sync(Sf + 16 * warp * SS + n * 16, cs, SS, wmma::mem_row_major);
      wmma::store_matrix_sync(dPf + 16 * warp * SS + n * 16, cp, SS, wmma::mem_row_major);
    }
    __syncwarp();
  }

  __device__ __forceinline__ float score(const Products&, int i, int jj) const { return Sf[(rg * TM + i) * SS + cg + 8 * jj]; }
  __device__ __forceinline__ float dprob(const Products&, int i, int jj) const { return t * dPf[(rg * TM + i) * SS + cg + 8 * jj]; }

  __device__ __forceinline__ void store_ds(int i, int jj, float ds) {
    const int at = (rg * TM + i) * PS + cg + 8 * jj;
    split_store(dShi + at, dSlo + at, ds);
  }

  // dQ += dS K for this warp's rows
  __device__ __forceinline__ void accumulate_dq(int D) {
    using namespace nvcuda;
    __syncwarp();
    const int DK = (D + 15) / 16;
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      if (f < DK) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
#pragma unroll
        for (int k = 0; k < BN / 16; ++k) {
          wmma::load_matrix_sync(bf, Kh + k * 16 * HS + f * 16, HS);
          wmma::load_matrix_sync(a, dShi + 16 * warp * PS + k * 16, PS);
          wmma::mma_sync(acc[f], a, bf, acc[f]);
          wmma::load_matrix_sync(a, dSlo + 16 * warp * PS + k * 16, PS);
          wmma::mma_sync(acc[f], a, bf, acc[f]);
        }
      }
    }
  }

  __device__ __forceinline__ void store(T* dq, int64_t dq_sl, int q0, int Lq, int D, float scale) {
    const int64_t r0 = q0 + 16 * warp;
    const int nrows = (int)clamp_len((int64_t)Lq - r0, 16);
    T* g = dq + r0 * dq_sl;
#pragma unroll
    for (int f = 0; f < NF; ++f)
      if (f * 16 < D) store_frag_global<T>(acc[f], stage, g + f * 16, dq_sl, nrows, D - f * 16, scale);
  }
};

}  // namespace cuda
}  // namespace mmkernels
