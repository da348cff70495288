// Fused MaxSim on the CPU: score[f,y,x] = sum_{i valid} max_{j valid} <q[f,y,i,:], d[f,x,j,:]>.
//
// Pairs are laid out (F, Y, X): F batch dims where q and d both vary, Y dims where only q varies,
// X dims where only d varies (fastrank/ops/maxsim.py builds this canonical form without copying the
// broadcast operand). OpenMP runs over pairs; the similarity matrix is never stored.
//
// Micro-kernel: each query item is packed once as Q^T (H x LQP, LQP = Lq rounded up to 16) so that one
// SIMD register holds 16 query tokens. For a block of JB doc tokens, every k broadcasts d[j,k] against
// Q^T[k,:] with an FMA; the running max over j is then an element-wise vector max (no horizontal
// reductions until the final sum over query tokens). bfloat16 inputs use AVX512-BF16 dot products
// (pairs of k per instruction) when the compiler targets them, otherwise they are widened to float32.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#ifdef FASTRANK_WITH_OPENMP
#include <omp.h>
#endif

#include "bindings.h"
#include "common.h"

namespace fastrank {
namespace {

typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vfloat vsplat(float x) {
#ifdef __AVX512F__
  return reinterpret_cast<vfloat>(_mm512_set1_ps(x));
#else
  return vfloat{} + x;
#endif
}
inline vint vsplat_i(int32_t x) { return vint{} + x; }

struct Strides3 { int64_t a, b, tok; };           // q: (F, Y, tok) / d: (F, X, tok); last dim contiguous
struct Strides4 { int64_t f, y, x, tok; };       // masks over (F, Y, X, tok)

struct Problem {
  int64_t F, Y, X, Lq, Ld, H;
  Strides3 qs, ds;
  const uint8_t* qm;  // nullptr: every query token valid
  Strides4 qms;
  const uint8_t* dm;  // nullptr: every doc token valid
  Strides4 dms;
};

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Widens one row of H elements to float32.
template <typename T> void widen_row(const T* src, float* dst, int64_t H);
template <> void widen_row<float>(const float* src, float* dst, int64_t H) { std::memcpy(dst, src, H * sizeof(float)); }

struct BF16 { uint16_t v; };
struct FP16 { uint16_t v; };
template <> void widen_row<BF16>(const BF16* src, float* dst, int64_t H) {
  int64_t k = 0;
#ifdef __AVX512F__
  for (; k + 16 <= H; k += 16) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
    __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
    _mm512_storeu_ps(dst + k, _mm512_castsi512_ps(wide));
  }
#endif
  for (; k < H; ++k) dst[k] = bf16_to_float(src[k].v);
}
template <> void widen_row<FP16>(const FP16* src, float* dst, int64_t H) {
  int64_t k = 0;
#ifdef __AVX512F__
  for (; k + 16 <= H; k += 16) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
    _mm512_storeu_ps(dst + k, _mm512_cvtph_ps(raw));
  }
#endif
  for (; k < H; ++k) dst[k] = fp16_to_float(src[k].v);
}

// Packs q[item] (Lq x H, any dtype) as float32 Q^T with LQP columns, zero in the padded columns.
template <typename T>
void pack_query_f32(const T* q, int64_t tok_stride, int64_t Lq, int64_t H, int64_t LQP, float* out,
                    std::vector<float>& row) {
  std::fill(out, out + H * LQP, 0.0f);
  row.resize(H);
  for (int64_t i = 0; i < Lq; ++i) {
    widen_row<T>(q + i * tok_stride, row.data(), H);
    for (int64_t k = 0; k < H; ++k) out[k * LQP + i] = row[k];
  }
}

