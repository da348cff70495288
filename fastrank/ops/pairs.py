"""The (F, Y, X) pair grid that every pairwise scorer (MaxSim, LITE) runs on.

The leading dims of q (..., Lq, H) and d (..., Ld, H) broadcast like torch.matmul. Each broadcast dim is
one of: F, where q and d both vary; Y, where only q varies; X, where only d varies (or only a mask does).
Kernels then see q as (F, Y, Lq, H), d as (F, X, Ld, H), masks as (F, Y, X, L) and score every (f, y, x)
pair with strides, so the broadcast operand is read, never copied: re-ranking is (1, 1, N), grouped
training (B, 1, K), in-batch all-pairs (1, B, B).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


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
