"""DenseIndex's benchmark data and providers, shared by `fastrank bench index` and benchmarks/bench_index.py.

Synthetic clustered unit vectors (dim 384: MiniLM's) and queries near corpus vectors. Providers, timed on
the whole search of all queries for the top 100:

- ``faiss``: the raw ``faiss_index.search`` on the very index fastrank built (the baseline: fastrank's
  overhead over FAISS is what this section measures; two separately built indexes differ by memory
  placement alone);
- ``fastrank``: ``DenseIndex.search``.

Before timing, fastrank's ids must be FAISS's on the same index. The unit is queries/s; the corpus sweep
grows N for the flat index (exact search: 2·N·dim FLOPs a query, held to the sgemm rate). IVF-PQ and HNSW
run at one size: their time depends on their parameters more than on N. Needs faiss (``pip install
faiss-cpu``); without it the section is skipped with that reason.
"""
from __future__ import annotations

import importlib.util

import numpy as np

DIM, K = 384, 100
NO_FAISS = "index: faiss is not installed (pip install faiss-cpu): section skipped"


def faiss_installed() -> bool:
    return importlib.util.find_spec("faiss") is not None


def params(kind: str, n: int, full: bool = False) -> dict:
    """The same parameters for fastrank and raw FAISS: nlist ~ 4 sqrt(N), 48 x 8-bit PQ codes."""
    nlist = max(64, int(4 * np.sqrt(n)) // 64 * 64)
    return {"flat": {}, "ivf_pq": dict(nlist=nlist, nprobe=32, pq_m=48, pq_bits=8),
            "hnsw": dict(hnsw_m=32, ef_construction=128 if full else 40, ef_search=128)}[kind]


def clustered(n: int, nq: int, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around 1,000 centres and ``nq`` queries near random corpus vectors."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, dim)).astype(np.float32)
    x = centers[rng.integers(0, 1000, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, n, nq)] + 0.3 * rng.standard_normal((nq, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, np.ascontiguousarray(q)


def raw_faiss(kind: str, x: np.ndarray, p: dict):
    """The FAISS calls fastrank makes for this kind, written out directly."""
    import faiss

    dim = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = p["ef_construction"], p["ef_search"]
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, p["nlist"], p["pq_m"], p["pq_bits"], faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = index.pq.cp.seed = 0
        index.nprobe = p["nprobe"]
        index.train(x)
    index.add(x)
    return index


def providers(index, q: np.ndarray, k: int = K) -> dict:
    """name -> a call searching every query; each returns the ids."""
    return {"faiss": lambda: index.faiss_index.search(q, k)[1],
            "fastrank": lambda: index.search(q, k, progress=False)[1]}


def check(got, want) -> None:
    """fastrank's ids are FAISS's on the same index (ties may swap places: 99.9% must agree)."""
    agree = float((np.asarray(got) == np.asarray(want)).mean())
    if agree <= 0.999:
        raise AssertionError(f"only {agree:.1%} of the top-{want.shape[1]} ids agree with FAISS on the same index")


def section(settings, probes) -> tuple[list[dict], list[str]]:
    """`fastrank bench index`: the flat corpus sweep and HNSW (and, in the full run, IVF-PQ) at one size."""
    from fastrank.bench.suite import Shape, measure

    if not faiss_installed():
        return [], [NO_FAISS]
    if not settings.wants("float32"):
        return [], [f"index: float32 vectors only; --dtype {','.join(settings.dtypes)} asks for none of it"]
    from fastrank.index import DenseIndex

    if settings.tiny:
        dim, nq, flat_sizes, one = 16, 10, (300, 600), [("hnsw", 300)]
    elif settings.quick:
        dim, nq, flat_sizes, one = DIM, 300, (2000, 6000, 20000), [("hnsw", 4000)]
    else:
        dim, nq, flat_sizes, one = DIM, 1000, (20000, 50000, 200000), [("hnsw", 20000), ("ivf_pq", 20000)]
    rows = []
    for kind, n in [("flat", n) for n in flat_sizes] + one:
        x, q = clustered(n, nq, dim)
        p = params(kind, n, full=not settings.quick and not settings.tiny)
        index = DenseIndex(dim, kind, **p).add(x, progress=False)
        swept = kind == "flat"
        shape = Shape("index", f"{kind} N={n} dim={dim} k={K}", "float32", nq, unit="queries/s",
                      flops=2.0 * n * nq * dim if swept else None, bytes=4.0 * n * dim if swept else None,
                      ceiling="sgemm_gflops" if swept else None, sweep=f"corpus ({kind}, dim={dim})" if swept else None,
                      work=n if swept else None, baselines=("faiss",))
        fns = providers(index, q, min(K, n))
        rows += measure(shape, fns, fns["faiss"], check, settings, probes)
    return rows, []
