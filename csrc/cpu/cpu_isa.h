// Runtime choice of the CPU instruction set for the explicitly vectorised kernels (csrc/cpu/isa):
// each level is compiled in its own translation unit for its own target, and the best level the
// CPU supports is chosen once, on the first CPU op (MMKERNELS_CPU_ISA=baseline|avx2|avx512 forces one).
// No torch headers: the ISA translation units include this one.
#pragma once

#include <cstdint>

#include "../common/fast_math.h"  // the constants of isa/vec.h's exp and tanh
#include "../common/limits.h"

namespace mmkernels::cpu {

enum CpuIsa : int { kIsaBaseline = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kNumIsa = 3 };

// fp32 gated fusion inputs: (M, N, H) contiguous; present (M, N) or null; act 0 = tanh, 1 = identity.
struct GatedFusionRows {
  const float* f;
  const float* l;
  const bool* present;
  long long M, N, H;
  int act;
};
constexpr int kMaxVecModalities = kMaxSegments;  // the op's limit; the kernels keep one vector per modality

// A register-tiled product of the CPU attention (isa/attention_tiles.h), with vector lanes along the
// contiguous dimension of `a` and `out`:
//   out[i * ldo + l] = init + sum over t < len of b[i * b_outer + t * b_inner] * a[t * lda + l]
// for outputs i < outer and lanes l < vecs * width; init = 0, out itself, or out times scale[l].
enum TileInit : int { kTileZero = 0, kTileAccumulate = 1, kTileScale = 2 };
struct TileProduct {
  const float* a;
  long long lda;
  const float* b;
  long long b_outer, b_inner, len;
  float* out;
  long long ldo;
  int init;
  const float* scale;
  long long outer, vecs;
};

// The backward's elementwise step on a (key block x row block) tile held transposed (n x rp; see
// attention_bwd_scores_rows): st -> P^T, dpt -> dS^T, ds_sum += each row's sum of dS.
struct AttnBwdScores {
  float* st;
  float* dpt;
  long long n, rp;
  const float* mask_bias;  // (n,) or null
  const int* limit;        // (rp,) visible keys of the block per row
  const float* shift;      // (rp,) lse - bias per row
  const float* di;         // (rp,) Di per row
  float* ds_sum;           // (rp,)
};

// One key block of the fp32 attention forward (isa/attention_tiles.h) on a tile of R query rows, held
// transposed with rp = R rounded up to the level's vector width (rows past R: zero in qt, limit 0).
struct AttnFwdBlock {
  const float* qt;  // (D, rp) the tile's queries times the softmax scale, transposed
  const float* k;   // (n, D) the block's keys, row stride ldk
  const float* v;   // (n, Dv) its values, row stride ldv
  long long ldk, ldv, n, rp, D, Dv;
  const float* mask_bias;  // (n,) 0 for a kept key, -inf for a masked one; null without a mask
  const int* limit;        // (rp,) per row: the block's keys [0, limit) are visible
  const float* row_bias;   // (rp,) per row: the segment's modality bias
  float* st;               // (n, rp) scratch: the scores, then the probabilities, transposed
  float* row_max;          // (rp,) running max of each row's biased scores (-inf before its first key)
  float* row_sum;          // (rp,) running sum of exp(score - max)
  float* alpha;            // (rp,) scratch: this block's rescaling of each row's output
  float* acc_t;            // (Dv, rp) running unnormalised output rows, transposed
  // The next block's keys and values, prefetched into L2 while this block computes (null: none).
  const void* next_k;
  const void* next_v;
  long long next_k_stride, next_v_stride, next_n, next_row_bytes_k, next_row_bytes_v;  // strides in bytes
  const int* next_rows;  // the next block's row j is row next_rows[j] from next_k / next_v (null: row j)
};

// The kernels of one level. Gated fusion (isa/gated_fusion_rows.h): positions [n0, n1) of the op.
struct CpuIsaKernels {
  const char* name;
  int width;  // floats per vector
  void (*gated_fusion_fwd)(const GatedFusionRows& rows, float* fused, float* gates, long long n0, long long n1);
  void (*gated_fusion_bwd)(const GatedFusionRows& rows, const float* grad_fused, const float* grad_gates, float* df,
                           float* dl, long long n0, long long n1);
  // Attention (isa/attention_tiles.h): one forward key block, a register-tiled product, the backward's
  // elementwise step.
  void (*attention_fwd_block)(const AttnFwdBlock& block);
  void (*tile_product)(const TileProduct& product);
  void (*attention_bwd_scores)(const AttnBwdScores& tile);
};

// nullptr where the level is not compiled in (not x86-64).
const CpuIsaKernels* isa_kernels(CpuIsa level);
bool cpu_supports(CpuIsa level);
CpuIsa current_isa();
const CpuIsaKernels& current_kernels();
// Sets the level (tests); returns false, changing nothing, if the CPU or the build lacks it.
bool set_isa(CpuIsa level);

}  // namespace mmkernels::cpu
