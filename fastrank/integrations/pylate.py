"""PyLate's ColBERT scoring functions on fastrank's fused MaxSim: a PyLate script swaps one import.

PyLate (``pip install "fastrank[pylate]"``) scores ColBERT batches with ``pylate.scores.colbert_scores``,
``colbert_scores_pairwise``, ``colbert_kd_scores`` and the ``ColBERTScores`` callable, which materialise the
(queries, docs, Lq, Ld) similarity tensor in eager PyTorch. The functions here have the same names,
arguments (same order, same defaults) and results, computed by :func:`fastrank.maxsim` (forward and
backward fused; the similarity tensor never reaches memory)::

    # from pylate.scores import ColBERTScores, colbert_kd_scores, colbert_scores, colbert_scores_pairwise
    from fastrank.integrations.pylate import ColBERTScores, colbert_kd_scores, colbert_scores, colbert_scores_pairwise
    from pylate import losses

    distillation = losses.Distillation(model=model, score_metric=colbert_kd_scores)
    contrastive = losses.Contrastive(model=model, score_metric=ColBERTScores())
    cached = losses.CachedContrastive(model=model, score_metric=ColBERTScores())

PyLate 1.6's ``Contrastive`` and ``CachedContrastive`` call ``score_metric`` with the documents stacked as
(Q_doc, N, Ld, H) and expect (Q_query, Q_doc * N) back (their default is ``ColBERTScores()``), so they take
:class:`ColBERTScores`, not :func:`colbert_scores`. With fastrank, ``score_mini_batch_size`` buys nothing
(there is no similarity tensor to chunk) and, with the default ``padding="zero"``, costs one masked copy of
the documents per chunk: leave it unset.

Semantics, those of PyLate 1.6.0's PyTorch path (``pylate/scores/colbert.py``):

- ``score = sum_i max_j s_ij`` with ``s_ij = <q_i, d_j> * queries_mask_i * documents_mask_j``: masks
  *multiply* the similarities. A padded query token contributes 0. A padded document token has similarity 0
  and takes part in the max, so for a query token whose similarity to every real token of a padded document
  is negative, PyLate scores 0, not that negative maximum; a fully padded document scores 0. Gradients
  follow the same argmax (none through a padded token). Masks may be bool, integer or float; a value other
  than 0/1 scales the similarity, as in PyLate.
- ``padding="exclude"`` (keyword only; also ``ColBERTScores(padding="exclude")``, or
  ``functools.partial(colbert_kd_scores, padding="exclude")`` for a loss) gives fastrank's own semantics
  instead: padded document tokens never win the max, a nonzero mask value means "real token". PyLate's
  flash-maxsim backend (CUDA) does the same, as it turns masks into document lengths. The two agree unless a
  query token's every similarity to a padded document's real tokens is negative. The cost of the default:
  ``fastrank.maxsim`` excludes padding rather than scoring it 0, so ``padding="zero"`` scores a copy of the
  documents with the padded tokens zeroed (one document-sized tensor, kept for the backward, and one more
  for its gradient), and of the queries when their mask is not bool; ``"exclude"`` copies nothing.
- Output: PyLate's shapes; dtype that of ``embeddings * masks`` (the embeddings' dtype for bool or integer
  masks), the float32 accumulation rounded once at the end (PyLate's einsum rounds each similarity).
- Inputs: tensors, numpy arrays or lists of them (PyLate's ``convert_to_tensor``: lists of tensors are
  stacked, lists of arrays or of lists become float32); ``colbert_scores_pairwise`` also takes lists of
  tensors of different lengths (scored packed with :func:`fastrank.maxsim_packed`, no padding).
- What the kernels do not run falls back, it does not fail: float64 runs on :func:`fastrank.maxsim_ref`
  (through ``fastrank.maxsim``), as do integer embeddings (scored in float32, cast back to PyLate's dtype).
- ``backend``: ``None`` or ``"auto"`` lets fastrank's dispatcher choose (``FASTRANK_BACKEND`` overrides);
  ``"torch"`` is eager PyTorch (:func:`fastrank.maxsim_ref`, the similarity tensor materialised); a name
  from :data:`fastrank.BACKENDS` forces that backend. PyLate's ``"flash"`` and ``"lik"`` are refused (they
  are PyLate's kernels; call ``pylate.scores`` for them), and ``PYLATE_SCORES_BACKEND`` is not read.

Deliberate differences: ``colbert_scores_pairwise`` raises ``ValueError`` when the two sides hold different
numbers of items (PyLate's ``zip`` drops the extra ones) and returns an empty tensor for zero pairs (PyLate
fails in ``torch.stack``); every bad input raises a ``ValueError``/``TypeError`` that names the argument.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from fastrank.dispatch import BACKENDS
from fastrank.ops.maxsim import maxsim, maxsim_ref
from fastrank.ops.maxsim_packed import maxsim_packed

PADDING = ("zero", "exclude")
Embeddings = Union[Tensor, np.ndarray, Sequence]

# What fastrank.maxsim accepts (float64 it runs on maxsim_ref itself); other dtypes go to maxsim_ref here.
_MAXSIM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PYLATE_KERNELS = ("flash", "lik")


# ------------------------------------------------------------------------------------------ argument checks

def _as_tensor(x, name: str, fn: str) -> Tensor:
    """pylate.utils.convert_to_tensor, with an error naming the argument where PyLate would return None."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, (list, tuple)):
        if not x:
            return torch.tensor([], dtype=torch.float32)
        if isinstance(x[0], np.ndarray):
            return torch.from_numpy(np.array(x, dtype=np.float32))
        if isinstance(x[0], list):
            return torch.tensor(x, dtype=torch.float32)
        if isinstance(x[0], Tensor):
            try:
                return torch.stack(list(x))
            except RuntimeError as e:
                raise ValueError(f"{fn}: {name} is a list of tensors of different shapes ({e}); pad them to one "
                                 "length and pass a mask") from e
    raise TypeError(f"{fn}: {name} must be a tensor, a numpy array or a list of them, got {type(x).__name__}")


