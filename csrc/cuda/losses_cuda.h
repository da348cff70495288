// Host entry points of the CUDA distillation losses (csrc/cuda/losses.cu). Plain C++: no pybind11, no torch.
// The math is the one documented at the top of csrc/cpu/losses.cpp; pointers are device pointers.
#pragma once

#include <cstdint>

namespace fastrank {
namespace cuda {

// Bytes of zero-initialised device workspace a call needs: a completion counter and error flags, then the
// per-query losses and "has a term" flags that the last block reduces. Must match fastrank/ops/losses.py.
inline int64_t losses_workspace_bytes(int64_t B) { return 16 + 12 * B; }

// One warp per query, all queries and the reduction in one launch. Raises std::invalid_argument for a NaN in
// the teacher at a valid candidate (this needs one stream synchronisation to read the error flag back).
void distill_forward(int kind, int reduction, int64_t B, int64_t K, int dtype, double param, std::uintptr_t s,
                     int64_t s_sb, int64_t s_sk, std::uintptr_t t, int64_t t_sb, int64_t t_sk, std::uintptr_t pos,
                     int64_t pos_sb, int64_t pos_sk, std::uintptr_t mask, int64_t mask_sb, int64_t mask_sk,
                     std::uintptr_t loss, std::uintptr_t grad, std::uintptr_t scale, std::uintptr_t workspace,
                     std::uintptr_t stream);

// Raises std::invalid_argument for a target >= M (after the same synchronisation).
void inbatch_ce_forward(int reduction, int64_t B, int64_t M, int dtype, double tau, std::uintptr_t x, int64_t x_sb,
                        int64_t x_sk, std::uintptr_t target, int64_t target_stride, bool target_is_int64,
                        std::uintptr_t loss, std::uintptr_t grad, std::uintptr_t scale, std::uintptr_t workspace,
                        std::uintptr_t stream);

}  // namespace cuda
}  // namespace fastrank
