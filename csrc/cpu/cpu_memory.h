// Large fresh output buffers: optionally ask Linux for transparent huge pages before the first
// touch (MMKERNELS_CPU_THP=1; PyTorch's own switch is THP_MEM_ALLOC_ENABLE=1). On VMs the 4 KiB
// page faults of a fresh 100+ MB output cost more than a memory-bound kernel itself, but with
// THP "defrag=madvise" a fault can stall in compaction for a second: measured here, it was
// 3-4x faster on some calls and 5-15x slower on others, hence off by default.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mmkernels::cpu {

inline void advise_hugepages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = t.numel() * t.element_size();
  static const bool disabled = [] {
    const char* v = std::getenv("MMKERNELS_CPU_THP");
    return v == nullptr || v[0] == '\0' || v[0] == '0';
  }();
  if (disabled || bytes < 8 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (p + bytes) & ~(kHuge - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace mmkernels::cpu
