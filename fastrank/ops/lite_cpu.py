"""The fused LITE forward on the CPU (csrc/cpu/lite_kernels.inc, one source compiled per ISA): the scorer's
weights packed for its micro-kernels, cached per scorer state, and the call into the extension.

The kernel takes G pairs at a time, runs their row-MLP rows together through the 2400-wide hidden layer in
256-unit chunks (the LayerNorm after it folded into the second Linear, see :func:`fold_layernorm`), then each
pair's column MLP 32 columns at a time, and writes only the score: S and the hidden layers stay in cache.
Training: the forward also writes the row MLP's ReLU'd hidden layer, its LayerNorm statistics and the
second Linear's output (float32, what eager autograd would save in several copies), and the backward runs per
group of pairs: each pair's column MLP forward and backward in cache, then the row MLP's backward as four
GEMMs (dW2, dn1, dW1, dS) with its LayerNorms and ReLUs fused around them. dq = dS d and dd = dS^T q are
einsums here. Under torch.compile the CPU kernel is not used (its autograd is a Python autograd.Function).

Packing (float32 whatever the scorer's dtype; every padded position zero; lite_cpu.h names the layouts): the
first Linear of each MLP as blocks of 8 output units (the A operand, so that the hidden layer comes out
transposed, in the layout the second GEMM reads), the second as 32-wide panels of its transpose (the B
operand). Packing costs two copies of the weights (3.8 MB for the default scorer), so it is cached, keyed
by the parameters' identities and version counters: an optimiser step or an in-place edit repacks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F_
from torch import Tensor

from fastrank import _ext, cpu_isa
from fastrank.ops.pairs import QUERY_TILE, canonicalize
from fastrank.ops.weight_cache import WeightCache

ROW_BLOCK = 8  # cpu::kLiteRowBlock
PANEL = 32  # cpu::kLitePanel
# The extension's pair boundary (maxsim_boundary.h), which the LITE kernels share, takes up to QUERY_TILE
# query tokens per call.
MAX_LQ = QUERY_TILE


def fold_layernorm(weight: Tensor, gamma: Tensor, beta: Tensor, bias: Tensor, dtype: torch.dtype):
    """(W diag(gamma), W diag(gamma) 1, bias + W beta): the LayerNorm before ``weight`` folded into it.
    u is summed from the rounded W diag(gamma), so that r (Wg h) - r m u is exactly Wg (h - m) r."""
    wg = (weight.float() * gamma.float()[None, :]).to(dtype).contiguous()
    u = wg.float().sum(dim=1).contiguous()
    c = (bias.float() + weight.float() @ beta.float()).contiguous()
    return wg, u, c


def panel_padded(n: int) -> int:
    """``n`` rounded up to whole 32-wide panels (the packed layouts' padding; the projection's too)."""
    return -(-n // PANEL) * PANEL


def _a_blocks(weight: Tensor) -> Tensor:
    # (out, in) -> (ceil(out / 32) * 32 / 8, in, 8): block b holds output units 8b .. 8b + 7, one per lane.
    out, fan_in = weight.shape
    w = F_.pad(weight.float(), (0, 0, 0, panel_padded(out) - out))
    return w.reshape(-1, ROW_BLOCK, fan_in).transpose(1, 2).contiguous()


def b_panels(weight: Tensor, k_padded: int) -> Tensor:
    # (out, k) -> (ceil(out / 32), k_padded, 32): panel p holds W[32p .. 32p + 31, :]^T.
    out, k = weight.shape
    w = F_.pad(weight.float(), (0, k_padded - k, 0, panel_padded(out) - out))
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
    r1p, ldp, cp, lqp = panel_padded(r1), panel_padded(ld), panel_padded(c), panel_padded(lq)
    packed = [
        _a_blocks(W1), _vec(b1, r1p), b_panels(w2g, r1p), _vec(u2, ldp), _vec(c2, ldp),
        _vec(g2, ld), _vec(be2, ld),
        _a_blocks(V1), _vec(cb1, cp), _vec(g3, cp), _vec(be3, cp), b_panels(V2, cp), _vec(cb2, lqp),
        _vec(g4, lq), _vec(be4, lq), wo.float().reshape(-1).contiguous(),
    ]
    return packed, float(bo.float().reshape(()))


def _bf16_pairs(blocks: Tensor) -> Tensor:
    # (..., K, W) float32 with K even -> (..., K / 2, W) int32: each holds the bfloat16 bits of elements
    # k (low half) and k + 1 (high half), the operand layout of vdpbf16ps.
    bits = blocks.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    lo, hi = bits[..., 0::2, :], bits[..., 1::2, :]
    return (lo | (hi << 16)).contiguous()


def _bf16_folded(params: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # W1, V1, V2 as given, W2g (the LayerNorm folded in) rounded to bfloat16, and u2b summed from it: what
    # both bfloat16 packings start from.
    W1, g1, be1, W2, b2, V1, V2 = (params[i].detach() for i in (0, 2, 3, 4, 5, 8, 12))
    w2g, _, _ = fold_layernorm(W2, g1, be1, b2, torch.bfloat16)
    return W1, V1, V2, w2g, _vec(w2g.float().sum(dim=1), panel_padded(W1.shape[1]))


def pack_bf16(params: list[Tensor]) -> list[Tensor]:
    """Both MLPs' weights as bfloat16 pairs along k (lite_cpu.h: w1b, w2b, v1b, v2b) and u2 summed from the
    rounded W2g (u2b), which bfloat16 inputs use on a path with AVX512-BF16."""
    W1, V1, V2, w2g, u2b = _bf16_folded(params)
    r1, ld = W1.shape
    c, lq = V1.shape
    w1 = F_.pad(_a_blocks(W1), (0, 0, 0, ld % 2))  # (R1p/8, ld rounded up to even, 8)
    v1 = F_.pad(_a_blocks(V1), (0, 0, 0, lq % 2))  # (Cp/8, lq rounded up to even, 8)
    return [_bf16_pairs(w1), _bf16_pairs(b_panels(w2g, panel_padded(r1))), u2b, _bf16_pairs(v1),
            _bf16_pairs(b_panels(V2, panel_padded(c)))]


TILE = 16  # an AMX tile's columns


def _tile_pairs(weight: Tensor, k_padded: int) -> Tensor:
    # (out, k) -> (ceil(out / 32) * 32 / 16, k_padded / 2, 16) int32: whole AMX B tiles, block b holding
    # W[16b .. 16b + 15, :]^T as bfloat16 pairs along k (the row of a tile: 16 output units, one k pair).
    out, k = weight.shape
    w = F_.pad(weight.float(), (0, k_padded - k, 0, panel_padded(out) - out))
    return _bf16_pairs(w.reshape(-1, TILE, k_padded).transpose(1, 2))


def pack_amx(params: list[Tensor]) -> list[Tensor]:
    """The four Linears as whole AMX tiles (lite_cpu.h: w1t, w2t, v1t, v2t; the LayerNorm folded into W2 as
    for :func:`pack_bf16`) and u2b, which bfloat16 inputs use on the amx path."""
    W1, V1, V2, w2g, u2b = _bf16_folded(params)
    r1, ld = W1.shape
    c, lq = V1.shape
    return [_tile_pairs(W1, panel_padded(ld)), _tile_pairs(w2g, panel_padded(r1)), u2b,
            _tile_pairs(V1, panel_padded(lq)), _tile_pairs(V2, panel_padded(c))]


# Packings kept: forward, bfloat16 and backward of a training copy and an evaluation copy, say.
_CACHE = WeightCache(12)


def packed(params: list[Tensor], kind: str = "forward"):
    """:func:`pack` (``kind`` "forward"), :func:`pack_bf16` ("bf16"), :func:`pack_amx` ("amx") or
    :func:`pack_backward` ("backward"), cached while the parameters are unchanged
    (:class:`~fastrank.ops.weight_cache.WeightCache`)."""
    packers = {"forward": pack, "bf16": pack_bf16, "amx": pack_amx, "backward": pack_backward}
    if kind not in packers:
        raise ValueError(f"lite packing: kind must be one of {sorted(packers)}, got {kind!r}")
    packer = packers[kind]
    return _CACHE.get(kind, params, lambda: packer(params))


def clear_cache() -> None:
    """Forget every packed scorer (after writing parameters through ``.data``, which torch does not count)."""
    _CACHE.clear()


def pack_backward(params: list[Tensor]) -> list[Tensor]:
    """What the backward reads besides the packed forward weights: W1, W2 (not folded), V1 and V2 zero-padded
    and row-major (w1r (R1p, ldp), w2r (ldp, R1p), v1r (Cp, lqp), v2r (lqp, Cp)), and g1, be1 (R1p)."""
    W1, g1, be1, W2, V1, V2 = (params[i].detach().float() for i in (0, 2, 3, 4, 8, 12))
    r1, ld = W1.shape
    c, lq = V1.shape

    def pad(w, rows, cols):
        return F_.pad(w, (0, cols - w.shape[1], 0, rows - w.shape[0])).contiguous()

    r1p, ldp, cp, lqp = panel_padded(r1), panel_padded(ld), panel_padded(c), panel_padded(lq)
    return [pad(W1, r1p, ldp), pad(W2, ldp, r1p), pad(V1, cp, lqp), pad(V2, lqp, cp), _vec(g1, r1p), _vec(be1, r1p)]


def _sizes(params: list[Tensor]) -> tuple[int, int, int, int]:
    return params[0].shape[0], params[0].shape[1], params[8].shape[0], params[8].shape[1]  # r1, ld, c, lq


def forward(q: Tensor, d: Tensor, q_mask: Optional[Tensor], d_mask: Optional[Tensor], params: list[Tensor],
            lq: int, ld: int, eps: list[float], saved: Optional[list[Tensor]] = None) -> Tensor:
    """Scores (F, Y, X) float32 of canonical q (F, Y, Lq, H) and d (F, X, Ld, H) (fastrank.ops.pairs); with
    ``saved`` (:func:`saved_buffers`) the training forward, which fills them for :func:`backward_from`."""
    ext = _ext.require()
    isa = cpu_isa.selected_for("lite", q.dtype)
    weights, bo = packed(params)
    pairs = None
    if saved is None and uses_bf16_dot(q.dtype, isa):
        pairs = packed(params, "amx" if isa == "amx" else "bf16")
    q = q if q.stride(-1) == 1 else q.contiguous()
    d = d if d.stride(-1) == 1 else d.contiguous()
    out = torch.empty((q.shape[0], q.shape[1], d.shape[1]), dtype=torch.float32)
    r1, _, c, _ = _sizes(params)
    ext.lite_forward(isa, q, d, q_mask, d_mask, weights, pairs, lq, ld, r1, c, list(eps), bo, out, saved,
                     torch.get_num_threads())
    return out


def saved_buffers(pairs: int, params: list[Tensor]) -> list[Tensor]:
    """The training forward's outputs for the backward: h1 (pairs, lq, R1p), st1 (pairs, lq, 2), a2 (pairs, lq, ldp)."""
    r1, ld, _, lq = _sizes(params)
    return [torch.empty(pairs, lq, panel_padded(r1)), torch.empty(pairs, lq, 2), torch.empty(pairs, lq, panel_padded(ld))]


