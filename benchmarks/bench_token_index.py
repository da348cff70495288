"""Scale benchmark for TokenIndex: build time, queries/s and recall of the centroid stage against exhaustive
MaxSim, on synthetic token vectors (pytest) or on BEIR SciFact encoded with the packaged MiniLM (a script).

pytest (``pytest benchmarks/bench_token_index.py``): clustered synthetic documents (each draws its tokens
around three of 128 topic centres, 40-160 tokens, dim 128) and queries made from a document's tokens plus
as much noise again, so that many documents nearly tie (recall@10 ~0.95 at the defaults, where SciFact
gives 0.98). The default (4,000 documents, ~400k tokens, 100 queries) keeps the file under ~3 minutes on a 2-core
CPU; ``FASTRANK_BENCH_TOKENS_N`` sets the number of documents. Correctness first: the centroid search with
every centroid probed must equal the exhaustive one; then build time, queries/s of the default centroid
search and of exhaustive search, and recall@10 against exhaustive go to ``benchmark.extra_info``.

SciFact (``python benchmarks/bench_token_index.py scifact``): encodes the corpus (max 200 tokens, as
``fastrank index --tokens``) and the test queries once, caching the token embeddings in ``--cache-dir``
(default /tmp: scifact_tokens.pt, scifact_queries.pt; encoding takes minutes on 2 cores), then for each
``--token-dtype``: build time (encoding excluded), storage bytes, exhaustive MaxSim (q/s, nDCG@10), and the
centroid search (q/s, recall@10 of the exhaustive top-10, nDCG@10). ``--sweep`` adds a table of stage-1
settings (nprobe x ndocs) scored against the exhaustive ranking. ``--json FILE`` saves the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastrank.encoders import TokenEmbeddings
from fastrank.index import TokenIndex

DIM, N_TOPICS, K = 128, 128, 10
N = int(os.environ.get("FASTRANK_BENCH_TOKENS_N", "4000"))
NQ = 100


def synthetic(n_docs: int, n_queries: int, seed: int = 0):
    """Documents whose tokens cluster around 3 of ``N_TOPICS`` topic centres; each query is 16-32 noisy
    tokens of one document, so every query has a source document and many partial matches."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(N_TOPICS, DIM, generator=g), dim=1)
    lengths = torch.randint(40, 161, (n_docs,), generator=g)
    offsets = torch.zeros(n_docs + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    doc_topics = torch.randint(0, N_TOPICS, (n_docs, 3), generator=g)
    doc = torch.repeat_interleave(torch.arange(n_docs), lengths)
    topic = doc_topics[doc, torch.randint(0, 3, (doc.numel(),), generator=g)]
    # Noise of norm ~1 around a unit centre: tokens of one topic share a direction (cosine ~0.7) without
    # collapsing onto it, so centroids are informative but a token's nearest centroid is not its topic's.
    noise = torch.randn(doc.numel(), DIM, generator=g) / DIM ** 0.5
    vectors = torch.nn.functional.normalize(centres[topic] + noise, dim=1)
    q_len = torch.randint(16, 33, (n_queries,), generator=g)
    q_off = torch.zeros(n_queries + 1, dtype=torch.int64)
    q_off[1:] = q_len.cumsum(0)
    src = torch.randint(0, n_docs, (n_queries,), generator=g)
    rows = torch.cat([offsets[d] + torch.randint(0, int(lengths[d]), (int(n),), generator=g)
                      for d, n in zip(src, q_len)])
    noise = torch.randn(rows.numel(), DIM, generator=g) / DIM ** 0.5
    q_vec = torch.nn.functional.normalize(vectors[rows] + noise, dim=1)
    return TokenEmbeddings(vectors, offsets), TokenEmbeddings(q_vec, q_off)


def recall_at(ids, truth, k: int = K) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, truth)]))


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def maxsim_backend(index: TokenIndex, q: torch.Tensor) -> str:
    """What ``maxsim_packed`` dispatches to for this index's storage (the exact stage's speed hangs on it)."""
    from fastrank import dispatch

    tokens = index._tokens[:64]
    offsets = torch.tensor([0, tokens.shape[0]])
    scales = index._scales[:64] if index._scales is not None else None
    qq = q if scales is not None else q.to(tokens.dtype)
    explanation = dispatch.explain("maxsim_packed", [qq, tokens, offsets, None, scales])
    return str(explanation).splitlines()[0]


# -- pytest ------------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # the SciFact script runs without pytest
    pytest = None

