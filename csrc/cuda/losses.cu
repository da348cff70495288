// Fused distillation losses on CUDA: one warp per query computes the loss and dL/ds in one pass (the math is
// in the header comment of csrc/cpu/losses.cpp), and the last block to finish reduces the per-query losses in
// a fixed order, so "sum" and "mean" are deterministic and the whole loss is one launch.
//
// Invalid values (a NaN teacher score at a valid candidate, an infinite one the loss reads, a row whose teacher
// is -inf everywhere, an in-batch target >= M) make the offending query's loss and its whole gradient row
// NaN, and set a flag in the workspace; the host never waits for the kernel. Why not PyTorch's answer to the
// same problem (CUDA_KERNEL_ASSERT, as in index_select, or torch._assert_async): a device-side assert makes
// the CUDA context unusable for the rest of the process and reports no argument or position, so a training
// run that meets one bad teacher score dies with "device-side assert triggered". A NaN loss is what torch's
// own losses give for NaN inputs, it leaves the process usable, and fastrank.losses.set_validation(True) turns
// the flag into the CPU's exact ValueError at the cost of one stream synchronisation a call (see
// fastrank/ops/losses.py). The flags are sticky within a call's workspace only: each call gets a fresh one.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "common.h"
#include "cuda/losses_cuda.h"
#include "index_math.h"

