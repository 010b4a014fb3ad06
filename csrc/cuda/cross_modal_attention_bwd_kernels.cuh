// Device code of cross_modal_attention_bwd.cu (no torch headers: also compiled by the host emulator test in emu/).
#pragma once

#include <cstdint>
#include <limits>

#include "cuda_common.cuh"
#include "mask.cuh"

namespace mmkernels {
namespace cuda {

constexpr int kBwdThreads = 128;

// Tile shapes per head-dim bucket (shared memory stays under 99 KB, the sm_86/89 opt-in limit).
template <int DPAD>
struct BwdCfg {
  static constexpr int KV_BN = DPAD <= 64 ? 64 : (DPAD <= 128 ? 32 : 16);  // dK/dV: keys per CTA
  static constexpr int KV_BMQ = DPAD <= 128 ? 32 : 16;                    // dK/dV: queries per tile
  static constexpr int Q_BM = DPAD <= 64 ? 64 : (DPAD <= 128 ? 32 : 16);  // dQ: queries per CTA
  static constexpr int Q_BN = DPAD <= 128 ? 32 : 16;                      // dQ: keys per tile
};

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

// ------------------------------------------------------------------ 2. dK / dV
template <int BN, int BMQ, int DPAD>
constexpr size_t dkdv_smem_bytes() {
  return sizeof(float) * (2 * size_t(BN) * (DPAD + 4) + 2 * size_t(BMQ) * (DPAD + 4) + 2 * size_t(BN) * (BMQ + 4) +
                          2 * size_t(BMQ));
}

// Thread layout: tid = rg * 8 + cg. Thread owns key rows rg*TN + a (a < TN), score columns
// (queries) cg + 8*c (c < TQ), gradient columns k*32 + cg*4 + e.
template <typename T, int BN, int BMQ, int DPAD>
__global__ void __launch_bounds__(kBwdThreads)
    cross_modal_attention_bwd_dkdv_kernel(const __grid_constant__ AttnParams p, const T* __restrict__ go, int go_vec4,
                        const float* __restrict__ lse, const float* __restrict__ delta) {
  constexpr int NT = kBwdThreads;
  constexpr int TN = BN / 16;
  constexpr int TQ = BMQ / 8;
  constexpr int DC = DPAD / 32;
  constexpr int KS = DPAD + 4, PS = BMQ + 4;
  static_assert(BN % 16 == 0 && BMQ % 8 == 0 && DPAD % 32 == 0, "tile shape");

  MMK_DYN_SMEM(smem4);
  float* Ks = reinterpret_cast<float*>(smem4);
  float* Vs = Ks + BN * KS;
  float* Qs = Vs + BN * KS;
  float* dOs = Qs + BMQ * KS;
  float* Ps = dOs + BMQ * KS;
  float* dSs = Ps + BN * PS;
  float* lse_s = dSs + BN * PS;
  float* del_s = lse_s + BMQ;

  const int x = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, rg = tid >> 3, cg = tid & 7;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  int m = 0;
  while (m + 1 < p.num_seg && (int64_t)x >= p.seg[m + 1].blk_start) ++m;
  const Segment& sg = p.seg[m];
  const int64_t j0 = ((int64_t)x - sg.blk_start) * BN;
  const int64_t kvlen = seg_valid_len(p, b, m);
  const int nk = (int)clamp_len(kvlen - j0, BN);
  const int G = p.Hq / p.Hkv;
  const int D = p.D, Dv = p.Dv;
  const int D4 = (D + 3) & ~3, Dv4 = (Dv + 3) & ~3;

  float accK[TN][DC * 4], accV[TN][DC * 4];
#pragma unroll
  for (int a = 0; a < TN; ++a)
#pragma unroll
    for (int c = 0; c < DC * 4; ++c) {
      accK[a][c] = 0.f;
      accV[a][c] = 0.f;
    }

  if (nk > 0) {  // uniform over the CTA
    const bool vec = sg.vec4 != 0;
    load_tile<T, BN, DPAD, KS, NT>(Ks, static_cast<const T*>(sg.k) + (int64_t)b * sg.k_sb + (int64_t)hk * sg.k_sh + j0 * sg.k_sl,
                                   sg.k_sl, nk, D, vec);
    load_tile<T, BN, DPAD, KS, NT>(Vs, static_cast<const T*>(sg.v) + (int64_t)b * sg.v_sb + (int64_t)hk * sg.v_sh + j0 * sg.v_sl,
                                   sg.v_sl, nk, Dv, vec);
    const int64_t qlen = q_valid_len(p, b);
    const int64_t off = causal_offset(kvlen, qlen);
    int64_t i_start = 0;
    if (p.causal) {
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
        __syncthreads();  // previous Qs/dOs/Ps/dSs consumed
        load_tile<T, BMQ, DPAD, KS, NT>(Qs, qbase + i0 * p.q_sl, p.q_sl, nq, D, p.q_vec4 != 0);
        load_tile<T, BMQ, DPAD, KS, NT>(dOs, go + (((int64_t)b * p.Lq + i0) * p.Hq + h) * Dv, (int64_t)p.Hq * Dv, nq, Dv,
                                        go_vec4 != 0, t);
        if (tid < BMQ) {
          const bool ok = tid < nq;
          lse_s[tid] = ok ? lse[stat_base + i0 + tid] * kLog2e : NEG_INF;
          del_s[tid] = ok ? delta[stat_base + i0 + tid] : 0.f;
        }
        __syncthreads();

        float s[TN][TQ], dp[TN][TQ];
#pragma unroll
        for (int a = 0; a < TN; ++a)
#pragma unroll
          for (int c = 0; c < TQ; ++c) {
            s[a][c] = 0.f;
            dp[a][c] = 0.f;
          }
#pragma unroll 2
        for (int d = 0; d < D4; d += 4) {
          float4 kv[TN], qv[TQ];
#pragma unroll
          for (int a = 0; a < TN; ++a) kv[a] = *reinterpret_cast<const float4*>(Ks + (rg * TN + a) * KS + d);
#pragma unroll
          for (int c = 0; c < TQ; ++c) qv[c] = *reinterpret_cast<const float4*>(Qs + (cg + 8 * c) * KS + d);
#pragma unroll
          for (int a = 0; a < TN; ++a)
#pragma unroll
            for (int c = 0; c < TQ; ++c)
              s[a][c] += kv[a].x * qv[c].x + kv[a].y * qv[c].y + kv[a].z * qv[c].z + kv[a].w * qv[c].w;
        }
#pragma unroll 2
        for (int d = 0; d < Dv4; d += 4) {
          float4 vv[TN], ov[TQ];
#pragma unroll
          for (int a = 0; a < TN; ++a) vv[a] = *reinterpret_cast<const float4*>(Vs + (rg * TN + a) * KS + d);
#pragma unroll
          for (int c = 0; c < TQ; ++c) ov[c] = *reinterpret_cast<const float4*>(dOs + (cg + 8 * c) * KS + d);
#pragma unroll
          for (int a = 0; a < TN; ++a)
#pragma unroll
            for (int c = 0; c < TQ; ++c)
              dp[a][c] += vv[a].x * ov[c].x + vv[a].y * ov[c].y + vv[a].z * ov[c].z + vv[a].w * ov[c].w;
        }
#pragma unroll
        for (int a = 0; a < TN; ++a) {
          const int jl = rg * TN + a;
          const int64_t jg = j0 + jl;
#pragma unroll
          for (int c = 0; c < TQ; ++c) {
            const int il = cg + 8 * c;
            const float l2 = lse_s[il];
            const bool ok = key_visible(p, jl < nk && l2 != NEG_INF, i0 + il, jg, off);
            const float pv = ok ? exp2f(s[a][c] * p.scale_log2 + bias2 - l2) : 0.f;
            Ps[jl * PS + il] = pv;
            dSs[jl * PS + il] = ok ? pv * (dp[a][c] - del_s[il]) : 0.f;  // no 0 * inf
          }
        }
        __syncthreads();  // Ps, dSs complete

#pragma unroll 2
        for (int il = 0; il < BMQ; ++il) {
          float pa[TN], da[TN];
#pragma unroll
          for (int a = 0; a < TN; ++a) {
            pa[a] = Ps[(rg * TN + a) * PS + il];
            da[a] = dSs[(rg * TN + a) * PS + il];
          }
#pragma unroll
          for (int k = 0; k < DC; ++k) {
            const float4 ov = *reinterpret_cast<const float4*>(dOs + il * KS + k * 32 + cg * 4);
            const float4 qv = *reinterpret_cast<const float4*>(Qs + il * KS + k * 32 + cg * 4);
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
    }
  }

  // Epilogue: every key row < Lk_m of the block is written (rows past kv_lengths get 0).
  T* dk = static_cast<T*>(sg.dk);
  T* dv = static_cast<T*>(sg.dv);
#pragma unroll
  for (int a = 0; a < TN; ++a) {
    const int64_t jg = j0 + rg * TN + a;
    if (jg >= sg.len) continue;
    const int64_t kb = (int64_t)b * sg.dk_sb + jg * sg.dk_sl + (int64_t)hk * sg.dk_sh;
    const int64_t vb = (int64_t)b * sg.dv_sb + jg * sg.dv_sl + (int64_t)hk * sg.dv_sh;
#pragma unroll
    for (int k = 0; k < DC; ++k)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = k * 32 + cg * 4 + e;
        if (c < D) dk[kb + c] = from_f<T>(accK[a][k * 4 + e] * p.scale);
        if (c < Dv) dv[vb + c] = from_f<T>(accV[a][k * 4 + e]);
      }
  }
}

// ------------------------------------------------------------------ 3. dQ (+ grad_bias partials)
template <int BM, int BN, int DPAD>
constexpr size_t dq_smem_bytes() {
  return sizeof(float) * (2 * size_t(BM) * (DPAD + 4) + 2 * size_t(BN) * (DPAD + 4) + size_t(BM) * (BN + 4) +
                          2 * size_t(BM) + kBwdThreads / 32);
}

// Thread layout: tid = rg * 8 + cg. Thread owns query rows rg*TM + i, score columns (keys)
// cg + 8*jj, gradient columns k*32 + cg*4 + e.
template <typename T, int BM, int BN, int DPAD>
__global__ void __launch_bounds__(kBwdThreads)
    cross_modal_attention_bwd_dq_kernel(const __grid_constant__ AttnParams p, const T* __restrict__ go, int go_vec4,
                      const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq, int64_t dq_sb,
                      int64_t dq_sl, int64_t dq_sh, float* __restrict__ bias_part, int64_t nqb) {
  constexpr int NT = kBwdThreads;
  constexpr int TM = BM / 16;
  constexpr int TN = BN / 8;
  constexpr int DC = DPAD / 32;
  constexpr int KS = DPAD + 4, PS = BN + 4;
  static_assert(BM % 16 == 0 && BN % 8 == 0 && DPAD % 32 == 0, "tile shape");

  MMK_DYN_SMEM(smem4);
  float* Qs = reinterpret_cast<float*>(smem4);
  float* dOs = Qs + BM * KS;
  float* Ks = dOs + BM * KS;
  float* Vs = Ks + BN * KS;
  float* dSs = Vs + BN * KS;
  float* lse_s = dSs + BM * PS;
  float* del_s = lse_s + BM;
  float* red = del_s + BM;

  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, rg = tid >> 3, cg = tid & 7;
  const int q0 = qb * BM;
  const int64_t qlen = q_valid_len(p, b);
  const int hk = h / (p.Hq / p.Hkv);
  const int D = p.D, Dv = p.Dv;
  const int D4 = (D + 3) & ~3, Dv4 = (Dv + 3) & ~3;
  const float NEG_INF = -std::numeric_limits<float>::infinity();

  float acc[TM][DC * 4];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int c = 0; c < DC * 4; ++c) acc[i][c] = 0.f;

  if (q0 < qlen) {  // uniform over the CTA
    const float t = p.gate ? tanhf(p.gate[h]) : 1.f;
    const int qrows = (int)((qlen - q0) < BM ? (qlen - q0) : BM);
    load_tile<T, BM, DPAD, KS, NT>(Qs, static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh + (int64_t)q0 * p.q_sl,
                                   p.q_sl, qrows, D, p.q_vec4 != 0);
    load_tile<T, BM, DPAD, KS, NT>(dOs, go + (((int64_t)b * p.Lq + q0) * p.Hq + h) * Dv, (int64_t)p.Hq * Dv, qrows, Dv,
                                   go_vec4 != 0, t);
    const int64_t stat_base = ((int64_t)b * p.Hq + h) * p.Lq + q0;
    if (tid < BM) {
      const bool ok = tid < qrows;
      lse_s[tid] = ok ? lse[stat_base + tid] * kLog2e : NEG_INF;
      del_s[tid] = ok ? delta[stat_base + tid] : 0.f;
    }
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
      float bsum = 0.f;

      for (int64_t j0 = 0; j0 < limit; j0 += BN) {
        const int nvalid = (int)((limit - j0) < BN ? (limit - j0) : BN);
        __syncthreads();  // previous tile consumed; Q, dO, lse_s, del_s stored (first time)
        load_tile<T, BN, DPAD, KS, NT>(Ks, kbase + j0 * sg.k_sl, sg.k_sl, nvalid, D, vec);
        load_tile<T, BN, DPAD, KS, NT>(Vs, vbase + j0 * sg.v_sl, sg.v_sl, nvalid, Dv, vec);
        __syncthreads();

        float s[TM][TN], dp[TM][TN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) {
            s[i][jj] = 0.f;
            dp[i][jj] = 0.f;
          }
#pragma unroll 2
        for (int d = 0; d < D4; d += 4) {
          float4 qv[TM], kv[TN];
#pragma unroll
          for (int i = 0; i < TM; ++i) qv[i] = *reinterpret_cast<const float4*>(Qs + (rg * TM + i) * KS + d);
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) kv[jj] = *reinterpret_cast<const float4*>(Ks + (cg + 8 * jj) * KS + d);
#pragma unroll
          for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int jj = 0; jj < TN; ++jj)
              s[i][jj] += qv[i].x * kv[jj].x + qv[i].y * kv[jj].y + qv[i].z * kv[jj].z + qv[i].w * kv[jj].w;
        }
#pragma unroll 2
        for (int d = 0; d < Dv4; d += 4) {
          float4 ov[TM], vv[TN];
#pragma unroll
          for (int i = 0; i < TM; ++i) ov[i] = *reinterpret_cast<const float4*>(dOs + (rg * TM + i) * KS + d);
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) vv[jj] = *reinterpret_cast<const float4*>(Vs + (cg + 8 * jj) * KS + d);
#pragma unroll
          for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int jj = 0; jj < TN; ++jj)
              dp[i][jj] += ov[i].x * vv[jj].x + ov[i].y * vv[jj].y + ov[i].z * vv[jj].z + ov[i].w * vv[jj].w;
        }
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const int il = rg * TM + i;
          const int64_t row = q0 + il;
          const float l2 = lse_s[il];
          const float dl = del_s[il];
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) {
            const int jl = cg + 8 * jj;
            const int64_t col = j0 + jl;
            const bool ok = key_visible(p, jl < nvalid && l2 != NEG_INF, row, col, off);
            const float pv = ok ? exp2f(s[i][jj] * p.scale_log2 + bias2 - l2) : 0.f;
            const float ds = ok ? pv * (dp[i][jj] - dl) : 0.f;  // no 0 * inf
            bsum += ds;
            dSs[il * PS + jl] = ds;
          }
        }
        __syncthreads();  // dSs complete

