"""Stage 1 of the token index (fastrank.ops.centroid_candidates): the C++ kernel against
centroid_candidates_ref, the spec, on fresh random inverted lists (ascending like an index's, with and without
repeats, over one and several of the kernel's ranges of documents), queries of different lengths, gains with
exact ties, ndocs above and below the candidates; a brute-force restatement of the estimate; TokenIndex search through both backends; and the errors for bad input,
each naming its argument.

Tolerance: none. Both backends add a document's per-token gains in token order, one float32 add per token
(the reference adds exact zeros for the tokens that miss it), so estimates agree bit for bit and the ranking,
ties broken by the lower document, picks the same documents.
"""
from __future__ import annotations

import functools

import pytest
import torch

from fastrank import _ext
from fastrank.ops import centroid_candidates as cc
from fastrank.ops.centroid_candidates import centroid_candidates, centroid_candidates_ref

EXT = _ext.load()
HAS_CPP = EXT is not None and hasattr(EXT, "centroid_candidates_cpu")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="needs the compiled extension with centroid_candidates")
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp)]


def _problem(seed, *, n, c, per_list, b, max_len, p, ties=False, repeats=False, empty_lists=0.2):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 2 * per_list, (c,), generator=g)
    lengths[torch.rand(c, generator=g) < empty_lists] = 0
    lists = []
    for ln in lengths.tolist():
        docs = torch.randint(0, n, (ln,), generator=g)
        lists.append(docs.sort().values if repeats else docs.unique())  # ascending, as an index's
    ivf_offsets = torch.zeros(c + 1, dtype=torch.int64)
    ivf_offsets[1:] = torch.tensor([len(x) for x in lists]).cumsum(0)
    ivf_docs = torch.cat(lists).to(torch.int32)
    q_len = torch.randint(1, max_len + 1, (b,), generator=g)
    q_offsets = torch.zeros(b + 1, dtype=torch.int64)
    q_offsets[1:] = q_len.cumsum(0)
    tq = int(q_offsets[-1])
    probe_c = torch.stack([torch.randperm(c, generator=g)[:p] for _ in range(tq)])
    gain = torch.rand(tq, p, generator=g) * 2
    if ties:  # few distinct values: equal gains and equal estimates abound
        gain = (gain * 2).floor() / 2
    gain = gain.sort(1, descending=True).values.contiguous()
    return probe_c, gain, q_offsets, ivf_offsets, ivf_docs


def _brute_force(probe_c, gain, q_offsets, ivf_offsets, ivf_docs, n, ndocs):
    """The estimate restated one query, one token, one document at a time, in float32 like the op."""
    out = []
    for b in range(q_offsets.numel() - 1):
        est: dict[int, torch.Tensor] = {}
        for l in range(int(q_offsets[b]), int(q_offsets[b + 1])):
            best: dict[int, float] = {}
            for j in range(probe_c.shape[1]):
                c = int(probe_c[l, j])
                for d in ivf_docs[ivf_offsets[c]:ivf_offsets[c + 1]].tolist():
                    best[d] = max(best.get(d, 0.0), float(gain[l, j]))
            for d, v in best.items():
                est[d] = est.get(d, torch.zeros((), dtype=torch.float32)) + torch.tensor(v, dtype=torch.float32)
        ranked = sorted(est, key=lambda d: (-float(est[d]), d))[:ndocs]
        out.append(({d: float(est[d]) for d in ranked}))
    return out


def _rows(docs, approx, counts):
    return [dict(zip(docs[b, :c].tolist(), approx[b, :c].tolist())) for b, c in enumerate(counts.tolist())]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ties", [False, True])
def test_matches_a_brute_force_statement_of_the_estimate(backend, ties):
    prob = _problem(1 + ties, n=300, c=24, per_list=12, b=5, max_len=6, p=3, ties=ties)
    for ndocs in (1, 7, 1000):
        docs, approx, counts = centroid_candidates(*prob, n=300, ndocs=ndocs, backend=backend)
        want = _brute_force(*prob, 300, ndocs)
        assert _rows(docs, approx, counts) == want
        for b, c in enumerate(counts.tolist()):
            row = docs[b, :c]
            assert torch.equal(row, row.sort().values)  # ascending
            assert (docs[b, c:] == -1).all() and approx[b, c:].isnan().all()


