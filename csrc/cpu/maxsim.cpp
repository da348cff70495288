// MaxSim on the CPU: argument checks and the choice of instruction-set path. Compiled for the baseline
// target; the kernels live in isa/maxsim_<isa>.cpp (one source, csrc/cpu/maxsim_kernels.inc, compiled
// once per ISA with its own flags). Python names the path for each call (fastrank/cpu_isa.py decides
// which: the best this CPU supports, or FASTRANK_CPU_ISA); an unsupported one is refused here too.
#include <string>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "cpu/cpu_isa.h"
#include "cpu/maxsim_cpu.h"

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

using cpu::Isa;
using cpu::MaxSimProblem;

using ForwardFn = void (*)(const MaxSimProblem&, int, const void*, const void*, float*, int32_t*);
using BackwardFn = void (*)(const MaxSimProblem&, int, const void*, const void*, const float*, const int32_t*, float*,
                            float*);
struct Kernels { ForwardFn forward; BackwardFn backward; };

Kernels kernels_for(const std::string& name) {
  const cpu::IsaSupport& s = cpu::isa_support();
  for (int i = 0; i < cpu::kIsaCount; ++i) {
    const Isa isa = static_cast<Isa>(i);
    if (name != cpu::isa_name(isa)) continue;
    if (!s.ok[i]) {
      std::string flags;
      for (const auto& f : s.flags) flags += (flags.empty() ? "" : " ") + f;
      FASTRANK_CHECK(false, "maxsim (cpp): the CPU ISA path '" << name << "' cannot run here: " << s.reason[i]
                                                                  << " (CPU flags found: " << (flags.empty() ? "none" : flags) << ")");
    }
    switch (isa) {
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
  }
  FASTRANK_CHECK(false, "maxsim (cpp): unknown CPU ISA path '" << name
                            << "' (expected one of scalar, avx2, avx512, avx512bf16, amx)");
  return {nullptr, nullptr};
}

MaxSimProblem make_problem(const std::vector<int64_t>& dims, const std::vector<int64_t>& qs, const std::vector<int64_t>& ds,
                           std::uintptr_t qm, const std::vector<int64_t>& qms, std::uintptr_t dm,
                           const std::vector<int64_t>& dms, int threads) {
  FASTRANK_CHECK(dims.size() == 6, "maxsim (cpp): dims must be (F, Y, X, Lq, Ld, H)");
  FASTRANK_CHECK(qs.size() == 3 && ds.size() == 3, "maxsim (cpp): q/d strides must be (batch, batch, token)");
  FASTRANK_CHECK(qms.size() == 4 && dms.size() == 4, "maxsim (cpp): mask strides must be (F, Y, X, token)");
  MaxSimProblem p;
  p.F = dims[0]; p.Y = dims[1]; p.X = dims[2]; p.Lq = dims[3]; p.Ld = dims[4]; p.H = dims[5];
  FASTRANK_CHECK(p.Lq >= 1 && p.Lq <= 64, "maxsim (cpp): Lq must be in [1, 64], got " << p.Lq);
  FASTRANK_CHECK(p.Ld >= 1 && p.H >= 1, "maxsim (cpp): Ld and H must be positive");
  FASTRANK_CHECK(p.F >= 0 && p.Y >= 0 && p.X >= 0, "maxsim (cpp): batch dims must be non-negative");
  FASTRANK_CHECK(threads >= 1, "maxsim (cpp): threads must be >= 1, got " << threads);
  p.qs = {qs[0], qs[1], qs[2]};
  p.ds = {ds[0], ds[1], ds[2]};
  p.qm = reinterpret_cast<const uint8_t*>(qm);
  p.qms = {qms[0], qms[1], qms[2], qms[3]};
  p.dm = reinterpret_cast<const uint8_t*>(dm);
  p.dms = {dms[0], dms[1], dms[2], dms[3]};
  p.threads = threads;
  return p;
}

int checked_dtype(int dtype) {
  const DType t = to_dtype(dtype);
  FASTRANK_CHECK(t == DType::Float32 || t == DType::Float16 || t == DType::BFloat16,
                 "maxsim (cpp): unsupported dtype " << dtype_name(t) << " (float32, float16, bfloat16)");
  return dtype;
}

void maxsim_forward(const std::string& isa, int dtype, std::uintptr_t q, std::uintptr_t d, const std::vector<int64_t>& dims,
                    const std::vector<int64_t>& qs, const std::vector<int64_t>& ds, std::uintptr_t qm,
                    const std::vector<int64_t>& qms, std::uintptr_t dm, const std::vector<int64_t>& dms,
                    std::uintptr_t out, std::uintptr_t argmax, int threads) {
  const MaxSimProblem p = make_problem(dims, qs, ds, qm, qms, dm, dms, threads);
  const Kernels k = kernels_for(isa);
  const int dt = checked_dtype(dtype);
  pybind11::gil_scoped_release nogil;
  k.forward(p, dt, reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(d), ptr<float>(out),
            argmax ? ptr<int32_t>(argmax) : nullptr);
}

void maxsim_backward(const std::string& isa, int dtype, std::uintptr_t q, std::uintptr_t d, const std::vector<int64_t>& dims,
                     const std::vector<int64_t>& qs, const std::vector<int64_t>& ds, std::uintptr_t grad,
                     std::uintptr_t argmax, std::uintptr_t dq, std::uintptr_t dd, int threads) {
  const std::vector<int64_t> none4 = {0, 0, 0, 0};
  const MaxSimProblem p = make_problem(dims, qs, ds, 0, none4, 0, none4, threads);
  const Kernels k = kernels_for(isa);
  const int dt = checked_dtype(dtype);
  pybind11::gil_scoped_release nogil;
  k.backward(p, dt, reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(d), ptr<const float>(grad),
             ptr<const int32_t>(argmax), dq ? ptr<float>(dq) : nullptr, dd ? ptr<float>(dd) : nullptr);
}

// Packed documents (fastrank.maxsim_packed): q is (F, 1, Lq, H) against documents f * X + x of d, which
// own rows offsets[doc] .. offsets[doc + 1]. dims = (F, X, Lq, H). Python has validated the offsets (int64,
// non-decreasing, 0 .. T); the kernel trusts them.
MaxSimProblem make_packed_problem(const std::vector<int64_t>& dims, const std::vector<int64_t>& qs, int64_t tok_stride,
                                  std::uintptr_t offsets, std::uintptr_t docs, std::uintptr_t qm,
                                  const std::vector<int64_t>& qms, int threads) {
  FASTRANK_CHECK(dims.size() == 4, "maxsim_packed (cpp): dims must be (F, X, Lq, H)");
  FASTRANK_CHECK(offsets != 0, "maxsim_packed (cpp): offsets is required");
  FASTRANK_CHECK(tok_stride >= dims[3], "maxsim_packed (cpp): the token stride must be >= H");
  const std::vector<int64_t> none4 = {0, 0, 0, 0};
  MaxSimProblem p = make_problem({dims[0], 1, dims[1], dims[2], 1, dims[3]}, qs, {0, 0, tok_stride}, qm, qms, 0, none4,
                                 threads);
  p.offsets = ptr<const int64_t>(offsets);
  p.docs = docs ? ptr<const int64_t>(docs) : nullptr;
  return p;
}

void maxsim_packed_forward(const std::string& isa, int dtype, std::uintptr_t q, std::uintptr_t tokens,
                           std::uintptr_t offsets, std::uintptr_t docs, std::uintptr_t scales, const std::vector<int64_t>& dims,
                           const std::vector<int64_t>& qs, int64_t tok_stride, std::uintptr_t qm,
                           const std::vector<int64_t>& qms, std::uintptr_t out, std::uintptr_t argmax, int threads,
                           bool exact_int8) {
  MaxSimProblem p = make_packed_problem(dims, qs, tok_stride, offsets, docs, qm, qms, threads);
  const Kernels k = kernels_for(isa);
  const int dt = dtype == cpu::kInt8 ? dtype : checked_dtype(dtype);
  FASTRANK_CHECK((dt == cpu::kInt8) == (scales != 0),
                 "maxsim_packed (cpp): scales go with int8 tokens (dtype code " << cpu::kInt8 << ") and only with them");
  FASTRANK_CHECK(dt != cpu::kInt8 || argmax == 0, "maxsim_packed (cpp): int8 tokens are scored forward only");
  p.scales = ptr<const float>(scales);
  p.exact_int8 = exact_int8;
  pybind11::gil_scoped_release nogil;
  k.forward(p, dt, reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(tokens), ptr<float>(out),
            argmax ? ptr<int32_t>(argmax) : nullptr);
}

void maxsim_packed_backward(const std::string& isa, int dtype, std::uintptr_t q, std::uintptr_t tokens,
                            std::uintptr_t offsets, std::uintptr_t docs, const std::vector<int64_t>& dims,
                            const std::vector<int64_t>& qs, int64_t tok_stride, std::uintptr_t grad, std::uintptr_t argmax,
                            std::uintptr_t dq, std::uintptr_t dtokens, int threads) {
  FASTRANK_CHECK(docs == 0 || dtokens == 0, "maxsim_packed (cpp): no token gradient when scoring a subset (docs)");
  const std::vector<int64_t> none4 = {0, 0, 0, 0};
  const MaxSimProblem p = make_packed_problem(dims, qs, tok_stride, offsets, docs, 0, none4, threads);
  const Kernels k = kernels_for(isa);
  const int dt = checked_dtype(dtype);
  pybind11::gil_scoped_release nogil;
  k.backward(p, dt, reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(tokens), ptr<const float>(grad),
             ptr<const int32_t>(argmax), dq ? ptr<float>(dq) : nullptr, dtokens ? ptr<float>(dtokens) : nullptr);
}

void register_maxsim(pybind11::module_& m) {
  using pybind11::arg;
  m.def("maxsim_forward", &maxsim_forward,
        "MaxSim forward on CPU with the named ISA path. dims=(F,Y,X,Lq,Ld,H); q strides (F,Y,tok), d strides "
        "(F,X,tok), last dim contiguous; masks uint8 with strides (F,Y,X,tok) or 0; out float32 (F,Y,X); argmax "
        "int32 (F,Y,X,Lq) or 0 (inference: not computed).",
        arg("isa"), arg("dtype"), arg("q"), arg("d"), arg("dims"), arg("q_strides"), arg("d_strides"), arg("q_mask"),
        arg("q_mask_strides"), arg("d_mask"), arg("d_mask_strides"), arg("out"), arg("argmax"), arg("threads"));
  m.def("maxsim_backward", &maxsim_backward,
        "MaxSim backward on CPU through the saved argmax; dq float32 (F,Y,Lq,H), dd float32 (F,X,Ld,H), either 0.",
        arg("isa"), arg("dtype"), arg("q"), arg("d"), arg("dims"), arg("q_strides"), arg("d_strides"), arg("grad"),
        arg("argmax"), arg("dq"), arg("dd"), arg("threads"));
  m.def("maxsim_packed_forward", &maxsim_packed_forward,
        "Packed MaxSim forward on CPU: dims=(F,X,Lq,H), q strides (F,Y,tok), tokens (T,H) with token stride, int64 "
        "offsets (N+1), docs int64 (F*X) indices into the N documents or 0 (all, in order), scales float32 (T) for int8 tokens (dtype code 4, q float32) or 0; q_mask uint8 with strides "
        "(F,Y,X,tok) or 0; out float32 (F*X); argmax int32 (F*X, Lq) relative to each document's first row, or 0. exact_int8=False lets a VNNI path quantize q per token.",
        arg("isa"), arg("dtype"), arg("q"), arg("tokens"), arg("offsets"), arg("docs"), arg("scales"), arg("dims"), arg("q_strides"),
        arg("tok_stride"), arg("q_mask"), arg("q_mask_strides"), arg("out"), arg("argmax"), arg("threads"),
        arg("exact_int8") = true);
  m.def("maxsim_packed_backward", &maxsim_packed_backward,
        "Packed MaxSim backward on CPU: dq float32 (F,Lq,H), dtokens float32 (T,H) (every row written), either 0.",
        arg("isa"), arg("dtype"), arg("q"), arg("tokens"), arg("offsets"), arg("docs"), arg("dims"), arg("q_strides"),
        arg("tok_stride"), arg("grad"), arg("argmax"), arg("dq"), arg("dtokens"), arg("threads"));
}

}  // namespace

FASTRANK_REGISTER(register_maxsim);

}  // namespace fastrank
