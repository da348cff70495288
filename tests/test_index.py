import json
import sys

import numpy as np
import pytest
import torch

from fastrank.index import DenseIndex, IndexFormatError, TokenIndex

faiss = pytest.importorskip("faiss")


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    # These indexes are tiny: OpenMP threads only add spin-wait overhead, badly so on a shared 2-core box.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)

DIM = 24


def clustered(n, seed, dim=DIM, centers=40):
    """Vectors around random centres, so IVF/HNSW have structure to find (uniform noise has none)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


X = clustered(3000, 0)
Q = clustered(50, 1)
IDS = [f"doc{i}" for i in range(len(X))]


def brute_force(x, q, k, metric):
    s = q @ x.T if metric == "ip" else -((q[:, None, :] - x[None]) ** 2).sum(-1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_flat_is_exact(metric, backend):
    index = DenseIndex(DIM, "flat", metric, backend=backend).add(X, IDS, progress=False)
    scores, ids = index.search(Q, 10, progress=False)
    ref_s, ref_i = brute_force(X, Q, 10, metric)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-4)
    assert (ids == np.array(IDS, dtype=object)[ref_i]).mean() > 0.99  # near-ties may swap


@pytest.mark.parametrize("kind, params, min_recall", [
    ("ivf_flat", dict(nlist=32, nprobe=8), 0.9),
    ("ivf_pq", dict(nlist=16, nprobe=8, pq_m=8, pq_bits=6), 0.5),
    ("hnsw", dict(hnsw_m=16), 0.9),
])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_approximate_kinds_recall(kind, params, min_recall, metric):
    index = DenseIndex(DIM, kind, metric, **params).add(X, progress=False)
    _, pos = index.search_positions(Q, 20, progress=False)
    _, ref = brute_force(X, Q, 20, metric)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(pos, ref)])
    assert recall >= min_recall, f"{kind}/{metric}: recall@20 {recall:.3f}"


def test_seeded_training_is_reproducible_and_seed_matters():
    def build(seed):
        return DenseIndex(DIM, "ivf_pq", nlist=8, nprobe=2, pq_m=8, pq_bits=6, seed=seed).add(X[:1000], progress=False)

    a, b, c = build(0), build(0), build(1)
    sa, ia = a.search_positions(Q, 10, progress=False)
    sb, ib = b.search_positions(Q, 10, progress=False)
    sc, _ = c.search_positions(Q, 10, progress=False)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(sa, sb)
    assert not np.array_equal(sa, sc)


def test_external_ids_torch_inputs_and_short_results():
    index = DenseIndex(DIM).add(torch.from_numpy(X[:3]), ids=["a", "b", "c"])
    scores, ids = index.search(torch.from_numpy(X[:2]), k=5, progress=False)
    assert isinstance(scores, torch.Tensor) and scores.shape == (2, 5)
    assert ids[0, 0] == "a" and ids[1, 0] == "b"
    assert list(ids[0, 3:]) == [None, None] and torch.isinf(scores[:, 3:]).all()
    index = DenseIndex(DIM).add(X[:3])
    index.add(X[3:5])  # default ids continue from the current size
    assert index.ids == [0, 1, 2, 3, 4]
    ids = index.search(X[:1], k=7, progress=False)[1]
    assert ids.dtype == np.int64 and ids[0, 0] == 0
    assert sorted(ids[0, :5].tolist()) == [0, 1, 2, 3, 4] and ids[0, 5:].tolist() == [-1, -1]
    run = index.to_run(["q1"], X[3:4], k=2, progress=False)
    assert list(run["q1"])[0] == "3"


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq", "hnsw"])
def test_save_load_roundtrip(tmp_path, kind):
    index = DenseIndex(DIM, kind, nlist=16, pq_m=8, pq_bits=6).add(X[:1000], IDS[:1000], progress=False)
    index.save(tmp_path / "ix")
    loaded = DenseIndex.load(tmp_path / "ix")
    assert (loaded.kind, loaded.metric, len(loaded), loaded.ids) == (kind, "ip", 1000, IDS[:1000])
    s1, i1 = index.search(Q, 10, progress=False)
    s2, i2 = loaded.search(Q, 10, progress=False)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2)


def test_torch_backend_save_load(tmp_path):
    index = DenseIndex(DIM, backend="torch").add(X[:100])
    index.save(tmp_path / "ix")
    loaded = DenseIndex.load(tmp_path / "ix", backend="torch")
    np.testing.assert_array_equal(loaded.search(Q, 5, progress=False)[1], index.search(Q, 5, progress=False)[1])


def test_corrupt_or_mismatched_saved_index(tmp_path):
    DenseIndex(DIM).add(X[:100]).save(tmp_path / "ix")
    data = tmp_path / "ix" / "index.faiss"
    blob = bytearray(data.read_bytes())
    blob[-10] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(IndexFormatError, match="index.faiss: checksum does not match"):
        DenseIndex.load(tmp_path / "ix")

    DenseIndex(DIM).add(X[:100]).save(tmp_path / "ix2")
    meta_file = tmp_path / "ix2" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["ntotal"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="100 ids but meta.json says ntotal=99"):
        DenseIndex.load(tmp_path / "ix2")
    del meta["sha256"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="meta.json: missing sha256"):
        DenseIndex.load(tmp_path / "ix2")
    meta_file.write_text("{not json")
    with pytest.raises(IndexFormatError, match="meta.json: not valid JSON"):
        DenseIndex.load(tmp_path / "ix2")
    (tmp_path / "ix3").mkdir()
    with pytest.raises(IndexFormatError, match="missing meta.json"):
        DenseIndex.load(tmp_path / "ix3")


def test_faiss_index_shards_over_dense_indexes_match_one_index():
    # The README's recipe for a corpus split into parts: FAISS merges the shards, positions become global.
    parts = [DenseIndex(DIM, "flat").add(X[i:i + 1000], IDS[i:i + 1000], progress=False) for i in (0, 1000, 2000)]
    shards = faiss.IndexShards(DIM, True, True)  # threaded, successive ids
    for part in parts:
        shards.add_shard(part.faiss_index)
    scores, pos = shards.search(Q, 10)
    ids = np.array([i for part in parts for i in part.ids], dtype=object)[pos]
    full_scores, full_ids = DenseIndex(DIM).add(X, IDS, progress=False).search(Q, 10, progress=False)
    np.testing.assert_allclose(scores, full_scores, rtol=1e-5, atol=1e-5)
    assert (ids == full_ids).mean() > 0.99


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown index kind 'ivf'"):
        DenseIndex(DIM, "ivf")
    with pytest.raises(ValueError, match="unknown metric 'cos'"):
        DenseIndex(DIM, metric="cos")
    with pytest.raises(ValueError, match="pq_m=5 must divide dim=24"):
        DenseIndex(DIM, "ivf_pq", pq_m=5)
    index = DenseIndex(DIM)
    with pytest.raises(ValueError, match="index is empty"):
        index.search(Q, 3)
    with pytest.raises(ValueError, match="vectors has dim 8, the index has dim 24"):
        index.add(X[:, :8])
    with pytest.raises(ValueError, match=r"vectors must be 2-D \(N, dim\), got shape \(24,\)"):
        index.add(X[0])
    with pytest.raises(TypeError, match="vectors must be a floating-point array"):
        index.add(np.ones((2, DIM), dtype=np.int64))
    with pytest.raises(ValueError, match="vectors is empty"):
        index.add(X[:0])
    with pytest.raises(ValueError, match="ids has 1 entries for 2 vectors"):
        index.add(X[:2], ids=["a"])
    with pytest.raises(ValueError, match="too few"):
        DenseIndex(DIM, "ivf_pq", nlist=4).add(X[:100])
    with pytest.raises(RuntimeError, match="torch backend does exact search only"):
        DenseIndex(DIM, "hnsw", backend="torch")


def test_missing_faiss_is_a_clear_error_only_when_needed(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(RuntimeError, match="pip install faiss-cpu"):
        DenseIndex(DIM, "hnsw")
    # Exact search still works, on torch.
    index = DenseIndex(DIM)
    assert index.backend == "torch"
    assert index.add(X[:10]).search(X[:1], 1, progress=False)[1][0, 0] == 0


# -- TokenIndex -----------------------------------------------------------------------------------------
TOKEN_DTYPES = ["float16", "bfloat16", "int8"]


def ragged(n, seed, lo=1, hi=12, dim=DIM, empty=()):
    """n documents of lo..hi-1 random unit tokens (those in ``empty`` have none), back to back."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g)
    lens[list(empty)] = 0
    vectors = torch.nn.functional.normalize(torch.randn(int(lens.sum()), dim, generator=g), dim=-1)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = lens.cumsum(0)
    return vectors, offsets