namespace fastrank {
namespace cuda {
namespace {

namespace im = ::fastrank::index_math;

// Must match csrc/cpu/losses.cpp and fastrank/ops/losses.py.
enum Kind : int { MSE = 0, MARGIN_MSE = 1, M3SE = 2, SOFTMAX_CE = 3, KL_DIV = 4, RANKDISTIL_B = 5 };
enum Reduction : int { NONE = 0, SUM = 1, MEAN = 2 };
// Bit flags OR-ed into Workspace::error: which kinds of invalid value the call met. The host only needs to
// know "any" (it then finds the first position and raises, as the CPU does); the bits say which for a message
// of last resort.
enum Error : int { NO_ERROR = 0, TEACHER_NAN = 1, TARGET_RANGE = 2, TEACHER_INF = 4, TEACHER_ALL_NEG_INF = 8 };

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kDistillMinBlocks = 4;

// Layout (losses_workspace_bytes in losses_cuda.h): done (4 bytes), error (4), 8 reserved, row_loss[B]
// (8-byte aligned), has_term[B].
struct Workspace {
  unsigned int* done;  // blocks finished
  int* error;          // Error bits
  double* row_loss;    // [B]
  int* has_term;       // [B]
};

__host__ __device__ inline Workspace workspace_at(std::uintptr_t base, int64_t B) {
  char* p = reinterpret_cast<char*>(base);
  Workspace w;
  w.done = reinterpret_cast<unsigned int*>(p);
  w.error = reinterpret_cast<int*>(p + 4);
  w.row_loss = reinterpret_cast<double*>(p + 16);
  w.has_term = reinterpret_cast<int*>(p + 16 + 8 * B);
  return w;
}

template <typename A> __device__ inline A load(const float* p) { return static_cast<A>(*p); }
template <typename A> __device__ inline A load(const double* p) { return static_cast<A>(*p); }
template <typename A> __device__ inline A load(const __half* p) { return static_cast<A>(__half2float(*p)); }
template <typename A> __device__ inline A load(const __nv_bfloat16* p) { return static_cast<A>(__bfloat162float(*p)); }

template <typename A> __device__ inline A warp_sum(A v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Skips NaN like std::max on the CPU path; a NaN student still poisons the normaliser and hence everything.
template <typename A> __device__ inline A warp_max(A v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const A other = __shfl_xor_sync(kFull, v, o);
    v = other > v ? other : v;
  }
  return v;
}

template <typename A> __device__ inline A hinge(A x) { return x < A(0) ? A(0) : x; }

// x / tau, as x * (1/tau) where that is finite (see Temperature in csrc/cpu/losses_rows.inc).
template <typename A> struct Temperature {
  A tau, inv_tau;
  bool divide;
  __device__ A operator()(A x) const { return divide ? x / tau : x * inv_tau; }
};
template <typename A> __device__ inline A neg_inf() { return -static_cast<A>(INFINITY); }
template <typename A> __device__ inline A quiet_nan() { return static_cast<A>(NAN); }

struct Rows {
  const void* s;
  int64_t s_sb, s_sk;
  const void* t;
  int64_t t_sb, t_sk;
  const uint8_t* pos;
  int64_t pos_sb, pos_sk;
  const uint8_t* mask;
  int64_t mask_sb, mask_sk;
};

// Sums the per-query losses in the last block to finish; every block calls it once all its warps are done.
template <typename A>
__device__ void reduce_if_last(int reduction, int64_t B, Workspace w, A* loss, A* scale) {
  __shared__ bool is_last;
  __shared__ double part_loss[kThreads];
  __shared__ long long part_count[kThreads];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(w.done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  if (reduction == NONE) {
    if (threadIdx.x == 0) *scale = A(1);
    return;
  }
  double acc = 0;
  long long count = 0;
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    acc += __ldcg(w.row_loss + b);
    count += __ldcg(w.has_term + b);
  }
  part_loss[threadIdx.x] = acc;
  part_count[threadIdx.x] = count;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      part_loss[threadIdx.x] += part_loss[threadIdx.x + half];
      part_count[threadIdx.x] += part_count[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double factor = reduction == MEAN ? 1.0 / static_cast<double>(part_count[0] > 0 ? part_count[0] : 1) : 1.0;
    *loss = static_cast<A>(part_loss[0] * factor);
    *scale = static_cast<A>(factor);
  }
}

// The second launch bound (4 blocks, 16 warps a multiprocessor) caps registers at 128, which the kernel fits:
// with the first alone ptxas aimed at more resident blocks and spilled (up to 216 bytes of local loads a
// thread for float64 on sm_80), and at B = 128 the whole grid is 32 blocks anyway.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads, kDistillMinBlocks)
    distill_kernel(int kind, int reduction, int64_t B, int64_t K, A param, Rows r, A* loss, A* grad, A* scale,
                   Workspace w) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = im::unit_index(blockIdx.x, kWarpsPerBlock, threadIdx.x / kWarp);
  if (b < B) {
    const T* s = static_cast<const T*>(r.s) + im::offset2(b, r.s_sb, 0, 0);
    const T* t = static_cast<const T*>(r.t) + im::offset2(b, r.t_sb, 0, 0);
    A* g = grad + im::flat(b, K, 0);
    // 0 masked, 1 positive, 2 negative
    auto cls = [&](int64_t k) -> int {
      if (r.mask != nullptr && r.mask[im::offset2(b, r.mask_sb, k, r.mask_sk)] == 0) return 0;
      const bool positive = r.pos == nullptr ? k == 0 : r.pos[im::offset2(b, r.pos_sb, k, r.pos_sk)] != 0;
      return positive ? 1 : 2;
    };
    auto S = [&](int64_t k) { return load<A>(s + k * r.s_sk); };
    auto Tt = [&](int64_t k) { return load<A>(t + k * r.t_sk); };

    int n_pos = 0, n_neg = 0;
    bool teacher_nan = false, teacher_inf = false;
    for (int64_t k = lane; k < K; k += kWarp) {
      const int c = cls(k);
      n_pos += c == 1;
      n_neg += c == 2;
      if (c != 0 && isnan(Tt(k))) teacher_nan = true;
      if (c != 0 && isinf(Tt(k))) teacher_inf = true;
      g[k] = A(0);
    }
    n_pos = warp_sum(n_pos);
    n_neg = warp_sum(n_neg);
    bool invalid = __any_sync(kFull, teacher_nan);
    if (invalid && lane == 0) atomicOr(w.error, TEACHER_NAN);
    // Rare: lane 0 applies the CPU driver's rule (infinite_teacher_read in csrc/cpu/losses.cpp) serially.
    bool inf_invalid = false;
    if (__any_sync(kFull, teacher_inf) && lane == 0) {
      long long star = -1;
      bool read = false, finite_or_pos_inf = false;
      for (int64_t k = 0; k < K; ++k)
        if (cls(k) == 2 && (star < 0 || Tt(k) > Tt(star))) star = k;
      for (int64_t k = 0; k < K && !read; ++k) {
        const int c = cls(k);
        if (c == 0) continue;
        const bool inf = isinf(Tt(k));
        switch (kind) {
          case MSE: read = inf; break;
          case MARGIN_MSE: read = inf && n_pos > 0 && n_neg > 0; break;
          case RANKDISTIL_B: read = inf && c == 1; break;
          case M3SE: read = inf && n_pos > 0 && n_neg > 0 && (c == 1 || k == star); break;
          default: read = inf && Tt(k) > A(0); finite_or_pos_inf |= !inf;
        }
      }
      const bool whole_row = (kind == SOFTMAX_CE || kind == KL_DIV) && !read && !finite_or_pos_inf;
      if (read || whole_row) {
        atomicOr(w.error, whole_row ? TEACHER_ALL_NEG_INF : TEACHER_INF);
        inf_invalid = true;
      }
    }
    invalid = invalid || __shfl_sync(kFull, inf_invalid, 0);
    A row = 0;
    bool has_term = false;
    switch (kind) {
      case MSE:
      case RANKDISTIL_B: {
        has_term = n_pos + n_neg > 0;
        for (int64_t k = lane; k < K; k += kWarp) {
          const int c = cls(k);
          if (c == 0) continue;
          const A d = (kind == MSE || c == 1) ? S(k) - Tt(k) : hinge(S(k) - param);
          row += d * d;
          g[k] = 2 * d;
        }
        row = warp_sum(row);
        break;
      }
      case MARGIN_MSE: {
        has_term = n_pos > 0 && n_neg > 0;
        if (!has_term) break;
        A sum_p = 0, sum_n = 0;
        for (int64_t k = lane; k < K; k += kWarp) {
          const int c = cls(k);
          if (c == 1) sum_p += S(k) - Tt(k);
          if (c == 2) sum_n += S(k) - Tt(k);
        }
        const A np = static_cast<A>(n_pos), nn = static_cast<A>(n_neg);
        const A mean_p = warp_sum(sum_p) / np, mean_n = warp_sum(sum_n) / nn;
        if (!(isfinite(mean_p) && isfinite(mean_n))) {
          // A difference past the float range: the centred form would give inf - inf (NaN) where the
          // definition overflows to inf, so sum the (positive, negative) pairs, as the CPU rows do. Each lane
          // owns its candidates: a positive adds its pairs' terms, and each side its gradient.
          A acc = 0;
          for (int64_t k = lane; k < K; k += kWarp) {
            const int c = cls(k);
            if (c == 0) continue;
            const A dk = S(k) - Tt(k);
            A gk = 0;
            for (int64_t j = 0; j < K; ++j) {
              const int cj = cls(j);
              if (c == 1 && cj == 2) {
                const A e = dk - (S(j) - Tt(j));
                acc += e * e;
                gk += 2 * e;
              } else if (c == 2 && cj == 1) {
                gk -= 2 * ((S(j) - Tt(j)) - dk);
              }
            }
            g[k] = gk;
          }
          row = warp_sum(acc);
          break;
        }
        A ss_p = 0, ss_n = 0;
        for (int64_t k = lane; k < K; k += kWarp) {
          const int c = cls(k);
          const A d = S(k) - Tt(k);
          if (c == 1) {
            ss_p += (d - mean_p) * (d - mean_p);
            g[k] = 2 * nn * (d - mean_n);
          } else if (c == 2) {
            ss_n += (d - mean_n) * (d - mean_n);
            g[k] = 2 * np * (d - mean_p);
          }
        }
        const A gap = mean_p - mean_n;
        row = nn * warp_sum(ss_p) + np * warp_sum(ss_n) + np * nn * gap * gap;
        break;
      }
      case M3SE: {
        has_term = n_neg > 0;
        if (!has_term) break;
        // First argmax of the teacher over the negatives: per lane in increasing k, then across lanes.
        A best = neg_inf<A>();
        long long star = -1;
        for (int64_t k = lane; k < K; k += kWarp) {
          if (cls(k) != 2) continue;
          const A v = Tt(k);
          if (star < 0 || v > best) { best = v; star = k; }
        }
        for (int o = kWarp / 2; o > 0; o >>= 1) {
          const A other_best = __shfl_xor_sync(kFull, best, o);
          const long long other_star = __shfl_xor_sync(kFull, star, o);
          const bool take = other_star >= 0 &&
                            (star < 0 || other_best > best || (other_best == best && other_star < star));
          if (take) { best = other_best; star = other_star; }
        }
        const A s_star = S(star), t_star = Tt(star);
        A sum_e = 0, sum_h = 0;
        for (int64_t k = lane; k < K; k += kWarp) {
          const int c = cls(k);
          if (c == 1) {
            const A e = (Tt(k) - t_star) - (S(k) - s_star);
            row += e * e;
            g[k] = -2 * e;
            sum_e += e;
          } else if (c == 2) {
            const A h = hinge(S(k) - s_star);
            row += h * h;
            g[k] = 2 * h;
            sum_h += h;
          }
        }
        row = warp_sum(row);
        sum_e = warp_sum(sum_e);
        sum_h = warp_sum(sum_h);
        __syncwarp();
        if (lane == 0) g[star] += 2 * sum_e - 2 * sum_h;
        break;
      }
      case SOFTMAX_CE:
      case KL_DIV: {
        has_term = n_pos + n_neg > 0;
        if (!has_term) break;
        // Logit differences from the raw scores, then scaled: S*inv_tau - max would be contracted into an FMA
        // that leaves the maximum's own term at exp(-rounding error), and the normaliser at 0 for
        // |s|/tau around 2^30 (see softmax_row in csrc/cpu/losses_rows.inc).
        const A inv_tau = A(1) / param;
        const Temperature<A> temp{param, inv_tau, !isfinite(inv_tau)};
        A max_s = neg_inf<A>(), max_t = neg_inf<A>();
        for (int64_t k = lane; k < K; k += kWarp) {
          if (cls(k) == 0) continue;
          const A xs = S(k), xt = Tt(k);
          max_s = xs > max_s ? xs : max_s;
          max_t = xt > max_t ? xt : max_t;
        }
        max_s = warp_max(max_s);
        max_t = warp_max(max_t);
        A z_s = 0, z_t = 0;
        for (int64_t k = lane; k < K; k += kWarp) {
          if (cls(k) == 0) continue;
          z_s += exp(temp(S(k) - max_s));
          z_t += exp(temp(Tt(k) - max_t));
        }
        z_s = warp_sum(z_s);
        z_t = warp_sum(z_t);
        const A log_z_s = log(z_s), log_z_t = log(z_t);
        for (int64_t k = lane; k < K; k += kWarp) {
          if (cls(k) == 0) continue;
          const A shifted_t = temp(Tt(k) - max_t);
          const A p = exp(shifted_t) / z_t;
          g[k] = temp(exp(temp(S(k) - max_s)) / z_s - p);
          if (p > 0) {
            row += p * (temp(max_s - S(k)) + log_z_s);
            if (kind == KL_DIV) row += p * (shifted_t - log_z_t);
          }
        }
        row = warp_sum(row);
        break;
      }
    }
    if (invalid) {
      // After lane 0's g[star] update above; every valid candidate of the row, whether the loss read it or not.
      __syncwarp();
      for (int64_t k = lane; k < K; k += kWarp)
        if (cls(k) != 0) g[k] = quiet_nan<A>();
      row = quiet_nan<A>();
    }
    if (lane == 0) {
      w.row_loss[b] = static_cast<double>(row);
      w.has_term[b] = has_term;
      if (reduction == NONE) loss[b] = row;
    }
  }
  reduce_if_last<A>(reduction, B, w, loss, scale);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) inbatch_ce_kernel(int reduction, int64_t B, int64_t M, A tau, const T* x,
                                                              int64_t x_sb, int64_t x_sk, const void* target,
                                                              int64_t target_stride, bool target_is_int64, A* loss,
                                                              A* grad, A* scale, Workspace w) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = im::unit_index(blockIdx.x, kWarpsPerBlock, threadIdx.x / kWarp);
  if (b < B) {
    const int64_t at = im::offset2(b, target_stride, 0, 0);
    const int64_t y = target_is_int64 ? static_cast<const int64_t*>(target)[at] : static_cast<const int32_t*>(target)[at];
    A* g = grad + im::flat(b, M, 0);
    const T* row_x = x + im::offset2(b, x_sb, 0, 0);
    A row = 0;
    if (y < 0 || y >= M) {
      // An ignored row (y < 0) has no loss and no gradient; an out-of-range target poisons its row.
      const A fill = y < 0 ? A(0) : quiet_nan<A>();
      for (int64_t k = lane; k < M; k += kWarp) g[k] = fill;
      row = fill;
      if (y >= M && lane == 0) atomicOr(w.error, TARGET_RANGE);
    } else {
      const A inv_tau = A(1) / tau;
      const Temperature<A> temp{tau, inv_tau, !isfinite(inv_tau)};
      A mx = neg_inf<A>();
      for (int64_t k = lane; k < M; k += kWarp) {
        const A v = load<A>(row_x + k * x_sk);
        mx = v > mx ? v : mx;
      }
      mx = warp_max(mx);
      A z = 0;
      for (int64_t k = lane; k < M; k += kWarp) z += exp(temp(load<A>(row_x + k * x_sk) - mx));
      z = warp_sum(z);
      for (int64_t k = lane; k < M; k += kWarp) {
        const A q = exp(temp(load<A>(row_x + k * x_sk) - mx)) / z;
        g[k] = temp(q - (k == y ? A(1) : A(0)));
      }
      row = temp(mx - load<A>(row_x + y * x_sk)) + log(z);
    }
    if (lane == 0) {
      w.row_loss[b] = static_cast<double>(row);
      w.has_term[b] = y >= 0;
      if (reduction == NONE) loss[b] = row;
    }
  }
  reduce_if_last<A>(reduction, B, w, loss, scale);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("fastrank: ") + what + " launch failed: " + cudaGetErrorString(err));
}


