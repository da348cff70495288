"""Stage 1 of a token index: each query's candidate documents from the inverted lists its tokens probe.

Query token ``l`` probes lists ``probe_c[l, 0..P)`` with gains ``gain[l, 0..P)`` (its centroid scores over the
floor of its best unprobed centroid: non-negative, best first). A document's estimate is PLAID's centroid
interaction::

    approx(d) = sum_l max{ gain[l, p] : list probe_c[l, p] holds d }     (0 for a token reaching no list of d)

and each query keeps its ``ndocs`` best documents that some probed list holds, the lower document first among
equal estimates, returned in ascending document order. The sum runs over the query's tokens in order, in
float32, so every backend rounds it alike and the kernel's estimates equal the reference's bit for bit.

Read top to bottom: checks, the backends (the C++ CPU kernel in csrc/cpu/centroid_candidates.cpp; the
reference, which is the spec and also runs on CUDA tensors), their registration with :mod:`fastrank.dispatch`,
and the public :func:`centroid_candidates`.

Why a kernel: the reference materialises every probed list entry of the batch and sorts them to merge
(query, document) pairs. At 100M tokens (32,768 lists of about 2,300 documents) a query probes about 590,000
entries: a batch of 64 queries sorted 38M keys, at 5.4 queries/s and 5.1 GiB. The kernel walks the lists once,
a range of 32,768 documents at a time, with a running estimate and a stamp per document of the range (256 KiB
a thread, in L2), and keeps the best ``ndocs`` in a heap: its time is the entries' and its memory constant.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastrank import _ext, dispatch
from fastrank.ops.maxsim_packed import segment_rows

__all__ = ["centroid_candidates", "centroid_candidates_ref"]

OP = "centroid_candidates"


# --------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------
def _check_inputs(probe_c, gain, q_offsets, ivf_offsets, ivf_docs, n, ndocs) -> tuple[int, int]:
    """Shapes, dtypes and devices (the values are each backend's to check: the C++ boundary on every call);
    returns ``(n, ndocs)`` as ints."""
    named = (("probe_c", probe_c), ("gain", gain), ("q_offsets", q_offsets), ("ivf_offsets", ivf_offsets),
             ("ivf_docs", ivf_docs))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if probe_c.dtype != torch.int64 or probe_c.dim() != 2:
        raise ValueError(f"{OP}: probe_c must be int64 of shape (Tq, P), got {probe_c.dtype} {tuple(probe_c.shape)}")
    if gain.dtype != torch.float32 or gain.shape != probe_c.shape:
        raise ValueError(f"{OP}: gain must be float32 of probe_c's shape {tuple(probe_c.shape)}, got {gain.dtype} "
                         f"{tuple(gain.shape)}")
    for name, t in (("q_offsets", q_offsets), ("ivf_offsets", ivf_offsets)):
        if t.dtype != torch.int64 or t.dim() != 1 or t.numel() < 1:
            raise ValueError(f"{OP}: {name} must be int64 of shape (K + 1,), got {t.dtype} {tuple(t.shape)}")
    if ivf_docs.dtype != torch.int32 or ivf_docs.dim() != 1:
        raise ValueError(f"{OP}: ivf_docs must be int32 of shape (E,), got {ivf_docs.dtype} {tuple(ivf_docs.shape)}")
    devices = {name: t.device for name, t in named}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{OP}: all tensors must be on one device, got "
                         + ", ".join(f"{k} on {v}" for k, v in devices.items()))
    n, ndocs = int(n), int(ndocs)
    if not 0 <= n <= 2 ** 31:
        raise ValueError(f"{OP}: n (documents) must be in [0, 2^31], got {n}")
    if ndocs < 1:
        raise ValueError(f"{OP}: ndocs must be >= 1, got {ndocs}")
    return n, ndocs


def _check_values(probe_c, gain, q_offsets, ivf_offsets, ivf_docs, n) -> None:
    """The reference's value checks (the same as the C++ boundary's)."""
    from fastrank.ops.maxsim_packed import check_offsets

    check_offsets(q_offsets, probe_c.shape[0], OP)
    check_offsets(ivf_offsets, ivf_docs.numel(), OP)
    c = ivf_offsets.numel() - 1
    bad = (probe_c < 0) | (probe_c >= c)
    if bool(bad.any()):
        l, j = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(f"{OP}: probe_c[{l}, {j}] = {int(probe_c[l, j])} does not index the {c} lists of "
                         f"ivf_offsets (0 .. {c - 1})")
    bad = ~(gain >= 0)
    if bool(bad.any()):
        l, j = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(f"{OP}: gain[{l}, {j}] = {float(gain[l, j])}: gains must be >= 0 (not NaN)")
    if gain.shape[1] > 1:
        bad = gain[:, 1:] > gain[:, :-1]
        if bool(bad.any()):
            l, j = (int(x) for x in torch.nonzero(bad)[0])
            raise ValueError(f"{OP}: each row of gain must be non-increasing (probes best first), got gain[{l}, "
                             f"{j + 1}] = {float(gain[l, j + 1])} > gain[{l}, {j}]")


# --------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------
def _outputs(nb: int, ndocs: int, device) -> tuple[Tensor, Tensor, Tensor]:
    return (torch.full((nb, ndocs), -1, dtype=torch.int64, device=device),
            torch.full((nb, ndocs), float("nan"), dtype=torch.float32, device=device),
            torch.zeros(nb, dtype=torch.int64, device=device))


def _cpp_forward(probe_c, gain, q_offsets, ivf_offsets, ivf_docs, n: int, ndocs: int):
    ext = _ext.require()
    docs, approx, counts = _outputs(q_offsets.numel() - 1, ndocs, probe_c.device)
    # The extension checks every tensor again, every probed centroid, every gain and every list entry it reads.
    ext.centroid_candidates_cpu(probe_c.contiguous(), gain.contiguous(), q_offsets.contiguous(),
                                ivf_offsets.contiguous(), ivf_docs.contiguous(), n, ndocs, docs, approx, counts,
                                torch.get_num_threads())
    return docs, approx, counts


def _reference_forward(probe_c, gain, q_offsets, ivf_offsets, ivf_docs, n: int, ndocs: int):
    return centroid_candidates_ref(probe_c, gain, q_offsets, ivf_offsets, ivf_docs, n, ndocs)


def _cpp_reasons(*, device_types, **_) -> list[str]:
    reasons = []
    ext = _ext.load()
    if ext is not None and not hasattr(ext, "centroid_candidates_cpu"):
        reasons.append(f"the installed fastrank._C predates centroid_candidates; {_ext.REBUILD_HINT}")
    if device_types != {"cpu"}:
        reasons.append("the extension's candidate kernel runs on CPU tensors (CUDA runs the reference)")
    return reasons


dispatch.register(OP, "cpp", {"cpu": dispatch.Kernels(_cpp_forward)}, reasons=_cpp_reasons,
                  describe=lambda **_: "C++ CPU kernel (one pass over the probed lists, 32,768 documents at a time: a "
                                       "running estimate and a stamp per document, per thread; a heap of the best "
                                       "ndocs)")
dispatch.register(OP, "reference", dispatch.Kernels(_reference_forward),
                  describe=lambda **_: "eager PyTorch (centroid_candidates_ref: gather every probed entry, "
                                       "torch.unique the (query, document) pairs, sort)")
dispatch.register_context(OP, lambda *tensors: {})


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
def centroid_candidates(probe_c: Tensor, gain: Tensor, q_offsets: Tensor, ivf_offsets: Tensor, ivf_docs: Tensor, *,
                        n: int, ndocs: int, backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Each query's best ``ndocs`` candidates by the centroid-interaction estimate (module docstring).

    Args:
        probe_c: int64 (Tq, P), the lists each query token probes (a batch's query tokens back to back).
        gain: float32 (Tq, P), their gains: >= 0, each row non-increasing (best probe first).
        q_offsets: int64 (B + 1,), query ``b`` owns rows ``q_offsets[b]:q_offsets[b+1]``.
        ivf_offsets: int64 (C + 1,), list ``c`` is ``ivf_docs[ivf_offsets[c]:ivf_offsets[c+1]]``.
        ivf_docs: int32 (E,), document positions in ``[0, n)``, ascending within each list (repeats allowed):
            the kernel walks the lists one range of documents at a time.
        n: documents in the index.
        ndocs: candidates kept per query.
        backend: force a backend (``"cpp"`` or ``"reference"``); default: the first that can run.

    Returns ``(docs, approx, counts)``: int64 ``(B, ndocs)`` documents, ascending in each row's first
    ``counts[b]`` entries and -1 after; float32 ``(B, ndocs)`` their estimates (NaN after); int64 ``(B,)``.
    """
    n, ndocs = _check_inputs(probe_c, gain, q_offsets, ivf_offsets, ivf_docs, n, ndocs)
    tensors = (probe_c, gain, q_offsets, ivf_offsets, ivf_docs)
    impl = dispatch.choose(OP, tensors, backend)
    return dispatch.kernels(OP, impl.backend, probe_c).forward(probe_c, gain, q_offsets, ivf_offsets, ivf_docs, n,
                                                               ndocs)


