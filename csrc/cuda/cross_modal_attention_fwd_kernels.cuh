// Device code of cross_modal_attention_fwd.cu (no torch headers: also compiled by the host emulator test in emu/).
#pragma once

#include <cstdint>
#include <limits>

#include "cuda_common.cuh"
#include "mask.cuh"

namespace mmkernels {
namespace cuda {

constexpr int kFwdThreads = 128;

// Tile shape per head-dim bucket (shared memory stays under 99 KB, the sm_86/89 opt-in limit).
template <int DPAD>
struct FwdCfg {
  static constexpr int BM = DPAD <= 128 ? 64 : 32;                     // query rows per CTA
  static constexpr int BN = DPAD <= 64 ? 64 : (DPAD <= 128 ? 32 : 16);  // keys per tile
};

template <int BM, int BN, int DPAD>
constexpr size_t fwd_smem_bytes() {
  return sizeof(float) * (size_t(BM) * (DPAD + 4) + size_t(BN) * (DPAD + 4) + size_t(BN) * DPAD + size_t(BM) * (BN + 4));
}

template <typename T, int BM, int BN, int DPAD>
__global__ void __launch_bounds__(kFwdThreads)
    cross_modal_attention_fwd_kernel(const __grid_constant__ AttnParams p, T* __restrict__ out, T* __restrict__ out_ung, float* __restrict__ lse) {
  constexpr int NT = kFwdThreads;
  constexpr int TM = BM / 16;   // query rows per thread
  constexpr int TN = BN / 8;    // score columns per thread
  constexpr int DC = DPAD / 32; // float4 output chunks per thread
  constexpr int QS = DPAD + 4, KS = DPAD + 4, VS = DPAD, PS = BN + 4;
  static_assert(BM % 16 == 0 && BN % 8 == 0 && DPAD % 32 == 0, "tile shape");

  MMK_DYN_SMEM(smem4);
  float* Qs = reinterpret_cast<float*>(smem4);
  float* Ks = Qs + BM * QS;
  float* Vs = Ks + BN * KS;
  float* Ps = Vs + BN * VS;

  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, rg = tid >> 3, cg = tid & 7;
  const int q0 = qb * BM;
  const int64_t qlen = q_valid_len(p, b);
  const int hk = h / (p.Hq / p.Hkv);
  const int D = p.D, Dv = p.Dv;
  const int D4 = (D + 3) & ~3;
  const float NEG_INF = -std::numeric_limits<float>::infinity();

  float acc[TM][DC * 4];
  float mrow[TM], lrow[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    mrow[i] = NEG_INF;
    lrow[i] = 0.f;
#pragma unroll
    for (int c = 0; c < DC * 4; ++c) acc[i][c] = 0.f;
  }

  if (q0 < qlen) {  // uniform over the CTA
    const T* qbase = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh + (int64_t)q0 * p.q_sl;
    const int qrows = (int)((qlen - q0) < BM ? (qlen - q0) : BM);
    load_tile<T, BM, DPAD, QS, NT>(Qs, qbase, p.q_sl, qrows, D, p.q_vec4 != 0);
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

      for (int64_t j0 = 0; j0 < limit; j0 += BN) {
        const int nvalid = (int)((limit - j0) < BN ? (limit - j0) : BN);
        __syncthreads();  // previous tile fully consumed (and Q stored, first time)
        load_tile<T, BN, DPAD, KS, NT>(Ks, kbase + j0 * sg.k_sl, sg.k_sl, nvalid, D, vec);
        load_tile<T, BN, DPAD, VS, NT>(Vs, vbase + j0 * sg.v_sl, sg.v_sl, nvalid, Dv, vec);
        __syncthreads();

        float s[TM][TN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) s[i][jj] = 0.f;
#pragma unroll 2
        for (int d = 0; d < D4; d += 4) {
          float4 qv[TM], kv[TN];
#pragma unroll
          for (int i = 0; i < TM; ++i) qv[i] = *reinterpret_cast<const float4*>(Qs + (rg * TM + i) * QS + d);
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) kv[jj] = *reinterpret_cast<const float4*>(Ks + (cg + 8 * jj) * KS + d);
#pragma unroll
          for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int jj = 0; jj < TN; ++jj)
              s[i][jj] += qv[i].x * kv[jj].x + qv[i].y * kv[jj].y + qv[i].z * kv[jj].z + qv[i].w * kv[jj].w;
        }

        // Masked, scaled logits (log2 units) -> online softmax update.
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const int64_t row = q0 + rg * TM + i;
          float tmax = NEG_INF;
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) {
            const int jl = cg + 8 * jj;
            const int64_t col = j0 + jl;
            const bool ok = key_visible(p, jl < nvalid, row, col, off);
            s[i][jj] = ok ? s[i][jj] * p.scale_log2 + bias2 : NEG_INF;
            tmax = fmaxf(tmax, s[i][jj]);
          }
          tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
          tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
          tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 4));
          const float mnew = fmaxf(mrow[i], tmax);
          const float muse = (mnew == NEG_INF) ? 0.f : mnew;  // all -inf so far: exp2 gives 0, no NaN
          const float alpha = exp2f(mrow[i] - muse);
          float psum = 0.f;
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) {
            const float pv = exp2f(s[i][jj] - muse);
            psum += pv;
            Ps[(rg * TM + i) * PS + cg + 8 * jj] = pv;
          }
          psum += __shfl_xor_sync(0xffffffffu, psum, 1);
          psum += __shfl_xor_sync(0xffffffffu, psum, 2);
          psum += __shfl_xor_sync(0xffffffffu, psum, 4);
          lrow[i] = lrow[i] * alpha + psum;
          mrow[i] = mnew;
