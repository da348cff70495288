// The index arithmetic of the CUDA kernels (csrc/cuda/*.cu), in one header that both nvcc and the host C++
// compiler build: the kernels call these functions, and the CPU extension exposes them to Python
// (csrc/index_math_bindings.cpp) so that tests/test_cuda_offsets.py can evaluate them past 2^31 on a machine
// without a GPU and compare them with Python integers.
//
// Why int64 everywhere: blockIdx.x, threadIdx.x and plain `int` loop counters are 32-bit, and one of them
// times a stride or a size passes 2^31 at sizes a GPU holds: 100k documents x 180 tokens x 128 dims is
// 2.3e9 elements of d, 70M pairs x 32 argmax slots is 2.2e9. Every operand is widened to int64 before the
// first multiplication (the parameters are int64), so no product is ever formed in int32.
#pragma once

#include <cstdint>

#include "common.h"

#if defined(__CUDACC__)
#define FASTRANK_HD __host__ __device__ __forceinline__
#else
#define FASTRANK_HD inline
#endif

namespace fastrank {
namespace index_math {

// CUDA's grid x limit (compute capability >= 3.0); every kernel here uses a 1-D grid, so the y/z limit
// (65535) never applies.
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;

// Element offset of [i, j] in a matrix with strides (si, sj).
FASTRANK_HD int64_t offset2(int64_t i, int64_t si, int64_t j, int64_t sj) { return i * si + j * sj; }

// Element offset of [a, b, c, d] with strides (sa, sb, sc, sd): MaxSim's mask index (f, y, x, token).
FASTRANK_HD int64_t offset4(int64_t a, int64_t sa, int64_t b, int64_t sb, int64_t c, int64_t sc, int64_t d,
                            int64_t sd) {
  return a * sa + b * sb + c * sc + d * sd;
}

// Offset of [row, col] in a contiguous (rows, n) buffer: the losses' dL/ds (b * K + k), MaxSim's argmax
// (pair * Lq + i), dq (row * H + h) and dd (item * Ld * H as row = item, n = Ld * H).
FASTRANK_HD int64_t flat(int64_t row, int64_t n, int64_t col) { return row * n + col; }

// The global index of a block's sub-unit (a warp's query row in the losses): block * per_block + local.
FASTRANK_HD int64_t unit_index(int64_t block, int64_t per_block, int64_t local) { return block * per_block + local; }

// (f, y, x) of a flat pair index over an (F, Y, X) grid, and (f, y, i) of a flat row over (F, Y, Lq) alike.
struct Coords3 {
  int64_t a, b, c;
};
FASTRANK_HD Coords3 unflatten3(int64_t index, int64_t nb, int64_t nc) {
  return Coords3{index / (nb * nc), (index / nc) % nb, index % nc};
}

// Blocks covering n units at per_block units a block, in int64 (n + per_block - 1 must not wrap).
FASTRANK_HD int64_t blocks_for(int64_t n, int64_t per_block) { return (n + per_block - 1) / per_block; }

// A grid's x dimension from a count of blocks, or std::invalid_argument (ValueError in Python) naming what was
// launched and the sizes that made it too large: never a silent cast to unsigned.
inline unsigned int grid_x(int64_t blocks, const char* what) {
  FASTRANK_CHECK(blocks >= 1 && blocks <= kMaxGridX,
                 what << " needs " << blocks << " thread blocks, outside CUDA's grid x limit [1, " << kMaxGridX
                      << "]; split the batch into smaller calls");
  return static_cast<unsigned int>(blocks);
}

}  // namespace index_math
}  // namespace fastrank
