"""fastrank: fused kernels for neural re-ranking.

Public API: :func:`maxsim` and its reference :func:`maxsim_ref`. ``import fastrank`` never touches CUDA and
works without the compiled extension, Triton or faiss; ops that need a missing piece say so when called.
"""
from fastrank import losses
from fastrank.dispatch import BACKENDS, BackendUnavailableError
from fastrank.ops.maxsim import maxsim, maxsim_ref

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "losses", "maxsim", "maxsim_ref", "__version__"]
