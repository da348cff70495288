"""Indexes for first-stage retrieval: :class:`DenseIndex` (one vector per document, FAISS) and
:class:`TokenIndex` (packed token vectors for late interaction: centroid candidates, scored exactly with
``fastrank.maxsim_packed``, or residual-compressed and scored by ``fastrank.ops.maxsim_residual``). Corpora
larger than RAM are built by streaming (:class:`TokenIndexWriter`, :class:`DenseIndexWriter`: chunks committed
to disk, resumable) and loaded memory-mapped; :class:`ShardedTokenIndex` searches the shards of a distributed
build (docs/scale.md).

Importing this package needs neither faiss nor transformers; FAISS is imported when an index needs it.
"""
from fastrank.index.dense import KINDS, METRICS, DenseIndex, IndexFormatError, choose_backend
from fastrank.index.dense_stream import DenseIndexWriter, build_dense_index
from fastrank.index.shards import ShardedTokenIndex, load_token_index
from fastrank.index.token_stream import TokenIndexWriter, build_token_index
from fastrank.index.tokens import TokenIndex

__all__ = ["DenseIndex", "TokenIndex", "IndexFormatError", "KINDS", "METRICS", "choose_backend",
           "TokenIndexWriter", "build_token_index", "DenseIndexWriter", "build_dense_index", "ShardedTokenIndex",
           "load_token_index"]
