"""The ``fastrank`` command: index, retrieve, rerank, evaluate, demo, bench.

Each subcommand is an ``add_<name>(subparsers)`` that registers its parser and sets ``func``; adding one
(``bench``) is a new ``add_*`` function and one line in :data:`SUBCOMMANDS`. The CLI composes the library
and holds no retrieval logic of its own.

Every command checks all of its options, and reads its small inputs, before a model loads: a typo costs a
second, not the minutes of encoding before it. A refusal is one line on stderr naming the option or file
and what was expected, with exit code 2 (argparse's own convention); outputs are written to a temporary
file or directory and renamed into place, so a failed command leaves no partial output behind.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

# Written beside a saved index (and checksummed in its meta.json): the model, pooling and lengths its
# vectors came from, so that `fastrank retrieve` encodes queries the same way.
ENCODER_FILE = "encoder.json"
ENCODER_FORMAT = "fastrank.encoder"
REBUILD = "rebuild the index with `fastrank index`"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local transformers model directory, or a directory written by `fastrank train` "
                                   "(default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default 64)")


def _check_positive(args, *flags: str) -> None:
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")


def _check_model_args(args) -> None:
    """``--device``, ``--batch-size`` and ``--model``, before anything loads."""
    from fastrank.encoders import check_device
    from fastrank.trained import is_trained

    check_device(args.device, "--device")
    _check_positive(args, "--batch-size")
    if args.model is not None and not is_trained(args.model) and not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"--model {args.model}: not a local transformers model directory (no config.json) "
                                "nor a directory written by `fastrank train`")


def _model_dims(model) -> tuple[int, int]:
    """(dense dim, token dim) of ``model`` from its config (and a trained head), without loading weights."""
    from fastrank.encoders import model_hidden_size
    from fastrank.trained import is_trained, load_trained

    if is_trained(model):
        trained = load_trained(model)
        hidden = model_hidden_size(trained.encoder_path)
        return hidden, hidden if trained.projection is None else int(trained.projection.shape[0])
    hidden = model_hidden_size(model)
    return hidden, hidden


def _check_out_file(path: str, name: str = "OUT", inputs: dict[str, str | None] | None = None) -> None:
    """``path`` names a file to write, and not one of ``inputs`` (name -> a path the command reads, or a
    directory whose files it reads): the output replaces its file, so an input given again as OUT would be
    lost the moment the command succeeds."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{name} {path}: is a directory; expected the path of a file to write")
    if not out.exists():
        return
    for flag, value in (inputs or {}).items():
        if value is None or not Path(value).exists():
            continue
        read = [p for p in Path(value).iterdir() if p.is_file()] if Path(value).is_dir() else [Path(value)]
        if any(os.path.samefile(out, f) for f in read):
            raise ValueError(f"{name} {path}: is {flag} {value}{'' if read == [Path(value)] else ' (a file in it)'}, "
                             "which this command reads; write the output to another file")


# Arguments that name a file or directory a command writes ("-" being stdout), with the name an error gives
# them; `bench`'s OUT is an option.
OUTPUT_ARGS = {"out": "OUT", "json": "--json", "cache_dir": "--cache-dir"}
PARENTS_RULE = ("Every command creates the missing parent directories of the files and directories it writes "
                "(as mkdir -p does) before it starts.")


def _make_output_parents(args) -> None:
    """:data:`PARENTS_RULE`, for every command alike, before any of its work: a parent path that runs into a
    file is refused here rather than after the encoding it would have thrown away."""
    for dest, name in OUTPUT_ARGS.items():
        value = getattr(args, dest, None)
        if not isinstance(value, str) or value in ("", "-"):
            continue
        if dest == "out" and args.command == "bench":
            name = "--out"
        parent = Path(value).absolute().parent
        existing = next(p for p in (parent, *parent.parents) if p.exists())
        if not existing.is_dir():
            raise ValueError(f"{name} {value}: {existing} is a file, not a directory; expected a path whose parent "
                             "is a directory or can be created")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"{name} {value}: cannot create its parent directory {parent} ({exc.strerror})") from None


def _model_max_positions(model) -> int | None:
    from fastrank.encoders import model_max_positions
    from fastrank.trained import is_trained, load_trained

    return model_max_positions(load_trained(model).encoder_path if is_trained(model) else model)


def _check_max_length(max_length: int | None, model, name: str = "--max-length") -> None:
    """Past the model's position embeddings the forward pass fails with a shape error, after the model loads."""
    if max_length is None:
        return
    limit = _model_max_positions(model)
    if limit is not None and max_length > limit:
        raise ValueError(f"{name} {max_length}: the model {model or '(default all-MiniLM-L6-v2)'} takes at most "
                         f"{limit} tokens per text; use at most {limit}")


def _encoder(args, **kw):
    """The encoder ``--model`` names; a ``fastrank train`` directory brings its own (with the MaxSim projection
    its head learned), so its tokens match what the head was trained on."""
    from fastrank.encoders import Encoder
    from fastrank.trained import is_trained, load_trained

    if is_trained(args.model):
        return load_trained(args.model).encoder(device=args.device, batch_size=args.batch_size)
    return Encoder(args.model, device=args.device, batch_size=args.batch_size, **kw)


