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
  // bfloat16 inputs on a path with AVX512-BF16: both MLPs' weights as bfloat16 pairs along k for vdpbf16ps
  // (nullptr otherwise; paths without the instruction ignore them). Each uint32 holds elements k, k + 1.
  const uint32_t* w1b;    // (R1p/8, ld2/2, 8): w1b[b][k/2][t] = W1[8b + t][k, k + 1], ld2 = ld rounded up to even
  const uint32_t* w2b;    // (ldp/32, R1p/2, 32): w2b[p][k/2][t] = W2g[32p + t][k, k + 1]
  const float* u2b;       // (ldp): u2 summed from the bfloat16-rounded W2g, so that the fold stays exact
  const uint32_t* v1b;    // (Cp/8, lq2/2, 8): v1b[b][i/2][t] = V1[8b + t][i, i + 1], lq2 = lq rounded up to even
  const uint32_t* v2b;    // (lqp/32, Cp/2, 32): v2b[p][k/2][t] = V2[32p + t][k, k + 1]
  // bfloat16 inputs on the amx path: the four Linears as whole AMX B tiles, bfloat16 pairs along k, (N/16,
  // K/2, 16): x[b][k/2][t] = W[16b + t][k, k + 1], W zero-padded to N and K (with u2b above; nullptr otherwise).
  const uint32_t* w1t;    // (R1p/16, ldp/2, 16) of W1
  const uint32_t* w2t;    // (ldp/16, R1p/2, 16) of W2g
  const uint32_t* v1t;    // (Cp/16, lqp/2, 16) of V1
  const uint32_t* v2t;    // (lqp/16, Cp/2, 16) of V2
};

// Training: what the forward saves for the backward (per pair, rows i < lq: the row MLP's ReLU'd hidden layer,
// its LayerNorm's mean and rstd, and the second Linear's output before its ReLU), and what the backward reads
// and writes. Weights unpacked but padded, row-major: w1r (R1p, ldp) = W1, w2r (ldp, R1p) = W2 (not folded),
// v1r (Cp, lqp) = V1, v2r (lqp, Cp) = V2, and that LayerNorm's g1, be1 (R1p). grads: one float32 block laid out as kLiteGradOrder says, sums over
// every pair (padded: dW1 (R1p, ldp), dW2 (ldp, R1p), dV1 (Cp, lqp), dV2 transposed (Cp, lqp), the vectors
// padded like their packed forms, dwo (lq * ld), dbo (1)).
struct LiteSaved {
  float* h1;   // (pairs, lq, R1p)
  float* st1;  // (pairs, lq, 2): mean, rstd
  float* a2;   // (pairs, lq, ldp)
};
struct LiteBackward {
  const float* w1r;
  const float* w2r;
  const float* v1r;
  const float* v2r;
  const float* g1;    // (R1p): the LayerNorm after the row MLP's hidden layer, folded away in LiteWeights
  const float* be1;   // (R1p)
  const float* grad;  // (pairs): dL/dscore
  float* ds;          // (pairs, lq, ld): dL/dS, zero at padded and masked positions; nullptr: not wanted
  float* grads;       // the parameter gradients, kLiteGradOrder
};
// The parameter gradients' order and sizes in LiteBackward::grads (in floats; R1p, ldp, Cp, lqp as above):
// w1 R1p*ldp, b1 R1p, g1 R1p, be1 R1p, w2 ldp*R1p, b2 ldp, g2 ldp, be2 ldp, v1 Cp*lqp, cb1 Cp, g3 Cp, be3 Cp,
// v2^T Cp*lqp, cb2 lqp, g4 lqp, be4 lqp, wo lq*ld, bo 1.

}  // namespace cpu
}  // namespace fastrank

// Every ISA translation unit defines this entry point in its own namespace, fastrank::isa_<name>.
// p: the pairs (q (F, Y, Lq, H), d (F, X, Ld, H), masks), Lq <= lq and Ld <= ld; dtype: the element code of
// q and d (float32, float16 or bfloat16); out: (F, Y, X) float32. With `saved` (training), the forward runs in
// float32 whatever the dtype and writes what the backward reads; lite_backward then writes dS and the
// parameter gradients (LiteBackward).
#define FASTRANK_DECLARE_LITE_ISA(NS)                                                                 \
  namespace fastrank {                                                                                \
  namespace NS {                                                                                      \
  void lite_forward(const cpu::MaxSimProblem& p, int dtype, const void* q, const void* d,             \
                    const cpu::LiteWeights& w, float* out, const cpu::LiteSaved* saved);              \
  void lite_backward(const cpu::MaxSimProblem& p, int dtype, const void* q, const void* d,            \
                     const cpu::LiteWeights& w, const cpu::LiteSaved& saved, const cpu::LiteBackward& b); \
  }                                                                                                   \
  }
