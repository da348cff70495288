"""PLAID-style residual compression of token embeddings (ColBERTv2): a token is its centroid's code plus a
b-bit bucket per dimension of its residual.

    r      = x - centroids[code]                                     (H,) float32
    bucket = #{i : cutoffs[i] < r_h}   in [0, 2^b)                   (torch.bucketize, right=False)
    x'     = centroids[code] + weights[bucket]                       the decompressed token

``cutoffs`` (2^b - 1,) and ``weights`` (2^b,) are shared by every dimension, learned from a sample of
residuals pooled over dimensions (:func:`train_residual_codec`: Lloyd-Max, the least-squares quantizer, by
default; ColBERTv2's quantiles on request). Packed layout, one row per token, H * b / 8
bytes: the bucket of dimension h sits in byte (h * b) // 8 at bit offset (h * b) % 8, lowest bits first
(b = 2: dimension 4k is bits 0-1 of byte k, dimension 4k + 3 bits 6-7).

Codes are int32 or uint16 (on disk, when there are at most 65536 centroids), int64 accepted too. Pure
PyTorch: :func:`decompress_residuals` is the reference that the fused scoring kernels
(:mod:`fastrank.ops.maxsim_residual`) are checked against.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["train_residual_codec", "compress_residuals", "decompress_residuals", "unpack_buckets"]

NBITS = (1, 2, 4)
CODE_DTYPES = (torch.int32, torch.uint16, torch.int64)
# torch.quantile refuses inputs above 2^24 elements; a sample of that size pins the quantiles to well
# under a thousandth of the distribution.
SAMPLE = 1 << 24
# Rows per chunk when compressing, so that the float32 residual and its buckets stay a bounded buffer.
CHUNK_ROWS = 1 << 16


def check_nbits(nbits, where: str) -> int:
    if isinstance(nbits, bool) or not isinstance(nbits, int) or nbits not in NBITS:
        raise ValueError(f"{where}: nbits must be one of {NBITS}, got {nbits!r}")
    return nbits


def check_dim(h: int, nbits: int, where: str, name: str = "H") -> None:
    if h < 1 or (h * nbits) % 8:
        raise ValueError(f"{where}: {name} * nbits must be a positive multiple of 8 (whole bytes per token), "
                         f"got {name} = {h} with nbits = {nbits}")


def codes_as_index(codes: Tensor) -> Tensor:
    """int64 copy of ``codes`` for indexing (torch converts uint16 to int64 exactly)."""
    return codes.to(torch.int64)


def check_codes(codes: Tensor, rows: int, where: str) -> None:
    if not isinstance(codes, Tensor):
        raise TypeError(f"{where}: codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype not in CODE_DTYPES:
        raise TypeError(f"{where}: codes must be int32 or uint16 (or int64), got {codes.dtype}")
    if codes.dim() != 1 or codes.shape[0] != rows:
        raise ValueError(f"{where}: codes must have shape ({rows},) (one per token row), got {tuple(codes.shape)}")


def check_code_range(codes: Tensor, num_centroids: int, where: str, rows: Optional[Tensor] = None) -> None:
    """Every code (of ``rows`` only, when given) indexes a centroid row (0 .. C - 1); one reduction, a single
    host sync on a GPU. The error names the first bad row by its index in ``codes``."""
    if codes.numel() == 0 or codes.device.type == "meta":
        return
    c = codes_as_index(codes if rows is None else codes[rows])
    if c.numel() == 0:
        return
    lo, hi = torch.aminmax(c)
    if int(lo) < 0 or int(hi) >= num_centroids:
        at = int(torch.nonzero((c < 0) | (c >= num_centroids))[0, 0])
        row = at if rows is None else int(rows[at])
        raise ValueError(f"{where}: codes[{row}] = {int(c[at])} does not index the {num_centroids} rows of centroids "
                         f"(0 .. {num_centroids - 1})")


def _check_float(t, name: str, where: str, shape_text: str, dim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: {name} must be a float32 torch.Tensor {shape_text}, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{where}: {name} must be float32, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{where}: {name} must have shape {shape_text}, got {tuple(t.shape)}")


def check_codec(cutoffs_or_weights: Tensor, name: str, nbits: int, where: str) -> None:
    n = (1 << nbits) - (1 if name == "cutoffs" else 0)
    _check_float(cutoffs_or_weights, name, where, f"({n},)", 1)
    if cutoffs_or_weights.shape[0] != n:
        raise ValueError(f"{where}: {name} must have shape ({n},) for nbits = {nbits}, got "
                         f"{tuple(cutoffs_or_weights.shape)}")


# How the codec is trained: Lloyd-Max by default. On SciFact (the trained 128-dim MaxSim head, full retrieval
# through build_token_index, nDCG@10; float16 0.7684), quantiles then Lloyd-Max: 1 bit 0.7311 and 0.7437,
# 2 bits 0.7573 and 0.7614, 4 bits 0.7683 and 0.7658. On Laplace residuals Lloyd-Max's squared error is 0.91,
# 0.62 and 0.29 of the quantiles' at 1, 2 and 4 bits; at 4 bits both sit within 0.003 of float16, about the
# spread between two builds, so one method serves every width.
CODEC_METHODS = ("lloyd", "quantile")
LLOYD_ITERS = 20
# Lloyd-Max runs on a seeded sample of this many of the values: a bucket mean over a million values is within
# 0.1% of a bucket's spread of its limit, and 20 passes over 2^24 values would add seconds to every build.
LLOYD_SAMPLE = 1 << 20


def train_residual_codec(residuals: Tensor, nbits: int, *, method: str = "lloyd") -> tuple[Tensor, Tensor]:
    """Bucket cutoffs and reconstruction weights from residuals (n, H), pooled over every dimension.

    ``method="quantile"``, as ColBERTv2: ``cutoffs[i - 1]`` is the quantile i / 2^b (i = 1 .. 2^b - 1) and
    ``weights[i]`` the quantile (i + 0.5) / 2^b (i = 0 .. 2^b - 1), both linear interpolation (torch.quantile).
    ``method="lloyd"``: Lloyd-Max, the scalar quantizer of least squared error, started from the quantiles:
    :data:`LLOYD_ITERS` rounds (on :data:`LLOYD_SAMPLE` of the values) of each weight set to the mean of its bucket's values and each cutoff to the
    midpoint of its two weights (so a residual goes to its nearest weight). Residuals peak at 0 with long
    tails; equal-count buckets place the outer weights too far in, Lloyd-Max moves them out. Lloyd-Max is the
    default (why: the comment above :data:`CODEC_METHODS`).

    Above 2^24 values a seeded random sample of 2^24 of them (with replacement) stands for the whole, so the
    result is deterministic. Returns float32 ``(cutoffs (2^b - 1,), weights (2^b,))``, both non-decreasing,
    each weight inside its bucket."""
    where = "train_residual_codec"
    nbits = check_nbits(nbits, where)
    if method not in CODEC_METHODS:
        raise ValueError(f"{where}: method must be one of {CODEC_METHODS}, got {method!r}")
    if not isinstance(residuals, Tensor) or residuals.dim() != 2 or not residuals.is_floating_point():
        raise ValueError(f"{where}: residuals must be a float tensor of shape (n, H), got "
                         + (f"{residuals.dtype} {tuple(residuals.shape)}" if isinstance(residuals, Tensor)
                            else type(residuals).__name__))
    flat = residuals.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError(f"{where}: residuals must hold at least one value, got shape {tuple(residuals.shape)}")
    if flat.numel() > SAMPLE:
        gen = torch.Generator(device=flat.device).manual_seed(0)
        flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=gen, device=flat.device)]
    flat = flat.float()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{where}: residuals contain NaN or inf")
    k = 1 << nbits
    at_cutoffs = torch.arange(1, k, dtype=torch.float32, device=flat.device) / k
    at_weights = (torch.arange(k, dtype=torch.float32, device=flat.device) + 0.5) / k
    quantiles = torch.quantile(flat, torch.cat([at_cutoffs, at_weights]))
    cutoffs, weights = quantiles[: k - 1].contiguous(), quantiles[k - 1:].contiguous()
    if method == "lloyd":
        cutoffs, weights = _lloyd_max(flat, cutoffs, weights)
    return cutoffs, weights


def _lloyd_max(flat: Tensor, cutoffs: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    k = weights.numel()
    if flat.numel() > LLOYD_SAMPLE:
        gen = torch.Generator(device=flat.device).manual_seed(1)
        flat = flat[torch.randint(flat.numel(), (LLOYD_SAMPLE,), generator=gen, device=flat.device)]
    for _ in range(LLOYD_ITERS):
        bucket = torch.bucketize(flat, cutoffs, right=False)  # compress_residuals' rule
        count = torch.bincount(bucket, minlength=k)
        total = torch.zeros(k, dtype=torch.float64, device=flat.device).scatter_add_(0, bucket, flat.double())
        # An empty bucket keeps its weight; cummax keeps the weights ordered if that leaves one behind.
        new = torch.where(count > 0, total / count.clamp(min=1), weights.double()).float().cummax(0).values
        moved = not torch.equal(new, weights)
        weights = new
        cutoffs = ((weights[1:] + weights[:-1]) / 2).contiguous()
        if not moved:
            break
    return cutoffs, weights.contiguous()


def _check_tokens(x, codes, centroids, where: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{where}: x must be a float tensor of shape (T, H), got "
                         + (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__))
    _check_float(centroids, "centroids", where, "(C, H)", 2)
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"{where}: centroids (C, H) must share x's H = {x.shape[1]}, got {tuple(centroids.shape)}")
    check_codes(codes, x.shape[0], where)


def compress_residuals(x: Tensor, codes: Tensor, centroids: Tensor, cutoffs: Tensor, nbits: int) -> Tensor:
    """Packs the residuals of tokens ``x`` (T, H) from their centroids ``centroids[codes]`` (C, H) float32.

    The bucket of dimension h is the number of cutoffs strictly below the residual (torch.bucketize with
    right=False: a value equal to a cutoff falls in the lower bucket). Returns uint8 (T, H * nbits / 8) in the
    layout of the module docstring. ``codes``: (T,) int32 or uint16, each in [0, C)."""
    where = "compress_residuals"
    nbits = check_nbits(nbits, where)
    _check_tokens(x, codes, centroids, where)
    check_codec(cutoffs, "cutoffs", nbits, where)
    T, H = x.shape
    check_dim(H, nbits, where)
    check_code_range(codes, centroids.shape[0], where)
    per = 8 // nbits
    shifts = torch.arange(0, 8, nbits, dtype=torch.uint8, device=x.device)
    out = torch.empty((T, H * nbits // 8), dtype=torch.uint8, device=x.device)
    for r0 in range(0, T, CHUNK_ROWS):
        r1 = min(T, r0 + CHUNK_ROWS)
        residual = x[r0:r1].detach().float() - centroids[codes_as_index(codes[r0:r1])]
        bucket = torch.bucketize(residual, cutoffs, right=False).to(torch.uint8)  # (rows, H) in [0, 2^b)
        out[r0:r1] = (bucket.view(r1 - r0, H // per, per) << shifts).sum(dim=2, dtype=torch.uint8)
    return out


def unpack_buckets(packed: Tensor, nbits: int) -> Tensor:
    """The buckets (T, H) int64 of packed rows (T, H * nbits / 8)."""
    per = 8 // nbits
    shifts = torch.arange(0, 8, nbits, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & ((1 << nbits) - 1)
    return bits.reshape(packed.shape[0], packed.shape[1] * per).to(torch.int64)


def decompress_residuals(packed: Tensor, codes: Tensor, centroids: Tensor, weights: Tensor, nbits: int) -> Tensor:
    """``centroids[codes] + weights[bucket]``: the float32 tokens (T, H) that packed rows stand for (the
    reference of every residual kernel). ``packed``: uint8 (T, H * nbits / 8); ``codes``: (T,) int32 or
    uint16, each in [0, C); ``centroids``: float32 (C, H); ``weights``: float32 (2^nbits,)."""
    where = "decompress_residuals"
    nbits = check_nbits(nbits, where)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"{where}: packed must be a uint8 tensor of shape (T, H * nbits / 8), got "
                        + (f"{packed.dtype} {tuple(packed.shape)}" if isinstance(packed, Tensor) else type(packed).__name__))
    _check_float(centroids, "centroids", where, "(C, H)", 2)
    check_codec(weights, "weights", nbits, where)
    H = centroids.shape[1]
    check_dim(H, nbits, where, "centroids' H")
    if packed.shape[1] != H * nbits // 8:
        raise ValueError(f"{where}: packed must have H * nbits / 8 = {H * nbits // 8} bytes per row for H = {H}, "
                         f"got {tuple(packed.shape)}")
    check_codes(codes, packed.shape[0], where)
    check_code_range(codes, centroids.shape[0], where)
    return centroids[codes_as_index(codes)] + weights[unpack_buckets(packed, nbits)]
