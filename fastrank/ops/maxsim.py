"""MaxSim (ColBERT late interaction), fused: the (..., Lq, Ld) similarity matrix never reaches memory.

    score = sum_{i valid} max_{j valid} <q_i, d_j>

Read top to bottom: Triton kernels (forward, backward), their launchers, the C++ launchers, the
torch.library custom ops with their autograd, the public :func:`maxsim`, and :func:`maxsim_ref`, the
plain PyTorch reference that is the spec.

Broadcasting. The leading dims of q (..., Lq, H) and d (..., Ld, H) broadcast like torch.matmul. Kernels
see a canonical (F, Y, X) pair grid: F = dims where q and d both vary, Y = dims where only q varies,
X = dims where only d varies, so q is (F, Y, Lq, H) and d is (F, X, Ld, H) and the broadcast operand is
never copied. Re-ranking is (1, 1, N), grouped training (B, 1, K), in-batch all-pairs (1, B, B).

Backward follows the argmax route: the forward stores, per pair and query token, the index of the
maximising doc token (-1 for padded query tokens and empty docs); the gradient of q_i is g * d_argmax
and the gradient of d_j collects g * q_i from every query token whose argmax is j.

GPU tuning (issue 13). The forward scores several documents of one query per program with q held across
them, pipelines its doc-tile loop and is autotuned per bucket of sizes (FORWARD_CONFIGS); the interpreter,
which runs programs one by one on the CPU, launches one config (INTERPRETER_CONFIG). Every offset built from
a program id or a loop counter is int64 (the sm_90 IR is checked by tests/test_hostile_maxsim.py), grids
are checked against CUDA's limits (check_grid), and every launch runs under ``device_guard``. What the
padded and packed kernels share (the configs and their pruning, the dq gather, the launch helpers) is in
:mod:`fastrank.ops.maxsim_triton_shared`.

Long queries. Both kernels hold the query in one tile of at most QUERY_TILE tokens. MaxSim is separable over
query tokens (the score is a sum of per-token maxima), so a longer query is scored in chunks of QUERY_TILE
tokens whose scores add; the argmax of each chunk is its slice of the full argmax, the chunks' dq are
slices of dq and their dd add (``forward_by_query_chunks``, ``backward_by_query_chunks`` in
:mod:`fastrank.ops.pairs`).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from fastrank import _ext, cpu_isa, dispatch
from fastrank.ops.maxsim_reasons import cpu_slower, kernel_reasons
from fastrank.ops.maxsim_triton_shared import (bucket, check_grid, h_block_cap, interpreter_meta, interpreting,
                                               loop_split)
from fastrank.ops.pairs import (DOUBLE_BACKWARD_ERROR, QUERY_TILE, backward_by_query_chunks, canonicalize,
                                check_pair_inputs, cuda_arch, device_guard, dot_precision, forward_by_query_chunks,
                                inner_contiguous, pow2)

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the C++ and reference backends cover CPU.
    triton = None


# --------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------
if triton is not None:
    from fastrank.ops.maxsim_triton_shared import FORWARD_CONFIGS, maxsim_bwd_dq_kernel, prune_forward_configs

    # Tuned per bucket of sizes over FORWARD_CONFIGS (issue 13, see fastrank.ops.maxsim_triton_shared).
    @triton.autotune(configs=FORWARD_CONFIGS, key=["LQ_BUCKET", "LD_BUCKET", "H", "PAIRS_BUCKET"],
                     prune_configs_by={"early_config_prune": prune_forward_configs})
    @triton.jit
    def _maxsim_fwd_kernel(
        Q, D, QM, DM, OUT, ARG,
        Y, X, Lq, Ld, H,
        sq_f, sq_y, sq_t, sd_f, sd_x, sd_t,
        sqm_f, sqm_y, sqm_x, sqm_t, sdm_f, sdm_y, sdm_x, sdm_t,
        LQ_BUCKET, LD_BUCKET, PAIRS_BUCKET,
        HAS_QM: tl.constexpr, HAS_DM: tl.constexpr, STORE_ARG: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_LQ: tl.constexpr, BLOCK_H: tl.constexpr, SPLIT_H: tl.constexpr, MASK_BLOCK: tl.constexpr,
        BLOCK_LD: tl.constexpr, DOCS: tl.constexpr,
    ):
        # Program (f, y, block of DOCS documents x). S is built BLOCK_LD doc tokens at a time; only the
        # running row max survives. Every offset built from the program id or a loop counter is int64:
        # x * sd_x passes 2^31 at H = 768 beyond ~14k documents per query.
        pid = tl.program_id(0).to(tl.int64)
        x_blocks = tl.cdiv(X, DOCS)
        fy = pid // x_blocks
        x_first = (pid % x_blocks) * DOCS
        f = fy // Y
        y = fy % Y
        offs_i = tl.arange(0, BLOCK_LQ)
        offs_h = tl.arange(0, BLOCK_H)
        offs_t = tl.arange(0, BLOCK_LD)
        row_in = offs_i < Lq
        q_ptrs = Q + f * sq_f + y * sq_y + offs_i[:, None] * sq_t + offs_h[None, :]
        if not SPLIT_H:
            # q is read once per program: the same registers (or shared memory) serve every tile of
            # every document of the program.
            q_tile = tl.load(q_ptrs, mask=row_in[:, None] & (offs_h[None, :] < H), other=0.0)
        else:
            # The H-split loop reads doc slices at a scalar pointer to the tile's first row plus these
            # int32 in-tile offsets, not through a per-thread 64-bit pointer tensor carried across the
            # tile loop: ptxas (sm_90) spilled such long-lived per-thread values (fastrank.kernel_report).
            d_off = offs_t[:, None] * sd_t + offs_h[None, :]
        for x in range(x_first, tl.minimum(x_first + DOCS, X)):
            d_ptrs = D + f * sd_f + x * sd_x + offs_t[:, None] * sd_t + offs_h[None, :]
            d_tile = D + f * sd_f + x * sd_x  # the H-split path's scalar tile pointer
            dm_row = DM + f * sdm_f + y * sdm_y + x * sdm_x
            qm_row = QM + f * sqm_f + y * sqm_y + x * sqm_x  # the epilogue holds one scalar, not f, y and x
            dm_ptrs = dm_row + offs_t * sdm_t
            # The doc's valid-length bound: padding usually ends a document, so the tile loop stops at its
            # last valid token instead of testing every tile (a reduction and a branch per tile). One
            # pass over Ld mask bytes, against Ld * H embedding elements read by the loop.
            end = Ld
            if HAS_DM:
                last = tl.full([MASK_BLOCK], -1, tl.int32)
                m_ptrs = dm_row + tl.arange(0, MASK_BLOCK) * sdm_t
                for m0 in range(0, Ld, MASK_BLOCK):
                    offs_m = m0 + tl.arange(0, MASK_BLOCK)
                    dm = tl.load(m_ptrs, mask=offs_m < Ld, other=0)
                    last = tl.maximum(last, tl.where(dm != 0, offs_m, -1))
                    m_ptrs += MASK_BLOCK * sdm_t
                end = tl.max(last, axis=0) + 1
            best = tl.full([BLOCK_LQ], float("-inf"), tl.float32)
            best_j = tl.full([BLOCK_LQ], -1, tl.int32)
            saw_nan = tl.zeros([BLOCK_LQ], tl.int32)
            # Software-pipelined with the config's num_stages: the loads of the next tiles are in flight
            # while this one is multiplied.
            for j0 in tl.range(0, end, BLOCK_LD):
                offs_j = j0 + offs_t
                col_in = offs_j < end
                if not SPLIT_H:
                    dt = tl.load(d_ptrs, mask=col_in[:, None] & (offs_h[None, :] < H), other=0.0)
                    s = tl.dot(q_tile, tl.trans(dt), input_precision=PRECISION)
                else:
                    # H = 768 needs no 768-wide register tile: the dot is split over H.
                    s = tl.zeros([BLOCK_LQ, BLOCK_LD], tl.float32)
                    q_h, d_h = q_ptrs, d_tile
                    # Not pipelined (num_stages=1): buffering the slices in registers spilled on sm_90.
                    for h0 in tl.range(0, H, BLOCK_H, num_stages=1):
                        h_in = (h0 + offs_h)[None, :] < H
                        qt = tl.load(q_h, mask=row_in[:, None] & h_in, other=0.0)
                        dt = tl.load(d_h + d_off, mask=col_in[:, None] & h_in, other=0.0)
                        s = tl.dot(qt, tl.trans(dt), s, input_precision=PRECISION)
                        q_h += BLOCK_H
                        d_h += BLOCK_H
                # Pointers advance by a tile (no offset is rebuilt from the loop counter in int32).
                d_ptrs += BLOCK_LD * sd_t
                d_tile += BLOCK_LD * sd_t
                if HAS_DM:
                    # Holes in the mask: padded tokens never win (a select on the tile, no branch).
                    dm = tl.load(dm_ptrs, mask=col_in, other=0)
                    col_in = col_in & (dm != 0)
                    dm_ptrs += BLOCK_LD * sdm_t
                s = tl.where(col_in[None, :], s, float("-inf"))
                # tl.max does not propagate NaN on every target; count NaNs so they reach the score.
                saw_nan += tl.sum((s != s).to(tl.int32), axis=1)
                blk_best = tl.max(s, axis=1)
                blk_j = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int32) + j0
                take = blk_best > best  # strict: ties keep the earliest doc token, like torch.max
                best = tl.where(take, blk_best, best)
                best_j = tl.where(take, blk_j, best_j)

            row_ok = row_in & (end > 0)
            if HAS_QM:
                qm_x = tl.load(qm_row + offs_i * sqm_t, mask=row_in, other=0)
                row_ok = row_ok & (qm_x != 0)
            best = tl.where(saw_nan > 0, float("nan"), best)
            if DOCS == 1 and SPLIT_H:
                # One document per program: the pair is the program id, so fy and x are not held across
                # the tile loop for this store (ptxas spilled them on the H-split path, sm_90).
                pair = pid
            else:
                pair = fy * X + x
            tl.store(OUT + pair, tl.sum(tl.where(row_ok, best, 0.0), axis=0))
            if STORE_ARG:
                tl.store(ARG + pair * Lq + offs_i, tl.where(row_ok, best_j, -1), mask=row_in)

    @triton.jit
    def _maxsim_bwd_dd_kernel(
        Q, G, ARG, DD,
        Y, X, Lq, Ld, H, y_chunk,
        sq_f, sq_y, sq_t,
        ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_LQ: tl.constexpr, BLOCK_LD: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # dd[f,x,j,h] = sum_y g[f,y,x] * sum_i [argmax[f,y,x,i] = j] q[f,y,i,h]: the scatter is a matmul
        # of a one-hot (BLOCK_LD x Lq) routing matrix with q, so it runs on tensor cores with no atomics.
        # Offsets from program ids and loop counters are int64: y * sq_y passes 2^31 for a large enough
        # batch of long queries.
        item = tl.program_id(0).to(tl.int64)
        h_blocks = tl.cdiv(H, BLOCK_H)
        tile = tl.program_id(1).to(tl.int64)
        offs_j = (tile // h_blocks) * BLOCK_LD + tl.arange(0, BLOCK_LD)
        h = (tile % h_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        y_start = tl.program_id(2).to(tl.int64) * y_chunk
        f = item // X
        x = item % X
        offs_i = tl.arange(0, BLOCK_LQ)
        row_in = offs_i < Lq
        acc = tl.zeros([BLOCK_LD, BLOCK_H], tl.float32)
        for y in tl.range(y_start, tl.minimum(y_start + y_chunk, Y)):
            pair = (f * Y + y) * X + x
            j = tl.load(ARG + pair * Lq + offs_i, mask=row_in, other=-1)
            g = tl.load(G + pair)
            qt = tl.load(Q + f * sq_f + y * sq_y + offs_i[:, None] * sq_t + h[None, :],
                         mask=row_in[:, None] & (h[None, :] < H), other=0.0)
            route = (offs_j.to(tl.int32)[:, None] == j[None, :]).to(qt.dtype)  # j < Ld: int32 compares
            acc += g * tl.dot(route, qt, input_precision=PRECISION)
        ptrs = DD + (item * Ld + offs_j[:, None]) * H + h[None, :]
        mask = (offs_j[:, None] < Ld) & (h[None, :] < H)
        if ATOMIC:
            tl.atomic_add(ptrs, acc, mask=mask)
        else:
            tl.store(ptrs, acc, mask=mask)


# --------------------------------------------------------------------------------------------------------
# Launchers. All take the canonical tensors: q (F, Y, Lq, H), d (F, X, Ld, H), masks (F, Y, X, L) or None.
# --------------------------------------------------------------------------------------------------------
def _dims(q: Tensor, d: Tensor) -> tuple[int, int, int, int, int, int]:
    F, Y, Lq, H = q.shape
    X, Ld = d.shape[1], d.shape[2]
    return F, Y, X, Lq, Ld, H


def _mask_args(m: Optional[Tensor]) -> tuple[Tensor | None, list[int]]:
    return (m, list(m.stride())) if m is not None else (None, [0, 0, 0, 0])


def _forward_outputs(q: Tensor, d: Tensor, save_argmax: bool) -> tuple[Tensor, Tensor]:
    """float32 scores (F, Y, X) and int32 argmax (F, Y, X, Lq), or an empty argmax when no backward follows."""
    F, Y, X, Lq, _, _ = _dims(q, d)
    out = q.new_empty((F, Y, X), dtype=torch.float32)
    return out, q.new_empty((F, Y, X, Lq) if save_argmax else (0,), dtype=torch.int32)


def triton_forward(q, d, q_mask, d_mask, save_argmax: bool) -> tuple[Tensor, Tensor]:
    """float32 scores (F, Y, X) and int32 argmax (F, Y, X, Lq) (empty unless ``save_argmax``) of the
    canonical q (F, Y, Lq, H) and d (F, X, Ld, H), masks (F, Y, X, L) or None, on the Triton kernels."""
    q, d = inner_contiguous(q), inner_contiguous(d)
    return forward_by_query_chunks(lambda qc, mc: _triton_forward_tile(qc, d, mc, d_mask, save_argmax), q, q_mask, save_argmax)


def _triton_forward_tile(q, d, q_mask, d_mask, save_argmax: bool):
    F, Y, X, Lq, Ld, H = _dims(q, d)
    # Checked for DOCS = 1, the largest grid any config launches, before anything is allocated.
    check_grid((F * Y * X,), "maxsim")
    out, arg = _forward_outputs(q, d, save_argmax)
    qm, qms = _mask_args(q_mask)
    dm, dms = _mask_args(d_mask)
    block_lq = pow2(Lq, 16, QUERY_TILE)
    block_h = pow2(H, 16, 64 if q.dtype == torch.float32 else 128)
    if H > block_h:
        # Split over H (H = 768): 64-wide slices keep the q and doc slices in registers beside S; 128-wide
        # ones spilled on sm_90 (ptxas -v).
        block_h = h_block_cap(q.dtype == torch.float32, cuda_arch(q))

    def grid(meta):
        return (F * Y * triton.cdiv(X, meta["DOCS"]),)

    args = (q, d, qm if qm is not None else out, dm if dm is not None else out, out, arg,
            Y, X, Lq, Ld, H,
            q.stride(0), q.stride(1), q.stride(2), d.stride(0), d.stride(1), d.stride(2),
            *qms, *dms,
            block_lq, bucket(Ld), bucket(F * Y * X))
    meta = dict(HAS_QM=qm is not None, HAS_DM=dm is not None, STORE_ARG=save_argmax, PRECISION=dot_precision(q),
                BLOCK_LQ=block_lq, BLOCK_H=block_h, SPLIT_H=H > block_h, MASK_BLOCK=pow2(Ld, 16, 1024))
    with device_guard(q):
        if interpreting():
            _maxsim_fwd_kernel.fn[grid](*args, **meta, **interpreter_meta(_maxsim_fwd_kernel))
        else:
            _maxsim_fwd_kernel[grid](*args, **meta)
    return out, arg


def parallel_programs(device: torch.device) -> int:
    """Programs that keep the device busy: 4 per SM on a GPU; the interpreter runs them one by one. The
    MaxSim backward launchers, padded and packed, look it up here (as ``maxsim.parallel_programs``) on every
    call, so that the static kernel report can stand in a GPU's count for the CPU tensors it records on."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def triton_backward(q, d, grad, argmax, need_dq: bool, need_dd: bool, deterministic: bool):
    """(dq in q's dtype or None, dd in d's dtype or None) on the Triton kernels, following the argmax of
    :func:`triton_forward`; ``deterministic`` keeps every reduction in one program (no float atomics)."""
    q, d = inner_contiguous(q), inner_contiguous(d)
    grad = grad.contiguous().float()
    dq, dd = backward_by_query_chunks(
        lambda qc, ac: _triton_backward_tile(qc, d, grad, ac, need_dq, need_dd, deterministic), q, argmax, need_dq)
    return (dq.to(q.dtype) if need_dq else None), (dd.to(d.dtype) if need_dd else None)


