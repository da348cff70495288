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
REBUILD_HINT = "rebuild with `fastrank index CORPUS OUT` (or DenseIndex(...).add(...).save(...))"
# FAISS trains k-means well with this many points per centroid and prints a warning for each k-means run
# (one per PQ sub-quantizer: 48 for a 384-dim IVF-PQ) below it.
FAISS_POINTS_PER_CENTROID = 39


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "this index needs FAISS: pip install faiss-cpu (or 'fastrank[retrieval]'; faiss-gpu for CUDA). "
            "Exact search without FAISS: DenseIndex(dim, kind='flat', backend='torch')"
        ) from exc
    return faiss


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
            _faiss()
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
        self._trained = kind in ("flat", "hnsw")
        if self.backend != "torch" and self._trained:
            self._faiss_index = self._new_faiss_index(nlist=None)

    # -- construction ---------------------------------------------------------------------------------
    def _faiss_metric(self):
        faiss = _faiss()
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2

    def _default_pq_m(self) -> int:
        return next(m for m in (48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1) if self.dim % m == 0)

    def _new_faiss_index(self, nlist: int | None):
        faiss, p, metric = _faiss(), self.params, self._faiss_metric()
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
        over several DenseIndexes, ``index_cpu_to_all_gpus``, ``contrib.client_server``. None on torch."""
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
            faiss = _faiss()
            self._gpu_res = getattr(self, "_gpu_res", None) or faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, self.device.index or 0, self._faiss_index)
        return self._gpu_index

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
            scores, pos = self._searcher().search(_to_numpy(q), k)
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
                qt = qt.detach().to(self._vectors.device, torch.float32)
                if self.metric == "ip":
                    sim = qt @ self._vectors.T
                else:  # negated squared L2, as FAISS's IndexFlatL2 reports it
                    sim = 2 * qt @ self._vectors.T - (qt * qt).sum(1, keepdim=True) - (self._vectors ** 2).sum(1)
                v, i = sim.topk(kk, dim=1)
                scores[s:s + len(chunk), :kk], pos[s:s + len(chunk), :kk] = v.cpu().numpy(), i.cpu().numpy()
            else:
                d, i = self._searcher().search(_to_numpy(chunk), kk)
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
        ids = self._id_table()[pos]  # position -1 picks the table's trailing "missing" entry
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
        return ["vectors.npy" if self.backend == "torch" else "index.faiss", "ids.json"]

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
        else:
            def write_data(p: Path) -> None:
                _faiss().write_index(self._faiss_index, str(p))
        ids_text = json.dumps(self._ids)
        writers = {data: write_data, ids: lambda p: p.write_text(ids_text, encoding="utf-8")}
        return save_index_dir(path, writers, self._meta() | {"data_file": data}, attach)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
             backend: str | None = None) -> "DenseIndex":
        """Read an index written by :meth:`save`; a missing, corrupt or mismatched file, or a meta.json field
        that is edited, out of range or disagrees with the FAISS file, is an :class:`IndexFormatError` naming
        it."""
        path = Path(path)
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
            vectors = np.load(data, allow_pickle=False)
            if vectors.shape != (meta["ntotal"], meta["dim"]) or vectors.dtype != np.float32:
                raise IndexFormatError(f"{data}: {vectors.dtype} {vectors.shape}, meta.json says float32 "
                                       f"({meta['ntotal']}, {meta['dim']}) (fields ntotal, dim)")
            verify_meta_checksum(path, meta)
            self.add(vectors, ids, progress=False)  # plain vectors load into whichever backend was chosen
            return self
        if self.backend == "torch":
            raise IndexFormatError(f"{data} is a FAISS index: load it with a FAISS backend (faiss installed)")
        try:
            index = _faiss().read_index(str(data))
        except RuntimeError as exc:
            raise IndexFormatError(f"{data}: FAISS cannot read it ({str(exc).splitlines()[0]})") from None
        _check_faiss_matches_meta(data, index, meta)
        verify_meta_checksum(path, meta)
        if self.kind in ("ivf_flat", "ivf_pq"):
            _faiss().extract_index_ivf(index).nprobe = min(p["nprobe"], p["nlist"])
        if self.kind == "hnsw":
            index.hnsw.efSearch = p["ef_search"]
        self._faiss_index, self._ids, self._trained, self._table = index, ids, True, None
        return self


_REQUIRED = ("dim", "kind", "metric", "params", "ntotal", "data_file", "sha256")
# FAISS stores these parameters as C ints.
_INT32 = 2 ** 31


def _faiss_param(value) -> bool:
    return positive_int(value) and value < _INT32


def _check_meta_fields(meta_file: Path, meta: dict) -> None:
    """Every field of a DenseIndex's meta.json has its type and range, naming the first that does not."""
    dim = meta_field(meta_file, meta, "dim", _faiss_param, "a positive integer below 2**31")
    kind = meta_field(meta_file, meta, "kind", lambda v: v in KINDS, f"one of {KINDS}")
    meta_field(meta_file, meta, "metric", lambda v: v in METRICS, f"one of {METRICS}")
    meta_field(meta_file, meta, "ntotal", positive_int, "a positive integer")
    meta_field(meta_file, meta, "id_type", lambda v: v in ("int", "str"), "'int' or 'str'")
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
    faiss, p = _faiss(), meta["params"]
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