#pragma unroll 4
        for (int j = 0; j < BN; ++j) {
          float dsj[TM];
#pragma unroll
          for (int i = 0; i < TM; ++i) dsj[i] = dSs[(rg * TM + i) * PS + j];
#pragma unroll
          for (int k = 0; k < DC; ++k) {
            const float4 kv = *reinterpret_cast<const float4*>(Ks + j * KS + k * 32 + cg * 4);
#pragma unroll
            for (int i = 0; i < TM; ++i) {
              acc[i][k * 4 + 0] += dsj[i] * kv.x;
              acc[i][k * 4 + 1] += dsj[i] * kv.y;
              acc[i][k * 4 + 2] += dsj[i] * kv.z;
              acc[i][k * 4 + 3] += dsj[i] * kv.w;
            }
          }
        }
      }
      if (bias_part != nullptr) {  // uniform: block_sum syncs
        const float tot = block_sum<NT>(bsum, red);
        if (tid == 0) bias_part[((int64_t)h * p.num_seg + m) * ((int64_t)p.B * nqb) + (int64_t)b * nqb + qb] = tot;
      }
    }
  }

  // Epilogue: every row < Lq of the block is written (padded rows get 0).
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = q0 + rg * TM + i;
    if (row >= p.Lq) continue;
    const int64_t base = (int64_t)b * dq_sb + row * dq_sl + (int64_t)h * dq_sh;
