// The CPU MaxSim kernels' contract, shared by the baseline bindings (maxsim.cpp) and the per-ISA
// translation units (isa/maxsim_<isa>.cpp). Plain data only: nothing here is compiled per ISA.
#pragma once
#include <cstdint>

#include "element_codes.h"

namespace fastrank {
namespace cpu {

struct Strides3 { int64_t a, b, tok; };       // q: (F, Y, tok) / d: (F, X, tok); last dim contiguous
struct Strides4 { int64_t f, y, x, tok; };   // masks over (F, Y, X, tok)

// Pairs laid out (F, Y, X): q is (F, Y, Lq, H), d is (F, X, Ld, H) (fastrank/ops/pairs.py).
struct MaxSimProblem {
  int64_t F, Y, X, Lq, Ld, H;
  Strides3 qs, ds;
  const uint8_t* qm;  // nullptr: every query token valid
  Strides4 qms;
  const uint8_t* dm;  // nullptr: every doc token valid
  Strides4 dms;
  int threads;        // OpenMP threads for this call (torch.get_num_threads() on the Python side)
  // Packed documents (maxsim_packed): when set, the pair (f, y, x) scores document f * X + x, the rows
  // offsets[doc] .. offsets[doc + 1] of d (token stride ds.tok; ds.a / ds.b and Ld are unused), and the
  // argmax / dd rows are relative to / laid out like those rows. Validated by the caller.
  const int64_t* offsets = nullptr;
  // Optional with offsets: the pair scores document docs[f * X + x] instead (a subset of a packed corpus,
  // scored in place; forward and dq only, since dd assumes each row belongs to exactly one pair).
  const int64_t* docs = nullptr;
  // int8 documents: one float32 scale per row of d (indexed like the rows), the similarity is scale * <q, d>.
  const float* scales = nullptr;
  // int8 documents: false lets paths with VNNI quantize the query per token (four times the multiply-adds
  // of an FMA); true scores the float query against the widened rows on every path (the reference's math).
  bool exact_int8 = true;
};

// The instruction-set paths, lowest first. Names are what FASTRANK_CPU_ISA and fastrank.cpu_isa use.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, Amx = 4 };
constexpr int kIsaCount = 5;
const char* isa_name(Isa isa);

}  // namespace cpu
}  // namespace fastrank

// Every ISA translation unit defines these two entry points in its own namespace, fastrank::isa_<name>.
// dtype: the element code (Elem) of q and d, float32, float16 or bfloat16; or, packed forward only, int8 for d
// with MaxSimProblem::scales and a float32 q.
// forward: out (F, Y, X) float32; argmax (F, Y, X, Lq) int32 or nullptr (inference: not computed).
// backward: dq (F, Y, Lq, H) / dd (F, X, Ld, H) float32, either nullptr; argmax from the forward.
#define FASTRANK_DECLARE_MAXSIM_ISA(NS)                                                                      \
  namespace fastrank {                                                                                       \
  namespace NS {                                                                                             \
  void maxsim_forward(const cpu::MaxSimProblem& p, int dtype, const void* q, const void* d, float* out,      \
                      int32_t* argmax);                                                                      \
  void maxsim_backward(const cpu::MaxSimProblem& p, int dtype, const void* q, const void* d, const float* g, \
                       const int32_t* argmax, float* dq, float* dd);                                         \
  }                                                                                                          \
  }