def centroid_candidates_ref(probe_c: Tensor, gain: Tensor, q_offsets: Tensor, ivf_offsets: Tensor, ivf_docs: Tensor,
                            n: int, ndocs: int) -> tuple[Tensor, Tensor, Tensor]:
    """The specification of :func:`centroid_candidates` in PyTorch: every probed entry gathered, (query,
    document) pairs merged by ``torch.unique``, each token's best gain per pair by ``scatter_reduce``, the
    tokens' gains summed in token order, and each query's pairs ranked by (estimate descending, document
    ascending). Memory grows with the probed entries of the whole batch."""
    n, ndocs = _check_inputs(probe_c, gain, q_offsets, ivf_offsets, ivf_docs, n, ndocs)
    _check_values(probe_c, gain, q_offsets, ivf_offsets, ivf_docs, n)
    dev = probe_c.device
    nb, (tq, p) = q_offsets.numel() - 1, probe_c.shape
    docs, approx, counts = _outputs(nb, ndocs, dev)
    if nb == 0 or tq == 0 or p == 0:
        return docs, approx, counts
    q_len = q_offsets.diff()
    tok_query = torch.repeat_interleave(torch.arange(nb, device=dev), q_len, output_size=tq)
    tok_pos = torch.arange(tq, device=dev) - q_offsets[tok_query]
    width = int(q_len.max())
    entries, entry_offsets = segment_rows(ivf_offsets, probe_c.reshape(-1))  # every probed list, back to back
    probe = torch.repeat_interleave(torch.arange(tq * p, device=dev), entry_offsets.diff(), output_size=entries.numel())
    tok = probe // p
    doc = ivf_docs[entries].long()
    bad = (doc < 0) | (doc >= n)
    if bool(bad.any()):
        e = int(entries[torch.nonzero(bad)[0, 0]])
        raise ValueError(f"{OP}: ivf_docs[{e}] = {int(ivf_docs[e])} does not index the {n} documents (0 .. {n - 1})")
    same_list = probe[1:] == probe[:-1]
    bad = same_list & (doc[1:] < doc[:-1])
    if bool(bad.any()):
        e = int(entries[torch.nonzero(bad)[0, 0] + 1])
        raise ValueError(f"{OP}: each list of ivf_docs must be ascending, but ivf_docs[{e}] = {int(ivf_docs[e])} is "
                         "below an earlier entry of its list")
    pairs, pair_of_entry = torch.unique(tok_query[tok] * n + doc, return_inverse=True)
    if pairs.numel() == 0:
        return docs, approx, counts
    best = torch.zeros(pairs.numel() * width, dtype=torch.float32, device=dev)
    best.scatter_reduce_(0, pair_of_entry * width + tok_pos[tok], gain.reshape(-1)[probe], reduce="amax")
    best = best.view(-1, width)
    est = best[:, 0].clone()
    for col in range(1, width):  # token order, one float32 add per token (as the kernel sums)
        est += best[:, col]
    # pairs are sorted by (query, document); rank each query's by estimate, the lower document first on ties.
    pair_query = pairs // n
    by_est = torch.sort(est, descending=True, stable=True).indices
    order = by_est[torch.sort(pair_query[by_est], stable=True).indices]
    per_query = torch.bincount(pair_query, minlength=nb)
    first = torch.cumsum(per_query, 0) - per_query
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=dev) - first[pair_query[order]]
    kept = torch.nonzero(rank < ndocs).squeeze(1)  # ascending pair index: (query, document) order
    kq = pair_query[kept]
    counts.copy_(torch.bincount(kq, minlength=nb).clamp_(max=ndocs))
    slot = torch.arange(kept.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[kq]
    docs[kq, slot] = pairs[kept] - kq * n
    approx[kq, slot] = est[kept]
    return docs, approx, counts