#pragma unroll
    for (int k = 0; k < DC; ++k)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = k * 32 + cg * 4 + e;
        if (c < D) dq[base + c] = from_f<T>(acc[i][k * 4 + e] * p.scale);
      }
  }
}


// ------------------------------------------------------------------ tensor-core variants
// fp16/bf16 and head dims <= 128 on sm_80+: the four products of each tile (S, dP, and the
// gradient updates) run on tensor cores through WMMA 16x16x16 fragments with fp32 accumulation.
// The 16-bit operands made from fp32 values (t*P, dS) are split into hi + lo parts (two MMAs) so
// they add no rounding error beyond fp32's. dO is used unscaled (t is applied in fp32).
constexpr int kTcKB = 32;  // dK/dV: keys per CTA
constexpr int kTcQB = 32;  // dK/dV: queries per tile
constexpr int kTcBM = 64;  // dQ: queries per CTA
constexpr int kTcBN = 32;  // dQ: keys per tile

template <typename T, int DPAD>
constexpr size_t dkdv_tc_smem_bytes() {
  return sizeof(float) * (2 * size_t(kTcKB) * (kTcQB + 4) + 4 * 256 + 2 * size_t(kTcQB)) +
         sizeof(T) * (size_t(2 * kTcKB + 2 * kTcQB) * (DPAD + 8) + 4 * size_t(kTcKB) * (kTcQB + 8));
}

