// The extension's boundary: every tensor an entry point receives is a torch.Tensor object, and its data
// pointer, dtype, device, shape and strides are read here, from the object itself, never from integers
// computed by the caller. The kernels then index only through what these checks allowed: a view with
// unexpected strides, a tensor of the wrong size or type, or one on another device is a ValueError naming
// the argument, never a read out of bounds. (torch keeps every view inside its storage, so shape and
// strides read from the tensor bound every address the kernel forms from them.)
//
// The core still does not link libtorch: the attributes are read through the Python object (about 0.5 us
// per tensor, a few microseconds per call; measured in the closing note of issue 22).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#ifdef __linux__
#include <sys/mman.h>
#endif
#include <utility>
#include <vector>

#include "common.h"
#include "element_codes.h"

namespace fastrank {

// The element codes (Elem, element_codes.h) are read off the tensors here: Python never passes one.
inline const char* elem_name(Elem e) {
  const int i = static_cast<int>(e);
  return i >= 0 && i < kElemCount ? kElemNames[i] : "unsupported";
}

struct TensorArg {
  const char* name = "";
  bool present = false;     // false: None was passed
  std::uintptr_t ptr = 0;
  int elem = -1;            // an Elem, or -1 for a dtype no entry point takes
  pybind11::object dtype;   // the torch.dtype, for messages
  std::string dtype_text() const { return present ? std::string(pybind11::str(dtype)) : std::string("None"); }
  bool cuda = false;
  int device_index = -1;    // -1 on CPU
  std::vector<int64_t> size, stride;

  int64_t dim() const { return static_cast<int64_t>(size.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : size) n *= s;
    return n;
  }
  template <typename T>
  const T* data() const { return reinterpret_cast<const T*>(ptr); }
  template <typename T>
  T* mutable_data() const { return reinterpret_cast<T*>(ptr); }

  std::string shape_text() const { return tuple_text(size); }
  std::string stride_text() const { return tuple_text(stride); }

  static std::string tuple_text(const std::vector<int64_t>& v) {
    std::string s = "(";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + (v.size() == 1 ? ",)" : ")");
  }
};

namespace tensor_arg_detail {

// What tensor_arg asks of every tensor, looked up once: torch's dtype objects (compared by identity), the
// Tensor type, and the attribute names as interned strings (a const char* name would build a new str per
// lookup; the losses' calls are tens of microseconds, so the boundary's own cost is kept to a few).
struct Torch {
  pybind11::object dtypes[kElemCount];
  pybind11::object tensor_type;
  pybind11::str is_cpu, is_cuda, is_meta, device, get_device, dtype, shape, stride, data_ptr;
};

inline const Torch& torch_names() {
  namespace py = pybind11;
  static const Torch* t = [] {
    py::module_ torch = py::module_::import("torch");
    auto* n = new Torch;  // never freed: destroying Python objects at exit, after the interpreter, would crash
    for (int i = 0; i < kElemCount; ++i) n->dtypes[i] = torch.attr(kElemNames[i]);
    n->tensor_type = torch.attr("Tensor");
    for (auto [field, text] : {std::pair{&n->is_cpu, "is_cpu"}, {&n->is_cuda, "is_cuda"}, {&n->is_meta, "is_meta"},
                               {&n->device, "device"}, {&n->get_device, "get_device"}, {&n->dtype, "dtype"},
                               {&n->shape, "shape"}, {&n->stride, "stride"}, {&n->data_ptr, "data_ptr"}}) {
      PyObject* interned = PyUnicode_InternFromString(text);
      if (interned == nullptr) throw py::error_already_set();
      *field = py::reinterpret_steal<py::str>(interned);
    }
    return n;
  }();
  return *t;
}

// torch.Size and stride() are tuples of ints.
inline void read_ints(pybind11::handle tuple, std::vector<int64_t>& out, const char* what) {
  FASTRANK_CHECK(PyTuple_Check(tuple.ptr()), "tensor " << what << " is not a tuple");
  const Py_ssize_t n = PyTuple_GET_SIZE(tuple.ptr());
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const long long v = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple.ptr(), i));
    if (v == -1 && PyErr_Occurred()) throw pybind11::error_already_set();
    out[static_cast<size_t>(i)] = v;
  }
}

}  // namespace tensor_arg_detail