def _check_embeddings(q: Tensor, d: Tensor, d_layout: str, fn: str) -> None:
    if q.dim() != 3:
        raise ValueError(f"{fn}: queries_embeddings must be (num queries, query tokens, dim), got shape {tuple(q.shape)}")
    if d.dim() != len(d_layout.split(",")):
        raise ValueError(f"{fn}: documents_embeddings must be ({d_layout}), got shape {tuple(d.shape)}")
    if q.shape[-1] != d.shape[-1]:
        raise ValueError(f"{fn}: queries_embeddings and documents_embeddings must share the embedding dim, got "
                         f"{q.shape[-1]} and {d.shape[-1]}")
    if q.dtype != d.dtype:
        raise TypeError(f"{fn}: queries_embeddings and documents_embeddings must have one dtype, got {q.dtype} "
                        f"and {d.dtype}")
    if q.device != d.device:
        raise ValueError(f"{fn}: queries_embeddings is on {q.device} but documents_embeddings is on {d.device}")


def _check_mask(mask, name: str, expected: torch.Size, like: Tensor, fn: str) -> Optional[Tensor]:
    """The mask as a tensor that broadcasts to ``expected`` (the embeddings' shape without the dim), as
    PyLate's elementwise product lets it."""
    if mask is None:
        return None
    mask = _as_tensor(mask, name, fn)
    try:
        fits = mask.dim() == len(expected) and torch.broadcast_shapes(mask.shape, expected) == expected
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{fn}: {name} must have shape {tuple(expected)} (or broadcast to it), got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{fn}: {name} is on {mask.device} but the embeddings are on {like.device}")
    if mask.dtype.is_complex:
        raise TypeError(f"{fn}: {name} must be bool, integer or float, got {mask.dtype}")
    return mask