template <typename T, int DPAD>
constexpr size_t dq_tc_smem_bytes() {
  return sizeof(float) * (2 * size_t(kTcBM) * (kTcBN + 4) + 4 * 256 + 2 * size_t(kTcBM) + 32) +
         sizeof(T) * (size_t(2 * kTcBM + 2 * kTcBN) * (DPAD + 8) + 2 * size_t(kTcBM) * (kTcBN + 8));
}

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

template <typename T, int DPAD>
__global__ void __launch_bounds__(kBwdThreads)
    cross_modal_attention_bwd_dkdv_tc_kernel(const __grid_constant__ AttnParams p, const T* __restrict__ go, int go_vec4,
                           const float* __restrict__ lse, const float* __restrict__ delta) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int NT = kBwdThreads;
  constexpr int KB = kTcKB, QB = kTcQB;
  constexpr int HS = DPAD + 8, SS = QB + 4, PS = QB + 8;
  constexpr int CF = DPAD / 32;  // column fragments per warp (each warp: half of the columns)
  static_assert(KB == 32 && QB % 16 == 0 && DPAD % 32 == 0 && NT == 128, "tile shape");

  MMK_DYN_SMEM(smem4);
  float* Sf = reinterpret_cast<float*>(smem4);
  float* dPf = Sf + KB * SS;
  float* stage_all = dPf + KB * SS;
  float* lse_s = stage_all + 4 * 256;
  float* del_s = lse_s + QB;
  T* Kh = reinterpret_cast<T*>(del_s + QB);
  T* Vh = Kh + KB * HS;
  T* Qh = Vh + KB * HS;
  T* dOh = Qh + QB * HS;
  T* Phi = dOh + QB * HS;
  T* Plo = Phi + KB * PS;
  T* dShi = Plo + KB * PS;
  T* dSlo = dShi + KB * PS;

  const int x = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int rk = warp & 1, ch = warp >> 1;  // warp's key row group and column half
  float* stage = stage_all + warp * 256;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  int m = 0;
  while (m + 1 < p.num_seg && (int64_t)x >= p.seg[m + 1].blk_start) ++m;
  const Segment& sg = p.seg[m];
  const int64_t j0 = ((int64_t)x - sg.blk_start) * KB;
  const int64_t kvlen = seg_valid_len(p, b, m);
  const int nk = (int)clamp_len(kvlen - j0, KB);
  const int G = p.Hq / p.Hkv;
  const int D = p.D, Dv = p.Dv;
  const int DK = (D + 15) / 16, DVK = (Dv + 15) / 16;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> accK[CF], accV[CF];
