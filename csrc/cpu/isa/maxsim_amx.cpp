// MaxSim kernels for AMX-BF16 tiles for bfloat16 (float32 and float16 take the AVX-512 kernels).
// Compiled with this ISA's flags only (CMakeLists.txt); entered only after cpu_isa.cpp has checked the CPU.
#define FASTRANK_ISA_NS isa_amx
#define FASTRANK_AMX_KERNEL 1
#include "cpu/maxsim_kernels.inc"
