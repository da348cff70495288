// MaxSim kernels for AVX2 + FMA + F16C (-mavx2 -mfma -mf16c): 8-float vectors, 16 registers.
// Compiled with this ISA's flags only (CMakeLists.txt); entered only after cpu_isa.cpp has checked the CPU.
#define FASTRANK_ISA_NS isa_avx2

#include "cpu/maxsim_kernels.inc"
