// Device code of cross_modal_attention_fwd.cu (no torch headers: also compiled by the host emulator test in emu/).
//
// One kernel body (cross_modal_attention_fwd_kernel) walks the segments and key tiles, masks, and
// runs the online softmax; a tile policy does the products:
//   FwdSimtTiles         fp32 tiles in shared memory, S and O in registers (every dtype, head dims <= 256);
//   FwdTensorCoreTiles   16-bit tiles, S = Q K^T and O += P V on tensor cores (fp16/bf16, head dims <= 128, sm_80+).
// Both use the softmax thread layout tid = rg * 8 + cg: thread owns query rows rg*TM + i (i < TM) and
// score columns cg + 8*jj (jj < TN); the 8 threads of a row are consecutive lanes of one warp.
#pragma once

#include <cstdint>
#include <limits>

#include "cuda_common.cuh"
#include "mask.cuh"
#include "simt_tile.cuh"
#include "softmax.cuh"

namespace mmkernels {
namespace cuda {

constexpr int kFwdThreads = 128;

// ------------------------------------------------------------------ SIMT tiles
// Tile shape per head-dim bucket (shared memory stays under 99 KB, the sm_86/89 opt-in limit).
// Output columns of a thread: k*32 + cg*4 + e.
template <typename T, int DPAD>
struct FwdSimtTiles {
  static constexpr int BM = DPAD <= 128 ? 64 : 32;                     // query rows per CTA
  static constexpr int BN = DPAD <= 64 ? 64 : (DPAD <= 128 ? 32 : 16);  // keys per tile
  static constexpr int TM = BM / 16, TN = BN / 8, DC = DPAD / 32;
  static constexpr int QS = DPAD + 4, KS = DPAD + 4, VS = DPAD, PS = BN + 4;
  static constexpr bool kTensorCores = false;
  static_assert(BM % 16 == 0 && BN % 8 == 0 && DPAD % 32 == 0, "tile shape");

  static constexpr size_t smem_bytes() {
    return sizeof(float) * (size_t(BM) * QS + size_t(BN) * KS + size_t(BN) * VS + size_t(BM) * PS);
  }

  float *Qs, *Ks, *Vs, *Ps;
  int rg, cg;
  float acc[TM][DC * 4];
  float s[TM][TN];

  __device__ __forceinline__ FwdSimtTiles(float4* smem, int rg_, int cg_) : rg(rg_), cg(cg_) {
    Qs = reinterpret_cast<float*>(smem);
    Ks = Qs + BM * QS;
    Vs = Ks + BN * KS;
    Ps = Vs + BN * VS;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int c = 0; c < DC * 4; ++c) acc[i][c] = 0.f;
  }

  __device__ __forceinline__ void load_q(const T* base, int64_t stride, int rows, int D, bool vec) {
    load_tile<T, BM, DPAD, QS, kFwdThreads>(Qs, base, stride, rows, D, vec);
  }

  __device__ __forceinline__ void load_kv(const T* k, int64_t k_stride, const T* v, int64_t v_stride, int rows, int D,
                                          int Dv, bool vec) {
    load_tile<T, BN, DPAD, KS, kFwdThreads>(Ks, k, k_stride, rows, D, vec);
    load_tile<T, BN, DPAD, VS, kFwdThreads>(Vs, v, v_stride, rows, Dv, vec);
  }

  __device__ __forceinline__ void scores(int D) { simt_dots<TM, TN>(s, Qs, QS, rg * TM, Ks, KS, cg, (D + 3) & ~3); }

  __device__ __forceinline__ float score(int i, int jj) const { return s[i][jj]; }
  __device__ __forceinline__ void store_p(int i, int jj, float pv) { Ps[(rg * TM + i) * PS + cg + 8 * jj] = pv; }

  __device__ __forceinline__ void rescale(int i, float alpha) {
#pragma unroll
    for (int c = 0; c < DC * 4; ++c) acc[i][c] *= alpha;
  }