#pragma unroll
          for (int c = 0; c < DC * 4; ++c) acc[i][c] *= alpha;
        }
        __syncthreads();  // Ps complete

        // acc += P V
#pragma unroll 4
        for (int j = 0; j < BN; ++j) {
          float pj[TM];
#pragma unroll
          for (int i = 0; i < TM; ++i) pj[i] = Ps[(rg * TM + i) * PS + j];
#pragma unroll
          for (int k = 0; k < DC; ++k) {
            const float4 v = *reinterpret_cast<const float4*>(Vs + j * VS + k * 32 + cg * 4);
#pragma unroll
            for (int i = 0; i < TM; ++i) {
              acc[i][k * 4 + 0] += pj[i] * v.x;
              acc[i][k * 4 + 1] += pj[i] * v.y;
              acc[i][k * 4 + 2] += pj[i] * v.z;
              acc[i][k * 4 + 3] += pj[i] * v.w;
            }
          }
        }
      }
    }
  }

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
          const float o = acc[i][k * 4 + e] * inv;
          out[obase + c] = from_f<T>(o * tg);
          if (out_ung) out_ung[obase + c] = from_f<T>(o);
        }
      }
  }
}


// ------------------------------------------------------------------ tensor-core variant
// fp16/bf16 inputs and head dims <= 128 on sm_80+: S = Q K^T and O += P V on tensor cores through
// WMMA 16x16x16 fragments with fp32 accumulation. P is split into hi + lo 16-bit parts (two MMAs)
// so that rounding P to bf16 does not add error beyond the fp32-accumulating reference's.
// Warp w owns query rows 16w..16w+15 for the MMAs; the softmax thread layout (rg = tid / 8) maps
// the same rows to the same warp, so only __syncwarp is needed between the two.
template <int DPAD>
struct FwdTcCfg {
  static constexpr int BM = 64;
  static constexpr int BN = DPAD <= 64 ? 64 : 32;
};

template <typename T, int BM, int BN, int DPAD>
constexpr size_t fwd_tc_smem_bytes() {
  return sizeof(float) * (size_t(BM) * (BN + 4) + size_t(BM) * (DPAD + 4)) +
         sizeof(T) * (size_t(BM + 2 * BN) * (DPAD + 8) + 2 * size_t(BM) * (BN + 8));
}