def clustered_tokens(n, seed, topics=30, dim=DIM):
    """Documents drawing their tokens around 2 of ``topics`` centres: structure for centroids to find."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(topics, dim, generator=g), dim=1)
    lens = torch.randint(5, 40, (n,), generator=g)
    doc = torch.repeat_interleave(torch.arange(n), lens)
    pick = torch.randint(0, topics, (n, 2), generator=g)[doc, torch.randint(0, 2, (doc.numel(),), generator=g)]
    noise = 0.6 * torch.randn(doc.numel(), dim, generator=g) / dim ** 0.5
    vectors = torch.nn.functional.normalize(centres[pick] + noise, dim=1)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = lens.cumsum(0)
    return vectors, offsets


D_VEC, D_OFF = ragged(120, 0, hi=40, empty=(7,))
Q_VEC, Q_OFF = ragged(6, 1, lo=1, hi=10)
PIDS = [f"p{i}" for i in range(120)]


def reference_scores(index, q_vec, q_off):
    """(Q, N) MaxSim of every query against every stored document by ``maxsim_packed_ref``, the spec, on the
    index's stored tokens (float16 / bfloat16 as stored; int8 with its scales)."""
    from fastrank.ops.maxsim_packed import maxsim_packed_ref

    tokens, scales = index._tokens, index._scales
    rows = []
    for i in range(len(q_off) - 1):
        q = q_vec[q_off[i]:q_off[i + 1]]
        q = q.float() if scales is not None else q.to(tokens.dtype)
        rows.append(maxsim_packed_ref(q, tokens, index._offsets, scales=scales))
    return torch.stack(rows)


