// The CPU kernels for AVX-512 (F, DQ, VL, BW; 16 floats); compiled for that target only, chosen at run time.
#include "../cpu_isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
#define MMK_ISA_NAMESPACE isa_avx512
#define MMK_ISA_WIDTH 16
#define MMK_ISA_NAME "avx512"
#define MMK_ISA_TABLE kIsaAvx512Kernels
#include "isa_level.inc"
#pragma GCC pop_options
#endif
