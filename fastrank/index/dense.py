"""DenseIndex: one vector per document, searched with FAISS (flat, IVF-Flat, IVF-PQ, HNSW).

Documents keep their external ids (strings or ints) in a side array; FAISS sees positions 0..N-1, which
every index kind supports (HNSW has no ``add_with_ids``) and which makes a saved index self-describing.

Where it runs, decided once per index in :func:`choose_backend` (the one place: :mod:`fastrank.dispatch`
picks a kernel per call from the tensors, while an index is bound to one FAISS build for its lifetime):
- ``faiss``: faiss-cpu (or the CPU half of a faiss-gpu build);
- ``faiss_gpu``: the FAISS GPU index when the build has GPUs and the kind has a GPU version (not HNSW);
- ``torch``: exact (flat) search as a matmul on the tensors' device, for CUDA without FAISS GPU, or
  wherever faiss is not installed.

Scores are "higher is better" for every metric: inner product as is, L2 as the negated squared distance.

Loading maps the large arrays rather than reading them (``DenseIndex.load(path, mmap=True)``, the default), so a
load costs O(metadata) and a search reads only the pages it touches:

- ``vectors.npy`` (a flat index saved from the torch backend) and a streamed flat index's ``vectors.bin`` are
  numpy memory maps, searched in place: by FAISS's exact kernel (``faiss.knn``, the one ``IndexFlat.search``
  runs) or by torch a block of documents at a time; there is no FAISS file to read;
- IVF files (``ivf_flat``, ``ivf_pq``) are read with ``faiss.IO_FLAG_MMAP``: the quantizer (and PQ codebooks)
  in RAM, the inverted lists mapped from the file (FAISS's ``OnDiskInvertedLists``, read-only);
- flat and HNSW FAISS files: ``IO_FLAG_MMAP`` reads these whole (it maps inverted lists only), so they are read
  with ``IO_FLAG_MMAP_IFC`` where the installed faiss has it (1.11 and later): the stored vectors are mapped,
  HNSW's graph is read into RAM. An older faiss reads them whole.

A mapped index is read-only (FAISS aborts the process on an add to a mapped array): ``add`` refuses it, and
``load(path, mmap=False)`` reads everything into RAM. Indexes larger than RAM are built by streaming
(:class:`fastrank.index.dense_stream.DenseIndexWriter`), which writes the same files a chunk at a time.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fastrank.index import columns
from fastrank.index.storage import (META, IndexFormatError, check_finite_rows, check_ids, check_unique_ids, is_int,
                                    meta_field, optional_positive_int, positive_int, read_meta, save_index_dir,
                                    verify_files, verify_meta_checksum, write_npy)
from fastrank.progress import progress_bar

KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw")
METRICS = ("ip", "l2")
BACKENDS = ("faiss", "faiss_gpu", "torch")
FORMAT = "fastrank.DenseIndex"
# Version 2 made meta.json a manifest (written_by, meta_sha256; see fastrank.index.storage). Version 1 has
# the same files and fields, so it still loads, with every field checked but no checksum of meta.json.
FORMAT_VERSION = 2
LEGACY_VERSION = 1
# The streamed layout (column files under a commit manifest, fastrank.index.columns; written by
# fastrank.index.dense_stream): its own version, read beside the saved-by-save() layout of FORMAT_VERSION.
STREAM_VERSION = 3
IVF_KINDS = ("ivf_flat", "ivf_pq")
REBUILD_HINT = "rebuild with `fastrank index CORPUS OUT` (or DenseIndex(...).add(...).save(...))"
# FAISS trains k-means well with this many points per centroid and prints a warning for each k-means run
# (one per PQ sub-quantizer: 48 for a 384-dim IVF-PQ) below it.
FAISS_POINTS_PER_CENTROID = 39
# Exact torch search scores queries against this many (query, document) pairs at a time (64 MB of float32),
# a block of documents per step, so that a large or memory-mapped flat index never needs an (nq, N) matrix.
TORCH_SCORE_PAIRS = 1 << 24


def import_faiss():
    """The faiss module, or an ImportError that says how to install it (and what runs without it)."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "this index needs FAISS: pip install faiss-cpu (or 'fastrank[retrieval]'; faiss-gpu for CUDA). "
            "Exact search without FAISS: DenseIndex(dim, kind='flat', backend='torch')"
        ) from exc
    return faiss


def default_pq_m(dim: int) -> int:
    """IVF-PQ's default number of sub-quantizers: the largest of 48, 32, 24, 16, 12, 8, ... dividing ``dim``."""
    return next(m for m in (48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1) if dim % m == 0)


