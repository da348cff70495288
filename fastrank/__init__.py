"""fastrank: fused kernels for neural re-ranking.

Public API: :func:`maxsim` and its reference :func:`maxsim_ref`; :func:`maxsim_packed` (documents back to
back, no padding; int8 tokens from :func:`quantize_tokens`) and :func:`maxsim_packed_ref`; the LITE scorer (:class:`LiteScorer`,
:func:`lite_score`, :func:`lite_ref`); the distillation losses in :mod:`fastrank.losses`; and (imported
lazily) encoders, indexes, data readers and evaluation.
``import fastrank`` never touches CUDA and works without the compiled extension, Triton, faiss or
transformers; ops that need a missing piece say so when called.
"""
from fastrank import losses
from fastrank._version import __version__
from fastrank.dispatch import BACKENDS, BackendUnavailableError
from fastrank.nn import LiteScorer
from fastrank.ops.lite import lite_ref, lite_score
from fastrank.ops.maxsim import maxsim, maxsim_ref
from fastrank.ops.maxsim_packed import dequantize_tokens, maxsim_packed, maxsim_packed_ref, quantize_tokens


# Retrieval pieces import faiss / transformers / ir-measures only when first used, so `import fastrank`
# needs none of them; a missing one is reported when the object that needs it is created.
_LAZY = {
    "DenseIndex": "fastrank.index", "TokenIndex": "fastrank.index", "IndexFormatError": "fastrank.index",
    "Encoder": "fastrank.encoders", "TokenEmbeddings": "fastrank.encoders", "CrossEncoder": "fastrank.encoders",
    "evaluate": "fastrank.evaluate", "data": "fastrank.data",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        return module if module.__name__ == f"fastrank.{name}" else getattr(module, name)
    raise AttributeError(f"module 'fastrank' has no attribute {name!r}")


__all__ = [
    "BACKENDS", "BackendUnavailableError", "LiteScorer", "dequantize_tokens", "lite_ref", "lite_score", "losses",
    "maxsim", "maxsim_packed", "maxsim_packed_ref", "maxsim_ref", "quantize_tokens", "__version__", *_LAZY,
]
