// The checks every MaxSim entry point makes on its tensors (csrc/tensor_arg.h), shared by the CPU bindings
// (cpu/maxsim.cpp) and the CUDA ones (maxsim_cuda_bindings.cpp): one description of what a padded pair
// problem is, so the two devices cannot accept different things.
#pragma once

#include <functional>

#include "common.h"
#include "cpu/maxsim_cpu.h"
#include "tensor_arg.h"

namespace fastrank {

using cpu::MaxSimProblem;

inline void check_threads(int threads, const char* where) {
  FASTRANK_CHECK(threads >= 1, where << ": threads must be >= 1, got " << threads);
}

inline void check_query_length(int64_t Lq, const char* where) {
  FASTRANK_CHECK(Lq >= 1 && Lq <= 64, where << ": q must have 1 to 64 query tokens per call (longer queries run "
                                              "in chunks), got " << Lq);
}

// ---- padded pairs: q (F, Y, Lq, H) against d (F, X, Ld, H), masks (F, Y, X, L) ---------------------------

struct PaddedArgs {
  MaxSimProblem p;
  int dtype;
  const void* q;
  const void* d;
  int device_index;  // q's (and every other tensor's) device; -1 on the CPU
};

inline PaddedArgs padded_problem(pybind11::handle q_obj, pybind11::handle d_obj, pybind11::handle qm_obj,
                                 pybind11::handle dm_obj, int threads, bool cuda, const char* where) {
  const TensorArg q = tensor_arg(q_obj, "q", where), d = tensor_arg(d_obj, "d", where);
  const TensorArg qm = tensor_arg(qm_obj, "q_mask", where, true), dm = tensor_arg(dm_obj, "d_mask", where, true);
  check_float_elem(q, where);
  check_elem(d, static_cast<Elem>(q.elem), where);
  FASTRANK_CHECK(q.dim() == 4, where << ": q must have shape (F, Y, Lq, H), got " << q.shape_text());
  MaxSimProblem p;
  p.F = q.size[0]; p.Y = q.size[1]; p.Lq = q.size[2]; p.H = q.size[3];
  check_shape(d, {p.F, -1, -1, p.H}, where);
  p.X = d.size[1]; p.Ld = d.size[2];
  check_query_length(p.Lq, where);
  FASTRANK_CHECK(p.Ld >= 1 && p.H >= 1, where << ": documents need at least one token and H >= 1, got d "
                                                << d.shape_text());
  check_inner_contiguous(q, where);
  check_inner_contiguous(d, where);
  p.qs = {q.stride[0], q.stride[1], q.stride[2]};
  p.ds = {d.stride[0], d.stride[1], d.stride[2]};
  p.qm = nullptr; p.qms = {0, 0, 0, 0};
  p.dm = nullptr; p.dms = {0, 0, 0, 0};
  if (qm.present) {
    check_mask_elem(qm, where);
    check_shape(qm, {p.F, p.Y, p.X, p.Lq}, where);
    p.qm = qm.data<uint8_t>();
    p.qms = {qm.stride[0], qm.stride[1], qm.stride[2], qm.stride[3]};
  }
  if (dm.present) {
    check_mask_elem(dm, where);
    check_shape(dm, {p.F, p.Y, p.X, p.Ld}, where);
    p.dm = dm.data<uint8_t>();
    p.dms = {dm.stride[0], dm.stride[1], dm.stride[2], dm.stride[3]};
  }
  for (const TensorArg* t : {&q, &d, &qm, &dm}) {
    check_device(*t, cuda, where);
    check_same_device(q, *t, where);
  }
  check_threads(threads, where);
  p.threads = threads;
  return {p, q.elem, q.data<void>(), d.data<void>(), q.device_index};
}

// ---- packed documents (maxsim_packed, maxsim_residual): offsets and a docs subset -----------------------

// offsets: int64 (N + 1,), 0 first, T last, non-decreasing. Read on every call (O(N), against scoring's
// O(T Lq H)): Python's cached validation cannot see writes that bypass the version counter (a shared numpy
// array, .data), and no offset read below may lie outside tokens.
inline void check_offsets(const TensorArg& off, int64_t rows, const char* where) {
  check_elem(off, Elem::Int64, where);
  FASTRANK_CHECK(off.dim() == 1 && off.size[0] >= 1,
                 where << ": offsets must have shape (N + 1,) with N >= 0, got " << off.shape_text());
  check_contiguous(off, where);
  const int64_t* o = off.data<int64_t>();
  const int64_t n = off.size[0] - 1;
  FASTRANK_CHECK(o[0] == 0, where << ": offsets[0] must be 0, got " << o[0]);
  for (int64_t i = 0; i < n; ++i)
    FASTRANK_CHECK(o[i + 1] >= o[i], where << ": offsets must be non-decreasing, got offsets[" << i << "] = " << o[i]
                                           << " > offsets[" << i + 1 << "] = " << o[i + 1]);
  FASTRANK_CHECK(o[n] == rows, where << ": offsets[-1] must equal the number of token rows (" << rows << "), got "
                                     << o[n]);
}

inline void check_docs(const TensorArg& docs, int64_t n, const char* where) {
  check_elem(docs, Elem::Int64, where);
  FASTRANK_CHECK(docs.dim() == 1, where << ": docs must be 1-D, got " << docs.shape_text());
  check_contiguous(docs, where);
  const int64_t* dp = docs.data<int64_t>();
  for (int64_t i = 0; i < docs.size[0]; ++i)
    FASTRANK_CHECK(dp[i] >= 0 && dp[i] < n, where << ": docs[" << i << "] = " << dp[i] << " does not index the " << n
                                                  << " documents of offsets (0 .. " << n - 1 << ")");
}

// Every saved argmax is a row of its pair's document, or -1 (masked query token, empty document).
inline void check_argmax_rows(const int32_t* arg, int64_t pairs, int64_t Lq,
                              const std::function<int64_t(int64_t)>& rows, const char* where) {
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t n = rows(i);
    for (int64_t l = 0; l < Lq; ++l) {
      const int32_t a = arg[i * Lq + l];
      FASTRANK_CHECK(a >= -1 && a < n, where << ": argmax[" << i << ", " << l << "] = " << a
                                             << " is not a row of its document (" << n << " rows) or -1");
    }
  }
}

}  // namespace fastrank
