"""Re-ranking first-stage candidates with an encoder: dense (one vector per text), MaxSim over token
embeddings with the fused ``fastrank.maxsim``, or a trained LITE scorer (``fastrank.LiteScorer``) over the
same token embeddings.

The pipeline encodes every query and every candidate passage once (one forward pass gives both the dense
and the token embeddings), then scores each query's candidates. Scoring is separate from encoding so the
fused MaxSim can be timed against the eager reference on identical inputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from fastrank.encoders import DOC_MAX_LENGTH, QUERY_MAX_LENGTH, Encoder, Encoded

SCORERS = ("dense", "maxsim", "lite")

Run = dict[str, dict[str, float]]


@dataclass
class EncodedSet:
    """Queries and passages encoded once; ``qrow`` / ``prow`` map ids to rows."""

    queries: Encoded
    passages: Encoded
    qrow: dict[str, int]
    prow: dict[str, int]


def encode_for_rerank(encoder: Encoder, queries: Mapping[str, str], passages: Mapping[str, str],
                      candidates: Mapping[str, Mapping[str, float]], *, dense: bool = True, tokens: bool = True,
                      progress: bool = True) -> EncodedSet:
    """Encode the queries that have candidates and every passage a candidate list names."""
    qids = [q for q in queries if candidates.get(q)]
    if not qids:
        raise ValueError("candidates: no query has candidates (query ids do not match the run's?)")
    pids = sorted({p for q in qids for p in candidates[q]})
    missing = [p for p in pids if p not in passages]
    if missing:
        raise ValueError(f"corpus: {len(missing)} candidate documents have no text, e.g. {missing[:3]}")
    q = encoder.encode([queries[i] for i in qids], dense=dense, tokens=tokens, max_length=QUERY_MAX_LENGTH,
                       progress="queries" if progress else False)
    p = encoder.encode([passages[i] for i in pids], dense=dense, tokens=tokens, max_length=DOC_MAX_LENGTH,
                       progress="passages" if progress else False)
    return EncodedSet(q, p, {x: i for i, x in enumerate(qids)}, {x: i for i, x in enumerate(pids)})


def rerank_dense(enc: EncodedSet, candidates: Mapping[str, Mapping[str, float]]) -> Run:
    """Score each candidate by the inner product of the query's and the passage's pooled embeddings."""
    run: Run = {}
    for qid, qi in enc.qrow.items():
        pids = list(candidates[qid])
        d = enc.passages.dense[[enc.prow[p] for p in pids]]
        s = d @ enc.queries.dense[qi]
        run[qid] = dict(zip(pids, s.tolist()))
    return run


def maxsim_batches(enc: EncodedSet, candidates: Mapping[str, Mapping[str, float]],
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Per query: ``(qid, pids, q (Lq, H), d (n, Ld, H), d_mask (n, Ld))`` ready for ``maxsim``."""
    batches = []
    for qid, qi in enc.qrow.items():
        pids = list(candidates[qid])
        q, _ = enc.queries.tokens.padded([qi], dtype=dtype, device=device)
        d, d_mask = enc.passages.tokens.padded([enc.prow[p] for p in pids], dtype=dtype, device=device)
        batches.append((qid, pids, q[0], d, d_mask))
    return batches


def rerank_maxsim(batches, scorer: Callable | None = None) -> Run:
    """Score each candidate by MaxSim of the query's and the passage's token embeddings."""
    if scorer is None:
        from fastrank import maxsim as scorer
    return {qid: dict(zip(pids, scorer(q, d, None, d_mask).float().tolist())) for qid, pids, q, d, d_mask in batches}


def rerank_lite(batches, scorer) -> Run:
    """Score each candidate with a LITE scorer; queries and passages longer than its (lq, ld) grid keep
    their first lq / ld tokens, as LITE was trained on."""
    lq, ld = scorer.lq, scorer.ld
    run: Run = {}
    with torch.no_grad():
        for qid, pids, q, d, d_mask in batches:
            scores = scorer(q[:lq].to(d.dtype), d[:, :ld], None, d_mask[:, :ld])
            run[qid] = dict(zip(pids, scores.float().tolist()))
    return run


def docs_per_second(batches, scorer: Callable, *, repeats: int = 3) -> float:
    """Candidates scored per second by ``scorer`` over all batches (best of ``repeats`` after a warm-up)."""
    n = sum(d.shape[0] for _, _, _, d, _ in batches)
    cuda = any(d.is_cuda for _, _, _, d, _ in batches)
    for _, _, q, d, m in batches[:1]:
        scorer(q, d, None, m)
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _, _, q, d, m in batches:
            scorer(q, d, None, m)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return n / best