#pragma unroll
  for (int c = 0; c < CF; ++c) {
    wmma::fill_fragment(accK[c], 0.f);
    wmma::fill_fragment(accV[c], 0.f);
  }

  if (nk > 0) {  // uniform over the CTA
    const bool vec = sg.vec4 != 0;
    load_tile_raw<T, KB, DPAD, HS, NT>(Kh, static_cast<const T*>(sg.k) + (int64_t)b * sg.k_sb + (int64_t)hk * sg.k_sh + j0 * sg.k_sl,
                                       sg.k_sl, nk, D, vec);
    load_tile_raw<T, KB, DPAD, HS, NT>(Vh, static_cast<const T*>(sg.v) + (int64_t)b * sg.v_sb + (int64_t)hk * sg.v_sh + j0 * sg.v_sl,
                                       sg.v_sl, nk, Dv, vec);
    const int64_t qlen = q_valid_len(p, b);
    const int64_t off = causal_offset(kvlen, qlen);
    int64_t i_start = 0;
    if (p.causal) {
      const int64_t lo = j0 - off;
      i_start = lo > 0 ? (lo / QB) * QB : 0;
    }
    for (int g = 0; g < G; ++g) {
      const int h = hk * G + g;
      const float t = p.gate ? tanhf(p.gate[h]) : 1.f;
      const float bias2 = bias_log2(p, h, m);
      const T* qbase = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh;
      const int64_t stat_base = ((int64_t)b * p.Hq + h) * p.Lq;
      for (int64_t i0 = i_start; i0 < qlen; i0 += QB) {
        const int nq = (int)((qlen - i0) < QB ? (qlen - i0) : QB);
        __syncthreads();  // previous tile consumed
        load_tile_raw<T, QB, DPAD, HS, NT>(Qh, qbase + i0 * p.q_sl, p.q_sl, nq, D, p.q_vec4 != 0);
        load_tile_raw<T, QB, DPAD, HS, NT>(dOh, go + (((int64_t)b * p.Lq + i0) * p.Hq + h) * Dv, (int64_t)p.Hq * Dv, nq, Dv,
                                           go_vec4 != 0);
        if (tid < QB) {
          const bool ok = tid < nq;
          lse_s[tid] = ok ? lse[stat_base + i0 + tid] * kLog2e : NEG_INF;
          del_s[tid] = ok ? delta[stat_base + i0 + tid] : 0.f;
        }
        __syncthreads();

        {  // S^T = K Q^T and dP^T = V dO^T: one 16x16 output fragment per warp
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
        }
        __syncthreads();

        for (int idx = tid; idx < KB * QB; idx += NT) {
          const int jl = idx / QB, il = idx - jl * QB;
          const float l2 = lse_s[il];
          const bool ok = key_visible(p, jl < nk && l2 != NEG_INF, i0 + il, j0 + jl, off);
          const float pv = ok ? exp2f(Sf[jl * SS + il] * p.scale_log2 + bias2 - l2) : 0.f;
          const float ds = ok ? pv * (t * dPf[jl * SS + il] - del_s[il]) : 0.f;
          split_store(Phi + jl * PS + il, Plo + jl * PS + il, t * pv);
          split_store(dShi + jl * PS + il, dSlo + jl * PS + il, ds);
        }
        __syncthreads();

        // dV += (t P)^T dO, dK += dS^T Q for this warp's key rows and column half
#pragma unroll
        for (int c = 0; c < CF; ++c) {
          const int dn = ch * CF + c;
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
          if (dn < DVK) {
#pragma unroll
            for (int k = 0; k < QB / 16; ++k) {
              wmma::load_matrix_sync(bf, dOh + k * 16 * HS + dn * 16, HS);
              wmma::load_matrix_sync(a, Phi + rk * 16 * PS + k * 16, PS);
              wmma::mma_sync(accV[c], a, bf, accV[c]);
              wmma::load_matrix_sync(a, Plo + rk * 16 * PS + k * 16, PS);
              wmma::mma_sync(accV[c], a, bf, accV[c]);
            }
          }
          if (dn < DK) {
#pragma unroll
            for (int k = 0; k < QB / 16; ++k) {
              wmma::load_matrix_sync(bf, Qh + k * 16 * HS + dn * 16, HS);
              wmma::load_matrix_sync(a, dShi + rk * 16 * PS + k * 16, PS);
              wmma::mma_sync(accK[c], a, bf, accK[c]);
              wmma::load_matrix_sync(a, dSlo + rk * 16 * PS + k * 16, PS);
              wmma::mma_sync(accK[c], a, bf, accK[c]);
            }
          }
        }
      }
    }
  }

  // Epilogue: rows < Lk_m of this key block (rows past kv_lengths get 0).
  const int64_t jrow = j0 + rk * 16;
  const int nrows = (int)clamp_len(sg.len - jrow, 16);
  T* dk = static_cast<T*>(sg.dk) + (int64_t)b * sg.dk_sb + jrow * sg.dk_sl + (int64_t)hk * sg.dk_sh;
  T* dv = static_cast<T*>(sg.dv) + (int64_t)b * sg.dv_sb + jrow * sg.dv_sl + (int64_t)hk * sg.dv_sh;