// Reads the tensor `obj` (or None when `optional`) passed as argument `name` of entry point `where`.
inline TensorArg tensor_arg(pybind11::handle obj, const char* name, const char* where, bool optional = false) {
  namespace py = pybind11;
  TensorArg a;
  a.name = name;
  if (obj.is_none()) {
    FASTRANK_CHECK(optional, where << ": " << name << " is required (a torch.Tensor), got None");
    return a;
  }
  const tensor_arg_detail::Torch& t = tensor_arg_detail::torch_names();
  FASTRANK_CHECK(py::isinstance(obj, t.tensor_type),
                 where << ": " << name << " must be a torch.Tensor, got " << std::string(py::str(obj.get_type().attr("__name__"))));
  a.present = true;
  if (!obj.attr(t.is_cpu).cast<bool>()) {
    FASTRANK_CHECK(!obj.attr(t.is_meta).cast<bool>(),
                   where << ": " << name << " is on the meta device, which holds no data; the kernels need real tensors");
    a.cuda = obj.attr(t.is_cuda).cast<bool>();
    FASTRANK_CHECK(a.cuda, where << ": " << name << " is on " << std::string(py::str(obj.attr(t.device)))
                                 << "; the extension's kernels run on cpu and cuda tensors");
    a.device_index = obj.attr(t.get_device)().cast<int>();
  }
  a.dtype = obj.attr(t.dtype);
  for (int i = 0; i < kElemCount; ++i)
    if (a.dtype.is(t.dtypes[i])) a.elem = i;
  tensor_arg_detail::read_ints(obj.attr(t.shape), a.size, "shape");
  tensor_arg_detail::read_ints(obj.attr(t.stride)(), a.stride, "strides");
  FASTRANK_CHECK(a.size.size() == a.stride.size(), where << ": " << name << ": shape and strides disagree");
  for (size_t i = 0; i < a.stride.size(); ++i)
    FASTRANK_CHECK(a.stride[i] >= 0, where << ": " << name << " has a negative stride " << a.stride[i] << " in dim " << i);
  // A tensor with no element may have no storage; its pointer is never read.
  a.ptr = a.numel() > 0 ? obj.attr(t.data_ptr)().cast<std::uintptr_t>() : 0;
  FASTRANK_CHECK(a.numel() == 0 || a.ptr != 0, where << ": " << name << " has elements but no data");
  return a;
}

// ---- the checks an entry point states about each argument ------------------------------------------------

inline void check_elem(const TensorArg& a, Elem e, const char* where) {
  FASTRANK_CHECK(a.elem == static_cast<int>(e),
                 where << ": " << a.name << " must be " << elem_name(e) << ", got " << a.dtype_text());
}

inline void check_float_elem(const TensorArg& a, const char* where, bool allow_float64 = false) {
  const bool ok = a.elem == static_cast<int>(Elem::Float32) || a.elem == static_cast<int>(Elem::Float16) ||
                  a.elem == static_cast<int>(Elem::BFloat16) || (allow_float64 && a.elem == static_cast<int>(Elem::Float64));
  FASTRANK_CHECK(ok, where << ": " << a.name << " must be float32, float16 or bfloat16"
                           << (allow_float64 ? " or float64" : "") << ", got " << a.dtype_text());
}

// A mask: bool or uint8, any nonzero byte is true.
inline void check_mask_elem(const TensorArg& a, const char* where) {
  FASTRANK_CHECK(a.elem == static_cast<int>(Elem::Bool) || a.elem == static_cast<int>(Elem::UInt8),
                 where << ": " << a.name << " must be bool (or uint8), got " << a.dtype_text());
}

