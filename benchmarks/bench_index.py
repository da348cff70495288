"""Scale benchmark for DenseIndex: build time, queries/s of flat, IVF-PQ and HNSW through fastrank next to
the same raw FAISS calls (fastrank's overhead must stay under 5%), and recall@100 against exact search.

Sizes: synthetic clustered float32 vectors, dim 384 (MiniLM's). The default (20,000 vectors, 300 queries)
keeps the whole file under 3 minutes on a 2-core CPU; ``FASTRANK_BENCH_INDEX_N=full`` runs the issue's
sizes (200,000 on CPU, 1,000,000 with CUDA; 1,000 queries), and a number sets N. Run:
``pytest benchmarks/bench_index.py``.

The timed call for each provider is the whole search of all queries for the top 100. The overhead pits
``DenseIndex.search`` against the raw ``faiss_index.search`` on the same FAISS index, paired round by round
so a shared machine's load hits both alike: the median of the per-round time ratios. A raw FAISS index
built separately with the same calls gives the build-time comparison and an independent queries/s.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from fastrank.bench.index import DIM, K, clustered, params, raw_faiss  # noqa: E402
from fastrank.index import DenseIndex  # noqa: E402

MIN_ROUNDS, TIMED_S = 5, 3.0
CUDA = torch.cuda.is_available()
_n = os.environ.get("FASTRANK_BENCH_INDEX_N", "")
FULL = _n == "full"
N = (1_000_000 if CUDA else 200_000) if FULL else int(_n) if _n else 20_000
NQ = 1000 if FULL else 300
# Same parameters for both providers (fastrank.bench.index.params, as `fastrank bench index` uses).
PARAMS = {kind: params(kind, N, full=FULL) for kind in ("flat", "ivf_pq", "hnsw")}
MAX_OVERHEAD = 0.05


@pytest.fixture(scope="module")
def data():
    x, q = clustered(N, NQ, DIM)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(x)
    truth = exact.search(q, K)[1]
    return x, q, truth


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


@pytest.mark.parametrize("kind", ["flat", "ivf_pq", "hnsw"])
def test_dense_index_search(benchmark, data, kind):
    x, q, truth = data
    benchmark.group = f"DenseIndex {kind} N={N} dim={DIM} k={K}"
    # Torch (CUDA) or FAISS, whichever fastrank picks, against FAISS on CPU; on CUDA without faiss-gpu the
    # raw-FAISS comparison is a CPU one and the overhead figure is not meaningful.
    ix, build_fastrank = timed(lambda: DenseIndex(DIM, kind, **PARAMS[kind]).add(x, progress=False))
    raw, build_faiss = timed(lambda: raw_faiss(kind, x, PARAMS[kind]))

    same = ix.faiss_index
    ids_fastrank = ix.search(q, K, progress=False)[1]
    # Correctness before timing: fastrank's answers are FAISS's on the same index. (Not against the separately
    # built index: HNSW inserts in parallel, so two builds of the same data differ; at N = 200,000 only ~19%
    # of their top-100 ids agree.)
    assert (ids_fastrank == same.search(q, K)[1]).mean() > 0.999  # ids are positions: added without ids
    recall = float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(ids_fastrank, truth)]))
    if kind == "flat":
        assert recall > 0.999

    # The overhead compares fastrank's search with the raw FAISS call on the very same FAISS index: two
    # separately built indexes can differ by 10-20% on memory placement alone, which is not fastrank's
    # doing. The separately built one still gives the build time and an independent queries/s.
    rounds = int(np.clip(TIMED_S / timed(lambda: same.search(q, K))[1], MIN_ROUNDS, 50))
    t_fastrank, t_faiss, t_separate = [], [], []
    for r in range(rounds):
        # Back to back, alternating which goes first; the median of per-round ratios shrugs off a load spike.
        calls = [(t_faiss, lambda: same.search(q, K)), (t_fastrank, lambda: ix.search(q, K, progress=False))]
        for times, fn in calls if r % 2 else calls[::-1]:
            times.append(timed(fn)[1])
        if r < MIN_ROUNDS:
            t_separate.append(timed(lambda: raw.search(q, K))[1])
    ratio = float(np.median(np.array(t_fastrank) / np.array(t_faiss)))
    overhead = ratio - 1
    best_fastrank, best_faiss = min(t_fastrank), min(t_faiss)

    benchmark.pedantic(ix.search, args=(q, K), kwargs={"progress": False}, rounds=MIN_ROUNDS, iterations=1)
    benchmark.extra_info.update({
        "n": N, "dim": DIM, "queries": NQ, "k": K, "timed_rounds": rounds, "backend": ix.backend, "params": PARAMS[kind],
        "build_s_fastrank": build_fastrank, "build_s_faiss": build_faiss,
        "qps_fastrank": NQ / best_fastrank, "qps_faiss": NQ / best_faiss,
        "qps_faiss_separately_built": NQ / min(t_separate),
        "overhead_ratio": ratio, f"recall@{K}": recall,
        "device": torch.cuda.get_device_name() if CUDA else "cpu", "faiss_threads": faiss.omp_get_max_threads(),
    })
    print(f"\n{kind}: N={N} build fastrank {build_fastrank:.2f}s faiss {build_faiss:.2f}s | "
          f"{NQ / best_fastrank:,.0f} vs {NQ / best_faiss:,.0f} q/s (overhead {overhead:+.1%}) | "
          f"recall@{K} {recall:.3f}")
    assert overhead < MAX_OVERHEAD, f"fastrank adds {overhead:.1%} over raw FAISS"
