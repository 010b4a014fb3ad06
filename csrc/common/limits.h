// The ops' contract limits (DESIGN.md 2), declared once for the C++ and CUDA kernels.
// mmkernels/backends.py declares the same numbers for dispatch; python_tests/test_limits.py
// checks that the two agree (and that the Triton kernels' segment slots match).
#pragma once

namespace mmkernels {

constexpr int kMaxSegments = 8;           // modalities M of one call, on every backend
constexpr int kMaxGpuHeadDim = 256;       // D and Dv on the GPU backends (cpu: any)
constexpr int kMinCudaCapability = 80;    // the CUDA kernels: compute capability 8.0 or newer

}  // namespace mmkernels
