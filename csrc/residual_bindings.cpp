// MaxSim against PLAID residual-compressed documents on the CPU (fastrank/ops/maxsim_residual.py): the
// boundary checks and the choice of instruction-set path. Compiled for the baseline target; the kernels live
// in cpu/isa/residual_<isa>.cpp (one source, cpu/residual_kernels.inc, compiled once per ISA). Every tensor is
// read and checked here (tensor_arg.h), and every code of every scored row is bounds-checked against the
// centroids on every call: the kernel indexes centroids with it and trusts nothing else.
#include <string>

#include "bindings.h"
#include "common.h"
#include "cpu/cpu_isa.h"
#include "cpu/residual_cpu.h"
#include "maxsim_boundary.h"
#include "tensor_arg.h"

FASTRANK_DECLARE_RESIDUAL_ISA(isa_scalar)
#ifdef FASTRANK_ISA_AVX2
FASTRANK_DECLARE_RESIDUAL_ISA(isa_avx2)
#endif
#ifdef FASTRANK_ISA_AVX512
FASTRANK_DECLARE_RESIDUAL_ISA(isa_avx512)
#endif
#ifdef FASTRANK_ISA_AVX512BF16
FASTRANK_DECLARE_RESIDUAL_ISA(isa_avx512bf16)
#endif

namespace fastrank {
namespace {

namespace py = pybind11;
using cpu::Isa;
using cpu::ResidualProblem;

constexpr const char* kWhere = "maxsim_residual (cpp)";

using ForwardFn = void (*)(const ResidualProblem&, float*);

// The kernel of ISA path `name`; amx runs the avx512bf16 unit (the tile is float32, scored by FMA).
ForwardFn kernel_for(const std::string& name) {
  switch (cpu::runnable_isa(name, kWhere)) {
    case Isa::Scalar: return isa_scalar::maxsim_residual_forward;
#ifdef FASTRANK_ISA_AVX2
    case Isa::Avx2: return isa_avx2::maxsim_residual_forward;
#endif
#ifdef FASTRANK_ISA_AVX512
    case Isa::Avx512: return isa_avx512::maxsim_residual_forward;
#endif
#ifdef FASTRANK_ISA_AVX512BF16
    case Isa::Avx512Bf16:
    case Isa::Amx: return isa_avx512bf16::maxsim_residual_forward;
#endif
    default: break;
  }
  // A path that runs here always has its unit in this build (cpu_isa.cpp marks the others unusable).
  FASTRANK_CHECK(false, kWhere << ": this build has no kernel for the CPU ISA path '" << name << "'");
  return nullptr;
}

template <typename Code>
void check_code_rows(const Code* codes, int64_t stride, int64_t begin, int64_t end, int64_t C) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t c = static_cast<int64_t>(codes[r * stride]);
    FASTRANK_CHECK(c >= 0 && c < C, kWhere << ": codes[" << r << "] = " << c << " does not index the " << C
                                           << " rows of centroids (0 .. " << C - 1 << ")");
  }
}

// The codes of the rows the call scores: all of them, or those of the docs subset's documents.
template <typename Code>
void check_codes_scored(const ResidualProblem& p) {
  const Code* codes = static_cast<const Code*>(p.codes);
  if (p.docs == nullptr) {
    check_code_rows(codes, p.code_stride, 0, p.offsets[p.scored], p.C);
    return;
  }
  for (int64_t i = 0; i < p.scored; ++i)
    check_code_rows(codes, p.code_stride, p.offsets[p.docs[i]], p.offsets[p.docs[i] + 1], p.C);
}

