// Fused distillation losses on CPU: loss and gradient w.r.t. the student in one pass, OpenMP over queries.
// The per-row math (and its formulas) is in losses_rows.inc, compiled once per instruction set; this file
// gathers rows, picks the ISA's row kernels (the path fastrank.cpu_isa selected, passed from Python) and
// reduces. Reductions: "mean" divides by the number of queries that have at least one term; the kernel
// reports that factor in `scale` so backward multiplies instead of re-counting.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "cpu/cpu_isa.h"
#include "cpu/losses_cpu.h"
#ifdef FASTRANK_WITH_CUDA
#include "cuda/losses_cuda.h"
#endif

FASTRANK_DECLARE_LOSSES_ISA(isa_scalar)
#ifdef FASTRANK_ISA_AVX2
FASTRANK_DECLARE_LOSSES_ISA(isa_avx2)
#endif
#ifdef FASTRANK_ISA_AVX512
FASTRANK_DECLARE_LOSSES_ISA(isa_avx512)
#endif

namespace fastrank {
namespace {

using namespace losses_cpu;

// The row kernels for a CPU ISA path: the losses have no bf16 or tile math, so every AVX-512 path shares
// the AVX-512 rows. The path was validated by fastrank.cpu_isa; it is checked again here.
const RowKernels& row_kernels(const std::string& isa) {
  const cpu::IsaSupport& s = cpu::isa_support();
  int level = -1;
  for (int i = 0; i < cpu::kIsaCount; ++i)
    if (isa == cpu::isa_name(static_cast<cpu::Isa>(i))) level = i;
  FASTRANK_CHECK(level >= 0, "losses (cpp): unknown CPU ISA path '" << isa << "'");
  FASTRANK_CHECK(s.ok[level], "losses (cpp): the CPU ISA path '" << isa << "' cannot run here: " << s.reason[level]);
#ifdef FASTRANK_ISA_AVX512
  if (level >= static_cast<int>(cpu::Isa::Avx512)) return isa_avx512::losses_rows;
#endif
#ifdef FASTRANK_ISA_AVX2
  if (level >= static_cast<int>(cpu::Isa::Avx2)) return isa_avx2::losses_rows;
#endif
  return isa_scalar::losses_rows;
}

inline float row_call(const RowKernels& k, int kind, int64_t K, const float* s, const float* t, const uint8_t* cls,
                      float param, float* g, float* work, bool* term) {
  return k.distill_f32(kind, K, s, t, cls, param, g, work, term);
}
inline double row_call(const RowKernels& k, int kind, int64_t K, const double* s, const double* t, const uint8_t* cls,
                       double param, double* g, double* work, bool* term) {
  return k.distill_f64(kind, K, s, t, cls, param, g, work, term);
}
inline float inbatch_call(const RowKernels& k, int64_t M, const float* row, int64_t y, float tau, float* g) {
  return k.inbatch_f32(M, row, y, tau, g);
}
inline double inbatch_call(const RowKernels& k, int64_t M, const double* row, int64_t y, double tau, double* g) {
  return k.inbatch_f64(M, row, y, tau, g);
}

// A temperature in the accumulation type: one below float32's range would round to 0 and make 0/0; the
// smallest positive float gives the same (overflowing) result for every logit difference that is not 0.
template <typename A>
A temperature(double tau) {
  return std::max(static_cast<A>(tau), std::numeric_limits<A>::denorm_min());
}

const char* const kLossNames[] = {"mse", "margin_mse", "m3se", "softmax_ce", "kl_div", "rankdistil_b"};

// The first valid candidate whose infinite teacher score the loss reads (-1: none), for a row that has one.
// The rule, mirrored by fastrank/ops/losses.py (_check_teacher) for the reference: mse reads every valid
// score, margin_mse those of rows with a pair, rankdistil_b the positives', m3se the positives' and t_j*'s
// (j* picked as in the row kernel) of rows with a term, softmax_ce / kl_div every score, where -inf is a
// zero probability and only +inf is refused, unless the whole row is -inf (*all_neg_inf: no distribution).
template <typename A>
int64_t infinite_teacher_read(int kind, int64_t K, const A* t, const uint8_t* cls, bool* all_neg_inf) {
  *all_neg_inf = false;
  int64_t n_pos = 0, n_neg = 0, first_valid = -1, star = -1;
  for (int64_t k = 0; k < K; ++k) {
    n_pos += cls[k] == POS;
    n_neg += cls[k] == NEG;
    if (cls[k] != MASKED && first_valid < 0) first_valid = k;
    if (cls[k] == NEG && (star < 0 || t[k] > t[star])) star = k;
  }
  bool any_finite_or_pos_inf = false;
  for (int64_t k = 0; k < K; ++k) {
    if (cls[k] == MASKED) continue;
    const bool inf = std::isinf(t[k]);
    switch (kind) {
      case MSE:
        if (inf) return k;
        break;
      case MARGIN_MSE:
        if (inf && n_pos > 0 && n_neg > 0) return k;
        break;
      case RANKDISTIL_B:
        if (inf && cls[k] == POS) return k;
        break;
      case M3SE:
        if (inf && n_neg > 0 && n_pos > 0 && (cls[k] == POS || k == star)) return k;
        break;
      default:  // SOFTMAX_CE, KL_DIV
        if (inf && t[k] > 0) return k;
        any_finite_or_pos_inf |= !inf;
    }
  }
  if ((kind == SOFTMAX_CE || kind == KL_DIV) && first_valid >= 0 && !any_finite_or_pos_inf) {
    *all_neg_inf = true;
    return first_valid;
  }
  return -1;
}


struct F32 { using in_t = float; template <typename A> static A load(const float* p) { return static_cast<A>(*p); } };
struct F64 { using in_t = double; template <typename A> static A load(const double* p) { return static_cast<A>(*p); } };
struct F16 { using in_t = uint16_t; template <typename A> static A load(const uint16_t* p) { return fp16_to_float(*p); } };
struct BF16 { using in_t = uint16_t; template <typename A> static A load(const uint16_t* p) { return bf16_to_float(*p); } };

constexpr int64_t kParallelMin = int64_t(1) << 17;

template <typename A>
void finish_reduction(int reduction, int64_t B, const A* row_loss, const uint8_t* has_term, A* loss, A* scale) {
  if (reduction == NONE) {
    for (int64_t b = 0; b < B; ++b) loss[b] = row_loss[b];
    *scale = 1;
    return;
  }
  double total = 0;
  int64_t counted = 0;
  for (int64_t b = 0; b < B; ++b) {
    total += static_cast<double>(row_loss[b]);
    counted += has_term[b];
  }
  const double factor = reduction == MEAN ? 1.0 / static_cast<double>(std::max<int64_t>(counted, 1)) : 1.0;
  *loss = static_cast<A>(total * factor);
  *scale = static_cast<A>(factor);
}

struct View {
  std::uintptr_t ptr;
  int64_t stride_b, stride_k;
};

template <typename L, typename A>
void distill_cpu(const RowKernels& rows, int kind, int reduction, int64_t B, int64_t K, A param, View s, View t,
                 View pos, View mask, A* loss, A* grad, A* scale) {
  using in_t = typename L::in_t;
  const in_t* sp = ptr<const in_t>(s.ptr);
  const in_t* tp = ptr<const in_t>(t.ptr);
  const uint8_t* pp = ptr<const uint8_t>(pos.ptr);
  const uint8_t* mp = ptr<const uint8_t>(mask.ptr);
  std::vector<A> row_loss(B);
  std::vector<uint8_t> has_term(B);
  int64_t bad_row = -1, bad_col = -1, inf_row = -1, inf_col = -1;
  bool inf_whole_row = false;
  // Training-sized problems (B*K up to ~10^5) finish in tens of microseconds on one core, less than an
  // OpenMP fork/join costs on a busy machine, so only larger ones are split across threads.
#pragma omp parallel if (B * K >= kParallelMin)
  {
    std::vector<A> s_buf(K), t_buf(K), work(K);
    std::vector<uint8_t> cls_buf(K);
    // Locals, not captured struct fields: the uint8 stores below may alias anything, and the compiler would
    // reload every shared field after each of them.
    A* __restrict s_row = s_buf.data();
    A* __restrict t_row = t_buf.data();
    uint8_t* __restrict cls = cls_buf.data();
    const int64_t s_sb = s.stride_b, s_sk = s.stride_k, t_sb = t.stride_b, t_sk = t.stride_k;
    const int64_t p_sb = pos.stride_b, p_sk = pos.stride_k, m_sb = mask.stride_b, m_sk = mask.stride_k;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const in_t* s_in = sp + b * s_sb;
      const in_t* t_in = tp + b * t_sb;
      const uint8_t* p_in = pp == nullptr ? nullptr : pp + b * p_sb;
      const uint8_t* m_in = mp == nullptr ? nullptr : mp + b * m_sb;
      bool teacher_nan = false, teacher_inf = false;
      for (int64_t k = 0; k < K; ++k) {
        const bool valid = m_in == nullptr || m_in[k * m_sk] != 0;
        const bool positive = p_in == nullptr ? k == 0 : p_in[k * p_sk] != 0;
        const A sv = L::template load<A>(s_in + k * s_sk), tv = L::template load<A>(t_in + k * t_sk);
        cls[k] = valid ? (positive ? POS : NEG) : MASKED;
        // Masked entries are padding (possibly inf or NaN): zero them so that no arithmetic sees them.
        s_row[k] = valid ? sv : A(0);
        t_row[k] = valid ? tv : A(0);
        teacher_nan |= valid && std::isnan(tv);
        teacher_inf |= valid && std::isinf(tv);
      }
      if (teacher_nan) {
        int64_t col = 0;
        while (!(cls[col] != MASKED && std::isnan(t_row[col]))) ++col;
#pragma omp critical(fastrank_losses_nan)
        if (bad_row < 0 || b < bad_row) { bad_row = b; bad_col = col; }
      }
      bool term = false;
      row_loss[b] = row_call(rows, kind, K, s_row, t_row, cls, param, grad + b * K, work.data(), &term);
      has_term[b] = term;
      if (teacher_inf) {
        bool whole_row = false;
        const int64_t col = infinite_teacher_read(kind, K, t_row, cls, &whole_row);
        if (col >= 0) {
#pragma omp critical(fastrank_losses_inf)
          if (inf_row < 0 || b < inf_row) { inf_row = b; inf_col = col; inf_whole_row = whole_row; }
        }
      }
    }
  }
  FASTRANK_CHECK(bad_row < 0, "t (teacher scores) contains NaN at a valid candidate, first at [" << bad_row << ", "
                                  << bad_col << "]; clean or mask the teacher scores");
  FASTRANK_CHECK(inf_row < 0 || !inf_whole_row, "t (teacher scores) is -inf at every valid candidate of row "
                                                     << inf_row << ", so softmax(t/tau) is undefined; mask the row");
  if (inf_row >= 0) {
    // Read back from the caller's tensor: the row buffers were thread-local.
    const A v = L::template load<A>(tp + inf_row * t.stride_b + inf_col * t.stride_k);
    FASTRANK_CHECK(false, "t (teacher scores) contains " << (v > 0 ? "inf" : "-inf") << " at a valid candidate that "
                              << kLossNames[kind] << " uses, first at [" << inf_row << ", " << inf_col
                              << "]; mask the candidate or give it a finite score");
  }
  finish_reduction<A>(reduction, B, row_loss.data(), has_term.data(), loss, scale);
}

template <typename L, typename A>
void inbatch_ce_cpu(const RowKernels& rows, int reduction, int64_t B, int64_t M, A tau, View x, std::uintptr_t target_ptr, int64_t target_stride,
                    bool target_is_int64, A* loss, A* grad, A* scale) {
  using in_t = typename L::in_t;
  const in_t* xp = ptr<const in_t>(x.ptr);
  std::vector<A> row_loss(B);
  std::vector<uint8_t> has_term(B);
  int64_t bad_row = -1, bad_target = 0;
#pragma omp parallel if (B * M >= kParallelMin)
  {
    std::vector<A> row(M);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t y = target_is_int64 ? ptr<const int64_t>(target_ptr)[b * target_stride]
                                        : ptr<const int32_t>(target_ptr)[b * target_stride];
      A* g = grad + b * M;
      row_loss[b] = 0;
      has_term[b] = y >= 0;
      if (y < 0 || y >= M) {
        for (int64_t k = 0; k < M; ++k) g[k] = 0;
        if (y >= M) {
#pragma omp critical(fastrank_losses_target)
          if (bad_row < 0 || b < bad_row) { bad_row = b; bad_target = y; }
        }
        continue;
      }
      for (int64_t k = 0; k < M; ++k) row[k] = L::template load<A>(xp + b * x.stride_b + k * x.stride_k);
      row_loss[b] = inbatch_call(rows, M, row.data(), y, tau, g);
    }
  }
  FASTRANK_CHECK(bad_row < 0, "target[" << bad_row << "] = " << bad_target << " is out of range for scores with M = "
                                        << M << " columns (expected 0 <= target < M, or a negative value to ignore the row)");
  finish_reduction<A>(reduction, B, row_loss.data(), has_term.data(), loss, scale);
}

