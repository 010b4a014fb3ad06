// Shared helpers usable from host C++ and CUDA device code.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMK_HD __host__ __device__ __forceinline__
#else
#define MMK_HD inline
#endif