def read_faiss_index(data: Path, kind: str, mmap: bool):
    """``data`` read by FAISS: memory-mapped where FAISS can (see the module docstring), else whole."""
    faiss = import_faiss()
    flags = 0
    if mmap:
        flags = faiss.IO_FLAG_MMAP if kind in IVF_KINDS else getattr(faiss, "IO_FLAG_MMAP_IFC", 0)
    try:
        return faiss.read_index(str(data), flags)
    except RuntimeError as exc:
        raise IndexFormatError(f"{data}: FAISS cannot read it ({str(exc).splitlines()[0]})") from None


def _faiss_gpus() -> int:
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def backend_reasons(backend: str, kind: str, device: torch.device) -> list[str]:
    """Why ``backend`` cannot serve ``kind`` on ``device``; empty when it can."""
    reasons = []
    if backend in ("faiss", "faiss_gpu"):
        try:
            import_faiss()
        except ImportError as exc:
            reasons.append(str(exc))
    if backend == "faiss" and device.type == "cuda" and kind == "flat":
        reasons.append("exact search on CUDA runs on the GPU (faiss_gpu or torch), not faiss-cpu")
    if backend == "faiss_gpu":
        if device.type != "cuda":
            reasons.append(f"device is {device.type}, not cuda")
        elif not _faiss_gpus():
            reasons.append("the installed faiss has no GPU support (pip install faiss-gpu)")
        if kind == "hnsw":
            reasons.append("FAISS has no GPU HNSW")
    if backend == "torch" and kind != "flat":
        reasons.append(f"the torch backend does exact search only; kind {kind!r} needs FAISS")
    return reasons