template <typename T, int BN, int DPAD>
__global__ void __launch_bounds__(kFwdThreads)
    cross_modal_attention_fwd_tc_kernel(const __grid_constant__ AttnParams p, T* __restrict__ out, T* __restrict__ out_ung,
                      float* __restrict__ lse) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int BM = 64;
  constexpr int NT = kFwdThreads;
  constexpr int TM = BM / 16;
  constexpr int TN = BN / 8;
  constexpr int DC = DPAD / 32;
  constexpr int SS = BN + 4, OS = DPAD + 4, HS = DPAD + 8, PS = BN + 8;
  static_assert(BN % 16 == 0 && DPAD % 32 == 0 && NT == 128, "tile shape");

  MMK_DYN_SMEM(smem4);
  float* Sf = reinterpret_cast<float*>(smem4);
  float* Of = Sf + BM * SS;
  T* Qh = reinterpret_cast<T*>(Of + BM * OS);
  T* Kh = Qh + BM * HS;
  T* Vh = Kh + BN * HS;
  T* Phi = Vh + BN * HS;
  T* Plo = Phi + BM * PS;

  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, rg = tid >> 3, cg = tid & 7, warp = tid >> 5;
  const int q0 = qb * BM;
  const int64_t qlen = q_valid_len(p, b);
  const int hk = h / (p.Hq / p.Hkv);
  const int D = p.D, Dv = p.Dv;
  const int DK = (D + 15) / 16, DVK = (Dv + 15) / 16;
  const float NEG_INF = -std::numeric_limits<float>::infinity();

  for (int idx = tid; idx < BM * OS; idx += NT) Of[idx] = 0.f;
  float mrow[TM], lrow[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    mrow[i] = NEG_INF;
    lrow[i] = 0.f;
  }

  if (q0 < qlen) {  // uniform over the CTA
    const T* qbase = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh + (int64_t)q0 * p.q_sl;
    const int qrows = (int)((qlen - q0) < BM ? (qlen - q0) : BM);
    load_tile_raw<T, BM, DPAD, HS, NT>(Qh, qbase, p.q_sl, qrows, D, p.q_vec4 != 0);
    const int last_row = q0 + qrows - 1;

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

      for (int64_t j0 = 0; j0 < limit; j0 += BN) {
        const int nvalid = (int)((limit - j0) < BN ? (limit - j0) : BN);
        __syncthreads();  // previous tile consumed; Q and zeroed O stored (first time)
        load_tile_raw<T, BN, DPAD, HS, NT>(Kh, kbase + j0 * sg.k_sl, sg.k_sl, nvalid, D, vec);
        load_tile_raw<T, BN, DPAD, HS, NT>(Vh, vbase + j0 * sg.v_sl, sg.v_sl, nvalid, Dv, vec);
        __syncthreads();

        // S = Q K^T for this warp's 16 rows.
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

#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const int rl = rg * TM + i;
          const int64_t row = q0 + rl;
          float sv[TN];
          float tmax = NEG_INF;
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) {
            const int jl = cg + 8 * jj;
            const int64_t col = j0 + jl;
            const bool ok = key_visible(p, jl < nvalid, row, col, off);
            sv[jj] = ok ? Sf[rl * SS + jl] * p.scale_log2 + bias2 : NEG_INF;
            tmax = fmaxf(tmax, sv[jj]);
          }
          tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
          tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
          tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 4));
          const float mnew = fmaxf(mrow[i], tmax);
          const float muse = (mnew == NEG_INF) ? 0.f : mnew;
          const float alpha = exp2f(mrow[i] - muse);
          float psum = 0.f;
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) {
            const int jl = cg + 8 * jj;
            const float pv = exp2f(sv[jj] - muse);
            psum += pv;
            const T hi = from_f<T>(pv);
            Phi[rl * PS + jl] = hi;
            Plo[rl * PS + jl] = from_f<T>(pv - to_f(hi));
          }
          psum += __shfl_xor_sync(0xffffffffu, psum, 1);
          psum += __shfl_xor_sync(0xffffffffu, psum, 2);
          psum += __shfl_xor_sync(0xffffffffu, psum, 4);
          lrow[i] = lrow[i] * alpha + psum;
          mrow[i] = mnew;
#pragma unroll
          for (int k = 0; k < DC; ++k)
#pragma unroll
            for (int e = 0; e < 4; ++e) Of[rl * OS + k * 32 + cg * 4 + e] *= alpha;
        }
        __syncwarp();

        // O += (P_hi + P_lo) V for this warp's 16 rows.
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
    }
  }
  __syncthreads();  // Of complete

  const float tg = p.gate ? tanhf(p.gate[h]) : 1.f;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int rl = rg * TM + i;
    const int64_t row = q0 + rl;
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
          const float o = Of[rl * OS + c] * inv;
          out[obase + c] = from_f<T>(o * tg);
          if (out_ung) out_ung[obase + c] = from_f<T>(o);
        }
      }
  }
#endif
}

}  // namespace cuda
}  // namespace mmkernels
