"""MaxSim over packed variable-length documents: no padding is stored, read or scored.

    tokens (T, H) holds N documents back to back; document i owns rows offsets[i]:offsets[i+1].
    score[i] = sum_{l valid} max_{j in doc i} <q_l, tokens[j]>      (an empty document scores 0)

``q`` is one query (Lq, H) scored against every document (re-ranking, retrieval) or one query per
document (N, Lq, H) (training pairs). Tokens may be stored as int8 with a float32 scale per token
(:func:`quantize_tokens`); the kernels then score ``scale_j * <q_l, int8_j>`` without a dequantized copy
(CPU paths with AVX512-VNNI also quantize q per token and multiply int8 by int8 unless ``exact_int8``).

Read top to bottom: input checks, the C++ launchers, the custom ops with their autograd, the public
:func:`maxsim_packed`, :func:`quantize_tokens`, and :func:`maxsim_packed_ref`, the PyTorch reference that is
the spec. The Triton kernels live in :mod:`fastrank.ops.maxsim_packed_triton`.

Kernels' contract (C++ and Triton): q (Fq, Lq, H) with Fq = 1 (shared) or N; q_mask (Fq, Lq) bool or None;
offsets int64 (N + 1,) on the tokens' device, already validated; the forward returns float32 scores (N,)
and, when a backward follows, int32 argmax (N, Lq), the winning row relative to the document's start (-1
for masked query tokens and empty documents). Every backend's :class:`fastrank.dispatch.Kernels` takes
``forward(q, tokens, offsets, q_mask, scales, save_argmax, docs, exact_int8)`` (a ``docs`` subset only for
inference, with Fq = 1 or len(docs)) and ``backward(q, tokens, offsets, grad, argmax, need_dq, need_dt,
deterministic)``.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from fastrank import _ext, cpu_isa, dispatch
from fastrank.ops.maxsim import NO_SECOND_DERIVATIVE
from fastrank.ops.maxsim_reasons import cpu_slower, kernel_reasons
from fastrank.ops.pairs import (DOUBLE_BACKWARD_ERROR, FLOAT_DTYPES, FLOAT_NAMES, backward_by_query_chunks,
                                forward_by_query_chunks, inner_contiguous)


# --------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------


# Offsets already validated, by object: id -> (weak reference, version counter, rows they were checked
# against). A corpus's offsets are validated once, not on every call that scores a few of its documents
# (with millions of documents the check would cost more than the scoring); an in-place change bumps the
# tensor's version and a new tensor has a new identity, so either is checked again.
_VALIDATED: dict[int, tuple] = {}


def check_offsets(offsets, num_tokens: int, where: str = "maxsim_packed") -> Tensor:
    """``offsets`` as a validated int64 (N + 1,) tensor, or a ValueError/TypeError naming ``offsets``.

    One reduction on the offsets' device (a single host sync on a GPU) checks every condition, so a bad
    offset can never send a kernel out of bounds."""
    if not isinstance(offsets, Tensor):
        raise TypeError(f"{where}: offsets must be an int64 torch.Tensor of shape (N + 1,), got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"{where}: offsets must be int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{where}: offsets must have shape (N + 1,) with N >= 0, got {tuple(offsets.shape)}")
    # Inference tensors keep no version counter: they are checked on every call.
    versioned = not offsets.is_inference() and not torch.compiler.is_compiling()
    seen = _VALIDATED.get(id(offsets)) if versioned else None
    # (The static launch check in tests/test_device_guard.py reads any x[i](...) as a kernel launch: the
    # tables here are unpacked into names before they are called.)
    if seen is not None:
        ref, version, rows = seen
        if ref() is offsets and version == offsets._version and rows == num_tokens:
            return offsets
    if offsets.device.type == "meta":  # shapes only: there are no values to check
        return offsets
    _validate_offsets(offsets, num_tokens, where)
    if versioned:
        if len(_VALIDATED) > 256:
            for key in [k for k, (ref, *_) in _VALIDATED.items() if ref() is None] or list(_VALIDATED)[:128]:
                _VALIDATED.pop(key, None)
        _VALIDATED[id(offsets)] = (weakref.ref(offsets), offsets._version, num_tokens)
    return offsets


def _validate_offsets(offsets: Tensor, num_tokens: int, where: str) -> None:
    first, last = offsets[:1], offsets[-1:]
    steps = offsets[1:] - offsets[:-1]
    bad = torch.stack([(first != 0).any(), (last != num_tokens).any(), (steps < 0).any()]).tolist()
    if bad[0]:
        raise ValueError(f"{where}: offsets[0] must be 0, got {int(offsets[0])}")
    if bad[1]:
        raise ValueError(f"{where}: offsets[-1] must equal the number of token rows ({num_tokens}), got {int(offsets[-1])}")
    if bad[2]:
        i = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(f"{where}: offsets must be non-decreasing, got offsets[{i}] = {int(offsets[i])} > "
                         f"offsets[{i + 1}] = {int(offsets[i + 1])}")


def check_docs(docs, n: int, where: str = "maxsim_packed") -> Tensor:
    """``docs`` as a validated int64 (M,) tensor of document indices in [0, N)."""
    if not isinstance(docs, Tensor):
        raise TypeError(f"{where}: docs must be an int64 torch.Tensor of document indices or None, got {type(docs).__name__}")
    if docs.dtype != torch.int64 or docs.dim() != 1:
        raise TypeError(f"{where}: docs must be a 1-D int64 tensor, got {docs.dtype} of shape {tuple(docs.shape)}")
    if docs.numel() and docs.device.type != "meta" and bool(((docs < 0) | (docs >= n)).any()):
        bad = docs[(docs < 0) | (docs >= n)][0]
        raise ValueError(f"{where}: docs must index the {n} documents of offsets (0 .. {n - 1}), got {int(bad)}")
    return docs


def _check_inputs(q, tokens, offsets, q_mask, scales, docs=None) -> int:
    """Validates the call and returns the number of documents scored (N, or len(docs))."""
    for name, t in (("q", q), ("tokens", tokens)):
        if not isinstance(t, Tensor):
            raise TypeError(f"maxsim_packed: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() not in (2, 3):
        raise ValueError(f"maxsim_packed: q must have shape (Lq, H) or (N, Lq, H), got {tuple(q.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"maxsim_packed: q must be {FLOAT_NAMES}, got {q.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"maxsim_packed: tokens must have shape (T, H), got {tuple(tokens.shape)}")
    if scales is None:
        if tokens.dtype == torch.int8:
            raise ValueError("maxsim_packed: int8 tokens need their per-token scales (scales=, from quantize_tokens)")
        if tokens.dtype != q.dtype:
            raise TypeError(f"maxsim_packed: q and tokens must have the same dtype, got q {q.dtype} and tokens {tokens.dtype}")
    else:
        if not isinstance(scales, Tensor):
            raise TypeError(f"maxsim_packed: scales must be a float32 torch.Tensor or None, got {type(scales).__name__}")
        if tokens.dtype != torch.int8:
            raise TypeError(f"maxsim_packed: scales go with int8 tokens, got tokens {tokens.dtype}")
        if scales.dtype != torch.float32 or scales.shape != (tokens.shape[0],):
            raise ValueError(f"maxsim_packed: scales must be float32 of shape ({tokens.shape[0]},) (one per token row), "
                             f"got {scales.dtype} {tuple(scales.shape)}")
    if q.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"maxsim_packed: q and tokens must share the embedding dim H, got q {tuple(q.shape)} "
                         f"and tokens {tuple(tokens.shape)}")
    named = (("q", q), ("tokens", tokens), ("offsets", offsets), ("q_mask", q_mask), ("scales", scales), ("docs", docs))
    devices = {name: t.device for name, t in named if isinstance(t, Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError("maxsim_packed: all tensors must be on one device, got "
                         + ", ".join(f"{k} on {v}" for k, v in devices.items()))
    n = check_offsets(offsets, tokens.shape[0]).numel() - 1
    if docs is not None:
        n = check_docs(docs, n).numel()
    if q.dim() == 3 and q.shape[0] != n:
        raise ValueError(f"maxsim_packed: q (N, Lq, H) must have one query per scored document: {n} documents "
                         f"({'docs' if docs is not None else 'offsets'}), q has {q.shape[0]}")
    if q_mask is not None:
        if not isinstance(q_mask, Tensor) or q_mask.dtype != torch.bool:
            raise TypeError("maxsim_packed: q_mask must be a bool tensor or None, got "
                            + (str(q_mask.dtype) if isinstance(q_mask, Tensor) else type(q_mask).__name__))
        if q_mask.shape != q.shape[:-1]:
            raise ValueError(f"maxsim_packed: q_mask must have shape {tuple(q.shape[:-1])} to match q, got {tuple(q_mask.shape)}")
    return n


# --------------------------------------------------------------------------------------------------------
# C++ launchers (CPU). q is (Fq, Lq, H): Fq = 1 scores one query against every document, Fq = N one query
# per document (the extension maps either onto its pair grid).
# --------------------------------------------------------------------------------------------------------
def segment_rows(offsets: Tensor, docs: Tensor) -> tuple[Tensor, Tensor]:
    """The row indices of segments ``docs`` of a CSR ``offsets`` back to back, and their own offsets
    (len(docs) + 1,)."""
    starts = offsets[docs]
    lengths = offsets[docs + 1] - starts
    new_offsets = torch.zeros(docs.numel() + 1, dtype=torch.int64, device=offsets.device)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    total = int(new_offsets[-1])
    # row r of segment k is starts[k] + (r - new_offsets[k])
    shift = torch.repeat_interleave(starts - new_offsets[:-1], lengths, output_size=total)
    return torch.arange(total, device=offsets.device) + shift, new_offsets


def gather_docs(tokens: Tensor, offsets: Tensor, docs: Tensor, scales: Optional[Tensor] = None):
    """The documents ``docs`` as their own packed ``(tokens, offsets, scales)``: a copy of their rows only
    (differentiable in ``tokens``)."""
    rows, new_offsets = segment_rows(offsets, docs)
    return tokens[rows], new_offsets, (scales[rows] if scales is not None else None)


def _forward_outputs(q: Tensor, n: int, save_argmax: bool) -> tuple[Tensor, Tensor]:
    out = q.new_empty((n,), dtype=torch.float32)
    return out, q.new_empty((n, q.shape[1]) if save_argmax else (0,), dtype=torch.int32)


# CPU ISA paths whose int8 kernel is vpdpbusd (AVX512-VNNI), with the query quantized per token.
VNNI_PATHS = ("avx512bf16", "amx")


def _cpp_forward(q, tokens, offsets, q_mask, scales, save_argmax: bool, docs: Optional[Tensor] = None,
                 exact_int8: bool = False):
    ext = _ext.require()
    # Views the kernels cannot index (a strided embedding dim, strided index lists or scales) become
    # contiguous copies here; the extension checks every tensor again and bounds-checks offsets and docs.
    q, tokens, offsets = inner_contiguous(q), inner_contiguous(tokens), offsets.contiguous()
    docs = docs.contiguous() if docs is not None else None
    scales = scales.contiguous() if scales is not None else None
    n = offsets.numel() - 1 if docs is None else docs.numel()
    if n == 0:
        return _forward_outputs(q, n, save_argmax)
    if scales is not None:
        q = q.float()

    def tile(qc, mc):
        out, arg = _forward_outputs(qc, n, save_argmax)
        ext.maxsim_packed_forward(cpu_isa.selected_for("maxsim", qc.dtype), qc, tokens, offsets, docs, scales, mc, out,
                                  arg if save_argmax else None, torch.get_num_threads(), exact_int8)
        return out, arg

    return forward_by_query_chunks(tile, q, q_mask, save_argmax)


def _cpp_backward(q, tokens, offsets, grad, argmax, need_dq: bool, need_dt: bool, deterministic: bool):
    ext = _ext.require()
    q, tokens, offsets = inner_contiguous(q), inner_contiguous(tokens), offsets.contiguous()
    n = offsets.numel() - 1
    grad = grad.contiguous().float()
    argmax = argmax.contiguous()
    # The kernel writes every row of dq and of dtokens (each row belongs to one document); with no
    # document it runs not at all and the gradients are zero.
    alloc = torch.empty if n > 0 else torch.zeros

    def tile(qc, ac):
        dq = alloc(qc.shape, dtype=torch.float32) if need_dq else None
        dt = alloc(tokens.shape, dtype=torch.float32) if need_dt else None
        if n > 0 and (need_dq or need_dt):
            ext.maxsim_packed_backward(cpu_isa.selected_for("maxsim", qc.dtype), qc, tokens, offsets, grad, ac, dq, dt,
                                       torch.get_num_threads())
        return dq, dt

    dq, dt = backward_by_query_chunks(tile, q, argmax, need_dq)
    return (dq.to(q.dtype) if need_dq else None), (dt.to(tokens.dtype) if need_dt else None)


def _triton_module():
    from fastrank.ops import maxsim_packed_triton

    return maxsim_packed_triton


def _triton_forward(q, tokens, offsets, q_mask, scales, save_argmax: bool, docs: Optional[Tensor] = None,
                    exact_int8: bool = False):
    # The kernels score int8 tokens exactly (float query, widened rows) and a docs= subset as a gathered copy.
    if docs is not None:
        tokens, offsets, scales = gather_docs(tokens, offsets, docs, scales)
    return _triton_module().packed_forward(q, tokens, offsets, q_mask, scales, save_argmax)


def _triton_backward(q, tokens, offsets, grad, argmax, need_dq: bool, need_dt: bool, deterministic: bool):
    return _triton_module().packed_backward(q, tokens, offsets, grad, argmax, need_dq, need_dt, deterministic)


def _cpp_reasons(*, device_types, **ctx) -> list[str]:
    reasons = kernel_reasons(**ctx)
    ext = _ext.load()
    if ext is not None and not hasattr(ext, "maxsim_packed_forward"):
        reasons.append(f"the installed fastrank._C predates maxsim_packed; {_ext.REBUILD_HINT}")
    if device_types != {"cpu"}:
        reasons.append("packed MaxSim on CUDA runs in the Triton kernels (the C++ extension covers the CPU)")
    return reasons


def _cpp_describe(*, isa: str = "", int8: bool = False, dtype=None, exact_int8: bool = False, **_) -> str:
    if int8:
        what = ("int8 dot products (vpdpbusd, AVX512-VNNI), the query quantized per token"
                if isa in VNNI_PATHS and not exact_int8 else "int8 tokens widened and scaled, float32 FMA")
    else:
        what = "AMX-BF16 tiles" if (isa == "amx" and dtype == torch.bfloat16) else "FMA micro-kernel"
    return f"C++ CPU packed kernel, ISA path {isa}: {what}"


# One signature for every backend's forward and backward (the module docstring's contract).
_TRITON = dispatch.Kernels(_triton_forward, _triton_backward)
dispatch.register("maxsim_packed", "triton", _TRITON, reasons=kernel_reasons,
                  describe=lambda **_: "Triton packed kernels")
dispatch.register("maxsim_packed", "triton_interpret", _TRITON,
                  reasons=lambda **ctx: kernel_reasons(interpreter=True, **ctx),
                  slower=lambda **_: ["the Triton interpreter checks the GPU kernels on CPU; it never outruns eager"],
                  describe=lambda **_: "Triton packed kernels under the interpreter")
# The extension's packed kernels run on the CPU only (_cpp_reasons refuses CUDA tensors).
_CPP = {"cpu": dispatch.Kernels(_cpp_forward, _cpp_backward)}
dispatch.register("maxsim_packed", "cpp", _CPP, reasons=_cpp_reasons, slower=cpu_slower, describe=_cpp_describe)


# --------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, with fake implementations and autograd.
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastrank::maxsim_packed_forward", mutates_args=())
def _forward_op(q: Tensor, tokens: Tensor, offsets: Tensor, q_mask: Optional[Tensor], scales: Optional[Tensor],
                backend: str, save_argmax: bool, deterministic: bool, exact_int8: bool) -> tuple[Tensor, Tensor]:
    return dispatch.kernels("maxsim_packed", backend, q).forward(q, tokens, offsets, q_mask, scales, save_argmax,
                                                                 None, exact_int8)


@_forward_op.register_fake
def _(q, tokens, offsets, q_mask, scales, backend, save_argmax, deterministic, exact_int8):
    n = offsets.shape[0] - 1
    return _forward_outputs(q, n, save_argmax)


@torch.library.custom_op("fastrank::maxsim_packed_backward", mutates_args=())
def _backward_op(q: Tensor, tokens: Tensor, offsets: Tensor, grad: Tensor, argmax: Tensor, backend: str,
                 deterministic: bool, need_dq: bool, need_dt: bool) -> tuple[Tensor, Tensor]:
    # An input that needs no gradient gets an empty tensor: the kernel for it does not run.
    kernels = dispatch.kernels("maxsim_packed", backend, q)
    dq, dt = kernels.backward(q, tokens, offsets, grad, argmax, need_dq, need_dt, deterministic)
    return (dq if need_dq else q.new_empty(0)), (dt if need_dt else tokens.new_empty(0))


@_backward_op.register_fake
def _(q, tokens, offsets, grad, argmax, backend, deterministic, need_dq, need_dt):
    dense = torch.contiguous_format
    return (torch.empty_like(q, memory_format=dense) if need_dq else q.new_empty(0),
            torch.empty_like(tokens, memory_format=dense) if need_dt else tokens.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, tokens, offsets, _, _, backend, _, deterministic, _ = inputs
    ctx.backend, ctx.deterministic = backend, deterministic
    ctx.save_for_backward(q, tokens, offsets, output[1])


def _backward(ctx, grad_scores, _grad_argmax):
    q, tokens, offsets, argmax = ctx.saved_tensors
    need_dq, need_dt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dq, dt = _backward_op(q, tokens, offsets, grad_scores, argmax, ctx.backend, ctx.deterministic, need_dq, need_dt)
    return (dq if need_dq else None), (dt if need_dt else None), None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR.format(op="fastrank.maxsim_packed", why=NO_SECOND_DERIVATIVE,
                                                    ref="fastrank.maxsim_packed_ref"))


# As for maxsim: backward(create_graph=True) works; differentiating the gradient again is a clear error.
_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
def dispatch_context(q: Tensor, tokens: Tensor, n: int, scales: Optional[Tensor], exact_int8: bool = False) -> dict:
    ctx = {"dtype": torch.float32 if scales is not None and q.dtype != torch.float64 else q.dtype,
           "int8": scales is not None}
    if scales is not None:
        ctx["exact_int8"] = exact_int8
    if q.device.type == "cpu":
        ctx["isa"] = cpu_isa.selected_for("maxsim", q.dtype)
    if torch.compiler.is_compiling():
        ctx["work"] = 64
    else:
        pairs = max(n, 1)
        ctx["work"] = max(0, int(q.shape[-2] * tokens.shape[0] * q.shape[-1]).bit_length() - 1)
        ctx["underfilled"] = pairs < torch.get_num_threads()
    return ctx


def _explain_context(q, tokens, offsets, q_mask=None, scales=None, docs=None, exact_int8: bool = False) -> dict:
    return dispatch_context(q, tokens, _check_inputs(q, tokens, offsets, q_mask, scales, docs), scales, exact_int8)


dispatch.register_context("maxsim_packed", _explain_context)


def maxsim_packed(q: Tensor, tokens: Tensor, offsets: Tensor, *, q_mask: Optional[Tensor] = None,
                  scales: Optional[Tensor] = None, docs: Optional[Tensor] = None, exact_int8: bool = False,
                  backend: Optional[str] = None, deterministic: bool = False) -> Tensor:
    """MaxSim of a query against documents stored back to back, with no padding.

    Args:
        q: (Lq, H) one query scored against every document, or (N, Lq, H) one query per document;
            float32, float16 or bfloat16 (float64 runs on the reference).
        tokens: (T, H) the documents' token embeddings back to back, q's dtype; or int8 with ``scales``.
        offsets: int64 (N + 1,), non-decreasing, ``offsets[0] == 0``, ``offsets[N] == T``: document ``i``
            owns rows ``offsets[i]:offsets[i+1]``. An empty document scores 0 and gets zero gradient.
        q_mask: optional bool of q's shape without H; False marks padded query tokens.
        scales: float32 (T,) per-token scales of int8 ``tokens`` (:func:`quantize_tokens`); the score uses
            ``scales[j] * tokens[j]``. int8 scoring is forward only.
        docs: optional int64 (M,) indices of the documents to score, in that order (repeats allowed): a
            subset of a packed corpus (a query's candidates) scored in place, with no copy of its rows on
            CPU. Scores are then (M,), and a per-document q is (M, Lq, H).
        exact_int8: with int8 tokens, score the float query against the dequantized rows on every path.
            By default CPU paths with AVX512-VNNI (``VNNI_PATHS``) quantize the query per token as well and
            multiply int8 by int8 (about 2.3x faster); each similarity then differs from the dequantized
            reference by at most ``scale_q[l] / 2 * ||scales[j] * tokens[j]||_1`` (``scale_q[l]`` =
            max|q_l| / 127).
        backend: force a backend (see :data:`fastrank.BACKENDS`); default: the first that can run.
        deterministic: bitwise reproducible backward on GPU (the CPU kernels always are).

    Returns:
        float32 scores (N,) (float64 for float64 inputs). NaN in the inputs propagates.

    Queries of any length run on the kernels (in chunks of 64 tokens beyond 64). bfloat16 on the ``amx``
    and ``avx512bf16`` CPU paths flushes subnormals, within the bound :func:`fastrank.maxsim` states.
    Double backward is not supported on the kernels (a RuntimeError when the gradient is differentiated
    again); use :func:`maxsim_packed_ref` for second derivatives.
    """
    n = _check_inputs(q, tokens, offsets, q_mask, scales, docs)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or tokens.requires_grad)
    if scales is not None and torch.is_grad_enabled() and (needs_grad or scales.requires_grad):
        raise ValueError("maxsim_packed: int8 tokens are scored forward only; neither q nor scales may require grad "
                         "(wrap the call in torch.no_grad(), or score float tokens to train)")
    if q.device.type == "meta":
        return _meta_scores(q, tokens, offsets, q_mask, scales, docs, n, needs_grad)
    if q.dtype == torch.float64:
        return _reference_scores(q, tokens, offsets, q_mask, scales, docs)
    tensors = (q, tokens, offsets, q_mask, scales, docs)
    impl = dispatch.choose("maxsim_packed", tensors, backend, **dispatch_context(q, tokens, n, scales, exact_int8))
    kernels = dispatch.kernels("maxsim_packed", impl.backend, q)
    if kernels.backward is None:  # eager PyTorch (the reference), which autograd differentiates itself
        return kernels.forward(q, tokens, offsets, q_mask, scales, docs)
    if n == 0 or q.shape[-2] == 0 or q.shape[-1] == 0 or tokens.shape[0] == 0:  # outside the kernels' contract
        return _reference_scores(q, tokens, offsets, q_mask, scales, docs)
    q3 = q if q.dim() == 3 else q.unsqueeze(0)
    m2 = None if q_mask is None else (q_mask if q_mask.dim() == 2 else q_mask.unsqueeze(0))
    if needs_grad or torch.compiler.is_compiling():
        if docs is not None:  # the subset is copied (its rows only; differentiable) and scored as its own batch
            tokens, offsets, scales = gather_docs(tokens, offsets, docs, scales)
        scores, _ = _forward_op(q3, tokens, offsets, m2, scales, impl.backend, needs_grad, deterministic, exact_int8)
        return scores
    # Inference: no custom-op overhead; each backend scores a docs= subset its own way (the C++ kernel in place).
    return kernels.forward(q3, tokens, offsets, m2, scales, False, docs, exact_int8)[0]


def _meta_scores(q, tokens, offsets, q_mask, scales, docs, n: int, needs_grad: bool) -> Tensor:
    """Meta tensors carry shapes and no values: the scores' shape and dtype (as maxsim gives on meta), through
    the custom op's fake implementation so that autograd sees the same graph as on real tensors."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not needs_grad:
        return torch.empty((n,), dtype=dtype, device="meta")
    if docs is not None:
        raise ValueError("maxsim_packed: on the meta device a docs= subset is scored forward only (its rows cannot "
                         "be gathered without offsets' values); call it under torch.no_grad()")
    q3 = q if q.dim() == 3 else q.unsqueeze(0)
    m2 = None if q_mask is None else (q_mask if q_mask.dim() == 2 else q_mask.unsqueeze(0))
    return _forward_op(q3, tokens, offsets, m2, scales, "cpp", True, False, True)[0].to(dtype)


def _reference_scores(q, tokens, offsets, q_mask=None, scales=None, docs=None) -> Tensor:
    # The reference has no C++ boundary to check offsets on every call: a write that bypassed the version
    # counter (a shared numpy array, .data) would pass the cached check, so check again here.
    _validate_offsets(offsets, tokens.shape[0], "maxsim_packed")
    return maxsim_packed_ref(q, tokens, offsets, q_mask=q_mask, scales=scales, docs=docs)


dispatch.register("maxsim_packed", "reference", dispatch.Kernels(_reference_scores),
                  describe=lambda **_: "eager PyTorch (maxsim_packed_ref's math)")


def quantize_tokens(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-token int8: ``tokens[j] ~= scales[j] * q[j]`` with ``scales[j] = max|tokens[j]| / 127``.

    Returns ``(int8 (T, H), float32 scales (T,))``. The rounding error of each element is at most
    ``scales[j] / 2``; an all-zero row gets scale 0. Non-finite values are refused (they have no int8 code)."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or not tokens.is_floating_point():
        raise ValueError("quantize_tokens: tokens must be a floating-point tensor of shape (T, H), got "
                         + (f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__))
    if tokens.device.type == "meta":  # shapes only
        return (torch.empty(tokens.shape, dtype=torch.int8, device="meta"),
                torch.empty(tokens.shape[:1], dtype=torch.float32, device="meta"))
    # float64 stays float64 until the scales are formed, so that a value beyond float32's range is named as
    # such rather than turned into inf first.
    t = tokens.detach().double() if tokens.dtype == torch.float64 else tokens.detach().float()
    if t.numel() and not bool(torch.isfinite(t).all()):
        row = int((~torch.isfinite(t)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"quantize_tokens: tokens[{row}] contains NaN or inf, which int8 cannot represent")
    amax = t.abs().amax(dim=1) if t.shape[1] else t.new_zeros(t.shape[0])
    too_big = amax / 127.0 > torch.finfo(torch.float32).max
    if bool(too_big.any()):
        row = int(too_big.nonzero()[0, 0])
        raise ValueError(f"quantize_tokens: tokens[{row}] holds a value of magnitude {float(amax[row]):.3g}; its "
                         f"per-token scale (max|x| / 127) would overflow float32 (values up to "
                         f"{127 * torch.finfo(torch.float32).max:.3g} can be quantized)")
    scales = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(t * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales.float().contiguous()


def dequantize_tokens(tokens: Tensor, scales: Tensor) -> Tensor:
    """float32 ``scales[j] * tokens[j]``: what int8 MaxSim scores against."""
    return tokens.float() * scales[:, None]


def maxsim_packed_ref(q: Tensor, tokens: Tensor, offsets: Tensor, *, q_mask: Optional[Tensor] = None,
                      scales: Optional[Tensor] = None, docs: Optional[Tensor] = None) -> Tensor:
    """The specification of :func:`maxsim_packed` in plain PyTorch: documents are gathered into a padded
    batch with a mask and scored by :func:`fastrank.maxsim_ref` (float32; float64 for float64 inputs)."""
    from fastrank.ops.maxsim import maxsim_ref

    if docs is not None:
        tokens, offsets, scales = gather_docs(tokens, offsets, docs, scales)
    n = offsets.numel() - 1
    d = dequantize_tokens(tokens, scales) if scales is not None else tokens
    lengths = offsets[1:] - offsets[:-1]
    width = max(int(lengths.max()) if n else 0, 1)
    pos = torch.arange(width, device=tokens.device)
    d_mask = pos[None, :] < lengths[:, None]
    rows = torch.where(d_mask, offsets[:-1, None] + pos[None, :], torch.zeros((), dtype=torch.int64, device=tokens.device))
    if d.shape[0] == 0:
        padded = d.new_zeros((n, width, d.shape[1]))
    else:
        padded = d[rows]  # (N, width, H); padding slots hold row 0 and are masked
    if n == 0:
        return q.new_zeros((0,), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    if scales is not None:  # dequantized rows are float32 (float64 against a float64 query)
        padded = padded.double() if q.dtype == torch.float64 else padded
        q = q if q.dtype == torch.float64 else q.float()
    return maxsim_ref(q, padded, q_mask, d_mask)
