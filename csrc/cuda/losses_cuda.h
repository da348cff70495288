// Host entry points of the CUDA distillation losses (csrc/cuda/losses.cu). Plain C++: no pybind11, no torch.
// The math is the one documented at the top of csrc/cpu/losses.cpp; pointers are device pointers.
#pragma once

#include <cstdint>

namespace fastrank {
namespace cuda {

// Bytes of zero-initialised device workspace a call needs: a completion counter, the error flags and 8
// reserved bytes, then the per-query losses and "has a term" flags that the last block reduces. Must match
// fastrank/ops/losses.py (_workspace_bytes), which also reads the flags (int32 at byte 4) when validating.
inline int64_t losses_workspace_bytes(int64_t B) { return 16 + 12 * B; }

// The grid x of a launch over B rows (one warp each), checked against CUDA's limit (std::invalid_argument
// naming `what`): every launch's grid, and a host-side test hook (_C._losses_cuda_blocks).
unsigned int losses_blocks(int64_t B, const char* what);

// One warp per query, all queries and the reduction in one launch, queued on `stream`; neither function waits
// for the GPU. Invalid values (a NaN teacher score at a valid candidate, an infinite one the loss reads, a row
// whose teacher is -inf at every valid candidate) give that query a NaN loss and a NaN gradient at each of its
// valid candidates, and set a nonzero error flag in the workspace. Raises std::invalid_argument only for what
// the host can see: a grid past CUDA's limit, an element code that is not a float one.
void distill_forward(int kind, int reduction, int64_t B, int64_t K, int dtype, double param, std::uintptr_t s,
                     int64_t s_sb, int64_t s_sk, std::uintptr_t t, int64_t t_sb, int64_t t_sk, std::uintptr_t pos,
                     int64_t pos_sb, int64_t pos_sk, std::uintptr_t mask, int64_t mask_sb, int64_t mask_sk,
                     std::uintptr_t loss, std::uintptr_t grad, std::uintptr_t scale, std::uintptr_t workspace,
                     std::uintptr_t stream);

// As distill_forward; a target >= M makes its row's loss and gradient NaN and sets the error flag.
void inbatch_ce_forward(int reduction, int64_t B, int64_t M, int dtype, double tau, std::uintptr_t x, int64_t x_sb,
                        int64_t x_sk, std::uintptr_t target, int64_t target_stride, bool target_is_int64,
                        std::uintptr_t loss, std::uintptr_t grad, std::uintptr_t scale, std::uintptr_t workspace,
                        std::uintptr_t stream);

}  // namespace cuda
}  // namespace fastrank