def _all_finite(t: Tensor) -> bool:
    # A finite float32 sum means no inf or NaN anywhere: one read, no temporaries (isfinite(t).all() builds
    # three tensors of t's size on the CPU). A sum that overflows only sends the caller down the safe path.
    return bool(torch.isfinite(t.sum(dtype=torch.float32)))


def masked_tokens_zeroed(t: Tensor, mask: Optional[Tensor], pair_axis: int) -> tuple[Tensor, str]:
    """``t`` (q as (F, Y, Lq, H) or d as (F, X, Ld, H)) with the tokens its canonical mask (F, Y, X, L)
    turns off set to 0, and the einsum subscripts of the result. ``pair_axis`` is the mask axis that ``t``
    does not have (X for q, Y for d). dS is already 0 at every masked token, so the zeroing changes the
    product only where ``t`` holds a non-finite value: ``t`` itself is returned when it holds none (one read
    of it, where the copy would cost a read and a write of a fresh tensor). Otherwise a mask constant along
    ``pair_axis`` zeroes a copy of ``t``'s size, and a mask that varies along it (a per-pair mask) a per-pair
    copy, (F, Y, X, L, H)."""
    plain = "fyih" if pair_axis == 2 else "fxjh"
    if mask is None or _all_finite(t):
        return t, plain
    if mask.shape[pair_axis] == 1 or mask.stride(pair_axis) == 0:
        keep = mask.select(pair_axis, 0).unsqueeze(-1)
        return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device)), plain
    per_pair = torch.where(mask.unsqueeze(-1), t.unsqueeze(pair_axis), torch.zeros((), dtype=t.dtype, device=t.device))
    return per_pair, "fyxih" if pair_axis == 2 else "fyxjh"


