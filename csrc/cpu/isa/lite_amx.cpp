// Fused LITE forward for AMX-BF16: bfloat16 inference on tiles (lite_amx.inc); float32, float16 and the
// training kernels are the AVX-512 ones, compiled here again.
// Compiled with this ISA's flags only (CMakeLists.txt); entered only after cpu_isa.cpp has checked the CPU
// and Linux has granted the tile state.
#define FASTRANK_ISA_NS isa_amx
#define FASTRANK_AMX_KERNEL 1

#include "cpu/lite_kernels.inc"
