// Python entry points of the MaxSim CUDA kernels (csrc/cuda/maxsim.cu); compiled only with CUDA.
#ifdef FASTRANK_WITH_CUDA
#include <tuple>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "cuda/maxsim_cuda.h"
#include "maxsim_boundary.h"
#include "tensor_arg.h"

namespace fastrank {
namespace {

namespace py = pybind11;
constexpr const char* kWhere = "maxsim (cuda)";

cuda::MaxSimArgs make_args(const PaddedArgs& a) {
  const MaxSimProblem& p = a.p;
  cuda::MaxSimArgs c;
  c.dtype = a.dtype;
  c.q = a.q;
  c.d = a.d;
  c.F = p.F; c.Y = p.Y; c.X = p.X; c.Lq = p.Lq; c.Ld = p.Ld; c.H = p.H;
  c.q_f = p.qs.a; c.q_y = p.qs.b; c.q_tok = p.qs.tok;
  c.d_f = p.ds.a; c.d_x = p.ds.b; c.d_tok = p.ds.tok;
  c.q_mask = p.qm;
  c.qm_f = p.qms.f; c.qm_y = p.qms.y; c.qm_x = p.qms.x; c.qm_tok = p.qms.tok;
  c.d_mask = p.dm;
  c.dm_f = p.dms.f; c.dm_y = p.dms.y; c.dm_x = p.dms.x; c.dm_tok = p.dms.tok;
  return c;
}

void check_on(const TensorArg& t, const PaddedArgs& a) {
  check_device(t, true, kWhere);
  FASTRANK_CHECK(t.device_index == a.device_index, kWhere << ": " << t.name << " must be on q's GPU (cuda:"
                                                          << a.device_index << "), got cuda:" << t.device_index);
}

void register_maxsim_cuda(py::module_& m) {
  m.def(
      "_maxsim_cuda_grids",
      [](int64_t F, int64_t Y, int64_t X, int64_t Lq, int64_t Ld, int64_t H, bool forward, bool dq, bool dd) {
        cuda::MaxSimArgs a{};
        a.F = F; a.Y = Y; a.X = X; a.Lq = Lq; a.Ld = Ld; a.H = H;
        const cuda::MaxSimGrids g = cuda::maxsim_grids(a, forward, dq, dd);
        return std::make_tuple(g.forward, g.dq, g.dd);
      },
      "Test hook: the launches' checked grid sizes (forward, dq, dd) for sizes F, Y, X, Lq, Ld, H; no GPU needed.",
      py::arg("F"), py::arg("Y"), py::arg("X"), py::arg("Lq"), py::arg("Ld"), py::arg("H"), py::arg("forward"),
      py::arg("dq"), py::arg("dd"));
  m.def(
      "maxsim_forward_cuda",
      [](py::handle q, py::handle d, py::handle q_mask, py::handle d_mask, py::handle out_obj, py::handle argmax_obj,
         std::uintptr_t stream) {
        const PaddedArgs a = padded_problem(q, d, q_mask, d_mask, 1, true, kWhere);
        const TensorArg out = tensor_arg(out_obj, "out", kWhere), arg = tensor_arg(argmax_obj, "argmax", kWhere, true);
        check_output(out, Elem::Float32, {a.p.F, a.p.Y, a.p.X}, kWhere);
        check_on(out, a);
        if (arg.present) {
          check_output(arg, Elem::Int32, {a.p.F, a.p.Y, a.p.X, a.p.Lq}, kWhere);
          check_on(arg, a);
        }
        if (out.numel() == 0) return;
        cuda::maxsim_forward(make_args(a), out.mutable_data<float>(), arg.present ? arg.mutable_data<int32_t>() : nullptr,
                             stream);
      },
      "MaxSim forward on CUDA: the tensors of maxsim_forward (checked alike, on one GPU) plus the stream handle.",
      py::arg("q"), py::arg("d"), py::arg("q_mask"), py::arg("d_mask"), py::arg("out"), py::arg("argmax"),
      py::arg("stream"));
  m.def(
      "maxsim_backward_cuda",
      [](py::handle q, py::handle d, py::handle grad_obj, py::handle argmax_obj, py::handle dq_obj, py::handle dd_obj,
         std::uintptr_t stream) {
        const PaddedArgs a = padded_problem(q, d, py::none(), py::none(), 1, true, kWhere);
        const TensorArg grad = tensor_arg(grad_obj, "grad", kWhere), arg = tensor_arg(argmax_obj, "argmax", kWhere);
        const TensorArg dq = tensor_arg(dq_obj, "dq", kWhere, true), dd = tensor_arg(dd_obj, "dd", kWhere, true);
        check_elem(grad, Elem::Float32, kWhere);
        check_shape(grad, {a.p.F, a.p.Y, a.p.X}, kWhere);
        check_contiguous(grad, kWhere);
        check_output(arg, Elem::Int32, {a.p.F, a.p.Y, a.p.X, a.p.Lq}, kWhere);
        if (dq.present) check_output(dq, Elem::Float32, {a.p.F, a.p.Y, a.p.Lq, a.p.H}, kWhere);
        if (dd.present) check_output(dd, Elem::Float32, {a.p.F, a.p.X, a.p.Ld, a.p.H}, kWhere);
        for (const TensorArg* t : {&grad, &arg, &dq, &dd})
          if (t->present) check_on(*t, a);
        if (grad.numel() == 0) return;
        // argmax is on the GPU: the kernels skip a value outside its document instead of reading it.
        cuda::maxsim_backward(make_args(a), grad.data<float>(), arg.data<int32_t>(),
                              dq.present ? dq.mutable_data<float>() : nullptr,
                              dd.present ? dd.mutable_data<float>() : nullptr, stream);
      },
      "MaxSim backward on CUDA: the tensors of maxsim_backward (checked alike, on one GPU) plus the stream handle.",
      py::arg("q"), py::arg("d"), py::arg("grad"), py::arg("argmax"), py::arg("dq"), py::arg("dd"), py::arg("stream"));
}

}  // namespace

FASTRANK_REGISTER(register_maxsim_cuda);

}  // namespace fastrank
#endif  // FASTRANK_WITH_CUDA
