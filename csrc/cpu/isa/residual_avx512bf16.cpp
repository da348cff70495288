// Residual MaxSim kernels for the avx512bf16 path (and the amx path, which has no residual unit of its own:
// the tile is float32 and scored by FMA, so AMX's bf16 tiles would only lose precision against the reference).
// The same source as residual_avx512.cpp, compiled with this path's flags. Entered only after cpu_isa.cpp has
// checked the CPU.
#define FASTRANK_ISA_NS isa_avx512bf16

#include "cpu/residual_kernels.inc"