def _triton_backward_tile(q, d, grad, argmax, need_dq: bool, need_dd: bool, deterministic: bool):
    F, Y, X, Lq, Ld, H = _dims(q, d)
    block_lq = pow2(Lq, 16, QUERY_TILE)
    dq = dd = None
    if need_dq:
        block_h = pow2(H, 16, 64)
        programs = F * Y * triton.cdiv(H, block_h)
        split = loop_split(programs, X, deterministic, parallel_programs(q.device))
        chunk = triton.cdiv(X, split)
        dq = (torch.zeros if split > 1 else torch.empty)((F, Y, Lq, H), device=q.device, dtype=torch.float32)
        grid = check_grid((F * Y, triton.cdiv(H, block_h), triton.cdiv(X, chunk)), "maxsim backward (dq)")
        with device_guard(q):
            maxsim_bwd_dq_kernel[grid](
                d, grad, argmax, dq, argmax, Y, X, Lq, H, chunk, d.stride(0), d.stride(1), d.stride(2),
                PACKED=False, ATOMIC=split > 1, BLOCK_LQ=block_lq, BLOCK_H=block_h, num_warps=4, num_stages=3,
            )
    if need_dd:
        # A full 64-token query tile halves the doc tile: the accumulator, the routing matrix and the q
        # tile then stay in registers (ptxas spilled at 64 x 64 x 64 on sm_90).
        block_ld = 64 if block_lq <= 32 else 32
        block_h = pow2(H, 16, h_block_cap(q.dtype == torch.float32, cuda_arch(q)))
        programs = F * X * triton.cdiv(Ld, block_ld) * triton.cdiv(H, block_h)
        split = loop_split(programs, Y, deterministic, parallel_programs(q.device))
        chunk = triton.cdiv(Y, split)
        dd = (torch.zeros if split > 1 else torch.empty)((F, X, Ld, H), device=q.device, dtype=torch.float32)
        grid = check_grid((F * X, triton.cdiv(Ld, block_ld) * triton.cdiv(H, block_h), triton.cdiv(Y, chunk)),
                          "maxsim backward (dd)")
        with device_guard(q):
            _maxsim_bwd_dd_kernel[grid](
                q, grad, argmax, dd, Y, X, Lq, Ld, H, chunk, q.stride(0), q.stride(1), q.stride(2),
                ATOMIC=split > 1, PRECISION=dot_precision(q),
                BLOCK_LQ=block_lq, BLOCK_LD=block_ld, BLOCK_H=block_h, num_warps=4, num_stages=3,
            )
    return dq, dd


