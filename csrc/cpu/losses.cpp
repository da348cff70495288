// Fused distillation losses on CPU: loss and gradient w.r.t. the student in one pass, OpenMP over queries.
//
// Per query (one row of K candidates), with v the valid candidates, P / N the valid positives / negatives,
// d_k = s_k - t_k, and g_k = dL/ds_k (what the kernel keeps for backward):
//   mse          L = sum_v d_k^2                                   g_k = 2 d_k
//   margin_mse   L = sum_{i in P, j in N} (d_i - d_j)^2            g_i = 2|N|(d_i - mean_N d), g_j = 2|P|(d_j - mean_P d)
//                evaluated in O(K) as |N| sum_P (d_i - mP)^2 + |P| sum_N (d_j - mN)^2 + |P||N| (mP - mN)^2,
//                a sum of non-negative terms, so no cancellation at extreme scores
//   m3se         j* = first argmax_{j in N} t_j, e_i = (t_i - t_j*) - (s_i - s_j*), h_j = max(s_j - s_j*, 0)
//                L = sum_P e_i^2 + sum_N h_j^2                     g_i = -2 e_i, g_j = 2 h_j,
//                                                                  g_j* += 2 sum_P e_i - 2 sum_N h_j
//   softmax_ce   p = softmax(t/tau), q = softmax(s/tau) over v    L = sum_v p_k (-log q_k)   g_k = (q_k - p_k)/tau
//   kl_div       L = sum_v p_k (log p_k - log q_k)                 same gradient
//   rankdistil_b L = sum_P d_i^2 + sum_N max(s_j - gamma0, 0)^2    g_i = 2 d_i, g_j = 2 max(s_j - gamma0, 0)
//   inbatch_ce   q = softmax(x/tau) over the row, L = -log q_y     g_k = (q_k - [k == y])/tau
// -log q_k is formed as (max - x_k) + log Z, each part non-negative, for the same reason as margin_mse.
// Terms with p_k = 0 are skipped rather than multiplied, so -inf logits never make 0 * inf.
//
// The hinge max(x, 0) is written `x < 0 ? 0 : x` so that a NaN student score propagates (std::max would
// drop it depending on argument order). Reductions: "mean" divides by the number of queries that have at
// least one term; the kernel reports that factor in `scale` so backward multiplies instead of re-counting.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "bindings.h"
#include "common.h"
#ifdef FASTRANK_WITH_CUDA
#include "cuda/losses_cuda.h"
#endif