@pytest.mark.parametrize("token_dtype", TOKEN_DTYPES)
def test_token_index_probing_every_centroid_equals_exhaustive(token_dtype):
    index = TokenIndex(DIM, token_dtype=token_dtype, ncentroids=16).add((D_VEC, D_OFF), PIDS, progress=False)
    s_exh, i_exh = index.search((Q_VEC, Q_OFF), k=7, exhaustive=True, progress=False)
    # Every centroid probed and every candidate kept: stage 1 passes every non-empty document on.
    s_all, i_all = index.search((Q_VEC, Q_OFF), k=7, nprobe=16, ndocs=len(index), progress=False)
    np.testing.assert_array_equal(i_all, i_exh)
    np.testing.assert_allclose(s_all, s_exh, rtol=1e-6, atol=1e-6)
    assert index.ncentroids == 16 and index.is_built


@pytest.mark.parametrize("token_dtype", TOKEN_DTYPES)
def test_token_index_exhaustive_is_the_reference_ranking(token_dtype):
    index = TokenIndex(DIM, token_dtype=token_dtype, stage1="exhaustive").add((D_VEC, D_OFF), PIDS, progress=False)
    scores, ids = index.search((Q_VEC, Q_OFF), k=10, progress=False)
    ref = reference_scores(index, Q_VEC, Q_OFF)
    top = ref.topk(10, dim=1)
    # int8: the CPU kernel also quantizes the query per token (VNNI dot products): its scores are ~0.3% off
    # the reference's float32 ones, so near-ties may swap; compare the scores each returned id gets instead.
    atol = 2e-2 if token_dtype == "int8" else 1e-4
    np.testing.assert_allclose(scores, top.values.numpy(), rtol=0, atol=atol)
    got = torch.tensor([[PIDS.index(p) for p in row] for row in ids])
    np.testing.assert_allclose(ref.gather(1, got).numpy(), top.values.numpy(), rtol=0, atol=atol)
    if token_dtype != "int8":
        assert ids.tolist() == [[PIDS[j] for j in row] for row in top.indices.tolist()]


def test_token_index_storage_dtypes_and_bytes():
    sizes = {}
    for token_dtype in TOKEN_DTYPES:
        index = TokenIndex(DIM, token_dtype=token_dtype, stage1="exhaustive").add((D_VEC, D_OFF), progress=False)
        sizes[token_dtype] = index.storage_bytes()["tokens"]
        docs = index.documents
        torch.testing.assert_close(docs.vectors.float(), D_VEC, rtol=0, atol={"float16": 1e-3, "bfloat16": 4e-3,
                                                                                  "int8": 5e-3}[token_dtype])
    t = D_VEC.shape[0]
    assert sizes == {"float16": 2 * t * DIM, "bfloat16": 2 * t * DIM, "int8": t * DIM + 4 * t}


