"""``fastrank bench rerank``: every re-ranker fastrank has, quality and speed, on one TREC DL set in one run.

By default the DL 2019 BM25 top-100 set embedded in fastrank (43 judged queries, 4,297 passages). One row
per scorer:

- ``BM25``: the input run, as it is;
- ``dense``: pooled embeddings of the bi-encoder (``--model``, default the packaged all-MiniLM-L6-v2);
- ``MaxSim``: fused packed MaxSim over the same encoder's token states;
- ``LITE``: a ``fastrank train`` directory (``--lite-model``): its LiteScorer over its own encoder's tokens;
- ``cross-encoder``: a local sequence-classification checkpoint (``--cross``). Without one, a cross-encoder
  of the bi-encoder's architecture (its weights, a fresh one-logit head) is timed, since its speed is the
  architecture's, and no quality figure is given for it: untrained scores measure nothing;
- ``MaxSim (eager)``, ``LITE (eager)`` (unless ``eager=False``): the same scoring calls on the same inputs
  through the eager PyTorch reference (``backend="reference"``), each with its own quality figures; in a
  16-bit ``dtype`` also ``... (eager, float32)``, the faster eager form on most CPUs. ``speedup_vs_eager`` is
  a row's scoring rate over the faster of its scorer's eager rows, timed in the same rounds.

MaxSim and LITE score in ``dtype`` (default float32 on CPU, float16 on CUDA): the packed token embeddings,
and LITE's weights and inputs (its kernels accumulate in float32).

Quality is nDCG@10 and RR(rel=2)@10 from :func:`fastrank.evaluate.evaluate`. Speed is candidates per
second of the scoring stage (the encoded queries and passages given; for the cross-encoder, which has no
separate encoding, the whole pipeline) and end to end (the queries and candidate passages encoded too, as
a re-ranking service pays per query). Every timing is taken in the same interleaved rounds
(:func:`fastrank.rerank.docs_per_second`), so a shared machine's drift slows every row alike.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from fastrank.rerank import TOKEN_DTYPES

NO_CROSS_WEIGHTS = "n/a (no trained cross-encoder weights)"
SCORING, END_TO_END = "scoring_docs_per_s", "end_to_end_docs_per_s"
SPEEDUP = "speedup_vs_eager"
# The float ones of the packed tokens' dtypes: LITE has no int8 form, and MaxSim's int8 is a token format.
SCORE_DTYPES = {name: TOKEN_DTYPES[name] for name in ("float32", "bfloat16", "float16")}
EAGER, EAGER_FLOAT32 = " (eager)", " (eager, float32)"


def _is_eager(name: str) -> bool:
    return name.endswith((EAGER, EAGER_FLOAT32))


def score_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype MaxSim and LITE score in: ``dtype`` checked, or the device's default (float16 on CUDA,
    float32 elsewhere)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    found = SCORE_DTYPES.get(dtype) if isinstance(dtype, str) else (dtype if dtype in SCORE_DTYPES.values() else None)
    if found is None:
        raise ValueError(f"dtype must be one of {', '.join(SCORE_DTYPES)}, got {dtype!r}")
    return found


def _recording(runs: dict, name: str, fn: Callable[[], dict]) -> Callable[[], dict]:
    """``fn`` that also keeps its run under ``name``: the quality figures come from the very calls that are
    timed, so no extra pass is spent (and none can differ from what was timed)."""
    def call():
        runs[name] = fn()
        return runs[name]
    return call


def run_bench(data: str | Path | None = None, model: str | Path | None = None, *, cross: str | Path | None = None,
              lite_model: str | Path | None = None, device: str | None = None, batch_size: int = 64,
              max_queries: Optional[int] = None, rounds: int = 3, dtype: str | torch.dtype | None = None,
              eager: bool = True, progress: bool = True) -> dict:
    """Returns ``{"data", "model", "cross", "lite_model", "device", "dtype", "queries", "passages",
    "candidates", "rounds", "machine", "rows": [{scorer, nDCG@10, RR(rel=2)@10, scoring_docs_per_s,
    end_to_end_docs_per_s, speedup_vs_eager, machine, note}], "runs": {scorer: run}}`` (``runs``: the scored
    runs, not saved)."""
    from fastrank.bench import machine
    from fastrank.bench.machine import device_name
    from fastrank.data import EMBEDDED_DL19, load_trec_dl
    from fastrank.demo import DEMO_MEASURES
    from fastrank.encoders import CrossEncoder, Encoder
    from fastrank.evaluate import evaluate
    from fastrank.rerank import (docs_per_second, encode_for_rerank, maxsim_batches, pack_candidates, rerank_dense,
                                 rerank_lite, rerank_maxsim)

    if max_queries is not None and (isinstance(max_queries, bool) or max_queries < 1):
        raise ValueError(f"max_queries must be a positive integer, got {max_queries!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    if lite_model is not None and not Path(lite_model).is_dir():
        raise FileNotFoundError(f"lite_model: no such directory: {lite_model}")
    score_dtype(dtype, torch.device("cpu"))  # a bad dtype fails before the data is read
    rset = load_trec_dl(data)
    qids = list(rset.queries)[:max_queries]
    # qrels trimmed with the queries: evaluate counts a judged query missing from a run as 0.
    queries, qrels = {q: rset.queries[q] for q in qids}, {q: rset.qrels[q] for q in qids}
    cands, passages = {q: rset.candidates[q] for q in qids}, rset.passages

    # Every model loads before the first encoding pass, so a bad directory fails in seconds.
    encoder = Encoder(model, device=device, batch_size=batch_size)
    dev = encoder.device
    compute = score_dtype(dtype, dev)
    lite = lite_encoder = None
    if lite_model is not None:
        from fastrank.trained import load_trained

        trained = load_trained(lite_model)
        if trained.lite is None:
            raise ValueError(f"lite_model: {lite_model} holds a trained {trained.scorer} model, not a LITE one")
        lite_encoder = trained.encoder(device=dev, batch_size=batch_size)
        lite_as_loaded = trained.lite.to(lite_encoder.device).eval()
        lite = copy.deepcopy(lite_as_loaded).to(dtype=compute)  # Module.to casts in place: the copy is cast
    if cross is not None:
        cross_encoder = CrossEncoder(cross, device=dev, batch_size=batch_size)
    else:
        cross_encoder = CrossEncoder.untrained(model, device=dev, batch_size=batch_size)

    enc = encode_for_rerank(encoder, queries, passages, cands, progress=progress)
    packed = pack_candidates(enc, cands, device=dev, token_dtype=compute)

    def encoded(e, dense):
        return encode_for_rerank(e, queries, passages, cands, dense=dense, tokens=not dense, progress=False)

    runs: dict = {"BM25": cands}
    fns = {
        "dense": (_recording(runs, "dense", lambda: rerank_dense(enc, cands)),
                  lambda: rerank_dense(encoded(encoder, True), cands)),
        "MaxSim": (_recording(runs, "MaxSim", lambda: rerank_maxsim(packed)),
                   lambda: rerank_maxsim(pack_candidates(encoded(encoder, False), cands, device=dev, token_dtype=compute))),
    }
    # Each fused scorer's eager reference, scoring only (the encoding stages are the fused row's own). In a
    # 16-bit dtype also in float32: eager 16-bit matmuls are the slow form on most CPUs, and "vs eager" is
    # over the faster of the two.
    eager_forms = ([(EAGER, compute)] + ([(EAGER_FLOAT32, torch.float32)] if compute != torch.float32 else [])
                   if eager else [])
    for suffix, dt in eager_forms:
        pk = packed if dt == compute else pack_candidates(enc, cands, device=dev, token_dtype=dt)
        fns["MaxSim" + suffix] = (_recording(runs, "MaxSim" + suffix,
                                             lambda pk=pk: rerank_maxsim(pk, backend="reference")), None)
    if lite is not None:
        lite_tokens = encoded(lite_encoder, False)
        lite_batches = maxsim_batches(lite_tokens, cands, device=lite_encoder.device, dtype=compute)
        fns["LITE"] = (_recording(runs, "LITE", lambda: rerank_lite(lite_batches, lite)),
                       lambda: rerank_lite(maxsim_batches(encoded(lite_encoder, False), cands, device=lite_encoder.device,
                                                          dtype=compute), lite))
        for suffix, dt in eager_forms:
            batches, scorer = lite_batches, lite
            if dt != compute:  # from the weights as loaded, not the ones rounded to compute
                batches = maxsim_batches(lite_tokens, cands, device=lite_encoder.device, dtype=dt)
                scorer = copy.deepcopy(lite_as_loaded).to(dtype=dt)
            fns["LITE" + suffix] = (_recording(runs, "LITE" + suffix,
                                               lambda b=batches, m=scorer: rerank_lite(b, m, backend="reference")), None)
    cross_call = _recording(runs, "cross-encoder", lambda: cross_encoder.rerank(queries, passages, cands, progress=False))
    fns["cross-encoder"] = (cross_call, None)  # reading the pair is its only stage: one figure for both columns

    timed = {f"{name} {stage}": fn for name, pair in fns.items() for stage, fn in zip(("scoring", "end-to-end"), pair)
             if fn is not None}
    if progress:
        print(f"timing {len(timed)} calls x ({rounds} rounds + a warm-up) on {packed.num_docs} candidates",
              file=sys.stderr)
    rate = docs_per_second(timed, packed.num_docs, rounds=rounds, cuda=dev.type == "cuda")

    if not cross_encoder.trained:  # its scores are noise: kept out of every result, not just the table
        del runs["cross-encoder"]
    where = device_name(str(dev))
    rows = []
    for name in ["BM25", *fns]:
        quality = evaluate(qrels, runs[name], DEMO_MEASURES) if name in runs else dict.fromkeys(DEMO_MEASURES)
        scoring = None if name == "BM25" else rate[f"{name} scoring"]
        if name == "BM25" or _is_eager(name):
            end_to_end = None
        else:  # the cross-encoder's one stage is both
            end_to_end = rate.get(f"{name} end-to-end", scoring)
        base = name.split(EAGER[:-1])[0]
        eager_rate = max((rate[k] for k in (f"{base}{EAGER} scoring", f"{base}{EAGER_FLOAT32} scoring") if k in rate),
                         default=None)
        rows.append({"scorer": name, **quality, SCORING: scoring, END_TO_END: end_to_end,
                     SPEEDUP: scoring / eager_rate if eager_rate and scoring else None, "machine": where,
                     "note": None if name in runs else NO_CROSS_WEIGHTS})
    return {"data": str(data or EMBEDDED_DL19), "model": str(encoder.path),
            "cross": str(cross_encoder.path) if cross_encoder.trained else None,
            "lite_model": None if lite_model is None else str(lite_model), "device": str(dev),
            "dtype": str(compute).removeprefix("torch."),
            "queries": len(qids), "passages": len(enc.prow), "candidates": packed.num_docs, "rounds": rounds,
            "machine": machine.machine_info(str(dev)), "rows": rows, "runs": runs}


def format_report(res: dict) -> str:
    from fastrank.demo import DEMO_MEASURES

    info = res["machine"]
    cross = res["cross"] or f"untrained: {res['model']}'s architecture and weights, a fresh one-logit head"
    lines = [f"{res['queries']} queries, {res['candidates']} candidates ({res['passages']} passages) from {res['data']}",
             f"bi-encoder {res['model']}; cross-encoder {cross}"
             + (f"; LITE {res['lite_model']}" if res["lite_model"] else ""),
             f"on {res['device']}, torch {info['torch']}, fastrank commit {info.get('commit') or 'unknown'}; MaxSim "
             f"and LITE score in {res['dtype']}; docs/s: median of {res['rounds']} interleaved rounds; vs eager: the "
             f"scoring rate over the faster of the scorer's eager rows, same inputs, same rounds", "",
             "| scorer | " + " | ".join(DEMO_MEASURES) + " | docs/s scoring | docs/s end-to-end | vs eager | machine |",
             "|---|" + "---:|" * (len(DEMO_MEASURES) + 3) + "---|"]

    def rate(v, name):
        if v is None:
            return "- (scoring only)" if _is_eager(name) else "- (input run)"
        return f"{v:,.0f}"

    for r in res["rows"]:
        if r["note"]:
            quality = [r["note"]] + ["n/a"] * (len(DEMO_MEASURES) - 1)
        else:
            quality = [f"{r[m]:.4f}" for m in DEMO_MEASURES]
        lines.append(f"| {r['scorer']} | " + " | ".join(quality)
                     + f" | {rate(r[SCORING], r['scorer'])} | {rate(r[END_TO_END], r['scorer'])} | "
                     + (f"{r[SPEEDUP]:.2f}x" if r.get(SPEEDUP) else "-") + f" | {r['machine']} |")
    return "\n".join(lines)