// Running (max, argmax) per query token over doc tokens. NaN is sticky, ties keep the first index:
// the same semantics as torch.max over the reference's similarity matrix.
template <int NV>
struct RowMax {
  vfloat mx[NV];
  vint arg[NV];
  RowMax() {
    for (int v = 0; v < NV; ++v) { mx[v] = vsplat(-std::numeric_limits<float>::infinity()); arg[v] = vsplat_i(-1); }
  }
  inline void update(const vfloat* s, int32_t j) {
    for (int v = 0; v < NV; ++v) {
      vint take = (s[v] > mx[v]) | (s[v] != s[v]);
      take &= (mx[v] == mx[v]);  // once NaN, stay NaN
      mx[v] = take ? s[v] : mx[v];
      arg[v] = take ? vsplat_i(j) : arg[v];
    }
  }
};

// Similarities of JB doc rows (float32, contiguous rows of stride ld_row) against packed Q^T.
template <int NV, int JB>
inline void block_f32(const float* qt, int64_t LQP, const float* const* drow, int64_t H, vfloat (*out)[NV]) {
  // Local accumulators: writing through `out` inside the k loop would force spills, since vector types
  // may alias the float rows being read.
  vfloat acc[JB][NV];
  const float* rows[JB];
  for (int jj = 0; jj < JB; ++jj) {
    rows[jj] = drow[jj];
    for (int v = 0; v < NV; ++v) acc[jj][v] = vfloat{};
  }
  for (int64_t k = 0; k < H; ++k) {
    vfloat qv[NV];
    for (int v = 0; v < NV; ++v) qv[v] = vload(qt + k * LQP + v * kLanes);
    for (int jj = 0; jj < JB; ++jj) {
      vfloat dk = vsplat(rows[jj][k]);
      for (int v = 0; v < NV; ++v) acc[jj][v] += dk * qv[v];
    }
  }
  for (int jj = 0; jj < JB; ++jj)
    for (int v = 0; v < NV; ++v) out[jj][v] = acc[jj][v];
}

#ifdef __AVX512BF16__
// Q^T packed for vdpbf16ps: for each pair of k, 16 query tokens x (q[i,2kp], q[i,2kp+1]) as bf16.
void pack_query_bf16(const uint16_t* q, int64_t tok_stride, int64_t Lq, int64_t H, int64_t LQP, uint16_t* out) {
  const int64_t KP = (H + 1) / 2;
  std::fill(out, out + KP * LQP * 2, uint16_t{0});
  for (int64_t i = 0; i < Lq; ++i)
    for (int64_t k = 0; k < H; ++k) out[((k / 2) * LQP + i) * 2 + (k & 1)] = q[i * tok_stride + k];
}

template <int NV, int JB>
inline void block_bf16(const uint16_t* qt, int64_t LQP, const uint16_t* const* drow, int64_t H, vfloat (*acc)[NV]) {
  __m512 a[JB][NV];
  for (int jj = 0; jj < JB; ++jj)
    for (int v = 0; v < NV; ++v) a[jj][v] = _mm512_setzero_ps();
  const int64_t KP = H / 2;
  for (int64_t kp = 0; kp < KP; ++kp) {
    __m512bh qv[NV];
    for (int v = 0; v < NV; ++v)
      qv[v] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(qt + (kp * LQP + v * kLanes) * 2));
    for (int jj = 0; jj < JB; ++jj) {
      int32_t pair;
      std::memcpy(&pair, drow[jj] + 2 * kp, sizeof(pair));
      __m512bh dk = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) a[jj][v] = _mm512_dpbf16_ps(a[jj][v], qv[v], dk);
    }
  }
  if (H & 1) {  // the last k pairs with a zero
    const int64_t kp = KP;
    __m512bh qv[NV];
    for (int v = 0; v < NV; ++v)
      qv[v] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(qt + (kp * LQP + v * kLanes) * 2));
    for (int jj = 0; jj < JB; ++jj) {
      __m512bh dk = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(drow[jj][H - 1]));
      for (int v = 0; v < NV; ++v) a[jj][v] = _mm512_dpbf16_ps(a[jj][v], qv[v], dk);
    }
  }
  for (int jj = 0; jj < JB; ++jj)
    for (int v = 0; v < NV; ++v) std::memcpy(&acc[jj][v], &a[jj][v], sizeof(vfloat));
}
#endif

