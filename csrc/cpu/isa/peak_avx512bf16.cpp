// Peak multiply-add loops for the avx512bf16 unit; compiled with this ISA's flags only (CMakeLists.txt).
#define FASTRANK_ISA_NS isa_avx512bf16
#include "cpu/peak_kernels.inc"
