"""TokenIndex: late-interaction retrieval over token vectors.

Search runs in two stages, as ColBERT's end-to-end retrieval does:
1. candidates: every valid query token searches an ANN index (a :class:`DenseIndex` over all document
   token vectors) for its ``token_k`` nearest tokens; the documents owning them are the candidates;
2. exact scoring: the candidates' full token matrices are scored with the fused ``fastrank.maxsim``
   (sum over query tokens of the max inner product over document tokens) and the top ``k`` returned.

Document tokens are stored once, as float16, back to back with offsets (document ``i`` owns rows
``offsets[i]:offsets[i+1]``); the ANN index holds its own (possibly compressed) copy for stage 1.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fastrank.encoders import TokenEmbeddings
from fastrank.index.dense import FORMAT_VERSION, DenseIndex, IndexFormatError, _read_meta, _sha256, _verify


def _as_token_embeddings(tokens, name: str) -> TokenEmbeddings:
    if isinstance(tokens, TokenEmbeddings):
        return tokens
    if isinstance(tokens, (tuple, list)) and len(tokens) == 2:
        vectors, offsets = tokens
        vectors = torch.as_tensor(vectors)
        if not vectors.is_floating_point():
            raise TypeError(f"{name}: token vectors must be floating point, got {vectors.dtype}")
        try:
            return TokenEmbeddings(vectors, torch.as_tensor(offsets))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    raise TypeError(f"{name} must be TokenEmbeddings or a (vectors (T, H), offsets (N + 1,)) pair")


class TokenIndex:
    """Multi-vector index for MaxSim retrieval.

    Args:
        dim: token vector dimension.
        kind, metric, and the remaining keyword arguments: the stage-1 ANN :class:`DenseIndex` over token
            vectors (``"flat"`` is exact; ``"ivf_pq"`` or ``"hnsw"`` for large corpora).
        device: where stage 1 and the MaxSim re-rank run.
    """

    def __init__(self, dim: int, kind: str = "flat", metric: str = "ip", *, device: str | torch.device = "cpu",
                 **ann_params):
        self.dim = int(dim)
        self.device = torch.device(device)
        self.ann = DenseIndex(dim, kind, metric, device=device, **ann_params)
        self._vectors = torch.empty(0, self.dim, dtype=torch.float16)
        self._offsets = torch.zeros(1, dtype=torch.int64)
        self._ids: list = []

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list:
        return list(self._ids)

    @property
    def num_tokens(self) -> int:
        return int(self._vectors.shape[0])

    def add(self, tokens, ids: Sequence | None = None, *, progress: bool = True) -> "TokenIndex":
        """Add documents' token embeddings (:class:`TokenEmbeddings` or ``(vectors, offsets)``)."""
        tok = _as_token_embeddings(tokens, "tokens")
        n = len(tok)
        if n == 0:
            raise ValueError("tokens holds no document: nothing to add")
        if tok.vectors.shape[1] != self.dim:
            raise ValueError(f"tokens have dim {tok.vectors.shape[1]}, the index has dim {self.dim}")
        if ids is None:
            ids = list(range(len(self._ids), len(self._ids) + n))
        ids = ids.tolist() if isinstance(ids, (np.ndarray, torch.Tensor)) else list(ids)
        if len(ids) != n:
            raise ValueError(f"ids has {len(ids)} entries for {n} documents")
        vectors = tok.vectors.detach().cpu()
        # Positions in the ANN index are global token rows, so stage 1 maps back to documents by offsets.
        self.ann.add(vectors.float(), ids=list(range(self.num_tokens, self.num_tokens + vectors.shape[0])),
                     progress=progress)
        self._vectors = torch.cat([self._vectors, vectors.to(torch.float16)])
        self._offsets = torch.cat([self._offsets, tok.offsets[1:] + self._offsets[-1]])
        self._ids.extend(ids)
        return self

    @property
    def documents(self) -> TokenEmbeddings:
        return TokenEmbeddings(self._vectors, self._offsets)

    def search(self, queries, k: int = 10, *, token_k: int = 32, max_candidates: int | None = None,
               progress: bool = True):
        """Top-``k`` documents by exact MaxSim among the stage-1 candidates of each query.

        Args:
            queries: query token embeddings (:class:`TokenEmbeddings` or ``(vectors, offsets)``).
            token_k: nearest document tokens fetched per query token.
            max_candidates: keep at most this many candidates per query, those with the most token hits.

        Returns ``(scores (Q, k) float32 numpy, ids (Q, k) object array)``; ``None`` ids and ``-inf``
        scores pad queries with fewer than ``k`` candidates.
        """
        from fastrank import maxsim
        from tqdm.auto import tqdm

        q = _as_token_embeddings(queries, "queries")
        if q.vectors.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.vectors.shape[1]}, the index has dim {self.dim}")
        if len(self) == 0:
            raise ValueError("the index is empty: add documents before searching")
        if k < 1 or token_k < 1:
            raise ValueError(f"k and token_k must be positive, got k={k}, token_k={token_k}")
        _, tok_pos = self.ann.search_positions(q.vectors.float(), token_k, progress=False)
        tok_doc = np.searchsorted(self._offsets.numpy(), tok_pos, side="right") - 1
        docs = self.documents
        compute = torch.float16 if self.device.type == "cuda" else torch.float32
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), None, dtype=object)
        offsets = q.offsets.numpy()
        for i in tqdm(range(len(q)), desc="MaxSim re-rank", unit="query", disable=not progress or len(q) < 8):
            hits = tok_doc[offsets[i]:offsets[i + 1]]
            hits = hits[tok_pos[offsets[i]:offsets[i + 1]] >= 0]
            cand, counts = np.unique(hits, return_counts=True)
            if cand.size == 0:
                continue
            if max_candidates is not None and cand.size > max_candidates:
                cand = cand[np.argsort(-counts, kind="stable")[:max_candidates]]
            d_emb, d_mask = docs.padded(torch.from_numpy(cand), dtype=compute, device=self.device)
            q_emb = q.vectors[offsets[i]:offsets[i + 1]].to(self.device, compute)
            s = maxsim(q_emb, d_emb, None, d_mask).float().cpu()
            top = torch.topk(s, min(k, s.numel()))
            scores[i, :top.values.numel()] = top.values.numpy()
            ids[i, :top.values.numel()] = [self._ids[j] for j in cand[top.indices.numpy()]]
        return scores, ids

    def to_run(self, qids: Sequence[str], queries, k: int = 100, **kw) -> dict[str, dict[str, float]]:
        q = _as_token_embeddings(queries, "queries")
        if len(qids) != len(q):
            raise ValueError(f"qids has {len(qids)} entries for {len(q)} queries")
        scores, ids = self.search(q, k, **kw)
        return {str(qid): {str(d): float(s) for d, s in zip(row_ids, row_s) if s != -np.inf}
                for qid, row_ids, row_s in zip(qids, ids, scores)}

    def save(self, path: str | os.PathLike) -> Path:
        """Directory ``path``: ``tokens.npy`` (float16), ``offsets.npy``, ``ids.json``, ``ann/`` and
        ``meta.json`` with checksums."""
        if len(self) == 0:
            raise ValueError("the index is empty: nothing to save")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        files = {"tokens.npy": self._vectors.numpy(), "offsets.npy": self._offsets.numpy()}
        for name, arr in files.items():
            np.save(path / name, arr)
        (path / "ids.json").write_text(json.dumps(self._ids))
        self.ann.save(path / "ann")
        names = list(files) + ["ids.json"]
        meta = {"format": "fastrank.TokenIndex", "version": FORMAT_VERSION, "dim": self.dim,
                "ndocs": len(self), "ntokens": self.num_tokens,
                "sha256": {n: _sha256(path / n) for n in names}}
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
             backend: str | None = None) -> "TokenIndex":
        path = Path(path)
        meta = _read_meta(path, "fastrank.TokenIndex")
        _verify(path, meta, [path / n for n in ("tokens.npy", "offsets.npy", "ids.json")])
        vectors = np.load(path / "tokens.npy")
        offsets = np.load(path / "offsets.npy")
        ids = json.loads((path / "ids.json").read_text())
        if vectors.shape != (meta["ntokens"], meta["dim"]) or offsets.shape != (meta["ndocs"] + 1,) \
                or len(ids) != meta["ndocs"] or int(offsets[-1]) != meta["ntokens"]:
            raise IndexFormatError(f"{path}: tokens {vectors.shape}, offsets {offsets.shape} and {len(ids)} ids "
                                   f"do not match meta.json ({meta['ndocs']} docs, {meta['ntokens']} tokens, "
                                   f"dim {meta['dim']})")
        ann = DenseIndex.load(path / "ann", device=device, backend=backend)
        if len(ann) != meta["ntokens"] or ann.dim != meta["dim"]:
            raise IndexFormatError(f"{path / 'ann'}: holds {len(ann)} vectors of dim {ann.dim}, expected "
                                   f"{meta['ntokens']} of dim {meta['dim']}")
        self = cls.__new__(cls)
        self.dim, self.device, self.ann = meta["dim"], torch.device(device), ann
        self._vectors = torch.from_numpy(vectors)
        self._offsets = torch.from_numpy(offsets).to(torch.int64)
        self._ids = ids
        return self
