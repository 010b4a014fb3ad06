// Minimal host emulation of the CUDA built-ins used by mmkernels' kernels, so that the kernel
// templates can be compiled with g++ and executed on CPU (one std::thread per CUDA thread,
// std::barrier for __syncthreads and warp shuffles). For correctness tests of indexing, masking
// and synchronisation logic on machines without a GPU; far too slow for anything else.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace mmk_emu {

struct Warp {
  std::barrier<> bar{32};
  float vals[32];
};

inline thread_local char* tl_smem = nullptr;
inline thread_local std::barrier<>* tl_block_bar = nullptr;
inline thread_local std::atomic<int>* tl_block_or = nullptr;
inline thread_local Warp* tl_warp = nullptr;

inline void* dyn_smem() { return tl_smem; }

// Run f() as a grid of CUDA blocks (sequentially), each block's threads concurrently.
// Shared memory starts as 0xFF bytes (NaN floats) so reads of unwritten smem poison results.
template <class F>
void launch(dim3 grid, dim3 block, size_t smem, F&& f) {
  const unsigned nt = block.x;
  std::vector<float4> raw(smem / sizeof(float4) + 16);
  float4* base = reinterpret_cast<float4*>((reinterpret_cast<uintptr_t>(raw.data()) + 127) & ~uintptr_t(127));
  struct { float4* p; size_t n; float4* data() { return p; } size_t size() { return n; } } buf{base, smem / sizeof(float4) + 1};
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(buf.data(), 0xFF, buf.size() * sizeof(float4));
        std::barrier<> bar(nt);
        std::atomic<int> block_or{0};
        std::vector<std::unique_ptr<Warp>> warps;
        for (unsigned w = 0; w < (nt + 31) / 32; ++w) warps.emplace_back(new Warp());
        std::vector<std::thread> ths;
        ths.reserve(nt);
        for (unsigned t = 0; t < nt; ++t)
          ths.emplace_back([&, t] {
            threadIdx = make_uint3(t, 0, 0);
            blockIdx = make_uint3(bx, by, bz);
            blockDim = block;
            gridDim = grid;
            tl_smem = reinterpret_cast<char*>(buf.data());
            tl_block_bar = &bar;
            tl_block_or = &block_or;
            tl_warp = warps[t / 32].get();
            f();
          });
        for (auto& th : ths) th.join();
      }
}

}  // namespace mmk_emu

inline void __syncthreads() { mmk_emu::tl_block_bar->arrive_and_wait(); }

// Barrier that returns whether any thread of the block passed a non-zero predicate.
inline int __syncthreads_or(int pred) {
  mmk_emu::tl_block_bar->arrive_and_wait();  // every thread has read the previous result
  if (threadIdx.x == 0) mmk_emu::tl_block_or->store(0);
  mmk_emu::tl_block_bar->arrive_and_wait();
  if (pred) mmk_emu::tl_block_or->fetch_or(1);
  mmk_emu::tl_block_bar->arrive_and_wait();
  return mmk_emu::tl_block_or->load();
}

inline float __shfl_xor_sync(unsigned, float v, int mask) {
  const unsigned lane = threadIdx.x & 31u;
  mmk_emu::Warp* w = mmk_emu::tl_warp;
  w->vals[lane] = v;
  w->bar.arrive_and_wait();
  const float r = w->vals[lane ^ (unsigned)mask];
  w->bar.arrive_and_wait();
  return r;
}

// ---------------------------------------------------------------- nvcuda::wmma (16x16x16 only)
// Each emulated thread holds the whole tile (the real layout is opaque to the kernels, which only
// use load/store/fill/mma). Checks the documented pointer/ldm alignment requirements.
#include <cassert>
#include <cstdio>
#include <cstdlib>
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M_, int N_, int K_, typename T, typename Layout = void>
struct fragment {
  float v[16][16];
};

inline void emu_check(const void* p, unsigned ldm, unsigned mult) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm % mult != 0) {
    std::fprintf(stderr, "wmma misuse: ptr %p (needs 32-byte alignment), ldm %u (multiple of %u)\n", p, ldm, mult);
    std::abort();
  }
}

template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  emu_check(p, ldm, 16 / sizeof(T));
  // matrix_a: (m, k); matrix_b: (k, n). row_major: element (r, c) at p[r * ldm + c].
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      const T x = std::is_same_v<L, row_major> ? p[r * ldm + c] : p[c * ldm + r];
      f.v[r][c] = (float)x;
    }
}

template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T, void>& f, const float* p, unsigned ldm, layout_t l) {
  emu_check(p, ldm, 4);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

template <typename T>
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, T, void>& f, unsigned ldm, layout_t l) {
  emu_check(p, ldm, 4);
  // Only lane 0 writes: the other lanes hold identical copies (avoids a data race in emulation).
  if ((threadIdx.x & 31u) == 0)
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r][c];
}

template <typename Use, typename T, typename L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float x) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = x;
}

template <typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TC, void>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, TC, void>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
      out[i][j] = s;
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d.v[i][j] = out[i][j];
}
}  // namespace wmma
}  // namespace nvcuda
inline void __syncwarp(unsigned = 0xffffffffu) { mmk_emu::tl_warp->bar.arrive_and_wait(); }