def _fastrank_backend(backend: Optional[str], fn: str) -> Optional[str]:
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"{fn}: backend must be a string or None, got {type(backend).__name__}")
    name = backend.lower()  # PyLate lower-cases too
    if name == "auto":
        return None
    if name == "torch":
        return "reference"
    if name in BACKENDS:
        return name
    if name in _PYLATE_KERNELS:
        raise ValueError(f"{fn}: backend={backend!r} is one of PyLate's own kernels; use pylate.scores for it, or "
                         "backend=None for fastrank's")
    raise ValueError(f"{fn}: backend must be None, 'auto', 'torch' or one of {BACKENDS}, got {backend!r}")


def _check_padding(padding: str, fn: str) -> str:
    if padding not in PADDING:
        raise ValueError(f"{fn}: padding must be one of {PADDING}, got {padding!r}")
    return padding


# ------------------------------------------------------------------------------------------ scoring

def _maxsim_pylate(q: Tensor, d: Tensor, q_mask: Optional[Tensor], d_mask: Optional[Tensor], backend: Optional[str],
                   padding: str) -> Tensor:
    """MaxSim of q (..., Lq, H) and d (..., Ld, H) (leading dims broadcast) with PyLate's mask semantics
    (``padding="zero"``) or fastrank's (``"exclude"``), in PyLate's result dtype."""
    out_dtype = q.dtype
    for m in (q_mask, d_mask):
        if m is not None:
            out_dtype = torch.promote_types(out_dtype, m.dtype)  # PyLate's `scores * mask`
    if padding == "zero":
        # <q_i, m_j d_j> = m_j <q_i, d_j>: zeroing (or scaling) the tokens is PyLate's product, and a zeroed
        # token is a real one to the kernel, so it competes in the max with similarity 0 exactly as in PyLate.
        if q_mask is not None and q_mask.dtype != torch.bool:
            q, q_mask = q * q_mask.unsqueeze(-1).to(q.dtype), None
        if d_mask is not None:
            d, d_mask = d * d_mask.unsqueeze(-1).to(d.dtype), None
    else:
        q_mask = q_mask if q_mask is None or q_mask.dtype == torch.bool else q_mask != 0
        d_mask = d_mask if d_mask is None or d_mask.dtype == torch.bool else d_mask != 0
    if q.dtype in _MAXSIM_DTYPES:
        scores = maxsim(q, d, q_mask, d_mask, backend=backend)
    else:  # integer embeddings: PyLate's einsum takes them, the kernels do not
        scores = maxsim_ref(q, d, q_mask, d_mask)
    return scores.to(out_dtype)


def _score_batch(fn: str, queries_embeddings, documents_embeddings, queries_mask, documents_mask, backend, padding,
                 *, d_layout: str, q_axes: int) -> Tensor:
    """The checks and the one maxsim call behind the batched functions: q (A, Lq, H) gains ``q_axes`` axes
    after A so that it broadcasts against d's leading dims (matmul's rule), and so does its mask."""
    q = _as_tensor(queries_embeddings, "queries_embeddings", fn)
    d = _as_tensor(documents_embeddings, "documents_embeddings", fn)
    _check_embeddings(q, d, d_layout, fn)
    q_mask = _check_mask(queries_mask, "queries_mask", q.shape[:2], q, fn)
    d_mask = _check_mask(documents_mask, "documents_mask", d.shape[:-1], q, fn)
    if q_axes == 1 and d.dim() == 4 and q.shape[0] != d.shape[0] and 1 not in (q.shape[0], d.shape[0]):
        raise ValueError(f"{fn}: documents_embeddings must hold candidates for each of the {q.shape[0]} queries, got "
                         f"shape {tuple(d.shape)}")
    expand = (slice(None),) + (None,) * q_axes
    return _maxsim_pylate(q[expand], d, None if q_mask is None else q_mask[expand], d_mask,
                          _fastrank_backend(backend, fn), _check_padding(padding, fn))