namespace fastrank {
namespace {

// Must match fastrank/ops/losses.py: LOSS_KINDS and REDUCTIONS.
enum Kind : int { MSE = 0, MARGIN_MSE = 1, M3SE = 2, SOFTMAX_CE = 3, KL_DIV = 4, RANKDISTIL_B = 5 };
enum Reduction : int { NONE = 0, SUM = 1, MEAN = 2 };
// Candidate classes after masking.
enum Cls : uint8_t { MASKED = 0, POS = 1, NEG = 2 };

struct F32 { using in_t = float; template <typename A> static A load(const float* p) { return static_cast<A>(*p); } };
struct F64 { using in_t = double; template <typename A> static A load(const double* p) { return static_cast<A>(*p); } };
struct F16 { using in_t = uint16_t; template <typename A> static A load(const uint16_t* p) { return fp16_to_float(*p); } };
struct BF16 { using in_t = uint16_t; template <typename A> static A load(const uint16_t* p) { return bf16_to_float(*p); } };

constexpr int64_t kParallelMin = int64_t(1) << 17;

// exp that GCC vectorises (std::exp stays a scalar libm call without -ffast-math), for the float path:
// exp(x) = 2^n exp(r) with n = round(x / ln 2) and r = x - n ln 2 (ln 2 split in two constants so that r is
// exact), |r| <= ln(2)/2, exp(r) by its degree-7 Taylor polynomial (truncation < 1e-8 relative, so the
// result is within a few ulp). NaN propagates, x < -87 gives 0 (instead of a subnormal), x > 88 gives inf.
inline float exp_fast(float x) {
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it leaves round(y) in the low mantissa bits
  const float shifted = clamped * 1.44269504088896341f + shifter;
  const float n = shifted - shifter;
  int32_t n_bits;
  std::memcpy(&n_bits, &shifted, sizeof(n_bits));
  const int32_t n_int = n_bits - 0x4B400000;
  const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t scale_bits = (n_int + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  const float result = x < -87.0f ? 0.0f : p * scale;
  return x > 88.0f ? std::numeric_limits<float>::infinity() : result;
}

// float64 inputs keep libm's exp: that path exists for exactness (gradcheck), not speed.
inline double exp_fast(double x) { return std::exp(x); }

template <typename A>
inline A hinge(A x) { return x < A(0) ? A(0) : x; }

// One query. s, t hold K scores in A, zero where masked; cls says which are valid and which are positive.
// Writes g[0..K) (zero where masked) and returns the query's loss; *has_term says whether the sum had a term.
// work: K scratch values. Classes enter the loops as selects rather than branches so that the loops vectorise.
template <typename A>
A distill_row(int kind, int64_t K, const A* __restrict s, const A* __restrict t, const uint8_t* __restrict cls,
              A param, A* __restrict g, A* __restrict work, bool* has_term) {
  int64_t n_pos = 0, n_neg = 0;
#pragma omp simd reduction(+ : n_pos, n_neg)
  for (int64_t k = 0; k < K; ++k) {
    n_pos += cls[k] == POS;
    n_neg += cls[k] == NEG;
  }
  const int64_t n_valid = n_pos + n_neg;
  auto no_term = [&]() {
    *has_term = false;
    for (int64_t k = 0; k < K; ++k) g[k] = 0;
    return A(0);
  };
  A loss = 0;
  switch (kind) {
    case MSE:
    case RANKDISTIL_B: {
      if (n_valid == 0) return no_term();
      *has_term = true;
      const bool hinge_negatives = kind == RANKDISTIL_B;
#pragma omp simd reduction(+ : loss)
      for (int64_t k = 0; k < K; ++k) {
        const A d = s[k] - t[k];
        const A h = hinge(s[k] - param);
        const A v = cls[k] == MASKED ? A(0) : (hinge_negatives && cls[k] == NEG ? h : d);
        loss += v * v;
        g[k] = 2 * v;
      }
      return loss;
    }
    case MARGIN_MSE: {
      if (n_pos == 0 || n_neg == 0) return no_term();
      *has_term = true;
      A sum_p = 0, sum_n = 0;
#pragma omp simd reduction(+ : sum_p, sum_n)
      for (int64_t k = 0; k < K; ++k) {
        const A d = s[k] - t[k];
        sum_p += cls[k] == POS ? d : A(0);
        sum_n += cls[k] == NEG ? d : A(0);
      }
      const A np = static_cast<A>(n_pos), nn = static_cast<A>(n_neg);
      const A mean_p = sum_p / np, mean_n = sum_n / nn;
      A ss_p = 0, ss_n = 0;
#pragma omp simd reduction(+ : ss_p, ss_n)
      for (int64_t k = 0; k < K; ++k) {
        const A d = s[k] - t[k];
        const A dp = d - mean_p, dn = d - mean_n;
        const bool pos = cls[k] == POS, neg = cls[k] == NEG;
        ss_p += pos ? dp * dp : A(0);
        ss_n += neg ? dn * dn : A(0);
        g[k] = pos ? 2 * nn * dn : (neg ? 2 * np * dp : A(0));
      }
      const A gap = mean_p - mean_n;
      return nn * ss_p + np * ss_n + np * nn * gap * gap;
    }
    case M3SE: {
      if (n_neg == 0) return no_term();
      *has_term = true;
      int64_t star = -1;
      for (int64_t k = 0; k < K; ++k)
        if (cls[k] == NEG && (star < 0 || t[k] > t[star])) star = k;
      const A s_star = s[star], t_star = t[star];
      A sum_e = 0, sum_h = 0;
#pragma omp simd reduction(+ : loss, sum_e, sum_h)
      for (int64_t k = 0; k < K; ++k) {
        const A e = cls[k] == POS ? (t[k] - t_star) - (s[k] - s_star) : A(0);
        const A h = cls[k] == NEG ? hinge(s[k] - s_star) : A(0);
        loss += e * e + h * h;
        g[k] = 2 * h - 2 * e;
        sum_e += e;
        sum_h += h;
      }
      g[star] += 2 * sum_e - 2 * sum_h;
      return loss;
    }
    case SOFTMAX_CE:
    case KL_DIV: {
      if (n_valid == 0) return no_term();
      *has_term = true;
      const A inv_tau = A(1) / param;
      const A neg_inf = -std::numeric_limits<A>::infinity();
      // A vectorised max may pass over a NaN student score, but z_s then turns NaN and so does everything.
      A max_s = neg_inf, max_t = neg_inf;
#pragma omp simd reduction(max : max_s, max_t)
      for (int64_t k = 0; k < K; ++k) {
        const A xs = cls[k] == MASKED ? neg_inf : s[k] * inv_tau;
        const A xt = cls[k] == MASKED ? neg_inf : t[k] * inv_tau;
        max_s = xs > max_s ? xs : max_s;
        max_t = xt > max_t ? xt : max_t;
      }
      A z_s = 0, z_t = 0;
#pragma omp simd reduction(+ : z_s, z_t)
      for (int64_t k = 0; k < K; ++k) {
        const bool valid = cls[k] != MASKED;
        const A e_s = valid ? exp_fast(s[k] * inv_tau - max_s) : A(0);
        const A e_t = valid ? exp_fast(t[k] * inv_tau - max_t) : A(0);
        g[k] = e_s;
        work[k] = e_t;
        z_s += e_s;
        z_t += e_t;
      }
      const A log_z_s = std::log(z_s), log_z_t = std::log(z_t), inv_z_s = A(1) / z_s, inv_z_t = A(1) / z_t;
      const A kl = kind == KL_DIV ? A(1) : A(0);
#pragma omp simd reduction(+ : loss)
      for (int64_t k = 0; k < K; ++k) {
        const bool valid = cls[k] != MASKED;
        const A p = work[k] * inv_z_t;
        g[k] = valid ? (g[k] * inv_z_s - p) * inv_tau : A(0);
        const A neg_log_q = (max_s - s[k] * inv_tau) + log_z_s;
        const A log_p = (t[k] * inv_tau - max_t) - log_z_t;
        loss += p > 0 ? p * (neg_log_q + kl * log_p) : A(0);
      }
      return loss;
    }
  }
  return loss;
}

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
void distill_cpu(int kind, int reduction, int64_t B, int64_t K, A param, View s, View t, View pos, View mask,
                 A* loss, A* grad, A* scale) {
  using in_t = typename L::in_t;
  const in_t* sp = ptr<const in_t>(s.ptr);
  const in_t* tp = ptr<const in_t>(t.ptr);
  const uint8_t* pp = ptr<const uint8_t>(pos.ptr);
  const uint8_t* mp = ptr<const uint8_t>(mask.ptr);
  std::vector<A> row_loss(B);
  std::vector<uint8_t> has_term(B);
  int64_t bad_row = -1, bad_col = -1;
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
      bool teacher_nan = false;
      for (int64_t k = 0; k < K; ++k) {
        const bool valid = m_in == nullptr || m_in[k * m_sk] != 0;
        const bool positive = p_in == nullptr ? k == 0 : p_in[k * p_sk] != 0;
        const A sv = L::template load<A>(s_in + k * s_sk), tv = L::template load<A>(t_in + k * t_sk);
        cls[k] = valid ? (positive ? POS : NEG) : MASKED;
        // Masked entries are padding (possibly inf or NaN): zero them so that no arithmetic sees them.
        s_row[k] = valid ? sv : A(0);
        t_row[k] = valid ? tv : A(0);
        teacher_nan |= valid && std::isnan(tv);
      }
      if (teacher_nan) {
        int64_t col = 0;
        while (!(cls[col] != MASKED && std::isnan(t_row[col]))) ++col;
#pragma omp critical(fastrank_losses_nan)
        if (bad_row < 0 || b < bad_row) { bad_row = b; bad_col = col; }
      }
      bool term = false;
      row_loss[b] = distill_row<A>(kind, K, s_row, t_row, cls, param, grad + b * K, work.data(), &term);
      has_term[b] = term;
    }
  }
  FASTRANK_CHECK(bad_row < 0, "t (teacher scores) contains NaN at a valid candidate, first at [" << bad_row << ", "
                                  << bad_col << "]; clean or mask the teacher scores");
  finish_reduction<A>(reduction, B, row_loss.data(), has_term.data(), loss, scale);
}

template <typename L, typename A>
void inbatch_ce_cpu(int reduction, int64_t B, int64_t M, A tau, View x, std::uintptr_t target_ptr, int64_t target_stride,
                    bool target_is_int64, A* loss, A* grad, A* scale) {
  using in_t = typename L::in_t;
  const in_t* xp = ptr<const in_t>(x.ptr);
  std::vector<A> row_loss(B);
  std::vector<uint8_t> has_term(B);
  int64_t bad_row = -1, bad_target = 0;
  const A inv_tau = A(1) / tau;
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
      for (int64_t k = 0; k < M; ++k) row[k] = L::template load<A>(xp + b * x.stride_b + k * x.stride_k) * inv_tau;
      // An OpenMP max reduction may vectorise and drop a NaN score, but exp(NaN - mx) still poisons z.
      A mx = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : mx)
      for (int64_t k = 0; k < M; ++k) mx = row[k] > mx ? row[k] : mx;
      A z = 0;
#pragma omp simd reduction(+ : z)
      for (int64_t k = 0; k < M; ++k) {
        g[k] = exp_fast(row[k] - mx);
        z += g[k];
      }
      const A scale_q = inv_tau / z;
#pragma omp simd
      for (int64_t k = 0; k < M; ++k) g[k] *= scale_q;
      g[y] -= inv_tau;
      row_loss[b] = (mx - row[y]) + std::log(z);
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

void distill_forward_cpu(int kind, int reduction, int64_t B, int64_t K, int dtype, double param, View s, View t,
                         View pos, View mask, std::uintptr_t loss, std::uintptr_t grad, std::uintptr_t scale) {
  check_common(reduction, B, K, "s");
  FASTRANK_CHECK(kind >= MSE && kind <= RANKDISTIL_B, "unknown loss kind " << kind);
  FASTRANK_CHECK(s.ptr != 0 && t.ptr != 0, "s and t must be given");
  switch (to_dtype(dtype)) {
    case DType::Float32:
      return distill_cpu<F32, float>(kind, reduction, B, K, static_cast<float>(param), s, t, pos, mask,
                                     ptr<float>(loss), ptr<float>(grad), ptr<float>(scale));
    case DType::Float16:
      return distill_cpu<F16, float>(kind, reduction, B, K, static_cast<float>(param), s, t, pos, mask,
                                     ptr<float>(loss), ptr<float>(grad), ptr<float>(scale));
    case DType::BFloat16:
      return distill_cpu<BF16, float>(kind, reduction, B, K, static_cast<float>(param), s, t, pos, mask,
                                      ptr<float>(loss), ptr<float>(grad), ptr<float>(scale));
    case DType::Float64:
      // float64 stays float64 end to end so that gradcheck can test the kernel itself.
      return distill_cpu<F64, double>(kind, reduction, B, K, param, s, t, pos, mask, ptr<double>(loss),
                                      ptr<double>(grad), ptr<double>(scale));
  }
}

void inbatch_ce_forward_cpu(int reduction, int64_t B, int64_t M, int dtype, double tau, View x,
                            std::uintptr_t target, int64_t target_stride, bool target_is_int64, std::uintptr_t loss,
                            std::uintptr_t grad, std::uintptr_t scale) {
  check_common(reduction, B, M, "scores");
  switch (to_dtype(dtype)) {
    case DType::Float32:
      return inbatch_ce_cpu<F32, float>(reduction, B, M, static_cast<float>(tau), x, target, target_stride,
                                        target_is_int64, ptr<float>(loss), ptr<float>(grad), ptr<float>(scale));
    case DType::Float16:
      return inbatch_ce_cpu<F16, float>(reduction, B, M, static_cast<float>(tau), x, target, target_stride,
                                        target_is_int64, ptr<float>(loss), ptr<float>(grad), ptr<float>(scale));
    case DType::BFloat16:
      return inbatch_ce_cpu<BF16, float>(reduction, B, M, static_cast<float>(tau), x, target, target_stride,
                                         target_is_int64, ptr<float>(loss), ptr<float>(grad), ptr<float>(scale));
    case DType::Float64:
      return inbatch_ce_cpu<F64, double>(reduction, B, M, tau, x, target, target_stride, target_is_int64,
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
         std::uintptr_t grad, std::uintptr_t scale) {
        py::gil_scoped_release release;
        distill_forward_cpu(kind, reduction, B, K, dtype, param, {s, s_sb, s_sk}, {t, t_sb, t_sk},
                            {pos, pos_sb, pos_sk}, {mask, mask_sb, mask_sk}, loss, grad, scale);
      },
      "Distillation loss over (B, K) CPU scores: writes the reduced loss, dL/ds (B, K, contiguous) and the "
      "backward scale. pos / mask pointers may be 0 (column 0 positive / all valid).",
      py::arg("kind"), py::arg("reduction"), py::arg("B"), py::arg("K"), py::arg("dtype"), py::arg("param"),
      py::arg("s"), py::arg("s_sb"), py::arg("s_sk"), py::arg("t"), py::arg("t_sb"), py::arg("t_sk"),
      py::arg("pos"), py::arg("pos_sb"), py::arg("pos_sk"), py::arg("mask"), py::arg("mask_sb"),
      py::arg("mask_sk"), py::arg("loss"), py::arg("grad"), py::arg("scale"));
  m.def(
      "inbatch_ce_forward",
      [](int reduction, int64_t B, int64_t M, int dtype, double tau, std::uintptr_t x, int64_t x_sb, int64_t x_sk,
         std::uintptr_t target, int64_t target_stride, bool target_is_int64, std::uintptr_t loss,
         std::uintptr_t grad, std::uintptr_t scale) {
        py::gil_scoped_release release;
        inbatch_ce_forward_cpu(reduction, B, M, dtype, tau, {x, x_sb, x_sk}, target, target_stride,
                               target_is_int64, loss, grad, scale);
      },
      "One-hot softmax cross-entropy over (B, M) CPU scores; negative targets ignore their row.",
      py::arg("reduction"), py::arg("B"), py::arg("M"), py::arg("dtype"), py::arg("tau"), py::arg("x"),
      py::arg("x_sb"), py::arg("x_sk"), py::arg("target"), py::arg("target_stride"), py::arg("target_is_int64"),
      py::arg("loss"), py::arg("grad"), py::arg("scale"));
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
      "CUDA version of distill_forward; workspace: zeroed int32[4] + float[B] (see losses_cuda.h).",
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
      "CUDA version of inbatch_ce_forward.", py::arg("reduction"), py::arg("B"), py::arg("M"), py::arg("dtype"),
      py::arg("tau"), py::arg("x"), py::arg("x_sb"), py::arg("x_sk"), py::arg("target"), py::arg("target_stride"),
      py::arg("target_is_int64"), py::arg("loss"), py::arg("grad"), py::arg("scale"), py::arg("workspace"),
      py::arg("stream"));
#endif
}

}  // namespace

FASTRANK_REGISTER(register_losses);

}  // namespace fastrank
