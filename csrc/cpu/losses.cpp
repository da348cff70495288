// Fused distillation losses on CPU: loss and gradient w.r.t. the student in one pass, OpenMP over queries.
// The per-row math (and its formulas) is in losses_rows.inc, compiled once per instruction set; this file
// gathers rows, picks the ISA's row kernels (the path fastrank.cpu_isa selected, passed from Python) and
// reduces. Reductions: "mean" divides by the number of queries that have at least one term; that factor is
// folded into dL/ds here, so backward is one multiply by the upstream gradient.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "cpu/cpu_isa.h"
#include "cpu/losses_cpu.h"
#include "tensor_arg.h"
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

inline float row_call(const RowKernels& k, int kind, int64_t K, const float* s, const float* t, const ClsT* cls,
                      float param, float* g, float* work, bool* term) {
  return k.distill_f32(kind, K, s, t, cls, param, g, work, term);
}
inline double row_call(const RowKernels& k, int kind, int64_t K, const double* s, const double* t, const ClsT* cls,
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
int64_t infinite_teacher_read(int kind, int64_t K, const A* t, const ClsT* cls, bool* all_neg_inf) {
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
void finish_reduction(int reduction, int64_t B, int64_t K, const A* row_loss, const uint8_t* has_term, A* loss,
                      A* grad) {
  if (reduction == NONE) {
    for (int64_t b = 0; b < B; ++b) loss[b] = row_loss[b];
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
  // The count is known only once every row is done; dL/ds is still in cache (B*K accumulators, tens of KB
  // at a training batch), so one more pass over it costs well under a microsecond there.
  if (factor != 1.0) {
    const A f = static_cast<A>(factor);
    const int64_t n = B * K;
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) grad[i] *= f;
  }
}

struct View {
  std::uintptr_t ptr;
  int64_t stride_b, stride_k;
};

template <typename L, typename A>
void distill_cpu(const RowKernels& rows, int kind, int reduction, int64_t B, int64_t K, A param, View s, View t,
                 View pos, View mask, A* loss, A* grad) {
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
    std::vector<ClsT> cls_buf(K);
    // Locals, not captured struct fields, so that no store below makes the compiler reload a shared field.
    A* __restrict s_row = s_buf.data();
    A* __restrict t_row = t_buf.data();
    ClsT* __restrict cls = cls_buf.data();
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
  finish_reduction<A>(reduction, B, K, row_loss.data(), has_term.data(), loss, grad);
}

template <typename L, typename A>
void inbatch_ce_cpu(const RowKernels& rows, int reduction, int64_t B, int64_t M, A tau, View x, std::uintptr_t target_ptr, int64_t target_stride,
                    bool target_is_int64, A* loss, A* grad) {
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
  finish_reduction<A>(reduction, B, M, row_loss.data(), has_term.data(), loss, grad);
}

void check_common(int reduction, int64_t B, int64_t K, const char* what) {
  FASTRANK_CHECK(reduction >= NONE && reduction <= MEAN, "unknown reduction code " << reduction);
  FASTRANK_CHECK(B >= 1 && K >= 1, what << " must be a non-empty (B, K) matrix, got (" << B << ", " << K << ")");
}

void distill_forward_cpu(const RowKernels& rows, int kind, int reduction, int64_t B, int64_t K, int dtype, double param, View s, View t,
                         View pos, View mask, std::uintptr_t loss, std::uintptr_t grad) {
  check_common(reduction, B, K, "s");
  FASTRANK_CHECK(kind >= MSE && kind <= RANKDISTIL_B, "unknown loss kind " << kind);
  FASTRANK_CHECK(s.ptr != 0 && t.ptr != 0, "s and t must be given");
  const bool is_tau = kind == SOFTMAX_CE || kind == KL_DIV;
  const float param_f = is_tau ? temperature<float>(param) : static_cast<float>(param);
  if (is_tau) param = temperature<double>(param);
  switch (float_elem(dtype)) {
    case Elem::Float32:
      return distill_cpu<F32, float>(rows, kind, reduction, B, K, param_f, s, t, pos, mask,
                                     ptr<float>(loss), ptr<float>(grad));
    case Elem::Float16:
      return distill_cpu<F16, float>(rows, kind, reduction, B, K, param_f, s, t, pos, mask,
                                     ptr<float>(loss), ptr<float>(grad));
    case Elem::BFloat16:
      return distill_cpu<BF16, float>(rows, kind, reduction, B, K, param_f, s, t, pos, mask,
                                      ptr<float>(loss), ptr<float>(grad));
    case Elem::Float64:
      // float64 stays float64 end to end so that gradcheck can test the kernel itself.
      return distill_cpu<F64, double>(rows, kind, reduction, B, K, param, s, t, pos, mask, ptr<double>(loss),
                                      ptr<double>(grad));
    default:  // float_elem admits the four float codes only
      return;
  }
}

void inbatch_ce_forward_cpu(const RowKernels& rows, int reduction, int64_t B, int64_t M, int dtype, double tau, View x,
                            std::uintptr_t target, int64_t target_stride, bool target_is_int64, std::uintptr_t loss,
                            std::uintptr_t grad) {
  check_common(reduction, B, M, "scores");
  switch (float_elem(dtype)) {
    case Elem::Float32:
      return inbatch_ce_cpu<F32, float>(rows, reduction, B, M, temperature<float>(tau), x, target, target_stride,
                                        target_is_int64, ptr<float>(loss), ptr<float>(grad));
    case Elem::Float16:
      return inbatch_ce_cpu<F16, float>(rows, reduction, B, M, temperature<float>(tau), x, target, target_stride,
                                        target_is_int64, ptr<float>(loss), ptr<float>(grad));
    case Elem::BFloat16:
      return inbatch_ce_cpu<BF16, float>(rows, reduction, B, M, temperature<float>(tau), x, target, target_stride,
                                         target_is_int64, ptr<float>(loss), ptr<float>(grad));
    case Elem::Float64:
      return inbatch_ce_cpu<F64, double>(rows, reduction, B, M, temperature<double>(tau), x, target, target_stride, target_is_int64,
                                         ptr<double>(loss), ptr<double>(grad));
    default:  // float_elem admits the four float codes only
      return;
  }
}

// ---- the boundary: every tensor read from the object itself and checked (csrc/tensor_arg.h) -------------

namespace py = pybind11;

struct LossOutputs {
  std::uintptr_t loss, grad, scale;
};

// The float32 accumulators (float64 for float64 scores): loss (B,) without a reduction, () with one;
// dL/ds (B, K) contiguous, with the reduction's factor folded in on CPU. The CUDA kernels finish the reduction
// in whichever block ends last, so they report the factor in `scale` () instead (None on CPU).
LossOutputs loss_outputs(const TensorArg& x, int reduction, py::handle loss_obj, py::handle grad_obj,
                         py::handle scale_obj, bool cuda, const char* where) {
  const TensorArg loss = tensor_arg(loss_obj, "loss", where), grad = tensor_arg(grad_obj, "grad", where);
  const TensorArg scale = tensor_arg(scale_obj, "scale", where, !cuda);
  const Elem acc = x.elem == static_cast<int>(Elem::Float64) ? Elem::Float64 : Elem::Float32;
  const int64_t B = x.size[0];
  if (reduction == NONE) check_output(loss, acc, {B}, where);
  else check_output(loss, acc, {}, where);
  check_output(grad, acc, x.size, where);
  for (const TensorArg* t : {&loss, &grad}) check_same_device(x, *t, where);
  if (scale.present) {
    check_output(scale, acc, {}, where);
    check_same_device(x, scale, where);
  }
  return {loss.ptr, grad.ptr, scale.ptr};
}

// A (B, K) matrix of scores: any strides, float32/16, bfloat16 or float64.
TensorArg score_matrix(py::handle obj, const char* name, const char* where, bool cuda) {
  const TensorArg x = tensor_arg(obj, name, where);
  check_device(x, cuda, where);
  check_float_elem(x, where, true);
  FASTRANK_CHECK(x.dim() == 2, where << ": " << name << " must have shape (B, K), got " << x.shape_text());
  return x;
}

View view_of(const TensorArg& a) { return a.present ? View{a.ptr, a.stride[0], a.stride[1]} : View{0, 0, 0}; }

struct DistillArgs {
  int64_t B, K;
  int dtype;
  View s, t, pos, mask;
  LossOutputs out;
};

DistillArgs distill_args(int kind, int reduction, py::handle s_obj, py::handle t_obj, py::handle pos_obj,
                         py::handle mask_obj, py::handle loss, py::handle grad, py::handle scale, bool cuda,
                         const char* where) {
  const TensorArg s = score_matrix(s_obj, "s", where, cuda);
  const TensorArg t = tensor_arg(t_obj, "t", where);
  check_elem(t, static_cast<Elem>(s.elem), where);
  check_shape(t, s.size, where);
  check_common(reduction, s.size[0], s.size[1], "s");
  FASTRANK_CHECK(kind >= MSE && kind <= RANKDISTIL_B, where << ": unknown loss kind " << kind);
  const TensorArg pos = tensor_arg(pos_obj, "positives", where, true), mask = tensor_arg(mask_obj, "mask", where, true);
  for (const TensorArg* m : {&pos, &mask}) {
    if (!m->present) continue;
    check_mask_elem(*m, where);
    check_shape(*m, s.size, where);
  }
  for (const TensorArg* x : {&t, &pos, &mask}) check_same_device(s, *x, where);
  return {s.size[0], s.size[1], s.elem, view_of(s), view_of(t), view_of(pos), view_of(mask),
          loss_outputs(s, reduction, loss, grad, scale, cuda, where)};
}

struct InbatchArgs {
  int64_t B, M;
  int dtype;
  View x;
  std::uintptr_t target;
  int64_t target_stride;
  bool target_is_int64;
  LossOutputs out;
};

InbatchArgs inbatch_args(int reduction, py::handle x_obj, py::handle target_obj, py::handle loss, py::handle grad,
                         py::handle scale, bool cuda, const char* where) {
  const TensorArg x = score_matrix(x_obj, "scores", where, cuda);
  check_common(reduction, x.size[0], x.size[1], "scores");
  const TensorArg target = tensor_arg(target_obj, "target", where);
  FASTRANK_CHECK(target.elem == static_cast<int>(Elem::Int64) || target.elem == static_cast<int>(Elem::Int32),
                 where << ": target must be int64 or int32, got " << target.dtype_text());
  check_shape(target, {x.size[0]}, where);
  check_same_device(x, target, where);
  return {x.size[0], x.size[1], x.elem, view_of(x), target.ptr, target.stride[0],
          target.elem == static_cast<int>(Elem::Int64), loss_outputs(x, reduction, loss, grad, scale, cuda, where)};
}

#ifdef FASTRANK_WITH_CUDA
std::uintptr_t cuda_workspace(py::handle obj, int64_t B, py::handle like, const char* where) {
  const TensorArg w = tensor_arg(obj, "workspace", where);
  check_elem(w, Elem::UInt8, where);
  check_contiguous(w, where);
  FASTRANK_CHECK(w.numel() >= cuda::losses_workspace_bytes(B), where << ": workspace must hold at least "
                                                                     << cuda::losses_workspace_bytes(B) << " bytes, got " << w.numel());
  check_same_device(tensor_arg(like, "s", where), w, where);
  return w.ptr;
}
#endif

void register_losses(py::module_& m) {
  constexpr const char* kCpu = "losses (cpp)";
  m.def(
      "distill_forward",
      [](int kind, int reduction, double param, py::handle s, py::handle t, py::handle pos, py::handle mask,
         py::handle loss, py::handle grad, const std::string& isa) {
        const DistillArgs a = distill_args(kind, reduction, s, t, pos, mask, loss, grad, py::none(), false, kCpu);
        const RowKernels& rows = row_kernels(isa);
        py::gil_scoped_release release;
        distill_forward_cpu(rows, kind, reduction, a.B, a.K, a.dtype, param, a.s, a.t, a.pos, a.mask, a.out.loss,
                            a.out.grad);
      },
      "Distillation loss over (B, K) CPU scores s and teacher scores t (any strides, one float dtype): writes "
      "the reduced loss and dL/ds (B, K, contiguous, the reduction's 1/count included), float32 (float64 for "
      "float64 scores). "
      "positives / mask: bool (B, K) or None (column 0 positive / all valid). isa: the CPU ISA path.",
      py::arg("kind"), py::arg("reduction"), py::arg("param"), py::arg("s"), py::arg("t"), py::arg("positives"),
      py::arg("mask"), py::arg("loss"), py::arg("grad"), py::arg("isa"));
  m.def(
      "inbatch_ce_forward",
      [](int reduction, double tau, py::handle x, py::handle target, py::handle loss, py::handle grad,
         const std::string& isa) {
        const InbatchArgs a = inbatch_args(reduction, x, target, loss, grad, py::none(), false, kCpu);
        const RowKernels& rows = row_kernels(isa);
        py::gil_scoped_release release;
        inbatch_ce_forward_cpu(rows, reduction, a.B, a.M, a.dtype, tau, a.x, a.target, a.target_stride,
                               a.target_is_int64, a.out.loss, a.out.grad);
      },
      "One-hot softmax cross-entropy over (B, M) CPU scores; target int64/int32 (B,), a negative value ignores "
      "its row, one >= M is an error.",
      py::arg("reduction"), py::arg("tau"), py::arg("scores"), py::arg("target"), py::arg("loss"), py::arg("grad"),
      py::arg("isa"));
#ifdef FASTRANK_WITH_CUDA
  m.def("_losses_cuda_blocks", &cuda::losses_blocks,
        "Test hook: the checked grid size of a loss launch over B rows (ValueError naming `what`); no GPU needed.",
        py::arg("B"), py::arg("what"));
  constexpr const char* kCuda = "losses (cuda)";
  m.def(
      "distill_forward_cuda",
      [](int kind, int reduction, double param, py::handle s, py::handle t, py::handle pos, py::handle mask,
         py::handle loss, py::handle grad, py::handle scale, py::handle workspace, std::uintptr_t stream) {
        const DistillArgs a = distill_args(kind, reduction, s, t, pos, mask, loss, grad, scale, true, kCuda);
        const std::uintptr_t ws = cuda_workspace(workspace, a.B, s, kCuda);
        py::gil_scoped_release release;
        cuda::distill_forward(kind, reduction, a.B, a.K, a.dtype, param, a.s.ptr, a.s.stride_b, a.s.stride_k, a.t.ptr,
                              a.t.stride_b, a.t.stride_k, a.pos.ptr, a.pos.stride_b, a.pos.stride_k, a.mask.ptr,
                              a.mask.stride_b, a.mask.stride_k, a.out.loss, a.out.grad, a.out.scale, ws, stream);
      },
      "CUDA version of distill_forward (tensors checked alike), queued on `stream` without waiting for it; "
      "workspace: zeroed uint8 of losses_workspace_bytes(B) bytes (see losses_cuda.h). Invalid teacher scores "
      "give NaN rows and set the workspace's error flag instead of raising.",
      py::arg("kind"), py::arg("reduction"), py::arg("param"), py::arg("s"), py::arg("t"), py::arg("positives"),
      py::arg("mask"), py::arg("loss"), py::arg("grad"), py::arg("scale"), py::arg("workspace"), py::arg("stream"));
  m.def(
      "inbatch_ce_forward_cuda",
      [](int reduction, double tau, py::handle x, py::handle target, py::handle loss, py::handle grad,
         py::handle scale, py::handle workspace, std::uintptr_t stream) {
        const InbatchArgs a = inbatch_args(reduction, x, target, loss, grad, scale, true, kCuda);
        const std::uintptr_t ws = cuda_workspace(workspace, a.B, x, kCuda);
        py::gil_scoped_release release;
        cuda::inbatch_ce_forward(reduction, a.B, a.M, a.dtype, tau, a.x.ptr, a.x.stride_b, a.x.stride_k, a.target,
                                 a.target_stride, a.target_is_int64, a.out.loss, a.out.grad, a.out.scale, ws, stream);
      },
      "CUDA version of inbatch_ce_forward (tensors checked alike), queued without waiting; a target >= M gives "
      "a NaN row and sets the workspace's error flag.",
      py::arg("reduction"), py::arg("tau"), py::arg("scores"), py::arg("target"), py::arg("loss"), py::arg("grad"),
      py::arg("scale"), py::arg("workspace"), py::arg("stream"));
#endif
}

}  // namespace

FASTRANK_REGISTER(register_losses);

}  // namespace fastrank