inline bool valid(const uint8_t* m, const Strides4& s, int64_t f, int64_t y, int64_t x, int64_t t) {
  return m == nullptr || m[f * s.f + y * s.y + x * s.x + t * s.tok] != 0;
}

// One pair: stream the doc's rows in blocks of JB, keep the running max per query token.
// `rows(j)` yields a pointer to doc row j in the layout `block` expects.
template <int NV, int JB, typename Row, typename Block>
void score_pair(const Problem& p, int64_t f, int64_t y, int64_t x, int64_t LQP, Row rows, Block block,
                float* out, int32_t* argmax) {
  RowMax<NV> rm;
  int64_t nvalid = 0;
  vfloat acc[JB][NV];
  for (int64_t j0 = 0; j0 < p.Ld; j0 += JB) {
    const int nb = static_cast<int>(std::min<int64_t>(JB, p.Ld - j0));
    decltype(rows(0)) ptrs[JB];
    for (int jj = 0; jj < JB; ++jj) ptrs[jj] = rows(j0 + std::min(jj, nb - 1));  // clamp: tail rows repeat
    block(ptrs, acc);
    for (int jj = 0; jj < nb; ++jj) {
      if (!valid(p.dm, p.dms, f, y, x, j0 + jj)) continue;
      ++nvalid;
      rm.update(acc[jj], static_cast<int32_t>(j0 + jj));
    }
  }
  float mx[NV * kLanes];
  int32_t arg[NV * kLanes];
  std::memcpy(mx, rm.mx, sizeof(mx));
  std::memcpy(arg, rm.arg, sizeof(arg));
  float score = 0.0f;
  for (int64_t i = 0; i < p.Lq; ++i) {
    const bool ok = nvalid > 0 && valid(p.qm, p.qms, f, y, x, i);
    if (ok) score += mx[i];
    if (argmax) argmax[i] = ok ? arg[i] : -1;
  }
  *out = score;
}

template <int NV>
constexpr int block_rows() { return NV <= 2 ? 8 : (NV == 3 ? 6 : 4); }

template <typename T, int NV>
void forward_widened(const Problem& p, const T* q, const T* d, float* out, int32_t* argmax) {
  constexpr int JB = block_rows<NV>();
  const int64_t LQP = NV * kLanes;
  const int64_t nq = p.F * p.Y;
  std::vector<float> qt(static_cast<size_t>(nq * p.H * LQP));
#pragma omp parallel
  {
    std::vector<float> row;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < nq; ++item)
      pack_query_f32<T>(q + (item / p.Y) * p.qs.a + (item % p.Y) * p.qs.b, p.qs.tok, p.Lq, p.H, LQP,
                        qt.data() + item * p.H * LQP, row);
  }
  const int64_t npairs = p.F * p.Y * p.X;
#pragma omp parallel
  {
    std::vector<float> doc;  // float32 copy of one doc, only for narrow dtypes
#pragma omp for schedule(dynamic, 16)
    for (int64_t pair = 0; pair < npairs; ++pair) {
      const int64_t f = pair / (p.Y * p.X), y = (pair / p.X) % p.Y, x = pair % p.X;
      const float* qitem = qt.data() + (f * p.Y + y) * p.H * LQP;
      const T* dbase = d + f * p.ds.a + x * p.ds.b;
      const float* drows;
      int64_t dstride;
      if constexpr (std::is_same_v<T, float>) {
        drows = dbase;
        dstride = p.ds.tok;
      } else {
        doc.resize(static_cast<size_t>(std::max<int64_t>(p.Ld, 1) * p.H));
        for (int64_t j = 0; j < p.Ld; ++j) widen_row<T>(dbase + j * p.ds.tok, doc.data() + j * p.H, p.H);
        drows = doc.data();
        dstride = p.H;
      }
      auto rows = [&](int64_t j) { return drows + j * dstride; };
      auto block = [&](const float* const* ptrs, vfloat (*acc)[NV]) { block_f32<NV, JB>(qitem, LQP, ptrs, p.H, acc); };
      score_pair<NV, JB>(p, f, y, x, LQP, rows, block, out + pair, argmax ? argmax + pair * p.Lq : nullptr);
    }
  }
}