@needs_cpp
@pytest.mark.parametrize("case", [
    dict(n=5000, c=256, per_list=60, b=9, max_len=32, p=8),
    dict(n=5000, c=256, per_list=60, b=9, max_len=32, p=8, ties=True),
    dict(n=777, c=50, per_list=30, b=4, max_len=33, p=1, repeats=True),
    # Several ranges of documents (the kernel walks 32,768 at a time), a list resuming in each; and one past
    # a range by a single document.
    dict(n=300_000, c=96, per_list=4000, b=5, max_len=32, p=8, repeats=True),
    dict(n=32_769, c=40, per_list=3000, b=4, max_len=16, p=4, ties=True),
    dict(n=40, c=64, per_list=3, b=6, max_len=5, p=64, ties=True, repeats=True, empty_lists=0.6),
])
@pytest.mark.parametrize("ndocs", [1, 16, 128, 100_000])
def test_the_kernel_equals_the_reference_bit_for_bit(case, ndocs):
    prob = _problem(sum(map(hash, map(str, case.values()))) % 1000 + ndocs, **case)
    got = centroid_candidates(*prob, n=case["n"], ndocs=ndocs, backend="cpp")
    want = centroid_candidates_ref(*prob, case["n"], ndocs)
    assert torch.equal(got[2], want[2])
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1].nan_to_num(-1.0), want[1].nan_to_num(-1.0))
    assert int(want[2].sum()) > 0


