// Shared device/host helpers of the mmkernels CUDA kernels (attention and gated fusion).
// Kept light: only c10 headers, no ATen/cuda/CUDAContext.h (needs cusparse headers).
#pragma once

#ifdef MMK_CUDA_EMULATE
// Host emulation of the kernels for CPU-only testing (see emu/): defines the CUDA built-ins.
#include "emu/emu.h"
#define MMK_DYN_SMEM(name) float4* name = reinterpret_cast<float4*>(::mmk_emu::dyn_smem())
#else
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define MMK_DYN_SMEM(name) extern __shared__ __align__(128) float4 name[]
#endif

#include <cstdint>

#include "../common/limits.h"

namespace mmkernels {
namespace cuda {

// ------------------------------------------------------------------ dtype conversion
template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// A group of V elements loaded/stored with one instruction (needs V*sizeof(T)-byte alignment).
template <typename T, int V>
struct alignas(sizeof(T) * V) VecT {
  T v[V];
};

__device__ __forceinline__ int64_t clamp_len(int64_t x, int64_t hi) {
  return x < 0 ? 0 : (x > hi ? hi : x);
}

// Whether the architecture being compiled can run a kernel's tile policy: tensor-core tiles use
// WMMA bf16 fragments, which need sm_80. The host pass and the emulator see every policy.
template <bool kTensorCores>
__host__ __device__ constexpr bool arch_has_tiles() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return !kTensorCores;
#else
  return true;
#endif
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------ tile loads
// Load `rows` rows x DPAD columns of a (row-strided, column-contiguous) global matrix into
// shared memory as fp32 with row stride SSTR. Row r is read from base + r * row_stride for
// r < valid_rows, columns c < ncols; everything else (padding rows/columns) is zero-filled so that
// no garbage (possibly NaN/Inf) ever reaches the math. `vec4` says 4-element groups are aligned
// (ncols % 4 == 0, row_stride % 4 == 0, base aligned to 4 * sizeof(T)).
template <typename T, int ROWS, int DPAD, int SSTR, int NT>
__device__ __forceinline__ void load_tile(float* __restrict__ s, const T* __restrict__ base,
                                          int64_t row_stride, int valid_rows, int ncols, bool vec4,
                                          float mul = 1.f) {
  static_assert(DPAD % 4 == 0, "DPAD");
  constexpr int CH = DPAD / 4;  // 4-column chunks per row
  const int tid = threadIdx.x;
  if (vec4) {
    for (int idx = tid; idx < ROWS * CH; idx += NT) {
      const int r = idx / CH;
      const int c = (idx - r * CH) * 4;
      float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
      if (r < valid_rows && c < ncols) {
        const VecT<T, 4> g = *reinterpret_cast<const VecT<T, 4>*>(base + r * row_stride + c);
        val.x = to_f(g.v[0]) * mul;
        val.y = to_f(g.v[1]) * mul;
        val.z = to_f(g.v[2]) * mul;
        val.w = to_f(g.v[3]) * mul;
      }
      *reinterpret_cast<float4*>(s + r * SSTR + c) = val;
    }
  } else {
    for (int idx = tid; idx < ROWS * DPAD; idx += NT) {
      const int r = idx / DPAD;
      const int c = idx - r * DPAD;
      float val = 0.f;
      if (r < valid_rows && c < ncols) val = to_f(base[r * row_stride + c]) * mul;
      s[r * SSTR + c] = val;
    }
  }
}

// Same as load_tile but keeps the element type (16-bit tiles for tensor-core fragments).
template <typename T, int ROWS, int DPAD, int SSTR, int NT>
__device__ __forceinline__ void load_tile_raw(T* __restrict__ s, const T* __restrict__ base, int64_t row_stride,
                                              int valid_rows, int ncols, bool vec4) {
  static_assert(DPAD % 4 == 0 && SSTR % 4 == 0, "DPAD");
  constexpr int CH = DPAD / 4;
  const int tid = threadIdx.x;
  const T zero = from_f<T>(0.f);
  if (vec4) {
    for (int idx = tid; idx < ROWS * CH; idx += NT) {
      const int r = idx / CH;
      const int c = (idx - r * CH) * 4;
      VecT<T, 4> val;
      if (r < valid_rows && c < ncols) {
        val = *reinterpret_cast<const VecT<T, 4>*>(base + r * row_stride + c);
      } else {
        val.v[0] = zero; val.v[1] = zero; val.v[2] = zero; val.v[3] = zero;
      }
      *reinterpret_cast<VecT<T, 4>*>(s + r * SSTR + c) = val;
    }
  } else {
    for (int idx = tid; idx < ROWS * DPAD; idx += NT) {
      const int r = idx / DPAD;
      const int c = idx - r * DPAD;
      s[r * SSTR + c] = (r < valid_rows && c < ncols) ? base[r * row_stride + c] : zero;
    }
  }
}

// ------------------------------------------------------------------ attention arguments
// kMaxSegments (one Segment slot per modality) comes from ../common/limits.h.

struct Segment {
  const void* k;  // (B, Lk, Hkv, D)
  const void* v;  // (B, Lk, Hkv, Dv)
  void* dk;       // backward only: grad of k, same shape, own strides
  void* dv;
  int64_t k_sb, k_sl, k_sh;
  int64_t v_sb, v_sl, v_sh;
  int64_t dk_sb, dk_sl, dk_sh;
  int64_t dv_sb, dv_sl, dv_sh;
  int64_t len;        // Lk_m (tensor extent)
  int64_t blk_start;  // backward dK/dV kernel: first global key-block index of this segment
  const uint8_t* mask;  // kv_masks[m] (B, Lk) as bytes, 1 = attend; nullptr: every key
  int64_t mask_sb;      // its batch stride (unit key stride)
  int vec4;           // k and v tiles may be loaded with 4-element vectors
};

struct AttnParams {
  Segment seg[kMaxSegments];
  int num_seg;
  int B, Lq, Hq, Hkv, D, Dv;
  float scale_log2;  // scale * log2(e)
  float scale;
  int causal;
  const int64_t* kv_lengths;  // (B, M) contiguous or nullptr
  const int64_t* q_lengths;   // (B,) or nullptr
  const float* bias;          // (Hq, M) contiguous fp32 or nullptr
  const float* gate;          // (Hq,) fp32 or nullptr
  // q (B, Lq, Hq, D) strides (elements)
  const void* q;
  int64_t q_sb, q_sl, q_sh;
  int q_vec4;
};

__device__ __forceinline__ int64_t seg_valid_len(const AttnParams& p, int b, int m) {
  const int64_t L = p.seg[m].len;
  return p.kv_lengths ? clamp_len(p.kv_lengths[(int64_t)b * p.num_seg + m], L) : L;
}

__device__ __forceinline__ int64_t q_valid_len(const AttnParams& p, int b) {
  return p.q_lengths ? clamp_len(p.q_lengths[b], p.Lq) : (int64_t)p.Lq;
}

// Block-wide sum of one float per thread (NT threads, NT % 32 == 0); result valid in all threads.
// `red` must hold NT/32 floats. Contains __syncthreads(): call from uniform control flow.
template <int NT>
__device__ __forceinline__ float block_sum(float x, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // previous use of `red` finished
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) t += red[w];  // fixed order: deterministic
  return t;
}

}  // namespace cuda
}  // namespace mmkernels
