// Large fresh output buffers: ask Linux for transparent huge pages before the first touch.
// On VMs the 4 KiB page faults of a fresh 100+ MB output cost more than the kernel itself
// (memory-bound ops like gated fusion); PyTorch offers the same via THP_MEM_ALLOC_ENABLE=1.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mmkernels::cpu {

inline void advise_hugepages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = t.numel() * t.element_size();
  if (bytes < 8 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (p + bytes) & ~(kHuge - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace mmkernels::cpu