# The extension's CPU and CUDA entry points take the same arguments but the last: the CPU ISA path and
# thread count, or the CUDA stream. Which one a call takes is dispatch's choice (dispatch.kernels).
def _cpu_entry(name: str) -> Callable:
    return lambda ext, t, args: getattr(ext, name)(cpu_isa.selected_for("maxsim", t.dtype), *args, torch.get_num_threads())


def _cuda_entry(name: str) -> Callable:
    def launch(ext, t, args):
        with device_guard(t):  # the stream and the launch are the tensors' GPU's
            return getattr(ext, name + "_cuda")(*args, _ext.cuda_stream(t))

    return launch


def _cpp_forward(entry: Callable, q, d, q_mask, d_mask, save_argmax: bool):
    ext = _ext.require()
    q, d = inner_contiguous(q), inner_contiguous(d)

    def tile(qc, mc):
        out, arg = _forward_outputs(qc, d, save_argmax)
        # The extension reads shapes, strides and dtypes from the tensors themselves and checks them.
        entry(ext, qc, (qc, d, mc, d_mask, out, arg if save_argmax else None))
        return out, arg

    return forward_by_query_chunks(tile, q, q_mask, save_argmax)


def _cpp_backward(entry: Callable, q, d, grad, argmax, need_dq: bool, need_dd: bool, deterministic: bool):
    # Deterministic whatever `deterministic` says: each output element has one writer (CPU and CUDA).
    ext = _ext.require()
    q, d = inner_contiguous(q), inner_contiguous(d)
    grad = grad.contiguous().float()

    def tile(qc, ac):
        F, Y, X, Lq, Ld, H = _dims(qc, d)
        dq = torch.empty((F, Y, Lq, H), device=qc.device, dtype=torch.float32) if need_dq else None
        dd = torch.empty((F, X, Ld, H), device=qc.device, dtype=torch.float32) if need_dd else None
        entry(ext, qc, (qc, d, grad, ac, dq, dd))
        return dq, dd

    dq, dd = backward_by_query_chunks(tile, q, argmax, need_dq)
    return (dq.to(q.dtype) if need_dq else None), (dd.to(d.dtype) if need_dd else None)