  // acc += P V (P of every row of the tile is read: the whole CTA syncs first)
  __device__ __forceinline__ void accumulate_pv(int /*Dv*/) {
    __syncthreads();
    simt_accumulate<TM, DC>(acc, Ps, PS, rg * TM, Vs, VS, cg * 4, BN);
  }

  __device__ __forceinline__ void finish() {}
  __device__ __forceinline__ float out(int i, int k, int e) const { return acc[i][k * 4 + e]; }
};

// ------------------------------------------------------------------ tensor-core tiles
// WMMA 16x16x16 fragments with fp32 accumulation; O lives in shared memory (fp32). P is split into
// hi + lo 16-bit parts (two MMAs) so that rounding P to bf16 adds no error beyond the fp32-accumulating
// reference's. Warp w owns query rows 16w..16w+15 for the MMAs; the softmax layout (rg = tid / 8) maps
// the same rows to the same warp, so only __syncwarp is needed between the two.
template <typename T, int DPAD>
struct FwdTensorCoreTiles {
  static constexpr int BM = 64;
  static constexpr int BN = DPAD <= 64 ? 64 : 32;
  static constexpr int TM = BM / 16, TN = BN / 8, DC = DPAD / 32;
  static constexpr int SS = BN + 4, OS = DPAD + 4, HS = DPAD + 8, PS = BN + 8;
  static constexpr bool kTensorCores = true;
  static_assert(BN % 16 == 0 && DPAD % 32 == 0 && kFwdThreads == 128, "tile shape");

  static constexpr size_t smem_bytes() {
    return sizeof(float) * (size_t(BM) * SS + size_t(BM) * OS) +
           sizeof(T) * (size_t(BM + 2 * BN) * HS + 2 * size_t(BM) * PS);
  }

  float *Sf, *Of;
  T *Qh, *Kh, *Vh, *Phi, *Plo;
  int rg, cg, warp;

  __device__ __forceinline__ FwdTensorCoreTiles(float4* smem, int rg_, int cg_) : rg(rg_), cg(cg_) {
    warp = threadIdx.x >> 5;
    Sf = reinterpret_cast<float*>(smem);
    Of = Sf + BM * SS;
    Qh = reinterpret_cast<T*>(Of + BM * OS);
    Kh = Qh + BM * HS;
    Vh = Kh + BN * HS;
    Phi = Vh + BN * HS;
    Plo = Phi + BM * PS;
    for (int idx = threadIdx.x; idx < BM * OS; idx += kFwdThreads) Of[idx] = 0.f;
  }

  __device__ __forceinline__ void load_q(const T* base, int64_t stride, int rows, int D, bool vec) {
    load_tile_raw<T, BM, DPAD, HS, kFwdThreads>(Qh, base, stride, rows, D, vec);
  }

  __device__ __forceinline__ void load_kv(const T* k, int64_t k_stride, const T* v, int64_t v_stride, int rows, int D,
                                          int Dv, bool vec) {
    load_tile_raw<T, BN, DPAD, HS, kFwdThreads>(Kh, k, k_stride, rows, D, vec);
    load_tile_raw<T, BN, DPAD, HS, kFwdThreads>(Vh, v, v_stride, rows, Dv, vec);
  }

  // S = Q K^T for this warp's 16 rows.
  __device__ __forceinline__ void scores(int D) {
    using namespace nvcuda;
    const int DK = (D + 15) / 16;
#pragma unroll
    for (int n = 0; n < BN / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::fill_fragment(c, 0.f);
      for (int k = 0; k < DK; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
        wmma::load_matrix_sync(a, Qh + 16 * warp * HS + k * 16, HS);
        wmma::load_matrix_sync(bf, Kh + n * 16 * HS + k * 16, HS);
        wmma::mma_sync(c, a, bf, c);
      }
      wmma::store_matrix_sync(Sf + 16 * warp * SS + n * 16, c, SS, wmma::mem_row_major);
    }
    __syncwarp();
  }

  __device__ __forceinline__ float score(int i, int jj) const { return Sf[(rg * TM + i) * SS + cg + 8 * jj]; }

