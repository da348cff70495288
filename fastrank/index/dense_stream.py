"""Streaming, resumable dense-index builds: one vector per document, to disk as it comes, in bounded memory.

:class:`DenseIndexWriter` appends each chunk of vectors to the column files of a
:class:`~fastrank.index.columns.ColumnWriter` (``vectors.bin`` as float32 rows, the ids' JSON in ``ids.bin`` with
``id_offsets.bin``) and commits it: a SIGKILL, a power cut or a full disk leaves the last commit, and the same
build resumes from it. :meth:`DenseIndexWriter.finish` turns the columns into the index and publishes it as
complete; :meth:`fastrank.index.dense.DenseIndex.load` maps it (the same class as a saved index).

What each kind becomes, and what the build holds in RAM (besides one chunk and 8 bytes per document for
refusing duplicate ids):

- ``flat``: ``vectors.bin`` is the index. FAISS's exact kernel (or torch, a block of documents at a time)
  searches the mapped rows; there is no FAISS file. RAM: nothing more.
- ``ivf_flat``, ``ivf_pq``: the quantizer (and PQ codebooks) is trained on the first vectors of the stream
  (:func:`training_documents` of them) as soon as they are committed, read back from the column; from then on
  every chunk is assigned to its lists (and PQ-coded) as it is written. ``finish`` writes ``index.faiss`` in
  FAISS's own layout (the trained index's header, then the inverted lists), each list's codes and ids written
  at their offsets a block of rows at a time, so the lists are never in RAM; ``DenseIndex.load`` maps them with
  ``IO_FLAG_MMAP``. RAM: the training sample while training (at most :data:`SAMPLE_BYTES`), then the quantizer
  and a block.
- ``hnsw``: FAISS builds the graph in RAM (there is no on-disk HNSW construction): ``finish`` adds the vectors
  from the column a block at a time and writes ``index.faiss``. RAM: the whole index at finish, as in memory.

**Training on the first vectors of the stream** (IVF): a corpus in an order that puts one topic first (sorted
by source, say) should be shuffled, or given ``nlist`` with a smaller sample. ``nlist`` defaults to that of
:class:`~fastrank.index.dense.DenseIndex` for ``expected_documents`` documents when given (it then is an
option of the build, checked on resume), else for the sample.

**Resuming**: building into a directory that holds a partial build made with the same options continues it:
:attr:`DenseIndexWriter.committed_documents` says how many documents of the stream are already stored and
:meth:`~DenseIndexWriter.add` skips that many (``replay=False``: the caller skipped them). Every stored byte is a
function of the vectors and of the trained quantizer, which is trained on the same first vectors, so an
interrupted and resumed build writes the same bytes as one that ran through.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from fastrank.index import dense
from fastrank.index.columns import ColumnWriter, StreamedBuild, build_directory, manifest_state, publish_staged
from fastrank.index.storage import META, check_finite_rows, is_int
from fastrank.index.token_stream import IdHashes, check_new_ids, id_hash
from fastrank.progress import progress_bar

# The IVF training sample is at most this many bytes of float32 vectors (1M vectors at dim 128).
SAMPLE_BYTES = 1 << 28
# FAISS's k-means trains on at most this many points per centroid (it subsamples the rest away).
MAX_POINTS_PER_CENTROID = 256
# Rows are read back from the columns (to train, assign, write the lists) in blocks of about this many bytes.
BLOCK_BYTES = 1 << 25
# HNSW is built from the column in blocks of this many vectors: DenseIndex.add's batch_size, so that the same
# vectors make the same graph (HNSW inserts each batch's vectors by level).
HNSW_BLOCK = 65536


def storage_columns(kind: str, dim: int, code_size: int | None) -> dict[str, tuple[str, int]]:
    """The column files of a streamed dense index: name -> (numpy dtype, row width). IVF kinds also keep, while
    building, each vector's list (``lists.bin``), its PQ code (``codes.bin``, IVF-PQ) and the trained empty
    index as FAISS serialises it (``trained.bin``), all dropped at finish."""
    cols = {"vectors.bin": ("float32", dim), "ids.bin": ("uint8", 1), "id_offsets.bin": ("int64", 1)}
    if kind in dense.IVF_KINDS:
        cols["lists.bin"] = ("int64", 1)
        cols["trained.bin"] = ("uint8", 1)
    if kind == "ivf_pq":
        cols["codes.bin"] = ("uint8", code_size)
    return cols


def pq_code_size(pq_m: int, pq_bits: int) -> int:
    """Bytes of one PQ code, as FAISS's ProductQuantizer packs ``pq_m`` codes of ``pq_bits`` bits."""
    return (pq_m * pq_bits + 7) // 8