# Below about 2^20 multiply-adds in all, the kernel path's per-call cost (the pair-grid views, output
# allocations and the launch: some 50 us on the Xeon VM) is more than the eager math costs whole: measured
# through maxsim() on the Xeon (AMX) VM, 2 threads, float32, forward+backward and no_grad (0.70-0.94x at
# 2^11-2^19.5; from 2^20.6 on 1.36-2.6x forward+backward, 0.99-1.55x no_grad but for 1 query x 10 documents at
# 0.84-0.98x, near break-even): those calls take the eager math. And float32 inference of one query over
# unmasked documents is one sgemm in eager (d as (N * Ld, H) times q^T), run at the machine's GEMM rate with S
# in cache: the fused kernel does not beat it while S is small (measured through maxsim() on the Xeon (AMX) VM,
# 2 threads, H = 128: 0.67-1.01x from 1 x 4 to 1 x 400 documents, S up to 8.8 MiB; 0.94-1.11x at 1 x 500, S
# 11 MiB, near break-even; 1.20-1.35x from 1 x 650 to 1 x 1,000, S 14-22 MiB; 2.0x at 1 x 3,000 and
# 1 x 10,000, where S goes to memory), so those calls take it below _ONE_GEMM_MAX_S_BYTES of S. With a document
# mask, more than one query, gradients or 16-bit inputs the kernel wins at every size measured (1.15-7.7x
# float32, 3.6-18x bfloat16). The reasons both MaxSim ops share (the scalar path, fewer pairs than threads)
# are in fastrank.ops.maxsim_reasons.
_ONE_GEMM_MAX_S_BYTES = 12 << 20
_TINY_WORK_LOG2 = 20