def backward_from(grad: Tensor, q: Tensor, d: Tensor, q_mask: Optional[Tensor], d_mask: Optional[Tensor],
                  params: list[Tensor], lq: int, ld: int, eps: list[float], saved: list[Tensor],
                  need_tokens: bool = True) -> list[Optional[Tensor]]:
    """dq, dd (canonical shapes, the inputs' dtypes; None without ``need_tokens``, which skips forming dS, a
    quarter of the backward's work) and every parameter's gradient (its shape and dtype) from the upstream
    gradient (F, Y, X) and what the training forward saved."""
    ext = _ext.require()
    weights, bo = packed(params)
    q = q if q.stride(-1) == 1 else q.contiguous()
    d = d if d.stride(-1) == 1 else d.contiguous()
    F, Y, Lq, _ = q.shape
    X, Ld = d.shape[1], d.shape[2]
    r1, _, c, _ = _sizes(params)
    r1p, ldp, cp, lqp = panel_padded(r1), panel_padded(ld), panel_padded(c), panel_padded(lq)
    ds = torch.empty(F * Y * X, lq, ld) if need_tokens else None
    sizes = [r1p * ldp, r1p, r1p, r1p, ldp * r1p, ldp, ldp, ldp, cp * lqp, cp, cp, cp, lqp * cp, lqp, lqp, lqp, lq * ld, 1]
    block = torch.empty(sum(sizes))
    ext.lite_backward(cpu_isa.selected_for("lite", q.dtype), q, d, q_mask, d_mask, weights, lq, ld, r1, c, list(eps), bo, saved,
                      packed(params, "backward"), grad.reshape(-1).float().contiguous(), ds, block,
                      torch.get_num_threads())
    parts = list(torch.split(block, sizes))
    shapes = [(r1p, ldp), (r1p,), (r1p,), (r1p,), (ldp, r1p), (ldp,), (ldp,), (ldp,), (cp, lqp), (cp,), (cp,), (cp,),
              (cp, lqp), (lqp,), (lqp,), (lqp,), (lq * ld,), (1,)]
    parts[12] = parts[12].reshape(cp, lqp).t()  # the kernel sums dV2 transposed (lite_cpu.h)
    shapes[12] = (lqp, cp)
    grads = []
    for part, shape, param in zip(parts, shapes, params):
        g = part.reshape(shape)[tuple(slice(0, n) for n in param.shape)] if len(shape) == param.dim() else part
        grads.append(g.reshape(param.shape).to(param.dtype))
    if ds is None:
        return [None, None] + grads
    ds = ds.reshape(F, Y, X, lq, ld)[..., :Lq, :Ld]
    d_dq, d_sub = masked_tokens_zeroed(d, d_mask, pair_axis=1)
    q_dd, q_sub = masked_tokens_zeroed(q, q_mask, pair_axis=2)
    dq = torch.einsum(f"fyxij,{d_sub}->fyih", ds, d_dq.float()).to(q.dtype)
    dd = torch.einsum(f"fyxij,{q_sub}->fxjh", ds, q_dd.float()).to(d.dtype)
    return [dq, dd] + grads


