// Token projection + L2 normalisation for AVX-512 F/BW/VL/DQ: 16-float vectors, 32 registers.
// Compiled with this ISA's flags only (CMakeLists.txt); entered only after cpu_isa.cpp has checked the CPU.
#define FASTRANK_ISA_NS isa_avx512

#include "cpu/projection_kernels.inc"