def _maxsim_cpu_slower(*, device_types, work: int = 64, one_gemm: bool = False, **ctx) -> list[str]:
    reasons = cpu_slower(device_types=device_types, work=work, **ctx)
    if device_types == {"cpu"} and work < _TINY_WORK_LOG2:
        reasons.append(f"a small call (about 2^{work} multiply-adds, below 2^{_TINY_WORK_LOG2}): the kernel path's "
                       "fixed per-call cost is more than the eager math costs")
    if device_types == {"cpu"} and one_gemm and ctx.get("dtype") == torch.float32:
        reasons.append("float32 inference of one query over unmasked documents with S below "
                       f"{_ONE_GEMM_MAX_S_BYTES >> 20} MiB: eager runs it as one sgemm at the machine's GEMM rate "
                       "with S in cache, which the fused kernel does not beat")
    return reasons


def _cpp_describe(*, device_types, dtype: torch.dtype, isa: str = "", **_) -> str:
    if device_types != {"cpu"}:
        return "CUDA kernels of the compiled extension"
    faster = cpu_isa.why("maxsim", dtype)
    if faster:
        return _cpu_kernel_text(isa, dtype) + f" ({faster})"
    return _cpu_kernel_text(isa, dtype)


def _cpu_kernel_text(isa: str, dtype: torch.dtype) -> str:
    vector = {"amx": "AVX-512", "avx512bf16": "AVX-512", "avx512": "AVX-512", "avx2": "AVX2"}.get(isa, "baseline SIMD")
    kernel = {
        ("amx", torch.bfloat16): "AMX-BF16 tiles (tdpbf16ps)",
        ("avx512bf16", torch.bfloat16): "AVX512-BF16 dot products (vdpbf16ps)",
    }.get((isa, dtype), f"{vector} FMA micro-kernel" + ("" if dtype == torch.float32 else ", widened to float32"))
    return f"C++ CPU kernel, ISA path {isa}: {kernel}"