if pytest is not None:
    from conftest import record, time_provider

    @pytest.fixture(scope="module")
    def data():
        return synthetic(N, NQ)

    @pytest.mark.parametrize("token_dtype", ["float16", "int8"])
    def test_token_index_search(benchmark, data, token_dtype):
        docs, queries = data
        benchmark.group = f"TokenIndex N={N} T={docs.vectors.shape[0]} dim={DIM} k={K}"
        index = TokenIndex(DIM, token_dtype=token_dtype).add(docs, progress=False)
        _, build_s = timed(index.build, progress=False)
        # Correctness before timing: probing every centroid and keeping every candidate is exhaustive search.
        sub = TokenEmbeddings(queries.vectors[:int(queries.offsets[5])], queries.offsets[:6])
        s_all, _ = index.search(sub, K, nprobe=index.ncentroids, ndocs=len(index), progress=False)
        s_exh, _ = index.search(sub, K, exhaustive=True, progress=False)
        np.testing.assert_allclose(s_all, s_exh, rtol=1e-5, atol=1e-5)

        (_, truth), exh_s = timed(index.search, queries, K, exhaustive=True, progress=False)
        (_, ids), search_s = timed(index.search, queries, K, progress=False)
        recall = recall_at(ids, truth)
        benchmark.pedantic(index.search, args=(queries, K), kwargs={"progress": False}, rounds=3, iterations=1)
        benchmark.extra_info.update({
            "n_docs": N, "n_tokens": index.num_tokens, "dim": DIM, "queries": NQ, "k": K,
            "token_dtype": token_dtype, "ncentroids": index.ncentroids, "nprobe": index.nprobe,
            "ndocs": index.ndocs_for(K), "build_s": build_s, "qps": NQ / search_s, "qps_exhaustive": NQ / exh_s,
            f"recall@{K}": recall, "storage_bytes": index.storage_bytes(),
            "maxsim_backend": maxsim_backend(index, queries.vectors[:4]), "threads": torch.get_num_threads(),
        })
        print(f"\n{token_dtype}: N={N} T={index.num_tokens} build {build_s:.1f}s | {NQ / search_s:.1f} q/s "
              f"(exhaustive {NQ / exh_s:.2f} q/s) | recall@{K} {recall:.3f}")
        assert recall >= 0.9


    def candidate_lists(n_docs: int, ncentroids: int, per_list: int, n_queries: int, q_len: int = 32,
                        nprobe: int = 8, seed: int = 0):
        """Stage-1 inputs shaped like an index's: ascending lists of ``per_list`` documents on average over
        ``n_docs`` documents, and each query token's ``nprobe`` probes with best-first gains. The lists of the
        100M-token scale benchmark are 1.33M documents, 32,768 lists of about 2,300."""
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(per_list // 2, per_list * 3 // 2 + 1, (ncentroids,), generator=g)
        ivf_offsets = torch.zeros(ncentroids + 1, dtype=torch.int64)
        ivf_offsets[1:] = lengths.cumsum(0)
        starts = torch.randint(0, n_docs, (int(ivf_offsets[-1]),), generator=g)
        lists = torch.split(starts, lengths.tolist())
        ivf_docs = torch.cat([x.unique() for x in lists]).to(torch.int32)
        ivf_offsets[1:] = torch.tensor([x.unique().numel() for x in lists]).cumsum(0)
        probe_c = torch.randint(0, ncentroids, (n_queries * q_len, nprobe), generator=g)
        gain = torch.rand(n_queries * q_len, nprobe, generator=g).sort(1, descending=True).values.contiguous()
        q_offsets = torch.arange(0, n_queries * q_len + 1, q_len)
        return probe_c, gain, q_offsets, ivf_offsets, ivf_docs

    CANDIDATE_SIZES = {"1M tokens": (13_392, 4096, 180, 64), "100M tokens": (1_333_260, 32_768, 2_300, 8)}

    @pytest.fixture(scope="module", params=list(CANDIDATE_SIZES))
    def candidates_case(request):
        n_docs, c, per, nq = CANDIDATE_SIZES[request.param]
        return request.param, n_docs, nq, candidate_lists(n_docs, c, per, nq)

    @pytest.mark.parametrize("provider", ["eager", "cpp"])  # eager first: record() takes ratios against it
    def test_centroid_candidates(benchmark, session_timings, candidates_case, provider):
        """Stage 1 alone, the C++ kernel against the eager reference, at the list sizes of the scale
        benchmark's smallest and largest index (4,096 lists of ~180 of 13k documents; 32,768 of ~2,300 of
        1.33M)."""
        from fastrank.ops.centroid_candidates import centroid_candidates

        size, n_docs, nq, prob = candidates_case
        backend = {"eager": "reference", "cpp": "cpp"}[provider]
        got = centroid_candidates(*prob, n=n_docs, ndocs=128, backend=backend)
        want = centroid_candidates_ref_cached(size, n_docs, prob)
        assert all(torch.equal(a.nan_to_num(-1), b.nan_to_num(-1)) for a, b in zip(got, want))
        group = f"centroid_candidates {size} ({nq} queries x 32 tokens x nprobe 8)"
        benchmark.group = group
        _, median = time_provider(benchmark, lambda: centroid_candidates(*prob, n=n_docs, ndocs=128, backend=backend),
                                  "cpu", max_rounds=10)
        if median is not None:
            entries = int((prob[3][prob[0] + 1] - prob[3][prob[0]]).sum())
            record(benchmark, session_timings, group, provider,
                   {"entries_per_query": entries / nq, "queries_per_s": nq / median,
                    "ns_per_entry": median / entries * 1e9, "threads": torch.get_num_threads()})

    _REF_CACHE: dict = {}

    def centroid_candidates_ref_cached(size, n_docs, prob):
        from fastrank.ops.centroid_candidates import centroid_candidates_ref

        if size not in _REF_CACHE:
            _REF_CACHE[size] = centroid_candidates_ref(*prob, n_docs, 128)
        return _REF_CACHE[size]


# -- SciFact -----------------------------------------------------------------------------------------
def scifact_embeddings(data: Path, cache: Path, model: str | None = None):
    """(corpus ids, corpus TokenEmbeddings, query ids, query TokenEmbeddings, qrels), encoded once and cached."""
    from fastrank.data import load_beir

    s = load_beir(data)
    doc_file, q_file = cache / "scifact_tokens.pt", cache / "scifact_queries.pt"
    enc = None
    if not doc_file.is_file() or not q_file.is_file():
        from fastrank.encoders import Encoder

        enc = Encoder(model, device="cpu")
    if not q_file.is_file():
        q = enc.encode_queries(list(s.queries.values()), progress="queries")
        torch.save({"ids": list(s.queries), "vectors": q.vectors, "offsets": q.offsets, "model": str(enc.path)}, q_file)
    if not doc_file.is_file():
        (d, encode_s) = timed(lambda: enc.encode_docs(list(s.corpus.values()), progress="corpus"))
        torch.save({"ids": list(s.corpus), "vectors": d.vectors, "offsets": d.offsets, "model": str(enc.path),
                    "max_length": 200, "encode_s": encode_s}, doc_file)
    d, q = torch.load(doc_file), torch.load(q_file)
    if d["ids"] != list(s.corpus) or q["ids"] != list(s.queries):
        raise SystemExit(f"{cache}: cached embeddings are of another corpus or query set; delete them to re-encode")
    return (d["ids"], TokenEmbeddings(d["vectors"], d["offsets"]), q["ids"],
            TokenEmbeddings(q["vectors"], q["offsets"]), s.qrels)


def _run(qids, scores, ids):
    return {qid: {str(d): float(v) for d, v in zip(row_i, row_s) if v != -np.inf}
            for qid, row_i, row_s in zip(qids, ids, scores)}


def scifact(args) -> dict:
    from fastrank.bench.machine import machine_info

    doc_ids, docs, qids, queries, qrels = scifact_embeddings(Path(args.data), Path(args.cache_dir), args.model)
    print(f"SciFact: {len(docs)} documents, {docs.vectors.shape[0]} tokens, {len(queries)} test queries "
          f"(mean {queries.lengths.float().mean():.1f} tokens); {torch.get_num_threads()} threads")
    out = {"documents": len(docs), "tokens": int(docs.vectors.shape[0]), "queries": len(queries),
           "machine": machine_info("cpu"), "command": " ".join(sys.argv), "results": {}}
    for token_dtype in args.token_dtype:
        out["results"][token_dtype] = scifact_one(args, token_dtype, doc_ids, docs, qids, queries, qrels)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def scifact_one(args, token_dtype, doc_ids, docs, qids, queries, qrels) -> dict:
    """Build, save/load, exhaustive and centroid search for one storage dtype."""
    from fastrank.evaluate import evaluate

    def ndcg(scores, ids):
        return evaluate(qrels, _run(qids, scores, ids), ["nDCG@10"])["nDCG@10"]

    nq = len(queries)
    params = {name: getattr(args, name) for name in ("nprobe", "ndocs") if getattr(args, name) is not None}
    index = TokenIndex(docs.vectors.shape[1], token_dtype=token_dtype, ncentroids=args.ncentroids, seed=args.seed,
                       **params)
    _, add_s = timed(index.add, docs, doc_ids)
    _, build_s = timed(index.build)
    backend = maxsim_backend(index, queries.vectors[:4])
    print(f"\n[{token_dtype}] {index}: add (storage conversion) {add_s:.1f} s, build {build_s:.1f} s; "
          f"bytes {index.storage_bytes()}\n  maxsim_packed: {backend}")
    (exh_s, exh_i), exh_t = timed(index.search, queries, K, exhaustive=True)
    index.search(TokenEmbeddings(queries.vectors[:int(queries.offsets[8])], queries.offsets[:9]), K,
                 progress=False)  # warm-up
    (s, i), t = timed(index.search, queries, K)
    # Stage 1 alone (candidate generation and ranking), to tell its cost from the exact scoring's.
    qv = queries.vectors.float()
    t1 = time.perf_counter()
    for b0 in range(0, nq, 64):
        o = queries.offsets[b0:min(b0 + 64, nq) + 1]
        index._candidates(qv[o[0]:o[-1]], o - o[0], index.nprobe, index.ndocs_for(K))
    stage1_t = time.perf_counter() - t1
    # Save and load (checksums of every file included); the loaded index must answer identically.
    tmp = Path(tempfile.mkdtemp(dir=args.cache_dir, prefix="scifact_token_index_"))
    try:
        _, save_t = timed(index.save, tmp / "ix", progress=False)
        loaded, load_t = timed(TokenIndex.load, tmp / "ix")
        disk = sum(f.stat().st_size for f in (tmp / "ix").iterdir())
        assert np.array_equal(loaded.search(queries, K, progress=False)[1], i), "the loaded index answers differently"
    finally:
        shutil.rmtree(tmp)
    r = {"ncentroids": index.ncentroids, "nprobe": index.nprobe, "ndocs": index.ndocs_for(K), "add_s": add_s,
         "build_s": build_s, "save_s": save_t, "load_s": load_t, "disk_bytes": disk,
         "storage_bytes": index.storage_bytes(), "maxsim_backend": backend,
         "exhaustive_qps": nq / exh_t, "exhaustive_ndcg@10": ndcg(exh_s, exh_i),
         "qps": nq / t, "stage1_qps": nq / stage1_t, "recall@10": recall_at(i, exh_i), "ndcg@10": ndcg(s, i)}
    print(f"  save {save_t:.1f} s, load (checksums verified) {load_t:.1f} s, {disk / 2 ** 20:.0f} MiB on disk\n"
          f"  exhaustive: {r['exhaustive_qps']:.2f} q/s, nDCG@10 {r['exhaustive_ndcg@10']:.4f}\n"
          f"  centroids (nprobe {index.nprobe}, ndocs {index.ndocs_for(K)}): {r['qps']:.1f} q/s (stage 1 alone "
          f"{r['stage1_qps']:.0f} q/s), recall@10 {r['recall@10']:.4f}, nDCG@10 {r['ndcg@10']:.4f}")
    if args.sweep:
        r["sweep"] = []
        for nprobe in (1, 2, 4, 8):
            for ndocs in (64, 128, 192, 256, 512):
                (s, i), t = timed(index.search, queries, K, nprobe=nprobe, ndocs=ndocs, progress=False)
                row = {"nprobe": nprobe, "ndocs": ndocs, "qps": nq / t, "recall@10": recall_at(i, exh_i),
                       "ndcg@10": ndcg(s, i)}
                r["sweep"].append(row)
                print(f"    nprobe {nprobe:2d} ndocs {ndocs:4d}: {row['qps']:7.1f} q/s  recall@10 "
                      f"{row['recall@10']:.4f}  nDCG@10 {row['ndcg@10']:.4f}", flush=True)
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="TokenIndex on BEIR SciFact: build time, q/s, recall and nDCG@10 "
                                            "of the centroid stage against exhaustive MaxSim.")
    p.add_argument("what", choices=["scifact"])
    p.add_argument("--data", default="/work/shared/data/beir-scifact", help="BEIR SciFact folder")
    p.add_argument("--cache-dir", default="/tmp", help="where the encoded tokens are cached")
    p.add_argument("--model", help="encoder (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--token-dtype", nargs="+", default=["float16", "int8"], choices=["float16", "bfloat16", "int8"])
    p.add_argument("--ncentroids", type=int)
    p.add_argument("--nprobe", type=int)
    p.add_argument("--ndocs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="also sweep nprobe x ndocs")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    scifact(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