// One warp per query: the grid's x dimension, checked against CUDA's limit (B up to about 8.6e9 rows).
unsigned int blocks_for(int64_t B, const char* what) { return im::grid_x(im::blocks_for(B, kWarpsPerBlock), what); }

template <typename T, typename A>
void launch_distill(int kind, int reduction, int64_t B, int64_t K, double param, const Rows& r, std::uintptr_t loss,
                    std::uintptr_t grad, std::uintptr_t scale, const Workspace& w, cudaStream_t stream) {
  // A temperature below A's range would round to 0 (see temperature() in csrc/cpu/losses.cpp).
  const A p = kind == SOFTMAX_CE || kind == KL_DIV ? std::max(static_cast<A>(param), std::numeric_limits<A>::denorm_min())
                                                   : static_cast<A>(param);
  const unsigned int blocks = blocks_for(B, "the distillation loss over s's rows");
  distill_kernel<T, A><<<blocks, kThreads, 0, stream>>>(kind, reduction, B, K, p, r, ptr<A>(loss), ptr<A>(grad),
                                                        ptr<A>(scale), w);
}

template <typename T, typename A>
void launch_inbatch(int reduction, int64_t B, int64_t M, double tau, std::uintptr_t x, int64_t x_sb, int64_t x_sk,
                    std::uintptr_t target, int64_t target_stride, bool target_is_int64, std::uintptr_t loss,
                    std::uintptr_t grad, std::uintptr_t scale, const Workspace& w, cudaStream_t stream) {
  const unsigned int blocks = blocks_for(B, "inbatch_ce over scores' rows");
  inbatch_ce_kernel<T, A><<<blocks, kThreads, 0, stream>>>(
      reduction, B, M, std::max(static_cast<A>(tau), std::numeric_limits<A>::denorm_min()), ptr<const T>(x), x_sb, x_sk, reinterpret_cast<const void*>(target),
      target_stride, target_is_int64, ptr<A>(loss), ptr<A>(grad), ptr<A>(scale), w);
}

}  // namespace

