// The distillation losses' per-row math, shared by the baseline driver (losses.cpp) and the per-ISA units
// (isa/losses_<isa>.cpp, compiled from losses_rows.inc with their own flags). Plain declarations only.
#pragma once
#include <cstdint>

namespace fastrank {
namespace losses_cpu {

// Must match fastrank/ops/losses.py: LOSS_KINDS and REDUCTIONS.
enum Kind : int { MSE = 0, MARGIN_MSE = 1, M3SE = 2, SOFTMAX_CE = 3, KL_DIV = 4, RANKDISTIL_B = 5 };
enum Reduction : int { NONE = 0, SUM = 1, MEAN = 2 };
// Candidate classes after masking.
enum Cls : uint8_t { MASKED = 0, POS = 1, NEG = 2 };
// A row's classes are stored as wide as a float lane: over uint8 classes GCC vectorised the row loops 64
// lanes wide, longer than a typical row (K = 20), which then ran entirely in scalar iterations (a
// softmax_ce call at B=128, K=20 spent 51 us there). With 32-bit classes a float loop runs 16 lanes.
using ClsT = int32_t;

// One query's loss over K candidates (s, t zero where masked); writes g (dL/ds) and *has_term.
using DistillRowF32 = float (*)(int kind, int64_t K, const float* s, const float* t, const ClsT* cls, float param,
                                float* g, float* work, bool* has_term);
using DistillRowF64 = double (*)(int kind, int64_t K, const double* s, const double* t, const ClsT* cls,
                                 double param, double* g, double* work, bool* has_term);
// One row of in-batch softmax cross-entropy: row holds the M scores (unscaled), y the target column; writes g.
using InbatchRowF32 = float (*)(int64_t M, const float* row, int64_t y, float tau, float* g);
using InbatchRowF64 = double (*)(int64_t M, const double* row, int64_t y, double tau, double* g);

struct RowKernels {
  DistillRowF32 distill_f32;
  DistillRowF64 distill_f64;
  InbatchRowF32 inbatch_f32;
  InbatchRowF64 inbatch_f64;
};

}  // namespace losses_cpu
}  // namespace fastrank

#define FASTRANK_DECLARE_LOSSES_ISA(NS)                                  \
  namespace fastrank {                                                    \
  namespace NS {                                                          \
  extern const losses_cpu::RowKernels losses_rows;                        \
  }                                                                       \
  }