_TRITON = dispatch.Kernels(triton_forward, triton_backward)
# The C++ backend's kernels per device type: dispatch.kernels picks the entry for the call's tensors.
_CPP = {
    device: dispatch.Kernels(functools.partial(_cpp_forward, entry("maxsim_forward")),
                             functools.partial(_cpp_backward, entry("maxsim_backward")))
    for device, entry in (("cpu", _cpu_entry), ("cuda", _cuda_entry))
}
dispatch.register("maxsim", "triton", _TRITON, reasons=kernel_reasons, describe=lambda **_: "Triton kernels")
dispatch.register("maxsim", "triton_interpret", _TRITON, reasons=lambda **ctx: kernel_reasons(interpreter=True, **ctx),
                  slower=lambda **_: ["the Triton interpreter checks the GPU kernels on CPU; it never outruns eager"],
                  describe=lambda **_: "Triton kernels under the interpreter")
dispatch.register("maxsim", "cpp", _CPP, reasons=kernel_reasons, slower=_maxsim_cpu_slower, describe=_cpp_describe)


# --------------------------------------------------------------------------------------------------------
# Custom ops (torch.library): opaque to torch.compile, with fake implementations and autograd.
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastrank::maxsim_forward", mutates_args=())
def _maxsim_forward_op(
    q: Tensor, d: Tensor, q_mask: Optional[Tensor], d_mask: Optional[Tensor], backend: str,
    save_argmax: bool, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    return dispatch.kernels("maxsim", backend, q).forward(q, d, q_mask, d_mask, save_argmax)


@_maxsim_forward_op.register_fake
def _(q, d, q_mask, d_mask, backend, save_argmax, deterministic):
    return _forward_outputs(q, d, save_argmax)


@torch.library.custom_op("fastrank::maxsim_backward", mutates_args=())
def _maxsim_backward_op(
    q: Tensor, d: Tensor, grad: Tensor, argmax: Tensor, backend: str, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    dq, dd = dispatch.kernels("maxsim", backend, q).backward(q, d, grad, argmax, True, True, deterministic)
    return dq, dd


@_maxsim_backward_op.register_fake
def _(q, d, grad, argmax, backend, deterministic):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(d, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, d, _, _, backend, save_argmax, deterministic = inputs
    ctx.backend, ctx.deterministic = backend, deterministic
    ctx.save_for_backward(q, d, output[1])


def _backward(ctx, grad_scores, _grad_argmax):
    q, d, argmax = ctx.saved_tensors
    dq, dd = _maxsim_backward_op(q, d, grad_scores, argmax, ctx.backend, ctx.deterministic)
    return dq, dd, None, None, None, None, None


_maxsim_forward_op.register_autograd(_backward, setup_context=_setup_context)

# The kernels' backward routes the gradient through the forward's argmax and has no derivative of its own.
NO_SECOND_DERIVATIVE = "the kernels' backward routes the gradient through the forward's argmax and has no derivative of its own"


def _no_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR.format(op="fastrank.maxsim", why=NO_SECOND_DERIVATIVE, ref="fastrank.maxsim_ref"))


# Registered so that backward(create_graph=True) works (a first-order step under a graph-recording
# backward) and only differentiating the gradient again fails, with a message saying what to use instead.
_maxsim_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


class _EagerMaxSim(torch.autograd.Function):
    """The custom ops' forward and backward for eager calls that record a graph.

    The custom op's autograd wrapper costs a few hundred microseconds per forward+backward on CPU (its
    schema checks, fake-tensor plumbing and the engine's custom-op nodes), more than the kernels themselves on
    small batches, so eager code calls the kernels through this Function; only traced code (torch.compile)
    goes through the custom ops, which it needs for fake shapes. It also skips dq or dd when only one of
    q and d needs a gradient."""

    @staticmethod
    def forward(ctx, q: Tensor, d: Tensor, q_mask, d_mask, backend: str, deterministic: bool) -> Tensor:
        scores, argmax = dispatch.kernels("maxsim", backend, q).forward(q, d, q_mask, d_mask, True)
        ctx.save_for_backward(q, d, argmax)
        ctx.backend, ctx.deterministic = backend, deterministic
        return scores

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, d, argmax = ctx.saved_tensors
        if torch.is_grad_enabled():
            # backward(create_graph=True): the custom op records a node whose own backward raises the
            # double-backward error, as on the traced path.
            dq, dd = _maxsim_backward_op(q, d, grad, argmax, ctx.backend, ctx.deterministic)
            return dq, dd, None, None, None, None
        need_dq, need_dd = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dq, dd = dispatch.kernels("maxsim", ctx.backend, q).backward(q, d, grad, argmax, need_dq, need_dd, ctx.deterministic)
        return dq, dd, None, None, None, None


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
def _check_inputs(q, d, q_mask, d_mask) -> torch.Size:
    return check_pair_inputs("maxsim", q, d, q_mask, d_mask)


def maxsim(
    q: Tensor,
    d: Tensor,
    q_mask: Optional[Tensor] = None,
    d_mask: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
    deterministic: bool = False,
) -> Tensor:
    """ColBERT MaxSim scores, fused: ``sum_i max_j <q_i, d_j>`` over valid tokens.

    Args:
        q: (..., Lq, H) query token embeddings, float32, float16 or bfloat16.
        d: (..., Ld, H) document token embeddings, same dtype and device. The leading dims of q and d
            broadcast like ``torch.matmul``: q (Lq, H) with d (N, Ld, H) gives (N,) (re-ranking);
            q (B, 1, Lq, H) with d (B, K, Ld, H) gives (B, K) (training groups); q (B, 1, Lq, H) with
            d (1, B, Ld, H) gives (B, B) (in-batch all pairs). The broadcast operand is never copied.
        q_mask: optional bool (..., Lq); False marks padding, which contributes 0.
        d_mask: optional bool (..., Ld); padded doc tokens never win the max. A doc with no valid token
            scores 0 and gets zero gradient.
        backend: force one of :data:`fastrank.BACKENDS` (default: the first that can run, also settable
            with ``FASTRANK_BACKEND``).
        deterministic: make the backward bitwise reproducible on GPU (no float atomics). The CPU
            kernels are always deterministic.

    Returns:
        float32 scores of the broadcast batch shape (float64 for float64 inputs, which run on the
        reference). Accumulation is float32 whatever the input dtype. NaN in the inputs propagates.

    Queries of any length run on the kernels: beyond 64 tokens (``QUERY_TILE``) in chunks of 64 whose scores add.

    Subnormals. On the CPU ISA paths ``amx`` and ``avx512bf16`` (:mod:`fastrank.cpu_isa`), bfloat16
    inputs are multiplied by ``tdpbf16ps`` / ``vdpbf16ps``, which treat subnormal inputs (``|x| < 2**-126``)
    as zero and flush subnormal products and sums to zero, whatever the MXCSR says. Each similarity
    ``<q_i, d_j>`` then differs from its float32 value by at most ``2**-126 * (||q_i||_1 + ||d_j||_1 + 2H)``
    (a dropped input is below ``2**-126`` times its partner; each of the 2H flushed products and partial
    sums is below ``2**-126``), and a score by the sum over valid query tokens ``i`` of the largest such
    bound over the document's valid tokens ``j`` (a max moves by at most the largest change of its
    arguments). The difference is visible only where subnormal entries meet entries near ``2**100`` or
    the whole score is below about ``2**-100``. Other paths and dtypes keep subnormals.

    Double backward (a gradient of the gradient, as in gradient penalties) is not supported on the
    kernels: ``backward(create_graph=True)`` works, differentiating its result raises a RuntimeError.
    Use :func:`maxsim_ref` (or ``backend="reference"``) where second derivatives are needed.
    """
    batch = _check_inputs(q, d, q_mask, d_mask)
    lq, h = q.shape[-2], q.shape[-1]
    ld = d.shape[-2]
    impl = dispatch.choose("maxsim", (q, d, q_mask, d_mask), backend, **dispatch_context(q, d, batch, d_mask))
    kernels = dispatch.kernels("maxsim", impl.backend, q)
    if kernels.backward is None:  # eager PyTorch, which autograd differentiates itself
        return kernels.forward(q, d, q_mask, d_mask)
    if math.prod(batch) == 0 or lq == 0 or ld == 0 or h == 0:  # nothing to score: outside the kernels' contract
        return _eager_scores(q, d, q_mask, d_mask)
    c = canonicalize(q, d, q_mask, d_mask, batch)
    save_argmax = torch.is_grad_enabled() and (q.requires_grad or d.requires_grad)
    if torch.compiler.is_compiling():
        scores, _ = _maxsim_forward_op(c.q, c.d, c.q_mask, c.d_mask, impl.backend, save_argmax, deterministic)
    elif save_argmax:
        scores = _EagerMaxSim.apply(c.q, c.d, c.q_mask, c.d_mask, impl.backend, deterministic)
    else:  # inference: no graph to record, so skip the custom-op machinery (tens of microseconds a call)
        scores, _ = kernels.forward(c.q, c.d, c.q_mask, c.d_mask, False)
    return c.restore(scores)


def dispatch_context(q: Tensor, d: Tensor, batch, d_mask: Optional[Tensor] = None) -> dict:
    """What the backends' reasons look at: dtype, the CPU ISA path, the work as log2 of the
    multiply-adds (a coarse key, so the cached choice is shared by calls of similar size), whether there
    are fewer pairs than threads, and whether eager would be one GEMM (one query, unmasked documents, no
    gradient)."""
    ctx = {"dtype": q.dtype}
    if q.device.type == "cpu":
        ctx["isa"] = cpu_isa.selected_for("maxsim", q.dtype)
    if torch.compiler.is_compiling():
        ctx["work"] = 64  # compiled graphs are training steps: the size-based rule is not traced
    else:
        pairs = math.prod(batch)
        ctx["work"] = max(0, int(pairs * q.shape[-2] * d.shape[-2] * q.shape[-1]).bit_length() - 1)
        ctx["underfilled"] = pairs < torch.get_num_threads()
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or d.requires_grad)
        s_bytes = 4 * pairs * q.shape[-2] * d.shape[-2]  # the float32 S eager would write
        ctx["one_gemm"] = (math.prod(q.shape[:-2]) == 1 and d_mask is None and not needs_grad
                           and s_bytes < _ONE_GEMM_MAX_S_BYTES)
    return ctx


def maxsim_eager(q: Tensor, d: Tensor, q_mask: Optional[Tensor] = None, d_mask: Optional[Tensor] = None) -> Tensor:
    """The reference's math in the fastest eager form, for inference calls dispatched to eager: one
    d @ qᵀ matmul (a single large GEMM when q is shared by many docs), the mask applied in place, amax over
    doc tokens (no indices). Same values as :func:`maxsim_ref`; autograd would split ties differently, so
    calls that need gradients take the reference itself."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if d.shape[-2] == 0:
        return maxsim_ref(q, d, q_mask, d_mask)
    s = torch.matmul(d.to(compute), q.to(compute).transpose(-1, -2))  # (..., Ld, Lq)
    if d_mask is not None:
        keep = d_mask.unsqueeze(-1)
        if torch.broadcast_shapes(s.shape, keep.shape) == s.shape:
            s.masked_fill_(~keep, float("-inf"))
        else:
            s = torch.where(keep, s, float("-inf"))
    best = s.amax(dim=-2)  # (..., Lq)
    if d_mask is not None:
        best = torch.where(d_mask.any(dim=-1, keepdim=True), best, 0.0)
    if q_mask is not None:
        best = torch.where(q_mask, best, 0.0)
    return best.sum(dim=-1)


def _eager_scores(q: Tensor, d: Tensor, q_mask: Optional[Tensor] = None, d_mask: Optional[Tensor] = None) -> Tensor:
    """The reference backend: :func:`maxsim_ref` where autograd or a trace needs it, else :func:`maxsim_eager`."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (q.requires_grad or d.requires_grad)):
        return maxsim_ref(q, d, q_mask, d_mask)
    return maxsim_eager(q, d, q_mask, d_mask)


dispatch.register("maxsim", "reference", dispatch.Kernels(_eager_scores),
                  describe=lambda **_: "eager PyTorch (maxsim_ref's math)")


def _explain_context(q: Tensor, d: Tensor, q_mask: Optional[Tensor] = None, d_mask: Optional[Tensor] = None) -> dict:
    return dispatch_context(q, d, _check_inputs(q, d, q_mask, d_mask), d_mask)


dispatch.register_context("maxsim", _explain_context)


def maxsim_ref(q: Tensor, d: Tensor, q_mask: Optional[Tensor] = None, d_mask: Optional[Tensor] = None) -> Tensor:
    """The specification of :func:`maxsim` in plain PyTorch (materialises the similarity matrix).

    Computes in float32 (float64 for float64 inputs) and returns that dtype.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(compute), d.to(compute).transpose(-1, -2))  # (..., Lq, Ld)
    if d_mask is not None:
        s = torch.where(d_mask.unsqueeze(-2), s, float("-inf"))
    if s.shape[-1] == 0:
        best = s.new_zeros(s.shape[:-1])
    else:
        best = s.max(dim=-1).values
    if d_mask is not None:
        best = torch.where(d_mask.any(dim=-1, keepdim=True), best, 0.0)
    if q_mask is not None:
        best = torch.where(q_mask, best, 0.0)
    return best.sum(dim=-1)
