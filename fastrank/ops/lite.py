"""Separable LITE (learnable late interaction, arXiv 2406.17968), fused: the 2400-wide and 360-wide hidden
layers never reach memory, and S and the row MLP's output only pass through a small per-pair scratch tile
(read back from L1/L2, see "Registers" below); no (pairs x lq x R1) activation is ever materialised.

For one query-doc pair, with S = q d^T zero-padded to (lq, ld) (padded and masked positions are 0; LITE is
position-sensitive, so a padded row still goes through the MLPs):

    R = LN(ReLU(W2 · LN(ReLU(W1 · S[i,:] + b1)) + b2))      row MLP, each of the lq rows (ld -> R1 -> ld)
    T = LN(ReLU(V2 · LN(ReLU(V1 · R[:,j] + c1)) + c2))      column MLP, each of the ld columns (lq -> C -> lq)
    score = <w_out, vec(T)> + b_out                         vec: row-major flattening of (lq, ld)

Folding the LayerNorm that follows the wide hidden layer h (width R1, mean m, rstd r = 1/sqrt(var + eps),
affine g, b) into the next Linear lets the kernel stream h in chunks and keep only running sums:

    W2 · ((h - m) r ⊙ g + b) + b2 = r · (W2g h) - r m · u + c,   W2g = W2 diag(g), u = W2g 1, c = b2 + W2 b

so per row the kernel accumulates W2g h chunk by chunk together with the (Chan-merged) mean and M2 of h, and
applies r, m, u and c once at the end. The same fold serves the column MLP's 360-wide hidden layer.

Read top to bottom: the Triton forward and backward kernels, their launchers, the torch.library custom
ops with their autograd, the public :func:`lite_score`, and :func:`lite_ref`, the reference that is the spec.
The CPU kernels (C++, the same fold, per-ISA micro-kernels) are :mod:`fastrank.ops.lite_cpu`'s.

Registers (issue 13: the kernels spilled at 255 registers): neither MLP's input is kept in registers as a
dot operand (a 32 x 256 operand is held whole by every warp); each program writes it to a scratch tile of
its own, (lq, ld) per pair, and the dots read it back in (rows x BLOCK_K) slices per hidden chunk
(``_dot_streamed``), from L1/L2. The row MLP runs a block of rows at a time and the column MLP a block of
columns (GPU_BLOCKS' ROWS, COLS), so that a step holds one block's accumulator rather than the whole tile.
Chunks are narrow on a GPU: each load's tile and its 64-bit pointers are live at once. Scratch offsets are an
int64 scalar per pair plus int32 within the tile. Launches run in chunks of pairs so that the scratch stays
within SCRATCH_BYTES. Every variant compiles for sm_90 without spills (tests/test_lite.py).

Backward (Triton per pair, then GEMMs over all pairs), without atomics. The per-pair kernel recomputes S and
the LayerNorm statistics, goes back through the output, LN4, the column MLP, LN2 and the row MLP, streaming
each wide hidden layer in chunks (three passes: statistics, the two sums the LayerNorm backward needs, dx),
and writes dS plus, for the parameter gradients, each MLP's input and output gradient (S and dz2 of the
row MLP, R and dz4 of the column MLP), T, and its per-pair sums for LN2 and LN4. The weight gradients are
then sums over every (pair, row) of products such as dz^T LN(h) and da^T x: ``_mlp_weight_grads`` forms
them with four GEMMs over the chunk's rows, recomputing the hidden layer in float32 on the host (torch),
so that nothing is added into memory per element per pair: no atomics, and no sum whose order depends
on thread timing.
dq = dS d and dd = dS^T q are host einsums.

Offsets: everything indexed by the pair (q, d, the masks, dS, the scratch) is computed in int64 from the
program id; the rest (weights, up to R1 x ld; tile positions) stays far below 2^31.

Broadcasting follows :func:`fastrank.maxsim`: kernels see the canonical (F, Y, X) pair grid, q as
(F, Y, Lq, H) and d as (F, X, Ld, H), so a query shared by many docs is never copied.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F_
from torch import Tensor

from fastrank import cpu_isa, dispatch
from fastrank.ops import lite_cpu
from fastrank.ops.lite_cpu import fold_layernorm, masked_tokens_zeroed
from fastrank.ops.pairs import DOUBLE_BACKWARD_ERROR, QUERY_TILE, check_pair_inputs, cuda_arch, device_guard, dot_precision
from fastrank.ops.pairs import dtype_reasons, pow2
from fastrank.ops.pairs import canonicalize as _canonicalize
from fastrank.ops.pairs import inner_contiguous as _inner_contiguous

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the reference backend covers CPU.
    triton = None

# Register budget of one program: a (lq, ld) tile of S plus a same-size accumulator.
MAX_LQ = QUERY_TILE
MAX_LD = 256
# Chunk widths of the compiled kernels: the hidden units per chunk (R, C), the slice of the row (K) and
# column (KC) MLP's input per dot, the embedding slice of S (H); and ROWS and COLS, the rows of the row MLP
# and the columns of the column MLP one step holds (a step's accumulator is ROWS x ld or COLS x lq; every
# row and column is independent of the others, so blocks cost no recompute). These are what ptxas -v
# reported spill-free for sm_90 (issue 13: at whole 32 x 256 tiles and 32-64 wide chunks the kernels spilled
# past 255 registers). float32 dots run on FMA units, not tensor cores: an FMA dot's operands are held K
# wide per thread, so float32 takes K = 8 (tl.dot's least for 32-bit operands), S's H slice included. The
# interpreter (CPU tensors) runs the same code with whole tiles and wider chunks, several times faster there.
GPU_BLOCKS = {
    "fwd": dict(BLOCK_R=16, BLOCK_C=16, BLOCK_K=32, BLOCK_KC=32, BLOCK_H=32, ROWS=MAX_LQ, COLS=MAX_LD),
    "fwd_fp32": dict(BLOCK_R=8, BLOCK_C=8, BLOCK_K=8, BLOCK_KC=8, BLOCK_H=8, ROWS=16, COLS=64),
    "bwd": dict(BLOCK_R=16, BLOCK_C=16, BLOCK_K=16, BLOCK_KC=16, BLOCK_H=16, ROWS=16, COLS=64),
    "bwd_fp32": dict(BLOCK_R=8, BLOCK_C=8, BLOCK_K=8, BLOCK_KC=8, BLOCK_H=8, ROWS=16, COLS=32),
}
# Ampere and Ada (sm_8x) have the same 255-register limit, but there ptxas spilled the bfloat16 forward at
# whole tiles (128 B) and the backward at 64 columns (24 B): these blocks replace GPU_BLOCKS' before sm_90.
GPU_BLOCKS_BEFORE_SM90 = {"fwd": dict(ROWS=16, COLS=128), "bwd": dict(COLS=16)}
INTERPRETER_BLOCKS = dict(BLOCK_R=32, BLOCK_C=32, BLOCK_K=64, BLOCK_KC=64, BLOCK_H=64, ROWS=MAX_LQ, COLS=MAX_LD)

# --------------------------------------------------------------------------------------------------------
# Triton kernels: shared pieces (similarity tile, streamed hidden layer and its backward), forward, backward
# --------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _tokens_ok(M, base, offs, n_real, stride, HAS_MASK: tl.constexpr):
        # Which of the positions offs are real (offs < n_real), unmasked tokens of one side of a pair.
        ok = offs < n_real
        if HAS_MASK:
            ok = ok & (tl.load(M + base + offs * stride, mask=ok, other=0) != 0)
        return ok

    @triton.jit
    def _similarity(
        Q, D, QM, DM, pair, Y, X, Lq, Ld, H,
        sq_f, sq_y, sq_t, sd_f, sd_x, sd_t,
        sqm_f, sqm_y, sqm_x, sqm_t, sdm_f, sdm_y, sdm_x, sdm_t,
        HAS_QM: tl.constexpr, HAS_DM: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_LQ: tl.constexpr, BLOCK_LD: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # S = q d^T of one (f, y, x) pair, split over H so that H = 768 needs no 768-wide register tile,
        # zero at padded and masked positions.
        # Masked tokens are never loaded: padding may hold anything (inf, NaN), and 0 * inf would be NaN.
        f = pair // (Y * X)
        y = (pair // X) % Y
        x = pair % X
        offs_i = tl.arange(0, BLOCK_LQ)
        offs_j = tl.arange(0, BLOCK_LD)
        offs_h = tl.arange(0, BLOCK_H)
        row_ok = _tokens_ok(QM, f * sqm_f + y * sqm_y + x * sqm_x, offs_i, Lq, sqm_t, HAS_QM)
        col_ok = _tokens_ok(DM, f * sdm_f + y * sdm_y + x * sdm_x, offs_j, Ld, sdm_t, HAS_DM)
        q_base = Q + f * sq_f + y * sq_y
        d_base = D + f * sd_f + x * sd_x
        s = tl.zeros([BLOCK_LQ, BLOCK_LD], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + offs_h
            qt = tl.load(q_base + offs_i[:, None] * sq_t + h[None, :], mask=row_ok[:, None] & (h[None, :] < H), other=0.0)
            dt = tl.load(d_base + offs_j[:, None] * sd_t + h[None, :], mask=col_ok[:, None] & (h[None, :] < H), other=0.0)
            s = tl.dot(qt, tl.trans(dt), s, input_precision=PRECISION)
        return s

    @triton.jit
    def _relu_passes(x):
        # Where ReLU lets x through: x > 0, and NaN too, as torch.relu does, so that a NaN in a real token
        # reaches the score as it does in the reference instead of being zeroed here.
        return (x > 0) | (x != x)

    @triton.jit
    def _dot_streamed(acc, X, x_sr, x_sc, in_rows, W, w_sk, w_sf, k, k_in, n_feat,
                      BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        # acc + x W[k, :]^T for x (rows, n_feat) in memory at X (strides x_sr, x_sc) and W addressed as
        # W + k * w_sk + f * w_sf, in BLOCK_K-wide slices of the feature axis. Holding x whole in registers
        # as a dot operand costs rows x n_feat values per warp (64 KB of 16-bit values for a 32 x 256 tile,
        # twice that in float32): the spills of issue 13. A slice is read per hidden chunk instead, from
        # the program's own scratch tile, which stays in L1/L2.
        offs_r = tl.arange(0, BLOCK_ROWS)
        offs_kk = tl.arange(0, BLOCK_K)
        for f0 in range(0, n_feat, BLOCK_K):
            f = f0 + offs_kk
            f_in = f < n_feat
            x = tl.load(X + offs_r[:, None] * x_sr + f[None, :] * x_sc, mask=in_rows[:, None] & f_in[None, :], other=0.0)
            w = tl.load(W + k[:, None] * w_sk + f[None, :] * w_sf, mask=k_in[:, None] & f_in[None, :], other=0.0)
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _hidden_forward(
        X, x_sr, x_sc, in_rows, W_IN, B_IN, W_OUTG, U, CC, n_hidden, n_feat, eps, offs_f, in_f,
        BLOCK_ROWS: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HID: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # z = W_out LN(ReLU(W_in x + b_in)) + b_out for every row of x (BLOCK_ROWS x n_feat, in memory at X,
        # see _dot_streamed), with the LayerNorm folded into W_out (module docstring): the hidden layer
        # streams BLOCK_HID units at a time, keeping only W_outg h and the running (mean, M2) of h, merged
        # chunk by chunk with Chan's formula (no E[h^2] - E[h]^2 cancellation). Returns z and the hidden
        # layer's (mean, rstd).
        offs_k = tl.arange(0, BLOCK_HID)
        mean = tl.zeros([BLOCK_ROWS], tl.float32)
        m2 = tl.zeros([BLOCK_ROWS], tl.float32)
        acc = tl.zeros([BLOCK_ROWS, BLOCK_F], tl.float32)
        for k0 in range(0, n_hidden, BLOCK_HID):
            k = k0 + offs_k
            k_in = k < n_hidden
            b_in = tl.load(B_IN + k, mask=k_in, other=0.0).to(tl.float32)
            hid = tl.zeros([BLOCK_ROWS, BLOCK_HID], tl.float32)
            hid = _dot_streamed(hid, X, x_sr, x_sc, in_rows, W_IN, n_feat, 1, k, k_in, n_feat,
                                BLOCK_ROWS, BLOCK_K, PRECISION) + b_in[None, :]
            hid = tl.where(k_in[None, :] & _relu_passes(hid), hid, 0.0)
            n = tl.minimum(n_hidden - k0, BLOCK_HID).to(tl.float32)
            c_mean = tl.sum(hid, axis=1) / n
            dev = tl.where(k_in[None, :], hid - c_mean[:, None], 0.0)
            count = k0 * 1.0  # every chunk before this one is full
            total = count + n
            delta = c_mean - mean
            mean = mean + delta * (n / total)
            m2 = m2 + tl.sum(dev * dev, axis=1) + delta * delta * (count * n / total)
            w_out = tl.load(W_OUTG + offs_f[:, None] * n_hidden + k[None, :], mask=in_f[:, None] & k_in[None, :], other=0.0)
            acc = tl.dot(hid.to(w_out.dtype), tl.trans(w_out), acc, input_precision=PRECISION)
        rstd = 1.0 / tl.sqrt(m2 / n_hidden + eps)
        u = tl.load(U + offs_f, mask=in_f, other=0.0)
        c = tl.load(CC + offs_f, mask=in_f, other=0.0)
        z = acc * rstd[:, None] - (mean * rstd)[:, None] * u[None, :] + c[None, :]
        return z, mean, rstd

    @triton.jit
    def _relu_layernorm(z, G, BE, offs_f, in_f, n_feat, eps):
        # y = LN(ReLU(z)) over the n_feat features of each row. Returns y, xhat, rstd and where ReLU passed.
        live = in_f[None, :] & _relu_passes(z)
        h = tl.where(live, z, 0.0)
        mu = tl.sum(h, axis=1) / n_feat
        hc = tl.where(in_f[None, :], h - mu[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=1) / n_feat + eps)
        xhat = hc * rstd[:, None]
        g = tl.load(G + offs_f, mask=in_f, other=0.0).to(tl.float32)
        be = tl.load(BE + offs_f, mask=in_f, other=0.0).to(tl.float32)
        return xhat * g[None, :] + be[None, :], xhat, rstd, live

    @triton.jit
    def _relu_layernorm_backward(dy, xhat, rstd, live, G, offs_f, in_f, n_feat):
        # y = xhat g + b, xhat = (h - m) r, h = ReLU(z):
        #   dz = [z > 0] r (dxhat - mean(dxhat) - xhat mean(dxhat xhat)),  dxhat = dy g
        g = tl.load(G + offs_f, mask=in_f, other=0.0).to(tl.float32)
        dx = dy * g[None, :]
        dh = rstd[:, None] * (dx - (tl.sum(dx, axis=1) / n_feat)[:, None] - xhat * (tl.sum(dx * xhat, axis=1) / n_feat)[:, None])
        return tl.where(live, dh, 0.0)

    @triton.jit
    def _relu_layernorm_backward_and_sums(dy, xhat, rstd, live, G, offs_f, in_f, n_feat, in_rows):
        # dz of LN(ReLU(z)) for the rows in_rows (0 elsewhere), and this block's share of the per-pair sums
        # its gamma and beta gradients need: sum over the rows of dy xhat and of dy.
        gamma_part, beta_part = tl.sum(dy * xhat, axis=0), tl.sum(dy, axis=0)
        dz = _relu_layernorm_backward(dy, xhat, rstd, live, G, offs_f, in_f, n_feat)
        return tl.where(in_rows[:, None], dz, 0.0), gamma_part, beta_part

    @triton.jit
    def _hidden_backward(
        X, x_sr, x_sc, DZ, dz_sr, dz_sc, in_rows, mean, rstd, W_IN, B_IN, W_OUTG, n_hidden, n_feat, offs_f, in_f,
        BLOCK_ROWS: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HID: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # dx of z = W_out LN(ReLU(W_in x + b_in)) + b_out given dz (x and dz in memory, see _dot_streamed),
        # recomputing the hidden layer in two streamed passes: sum(dxhat) and sum(dxhat xhat) first (the
        # LayerNorm backward needs both before any chunk's dx), then dx. dxhat = (dz W_out) g = dz W_outg,
        # with the folded weight the forward streams. The weight gradients are not formed here (see
        # _mlp_weight_grads).
        offs_k = tl.arange(0, BLOCK_HID)
        s1 = tl.zeros([BLOCK_ROWS], tl.float32)
        s2 = tl.zeros([BLOCK_ROWS], tl.float32)
        for k0 in range(0, n_hidden, BLOCK_HID):
            k = k0 + offs_k
            k_in = k < n_hidden
            b_in = tl.load(B_IN + k, mask=k_in, other=0.0).to(tl.float32)
            pre = tl.zeros([BLOCK_ROWS, BLOCK_HID], tl.float32)
            pre = _dot_streamed(pre, X, x_sr, x_sc, in_rows, W_IN, n_feat, 1, k, k_in, n_feat,
                                BLOCK_ROWS, BLOCK_K, PRECISION) + b_in[None, :]
            hid = tl.where(k_in[None, :] & _relu_passes(pre), pre, 0.0)
            xhat = tl.where(k_in[None, :], (hid - mean[:, None]) * rstd[:, None], 0.0)
            dxh = tl.zeros([BLOCK_ROWS, BLOCK_HID], tl.float32)
            dxh = _dot_streamed(dxh, DZ, dz_sr, dz_sc, in_rows, W_OUTG, 1, n_hidden, k, k_in, n_feat,
                                BLOCK_ROWS, BLOCK_K, PRECISION)
            s1 += tl.sum(dxh, axis=1)
            s2 += tl.sum(dxh * xhat, axis=1)
        dx = tl.zeros([BLOCK_ROWS, BLOCK_F], tl.float32)
        for k0 in range(0, n_hidden, BLOCK_HID):
            k = k0 + offs_k
            k_in = k < n_hidden
            b_in = tl.load(B_IN + k, mask=k_in, other=0.0).to(tl.float32)
            pre = tl.zeros([BLOCK_ROWS, BLOCK_HID], tl.float32)
            pre = _dot_streamed(pre, X, x_sr, x_sc, in_rows, W_IN, n_feat, 1, k, k_in, n_feat,
                                BLOCK_ROWS, BLOCK_K, PRECISION) + b_in[None, :]
            live = k_in[None, :] & _relu_passes(pre)
            xhat = (tl.where(live, pre, 0.0) - mean[:, None]) * rstd[:, None]
            dxh = tl.zeros([BLOCK_ROWS, BLOCK_HID], tl.float32)
            dxh = _dot_streamed(dxh, DZ, dz_sr, dz_sc, in_rows, W_OUTG, 1, n_hidden, k, k_in, n_feat,
                                BLOCK_ROWS, BLOCK_K, PRECISION)
            dhid = rstd[:, None] * (dxh - (s1 / n_hidden)[:, None] - xhat * (s2 / n_hidden)[:, None])
            da = tl.where(in_rows[:, None] & live, dhid, 0.0)
            w_in = tl.load(W_IN + k[:, None] * n_feat + offs_f[None, :], mask=k_in[:, None] & in_f[None, :], other=0.0)
            dx = tl.dot(da.to(w_in.dtype), w_in, dx, input_precision=PRECISION)
        return dx

    @triton.jit
    def _row_mlp_forward(
        X, OUT_Z, OUT_ROWS, r0, LQ, LD, W1, B1, W2G, U1, C1, G2, BE2, R1, eps1, eps2,
        BLOCK_ROWS: tl.constexpr, BLOCK_LD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        STORE_Z: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # Rows r0 .. r0 + BLOCK_ROWS of the row MLP, LN2 included: reads S from X, stores LN2's output (and,
        # for the backward, z2) into the (LQ, LD) tiles at OUT_ROWS (OUT_Z). Returns LN1's (mean, rstd).
        offs_r = r0 + tl.arange(0, BLOCK_ROWS)
        offs_j = tl.arange(0, BLOCK_LD)
        in_r = offs_r < LQ
        in_j = offs_j < LD
        z2, mean1, rstd1 = _hidden_forward(
            X + r0 * LD, LD, 1, in_r, W1, B1, W2G, U1, C1, R1, LD, eps1, offs_j, in_j,
            BLOCK_ROWS, BLOCK_LD, BLOCK_K, BLOCK_R, PRECISION,
        )
        at = offs_r[:, None] * LD + offs_j[None, :]
        here = in_r[:, None] & in_j[None, :]
        if STORE_Z:
            tl.store(OUT_Z + at, z2, mask=here)
        rows = _relu_layernorm(z2, G2, BE2, offs_j, in_j, LD, eps2)[0]
        tl.store(OUT_ROWS + at, rows, mask=here)
        return mean1, rstd1

    @triton.jit
    def _lite_fwd_kernel(
        Q, D, QM, DM, OUT, SCR_S, SCR_ROWS,
        W1, B1, W2G, U1, C1, G2, BE2,
        V1, CB1, V2G, U3, C3, G4, BE4, WO, BO,
        PAIR0, Y, X, Lq, Ld, H, LQ, LD, R1, C,
        sq_f, sq_y, sq_t, sd_f, sd_x, sd_t,
        sqm_f, sqm_y, sqm_x, sqm_t, sdm_f, sdm_y, sdm_x, sdm_t,
        eps1, eps2, eps3, eps4,
        HAS_QM: tl.constexpr, HAS_DM: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_LQ: tl.constexpr, BLOCK_LD: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    ):
        # One program per (f, y, x) pair of the chunk starting at PAIR0. Rows i < LQ and columns j < LD are
        # the model's padded grid; i < Lq and j < Ld are the real tokens. Each MLP's input goes through the
        # program's scratch tile (SCR_S, SCR_ROWS: (LQ, LD) per pair of the chunk), read back in slices. The
        # row MLP runs BLOCK_ROWS rows at a time and the column MLP BLOCK_COLS columns at a time: each row
        # (column) is independent of the others, so a block's accumulator is all a step holds.
        local = tl.program_id(0).to(tl.int64)
        pair = PAIR0 + local
        s = _similarity(
            Q, D, QM, DM, pair, Y, X, Lq, Ld, H,
            sq_f, sq_y, sq_t, sd_f, sd_x, sd_t,
            sqm_f, sqm_y, sqm_x, sqm_t, sdm_f, sdm_y, sdm_x, sdm_t,
            HAS_QM, HAS_DM, PRECISION, BLOCK_LQ, BLOCK_LD, BLOCK_H,
        )
        offs_i = tl.arange(0, BLOCK_LQ)
        offs_j = tl.arange(0, BLOCK_LD)
        in_i = offs_i < LQ
        tile = local * LQ * LD  # this pair's scratch tiles, row-major (LQ, LD)
        tl.store(SCR_S + tile + offs_i[:, None] * LD + offs_j[None, :], s, mask=in_i[:, None] & (offs_j[None, :] < LD))
        tl.debug_barrier()  # the tile's other slices were stored by other threads of the program

        for r0 in range(0, LQ, BLOCK_ROWS):  # the row MLP over the doc axis
            _row_mlp_forward(SCR_S + tile, SCR_ROWS + tile, SCR_ROWS + tile, r0, LQ, LD, W1, B1, W2G, U1, C1, G2, BE2,
                             R1, eps1, eps2, BLOCK_ROWS, BLOCK_LD, BLOCK_K, BLOCK_R, False, PRECISION)
        tl.debug_barrier()

        # Column MLP over the query axis: row j of its input is column j of rows (strides 1 and LD); T comes
        # out transposed, (columns, LQ), and score = sum_{i,j} w_out[i * LD + j] T[i, j] + b_out.
        offs_c = tl.arange(0, BLOCK_COLS)
        score = 0.0
        for c0 in range(0, LD, BLOCK_COLS):
            cols = c0 + offs_c
            in_c = cols < LD
            z4 = _hidden_forward(
                SCR_ROWS + tile + c0, 1, LD, in_c, V1, CB1, V2G, U3, C3, C, LQ, eps3, offs_i, in_i,
                BLOCK_COLS, BLOCK_LQ, BLOCK_KC, BLOCK_C, PRECISION,
            )[0]
            t = _relu_layernorm(z4, G4, BE4, offs_i, in_i, LQ, eps4)[0]
            both = in_c[:, None] & in_i[None, :]
            wo = tl.load(WO + offs_i[None, :] * LD + cols[:, None], mask=both, other=0.0).to(tl.float32)
            score += tl.sum(tl.sum(tl.where(both, t * wo, 0.0), axis=1), axis=0)
        tl.store(OUT + pair, score + tl.load(BO).to(tl.float32))

    @triton.jit
    def _lite_bwd_kernel(
        Q, D, QM, DM, G, DS, S_OUT, Z2_OUT, ROWS_OUT, DZ2_OUT, DZ4_OUT, T_OUT, DR, STATS, VEC_LD, VEC_LQ,
        W1, B1, W2G, U1, C1, G2, BE2,
        V1, CB1, V2G, U3, C3, G4, BE4, WO,
        PAIR0, Y, X, Lq, Ld, H, LQ, LD, R1, C,
        sq_f, sq_y, sq_t, sd_f, sd_x, sd_t,
        sqm_f, sqm_y, sqm_x, sqm_t, sdm_f, sdm_y, sdm_x, sdm_t,
        eps1, eps2, eps3, eps4,
        HAS_QM: tl.constexpr, HAS_DM: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_LQ: tl.constexpr, BLOCK_LD: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    ):
        # One program per pair of the chunk starting at PAIR0: recompute the forward, then go back through
        # the output, LN4, the column MLP, LN2 and the row MLP to dS. What the parameter gradients need leaves
        # the program as plain stores into this chunk's scratch (no atomics): each MLP's input and output
        # gradient as (LQ, LD) tiles, T, and the per-pair sums of LN2 and LN4. Like the forward, the row
        # steps take BLOCK_ROWS rows and the column steps BLOCK_COLS columns; what crosses from one axis to
        # the other (LN2's output, dR, LN1's statistics) goes through the scratch (DR: dR; STATS: LN1's mean
        # and rstd per row), and the MLPs read their inputs back in slices (_dot_streamed).
        local = tl.program_id(0).to(tl.int64)
        pair = PAIR0 + local
        s = _similarity(
            Q, D, QM, DM, pair, Y, X, Lq, Ld, H,
            sq_f, sq_y, sq_t, sd_f, sd_x, sd_t,
            sqm_f, sqm_y, sqm_x, sqm_t, sdm_f, sdm_y, sdm_x, sdm_t,
            HAS_QM, HAS_DM, PRECISION, BLOCK_LQ, BLOCK_LD, BLOCK_H,
        )
        offs_i = tl.arange(0, BLOCK_LQ)
        offs_j = tl.arange(0, BLOCK_LD)
        in_i = offs_i < LQ
        in_j = offs_j < LD
        tile = local * LQ * LD  # this pair's scratch tiles, row-major (LQ, LD)
        tl.store(S_OUT + tile + offs_i[:, None] * LD + offs_j[None, :], s, mask=in_i[:, None] & in_j[None, :])
        stats = STATS + local * 2 * LQ  # LN1's mean, then rstd, of each row
        tl.debug_barrier()  # the tiles' other slices are stored by other threads of the program

        # ---- forward recompute of the row MLP: z2, LN2's output and LN1's statistics ----
        offs_r = tl.arange(0, BLOCK_ROWS)
        for r0 in range(0, LQ, BLOCK_ROWS):
            mean1, rstd1 = _row_mlp_forward(S_OUT + tile, Z2_OUT + tile, ROWS_OUT + tile, r0, LQ, LD, W1, B1, W2G,
                                            U1, C1, G2, BE2, R1, eps1, eps2, BLOCK_ROWS, BLOCK_LD, BLOCK_K, BLOCK_R,
                                            True, PRECISION)
            tl.store(stats + r0 + offs_r, mean1, mask=r0 + offs_r < LQ)
            tl.store(stats + LQ + r0 + offs_r, rstd1, mask=r0 + offs_r < LQ)
        tl.debug_barrier()

        # ---- per block of columns: the column MLP's forward, the output and LN4, the column MLP's backward ----
        g = tl.load(G + pair)
        offs_c = tl.arange(0, BLOCK_COLS)
        dxhat4_sum = tl.zeros([BLOCK_LQ], tl.float32)  # LN4's per-pair sums for its gamma and beta
        dout_sum = tl.zeros([BLOCK_LQ], tl.float32)
        for c0 in range(0, LD, BLOCK_COLS):
            cols = c0 + offs_c
            in_c = cols < LD
            both = in_c[:, None] & in_i[None, :]
            tile_ci = tile + offs_i[None, :] * LD + cols[:, None]  # scratch offset of [i, j], transposed
            z4, mean3, rstd3 = _hidden_forward(  # row j of the column MLP's input is column j of rows
                ROWS_OUT + tile + c0, 1, LD, in_c, V1, CB1, V2G, U3, C3, C, LQ, eps3, offs_i, in_i,
                BLOCK_COLS, BLOCK_LQ, BLOCK_KC, BLOCK_C, PRECISION,
            )
            t, xhat4, rstd4, live4 = _relu_layernorm(z4, G4, BE4, offs_i, in_i, LQ, eps4)
            tl.store(T_OUT + tile_ci, t, mask=both)
            wo = tl.load(WO + offs_i[None, :] * LD + cols[:, None], mask=both, other=0.0).to(tl.float32)
            dout = g * wo  # dscore/dT, (BLOCK_COLS, BLOCK_LQ), zero outside the model's grid
            # dz4 = d/d(V2 n3 + cb2)
            dz4, dxhat4_part, dout_part = _relu_layernorm_backward_and_sums(dout, xhat4, rstd4, live4, G4, offs_i,
                                                                             in_i, LQ, in_c)
            dxhat4_sum += dxhat4_part
            dout_sum += dout_part
            tl.store(DZ4_OUT + tile_ci, dz4, mask=both)
            tl.debug_barrier()
            drt = _hidden_backward(
                ROWS_OUT + tile + c0, 1, LD, DZ4_OUT + tile + c0, 1, LD, in_c, mean3, rstd3, V1, CB1, V2G, C, LQ,
                offs_i, in_i, BLOCK_COLS, BLOCK_LQ, BLOCK_KC, BLOCK_C, PRECISION,
            )
            tl.store(DR + tile_ci, drt, mask=both)
        tl.store(VEC_LQ + local * 2 * LQ + offs_i, dxhat4_sum, mask=in_i)
        tl.store(VEC_LQ + (local * 2 + 1) * LQ + offs_i, dout_sum, mask=in_i)
        tl.debug_barrier()

        # ---- per block of rows: LN2 (over the doc axis of each row), the row MLP's backward, dS ----
        dxhat2_sum = tl.zeros([BLOCK_LD], tl.float32)  # LN2's per-pair sums
        dr_sum = tl.zeros([BLOCK_LD], tl.float32)
        for r0 in range(0, LQ, BLOCK_ROWS):
            rows = r0 + offs_r
            in_r = rows < LQ
            here = in_r[:, None] & in_j[None, :]
            tile_rj = tile + rows[:, None] * LD + offs_j[None, :]
            dr = tl.load(DR + tile_rj, mask=here, other=0.0)
            z2 = tl.load(Z2_OUT + tile_rj, mask=here, other=0.0)  # rows past LQ: 0 (their dz2 is masked)
            ln2 = _relu_layernorm(z2, G2, BE2, offs_j, in_j, LD, eps2)
            # dz2 = d/d(W2 n1 + b2)
            dz2, dxhat2_part, dr_part = _relu_layernorm_backward_and_sums(dr, ln2[1], ln2[2], ln2[3], G2, offs_j, in_j,
                                                                          LD, in_r)
            dxhat2_sum += dxhat2_part
            dr_sum += dr_part
            tl.store(DZ2_OUT + tile_rj, dz2, mask=here)
            tl.debug_barrier()
            mean1 = tl.load(stats + rows, mask=in_r, other=0.0)
            rstd1 = tl.load(stats + LQ + rows, mask=in_r, other=0.0)
            ds = _hidden_backward(
                S_OUT + tile + r0 * LD, LD, 1, DZ2_OUT + tile + r0 * LD, LD, 1, in_r, mean1, rstd1, W1, B1, W2G, R1, LD,
                offs_j, in_j, BLOCK_ROWS, BLOCK_LD, BLOCK_K, BLOCK_R, PRECISION,
            )
            # dS is 0 at padded and masked tokens; the masks are read again here rather than held throughout.
            f, y, x = pair // (Y * X), (pair // X) % Y, pair % X
            rows_ok = _tokens_ok(QM, f * sqm_f + y * sqm_y + x * sqm_x, rows, Lq, sqm_t, HAS_QM)
            cols_ok = _tokens_ok(DM, f * sdm_f + y * sdm_y + x * sdm_x, offs_j, Ld, sdm_t, HAS_DM)
            ds = tl.where(rows_ok[:, None] & cols_ok[None, :], ds, 0.0)
            tl.store(DS + pair * Lq * Ld + rows[:, None] * Ld + offs_j[None, :], ds,
                     mask=(rows[:, None] < Lq) & (offs_j[None, :] < Ld))
        tl.store(VEC_LD + local * 2 * LD + offs_j, dxhat2_sum, mask=in_j)
        tl.store(VEC_LD + (local * 2 + 1) * LD + offs_j, dr_sum, mask=in_j)


# --------------------------------------------------------------------------------------------------------
# Launcher. Canonical tensors: q (F, Y, Lq, H), d (F, X, Ld, H), masks (F, Y, X, L) or None.
# --------------------------------------------------------------------------------------------------------
def _blocks(kernel: str, dtype: torch.dtype, arch: Optional[int], lq: int, ld: int, h: int) -> dict:
    """The launch's constexpr block sizes for ``kernel`` ("fwd", "bwd") on ``dtype`` inputs, and num_warps, on
    a GPU of compute capability ``arch`` (10 * major + minor), or on the interpreter (``arch`` None)."""
    if arch is None:
        blocks = INTERPRETER_BLOCKS
    else:
        blocks = GPU_BLOCKS[kernel + ("_fp32" if dtype == torch.float32 else "")]
        if arch < 90 and dtype != torch.float32:
            blocks = {**blocks, **GPU_BLOCKS_BEFORE_SM90[kernel]}
    # tl.dot's smallest K: 8 for 32-bit operands, 16 for 16-bit ones.
    min_k = 8 if dtype == torch.float32 else 16
    return dict(BLOCK_LQ=pow2(lq, 16), BLOCK_LD=pow2(ld, 16), BLOCK_H=pow2(min(h, blocks["BLOCK_H"]), min_k),
                BLOCK_R=blocks["BLOCK_R"], BLOCK_C=blocks["BLOCK_C"], BLOCK_K=min(pow2(ld, 16), blocks["BLOCK_K"]),
                BLOCK_KC=min(pow2(lq, 16), blocks["BLOCK_KC"]), BLOCK_ROWS=min(pow2(lq, 16), blocks["ROWS"]),
                BLOCK_COLS=min(pow2(ld, 16), blocks["COLS"]), num_warps=8)


def triton_forward(q, d, q_mask, d_mask, params, lq: int, ld: int, eps) -> Tensor:
    """float32 scores (F, Y, X) of the canonical q (F, Y, Lq, H) and d (F, X, Ld, H), masks (F, Y, X, L) or
    None, on the Triton kernel; ``params, lq, ld, eps`` as :func:`scorer_params` gives them."""
    q, d = _inner_contiguous(q), _inner_contiguous(d)
    W1, b1, g1, be1, W2, b2, g2, be2, V1, cb1, g3, be3, V2, cb2, g4, be4, wo, bo = (p.detach() for p in params)
    dtype = W1.dtype
    W2g, u1, c1 = fold_layernorm(W2, g1, be1, b2, dtype)
    V2g, u3, c3 = fold_layernorm(V2, g3, be3, cb2, dtype)
    Fd, Y, Lq, H = q.shape
    X, Ld = d.shape[1], d.shape[2]
    R1, C = W1.shape[0], V1.shape[0]
    n_pairs = Fd * Y * X
    out = torch.empty((Fd, Y, X), device=q.device, dtype=torch.float32)
    qms = list(q_mask.stride()) if q_mask is not None else [0, 0, 0, 0]
    dms = list(d_mask.stride()) if d_mask is not None else [0, 0, 0, 0]
    # The MLPs' inputs, per pair, in the weights' dtype (the dots' operand dtype): the kernel reads them back
    # in slices. Chunks of pairs bound that scratch however many pairs there are.
    chunk = max(1, min(n_pairs, SCRATCH_BYTES // (2 * lq * ld * dtype.itemsize)))
    scratch = torch.empty((2, chunk, lq, ld), device=q.device, dtype=dtype)
    for pair0 in range(0, n_pairs, chunk):
        with device_guard(q):
            _lite_fwd_kernel[(min(chunk, n_pairs - pair0),)](
                q, d, q_mask if q_mask is not None else out, d_mask if d_mask is not None else out, out,
                scratch[0], scratch[1],
                W1.contiguous(), b1.contiguous(), W2g, u1, c1, g2.contiguous(), be2.contiguous(),
                V1.contiguous(), cb1.contiguous(), V2g, u3, c3, g4.contiguous(), be4.contiguous(),
                wo.contiguous(), bo.contiguous(),
                pair0, Y, X, Lq, Ld, H, lq, ld, R1, C,
                q.stride(0), q.stride(1), q.stride(2), d.stride(0), d.stride(1), d.stride(2),
                *qms, *dms,
                *[float(e) for e in eps],
                HAS_QM=q_mask is not None, HAS_DM=d_mask is not None, PRECISION=dot_precision(q),
                **_blocks("fwd", q.dtype, cuda_arch(q), lq, ld, H),
            )
    return out


# Scratch of one backward chunk: the kernel's per-pair tiles plus the host's hidden layers (below), in bytes.
SCRATCH_BYTES = 256 << 20


BWD_TILES = 7  # the backward kernel's (lq, ld) float32 scratch tiles per pair: S, z2, R, dz2, dz4, T, dR


def _scratch_bytes_per_pair(lq: int, ld: int, r1: int, c: int) -> int:
    """The backward's scratch for one pair: the kernel's (lq, ld) float32 tiles and per-row statistics, and
    the ~6 live float32 copies of each hidden layer that _mlp_weight_grads makes (lq rows of width r1, ld
    rows of width c)."""
    return 4 * (BWD_TILES * lq * ld + 2 * lq + 6 * lq * r1 + 6 * ld * c)


def _pairs_per_chunk(lq: int, ld: int, r1: int, c: int) -> int:
    """Pairs per backward chunk, so that a chunk's scratch stays within SCRATCH_BYTES."""
    return max(1, SCRATCH_BYTES // _scratch_bytes_per_pair(lq, ld, r1, c))


def _mlp_weight_grads(x: Tensor, dz: Tensor, w_in: Tensor, b_in: Tensor, gamma: Tensor, beta: Tensor,
                      w_out: Tensor, eps: float) -> list[Tensor]:
    """Gradients of (W_in, b_in, gamma, beta, W_out, b_out) of z = W_out LN(ReLU(W_in x + b_in)) + b_out,
    summed over the rows of x (n, fan_in) given dz (n, fan_out): four GEMMs over every row of every pair
    of the chunk, with the hidden layer recomputed in float32. x is rounded to the weights' dtype first, as
    the kernel's dots see it, so that ReLU passes the same units the kernel's recompute does."""
    wf, bf, gf, bef, wof = (t.float() for t in (w_in, b_in, gamma, beta, w_out))
    x = x.to(w_in.dtype).float()
    pre = torch.addmm(bf, x, wf.t())
    live = (pre > 0) | torch.isnan(pre)  # ReLU passes NaN, as the kernel's _relu_passes does
    hid = torch.where(live, pre, 0.0)
    var, mean = torch.var_mean(hid, dim=1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (hid - mean) * rstd
    dw_out = dz.t() @ torch.addcmul(bef, xhat, gf)  # dz^T LN(h)
    dn = dz @ wof
    dgamma, dbeta = (dn * xhat).sum(0), dn.sum(0)
    dxh = dn * gf
    da = rstd * (dxh - dxh.mean(1, keepdim=True) - xhat * (dxh * xhat).mean(1, keepdim=True))
    da = torch.where(live, da, 0.0)
    return [da.t() @ x, da.sum(0), dgamma, dbeta, dw_out, dz.sum(0)]


def triton_backward(grad, q, d, q_mask, d_mask, params, lq: int, ld: int, eps) -> list[Tensor]:
    """Gradients for q, d and the 18 parameters. dS (pairs, Lq, Ld) goes to memory for dq and dd; the
    parameter gradients are GEMMs over the kernel's per-pair scratch, chunk by chunk (module docstring)."""
    q, d = _inner_contiguous(q), _inner_contiguous(d)
    W1, b1, g1, be1, W2, b2, g2, be2, V1, cb1, g3, be3, V2, cb2, g4, be4, wo, bo = (p.detach().contiguous() for p in params)
    dtype = W1.dtype
    W2g, u1, c1 = fold_layernorm(W2, g1, be1, b2, dtype)
    V2g, u3, c3 = fold_layernorm(V2, g3, be3, cb2, dtype)
    Fd, Y, Lq, H = q.shape
    X, Ld = d.shape[1], d.shape[2]
    R1, C = W1.shape[0], V1.shape[0]
    n_pairs = Fd * Y * X
    grad = grad.detach().float().contiguous()
    ds = torch.empty((Fd, Y, X, Lq, Ld), device=q.device, dtype=torch.float32)
    qms = list(q_mask.stride()) if q_mask is not None else [0, 0, 0, 0]
    dms = list(d_mask.stride()) if d_mask is not None else [0, 0, 0, 0]
    chunk = max(1, min(n_pairs, _pairs_per_chunk(lq, ld, R1, C)))
    tiles = torch.empty((BWD_TILES, chunk, lq, ld), device=q.device, dtype=torch.float32)
    stats = torch.empty((chunk, 2, lq), device=q.device, dtype=torch.float32)
    vec_ld = torch.empty((chunk, 2, ld), device=q.device, dtype=torch.float32)
    vec_lq = torch.empty((chunk, 2, lq), device=q.device, dtype=torch.float32)
    totals = None  # the parameter gradients of the chunks so far, summed, in the order of `grads` below
    for pair0 in range(0, n_pairs, chunk):
        n = min(chunk, n_pairs - pair0)
        s_t, z2_t, rows_t, dz2_t, dz4_t, t_t, dr_t = (tile[:n] for tile in tiles)
        with device_guard(q):
            _lite_bwd_kernel[(n,)](
                q, d, q_mask if q_mask is not None else ds, d_mask if d_mask is not None else ds, grad, ds,
                s_t, z2_t, rows_t, dz2_t, dz4_t, t_t, dr_t, stats, vec_ld, vec_lq,
                W1, b1, W2g, u1, c1, g2, be2,
                V1, cb1, V2g, u3, c3, g4, be4, wo,
                pair0, Y, X, Lq, Ld, H, lq, ld, R1, C,
                q.stride(0), q.stride(1), q.stride(2), d.stride(0), d.stride(1), d.stride(2),
                *qms, *dms,
                *[float(e) for e in eps],
                HAS_QM=q_mask is not None, HAS_DM=d_mask is not None, PRECISION=dot_precision(q),
                **_blocks("bwd", q.dtype, cuda_arch(q), lq, ld, H),
            )
        row = _mlp_weight_grads(s_t.reshape(-1, ld), dz2_t.reshape(-1, ld), W1, b1, g1, be1, W2, eps[0])
        col = _mlp_weight_grads(rows_t.transpose(1, 2).reshape(-1, lq), dz4_t.transpose(1, 2).reshape(-1, lq),
                                V1, cb1, g3, be3, V2, eps[2])
        dg2, dbe2 = vec_ld[:n, 0].sum(0), vec_ld[:n, 1].sum(0)  # apart: returned views of one tensor would alias
        dg4, dbe4 = vec_lq[:n, 0].sum(0), vec_lq[:n, 1].sum(0)
        dwo = torch.einsum("p,pij->ij", grad.reshape(-1)[pair0:pair0 + n], t_t)
        part = row[:6] + [dg2, dbe2] + col[:6] + [dg4, dbe4, dwo]
        totals = part if totals is None else [a + b for a, b in zip(totals, part)]
    # dS is 0 at masked tokens, but a masked token may hold inf or NaN and 0 * inf is NaN: the host matmuls
    # take q and d with their masked tokens zeroed.
    d_dq, d_sub = masked_tokens_zeroed(d, d_mask, pair_axis=1)
    q_dd, q_sub = masked_tokens_zeroed(q, q_mask, pair_axis=2)
    dq = torch.einsum(f"fyxij,{d_sub}->fyih", ds, d_dq.float()).to(q.dtype)
    dd = torch.einsum(f"fyxij,{q_sub}->fxjh", ds, q_dd.float()).to(d.dtype)
    dbo = grad.sum().reshape(bo.shape)
    grads = totals + [dbo]
    return [dq.contiguous(), dd.contiguous()] + [gr.to(p.dtype).reshape(p.shape) for gr, p in zip(grads, params)]


def _kernel_reasons(*, dtype: torch.dtype, weight_dtype: torch.dtype, lq: int, ld: int,
                    interpreter: bool = False, **_) -> list[str]:
    reasons = dtype_reasons(dtype, interpreter)
    if weight_dtype != dtype:
        reasons.append(f"the scorer's weights are {weight_dtype} but the inputs are {dtype}; the kernel needs one dtype")
    return reasons + list(_size_reasons(lq, ld).values())


def _size_reasons(lq: int, ld: int) -> dict[str, str]:
    reasons = {}
    if lq > MAX_LQ:
        reasons["lq"] = f"lq={lq} exceeds the kernel's {MAX_LQ}-row tile"
    if ld > MAX_LD:
        reasons["ld"] = f"ld={ld} exceeds the kernel's {MAX_LD}-column tile"
    return reasons


_SIZE_FALLBACK_WARNED: set[str] = set()


def _warn_size_fallback(tensors, lq: int, ld: int, **ctx) -> None:
    # A scorer wider than the tile runs every call on the reference: with the kernels otherwise usable, that
    # is a silent slowdown, so say it once per process for each limit (lq, ld) rather than on every call.
    sizes = _size_reasons(lq, ld)
    if not sizes.keys() - _SIZE_FALLBACK_WARNED or torch.compiler.is_compiling():
        return
    for kernel in ("triton", "triton_interpret"):
        reasons = dispatch.reasons_for("lite", kernel, tensors, lq=lq, ld=ld, **ctx)
        if reasons and set(reasons) <= set(sizes.values()):
            break
    else:
        return  # no kernel could run this call anyway (no GPU, dtype): the size costs nothing
    for limit, reason in sizes.items():
        if limit in _SIZE_FALLBACK_WARNED:
            continue
        _SIZE_FALLBACK_WARNED.add(limit)
        warnings.warn(
            f"fastrank.lite_score: the scorer's {reason}, so lite_score runs on the eager reference "
            f"({kernel} is passed over); on a GPU that is about 3.5x slower than the kernel and holds every hidden "
            f"layer in memory. A scorer with lq <= {MAX_LQ} and ld <= {MAX_LD} runs fused. Warned once per process.",
            RuntimeWarning, stacklevel=3,
        )


_TRITON = dispatch.Kernels(triton_forward, triton_backward)
dispatch.register("lite", "triton", _TRITON, reasons=_kernel_reasons)
dispatch.register("lite", "triton_interpret", _TRITON, reasons=lambda **ctx: _kernel_reasons(interpreter=True, **ctx),
                  slower=lambda **_: ["the Triton interpreter checks the GPU kernels on CPU; it never outruns eager"])
dispatch.register("lite", "cpp", dispatch.Kernels(lite_cpu.score), reasons=lite_cpu.reasons, slower=lite_cpu.slower,
                  describe=lite_cpu.describe)


# --------------------------------------------------------------------------------------------------------
# Custom ops (torch.library): opaque to torch.compile, with fake implementations and autograd.
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastrank::lite_forward", mutates_args=())
def _lite_forward_op(
    q: Tensor, d: Tensor, q_mask: Optional[Tensor], d_mask: Optional[Tensor], params: list[Tensor],
    lq: int, ld: int, eps: list[float], backend: str,
) -> Tensor:
    return dispatch.kernels("lite", backend, q).forward(q, d, q_mask, d_mask, params, lq, ld, eps)


@_lite_forward_op.register_fake
def _(q, d, q_mask, d_mask, params, lq, ld, eps, backend):
    return q.new_empty((q.shape[0], q.shape[1], d.shape[1]), dtype=torch.float32)


@torch.library.custom_op("fastrank::lite_backward", mutates_args=())
def _lite_backward_op(
    grad: Tensor, q: Tensor, d: Tensor, q_mask: Optional[Tensor], d_mask: Optional[Tensor],
    params: list[Tensor], lq: int, ld: int, eps: list[float], backend: str,
) -> list[Tensor]:
    return dispatch.kernels("lite", backend, q).backward(grad, q, d, q_mask, d_mask, params, lq, ld, eps)


@_lite_backward_op.register_fake
def _(grad, q, d, q_mask, d_mask, params, lq, ld, eps, backend):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, d, *params)]