  __device__ __forceinline__ void store_p(int i, int jj, float pv) {
    const int at = (rg * TM + i) * PS + cg + 8 * jj;
    const T hi = from_f<T>(pv);
    Phi[at] = hi;
    Plo[at] = from_f<T>(pv - to_f(hi));
  }

  __device__ __forceinline__ void rescale(int i, float alpha) {
#pragma unroll
    for (int k = 0; k < DC; ++k)
#pragma unroll
      for (int e = 0; e < 4; ++e) Of[(rg * TM + i) * OS + k * 32 + cg * 4 + e] *= alpha;
  }

  // O += (P_hi + P_lo) V for this warp's 16 rows (written by this warp's lanes: a warp sync suffices).
  __device__ __forceinline__ void accumulate_pv(int Dv) {
    using namespace nvcuda;
    __syncwarp();
    const int DVK = (Dv + 15) / 16;
    for (int dn = 0; dn < DVK; ++dn) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, Of + 16 * warp * OS + dn * 16, OS, wmma::mem_row_major);
#pragma unroll
      for (int k = 0; k < BN / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, Vh + k * 16 * HS + dn * 16, HS);
        wmma::load_matrix_sync(a, Phi + 16 * warp * PS + k * 16, PS);
        wmma::mma_sync(acc, a, bf, acc);
        wmma::load_matrix_sync(a, Plo + 16 * warp * PS + k * 16, PS);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(Of + 16 * warp * OS + dn * 16, acc, OS, wmma::mem_row_major);
    }
  }

  __device__ __forceinline__ void finish() { __syncthreads(); }  // Of complete
  __device__ __forceinline__ float out(int i, int k, int e) const { return Of[(rg * TM + i) * OS + k * 32 + cg * 4 + e]; }
};