unsigned int losses_blocks(int64_t B, const char* what) { return blocks_for(B, what); }

void distill_forward(int kind, int reduction, int64_t B, int64_t K, int dtype, double param, std::uintptr_t s,
                     int64_t s_sb, int64_t s_sk, std::uintptr_t t, int64_t t_sb, int64_t t_sk, std::uintptr_t pos,
                     int64_t pos_sb, int64_t pos_sk, std::uintptr_t mask, int64_t mask_sb, int64_t mask_sk,
                     std::uintptr_t loss, std::uintptr_t grad, std::uintptr_t scale, std::uintptr_t workspace,
                     std::uintptr_t stream_handle) {
  const Rows r{reinterpret_cast<const void*>(s), s_sb, s_sk, reinterpret_cast<const void*>(t), t_sb, t_sk,
               ptr<const uint8_t>(pos), pos_sb, pos_sk, ptr<const uint8_t>(mask), mask_sb, mask_sk};
  const Workspace w = workspace_at(workspace, B);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (float_elem(dtype)) {
    case Elem::Float32: launch_distill<float, float>(kind, reduction, B, K, param, r, loss, grad, scale, w, stream); break;
    case Elem::Float16: launch_distill<__half, float>(kind, reduction, B, K, param, r, loss, grad, scale, w, stream); break;
    case Elem::BFloat16: launch_distill<__nv_bfloat16, float>(kind, reduction, B, K, param, r, loss, grad, scale, w, stream); break;
    case Elem::Float64: launch_distill<double, double>(kind, reduction, B, K, param, r, loss, grad, scale, w, stream); break;
    default: break;  // float_elem admits the four float codes only
  }
  check_launch("distillation loss");
}

