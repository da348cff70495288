"""Re-ranking first-stage candidates with an encoder: dense (one vector per text), MaxSim over token
embeddings with the fused ``fastrank.maxsim_packed``, or a trained LITE scorer (``fastrank.LiteScorer``)
over the same token embeddings.

The pipeline encodes the queries it is given and every passage their candidates name once (one forward pass
gives both the dense and the token embeddings), then scores each query's candidates; ``fastrank rerank``
runs it chunk by chunk over a run of any size (:mod:`fastrank.rerank_chunks`). Scoring is separate from encoding so the
fused MaxSim can be timed against the eager reference on identical inputs.

MaxSim keeps every passage's tokens once, back to back (:class:`PackedCandidates`): a query's candidates
are scored in place by index, so no padded copy of a candidate list is ever made (DL19's passages average
a third of the longest one's tokens). LITE's MLPs run over a fixed (lq, ld) grid of the similarity matrix,
so :func:`iter_padded_batches` pads for it, one query's candidates at a time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

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


def split_depth(candidates: Mapping[str, Mapping[str, float]], depth: int) -> tuple[Run, Run]:
    """Each query's top ``depth`` candidates by first-stage score (to re-rank) and the rest (kept as they
    are, below them: :func:`append_below`)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    head, tail = {}, {}
    for q, c in candidates.items():
        ranked = sorted(c.items(), key=lambda kv: -kv[1])
        head[q], tail[q] = dict(ranked[:depth]), dict(ranked[depth:])
    return head, tail


def append_below(run: Run, tail: Mapping[str, Mapping[str, float]]) -> Run:
    """``run`` with each query's ``tail`` candidates ranked after its re-ranked ones, in their first-stage
    order (as TREC re-ranking runs do): a re-ranker that only sees the top of a list must not drop the rest,
    which would lower recall and AP."""
    out: Run = {}
    for q in run.keys() | tail.keys():
        scored = dict(run.get(q, {}))
        rest = sorted(tail.get(q, {}).items(), key=lambda kv: -kv[1])
        floor = min(scored.values(), default=0.0)
        for i, (pid, _) in enumerate(rest):
            scored.setdefault(pid, floor - 1.0 - i)
        out[q] = scored
    return out


def rerank_dense(enc: EncodedSet, candidates: Mapping[str, Mapping[str, float]]) -> Run:
    """Score each candidate by the inner product of the query's and the passage's pooled embeddings."""
    run: Run = {}
    for qid, qi in enc.qrow.items():
        pids = list(candidates[qid])
        d = enc.passages.dense[[enc.prow[p] for p in pids]]
        s = d @ enc.queries.dense[qi]
        run[qid] = dict(zip(pids, s.tolist()))
    return run


TOKEN_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}


@dataclass
class PackedCandidates:
    """Every candidate passage's token embeddings once, back to back (passage ``i`` owns rows
    ``offsets[i]:offsets[i+1]`` of ``tokens``; int8 ``tokens`` come with per-token ``scales``), and per
    query ``(qid, pids, q (Lq, H), docs)``: its candidates' passage indices, scored in place."""

    tokens: torch.Tensor
    offsets: torch.Tensor
    scales: Optional[torch.Tensor]
    queries: list

    @property
    def num_docs(self) -> int:
        return sum(len(docs) for _, _, _, docs in self.queries)


def pack_candidates(enc: EncodedSet, candidates: Mapping[str, Mapping[str, float]],
                    device: torch.device | str = "cpu", token_dtype: str | torch.dtype = torch.float32) -> PackedCandidates:
    """The encoded passages as one packed tensor in ``token_dtype`` (float32, float16, bfloat16 or int8,
    quantized per token) and each query's candidate indices; queries are cast to the float dtype the
    tokens are scored in (float32 for int8)."""
    from fastrank.ops.maxsim_packed import quantize_tokens

    dtype = TOKEN_DTYPES.get(token_dtype, token_dtype) if isinstance(token_dtype, str) else token_dtype
    if dtype not in TOKEN_DTYPES.values():
        raise ValueError(f"token_dtype must be one of {', '.join(TOKEN_DTYPES)}, got {token_dtype!r}")
    vectors = enc.passages.tokens.vectors
    scales = None
    if dtype == torch.int8:
        tokens, scales = quantize_tokens(vectors)
        tokens, scales = tokens.to(device), scales.to(device)
        qdtype = torch.float32
    else:
        tokens = vectors.to(device=device, dtype=dtype)
        qdtype = dtype
    offsets = enc.passages.tokens.offsets.to(device)
    qt = enc.queries.tokens
    queries = []
    for qid, qi in enc.qrow.items():
        pids = list(candidates[qid])
        q = qt.vectors[qt.offsets[qi]:qt.offsets[qi + 1]].to(device=device, dtype=qdtype)
        docs = torch.tensor([enc.prow[p] for p in pids], dtype=torch.int64, device=device)
        queries.append((qid, pids, q, docs))
    return PackedCandidates(tokens, offsets, scales, queries)


