// The CPU kernels for AVX2 + FMA (8 floats); compiled for that target only, chosen at run time.
#include "../cpu_isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MMK_ISA_NAMESPACE isa_avx2
#define MMK_ISA_WIDTH 8
#define MMK_ISA_NAME "avx2"
#define MMK_ISA_TABLE kIsaAvx2Kernels
#include "isa_level.inc"
#pragma GCC pop_options
#endif
