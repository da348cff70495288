"""Nearest centroid among many through groups of centroids: the token assignment of large streamed builds.

Coding every token against all ``C`` centroids costs ``T x C x H`` multiply-adds: at 100M tokens and the
default 32,768 centroids that is 840 TFLOP, more than two hours of a 2-core CPU's bfloat16 GEMM rate, and it
grows as ``T^1.5`` when ``C`` follows ``sqrt(T)``. The router clusters the centroids themselves into groups of
about :data:`GROUP_SIZE` (spherical k-means, once, stored with stage 1); a token is scored against the group
centres and then exactly against the members of its :data:`PROBES` best groups, one GEMM per group over the
tokens that probe it: ``C / 256 + 16 x 256`` products a token instead of ``C`` (4,224 instead of 32,768).

A token gets its exact nearest centroid whenever that centroid's group is probed: measured at 32,768
centroids on the scale benchmark's tokens, 99.8% of tokens, a mean score loss of 0.0002 and a 99.9th
percentile of 0.05 (and 97.6-98.3% with 8 probes of 64 groups on SciFact's MiniLM tokens). The rest get the
best centroid of the probed groups, which can be a poor one: such a token sits in a list its query tokens may
not probe, and its residual is larger. Codes never change a score except through that residual.
``tests/test_centroid_router.py`` holds the agreement to these figures.

A search's stage 1 routes its query tokens the same way (:meth:`CentroidRouter.top`): each token's best
``nprobe + 1`` centroids are taken among the members of its probed groups, scored exactly in float32, instead
of among all ``C``. At 32,768 centroids that is 8x fewer products and no (tokens x C) score matrix; the
centroids it misses are those in unprobed groups, which the build's codes rarely use for such a token either.
"""
from __future__ import annotations

import math
import threading

import torch

# Centroids per group: each group's GEMM is (its tokens x H) @ (H x 256), wide enough to run near the GEMM
# rate; narrower groups (sqrt(C) of them) did fewer products but ran slower than the exact assignment.
GROUP_SIZE = 256
# Groups probed per token: 16 of 128 at C = 32,768.
PROBES = 16
# Below this many centroids the exact assignment is as fast (measured at 4,096: exact 1.3 s, router 3 s for
# 200k tokens): no router.
MIN_CENTROIDS = 8192
GROUP_KMEANS_ITERS = 8


