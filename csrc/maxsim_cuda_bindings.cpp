// Python entry points of the MaxSim CUDA kernels (csrc/cuda/maxsim.cu); compiled only with CUDA.
#ifdef FASTRANK_WITH_CUDA
#include <vector>

#include "bindings.h"
#include "common.h"
#include "cuda/maxsim_cuda.h"

namespace fastrank {
namespace {

cuda::MaxSimArgs make_args(int dtype, std::uintptr_t q, std::uintptr_t d, const std::vector<int64_t>& dims,
                           const std::vector<int64_t>& qs, const std::vector<int64_t>& ds, std::uintptr_t qm,
                           const std::vector<int64_t>& qms, std::uintptr_t dm, const std::vector<int64_t>& dms) {
  FASTRANK_CHECK(dims.size() == 6, "maxsim (cuda): dims must be (F, Y, X, Lq, Ld, H)");
  FASTRANK_CHECK(qs.size() == 3 && ds.size() == 3, "maxsim (cuda): q/d strides must be (batch, batch, token)");
  FASTRANK_CHECK(qms.size() == 4 && dms.size() == 4, "maxsim (cuda): mask strides must be (F, Y, X, token)");
  cuda::MaxSimArgs a;
  a.dtype = dtype;
  a.q = reinterpret_cast<const void*>(q);
  a.d = reinterpret_cast<const void*>(d);
  a.F = dims[0]; a.Y = dims[1]; a.X = dims[2]; a.Lq = dims[3]; a.Ld = dims[4]; a.H = dims[5];
  a.q_f = qs[0]; a.q_y = qs[1]; a.q_tok = qs[2];
  a.d_f = ds[0]; a.d_x = ds[1]; a.d_tok = ds[2];
  a.q_mask = reinterpret_cast<const uint8_t*>(qm);
  a.qm_f = qms[0]; a.qm_y = qms[1]; a.qm_x = qms[2]; a.qm_tok = qms[3];
  a.d_mask = reinterpret_cast<const uint8_t*>(dm);
  a.dm_f = dms[0]; a.dm_y = dms[1]; a.dm_x = dms[2]; a.dm_tok = dms[3];
  return a;
}

void register_maxsim_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "maxsim_forward_cuda",
      [](int dtype, std::uintptr_t q, std::uintptr_t d, const std::vector<int64_t>& dims, const std::vector<int64_t>& qs,
         const std::vector<int64_t>& ds, std::uintptr_t qm, const std::vector<int64_t>& qms, std::uintptr_t dm,
         const std::vector<int64_t>& dms, std::uintptr_t out, std::uintptr_t argmax, std::uintptr_t stream) {
        const auto a = make_args(dtype, q, d, dims, qs, ds, qm, qms, dm, dms);
        cuda::maxsim_forward(a, reinterpret_cast<float*>(out), reinterpret_cast<int32_t*>(argmax), stream);
      },
      "MaxSim forward on CUDA: the arguments of maxsim_forward plus the stream handle.",
      py::arg("dtype"), py::arg("q"), py::arg("d"), py::arg("dims"), py::arg("q_strides"), py::arg("d_strides"),
      py::arg("q_mask"), py::arg("q_mask_strides"), py::arg("d_mask"), py::arg("d_mask_strides"), py::arg("out"),
      py::arg("argmax"), py::arg("stream"));
  m.def(
      "maxsim_backward_cuda",
      [](int dtype, std::uintptr_t q, std::uintptr_t d, const std::vector<int64_t>& dims, const std::vector<int64_t>& qs,
         const std::vector<int64_t>& ds, std::uintptr_t grad, std::uintptr_t argmax, std::uintptr_t dq, std::uintptr_t dd,
         std::uintptr_t stream) {
        const std::vector<int64_t> none4 = {0, 0, 0, 0};
        const auto a = make_args(dtype, q, d, dims, qs, ds, 0, none4, 0, none4);
        cuda::maxsim_backward(a, reinterpret_cast<const float*>(grad), reinterpret_cast<const int32_t*>(argmax),
                              reinterpret_cast<float*>(dq), reinterpret_cast<float*>(dd), stream);
      },
      "MaxSim backward on CUDA: the arguments of maxsim_backward plus the stream handle.",
      py::arg("dtype"), py::arg("q"), py::arg("d"), py::arg("dims"), py::arg("q_strides"), py::arg("d_strides"),
      py::arg("grad"), py::arg("argmax"), py::arg("dq"), py::arg("dd"), py::arg("stream"));
}

}  // namespace

FASTRANK_REGISTER(register_maxsim_cuda);

}  // namespace fastrank
#endif  // FASTRANK_WITH_CUDA