def _setup_context(ctx, inputs, output):
    q, d, q_mask, d_mask, params, lq, ld, eps, backend = inputs
    ctx.n_params, ctx.lq, ctx.ld, ctx.eps, ctx.backend = len(params), lq, ld, eps, backend
    ctx.has_qm, ctx.has_dm = q_mask is not None, d_mask is not None
    ctx.save_for_backward(q, d, q_mask, d_mask, *params)


def _backward(ctx, grad_scores):
    q, d, q_mask, d_mask, *params = ctx.saved_tensors
    grads = _lite_backward_op(
        grad_scores, q, d, q_mask if ctx.has_qm else None, d_mask if ctx.has_dm else None, params,
        ctx.lq, ctx.ld, ctx.eps, ctx.backend,
    )
    return grads[0], grads[1], None, None, list(grads[2:]), None, None, None, None


_lite_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    # Registered so that backward(create_graph=True) still works (first order under a graph-recording
    # backward) and only differentiating the gradient again fails, saying what to use instead of torch's
    # generic "no autograd formula was registered".
    raise RuntimeError(DOUBLE_BACKWARD_ERROR.format(
        op="fastrank.lite_score", ref="fastrank.lite_ref",
        why="the LITE kernels' backward recomputes the forward on chip and has no derivative of its own"))