#ifdef __AVX512BF16__
template <int NV>
void forward_bf16_native(const Problem& p, const uint16_t* q, const uint16_t* d, float* out, int32_t* argmax) {
  constexpr int JB = block_rows<NV>();
  const int64_t LQP = NV * kLanes;
  const int64_t KP = (p.H + 1) / 2;
  const int64_t nq = p.F * p.Y;
  std::vector<uint16_t> qt(static_cast<size_t>(nq * KP * LQP * 2));
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < nq; ++item)
    pack_query_bf16(q + (item / p.Y) * p.qs.a + (item % p.Y) * p.qs.b, p.qs.tok, p.Lq, p.H, LQP,
                    qt.data() + item * KP * LQP * 2);
  const int64_t npairs = p.F * p.Y * p.X;
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t pair = 0; pair < npairs; ++pair) {
    const int64_t f = pair / (p.Y * p.X), y = (pair / p.X) % p.Y, x = pair % p.X;
    const uint16_t* qitem = qt.data() + (f * p.Y + y) * KP * LQP * 2;
    const uint16_t* dbase = d + f * p.ds.a + x * p.ds.b;
    auto rows = [&](int64_t j) { return dbase + j * p.ds.tok; };
    auto block = [&](const uint16_t* const* ptrs, vfloat (*acc)[NV]) { block_bf16<NV, JB>(qitem, LQP, ptrs, p.H, acc); };
    score_pair<NV, JB>(p, f, y, x, LQP, rows, block, out + pair, argmax ? argmax + pair * p.Lq : nullptr);
  }
}
#endif

template <typename T>
void forward_typed(const Problem& p, const T* q, const T* d, float* out, int32_t* argmax) {
  const int64_t nv = std::max<int64_t>(1, round_up(p.Lq, kLanes) / kLanes);
  switch (nv) {
    case 1: return forward_widened<T, 1>(p, q, d, out, argmax);
    case 2: return forward_widened<T, 2>(p, q, d, out, argmax);
    case 3: return forward_widened<T, 3>(p, q, d, out, argmax);
    case 4: return forward_widened<T, 4>(p, q, d, out, argmax);
  }
  FASTRANK_CHECK(false, "maxsim (cpp): Lq=" << p.Lq << " exceeds the supported 64 query tokens");
}

void forward_bf16(const Problem& p, const uint16_t* q, const uint16_t* d, float* out, int32_t* argmax) {
#ifdef __AVX512BF16__
  const int64_t nv = std::max<int64_t>(1, round_up(p.Lq, kLanes) / kLanes);
  switch (nv) {
    case 1: return forward_bf16_native<1>(p, q, d, out, argmax);
    case 2: return forward_bf16_native<2>(p, q, d, out, argmax);
    case 3: return forward_bf16_native<3>(p, q, d, out, argmax);
    case 4: return forward_bf16_native<4>(p, q, d, out, argmax);
  }
  FASTRANK_CHECK(false, "maxsim (cpp): Lq=" << p.Lq << " exceeds the supported 64 query tokens");
#else
  forward_typed<BF16>(p, reinterpret_cast<const BF16*>(q), reinterpret_cast<const BF16*>(d), out, argmax);
#endif
}