void check_common(int reduction, int64_t B, int64_t K, const char* what) {
  FASTRANK_CHECK(reduction >= NONE && reduction <= MEAN, "unknown reduction code " << reduction);
  FASTRANK_CHECK(B >= 1 && K >= 1, what << " must be a non-empty (B, K) matrix, got (" << B << ", " << K << ")");
}

void distill_forward_cpu(const RowKernels& rows, int kind, int reduction, int64_t B, int64_t K, int dtype, double param, View s, View t,
                         View pos, View mask, std::uintptr_t loss, std::uintptr_t grad, std::uintptr_t scale) {
  check_common(reduction, B, K, "s");
  FASTRANK_CHECK(kind >= MSE && kind <= RANKDISTIL_B, "unknown loss kind " << kind);
  FASTRANK_CHECK(s.ptr != 0 && t.ptr != 0, "s and t must be given");
  const bool is_tau = kind == SOFTMAX_CE || kind == KL_DIV;
  const float param_f = is_tau ? temperature<float>(param) : static_cast<float>(param);
  if (is_tau) param = temperature<double>(param);
  switch (to_dtype(dtype)) {
    case DType::Float32:
      return distill_cpu<F32, float>(rows, kind, reduction, B, K, param_f, s, t, pos, mask,
                                     ptr<float>(loss), ptr<float>(grad), ptr<float>(scale));
    case DType::Float16:
      return distill_cpu<F16, float>(rows, kind, reduction, B, K, param_f, s, t, pos, mask,
                                     ptr<float>(loss), ptr<float>(grad), ptr<float>(scale));
    case DType::BFloat16:
      return distill_cpu<BF16, float>(rows, kind, reduction, B, K, param_f, s, t, pos, mask,
                                      ptr<float>(loss), ptr<float>(grad), ptr<float>(scale));
    case DType::Float64:
      // float64 stays float64 end to end so that gradcheck can test the kernel itself.
      return distill_cpu<F64, double>(rows, kind, reduction, B, K, param, s, t, pos, mask, ptr<double>(loss),
                                      ptr<double>(grad), ptr<double>(scale));
  }
}

