"""The fused LITE forward on the CPU (csrc/cpu/lite_kernels.inc, one source compiled per ISA): the scorer's
weights packed for its micro-kernels, cached per scorer state, and the call into the extension.

The kernel takes G pairs at a time, runs their row-MLP rows together through the 2400-wide hidden layer in
256-unit chunks (the LayerNorm after it folded into the second Linear, see :func:`fold_layernorm`), then each
pair's column MLP 32 columns at a time, and writes only the score: S and the hidden layers stay in cache.
It is forward only: a call that needs gradients runs eager (the backward is not fused on the CPU).

Packing (float32 whatever the scorer's dtype; every padded position zero; lite_cpu.h names the layouts): the
first Linear of each MLP as blocks of 8 output units (the A operand, so that the hidden layer comes out
transposed, in the layout the second GEMM reads), the second as 32-wide panels of its transpose (the B
operand). Packing costs two copies of the weights (3.8 MB for the default scorer), so it is cached, keyed
by the parameters' identities and version counters: an optimiser step or an in-place edit repacks.
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F_
from torch import Tensor

from fastrank import _ext, cpu_isa

ROW_BLOCK = 8  # cpu::kLiteRowBlock
PANEL = 32  # cpu::kLitePanel
# The Lq limit of the extension's pair boundary (maxsim_boundary.h), which the LITE kernel shares.
MAX_LQ = 64


def fold_layernorm(weight: Tensor, gamma: Tensor, beta: Tensor, bias: Tensor, dtype: torch.dtype):
    """(W diag(gamma), W diag(gamma) 1, bias + W beta): the LayerNorm before ``weight`` folded into it.
    u is summed from the rounded W diag(gamma), so that r (Wg h) - r m u is exactly Wg (h - m) r."""
    wg = (weight.float() * gamma.float()[None, :]).to(dtype).contiguous()
    u = wg.float().sum(dim=1).contiguous()
    c = (bias.float() + weight.float() @ beta.float()).contiguous()
    return wg, u, c


def _padded(n: int) -> int:
    return -(-n // PANEL) * PANEL


def _a_blocks(weight: Tensor) -> Tensor:
    # (out, in) -> (ceil(out / 32) * 32 / 8, in, 8): block b holds output units 8b .. 8b + 7, one per lane.
    out, fan_in = weight.shape
    w = F_.pad(weight.float(), (0, 0, 0, _padded(out) - out))
    return w.reshape(-1, ROW_BLOCK, fan_in).transpose(1, 2).contiguous()


def _b_panels(weight: Tensor, k_padded: int) -> Tensor:
    # (out, k) -> (ceil(out / 32), k_padded, 32): panel p holds W[32p .. 32p + 31, :]^T.
    out, k = weight.shape
    w = F_.pad(weight.float(), (0, k_padded - k, 0, _padded(out) - out))
    return w.reshape(-1, PANEL, k_padded).transpose(1, 2).contiguous()


def _vec(v: Tensor, n: int) -> Tensor:
    return F_.pad(v.float(), (0, n - v.shape[0])).contiguous()


def pack(params: list[Tensor]) -> tuple[list[Tensor], float]:
    """The 16 packed tensors the extension's ``lite_forward`` takes (lite_cpu.h's LiteWeights order) and
    the output bias, from :func:`fastrank.ops.lite.scorer_params`' 18 tensors."""
    (W1, b1, g1, be1, W2, b2, g2, be2, V1, cb1, g3, be3, V2, cb2, g4, be4, wo, bo) = (p.detach() for p in params)
    r1, ld = W1.shape
    c, lq = V1.shape
    w2g, u2, c2 = fold_layernorm(W2, g1, be1, b2, torch.float32)
    r1p, ldp, cp, lqp = _padded(r1), _padded(ld), _padded(c), _padded(lq)
    packed = [
        _a_blocks(W1), _vec(b1, r1p), _b_panels(w2g, r1p), _vec(u2, ldp), _vec(c2, ldp),
        _vec(g2, ld), _vec(be2, ld),
        _a_blocks(V1), _vec(cb1, cp), _vec(g3, cp), _vec(be3, cp), _b_panels(V2, cp), _vec(cb2, lqp),
        _vec(g4, lq), _vec(be4, lq), wo.float().reshape(-1).contiguous(),
    ]
    return packed, float(bo.float().reshape(()))


def _bf16_pairs(blocks: Tensor) -> Tensor:
    # (..., K, W) float32 with K even -> (..., K / 2, W) int32: each holds the bfloat16 bits of elements
    # k (low half) and k + 1 (high half), the operand layout of vdpbf16ps.
    bits = blocks.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    lo, hi = bits[..., 0::2, :], bits[..., 1::2, :]
    return (lo | (hi << 16)).contiguous()


def pack_bf16(params: list[Tensor]) -> list[Tensor]:
    """The row MLP's weights as bfloat16 pairs along k (lite_cpu.h: w1b, w2b) and u2 summed from the rounded
    W2g (u2b), which bfloat16 inputs use on a path with AVX512-BF16."""
    W1, g1, be1, W2, b2 = (params[i].detach() for i in (0, 2, 3, 4, 5))
    r1, ld = W1.shape
    ld2 = ld + ld % 2
    w1 = F_.pad(_a_blocks(W1), (0, 0, 0, ld2 - ld))  # (R1p/8, ld2, 8)
    w2g, _, _ = fold_layernorm(W2, g1, be1, b2, torch.bfloat16)
    u2b = _vec(w2g.float().sum(dim=1), _padded(ld))
    return [_bf16_pairs(w1), _bf16_pairs(_b_panels(w2g, _padded(r1))), u2b]


