// Device code of cross_modal_attention_bwd.cu (no torch headers: also compiled by the host emulator test in emu/).
//
// One kernel body per product: dK/dV and dQ, each walking its tiles, masking and forming
// dS = P (dP - Delta) once; the tile policies of cross_modal_attention_bwd_tiles.cuh (SIMT,
// tensor cores) do the products.
#pragma once

#include <cstdint>
#include <limits>

#include "cuda_common.cuh"
#include "mask.cuh"
#include "softmax.cuh"
#include "cross_modal_attention_bwd_tiles.cuh"

namespace mmkernels {
namespace cuda {

// ------------------------------------------------------------------ 1. preprocess
template <typename T>
__global__ void __launch_bounds__(kBwdThreads)
    cross_modal_attention_bwd_pre_kernel(const T* __restrict__ go, const T* __restrict__ o, const float* __restrict__ glse,
                       const float* __restrict__ gate, const int64_t* __restrict__ q_lengths, int B, int Lq, int Hq,
                       int Dv, float* __restrict__ delta, float* __restrict__ rowdot) {
  const int64_t row = (int64_t)blockIdx.x * (kBwdThreads / 32) + threadIdx.x / 32;  // (b, i, h) row of go
  const int lane = threadIdx.x & 31;
  if (row >= (int64_t)B * Lq * Hq) return;  // whole warp exits together
  const int h = (int)(row % Hq);
  const int i = (int)((row / Hq) % Lq);
  const int b = (int)(row / ((int64_t)Hq * Lq));
  float dot = 0.f;
  for (int c = lane; c < Dv; c += 32) dot += to_f(go[row * Dv + c]) * to_f(o[row * Dv + c]);
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, s);
  if (lane == 0) {
    const int64_t qlen = q_lengths ? clamp_len(q_lengths[b], Lq) : (int64_t)Lq;
    const bool valid = i < qlen;
    const int64_t idx = ((int64_t)b * Hq + h) * Lq + i;
    const float t = gate ? tanhf(gate[h]) : 1.f;
    rowdot[idx] = valid ? dot : 0.f;
    delta[idx] = valid ? t * dot - (glse ? glse[idx] : 0.f) : 0.f;
  }
}

// lse (natural log) and Delta of rows first .. first + n - 1 into shared memory; the rest of the
// tile gets -inf / 0 (rows without keys: nothing reaches exp2).
template <int ROWS>
__device__ __forceinline__ void load_row_stats(float* lse_s, float* del_s, const float* lse, const float* delta,
                                               int64_t first, int n) {
  const int tid = threadIdx.x;
  if (tid < ROWS) {
    const bool ok = tid < n;
    lse_s[tid] = ok ? lse[first + tid] * kLog2e : -std::numeric_limits<float>::infinity();
    del_s[tid] = ok ? delta[first + tid] : 0.f;
  }
}

// ------------------------------------------------------------------ 2. dK / dV
// One CTA per (key block of one segment, kv head, batch); loops over the query rows of every query
// head of the GQA group (so dK/dV of a group needs no cross-CTA reduction).
template <typename Tiles, typename T>
__device__ __forceinline__ void cross_modal_attention_bwd_dkdv_body(const AttnParams& p, const T* __restrict__ go,
                                                                    int go_vec4, const float* __restrict__ lse,
                                                                    const float* __restrict__ delta) {
  constexpr int BN = Tiles::BN, BMQ = Tiles::BMQ, TN = Tiles::TN, TQ = Tiles::TQ;
  MMK_DYN_SMEM(smem4);
  const int x = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, rg = tid >> 3, cg = tid & 7;
  Tiles tiles(smem4, rg, cg);
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  int m = 0;
  while (m + 1 < p.num_seg && (int64_t)x >= p.seg[m + 1].blk_start) ++m;
  const Segment& sg = p.seg[m];
  const int64_t j0 = ((int64_t)x - sg.blk_start) * BN;
  const int64_t kvlen = seg_valid_len(p, b, m);
  const int nk = (int)clamp_len(kvlen - j0, BN);
  const int G = p.Hq / p.Hkv;
  const int D = p.D, Dv = p.Dv;
  const KeyMask km = key_mask(p, b, m);

  if (nk > 0 && tile_has_key(km, j0, nk)) {  // uniform over the CTA; fully masked blocks get zero grads
    tiles.load_kv(static_cast<const T*>(sg.k) + (int64_t)b * sg.k_sb + (int64_t)hk * sg.k_sh + j0 * sg.k_sl, sg.k_sl,
                  static_cast<const T*>(sg.v) + (int64_t)b * sg.v_sb + (int64_t)hk * sg.v_sh + j0 * sg.v_sl, sg.v_sl,
                  nk, D, Dv, sg.vec4 != 0);
    const int64_t qlen = q_valid_len(p, b);
    const int64_t off = causal_offset(kvlen, qlen);
    int64_t i_start = 0;
    if (p.causal) {  // query tiles wholly above the block's first key see none of it
      const int64_t lo = j0 - off;
      i_start = lo > 0 ? (lo / BMQ) * BMQ : 0;
    }
    for (int g = 0; g < G; ++g) {
      const int h = hk * G + g;
      const float t = p.gate ? tanhf(p.gate[h]) : 1.f;
      const float bias2 = bias_log2(p, h, m);
      const T* qbase = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh;
      const int64_t stat_base = ((int64_t)b * p.Hq + h) * p.Lq;
      for (int64_t i0 = i_start; i0 < qlen; i0 += BMQ) {
        const int nq = (int)((qlen - i0) < BMQ ? (qlen - i0) : BMQ);
        __syncthreads();  // previous tile consumed
        tiles.load_q_do(qbase + i0 * p.q_sl, p.q_sl, p.q_vec4 != 0, go + (((int64_t)b * p.Lq + i0) * p.Hq + h) * Dv,
                        (int64_t)p.Hq * Dv, go_vec4 != 0, nq, D, Dv, t);
        load_row_stats<BMQ>(tiles.lse_s(), tiles.del_s(), lse, delta, stat_base + i0, nq);
        __syncthreads();
        typename Tiles::Products pr;
        tiles.products(pr, D, Dv);

#pragma unroll
        for (int a = 0; a < TN; ++a) {
          const int jl = rg * TN + a;
#pragma unroll
          for (int c = 0; c < TQ; ++c) {
            const int il = cg + 8 * c;
            const float l2 = tiles.lse_s()[il];
            const bool ok = key_visible(p, jl < nk && l2 != NEG_INF, i0 + il, j0 + jl, off) && km.keeps(j0 + jl);
            const float pv = prob_from_lse(ok, tiles.score(pr, a, c), p.scale_log2, bias2, l2);
            tiles.store_p_ds(a, c, pv, ok ? pv * (tiles.dprob(pr, a, c) - tiles.del_s()[il]) : 0.f);  // no 0 * inf
          }
        }
        __syncthreads();  // P, dS complete
        tiles.accumulate(D, Dv);
      }
    }
  }

  // Epilogue: every key row < Lk_m of the block is written (rows past kv_lengths get 0).
  tiles.store(static_cast<T*>(sg.dk) + (int64_t)b * sg.dk_sb + j0 * sg.dk_sl + (int64_t)hk * sg.dk_sh, sg.dk_sl,
              static_cast<T*>(sg.dv) + (int64_t)b * sg.dv_sb + j0 * sg.dv_sl + (int64_t)hk * sg.dv_sh, sg.dv_sl,
              sg.len - j0, D, Dv, p.scale);
}

// minBlocksPerSM 1, as in the forward: without it ptxas held the head-dim-256 policies to 96-128
// registers and spilled (shared memory bounds their CTAs per SM).
template <typename Tiles, typename T>
__global__ void __launch_bounds__(kBwdThreads, 1)
    cross_modal_attention_bwd_dkdv_kernel(const __grid_constant__ AttnParams p, const T* __restrict__ go, int go_vec4,
                                          const float* __restrict__ lse, const float* __restrict__ delta) {
  if constexpr (arch_has_tiles<Tiles::kTensorCores>()) cross_modal_attention_bwd_dkdv_body<Tiles>(p, go, go_vec4, lse, delta);
}

// ------------------------------------------------------------------ 3. dQ (+ grad_bias partials)
// One CTA per (query block, head, batch) over the valid keys of all segments; per segment it also
// writes the CTA's sum of dS (the modality_bias gradient's partial).
template <typename Tiles, typename T>
__device__ __forceinline__ void cross_modal_attention_bwd_dq_body(const AttnParams& p, const T* __restrict__ go,
                                                                  int go_vec4, const float* __restrict__ lse,
                                                                  const float* __restrict__ delta, T* __restrict__ dq,
                                                                  int64_t dq_sb, int64_t dq_sl, int64_t dq_sh,
                                                                  float* __restrict__ bias_part, int64_t nqb) {
  constexpr int BM = Tiles::BM, BN = Tiles::BN, TM = Tiles::TM, TN = Tiles::TN;
  MMK_DYN_SMEM(smem4);
  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, rg = tid >> 3, cg = tid & 7;
  Tiles tiles(smem4, rg, cg);
  const int q0 = qb * BM;
  const int64_t qlen = q_valid_len(p, b);
  const int hk = h / (p.Hq / p.Hkv);
  const int D = p.D, Dv = p.Dv;
  const float NEG_INF = -std::numeric_limits<float>::infinity();

  if (q0 < qlen) {  // uniform over the CTA
    const float t = p.gate ? tanhf(p.gate[h]) : 1.f;
    const int qrows = (int)((qlen - q0) < BM ? (qlen - q0) : BM);
    tiles.load_q_do(static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh + (int64_t)q0 * p.q_sl, p.q_sl,
                    p.q_vec4 != 0, go + (((int64_t)b * p.Lq + q0) * p.Hq + h) * Dv, (int64_t)p.Hq * Dv, go_vec4 != 0,
                    qrows, D, Dv, t);
    load_row_stats<BM>(tiles.lse_s(), tiles.del_s(), lse, delta, ((int64_t)b * p.Hq + h) * p.Lq + q0, qrows);
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
      const KeyMask km = key_mask(p, b, m);
      float bsum = 0.f;

      for (int64_t j0 = 0; j0 < limit; j0 += BN) {
        const int nvalid = (int)((limit - j0) < BN ? (limit - j0) : BN);
        if (!tile_has_key(km, j0, nvalid)) continue;  // every key masked: no dS, no dQ
        __syncthreads();  // previous tile consumed; Q, dO and row stats stored (first time)
        tiles.load_kv(kbase + j0 * sg.k_sl, sg.k_sl, vbase + j0 * sg.v_sl, sg.v_sl, nvalid, D, Dv, vec);
        __syncthreads();
        typename Tiles::Products pr;
        tiles.products(pr, D, Dv);

#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const int il = rg * TM + i;
          const int64_t row = q0 + il;
          const float l2 = tiles.lse_s()[il];
          const float dl = tiles.del_s()[il];
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) {
            const int jl = cg + 8 * jj;
            const bool ok = key_visible(p, jl < nvalid && l2 != NEG_INF, row, j0 + jl, off) && km.keeps(j0 + jl);
            const float pv = prob_from_lse(ok, tiles.score(pr, i, jj), p.scale_log2, bias2, l2);
            const float ds = ok ? pv * (tiles.dprob(pr, i, jj) - dl) : 0.f;  // no 0 * inf
            bsum += ds;
            tiles.store_ds(i, jj, ds);
          }
        }
        tiles.accumulate_dq(D);
      }
      if (bias_part != nullptr) {  // uniform: block_sum syncs
        const float tot = block_sum<kBwdThreads>(bsum, tiles.red());
        if (tid == 0) bias_part[((int64_t)h * p.num_seg + m) * ((int64_t)p.B * nqb) + (int64_t)b * nqb + qb] = tot;
      }
    }
  }

  // Epilogue: every row < Lq of the block is written (padded rows get 0).
  tiles.store(dq + (int64_t)b * dq_sb + (int64_t)h * dq_sh, dq_sl, q0, p.Lq, D, p.scale);
}

// minBlocksPerSM 1, as in the forward: without it ptxas held the head-dim-256 policies to 96-128
// registers and spilled (shared memory bounds their CTAs per SM).
template <typename Tiles, typename T>
__global__ void __launch_bounds__(kBwdThreads, 1)
    cross_modal_attention_bwd_dq_kernel(const __grid_constant__ AttnParams p, const T* __restrict__ go, int go_vec4,
                                        const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq,
                                        int64_t dq_sb, int64_t dq_sl, int64_t dq_sh, float* __restrict__ bias_part,
                                        int64_t nqb) {
  if constexpr (arch_has_tiles<Tiles::kTensorCores>())
    cross_modal_attention_bwd_dq_body<Tiles>(p, go, go_vec4, lse, delta, dq, dq_sb, dq_sl, dq_sh, bias_part, nqb);
}

}  // namespace cuda
}  // namespace mmkernels
