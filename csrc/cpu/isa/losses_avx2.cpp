// Distillation-loss row kernels for AVX2 + FMA; compiled with this ISA's flags only (CMakeLists.txt).
#define FASTRANK_ISA_NS isa_avx2
#include "cpu/losses_rows.inc"
