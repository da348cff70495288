// Residual MaxSim kernels for the baseline target (SSE2 on x86-64, NEON on aarch64): for CPUs without AVX2.
// Compiled with this ISA's flags only (CMakeLists.txt); entered only after cpu_isa.cpp has checked the CPU.
#define FASTRANK_ISA_NS isa_scalar

#include "cpu/residual_kernels.inc"