Problem make_problem(const std::vector<int64_t>& dims, const std::vector<int64_t>& qs, const std::vector<int64_t>& ds,
                     std::uintptr_t qm, const std::vector<int64_t>& qms, std::uintptr_t dm,
                     const std::vector<int64_t>& dms) {
  FASTRANK_CHECK(dims.size() == 6, "maxsim (cpp): dims must be (F, Y, X, Lq, Ld, H)");
  FASTRANK_CHECK(qs.size() == 3 && ds.size() == 3, "maxsim (cpp): q/d strides must be (batch, batch, token)");
  FASTRANK_CHECK(qms.size() == 4 && dms.size() == 4, "maxsim (cpp): mask strides must be (F, Y, X, token)");
  Problem p;
  p.F = dims[0]; p.Y = dims[1]; p.X = dims[2]; p.Lq = dims[3]; p.Ld = dims[4]; p.H = dims[5];
  FASTRANK_CHECK(p.Lq >= 1 && p.Lq <= 64, "maxsim (cpp): Lq must be in [1, 64], got " << p.Lq);
  FASTRANK_CHECK(p.Ld >= 1 && p.H >= 1, "maxsim (cpp): Ld and H must be positive");
  p.qs = {qs[0], qs[1], qs[2]};
  p.ds = {ds[0], ds[1], ds[2]};
  p.qm = reinterpret_cast<const uint8_t*>(qm);
  p.qms = {qms[0], qms[1], qms[2], qms[3]};
  p.dm = reinterpret_cast<const uint8_t*>(dm);
  p.dms = {dms[0], dms[1], dms[2], dms[3]};
  return p;
}

void maxsim_forward(int dtype, std::uintptr_t q, std::uintptr_t d, const std::vector<int64_t>& dims,
                    const std::vector<int64_t>& qs, const std::vector<int64_t>& ds, std::uintptr_t qm,
                    const std::vector<int64_t>& qms, std::uintptr_t dm, const std::vector<int64_t>& dms,
                    std::uintptr_t out, std::uintptr_t argmax) {
  const Problem p = make_problem(dims, qs, ds, qm, qms, dm, dms);
  float* o = ptr<float>(out);
  int32_t* a = argmax ? ptr<int32_t>(argmax) : nullptr;
  pybind11::gil_scoped_release nogil;
  switch (to_dtype(dtype)) {
    case DType::Float32: return forward_typed<float>(p, ptr<const float>(q), ptr<const float>(d), o, a);
    case DType::BFloat16: return forward_bf16(p, ptr<const uint16_t>(q), ptr<const uint16_t>(d), o, a);
    case DType::Float16:
      return forward_typed<FP16>(p, ptr<const FP16>(q), ptr<const FP16>(d), o, a);
    default: break;
  }
  FASTRANK_CHECK(false, "maxsim (cpp): unsupported dtype " << dtype_name(to_dtype(dtype)));
}

// Backward through the argmax route, in float32, deterministic (each output row has one writer and
// sums its contributions in a fixed order):
//   dq[f,y,i,:] = sum_x g[f,y,x] * d[f,x,argmax[f,y,x,i],:]
//   dd[f,x,j,:] = sum_y sum_{i: argmax[f,y,x,i] = j} g[f,y,x] * q[f,y,i,:]
template <typename T>
void backward_typed(const Problem& p, const T* q, const T* d, const float* g, const int32_t* argmax, float* dq,
                    float* dd) {
  const int64_t H = p.H;
  if (dq) {
    const int64_t rows = p.F * p.Y * p.Lq;
#pragma omp parallel
    {
      std::vector<float> row(H);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t f = r / (p.Y * p.Lq), y = (r / p.Lq) % p.Y, i = r % p.Lq;
        float* dst = dq + r * H;
        std::fill(dst, dst + H, 0.0f);
        for (int64_t x = 0; x < p.X; ++x) {
          const int64_t pair = (f * p.Y + y) * p.X + x;
          const int32_t j = argmax[pair * p.Lq + i];
          if (j < 0) continue;
          widen_row<T>(d + f * p.ds.a + x * p.ds.b + j * p.ds.tok, row.data(), H);
          const float gp = g[pair];
          for (int64_t k = 0; k < H; ++k) dst[k] += gp * row[k];
        }
      }
    }
  }
  if (dd) {
    const int64_t items = p.F * p.X;
#pragma omp parallel
    {
      std::vector<float> row(H);
#pragma omp for schedule(static)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t f = it / p.X, x = it % p.X;
        float* base = dd + it * p.Ld * H;
        std::fill(base, base + p.Ld * H, 0.0f);
        for (int64_t y = 0; y < p.Y; ++y) {
          const int64_t pair = (f * p.Y + y) * p.X + x;
          const float gp = g[pair];
          for (int64_t i = 0; i < p.Lq; ++i) {
            const int32_t j = argmax[pair * p.Lq + i];
            if (j < 0) continue;
            widen_row<T>(q + f * p.qs.a + y * p.qs.b + i * p.qs.tok, row.data(), H);
            float* dst = base + j * H;
            for (int64_t k = 0; k < H; ++k) dst[k] += gp * row[k];
          }
        }
      }
    }
  }
}

