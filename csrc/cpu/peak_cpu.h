// The machine's arithmetic ceilings, measured rather than looked up: register-only loops of independent
// multiply-adds, compiled once per instruction set (csrc/cpu/peak_kernels.inc). Benchmarks divide a kernel's
// FLOP rate by these to say how far it is from what the cores can issue, beside torch's sgemm (which on some
// CPUs runs a narrower path than the CPU has: MKL takes its AVX2 code on AMD Zen 4 and Zen 5).
#pragma once
#include <cstdint>

// Each function runs `iters` rounds on the calling thread and returns the floating-point operations done
// (a multiply-add counts 2); bf16_dot_peak returns 0 where the unit has no bfloat16 dot product.
#define FASTRANK_DECLARE_PEAK_ISA(NS)      \
  namespace fastrank {                     \
  namespace NS {                           \
  double fma_peak(int64_t iters);          \
  double bf16_dot_peak(int64_t iters);     \
  }                                        \
  }

// The amx unit's tile loop: register-only tdpbf16ps on six accumulator tiles (16 x 16 x 32 multiply-adds
// each), as many as the tile file holds beside one A and one B tile.
#define FASTRANK_DECLARE_AMX_PEAK(NS)      \
  namespace fastrank {                     \
  namespace NS {                           \
  double amx_tile_peak(int64_t iters);     \
  }                                        \
  }
