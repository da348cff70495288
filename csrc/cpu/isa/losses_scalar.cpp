// Distillation-loss row kernels for the baseline target; compiled with this ISA's flags only (CMakeLists.txt).
#define FASTRANK_ISA_NS isa_scalar
#include "cpu/losses_rows.inc"
