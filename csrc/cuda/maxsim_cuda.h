// MaxSim CUDA kernels (the C++ extension's GPU path, used when Triton is missing or when forced with
// backend="cpp"). Same canonical layout and semantics as csrc/cpu/maxsim.cpp; no pybind11 here.
#pragma once
#include <cstdint>

namespace fastrank {
namespace cuda {

struct MaxSimArgs {
  int dtype;  // the element code (Elem, element_codes.h) of q and d: float32, float16 or bfloat16
  const void* q;
  const void* d;
  int64_t F, Y, X, Lq, Ld, H;
  int64_t q_f, q_y, q_tok;  // q strides (elements); the last dim is contiguous
  int64_t d_f, d_x, d_tok;
  const uint8_t* q_mask;  // nullptr: all valid
  int64_t qm_f, qm_y, qm_x, qm_tok;
  const uint8_t* d_mask;
  int64_t dm_f, dm_y, dm_x, dm_tok;
};

// The grid x of each launch, checked against CUDA's limit (std::invalid_argument naming the launch), 0 for a
// launch with nothing to do. The launchers' first step (so a refused backward writes neither gradient), and
// a host-side test hook (_C._maxsim_cuda_grids): no GPU is needed to see a refusal.
struct MaxSimGrids { unsigned int forward = 0, dq = 0, dd = 0; };
MaxSimGrids maxsim_grids(const MaxSimArgs& a, bool forward, bool dq, bool dd);

// out: float32 (F, Y, X); argmax: int32 (F, Y, X, Lq) or nullptr.
void maxsim_forward(const MaxSimArgs& a, float* out, int32_t* argmax, std::uintptr_t stream);

// grad: float32 (F, Y, X); dq: float32 (F, Y, Lq, H) or nullptr; dd: float32 (F, X, Ld, H) or nullptr.
void maxsim_backward(const MaxSimArgs& a, const float* grad, const int32_t* argmax, float* dq, float* dd,
                     std::uintptr_t stream);

}  // namespace cuda
}  // namespace fastrank