def default_nlist(n: int) -> int:
    """DenseIndex's default number of IVF lists for ``n`` documents (``4 sqrt(n)``, 39+ points per list)."""
    return max(1, min(int(4 * np.sqrt(n)), n // dense.FAISS_POINTS_PER_CENTROID))


def training_documents(kind: str, dim: int, nlist: int | None = None, pq_bits: int = 8,
                       expected_documents: int | None = None) -> int:
    """How many of the stream's first vectors an IVF index trains on (0 for flat and HNSW): as many as FAISS's
    k-means uses (:data:`MAX_POINTS_PER_CENTROID` per list or PQ codebook entry) when ``nlist`` is known (given,
    or from ``expected_documents``), at most :data:`SAMPLE_BYTES` of them."""
    if kind not in dense.IVF_KINDS:
        return 0
    cap = max(1, SAMPLE_BYTES // (4 * dim))
    lists = nlist if nlist is not None else (default_nlist(expected_documents) if expected_documents else None)
    if lists is None:
        return cap
    centroids = max(lists, 2 ** pq_bits if kind == "ivf_pq" else 0)
    return min(cap, MAX_POINTS_PER_CENTROID * centroids)


def _as_vectors(vectors, dim: int) -> np.ndarray:
    """A (N, dim) float matrix (numpy or torch, any float dtype) as contiguous float32 numpy."""
    if isinstance(vectors, torch.Tensor):
        if not vectors.is_floating_point():
            raise TypeError(f"vectors must be a floating-point tensor, got {vectors.dtype}")
        x = vectors.detach().to("cpu", torch.float32).numpy()
    else:
        x = np.asarray(vectors)
        if x.dtype.kind != "f":
            raise TypeError(f"vectors must be a floating-point array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-D (N, dim), got shape {tuple(x.shape)}")
    if x.shape[1] != dim:
        raise ValueError(f"vectors has dim {x.shape[1]}, the index has dim {dim}")
    return np.ascontiguousarray(x, dtype=np.float32)


class DenseIndexWriter(StreamedBuild):
    """Builds a dense index in directory ``path`` from chunks of vectors, committing each to disk.

    Args: as :class:`fastrank.index.dense.DenseIndex` (``dim``, ``kind``, ``metric``, ``nlist``, ``nprobe``,
    ``pq_m``, ``pq_bits``, ``hnsw_m``, ``ef_construction``, ``ef_search``, ``seed``), plus:

    - ``expected_documents``: the corpus's size if known (the progress bar's total); for an IVF index without
      ``nlist`` it sets ``nlist`` (DenseIndex's default for that many documents) and the training sample.
    - ``attach``: name -> text of files stored with the index (the CLI's ``encoder.json``).
    - ``replay``: when resuming, whether the chunks given to :meth:`add` start again from the stream's first
      document (the default: the writer skips the :attr:`committed_documents`) or, ``False``, from the first
      document not yet stored (the caller skipped them unencoded).

    Use :meth:`add` per chunk, then :meth:`finish`; ``with`` closes the files on an error, leaving the last
    commit resumable. Options that differ from a partial build found in ``path`` are refused by name. When
    ``path`` holds a complete index, the new one is built inside it (``.fastrank-building``) and replaces it
    only once complete.
    """

    def __init__(self, path: str | os.PathLike, dim: int, kind: str = "flat", metric: str = "ip", *,
                 nlist: int | None = None, nprobe: int = 16, pq_m: int | None = None, pq_bits: int = 8,
                 hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128, seed: int = 0,
                 expected_documents: int | None = None, attach: dict[str, str] | None = None, replay: bool = True,
                 progress: bool = True, label: str = "path"):
        for name, value in (("dim", dim), ("nprobe", nprobe), ("pq_bits", pq_bits), ("hnsw_m", hnsw_m),
                            ("ef_construction", ef_construction), ("ef_search", ef_search)):
            if not (is_int(value) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("nlist", nlist), ("pq_m", pq_m), ("expected_documents", expected_documents)):
            if value is not None and not (is_int(value) and value >= 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.params = dict(nlist=nlist, nprobe=nprobe, pq_m=pq_m, pq_bits=pq_bits, hnsw_m=hnsw_m,
                           ef_construction=ef_construction, ef_search=ef_search, seed=seed)
        self.out, self.dim, self.kind, self.metric = Path(path), int(dim), kind, metric
        self._template(nlist)  # DenseIndex checks kind, metric, pq_m, and that FAISS is there if the kind needs it
        self.progress, self.label, self.expected_documents = progress, label, expected_documents
        self.code_size = {"ivf_flat": 4 * self.dim,
                          "ivf_pq": pq_code_size(pq_m or dense.default_pq_m(self.dim), pq_bits)}.get(kind)
        self.train_documents = training_documents(kind, self.dim, nlist, pq_bits, expected_documents)
        self.attach = dict(attach or {})
        self.header = {"dim": self.dim, "kind": kind, "metric": metric, **self.params,
                       "expected_documents": expected_documents if kind in dense.IVF_KINDS and nlist is None else None,
                       "train_documents": self.train_documents,
                       "attach": {name: hashlib.sha256(text.encode("utf-8")).hexdigest()
                                  for name, text in sorted(self.attach.items())}}
        self.columns = storage_columns(kind, self.dim, self.code_size)
        self._columns: ColumnWriter | None = None
        self._trained = None  # the trained empty FAISS IVF index
        self._hashes = IdHashes()
        self._all_int = True
        self._documents = 0
        self._given = 0  # documents handed to add() by this run, skipped ones included
        self._skip = 0
        self._bar = None
        self._started = 0.0
        self.path = build_directory(self.out, self._names(), label=label)
        self._made_dir = not self.path.exists()  # discard() removes the directory only if this run made it
        self._open_partial()
        if not replay:
            self._given, self._skip = self._documents, 0

    def _template(self, nlist: int | None) -> dense.DenseIndex:
        """An empty DenseIndex of this build's options: what validates them, trains IVF and builds HNSW (a flat
        build needs no FAISS: its index is the vectors column)."""
        return dense.DenseIndex(self.dim, self.kind, self.metric, **{**self.params, "nlist": nlist},
                                backend="torch" if self.kind == "flat" else "faiss")

    def _names(self) -> list[str]:
        """The files this build writes in ``out``, that ``out`` must not hold unless its manifest owns them.
        ``index.faiss`` and the attached files are renamed into place just before the commit that records
        them: in a partial dense build that a killed run left, they are that build's, not the user's."""
        try:
            meta = json.loads((self.out / META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        ours = isinstance(meta, dict) and meta.get("format") == dense.FORMAT and manifest_state(self.out) == "building"
        return list(self.columns) if ours else [*self.columns, "index.faiss", *self.attach]

    # -- resuming --------------------------------------------------------------------------------------
    def _open_partial(self) -> None:
        meta = self.partial_meta()
        if meta is None or meta.get("format") != dense.FORMAT:
            return
        self._open_columns()
        cols = self._columns
        self._documents = cols.committed_documents
        self._skip = self._documents
        self._all_int = cols.meta.get("extra", {}).get("id_type", "int") == "int"
        if "nlist" in cols.meta.get("extra", {}):
            trained = cols.read_rows("trained.bin", 0, cols.rows("trained.bin"))
            self._trained = dense.import_faiss().deserialize_index(trained)
            self._catch_up()
            cols.commit()
        # The ids already stored, hashed again (8 bytes each) so that duplicates across the restart are refused.
        n = self._documents
        id_off = cols.read_rows("id_offsets.bin", 0, n + 1)
        for s in range(0, n, 1 << 18):
            e = min(s + (1 << 18), n)
            raw = cols.read_rows("ids.bin", int(id_off[s]), int(id_off[e])).tobytes()
            base = int(id_off[s])
            self._hashes.add(np.array([id_hash(raw[int(id_off[j]) - base:int(id_off[j + 1]) - base])
                                       for j in range(s, e)], dtype=np.int64))

    def _open_columns(self) -> None:
        self._columns = ColumnWriter(self.path, format=dense.FORMAT, version=dense.STREAM_VERSION,
                                     columns=self.columns, header=self.header, label=self.label)
        if self._columns.rows("id_offsets.bin") == 0:
            self._columns.append("id_offsets.bin", np.zeros(1, dtype=np.int64))
            for name, text in self.attach.items():
                self._columns.write_file(name, lambda p, text=text: p.write_text(text, encoding="utf-8"))
            self._columns.commit()

    # -- adding ----------------------------------------------------------------------------------------

    def add(self, vectors, ids: list | None = None) -> int:
        """Add a chunk: ``vectors`` (N, dim), numpy or torch, any float dtype (stored as float32), and their
        ``ids`` (default: positions continuing from the documents already given). Documents a resumed build
        already stored are skipped. Returns how many documents of this chunk were stored."""
        x = _as_vectors(vectors, self.dim)
        n = x.shape[0]
        if n == 0 or self._finished:
            return 0
        taken = self.take_ids(ids, n, "vectors")
        if taken is None:
            return 0
        ids, drop = taken
        x, n = x[drop:], n - drop
        encoded, hashes = check_new_ids(ids, self._hashes, offset=drop)
        check_finite_rows(x, "vectors")
        if self._bar is None:
            self._started, self._at_start = time.perf_counter(), self._documents
            self._bar = progress_bar(total=self.expected_documents, desc="indexing", unit="doc",
                                     enabled=self.progress, initial=self._documents)
        self._write(encoded, ids, x)
        self._hashes.add(hashes)
        return n

    def _write(self, encoded: list[bytes], ids: list, x: np.ndarray) -> None:
        if self._columns is None:
            self._open_columns()
        cols = self._columns
        n = x.shape[0]
        cols.append("vectors.bin", x)
        if self._trained is not None:
            self._append_lists(x)
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=n)
        base = cols.rows("ids.bin")
        cols.append("ids.bin", np.frombuffer(b"".join(encoded), dtype=np.uint8))
        cols.append("id_offsets.bin", base + np.cumsum(lengths))
        self._all_int = self._all_int and all(is_int(i) or isinstance(i, np.integer) for i in ids)
        self._documents += n
        cols.commit(chunk={"documents": n}, extra={"id_type": "int" if self._all_int else "str"})
        if self.kind in dense.IVF_KINDS and self._trained is None and \
                cols.rows("vectors.bin") >= self.train_documents:
            self._train()
        self._bar.update(n)
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        self._bar.set_postfix_str(f"{(self._documents - self._at_start) / elapsed:,.0f} docs/s", refresh=False)

    # -- IVF: training and assigning -------------------------------------------------------------------
    def _block_rows(self) -> int:
        return max(1, BLOCK_BYTES // (4 * self.dim))

    def _train(self) -> None:
        """Train the quantizer on the first :attr:`train_documents` vectors (fewer when the stream ended
        before), store it, and assign the vectors written so far to their lists, in one commit."""
        cols = self._columns
        m = min(self.train_documents, cols.rows("vectors.bin"))
        nlist = self.params["nlist"]
        if nlist is None and self.expected_documents is not None:
            nlist = max(1, min(default_nlist(self.expected_documents), m // dense.FAISS_POINTS_PER_CENTROID))
        template = self._template(nlist)
        template.train(cols.read_rows("vectors.bin", 0, m))
        faiss = dense.import_faiss()
        trained = faiss.serialize_index(template.faiss_index)
        ivf_layout(trained.tobytes(), template.params["nlist"], self.code_size)  # this FAISS's layout is known
        cols.append("trained.bin", trained)
        self._trained = template.faiss_index
        self._catch_up()
        cols.commit(extra={"nlist": template.params["nlist"]})

    def _catch_up(self) -> None:
        """Assign (and PQ-code) the committed vectors that have no list yet, a block at a time."""
        cols = self._columns
        step = self._block_rows()
        for s in range(cols.rows("lists.bin"), cols.rows("vectors.bin"), step):
            self._append_lists(cols.read_rows("vectors.bin", s, min(s + step, cols.rows("vectors.bin"))))

    def _append_lists(self, x: np.ndarray) -> None:
        faiss = dense.import_faiss()
        ivf = self._trained
        _, lists = faiss.downcast_index(ivf.quantizer).search(x, 1)
        lists = np.ascontiguousarray(lists.reshape(-1))
        self._columns.append("lists.bin", lists)
        if self.kind == "ivf_pq":
            # What IndexIVFPQ.add stores: the PQ code of each vector's residual to its list's centroid.
            codes = np.empty((x.shape[0], self.code_size), dtype=np.uint8)
            ivf.encode_vectors(x.shape[0], faiss.swig_ptr(x), faiss.swig_ptr(lists), faiss.swig_ptr(codes))
            self._columns.append("codes.bin", codes)

    # -- finishing -------------------------------------------------------------------------------------
    def finish(self) -> Path:
        """Build the index from the columns (IVF lists, HNSW graph; nothing for flat) and publish it."""
        if self._finished:
            return self.out
        if self._columns is None or self._documents == 0:
            raise ValueError("the stream held no document: nothing to index")
        if self.kind in dense.IVF_KINDS and self._trained is None:
            self._train()
        cols = self._columns
        params = dict(self.params)
        if self.kind in dense.IVF_KINDS:
            params["nlist"] = cols.meta["extra"]["nlist"]
            self._write_ivf(params["nlist"])
            drop = ("vectors.bin", "lists.bin", "trained.bin", *(("codes.bin",) if self.kind == "ivf_pq" else ()))
        elif self.kind == "hnsw":
            self._write_hnsw()
            drop = ("vectors.bin",)
        else:
            drop = ()
        fields = {"documents": self._documents, "ntotal": self._documents, "dim": self.dim, "kind": self.kind,
                  "metric": self.metric, "params": params, "id_type": "int" if self._all_int else "str",
                  "data_file": "vectors.bin" if self.kind == "flat" else "index.faiss"}
        cols.finish(fields, drop=drop)
        self.close()
        if self.path != self.out:
            self.path = publish_staged(self.path, self.out, self.label)
        self._finished = True
        return self.out

    def _write_ivf(self, nlist: int) -> None:
        """``index.faiss`` as FAISS writes an IVF index with array inverted lists (``faiss.write_index`` gives
        the same bytes when more than half the lists are non-empty): the trained index's header with ``ntotal``,
        the list sizes, then per list its codes and its ids (positions, ascending), written at their offsets
        a block of rows at a time."""
        cols, n, cs = self._columns, self._documents, self.code_size
        head = ivf_layout(cols.read_rows("trained.bin", 0, cols.rows("trained.bin")).tobytes(), nlist, cs)
        head[8:16] = struct.pack("=q", n)  # ntotal, after the fourcc and the int32 dim
        step = self._block_rows()
        counts = np.zeros(nlist, dtype=np.int64)
        for s in range(0, n, step):
            counts += np.bincount(cols.read_rows("lists.bin", s, min(s + step, n)), minlength=nlist)
        prefix = bytes(head) + b"ilar" + struct.pack("=QQ", nlist, cs) + b"full" + struct.pack("=Q", nlist) \
            + counts.astype(np.uint64).tobytes()
        starts = len(prefix) + np.concatenate([[0], np.cumsum(counts * (cs + 8))[:-1]])
        code_at, id_at = starts.copy(), starts + counts * cs

        def write(f) -> None:
            f.write(prefix)
            f.flush()
            fd = f.fileno()
            for s in range(0, n, step):
                e = min(s + step, n)
                lists = cols.read_rows("lists.bin", s, e)
                codes = cols.read_rows("vectors.bin" if self.kind == "ivf_flat" else "codes.bin", s, e)
                order = np.argsort(lists, kind="stable")  # each list's rows stay in ascending position
                sorted_lists = lists[order]
                codes = np.ascontiguousarray(codes[order]).view(np.uint8).reshape(e - s, cs)
                positions = (order + s).astype(np.int64)
                bounds = [0, *(np.flatnonzero(np.diff(sorted_lists)) + 1).tolist(), e - s]
                for a, b in zip(bounds[:-1], bounds[1:]):
                    lst = int(sorted_lists[a])
                    _pwrite_all(fd, codes[a:b], int(code_at[lst]))
                    _pwrite_all(fd, positions[a:b], int(id_at[lst]))
                    code_at[lst] += (b - a) * cs
                    id_at[lst] += (b - a) * 8
            ends = starts + counts * cs
            if not (np.array_equal(code_at, ends) and np.array_equal(id_at, ends + counts * 8)):
                raise RuntimeError("index.faiss: the inverted lists were not filled as counted")

        cols.write_large_file_with("index.faiss", write, dtype="uint8")

    def _write_hnsw(self) -> None:
        """The HNSW graph, built in RAM from the column a block at a time, written as FAISS writes it."""
        cols, n = self._columns, self._documents
        faiss = dense.import_faiss()
        index = self._template(None).faiss_index
        for s in range(0, n, HNSW_BLOCK):
            index.add(cols.read_rows("vectors.bin", s, min(s + HNSW_BLOCK, n)))
        cols.write_large_file_with("index.faiss", lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)),
                                   dtype="uint8")


def ivf_layout(trained: bytes, nlist: int, code_size: int) -> bytearray:
    """The header of an empty IVF index as FAISS serialises it (everything before its inverted lists), after
    checking that the lists are where fastrank writes them: at the end, as FAISS writes empty array lists
    (``ilar``, nlist, code size, ``sprs``, no sizes)."""
    tail = b"ilar" + struct.pack("=QQ", nlist, code_size) + b"sprs" + struct.pack("=Q", 0)
    if not trained.endswith(tail) or trained[:4] not in (b"IwFl", b"IwPQ") or trained[8:16] != bytes(8):
        raise RuntimeError("the installed faiss serialises an empty IVF index in a layout fastrank does not know; "
                           "build the index in memory (DenseIndex.add, save) or report the faiss version")
    return bytearray(trained[:-len(tail)])


def _pwrite_all(fd: int, array: np.ndarray, offset: int) -> None:
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def build_dense_index(path: str | os.PathLike, chunks: Iterable, **options) -> Path:
    """Build a dense index in ``path`` from an iterable of chunks, each ``vectors`` (N, dim) or a ``(vectors,
    ids)`` pair; ``options`` go to :class:`DenseIndexWriter` (``dim`` among them). Resumes a partial build of
    the same options found there (the chunks it already stored are skipped)."""
    with DenseIndexWriter(path, **options) as writer:
        for chunk in chunks:
            if isinstance(chunk, tuple) and len(chunk) == 2:
                writer.add(chunk[0], chunk[1])
            else:
                writer.add(chunk)
        return writer.finish()
