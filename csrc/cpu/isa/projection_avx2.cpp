// Token projection + L2 normalisation for AVX2 + FMA: 8-float vectors, 16 registers.
// Compiled with this ISA's flags only (CMakeLists.txt); entered only after cpu_isa.cpp has checked the CPU.
#define FASTRANK_ISA_NS isa_avx2

#include "cpu/projection_kernels.inc"