def test_token_index_centroid_search_finds_the_exhaustive_top_on_clustered_tokens():
    d_vec, d_off = clustered_tokens(400, 2)
    g = torch.Generator().manual_seed(3)
    # Each query: 8 tokens of one document, perturbed; that document and its topic-mates should come first.
    src = torch.randint(0, 400, (40,), generator=g)
    rows = torch.cat([d_off[s] + torch.randint(0, int(d_off[s + 1] - d_off[s]), (8,), generator=g) for s in src])
    noise = 0.1 * torch.randn(rows.numel(), DIM, generator=g) / DIM ** 0.5
    q_vec = torch.nn.functional.normalize(d_vec[rows] + noise, dim=1)
    q_off = torch.arange(0, rows.numel() + 1, 8)
    index = TokenIndex(DIM).add((d_vec, d_off), progress=False).build(progress=False)
    _, exact = index.search((q_vec, q_off), k=10, exhaustive=True, progress=False)

    def recall(**kw):
        _, approx = index.search((q_vec, q_off), k=10, progress=False, **kw)
        assert all(r is not None for row in approx for r in row)  # k results even when ndocs < k
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])

    assert recall() >= 0.95
    assert recall(ndocs=40) >= 0.9  # 10% of the corpus scored exactly
    assert recall(nprobe=1, ndocs=3) < 0.8  # stage 1 really prunes


def test_token_index_add_after_build_and_determinism():
    first = TokenIndex(DIM, ncentroids=8, seed=5).add((D_VEC, D_OFF), PIDS, progress=False).build(progress=False)
    again = TokenIndex(DIM, ncentroids=8, seed=5).add((D_VEC, D_OFF), PIDS, progress=False).build(progress=False)
    other = TokenIndex(DIM, ncentroids=8, seed=6).add((D_VEC, D_OFF), PIDS, progress=False).build(progress=False)
    torch.testing.assert_close(first._centroids, again._centroids, rtol=0, atol=0)
    assert not torch.equal(first._centroids, other._centroids)
    more_vec, more_off = ragged(30, 9, hi=20)
    first.add((more_vec, more_off), progress=False)  # assigned to the trained centroids, lists rebuilt lazily
    assert first.ids[-30:] == list(range(120, 150)) and first.num_tokens == D_VEC.shape[0] + more_vec.shape[0]
    _, i_all = first.search((Q_VEC, Q_OFF), k=5, nprobe=8, ndocs=len(first), progress=False)
    _, i_exh = first.search((Q_VEC, Q_OFF), k=5, exhaustive=True, progress=False)
    np.testing.assert_array_equal(i_all, i_exh)
    assert first._codes.numel() == first.num_tokens and first.ncentroids == 8


@pytest.mark.parametrize("token_dtype, stage1", [(d, "centroids") for d in TOKEN_DTYPES] + [("int8", "exhaustive")])
def test_token_index_save_load_roundtrip(tmp_path, token_dtype, stage1):
    index = TokenIndex(DIM, token_dtype=token_dtype, stage1=stage1, nprobe=3, ndocs=40)
    index.add((D_VEC, D_OFF), PIDS, progress=False)
    scores, ids = index.search((Q_VEC, Q_OFF), k=5, progress=False)
    index.save(tmp_path / "tix", progress=False)
    loaded = TokenIndex.load(tmp_path / "tix")
    assert (loaded.token_dtype, loaded.stage1, loaded.nprobe, loaded.ndocs, loaded.ncentroids, loaded.ids) == \
        (token_dtype, stage1, 3, 40, index.ncentroids, PIDS)
    assert loaded._tokens.dtype == index._tokens.dtype and torch.equal(loaded._tokens, index._tokens)
    s2, i2 = loaded.search((Q_VEC, Q_OFF), k=5, progress=False)
    np.testing.assert_array_equal(i2, ids)
    np.testing.assert_array_equal(s2, scores)
    stored = np.load(tmp_path / "tix" / "tokens.npy")
    assert stored.dtype == {"float16": np.float16, "bfloat16": np.int16, "int8": np.int8}[token_dtype]
    assert (tmp_path / "tix" / "scales.npy").is_file() == (token_dtype == "int8")
    assert (tmp_path / "tix" / "codes.npy").is_file() == (stage1 == "centroids")


