"""Triton kernels for packed variable-length MaxSim (see :mod:`fastrank.ops.maxsim_packed` for the spec).

    tokens (T, H) holds N documents back to back; document i owns rows offsets[i]:offsets[i+1].
    score[i]  = sum_{l valid} max_{j in doc i} s(l, j),   s(l, j) = <q_{f(i),l}, tokens_j>  (times scales[j]
                for int8 tokens); an empty document scores 0.
    dq[f, l]  = sum_{i : f(i) = f} grad[i] * tokens[offsets[i] + argmax[i, l]]
    dt[r]     = grad[i] * sum_l [offsets[i] + argmax[i, l] = r] q[f(i), l]      (r in document i)

f(i) = 0 when one query is shared by every document (Fq = 1), f(i) = i for one query per document (Fq = N):
the launchers express both with a query stride of 0 or q.stride(0), so the kernels never branch on it.

The kernels follow the padded ones in :mod:`fastrank.ops.maxsim` (the forward autotuned over the same
configs: DOCS documents a program, a shared query held across them, S built a pipelined tile at a time
and split over H when H is wide, NaNs counted so they reach the score, ties to the earliest row) and share
with them what :mod:`fastrank.ops.maxsim_triton_shared` holds (the configs and their pruning, the dq
gather); what changes is that a document's rows are found through ``offsets`` instead of a fixed Ld, so no
padded row is ever loaded or scored. Every offset built from a program id or a loop counter is int64: T * H can
exceed 2^31 (tests/test_hostile_maxsim.py checks the IR).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastrank.ops import maxsim as padded
from fastrank.ops.maxsim_triton_shared import (bucket, check_grid, h_block_cap, interpreter_meta, interpreting,
                                               loop_split)
from fastrank.ops.pairs import (KERNEL_DTYPES, QUERY_TILE, backward_by_query_chunks, cuda_arch, device_guard,
                                forward_by_query_chunks, inner_contiguous, pow2)

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the C++ and reference backends cover CPU.
    triton = None

# --------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------
if triton is not None:
    # dq is the padded gather, rows found by offsets; the forward shares the padded one's tuning configs.
    from fastrank.ops.maxsim_triton_shared import FORWARD_CONFIGS, maxsim_bwd_dq_kernel, prune_forward_configs

    # Tuned like the padded forward (see FORWARD_CONFIGS): DOCS documents a program, q held across
    # them when it is shared and fits one BLOCK_H, the row-tile loop pipelined, autotuned per bucket.
    @triton.autotune(configs=FORWARD_CONFIGS, key=["LQ_BUCKET", "LD_BUCKET", "H", "PAIRS_BUCKET"],
                     prune_configs_by={"early_config_prune": prune_forward_configs})
    @triton.jit
    def _packed_fwd_kernel(
        Q, T, OFFS, SC, QM, OUT, ARG,
        N, Lq, H,
        sq_f, sq_l, st_t, sqm_f, sqm_l,
        LQ_BUCKET, LD_BUCKET, PAIRS_BUCKET,
        HAS_QM: tl.constexpr, INT8: tl.constexpr, STORE_ARG: tl.constexpr, PRECISION: tl.constexpr,
        SHARED_Q: tl.constexpr, SPLIT_H: tl.constexpr, BLOCK_LQ: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_LD: tl.constexpr, DOCS: tl.constexpr,
    ):
        # Program = DOCS consecutive documents; sq_f / sqm_f are 0 when the query is shared, so f = doc
        # either way. Offsets from the program id and loop counters are int64 (rows * H passes 2^31).
        first = tl.program_id(0).to(tl.int64) * DOCS
        offs_l = tl.arange(0, BLOCK_LQ)
        offs_h = tl.arange(0, BLOCK_H)
        offs_t = tl.arange(0, BLOCK_LD)
        row_in = offs_l < Lq
        h_in = offs_h[None, :] < H
        if SHARED_Q and not SPLIT_H:
            # One query for every document: read once per program, held across its documents.
            q_tile = tl.load(Q + offs_l[:, None] * sq_l + offs_h[None, :], mask=row_in[:, None] & h_in, other=0.0)
            if INT8:
                q_tile = q_tile.to(tl.float32)
        for doc in range(first, tl.minimum(first + DOCS, N)):
            start = tl.load(OFFS + doc)
            end = tl.load(OFFS + doc + 1)
            q_ptrs = Q + doc * sq_f + offs_l[:, None] * sq_l + offs_h[None, :]
            if not SHARED_Q and not SPLIT_H:
                q_tile = tl.load(q_ptrs, mask=row_in[:, None] & h_in, other=0.0)
                if INT8:
                    q_tile = q_tile.to(tl.float32)
            t_ptrs = T + (start + offs_t)[:, None] * st_t + offs_h[None, :]
            if SPLIT_H:
                # The H-split loop reads q and token slices at scalar pointers plus these int32 in-tile
                # offsets, not through per-thread 64-bit pointer tensors carried across the row-tile loop:
                # ptxas (sm_90) spilled such long-lived per-thread values (fastrank.kernel_report, int8).
                q_off = offs_l[:, None] * sq_l + offs_h[None, :]
                t_off = offs_t[:, None] * st_t + offs_h[None, :]
            best = tl.full([BLOCK_LQ], float("-inf"), tl.float32)
            best_j = tl.full([BLOCK_LQ], -1, tl.int32)
            saw_nan = tl.zeros([BLOCK_LQ], tl.int32)
            # Every tile of this loop holds at least one of the document's rows, so no empty-tile test;
            # pipelined with the config's num_stages.
            for j0 in tl.range(start, end, BLOCK_LD):
                offs_j = j0 + offs_t
                j_rel = (j0 - start).to(tl.int32)  # the tile's first row within the document
                if not SPLIT_H:
                    col_in = offs_j < end
                    tile = tl.load(t_ptrs, mask=col_in[:, None] & h_in, other=0)
                    if INT8:
                        # int8 codes are exact in float32; q may be any float dtype, the product is float32.
                        tile = tile.to(tl.float32)
                    s = tl.dot(q_tile, tl.trans(tile), input_precision=PRECISION)
                else:
                    # The same bound as offs_j < end, in int32 (at most BLOCK_LD rows remain): no 64-bit
                    # per-row index is held across the H loop.
                    col_in = offs_t < tl.minimum(end - j0, BLOCK_LD).to(tl.int32)
                    s = tl.zeros([BLOCK_LQ, BLOCK_LD], tl.float32)
                    q_h = Q + doc * sq_f
                    t_h = T + j0 * st_t
                    for h0 in tl.range(0, H, BLOCK_H, num_stages=1):  # not pipelined: see the padded kernel
                        hh = (h0 + offs_h)[None, :] < H
                        qt = tl.load(q_h + q_off, mask=row_in[:, None] & hh, other=0.0)
                        tile = tl.load(t_h + t_off, mask=col_in[:, None] & hh, other=0)
                        if INT8:
                            qt = qt.to(tl.float32)
                            tile = tile.to(tl.float32)
                        s = tl.dot(qt, tl.trans(tile), s, input_precision=PRECISION)
                        q_h += BLOCK_H
                        t_h += BLOCK_H
                t_ptrs += BLOCK_LD * st_t
                if INT8:
                    # scale_j * <q, code_j> rather than <q, scale_j * code_j>: one multiply per S entry instead
                    # of one per loaded element; the two differ only by float32 rounding.
                    # Indexed from the document's first row (a scalar) by int32 rows, like j_rel: a per-thread
                    # 64-bit SC + offs_j base lived across the H loop and was spilled.
                    sc = tl.load(SC + start + (j_rel + offs_t).to(tl.int64), mask=col_in, other=0.0)
                    s = s * sc[None, :]
                # tl.max does not propagate NaN on every target (and the interpreter's argmax raises on an
                # all-NaN row): count the NaNs of the document's rows so they reach the score, then take
                # max and argmax over the rest. Rows past the document are counted out: q * 0 there can be
                # NaN (inf * 0) where the real rows give inf.
                nan = s != s  # noqa: PLR0124 (the NaN test every target compiles)
                saw_nan += tl.sum((nan & col_in[None, :]).to(tl.int32), axis=1)
                s = tl.where(nan | ~col_in[None, :], float("-inf"), s)
                blk_best = tl.max(s, axis=1)
                blk_j = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int32) + j_rel
                # Strict > keeps the earliest row on ties, like torch.max; best_j < 0 takes the first tile
                # even when every similarity is -inf, so such a row still routes its gradient to row 0 as
                # torch does.
                take = (blk_best > best) | (best_j < 0)
                best = tl.where(take, blk_best, best)
                best_j = tl.where(take, blk_j, best_j)

            row_ok = row_in & (end > start)
            if HAS_QM:
                qm = tl.load(QM + doc * sqm_f + offs_l * sqm_l, mask=row_in, other=0)
                row_ok = row_ok & (qm != 0)
            best = tl.where(saw_nan > 0, float("nan"), best)
            tl.store(OUT + doc, tl.sum(tl.where(row_ok, best, 0.0), axis=0))
            if STORE_ARG:
                tl.store(ARG + doc * Lq + offs_l, tl.where(row_ok, best_j, -1), mask=row_in)

    @triton.jit
    def _packed_bwd_dt_kernel(
        Q, G, ARG, OFFS, DT,
        Lq, H,
        sq_f, sq_l,
        PRECISION: tl.constexpr, BLOCK_LQ: tl.constexpr, BLOCK_LD: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # Program (document, H block), walking the document's rows a tile at a time. The scatter of
        # g * q_l to row argmax_l is a matmul of a one-hot (BLOCK_LD x Lq) routing matrix with q, so it runs
        # on tensor cores; each row belongs to one document, so each output element has one writer and
        # no atomics are needed. The q tile is loaded once per program and reused for every row tile.
        doc = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
        start = tl.load(OFFS + doc)
        end = tl.load(OFFS + doc + 1)
        offs_l = tl.arange(0, BLOCK_LQ)
        row_in = offs_l < Lq
        h_in = h[None, :] < H
        j = tl.load(ARG + doc * Lq + offs_l, mask=row_in, other=-1)
        g = tl.load(G + doc)
        qt = tl.load(Q + doc * sq_f + offs_l[:, None] * sq_l + h[None, :], mask=row_in[:, None] & h_in, other=0.0)
        for j0 in tl.range(start, end, BLOCK_LD):  # pipelined: stores of one tile overlap the next
            rel = (j0 - start).to(tl.int32) + tl.arange(0, BLOCK_LD)
            route = (rel[:, None] == j[None, :]).to(qt.dtype)
            acc = g * tl.dot(route, qt, input_precision=PRECISION)
            offs_j = j0 + tl.arange(0, BLOCK_LD)
            tl.store(DT + offs_j[:, None] * H + h[None, :], acc, mask=(offs_j[:, None] < end) & h_in)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------
def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("fastrank.ops.maxsim_packed_triton: triton is not importable; pip install triton "
                           "(or use the cpp or reference backend of fastrank.maxsim_packed)")


def _query_strides(q: Tensor) -> tuple[int, int]:
    """(stride between documents' queries, stride between query tokens): 0 for a shared query, so the
    kernels index q with the document number whatever Fq is."""
    return (0 if q.shape[0] == 1 else q.stride(0)), q.stride(1)


def packed_forward(q: Tensor, tokens: Tensor, offsets: Tensor, q_mask: Tensor | None,
                   scales: Tensor | None, save_argmax: bool) -> tuple[Tensor, Tensor]:
    """Scores (N,) float32 and, when ``save_argmax``, int32 argmax (N, Lq) relative to each document's first
    row (-1 for masked query tokens and empty documents); else an empty (0,) int32 tensor.

    q: (Fq, Lq, H), Fq in {1, N}; tokens: (T, H) of q's dtype, or int8 with float32 ``scales`` (T,);
    offsets: validated int64 (N + 1,); q_mask: bool (Fq, Lq) or None."""
    _require_triton()
    q, tokens = inner_contiguous(q), inner_contiguous(tokens)
    n = offsets.numel() - 1
    fq = q.shape[0]
    int8 = scales is not None
    if int8 and tokens.dtype != torch.int8:
        raise TypeError(f"maxsim_packed (triton): scales go with int8 tokens, got tokens {tokens.dtype}")
    if q.dtype not in KERNEL_DTYPES or (not int8 and tokens.dtype != q.dtype):
        raise TypeError(f"maxsim_packed (triton): q and tokens must be one of {KERNEL_DTYPES} (or int8 tokens "
                        f"with scales), got q {q.dtype} and tokens {tokens.dtype}")
    if fq not in (1, n):
        raise ValueError(f"maxsim_packed (triton): q must hold 1 or N={n} queries, got {fq}")
    # Queries longer than the QUERY_TILE-token tile run in chunks whose scores add (MaxSim is separable).
    return forward_by_query_chunks(lambda qc, mc: _forward_tile(qc, tokens, offsets, mc, scales, save_argmax),
                                   q, q_mask, save_argmax)


def _forward_tile(q: Tensor, tokens: Tensor, offsets: Tensor, q_mask: Tensor | None, scales: Tensor | None,
                  save_argmax: bool) -> tuple[Tensor, Tensor]:
    n = offsets.numel() - 1
    _, lq, h = q.shape
    int8 = scales is not None
    check_grid((n,), "maxsim_packed")  # DOCS = 1: the largest grid any config launches
    out = torch.empty((n,), device=q.device, dtype=torch.float32)
    arg = torch.empty((n, lq) if save_argmax else (0,), device=q.device, dtype=torch.int32)
    if n == 0:
        return out, arg
    sq_f, sq_l = _query_strides(q)
    if q_mask is not None:
        sqm_f, sqm_l = (0 if q_mask.shape[0] == 1 else q_mask.stride(0)), q_mask.stride(1)
    else:
        sqm_f = sqm_l = 0
    float32_math = q.dtype == torch.float32 or int8
    block_lq = pow2(lq, 16, QUERY_TILE)
    # float32 operands (including int8 widened in-kernel) take twice the bytes of 16-bit ones per element.
    block_h = pow2(h, 16, 64 if float32_math else 128)
    if h > block_h:
        block_h = h_block_cap(float32_math, cuda_arch(q))  # split over H: see the padded launcher

    def grid(meta):
        return (triton.cdiv(n, meta["DOCS"]),)

    args = (q, tokens, offsets, scales if int8 else out, q_mask if q_mask is not None else out, out, arg,
            n, lq, h,
            sq_f, sq_l, tokens.stride(0), sqm_f, sqm_l,
            # The mean document length stands for Ld in the tuning key (read from the shapes, no sync).
            block_lq, bucket(tokens.shape[0] // n), bucket(n))
    meta = dict(HAS_QM=q_mask is not None, INT8=int8, STORE_ARG=save_argmax,
                # float32 keeps float32 products (TF32 would cost ~1e-3 relative error); 16-bit ignores it.
                PRECISION="ieee" if float32_math else "tf32",
                SHARED_Q=q.shape[0] == 1, SPLIT_H=h > block_h, BLOCK_LQ=block_lq, BLOCK_H=block_h)
    with device_guard(q):
        if interpreting():
            _packed_fwd_kernel.fn[grid](*args, **meta, **interpreter_meta(_packed_fwd_kernel))
        else:
            _packed_fwd_kernel[grid](*args, **meta)
    return out, arg


def packed_backward(q: Tensor, tokens: Tensor, offsets: Tensor, grad: Tensor, argmax: Tensor,
                    need_dq: bool, need_dt: bool, deterministic: bool) -> tuple[Tensor | None, Tensor | None]:
    """(dq (Fq, Lq, H) in q's dtype or None, dtokens (T, H) in tokens' dtype or None), following the argmax
    route of :func:`packed_forward`. Accumulates in float32. With a shared query and
    ``deterministic=False`` the sum over documents may be split into chunks added with float atomics."""
    _require_triton()
    if tokens.dtype == torch.int8:
        raise TypeError("maxsim_packed (triton): int8 tokens are scored forward only (no backward)")
    q, tokens = inner_contiguous(q), inner_contiguous(tokens)
    grad = grad.contiguous().float()
    dq, dt = backward_by_query_chunks(
        lambda qc, ac: _backward_tile(qc, tokens, offsets, grad, ac, need_dq, need_dt, deterministic), q, argmax, need_dq)
    return (dq.to(q.dtype) if need_dq else None), (dt.to(tokens.dtype) if need_dt else None)


def _backward_tile(q: Tensor, tokens: Tensor, offsets: Tensor, grad: Tensor, argmax: Tensor,
                   need_dq: bool, need_dt: bool, deterministic: bool) -> tuple[Tensor | None, Tensor | None]:
    """float32 (dq, dtokens) of one query chunk of at most QUERY_TILE tokens."""
    n = offsets.numel() - 1
    fq, lq, h = q.shape
    block_lq = pow2(lq, 16, QUERY_TILE)
    dq = dt = None
    if need_dq:
        docs_per_query = n if fq == 1 else 1
        block_h = pow2(h, 16, 64)
        h_blocks = triton.cdiv(h, block_h)
        # Only a shared query reduces over documents; one query per document has a single writer per row.
        # The device's program count is looked up through the padded op's module on every call (as its own
        # launchers do), so that whoever stands in another count there changes both ops.
        split = loop_split(fq * h_blocks, docs_per_query, deterministic, padded.parallel_programs(q.device))
        chunk = max(1, triton.cdiv(docs_per_query, split))
        alloc = torch.zeros if (split > 1 or n == 0) else torch.empty
        dq = alloc((fq, lq, h), device=q.device, dtype=torch.float32)
        if n > 0 and dq.numel() > 0:
            # The padded kernel's gather, its rows found through offsets (query f owns documents
            # f * X .. f * X + X - 1: X = N for a shared query, 1 for one query per document).
            grid = check_grid((fq, h_blocks, triton.cdiv(docs_per_query, chunk)), "maxsim_packed backward (dq)")
            with device_guard(q):
                maxsim_bwd_dq_kernel[grid](
                    tokens, grad, argmax, dq, offsets,
                    1, docs_per_query, lq, h, chunk, 0, 0, tokens.stride(0),
                    PACKED=True, ATOMIC=split > 1, BLOCK_LQ=block_lq, BLOCK_H=block_h, num_warps=4, num_stages=3,
                )
    if need_dt:
        # Every row belongs to exactly one document (offsets partition 0..T), so every row is written.
        dt = torch.empty(tokens.shape, device=tokens.device, dtype=torch.float32)
        if n > 0 and dt.numel() > 0:
            sq_f, sq_l = _query_strides(q)
            # As the padded dd launcher: a 64-token query tile halves the row tile, float32 on sm_8x the H slice.
            block_ld = 64 if block_lq <= 32 else 32
            block_h = pow2(h, 16, h_block_cap(q.dtype == torch.float32, cuda_arch(q)))
            grid = check_grid((n, triton.cdiv(h, block_h)), "maxsim_packed backward (dtokens)")
            with device_guard(q):
                _packed_bwd_dt_kernel[grid](
                    q, grad, argmax, offsets, dt,
                    lq, h, sq_f, sq_l,
                    PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                    BLOCK_LQ=block_lq, BLOCK_LD=block_ld, BLOCK_H=block_h, num_warps=4, num_stages=3,
                )
    return dq, dt
