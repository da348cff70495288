// The CPU LITE kernel's contract, shared by the baseline bindings (lite.cpp) and the per-ISA translation
// units (isa/lite_<isa>.cpp). Plain data only: nothing here is compiled per ISA (no inline functions: a copy
// compiled with AVX-512 flags could be the one the linker keeps for every caller).
#pragma once
#include <cstdint>

#include "cpu/maxsim_cpu.h"

namespace fastrank {
namespace cpu {

// Widths the packed weights are padded to: the micro-kernels' row block (A panels of 8 rows) and column
// panel (B panels of 32 columns). R1p, ldp, Cp and lqp below are r1, ld, c and lq rounded up to kLitePanel.
constexpr int64_t kLiteRowBlock = 8;
constexpr int64_t kLitePanel = 32;

// A separable LITE scorer's weights as fastrank/ops/lite_cpu.py packs them: float32, contiguous, zero in
// every padded position. The LayerNorm after the row MLP's wide hidden layer is folded into the second
// Linear (fastrank/ops/lite.py, module docstring): W2g = W2 diag(g1), u2 = W2g 1, c2 = b2 + W2 be1.
struct LiteWeights {
  int64_t lq, ld, r1, c;  // the scorer's query length, doc length, row and column hidden widths
  float eps[4];           // LayerNorm epsilons: row hidden (r1), row output (ld), column hidden (c), column output (lq)
  const float* w1p;       // (R1p/8, ld, 8): w1p[b][j][t] = W1[8b + t][j]
  const float* b1;        // (R1p)
  const float* w2p;       // (ldp/32, R1p, 32): w2p[p][k][t] = W2g[32p + t][k]
  const float* u2;        // (ldp)
  const float* c2;        // (ldp)
  const float* g2;        // (ld)
  const float* be2;       // (ld)
  const float* v1p;       // (Cp/8, lq, 8): v1p[b][i][t] = V1[8b + t][i]
  const float* cb1;       // (Cp)
  const float* g3;        // (Cp)
  const float* be3;       // (Cp)
  const float* v2p;       // (lqp/32, Cp, 32): v2p[p][k][t] = V2[32p + t][k]
  const float* cb2;       // (lqp)
  const float* g4;        // (lq)
  const float* be4;       // (lq)
  const float* wo;        // (lq * ld), row-major over (lq, ld)
  float bo;
  // bfloat16 inputs on a path with AVX512-BF16: the row MLP's weights as bfloat16 pairs along k for vdpbf16ps
  // (nullptr otherwise; paths without the instruction ignore them). Each uint32 holds elements k, k + 1.
  const uint32_t* w1b;    // (R1p/8, ld2/2, 8): w1b[b][k/2][t] = W1[8b + t][k, k + 1], ld2 = ld rounded up to even
  const uint32_t* w2b;    // (ldp/32, R1p/2, 32): w2b[p][k/2][t] = W2g[32p + t][k, k + 1]
  const float* u2b;       // (ldp): u2 summed from the bfloat16-rounded W2g, so that the fold stays exact
};

}  // namespace cpu
}  // namespace fastrank

// Every ISA translation unit defines this entry point in its own namespace, fastrank::isa_<name>.
// p: the pairs (q (F, Y, Lq, H), d (F, X, Ld, H), masks), Lq <= lq and Ld <= ld; dtype: the element code of
// q and d (float32, float16 or bfloat16); out: (F, Y, X) float32.
#define FASTRANK_DECLARE_LITE_ISA(NS)                                                                 \
  namespace fastrank {                                                                                \
  namespace NS {                                                                                      \
  void lite_forward(const cpu::MaxSimProblem& p, int dtype, const void* q, const void* d,             \
                    const cpu::LiteWeights& w, float* out);                                           \
  }                                                                                                   \
  }
