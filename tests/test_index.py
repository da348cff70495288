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
def ragged(n, seed, lo=1, hi=12, dim=DIM):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g)
    vectors = torch.nn.functional.normalize(torch.randn(int(lens.sum()), dim, generator=g), dim=-1)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = lens.cumsum(0)
    return vectors, offsets


def exact_maxsim_ranking(q_vectors, q_offsets, d_vectors, d_offsets, k):
    from fastrank import maxsim_ref
    from fastrank.encoders import TokenEmbeddings

    docs = TokenEmbeddings(d_vectors.half().float(), d_offsets)  # the index stores float16
    d, dm = docs.padded()
    out = []
    for i in range(len(q_offsets) - 1):
        q = q_vectors[q_offsets[i]:q_offsets[i + 1]]
        out.append(torch.topk(maxsim_ref(q, d, None, dm), k))
    return out


def test_token_index_matches_exhaustive_maxsim(tmp_path):
    d_vec, d_off = ragged(80, 0)
    q_vec, q_off = ragged(6, 1, lo=3, hi=8)
    ids = [f"p{i}" for i in range(80)]
    index = TokenIndex(DIM).add((d_vec, d_off), ids, progress=False)
    # token_k covering every token makes stage 1 exhaustive, so the result must be the exact ranking.
    scores, got = index.search((q_vec, q_off), k=5, token_k=index.num_tokens, progress=False)
    for row_s, row_i, ref in zip(scores, got, exact_maxsim_ranking(q_vec, q_off, d_vec, d_off, 5)):
        np.testing.assert_allclose(row_s, ref.values.numpy(), rtol=1e-4, atol=1e-4)
        assert list(row_i) == [ids[j] for j in ref.indices.tolist()]
    index.save(tmp_path / "tix")
    loaded = TokenIndex.load(tmp_path / "tix")
    s2, i2 = loaded.search((q_vec, q_off), k=5, token_k=index.num_tokens, progress=False)
    np.testing.assert_array_equal(i2, got)
    np.testing.assert_allclose(s2, scores)


def test_token_index_approximate_candidates_and_errors(tmp_path):
    d_vec, d_off = ragged(200, 2)
    q_vec, q_off = ragged(4, 3, lo=3, hi=8)
    index = TokenIndex(DIM, "hnsw").add((d_vec, d_off), progress=False)
    full = TokenIndex(DIM).add((d_vec, d_off), progress=False)
    _, approx = index.search((q_vec, q_off), k=3, token_k=16, progress=False)
    _, exact = full.search((q_vec, q_off), k=3, token_k=full.num_tokens, progress=False)
    assert np.mean([len(set(a) & set(b)) / 3 for a, b in zip(approx, exact)]) >= 0.6
    _, capped = index.search((q_vec, q_off), k=3, token_k=16, max_candidates=2, progress=False)
    assert all(row[2] is None for row in capped)
    with pytest.raises(ValueError, match="tokens have dim 8, the index has dim 24"):
        index.add((d_vec[:, :8], d_off))
    with pytest.raises(ValueError, match="tokens: offsets end at"):
        index.add((d_vec[:5], d_off))
    index.save(tmp_path / "tix")
    np.save(tmp_path / "tix" / "offsets.npy", d_off.numpy()[:-1])
    with pytest.raises(IndexFormatError, match="offsets.npy: checksum does not match"):
        TokenIndex.load(tmp_path / "tix")


def test_import_fastrank_pulls_in_no_optional_dependency():
    import subprocess

    code = ("import sys, fastrank, fastrank.index, fastrank.data, fastrank.evaluate, fastrank.cli; "
            "print(sorted(m for m in ('faiss', 'transformers', 'ir_measures') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
