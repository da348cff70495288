"""Triton kernel for MaxSim against PLAID residual-compressed documents (spec:
:func:`fastrank.ops.maxsim_residual.maxsim_residual_ref`).

    d_r[h]   = centroids[codes[r], h] + weights[(packed[r, (h*b)//8] >> ((h*b)%8)) & (2^b - 1)]
    score[i] = sum_{l < Lq} max_{r in doc(i)} <q_l, d_r>            (a document without rows scores 0)

One program per scored document: the query tile (BLOCK_LQ x BLOCK_H) is loaded once; the document's rows
are walked BLOCK_T at a time, each tile decompressed in registers (bytes gathered per dimension, shifted and
masked to buckets, the weights and centroid rows gathered) and scored with one ``tl.dot`` against the
query, the running max per query token kept across tiles. No decompressed row is written to memory.
Queries longer than QUERY_TILE tokens run in chunks whose scores add (MaxSim is a sum over query tokens).
Every offset formed from a program id or a row number is int64 (T * H can pass 2^31).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastrank.ops.pairs import QUERY_TILE, device_guard, pow2

__all__ = ["residual_forward"]

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the C++ and reference backends cover CPU.
    triton = None

if triton is not None:

    @triton.jit
    def _residual_fwd_kernel(
        Q, P, CODES, OFFS, DOCS, CENT, WTS, OUT,
        Lq, H, sq_l, sp_t, sc_t, scent,
        NBITS: tl.constexpr, HAS_DOCS: tl.constexpr, CODE_U16: tl.constexpr, NORMALIZE: tl.constexpr,
        BLOCK_LQ: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        i = tl.program_id(0).to(tl.int64)
        if HAS_DOCS:
            doc = tl.load(DOCS + i)
        else:
            doc = i
        start = tl.load(OFFS + doc)
        end = tl.load(OFFS + doc + 1)
        offs_l = tl.arange(0, BLOCK_LQ)
        offs_h = tl.arange(0, BLOCK_H)
        offs_t = tl.arange(0, BLOCK_T)
        l_in = offs_l < Lq
        h_in = offs_h < H
        q = tl.load(Q + offs_l[:, None] * sq_l + offs_h[None, :], mask=l_in[:, None] & h_in[None, :], other=0.0)
        byte = (offs_h * NBITS) // 8  # the byte holding dimension h's bucket, and its bit offset
        shift = (offs_h * NBITS) % 8
        best = tl.full([BLOCK_LQ], float("-inf"), tl.float32)
        for j0 in range(start, end, BLOCK_T):
            rows = j0 + offs_t
            r_in = rows < end
            code = tl.load(CODES + rows * sc_t, mask=r_in, other=0).to(tl.int64)
            if CODE_U16:  # uint16 codes arrive as int16 (same bits): undo the sign extension
                code = code & 0xFFFF
            m2 = r_in[:, None] & h_in[None, :]
            bits = tl.load(P + rows[:, None] * sp_t + byte[None, :], mask=m2, other=0).to(tl.int32)
            bucket = (bits >> shift[None, :]) & ((1 << NBITS) - 1)
            w = tl.load(WTS + bucket)  # always in [0, 2^b)
            c = tl.load(CENT + code[:, None] * scent + offs_h[None, :], mask=m2, other=0.0)
            d = tl.where(m2, c + w, 0.0)
            if NORMALIZE:  # each row to unit length (a zero row stays zero), as the spec's normalize=True
                ss = tl.sum(d * d, axis=1)
                # rsqrt of a floored ss: tl.where evaluates both sides, so a masked row's 0 must not divide.
                d = d * tl.where(ss > 0.0, tl.rsqrt(tl.maximum(ss, 1e-30)), 0.0)[:, None]
            s = tl.dot(q, tl.trans(d), input_precision="ieee")  # (BLOCK_LQ, BLOCK_T), float32 as the spec
            s = tl.where(r_in[None, :], s, float("-inf"))
            best = tl.maximum(best, tl.max(s, axis=1))
        score = tl.sum(tl.where(l_in, best, 0.0), axis=0)
        tl.store(OUT + i, tl.where(end > start, score, 0.0))


def residual_forward(q: Tensor, packed: Tensor, codes: Tensor, offsets: Tensor, centroids: Tensor, weights: Tensor,
                     nbits: int, docs: Optional[Tensor] = None, normalize: bool = False) -> Tensor:
    """Scores (M or N,) float32 of one float32 query q (Lq, H); inputs validated by the caller (codes of the
    scored rows included: the kernel indexes centroids with them)."""
    n = offsets.numel() - 1 if docs is None else docs.numel()
    H = q.shape[1]
    out = torch.zeros((n,), dtype=torch.float32, device=q.device)
    if n == 0 or q.shape[0] == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    packed = packed if packed.stride(-1) == 1 else packed.contiguous()
    centroids = centroids if centroids.stride(-1) == 1 else centroids.contiguous()
    offsets, weights = offsets.contiguous(), weights.contiguous()
    has_docs = docs is not None
    docs = docs.contiguous() if has_docs else offsets  # a placeholder pointer when HAS_DOCS is off
    u16 = codes.dtype == torch.uint16
    codes_in = codes.view(torch.int16) if u16 else codes
    interpreted = q.device.type == "cpu"
    block_t = 16 if interpreted else 32
    part = torch.empty((n,), dtype=torch.float32, device=q.device)
    with device_guard(q):
        for l0 in range(0, q.shape[0], QUERY_TILE):
            qc = q[l0:l0 + QUERY_TILE]
            _residual_fwd_kernel[(n,)](
                qc, packed, codes_in, offsets, docs, centroids, weights, part,
                qc.shape[0], H, qc.stride(0), packed.stride(0), codes_in.stride(0), centroids.stride(0),
                NBITS=nbits, HAS_DOCS=has_docs, CODE_U16=u16, NORMALIZE=bool(normalize),
                BLOCK_LQ=pow2(qc.shape[0], 16), BLOCK_H=pow2(H, 16), BLOCK_T=block_t,
            )
            out += part
    return out
