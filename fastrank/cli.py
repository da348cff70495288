"""The ``fastrank`` command: index, retrieve, rerank, evaluate, demo, bench.

Each subcommand is an ``add_<name>(subparsers)`` that registers its parser and sets ``func``; adding one
(``bench``) is a new ``add_*`` function and one line in :data:`SUBCOMMANDS`. The CLI composes the library
and holds no retrieval logic of its own.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ENCODER_FILE = "encoder.json"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local transformers model directory (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default 64)")


def _encoder(args, **kw):
    from fastrank.encoders import Encoder

    return Encoder(args.model, device=args.device, batch_size=args.batch_size, **kw)


# -- evaluate ----------------------------------------------------------------------------------------
def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a TREC run against qrels (trec_eval conventions)",
                       description="Evaluate RUN (TREC run or candidate TSV) against QRELS (TREC or BEIR).")
    p.add_argument("qrels")
    p.add_argument("run", nargs="+", help="one or more runs; each is a row of the table")
    p.add_argument("--measures", nargs="+", metavar="M",
                   help="ir-measures names, e.g. nDCG@10 'RR(rel=2)@10' R@100 (default: nDCG@10 RR@10 R@100 AP)")
    p.add_argument("--rel", type=int, default=1,
                   help="minimum grade counted relevant by RR, R and AP in the default measures (TREC DL: 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object {measure: value} (one run only)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from fastrank.data import read_qrels, read_run
    from fastrank.evaluate import evaluate, format_table

    if args.json and len(args.run) != 1:
        raise SystemExit("fastrank evaluate: --json takes exactly one run")
    qrels = read_qrels(args.qrels)
    results = {Path(r).name: evaluate(qrels, read_run(r), args.measures, rel=args.rel) for r in args.run}
    if args.json:
        print(json.dumps(next(iter(results.values()))))
    else:
        print(format_table(results))
    return 0


# -- index -------------------------------------------------------------------------------------------
def add_index(sub) -> None:
    p = sub.add_parser("index", help="encode a corpus and build a DenseIndex (or a TokenIndex with --tokens)")
    p.add_argument("corpus", help="BEIR corpus.jsonl or passage jsonl ({_id, title?, text})")
    p.add_argument("out", help="directory to write the index to")
    p.add_argument("--kind", default="flat", help="flat, ivf_flat, ivf_pq or hnsw (default flat)")
    p.add_argument("--metric", default="ip", choices=("ip", "l2"))
    p.add_argument("--tokens", action="store_true", help="index token embeddings for MaxSim (TokenIndex)")
    p.add_argument("--max-length", type=int, help="max tokens per document (default 256 dense, 200 tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed for IVF / PQ training")
    _add_model_args(p)
    p.set_defaults(func=cmd_index)


def cmd_index(args) -> int:
    from fastrank.data import read_corpus
    from fastrank.encoders import DOC_MAX_LENGTH
    from fastrank.index import DenseIndex, TokenIndex

    corpus = read_corpus(args.corpus)
    enc = _encoder(args)
    ids, texts = list(corpus), list(corpus.values())
    if args.tokens:
        max_length = args.max_length or DOC_MAX_LENGTH
        tok = enc.encode(texts, dense=False, tokens=True, max_length=max_length, progress="corpus").tokens
        index = TokenIndex(enc.token_dim, args.kind, args.metric, device=enc.device, seed=args.seed)
        index.add(tok, ids)
    else:
        max_length = args.max_length or enc.max_length
        vectors = enc.encode(texts, max_length=max_length, progress="corpus").dense
        index = DenseIndex(vectors.shape[1], args.kind, args.metric, device=enc.device, seed=args.seed)
        index.add(vectors, ids)
    out = index.save(args.out)
    (out / ENCODER_FILE).write_text(json.dumps({"model": str(enc.path), "tokens": args.tokens,
                                                 "max_length": max_length, "pooling": enc.pooling}))
    print(f"indexed {len(index)} documents ({args.kind}, {'tokens' if args.tokens else 'dense'}) into {out}")
    return 0


# -- retrieve ----------------------------------------------------------------------------------------
def add_retrieve(sub) -> None:
    p = sub.add_parser("retrieve", help="search an index for queries and write a TREC run")
    p.add_argument("index", help="directory written by `fastrank index`")
    p.add_argument("queries", help="qid<TAB>text TSV or BEIR queries.jsonl")
    p.add_argument("out", help="TREC run file to write")
    p.add_argument("-k", "--k", type=int, default=100, help="documents per query (default 100)")
    p.add_argument("--token-k", type=int, default=32,
                   help="token index only: nearest document tokens fetched per query token (default 32)")
    p.add_argument("--qrels", help="keep only queries judged in these qrels")
    p.add_argument("--tag", default="fastrank")
    _add_model_args(p)
    p.set_defaults(func=cmd_retrieve)


def cmd_retrieve(args) -> int:
    from fastrank.data import read_qrels, read_queries, write_run
    from fastrank.index import DenseIndex, TokenIndex

    index_dir = Path(args.index)
    info_file = index_dir / ENCODER_FILE
    if not info_file.is_file():
        raise SystemExit(f"fastrank retrieve: {index_dir} has no {ENCODER_FILE}; build it with `fastrank index`")
    info = json.loads(info_file.read_text())
    if args.model is None:
        args.model = info["model"]
    queries = read_queries(args.queries)
    if args.qrels:
        judged = read_qrels(args.qrels)
        queries = {q: t for q, t in queries.items() if q in judged}
    enc = _encoder(args, pooling=info.get("pooling", "mean"))
    qids, texts = list(queries), list(queries.values())
    if info["tokens"]:
        index = TokenIndex.load(index_dir, device=enc.device)
        run = index.to_run(qids, enc.encode_queries(texts, progress="queries"), args.k, token_k=args.token_k)
    else:
        index = DenseIndex.load(index_dir, device=enc.device)
        run = index.to_run(qids, enc.encode_dense(texts, max_length=info["max_length"], progress="queries"), args.k)
    write_run(run, args.out, tag=args.tag)
    print(f"wrote {sum(map(len, run.values()))} results for {len(run)} queries to {args.out}")
    return 0


# -- rerank ------------------------------------------------------------------------------------------
def add_rerank(sub) -> None:
    p = sub.add_parser("rerank", help="re-score a run's candidates with dense, MaxSim or LITE scoring; write a run")
    p.add_argument("run", help="TREC run or candidate TSV with the candidates")
    p.add_argument("queries", help="qid<TAB>text TSV or BEIR queries.jsonl")
    p.add_argument("corpus", help="jsonl with the candidates' texts ({_id, title?, text})")
    p.add_argument("out", help="TREC run file to write")
    p.add_argument("--scorer", default="maxsim", choices=("dense", "maxsim", "lite"),
                   help="dense: pooled embeddings; maxsim: fused MaxSim over token embeddings (default); "
                        "lite: a trained LiteScorer (--lite) over token embeddings")
    p.add_argument("--lite", metavar="CHECKPOINT",
                   help="with --scorer lite: a LiteScorer state_dict saved with torch.save")
    p.add_argument("--depth", type=int, help="re-rank only each query's top DEPTH candidates")
    p.add_argument("--tag", default=None, help="run tag (default fastrank-SCORER)")
    _add_model_args(p)
    p.set_defaults(func=cmd_rerank)


def cmd_rerank(args) -> int:
    import torch

    from fastrank.data import read_corpus, read_queries, read_run, write_run
    from fastrank.rerank import encode_for_rerank, maxsim_batches, rerank_dense, rerank_lite, rerank_maxsim

    if (args.scorer == "lite") != (args.lite is not None):
        raise ValueError("--scorer lite and --lite CHECKPOINT go together")
    lite = None
    if args.lite is not None:
        from fastrank.nn import LiteScorer

        lite = LiteScorer.from_state_dict(torch.load(args.lite, map_location="cpu", weights_only=True))
    candidates = read_run(args.run)
    if args.depth:
        candidates = {q: dict(sorted(c.items(), key=lambda kv: -kv[1])[:args.depth]) for q, c in candidates.items()}
    queries = {q: t for q, t in read_queries(args.queries).items() if q in candidates}
    enc = _encoder(args)
    dense = args.scorer == "dense"
    encoded = encode_for_rerank(enc, queries, read_corpus(args.corpus), candidates, dense=dense, tokens=not dense)
    if dense:
        run = rerank_dense(encoded, candidates)
    else:
        dtype = torch.float16 if enc.device.type == "cuda" else torch.float32
        batches = maxsim_batches(encoded, candidates, device=enc.device, dtype=dtype)
        run = rerank_lite(batches, lite.to(enc.device, dtype)) if lite is not None else rerank_maxsim(batches)
    write_run(run, args.out, tag=args.tag or f"fastrank-{args.scorer}")
    print(f"re-ranked {sum(map(len, run.values()))} candidates for {len(run)} queries into {args.out}")
    return 0


# -- demo --------------------------------------------------------------------------------------------
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="re-rank TREC DL'19 BM25 top-100 (embedded) with dense and fused MaxSim",
                       description="Re-rank BM25 candidates with MiniLM dense and MaxSim scoring; print nDCG@10 "
                                   "and RR(rel=2)@10 against BM25, and fused vs eager MaxSim docs/s.")
    p.add_argument("--data", help="a TREC DL folder of the same layout (default: the embedded DL 2019 set)")
    p.add_argument("--max-queries", type=int, help="only the first N queries (a quick look)")
    p.add_argument("--no-speed", action="store_true", help="skip the fused-vs-eager timing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_model_args(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from fastrank.demo import format_demo, run_demo

    result = run_demo(args.data, args.model, device=args.device, batch_size=args.batch_size,
                      max_queries=args.max_queries, speed=not args.no_speed)
    print(json.dumps(result, indent=1) if args.json else format_demo(result))
    return 0


def add_bench(sub) -> None:
    from fastrank.bench import add_cli

    add_cli(sub)


SUBCOMMANDS = [add_index, add_retrieve, add_rerank, add_evaluate, add_demo, add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrank", description="Fused kernels for neural re-ranking.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as exc:
        # Bad input or a missing optional dependency: one line naming the problem, not a traceback.
        print(f"fastrank {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
