// Fused LITE on the CPU: argument checks and the choice of instruction-set path. Compiled for the baseline
// target; the kernel lives in isa/lite_<isa>.cpp (one source, csrc/cpu/lite_kernels.inc, compiled once per
// ISA). Python packs the scorer's weights (fastrank/ops/lite_cpu.py) and names the path for each call; every
// tensor, the packed weights included, is checked here on every call.
#include <algorithm>
#include <string>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "cpu/cpu_isa.h"
#include "cpu/lite_cpu.h"
#include "maxsim_boundary.h"
#include "tensor_arg.h"

FASTRANK_DECLARE_LITE_ISA(isa_scalar)
#ifdef FASTRANK_ISA_AVX2
FASTRANK_DECLARE_LITE_ISA(isa_avx2)
#endif
#ifdef FASTRANK_ISA_AVX512
FASTRANK_DECLARE_LITE_ISA(isa_avx512)
#endif
#ifdef FASTRANK_ISA_AVX512BF16
FASTRANK_DECLARE_LITE_ISA(isa_avx512bf16)
#endif
#ifdef FASTRANK_ISA_AMX
FASTRANK_DECLARE_LITE_ISA(isa_amx)
#endif

namespace fastrank {
namespace {

namespace py = pybind11;
using cpu::Isa;
using cpu::LiteWeights;
using cpu::MaxSimProblem;

using cpu::LiteBackward;
using cpu::LiteSaved;
using ForwardFn = void (*)(const MaxSimProblem&, int, const void*, const void*, const LiteWeights&, float*,
                           const LiteSaved*);
using BackwardFn = void (*)(const MaxSimProblem&, int, const void*, const void*, const LiteWeights&, const LiteSaved&,
                            const LiteBackward&);
struct Kernels { ForwardFn forward; BackwardFn backward; };

constexpr const char* kWhere = "lite (cpp)";

Kernels kernel_for(const std::string& name) {
  switch (cpu::runnable_isa(name, kWhere)) {
    case Isa::Scalar: return {isa_scalar::lite_forward, isa_scalar::lite_backward};
#ifdef FASTRANK_ISA_AVX2
    case Isa::Avx2: return {isa_avx2::lite_forward, isa_avx2::lite_backward};
#endif
#ifdef FASTRANK_ISA_AVX512
    case Isa::Avx512: return {isa_avx512::lite_forward, isa_avx512::lite_backward};
#endif
#ifdef FASTRANK_ISA_AVX512BF16
    case Isa::Avx512Bf16: return {isa_avx512bf16::lite_forward, isa_avx512bf16::lite_backward};
#endif
#ifdef FASTRANK_ISA_AMX
    case Isa::Amx: return {isa_amx::lite_forward, isa_amx::lite_backward};
#endif
    default: break;
  }
  // A path that runs here always has its unit in this build (cpu_isa.cpp marks the others unusable).
  FASTRANK_CHECK(false, kWhere << ": this build has no kernel for the CPU ISA path '" << name << "'");
  return {nullptr, nullptr};
}

int64_t padded(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The packed weights, in LiteWeights' order, each float32, contiguous, on the CPU and of exactly its shape:
// a wrong one would be read out of bounds by the kernel.
LiteWeights read_weights(py::sequence weights, int64_t lq, int64_t ld, int64_t r1, int64_t c, py::sequence eps,
                         double bo, std::vector<TensorArg>& keep) {
  for (auto [name, v] : {std::pair<const char*, int64_t>{"lq", lq}, {"ld", ld}, {"r1", r1}, {"c", c}})
    FASTRANK_CHECK(v >= 1 && v <= (int64_t{1} << 20), kWhere << ": the scorer's " << name << " must be 1 to 2^20, got " << v);
  const int64_t P = cpu::kLitePanel, B = cpu::kLiteRowBlock;
  const int64_t R1p = padded(r1, P), ldp = padded(ld, P), Cp = padded(c, P), lqp = padded(lq, P);
  struct Spec { const char* name; std::vector<int64_t> shape; };
  const Spec specs[] = {
      {"w1p", {R1p / B, ld, B}}, {"b1", {R1p}}, {"w2p", {ldp / P, R1p, P}}, {"u2", {ldp}}, {"c2", {ldp}},
      {"g2", {ld}}, {"be2", {ld}}, {"v1p", {Cp / B, lq, B}}, {"cb1", {Cp}}, {"g3", {Cp}}, {"be3", {Cp}},
      {"v2p", {lqp / P, Cp, P}}, {"cb2", {lqp}}, {"g4", {lq}}, {"be4", {lq}}, {"wo", {lq * ld}},
  };
  constexpr size_t kCount = sizeof(specs) / sizeof(specs[0]);
  FASTRANK_CHECK(py::len(weights) == kCount, kWhere << ": expected " << kCount << " packed weight tensors, got "
                                                    << py::len(weights));
  FASTRANK_CHECK(py::len(eps) == 4, kWhere << ": expected 4 LayerNorm epsilons, got " << py::len(eps));
  const float* ptr[kCount];
  for (size_t i = 0; i < kCount; ++i) {
    keep.push_back(tensor_arg(weights[i], specs[i].name, kWhere));
    const TensorArg& t = keep.back();
    check_elem(t, Elem::Float32, kWhere);
    check_shape(t, specs[i].shape, kWhere);
    check_contiguous(t, kWhere);
    check_device(t, false, kWhere);
    ptr[i] = t.data<float>();
  }
  LiteWeights w;
  w.lq = lq; w.ld = ld; w.r1 = r1; w.c = c;
  for (int i = 0; i < 4; ++i) {
    const double e = eps[i].cast<double>();
    FASTRANK_CHECK(e >= 0.0 && e < 1e30, kWhere << ": LayerNorm eps must be finite and >= 0, got " << e);
    w.eps[i] = static_cast<float>(e);
  }
  w.w1p = ptr[0]; w.b1 = ptr[1]; w.w2p = ptr[2]; w.u2 = ptr[3]; w.c2 = ptr[4]; w.g2 = ptr[5]; w.be2 = ptr[6];
  w.v1p = ptr[7]; w.cb1 = ptr[8]; w.g3 = ptr[9]; w.be3 = ptr[10]; w.v2p = ptr[11]; w.cb2 = ptr[12];
  w.g4 = ptr[13]; w.be4 = ptr[14]; w.wo = ptr[15];
  w.bo = static_cast<float>(bo);
  w.w1b = nullptr; w.w2b = nullptr; w.u2b = nullptr; w.v1b = nullptr; w.v2b = nullptr;
  w.w1t = nullptr; w.w2t = nullptr; w.v1t = nullptr; w.v2t = nullptr;
  return w;
}

// Both MLPs' bfloat16 weights (int32 bit patterns; u2b float32), or None: for the amx path as whole tiles
// (w1t, w2t, u2b, v1t, v2t), for the others as vdpbf16ps pairs (w1b, w2b, u2b, v1b, v2b).
void read_bf16_weights(py::handle obj, bool tiles, LiteWeights& w, std::vector<TensorArg>& keep) {
  if (obj.is_none()) return;
  const py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
  const int64_t P = cpu::kLitePanel, B = cpu::kLiteRowBlock, T = 16;
  const int64_t R1p = padded(w.r1, P), ldp = padded(w.ld, P), Cp = padded(w.c, P), lqp = padded(w.lq, P);
  const char* pair_names[5] = {"w1b", "w2b", "u2b", "v1b", "v2b"};
  const char* tile_names[5] = {"w1t", "w2t", "u2b", "v1t", "v2t"};
  const char* const* names = tiles ? tile_names : pair_names;
  FASTRANK_CHECK(py::len(seq) == 5, kWhere << ": expected 5 bfloat16 weight tensors (" << names[0] << ", " << names[1]
                                           << ", u2b, " << names[3] << ", " << names[4] << ") or None, got "
                                           << py::len(seq));
  const std::vector<int64_t> pair_shapes[5] = {{R1p / B, (w.ld + 1) / 2, B}, {ldp / P, R1p / 2, P}, {ldp},
                                               {Cp / B, (w.lq + 1) / 2, B}, {lqp / P, Cp / 2, P}};
  const std::vector<int64_t> tile_shapes[5] = {{R1p / T, ldp / 2, T}, {ldp / T, R1p / 2, T}, {ldp},
                                               {Cp / T, lqp / 2, T}, {lqp / T, Cp / 2, T}};
  const Elem elems[5] = {Elem::Int32, Elem::Int32, Elem::Float32, Elem::Int32, Elem::Int32};
  for (int i = 0; i < 5; ++i) {
    keep.push_back(tensor_arg(seq[i], names[i], kWhere));
    const TensorArg& t = keep.back();
    check_elem(t, elems[i], kWhere);
    check_shape(t, tiles ? tile_shapes[i] : pair_shapes[i], kWhere);
    check_contiguous(t, kWhere);
    check_device(t, false, kWhere);
  }
  const size_t n = keep.size();
  const uint32_t* a = keep[n - 5].data<uint32_t>();
  const uint32_t* b = keep[n - 4].data<uint32_t>();
  const uint32_t* c = keep[n - 2].data<uint32_t>();
  const uint32_t* e = keep[n - 1].data<uint32_t>();
  w.u2b = keep[n - 3].data<float>();
  if (tiles) { w.w1t = a; w.w2t = b; w.v1t = c; w.v2t = e; }
  else { w.w1b = a; w.w2b = b; w.v1b = c; w.v2b = e; }
}

// Float32 tensors of exactly these shapes, contiguous, on the CPU (outputs and the saved activations).
std::vector<const TensorArg*> read_float_tensors(py::handle obj, std::initializer_list<const char*> names,
                                                 const std::vector<std::vector<int64_t>>& shapes,
                                                 std::vector<TensorArg>& keep) {
  const py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
  FASTRANK_CHECK(py::len(seq) == names.size(), kWhere << ": expected " << names.size() << " tensors ("
                                                      << *names.begin() << ", ...), got " << py::len(seq));
  std::vector<const TensorArg*> out;
  size_t i = 0;
  for (const char* name : names) {
    keep.push_back(tensor_arg(seq[i], name, kWhere));
    const TensorArg& t = keep.back();
    check_output(t, Elem::Float32, shapes[i], kWhere);
    check_device(t, false, kWhere);
    ++i;
  }
  for (size_t j = keep.size() - names.size(); j < keep.size(); ++j) out.push_back(&keep[j]);
  return out;
}

struct Call {
  PaddedArgs a;
  LiteWeights w;
  LiteSaved saved{nullptr, nullptr, nullptr};
  int64_t pairs;
};

Call read_call(const std::string& isa, py::handle q, py::handle d, py::handle q_mask, py::handle d_mask, py::sequence weights,
               py::handle bf16_weights, int64_t lq, int64_t ld, int64_t r1, int64_t c, py::sequence eps, double bo,
               py::handle saved, int threads, std::vector<TensorArg>& keep) {
  keep.reserve(48);  // no reallocation: the pointers read below stay valid
  Call call{padded_problem(q, d, q_mask, d_mask, threads, false, kWhere), LiteWeights{}, {}, 0};
  const MaxSimProblem& p = call.a.p;
  call.w = read_weights(weights, lq, ld, r1, c, eps, bo, keep);
  read_bf16_weights(bf16_weights, isa == "amx", call.w, keep);
  FASTRANK_CHECK(p.Lq <= lq, kWhere << ": q has " << p.Lq << " tokens but the scorer takes at most lq=" << lq);
  FASTRANK_CHECK(p.Ld <= ld, kWhere << ": d has " << p.Ld << " tokens but the scorer takes at most ld=" << ld);
  call.pairs = p.F * p.Y * p.X;
  if (!saved.is_none()) {
    const int64_t P = cpu::kLitePanel;
    const auto t = read_float_tensors(saved, {"h1", "st1", "a2"},
                                      {{call.pairs, lq, padded(r1, P)}, {call.pairs, lq, 2}, {call.pairs, lq, padded(ld, P)}},
                                      keep);
    call.saved = {t[0]->mutable_data<float>(), t[1]->mutable_data<float>(), t[2]->mutable_data<float>()};
  }
  return call;
}

void lite_forward(const std::string& isa, py::handle q, py::handle d, py::handle q_mask, py::handle d_mask,
                  py::sequence weights, py::handle bf16_weights, int64_t lq, int64_t ld, int64_t r1, int64_t c,
                  py::sequence eps, double bo, py::handle out_obj, py::handle saved, int threads) {
  std::vector<TensorArg> keep;
  const Call call = read_call(isa, q, d, q_mask, d_mask, weights, bf16_weights, lq, ld, r1, c, eps, bo, saved, threads, keep);
  const MaxSimProblem& p = call.a.p;
  const TensorArg out = tensor_arg(out_obj, "out", kWhere);
  check_output(out, Elem::Float32, {p.F, p.Y, p.X}, kWhere);
  check_device(out, false, kWhere);
  const Kernels k = kernel_for(isa);
  if (out.numel() == 0) return;
  py::gil_scoped_release nogil;
  k.forward(p, call.a.dtype, call.a.q, call.a.d, call.w, out.mutable_data<float>(),
            saved.is_none() ? nullptr : &call.saved);
}

void lite_backward(const std::string& isa, py::handle q, py::handle d, py::handle q_mask, py::handle d_mask,
                   py::sequence weights, int64_t lq, int64_t ld, int64_t r1, int64_t c, py::sequence eps, double bo,
                   py::handle saved, py::handle raw, py::handle grad_obj, py::handle ds_obj, py::handle grads_obj,
                   int threads) {
  FASTRANK_CHECK(!saved.is_none(), kWhere << ": the backward needs the saved activations (h1, st1, a2)");
  std::vector<TensorArg> keep;
  const Call call = read_call(isa, q, d, q_mask, d_mask, weights, py::none(), lq, ld, r1, c, eps, bo, saved, threads, keep);
  const MaxSimProblem& p = call.a.p;
  const int64_t P = cpu::kLitePanel;
  const int64_t R1p = padded(r1, P), ldp = padded(ld, P), Cp = padded(c, P), lqp = padded(lq, P);
  const auto w = read_float_tensors(raw, {"w1r", "w2r", "v1r", "v2r", "g1", "be1"},
                                    {{R1p, ldp}, {ldp, R1p}, {Cp, lqp}, {lqp, Cp}, {R1p}, {R1p}}, keep);
  const int64_t nf = R1p * ldp + 3 * R1p + ldp * R1p + 3 * ldp + Cp * lqp + 3 * Cp + lqp * Cp + 3 * lqp + lq * ld + 1;
  const auto o = read_float_tensors(py::make_tuple(grad_obj, grads_obj), {"grad", "grads"}, {{call.pairs}, {nf}}, keep);
  float* ds = nullptr;
  if (!ds_obj.is_none()) ds = read_float_tensors(py::make_tuple(ds_obj), {"ds"}, {{call.pairs, lq, ld}}, keep)[0]->mutable_data<float>();
  const Kernels k = kernel_for(isa);
  LiteBackward b{w[0]->data<float>(), w[1]->data<float>(), w[2]->data<float>(), w[3]->data<float>(),
                 w[4]->data<float>(), w[5]->data<float>(), o[0]->data<float>(), ds, o[1]->mutable_data<float>()};
  if (call.pairs == 0) {
    std::fill(b.grads, b.grads + nf, 0.0f);
    return;
  }
  py::gil_scoped_release nogil;
  k.backward(p, call.a.dtype, call.a.q, call.a.d, call.w, call.saved, b);
}

void register_lite(py::module_& m) {
  using py::arg;
  m.def("lite_forward", &lite_forward,
        "Fused separable LITE forward on CPU with the named ISA path: q (F,Y,Lq,H) and d (F,X,Ld,H) of one float "
        "dtype (last dim stride 1), masks bool (F,Y,X,Lq) / (F,Y,X,Ld) or None, Lq <= lq and Ld <= ld; weights: the "
        "16 packed float32 tensors of fastrank/ops/lite_cpu.py (shapes checked); bf16_weights: both MLPs' bfloat16 "
        "pairs (w1b, w2b, u2b, v1b, v2b: int32 but u2b float32), which bfloat16 inputs use on a path with AVX512-BF16, "
        "on the amx path whole AMX tiles (w1t, w2t, u2b, v1t, v2t, lite_cpu.h), or None; "
        "eps: the 4 LayerNorm epsilons; "
        "bo: the output bias; out float32 (F,Y,X), contiguous; saved: None (inference) or (h1, st1, a2) float32 "
        "(see lite_backward), written for the backward (the forward then runs float32).",
        arg("isa"), arg("q"), arg("d"), arg("q_mask"), arg("d_mask"), arg("weights"), arg("bf16_weights"), arg("lq"), arg("ld"), arg("r1"),
        arg("c"), arg("eps"), arg("bo"), arg("out"), arg("saved"), arg("threads"));
  m.def("lite_backward", &lite_backward,
        "Fused separable LITE backward on CPU (float32): the call's forward arguments, the activations its training "
        "forward saved (h1 (P,lq,R1p), st1 (P,lq,2), a2 (P,lq,ldp)), the padded unpacked weights (w1r (R1p,ldp), "
        "w2r (ldp,R1p), v1r (Cp,lqp), v2r (lqp,Cp), g1, be1 (R1p)), grad float32 (P,); writes ds (P,lq,ld) (None: "
        "q and d need no gradient, and dS is not formed) and grads, every "
        "parameter's gradient in one float32 block (lite_cpu.h). Every tensor is checked.",
        arg("isa"), arg("q"), arg("d"), arg("q_mask"), arg("d_mask"), arg("weights"), arg("lq"), arg("ld"), arg("r1"),
        arg("c"), arg("eps"), arg("bo"), arg("saved"), arg("raw"), arg("grad"), arg("ds"), arg("grads"), arg("threads"));
}

}  // namespace

FASTRANK_REGISTER(register_lite);

}  // namespace fastrank
