// Distillation-loss row kernels for AVX-512 (every AVX-512 path: the losses have no bf16 or tile math); compiled with this ISA's flags only (CMakeLists.txt).
#define FASTRANK_ISA_NS isa_avx512
#include "cpu/losses_rows.inc"