class _TrainingLite(torch.autograd.Function):
    # Canonical inputs; the activations the kernel saves ride on ctx (they are the kernel's own buffers).
    @staticmethod
    def forward(ctx, q, d, q_mask, d_mask, lq, ld, eps, *params):
        saved = saved_buffers(q.shape[0] * q.shape[1] * d.shape[1], list(params))
        out = forward(q, d, q_mask, d_mask, list(params), lq, ld, eps, saved)
        ctx.lq, ctx.ld, ctx.eps = lq, ld, eps
        ctx.save_for_backward(q, d, q_mask, d_mask, *saved, *params)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, d, q_mask, d_mask, h1, st1, a2, *params = ctx.saved_tensors
        grads = backward_from(grad, q, d, q_mask, d_mask, params, ctx.lq, ctx.ld, ctx.eps, [h1, st1, a2],
                              need_tokens=ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        return (grads[0], grads[1], None, None, None, None, None, *grads[2:])


def score(q: Tensor, d: Tensor, q_mask: Optional[Tensor], d_mask: Optional[Tensor], params: list[Tensor],
          lq: int, ld: int, eps: list[float]) -> Tensor:
    """:func:`fastrank.lite_score` on the CPU kernel, from the op's own (checked, broadcast) arguments, with
    autograd through the fused backward when any input or parameter needs a gradient."""
    masks = [m.shape[:-1] for m in (q_mask, d_mask) if m is not None]
    batch = torch.broadcast_shapes(q.shape[:-2], d.shape[:-2], *masks)
    c = canonicalize(q, d, q_mask, d_mask, batch)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, d, *params)):
        out = _TrainingLite.apply(c.q, c.d, c.q_mask, c.d_mask, lq, ld, list(eps), *params)
    else:
        out = forward(c.q, c.d, c.q_mask, c.d_mask, params, lq, ld, eps)
    return c.restore(out)