@needs_cpp
def test_the_kernel_is_the_same_on_one_thread_and_many():
    prob = _problem(7, n=20_000, c=512, per_list=200, b=17, max_len=32, p=8)
    many = centroid_candidates(*prob, n=20_000, ndocs=128, backend="cpp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = centroid_candidates(*prob, n=20_000, ndocs=128, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0)) for a, b in zip(many, one))


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_whose_lists_are_all_empty_have_no_candidates(backend):
    probe_c = torch.tensor([[0, 1], [2, 0]])
    gain = torch.tensor([[0.5, 0.25], [0.3, 0.0]])
    q_offsets = torch.tensor([0, 1, 2])
    ivf_offsets = torch.tensor([0, 0, 0, 3])  # lists 0 and 1 empty, list 2 holds 3 documents
    ivf_docs = torch.tensor([1, 4, 9], dtype=torch.int32)
    docs, approx, counts = centroid_candidates(probe_c, gain, q_offsets, ivf_offsets, ivf_docs, n=10, ndocs=2,
                                               backend=backend)
    assert counts.tolist() == [0, 2]
    assert docs.tolist() == [[-1, -1], [1, 4]]  # equal estimates: the lower documents win
    assert approx[1].tolist() == [0.30000001192092896, 0.30000001192092896]


@needs_cpp
def test_a_range_whose_every_document_is_reached_before_more_entries_come():
    # Two lists each holding every document of two full ranges of the kernel (32,768 documents each), probed by
    # one token and then a second: after the first list every document of a range is reached, and each further
    # entry of the range is a repeat (the kernel's bookkeeping of first reaches is then full).
    n = 2 * 32_768
    every = torch.arange(n, dtype=torch.int32)
    ivf_docs = torch.cat([every, every, every[::3]])
    ivf_offsets = torch.tensor([0, n, 2 * n, 2 * n + every[::3].numel()])
    probe_c = torch.tensor([[0, 2], [1, 0]])
    gain = torch.tensor([[0.75, 0.5], [0.625, 0.25]])
    q_offsets = torch.tensor([0, 2])
    got = centroid_candidates(probe_c, gain, q_offsets, ivf_offsets, ivf_docs, n=n, ndocs=64, backend="cpp")
    want = centroid_candidates(probe_c, gain, q_offsets, ivf_offsets, ivf_docs, n=n, ndocs=64, backend="reference")
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert got[2].tolist() == [64] and got[1][0].tolist() == [1.375] * 64 and got[0][0].tolist() == list(range(64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_returns_empty_results(backend):
    docs, approx, counts = centroid_candidates(torch.empty(0, 4, dtype=torch.int64), torch.empty(0, 4),
                                               torch.zeros(1, dtype=torch.int64), torch.tensor([0, 2]),
                                               torch.tensor([0, 1], dtype=torch.int32), n=2, ndocs=5,
                                               backend=backend)
    assert docs.shape == (0, 5) and approx.shape == (0, 5) and counts.shape == (0,)


def _valid():
    return _problem(3, n=50, c=8, per_list=5, b=2, max_len=3, p=2, empty_lists=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("break_it, message", [
    (lambda p: p[0].__setitem__((0, 1), 8), r"probe_c\[0, 1\] = 8 does not index the 8 lists"),
    (lambda p: p[0].__setitem__((1, 0), -1), r"probe_c\[1, 0\] = -1 does not index"),
    (lambda p: p[1].__setitem__((0, 0), float("nan")), r"gain\[0, 0\].*>= 0 \(not NaN\)"),
    (lambda p: p[1].__setitem__((0, 1), -0.5), r"gain\[0, 1\].*>= 0"),
    (lambda p: p[1].__setitem__((0, 1), 5.0), r"gain must be non-increasing.*gain\[0, 1\]"),
    (lambda p: p[4].__setitem__(0, 50), r"ivf_docs\[0\] = 50 .*does not index the 50 documents"),
    (lambda p: p[2].__setitem__(1, 99), r"offsets"),
    (lambda p: p[4].__setitem__(1, 2), r"each list of ivf_docs must be ascending, but ivf_docs\[1\] = 2"),
])
def test_bad_values_are_refused_naming_the_argument(backend, break_it, message):
    prob = list(_valid())
    prob[0][:, :] = torch.tensor([0, 1])  # every token probes lists 0 and 1, so list 0's first entry is read
    prob[4][0] = 3
    prob[4][1] = max(int(prob[4][1]), 3)  # list 0 stays ascending (it holds more than one entry)
    break_it(prob)
    with pytest.raises(ValueError, match=message):
        centroid_candidates(*prob, n=50, ndocs=4, backend=backend)


@pytest.mark.parametrize("change, message", [
    (lambda p: (p[0].int(),) + p[1:], r"probe_c must be int64 of shape \(Tq, P\)"),
    (lambda p: (p[0], p[1].double()) + p[2:], r"gain must be float32 of probe_c's shape"),
    (lambda p: (p[0], p[1][:, :1]) + p[2:], r"gain must be float32 of probe_c's shape"),
    (lambda p: p[:2] + (p[2].int(),) + p[3:], r"q_offsets must be int64"),
    (lambda p: p[:4] + (p[4].long(),), r"ivf_docs must be int32"),
    (lambda p: p[:4] + (p[4].tolist(),), r"ivf_docs must be a torch.Tensor"),
])
def test_bad_types_and_shapes_are_refused_naming_the_argument(change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        centroid_candidates(*change(_valid()), n=50, ndocs=4)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match=r"ndocs must be >= 1, got 0"):
        centroid_candidates(*_valid(), n=50, ndocs=0)
    with pytest.raises(ValueError, match=r"n \(documents\) must be in \[0, 2\^31\]"):
        centroid_candidates(*_valid(), n=-1, ndocs=3)


@needs_cpp
def test_index_search_is_the_same_through_either_backend(monkeypatch):
    from fastrank.index.tokens import TokenIndex

    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(3, 40, (400,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    vectors = torch.nn.functional.normalize(torch.randn(int(offsets[-1]), 32, generator=g), dim=1)
    index = TokenIndex(32, token_dtype="float16", ncentroids=64).add((vectors, offsets), progress=False)
    index.build(progress=False)
    qv = torch.nn.functional.normalize(torch.randn(5 * 8, 32, generator=g), dim=1)
    queries = (qv, torch.arange(0, 41, 8))
    results = {}
    for backend in ("cpp", "reference"):
        # Only stage 1 is forced (FASTRANK_BACKEND would force the exact scorer too).
        monkeypatch.setattr(cc, "centroid_candidates", functools.partial(centroid_candidates, backend=backend))
        results[backend] = index.search(queries, 10, ndocs=20, progress=False)
    assert (results["cpp"][1] == results["reference"][1]).all()
    assert (results["cpp"][0] == results["reference"][0]).all()
