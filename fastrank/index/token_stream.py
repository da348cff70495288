"""Streaming, resumable token-index builds: chunks of documents go to disk as they come, in bounded memory.

:class:`TokenIndexWriter` appends each chunk of token embeddings to the column files of a
:class:`~fastrank.index.columns.ColumnWriter` (tokens in the storage dtype, int8 scales, centroid codes, the
chunk's (centroid, document) pairs, offsets, ids) and commits it. What stays in memory is one chunk, stage 1
(centroids and the residual codec) and 8 bytes per document for refusing duplicate ids; nothing grows with
the tokens. :meth:`TokenIndexWriter.finish` turns the pairs into inverted lists, a pass at a time under a
memory budget, and publishes the index as complete; :meth:`fastrank.index.tokens.TokenIndex.load` maps it.

**Stage 1 trains on the first tokens of the stream**: the writer holds the first chunks (at most
``sample_tokens``, as given) until it has them, trains the centroids (and the residual codec) on a seeded random
subset of them, and only then writes those chunks. A reservoir sample over the whole stream would need the
stream twice (every document encoded before the first could be coded); a corpus in an order that puts one
topic first (sorted by source, say) should be shuffled, or given a larger ``sample_tokens``.

**Resuming**: building into a directory that holds a partial build made with the same options continues it:
:attr:`TokenIndexWriter.committed_documents` says how many documents of the stream are already stored and
:meth:`add` skips that many (``build_token_index`` and the CLI do so without encoding them). Every stored value
is a function of the token and of stage 1 alone, and stage 1 is stored before any chunk, so an interrupted and
resumed build writes the same bytes as one that ran through. A kill during stage 1's training loses at most
the k-means iteration under way: each one is checkpointed (:class:`Stage1Checkpoint`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from fastrank.index import tokens as ti
from fastrank.index.centroid_router import MIN_CENTROIDS, CentroidRouter
from fastrank.index.columns import ColumnWriter, StreamedBuild, check_header, publish_staged
from fastrank.index.kmeans import similarity_dtype
from fastrank.index.storage import META, STAGING_DIR, check_finite_rows, check_index_dir, fsync_path, is_int
from fastrank.progress import progress_bar

# The default stage-1 sample: the first tokens of the stream up to this many bytes as float32 (1M tokens at
# H = 128), held as given until stage 1 is trained.
SAMPLE_BYTES = 1 << 29
# Stage 1's training state while it trains (see Stage1Checkpoint); gone once stage 1 is committed.
CHECKPOINT = "stage1_checkpoint.npz"
# Inverted lists are built a range of centroids at a time, holding at most this many pairs (16 bytes each).
LIST_PASS_PAIRS = 1 << 24
# Rows of pairs read per block while building the lists.
PAIR_BLOCK = 1 << 22


def storage_columns(token_dtype: str, dim: int, stage1: str, ncentroids: int | None) -> dict[str, tuple[str, int]]:
    """The column files of a streamed token index: name -> (numpy dtype, row width)."""
    bits = ti.residual_bits(token_dtype)
    if bits is not None:
        tokens = ("uint8", dim * bits // 8)
    else:
        tokens = ({"float16": "float16", "bfloat16": "int16", "int8": "int8"}[token_dtype], dim)
    cols = {"tokens.bin": tokens, "offsets.bin": ("int64", 1), "ids.bin": ("uint8", 1),
            "id_offsets.bin": ("int64", 1)}
    if token_dtype == "int8":
        cols["scales.bin"] = ("float32", 1)
    if stage1 == "centroids":
        cols["codes.bin"] = (code_dtype(ncentroids), 1)
        cols["pairs.bin"] = ("int64", 1)
    return cols


def code_dtype(ncentroids: int) -> str:
    """uint16 codes while they fit (2 bytes a token saved), else int32."""
    return "uint16" if ncentroids <= 1 << 16 else "int32"


def id_hash(encoded: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little", signed=True)


class IdHashes:
    """The 64-bit hashes of every id stored, for refusing a duplicate in O(log n) with 8 bytes per id: sorted
    runs merged when two reach the same size (a log-structured merge), so adding n ids costs O(n log n)."""

    def __init__(self):
        self.runs: list[np.ndarray] = []

    def __contains__(self, h: int) -> bool:
        for run in self.runs:
            i = int(np.searchsorted(run, h))
            if i < run.size and int(run[i]) == h:
                return True
        return False

    def add(self, hashes: np.ndarray) -> None:
        run = np.sort(hashes.astype(np.int64))
        while self.runs and self.runs[-1].size <= run.size:
            run = np.sort(np.concatenate([self.runs.pop(), run]), kind="stable")
        self.runs.append(run)

    def __len__(self) -> int:
        return sum(r.size for r in self.runs)


class DuplicateIdError(ValueError):
    """An id given twice: ``id`` is the id, ``position`` its place among the ids of the :meth:`add` call that
    repeated it (the second occurrence when both are in that call)."""

    def __init__(self, message: str, docid, position: int | None = None):
        super().__init__(message)
        self.id, self.position = docid, position


def check_new_ids(ids: list, known: IdHashes, offset: int = 0) -> tuple[list[bytes], np.ndarray]:
    """The JSON bytes and 64-bit hashes of ``ids``, after refusing an id that is not an int or a string, one
    given twice among ``ids`` or one already in ``known`` (:class:`DuplicateIdError`, its position among
    ``ids`` plus ``offset``)."""
    encoded, err = encode_ids(ids)
    if err:
        raise ValueError(f"ids: {err}")
    hashes = np.array([id_hash(e) for e in encoded], dtype=np.int64)
    order = np.argsort(hashes, kind="stable")
    for j in np.flatnonzero(hashes[order][1:] == hashes[order][:-1]).tolist():
        a, b = int(order[j]), int(order[j + 1])
        if ids[a] == ids[b]:
            raise DuplicateIdError(f"ids: {ids[b]!r} appears twice (each document needs its own id)", ids[b],
                                   max(a, b) + offset)
    for j, h in enumerate(hashes.tolist()):
        if h in known:
            raise DuplicateIdError(f"ids: {ids[j]!r} is already in the index (each document needs its own id)",
                                   ids[j], j + offset)
    return encoded, hashes


def encode_ids(ids: list) -> tuple[list[bytes], str | None]:
    """Each id as its JSON bytes (ints stay ints, strings strings), or an error text naming a bad one."""
    out = []
    for i in ids:
        if isinstance(i, np.generic):
            i = i.item()
        if isinstance(i, bool) or not isinstance(i, (int, str)):
            return [], f"id {i!r} is neither an integer nor a string"
        out.append(json.dumps(i, ensure_ascii=False).encode("utf-8"))
    return out, None


class TokenIndexWriter(StreamedBuild):
    """Builds a token index in directory ``path`` from chunks of documents, committing each to disk.

    Args: as :class:`fastrank.index.tokens.TokenIndex` (``dim``, ``token_dtype`` among ``int8``, ``float16``,
    ``bfloat16``, ``residual1``, ``residual2``, ``residual4``; ``stage1``, ``ncentroids``, ``nprobe``,
    ``ndocs``, ``seed``), plus:

    - ``expected_tokens``: the corpus's token count if known (the CLI estimates it): sets the default
      ``ncentroids``. Without it and without ``ncentroids``, the count is that of the sample when the stream
      ends inside it, else the largest power of two giving every centroid 48 sample tokens.
    - ``sample_tokens``: stage 1's sample, the first tokens of the stream (default: :data:`SAMPLE_BYTES` worth
      of float32 tokens).
    - ``attach``: name -> text of files stored with the index (the CLI's ``encoder.json``).
    - ``stage1_from``: a directory holding trained ``centroids.npy`` (and ``codec.npy``) to use instead of
      training: the shards of a distributed build share one stage 1. ``build_id`` marks the index a shard
      belongs to.
    - ``replay``: when resuming, whether the chunks given to :meth:`add` start again from the stream's first
      document (the default: the writer skips the :attr:`committed_documents`) or, ``False``, from the first
      document not yet stored (the caller skipped them unencoded, as the CLI does).

    Use :meth:`add` per chunk, then :meth:`finish`; ``with`` closes the files on an error, leaving the last
    commit resumable. Options that differ from a partial build found in ``path`` are refused by name.
    """

    def __init__(self, path: str | os.PathLike, dim: int, *, token_dtype: str = "int8", stage1: str = "centroids",
                 ncentroids: int | None = None, nprobe: int | None = None, ndocs: int | None = None, seed: int = 0,
                 expected_tokens: int | None = None, sample_tokens: int | None = None,
                 expected_documents: int | None = None, attach: dict[str, str] | None = None,
                 replay: bool = True, stage1_from: str | os.PathLike | None = None, build_id: str | None = None,
                 progress: bool = True, label: str = "path"):
        if ti.residual_bits(token_dtype) is None and token_dtype not in ti.TOKEN_DTYPES:
            raise ValueError(f"token_dtype must be one of {ti.ALL_TOKEN_DTYPES}, got {token_dtype!r}")
        if ti.residual_bits(token_dtype) is not None:
            if stage1 != "centroids":
                raise ValueError(f"token_dtype {token_dtype!r} codes tokens against the centroids: it needs "
                                 "stage1='centroids'")
            if dim * ti.residual_bits(token_dtype) % 8:
                raise ValueError(f"dim {dim} x {ti.residual_bits(token_dtype)} bits is not a whole number of bytes")
        if stage1 not in ti.STAGE1:
            raise ValueError(f"stage1 must be one of {ti.STAGE1}, got {stage1!r}")
        for name, value in (("dim", dim), ("ncentroids", ncentroids), ("nprobe", nprobe), ("ndocs", ndocs),
                            ("expected_tokens", expected_tokens), ("sample_tokens", sample_tokens)):
            if value is not None and not (is_int(value) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if stage1 == "exhaustive" and ncentroids is not None:
            raise ValueError("ncentroids: an index with stage1='exhaustive' has no centroids")
        self.out, self.dim, self.token_dtype, self.stage1 = Path(path), int(dim), token_dtype, stage1
        self.nprobe = ti.DEFAULT_NPROBE if nprobe is None else nprobe
        self.ndocs, self.seed, self.progress, self.label = ndocs, int(seed), progress, label
        self.sample_tokens = sample_tokens or max(1, SAMPLE_BYTES // (4 * self.dim))
        self.header = {"dim": self.dim, "token_dtype": token_dtype, "stage1": stage1, "ncentroids": ncentroids,
                       "expected_tokens": expected_tokens, "sample_tokens": self.sample_tokens, "seed": self.seed,
                       "nprobe": self.nprobe, "ndocs": ndocs}
        self.requested_ncentroids, self.expected_tokens = ncentroids, expected_tokens
        self.attach = dict(attach or {})
        self.header["attach"] = {name: hashlib.sha256(text.encode("utf-8")).hexdigest()
                                 for name, text in sorted(self.attach.items())}
        self._columns: ColumnWriter | None = None
        self._buffer: list[tuple[list[bytes], torch.Tensor, torch.Tensor]] = []
        self._buffered_tokens = 0
        self._skip = 0
        self._hashes = IdHashes()
        self.centroids: torch.Tensor | None = None
        self.codec: tuple[torch.Tensor, torch.Tensor, bool] | None = None  # cutoffs, weights, normalize
        self.router: CentroidRouter | None = None
        self._documents = self._tokens = 0
        self._given = 0  # documents handed to add() by this run, skipped ones included
        self.expected_documents = expected_documents
        self._bar = None
        self._started = None
        if stage1_from is not None:
            if stage1 != "centroids":
                raise ValueError("stage1_from: an exhaustive index has no stage 1 to share")
            if ncentroids is not None:
                raise ValueError("ncentroids and stage1_from: the shared stage 1 fixes the centroids")
            from fastrank.index.storage import sha256_file

            self.header["stage1_sha256"] = sha256_file(Path(stage1_from) / "centroids.npy")
        if build_id is not None:
            self.header["build_id"] = build_id
        self.path = self._build_dir()
        self._made_dir = not self.path.exists()  # discard() removes the directory only if this run made it
        self._open_partial()
        if stage1_from is not None and self.centroids is None:
            self.centroids, self.codec, self.router = read_stage1(Path(stage1_from), token_dtype)
            self._commit_stage1()
        if not replay:
            self._given, self._skip = self._documents, 0

    # -- where the build happens -------------------------------------------------------------------------
    def _build_dir(self) -> Path:
        """OUT itself, unless OUT holds a complete index: then a staging directory inside it, moved over the
        old index once the new one is complete (the old one stays searchable meanwhile, and a reader never
        takes a mix of the two for an index: the old manifest's checksums refuse any replaced file)."""
        out, staging = self.out, self.out / STAGING_DIR
        if _format_of(out) == ti.FORMAT and _state(out) == "building" and (out / META).is_file():
            # Our own partial build: a file it staged and renamed into place just before a crash (stage 1, the
            # lists) is not in its manifest yet; the rerun writes it again, so it is not refused as foreign.
            return out
        cols = storage_columns(self.token_dtype, self.dim, self.stage1, self.requested_ncentroids or 1)
        names = [*cols, "centroids.npy", "codec.npy", "router_groups.npy", "router_centres.npy", "ivf_offsets.npy",
                 "ivf_docs.bin", CHECKPOINT, *self.attach]
        owned = check_index_dir(out, names, label=self.label)
        if _format_of(out) == "fastrank.ShardedTokenIndex":
            raise ValueError(f"{self.label} {out}: holds a sharded index ({_state(out)}), written by several processes "
                             "(torchrun); resume it with the same torchrun command, or pick another directory")
        if (staging / META).is_file():
            return staging
        if owned and (out / META).is_file() and _state(out) != "building":
            return staging
        return out

    def _publish_staged(self) -> None:
        self.path = publish_staged(self.path, self.out, self.label)

    # -- resuming --------------------------------------------------------------------------------------
    def _open_partial(self) -> None:
        meta = self.partial_meta()
        if meta is None or "header" not in meta:
            return
        extra = meta.get("extra", {})
        if self.stage1 == "centroids" and "ncentroids" not in extra:
            # Stage 1 was never committed: its sample is taken again from the stream, and its training goes on
            # from the k-means checkpoint when the manifest holds one. Other options are refused now, not
            # once the sample is in.
            if isinstance(meta["header"], dict):
                check_header(self.path, meta["header"], self.header, self.label)
            return
        cols = storage_columns(self.token_dtype, self.dim, self.stage1, extra.get("ncentroids", 1))
        self._columns = ColumnWriter(self.path, format=_format(), version=_version(), columns=cols,
                                     header=self.header, label=self.label)
        if self.stage1 == "centroids":
            self.centroids, self.codec, self.router = read_stage1(self.path, self.token_dtype)
            drop_checkpoint(self._columns)
        self._documents = self._columns.committed_documents
        self._tokens = self._columns.meta["columns"]["tokens.bin"]
        self._skip = self._documents
        # The ids already stored, hashed again (8 bytes each) so that duplicates across the restart are refused.
        n = self._documents
        id_off = self._columns.read_rows("id_offsets.bin", 0, n + 1)
        for s in range(0, n, 1 << 18):
            e = min(s + (1 << 18), n)
            raw = self._columns.read_rows("ids.bin", int(id_off[s]), int(id_off[e])).tobytes()
            base = int(id_off[s])
            self._hashes.add(np.array([id_hash(raw[int(id_off[j]) - base:int(id_off[j + 1]) - base])
                                       for j in range(s, e)], dtype=np.int64))

    # -- adding ----------------------------------------------------------------------------------------

    def add(self, tokens, ids: list | None = None) -> int:
        """Add a chunk: token embeddings (TokenEmbeddings or ``(vectors (T, H), offsets (N + 1,))``) and their
        ``ids`` (default: positions continuing from the documents already given). Documents a resumed build
        already stored are skipped. Returns how many documents of this chunk were stored or held."""
        tok = ti.as_token_embeddings(tokens, "tokens")
        n = len(tok)
        if n == 0 or self._finished:
            return 0
        if tok.vectors.shape[1] != self.dim:
            raise ValueError(f"tokens have dim {tok.vectors.shape[1]}, the index has dim {self.dim}")
        taken = self.take_ids(ids, n, "documents")
        if taken is None:
            return 0
        ids, dropped = taken
        if dropped:
            offsets = tok.offsets[dropped:] - tok.offsets[dropped]
            tok = ti.as_token_embeddings((tok.vectors[int(tok.offsets[dropped]):], offsets), "tokens")
            n -= dropped
        encoded, hashes = check_new_ids(ids, self._hashes, offset=dropped)
        vectors = tok.vectors.detach()
        check_finite_rows(vectors, "tokens", ti.token_row_of(tok.offsets, "document"))
        self._hashes.add(hashes)
        if self._bar is None:
            self._started, self._tokens_at_start = time.perf_counter(), self._tokens
            self._bar = progress_bar(total=self.expected_documents, desc="indexing", unit="doc",
                                     enabled=self.progress, initial=self._documents)
        if self.stage1 == "centroids" and self.centroids is None:
            # Held as given (a copy), so that held chunks are stored exactly as later ones are.
            self._buffer.append((encoded, vectors.clone(), tok.offsets.clone()))
            self._buffered_tokens += vectors.shape[0]
            if self._buffered_tokens >= self.sample_tokens:
                self._train_and_flush()
        else:
            self._write(encoded, vectors, tok.offsets)
        return n

    # -- stage 1 ---------------------------------------------------------------------------------------
    def _train_and_flush(self, stream_ended: bool = False) -> None:
        sample = torch.cat([b[1].float() for b in self._buffer])
        c = choose_ncentroids(sample.shape[0], stream_ended, self.requested_ncentroids, self.expected_tokens)
        # The build's manifest exists before training, so that the k-means checkpoints belong to it.
        self._open_columns(c)
        self.centroids, self.codec = train_stage1(sample, c, seed=self.seed, token_dtype=self.token_dtype,
                                                  progress=self.progress, checkpoint=Stage1Checkpoint(self._columns))
        del sample
        self._commit_stage1()
        buffered, self._buffer, self._buffered_tokens = self._buffer, [], 0
        for encoded, vectors, offsets in buffered:
            self._write(encoded, vectors, offsets)

    def _commit_stage1(self) -> None:
        c = self.centroids.shape[0]
        if self._columns is None:
            self._open_columns(c)
        if self.router is None and c >= MIN_CENTROIDS:
            self.router = CentroidRouter.train(self.centroids, self.seed)
        for name, array in stage1_arrays(self.centroids, self.codec, self.router).items():
            self._columns.write_file(name, _npy_writer(array))
        self._columns.commit(extra={"ncentroids": c})
        drop_checkpoint(self._columns)

    def _nearest(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is not None:
            return self.router.assign(x)
        return ti.nearest_centroid(x, self.centroids)

    def _open_columns(self, ncentroids: int | None) -> None:
        cols = storage_columns(self.token_dtype, self.dim, self.stage1, ncentroids)
        self._columns = ColumnWriter(self.path, format=_format(), version=_version(), columns=cols,
                                     header=self.header, label=self.label)
        if self._columns.rows("offsets.bin") == 0:
            self._columns.append("offsets.bin", np.zeros(1, dtype=np.int64))
            self._columns.append("id_offsets.bin", np.zeros(1, dtype=np.int64))
        for name, text in self.attach.items():
            self._columns.write_file(name, lambda p, text=text: p.write_text(text, encoding="utf-8"))
        self._columns.commit()

    # -- writing a chunk -------------------------------------------------------------------------------
    def _write(self, encoded: list[bytes], vectors: torch.Tensor, offsets: torch.Tensor) -> None:
        if self._columns is None:
            self._open_columns(None)
        cols = self._columns
        n, t = len(encoded), vectors.shape[0]
        bits = ti.residual_bits(self.token_dtype)
        codes = None
        for s in range(0, t, ti.CHUNK_TOKENS):
            x = vectors[s:s + ti.CHUNK_TOKENS]
            if self.token_dtype == "int8":
                from fastrank.ops.maxsim_packed import quantize_tokens

                q8, scales = quantize_tokens(x)
                cols.append("tokens.bin", q8.numpy())
                cols.append("scales.bin", scales.numpy())
                stored = q8
            elif bits is not None:
                from fastrank.ops.residual import compress_residuals

                x = x.float()
                c = self._nearest(x)
                cols.append("tokens.bin", compress_residuals(x, c, self.centroids, self.codec[0], bits).numpy())
                codes = c
            else:
                stored = x.to(torch.float16 if self.token_dtype == "float16" else torch.bfloat16)
                cols.append("tokens.bin", (stored.view(torch.int16) if self.token_dtype == "bfloat16"
                                           else stored).numpy())
            if self.stage1 == "centroids":
                if bits is None:
                    codes = self._nearest(stored)
                cols.append("codes.bin", codes.numpy().astype(cols.columns["codes.bin"][0]))
                self._append_pairs(codes, offsets, s, s + x.shape[0])
        cols.append("offsets.bin", (offsets[1:] + self._tokens).numpy())
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=n)
        base = cols.rows("ids.bin")
        cols.append("ids.bin", np.frombuffer(b"".join(encoded), dtype=np.uint8))
        cols.append("id_offsets.bin", base + np.cumsum(lengths))
        self._documents += n
        self._tokens += t
        cols.commit(chunk={"documents": n, "tokens": t})
        self._bar.update(n)
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        self._bar.set_postfix_str(f"{self._tokens:,} tokens, {(self._tokens - self._tokens_at_start) / elapsed:,.0f} "
                                  "tokens/s", refresh=False)

    def _append_pairs(self, codes: torch.Tensor, offsets: torch.Tensor, s: int, e: int) -> None:
        """The (centroid, document) pairs of token rows s:e of a chunk, deduplicated and sorted, as
        ``centroid << 32 | document``: what the inverted lists are built from at the end."""
        first = int(torch.searchsorted(offsets, torch.tensor(s), right=True)) - 1
        last = int(torch.searchsorted(offsets, torch.tensor(e - 1), right=True)) - 1
        local = offsets[first:last + 2].clamp(s, e) - s
        doc = torch.repeat_interleave(torch.arange(first, last + 1), local.diff(), output_size=e - s)
        keys = torch.unique((codes.long() << 32) | (doc + self._documents))
        self._columns.append("pairs.bin", keys.numpy())

    # -- finishing -------------------------------------------------------------------------------------
    def finish(self) -> Path:
        """Write what is held, build the inverted lists and publish the index as complete."""
        if self._finished:
            return self.out
        if self.stage1 == "centroids" and self.centroids is None:
            if not self._buffer:
                self._raise_empty()
            self._train_and_flush(stream_ended=True)
        if self._columns is None or self._documents == 0:
            self._raise_empty()
        cols = self._columns
        fields = {"documents": self._documents, "tokens": self._tokens, "dim": self.dim,
                  "token_dtype": self.token_dtype, "stage1": self.stage1, "nprobe": self.nprobe,
                  "ndocs": self.ndocs, "seed": self.seed,
                  "ncentroids": cols.meta["extra"].get("ncentroids")}
        drop = ()
        if self.stage1 == "centroids":
            self._build_lists(fields["ncentroids"])
            drop = ("pairs.bin",)
        cols.finish(fields, drop=drop)
        self.close()
        if self.path != self.out:
            self._publish_staged()
        return self.out

    def _raise_empty(self):
        raise ValueError("the stream held no document: nothing to index")

    def _build_lists(self, c: int) -> None:
        """Inverted lists from the pairs column: ``ivf_offsets.npy`` (C + 1) and ``ivf_docs.bin`` (int32
        documents, ascending within each list), a range of centroids per pass so that at most
        :data:`LIST_PASS_PAIRS` pairs are held at a time."""
        cols = self._columns
        total = cols.rows("pairs.bin")
        counts = np.zeros(c, dtype=np.int64)
        for s in range(0, total, PAIR_BLOCK):
            keys = cols.read_rows("pairs.bin", s, min(s + PAIR_BLOCK, total))
            counts += np.bincount((keys >> 32).astype(np.int64), minlength=c)
        ivf_offsets = np.zeros(c + 1, dtype=np.int64)
        np.cumsum(counts, out=ivf_offsets[1:])

        def passes():
            lo = 0
            while lo < c:
                hi = int(np.searchsorted(ivf_offsets, ivf_offsets[lo] + LIST_PASS_PAIRS, side="right")) - 1
                hi = min(max(hi, lo + 1), c)
                parts = []
                for s in range(0, total, PAIR_BLOCK):
                    keys = cols.read_rows("pairs.bin", s, min(s + PAIR_BLOCK, total))
                    code = keys >> 32
                    parts.append(keys[(code >= lo) & (code < hi)])
                keys = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
                # Chunks hold ascending documents, so a stable sort by centroid keeps each list ascending.
                keys = keys[np.argsort(keys >> 32, kind="stable")]
                yield (keys & 0xFFFFFFFF).astype(np.int32)
                lo = hi

        cols.write_large_file("ivf_docs.bin", passes(), dtype="int32")
        cols.write_file("ivf_offsets.npy", _npy_writer(ivf_offsets))


def choose_ncentroids(sample_tokens: int, stream_ended: bool, requested: int | None = None,
                      expected_tokens: int | None = None) -> int:
    """Stage 1's centroid count: ``requested``, else :func:`~fastrank.index.tokens.default_ncentroids` of
    ``expected_tokens``, else of the whole corpus when the stream ended inside the sample, else the largest
    power of two giving each centroid 48 sample tokens."""
    if requested is not None:
        c = requested
    elif expected_tokens is not None:
        c = ti.default_ncentroids(expected_tokens)
    elif stream_ended:
        c = ti.default_ncentroids(sample_tokens)
    else:
        c = 2 ** int(math.log2(max(1, sample_tokens // ti.KMEANS_POINTS_PER_CENTROID)))
    if c > sample_tokens:
        raise ValueError(f"ncentroids={c} exceeds the {sample_tokens} tokens of the stage-1 sample; lower "
                         "ncentroids or raise sample_tokens")
    return int(c)


def train_stage1(sample: torch.Tensor, ncentroids: int, *, seed: int, token_dtype: str, progress: bool = False,
                 checkpoint: "Stage1Checkpoint | None" = None
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Centroids (spherical k-means on a seeded subset of ``sample``) and, for residual storage, the codec
    (bucket cutoffs and weights) trained on that subset's residuals. ``checkpoint`` keeps each k-means
    iteration and the codec's assignment, so that a run killed during training resumes where it was."""
    t = sample.shape[0]
    g = torch.Generator().manual_seed(seed)
    n_sample = min(t, ncentroids * ti.KMEANS_POINTS_PER_CENTROID)
    rows = torch.randperm(t, generator=g)[:n_sample].sort().values
    x = sample.index_select(0, rows).float().contiguous()
    if checkpoint is not None:
        checkpoint.bind(x, ncentroids)
    centroids = ti.spherical_kmeans(x, ncentroids, iters=ti.KMEANS_ITERS, generator=g, progress=progress,
                                    checkpoint=checkpoint)
    bits = ti.residual_bits(token_dtype)
    if bits is None:
        return centroids, None
    from fastrank.ops.residual import train_residual_codec

    state = checkpoint.load() if checkpoint is not None else None
    if state is not None and "codes" in state and state["codes"].shape == (x.shape[0],):
        codes = torch.from_numpy(state["codes"]).long()
    else:
        codes = ti.nearest_centroid(x, centroids).long()
        if checkpoint is not None and state is not None:
            checkpoint.save({**state, "codes": codes.to(torch.int32).numpy()})
    cutoffs, weights = train_residual_codec(x - centroids[codes], bits)
    # Unit-length tokens (every sampled norm within 1% of 1, as a normalising encoder gives) are decompressed
    # back to unit length when scored, as ColBERTv2 does: on SciFact's 2-bit index that lifts nDCG@10 from
    # 0.7552 to 0.7573 (float16 0.7684). Tokens of other lengths keep the length their residuals give.
    unit = bool(((x.norm(dim=1) - 1).abs() <= 0.01).all())
    return centroids, (cutoffs, weights, unit)


class Stage1Checkpoint:
    """Stage 1's training state, kept in the build's directory under its manifest so that a build killed
    during k-means (minutes at 100M tokens) resumes from the last iteration rather than from the start.

    One file, :data:`CHECKPOINT`, rewritten after each iteration (staged, fsynced, renamed, and listed in the
    manifest by a commit) and removed once stage 1 is committed. It names the training it belongs to (a
    sha256 of the sampled tokens, the centroid count, the iterations and the product dtype); a run whose
    training differs ignores it and overwrites it."""

    def __init__(self, columns: ColumnWriter):
        self.columns, self.key = columns, None
        self._last: dict[str, np.ndarray] | None = None  # what this run saved or read last: not read again

    def bind(self, x: torch.Tensor, ncentroids: int) -> None:
        self._last = None
        digest = hashlib.sha256(x.numpy().data)
        digest.update(f"{tuple(x.shape)} {ncentroids} {ti.KMEANS_ITERS} {similarity_dtype(x.device)}".encode())
        self.key = digest.hexdigest()

    def load(self) -> dict[str, np.ndarray] | None:
        if self._last is not None:
            return self._last
        f = self.columns.path / CHECKPOINT
        if self.key is None or CHECKPOINT not in self.columns.meta["sha256"] or not f.is_file():
            return None
        try:
            with np.load(f, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except (OSError, ValueError, zipfile.BadZipFile):
            return None  # unreadable: training starts over and rewrites it
        if str(arrays.pop("key", "")) != self.key or not {"iteration", "centroids", "generator"} <= set(arrays):
            return None
        self._last = arrays
        return arrays

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.savez(f, key=np.array(self.key), **arrays)

        self.columns.write_file(CHECKPOINT, write)
        self.columns.commit()
        self._last = arrays


def drop_checkpoint(columns: ColumnWriter) -> None:
    """Remove stage 1's training checkpoint once stage 1 is committed: the file first, then its manifest entry
    (a kill between the two leaves an entry without a file, which the next run drops the same way)."""
    if CHECKPOINT in columns.meta["sha256"]:
        (columns.path / CHECKPOINT).unlink(missing_ok=True)
        del columns.meta["sha256"][CHECKPOINT]
        columns.commit()


def stage1_arrays(centroids: torch.Tensor, codec, router) -> dict[str, np.ndarray]:
    """The files of stage 1: centroids, the residual codec (cutoffs, weights, then 1 when decompressed tokens
    are renormalised) and the router's groups."""
    arrays = {"centroids.npy": centroids.numpy()}
    if codec is not None:
        arrays["codec.npy"] = torch.cat([codec[0], codec[1], torch.tensor([1.0 if codec[2] else 0.0])]).numpy()
    if router is not None:
        arrays["router_groups.npy"] = router.arrays()["groups"].numpy()
        arrays["router_centres.npy"] = router.arrays()["centres"].numpy()
    return arrays


def read_stage1(path: Path, token_dtype: str):
    """``(centroids, codec or None, router or None)`` from the stage-1 files in directory ``path``."""
    centroids = torch.from_numpy(np.load(path / "centroids.npy", allow_pickle=False))
    codec = router = None
    bits = ti.residual_bits(token_dtype)
    if bits is not None:
        arr = np.load(path / "codec.npy", allow_pickle=False)
        nb = 2 ** bits
        codec = (torch.from_numpy(arr[:nb - 1].copy()), torch.from_numpy(arr[nb - 1:2 * nb - 1].copy()),
                 bool(arr[2 * nb - 1] > 0.5))
    if (path / "router_groups.npy").is_file():
        router = CentroidRouter(centroids, torch.from_numpy(np.load(path / "router_groups.npy", allow_pickle=False)),
                                torch.from_numpy(np.load(path / "router_centres.npy", allow_pickle=False)))
    return centroids, codec, router


def write_stage1(path: Path, centroids: torch.Tensor, codec, seed: int = 0) -> dict[str, str]:
    """Write stage 1 (centroids, codec, and the router's groups when there are enough centroids) into
    directory ``path``, each file staged and renamed; returns their sha256."""
    from fastrank.index.storage import partial_name, sha256_file

    router = CentroidRouter.train(centroids, seed) if centroids.shape[0] >= MIN_CENTROIDS else None
    sums = {}
    for name, arr in stage1_arrays(centroids, codec, router).items():
        tmp = partial_name(path, name)
        _npy_writer(arr)(tmp)
        fsync_path(tmp)
        os.replace(tmp, path / name)
        sums[name] = sha256_file(path / name)
    fsync_path(path, directory=True)
    return sums


def _manifest_field(path: Path, field: str):
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get(field) if isinstance(meta, dict) else None


def _state(path: Path) -> str | None:
    return _manifest_field(path, "state")


def _format_of(path: Path) -> str | None:
    return _manifest_field(path, "format")


def _npy_writer(array: np.ndarray):
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, array, allow_pickle=False)
    return write


def _format() -> str:
    return ti.FORMAT


def _version() -> int:
    return ti.STREAM_VERSION


def build_token_index(path: str | os.PathLike, chunks: Iterable, **options) -> Path:
    """Build a token index in ``path`` from an iterable of chunks, each TokenEmbeddings, a ``(vectors,
    offsets)`` pair, or ``(tokens, ids)``; ``options`` go to :class:`TokenIndexWriter`. Resumes a partial build
    of the same options found there (the chunks it already stored are skipped unencoded only if the caller
    skips them: see :attr:`TokenIndexWriter.committed_documents`)."""
    with TokenIndexWriter(path, **options) as writer:
        for chunk in chunks:
            if isinstance(chunk, tuple) and len(chunk) == 2 and not isinstance(chunk[0], torch.Tensor) \
                    and not isinstance(chunk[0], np.ndarray):
                writer.add(chunk[0], chunk[1])
            else:
                writer.add(chunk)
        return writer.finish()
