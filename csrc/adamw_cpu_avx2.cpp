// The CPU AdamW kernel for AVX2 + FMA + F16C (chosen at run time; see adamw_cpu_kernel.h).
#if defined(__x86_64__) && defined(__GNUC__)
// The extension is built with one set of flags, so the ISA is switched on here; g++ does not
// define the feature macros for a target pragma, and ATen's headers (sleef) test them.
#pragma GCC target("avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define HIFT_CPU_ISA avx2
#define HIFT_ADAMW_MATH_ONLY
#include "adamw_cpu_kernel.h"
#endif
