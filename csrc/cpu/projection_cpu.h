// The CPU token-projection kernels' contract (ColBERT's head: a Linear without or with bias, then L2
// normalisation per token), shared by the baseline bindings (projection.cpp) and the per-ISA translation
// units (isa/projection_<isa>.cpp). Plain data only: nothing here is compiled per ISA.
#pragma once
#include <cstdint>

namespace fastrank {
namespace cpu {

// Widths the packed weight is padded to (gemm_micro.inc's row block and column panel).
constexpr int64_t kProjectionPanel = 32;

// N token rows of width H projected to width P: t = p / max(||p||, eps), p = W h + b. Masked rows are never
// read; their outputs and gradients are zero. Pp and Hp are P and H rounded up to kProjectionPanel.
struct ProjectionProblem {
  int64_t N, H, P;
  const float* h;        // (N, H), row i at h + i * h_stride, last dim contiguous
  int64_t h_stride;
  const uint8_t* mask;   // (N,) contiguous, nonzero = a real token; nullptr: every row is
  const float* wt;       // (Pp / 32, H, 32): wt[p][k][c] = W[32p + c][k], zero past P (the forward's B panels)
  const float* bias;     // (Pp), zero past P; nullptr: no bias
  float eps;             // the normalisation's lower bound on ||p|| (F.normalize's eps)
  int threads;           // OpenMP threads for this call
};

// The backward's operands: the forward's output t and norms ||p||, the upstream gradient g = dL/dt, W
// row-major and zero-padded (Pp, Hp); what it writes (each nullptr when not wanted): dh (N, H) contiguous
// (zero at masked rows), dw (Pp, Hp) and db (Pp), sums over every row in an order fixed by N alone (the same
// result for any thread count).
struct ProjectionBackward {
  const float* t;        // (N, P) contiguous
  const float* norms;    // (N)
  const float* g;        // (N, P) contiguous
  const float* wr;       // (Pp, Hp)
  float* dh;
  float* dw;
  float* db;
};

}  // namespace cpu
}  // namespace fastrank

// Every ISA translation unit defines these entry points in its own namespace, fastrank::isa_<name>.
// forward: t (N, P) float32 contiguous, norms (N) float32 or nullptr (not needed without a backward).
#define FASTRANK_DECLARE_PROJECTION_ISA(NS)                                                                  \
  namespace fastrank {                                                                                       \
  namespace NS {                                                                                             \
  void projection_forward(const cpu::ProjectionProblem& p, float* t, float* norms);                         \
  void projection_backward(const cpu::ProjectionProblem& p, const cpu::ProjectionBackward& b);              \
  }                                                                                                          \
  }