_lite_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
def scorer_params(scorer) -> tuple[list[Tensor], int, int, list[float]]:
    """The 18 tensors of a LiteScorer-layout module, in the order the ops take them, with lq, ld and the
    four LayerNorm epsilons. Checks the layout so that a wrong module fails here, not in a kernel."""
    try:
        row, col, out = scorer.row_mlp, scorer.col_mlp, scorer.out
        (row[0], row[2], row[3], row[5], col[0], col[2], col[3], col[5])  # IndexError/TypeError: not this layout
    except (AttributeError, IndexError, TypeError) as exc:
        raise TypeError(
            "lite_score: scorer must have the LiteScorer layout: row_mlp and col_mlp as nn.Sequential(Linear, "
            f"ReLU, LayerNorm, Linear, ReLU, LayerNorm) and out = Linear(lq*ld, 1) ({exc})"
        ) from None
    for seq_name, seq in (("row_mlp", row), ("col_mlp", col)):
        kinds = [type(m).__name__ for m in seq]
        if kinds != ["Linear", "ReLU", "LayerNorm", "Linear", "ReLU", "LayerNorm"]:
            raise TypeError(
                f"lite_score: scorer.{seq_name} must be (Linear, ReLU, LayerNorm, Linear, ReLU, LayerNorm), got {kinds}"
            )
        if seq[2].weight is None or seq[5].weight is None or seq[0].bias is None or seq[3].bias is None:
            raise TypeError(f"lite_score: scorer.{seq_name} needs biases and affine LayerNorms")
    ld, r1 = row[0].in_features, row[0].out_features
    lq, c = col[0].in_features, col[0].out_features
    for name, size in (("ld (row_mlp[0].in_features)", ld), ("the row hidden width (row_mlp[0].out_features)", r1),
                       ("lq (col_mlp[0].in_features)", lq), ("the column hidden width (col_mlp[0].out_features)", c)):
        if size < 1:
            raise ValueError(f"lite_score: the scorer's {name} is {size}; every width must be at least 1")
    expect = {"row_mlp[3]": (row[3], r1, ld), "col_mlp[3]": (col[3], c, lq), "out": (out, lq * ld, 1)}
    for name, (lin, fan_in, fan_out) in expect.items():
        if (lin.in_features, lin.out_features) != (fan_in, fan_out) or lin.bias is None:
            raise TypeError(f"lite_score: scorer.{name} must be Linear({fan_in}, {fan_out}) with bias")
    norms = (("row_mlp[2]", row[2], r1), ("row_mlp[5]", row[5], ld), ("col_mlp[2]", col[2], c), ("col_mlp[5]", col[5], lq))
    for name, norm, width in norms:
        if tuple(norm.normalized_shape) != (width,):
            raise TypeError(f"lite_score: scorer.{name} must be LayerNorm({width}), got {tuple(norm.normalized_shape)}")
    params = [
        row[0].weight, row[0].bias, row[2].weight, row[2].bias, row[3].weight, row[3].bias, row[5].weight, row[5].bias,
        col[0].weight, col[0].bias, col[2].weight, col[2].bias, col[3].weight, col[3].bias, col[5].weight, col[5].bias,
        out.weight, out.bias,
    ]
    eps = [float(row[2].eps), float(row[5].eps), float(col[2].eps), float(col[5].eps)]
    if len({p.device for p in params}) > 1 or len({p.dtype for p in params}) > 1:
        raise TypeError("lite_score: the scorer's parameters must share one device and one dtype")
    return params, lq, ld, eps