def colbert_scores(
    queries_embeddings: Embeddings,
    documents_embeddings: Embeddings,
    queries_mask: Optional[Tensor] = None,
    documents_mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
    *,
    padding: str = "zero",
) -> Tensor:
    """Every query against every document: ``pylate.scores.colbert_scores``, fused.

    Args:
        queries_embeddings: (A, Lq, H) (or what PyLate converts to it: numpy, lists).
        documents_embeddings: (B, Ld, H), the queries' dtype and device.
        queries_mask: optional (A, Lq), bool, integer or float; multiplies the similarities (0 = padding).
        documents_mask: optional (B, Ld), likewise.
        backend: ``None``/``"auto"``, ``"torch"`` or a :data:`fastrank.BACKENDS` name (module docstring).
        padding: ``"zero"`` (PyLate's semantics) or ``"exclude"`` (fastrank's); see the module docstring.

    Returns:
        (A, B) scores in PyLate's dtype.
    """
    return _score_batch("colbert_scores", queries_embeddings, documents_embeddings, queries_mask, documents_mask,
                        backend, padding, d_layout="num documents, document tokens, dim", q_axes=1)


def colbert_kd_scores(
    queries_embeddings: Embeddings,
    documents_embeddings: Embeddings,
    queries_mask: Optional[Tensor] = None,
    documents_mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
    *,
    padding: str = "zero",
) -> Tensor:
    """Each query against its own K candidates (distillation): ``pylate.scores.colbert_kd_scores``, fused.

    Args:
        queries_embeddings: (A, Lq, H).
        documents_embeddings: (A, K, Ld, H), the queries' dtype and device (A may be 1 on either side:
            it broadcasts, as in PyLate's einsum).
        queries_mask: optional (A, Lq); documents_mask: optional (A, K, Ld); bool, integer or float.
        backend, padding: as in :func:`colbert_scores`.

    Returns:
        (A, K) scores in PyLate's dtype.
    """
    return _score_batch("colbert_kd_scores", queries_embeddings, documents_embeddings, queries_mask, documents_mask,
                        backend, padding, d_layout="num queries, candidates, document tokens, dim", q_axes=1)


class ColBERTScores:
    """Contrastive scoring in PyLate 1.6's layout (``pylate.scores.ColBERTScores``), in one fused call.

    ``scores(queries (Qq, Lq, H), documents (Qd, N, Ld, H), queries_mask (Qq, Lq), documents_mask (Qd, N, Ld))``
    returns (Qq, Qd * N), query-major: column ``j * N + k`` is slot ``k`` of query ``j``'s document group,
    so with Qq == Qd the positive of query ``i`` sits at column ``i * N``. PyLate scores the N slots one by
    one; here all Qq x Qd x N pairs go to one :func:`fastrank.maxsim` call, with no operand copied (but for
    the masked copy of the documents that ``padding="zero"`` makes).

    Args:
        padding: ``"zero"`` (PyLate's semantics) or ``"exclude"`` (fastrank's); see the module docstring.
    """

    def __init__(self, padding: str = "zero") -> None:
        self.padding = _check_padding(padding, "ColBERTScores")

    def __repr__(self) -> str:
        return f"ColBERTScores(padding={self.padding!r})"

    def __call__(
        self,
        queries_embeddings: Embeddings,
        documents_embeddings: Embeddings,
        queries_mask: Optional[Tensor] = None,
        documents_mask: Optional[Tensor] = None,
        backend: Optional[str] = None,
    ) -> Tensor:
        scores = _score_batch("ColBERTScores", queries_embeddings, documents_embeddings, queries_mask, documents_mask,
                              backend, self.padding, q_axes=2,
                              d_layout="num document groups, documents per group, document tokens, dim")  # (Qq, Qd, N)
        return scores.flatten(1)