def uses_bf16_dot(dtype: torch.dtype, isa: str) -> bool:
    """Whether both MLPs run on bfloat16 products (AMX tiles on the amx path, vdpbf16ps on avx512bf16):
    bfloat16 inputs on a path that has them. Training (the float32 backward) runs float32 whatever this says."""
    return dtype == torch.bfloat16 and isa in ("avx512bf16", "amx")


def reasons(*, device_types, dtype: torch.dtype, lq: int, needs_grad: bool = False, compiling: bool = False,
            **_) -> list[str]:
    """What the C++ LITE kernel cannot take."""
    out = []
    if device_types != {"cpu"}:
        out.append("the C++ LITE kernel runs on the CPU only (CUDA tensors run the Triton kernels)")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        out.append(f"the C++ LITE kernel takes float32, float16 or bfloat16 inputs, got {dtype}")
    if lq > MAX_LQ:
        out.append(f"lq={lq} exceeds the C++ kernel's {MAX_LQ} query tokens")
    if compiling:
        out.append("under torch.compile the C++ LITE kernel is not traced (its autograd is a Python Function); "
                   "the compiled graph runs the eager math")
    return out


def slower(*, device_types, isa: str = "", underfilled: bool = False, **_) -> list[str]:
    """Where the C++ LITE kernels would lose to eager PyTorch, measured on the Zen 4 VM
    (benchmarks/results/lite_cpu_epyc_zen4.md): the scalar path (816 against eager's 1,024 pairs/s at
    1 x 1,000); fewer pairs than threads (a pair runs on one thread: 1 pair on 2 threads was 0.81x eager;
    2 pairs 1.84x). Training on the AVX2 path, once 0.99-1.15x eager and passed over, runs fused since its
    LayerNorm/ReLU backward loops vectorise (1.57-1.69x at 32 x 8 on that VM run as AVX2)."""
    if device_types != {"cpu"}:
        return []
    if isa == "scalar":
        return ["the CPU ISA path is scalar (no AVX2): torch's vectorised BLAS is faster"]
    if underfilled:
        return ["fewer (query, doc) pairs than threads: the kernel scores a pair on one thread, eager's GEMMs use them all"]
    return []


def describe(*, isa: str = "", dtype: torch.dtype = torch.float32, **_) -> str:
    vector = {"amx": "AVX-512", "avx512bf16": "AVX-512", "avx512": "AVX-512", "avx2": "AVX2"}.get(isa, "baseline SIMD")
    if uses_bf16_dot(dtype, isa) and isa == "amx":
        kernel = ("S and the row and column MLPs on AMX tiles (tdpbf16ps, float32 accumulation); "
                  "training runs the float32 AVX-512 kernels")
    elif uses_bf16_dot(dtype, isa):
        kernel = "row and column MLPs on AVX512-BF16 dot products (vdpbf16ps), S on AVX-512 FMA"
    else:
        kernel = f"{vector} FMA micro-kernel" + ("" if dtype == torch.float32 else f", {dtype} widened to float32")
    faster = cpu_isa.why("lite", dtype)
    return f"C++ CPU kernel (fused LITE forward), ISA path {isa}: {kernel}" + (f" ({faster})" if faster else "")


