// MaxSim on CUDA without Triton. One thread block per (f, y, x) pair: the query (up to 64 tokens) and a
// tile of 32 doc tokens are staged in shared memory 64 embedding dims at a time; each of the 256 threads
// owns one query token and 8 doc tokens of the tile, keeps their similarities in registers, and folds
// them into a running (max, argmax). The similarity matrix never reaches global memory.
// Every index product goes through csrc/index_math.h in int64 (d alone passes 2^31 elements at 100k
// documents x 180 tokens x 128 dims), and every grid size is checked against CUDA's limit before launch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda/maxsim_cuda.h"
#include "index_math.h"

namespace fastrank {
namespace cuda {
namespace {

namespace im = ::fastrank::index_math;

constexpr int kThreads = 256;
constexpr int kMaxLq = 64;
constexpr int kTileJ = 32;              // doc tokens per tile
constexpr int kTileH = 64;              // embedding dims per shared-memory stage
constexpr int kGroups = kThreads / kMaxLq;  // threads sharing one query token
constexpr int kPerThread = kTileJ / kGroups;  // doc tokens per thread

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ bool is_valid(const uint8_t* m, int64_t off) { return m == nullptr || m[off] != 0; }

// A mask's offset at (f, y, x, token); strides of 0 broadcast.
__device__ __forceinline__ int64_t mask_at(int64_t f, int64_t sf, int64_t y, int64_t sy, int64_t x, int64_t sx,
                                           int64_t tok, int64_t st) {
  return im::offset4(f, sf, y, sy, x, sx, tok, st);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(MaxSimArgs a, float* out, int32_t* argmax) {
  __shared__ float qs[kMaxLq][kTileH + 1];
  __shared__ float ds[kTileJ][kTileH + 1];
  __shared__ uint8_t dvalid[kTileJ];
  __shared__ float partial[kThreads / 32];
  __shared__ int any_valid;

  const int64_t pair = blockIdx.x;
  const im::Coords3 c3 = im::unflatten3(pair, a.Y, a.X);
  const int64_t f = c3.a, y = c3.b, x = c3.c;
  const T* q = static_cast<const T*>(a.q) + im::offset2(f, a.q_f, y, a.q_y);
  const T* d = static_cast<const T*>(a.d) + im::offset2(f, a.d_f, x, a.d_x);
  const int t = threadIdx.x;
  const int i = t / kGroups;      // this thread's query token
  const int g = t % kGroups;      // which 8 doc tokens of the tile it owns
  if (t == 0) any_valid = 0;

  float best = -INFINITY;
  int best_j = -1;
  bool nan_seen = false;

  for (int64_t j0 = 0; j0 < a.Ld; j0 += kTileJ) {
    __syncthreads();
    if (t < kTileJ) {
      const int64_t j = j0 + t;
      const bool v = j < a.Ld && is_valid(a.d_mask, mask_at(f, a.dm_f, y, a.dm_y, x, a.dm_x, j, a.dm_tok));
      dvalid[t] = v;
      if (v) any_valid = 1;
    }
    float acc[kPerThread];
#pragma unroll
    for (int jj = 0; jj < kPerThread; ++jj) acc[jj] = 0.f;
    for (int64_t h0 = 0; h0 < a.H; h0 += kTileH) {
      __syncthreads();
      for (int e = t; e < kMaxLq * kTileH; e += kThreads) {
        const int r = e / kTileH, c = e % kTileH;
        qs[r][c] = (r < a.Lq && h0 + c < a.H) ? to_float(q[im::offset2(r, a.q_tok, h0 + c, 1)]) : 0.f;
      }
      for (int e = t; e < kTileJ * kTileH; e += kThreads) {
        const int r = e / kTileH, c = e % kTileH;
        ds[r][c] = (j0 + r < a.Ld && h0 + c < a.H) ? to_float(d[im::offset2(j0 + r, a.d_tok, h0 + c, 1)]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int c = 0; c < kTileH; ++c) {
        const float qv = qs[i][c];
#pragma unroll
        for (int jj = 0; jj < kPerThread; ++jj) acc[jj] = fmaf(qv, ds[g * kPerThread + jj][c], acc[jj]);
      }
    }
#pragma unroll
    for (int jj = 0; jj < kPerThread; ++jj) {
      const int local = g * kPerThread + jj;
      if (!dvalid[local]) continue;
      const float s = acc[jj];
      if (s != s) nan_seen = true;
      if (s > best) {  // strict: the earliest doc token wins ties
        best = s;
        best_j = static_cast<int>(j0 + local);
      }
    }
  }
  // Combine the kGroups threads of one query token (adjacent lanes): larger max wins, ties -> smaller j.
#pragma unroll
  for (int off = 1; off < kGroups; off <<= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, off);
    const int oj = __shfl_xor_sync(0xffffffffu, best_j, off);
    const int on = __shfl_xor_sync(0xffffffffu, static_cast<int>(nan_seen), off);
    if (ob > best || (ob == best && oj >= 0 && (best_j < 0 || oj < best_j))) {
      best = ob;
      best_j = oj;
    }
    nan_seen = nan_seen || on;
  }
  __syncthreads();
  const bool row_ok = i < a.Lq && any_valid &&
                      is_valid(a.q_mask, mask_at(f, a.qm_f, y, a.qm_y, x, a.qm_x, i, a.qm_tok));
  float contrib = (g == 0 && row_ok) ? (nan_seen ? NAN : best) : 0.f;
  if (argmax != nullptr && g == 0 && i < a.Lq) argmax[im::flat(pair, a.Lq, i)] = row_ok ? best_j : -1;
  for (int off = 16; off > 0; off >>= 1) contrib += __shfl_down_sync(0xffffffffu, contrib, off);
  if ((t & 31) == 0) partial[t / 32] = contrib;
  __syncthreads();
  if (t == 0) {
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
    out[pair] = total;
  }
}

// dq[f,y,i,:] = sum_x g[f,y,x] d[f,x,argmax,:]: one block per (f, y, i) row, threads over H; each output
// element has one writer and a fixed summation order (deterministic).
template <typename T>
__global__ void backward_dq_kernel(MaxSimArgs a, const float* grad, const int32_t* argmax, float* dq) {
  const int64_t row = blockIdx.x;
  const im::Coords3 c3 = im::unflatten3(row, a.Y, a.Lq);
  const int64_t f = c3.a, y = c3.b, i = c3.c;
  const T* d = static_cast<const T*>(a.d);
  for (int64_t h = threadIdx.x; h < a.H; h += blockDim.x) {
    float acc = 0.f;
    for (int64_t x = 0; x < a.X; ++x) {
      const int64_t pair = im::flat(im::flat(f, a.Y, y), a.X, x);
      const int32_t j = argmax[im::flat(pair, a.Lq, i)];
      // argmax lives on the GPU, where the host cannot check it without a sync: a value outside the
      // document is skipped rather than read (only a corrupted argmax has one).
      if (j >= 0 && j < a.Ld) acc += grad[pair] * to_float(d[im::offset4(f, a.d_f, x, a.d_x, j, a.d_tok, h, 1)]);
    }
    dq[im::flat(row, a.H, h)] = acc;
  }
}

// dd[f,x,j,:] = sum_y sum_{i: argmax = j} g q[f,y,i,:]: one block per (f, x) doc, threads over H.
template <typename T>
__global__ void backward_dd_kernel(MaxSimArgs a, const float* grad, const int32_t* argmax, float* dd) {
  const int64_t item = blockIdx.x;
  const int64_t f = item / a.X, x = item % a.X;
  const T* q = static_cast<const T*>(a.q);
  float* base = dd + im::flat(item, a.Ld * a.H, 0);
  for (int64_t h = threadIdx.x; h < a.H; h += blockDim.x) {
    for (int64_t j = 0; j < a.Ld; ++j) base[im::flat(j, a.H, h)] = 0.f;
    for (int64_t y = 0; y < a.Y; ++y) {
      const int64_t pair = im::flat(im::flat(f, a.Y, y), a.X, x);
      const float gp = grad[pair];
      for (int64_t i = 0; i < a.Lq; ++i) {
        const int32_t j = argmax[im::flat(pair, a.Lq, i)];
        if (j >= 0 && j < a.Ld) base[im::flat(j, a.H, h)] += gp * to_float(q[im::offset4(f, a.q_f, y, a.q_y, i, a.q_tok, h, 1)]);
      }
    }
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("fastrank: ") + what + ": " + cudaGetErrorString(err));
}

template <typename Fn>
void by_dtype(int dtype, Fn&& fn) {
  switch (static_cast<Elem>(dtype)) {
    case Elem::Float32: fn(float{}); return;
    case Elem::Float16: fn(__half{}); return;
    case Elem::BFloat16: fn(__nv_bfloat16{}); return;
    default: break;
  }
  throw std::invalid_argument("fastrank: maxsim (cuda): unsupported element code " + std::to_string(dtype));
}

void check_sizes(const MaxSimArgs& a) {
  FASTRANK_CHECK(a.F >= 0 && a.Y >= 0 && a.X >= 0 && a.Lq >= 0 && a.Ld >= 0 && a.H >= 0,
                 "maxsim (cuda): sizes must be >= 0, got F=" << a.F << " Y=" << a.Y << " X=" << a.X << " Lq=" << a.Lq
                                                             << " Ld=" << a.Ld << " H=" << a.H);
  // argmax holds doc-token indices in int32.
  FASTRANK_CHECK(a.Ld <= im::kMaxGridX, "maxsim (cuda): d has Ld=" << a.Ld << " tokens, more than the int32 argmax holds");
}

}  // namespace

MaxSimGrids maxsim_grids(const MaxSimArgs& a, bool forward, bool dq, bool dd) {
  check_sizes(a);
  MaxSimGrids g;
  if (forward) {
    FASTRANK_CHECK(a.Lq >= 1 && a.Lq <= kMaxLq, "maxsim (cuda): Lq must be in [1, " << kMaxLq << "], got " << a.Lq);
    const int64_t pairs = a.F * a.Y * a.X;
    const bool run_forward = pairs > 0;
    const unsigned int blocks = run_forward ? im::grid_x(pairs, "maxsim (cuda) forward, one block per (query, document) pair,") : 0;
    g.forward = blocks;
  }
  const bool run_dq = dq && a.F * a.Y * a.Lq > 0, run_dd = dd && a.F * a.X > 0;
  const unsigned int dq_blocks = run_dq ? im::grid_x(a.F * a.Y * a.Lq, "maxsim (cuda) backward, one block per query token,") : 0;
  const unsigned int dd_blocks = run_dd ? im::grid_x(a.F * a.X, "maxsim (cuda) backward, one block per document,") : 0;
  g.dq = dq_blocks;
  g.dd = dd_blocks;
  return g;
}

void maxsim_forward(const MaxSimArgs& a, float* out, int32_t* argmax, std::uintptr_t stream) {
  const unsigned int blocks = maxsim_grids(a, true, false, false).forward;
  if (blocks == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  by_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_kernel<T><<<blocks, kThreads, 0, s>>>(a, out, argmax);
  });
  check_launch("maxsim forward kernel launch");
}

void maxsim_backward(const MaxSimArgs& a, const float* grad, const int32_t* argmax, float* dq, float* dd,
                     std::uintptr_t stream) {
  // Both grids checked before either launches, so that a refused call leaves no half-written gradient.
  const MaxSimGrids g = maxsim_grids(a, false, dq != nullptr, dd != nullptr);
  const unsigned int dq_blocks = g.dq, dd_blocks = g.dd;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int threads = a.H >= 256 ? 256 : 128;
  by_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (dq_blocks > 0) backward_dq_kernel<T><<<dq_blocks, threads, 0, s>>>(a, grad, argmax, dq);
    if (dd_blocks > 0) backward_dd_kernel<T><<<dd_blocks, threads, 0, s>>>(a, grad, argmax, dd);
  });
  check_launch("maxsim backward kernel launch");
}

}  // namespace cuda
}  // namespace fastrank
