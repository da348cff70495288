#include "bindings.h"

#include <vector>

#include "element_codes.h"

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
  // The element codes, torch dtype name -> code, from the one list (element_codes.h): what the boundary reads
  // off each tensor and the kernels switch on, for Python to read rather than repeat.
  pybind11::dict element_codes;
#define FASTRANK_ELEM_EXPORT(name, code, text) element_codes[#text] = static_cast<int>(fastrank::Elem::name);
  FASTRANK_ELEMENTS(FASTRANK_ELEM_EXPORT)
#undef FASTRANK_ELEM_EXPORT
  m.attr("ELEMENT_CODES") = element_codes;
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
