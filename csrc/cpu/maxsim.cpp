// MaxSim on the CPU: argument checks and the choice of instruction-set path. Compiled for the baseline
// target; the kernels live in isa/maxsim_<isa>.cpp (one source, csrc/cpu/maxsim_kernels.inc, compiled
// once per ISA with its own flags). Python names the path for each call (fastrank/cpu_isa.py decides
// which: the best this CPU supports, or FASTRANK_CPU_ISA); an unsupported one is refused here too.
#include <functional>
#include <string>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "cpu/cpu_isa.h"
#include "cpu/maxsim_cpu.h"
#include "maxsim_boundary.h"
#include "tensor_arg.h"

FASTRANK_DECLARE_MAXSIM_ISA(isa_scalar)
#ifdef FASTRANK_ISA_AVX2
FASTRANK_DECLARE_MAXSIM_ISA(isa_avx2)
#endif
#ifdef FASTRANK_ISA_AVX512
FASTRANK_DECLARE_MAXSIM_ISA(isa_avx512)
#endif
#ifdef FASTRANK_ISA_AVX512BF16
FASTRANK_DECLARE_MAXSIM_ISA(isa_avx512bf16)
#endif
#ifdef FASTRANK_ISA_AMX
FASTRANK_DECLARE_MAXSIM_ISA(isa_amx)
#endif

