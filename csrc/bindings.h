// Each source file registers its own Python functions, so adding an op never edits a shared list.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace fastrank {
using Registrar = void (*)(pybind11::module_&);
int add_registrar(Registrar fn);
}  // namespace fastrank

#define FASTRANK_CONCAT_(a, b) a##b
#define FASTRANK_CONCAT(a, b) FASTRANK_CONCAT_(a, b)
// Usage at namespace scope: FASTRANK_REGISTER(register_maxsim);
#define FASTRANK_REGISTER(fn) \
  static const int FASTRANK_CONCAT(fastrank_registered_, __LINE__) = ::fastrank::add_registrar(fn)
