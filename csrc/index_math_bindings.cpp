// The CUDA kernels' index arithmetic (csrc/index_math.h), compiled for the host so that tests can evaluate it
// past 2^31 without a GPU (tests/test_cuda_offsets.py). Built in every configuration, CUDA or not: the header
// is plain C++ outside nvcc. Test hooks, not an API: the names start with an underscore.
#include <tuple>

#include "bindings.h"
#include "index_math.h"

namespace fastrank {
namespace {

void register_index_math(pybind11::module_& m) {
  namespace py = pybind11;
  namespace im = index_math;
  m.def("_index_offset2", &im::offset2, "i * si + j * sj in int64 (csrc/index_math.h).", py::arg("i"), py::arg("si"),
        py::arg("j"), py::arg("sj"));
  m.def("_index_offset4", &im::offset4, "a * sa + b * sb + c * sc + d * sd in int64.", py::arg("a"), py::arg("sa"),
        py::arg("b"), py::arg("sb"), py::arg("c"), py::arg("sc"), py::arg("d"), py::arg("sd"));
  m.def("_index_flat", &im::flat, "row * n + col in int64.", py::arg("row"), py::arg("n"), py::arg("col"));
  m.def("_index_unit", &im::unit_index, "block * per_block + local in int64.", py::arg("block"),
        py::arg("per_block"), py::arg("local"));
  m.def(
      "_index_unflatten3",
      [](int64_t index, int64_t nb, int64_t nc) {
        const im::Coords3 c = im::unflatten3(index, nb, nc);
        return std::make_tuple(c.a, c.b, c.c);
      },
      "(a, b, c) of a flat index over (., nb, nc).", py::arg("index"), py::arg("nb"), py::arg("nc"));
  m.def("_index_blocks_for", &im::blocks_for, "ceil(n / per_block) in int64.", py::arg("n"), py::arg("per_block"));
  m.def("_index_grid_x", &im::grid_x, "A checked grid x dimension, or ValueError naming `what`.", py::arg("blocks"),
        py::arg("what"));
}

}  // namespace

FASTRANK_REGISTER(register_index_math);

}  // namespace fastrank
