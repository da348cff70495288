"""Loading the compiled extension ``fastrank._C`` lazily, and the conventions for calling it.

The compiled core never links libtorch: functions take torch.Tensor objects, read their pointers, dtypes,
shapes and strides through Python attributes and check them (csrc/tensor_arg.h), plus plain numbers and,
for CUDA, a stream handle. That keeps one build valid for whichever torch the machine has.
"""
from __future__ import annotations

import torch

REBUILD_HINT = (
    "rebuild it with `pip install --no-build-isolation -e .` from the fastrank source tree "
    "(needs cmake, a C++17 compiler, pybind11 and scikit-build-core; set FASTRANK_CUDA=ON to require CUDA)"
)

_module = None
_error: str | None = None


def load():
    """Return ``fastrank._C`` or None; never raises, never touches CUDA."""
    global _module, _error
    if _module is None and _error is None:
        try:
            from fastrank import _C  # type: ignore[attr-defined]

            _module = _C
        except ImportError as exc:  # not built, or built for another Python
            _error = f"the compiled extension fastrank._C could not be imported ({exc})"
    return _module


def unavailable_reason() -> str | None:
    """Why the extension cannot be used, or None when it can."""
    load()
    return None if _module is not None else f"{_error}; {REBUILD_HINT}"


def require():
    """Return ``fastrank._C`` or raise an error that says how to rebuild it."""
    module = load()
    if module is None:
        raise RuntimeError(unavailable_reason())
    return module


def cuda_stream(t: torch.Tensor) -> int:
    """The raw handle of the current stream on ``t``'s device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def element_codes() -> dict[str, int]:
    """The extension's element codes, torch dtype name -> code (``_C.ELEMENT_CODES``): the one numbering of
    csrc/element_codes.h, which the boundary reads off each tensor and the kernels switch on. Python passes
    no code (the extension reads them off the tensors); this is for checks and messages. Empty when the
    extension is not built (or predates the export); never raises."""
    module = load()
    return dict(getattr(module, "ELEMENT_CODES", {})) if module is not None else {}