_CACHE_LOCK = threading.Lock()
_CACHE: dict[tuple, tuple[tuple, object]] = {}
_CACHE_SIZE = 8  # packings kept (float32 and bfloat16 of a training copy and an evaluation copy, say)


def packed(params: list[Tensor], bf16: bool = False):
    """:func:`pack` (or with ``bf16`` :func:`pack_bf16`), cached on the parameters' identities, storage and
    version counters: any in-place update, an optimiser step or ``load_state_dict`` included, bumps a version
    and so repacks. The entry holds weak references and is used only while they still point at these very
    tensors, so a new scorer allocated where a freed one was never inherits its packing. (A write through
    ``param.data`` bypasses version counters; call :func:`clear_cache` after one.)"""
    key = (bf16,) + tuple((id(p), p.data_ptr(), p._version) for p in params)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None and all(ref() is p for ref, p in zip(hit[0], params)):
        return hit[1]
    value = pack_bf16(params) if bf16 else pack(params)
    with _CACHE_LOCK:
        _CACHE.pop(key, None)
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (tuple(weakref.ref(p) for p in params), value)
    return value


def clear_cache() -> None:
    """Forget every packed scorer (after writing parameters through ``.data``, which torch does not count)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def forward(q: Tensor, d: Tensor, q_mask: Optional[Tensor], d_mask: Optional[Tensor], params: list[Tensor],
            lq: int, ld: int, eps: list[float]) -> Tensor:
    """Scores (F, Y, X) float32 of canonical q (F, Y, Lq, H) and d (F, X, Ld, H) (fastrank.ops.pairs)."""
    ext = _ext.require()
    isa = cpu_isa.selected()
    weights, bo = packed(params)
    pairs = packed(params, bf16=True) if uses_bf16_dot(q.dtype, isa) else None
    q = q if q.stride(-1) == 1 else q.contiguous()
    d = d if d.stride(-1) == 1 else d.contiguous()
    out = torch.empty((q.shape[0], q.shape[1], d.shape[1]), dtype=torch.float32)
    ext.lite_forward(isa, q, d, q_mask, d_mask, weights, pairs, lq, ld, params[0].shape[0], params[8].shape[0],
                     list(eps), bo, out, torch.get_num_threads())
    return out


def uses_bf16_dot(dtype: torch.dtype, isa: str) -> bool:
    """Whether the row MLP runs on bfloat16 dot products (vdpbf16ps): bfloat16 inputs on a path that has them."""
    return dtype == torch.bfloat16 and isa in ("avx512bf16", "amx")


def reasons(*, device_types, dtype: torch.dtype, lq: int, needs_grad: bool = False, **_) -> list[str]:
    """What the C++ LITE kernel cannot take."""
    out = []
    if device_types != {"cpu"}:
        out.append("the C++ LITE kernel runs on the CPU only (CUDA tensors run the Triton kernels)")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        out.append(f"the C++ LITE kernel takes float32, float16 or bfloat16 inputs, got {dtype}")
    if lq > MAX_LQ:
        out.append(f"lq={lq} exceeds the C++ kernel's {MAX_LQ} query tokens")
    if needs_grad:
        out.append("the C++ LITE kernel is forward only (inference): a call that needs gradients runs eager")
    return out


def slower(*, device_types, isa: str = "", underfilled: bool = False, **_) -> list[str]:
    """Where the C++ LITE kernel would lose to eager PyTorch: the scalar path (816 against eager's 1,024
    pairs/s at 1 x 1,000 on the Zen 4 VM), and fewer pairs than threads (a pair runs on one thread: 1 pair on
    2 threads was 0.81x eager there; 2 pairs on 2 threads 1.84x)."""
    if device_types != {"cpu"}:
        return []
    if isa == "scalar":
        return ["the CPU ISA path is scalar (no AVX2): torch's vectorised BLAS is faster"]
    if underfilled:
        return ["fewer (query, doc) pairs than threads: the kernel scores a pair on one thread, eager's GEMMs use them all"]
    return []


def describe(*, isa: str = "", dtype: torch.dtype = torch.float32, **_) -> str:
    vector = {"amx": "AVX-512", "avx512bf16": "AVX-512", "avx512": "AVX-512", "avx2": "AVX2"}.get(isa, "baseline SIMD")
    if uses_bf16_dot(dtype, isa):
        kernel = "row MLP on AVX512-BF16 dot products (vdpbf16ps), column MLP on AVX-512 FMA"
    else:
        kernel = f"{vector} FMA micro-kernel" + ("" if dtype == torch.float32 else f", {dtype} widened to float32")
    return f"C++ CPU kernel (fused LITE forward), ISA path {isa}: {kernel}"


def backward(*_args, **_kwargs):
    # Never chosen for a call that needs gradients (reasons() says why); reaching here is a dispatch bug.
    raise RuntimeError("fastrank.lite_score: the C++ CPU LITE kernel is forward only; a call that needs "
                       "gradients must run the eager reference (backend='reference')")