def _pairwise_side(x, name: str, fn: str) -> Union[Tensor, list[Tensor]]:
    """A (N, L, H) tensor, or a list of (L_i, H) tensors of one dim and dtype (PyLate converts each item on
    its own, so the lengths may differ)."""
    if isinstance(x, (Tensor, np.ndarray)):
        t = _as_tensor(x, name, fn)
        if t.dim() != 3:
            raise ValueError(f"{fn}: {name} must be (num pairs, tokens, dim) or a list of (tokens, dim), got shape "
                             f"{tuple(t.shape)}")
        return t
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{fn}: {name} must be a tensor, a numpy array or a list of them, got {type(x).__name__}")
    items = [_as_tensor(item, f"{name}[{i}]", fn) for i, item in enumerate(x)]
    for i, t in enumerate(items):
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name}[{i}] must be (tokens, dim), got shape {tuple(t.shape)}")
        if (t.shape[1], t.dtype, t.device) != (items[0].shape[1], items[0].dtype, items[0].device):
            raise ValueError(f"{fn}: {name}[{i}] is ({t.shape[1]}-dim, {t.dtype}, {t.device}) but {name}[0] is "
                             f"({items[0].shape[1]}-dim, {items[0].dtype}, {items[0].device})")
    return items


def _padded(items: list[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """(N, max L, H) and a bool (N, max L) mask of the real tokens (None when every length is the same)."""
    lengths = [t.shape[0] for t in items]
    mask = None
    if len(set(lengths)) > 1:
        device = items[0].device
        mask = torch.arange(max(lengths), device=device) < torch.tensor(lengths, device=device)[:, None]
    return torch.nn.utils.rnn.pad_sequence(items, batch_first=True), mask


def colbert_scores_pairwise(
    queries_embeddings: Union[Tensor, np.ndarray, Sequence],
    documents_embeddings: Union[Tensor, np.ndarray, Sequence],
    backend: Optional[str] = None,
) -> Tensor:
    """Query ``i`` against document ``i`` only: ``pylate.scores.colbert_scores_pairwise``, fused.

    Args:
        queries_embeddings: (N, Lq, H), or a list of N (Lq_i, H) tensors / arrays of any lengths.
        documents_embeddings: (N, Ld, H), or a list of N (Ld_i, H); no masks, as in PyLate: every token
            counts. A list of documents is scored packed back to back (:func:`fastrank.maxsim_packed`, no
            padding); a list of queries is padded, with a query mask.
        backend: as in :func:`colbert_scores`.

    Returns:
        (N,) scores in the queries' dtype.
    """
    fn = "colbert_scores_pairwise"
    backend = _fastrank_backend(backend, fn)
    qs = _pairwise_side(queries_embeddings, "queries_embeddings", fn)
    ds = _pairwise_side(documents_embeddings, "documents_embeddings", fn)
    if len(qs) != len(ds):
        raise ValueError(f"{fn}: queries_embeddings holds {len(qs)} items but documents_embeddings holds {len(ds)}; "
                         "pairs are matched by position")
    if len(qs) == 0:
        return torch.empty(0, dtype=qs.dtype if isinstance(qs, Tensor) else torch.float32)
    q, q_mask = (qs, None) if isinstance(qs, Tensor) else _padded(qs)
    if isinstance(ds, list) and q.dtype in _MAXSIM_DTYPES:
        tokens = torch.cat(ds)
        _check_embeddings(q, tokens, "document tokens, dim", fn)
        offsets = torch.tensor([0] + [t.shape[0] for t in ds], device=tokens.device).cumsum(0)
        return maxsim_packed(q, tokens, offsets, q_mask=q_mask, backend=backend).to(q.dtype)
    d, d_mask = (ds, None) if isinstance(ds, Tensor) else _padded(ds)
    _check_embeddings(q, d, "num pairs, document tokens, dim", fn)
    # The padding is ours, not PyLate's (its pairwise scoring has no masks): it must never win the max.
    return _maxsim_pylate(q, d, q_mask, d_mask, backend, "exclude")


__all__ = ["PADDING", "ColBERTScores", "colbert_kd_scores", "colbert_scores", "colbert_scores_pairwise"]
