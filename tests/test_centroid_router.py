"""The centroid router (fastrank.index.centroid_router): the nearest centroid through groups of centroids
agrees with the exact assignment on clustered tokens, is exact where the nearest centroid's group is probed,
and is what a streamed build with many centroids stores codes with."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from fastrank.bench.index_scale import SyntheticCorpus
from fastrank.index.centroid_router import CentroidRouter
from fastrank.index.token_stream import build_token_index
from fastrank.index.tokens import TokenIndex, nearest_centroid, spherical_kmeans


@functools.lru_cache(maxsize=2)  # shared by the tests, which only read them
def tokens_and_centroids(n_tokens=200_000, c=8192):
    x = torch.cat([v for v, _ in SyntheticCorpus(n_tokens, seed=3).chunks()])
    g = torch.Generator().manual_seed(0)
    cent = spherical_kmeans(x[torch.randperm(x.shape[0], generator=g)[:c * 20]], c, iters=3, generator=g)
    return x, cent


def test_router_agrees_with_the_exact_assignment_and_loses_little_where_it_does_not():
    x, cent = tokens_and_centroids()
    router = CentroidRouter.train(cent, seed=0)
    routed, exact = router.assign(x).long(), nearest_centroid(x, cent).long()
    assert routed.dtype == torch.int64 and int(routed.min()) >= 0 and int(routed.max()) < cent.shape[0]
    agree = (routed == exact).float().mean().item()
    loss = ((x * cent[exact]).sum(1) - (x * cent[routed]).sum(1))
    # Measured at 32,768 centroids (128 groups, 16 probed): 99.8% agreement, mean loss 0.0002, 99.9th percentile
    # 0.05. A router that ignored the groups' members, or probed the wrong groups, would agree for a few
    # percent of tokens and lose about 0.1-0.5 on most.
    assert agree >= 0.97, agree
    assert loss.mean().item() <= 0.01 and torch.quantile(loss, 0.99).item() <= 0.05, torch.quantile(loss, 0.99)


def test_router_is_exact_when_every_group_is_probed():
    x, cent = tokens_and_centroids(60_000, 8192)
    r = CentroidRouter.train(cent, seed=0)
    full = CentroidRouter(cent, r.groups, r.centres, probes=r.centres.shape[0])
    routed, exact = full.assign(x).long(), nearest_centroid(x, cent).long()
    s_routed, s_exact = (x * cent[routed]).sum(1), (x * cent[exact]).sum(1)
    # The same products in the same dtype, so the same best score: where products are taken in bfloat16
    # (AVX512-BF16, AMX) two centroids within a bfloat16 step (2^-8 near 1) tie, and either may be kept.
    from fastrank.index.kmeans import similarity_dtype

    atol = 2.0 ** -7 if similarity_dtype(x.device) == torch.bfloat16 else 1e-6
    torch.testing.assert_close(s_routed, s_exact, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def many_centroids(tmp_path_factory):
    """A streamed index of 200k synthetic tokens (H = 32) with 8,192 centroids: routed at build and search."""
    corpus = SyntheticCorpus(200_000, dim=32, seed=1)
    path = tmp_path_factory.mktemp("router") / "ix"
    build_token_index(path, corpus.chunks(), dim=32, ncentroids=8192, progress=False)
    return corpus, path


def test_a_streamed_build_with_many_centroids_routes_and_stores_the_router(many_centroids):
    _, path = many_centroids
    meta = json.loads((path / "meta.json").read_text())
    assert {"router_groups.npy", "router_centres.npy"} <= set(meta["sha256"])
    index = TokenIndex.load(path)
    groups = torch.from_numpy(np.load(path / "router_groups.npy"))
    assert groups.numel() == 8192 and int(groups.max()) < 32
    # Every stored code is a centroid whose score is close to the best one for its token.
    from fastrank.ops.maxsim_packed import dequantize_tokens

    x = dequantize_tokens(index._tokens[:5000], index._scales[:5000])
    codes = index._codes[:5000].long()
    best = (x @ index._centroids.T).max(1).values
    got = (x * index._centroids[codes]).sum(1)
    assert (best - got).mean().item() <= 0.01 * x.norm(dim=1).mean().item()


def test_top_is_the_exact_top_k_when_every_group_is_probed():
    x, cent = tokens_and_centroids(60_000, 8192)
    r = CentroidRouter.train(cent, seed=0)
    full = CentroidRouter(cent, r.groups, r.centres, probes=r.centres.shape[0])
    q = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:3000]]
    s, i = full.top(q, 9)
    s_exact, i_exact = (q @ cent.T).topk(9, dim=1)
    assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.shape == i.shape == (3000, 9)
    # float32 products of the same vectors, taken in blocks of a group's members rather than all at once.
    torch.testing.assert_close(s, s_exact, rtol=0, atol=1e-5)
    torch.testing.assert_close((q[:, None, :] * cent[i]).sum(-1), s, rtol=0, atol=1e-5)
    assert bool((s[:, :-1] >= s[:, 1:]).all())


def test_top_through_the_probed_groups_finds_most_of_the_exact_top_k():
    x, cent = tokens_and_centroids(60_000, 8192)
    r = CentroidRouter.train(cent, seed=0)
    q = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(2))[:3000]]
    s, i = r.top(q, 9)
    s_exact, i_exact = (q @ cent.T).topk(9, dim=1)
    found = sum(len(set(a) & set(b)) for a, b in zip(i.tolist(), i_exact.tolist())) / i.numel()
    # Measured 0.965 with 16 of 32 groups; routing by random groups would find about half.
    assert found >= 0.93, found
    # Every score is the true product of the token and the centroid returned, and never above the exact one.
    torch.testing.assert_close((q[:, None, :] * cent[i]).sum(-1), s, rtol=0, atol=1e-5)
    assert bool((s <= s_exact + 1e-5).all())
    assert int((i[:, :, None] == i[:, None, :]).sum()) == i.numel()  # no centroid twice in a row


def test_top_pads_a_row_whose_probed_groups_hold_fewer_than_k_centroids():
    g = torch.Generator().manual_seed(0)
    cent = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2])
    centres = torch.nn.functional.normalize(torch.stack([cent[groups == k].mean(0) for k in range(3)]), dim=1)
    r = CentroidRouter(cent, groups, centres, probes=1)
    q = cent[[0, 5]] + 0.01 * torch.randn(2, 8, generator=g)
    s, i = r.top(q, 5)
    assert torch.isneginf(s[0, 3:]).all() and torch.isfinite(s[0, :3]).all()  # group 0 has 3 members
    assert set(i[0, :3].tolist()) == {0, 1, 2} and torch.isfinite(s[1]).all()


def test_a_search_routes_its_query_tokens_by_default_with_many_centroids_and_keeps_recall(many_centroids):
    corpus, path = many_centroids
    index = TokenIndex.load(path)
    queries = corpus.queries(40)
    _, exhaustive = index.search(queries, 10, exhaustive=True, progress=False)
    _, routed = index.search(queries, 10, progress=False)
    assert index._router is not None and index._router.probes < index._router.centres.shape[0]
    _, unrouted = index.search(queries, 10, route=False, progress=False)

    def recall(ids):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exhaustive.tolist())])

    assert recall(routed) >= 0.95 and recall(routed) >= recall(unrouted) - 0.02, (recall(routed), recall(unrouted))
    # Routing through every group is scoring every centroid: the same candidates, the same results.
    from fastrank.index.centroid_router import CentroidRouter as R

    index._router = R(index._router.centroids, index._router.groups, index._router.centres,
                      probes=index._router.centres.shape[0])
    _, all_groups = index.search(queries, 10, progress=False)
    assert (all_groups == unrouted).all()


def test_a_search_scores_every_centroid_for_a_token_whose_groups_are_short(many_centroids):
    corpus, path = many_centroids
    index = TokenIndex.load(path)
    queries = corpus.queries(5)
    _, unrouted = index.search(queries, 10, route=False, progress=False)
    index.search(queries, 10, progress=False)
    r = index._router
    # One probed group of one or two members cannot give nprobe + 1 = 9 centroids: every token falls back.
    tiny = torch.arange(8192) % 4096
    index._router = CentroidRouter(r.centroids, tiny, torch.nn.functional.normalize(torch.randn(4096, 32), dim=1),
                                   probes=1)
    _, fallback = index.search(queries, 10, progress=False)
    assert (fallback == unrouted).all()


def test_bad_arguments_are_refused_naming_them(many_centroids):
    corpus, path = many_centroids
    index = TokenIndex.load(path)
    with pytest.raises(TypeError, match="route must be None, True or False"):
        index.search(corpus.queries(2), 10, route="yes", progress=False)
    r = CentroidRouter.train(index._centroids, seed=0)
    with pytest.raises(ValueError, match=r"x must be \(n, 32\)"):
        r.top(torch.randn(4, 16), 3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        r.top(torch.randn(4, 32), 0)


def test_a_search_routes_through_the_groups_stored_with_the_index(many_centroids, tmp_path):
    """A loaded streamed index routes its query tokens through the groups its build stored, not groups
    trained again; a groups file altered after the build (here naming a group the index lacks) is refused at
    load, naming the file."""
    import shutil

    from fastrank.index.storage import IndexFormatError

    corpus, path = many_centroids
    index = TokenIndex.load(path)
    v, o = corpus.queries(4)
    index.search((v, o), 10, progress=False)
    stored = torch.from_numpy(np.load(path / "router_groups.npy")).long()
    assert torch.equal(index._router.groups, stored)
    assert torch.equal(index._router.centres, torch.from_numpy(np.load(path / "router_centres.npy")))
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    groups = np.load(bad / "router_groups.npy")
    groups[7] = 32  # the router has 32 groups
    np.save(bad / "router_groups.npy", groups)
    with pytest.raises(IndexFormatError, match="router_groups.npy"):
        TokenIndex.load(bad)
