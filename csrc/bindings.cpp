#include "bindings.h"

#include <vector>

#ifdef FASTRANK_WITH_OPENMP
#include <omp.h>
#endif

namespace fastrank {

static std::vector<Registrar>& registrars() {
  static std::vector<Registrar> list;
  return list;
}

int add_registrar(Registrar fn) {
  registrars().push_back(fn);
  return static_cast<int>(registrars().size());
}

}  // namespace fastrank

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrank compiled kernels (C++/OpenMP on CPU, CUDA when built with a CUDA compiler)";
#ifdef FASTRANK_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
#ifdef FASTRANK_WITH_OPENMP
  m.attr("has_openmp") = true;
  m.def("num_threads", []() { return omp_get_max_threads(); });
#else
  m.attr("has_openmp") = false;
  m.def("num_threads", []() { return 1; });
#endif
  for (auto fn : fastrank::registrars()) fn(m);
}
