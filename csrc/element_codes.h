// The element codes: the one numbering of the dtypes of the tensors the extension reads. tensor_arg.h reads a
// tensor's code off its torch.dtype at the boundary (Python never passes one), the kernels switch on it, and
// the module exports it to Python as _C.ELEMENT_CODES (bindings.cpp; fastrank._ext.element_codes()), which
// tests/test_element_codes.py checks against this list. No other file may number dtypes.
//
// Constants and compile-time checks only, nothing that compiles to code: the per-ISA translation units include
// it (an inline function compiled there with AVX-512 flags could be the copy the linker keeps for every caller).
#pragma once

// X(enumerator, code, torch dtype name): codes run from 0 with no gap (tables are indexed by code).
#define FASTRANK_ELEMENTS(X) \
  X(Float32, 0, float32)     \
  X(Float16, 1, float16)     \
  X(BFloat16, 2, bfloat16)   \
  X(Float64, 3, float64)     \
  X(Int8, 4, int8)           \
  X(Int32, 5, int32)         \
  X(Int64, 6, int64)         \
  X(Bool, 7, bool)           \
  X(UInt8, 8, uint8)         \
  X(UInt16, 9, uint16)

namespace fastrank {

enum class Elem : int {
#define FASTRANK_ELEM_ENUMERATOR(name, code, text) name = code,
  FASTRANK_ELEMENTS(FASTRANK_ELEM_ENUMERATOR)
#undef FASTRANK_ELEM_ENUMERATOR
};

#define FASTRANK_ELEM_COUNT_ONE(name, code, text) +1
constexpr int kElemCount = 0 FASTRANK_ELEMENTS(FASTRANK_ELEM_COUNT_ONE);
#undef FASTRANK_ELEM_COUNT_ONE

// torch's name of each code's dtype (torch.<name>), indexed by code.
constexpr const char* kElemNames[kElemCount] = {
#define FASTRANK_ELEM_NAME(name, code, text) #text,
    FASTRANK_ELEMENTS(FASTRANK_ELEM_NAME)
#undef FASTRANK_ELEM_NAME
};

// The codes in list order, to check that they are 0, 1, 2, ...: then kElemNames[code] is code's name.
constexpr int kElemCodes[kElemCount] = {
#define FASTRANK_ELEM_CODE(name, code, text) code,
    FASTRANK_ELEMENTS(FASTRANK_ELEM_CODE)
#undef FASTRANK_ELEM_CODE
};

namespace element_codes_detail {
constexpr bool consecutive(int i = 0) { return i == kElemCount || (kElemCodes[i] == i && consecutive(i + 1)); }
}  // namespace element_codes_detail
static_assert(element_codes_detail::consecutive(), "element codes must run 0, 1, 2, ... in FASTRANK_ELEMENTS order");

}  // namespace fastrank
