"""``fastrank demo``: re-rank TREC DL BM25 candidates with a dense and a MaxSim scorer and report quality
against BM25 and the fused MaxSim's speed against the eager reference.

By default it runs on the TREC DL 2019 BM25 top-100 set embedded in fastrank (43 judged queries, 4,297
passages) with the packaged all-MiniLM-L6-v2; ``--data`` points it at another folder of the same layout.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastrank.data import EMBEDDED_DL19, load_trec_dl
from fastrank.encoders import Encoder
from fastrank.evaluate import evaluate, format_table
from fastrank.rerank import (docs_per_second, encode_for_rerank, maxsim_batches, pack_candidates, rerank_dense,
                             rerank_maxsim)

DEMO_MEASURES = ("nDCG@10", "RR(rel=2)@10")


def run_demo(data: str | Path | None = None, model: str | Path | None = None, *, device: str | None = None,
             batch_size: int = 64, max_queries: int | None = None, speed: bool = True, progress: bool = True,
             measures=DEMO_MEASURES) -> dict:
    """Returns ``{"data", "queries", "passages", "metrics": {system: {measure: value}}, "speed": {...}}``."""
    rset = load_trec_dl(data)
    if max_queries is not None:
        if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
            raise ValueError(f"max_queries must be a positive integer, got {max_queries!r}")
        keep = list(rset.queries)[:max_queries]
        rset.queries = {q: rset.queries[q] for q in keep}
        rset.candidates = {q: rset.candidates[q] for q in keep}
        # evaluate counts a judged query missing from a run as 0: the qrels must shrink with the queries
        rset.qrels = {q: rset.qrels[q] for q in keep}
    encoder = Encoder(model, device=device, batch_size=batch_size)
    enc = encode_for_rerank(encoder, rset.queries, rset.passages, rset.candidates, progress=progress)
    compute = torch.float16 if encoder.device.type == "cuda" else torch.float32
    packed = pack_candidates(enc, rset.candidates, device=encoder.device, token_dtype=compute)
    runs = {"BM25": rset.candidates, "dense": rerank_dense(enc, rset.candidates),
            "MaxSim": rerank_maxsim(packed)}
    out = {"data": str(data or EMBEDDED_DL19), "model": str(encoder.path), "device": str(encoder.device),
           "queries": len(enc.qrow), "passages": len(enc.prow),
           "metrics": {name: evaluate(rset.qrels, run, measures) for name, run in runs.items()}}
    if speed:
        # fused: the packed kernel on each query's candidates in place; eager: the PyTorch a user would
        # write (matmul, mask, max, sum) on padded batches built beforehand (their padding is not timed).
        from fastrank.ops.maxsim import maxsim_ref
        from fastrank.ops.maxsim_packed import maxsim_packed

        batches = maxsim_batches(enc, rset.candidates, device=encoder.device, dtype=compute)

        def fused():
            for _, _, q, docs in packed.queries:
                maxsim_packed(q, packed.tokens, packed.offsets, docs=docs)

        def eager():
            for _, _, q, d, m in batches:
                maxsim_ref(q, d, None, m)

        rate = docs_per_second({"fused": fused, "eager": eager}, packed.num_docs, cuda=encoder.device.type == "cuda")
        out["speed"] = {"fused_docs_per_s": rate["fused"], "eager_docs_per_s": rate["eager"],
                        "speedup": rate["fused"] / rate["eager"]}
    return out


def format_demo(result: dict) -> str:
    lines = [f"{result['queries']} queries, {result['passages']} candidate passages from {result['data']}",
             f"model {result['model']} on {result['device']}", "", format_table(result["metrics"])]
    if "speed" in result:
        s = result["speed"]
        lines += ["", f"MaxSim re-rank: fused {s['fused_docs_per_s']:,.0f} docs/s, eager {s['eager_docs_per_s']:,.0f} "
                      f"docs/s ({s['speedup']:.2f}x)"]
    return "\n".join(lines)