def _project(scorer, q: Tensor, d: Tensor, q_mask: Optional[Tensor], d_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Small LITE: Linear(H -> d') then L2 normalisation of every token, when the scorer has ``proj``.
    Masked tokens are zeroed first: an inf in one would make its projection NaN, and the backward of the
    normalisation would carry that NaN into proj's gradients even though the token's gradient is 0."""
    proj = getattr(scorer, "proj", None)
    if proj is None:
        return q, d
    q, d = _zero_masked_tokens(q, q_mask), _zero_masked_tokens(d, d_mask)
    for name, t in (("q", q), ("d", d)):
        if t.shape[-1] != proj.in_features:
            raise ValueError(
                f"lite_score: {name} has H={t.shape[-1]} but the scorer's projection takes H={proj.in_features}"
            )
    weight = proj.weight.to(q.dtype)
    bias = proj.bias.to(q.dtype) if proj.bias is not None else None
    return (F_.normalize(F_.linear(q, weight, bias), dim=-1), F_.normalize(F_.linear(d, weight, bias), dim=-1))


def dispatch_context(q: Tensor, params: list[Tensor], lq: int, ld: int, needs_grad: bool = False,
                     pairs: Optional[int] = None) -> dict:
    """What the backends' reasons look at: the dtypes, the scorer's lq and ld, whether the call needs
    gradients, whether torch.compile is tracing and, on the CPU, the ISA path and whether there are fewer
    pairs than threads. For :func:`fastrank.dispatch.explain`:
    ``explain("lite", (q, d), **dispatch_context(q, scorer_params(scorer)[0], lq, ld, pairs=len(d)))``."""
    ctx = dict(dtype=q.dtype, weight_dtype=params[0].dtype, lq=lq, ld=ld, needs_grad=needs_grad,
               compiling=torch.compiler.is_compiling())
    if q.device.type == "cpu":
        ctx["isa"] = cpu_isa.selected_for("lite", q.dtype)
        # Not traced: a compiled graph is a training step or a batch, and get_num_threads breaks the graph.
        few = pairs is not None and not torch.compiler.is_compiling() and pairs < torch.get_num_threads()
        ctx["underfilled"] = few
    return ctx


def _check_inputs(q, d, q_mask, d_mask, lq: int, ld: int, scorer_device: torch.device) -> torch.Size:
    return check_pair_inputs("lite_score", q, d, q_mask, d_mask, extra_devices={"scorer": scorer_device},
                             limits=(lq, ld))


def lite_score(
    q: Tensor,
    d: Tensor,
    q_mask: Optional[Tensor] = None,
    d_mask: Optional[Tensor] = None,
    *,
    scorer,
    backend: Optional[str] = None,
) -> Tensor:
    """Separable LITE scores, fused: S = q d^T padded to (lq, ld), row MLP, column MLP, Linear(lq*ld -> 1).

    Args:
        q: (..., Lq, H) query token embeddings, float32, float16 or bfloat16, Lq <= scorer's lq.
        d: (..., Ld, H) document token embeddings, same dtype and device, Ld <= scorer's ld. The leading
            dims broadcast like :func:`fastrank.maxsim`: q (Lq, H) with d (N, Ld, H) gives (N,) (re-ranking);
            q (B, 1, Lq, H) with d (B, K, Ld, H) gives (B, K); q (B, 1, Lq, H) with d (1, B, Ld, H) gives
            (B, B). The broadcast operand is never copied.
        q_mask: optional bool (..., Lq); False zeroes that row of S (as padding does).
        d_mask: optional bool (..., Ld); False zeroes that column of S. A masked token's values are never
            used, so padding may hold anything, inf and NaN included: the score and every gradient are those
            of the same inputs with the token zeroed, and the token's own gradient is 0. A NaN in an unmasked
            token propagates to its scores.
        scorer: a :class:`fastrank.LiteScorer`, or any module with its layout (``row_mlp``, ``col_mlp``,
            ``out``, optional ``proj``). Its parameters get gradients.
        backend: force one of :data:`fastrank.BACKENDS` (default: the first that can run, also settable
            with ``FASTRANK_BACKEND``). The kernels hold a scorer of lq <= 64 and ld <= 256; a wider one
            runs on the reference, with a warning (once per process) when automatic dispatch falls back.

    Returns:
        float32 scores of the broadcast batch shape (float64 for float64 inputs, which run on the
        reference). Accumulation is float32 whatever the input dtype.

    Gradients are first order on the kernels: double backward (``create_graph=True`` and then a gradient
    of a gradient, as a gradient penalty needs) raises a RuntimeError saying so. :func:`lite_ref`, or
    ``backend="reference"``, is plain PyTorch and differentiates to any order.
    """
    params, lq, ld, eps = scorer_params(scorer)
    batch = _check_inputs(q, d, q_mask, d_mask, lq, ld, params[0].device)
    q, d = _project(scorer, q, d, q_mask, d_mask)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, d, *params))
    ctx = dispatch_context(q, params, lq, ld, needs_grad, math.prod(batch))
    impl = dispatch.choose("lite", (q, d, q_mask, d_mask), backend, **ctx)
    kernels = dispatch.kernels("lite", impl.backend, q)
    if math.prod(batch) == 0 or q.shape[-2] == 0 or d.shape[-2] == 0 or q.shape[-1] == 0:  # outside the kernels' contract
        return _lite_math(q, d, q_mask, d_mask, params, lq, ld, eps)
    if kernels.backward is None:  # eager PyTorch (the reference) or the CPU kernel, each with its own autograd
        if (lq > MAX_LQ or ld > MAX_LD) and dispatch.requested_backend(backend, "lite") is None:
            _warn_size_fallback((q, d, q_mask, d_mask), **ctx)
        return kernels.forward(q, d, q_mask, d_mask, params, lq, ld, eps)
    c = _canonicalize(q, d, q_mask, d_mask, batch)
    if needs_grad or torch.compiler.is_compiling():
        scores = _lite_forward_op(c.q, c.d, c.q_mask, c.d_mask, params, lq, ld, eps, impl.backend)
    else:  # inference: no graph to record, so skip the custom-op machinery
        scores = kernels.forward(c.q, c.d, c.q_mask, c.d_mask, params, lq, ld, eps)
    return c.restore(scores)


def _zero_masked_tokens(t: Tensor, mask: Optional[Tensor]) -> Tensor:
    # Broadcasts t to the mask's batch shape when the mask has more batch dims; paths that must not copy
    # the broadcast operand (the kernels) skip masked tokens in their own loads instead.
    return t if mask is None else torch.where(mask.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype, device=t.device))


def _lite_math(q: Tensor, d: Tensor, q_mask, d_mask, params, lq: int, ld: int, eps) -> Tensor:
    """The computation of :func:`lite_ref` on explicit parameters (also what the backward recomputes)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    (W1, b1, g1, be1, W2, b2, g2, be2, V1, cb1, g3, be3, V2, cb2, g4, be4, wo, bo) = (p.to(compute) for p in params)
    # Masked tokens may hold anything (inf, NaN): select, never multiply by the mask (0 * inf is NaN), and
    # zero them before the matmul too, so that its backward (dS d, dS^T q) never meets them either.
    q, d = _zero_masked_tokens(q.to(compute), q_mask), _zero_masked_tokens(d.to(compute), d_mask)
    s = torch.matmul(q, d.transpose(-1, -2))  # (..., Lq, Ld)
    if q_mask is not None:
        s = torch.where(q_mask.unsqueeze(-1), s, 0.0)
    if d_mask is not None:
        s = torch.where(d_mask.unsqueeze(-2), s, 0.0)
    s = F_.pad(s, (0, ld - s.shape[-1], 0, lq - s.shape[-2]))  # (..., lq, ld), zeros where there is no token
    r = F_.layer_norm(F_.relu(F_.linear(s, W1, b1)), (W1.shape[0],), g1, be1, eps[0])
    r = F_.layer_norm(F_.relu(F_.linear(r, W2, b2)), (ld,), g2, be2, eps[1])
    t = r.transpose(-1, -2)  # (..., ld, lq): the column MLP runs over the query axis
    t = F_.layer_norm(F_.relu(F_.linear(t, V1, cb1)), (V1.shape[0],), g3, be3, eps[2])
    t = F_.layer_norm(F_.relu(F_.linear(t, V2, cb2)), (lq,), g4, be4, eps[3])
    flat = t.transpose(-1, -2).reshape(*t.shape[:-2], lq * ld)  # row-major flattening of (lq, ld)
    return F_.linear(flat, wo, bo).squeeze(-1)


dispatch.register("lite", "reference", dispatch.Kernels(_lite_math))


def lite_ref(q: Tensor, d: Tensor, q_mask: Optional[Tensor] = None, d_mask: Optional[Tensor] = None, *, scorer) -> Tensor:
    """The specification of :func:`lite_score` in plain PyTorch (materialises S and the hidden layers).

    Same arguments as :func:`lite_score`. Computes in float32 (float64 for float64 inputs; the scorer's
    parameters are cast to that dtype) and returns that dtype.
    """
    params, lq, ld, eps = scorer_params(scorer)
    _check_inputs(q, d, q_mask, d_mask, lq, ld, params[0].device)
    q, d = _project(scorer, q, d, q_mask, d_mask)
    return _lite_math(q, d, q_mask, d_mask, params, lq, ld, eps)