void inbatch_ce_forward(int reduction, int64_t B, int64_t M, int dtype, double tau, std::uintptr_t x, int64_t x_sb,
                        int64_t x_sk, std::uintptr_t target, int64_t target_stride, bool target_is_int64,
                        std::uintptr_t loss, std::uintptr_t grad, std::uintptr_t scale, std::uintptr_t workspace,
                        std::uintptr_t stream_handle) {
  const Workspace w = workspace_at(workspace, B);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (float_elem(dtype)) {
    case Elem::Float32: launch_inbatch<float, float>(reduction, B, M, tau, x, x_sb, x_sk, target, target_stride, target_is_int64, loss, grad, scale, w, stream); break;
    case Elem::Float16: launch_inbatch<__half, float>(reduction, B, M, tau, x, x_sb, x_sk, target, target_stride, target_is_int64, loss, grad, scale, w, stream); break;
    case Elem::BFloat16: launch_inbatch<__nv_bfloat16, float>(reduction, B, M, tau, x, x_sb, x_sk, target, target_stride, target_is_int64, loss, grad, scale, w, stream); break;
    case Elem::Float64: launch_inbatch<double, double>(reduction, B, M, tau, x, x_sb, x_sk, target, target_stride, target_is_int64, loss, grad, scale, w, stream); break;
    default: break;  // float_elem admits the four float codes only
  }
  check_launch("in-batch cross-entropy");
}

}  // namespace cuda
}  // namespace fastrank
