"""fastrank: fused kernels for neural re-ranking.

Public API: :func:`maxsim` and its reference :func:`maxsim_ref`. ``import fastrank`` never touches CUDA and
works without the compiled extension, Triton or faiss; ops that need a missing piece say so when called.
"""
from fastrank.dispatch import BACKENDS, BackendUnavailableError
from fastrank.ops.maxsim import maxsim, maxsim_ref
from fastrank.ops.lite import lite_ref, lite_score
from fastrank.nn import LiteScorer

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "maxsim", "maxsim_ref", "lite_score", "lite_ref", "LiteScorer", "__version__"]