// ------------------------------------------------------------------ the kernel
// One CTA (128 threads) per (query block, head, batch): one online softmax over every segment's
// valid keys (key tiles past kv_lengths, or past the causal limit of the block's last row, are
// never visited).
template <typename Tiles, typename T>
__device__ __forceinline__ void cross_modal_attention_fwd_body(const AttnParams& p, T* __restrict__ out,
                                                               T* __restrict__ out_ung, float* __restrict__ lse) {
  constexpr int BM = Tiles::BM, BN = Tiles::BN, TM = Tiles::TM, TN = Tiles::TN, DC = Tiles::DC;
  MMK_DYN_SMEM(smem4);
  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, rg = tid >> 3, cg = tid & 7;
  Tiles tiles(smem4, rg, cg);
  const int q0 = qb * BM;
  const int64_t qlen = q_valid_len(p, b);
  const int hk = h / (p.Hq / p.Hkv);
  const int D = p.D, Dv = p.Dv;
  const float NEG_INF = -std::numeric_limits<float>::infinity();

  float mrow[TM], lrow[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    mrow[i] = NEG_INF;
    lrow[i] = 0.f;
  }

  if (q0 < qlen) {  // uniform over the CTA
    const T* qbase = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh + (int64_t)q0 * p.q_sl;
    const int qrows = (int)((qlen - q0) < BM ? (qlen - q0) : BM);
    tiles.load_q(qbase, p.q_sl, qrows, D, p.q_vec4 != 0);
    const int last_row = q0 + qrows - 1;  // last valid query row of this block

    for (int m = 0; m < p.num_seg; ++m) {
      const Segment& sg = p.seg[m];
      const int64_t kvlen = seg_valid_len(p, b, m);
      const int64_t off = causal_offset(kvlen, qlen);
      int64_t limit = kvlen;
      if (p.causal) limit = clamp_len(last_row + 1 + off, kvlen);
      const float bias2 = bias_log2(p, h, m);
      const T* kbase = static_cast<const T*>(sg.k) + (int64_t)b * sg.k_sb + (int64_t)hk * sg.k_sh;
      const T* vbase = static_cast<const T*>(sg.v) + (int64_t)b * sg.v_sb + (int64_t)hk * sg.v_sh;
      const bool vec = sg.vec4 != 0;
      const KeyMask km = key_mask(p, b, m);

      for (int64_t j0 = 0; j0 < limit; j0 += BN) {
        const int nvalid = (int)((limit - j0) < BN ? (limit - j0) : BN);
        if (!tile_has_key(km, j0, nvalid)) continue;  // every key masked: the tile changes nothing
        __syncthreads();  // previous tile fully consumed (and Q stored, first time)
        tiles.load_kv(kbase + j0 * sg.k_sl, sg.k_sl, vbase + j0 * sg.v_sl, sg.v_sl, nvalid, D, Dv, vec);
        __syncthreads();
        tiles.scores(D);

        // Masked, scaled logits (log2 units) -> online softmax update. The thread's columns that
        // are in range and kept by the key mask, one bit each (read once per tile, not per row).
        unsigned cols = 0;
#pragma unroll
        for (int jj = 0; jj < TN; ++jj) {
          const int jl = cg + 8 * jj;
          if (jl < nvalid && km.keeps(j0 + jl)) cols |= 1u << jj;
        }
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const int64_t row = q0 + rg * TM + i;
          float sv[TN];
          float tmax = NEG_INF;
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) {
            const int jl = cg + 8 * jj;
            const bool ok = key_visible(p, (cols >> jj) & 1u, row, j0 + jl, off);
            sv[jj] = ok ? tiles.score(i, jj) * p.scale_log2 + bias2 : NEG_INF;
            tmax = fmaxf(tmax, sv[jj]);
          }
          tmax = row_max8(tmax);
          const float mnew = fmaxf(mrow[i], tmax);
          const float muse = (mnew == NEG_INF) ? 0.f : mnew;  // all -inf so far: exp2 gives 0, no NaN
          const float alpha = exp2f(mrow[i] - muse);
          float psum = 0.f;
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) {
            const float pv = exp2f(sv[jj] - muse);
            psum += pv;
            tiles.store_p(i, jj, pv);
          }
          lrow[i] = lrow[i] * alpha + row_sum8(psum);
          mrow[i] = mnew;
          tiles.rescale(i, alpha);
        }
        tiles.accumulate_pv(Dv);
      }
    }
  }
  tiles.finish();

  // Epilogue: every row < Lq of the block is written (padded / keyless rows: 0 and -inf).
  const float tg = p.gate ? tanhf(p.gate[h]) : 1.f;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = q0 + rg * TM + i;
    if (row >= p.Lq) continue;
    const bool valid = row < qlen && lrow[i] > 0.f;
    const float inv = valid ? 1.f / lrow[i] : 0.f;
    if (cg == 0)
      lse[((int64_t)b * p.Hq + h) * p.Lq + row] = valid ? (mrow[i] + log2f(lrow[i])) * kLn2 : NEG_INF;
    const int64_t obase = (((int64_t)b * p.Lq + row) * p.Hq + h) * Dv;
#pragma unroll
    for (int k = 0; k < DC; ++k)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = k * 32 + cg * 4 + e;
        if (c < Dv) {
          const float o = tiles.out(i, k, e) * inv;
          out[obase + c] = from_f<T>(o * tg);
          if (out_ung) out_ung[obase + c] = from_f<T>(o);
        }
      }
  }
}

// minBlocksPerSM 1: without it ptxas held the tensor-core policy to 72-80 registers and spilled
// (shared memory, not registers, bounds the CTAs per SM of these kernels).
template <typename Tiles, typename T>
__global__ void __launch_bounds__(kFwdThreads, 1)
    cross_modal_attention_fwd_kernel(const __grid_constant__ AttnParams p, T* __restrict__ out, T* __restrict__ out_ung,
                                     float* __restrict__ lse) {
  if constexpr (arch_has_tiles<Tiles::kTensorCores>()) cross_modal_attention_fwd_body<Tiles>(p, out, out_ung, lse);
}

}  // namespace cuda
}  // namespace mmkernels
