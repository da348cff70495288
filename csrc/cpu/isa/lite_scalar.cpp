// Fused LITE forward for the baseline target (any CPU): the compiler's vectors.
// Compiled with this ISA's flags only (CMakeLists.txt); entered only after cpu_isa.cpp has checked the CPU.
#define FASTRANK_ISA_NS isa_scalar

#include "cpu/lite_kernels.inc"
