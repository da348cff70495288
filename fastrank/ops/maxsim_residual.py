"""MaxSim of one query against PLAID residual-compressed documents, fused with their decompression.

    d_r      = centroids[codes[r]] + weights[bucket(packed[r])]      (the codec: fastrank.ops.residual)
    score[i] = sum_{l < Lq} max_{r in doc i} <q_l, d_r>              (a document without rows scores 0)

Document i owns rows offsets[i]:offsets[i+1] of ``packed`` and ``codes``; ``docs`` scores a subset in place
(a query's candidates). The kernels never write a decompressed copy of the documents: the C++ CPU kernel
decompresses 16 rows at a time into a thread-local tile, the Triton kernel a tile in registers. Forward
only (this is for search): every call runs under ``torch.no_grad()``.

Read top to bottom: input checks, the backends' launchers and their registration with
:mod:`fastrank.dispatch`, the public :func:`maxsim_residual`, and :func:`maxsim_residual_ref`, the PyTorch
reference that is the spec. The Triton kernel lives in :mod:`fastrank.ops.maxsim_residual_triton`, the CPU
kernel in csrc/cpu/residual_kernels.inc (one source compiled per ISA path).

Every backend's :class:`fastrank.dispatch.Kernels` has only a forward, taking
``(q, packed, codes, offsets, centroids, weights, nbits, docs)`` already checked (float32 q; the codes'
range is checked by each backend over the rows it scores: the C++ boundary on every call).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastrank import _ext, cpu_isa, dispatch
from fastrank.ops.maxsim_packed import check_docs, check_offsets, maxsim_packed_ref, segment_rows
from fastrank.ops.maxsim_reasons import cpu_slower
from fastrank.ops.pairs import inner_contiguous
from fastrank.ops.residual import (check_code_range, check_codec, check_codes, check_dim, check_nbits,
                                   decompress_residuals)

__all__ = ["maxsim_residual", "maxsim_residual_ref"]

OP = "maxsim_residual"


# --------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------
def _check_inputs(q, packed, codes, offsets, centroids, weights, nbits, docs) -> int:
    """Validates the call (all but the codes' range) and returns the number of documents scored."""
    nbits = check_nbits(nbits, OP)
    for name, t in (("q", q), ("packed", packed), ("centroids", centroids)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 2:
        raise ValueError(f"{OP}: q must have shape (Lq, H) (one query), got {tuple(q.shape)}")
    if q.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{OP}: q must be float32 (float64 runs on the reference), got {q.dtype}")
    H = q.shape[1]
    check_dim(H, nbits, OP)
    if centroids.dtype != torch.float32 or centroids.dim() != 2 or centroids.shape[1] != H or centroids.shape[0] < 1:
        raise ValueError(f"{OP}: centroids must be float32 of shape (C, {H}) with C >= 1 (q's H), got "
                         f"{centroids.dtype} {tuple(centroids.shape)}")
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != H * nbits // 8:
        raise ValueError(f"{OP}: packed must be uint8 of shape (T, H * nbits / 8 = {H * nbits // 8}), got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    check_codes(codes, packed.shape[0], OP)
    check_codec(weights, "weights", nbits, OP)
    named = (("q", q), ("packed", packed), ("codes", codes), ("offsets", offsets), ("centroids", centroids),
             ("weights", weights), ("docs", docs))
    devices = {name: t.device for name, t in named if isinstance(t, Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{OP}: all tensors must be on one device, got "
                         + ", ".join(f"{k} on {v}" for k, v in devices.items()))
    n = check_offsets(offsets, packed.shape[0], OP).numel() - 1
    if docs is not None:
        n = check_docs(docs, n, OP).numel()
    return n


def _check_scored_codes(codes: Tensor, offsets: Tensor, docs: Optional[Tensor], num_centroids: int) -> None:
    """The codes of the rows a call scores index centroids (the Python backends' check; the C++ boundary
    makes its own)."""
    check_code_range(codes, num_centroids, OP, None if docs is None else segment_rows(offsets, docs)[0])


# --------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------
def _cpp_forward(q, packed, codes, offsets, centroids, weights, nbits: int, docs: Optional[Tensor],
                 normalize: bool = False) -> Tensor:
    ext = _ext.require()
    n = offsets.numel() - 1 if docs is None else docs.numel()
    out = torch.zeros((n,), dtype=torch.float32)
    if n == 0 or q.shape[0] == 0:
        return out
    # Views the kernel cannot index (a strided last dim, strided index lists) become copies; the extension
    # checks every tensor again and bounds-checks offsets, docs and the scored rows' codes.
    ext.maxsim_residual_forward(cpu_isa.selected(), inner_contiguous(q), inner_contiguous(packed), codes,
                                offsets.contiguous(), None if docs is None else docs.contiguous(),
                                inner_contiguous(centroids), weights.contiguous(), nbits, out,
                                torch.get_num_threads(), normalize)
    return out


def _triton_forward(q, packed, codes, offsets, centroids, weights, nbits: int, docs: Optional[Tensor],
                    normalize: bool = False) -> Tensor:
    from fastrank.ops import maxsim_residual_triton

    _check_scored_codes(codes, offsets, docs, centroids.shape[0])
    return maxsim_residual_triton.residual_forward(q, packed, codes, offsets, centroids, weights, nbits, docs,
                                                   normalize=normalize)


def _reference_forward(q, packed, codes, offsets, centroids, weights, nbits: int, docs: Optional[Tensor],
                       normalize: bool = False) -> Tensor:
    return maxsim_residual_ref(q, packed, codes, offsets, centroids, weights, nbits=nbits, docs=docs,
                               normalize=normalize)


def _dtype_reasons(*, dtype, **_) -> list[str]:
    return [] if dtype == torch.float32 else [f"q must be float32 for the kernels, got {dtype}"]


def _cpp_reasons(*, device_types, **ctx) -> list[str]:
    reasons = _dtype_reasons(**ctx)
    ext = _ext.load()
    if ext is not None and not hasattr(ext, "maxsim_residual_forward"):
        reasons.append(f"the installed fastrank._C predates maxsim_residual; {_ext.REBUILD_HINT}")
    if device_types != {"cpu"}:
        reasons.append("the extension's residual kernel runs on CPU tensors (CUDA runs the Triton kernel)")
    return reasons


# What each CPU ISA path's residual kernel does (csrc/cpu/residual_kernels.inc).
CPU_KERNELS = {
    "scalar": "scalar unpacking, baseline-vector FMA micro-kernel",
    "avx2": "AVX2 unpacking (vpsrlvd + vpermps weight lookup), 8-wide FMA micro-kernel",
    "avx512": "AVX-512 unpacking (vpsrlvd + vpermps weight lookup), 16-wide FMA micro-kernel",
    "avx512bf16": "AVX-512 unpacking (vpsrlvd + vpermps weight lookup), 16-wide FMA micro-kernel",
    "amx": "the avx512bf16 unit's kernel (float32 tile and FMA: AMX's bf16 tiles would round the scores)",
}


def _cpp_describe(*, isa: str = "", nbits: int = 0, **_) -> str:
    return (f"C++ CPU residual kernel (decompress 16 rows into a thread tile, then MaxSim), nbits={nbits}, "
            f"ISA path {isa}: {CPU_KERNELS.get(isa, 'unknown path')}")


_CPP = {"cpu": dispatch.Kernels(_cpp_forward)}
dispatch.register(OP, "cpp", _CPP, reasons=_cpp_reasons, slower=cpu_slower, describe=_cpp_describe)
_TRITON = dispatch.Kernels(_triton_forward)
dispatch.register(OP, "triton", _TRITON, reasons=_dtype_reasons,
                  describe=lambda **_: "Triton residual kernel (decompress in registers, tl.dot)")
dispatch.register(OP, "triton_interpret", _TRITON, reasons=_dtype_reasons,
                  slower=lambda **_: ["the Triton interpreter checks the GPU kernel on CPU; it never outruns eager"],
                  describe=lambda **_: "Triton residual kernel under the interpreter")
dispatch.register(OP, "reference", dispatch.Kernels(_reference_forward),
                  describe=lambda **_: "eager PyTorch (maxsim_residual_ref: decompress the scored rows, then MaxSim)")


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
def dispatch_context(q: Tensor, packed: Tensor, offsets: Tensor, docs: Optional[Tensor], n: int, nbits: int) -> dict:
    ctx = {"dtype": q.dtype, "nbits": nbits}
    if q.device.type == "cpu":
        ctx["isa"] = cpu_isa.selected()
    threads = torch.get_num_threads()
    if n < threads and q.device.type == "cpu":
        # Fewer documents than threads: the kernel parallelises over documents, so one long document
        # leaves cores idle (cpu_slower weighs that against eager's multi-threaded GEMM).
        rows = packed.shape[0] if docs is None else int((offsets[docs + 1] - offsets[docs]).sum())
        ctx["work"] = max(0, int(q.shape[0] * rows * q.shape[1]).bit_length() - 1)
        ctx["underfilled"] = True
    return ctx


def _explain_context(q, packed, codes, offsets, centroids, weights, docs=None) -> dict:
    # nbits follows from the shapes: packed has H * nbits / 8 bytes a row.
    nbits = packed.shape[1] * 8 // q.shape[1] if q.shape[1] else 0
    n = _check_inputs(q, packed, codes, offsets, centroids, weights, nbits, docs)
    return dispatch_context(q, packed, offsets, docs, n, nbits)


dispatch.register_context(OP, _explain_context)


def maxsim_residual(q: Tensor, packed: Tensor, codes: Tensor, offsets: Tensor, centroids: Tensor, weights: Tensor, *,
                    nbits: int, docs: Optional[Tensor] = None, normalize: bool = False,
                    backend: Optional[str] = None) -> Tensor:
    """MaxSim of one query against documents stored as PLAID residuals, decompressed inside the kernel.

    Args:
        q: (Lq, H) float32, one query (float64 runs on the reference, in float64).
        packed: uint8 (T, H * nbits / 8), each token's buckets (:func:`fastrank.ops.residual.compress_residuals`).
        codes: (T,) int32 or uint16 (int64 accepted), each token's centroid, in [0, C).
        offsets: int64 (N + 1,), non-decreasing, ``offsets[0] == 0``, ``offsets[N] == T``: document ``i``
            owns rows ``offsets[i]:offsets[i+1]``. A document without rows scores 0.
        centroids: float32 (C, H).
        weights: float32 (2^nbits,), the buckets' reconstruction values.
        nbits: bits per dimension, 1, 2 or 4; H * nbits must be a multiple of 8.
        docs: optional int64 (M,) indices of the documents to score, in that order (repeats allowed).
        normalize: scale each decompressed token to unit length before scoring (a zero token stays zero), as
            ColBERTv2's decompression does: for documents whose tokens were unit length, where it recovers part
            of the 2-bit loss (SciFact through the CLI: nDCG@10 0.7552 -> 0.7573, float16 0.7684).
        backend: force a backend (see :data:`fastrank.dispatch.BACKENDS`); default: the first that can run
            (:func:`fastrank.dispatch.explain` says which, and which CPU ISA path).

    Returns:
        float32 scores (N,), or (M,) with ``docs`` (float64 for a float64 query). Forward only: the call
        runs under ``torch.no_grad()`` and the result has no gradient.

    Each score is the reference's up to float32 summation order: the kernels decompress exactly as
    :func:`fastrank.ops.residual.decompress_residuals` does (one float32 addition per element).
    """
    with torch.no_grad():
        n = _check_inputs(q, packed, codes, offsets, centroids, weights, nbits, docs)
        if q.device.type == "meta":
            return torch.empty((n,), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device="meta")
        normalize = bool(normalize)
        if q.dtype == torch.float64:
            return _reference_forward(q, packed, codes, offsets, centroids, weights, nbits, docs, normalize)
        if n == 0 or q.shape[0] == 0:
            return torch.zeros((n,), dtype=torch.float32, device=q.device)
        tensors = (q, packed, codes, offsets, centroids, weights, docs)
        impl = dispatch.choose(OP, tensors, backend, **dispatch_context(q, packed, offsets, docs, n, nbits))
        return dispatch.kernels(OP, impl.backend, q).forward(q, packed, codes, offsets, centroids, weights, nbits, docs,
                                                             normalize)


def maxsim_residual_ref(q: Tensor, packed: Tensor, codes: Tensor, offsets: Tensor, centroids: Tensor,
                        weights: Tensor, *, nbits: int, docs: Optional[Tensor] = None, normalize: bool = False,
                        backend: Optional[str] = None) -> Tensor:
    """The specification of :func:`maxsim_residual` in plain PyTorch: the scored documents' rows (only those)
    decompressed by :func:`fastrank.ops.residual.decompress_residuals` and scored by
    :func:`fastrank.ops.maxsim_packed.maxsim_packed_ref` (each row scaled to unit length first with
    ``normalize``); float32, or float64 for a float64 ``q``.
    ``backend`` is accepted for the same signature and ignored."""
    del backend
    with torch.no_grad():
        n = _check_inputs(q, packed, codes, offsets, centroids, weights, nbits, docs)
        if docs is not None:
            rows, offsets = segment_rows(offsets, docs)
            packed, codes = packed[rows], codes[rows]
        tokens = decompress_residuals(packed, codes, centroids, weights, nbits)
        if normalize:
            tokens = torch.nn.functional.normalize(tokens, dim=1)
        if q.dtype == torch.float64:
            tokens = tokens.double()
        if n == 0 or q.shape[0] == 0:
            return torch.zeros((n,), dtype=q.dtype, device=q.device)
        return maxsim_packed_ref(q, tokens, offsets)
