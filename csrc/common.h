// Shared by every fastrank kernel: the element codes (element_codes.h), argument checks, scalar conversions.
// The core never links libtorch; tensor_arg.h reads each tensor's pointer, sizes, strides (in elements) and
// element code off the torch.Tensor object itself.
#pragma once

#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

#include "element_codes.h"

namespace fastrank {

// The float element a kernel that takes float32, float16, bfloat16 and float64 switches on, from the code
// its entry point read off the tensor; any other code is an error (std::invalid_argument).
inline Elem float_elem(int code) {
  const bool is_float = code == static_cast<int>(Elem::Float32) || code == static_cast<int>(Elem::Float16) ||
                        code == static_cast<int>(Elem::BFloat16) || code == static_cast<int>(Elem::Float64);
  if (!is_float) throw std::invalid_argument("fastrank: not a float element code: " + std::to_string(code));
  return static_cast<Elem>(code);
}

// Raises std::invalid_argument (ValueError in Python) with the argument's name and what was expected.
#define FASTRANK_CHECK(cond, ...)                                          \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::ostringstream fastrank_msg_;                                    \
      fastrank_msg_ << "fastrank: " << __VA_ARGS__;                        \
      throw std::invalid_argument(fastrank_msg_.str());                    \
    }                                                                      \
  } while (0)

template <typename T>
inline T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

// Scalar conversions usable from host code; bfloat16 rounds to nearest even like torch.
inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float fp16_to_float(uint16_t h) {
  uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      bits = sign | ((112u - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

}  // namespace fastrank