# -- evaluate ----------------------------------------------------------------------------------------
def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a TREC run against qrels (trec_eval conventions)",
                       description="Evaluate RUN (TREC run or candidate TSV) against QRELS (TREC or BEIR).")
    p.add_argument("qrels")
    p.add_argument("run", nargs="+", help="one or more runs; each is a row of the table")
    p.add_argument("--measures", nargs="+", metavar="M",
                   help="ir-measures names, e.g. nDCG@10 'RR(rel=2)@10' R@100 (default: nDCG@10 RR@10 R@100 AP)")
    p.add_argument("--rel", type=int,
                   help="minimum grade counted relevant by RR, R and AP in the default measures (TREC DL: 2; "
                        "default 1); with --measures, write it into the measure: 'RR(rel=2)@10'")
    p.add_argument("--json", action="store_true", help="print one JSON object {measure: value} (one run only)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from fastrank.data import read_qrels, read_run
    from fastrank.evaluate import evaluate, format_table

    if args.json and len(args.run) != 1:
        raise ValueError("--json takes exactly one run")
    if args.rel is not None and args.measures:
        raise ValueError(f"--rel {args.rel} and --measures: --rel sets the default measures' threshold only; write it "
                         f"into the measure instead, e.g. 'RR(rel={args.rel})@10'")
    qrels = read_qrels(args.qrels)
    rel = 1 if args.rel is None else args.rel
    results = {Path(r).name: evaluate(qrels, read_run(r), args.measures, rel=rel) for r in args.run}
    if args.json:
        print(json.dumps(next(iter(results.values()))))
    else:
        print(format_table(results))
    return 0


# -- index -------------------------------------------------------------------------------------------
def _add_token_search_args(p: argparse.ArgumentParser, at_build: bool) -> None:
    g = p.add_argument_group("token index (--tokens) candidate stage" if at_build else "token index search")
    saved = "kept in the index as the default of `fastrank retrieve`" if at_build else "default: the index's"
    g.add_argument("--nprobe", type=int, help=f"centroids probed per query token ({saved}; 8 unless set)")
    g.add_argument("--ndocs", type=int, help=f"candidates per query scored exactly with MaxSim ({saved}; "
                                             "max(128, 4 k) unless set)")
    g.add_argument("--exhaustive", action="store_true",
                   help="score every document exactly (no centroids" + (" are built)" if at_build else " used)"))


def add_index(sub) -> None:
    p = sub.add_parser("index", help="encode a corpus and build a DenseIndex (or a TokenIndex with --tokens)",
                       description="Encode CORPUS and write an index to OUT. Dense by default (--kind picks the "
                                   "FAISS index); --tokens builds a TokenIndex for MaxSim: k-means centroids over "
                                   "the token vectors generate candidates, which are scored exactly.")
    p.add_argument("corpus", nargs="?", help="BEIR corpus.jsonl, passage jsonl ({_id, title?, text}) or a TREC "
                                             "collection .tsv (id<TAB>text); gzip is read as is")
    p.add_argument("out", nargs="?", help="directory to write the index to; a token index (--tokens) is written "
                                          "chunk by chunk, and re-running the same command on an interrupted build "
                                          "resumes it")
    p.add_argument("--verify", metavar="INDEX",
                   help="instead of building: read every byte of the token index INDEX and check it against its "
                        "checksums (a load checks sizes and stage 1 only, so that a large index loads in seconds; default: build, not verify)")
    p.add_argument("--chunk-docs", type=int,
                   help="documents encoded and committed at a time (default 4096; memory grows with it)")
    p.add_argument("--kind", metavar="{flat,ivf_flat,ivf_pq,hnsw}", help="dense index only (default flat)")
    p.add_argument("--metric", choices=("ip", "l2"), help="dense index only (default ip; MaxSim is inner product)")
    p.add_argument("--tokens", action="store_true", help="index token embeddings for MaxSim (TokenIndex)")
    p.add_argument("--max-length", type=int, help="max tokens per document (default 256 dense, 200 tokens)")
    p.add_argument("--seed", type=int, help="seed for IVF / PQ training and the token index's k-means (default 0; "
                                            "flat, hnsw and exhaustive token indexes train nothing)")
    g = p.add_argument_group("token index (--tokens) storage")
    g.add_argument("--token-dtype", choices=("float16", "bfloat16", "int8", "residual1", "residual2", "residual4"),
                   help="how token vectors are stored and scored: residualB keeps a centroid code and B bits per "
                        "dimension (PLAID-style, 36 bytes a token at H=128 and B=2); default int8: half float16's size, the same "
                        "SciFact nDCG@10)")
    g.add_argument("--ncentroids", type=int,
                   help="k-means centroids (default: the power of two nearest 4 sqrt(number of tokens))")
    _add_token_search_args(p, at_build=True)
    _add_model_args(p)
    p.set_defaults(func=cmd_index)


def _check_seed_is_used(args) -> None:
    if args.seed is None:
        return
    if args.tokens and args.exhaustive:
        raise ValueError("--seed and --exhaustive: an exhaustive token index builds no centroids, so nothing is seeded")
    if not args.tokens and (args.kind or "flat") in ("flat", "hnsw"):
        raise ValueError(f"--seed and --kind {args.kind or 'flat'}: a {args.kind or 'flat'} index trains nothing, so "
                         "nothing is seeded (the seed applies to ivf_flat and ivf_pq)")


def cmd_verify_index(args) -> int:
    from fastrank.index.shards import load_token_index

    if args.corpus is not None or args.out is not None:
        raise ValueError("--verify INDEX checks an index and builds nothing: drop CORPUS and OUT")
    from fastrank.index import DenseIndex
    from fastrank.index.storage import read_meta

    if read_meta(Path(args.verify), None).get("format") == "fastrank.DenseIndex":
        index = DenseIndex.load(args.verify, verify=True)
        what = f"{len(index)} documents ({index.kind}, dense)"
    else:
        index = load_token_index(args.verify, verify=True)
        what = f"{len(index)} documents, {index.num_tokens} tokens ({index.token_dtype})"
    print(f"verified {args.verify}: {what}; every byte matches its checksum")
    return 0


def cmd_index(args) -> int:
    if args.verify is not None:
        return cmd_verify_index(args)
    if args.corpus is None or args.out is None:
        raise ValueError("CORPUS and OUT are required (or --verify INDEX to check an index)")
    from fastrank.index import KINDS
    from fastrank.index.storage import check_index_dir, check_not_inside

    token_only = [flag for flag, value in (("--token-dtype", args.token_dtype), ("--ncentroids", args.ncentroids),
                                           ("--nprobe", args.nprobe), ("--ndocs", args.ndocs),
                                           ("--exhaustive", args.exhaustive or None)) if value is not None]
    if args.tokens:
        # A token index has no FAISS kind or metric: refusing them beats silently building something else.
        for flag, value in (("--kind", args.kind), ("--metric", args.metric)):
            if value is not None and value != {"--kind": "flat", "--metric": "ip"}[flag]:
                raise ValueError(f"{flag} {value} applies to dense indexes; a token index scores MaxSim (inner "
                                 "product) over centroid candidates (--ncentroids, --nprobe, --ndocs) or --exhaustive")
        centroid_args = [flag for flag, value in (("--ncentroids", args.ncentroids), ("--nprobe", args.nprobe),
                                                  ("--ndocs", args.ndocs)) if value is not None]
        if args.exhaustive and centroid_args:
            raise ValueError(f"{', '.join(centroid_args)} and --exhaustive: an exhaustive token index builds no "
                             "centroids and scores every document")
    elif token_only:
        raise ValueError(f"{', '.join(token_only)} apply to token indexes only: add --tokens")
    elif args.kind is not None and args.kind not in KINDS:
        raise ValueError(f"--kind: unknown index kind {args.kind!r}; expected one of {', '.join(KINDS)}")
    _check_positive(args, "--max-length", "--ncentroids", "--nprobe", "--ndocs", "--chunk-docs")
    _check_model_args(args)
    _check_max_length(args.max_length, args.model)
    _check_seed_is_used(args)
    out = Path(args.out)
    # OUT is absent, empty or an index fastrank saved; replacing it removes only that index's files.
    check_not_inside(out, {"CORPUS": args.corpus})
    check_index_dir(out, label="OUT")
    if args.tokens:
        return _index_tokens_streamed(args, out)
    return _index_dense_streamed(args, out)


def _index_tokens_streamed(args, out: Path) -> int:
    """``fastrank index --tokens``: read the corpus a chunk at a time, encode it, append it to OUT, commit;
    an interrupted build resumes from its last commit when the same command runs again."""
    import time

    from fastrank.data import corpus_chunks, count_lines
    from fastrank.encoders import DOC_MAX_LENGTH, check_device
    from fastrank.index.token_stream import TokenIndexWriter

    if args.exhaustive and args.token_dtype in ("residual1", "residual2", "residual4"):
        raise ValueError(f"--token-dtype {args.token_dtype} and --exhaustive: residual tokens are coded against "
                         "centroids; use another --token-dtype for an exhaustive index")
    _, token_dim = _model_dims(args.model)
    check_device(args.device, "--device")
    max_length = args.max_length or DOC_MAX_LENGTH
    chunk_docs = args.chunk_docs or 4096
    model = None if args.model is None else os.path.relpath(Path(args.model).resolve(), out.resolve())
    enc = _encoder(args)
    info = {"format": ENCODER_FORMAT, "model": model, "model_name": Path(args.model or enc.path).name,
            "tokens": True, "max_length": max_length, "pooling": enc.pooling}
    encoder_text = json.dumps(info, indent=1)
    world = _index_world()
    if world.size > 1:
        return _index_tokens_sharded(args, out, world, enc, token_dim, max_length, chunk_docs, encoder_text)
    # encoder.json is part of the build's options: resuming with another model or --max-length is refused.
    writer = TokenIndexWriter(out, token_dim, token_dtype=args.token_dtype or "int8",
                              stage1="exhaustive" if args.exhaustive else "centroids", ncentroids=args.ncentroids,
                              nprobe=args.nprobe, ndocs=args.ndocs, seed=args.seed or 0,
                              expected_documents=count_lines(args.corpus), label="OUT",
                              attach={ENCODER_FILE: json.dumps(info, indent=1)}, replay=False)
    with writer:
        if writer.committed_documents:
            print(f"resuming {out}: {writer.committed_documents} documents already indexed")
        t0 = time.perf_counter()
        encoding, encoded_docs = _stream_into(
            writer, corpus_chunks(args.corpus, chunk_docs),
            lambda chunk: enc.encode([t for _, _, t in chunk], dense=False, tokens=True, max_length=max_length,
                                     progress=False).tokens, args.corpus)
        writer.finish()
    from fastrank.index import TokenIndex

    index = TokenIndex.load(out)
    kind = f"tokens, {index.token_dtype}, " + ("exhaustive" if args.exhaustive else f"{index.ncentroids} centroids")
    total = time.perf_counter() - t0
    print(f"encoded {encoded_docs} documents in {encoding:.1f} s; built the index in {total - encoding:.1f} s "
          "(written as it went)")
    print(f"indexed {len(index)} documents ({kind}, {index.num_tokens} tokens) into {out}")
    return 0


def _duplicate_line(corpus, chunk: list, exc) -> Exception:
    """The error for a repeated document id, naming the line that repeats it (and the first, when it is in
    the same chunk)."""
    from fastrank.data import DataFormatError

    lineno = chunk[exc.position][0]
    first = next((n for n, docid, _ in chunk[:exc.position] if docid == exc.id), None)
    where = f" (first at line {first})" if first is not None else " (an earlier document has it)"
    return DataFormatError(f"{corpus}:{lineno}: duplicate document id {exc.id!r}{where}; each document needs its "
                           "own id")


def _stream_into(writer, chunks, encode, corpus) -> tuple[float, int]:
    """Encode and add each chunk (those a resumed build stored are skipped unencoded); on a malformed or
    repeated document, a build this run started is removed again (no partial output), while a resumed one
    keeps its earlier commits. Returns the seconds spent encoding and the documents encoded."""
    import time

    from fastrank.data import DataFormatError
    from fastrank.index.token_stream import DuplicateIdError

    fresh = writer.committed_documents == 0
    skip, encoding, encoded = writer.committed_documents, 0.0, 0
    try:
        for chunk in chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            chunk, skip = chunk[skip:], 0
            e0 = time.perf_counter()
            data = encode(chunk)
            encoding += time.perf_counter() - e0
            encoded += len(chunk)
            try:
                writer.add(data, [docid for _, docid, _ in chunk])
            except DuplicateIdError as exc:
                raise _duplicate_line(corpus, chunk, exc) from None
    except DataFormatError:
        if fresh:
            writer.discard()
        raise
    return encoding, encoded


def _index_dense_streamed(args, out: Path) -> int:
    """``fastrank index`` (dense): the corpus read, encoded and committed a chunk at a time
    (fastrank.index.dense_stream); an interrupted build resumes when the same command runs again."""
    import time

    from fastrank.data import count_lines, corpus_chunks
    from fastrank.encoders import check_device
    from fastrank.index import DenseIndex
    from fastrank.index.dense_stream import DenseIndexWriter

    dense_dim, _ = _model_dims(args.model)
    device = check_device(args.device, "--device")
    kind, metric = args.kind or "flat", args.metric or "ip"
    probe = DenseIndex(dense_dim, kind, metric, device=device, seed=args.seed or 0)
    lines = count_lines(args.corpus)
    nlist, least = probe.training_points(lines)
    if lines < least:
        raise ValueError(f"--kind {kind}: {args.corpus} has {lines} documents, too few to train it (at least {least}); "
                         "use --kind flat or hnsw")
    enc = _encoder(args)
    max_length = args.max_length or enc.max_length
    model = None if args.model is None else os.path.relpath(Path(args.model).resolve(), out.resolve())
    info = {"format": ENCODER_FORMAT, "model": model, "model_name": Path(args.model or enc.path).name,
            "tokens": False, "max_length": max_length, "pooling": enc.pooling}
    t0 = time.perf_counter()
    with DenseIndexWriter(out, dense_dim, kind, metric, seed=args.seed or 0, expected_documents=lines,
                          attach={ENCODER_FILE: json.dumps(info, indent=1)}, replay=False, label="OUT") as writer:
        if writer.committed_documents:
            print(f"resuming {out}: {writer.committed_documents} documents already indexed")
        encoding, encoded_docs = _stream_into(
            writer, corpus_chunks(args.corpus, args.chunk_docs or 4096),
            lambda chunk: enc.encode([t for _, _, t in chunk], max_length=max_length, progress=False).dense,
            args.corpus)
        writer.finish()
    index = DenseIndex.load(out)
    total = time.perf_counter() - t0
    print(f"encoded {encoded_docs} documents in {encoding:.1f} s; built the index in {total - encoding:.1f} s "
          "(written as it went)")
    print(f"indexed {len(index)} documents ({index.kind}, dense) into {out}")
    return 0


def _index_world():
    """The processes of this build: one, or those torchrun started (gloo: the shards are written on the CPU)."""
    import torch

    from fastrank.train.loop import World

    return World.init(torch.device("cpu"))


def _index_tokens_sharded(args, out: Path, world, enc, dim: int, max_length: int, chunk_docs: int,
                          encoder_text: str) -> int:
    """``torchrun ... fastrank index --tokens``: rank r writes shard r from every world-size-th chunk; stage 1 is
    trained once by rank 0 on the first chunks (the sample a single process would take) and shared; rank 0
    publishes the manifest over the shards (fastrank.index.shards)."""
    import time

    import torch

    from fastrank.data import corpus_chunks
    from fastrank.index import shards
    from fastrank.index.token_stream import SAMPLE_BYTES, TokenIndexWriter, choose_ncentroids, train_stage1, write_stage1

    token_dtype = args.token_dtype or "int8"
    stage1 = "exhaustive" if args.exhaustive else "centroids"
    header = {"dim": dim, "token_dtype": token_dtype, "stage1": stage1, "ncentroids": args.ncentroids,
              "nprobe": args.nprobe, "ndocs": args.ndocs, "seed": args.seed or 0, "chunk_docs": chunk_docs,
              "encoder": encoder_text}
    if world.rank == 0:
        shards.begin(out, world.size, header, {ENCODER_FILE: encoder_text})
    world.barrier()
    build_id = shards.read_building(out)["build_id"]

    def encode(chunk):
        return enc.encode([text for _, _, text in chunk], dense=False, tokens=True, max_length=max_length,
                          progress=False).tokens

    if stage1 == "centroids":
        if world.rank == 0 and not shards.stage1_done(out):
            sample, ended, need = [], True, max(1, SAMPLE_BYTES // (4 * dim))
            for chunk in corpus_chunks(args.corpus, chunk_docs):
                sample.append(encode(chunk).vectors.float())
                if sum(x.shape[0] for x in sample) >= need:
                    ended = False
                    break
            sample = torch.cat(sample)
            c = choose_ncentroids(sample.shape[0], ended, args.ncentroids)
            centroids, codec = train_stage1(sample, c, seed=args.seed or 0, token_dtype=token_dtype)
            write_stage1(out / shards.STAGE1_DIR, centroids, codec, seed=args.seed or 0)
            shards.write_stage1_done(out, {"ncentroids": c})
        world.barrier()
    t0 = time.perf_counter()
    with TokenIndexWriter(out / shards.shard_name(world.rank), dim, token_dtype=token_dtype, stage1=stage1,
                          nprobe=args.nprobe, ndocs=args.ndocs, seed=args.seed or 0, build_id=build_id,
                          stage1_from=out / shards.STAGE1_DIR if stage1 == "centroids" else None, replay=False,
                          progress=world.rank == 0, label=f"shard {world.rank}") as writer:
        mine = (chunk for i, chunk in enumerate(corpus_chunks(args.corpus, chunk_docs)) if i % world.size == world.rank)
        encoding, encoded_docs = _stream_into(writer, mine, encode, args.corpus)
        writer.finish()
    print(f"rank {world.rank}: encoded {encoded_docs} documents in {encoding:.1f} s; wrote "
          f"{shards.shard_name(world.rank)} in {time.perf_counter() - t0 - encoding:.1f} s")
    world.barrier()
    if world.rank == 0:
        meta = shards.finish(out, world.size)
        print(f"indexed {meta['documents']} documents ({meta['tokens']} tokens, {token_dtype}) into {out} as "
              f"{world.size} shards")
    world.barrier()
    return 0


def _read_index_info(index_dir: Path) -> dict:
    """The index's ``encoder.json``, checked against its checksum in meta.json, with ``model`` resolved (None:
    the packaged default). An index saved before encoder.json was checksummed has none to check and an
    absolute model path; it still reads."""
    from fastrank.index.storage import IndexFormatError, read_meta, sha256_file

    info_file = index_dir / ENCODER_FILE
    meta = read_meta(index_dir, None)
    if not info_file.is_file():
        raise FileNotFoundError(f"INDEX {index_dir}: no {ENCODER_FILE}; {REBUILD}")
    expected = meta.get("sha256", {}).get(ENCODER_FILE)
    if expected is not None and sha256_file(info_file) != expected:
        raise IndexFormatError(f"{info_file}: checksum does not match meta.json (edited, corrupt or from another "
                               f"index); {REBUILD}")
    try:
        info = json.loads(info_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{info_file}: not valid JSON ({getattr(exc, 'msg', exc)}); {REBUILD}") from None
    fields = {"model": (str, type(None)), "tokens": bool, "max_length": int, "pooling": str}
    if not isinstance(info, dict) or "model" not in info or any(
            not isinstance(info.get(k, "mean" if k == "pooling" else None), t) for k, t in fields.items()):
        raise IndexFormatError(f"{info_file}: expected an object with model (a path or null), tokens (true/false), "
                               f"max_length (an integer) and pooling; {REBUILD}")
    model = info["model"]
    info["model"] = None if model is None else os.path.normpath(index_dir / model)
    info["stored_model"] = model
    info["dim"] = meta.get("dim")
    info["stage1"] = meta.get("stage1")
    return info


# -- retrieve ----------------------------------------------------------------------------------------
def add_retrieve(sub) -> None:
    p = sub.add_parser("retrieve", help="search an index for queries and write a TREC run")
    p.add_argument("index", help="directory written by `fastrank index`")
    p.add_argument("queries", help="qid<TAB>text TSV or BEIR queries.jsonl")
    p.add_argument("out", help="TREC run file to write")
    p.add_argument("-k", "--k", type=int, default=100, help="documents per query (default 100)")
    _add_token_search_args(p, at_build=False)
    p.add_argument("--token-k", type=int, help=argparse.SUPPRESS)  # gone with the per-token ANN: see cmd_retrieve
    p.add_argument("--qrels", help="keep only queries judged in these qrels (default: every query)")
    p.add_argument("--tag", default="fastrank", help="the run tag, the runs' sixth column")
    _add_model_args(p)
    p.set_defaults(func=cmd_retrieve)


def cmd_retrieve(args) -> int:
    from fastrank.data import check_tag, read_qrels, read_queries, write_run
    from fastrank.index import DenseIndex
    from fastrank.index.shards import load_token_index

    if args.token_k is not None:
        raise ValueError("--token-k is gone: token indexes now find candidates through centroids; "
                         "use --nprobe (centroids per query token) and --ndocs (candidates scored exactly)")
    _check_positive(args, "-k", "--nprobe", "--ndocs")
    _check_out_file(args.out, inputs={"INDEX": args.index, "QUERIES": args.queries, "--qrels": args.qrels})
    check_tag(args.tag, "--tag")
    centroid_args = [f for f, v in (("--nprobe", args.nprobe), ("--ndocs", args.ndocs)) if v is not None]
    if args.exhaustive and centroid_args:
        raise ValueError(f"{', '.join(centroid_args)} and --exhaustive: an exhaustive search scores every document "
                         "and probes no centroids")
    index_dir = Path(args.index)
    info = _read_index_info(index_dir)
    token_args = [f for f, v in (("--nprobe", args.nprobe), ("--ndocs", args.ndocs),
                                 ("--exhaustive", args.exhaustive or None)) if v is not None]
    if token_args and not info["tokens"]:
        raise ValueError(f"{', '.join(token_args)} apply to token indexes; {index_dir} is a dense index")
    if centroid_args and info["stage1"] == "exhaustive":
        raise ValueError(f"{', '.join(centroid_args)}: the token index {index_dir} was built --exhaustive; it has no "
                         "centroids and every search scores every document")
    if args.model is None:
        if info["model"] is not None and not Path(info["model"]).is_dir():
            raise FileNotFoundError(f"INDEX {index_dir}: built with the model {info['stored_model']} (from here "
                                    f"{info['model']}), which is not there; pass --model DIR")
        args.model = info["model"]
    _check_model_args(args)
    dims = _model_dims(args.model)
    dim = dims[1] if info["tokens"] else dims[0]
    if info["dim"] is not None and dim != info["dim"]:
        raise ValueError(f"--model {args.model or 'default'}: gives {dim}-dim vectors, the index {index_dir} holds "
                         f"{info['dim']}-dim ones; use the model it was built with ({info['stored_model']})")
    if not info["tokens"]:  # queries are encoded to the documents' length
        _check_max_length(info["max_length"], args.model, f"INDEX {index_dir}: max_length")
    queries = read_queries(args.queries)
    if args.qrels:
        judged = read_qrels(args.qrels)
        kept = {q: t for q, t in queries.items() if q in judged}
        if not kept:
            raise ValueError(f"--qrels {args.qrels}: none of the {len(queries)} queries in {args.queries} is judged "
                             f"there (queries e.g. {sorted(queries)[:3]}, qrels e.g. {sorted(judged)[:3]})")
        queries = kept
    enc = _encoder(args, pooling=info.get("pooling", "mean"))
    qids, texts = list(queries), list(queries.values())
    if info["tokens"]:
        index = load_token_index(index_dir, device=enc.device)
        run = index.to_run(qids, enc.encode_queries(texts, progress="queries"), args.k, nprobe=args.nprobe,
                           ndocs=args.ndocs, exhaustive=True if args.exhaustive else None)
    else:
        index = DenseIndex.load(index_dir, device=enc.device)
        run = index.to_run(qids, enc.encode_dense(texts, max_length=info["max_length"], progress="queries"), args.k)
    write_run(run, args.out, tag=args.tag)
    print(f"wrote {sum(map(len, run.values()))} results for {len(run)} queries to {args.out}")
    return 0


# -- rerank ------------------------------------------------------------------------------------------
# Distinct passages per chunk: at most 10,000 x 200 tokens x 384 x 4 bytes = 3 GB of token embeddings for
# MiniLM; SciFact's or DL19's whole candidate set is one chunk, so nothing is encoded twice there.
DEFAULT_RERANK_CHUNK = 10_000


def add_rerank(sub) -> None:
    p = sub.add_parser("rerank", help="re-score a run's candidates with dense, MaxSim or LITE scoring; write a run")
    p.add_argument("run", help="TREC run or candidate TSV with the candidates")
    p.add_argument("queries", help="qid<TAB>text TSV or BEIR queries.jsonl")
    p.add_argument("corpus", help="jsonl with the candidates' texts ({_id, title?, text})")
    p.add_argument("out", help="TREC run file to write")
    p.add_argument("--scorer", default="maxsim", choices=("dense", "maxsim", "lite", "cross"),
                   help="dense: pooled embeddings; maxsim: fused MaxSim over token embeddings (default); "
                        "lite: a trained LiteScorer (--lite) over token embeddings; cross: a cross-encoder reading "
                        "query and passage together (--model: a local sequence-classification checkpoint directory)")
    p.add_argument("--lite", metavar="CHECKPOINT",
                   help="with --scorer lite: a LiteScorer state_dict saved with torch.save (not needed when --model "
                        "is a directory trained with `fastrank train --scorer lite`: its head is used) (default: none)")
    p.add_argument("--depth", type=int, help="re-rank only each query's top DEPTH candidates; the rest follow "
                                             "them in the output, in the input run's order (default: every candidate)")
    p.add_argument("--token-dtype", choices=("float32", "float16", "bfloat16", "int8"), default=None,
                   help="maxsim and lite: dtype the token embeddings (and LITE's weights) are held and scored in "
                        "(default float32 on CPU, float16 on CUDA; int8, quantized per token, is maxsim's only; "
                        "bfloat16 is the fast one on CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--tag", default=None, help="run tag (default fastrank-SCORER)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_RERANK_CHUNK, metavar="PASSAGES",
                   help="encode and score the queries in chunks whose candidates name at most this many distinct "
                        "passages, so memory stays bounded for a run of any size (about PASSAGES x 200 tokens x "
                        "dim x 4 bytes at most); each finished chunk goes to OUT.rerank-journal, from which the "
                        "same command, run again after a crash, resumes (default %(default)s)")
    _add_model_args(p)
    p.set_defaults(func=cmd_rerank)


def _queries_of(candidates: dict, queries_path: str, run_path: str) -> dict:
    """The texts of the run's queries. Queries without text cannot be re-ranked: a warning counts them and
    their candidates (they are left out of the output), and an error says so when no query has text."""
    from fastrank.data import read_queries

    texts = read_queries(queries_path)
    missing = [q for q in candidates if q not in texts]
    if len(missing) == len(candidates):
        raise ValueError(f"none of the {len(candidates)} queries in {run_path} has a text in {queries_path} "
                         f"(run e.g. {sorted(candidates)[:3]}, queries e.g. {sorted(texts)[:3]})")
    if missing:
        dropped = sum(len(candidates[q]) for q in missing)
        print(f"fastrank rerank: warning: {len(missing)} of {len(candidates)} queries in {run_path} have no text in "
              f"{queries_path} (e.g. {sorted(missing)[:3]}); their {dropped} candidates are left out of the output",
              file=sys.stderr)
    return {q: texts[q] for q in candidates if q in texts}


def _check_rerank_args(args) -> None:
    from fastrank.data import check_tag

    _check_positive(args, "--depth", "--chunk-size")
    _check_out_file(args.out, inputs={"RUN": args.run, "QUERIES": args.queries, "CORPUS": args.corpus,
                                      "--lite": args.lite})
    if args.tag is not None:
        check_tag(args.tag, "--tag")
    _check_model_args(args)


def _rerank_journal(args):
    """The journal of this `rerank` command's finished chunks (:mod:`fastrank.rerank_chunks`), fingerprinted by
    everything its scores depend on, so that only the same command resumes from it; opened (and a journal of
    another command refused) before any model loads."""
    from fastrank.encoders import check_device
    from fastrank.rerank_chunks import Journal, file_identity

    inputs = [file_identity(p) for p in (args.run, args.queries, args.corpus, args.lite, args.model)]
    journal = Journal(args.out, {"inputs": inputs, "scorer": args.scorer, "token_dtype": args.token_dtype,
                                 "depth": args.depth, "chunk_size": args.chunk_size,
                                 "device": str(check_device(args.device, "--device"))})
    journal.open()
    return journal


def _resume_note(args, journal):
    def note(done: int, total: int) -> None:
        print(f"resuming {args.out}: {done} of {total} chunks were re-ranked before ({journal.path})", file=sys.stderr)
    return note


def _load_lite(path: str):
    """A LiteScorer from a ``torch.save``d state_dict; anything else is one ValueError naming ``--lite``."""
    import torch

    from fastrank.nn import LiteScorer

    if not Path(path).is_file():
        raise FileNotFoundError(f"--lite {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a state_dict")
        return LiteScorer.from_state_dict(state)
    except Exception as exc:  # torch.load raises whatever its unpickler or zip reader hit
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--lite {path}: not a LiteScorer checkpoint (a state_dict saved with "
                         f"torch.save(scorer.state_dict())): {reason}") from None


def _corpus_of(candidates: dict, queries: dict, corpus_path: str, run_path: str) -> dict:
    """The corpus, refused before a model loads when a candidate to re-rank has no text in it."""
    from fastrank.data import read_corpus

    corpus = read_corpus(corpus_path)
    missing = sorted({p for q in queries for p in candidates[q] if p not in corpus})
    if missing:
        raise ValueError(f"{corpus_path}: {len(missing)} candidate documents of {run_path} have no text there, "
                         f"e.g. {missing[:3]}")
    return corpus


def cmd_rerank(args) -> int:
    if args.scorer == "cross":
        return _rerank_cross(args)
    import torch

    from fastrank.data import read_run, write_run
    from fastrank.rerank import (append_below, encode_for_rerank, iter_padded_batches, pack_candidates, rerank_dense,
                                 rerank_lite, rerank_maxsim, split_depth)
    from fastrank.rerank_chunks import rerank_in_chunks
    from fastrank.trained import is_trained, load_trained

    _check_rerank_args(args)
    if args.token_dtype is not None and args.scorer not in ("maxsim", "lite"):
        raise ValueError(f"--token-dtype applies to --scorer maxsim and lite (the token embeddings), not --scorer "
                         f"{args.scorer}")
    if args.token_dtype == "int8" and args.scorer == "lite":
        raise ValueError("--token-dtype int8 is maxsim's (per-token quantized MaxSim); --scorer lite takes float32, "
                         "bfloat16 or float16")
    trained = load_trained(args.model) if is_trained(args.model) else None
    lite = None
    if args.lite is not None:
        if args.scorer != "lite":
            raise ValueError("--lite CHECKPOINT goes with --scorer lite")
        lite = _load_lite(args.lite)
    elif args.scorer == "lite":
        if trained is None or trained.lite is None:
            raise ValueError("--scorer lite needs a LITE head: --model DIR trained with `fastrank train --scorer lite`, "
                             "or --lite CHECKPOINT")
        lite = trained.lite
    if lite is not None and lite.proj is not None:
        token_dim = _model_dims(args.model)[1]
        if lite.proj.in_features != token_dim:
            where = f"--lite {args.lite}" if args.lite is not None else f"--model {args.model}"
            raise ValueError(f"{where}: its projection takes {lite.proj.in_features}-dim tokens, --model "
                             f"{args.model or 'default'} gives {token_dim}-dim ones")
    candidates = read_run(args.run)
    tail = {}
    if args.depth is not None:  # validated before any model loads
        candidates, tail = split_depth(candidates, args.depth)
    queries = _queries_of(candidates, args.queries, args.run)
    corpus = _corpus_of(candidates, queries, args.corpus, args.run)
    journal = _rerank_journal(args)
    enc = _encoder(args)
    dense = args.scorer == "dense"
    dtype = torch.float16 if enc.device.type == "cuda" else torch.float32
    if lite is not None:  # LITE's MLPs need the padded (lq, ld) grid
        dtype = getattr(torch, args.token_dtype) if args.token_dtype else dtype
        lite = lite.to(enc.device, dtype)

    def score_chunk(qids, progress):
        cands = {q: candidates[q] for q in qids}
        encoded = encode_for_rerank(enc, {q: queries[q] for q in qids}, corpus, cands, dense=dense, tokens=not dense,
                                    progress=progress)
        if dense:
            return rerank_dense(encoded, cands)
        if lite is not None:
            return rerank_lite(iter_padded_batches(encoded, cands, device=enc.device, dtype=dtype), lite)
        return rerank_maxsim(pack_candidates(encoded, cands, device=enc.device, token_dtype=args.token_dtype or dtype))

    qids = [q for q in queries if candidates.get(q)]
    run = rerank_in_chunks(qids, candidates, score_chunk, chunk_size=args.chunk_size, journal=journal,
                           on_resume=_resume_note(args, journal))
    reranked = sum(map(len, run.values()))
    run = append_below(run, {q: c for q, c in tail.items() if q in run})
    write_run(run, args.out, tag=args.tag or f"fastrank-{args.scorer}")
    journal.remove()
    kept = sum(map(len, run.values())) - reranked
    print(f"re-ranked {reranked} candidates for {len(run)} queries into {args.out}"
          + (f" (and kept {kept} beyond --depth {args.depth} below them, in first-stage order)" if kept else ""))
    return 0


def _rerank_cross(args) -> int:
    """``rerank --scorer cross``: no encoder pass, each (query, passage) pair through the cross-encoder."""
    from fastrank.data import read_run, write_run
    from fastrank.encoders import CrossEncoder
    from fastrank.rerank import append_below, split_depth
    from fastrank.rerank_chunks import rerank_in_chunks

    # Checked before anything loads: there is no default cross-encoder to fall back on.
    if args.model is None:
        raise ValueError("--scorer cross needs --model DIR, a local cross-encoder (sequence-classification) directory")
    for flag, value in (("--lite", args.lite), ("--token-dtype", args.token_dtype)):
        if value is not None:
            raise ValueError(f"{flag} does not apply to --scorer cross")
    _check_rerank_args(args)
    candidates = read_run(args.run)
    tail = {}
    if args.depth is not None:
        candidates, tail = split_depth(candidates, args.depth)
    queries = _queries_of(candidates, args.queries, args.run)
    corpus = _corpus_of(candidates, queries, args.corpus, args.run)
    journal = _rerank_journal(args)
    cross = CrossEncoder(args.model, device=args.device, batch_size=args.batch_size)
    qids = [q for q in queries if candidates.get(q)]
    run = rerank_in_chunks(
        qids, candidates, lambda chunk, progress: cross.rerank({q: queries[q] for q in chunk}, corpus,
                                                               {q: candidates[q] for q in chunk}, progress=progress),
        chunk_size=args.chunk_size, journal=journal, on_resume=_resume_note(args, journal))
    reranked = sum(map(len, run.values()))
    run = append_below(run, {q: c for q, c in tail.items() if q in run})
    write_run(run, args.out, tag=args.tag or "fastrank-cross")
    journal.remove()
    kept = sum(map(len, run.values())) - reranked
    print(f"re-ranked {reranked} candidates for {len(run)} queries into {args.out} with the cross-encoder {cross.path}"
          + (f" (and kept {kept} beyond --depth {args.depth} below them, in first-stage order)" if kept else ""))
    return 0


# -- demo --------------------------------------------------------------------------------------------
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="re-rank TREC DL'19 BM25 top-100 (embedded) with dense and fused MaxSim",
                       description="Re-rank BM25 candidates with MiniLM dense and MaxSim scoring; print nDCG@10 "
                                   "and RR(rel=2)@10 against BM25, and fused vs eager MaxSim docs/s.")
    p.add_argument("--data", help="a TREC DL folder of the same layout (default: the embedded DL 2019 set)")
    p.add_argument("--max-queries", type=int, help="only the first N queries, a quick look (default: all)")
    p.add_argument("--no-speed", action="store_true", help="skip the fused-vs-eager timing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_model_args(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from fastrank.demo import format_demo, run_demo

    _check_model_args(args)
    _check_positive(args, "--max-queries")
    result = run_demo(args.data, args.model, device=args.device, batch_size=args.batch_size,
                      max_queries=args.max_queries, speed=not args.no_speed)
    print(json.dumps(result, indent=1) if args.json else format_demo(result))
    return 0


def add_train(sub) -> None:
    from fastrank.train.cli import add_cli

    add_cli(sub)


def add_bench(sub) -> None:
    from fastrank.bench.cli import add_cli

    add_cli(sub)


SUBCOMMANDS = [add_index, add_retrieve, add_rerank, add_evaluate, add_demo, add_train, add_bench]


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:  # (0 is a default to print, not unset)
            return text
        return f"{text} (default: %(default)s)"


def _with_defaults(parser: argparse.ArgumentParser) -> None:
    """:class:`HelpFormatter` for this parser and every subcommand's (but a description laid out by hand)."""
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _with_defaults(sub)


def build_parser() -> argparse.ArgumentParser:
    from fastrank._version import __version__

    parser = argparse.ArgumentParser(prog="fastrank", description="Fused kernels for neural re-ranking.",
                                     epilog=PARENTS_RULE)
    parser.add_argument("--version", action="version", version=f"fastrank {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    _with_defaults(parser)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    from fastrank.progress import is_terminal

    args = build_parser().parse_args(argv)
    if not is_terminal():
        # transformers' and huggingface_hub's own bars (loading weights) would flood a log as fastrank's would;
        # they read this when transformers is imported, and a user's own setting wins.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    package = str(Path(__file__).resolve().parent)
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            # fastrank's own warnings (repeated lines in an input, a sparse IVF training set) read as the
            # command's; anyone else's keep Python's format.
            if str(Path(filename).resolve()).startswith(package):
                print(f"fastrank {args.command}: warning: {_one_line(message)}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            _make_output_parents(args)
            return args.func(args)
        except (OSError, ValueError, ImportError, RuntimeError) as exc:
            # Bad input or a missing optional dependency: one line naming the problem, not a traceback.
            print(f"fastrank {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