void inbatch_ce_forward_cpu(const RowKernels& rows, int reduction, int64_t B, int64_t M, int dtype, double tau, View x,
                            std::uintptr_t target, int64_t target_stride, bool target_is_int64, std::uintptr_t loss,
                            std::uintptr_t grad, std::uintptr_t scale) {
  check_common(reduction, B, M, "scores");
  switch (to_dtype(dtype)) {
    case DType::Float32:
      return inbatch_ce_cpu<F32, float>(rows, reduction, B, M, temperature<float>(tau), x, target, target_stride,
                                        target_is_int64, ptr<float>(loss), ptr<float>(grad), ptr<float>(scale));
    case DType::Float16:
      return inbatch_ce_cpu<F16, float>(rows, reduction, B, M, temperature<float>(tau), x, target, target_stride,
                                        target_is_int64, ptr<float>(loss), ptr<float>(grad), ptr<float>(scale));
    case DType::BFloat16:
      return inbatch_ce_cpu<BF16, float>(rows, reduction, B, M, temperature<float>(tau), x, target, target_stride,
                                         target_is_int64, ptr<float>(loss), ptr<float>(grad), ptr<float>(scale));
    case DType::Float64:
      return inbatch_ce_cpu<F64, double>(rows, reduction, B, M, temperature<double>(tau), x, target, target_stride, target_is_int64,
                                         ptr<double>(loss), ptr<double>(grad), ptr<double>(scale));
  }
}