def test_token_index_tampered_or_old_format_fails_to_load(tmp_path):
    TokenIndex(DIM, ncentroids=8).add((D_VEC, D_OFF), progress=False).save(tmp_path / "tix", progress=False)
    codes = tmp_path / "tix" / "codes.npy"
    blob = bytearray(codes.read_bytes())
    blob[-3] ^= 0x01
    codes.write_bytes(bytes(blob))
    with pytest.raises(IndexFormatError, match="codes.npy: checksum does not match"):
        TokenIndex.load(tmp_path / "tix")

    # The version-1 layout: float16 tokens plus a per-token ANN in ann/.
    old = tmp_path / "old"
    (old / "ann").mkdir(parents=True)
    np.save(old / "tokens.npy", D_VEC.half().numpy())
    (old / "meta.json").write_text(json.dumps({"format": "fastrank.TokenIndex", "version": 1, "dim": DIM,
                                               "ndocs": 120, "ntokens": int(D_OFF[-1]), "sha256": {}}))
    with pytest.raises(IndexFormatError, match=r"format version 1.*rebuild with `fastrank index --tokens"):
        TokenIndex.load(old)
    meta = json.loads((tmp_path / "tix" / "meta.json").read_text())
    (tmp_path / "tix" / "meta.json").write_text(json.dumps(meta | {"version": 99}))
    with pytest.raises(IndexFormatError, match="version 99.*newer fastrank"):
        TokenIndex.load(tmp_path / "tix")
    (tmp_path / "tix" / "meta.json").write_text(json.dumps(meta | {"format": "fastrank.DenseIndex"}))
    with pytest.raises(IndexFormatError, match="expected 'fastrank.TokenIndex'"):
        TokenIndex.load(tmp_path / "tix")
    with pytest.raises(IndexFormatError, match="not a directory"):
        TokenIndex.load(tmp_path / "missing")


def test_token_index_bad_arguments():
    with pytest.raises(ValueError, match="token_dtype must be one of .* got 'float32'"):
        TokenIndex(DIM, token_dtype="float32")
    with pytest.raises(ValueError, match="stage1 must be one of"):
        TokenIndex(DIM, stage1="hnsw")
    with pytest.raises(ValueError, match="nprobe must be a positive int, got 0"):
        TokenIndex(DIM, nprobe=0)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        TokenIndex(0)
    with pytest.raises(ValueError, match="ncentroids: an index with stage1='exhaustive' has no centroids"):
        TokenIndex(DIM, stage1="exhaustive", ncentroids=4)
    index = TokenIndex(DIM)
    with pytest.raises(ValueError, match="index is empty"):
        index.search((Q_VEC, Q_OFF))
    with pytest.raises(ValueError, match="tokens have dim 8, the index has dim 24"):
        index.add((D_VEC[:, :8], D_OFF))
    with pytest.raises(ValueError, match="tokens: offsets end at"):
        index.add((D_VEC[:5], D_OFF))
    with pytest.raises(ValueError, match="ids has 2 entries for 120 documents"):
        index.add((D_VEC, D_OFF), ids=["a", "b"])
    index.add((D_VEC, D_OFF), progress=False)
    for kw, message in [({"k": 0}, "k must be a positive int, got 0"), ({"nprobe": 0}, "nprobe must be a positive int"),
                        ({"ndocs": -1}, "ndocs must be a positive int, got -1")]:
        with pytest.raises(ValueError, match=message):
            index.search((Q_VEC, Q_OFF), progress=False, **kw)
    with pytest.raises(ValueError, match="queries have dim 8, the index has dim 24"):
        index.search((Q_VEC[:, :8], Q_OFF))
    with pytest.raises(ValueError, match="queries: query 1 has no tokens"):
        index.search((Q_VEC[:3], torch.tensor([0, 3, 3])))
    with pytest.raises(ValueError, match="ncentroids=5000 exceeds the"):
        TokenIndex(DIM, ncentroids=5000).add((D_VEC, D_OFF), progress=False).build(progress=False)
    exhaustive = TokenIndex(DIM, stage1="exhaustive").add((D_VEC, D_OFF), progress=False)
    with pytest.raises(ValueError, match="exhaustive=False: this index was built with stage1='exhaustive'"):
        exhaustive.search((Q_VEC, Q_OFF), exhaustive=False)


def test_token_index_needs_no_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    index = TokenIndex(DIM, ncentroids=8).add((D_VEC, D_OFF), progress=False)
    assert index.search((Q_VEC, Q_OFF), k=2, progress=False)[1].shape == (6, 2)


def test_default_ncentroids():
    from fastrank.index.tokens import default_ncentroids

    assert default_ncentroids(1_009_836) == 4096  # SciFact's MiniLM tokens
    assert default_ncentroids(100) == 2 and default_ncentroids(10) == 1
    assert all(default_ncentroids(t) * 39 <= t for t in (39, 1000, 12345, 10 ** 6))


def test_import_fastrank_pulls_in_no_optional_dependency():
    import subprocess

    code = ("import sys, fastrank, fastrank.index, fastrank.data, fastrank.evaluate, fastrank.cli; "
            "print(sorted(m for m in ('faiss', 'transformers', 'ir_measures') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