def group_count(ncentroids: int) -> int:
    return max(1, ncentroids // GROUP_SIZE)


_local = threading.local()


def _scratch(numel: int, device: torch.device) -> torch.Tensor:
    """A float32 buffer of ``numel`` elements, kept per thread between calls: top()'s score rows (52 MB for a
    batch of 2,048 query tokens at 32,768 centroids) freshly allocated cost as much in page faults as the
    topk over them."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel or buf.device != device:
        buf = _local.buf = torch.empty(numel, device=device)
    return buf[:numel]


class CentroidRouter:
    """``assign(x)`` = the nearest of ``centroids`` (C, H) to each row of ``x``, through ``groups`` (C,) int64
    (each centroid's group) and the groups' unit centres ``centres`` (G, H)."""

    def __init__(self, centroids: torch.Tensor, groups: torch.Tensor, centres: torch.Tensor, probes: int = PROBES):
        from fastrank.index.kmeans import similarity_dtype

        self.centroids, self.groups, self.centres = centroids.float(), groups.long(), centres.float()
        self.probes = min(probes, centres.shape[0])
        self.dt = similarity_dtype(centroids.device)
        order = torch.argsort(self.groups, stable=True)
        counts = torch.bincount(self.groups, minlength=centres.shape[0]).cpu()
        bounds = torch.zeros(centres.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=bounds[1:])
        bounds = bounds.tolist()
        # Each group's members, as centroid ids and as the transposed block the GEMM reads.
        self.members = [order[bounds[g]:bounds[g + 1]] for g in range(centres.shape[0])]
        self.blocks = [self.centroids[m].to(self.dt).T.contiguous() for m in self.members]
        self.centres_t = self.centres.to(self.dt).T.contiguous()
        self._blocks32: list[torch.Tensor] | None = None  # float32 copies for top(), made on its first call
        self._centres32: torch.Tensor | None = None

    @classmethod
    def train(cls, centroids: torch.Tensor, seed: int) -> "CentroidRouter":
        """Groups for ``centroids`` by spherical k-means over them (seeded: the same centroids give the same
        groups)."""
        from fastrank.index.kmeans import nearest_centroid, spherical_kmeans

        g = torch.Generator().manual_seed(seed + 1)
        centres = spherical_kmeans(centroids.float(), group_count(centroids.shape[0]), iters=GROUP_KMEANS_ITERS,
                                   generator=g)
        return cls(centroids, nearest_centroid(centroids.float(), centres).long(), centres)

    def assign(self, x: torch.Tensor, block: int = 1 << 16) -> torch.Tensor:
        """Codes (int32) of the rows of ``x`` (n, H)."""
        out = torch.empty(x.shape[0], dtype=torch.int32)
        for s in range(0, x.shape[0], block):
            out[s:s + block] = self._assign_block(x[s:s + block].to(self.dt))
        return out

    def _assign_block(self, x: torch.Tensor) -> torch.Tensor:
        n, p = x.shape[0], self.probes
        top = (x @ self.centres_t).topk(p, dim=1).indices.reshape(-1)
        # (token, probe) pairs sorted by group: each group's tokens are one run, scored by one GEMM.
        order = torch.argsort(top, stable=True)
        runs = torch.bincount(top, minlength=len(self.members)).tolist()
        token = order // p
        best = torch.full((n,), -math.inf)
        code = torch.zeros(n, dtype=torch.int64)
        start = 0
        for g, count in enumerate(runs):
            if count == 0 or self.members[g].numel() == 0:
                start += count
                continue
            rows = token[start:start + count]
            start += count
            value, j = (x[rows] @ self.blocks[g]).max(1)
            value = value.float()
            better = value > best[rows]
            rows = rows[better]
            best[rows] = value[better]
            code[rows] = self.members[g][j[better]]
        return code.to(torch.int32)

    def top(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best centroids of each row of ``x`` (n, H) among the members of its ``probes`` best
        groups, by float32 inner product: ``(scores (n, k) float32 descending, ids (n, k) int64)``. A row
        whose probed groups hold fewer than ``k`` centroids is padded with ``-inf`` scores (and id 0)."""
        if x.dim() != 2 or x.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"x must be (n, {self.centroids.shape[1]}), got {tuple(x.shape)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        x = x.float()
        n, p = x.shape[0], self.probes
        if self._blocks32 is None:  # assign()'s blocks where they are float32 already
            f32 = self.dt == torch.float32
            self._blocks32 = self.blocks if f32 else [self.centroids[m].T.contiguous() for m in self.members]
            self._centres32 = self.centres_t if f32 else self.centres.T.contiguous()
            self._widths = [m.numel() for m in self.members]
            # Row g: group g's members, then id 0 where a shorter group is padded (scored -inf, never kept
            # unless a token's groups hold fewer than k centroids, which top() documents).
            self._member_table = torch.zeros(len(self.members), max(self._widths), dtype=torch.int64)
            for g, m in enumerate(self.members):
                self._member_table[g, :m.numel()] = m
        top = (x @ self._centres32).topk(p, dim=1).indices.reshape(-1)
        order = torch.argsort(top, stable=True)
        runs = torch.bincount(top, minlength=len(self.members)).tolist()
        # Every (token, probed group) pair's scores against the group's members, padded with -inf to the
        # largest group, in a row per token of p * width: one topk over long rows (torch's topk costs 4-5 ns an
        # element on rows of 256, about 1 ns on rows of thousands).
        width = max(self._widths)
        scores = _scratch(n * p * width, x.device).view(n * p, width).fill_(-math.inf)
        start = 0
        for g, count in enumerate(runs):
            m = self._widths[g]
            if count and m:
                pairs = order[start:start + count]
                scores[:, :m].index_copy_(0, pairs, x[pairs // p] @ self._blocks32[g])
            start += count
        s, j = scores.view(n, p * width).topk(min(k, p * width), dim=1)
        ids = self._member_table[top.view(n, p).gather(1, j // width), j % width]
        if s.shape[1] < k:
            s = torch.nn.functional.pad(s, (0, k - s.shape[1]), value=-math.inf)
            ids = torch.nn.functional.pad(ids, (0, k - ids.shape[1]))
        return s, ids

    def arrays(self) -> dict[str, torch.Tensor]:
        """What stage 1 stores to rebuild the router: each centroid's group and the group centres."""
        return {"groups": self.groups.to(torch.int32), "centres": self.centres}