def choose_backend(kind: str, device: torch.device, backend: str | None = None) -> str:
    """The first backend in priority order (FAISS GPU, faiss-cpu, torch) that can serve the call."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        reasons = backend_reasons(backend, kind, device)
        if reasons:
            raise RuntimeError(f"backend {backend!r} cannot run {kind!r} on {device}: " + "; ".join(reasons))
        return backend
    order = ("faiss_gpu", "torch", "faiss") if device.type == "cuda" else ("faiss", "torch")
    tried = {}
    for b in order:
        tried[b] = backend_reasons(b, kind, device)
        if not tried[b]:
            return b
    raise RuntimeError(f"no backend can run a {kind!r} index on {device}: " +
                       "; ".join(f"{b}: {', '.join(r)}" for b, r in tried.items()))


def _as_matrix(x, name: str, dim: int | None = None) -> np.ndarray | torch.Tensor:
    """Validate a (N, dim) float matrix; torch tensors stay torch (and on their device), others become numpy."""
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    else:
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, dim), got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dim {x.shape[1]}, the index has dim {dim}")
    return x


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class DenseIndex:
    """A FAISS index over one vector per document, with external ids and save/load.

    Args:
        dim: vector dimension.
        kind: ``"flat"`` (exact), ``"ivf_flat"``, ``"ivf_pq"`` or ``"hnsw"``.
        metric: ``"ip"`` (inner product; cosine on normalised vectors) or ``"l2"``.
        nlist: IVF lists; default ``4 * sqrt(N)`` at training time, capped so each list trains on 39+ points.
        nprobe: IVF lists visited per query (default 16).
        pq_m: IVF-PQ sub-quantizers (must divide ``dim``; default the largest of 48, 32, 24, 16, 8, ... that does).
        pq_bits: bits per PQ code (default 8).
        hnsw_m, ef_construction, ef_search: HNSW graph degree and beam widths.
        seed: seeds k-means (IVF and PQ training) so the same data builds the same index.
        device: where searches run; CUDA uses FAISS GPU when installed, else exact torch search.
        backend: force ``"faiss"``, ``"faiss_gpu"`` or ``"torch"``; default chosen by :func:`choose_backend`.
    """

    def __init__(self, dim: int, kind: str = "flat", metric: str = "ip", *, nlist: int | None = None,
                 nprobe: int = 16, pq_m: int | None = None, pq_bits: int = 8, hnsw_m: int = 32,
                 ef_construction: int = 200, ef_search: int = 128, seed: int = 0,
                 device: str | torch.device = "cpu", backend: str | None = None):
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        if pq_m is not None and dim % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide dim={dim}")
        self.dim, self.kind, self.metric = int(dim), kind, metric
        self.params = dict(nlist=nlist, nprobe=nprobe, pq_m=pq_m, pq_bits=pq_bits, hnsw_m=hnsw_m,
                           ef_construction=ef_construction, ef_search=ef_search, seed=seed)
        self.device = torch.device(device)
        self.backend = choose_backend(kind, self.device, backend)
        self._ids: list = []
        self._ids_seen: set = set()  # the ids as a set, for refusing duplicates in add
        self._table: np.ndarray | None = None
        self._faiss_index = None  # CPU FAISS index: what is trained, added to and saved
        self._gpu_index = None  # its GPU copy, rebuilt lazily after adds
        self._vectors: torch.Tensor | None = None  # torch backend storage
        self._flat: np.ndarray | None = None  # a flat index's vectors, mapped, searched without a FAISS index
        self._read_only: str | None = None  # why add is refused (a memory-mapped load)
        self._source: Path | None = None  # the FAISS file a mapped index was read from
        self._id_type: str | None = None  # "int" or "str" for ids read lazily (StoredIds)
        self._trained = kind in ("flat", "hnsw")
        if self.backend != "torch" and self._trained:
            self._faiss_index = self._new_faiss_index(nlist=None)

    # -- construction ---------------------------------------------------------------------------------
    def _faiss_metric(self):
        faiss = import_faiss()
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2

    def _default_pq_m(self) -> int:
        return default_pq_m(self.dim)

    def _new_faiss_index(self, nlist: int | None):
        faiss, p, metric = import_faiss(), self.params, self._faiss_metric()
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, p["hnsw_m"], metric)
            index.hnsw.efConstruction = p["ef_construction"]
            index.hnsw.efSearch = p["ef_search"]
            return index
        quantizer = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        if self.kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, metric)
        else:
            index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, p["pq_m"] or self._default_pq_m(), p["pq_bits"], metric)
            index.pq.cp.seed = p["seed"]
        index.cp.seed = p["seed"]
        index.nprobe = min(p["nprobe"], nlist)
        return index

    @property
    def faiss_index(self):
        """The CPU FAISS index (positions 0..N-1, ids in :attr:`ids`), for FAISS's own tools: ``IndexShards``
        over several DenseIndexes, ``index_cpu_to_all_gpus``, ``contrib.client_server``. None on torch, and
        for a flat index loaded memory-mapped from ``vectors.npy`` or ``vectors.bin`` (searched in place)."""
        return self._faiss_index

    @property
    def is_trained(self) -> bool:
        return self._trained

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list:
        return list(self._ids)

    def training_points(self, n: int) -> tuple[int, int]:
        """``(nlist, least)`` for training on ``n`` vectors: the IVF lists that would be used and the fewest
        vectors that can train them (0 for flat and HNSW, which need no training)."""
        if self.kind in ("flat", "hnsw"):
            return 0, 0
        nlist = self.params["nlist"] or max(1, min(int(4 * math.sqrt(n)), n // FAISS_POINTS_PER_CENTROID))
        # FAISS needs a point per list, and 2**pq_bits points to train each PQ codebook.
        return nlist, max(nlist, 2 ** self.params["pq_bits"]) if self.kind == "ivf_pq" else nlist

    def check_trainable(self, n: int, name: str = "vectors") -> None:
        """Refuse ``n`` vectors too few to train this index, before anything is encoded or trained."""
        nlist, least = self.training_points(n)
        if n < least:
            raise ValueError(f"{name}: {n} training points are too few for a {self.kind} index with nlist={nlist} "
                             f"(need at least {least}); lower nlist/pq_bits or use kind='flat'")

    def train(self, vectors) -> "DenseIndex":
        """Train IVF centroids (and PQ codebooks) on ``vectors`` (N, dim); a no-op for flat and HNSW."""
        x = _as_matrix(vectors, "vectors", self.dim)
        if self._trained:
            return self
        n = x.shape[0]
        self.check_trainable(n)
        nlist, _ = self.training_points(n)
        index = self._new_faiss_index(nlist)
        # Below FAISS's points per centroid it trains anyway and prints one warning per k-means run; one
        # warning that says what to do replaces them.
        sparse = [f"{k} {what}" for k, what in ((nlist, "IVF lists"),
                                                (2 ** self.params["pq_bits"] if self.kind == "ivf_pq" else 0,
                                                 "PQ codebook entries")) if n < k * FAISS_POINTS_PER_CENTROID]
        if sparse:
            index.cp.min_points_per_centroid = 1
            if self.kind == "ivf_pq":
                index.pq.cp.min_points_per_centroid = 1
            warnings.warn(f"{self.kind}: training {' and '.join(sparse)} on {n} vectors, fewer than the "
                          f"{FAISS_POINTS_PER_CENTROID} per centroid FAISS asks for; recall may suffer (more vectors, "
                          "a lower nlist or pq_bits, or kind='flat' or 'hnsw')", UserWarning, stacklevel=3)
        index.train(_to_numpy(x))
        self._faiss_index = index
        self.params["nlist"] = nlist
        self._trained = True
        return self

    def add(self, vectors, ids: Sequence | None = None, *, batch_size: int = 65536, progress: bool = True) -> "DenseIndex":
        """Add ``vectors`` (N, dim) with external ``ids`` (default: positions continuing from ``len(self)``).

        An untrained IVF index is trained on the first vectors added (seeded).
        """
        if self._read_only:
            raise ValueError(self._read_only)
        x = _as_matrix(vectors, "vectors", self.dim)
        n = x.shape[0]
        if n == 0:
            raise ValueError("vectors is empty: nothing to add")
        check_finite_rows(x, "vectors")
        if ids is None:
            ids = list(range(len(self._ids), len(self._ids) + n))
        else:
            ids = [i.item() if isinstance(i, np.generic) else i for i in
                   (ids.tolist() if isinstance(ids, (np.ndarray, torch.Tensor)) else list(ids))]
            if len(ids) != n:
                raise ValueError(f"ids has {len(ids)} entries for {n} vectors")
        check_unique_ids(ids, self._id_set())
        if not self._trained:
            self.train(x)
        if self.backend == "torch":
            t = torch.as_tensor(x).to(self.device, torch.float32) if not isinstance(x, torch.Tensor) else \
                x.detach().to(self.device, torch.float32)
            self._vectors = t if self._vectors is None else torch.cat([self._vectors, t])
        else:
            for s in progress_bar(range(0, n, batch_size), desc=f"adding to {self.kind}", unit="batch",
                                  enabled=progress and n > batch_size):
                self._faiss_index.add(_to_numpy(x[s:s + batch_size]))
            self._gpu_index = None
        self._ids.extend(ids)
        self._ids_seen.update(ids)
        return self

    def _id_set(self) -> set:
        if len(self._ids_seen) != len(self._ids):
            self._ids_seen = set(self._ids)
        return self._ids_seen

    # -- search ---------------------------------------------------------------------------------------
    def _searcher(self):
        if self.backend != "faiss_gpu":
            return self._faiss_index
        if self._gpu_index is None:
            faiss = import_faiss()
            self._gpu_res = getattr(self, "_gpu_res", None) or faiss.StandardGpuResources()
            if self._flat is not None:  # mapped vectors: copied to the GPU a block at a time
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, self.device.index or 0,
                                                         self._new_faiss_index(None))
                step = max(1, TORCH_SCORE_PAIRS // self.dim)
                for s in range(0, self._flat.shape[0], step):
                    self._gpu_index.add(np.ascontiguousarray(self._flat[s:s + step], dtype=np.float32))
            else:
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, self.device.index or 0, self._faiss_index)
        return self._gpu_index

    def _faiss_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's (distances, positions) for ``k <= len(self)``; mapped flat vectors are searched in place by
        the exact kernel ``IndexFlat.search`` runs (so the same results, ties included)."""
        if self._flat is not None and self.backend == "faiss":
            return import_faiss().knn(q, self._flat, k, self._faiss_metric())
        return self._searcher().search(q, k)

    def _torch_top(self, qt: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``k`` (scores, positions) of queries ``qt`` (nq, dim) over the stored vectors, a block of
        documents at a time (:data:`TORCH_SCORE_PAIRS` scores per block), merging each block's top-k."""
        vectors, n = self._vectors, self._vectors.shape[0]
        step = max(k, TORCH_SCORE_PAIRS // max(1, qt.shape[0]))
        best = None
        for s in range(0, n, step):
            block = vectors[s:s + step]
            if self.metric == "ip":
                sim = qt @ block.T
            else:  # negated squared L2, as FAISS's IndexFlatL2 reports it
                sim = 2 * qt @ block.T - (qt * qt).sum(1, keepdim=True) - (block ** 2).sum(1)
            v, i = sim.topk(min(k, block.shape[0]), dim=1)
            i += s
            if best is not None:
                v, j = torch.cat([best[0], v], 1).topk(min(k, best[0].shape[1] + v.shape[1]), dim=1)
                i = torch.cat([best[1], i], 1).gather(1, j)
            best = (v, i)
        return best

    def search_positions(self, queries, k: int, *, batch_size: int = 4096, progress: bool = True):
        """Like :meth:`search` but returns internal positions (int64, -1 where fewer than ``k`` exist)."""
        q = _as_matrix(queries, "queries", self.dim)
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if len(self) == 0:
            raise ValueError("the index is empty: add vectors before searching")
        check_finite_rows(q, "queries")
        nq = q.shape[0]
        if self.backend != "torch" and nq <= batch_size and k <= len(self):
            # One FAISS call fills whole (nq, k) arrays: hand them back as they are, no copies.
            scores, pos = self._faiss_search(_to_numpy(q), k)
            if self.metric == "l2":
                np.negative(scores, out=scores)
            scores[pos < 0] = -np.inf  # HNSW / IVF can come back short of k
            return scores, pos
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        pos = np.full((nq, k), -1, dtype=np.int64)
        kk = min(k, len(self))
        for s in progress_bar(range(0, nq, batch_size), desc=f"searching {self.kind}", unit="batch",
                              enabled=progress and nq > batch_size):
            chunk = q[s:s + batch_size]
            if self.backend == "torch":
                qt = torch.as_tensor(chunk) if not isinstance(chunk, torch.Tensor) else chunk
                v, i = self._torch_top(qt.detach().to(self._vectors.device, torch.float32), kk)
                scores[s:s + len(chunk), :kk], pos[s:s + len(chunk), :kk] = v.cpu().numpy(), i.cpu().numpy()
            else:
                d, i = self._faiss_search(_to_numpy(chunk), kk)
                scores[s:s + len(chunk), :kk] = -d if self.metric == "l2" else d
                pos[s:s + len(chunk), :kk] = i
        scores[pos < 0] = -np.inf
        return scores, pos

    def search(self, queries, k: int = 10, *, batch_size: int = 4096, progress: bool = True):
        """Top-``k`` documents for each query row.

        Returns ``(scores, ids)``: scores (Q, k) float32, higher is better (a torch tensor on the queries'
        device when queries is a tensor, else numpy); ids a (Q, k) numpy array of the external ids: int64
        when every id is an int (``-1`` where the index holds fewer than ``k`` documents, FAISS's
        convention), else object (``None`` there). Missing results score ``-inf``.
        """
        scores, pos = self.search_positions(queries, k, batch_size=batch_size, progress=progress)
        if isinstance(self._ids, list):
            ids = self._id_table()[pos]  # position -1 picks the table's trailing "missing" entry
        else:
            ids = self._stored_ids(pos)
        if isinstance(queries, torch.Tensor):
            return torch.from_numpy(scores).to(queries.device), ids
        return scores, ids

    def _id_table(self) -> np.ndarray:
        """External ids by position, plus a trailing missing marker; cached so a search maps ids with one
        fancy-index, not a Python loop (that loop would dominate a fast HNSW search)."""
        if self._table is None or len(self._table) != len(self._ids) + 1:
            if all(isinstance(i, int) for i in self._ids):
                self._table = np.array(self._ids + [-1], dtype=np.int64)
            else:
                self._table = np.empty(len(self._ids) + 1, dtype=object)
                self._table[:-1] = self._ids
        return self._table

    def _stored_ids(self, pos: np.ndarray) -> np.ndarray:
        """The ids at ``pos`` of an index whose ids are read lazily (a streamed index): only those returned."""
        flat = pos.reshape(-1)
        found = flat >= 0
        if self._id_type == "int":
            out = np.full(flat.shape, -1, dtype=np.int64)
        else:
            out = np.empty(flat.shape, dtype=object)
        if found.any():
            out[found] = self._ids.lookup(flat[found])
        return out.reshape(pos.shape)

    def to_run(self, qids: Sequence[str], queries, k: int = 100, **kw) -> dict[str, dict[str, float]]:
        """Search and return a run ``{qid: {docid: score}}`` (ids as strings)."""
        if len(qids) != len(queries):
            raise ValueError(f"qids has {len(qids)} entries for {len(queries)} query vectors")
        scores, ids = self.search(queries, k, **kw)
        scores = scores.cpu().numpy() if isinstance(scores, torch.Tensor) else scores
        return {str(q): {str(d): float(s) for d, s in zip(row_ids, row_s) if s != -np.inf}
                for q, row_ids, row_s in zip(qids, ids, scores)}

    # -- persistence ----------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "dim": self.dim, "kind": self.kind,
                "metric": self.metric, "params": self.params, "ntotal": len(self),
                "id_type": "int" if all(isinstance(i, int) for i in self._ids) else "str"}

    def saved_files(self) -> list[str]:
        """The files :meth:`save` writes besides ``meta.json`` and attached ones: what a directory it saves
        into may hold only if an index saved there owns them."""
        flat_vectors = self.backend == "torch" or self._flat is not None
        return ["vectors.npy" if flat_vectors else "index.faiss", "ids.json"]

    def save(self, path: str | os.PathLike, *, attach: dict[str, str] | None = None) -> Path:
        """Write the index to directory ``path``: vectors (``index.faiss`` or ``vectors.npy``), ``ids.json``
        and ``meta.json`` with checksums that :meth:`load` verifies. ``attach`` (file name -> text) adds
        files of the caller's (the CLI's ``encoder.json``), checksummed and verified with the rest.

        ``path`` must be absent, empty, or an index fastrank saved: that index is replaced, its files that
        this one does not write are removed, and any other file in ``path`` is left as it is (one that this
        save would overwrite is an error). A reader sees the old index or the new one, never a mix."""
        if len(self) == 0:
            raise ValueError("the index is empty: nothing to save")
        data, ids = self.saved_files()
        if self.backend == "torch":
            write_data = write_npy(self._vectors.cpu().numpy())
        elif self._flat is not None:
            write_data = write_npy(self._flat)
        else:
            def write_data(p: Path) -> None:
                index = self._faiss_index
                if self._source is not None and self.kind in IVF_KINDS:
                    # Mapped inverted lists cannot be written as lists of their own: read the file whole.
                    index = import_faiss().read_index(str(self._source))
                import_faiss().write_index(index, str(p))
        ids_text = json.dumps(list(self._ids))
        writers = {data: write_data, ids: lambda p: p.write_text(ids_text, encoding="utf-8")}
        return save_index_dir(path, writers, self._meta() | {"data_file": data}, attach)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", backend: str | None = None,
             mmap: bool = True, verify: bool = False) -> "DenseIndex":
        """Read an index written by :meth:`save` or built by streaming (:class:`~fastrank.index.dense_stream.
        DenseIndexWriter`); a missing, corrupt or mismatched file, or a meta.json field that is edited, out of
        range or disagrees with the FAISS file, is an :class:`IndexFormatError` naming it.

        ``mmap=True`` maps the large arrays (see the module docstring for what FAISS maps of each kind) and
        makes the index read-only; ``mmap=False`` reads everything into RAM. A streamed index's checksums are
        per chunk: ``verify=True`` reads the whole index once and checks every byte; without it a load checks
        file sizes, meta.json's own checksum and the small files', and reads the ids only where a search returns
        them. An index written by :meth:`save` is hashed whole at every load, as before (``verify`` changes
        nothing there): it was built in RAM, and it loads mapped all the same."""
        path = Path(path)
        if read_meta(path, FORMAT).get("version") == STREAM_VERSION:
            return _load_streamed(cls, path, device=device, backend=backend, mmap=mmap, verify=verify)
        meta = read_meta(path, FORMAT, _REQUIRED, FORMAT_VERSION, REBUILD_HINT, legacy_version=LEGACY_VERSION)
        _check_meta_fields(path / META, meta)
        data, ids_file = path / meta["data_file"], path / "ids.json"
        verify_files(path, meta, (data, ids_file))
        try:
            ids = json.loads(ids_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IndexFormatError(f"{ids_file}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
        check_ids(ids_file, ids, meta["ntotal"], "ntotal", meta["id_type"])
        p = meta["params"]
        try:
            self = cls(meta["dim"], meta["kind"], meta["metric"], nlist=p["nlist"], nprobe=p["nprobe"],
                       pq_m=p["pq_m"], pq_bits=p["pq_bits"], hnsw_m=p["hnsw_m"], ef_construction=p["ef_construction"],
                       ef_search=p["ef_search"], seed=p["seed"], device=device, backend=backend)
        except ValueError as exc:
            raise IndexFormatError(f"{path / META}: {exc}") from None
        if data.suffix == ".npy":
            try:
                vectors = np.load(data, mmap_mode="r" if mmap else None, allow_pickle=False)
            except ValueError as exc:
                raise IndexFormatError(f"{data}: not a plain .npy array ({exc})") from None
            if vectors.shape != (meta["ntotal"], meta["dim"]) or vectors.dtype != np.float32:
                raise IndexFormatError(f"{data}: {vectors.dtype} {vectors.shape}, meta.json says float32 "
                                       f"({meta['ntotal']}, {meta['dim']}) (fields ntotal, dim)")
            verify_meta_checksum(path, meta)
            if mmap and vectors.flags.c_contiguous:
                self._adopt_flat(vectors, ids)
            else:
                self.add(vectors, ids, progress=False)  # plain vectors load into whichever backend was chosen
            return self
        if self.backend == "torch":
            raise IndexFormatError(f"{data} is a FAISS index: load it with a FAISS backend (faiss installed)")
        index = read_faiss_index(data, self.kind, mmap)
        _check_faiss_matches_meta(data, index, meta)
        verify_meta_checksum(path, meta)
        self._adopt_faiss(index, data if mmap else None, ids)
        return self

    def _adopt_flat(self, vectors: np.ndarray, ids) -> None:
        """Serve a flat index from ``vectors`` (N, dim) float32 as they are (a memory map: read-only)."""
        if self.backend == "torch":
            self._vectors = columns.as_tensor(vectors).to(self.device)
        else:
            self._flat, self._faiss_index = vectors, None
        self._ids, self._table = ids, None
        if isinstance(vectors, np.memmap):
            self._read_only = ("this index was loaded memory-mapped, which makes it read-only; load it with "
                               "DenseIndex.load(path, mmap=False) to add to it")

    def _adopt_faiss(self, index, source: Path | None, ids) -> None:
        """Serve a FAISS index read from a file (``source`` when it was memory-mapped from it)."""
        p = self.params
        if self.kind in IVF_KINDS:
            import_faiss().extract_index_ivf(index).nprobe = min(p["nprobe"], p["nlist"])
        if self.kind == "hnsw":
            index.hnsw.efSearch = p["ef_search"]
        self._faiss_index, self._ids, self._trained, self._table = index, ids, True, None
        self._source = source
        if source is not None:
            self._read_only = ("this index was loaded memory-mapped, which makes it read-only; load it with "
                               "DenseIndex.load(path, mmap=False) to add to it")


_REQUIRED = ("dim", "kind", "metric", "params", "ntotal", "data_file", "sha256")
# FAISS stores these parameters as C ints.
_INT32 = 2 ** 31


def _faiss_param(value) -> bool:
    return positive_int(value) and value < _INT32


def _check_meta_fields(meta_file: Path, meta: dict, streamed: bool = False) -> None:
    """Every field of a DenseIndex's meta.json has its type and range, naming the first that does not."""
    dim = meta_field(meta_file, meta, "dim", _faiss_param, "a positive integer below 2**31")
    kind = meta_field(meta_file, meta, "kind", lambda v: v in KINDS, f"one of {KINDS}")
    meta_field(meta_file, meta, "metric", lambda v: v in METRICS, f"one of {METRICS}")
    meta_field(meta_file, meta, "ntotal", positive_int, "a positive integer")
    meta_field(meta_file, meta, "id_type", lambda v: v in ("int", "str"), "'int' or 'str'")
    if streamed:
        data_files = ("vectors.bin",) if kind == "flat" else ("index.faiss",)
    else:
        data_files = ("vectors.npy", "index.faiss") if kind == "flat" else ("index.faiss",)
    meta_field(meta_file, meta, "data_file", lambda v: v in data_files, f"one of {data_files} for kind {kind!r}")
    p = meta_field(meta_file, meta, "params", lambda v: isinstance(v, dict), "an object")
    ivf = kind in ("ivf_flat", "ivf_pq")
    meta_field(meta_file, p, "nlist", _faiss_param if ivf else (lambda v: v is None or _faiss_param(v)),
               "a positive integer below 2**31" + ("" if ivf else " or null"), "params.")
    for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
        meta_field(meta_file, p, name, _faiss_param, "a positive integer below 2**31", "params.")
    meta_field(meta_file, p, "pq_m", lambda v: optional_positive_int(v) and (v is None or dim % v == 0),
               f"null or a positive divisor of dim ({dim})", "params.")
    meta_field(meta_file, p, "pq_bits", lambda v: positive_int(v) and v <= 24, "an integer from 1 to 24", "params.")
    meta_field(meta_file, p, "seed", is_int, "an integer", "params.")


def _check_faiss_matches_meta(data: Path, index, meta: dict) -> None:
    """The FAISS file is the index meta.json describes: dimension, size, metric, kind and its structure."""
    faiss, p = import_faiss(), meta["params"]
    kinds = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSW, "ivf_flat": faiss.IndexIVFFlat,
             "ivf_pq": faiss.IndexIVFPQ}
    found_kind = next((k for k, c in kinds.items() if isinstance(index, c)), type(index).__name__)
    metrics = {faiss.METRIC_INNER_PRODUCT: "ip", faiss.METRIC_L2: "l2"}
    found = {"dim": index.d, "ntotal": index.ntotal, "kind": found_kind,
             "metric": metrics.get(index.metric_type, f"FAISS metric {index.metric_type}")}
    if found_kind in ("ivf_flat", "ivf_pq"):
        found["params.nlist"] = index.nlist
    if found_kind == "ivf_pq":
        found["params.pq_bits"] = index.pq.nbits
        if p["pq_m"] is not None:
            found["params.pq_m"] = index.pq.M
    if found_kind == "hnsw":
        found["params.hnsw_m"] = index.hnsw.nb_neighbors(1)  # levels above 0 hold M neighbours, level 0 2M
    for field, value in found.items():
        said = p[field.split(".")[1]] if field.startswith("params.") else meta[field]
        if value != said:
            raise IndexFormatError(f"{data.parent / META}: field {field} is {said!r}, but {data.name} holds "
                                   f"{value!r}; rebuild the index if meta.json was edited")


_STREAM_REQUIRED = ("state", "dim", "kind", "metric", "params", "ntotal", "id_type", "data_file", "columns",
                    "column_types", "chunks", "sha256")


def _load_streamed(cls, path: Path, *, device, backend, mmap: bool, verify: bool) -> "DenseIndex":
    """A streamed index (:mod:`fastrank.index.dense_stream`): columns mapped, index.faiss read by FAISS."""
    from fastrank.index.tokens import StoredIds

    meta_file = path / META
    meta = read_meta(path, FORMAT, ("state",), STREAM_VERSION)
    if meta["state"] != "complete":
        done = sum(c.get("documents", 0) for c in meta.get("chunks", []) if isinstance(c, dict))
        raise IndexFormatError(f"{path}: a build still in progress ({done} documents committed), not an index yet; "
                               "re-run the same `fastrank index` command (or DenseIndexWriter) to resume and "
                               "finish it")
    missing = [k for k in _STREAM_REQUIRED if k not in meta]
    if missing:
        raise IndexFormatError(f"{meta_file}: missing {', '.join(missing)}")
    _check_meta_fields(meta_file, meta, streamed=True)
    verify_meta_checksum(path, meta)
    verify_files(path, meta, [])  # the small files: attached ones
    if verify:
        columns.verify(path, meta, progress=True)
    p = meta["params"]
    try:
        self = cls(meta["dim"], meta["kind"], meta["metric"], nlist=p["nlist"], nprobe=p["nprobe"], pq_m=p["pq_m"],
                   pq_bits=p["pq_bits"], hnsw_m=p["hnsw_m"], ef_construction=p["ef_construction"],
                   ef_search=p["ef_search"], seed=p["seed"], device=device, backend=backend)
    except ValueError as exc:
        raise IndexFormatError(f"{meta_file}: {exc}") from None
    n, d = meta["ntotal"], meta["dim"]
    # The large file (index.faiss) is FAISS's to read; map_columns maps the columns only.
    arrays = columns.map_columns(path, {**meta, "large_files": {}}, mmap=mmap)

    def column(name: str, shape: tuple) -> np.ndarray:
        arr = arrays.get(name)
        if arr is None:
            raise IndexFormatError(f"{path}: missing {name}")
        if arr.shape != shape:
            raise IndexFormatError(f"{path / name}: shape {arr.shape}, meta.json implies {shape}")
        return arr

    id_offsets = column("id_offsets.bin", (n + 1,))
    if int(id_offsets[0]) != 0 or bool((np.diff(id_offsets) <= 0).any()):
        raise IndexFormatError(f"{path / 'id_offsets.bin'}: not increasing offsets from 0")
    ids = StoredIds(column("ids.bin", (int(id_offsets[-1]),)), id_offsets, path / "ids.bin")
    self._id_type = meta["id_type"]
    if not mmap:  # everything in RAM: the ids as a list, and an index that can be added to
        ids = check_ids(path / "ids.bin", list(ids), n, "ntotal", meta["id_type"])
    if meta["kind"] == "flat":
        if mmap:
            self._adopt_flat(column("vectors.bin", (n, d)), ids)
        else:
            self.add(column("vectors.bin", (n, d)), ids, progress=False)
        return self
    if self.backend == "torch":
        raise IndexFormatError(f"{path / 'index.faiss'} is a FAISS index: load it with a FAISS backend (faiss "
                               "installed)")
    data = path / "index.faiss"
    info = meta.get("large_files", {}).get("index.faiss")
    if not isinstance(info, dict) or not is_int(info.get("rows")):
        raise IndexFormatError(f"{meta_file}: large_files does not record index.faiss")
    if not data.is_file():
        raise IndexFormatError(f"{path}: missing index.faiss")
    if data.stat().st_size != info["rows"]:
        raise IndexFormatError(f"{data}: {data.stat().st_size} bytes, meta.json commits {info['rows']}; the file is "
                               "truncated or from another index")
    index = read_faiss_index(data, meta["kind"], mmap)
    _check_faiss_matches_meta(data, index, meta)
    self._adopt_faiss(index, data if mmap else None, ids)
    return self
