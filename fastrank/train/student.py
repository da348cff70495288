"""The student: a transformer encoder (trained or frozen) and one scorer head on its last hidden states.

Every head takes raw hidden states with masks and scores through fastrank's fused ops (``backend`` passes
through, so the same step runs on the eager references for comparison):

- ``dense``:  masked mean pooling, L2-normalised, dot product (the encoder must train: no parameters here);
- ``maxsim``: ColBERT: Linear(H -> proj_dim, no bias) and L2 normalisation of the real tokens
  (:func:`fastrank.ops.projection.project_tokens`), :func:`fastrank.maxsim`;
- ``lite``:   L2-normalised tokens into a :class:`fastrank.LiteScorer` (Small-LITE projection when proj_dim).

``score(q, d)`` scores groups: q (B, Lq, H) against d (B, K, Ld, H) gives (B, K); ``score_all`` scores every
query against every document: (B, Lq, H) x (M, Ld, H) gives (B, M), for in-batch negatives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrank.ops.maxsim import maxsim
from fastrank.ops.projection import project_tokens
from fastrank.nn import LiteScorer


class DenseHead(nn.Module):
    def tokens(self, h: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(-2) / m.sum(-2).clamp_min(1.0), dim=-1)

    def score(self, q, q_mask, d, d_mask, backend=None) -> Tensor:
        return (self.tokens(q, q_mask).unsqueeze(1) * self.tokens(d, d_mask)).sum(-1).float()

    def score_all(self, q, q_mask, d, d_mask, backend=None) -> Tensor:
        return (self.tokens(q, q_mask) @ self.tokens(d, d_mask).T).float()

    def head_state(self) -> dict:
        return {}


class MaxSimHead(nn.Module):
    def __init__(self, hidden: int, proj_dim: int = 128):
        super().__init__()
        self.projection = nn.Linear(hidden, proj_dim, bias=False)

    @torch.no_grad()
    def init_pca(self, sample: Tensor) -> None:
        """Start from the top principal directions of the token states: a MaxSim close to the unprojected
        one at step 0, where a random projection would start by throwing information away."""
        x = F.normalize(sample.float(), dim=-1)
        x = x - x.mean(0)
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        k = self.projection.out_features
        if v.shape[0] >= k:
            self.projection.weight.copy_(v[:k])

    def tokens(self, h: Tensor, mask: Tensor | None = None, backend=None) -> Tensor:
        """Projected, L2-normalised tokens (0 where ``mask`` is False: padding is never projected)."""
        return project_tokens(h, self.projection.weight, None, mask, backend=backend)

    def score(self, q, q_mask, d, d_mask, backend=None) -> Tensor:
        return maxsim(self.tokens(q, q_mask, backend).unsqueeze(1), self.tokens(d, d_mask, backend), q_mask.unsqueeze(1),
                      d_mask, backend=backend)

    def score_all(self, q, q_mask, d, d_mask, backend=None) -> Tensor:
        return maxsim(self.tokens(q, q_mask, backend).unsqueeze(1), self.tokens(d, d_mask, backend).unsqueeze(0),
                      q_mask.unsqueeze(1), d_mask.unsqueeze(0), backend=backend)

    def head_state(self) -> dict:
        return {"projection": self.projection.weight}


class LiteHead(nn.Module):
    def __init__(self, hidden: int, lq: int, ld: int, proj_dim: int | None = None, row_hidden: int = 2400,
                 col_hidden: int = 384):
        super().__init__()
        self.scorer = LiteScorer(lq, ld, row_hidden, col_hidden, proj_dim=proj_dim,
                                 embed_dim=hidden if proj_dim is not None else None)

    def score(self, q, q_mask, d, d_mask, backend=None) -> Tensor:
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
        return self.scorer(q.unsqueeze(1), d, q_mask.unsqueeze(1), d_mask, backend=backend)

    def score_all(self, q, q_mask, d, d_mask, backend=None) -> Tensor:
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
        return self.scorer(q.unsqueeze(1), d.unsqueeze(0), q_mask.unsqueeze(1), d_mask.unsqueeze(0), backend=backend)

    def head_state(self) -> dict:
        return self.scorer.state_dict()


def make_head(scorer: str, hidden: int, *, proj_dim: int | None, lq: int, ld: int, row_hidden: int = 2400,
              col_hidden: int = 384) -> nn.Module:
    if scorer == "dense":
        return DenseHead()
    if scorer == "maxsim":
        return MaxSimHead(hidden, proj_dim or 128)
    if scorer == "lite":
        return LiteHead(hidden, lq, ld, proj_dim, row_hidden, col_hidden)
    raise ValueError(f"scorer must be dense, maxsim or lite, got {scorer!r}")


class Student(nn.Module):
    """Encoder + head. With ``encoder=None`` the head trains alone on cached (frozen) hidden states."""

    def __init__(self, head: nn.Module, encoder: nn.Module | None = None, tokenizer=None):
        super().__init__()
        self.head, self.encoder, self.tokenizer = head, encoder, tokenizer

    def forward(self, fn, *args, **kw):
        """``fn(self, *args, **kw)``: lets a DistributedDataParallel wrapper run any step function on the student."""
        return fn(self, *args, **kw)

    def hidden(self, texts: list[str], max_length: int, device) -> tuple[Tensor, Tensor]:
        """Last hidden states and mask of ``texts`` through the trainable encoder."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt").to(device)
        return self.encoder(**batch).last_hidden_state, batch["attention_mask"].bool()
