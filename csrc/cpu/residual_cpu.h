// The CPU residual MaxSim kernels' contract (csrc/cpu/residual_kernels.inc, compiled once per ISA by
// csrc/cpu/isa/residual_<isa>.cpp), shared with the bindings (csrc/residual_bindings.cpp), which fill it from
// checked tensors only. Plain data only: nothing here is compiled per ISA.
#pragma once
#include <cstdint>

namespace fastrank {
namespace cpu {

// One query q (Lq, H) against documents stored as PLAID residuals (fastrank/ops/residual.py): token r is
//   centroids[codes[r]] + weights[bucket(r, h)],   bucket(r, h) = (packed[r, (h*b)/8] >> ((h*b)%8)) & (2^b - 1)
// and document i owns rows offsets[i] .. offsets[i + 1].
struct ResidualProblem {
  const float* q;             // (Lq, H), row stride q_stride, last dim contiguous
  int64_t Lq, H, q_stride;
  const uint8_t* packed;      // (T, H * nbits / 8), row stride packed_stride, last dim contiguous
  int64_t packed_stride;
  const void* codes;          // (T,) of element code_elem (Int32, UInt16 or Int64), stride code_stride
  int code_elem;
  int64_t code_stride;
  const float* centroids;     // (C, H), row stride centroid_stride, last dim contiguous; every code < C
  int64_t centroid_stride, C;
  const float* weights;       // (2^nbits,) contiguous
  int nbits;                  // 1, 2 or 4; H * nbits % 8 == 0
  const int64_t* offsets;     // (N + 1,) validated: 0 first, T last, non-decreasing
  const int64_t* docs;        // (scored,) indices into the N documents, or nullptr: every document
  int64_t scored;
  int threads;                // OpenMP threads (torch.get_num_threads() on the Python side)
  // Scale each decompressed row to unit length (0 stays 0) before scoring, as ColBERTv2's decompression does:
  // for indexes of unit-length tokens, whose decompressed rows come out a little shorter or longer.
  bool normalize = false;
};

}  // namespace cpu
}  // namespace fastrank

// Every ISA unit defines this entry point in its own namespace, fastrank::isa_<name>: out (scored,) float32,
// the score of each scored document (0 for a document without rows).
#define FASTRANK_DECLARE_RESIDUAL_ISA(NS)                                        \
  namespace fastrank {                                                           \
  namespace NS {                                                                 \
  void maxsim_residual_forward(const cpu::ResidualProblem& p, float* out);       \
  }                                                                              \
  }
