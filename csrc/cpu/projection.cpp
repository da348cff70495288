// ColBERT's token projection on the CPU (Linear, then L2 normalisation per token, real tokens only):
// argument checks and the choice of instruction-set path. Compiled for the baseline target; the kernels live
// in isa/projection_<isa>.cpp (one source, csrc/cpu/projection_kernels.inc). fastrank/ops/projection.py packs
// the weight; every tensor, the packed weight included, is checked here on every call.
#include <string>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "cpu/cpu_isa.h"
#include "cpu/maxsim_cpu.h"
#include "cpu/projection_cpu.h"
#include "tensor_arg.h"

FASTRANK_DECLARE_PROJECTION_ISA(isa_scalar)
#ifdef FASTRANK_ISA_AVX2
FASTRANK_DECLARE_PROJECTION_ISA(isa_avx2)
#endif
#ifdef FASTRANK_ISA_AVX512
FASTRANK_DECLARE_PROJECTION_ISA(isa_avx512)
#endif

namespace fastrank {
namespace {

namespace py = pybind11;
using cpu::Isa;
using cpu::ProjectionBackward;
using cpu::ProjectionProblem;

using ForwardFn = void (*)(const ProjectionProblem&, float*, float*);
using BackwardFn = void (*)(const ProjectionProblem&, const ProjectionBackward&);
struct Kernels { ForwardFn forward; BackwardFn backward; };

constexpr const char* kWhere = "project_tokens (cpp)";

Kernels kernel_for(const std::string& name) {
  switch (cpu::runnable_isa(name, kWhere)) {
    case Isa::Scalar: return {isa_scalar::projection_forward, isa_scalar::projection_backward};
#ifdef FASTRANK_ISA_AVX2
    case Isa::Avx2: return {isa_avx2::projection_forward, isa_avx2::projection_backward};
#endif
#ifdef FASTRANK_ISA_AVX512
    // float32 only: the AVX512-BF16 and AMX paths run the AVX-512 unit (both imply AVX-512, cpu_isa.cpp).
    case Isa::Avx512:
    case Isa::Avx512Bf16:
    case Isa::Amx: return {isa_avx512::projection_forward, isa_avx512::projection_backward};
#endif
    default: break;
  }
  // A path that runs here always has its unit in this build (cpu_isa.cpp marks the others unusable).
  FASTRANK_CHECK(false, kWhere << ": this build has no kernel for the CPU ISA path '" << name << "'");
  return {nullptr, nullptr};
}

int64_t padded(int64_t v) { return (v + cpu::kProjectionPanel - 1) / cpu::kProjectionPanel * cpu::kProjectionPanel; }

TensorArg float_arg(py::handle obj, const char* name, const std::vector<int64_t>& shape, bool output) {
  TensorArg t = tensor_arg(obj, name, kWhere);
  check_device(t, false, kWhere);
  if (output) {
    check_output(t, Elem::Float32, shape, kWhere);
  } else {
    check_elem(t, Elem::Float32, kWhere);
    check_shape(t, shape, kWhere);
    check_contiguous(t, kWhere);
  }
  return t;
}

// h (N, H) float32 with stride 1 in its last dim, mask (N,) bool contiguous or None, wt (Pp/32, H, 32) and
// bias (Pp) or None as fastrank/ops/projection.py packs them.
ProjectionProblem read_problem(py::handle h_obj, py::handle mask_obj, py::handle wt_obj, py::handle bias_obj, int64_t P,
                               double eps, int threads, std::vector<TensorArg>& keep) {
  keep.reserve(12);  // no reallocation: the pointers read below stay valid
  keep.push_back(tensor_arg(h_obj, "h", kWhere));
  const TensorArg& h = keep.back();
  check_device(h, false, kWhere);
  check_elem(h, Elem::Float32, kWhere);
  FASTRANK_CHECK(h.dim() == 2, kWhere << ": h must be 2-D (tokens, hidden), got shape " << h.shape_text());
  check_inner_contiguous(h, kWhere);
  FASTRANK_CHECK(h.size[1] >= 1 && h.size[1] <= (int64_t{1} << 20),
                 kWhere << ": h's hidden size must be 1 to 2^20, got " << h.size[1]);
  FASTRANK_CHECK(P >= 1 && P <= (int64_t{1} << 16), kWhere << ": the output size must be 1 to 65536, got " << P);
  FASTRANK_CHECK(eps >= 0.0 && eps < 1e30, kWhere << ": eps must be finite and >= 0, got " << eps);
  FASTRANK_CHECK(threads >= 1, kWhere << ": threads must be >= 1, got " << threads);
  ProjectionProblem p{};
  p.N = h.size[0];
  p.H = h.size[1];
  p.P = P;
  p.h = h.data<float>();
  p.h_stride = h.stride[0];
  p.eps = static_cast<float>(eps);
  p.threads = threads;
  keep.push_back(tensor_arg(mask_obj, "mask", kWhere, true));
  const TensorArg& m = keep.back();
  if (m.present) {
    check_device(m, false, kWhere);
    check_mask_elem(m, kWhere);
    check_shape(m, {p.N}, kWhere);
    check_contiguous(m, kWhere);
    p.mask = m.data<uint8_t>();
  }
  keep.push_back(float_arg(wt_obj, "wt", {padded(P) / cpu::kProjectionPanel, p.H, cpu::kProjectionPanel}, false));
  p.wt = keep.back().data<float>();
  keep.push_back(tensor_arg(bias_obj, "bias", kWhere, true));
  if (keep.back().present) {
    keep.back() = float_arg(bias_obj, "bias", {padded(P)}, false);
    p.bias = keep.back().data<float>();
  }
  return p;
}

void projection_forward(const std::string& isa, py::handle h, py::handle mask, py::handle wt, py::handle bias,
                        int64_t P, double eps, py::handle t_obj, py::handle norms_obj, int threads) {
  std::vector<TensorArg> keep;
  const ProjectionProblem p = read_problem(h, mask, wt, bias, P, eps, threads, keep);
  const TensorArg t = float_arg(t_obj, "out", {p.N, P}, true);
  float* norms = nullptr;
  if (!norms_obj.is_none()) norms = float_arg(norms_obj, "norms", {p.N}, true).mutable_data<float>();
  const Kernels k = kernel_for(isa);
  if (p.N == 0) return;
  py::gil_scoped_release nogil;
  k.forward(p, t.mutable_data<float>(), norms);
}

void projection_backward(const std::string& isa, py::handle h, py::handle mask, py::handle wt, py::handle bias,
                         int64_t P, double eps, py::handle t_obj, py::handle norms_obj, py::handle g_obj,
                         py::handle wr_obj, py::handle dh_obj, py::handle dw_obj, py::handle db_obj, int threads) {
  std::vector<TensorArg> keep;
  const ProjectionProblem p = read_problem(h, mask, wt, bias, P, eps, threads, keep);
  const int64_t Pp = padded(P), Hp = padded(p.H);
  ProjectionBackward b{};
  b.t = float_arg(t_obj, "out", {p.N, P}, false).data<float>();
  b.norms = float_arg(norms_obj, "norms", {p.N}, false).data<float>();
  b.g = float_arg(g_obj, "grad", {p.N, P}, false).data<float>();
  b.wr = float_arg(wr_obj, "wr", {Pp, Hp}, false).data<float>();
  if (!dh_obj.is_none()) b.dh = float_arg(dh_obj, "dh", {p.N, p.H}, true).mutable_data<float>();
  if (!dw_obj.is_none()) b.dw = float_arg(dw_obj, "dw", {Pp, Hp}, true).mutable_data<float>();
  if (!db_obj.is_none()) b.db = float_arg(db_obj, "db", {Pp}, true).mutable_data<float>();
  const Kernels k = kernel_for(isa);
  py::gil_scoped_release nogil;
  k.backward(p, b);  // N == 0 too: it zeroes dw and db
}

void register_projection(py::module_& m) {
  using py::arg;
  m.def("projection_forward", &projection_forward,
        "Token projection + L2 normalisation on CPU with the named ISA path: out[i] = p / max(||p||, eps), "
        "p = W h[i] + b, for rows with mask[i] (others 0). h (N,H) float32, last dim stride 1; mask (N,) bool "
        "contiguous or None; wt (Pp/32,H,32) float32: W^T in 32-wide panels, zero-padded (Pp = P rounded up "
        "to 32); bias (Pp,) float32 or None; out (N,P) float32 contiguous; norms (N,) float32 (||p||, for the "
        "backward) or None.",
        arg("isa"), arg("h"), arg("mask"), arg("wt"), arg("bias"), arg("out_features"), arg("eps"), arg("out"),
        arg("norms"), arg("threads"));
  m.def("projection_backward", &projection_backward,
        "Backward of projection_forward: the forward's arguments, its out and norms, grad (N,P) float32 "
        "contiguous, wr (Pp,Hp) float32: W zero-padded; writes dh (N,H) (0 at masked rows), dw (Pp,Hp) and "
        "db (Pp,), each float32 contiguous or None (not wanted). Sums over rows in an order fixed by N.",
        arg("isa"), arg("h"), arg("mask"), arg("wt"), arg("bias"), arg("out_features"), arg("eps"), arg("out"),
        arg("norms"), arg("grad"), arg("wr"), arg("dh"), arg("dw"), arg("db"), arg("threads"));
}

}  // namespace

FASTRANK_REGISTER(register_projection);

}  // namespace fastrank