void maxsim_residual_forward(const std::string& isa, py::handle q_obj, py::handle packed_obj, py::handle codes_obj,
                             py::handle offsets_obj, py::handle docs_obj, py::handle centroids_obj,
                             py::handle weights_obj, int nbits, py::handle out_obj, int threads, bool normalize) {
  const TensorArg q = tensor_arg(q_obj, "q", kWhere), packed = tensor_arg(packed_obj, "packed", kWhere);
  const TensorArg codes = tensor_arg(codes_obj, "codes", kWhere), off = tensor_arg(offsets_obj, "offsets", kWhere);
  const TensorArg docs = tensor_arg(docs_obj, "docs", kWhere, true);
  const TensorArg cent = tensor_arg(centroids_obj, "centroids", kWhere), w = tensor_arg(weights_obj, "weights", kWhere);
  const TensorArg out = tensor_arg(out_obj, "out", kWhere);
  for (const TensorArg* t : {&q, &packed, &codes, &off, &docs, &cent, &w, &out}) check_device(*t, false, kWhere);
  FASTRANK_CHECK(nbits == 1 || nbits == 2 || nbits == 4, kWhere << ": nbits must be 1, 2 or 4, got " << nbits);
  check_elem(q, Elem::Float32, kWhere);
  FASTRANK_CHECK(q.dim() == 2, kWhere << ": q must have shape (Lq, H), got " << q.shape_text());
  const int64_t Lq = q.size[0], H = q.size[1];
  FASTRANK_CHECK(Lq >= 1, kWhere << ": q must have at least one query token, got " << q.shape_text());
  FASTRANK_CHECK(H >= 1 && (H * nbits) % 8 == 0,
                 kWhere << ": H * nbits must be a positive multiple of 8, got H = " << H << " with nbits = " << nbits);
  check_inner_contiguous(q, kWhere);
  check_elem(packed, Elem::UInt8, kWhere);
  FASTRANK_CHECK(packed.dim() == 2, kWhere << ": packed must have shape (T, H * nbits / 8), got " << packed.shape_text());
  const int64_t T = packed.size[0];
  check_shape(packed, {T, H * nbits / 8}, kWhere);
  check_inner_contiguous(packed, kWhere);
  FASTRANK_CHECK(codes.elem == static_cast<int>(Elem::Int32) || codes.elem == static_cast<int>(Elem::UInt16) ||
                     codes.elem == static_cast<int>(Elem::Int64),
                 kWhere << ": codes must be int32, uint16 or int64, got " << codes.dtype_text());
  check_shape(codes, {T}, kWhere);
  check_elem(cent, Elem::Float32, kWhere);
  FASTRANK_CHECK(cent.dim() == 2 && cent.size[1] == H && cent.size[0] >= 1,
                 kWhere << ": centroids must have shape (C, " << H << ") with C >= 1, got " << cent.shape_text());
  check_inner_contiguous(cent, kWhere);
  check_output(w, Elem::Float32, {int64_t(1) << nbits}, kWhere);  // read as a dense array, like an output
  check_offsets(off, T, kWhere);
  const int64_t n = off.size[0] - 1;
  int64_t scored = n;
  if (docs.present) {
    check_docs(docs, n, kWhere);
    scored = docs.size[0];
  }
  check_output(out, Elem::Float32, {scored}, kWhere);
  check_threads(threads, kWhere);
  ResidualProblem p;
  p.q = q.data<float>(); p.Lq = Lq; p.H = H; p.q_stride = q.stride[0];
  p.packed = packed.data<uint8_t>(); p.packed_stride = packed.stride[0];
  p.codes = codes.data<void>(); p.code_elem = codes.elem; p.code_stride = codes.stride[0];
  p.centroids = cent.data<float>(); p.centroid_stride = cent.stride[0]; p.C = cent.size[0];
  p.weights = w.data<float>(); p.nbits = nbits;
  p.offsets = off.data<int64_t>(); p.docs = docs.present ? docs.data<int64_t>() : nullptr; p.scored = scored;
  p.threads = threads;
  p.normalize = normalize;
  const ForwardFn kernel = kernel_for(isa);
  if (scored == 0) return;
  switch (static_cast<Elem>(codes.elem)) {
    case Elem::Int32: check_codes_scored<int32_t>(p); break;
    case Elem::UInt16: check_codes_scored<uint16_t>(p); break;
    default: check_codes_scored<int64_t>(p); break;
  }
  py::gil_scoped_release nogil;
  kernel(p, out.mutable_data<float>());
}

void register_residual(py::module_& m) {
  using py::arg;
  m.def("maxsim_residual_forward", &maxsim_residual_forward,
        "MaxSim of one query against PLAID residual-compressed documents on CPU, with the named ISA path: q float32 "
        "(Lq, H); packed uint8 (T, H*nbits/8); codes int32, uint16 or int64 (T,) (any stride), each checked against "
        "centroids for every scored row; offsets int64 (N+1) and docs int64 (M,) or None, both bounds-checked; "
        "centroids float32 (C, H); weights float32 (2^nbits,); out float32 (M or N,), contiguous. Last dims stride 1, "
        "row strides free. normalize: each decompressed row scaled to unit length before scoring.",
        arg("isa"), arg("q"), arg("packed"), arg("codes"), arg("offsets"), arg("docs"), arg("centroids"), arg("weights"),
        arg("nbits"), arg("out"), arg("threads"), arg("normalize") = false);
}

}  // namespace

FASTRANK_REGISTER(register_residual);

}  // namespace fastrank
