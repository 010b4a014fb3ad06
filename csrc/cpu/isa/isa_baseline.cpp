// The CPU kernels at the baseline level: SSE2 on x86-64 (4 floats), the target's default elsewhere
// (with MMKERNELS_NATIVE=1 the whole build, this file included, targets the building CPU).
#include "../cpu_isa.h"

#define MMK_ISA_NAMESPACE isa_baseline
#define MMK_ISA_WIDTH 4
#define MMK_ISA_NAME "baseline"
#define MMK_ISA_TABLE kIsaBaselineKernels
#include "isa_level.inc"
