"""Encoder outputs computed once and cached on disk: the base encoder's raw token states (what a head trains on
when the encoder is frozen) and its normalised pooled vectors (what mines hard negatives).

Raw, unnormalised states are kept (in float16: half the memory, and far more precision than the heads need)
because each head normalises after its own transform, exactly as :class:`fastrank.encoders.Encoder` does at
inference with the trained projection.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from fastrank.encoders import Encoder, TokenEmbeddings


@dataclass
class FrozenTexts:
    """Encoded texts addressed by id: ``row[id]`` indexes ``dense`` and ``tokens``."""

    ids: list[str]
    dense: torch.Tensor  # (N, H) float32, L2-normalised pooled embeddings
    tokens: TokenEmbeddings | None  # raw last hidden states, float16

    def __post_init__(self):
        self.row = {i: r for r, i in enumerate(self.ids)}

    def padded(self, ids: Sequence[str], device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens.padded([self.row[i] for i in ids], dtype=dtype, device=device)


def _fingerprint(encoder: Encoder, ids: Sequence[str], texts: Sequence[str], max_length: int, tokens: bool) -> str:
    h = hashlib.sha256()
    config = (encoder.path / "config.json").read_bytes()
    weights = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in encoder.path.iterdir()
                     if p.suffix in (".safetensors", ".bin"))
    h.update(json.dumps([str(encoder.path.resolve()), config.decode("utf-8", "replace"), weights, max_length,
                         encoder.pooling, tokens, str(encoder.dtype)]).encode())
    for i, t in zip(ids, texts):
        h.update(i.encode())
        h.update(b"\0")
        h.update(t.encode())
        h.update(b"\1")
    return h.hexdigest()[:20]


def encode_frozen(encoder: Encoder, ids: Sequence[str], texts: Sequence[str], *, max_length: int, tokens: bool,
                  cache_dir: Path | None, name: str, progress: bool = True) -> FrozenTexts:
    """Encode ``texts`` once with ``encoder`` (built with ``normalize=False``), or read them from the cache."""
    if encoder.normalize:
        raise ValueError("encode_frozen needs an Encoder built with normalize=False (heads normalise themselves)")
    ids = list(ids)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{name}-{_fingerprint(encoder, ids, texts, max_length, tokens)}.pt"
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            tok = TokenEmbeddings(state["vectors"], state["offsets"]) if tokens else None
            return FrozenTexts(ids, state["dense"], tok)
    enc = encoder.encode(list(texts), dense=True, tokens=tokens, max_length=max_length,
                         progress=name if progress else False)
    dense = torch.nn.functional.normalize(enc.dense, dim=-1)
    tok = None
    if tokens:
        vectors = enc.tokens.vectors.to(torch.float16)
        if not torch.isfinite(vectors).all():  # states beyond float16's range: keep float32
            vectors = enc.tokens.vectors
        tok = TokenEmbeddings(vectors, enc.tokens.offsets)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"dense": dense} | ({"vectors": tok.vectors, "offsets": tok.offsets} if tokens else {})
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # a run killed mid-write leaves no half file behind under the real name
    return FrozenTexts(ids, dense, tok)


def dense_top(queries: FrozenTexts, corpus: FrozenTexts, qids: Sequence[str], k: int) -> dict[str, dict[str, float]]:
    """Exact inner-product top-``k`` of each query over the corpus (the base encoder's dense run)."""
    from fastrank.index import DenseIndex

    index = DenseIndex(corpus.dense.shape[1], "flat", "ip")
    index.add(corpus.dense, corpus.ids, progress=False)
    rows = torch.tensor([queries.row[q] for q in qids], dtype=torch.int64)
    return index.to_run(list(qids), queries.dense[rows], min(k, len(corpus.ids)), progress=False)
