// Large fresh output buffers: optionally ask Linux for transparent huge pages before the first
// touch (MMKERNELS_CPU_THP=1; PyTorch's own switch is THP_MEM_ALLOC_ENABLE=1). On VMs the 4 KiB
// page faults of a fresh 100+ MB output cost more than a memory-bound kernel itself, but with
// THP "defrag=madvise" a fault can stall in compaction for a second: measured here, it was
// 3-4x faster on some calls and 5-15x slower on others, hence off by default.
#pragma once

#include <ATen/core/Tensor.h>

#include <ATen/Parallel.h>

#include <algorithm>
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

// Faults a large fresh output buffer in before a kernel writes it: one madvise(MADV_POPULATE_WRITE)
// per thread's share instead of a page fault per 4 KiB page taken by the kernel's own stores (half
// the cost measured here, and no lock contention between threads faulting the same buffer). Pages
// already resident (a buffer the allocator reused) cost a page-table walk. A kernel older than
// Linux 5.14 answers EINVAL and the stores fault as before.
inline void populate_pages(const at::Tensor& t) {
#if defined(__linux__)
#if defined(MADV_POPULATE_WRITE)
  constexpr int kMadvPopulateWrite = MADV_POPULATE_WRITE;
#else
  constexpr int kMadvPopulateWrite = 23;  // Linux's value, absent from older headers
#endif
  constexpr uintptr_t kPage = 4096;
  constexpr int64_t kMinBytes = int64_t(2) << 20;
  const int64_t bytes = t.numel() * t.element_size();
  if (bytes < kMinBytes) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kPage - 1) & ~(kPage - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(kPage - 1);
  const int64_t pages = static_cast<int64_t>((e - a) / kPage);
  at::parallel_for(0, pages, 256, [&](int64_t p0, int64_t p1) {
    (void)madvise(reinterpret_cast<void*>(a + p0 * kPage), static_cast<size_t>(p1 - p0) * kPage, kMadvPopulateWrite);
  });
#else
  (void)t;
#endif
}

}  // namespace mmkernels::cpu