void register_losses(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "distill_forward",
      [](int kind, int reduction, int64_t B, int64_t K, int dtype, double param, std::uintptr_t s, int64_t s_sb,
         int64_t s_sk, std::uintptr_t t, int64_t t_sb, int64_t t_sk, std::uintptr_t pos, int64_t pos_sb,
         int64_t pos_sk, std::uintptr_t mask, int64_t mask_sb, int64_t mask_sk, std::uintptr_t loss,
         std::uintptr_t grad, std::uintptr_t scale, const std::string& isa) {
        const RowKernels& rows = row_kernels(isa);
        py::gil_scoped_release release;
        distill_forward_cpu(rows, kind, reduction, B, K, dtype, param, {s, s_sb, s_sk}, {t, t_sb, t_sk},
                            {pos, pos_sb, pos_sk}, {mask, mask_sb, mask_sk}, loss, grad, scale);
      },
      "Distillation loss over (B, K) CPU scores: writes the reduced loss, dL/ds (B, K, contiguous) and the "
      "backward scale. pos / mask pointers may be 0 (column 0 positive / all valid). isa: the CPU ISA path.",
      py::arg("kind"), py::arg("reduction"), py::arg("B"), py::arg("K"), py::arg("dtype"), py::arg("param"),
      py::arg("s"), py::arg("s_sb"), py::arg("s_sk"), py::arg("t"), py::arg("t_sb"), py::arg("t_sk"),
      py::arg("pos"), py::arg("pos_sb"), py::arg("pos_sk"), py::arg("mask"), py::arg("mask_sb"),
      py::arg("mask_sk"), py::arg("loss"), py::arg("grad"), py::arg("scale"), py::arg("isa"));
  m.def(
      "inbatch_ce_forward",
      [](int reduction, int64_t B, int64_t M, int dtype, double tau, std::uintptr_t x, int64_t x_sb, int64_t x_sk,
         std::uintptr_t target, int64_t target_stride, bool target_is_int64, std::uintptr_t loss,
         std::uintptr_t grad, std::uintptr_t scale, const std::string& isa) {
        const RowKernels& rows = row_kernels(isa);
        py::gil_scoped_release release;
        inbatch_ce_forward_cpu(rows, reduction, B, M, dtype, tau, {x, x_sb, x_sk}, target, target_stride,
                               target_is_int64, loss, grad, scale);
      },
      "One-hot softmax cross-entropy over (B, M) CPU scores; negative targets ignore their row.",
      py::arg("reduction"), py::arg("B"), py::arg("M"), py::arg("dtype"), py::arg("tau"), py::arg("x"),
      py::arg("x_sb"), py::arg("x_sk"), py::arg("target"), py::arg("target_stride"), py::arg("target_is_int64"),
      py::arg("loss"), py::arg("grad"), py::arg("scale"), py::arg("isa"));
