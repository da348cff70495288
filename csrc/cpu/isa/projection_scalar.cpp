// Token projection + L2 normalisation for the baseline target (the compiler's vectors).
// Compiled with this ISA's flags only (CMakeLists.txt); entered only after cpu_isa.cpp has checked the CPU.
#define FASTRANK_ISA_NS isa_scalar

#include "cpu/projection_kernels.inc"