def rerank_maxsim(packed: PackedCandidates, *, backend: str | None = None) -> Run:
    """Score each candidate by MaxSim of the query's and the passage's token embeddings (no padding)."""
    from fastrank.ops.maxsim_packed import maxsim_packed

    run: Run = {}
    with torch.no_grad():
        for qid, pids, q, docs in packed.queries:
            s = maxsim_packed(q, packed.tokens, packed.offsets, scales=packed.scales, docs=docs, backend=backend)
            run[qid] = dict(zip(pids, s.float().tolist()))
    return run


def iter_padded_batches(enc: EncodedSet, candidates: Mapping[str, Mapping[str, float]],
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Per query, padded, made as it is asked for: ``(qid, pids, q (Lq, H), d (n, Ld, H), d_mask (n, Ld))``
    for ``maxsim`` and the LITE scorer (whose MLPs need the fixed grid). One query's padded candidates exist
    at a time, where a list of them all would hold every candidate list padded at once."""
    for qid, qi in enc.qrow.items():
        pids = list(candidates[qid])
        q, _ = enc.queries.tokens.padded([qi], dtype=dtype, device=device)
        d, d_mask = enc.passages.tokens.padded([enc.prow[p] for p in pids], dtype=dtype, device=device)
        yield qid, pids, q[0], d, d_mask


def maxsim_batches(enc: EncodedSet, candidates: Mapping[str, Mapping[str, float]],
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """:func:`iter_padded_batches` as a list, to score the same batches again and again (the benchmarks)."""
    return list(iter_padded_batches(enc, candidates, device=device, dtype=dtype))


def rerank_maxsim_padded(batches, scorer: Callable | None = None) -> Run:
    """MaxSim over padded batches (:func:`maxsim_batches`) with ``scorer(q, d, q_mask, d_mask)``
    (default ``fastrank.maxsim``): the padded path, kept to compare against."""
    if scorer is None:
        from fastrank.ops.maxsim import maxsim as scorer
    with torch.no_grad():
        return {qid: dict(zip(pids, scorer(q, d, None, d_mask).float().tolist())) for qid, pids, q, d, d_mask in batches}


def rerank_lite(batches, scorer, *, backend: str | None = None) -> Run:
    """Score each candidate with a LITE scorer; queries and passages longer than its (lq, ld) grid keep
    their first lq / ld tokens, as LITE was trained on. ``backend`` forces one (see :mod:`fastrank.dispatch`)."""
    lq, ld = scorer.lq, scorer.ld
    run: Run = {}
    with torch.no_grad():
        for qid, pids, q, d, d_mask in batches:
            scores = scorer(q[:lq].to(d.dtype), d[:, :ld], None, d_mask[:, :ld], backend=backend)
            run[qid] = dict(zip(pids, scores.float().tolist()))
    return run


def docs_per_second(fns: Mapping[str, Callable[[], object]], n_docs: int, *, rounds: int = 5,
                    cuda: bool = False) -> dict[str, float]:
    """Candidates scored per second by each of ``fns`` (each scores all ``n_docs`` candidates once), timed
    in interleaved rounds after a warm-up so a drifting machine slows them alike; the median round each."""
    import statistics

    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        names = list(fns)
        for name in names[r % len(names):] + names[:r % len(names)]:
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                fns[name]()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {name: n_docs / statistics.median(v) for name, v in times.items()}