#pragma unroll
  for (int c = 0; c < CF; ++c) {
    const int col = (ch * CF + c) * 16;
    if (col < D) store_frag_global<T>(accK[c], stage, dk + col, sg.dk_sl, nrows, D - col, p.scale);
    if (col < Dv) store_frag_global<T>(accV[c], stage, dv + col, sg.dv_sl, nrows, Dv - col, 1.f);
  }
#endif
}

template <typename T, int DPAD>
__global__ void __launch_bounds__(kBwdThreads)
    cross_modal_attention_bwd_dq_tc_kernel(const __grid_constant__ AttnParams p, const T* __restrict__ go, int go_vec4,
                         const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq,
                         int64_t dq_sb, int64_t dq_sl, int64_t dq_sh, float* __restrict__ bias_part, int64_t nqb) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int NT = kBwdThreads;
  constexpr int BM = kTcBM, BN = kTcBN;
  constexpr int HS = DPAD + 8, SS = BN + 4, PS = BN + 8;
  constexpr int TM = BM / 16, TN = BN / 8;
  constexpr int NF = DPAD / 16;  // dQ column fragments per warp (warp w: rows 16w..16w+15)
  static_assert(BM == 64 && BN % 16 == 0 && DPAD % 16 == 0 && NT == 128, "tile shape");

  MMK_DYN_SMEM(smem4);
  float* Sf = reinterpret_cast<float*>(smem4);
  float* dPf = Sf + BM * SS;
  float* stage_all = dPf + BM * SS;
  float* lse_s = stage_all + 4 * 256;
  float* del_s = lse_s + BM;
  float* red = del_s + BM;  // 32 floats reserved
  T* Qh = reinterpret_cast<T*>(red + 32);
  T* dOh = Qh + BM * HS;
  T* Kh = dOh + BM * HS;
  T* Vh = Kh + BN * HS;
  T* dShi = Vh + BN * HS;
  T* dSlo = dShi + BM * PS;

  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, rg = tid >> 3, cg = tid & 7, warp = tid >> 5;
  float* stage = stage_all + warp * 256;
  const int q0 = qb * BM;
  const int64_t qlen = q_valid_len(p, b);
  const int hk = h / (p.Hq / p.Hkv);
  const int D = p.D, Dv = p.Dv;
  const int DK = (D + 15) / 16, DVK = (Dv + 15) / 16;
  const float NEG_INF = -std::numeric_limits<float>::infinity();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);

  if (q0 < qlen) {  // uniform over the CTA
    const float t = p.gate ? tanhf(p.gate[h]) : 1.f;
    const int qrows = (int)((qlen - q0) < BM ? (qlen - q0) : BM);
    load_tile_raw<T, BM, DPAD, HS, NT>(Qh, static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh + (int64_t)q0 * p.q_sl,
                                       p.q_sl, qrows, D, p.q_vec4 != 0);
    load_tile_raw<T, BM, DPAD, HS, NT>(dOh, go + (((int64_t)b * p.Lq + q0) * p.Hq + h) * Dv, (int64_t)p.Hq * Dv, qrows, Dv,
                                       go_vec4 != 0);
    const int64_t stat_base = ((int64_t)b * p.Hq + h) * p.Lq + q0;
    if (tid < BM) {
      const bool ok = tid < qrows;
      lse_s[tid] = ok ? lse[stat_base + tid] * kLog2e : NEG_INF;
      del_s[tid] = ok ? delta[stat_base + tid] : 0.f;
    }
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
      float bsum = 0.f;

      for (int64_t j0 = 0; j0 < limit; j0 += BN) {
        const int nvalid = (int)((limit - j0) < BN ? (limit - j0) : BN);
        __syncthreads();  // previous tile consumed; Q, dO, lse_s, del_s stored (first time)
        load_tile_raw<T, BN, DPAD, HS, NT>(Kh, kbase + j0 * sg.k_sl, sg.k_sl, nvalid, D, vec);
        load_tile_raw<T, BN, DPAD, HS, NT>(Vh, vbase + j0 * sg.v_sl, sg.v_sl, nvalid, Dv, vec);
        __syncthreads();

#pragma unroll
        for (int n = 0; n < BN / 16; ++n) {  // S = Q K^T, dP = dO V^T for this warp's rows
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

#pragma unroll
        for (int i = 0; i < TM; ++i) {  // rows rg*TM + i belong to this warp
          const int il = rg * TM + i;
          const int64_t row = q0 + il;
          const float l2 = lse_s[il];
          const float dl = del_s[il];
#pragma unroll
          for (int jj = 0; jj < TN; ++jj) {
            const int jl = cg + 8 * jj;
            const bool ok = key_visible(p, jl < nvalid && l2 != NEG_INF, row, j0 + jl, off);
            const float pv = ok ? exp2f(Sf[il * SS + jl] * p.scale_log2 + bias2 - l2) : 0.f;
            const float ds = ok ? pv * (t * dPf[il * SS + jl] - dl) : 0.f;
            bsum += ds;
            split_store(dShi + il * PS + jl, dSlo + il * PS + jl, ds);
          }
        }
        __syncwarp();

#pragma unroll
        for (int f = 0; f < NF; ++f) {  // dQ += dS K
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
      if (bias_part != nullptr) {  // uniform: block_sum syncs
        const float tot = block_sum<NT>(bsum, red);
        if (tid == 0) bias_part[((int64_t)h * p.num_seg + m) * ((int64_t)p.B * nqb) + (int64_t)b * nqb + qb] = tot;
      }
    }
  }

  // Epilogue: every row < Lq of the block is written (padded rows get 0).
  const int64_t r0 = q0 + 16 * warp;
  const int nrows = (int)clamp_len((int64_t)p.Lq - r0, 16);
  T* g = dq + (int64_t)b * dq_sb + r0 * dq_sl + (int64_t)h * dq_sh;
#pragma unroll
  for (int f = 0; f < NF; ++f)
    if (f * 16 < D) store_frag_global<T>(acc[f], stage, g + f * 16, dq_sl, nrows, D - f * 16, p.scale);
#endif
}

}  // namespace cuda
}  // namespace mmkernels
