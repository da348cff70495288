"""Drop-in nn.Modules. Thin: they hold parameters in a checkpoint-compatible layout and call the ops."""
from __future__ import annotations

import numbers
from typing import Optional

from torch import Tensor, nn

from fastrank.ops.lite import lite_score


def _mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(width, hidden), nn.ReLU(), nn.LayerNorm(hidden),
        nn.Linear(hidden, width), nn.ReLU(), nn.LayerNorm(width),
    )


class LiteScorer(nn.Module):
    """Separable LITE (arXiv 2406.17968) over the token similarity matrix, scored by :func:`fastrank.lite_score`.

    Layout (a plain PyTorch LITE checkpoint with these names loads with ``load_state_dict``):
    ``row_mlp`` = Sequential(Linear(ld, row_hidden), ReLU, LayerNorm(row_hidden), Linear(row_hidden, ld), ReLU,
    LayerNorm(ld)) over the doc axis of each query row; ``col_mlp`` = the same over the query axis with
    (lq, col_hidden); ``out`` = Linear(lq * ld, 1) on the row-major flattening. With ``proj_dim`` (small
    LITE), ``proj`` = Linear(embed_dim, proj_dim) maps q and d, then every token is L2-normalised.
    """

    def __init__(
        self,
        lq: int = 30,
        ld: int = 200,
        row_hidden: int = 2400,
        col_hidden: int = 360,
        activation: str = "relu",
        proj_dim: Optional[int] = None,
        embed_dim: Optional[int] = None,
    ):
        super().__init__()
        sizes = dict(lq=lq, ld=ld, row_hidden=row_hidden, col_hidden=col_hidden, proj_dim=proj_dim, embed_dim=embed_dim)
        for name, size in sizes.items():
            if size is None and name in ("proj_dim", "embed_dim"):
                continue
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
                raise ValueError(f"LiteScorer: {name} must be a positive int, got {size!r}")
        if activation != "relu":
            raise ValueError(f"LiteScorer: activation={activation!r} is not supported; the paper's LITE uses 'relu'")
        if proj_dim is not None and embed_dim is None:
            raise ValueError("LiteScorer: proj_dim needs embed_dim, the H of the token embeddings it projects")
        self.lq, self.ld = lq, ld
        self.proj = nn.Linear(embed_dim, proj_dim) if proj_dim is not None else None
        self.row_mlp = _mlp(ld, row_hidden)
        self.col_mlp = _mlp(lq, col_hidden)
        self.out = nn.Linear(lq * ld, 1)

    def forward(self, q: Tensor, d: Tensor, q_mask: Optional[Tensor] = None, d_mask: Optional[Tensor] = None,
                *, backend: Optional[str] = None) -> Tensor:
        """q (..., Lq, H), d (..., Ld, H), masks bool (..., Lq) / (..., Ld) -> float32 scores (...)."""
        return lite_score(q, d, q_mask, d_mask, scorer=self, backend=backend)

    @classmethod
    def from_state_dict(cls, state: dict) -> "LiteScorer":
        """A LiteScorer shaped by a checkpoint's own weights (lq, ld, hidden widths, projection), loaded strictly."""
        try:
            row_hidden, ld = state["row_mlp.0.weight"].shape
            col_hidden, lq = state["col_mlp.0.weight"].shape
        except KeyError as exc:
            raise ValueError(f"LiteScorer checkpoint: missing {exc}; expected the row_mlp/col_mlp/out layout") from None
        proj = state.get("proj.weight")
        scorer = cls(lq, ld, row_hidden, col_hidden, proj_dim=None if proj is None else proj.shape[0],
                     embed_dim=None if proj is None else proj.shape[1])
        scorer.load_state_dict(state)
        return scorer

    def extra_repr(self) -> str:
        return f"lq={self.lq}, ld={self.ld}"
