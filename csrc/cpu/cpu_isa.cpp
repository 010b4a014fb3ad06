#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace mmkernels::cpu {

extern const CpuIsaKernels kIsaBaselineKernels;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
extern const CpuIsaKernels kIsaAvx2Kernels;
extern const CpuIsaKernels kIsaAvx512Kernels;
#endif

const CpuIsaKernels* isa_kernels(CpuIsa level) {
  switch (level) {
    case kIsaBaseline: return &kIsaBaselineKernels;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    case kIsaAvx2: return &kIsaAvx2Kernels;
    case kIsaAvx512: return &kIsaAvx512Kernels;
#endif
    default: return nullptr;
  }
}

bool cpu_supports(CpuIsa level) {
  if (isa_kernels(level) == nullptr) return false;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  switch (level) {
    case kIsaBaseline: return true;
    case kIsaAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case kIsaAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default: return false;
  }
#else
  return level == kIsaBaseline;
#endif
}

namespace {

CpuIsa best_supported() {
  for (int l = kNumIsa - 1; l > kIsaBaseline; --l)
    if (cpu_supports(static_cast<CpuIsa>(l))) return static_cast<CpuIsa>(l);
  return kIsaBaseline;
}

// The level chosen on first use: the best the CPU has, or MMKERNELS_CPU_ISA's (an unknown name or a
// level the CPU lacks is an error, with the reason, from every CPU op until it is fixed).
CpuIsa initial_isa() {
  const char* env = std::getenv("MMKERNELS_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best_supported();
  for (int l = 0; l < kNumIsa; ++l) {
    const CpuIsaKernels* k = isa_kernels(static_cast<CpuIsa>(l));
    if (k != nullptr && std::strcmp(env, k->name) == 0) {
      TORCH_CHECK(cpu_supports(static_cast<CpuIsa>(l)), "MMKERNELS_CPU_ISA=", env,
                  ": this CPU does not support it (best here: ", isa_kernels(best_supported())->name, ")");
      return static_cast<CpuIsa>(l);
    }
  }
  TORCH_CHECK(false, "MMKERNELS_CPU_ISA=", env, ": expected baseline, avx2 or avx512");
}

std::atomic<int>& isa_state() {
  static std::atomic<int> level{static_cast<int>(initial_isa())};
  return level;
}

}  // namespace

CpuIsa current_isa() { return static_cast<CpuIsa>(isa_state().load(std::memory_order_relaxed)); }

const CpuIsaKernels& current_kernels() { return *isa_kernels(current_isa()); }

bool set_isa(CpuIsa level) {
  if (level < 0 || level >= kNumIsa || !cpu_supports(level)) return false;
  isa_state().store(static_cast<int>(level));
  return true;
}

// mmkernels::cpu_isa(int level) -> int: sets the level when level >= 0 (tests), and returns the one in
// use; -2 asks for the best level this CPU supports.
int64_t cpu_isa_op(int64_t level) {
  if (level == -2) return best_supported();
  if (level >= 0) {
    TORCH_CHECK(level < kNumIsa, "cpu_isa: level must be 0 (baseline), 1 (avx2) or 2 (avx512), got ", level);
    TORCH_CHECK(set_isa(static_cast<CpuIsa>(level)), "cpu_isa: this CPU or build lacks ",
                isa_kernels(static_cast<CpuIsa>(level)) ? isa_kernels(static_cast<CpuIsa>(level))->name : "that level");
  }
  return current_isa();
}

}  // namespace mmkernels::cpu
