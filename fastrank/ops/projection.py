"""ColBERT's token projection, fused: :func:`project_tokens` is ``F.normalize(F.linear(h, weight, bias), dim=-1)``
for the real tokens and 0 for the masked ones.

Why an op for a Linear: in a ColBERT head's training step on the CPU, the projection's three GEMMs (forward,
dW, dh) take most of the time and eager PyTorch runs them over every padded token (a fifth of a batch of
120-200-token passages padded to 200), then the normalisation as several more passes over the activations.
The C++ kernel (csrc/cpu/projection_kernels.inc) gathers the real rows into cache, multiplies them on the
micro-kernels LITE uses and normalises (or differentiates through the normalisation) while they are there:
padded rows cost nothing, and the activations are read and written once.

The reference (the spec) reads padded rows like plain PyTorch does; the kernel never reads them, so where a
padded row holds inf or NaN the kernel's gradients stay finite and the reference's do not.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F_
from torch import Tensor

from fastrank import _ext, cpu_isa, dispatch
from fastrank.ops.lite_cpu import b_panels, panel_padded
from fastrank.ops.weight_cache import WeightCache

OP = "project_tokens"
# Below these token counts eager PyTorch is as fast or faster (the call's fixed costs dominate): H=384 -> 128
# on the 2-core Zen 4 VM, inference 0.47x eager at 32 tokens, 1.09x at 800, 1.26x at 1,600; with gradients
# 0.77x at 32, 0.95x at 800, 1.07x at 1,600, 1.57x at 3,200.
MIN_ROWS_INFERENCE = 1024
MIN_ROWS_TRAINING = 2048
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(h, weight, bias, mask, eps) -> None:
    for name, t in (("h", h), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{OP}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if h.dim() < 1:
        raise ValueError(f"{OP}: h must have shape (..., H), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"{OP}: weight must have shape (P, H) with H = h.shape[-1] = {h.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{OP}: bias must be a float tensor or None, got "
                            f"{bias.dtype if isinstance(bias, Tensor) else type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{OP}: bias must have shape (P,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{OP}: mask must be a bool tensor or None, got "
                            f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
        try:
            fits = torch.broadcast_shapes(mask.shape, h.shape[:-1]) == h.shape[:-1]
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{OP}: mask must broadcast to h's token dims {tuple(h.shape[:-1])}, got "
                             f"{tuple(mask.shape)}")
    devices = {t.device for t in (h, weight, bias, mask) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{OP}: h, weight, bias and mask must be on one device, got {sorted(map(str, devices))}")
    if not (eps >= 0.0 and eps < float("inf")):
        raise ValueError(f"{OP}: eps must be finite and >= 0, got {eps}")


def project_tokens(h: Tensor, weight: Tensor, bias: Optional[Tensor] = None, mask: Optional[Tensor] = None, *,
                   eps: float = 1e-12, backend: Optional[str] = None) -> Tensor:
    """L2-normalised token projections: ``F.normalize(F.linear(h, weight, bias), dim=-1, eps=eps)`` where
    ``mask`` is True, 0 where it is False (ColBERT's head: ``Linear(H -> 128, bias=False)`` then normalise).

    Args:
        h: (..., H) token states (an encoder's last hidden layer).
        weight: (P, H); bias: (P,) or None.
        mask: optional bool, broadcastable to h's token dims ``h.shape[:-1]``; False marks padding, which the
            kernel never reads (its output and its gradients are 0, whatever it holds).
        eps: the lower bound on the norm, as ``F.normalize``'s.
        backend: force one of :data:`fastrank.BACKENDS` (default: the first that can run, also settable with
            ``FASTRANK_BACKEND``). The C++ kernel takes float32 on the CPU outside autocast; everything else runs
            the reference, which autograd differentiates to any order.

    Returns:
        (..., P) in the dtype ``F.linear`` gives (float32 from the kernel).
    """
    _check(h, weight, bias, mask, eps)
    ctx = dispatch_context(h, weight, bias, mask)
    impl = dispatch.choose(OP, (h, weight, bias, mask), backend, **ctx)
    return dispatch.kernels(OP, impl.backend, h).forward(h, weight, bias, mask, float(eps))


def project_tokens_ref(h: Tensor, weight: Tensor, bias: Optional[Tensor] = None, mask: Optional[Tensor] = None, *,
                       eps: float = 1e-12) -> Tensor:
    """The specification of :func:`project_tokens` in plain PyTorch (the same arguments)."""
    _check(h, weight, bias, mask, eps)
    return _reference(h, weight, bias, mask, eps)


def _reference(h, weight, bias, mask, eps: float) -> Tensor:
    t = F_.normalize(F_.linear(h, weight, bias), dim=-1, eps=eps)
    if mask is None:
        return t
    return torch.where(mask.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype, device=t.device))


def dispatch_context(h: Tensor, weight: Tensor, bias: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> dict:
    """What the backends' reasons look at, for :func:`fastrank.dispatch.explain`:
    ``explain("project_tokens", (h, weight, bias, mask))``."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    rows = h.numel() // max(h.shape[-1], 1)
    ctx = dict(dtype=h.dtype, weight_dtype=weight.dtype, bias_dtype=None if bias is None else bias.dtype,
               few_rows=rows < (MIN_ROWS_TRAINING if needs_grad else MIN_ROWS_INFERENCE),
               compiling=torch.compiler.is_compiling(),
               autocast=torch.is_autocast_enabled(h.device.type) if h.device.type in ("cpu", "cuda") else False)
    if h.device.type == "cpu":
        ctx["isa"] = cpu_isa.selected_for(OP, h.dtype)
    return ctx


# ---- the C++ CPU kernel ----------------------------------------------------------------------------------
def _flat(h: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    h2 = h.reshape(-1, h.shape[-1])
    if h2.shape[-1] > 1 and h2.stride(-1) != 1:  # the kernel reads each row as a dense vector
        h2 = h2.contiguous()
    m = None if mask is None else mask.expand(h.shape[:-1]).reshape(-1).contiguous()
    return h2, m


_PACKED = WeightCache(4)


def _pack(weight: Tensor) -> tuple[Tensor, Tensor]:
    w = weight.detach()
    p, hdim = w.shape
    wt = b_panels(w, hdim)
    wr = F_.pad(w, (0, panel_padded(hdim) - hdim, 0, panel_padded(p) - p)).contiguous()
    return wt, wr


def _packed(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(W^T in 32-wide panels for the forward, W zero-padded for the backward), cached while the weight is
    unchanged (an optimiser step repacks; a query and its documents share one packing)."""
    return _PACKED.get("projection", (weight,), lambda: _pack(weight))


def clear_cache() -> None:
    """Forget the packed weights (after writing a weight through ``.data``, which torch does not count)."""
    _PACKED.clear()


class _CppProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h2, weight, bias, mask, eps):
        isa = cpu_isa.selected_for(OP, h2.dtype)
        n, p = h2.shape[0], weight.shape[0]
        wt, _ = _packed(weight)
        bp = None if bias is None else F_.pad(bias.detach(), (0, panel_padded(p) - p)).contiguous()
        out = torch.empty(n, p)
        norms = torch.empty(n) if any(ctx.needs_input_grad[:3]) else None
        _ext.require().projection_forward(isa, h2.detach(), mask, wt, bp, p, eps, out, norms, torch.get_num_threads())
        ctx.eps, ctx.isa = eps, isa
        ctx.save_for_backward(h2, weight, bias, mask, out, norms, wt, bp)
        return out

    @staticmethod
    def backward(ctx, grad):
        h2, weight, bias, mask, out, norms, wt, bp = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        p, hdim = weight.shape
        pp, hp = panel_padded(p), panel_padded(hdim)
        _, wr = _packed(weight)
        dh = torch.empty_like(h2, memory_format=torch.contiguous_format) if need_h else None
        dw = torch.empty(pp, hp) if need_w else None
        db = torch.empty(pp) if need_b and bias is not None else None
        _ext.require().projection_backward(ctx.isa, h2.detach(), mask, wt, bp, p, ctx.eps, out, norms,
                                           grad.float().contiguous(), wr, dh, dw, db, torch.get_num_threads())
        return (dh, None if dw is None else dw[:p, :hdim], None if db is None else db[:p], None, None)


def _cpp(h: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], eps: float) -> Tensor:
    if h.shape[-1] == 0 or weight.shape[0] == 0 or h.numel() == 0:  # outside the kernel's contract
        return _reference(h, weight, bias, mask, eps)
    h2, m = _flat(h, mask)
    return _CppProjection.apply(h2, weight, bias, m, eps).reshape(*h.shape[:-1], weight.shape[0])


def _cpp_reasons(*, device_types, dtype, weight_dtype, bias_dtype=None, autocast=False, compiling=False, **_) -> list[str]:
    out = []
    if device_types != {"cpu"}:
        out.append("the C++ projection kernel runs on the CPU only")
    if {dtype, weight_dtype, bias_dtype} - {torch.float32, None}:
        out.append(f"the C++ projection kernel takes float32 h, weight and bias, got {dtype}, {weight_dtype}"
                   + (f", {bias_dtype}" if bias_dtype is not None else ""))
    if autocast:
        out.append("under autocast the Linear runs in the autocast dtype: eager PyTorch runs it")
    if compiling:
        out.append("under torch.compile the C++ projection kernel is not traced (its autograd is a Python Function)")
    return out


def _cpp_slower(*, device_types, isa: str = "", few_rows: bool = False, **_) -> list[str]:
    if device_types != {"cpu"}:
        return []
    if isa == "scalar":
        return ["the CPU ISA path is scalar (no AVX2): torch's vectorised BLAS is faster"]
    if few_rows:
        return [f"fewer tokens than the kernel's call overhead pays for (under {MIN_ROWS_INFERENCE} for inference, "
                f"{MIN_ROWS_TRAINING} with gradients)"]
    return []


def _cpp_describe(*, isa: str = "", **_) -> str:
    unit = {"amx": "avx512", "avx512bf16": "avx512"}.get(isa, isa)
    vector = {"avx512": "AVX-512 8 x 32", "avx2": "AVX2 4 x 16"}.get(unit, "baseline SIMD")
    return (f"C++ CPU kernel (token projection + L2 normalisation over the real tokens), ISA path {isa} "
            f"(the {unit} unit): {vector} FMA micro-kernel")


dispatch.register(OP, "cpp", dispatch.Kernels(_cpp), reasons=_cpp_reasons, slower=_cpp_slower, describe=_cpp_describe)
dispatch.register(OP, "reference", dispatch.Kernels(_reference), describe=lambda **_: "eager PyTorch (F.linear, F.normalize)")
dispatch.register_context(OP, dispatch_context)