// `shape` entries of -1 match any size.
inline void check_shape(const TensorArg& a, const std::vector<int64_t>& shape, const char* where) {
  bool ok = a.dim() == static_cast<int64_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.size[i] == shape[i];
  if (ok) return;
  std::string want = "(";
  for (size_t i = 0; i < shape.size(); ++i)
    want += (i ? ", " : "") + (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
  want += shape.size() == 1 ? ",)" : ")";
  FASTRANK_CHECK(false, where << ": " << a.name << " must have shape " << want << ", got " << a.shape_text());
}

// Row-major with no gaps: what outputs, index lists and per-row scales must be (the kernels write or read
// them as flat arrays).
inline bool is_contiguous(const TensorArg& a) {
  int64_t expected = 1;
  for (int64_t i = a.dim() - 1; i >= 0; --i) {
    if (a.size[i] != 1 && a.stride[i] != expected) return false;
    expected *= a.size[i];
  }
  return true;
}

inline void check_contiguous(const TensorArg& a, const char* where) {
  FASTRANK_CHECK(a.numel() == 0 || is_contiguous(a), where << ": " << a.name << " must be contiguous, got shape "
                                                           << a.shape_text() << " with strides " << a.stride_text());
}

// The innermost dim is read as a dense vector by the SIMD and tile kernels; the other strides are free
// (zero included: an expanded tensor repeats rows, which reading handles). An empty tensor is never read.
inline void check_inner_contiguous(const TensorArg& a, const char* where) {
  FASTRANK_CHECK(a.dim() == 0 || a.numel() == 0 || a.size.back() <= 1 || a.stride.back() == 1,
                 where << ": " << a.name << " must have stride 1 in its last dim, got stride " << a.stride.back());
}

inline void check_same_device(const TensorArg& a, const TensorArg& b, const char* where) {
  if (!a.present || !b.present) return;
  FASTRANK_CHECK(a.cuda == b.cuda && a.device_index == b.device_index,
                 where << ": " << a.name << " and " << b.name << " must be on the same device");
}

inline void check_device(const TensorArg& a, bool cuda, const char* where) {
  if (!a.present) return;
  FASTRANK_CHECK(a.cuda == cuda, where << ": " << a.name << " must be a " << (cuda ? "CUDA" : "CPU") << " tensor");
}

inline int64_t elem_bytes(int elem) {
  switch (static_cast<Elem>(elem)) {
    case Elem::Float64: case Elem::Int64: return 8;
    case Elem::Float32: case Elem::Int32: return 4;
    case Elem::Float16: case Elem::BFloat16: case Elem::UInt16: return 2;
    default: return 1;
  }
}

// A large CPU output is usually fresh memory that the kernel touches first: on Linux each 4 KB page then
// costs a fault and a zeroing (a new 78 MB gradient took 24 ms to fill on the Zen 4 VM, 2.5 ms once
// resident). Asking for transparent huge pages on the whole 2 MB pages inside it, before the kernel
// writes, cut that to 6 ms. A hint only: contents never change, and a kernel with THP off ignores it.
inline void advise_huge_pages(const TensorArg& a) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{1} << 21;
  const std::uintptr_t bytes = static_cast<std::uintptr_t>(a.numel() * elem_bytes(a.elem));
  if (a.cuda || bytes < 4 * kHuge) return;
  const std::uintptr_t lo = (a.ptr + kHuge - 1) & ~(kHuge - 1), hi = (a.ptr + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a refusal changes nothing
#else
  (void)a;
#endif
}

// Outputs are written as flat arrays, every element once: of the expected type and shape, and dense (an
// expanded output would have several elements at one address).
inline void check_output(const TensorArg& a, Elem e, const std::vector<int64_t>& shape, const char* where) {
  check_elem(a, e, where);
  check_shape(a, shape, where);
  check_contiguous(a, where);
  advise_huge_pages(a);
}

}  // namespace fastrank
