"""The (F, Y, X) pair grid that every pairwise scorer (MaxSim, LITE) runs on.

The leading dims of q (..., Lq, H) and d (..., Ld, H) broadcast like torch.matmul. Each broadcast dim is
one of: F, where q and d both vary; Y, where only q varies; X, where only d varies (or only a mask does).
Kernels then see q as (F, Y, Lq, H), d as (F, X, Ld, H), masks as (F, Y, X, L) and score every (f, y, x)
pair with strides, so the broadcast operand is read, never copied: re-ranking is (1, 1, N), grouped
training (B, 1, K), in-batch all-pairs (1, B, B).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


def device_guard(t: Tensor):
    """Make ``t``'s GPU current for the launches inside: Triton and the extension launch on the current
    device's stream, so a tensor on a GPU that is not the current one would otherwise be read through the
    wrong context. A no-op off CUDA. Every kernel launch in fastrank.ops sits inside one (a test checks)."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def cuda_arch(t: Tensor) -> Optional[int]:
    """The compute capability of ``t``'s GPU as 10 * major + minor (80, 89, 90); None off CUDA (the Triton
    interpreter). Launchers that pick block sizes per architecture ask it here, so that the static checks
    (fastrank.kernel_report) can stand in an architecture for CPU tensors in one place."""
    if t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def inner_contiguous(t: Tensor) -> Tensor:
    """Kernels index the embedding dim with stride 1; copy only when it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass
class PairGrid:
    """Inputs in canonical form: q (F, Y, Lq, H), d (F, X, Ld, H), masks (F, Y, X, L) or None."""

    q: Tensor
    d: Tensor
    q_mask: Optional[Tensor]
    d_mask: Optional[Tensor]
    restore: Callable[[Tensor], Tensor]  # (F, Y, X) scores -> the broadcast batch shape


def with_rank(t: Tensor, rank: int) -> Tensor:
    return t if t.dim() == rank else t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))


def canonicalize(q: Tensor, d: Tensor, q_mask: Optional[Tensor], d_mask: Optional[Tensor], batch) -> PairGrid:
    # Views only, and as few as possible: this runs on every call, and re-ranking calls are short.
    n = len(batch)
    qv, dv = with_rank(q, n + 2), with_rank(d, n + 2)
    both, q_only, d_only = [], [], []
    expand_d = False
    for k, size in enumerate(batch):
        if size == 1:
            continue
        if qv.shape[k] == size and dv.shape[k] == size:
            both.append(k)
        elif qv.shape[k] == size:
            q_only.append(k)
        else:  # d varies here, or only a mask does (then d is expanded: a view, and autograd sums it)
            d_only.append(k)
            expand_d = expand_d or dv.shape[k] == 1
    if expand_d:
        dv = dv.expand([batch[k] if k in d_only else dv.shape[k] for k in range(n)] + list(dv.shape[-2:]))
    order = both + q_only + d_only
    identity = order == sorted(order)  # dims of size 1 may sit anywhere: they vanish in the reshapes
    perm = order + [k for k in range(n) if k not in order]
    F = math.prod([batch[k] for k in both])
    Y = math.prod([batch[k] for k in q_only])
    X = math.prod([batch[k] for k in d_only])
    if not identity:
        qv = qv.permute(perm + [n, n + 1])
        dv = dv.permute(perm + [n, n + 1])
    qc = qv.reshape(F, Y, *q.shape[-2:])
    dc = dv.reshape(F, X, *d.shape[-2:])

    def mask(m: Optional[Tensor]) -> Optional[Tensor]:
        if m is None:
            return None
        mv = m.expand(tuple(batch) + (m.shape[-1],))
        if not identity:
            mv = mv.permute(perm + [n])
        return mv.reshape(F, Y, X, m.shape[-1])

    if identity:
        restore = lambda scores: scores.reshape(batch)  # noqa: E731
    else:
        inverse = sorted(range(len(order)), key=lambda i: order[i])

        def restore(scores: Tensor) -> Tensor:
            return scores.reshape([batch[k] for k in order]).permute(inverse).reshape(batch)

    return PairGrid(qc, dc, mask(q_mask), mask(d_mask), restore)


def broadcast_shapes(shapes) -> Optional[torch.Size]:
    """torch.broadcast_shapes for a few short shapes, without its per-call overhead; None if incompatible."""
    shapes = list(shapes)
    n = max(len(s) for s in shapes)
    out = [1] * n
    for s in shapes:
        for i, size in enumerate(s, start=n - len(s)):
            if size != 1:
                if out[i] != 1 and out[i] != size:
                    return None
                out[i] = size
    return torch.Size(out)


# --------------------------------------------------------------------------------------------------------
# Plumbing shared by the pair ops (maxsim, maxsim_packed, lite): dtypes, tile sizes, argument checks.
# --------------------------------------------------------------------------------------------------------
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # accepted (float64: reference)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # run by the Triton kernels
QUERY_TILE = 64  # query tokens one Triton program holds (MaxSim's C++ kernel too)
FLOAT_NAMES = "float32, float16, bfloat16 or float64"

DOUBLE_BACKWARD_ERROR = (
    "{op}: double backward (the gradient of a gradient, e.g. a gradient penalty) is not supported: {why}. Use "
    "the reference, {ref}, whose autograd supports it, or backend='reference'."
)


def pow2(n: int, lo: int, hi: int | None = None) -> int:
    """The power-of-two block covering ``n``, clamped to [lo, hi] (Triton tiles are powers of two)."""
    p = 1 << max(0, int(n) - 1).bit_length()
    return max(lo, p if hi is None else min(hi, p))


def dot_precision(t: Tensor) -> str:
    """``tl.dot``'s input_precision for ``t``'s dtype: float32 inputs keep float32 products (TF32 would cost
    ~1e-3 relative error in scores, more through LITE's two wide layers); 16-bit inputs multiply exactly."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def dtype_reasons(dtype: torch.dtype, interpreter: bool = False) -> list[str]:
    """Why the Triton kernels (or, with ``interpreter``, the interpreter: float32 only) cannot take ``dtype``."""
    allowed = (torch.float32,) if interpreter else KERNEL_DTYPES
    if dtype in allowed:
        return []
    return [f"dtype {dtype} not supported (supports {', '.join(str(t) for t in allowed)})"]


# Queries longer than QUERY_TILE tokens: MaxSim is separable over query tokens (a sum of per-token maxima),
# so every MaxSim launcher (Triton and C++, padded and packed) scores them in chunks.
def forward_by_query_chunks(run: Callable, q: Tensor, q_mask: Optional[Tensor], save_argmax: bool):
    """``run(q_chunk, q_mask_chunk) -> (float32 scores, int32 argmax (..., chunk) or empty)`` over chunks of at
    most QUERY_TILE query tokens (dim -2 of q, -1 of q_mask): the scores add, the argmaxes concatenate."""
    lq = q.shape[-2]
    if lq <= QUERY_TILE:
        return run(q, q_mask)
    total, args = None, []
    for i in range(0, lq, QUERY_TILE):
        chunk = slice(i, min(i + QUERY_TILE, lq))
        out, arg = run(q[..., chunk, :], None if q_mask is None else q_mask[..., chunk])
        total = out if total is None else total.add_(out)
        args.append(arg)
    return total, (torch.cat(args, dim=-1) if save_argmax else args[0])


def backward_by_query_chunks(run: Callable, q: Tensor, argmax: Tensor, need_dq: bool):
    """``run(q_chunk, argmax_chunk) -> (float32 dq chunk or None, float32 dd or None)`` over the chunks of
    :func:`forward_by_query_chunks`: dq is the chunks' dq side by side, dd their sum (in float32, before
    the one rounding to the input dtype)."""
    lq = q.shape[-2]
    if lq <= QUERY_TILE:
        return run(q, argmax.contiguous())
    dqs, dd = [], None
    for i in range(0, lq, QUERY_TILE):
        chunk = slice(i, min(i + QUERY_TILE, lq))
        dq_c, dd_c = run(q[..., chunk, :], argmax[..., chunk].contiguous())
        dqs.append(dq_c)
        dd = dd_c if dd is None else dd.add_(dd_c)
    return (torch.cat(dqs, dim=-2) if need_dq else None), dd


def check_pair_inputs(op: str, q, d, q_mask, d_mask, extra_devices: Optional[dict] = None,
                      limits: Optional[tuple[int, int]] = None) -> torch.Size:
    """Validate a pair op's q (..., Lq, H), d (..., Ld, H) and bool masks (..., L), every error naming the
    argument; returns the broadcast batch shape. ``extra_devices`` (name -> device) must match too (a
    scorer's weights); ``limits`` = (lq, ld) caps the token counts (LITE's fixed grid)."""
    for name, t in (("q", q), ("d", d)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{op}: {name} must have shape (..., L{name}, H), got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be {FLOAT_NAMES}, got {t.dtype}")
    if q.dtype != d.dtype:
        raise TypeError(f"{op}: q and d must have the same dtype, got q {q.dtype} and d {d.dtype}")
    if q.shape[-1] != d.shape[-1]:
        raise ValueError(
            f"{op}: q and d must share the embedding dim H, got q {tuple(q.shape)} (H={q.shape[-1]}) "
            f"and d {tuple(d.shape)} (H={d.shape[-1]})"
        )
    if limits is not None:
        lq, ld = limits
        if q.shape[-2] > lq:
            raise ValueError(f"{op}: q has Lq={q.shape[-2]} tokens, more than the scorer's lq={lq}; truncate the query")
        if d.shape[-2] > ld:
            raise ValueError(f"{op}: d has Ld={d.shape[-2]} tokens, more than the scorer's ld={ld}; truncate the document")
    for name, m, owner, length in (("q_mask", q_mask, "q", q.shape[-2]), ("d_mask", d_mask, "d", d.shape[-2])):
        if m is None:
            continue
        if not isinstance(m, Tensor):
            raise TypeError(f"{op}: {name} must be a bool tensor or None, got {type(m).__name__}")
        if m.dtype != torch.bool:
            raise TypeError(f"{op}: {name} must be a bool tensor, got {m.dtype}")
        if m.dim() < 1 or m.shape[-1] != length:
            raise ValueError(
                f"{op}: {name} must have shape (..., {length}) to match {owner}'s {length} tokens, got {tuple(m.shape)}"
            )
    devices = {name: t.device for name, t in (("q", q), ("d", d), ("q_mask", q_mask), ("d_mask", d_mask)) if t is not None}
    devices.update(extra_devices or {})
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")
    shapes = {"q": q.shape[:-2], "d": d.shape[:-2]}
    if q_mask is not None:
        shapes["q_mask"] = q_mask.shape[:-1]
    if d_mask is not None:
        shapes["d_mask"] = d_mask.shape[:-1]
    batch = broadcast_shapes(shapes.values())
    if batch is None:
        raise ValueError(
            f"{op}: the leading (batch) dims do not broadcast: " + ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
        )
    return batch
