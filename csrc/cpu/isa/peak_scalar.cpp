// Peak multiply-add loops for the scalar unit; compiled with this ISA's flags only (CMakeLists.txt).
#define FASTRANK_ISA_NS isa_scalar
#include "cpu/peak_kernels.inc"
