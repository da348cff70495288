"""Indexes for first-stage retrieval: :class:`DenseIndex` (one vector per document, FAISS) and
:class:`TokenIndex` (packed token vectors for late interaction: centroid candidates, scored exactly with
``fastrank.maxsim_packed``).

Importing this package needs neither faiss nor transformers; FAISS is imported when an index needs it.
"""
from fastrank.index.dense import KINDS, METRICS, DenseIndex, IndexFormatError, choose_backend
from fastrank.index.tokens import TokenIndex

__all__ = ["DenseIndex", "TokenIndex", "IndexFormatError", "KINDS", "METRICS", "choose_backend"]
