// Fused LITE forward for AVX-512 with AVX512-BF16 (also what the amx path runs).
// Compiled with this ISA's flags only (CMakeLists.txt); entered only after cpu_isa.cpp has checked the CPU.
#define FASTRANK_ISA_NS isa_avx512bf16

#include "cpu/lite_kernels.inc"
