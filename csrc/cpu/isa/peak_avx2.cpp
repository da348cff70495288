// Peak multiply-add loops for the avx2 unit; compiled with this ISA's flags only (CMakeLists.txt).
#define FASTRANK_ISA_NS isa_avx2
#include "cpu/peak_kernels.inc"