#ifdef FASTRANK_WITH_CUDA
  m.def(
      "distill_forward_cuda",
      [](int kind, int reduction, int64_t B, int64_t K, int dtype, double param, std::uintptr_t s, int64_t s_sb,
         int64_t s_sk, std::uintptr_t t, int64_t t_sb, int64_t t_sk, std::uintptr_t pos, int64_t pos_sb,
         int64_t pos_sk, std::uintptr_t mask, int64_t mask_sb, int64_t mask_sk, std::uintptr_t loss,
         std::uintptr_t grad, std::uintptr_t scale, std::uintptr_t workspace, std::uintptr_t stream) {
        check_common(reduction, B, K, "s");
        FASTRANK_CHECK(kind >= MSE && kind <= RANKDISTIL_B, "unknown loss kind " << kind);
        py::gil_scoped_release release;
        cuda::distill_forward(kind, reduction, B, K, dtype, param, s, s_sb, s_sk, t, t_sb, t_sk, pos, pos_sb,
                              pos_sk, mask, mask_sb, mask_sk, loss, grad, scale, workspace, stream);
      },
      "CUDA version of distill_forward, queued on `stream` without waiting for it; workspace: zeroed "
      "losses_workspace_bytes(B) bytes (see losses_cuda.h). Invalid teacher scores give NaN rows and set the "
      "workspace's error flag instead of raising.",
      py::arg("kind"), py::arg("reduction"), py::arg("B"), py::arg("K"), py::arg("dtype"), py::arg("param"),
      py::arg("s"), py::arg("s_sb"), py::arg("s_sk"), py::arg("t"), py::arg("t_sb"), py::arg("t_sk"),
      py::arg("pos"), py::arg("pos_sb"), py::arg("pos_sk"), py::arg("mask"), py::arg("mask_sb"),
      py::arg("mask_sk"), py::arg("loss"), py::arg("grad"), py::arg("scale"), py::arg("workspace"),
      py::arg("stream"));
  m.def(
      "inbatch_ce_forward_cuda",
      [](int reduction, int64_t B, int64_t M, int dtype, double tau, std::uintptr_t x, int64_t x_sb, int64_t x_sk,
         std::uintptr_t target, int64_t target_stride, bool target_is_int64, std::uintptr_t loss,
         std::uintptr_t grad, std::uintptr_t scale, std::uintptr_t workspace, std::uintptr_t stream) {
        check_common(reduction, B, M, "scores");
        py::gil_scoped_release release;
        cuda::inbatch_ce_forward(reduction, B, M, dtype, tau, x, x_sb, x_sk, target, target_stride,
                                 target_is_int64, loss, grad, scale, workspace, stream);
      },
      "CUDA version of inbatch_ce_forward, queued without waiting; a target >= M gives a NaN row and sets the "
      "workspace's error flag.", py::arg("reduction"), py::arg("B"), py::arg("M"), py::arg("dtype"),
      py::arg("tau"), py::arg("x"), py::arg("x_sb"), py::arg("x_sk"), py::arg("target"), py::arg("target_stride"),
      py::arg("target_is_int64"), py::arg("loss"), py::arg("grad"), py::arg("scale"), py::arg("workspace"),
      py::arg("stream"));
#endif
}

}  // namespace

FASTRANK_REGISTER(register_losses);

}  // namespace fastrank