namespace fastrank {
namespace {

namespace py = pybind11;
using cpu::Isa;
using cpu::MaxSimProblem;

using ForwardFn = void (*)(const MaxSimProblem&, int, const void*, const void*, float*, int32_t*);
using BackwardFn = void (*)(const MaxSimProblem&, int, const void*, const void*, const float*, const int32_t*, float*,
                            float*);
struct Kernels { ForwardFn forward; BackwardFn backward; };

Kernels kernels_for(const std::string& name) {
  switch (cpu::runnable_isa(name, "maxsim (cpp)")) {
    case Isa::Scalar: return {isa_scalar::maxsim_forward, isa_scalar::maxsim_backward};
#ifdef FASTRANK_ISA_AVX2
    case Isa::Avx2: return {isa_avx2::maxsim_forward, isa_avx2::maxsim_backward};
#endif
#ifdef FASTRANK_ISA_AVX512
    case Isa::Avx512: return {isa_avx512::maxsim_forward, isa_avx512::maxsim_backward};
#endif
#ifdef FASTRANK_ISA_AVX512BF16
    case Isa::Avx512Bf16: return {isa_avx512bf16::maxsim_forward, isa_avx512bf16::maxsim_backward};
#endif
#ifdef FASTRANK_ISA_AMX
    case Isa::Amx: return {isa_amx::maxsim_forward, isa_amx::maxsim_backward};
#endif
    default: break;
  }
  // A path that runs here always has its unit in this build (cpu_isa.cpp marks the others unusable).
  FASTRANK_CHECK(false, "maxsim (cpp)" << ": this build has no kernel for the CPU ISA path '" << name << "'");
  return {nullptr, nullptr};
}

constexpr const char* kPadded = "maxsim (cpp)";
constexpr const char* kPacked = "maxsim_packed (cpp)";

void maxsim_forward(const std::string& isa, py::handle q, py::handle d, py::handle q_mask, py::handle d_mask,
                    py::handle out_obj, py::handle argmax_obj, int threads) {
  const PaddedArgs a = padded_problem(q, d, q_mask, d_mask, threads, false, kPadded);
  const MaxSimProblem& p = a.p;
  const TensorArg out = tensor_arg(out_obj, "out", kPadded);
  const TensorArg arg = tensor_arg(argmax_obj, "argmax", kPadded, true);
  check_output(out, Elem::Float32, {p.F, p.Y, p.X}, kPadded);
  check_device(out, false, kPadded);
  if (arg.present) {
    check_output(arg, Elem::Int32, {p.F, p.Y, p.X, p.Lq}, kPadded);
    check_device(arg, false, kPadded);
  }
  const Kernels k = kernels_for(isa);
  if (out.numel() == 0) return;
  py::gil_scoped_release nogil;
  k.forward(p, a.dtype, a.q, a.d, out.mutable_data<float>(), arg.present ? arg.mutable_data<int32_t>() : nullptr);
}

void maxsim_backward(const std::string& isa, py::handle q, py::handle d, py::handle grad_obj, py::handle argmax_obj,
                     py::handle dq_obj, py::handle dd_obj, int threads) {
  const PaddedArgs a = padded_problem(q, d, py::none(), py::none(), threads, false, kPadded);
  const MaxSimProblem& p = a.p;
  const TensorArg grad = tensor_arg(grad_obj, "grad", kPadded), arg = tensor_arg(argmax_obj, "argmax", kPadded);
  const TensorArg dq = tensor_arg(dq_obj, "dq", kPadded, true), dd = tensor_arg(dd_obj, "dd", kPadded, true);
  check_elem(grad, Elem::Float32, kPadded);
  check_shape(grad, {p.F, p.Y, p.X}, kPadded);
  check_contiguous(grad, kPadded);
  check_output(arg, Elem::Int32, {p.F, p.Y, p.X, p.Lq}, kPadded);
  if (dq.present) check_output(dq, Elem::Float32, {p.F, p.Y, p.Lq, p.H}, kPadded);
  if (dd.present) check_output(dd, Elem::Float32, {p.F, p.X, p.Ld, p.H}, kPadded);
  for (const TensorArg* t : {&grad, &arg, &dq, &dd}) check_device(*t, false, kPadded);
  const Kernels k = kernels_for(isa);
  if (grad.numel() == 0 || (!dq.present && !dd.present)) return;
  check_argmax_rows(arg.data<int32_t>(), grad.numel(), p.Lq, [&](int64_t) { return p.Ld; }, kPadded);
  py::gil_scoped_release nogil;
  k.backward(p, a.dtype, a.q, a.d, grad.data<float>(), arg.data<int32_t>(), dq.present ? dq.mutable_data<float>() : nullptr,
             dd.present ? dd.mutable_data<float>() : nullptr);
}

// ---- packed documents: q (Fq, Lq, H), Fq = 1 (one query for every document) or one per scored document,
// against tokens (T, H) where document i owns rows offsets[i] .. offsets[i + 1] ---------------------------

struct PackedArgs {
  MaxSimProblem p;
  int dtype;  // q's float element code, or Elem::Int8's for int8 tokens with scales
  int64_t scored;
  std::uintptr_t q, tokens;
  std::vector<int64_t> q_size, tokens_size;
};

PackedArgs packed_problem(py::handle q_obj, py::handle tokens_obj, py::handle offsets_obj, py::handle docs_obj,
                          py::handle scales_obj, py::handle qm_obj, int threads) {
  const TensorArg q = tensor_arg(q_obj, "q", kPacked), tok = tensor_arg(tokens_obj, "tokens", kPacked);
  const TensorArg off = tensor_arg(offsets_obj, "offsets", kPacked);
  const TensorArg docs = tensor_arg(docs_obj, "docs", kPacked, true);
  const TensorArg scales = tensor_arg(scales_obj, "scales", kPacked, true);
  const TensorArg qm = tensor_arg(qm_obj, "q_mask", kPacked, true);
  for (const TensorArg* t : {&q, &tok, &off, &docs, &scales, &qm}) check_device(*t, false, kPacked);
  FASTRANK_CHECK(q.dim() == 3, kPacked << ": q must have shape (1 or N, Lq, H), got " << q.shape_text());
  FASTRANK_CHECK(tok.dim() == 2, kPacked << ": tokens must have shape (T, H), got " << tok.shape_text());
  const int64_t Fq = q.size[0], Lq = q.size[1], H = q.size[2], T = tok.size[0];
  check_shape(tok, {-1, H}, kPacked);
  check_query_length(Lq, kPacked);
  FASTRANK_CHECK(H >= 1, kPacked << ": H must be >= 1");
  int dtype;
  if (scales.present) {
    check_elem(q, Elem::Float32, kPacked);
    check_elem(tok, Elem::Int8, kPacked);
    check_elem(scales, Elem::Float32, kPacked);
    check_shape(scales, {T}, kPacked);
    check_contiguous(scales, kPacked);
    dtype = static_cast<int>(Elem::Int8);
  } else {
    check_float_elem(q, kPacked);
    check_elem(tok, static_cast<Elem>(q.elem), kPacked);
    dtype = q.elem;
  }
  check_inner_contiguous(q, kPacked);
  check_inner_contiguous(tok, kPacked);
  check_offsets(off, T, kPacked);
  const int64_t n = off.size[0] - 1;
  int64_t scored = n;
  if (docs.present) {
    check_docs(docs, n, kPacked);
    scored = docs.size[0];
  }
  FASTRANK_CHECK(Fq == 1 || Fq == scored, kPacked << ": q must hold one query, or one per scored document ("
                                                   << scored << "), got " << Fq);
  MaxSimProblem p;
  const bool shared = Fq == 1;
  p.F = shared ? 1 : scored; p.Y = 1; p.X = shared ? scored : 1; p.Lq = Lq; p.Ld = 1; p.H = H;
  p.qs = {shared ? 0 : q.stride[0], 0, q.stride[1]};
  p.ds = {0, 0, tok.stride[0]};
  p.qm = nullptr; p.qms = {0, 0, 0, 0};
  p.dm = nullptr; p.dms = {0, 0, 0, 0};
  if (qm.present) {
    check_mask_elem(qm, kPacked);
    check_shape(qm, {Fq, Lq}, kPacked);
    p.qm = qm.data<uint8_t>();
    p.qms = {shared ? 0 : qm.stride[0], 0, 0, qm.stride[1]};
  }
  check_threads(threads, kPacked);
  p.threads = threads;
  p.offsets = off.data<int64_t>();
  p.docs = docs.present ? docs.data<int64_t>() : nullptr;
  p.scales = scales.present ? scales.data<float>() : nullptr;
  return {p, dtype, scored, q.ptr, tok.ptr, q.size, tok.size};
}

void maxsim_packed_forward(const std::string& isa, py::handle q, py::handle tokens, py::handle offsets, py::handle docs,
                           py::handle scales, py::handle q_mask, py::handle out_obj, py::handle argmax_obj, int threads,
                           bool exact_int8) {
  PackedArgs a = packed_problem(q, tokens, offsets, docs, scales, q_mask, threads);
  const TensorArg out = tensor_arg(out_obj, "out", kPacked);
  const TensorArg arg = tensor_arg(argmax_obj, "argmax", kPacked, true);
  check_output(out, Elem::Float32, {a.scored}, kPacked);
  check_device(out, false, kPacked);
  if (arg.present) {
    FASTRANK_CHECK(a.dtype != static_cast<int>(Elem::Int8), kPacked << ": int8 tokens are scored forward only (no argmax)");
    check_output(arg, Elem::Int32, {a.scored, a.p.Lq}, kPacked);
    check_device(arg, false, kPacked);
  }
  const Kernels k = kernels_for(isa);
  if (a.scored == 0 || a.p.H == 0) return;
  a.p.exact_int8 = exact_int8;
  py::gil_scoped_release nogil;
  k.forward(a.p, a.dtype, reinterpret_cast<const void*>(a.q), reinterpret_cast<const void*>(a.tokens),
            out.mutable_data<float>(), arg.present ? arg.mutable_data<int32_t>() : nullptr);
}

void maxsim_packed_backward(const std::string& isa, py::handle q, py::handle tokens, py::handle offsets,
                            py::handle grad_obj, py::handle argmax_obj, py::handle dq_obj, py::handle dt_obj, int threads) {
  const PackedArgs a = packed_problem(q, tokens, offsets, py::none(), py::none(), py::none(), threads);
  const TensorArg grad = tensor_arg(grad_obj, "grad", kPacked), arg = tensor_arg(argmax_obj, "argmax", kPacked);
  const TensorArg dq = tensor_arg(dq_obj, "dq", kPacked, true), dt = tensor_arg(dt_obj, "dtokens", kPacked, true);
  check_elem(grad, Elem::Float32, kPacked);
  check_shape(grad, {a.scored}, kPacked);
  check_contiguous(grad, kPacked);
  check_output(arg, Elem::Int32, {a.scored, a.p.Lq}, kPacked);
  if (dq.present) check_output(dq, Elem::Float32, a.q_size, kPacked);
  if (dt.present) check_output(dt, Elem::Float32, a.tokens_size, kPacked);
  for (const TensorArg* t : {&grad, &arg, &dq, &dt}) check_device(*t, false, kPacked);
  const Kernels k = kernels_for(isa);
  if (a.scored == 0 || (!dq.present && !dt.present)) return;
  const int64_t* o = a.p.offsets;
  check_argmax_rows(arg.data<int32_t>(), a.scored, a.p.Lq, [&](int64_t i) { return o[i + 1] - o[i]; }, kPacked);
  py::gil_scoped_release nogil;
  k.backward(a.p, a.dtype, reinterpret_cast<const void*>(a.q), reinterpret_cast<const void*>(a.tokens),
             grad.data<float>(), arg.data<int32_t>(), dq.present ? dq.mutable_data<float>() : nullptr,
             dt.present ? dt.mutable_data<float>() : nullptr);
}

void register_maxsim(py::module_& m) {
  using py::arg;
  m.def("maxsim_forward", &maxsim_forward,
        "MaxSim forward on CPU with the named ISA path: q (F,Y,Lq,H) and d (F,X,Ld,H) tensors of one float dtype "
        "(last dim stride 1, other strides free), masks bool (F,Y,X,Lq) / (F,Y,X,Ld) or None; out float32 (F,Y,X) "
        "and argmax int32 (F,Y,X,Lq) or None (inference), contiguous. Every tensor is checked here.",
        arg("isa"), arg("q"), arg("d"), arg("q_mask"), arg("d_mask"), arg("out"), arg("argmax"), arg("threads"));
  m.def("maxsim_backward", &maxsim_backward,
        "MaxSim backward on CPU through the saved argmax (each value checked to be a row of its document, or -1): "
        "grad float32 (F,Y,X); dq float32 (F,Y,Lq,H), dd float32 (F,X,Ld,H), either None.",
        arg("isa"), arg("q"), arg("d"), arg("grad"), arg("argmax"), arg("dq"), arg("dd"), arg("threads"));
  m.def("maxsim_packed_forward", &maxsim_packed_forward,
        "Packed MaxSim forward on CPU: q (1 or N, Lq, H), tokens (T, H) (row stride free, 0 included), offsets int64 "
        "(N+1) and docs int64 (M,) or None, both bounds-checked on every call; scales float32 (T,) with int8 "
        "tokens (q float32) or None; q_mask bool (1 or N, Lq) or None; out float32 (M or N,), argmax int32 (M or N, Lq) "
        "relative to each document's first row, or None. exact_int8=False lets a VNNI path quantize q per token.",
        arg("isa"), arg("q"), arg("tokens"), arg("offsets"), arg("docs"), arg("scales"), arg("q_mask"), arg("out"),
        arg("argmax"), arg("threads"), arg("exact_int8") = true);
  m.def("maxsim_packed_backward", &maxsim_packed_backward,
        "Packed MaxSim backward on CPU: grad float32 (N,), argmax from the forward (checked against the offsets); "
        "dq float32 of q's shape, dtokens float32 (T, H) (every row written), either None.",
        arg("isa"), arg("q"), arg("tokens"), arg("offsets"), arg("grad"), arg("argmax"), arg("dq"), arg("dtokens"),
        arg("threads"));
}

}  // namespace

FASTRANK_REGISTER(register_maxsim);

}  // namespace fastrank
