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

// The kernels of one level (isa/gated_fusion_rows.h): positions [n0, n1) of the op.
struct CpuIsaKernels {
  const char* name;
  void (*gated_fusion_fwd)(const GatedFusionRows& rows, float* fused, float* gates, long long n0, long long n1);
  void (*gated_fusion_bwd)(const GatedFusionRows& rows, const float* grad_fused, const float* grad_gates, float* df,
                           float* dl, long long n0, long long n1);
  // Attention rows (isa/softmax_rows.h): max of s[0, n); s = exp(s - c) returning its sum;
  // s = P = exp(s - c), dp = P (dp - delta) returning the sum of dp.
  float (*row_max)(const float* s, long long n);
  float (*exp_sum)(float* s, long long n, float c);
  float (*exp_ds)(float* s, float* dp, long long n, float c, float delta);
};

// nullptr where the level is not compiled in (not x86-64).
const CpuIsaKernels* isa_kernels(CpuIsa level);
bool cpu_supports(CpuIsa level);
CpuIsa current_isa();
const CpuIsaKernels& current_kernels();
// Sets the level (tests); returns false, changing nothing, if the CPU or the build lacks it.
bool set_isa(CpuIsa level);

}  // namespace mmkernels::cpu