void maxsim_backward(int dtype, std::uintptr_t q, std::uintptr_t d, const std::vector<int64_t>& dims,
                     const std::vector<int64_t>& qs, const std::vector<int64_t>& ds, std::uintptr_t grad,
                     std::uintptr_t argmax, std::uintptr_t dq, std::uintptr_t dd) {
  const std::vector<int64_t> none4 = {0, 0, 0, 0};
  const Problem p = make_problem(dims, qs, ds, 0, none4, 0, none4);
  const float* g = ptr<const float>(grad);
  const int32_t* a = ptr<const int32_t>(argmax);
  float* dqp = dq ? ptr<float>(dq) : nullptr;
  float* ddp = dd ? ptr<float>(dd) : nullptr;
  pybind11::gil_scoped_release nogil;
  switch (to_dtype(dtype)) {
    case DType::Float32: return backward_typed<float>(p, ptr<const float>(q), ptr<const float>(d), g, a, dqp, ddp);
    case DType::BFloat16: return backward_typed<BF16>(p, ptr<const BF16>(q), ptr<const BF16>(d), g, a, dqp, ddp);
    case DType::Float16: return backward_typed<FP16>(p, ptr<const FP16>(q), ptr<const FP16>(d), g, a, dqp, ddp);
    default: break;
  }
  FASTRANK_CHECK(false, "maxsim (cpp): unsupported dtype " << dtype_name(to_dtype(dtype)));
}

void register_maxsim(pybind11::module_& m) {
  m.def("maxsim_forward", &maxsim_forward,
        "MaxSim forward on CPU. dims=(F,Y,X,Lq,Ld,H); q strides (F,Y,tok), d strides (F,X,tok), last dim "
        "contiguous; masks uint8 with strides (F,Y,X,tok) or 0; out float32 (F,Y,X); argmax int32 (F,Y,X,Lq) or 0.",
        pybind11::arg("dtype"), pybind11::arg("q"), pybind11::arg("d"), pybind11::arg("dims"), pybind11::arg("q_strides"),
        pybind11::arg("d_strides"), pybind11::arg("q_mask"), pybind11::arg("q_mask_strides"), pybind11::arg("d_mask"),
        pybind11::arg("d_mask_strides"), pybind11::arg("out"), pybind11::arg("argmax"));
  m.def("maxsim_backward", &maxsim_backward,
        "MaxSim backward on CPU through the saved argmax; dq float32 (F,Y,Lq,H), dd float32 (F,X,Ld,H), either 0.",
        pybind11::arg("dtype"), pybind11::arg("q"), pybind11::arg("d"), pybind11::arg("dims"), pybind11::arg("q_strides"),
        pybind11::arg("d_strides"), pybind11::arg("grad"), pybind11::arg("argmax"), pybind11::arg("dq"),
        pybind11::arg("dd"));
#ifdef __AVX512BF16__
  m.attr("maxsim_bf16_native") = true;
#else
  m.attr("maxsim_bf16_native") = false;
#endif
}

}  // namespace

FASTRANK_REGISTER(register_maxsim);

}  // namespace fastrank
