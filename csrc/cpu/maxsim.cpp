#include "bindings.h"
#include "common.h"
namespace fastrank {
static void register_maxsim(pybind11::module_& m) { m.def("maxsim_placeholder", []() { return 0; }); }
FASTRANK_REGISTER(register_maxsim);
}
