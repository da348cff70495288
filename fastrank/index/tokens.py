"""TokenIndex: late-interaction (MaxSim) retrieval over token vectors, with PLAID-style candidate generation.

Search runs in two stages:

1. candidates (``stage1="centroids"``). At build time spherical k-means finds ``ncentroids`` centroids
   over a sample of the document tokens; every token is assigned its nearest centroid (its *code*)
   and an inverted list per centroid holds the documents that have a token there. At search time each query
   token ``l`` probes its ``nprobe`` best centroids; the union of their lists is the candidate set, ranked by
   a centroid-interaction estimate of MaxSim::

       approx(d) = sum_l max(s_l_floor, max{ <q_l, c> : c probed by l and d has a token coded c })

   where ``s_l_floor`` is the score of token ``l``'s best unprobed centroid (its ``nprobe + 1``-th): a
   document absent from every list token ``l`` probed has its tokens in unprobed centroids, none scoring
   more. Ranking only needs the gains over the floor, so the floor itself is never added. The best ``ndocs``
   candidates go on. :func:`fastrank.ops.centroid_candidates.centroid_candidates` computes this: on CPU a C++
   kernel that walks the probed lists once with a slot per document per thread (8 bytes a document), so its
   time follows the probed entries and its memory the document count, never the batch's entries.
2. exact scoring: the candidates' token rows are gathered into one packed tensor (no padding) and scored
   with :func:`fastrank.ops.maxsim_packed.maxsim_packed`; the top ``k`` are returned.

``stage1="exhaustive"`` (or ``search(..., exhaustive=True)`` on any index) skips stage 1 and scores every
document exactly, in chunks: the ground truth for the centroid stage, and the right choice for small corpora.
A document without tokens scores 0 there and is never a centroid candidate.

Document tokens are stored once, back to back with offsets (document ``i`` owns rows
``offsets[i]:offsets[i+1]``), as float16, bfloat16, or int8 with a float32 scale per token
(:func:`fastrank.ops.maxsim_packed.quantize_tokens`): 2, 2 or 1 byte per element (+4 bytes a token).
Stage 1 adds ``ncentroids x dim`` float32 centroids and a 4-byte code per token.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch

from fastrank.encoders import TokenEmbeddings
from fastrank.index.kmeans import nearest_centroid, spherical_kmeans
from fastrank.index.storage import (META, IndexFormatError, check_finite_rows, check_ids, check_unique_ids, is_int,
                                    meta_field, optional_positive_int, positive_int, read_meta, save_index_dir,
                                    verify_files, verify_meta_checksum, write_npy)
from fastrank.progress import progress_bar

FORMAT = "fastrank.TokenIndex"
# Version 1 held a per-token ANN (a DenseIndex in ann/) and float16 tokens; version 2 is centroid stage 1,
# selectable token storage. The layouts share nothing, so version 1 is rebuilt, not converted. Version 3 made
# meta.json a manifest (written_by, meta_sha256; see fastrank.index.storage); version 2 has the same files
# and fields, so it still loads, with every field checked but no checksum of meta.json.
FORMAT_VERSION = 3
LEGACY_VERSION = 2
REBUILD_HINT = "rebuild with `fastrank index --tokens CORPUS OUT` (or TokenIndex(...).add(...).save(...))"

TOKEN_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
# PLAID-style residual storage (issue 24): a centroid code and b bits per dimension; built by streaming
# (fastrank.index.token_stream.TokenIndexWriter, `fastrank index --token-dtype residual2`).
RESIDUAL_DTYPES = ("residual1", "residual2", "residual4")
ALL_TOKEN_DTYPES = (*TOKEN_DTYPES, *RESIDUAL_DTYPES)
# The streamed layout (column files under a commit manifest, fastrank.index.columns): its own version, read
# beside the saved-by-save() layout of FORMAT_VERSION.
STREAM_VERSION = 4


def residual_bits(token_dtype: str) -> int | None:
    """``b`` of a ``residual<b>`` token dtype, else None."""
    return int(token_dtype[8:]) if token_dtype in RESIDUAL_DTYPES else None
STAGE1 = ("centroids", "exhaustive")

# Defaults measured on BEIR SciFact (5,183 abstracts, 1.01M MiniLM tokens, H=384, 4,096 centroids) against
# exhaustive MaxSim; `python benchmarks/bench_token_index.py scifact --sweep` reproduces the table. Recall of
# the exhaustive top-10 (float16): nprobe 4 / ndocs 128: 0.962; 4 / 256: 0.987; 8 / 128: 0.981 at ~1.5x the
# queries/s of 4 / 256, the cheapest setting found with recall >= 0.98 (the exact stage's cost grows with
# ndocs, stage 1's with nprobe). Deeper result lists need deeper candidate lists: at k = 100, ndocs = 4k
# keeps 92% of the exhaustive top-100 (ndocs 128: 68%), so by default ndocs follows k.
DEFAULT_NPROBE = 8
DEFAULT_NDOCS = 128
NDOCS_PER_RESULT = 4
# Lloyd iterations: 4 (ColBERTv2's default) and 8 gave the same recall on SciFact; 4 halves training.
KMEANS_ITERS = 4
# k-means trains on at most this many sampled tokens per centroid (FAISS asks for 39 or more); more samples
# barely move the centroids that candidate generation needs, while build time grows linearly with them.
KMEANS_POINTS_PER_CENTROID = 48
# Tokens per chunk of exhaustive scoring and of int8 quantization: bounds a fallback scorer's padded batch
# and quantize_tokens' float32 temporaries, while leaving each call enough work to use every core.
CHUNK_TOKENS = 1 << 16


def default_ncentroids(num_tokens: int) -> int:
    """The power of two nearest ``4 * sqrt(num_tokens)`` (4,096 for 1M tokens), at most one per 39 tokens so
    every centroid has 39+ training points (FAISS's rule of thumb)."""
    if num_tokens < 1:
        raise ValueError("num_tokens must be positive")
    target = 4 * math.sqrt(num_tokens)
    c = 2 ** round(math.log2(target))
    while c > 1 and c * 39 > num_tokens:
        c //= 2
    return int(c)


def as_token_embeddings(tokens, name: str) -> TokenEmbeddings:
    if isinstance(tokens, TokenEmbeddings):
        return tokens
    if isinstance(tokens, (tuple, list)) and len(tokens) == 2:
        vectors, offsets = tokens
        vectors = torch.as_tensor(vectors)
        if not vectors.is_floating_point():
            raise TypeError(f"{name}: token vectors must be floating point, got {vectors.dtype}")
        try:
            return TokenEmbeddings(vectors, torch.as_tensor(offsets))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    raise TypeError(f"{name} must be TokenEmbeddings or a (vectors (T, H), offsets (N + 1,)) pair")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class TokenIndex:
    """Multi-vector index for MaxSim retrieval: centroid candidates (PLAID-style), exact packed re-scoring.

    Args:
        dim: token vector dimension.
        token_dtype: how document tokens are stored and scored: ``"int8"`` (default: per-token symmetric
            scales, half the bytes of float16, scored without a dequantized copy; on SciFact its nDCG@10 equals
            float16's within 0.0001 and it searches faster), ``"float16"`` or ``"bfloat16"``. Queries are cast
            to the storage dtype (kept float32 against int8; CPUs with AVX512-VNNI quantize them per token in
            the kernel, see :func:`fastrank.maxsim_packed`).
        stage1: ``"centroids"`` (default) builds the centroid candidate stage; ``"exhaustive"`` builds
            nothing and scores every document at each search (exact; fine for small corpora).
        ncentroids: k-means centroids; default :func:`default_ncentroids` of the token count at build time.
        nprobe: centroids probed per query token (default 8); a search may override it. Values above
            ``ncentroids`` probe every centroid.
        ndocs: candidates kept for exact scoring per query; default ``max(128, 4 * k)`` for a search of
            ``k`` results. Never fewer than ``k``. A search may override it.
        seed: seeds the k-means sample and initialisation, so the same data builds the same index.
        device: where the tokens live, stage 1 is built and search runs.

    Documents are added with :meth:`add`; stage 1 is built by :meth:`build` (called by :meth:`search` and
    :meth:`save` when needed). Centroids are trained once, on the tokens present at that first build;
    documents added later are assigned to the existing centroids.
    """

    def __init__(self, dim: int, *, token_dtype: str = "int8", stage1: str = "centroids",
                 ncentroids: int | None = None, nprobe: int = DEFAULT_NPROBE, ndocs: int | None = None,
                 seed: int = 0, device: str | torch.device = "cpu"):
        self.dim = _positive_int(dim, "dim")
        if token_dtype in RESIDUAL_DTYPES:
            raise ValueError(f"token_dtype {token_dtype!r}: residual tokens are coded against centroids trained on the "
                             "stream, so they are built by streaming to disk: fastrank.index.token_stream."
                             "build_token_index / TokenIndexWriter, or `fastrank index --tokens --token-dtype "
                             f"{token_dtype}`; then TokenIndex.load(path)")
        if token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype must be one of {ALL_TOKEN_DTYPES}, got {token_dtype!r}")
        if stage1 not in STAGE1:
            raise ValueError(f"stage1 must be one of {STAGE1}, got {stage1!r}")
        if stage1 == "exhaustive" and ncentroids is not None:
            raise ValueError("ncentroids: an index with stage1='exhaustive' has no centroids")
        self.token_dtype, self.stage1 = token_dtype, stage1
        self.ncentroids = None if ncentroids is None else _positive_int(ncentroids, "ncentroids")
        self.nprobe = _positive_int(nprobe, "nprobe")
        self.ndocs = None if ndocs is None else _positive_int(ndocs, "ndocs")
        self.seed = int(seed)
        self.device = torch.device(device)
        store = TOKEN_DTYPES[token_dtype]
        self._tokens = torch.empty(0, self.dim, dtype=store, device=self.device)
        self._scales = torch.empty(0, dtype=torch.float32, device=self.device) if token_dtype == "int8" else None
        self._offsets = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._ids: list = []
        self._ids_seen: set = set()  # the ids as a set, for refusing duplicates in add
        self._id_array: np.ndarray | None = None
        self._centroids: torch.Tensor | None = None  # (C, dim) float32, unit norm
        self._codes = torch.empty(0, dtype=torch.int32, device=self.device)  # centroid of each assigned token
        self._ivf_offsets: torch.Tensor | None = None  # (C + 1,) int64: centroid c lists ivf_docs[o[c]:o[c+1]]
        self._ivf_docs: torch.Tensor | None = None  # int32 document positions, ascending within each list
        self._router = None  # the CentroidRouter of stage 1's search, trained on first use (route=True)
        self._stored_router: tuple[torch.Tensor, torch.Tensor] | None = None  # a streamed index's groups

    # -- contents ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        stage = (f"centroids={self.ncentroids}, nprobe={self.nprobe}, ndocs={self.ndocs or 'auto'}"
                 if self.stage1 == "centroids" else "exhaustive")
        return (f"TokenIndex(dim={self.dim}, {len(self)} documents, {self.num_tokens} tokens, "
                f"{self.token_dtype}, {stage})")

    @property
    def ids(self) -> list:
        return list(self._ids)

    def iter_ids(self):
        """The ids in document order, one at a time (a streamed index decodes them as it goes)."""
        return iter(self._ids)

    @property
    def num_tokens(self) -> int:
        return int(self._tokens.shape[0])

    @property
    def is_built(self) -> bool:
        """Whether stage 1 covers every stored token (always true for an exhaustive index)."""
        if self.stage1 == "exhaustive":
            return True
        return self._centroids is not None and self._codes.numel() == self.num_tokens and self._ivf_docs is not None

    def storage_bytes(self) -> dict[str, int]:
        """Bytes held per component: ``tokens`` (with int8 scales), ``offsets``, ``stage1`` (centroids, codes,
        inverted lists)."""
        def nbytes(*ts):
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        return {"tokens": nbytes(self._tokens, self._scales), "offsets": nbytes(self._offsets),
                "stage1": nbytes(self._centroids, self._codes, self._ivf_offsets, self._ivf_docs)}

    @property
    def documents(self) -> TokenEmbeddings:
        """The stored document tokens (int8 storage comes back dequantized, float32)."""
        if self._codec is not None:
            from fastrank.ops.residual import decompress_residuals

            tokens = decompress_residuals(self._tokens, self._codes, self._centroids, self._codec[1],
                                          residual_bits(self.token_dtype))
            if self._codec[2]:
                tokens = torch.nn.functional.normalize(tokens, dim=1)
            return TokenEmbeddings(tokens, self._offsets)
        if self._scales is None:
            return TokenEmbeddings(self._tokens, self._offsets)
        from fastrank.ops.maxsim_packed import dequantize_tokens

        return TokenEmbeddings(dequantize_tokens(self._tokens, self._scales), self._offsets)

    def add(self, tokens, ids: Sequence | None = None, *, progress: bool = True) -> "TokenIndex":
        """Add documents' token embeddings (:class:`TokenEmbeddings` or ``(vectors (T, H), offsets (N + 1,))``)
        with external ``ids`` (default: positions continuing from ``len(self)``).

        Tokens are converted to the storage dtype. Once stage 1 is built, new tokens are assigned to its
        centroids here (``progress`` shows that); before, :meth:`build` does the work."""
        tok = as_token_embeddings(tokens, "tokens")
        n = len(tok)
        if n == 0:
            raise ValueError("tokens holds no document: nothing to add")
        if self._mapped:
            self._copy_into_memory()
        if tok.vectors.shape[1] != self.dim:
            raise ValueError(f"tokens have dim {tok.vectors.shape[1]}, the index has dim {self.dim}")
        if ids is None:
            ids = list(range(len(self._ids), len(self._ids) + n))
        ids = [i.item() if isinstance(i, np.generic) else i for i in
               (ids.tolist() if isinstance(ids, (np.ndarray, torch.Tensor)) else list(ids))]
        if len(ids) != n:
            raise ValueError(f"ids has {len(ids)} entries for {n} documents")
        if len(self._ids_seen) != len(self._ids):
            self._ids_seen = set(self._ids)
        check_unique_ids(ids, self._ids_seen)
        vectors = tok.vectors.detach()
        check_finite_rows(vectors, "tokens", token_row_of(tok.offsets, "document"))
        first_new = self.num_tokens
        if self._scales is not None:
            from fastrank.ops.maxsim_packed import quantize_tokens

            # In chunks: quantize_tokens makes float32 temporaries the size of its input.
            parts = [quantize_tokens(vectors[s:s + CHUNK_TOKENS].to(self.device))
                     for s in range(0, vectors.shape[0], CHUNK_TOKENS)]
            self._tokens = torch.cat([self._tokens] + [p[0] for p in parts])
            self._scales = torch.cat([self._scales] + [p[1] for p in parts])
        else:
            # A copy the index owns even when no conversion is needed; the first add keeps it as the store
            # rather than concatenating it, so only one corpus-sized buffer is made.
            new = vectors.to(self.device, self._tokens.dtype, copy=True)
            self._tokens = new if first_new == 0 else torch.cat([self._tokens, new])
        self._offsets = torch.cat([self._offsets, tok.offsets[1:].to(self.device) + self._offsets[-1]])
        self._ids.extend(ids)
        self._ids_seen.update(ids)
        self._id_array = None
        self._ivf_docs = self._ivf_offsets = None  # lists are rebuilt lazily, once after a run of adds
        if self._centroids is not None:
            self._codes = torch.cat([self._codes, self._assign(first_new, self.num_tokens, progress)])
        return self

    def _copy_into_memory(self) -> None:
        """Before changing a streamed index: its mapped arrays become arrays in RAM (the files stay as they
        are; :meth:`save` writes the changed index elsewhere or over them)."""
        if self._codec is not None:
            raise ValueError(f"add: a {self.token_dtype} index is extended by streaming (TokenIndexWriter into a new "
                             "directory), not in memory")
        self._tokens = self._tokens.clone()
        self._scales = None if self._scales is None else self._scales.clone()
        self._offsets = self._offsets.clone()
        self._ids = list(self._ids)
        self._ids_seen = set(self._ids)
        if self._centroids is not None:
            self._codes = self._codes.to(torch.int32)
            self._ivf_offsets = self._ivf_offsets.clone()
            self._ivf_docs = self._ivf_docs.clone()
        self._mapped = False

    # -- stage 1: build ---------------------------------------------------------------------------------
    def build(self, *, progress: bool = True) -> "TokenIndex":
        """Train the centroids (first time only), assign tokens not yet coded, and rebuild the inverted lists.
        A no-op when stage 1 is already up to date or the index is exhaustive."""
        if len(self) == 0:
            raise ValueError("the index is empty: add documents before building it")
        if self.is_built:
            return self
        if self._centroids is None:
            self._train(progress)
        if self._codes.numel() < self.num_tokens:
            self._codes = torch.cat([self._codes, self._assign(self._codes.numel(), self.num_tokens, progress)])
        self._build_lists()
        return self

    def _train(self, progress: bool) -> None:
        t = self.num_tokens
        c = self.ncentroids if self.ncentroids is not None else default_ncentroids(t)
        if c > t:
            raise ValueError(f"ncentroids={c} exceeds the {t} tokens in the index; lower ncentroids")
        g = torch.Generator().manual_seed(self.seed)
        n_sample = min(t, c * KMEANS_POINTS_PER_CENTROID)
        # Sorted sample rows read the token store front to back rather than hopping around it.
        sample = torch.randperm(t, generator=g)[:n_sample].sort().values.to(self.device)
        self._centroids = spherical_kmeans(self._dequantized(sample), c, iters=KMEANS_ITERS, generator=g,
                                           progress=progress)
        self._router = self._stored_router = None
        self.ncentroids = c
        self._codes = torch.empty(0, dtype=torch.int32, device=self.device)

    def _dequantized(self, rows: torch.Tensor) -> torch.Tensor:
        x = self._tokens.index_select(0, rows).float()
        return x * self._scales.index_select(0, rows)[:, None] if self._scales is not None else x

    def _assign(self, start: int, stop: int, progress: bool) -> torch.Tensor:
        """Nearest centroid (largest inner product) of token rows ``start:stop``, int32. Scales are positive,
        so an int8 token's nearest centroid needs no dequantisation."""
        codes = torch.empty(stop - start, dtype=torch.int32, device=self.device)
        step = 1 << 18
        for s in progress_bar(range(start, stop, step), desc="assigning tokens to centroids", unit="chunk",
                              enabled=progress and stop - start > step):
            e = min(s + step, stop)
            codes[s - start:e - start] = nearest_centroid(self._tokens[s:e], self._centroids)
        return codes

    def _build_lists(self) -> None:
        n, c = len(self), self.ncentroids
        lengths = self._offsets[1:] - self._offsets[:-1]
        doc_of_token = torch.repeat_interleave(torch.arange(n, device=self.device), lengths,
                                               output_size=self.num_tokens)
        # One sort of (centroid, document) keys yields every list, deduplicated and with documents ascending.
        pairs = torch.unique(self._codes.long() * n + doc_of_token)
        centroid = pairs // n
        self._ivf_docs = (pairs - centroid * n).to(torch.int32)
        self._ivf_offsets = torch.zeros(c + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(torch.bincount(centroid, minlength=c), 0, out=self._ivf_offsets[1:])

    # -- search -----------------------------------------------------------------------------------------
    def ndocs_for(self, k: int, ndocs: int | None = None) -> int:
        """Candidates a search for ``k`` results scores exactly: ``ndocs`` (else the index's), else
        ``max(128, 4 * k)``; never fewer than ``k``."""
        k = _positive_int(k, "k")
        ndocs = self.ndocs if ndocs is None else _positive_int(ndocs, "ndocs")
        return max(DEFAULT_NDOCS, NDOCS_PER_RESULT * k) if ndocs is None else max(ndocs, k)

    def search(self, queries, k: int = 10, *, nprobe: int | None = None, ndocs: int | None = None,
               exhaustive: bool | None = None, route: bool | None = None, batch_size: int = 64,
               progress: bool = True):
        """Top-``k`` documents by exact MaxSim for each query.

        Args:
            queries: query token embeddings (:class:`TokenEmbeddings` or ``(vectors, offsets)``); every query
                needs at least one token.
            k: documents returned per query.
            nprobe, ndocs: override the index's stage-1 parameters for this search.
            exhaustive: score every document exactly (default: when the index was built with
                ``stage1="exhaustive"``). An exhaustive index has no centroids, so ``False`` is an error there.
            route: find each query token's ``nprobe + 1`` best centroids among those of its best groups of
                centroids (:meth:`CentroidRouter.top <fastrank.index.centroid_router.CentroidRouter.top>`) rather
                than among all of them. Default: when the index has 8,192 centroids or more, where scoring
                every centroid is most of stage 1's time; ``False`` scores them all.
            batch_size: queries per stage-1 batch (centroid scores and candidate ranking are vectorised over
                a batch); exact scoring runs one query at a time.

        Returns ``(scores (Q, k) float32 numpy, ids (Q, k) object array)``; ``None`` ids and ``-inf`` scores
        pad a query with fewer than ``k`` candidates (or a corpus of fewer than ``k`` documents).
        """
        q = as_token_embeddings(queries, "queries")
        k = _positive_int(k, "k")
        nprobe = self.nprobe if nprobe is None else _positive_int(nprobe, "nprobe")
        ndocs = self.ndocs_for(k, ndocs)
        batch_size = _positive_int(batch_size, "batch_size")
        if route is not None and not isinstance(route, bool):
            raise TypeError(f"route must be None, True or False, got {route!r}")
        if q.vectors.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.vectors.shape[1]}, the index has dim {self.dim}")
        if len(self) == 0:
            raise ValueError("the index is empty: add documents before searching")
        if exhaustive is None:
            exhaustive = self.stage1 == "exhaustive"
        elif not exhaustive and self.stage1 == "exhaustive":
            raise ValueError("exhaustive=False: this index was built with stage1='exhaustive' and has no centroids")
        empty = torch.nonzero(q.lengths == 0)
        if empty.numel():
            raise ValueError(f"queries: query {int(empty[0, 0])} has no tokens")
        check_finite_rows(q.vectors.detach(), "queries", token_row_of(q.offsets, "query"))
        if not exhaustive:
            self.build(progress=progress)
        nq = len(q)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), None, dtype=object)
        q_offsets = q.offsets.tolist()
        q_vectors = q.vectors.detach().to(self.device, torch.float32)
        bar = progress_bar(total=nq, desc="MaxSim search" + (" (exhaustive)" if exhaustive else ""), unit="query",
                           enabled=progress and nq >= 8)
        for b0 in range(0, nq, batch_size):
            b1 = min(b0 + batch_size, nq)
            if not exhaustive:
                qv = q_vectors[q_offsets[b0]:q_offsets[b1]]
                cands = self._candidates(qv, q.offsets[b0:b1 + 1].to(self.device) - q_offsets[b0], nprobe, ndocs,
                                         route)
            for i in range(b0, b1):
                qi = q_vectors[q_offsets[i]:q_offsets[i + 1]]
                if exhaustive:
                    docs, s = None, self._score_all(qi)
                else:
                    docs = cands[i - b0]
                    s = self._score(qi, docs)
                top = torch.topk(s, min(k, s.numel()))
                pos = top.indices if docs is None else docs[top.indices]
                scores[i, :top.values.numel()] = top.values.cpu().numpy()
                ids[i, :top.values.numel()] = self._lookup_ids(pos.cpu().numpy())
                bar.update()
        bar.close()
        return scores, ids

    def _lookup_ids(self, positions: np.ndarray) -> np.ndarray:
        if isinstance(self._ids, StoredIds):
            return self._ids.lookup(positions)
        return self._id_table()[positions]

    def _id_table(self) -> np.ndarray:
        if self._id_array is None or len(self._id_array) != len(self._ids):
            self._id_array = np.empty(len(self._ids), dtype=object)
            self._id_array[:] = self._ids
        return self._id_array

    def _candidates(self, qv: torch.Tensor, q_offsets: torch.Tensor, nprobe: int, ndocs: int,
                    route: bool | None = None) -> list[torch.Tensor]:
        """Stage 1 for a batch of queries: each query's best ``ndocs`` candidates (int64 positions, ascending),
        ranked by the centroid-interaction estimate in the module docstring.

        qv: (Tq, H) float32, the batch's query tokens back to back; q_offsets: (B + 1,) int64 into qv.
        """
        from fastrank.ops.centroid_candidates import centroid_candidates

        nprobe = min(nprobe, self.ncentroids)
        # One centroid beyond the probes gives each token's floor: a document in none of its probed lists has
        # its tokens in unprobed centroids, the best of which scores that.
        top_s, top_c = self._top_centroids(qv, min(nprobe + 1, self.ncentroids), route)
        gain = (top_s[:, :nprobe] - top_s[:, -1:]).clamp_(min=0)
        docs, _, counts = centroid_candidates(top_c[:, :nprobe].contiguous(), gain.contiguous(), q_offsets,
                                              self._ivf_offsets, self._ivf_docs, n=len(self), ndocs=ndocs)
        return [docs[b, :int(c)] for b, c in enumerate(counts.tolist())]

    def _top_centroids(self, qv: torch.Tensor, k: int, route: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query token's ``k`` best centroids, scores descending: through the router (see ``search``'s
        ``route``), or among all centroids. A token whose probed groups hold fewer than ``k`` centroids is
        scored against all of them."""
        from fastrank.index.centroid_router import MIN_CENTROIDS, CentroidRouter

        if route is None:
            route = self.ncentroids >= MIN_CENTROIDS
        if not route:
            return (qv @ self._centroids.T).topk(k, dim=1)
        if self._router is None and self._stored_router is not None:
            # The groups the build coded the tokens through, as stored with the index.
            self._router = CentroidRouter(self._centroids, *self._stored_router)
        elif self._router is None:
            # Trained from the centroids and the index's seed: every load of the index routes the same way.
            self._router = CentroidRouter.train(self._centroids, self.seed)
        top_s, top_c = self._router.top(qv, k)
        short = torch.nonzero(top_s[:, -1] == -math.inf).flatten()
        if short.numel():
            top_s[short], top_c[short] = (qv[short] @ self._centroids.T).topk(k, dim=1)
        return top_s, top_c

    def _query_for_storage(self, q: torch.Tensor) -> torch.Tensor:
        return q if self._scales is not None or self._codec is not None else q.to(self._tokens.dtype)

    def _score(self, q: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        """Exact MaxSim of one query (Lq, H) float32 against documents ``docs``, scored in place in the store
        (``maxsim_packed(..., docs=)``: on CPU no candidate row is copied; gathering them into a packed buffer
        first cost 4.6 ms of a query's time on SciFact at 256 candidates)."""
        from fastrank.ops.maxsim_packed import maxsim_packed

        if docs.numel() == 0:
            return torch.empty(0, device=q.device)
        if self._codec is not None:
            from fastrank.ops.maxsim_residual import maxsim_residual

            return maxsim_residual(q, self._tokens, self._codes, self._offsets, self._centroids, self._codec[1],
                                   nbits=residual_bits(self.token_dtype), docs=docs, normalize=self._codec[2])
        return maxsim_packed(self._query_for_storage(q), self._tokens, self._offsets, scales=self._scales, docs=docs)

    def _score_all(self, q: torch.Tensor) -> torch.Tensor:
        """Exact MaxSim of one query (Lq, H) float32 against every document, a chunk of documents per call
        (views into the store: nothing is copied)."""
        from fastrank.ops.maxsim_packed import maxsim_packed

        qs = self._query_for_storage(q)
        out = torch.empty(len(self), dtype=torch.float32, device=q.device)
        for a, b in itertools.pairwise(self._chunk_bounds()):
            t0, t1 = int(self._offsets[a]), int(self._offsets[b])
            if self._codec is not None:
                from fastrank.ops.maxsim_residual import maxsim_residual

                out[a:b] = maxsim_residual(q, self._tokens[t0:t1], self._codes[t0:t1], self._offsets[a:b + 1] - t0,
                                           self._centroids, self._codec[1], nbits=residual_bits(self.token_dtype),
                                           normalize=self._codec[2])
                continue
            scales = self._scales[t0:t1] if self._scales is not None else None
            out[a:b] = maxsim_packed(qs, self._tokens[t0:t1], self._offsets[a:b + 1] - t0, scales=scales)
        return out

    def _chunk_bounds(self) -> list[int]:
        """Document boundaries splitting the corpus into runs of about CHUNK_TOKENS tokens (a longer document
        is a run of its own)."""
        offsets = self._offsets.cpu().numpy()
        marks = np.arange(CHUNK_TOKENS, self.num_tokens, CHUNK_TOKENS)
        inner = np.searchsorted(offsets, marks, side="right") - 1  # the last document start at or before a mark
        return sorted({0, len(self), *np.clip(inner, 1, len(self)).tolist()})

    def to_run(self, qids: Sequence[str], queries, k: int = 100, **kw) -> dict[str, dict[str, float]]:
        """Search and return a run ``{qid: {docid: score}}`` (ids as strings); ``kw`` go to :meth:`search`."""
        q = as_token_embeddings(queries, "queries")
        if len(qids) != len(q):
            raise ValueError(f"qids has {len(qids)} entries for {len(q)} queries")
        scores, ids = self.search(q, k, **kw)
        return {str(qid): {str(d): float(s) for d, s in zip(row_ids, row_s) if s != -np.inf}
                for qid, row_ids, row_s in zip(qids, ids, scores)}

    # -- persistence ------------------------------------------------------------------------------------
    def saved_files(self) -> list[str]:
        """The files :meth:`save` writes besides ``meta.json`` and attached ones: what a directory it saves
        into may hold only if an index saved there owns them."""
        return (["tokens.npy", "offsets.npy"] + (["scales.npy"] if self.token_dtype == "int8" else [])
                + (["centroids.npy", "codes.npy"] if self.stage1 == "centroids" else []) + ["ids.json"])

    def save(self, path: str | os.PathLike, *, progress: bool = True, attach: dict[str, str] | None = None) -> Path:
        """Write directory ``path`` (building stage 1 first if needed): ``tokens.npy`` in the storage dtype
        (bfloat16 as its int16 bit pattern: numpy has no bfloat16), ``scales.npy`` (int8 only),
        ``offsets.npy``, ``centroids.npy`` and ``codes.npy`` (centroid stage 1 only), ``ids.json``, and
        ``meta.json`` with the parameters and a checksum of every file. Inverted lists are rebuilt from the
        codes at load time (a single sort), so they are not stored twice. ``attach`` (file name -> text) adds
        files of the caller's (the CLI's ``encoder.json``), checksummed and verified with the rest.

        ``path`` must be absent, empty, or an index fastrank saved: that index is replaced, its files that
        this one does not write are removed, and any other file in ``path`` is left as it is (one that this
        save would overwrite is an error). A reader sees the old index or the new one, never a mix."""
        if len(self) == 0:
            raise ValueError("the index is empty: nothing to save")
        if self._codec is not None:
            raise ValueError(f"save: a {self.token_dtype} index lives in the directory it was streamed to; copy that "
                             "directory to keep another copy")
        if self._mapped:
            self._copy_into_memory()
        self.build(progress=progress)
        tokens = self._tokens.cpu()
        arrays = {"tokens.npy": (tokens.view(torch.int16) if tokens.dtype == torch.bfloat16 else tokens).numpy(),
                  "offsets.npy": self._offsets.cpu().numpy()}
        if self._scales is not None:
            arrays["scales.npy"] = self._scales.cpu().numpy()
        if self.stage1 == "centroids":
            arrays["centroids.npy"] = self._centroids.cpu().numpy()
            arrays["codes.npy"] = self._codes.cpu().numpy()
        ids_text = json.dumps(self._ids)
        writers = {name: write_npy(arr) for name, arr in arrays.items()}
        writers["ids.json"] = lambda p: p.write_text(ids_text, encoding="utf-8")
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "dim": self.dim, "documents": len(self),
                "tokens": self.num_tokens, "token_dtype": self.token_dtype, "stage1": self.stage1,
                "ncentroids": self.ncentroids, "nprobe": self.nprobe, "ndocs": self.ndocs, "seed": self.seed}
        return save_index_dir(path, writers, meta, attach)

    _mapped = False  # arrays mapped from a streamed index: add() copies them into RAM first
    _codec: tuple[torch.Tensor, torch.Tensor, bool] | None = None  # residual storage: cutoffs, weights, normalize

    @classmethod
    def _load_streamed(cls, path, **kw) -> "TokenIndex":
        return _load_streamed(cls, path, **kw)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", mmap: bool = True,
             verify: bool = False) -> "TokenIndex":
        """Read an index written by :meth:`save` or built by streaming (:class:`~fastrank.index.token_stream.
        TokenIndexWriter`, ``fastrank index``). A missing, corrupt or inconsistent file, or an index in an
        older format, is an :class:`IndexFormatError` naming it (and saying how to rebuild).

        A streamed index is memory-mapped (``mmap=True``, on CPU): loading reads meta.json, the offsets and
        stage 1 (centroids, inverted-list offsets), never the tokens, and a search reads only its candidates'
        pages. Its checksums are per chunk: ``verify=True`` (or ``fastrank index --verify``) reads the whole
        index once and checks every byte; without it a load checks file sizes, meta.json's own checksum and
        the small files', and the kernels check every centroid code and offset they read. ``mmap=False`` reads
        everything into RAM. An index written by :meth:`save` is read whole and verified whole, as before."""
        path = Path(path)
        if read_meta(path, FORMAT).get("version") == STREAM_VERSION:
            return cls._load_streamed(path, device=device, mmap=mmap, verify=verify)
        meta = _read_meta(path)
        names = ["tokens.npy", "offsets.npy", "ids.json"]
        names += ["scales.npy"] if meta["token_dtype"] == "int8" else []
        names += ["centroids.npy", "codes.npy"] if meta["stage1"] == "centroids" else []
        verify_files(path, meta, [path / name for name in names])
        try:
            self = cls(meta["dim"], token_dtype=meta["token_dtype"], stage1=meta["stage1"],
                       ncentroids=meta["ncentroids"], nprobe=meta["nprobe"], ndocs=meta["ndocs"], seed=meta["seed"],
                       device=device)
        except ValueError as exc:
            raise IndexFormatError(f"{path / META}: {exc}") from None
        n, t, h = meta["documents"], meta["tokens"], meta["dim"]
        stored = {"float16": np.float16, "bfloat16": np.int16, "int8": np.int8}[meta["token_dtype"]]
        expected = {"tokens.npy": ((t, h), stored),
                    "offsets.npy": ((n + 1,), np.int64), "scales.npy": ((t,), np.float32),
                    "centroids.npy": ((meta["ncentroids"], h), np.float32), "codes.npy": ((t,), np.int32)}
        arrays = {}
        for name in (n for n in names if n.endswith(".npy")):
            arr = np.load(path / name)
            shape, dtype = expected[name]
            if arr.shape != shape or arr.dtype != dtype:
                raise IndexFormatError(f"{path / name}: {arr.dtype} {arr.shape}, meta.json implies "
                                       f"{np.dtype(dtype)} {shape}")
            arrays[name] = torch.from_numpy(arr)
        try:
            ids = json.loads((path / "ids.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IndexFormatError(f"{path / 'ids.json'}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
        check_ids(path / "ids.json", ids, n, "documents")
        offsets = arrays["offsets.npy"]
        if int(offsets[0]) != 0 or int(offsets[-1]) != t or bool((offsets[1:] < offsets[:-1]).any()):
            raise IndexFormatError(f"{path / 'offsets.npy'}: not non-decreasing offsets from 0 to {t}")
        tokens = arrays["tokens.npy"]
        self._tokens = (tokens.view(torch.bfloat16) if meta["token_dtype"] == "bfloat16" else tokens).to(self.device)
        self._offsets = offsets.to(self.device)
        self._ids = ids
        if "scales.npy" in arrays:
            self._scales = arrays["scales.npy"].to(self.device)
        if meta["stage1"] == "centroids":
            codes = arrays["codes.npy"]
            if t and (int(codes.min()) < 0 or int(codes.max()) >= meta["ncentroids"]):
                raise IndexFormatError(f"{path / 'codes.npy'}: codes outside [0, {meta['ncentroids']})")
            self._centroids = arrays["centroids.npy"].to(self.device)
            self._codes = codes.to(self.device)
            self._build_lists()
        verify_meta_checksum(path, meta)
        return self


_STREAM_REQUIRED = ("state", "dim", "documents", "tokens", "token_dtype", "stage1", "ncentroids", "nprobe", "ndocs",
                    "seed", "columns", "column_types", "chunks", "sha256")


def _load_streamed(cls, path: Path, *, device, mmap: bool, verify: bool) -> "TokenIndex":
    from fastrank.index import columns

    meta_file = path / META
    meta = read_meta(path, FORMAT, ("state",), STREAM_VERSION)
    if meta["state"] != "complete":
        done = sum(c.get("documents", 0) for c in meta.get("chunks", []) if isinstance(c, dict))
        raise IndexFormatError(f"{path}: a build still in progress ({done} documents committed), not an index yet; "
                               "re-run the same `fastrank index` command (or TokenIndexWriter) to resume and finish it")
    missing = [k for k in _STREAM_REQUIRED if k not in meta]
    if missing:
        raise IndexFormatError(f"{meta_file}: missing {', '.join(missing)}")
    meta_field(meta_file, meta, "dim", positive_int, "a positive integer")
    n = meta_field(meta_file, meta, "documents", positive_int, "a positive integer")
    t = meta_field(meta_file, meta, "tokens", lambda v: is_int(v) and v >= 0, "a non-negative integer")
    dtype = meta_field(meta_file, meta, "token_dtype", lambda v: v in ALL_TOKEN_DTYPES, f"one of {ALL_TOKEN_DTYPES}")
    stage1 = meta_field(meta_file, meta, "stage1", lambda v: v in STAGE1, f"one of {STAGE1}")
    if stage1 == "centroids":
        meta_field(meta_file, meta, "ncentroids", positive_int, "a positive integer")
    meta_field(meta_file, meta, "nprobe", positive_int, "a positive integer")
    meta_field(meta_file, meta, "ndocs", optional_positive_int, "null or a positive integer")
    meta_field(meta_file, meta, "seed", is_int, "an integer")
    verify_meta_checksum(path, meta)
    verify_files(path, meta, [])  # the small files: centroids, codec, list offsets, attached files
    if verify:
        columns.verify(path, meta, progress=True)
    arrays = columns.map_columns(path, meta, mmap=mmap and torch.device(device).type == "cpu")
    h = meta["dim"]
    bits = residual_bits(dtype)
    width = h * bits // 8 if bits else h

    def column(name: str, rows: int, row_width: int = 1) -> np.ndarray:
        arr = arrays.get(name)
        if arr is None:
            raise IndexFormatError(f"{path}: missing {name}")
        shape = (rows, row_width) if row_width != 1 else (rows,)
        if arr.shape != shape:
            raise IndexFormatError(f"{path / name}: shape {arr.shape}, meta.json implies {shape}")
        return arr

    self = cls.__new__(cls)
    try:
        TokenIndex.__init__(self, h, token_dtype="int8" if bits else dtype, stage1=stage1,
                            ncentroids=meta["ncentroids"], nprobe=meta["nprobe"], ndocs=meta["ndocs"],
                            seed=meta["seed"], device=device)
    except ValueError as exc:
        raise IndexFormatError(f"{meta_file}: {exc}") from None
    self.token_dtype = dtype
    dev = self.device
    tokens = columns.as_tensor(column("tokens.bin", t, width))
    self._tokens = (tokens.view(torch.bfloat16) if dtype == "bfloat16" else tokens).to(dev)
    self._scales = columns.as_tensor(column("scales.bin", t)).to(dev) if dtype == "int8" else None
    offsets = columns.as_tensor(column("offsets.bin", n + 1))
    if int(offsets[0]) != 0 or int(offsets[-1]) != t or bool((offsets[1:] < offsets[:-1]).any()):
        raise IndexFormatError(f"{path / 'offsets.bin'}: not non-decreasing offsets from 0 to {t}")
    self._offsets = offsets.to(dev)
    id_offsets = column("id_offsets.bin", n + 1)
    ids = column("ids.bin", int(id_offsets[-1]) if id_offsets.size else 0)
    if int(id_offsets[0]) != 0 or bool((np.diff(id_offsets) <= 0).any()):
        raise IndexFormatError(f"{path / 'id_offsets.bin'}: not increasing offsets from 0")
    self._ids = StoredIds(ids, id_offsets, path / "ids.bin")
    if stage1 == "centroids":
        c = meta["ncentroids"]
        self._centroids = torch.from_numpy(_small_array(path, "centroids.npy", (c, h), np.float32)).to(dev)
        self._codes = columns.as_tensor(column("codes.bin", t)).to(dev)
        ivf_offsets = _small_array(path, "ivf_offsets.npy", (c + 1,), np.int64)
        ivf_docs = arrays.get("ivf_docs.bin")
        if ivf_docs is None or ivf_offsets[0] != 0 or ivf_offsets[-1] != ivf_docs.shape[0] \
                or bool((np.diff(ivf_offsets) < 0).any()):
            raise IndexFormatError(f"{path / 'ivf_offsets.npy'}: the inverted lists' offsets do not span ivf_docs.bin")
        self._ivf_offsets = torch.from_numpy(ivf_offsets).to(dev)
        self._ivf_docs = columns.as_tensor(ivf_docs).to(dev)
        if "router_groups.npy" in meta.get("sha256", {}):
            self._stored_router = _stored_router(path, c, h)
        if bits:
            nb = 2 ** bits
            codec = _small_array(path, "codec.npy", (2 * nb,), np.float32)
            self._codec = (torch.from_numpy(codec[:nb - 1].copy()).to(dev),
                           torch.from_numpy(codec[nb - 1:2 * nb - 1].copy()).to(dev), bool(codec[-1] > 0.5))
    self._mapped = True
    return self


def _stored_router(path: Path, c: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The centroid groups a streamed build coded its tokens through (``router_groups.npy``, each centroid's
    group, and ``router_centres.npy``), checked, for search to route query tokens the same way."""
    try:
        g = np.load(path / "router_centres.npy", allow_pickle=False).shape[0]
    except (OSError, ValueError, IndexError) as exc:
        raise IndexFormatError(f"{path / 'router_centres.npy'}: not a readable .npy file ({exc})") from None
    centres = _small_array(path, "router_centres.npy", (g, h), np.float32)
    groups = _small_array(path, "router_groups.npy", (c,), np.int32)
    if g < 1 or groups.min() < 0 or groups.max() >= g:
        raise IndexFormatError(f"{path / 'router_groups.npy'}: group ids outside the {g} groups of router_centres.npy")
    return torch.from_numpy(groups), torch.from_numpy(centres)


def _small_array(path: Path, name: str, shape: tuple, dtype) -> np.ndarray:
    try:
        arr = np.load(path / name, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path / name}: not a readable .npy file ({exc})") from None
    if arr.shape != shape or arr.dtype != dtype:
        raise IndexFormatError(f"{path / name}: {arr.dtype} {arr.shape}, meta.json implies {np.dtype(dtype)} {shape}")
    return arr


class StoredIds:
    """The ids of a streamed index, read from ``ids.bin`` (each id's JSON) only where a search returns them."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, where: Path):
        self.data, self.offsets, self.where = data, offsets, where

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def _one(self, i: int):
        raw = bytes(self.data[int(self.offsets[i]):int(self.offsets[i + 1])])
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            value = None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise IndexFormatError(f"{self.where}: id {i} is not a JSON string or integer")
        return value

    def __getitem__(self, i: int):
        return self._one(range(len(self))[i])

    def __iter__(self):
        return (self._one(i) for i in range(len(self)))

    def lookup(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty(len(positions), dtype=object)
        out[:] = [self._one(int(p)) for p in positions]
        return out


_REQUIRED = ("dim", "documents", "tokens", "token_dtype", "stage1", "ncentroids", "nprobe", "ndocs", "seed", "sha256")


def _read_meta(path: Path) -> dict:
    """meta.json of a token index, every field checked for type and range (naming the first that fails)."""
    meta = read_meta(path, FORMAT, _REQUIRED, FORMAT_VERSION,
                     "the old layout (a per-token ANN over float16 tokens) cannot be converted: " + REBUILD_HINT,
                     legacy_version=LEGACY_VERSION)
    meta_file = path / META
    meta_field(meta_file, meta, "dim", positive_int, "a positive integer")
    meta_field(meta_file, meta, "documents", positive_int, "a positive integer")
    tokens = meta_field(meta_file, meta, "tokens", lambda v: is_int(v) and v >= 0, "a non-negative integer")
    meta_field(meta_file, meta, "token_dtype", lambda v: isinstance(v, str) and v in TOKEN_DTYPES,
               f"one of {tuple(TOKEN_DTYPES)}")
    stage1 = meta_field(meta_file, meta, "stage1", lambda v: v in STAGE1, f"one of {STAGE1}")
    if stage1 == "exhaustive":
        meta_field(meta_file, meta, "ncentroids", lambda v: v is None, "null for stage1 'exhaustive'")
    else:
        meta_field(meta_file, meta, "ncentroids", lambda v: positive_int(v) and v <= max(tokens, 1),
                   f"a positive integer no larger than tokens ({tokens})")
    meta_field(meta_file, meta, "nprobe", positive_int, "a positive integer")
    meta_field(meta_file, meta, "ndocs", optional_positive_int, "null or a positive integer")
    meta_field(meta_file, meta, "seed", is_int, "an integer")
    return meta


def token_row_of(offsets: torch.Tensor, unit: str):
    """Describes token row ``r`` of a packed batch as the ``unit`` (document, query) it belongs to."""
    def describe(row: int) -> str:
        owner = int(torch.searchsorted(offsets.cpu(), torch.tensor(row), right=True)) - 1
        return f"{unit} {owner} (token row {row})"
    return describe
