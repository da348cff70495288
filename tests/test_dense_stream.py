"""Streamed dense-index builds (fastrank.index.dense_stream) and memory-mapped DenseIndex loads: the same
index as one built in memory, commits that survive SIGKILL, resumption that writes the same bytes, lazy and
full verification, and loads that map the large files instead of reading them."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from fastrank.index.dense import DenseIndex  # noqa: E402
from fastrank.index.dense_stream import DenseIndexWriter, build_dense_index, training_documents  # noqa: E402
from fastrank.index.storage import IndexFormatError  # noqa: E402

DIM = 32
OPTIONS = {"flat": {}, "ivf_flat": {"nlist": 16}, "ivf_pq": {"nlist": 16, "pq_m": 8, "pq_bits": 6},
           "hnsw": {"hnsw_m": 8, "ef_construction": 40}}


def corpus(n=3000, seed=0, dim=DIM):
    g = np.random.default_rng(seed)
    # Clustered, as real embeddings are: each document sits around one of 24 topics.
    topics = g.standard_normal((24, dim)).astype(np.float32)
    x = topics[g.integers(0, 24, n)] + 0.5 * g.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def chunks(x, step=250, prefix="d"):
    for a in range(0, len(x), step):
        yield x[a:a + step], [f"{prefix}{i}" for i in range(a, min(a + step, len(x)))]


def queries(seed=1):
    return corpus(n=9, seed=seed)


def in_memory(x, kind, metric="ip", ids=None, **options):
    """The DenseIndex a streamed build must equal: IVF trained on the same first vectors."""
    index = DenseIndex(DIM, kind, metric, **options)
    if kind.startswith("ivf"):
        index.train(x[:training_documents(kind, DIM, options["nlist"], options.get("pq_bits", 8))])
    return index.add(x, ids, progress=False)


def index_bytes(path: Path) -> dict[str, bytes]:
    meta = json.loads((path / "meta.json").read_text())
    names = [*meta["columns"], *meta.get("large_files", {}), *meta["sha256"]]
    return {name: (path / name).read_bytes() for name in names}


@pytest.fixture
def one_thread():
    # HNSW inserts a batch in parallel; on one thread the graph is a function of the vectors alone.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.mark.parametrize("kind,metric", [("flat", "ip"), ("flat", "l2"), ("ivf_flat", "ip"), ("ivf_flat", "l2"),
                                         ("ivf_pq", "ip"), ("hnsw", "ip")])
def test_streamed_index_is_the_in_memory_index(tmp_path, one_thread, kind, metric):
    x = corpus()
    ids = [f"d{i}" for i in range(len(x))]
    build_dense_index(tmp_path / "s", chunks(x), dim=DIM, kind=kind, metric=metric, progress=False,
                      **OPTIONS[kind])
    streamed = DenseIndex.load(tmp_path / "s")
    mem = in_memory(x, kind, metric, ids, **OPTIONS[kind])
    assert (streamed.kind, streamed.metric, len(streamed), streamed.ids) == (kind, metric, len(x), ids)
    q = queries()
    s1, i1 = streamed.search(q, 10, progress=False)
    s2, i2 = mem.search(q, 10, progress=False)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)  # the same kernel over the same bytes: equal, not close
    data = tmp_path / "s" / ("vectors.bin" if kind == "flat" else "index.faiss")
    if kind != "flat":
        # FAISS's own file, byte for byte (more than half the lists are non-empty, so FAISS writes them "full").
        assert data.read_bytes() == faiss.serialize_index(mem.faiss_index).tobytes()
    # The large file is mapped, not read (FAISS maps flat and HNSW storage only with IO_FLAG_MMAP_IFC).
    if Path("/proc/self/maps").is_file() and (kind != "hnsw" or hasattr(faiss, "IO_FLAG_MMAP_IFC")):
        assert str(data) in Path("/proc/self/maps").read_text()
    inram = DenseIndex.load(tmp_path / "s", mmap=False, verify=True)
    np.testing.assert_array_equal(inram.search(q, 10, progress=False)[1], i1)
    # More results asked than documents, in several query batches: the blocked path agrees with the one call.
    _, short = streamed.search(q, 10, batch_size=4, progress=False)
    np.testing.assert_array_equal(short, i1)


def test_flat_on_the_torch_backend_and_int_ids(tmp_path, monkeypatch):
    import fastrank.index.dense as dense

    x = corpus(n=700)
    build_dense_index(tmp_path / "s", [(x[:300], list(range(300))), (x[300:], list(range(300, 700)))], dim=DIM,
                      progress=False)
    q = queries()
    mem = DenseIndex(DIM, backend="torch").add(x, progress=False)
    monkeypatch.setattr(dense, "TORCH_SCORE_PAIRS", 9 * 64)  # documents scored 64 at a time, merged
    streamed = DenseIndex.load(tmp_path / "s", backend="torch")
    s1, i1 = streamed.search(q, 10, progress=False)
    s2, i2 = mem.search(q, 10, progress=False)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-6)
    assert i1.dtype == np.int64
    _, ids = DenseIndex.load(tmp_path / "s").search(q[:1], 800, progress=False)
    assert ids.dtype == np.int64 and (ids[0, 700:] == -1).all() and sorted(ids[0, :700]) == list(range(700))


def test_resume_after_a_clean_stop_writes_the_same_bytes(tmp_path):
    x = corpus(n=6000)
    opts = dict(dim=DIM, kind="ivf_pq", progress=False, nlist=16, pq_m=8, pq_bits=4)
    assert training_documents("ivf_pq", DIM, 16, 4) == 4096  # trained in the middle of the stream
    build_dense_index(tmp_path / "whole", chunks(x), **opts)
    for stop in (5, 20):  # before and after the quantizer is trained
        w = DenseIndexWriter(tmp_path / f"cut{stop}", **opts)
        for i, (v, ids) in enumerate(chunks(x)):
            if i == stop:
                break
            w.add(v, ids)
        w.close()
        with pytest.raises(IndexFormatError, match="still in progress"):
            DenseIndex.load(tmp_path / f"cut{stop}")
        w = DenseIndexWriter(tmp_path / f"cut{stop}", **opts, replay=False)
        assert w.committed_documents == stop * 250
        for v, ids in list(chunks(x))[stop:]:  # the caller skips what is stored
            w.add(v, ids)
        w.finish()
        assert index_bytes(tmp_path / f"cut{stop}") == index_bytes(tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["id_offsets.bin", "ids.bin", "index.faiss",
                                                                       "meta.json"]


def test_resume_with_other_options_names_the_option(tmp_path):
    x = corpus(n=600)
    w = DenseIndexWriter(tmp_path / "p", DIM, "ivf_flat", nlist=16, progress=False)
    w.add(x[:100])
    w.close()
    with pytest.raises(ValueError, match="nlist=16.*nlist=32"):
        DenseIndexWriter(tmp_path / "p", DIM, "ivf_flat", nlist=32, progress=False)
    with pytest.raises(ValueError, match="metric='ip'.*metric='l2'"):
        DenseIndexWriter(tmp_path / "p", DIM, "ivf_flat", "l2", nlist=16, progress=False)
    with pytest.raises(ValueError, match="kind='ivf_flat'.*kind='flat'"):
        DenseIndexWriter(tmp_path / "p", DIM, "flat", progress=False)
    with pytest.raises(ValueError, match="vectors has dim 31"):
        DenseIndexWriter(tmp_path / "p", DIM, "ivf_flat", nlist=16, progress=False).add(x[:5, :31])


def test_duplicate_ids_are_refused_within_and_across_chunks_and_restarts(tmp_path):
    x = corpus(n=100)
    parts = list(chunks(x, step=20))
    w = DenseIndexWriter(tmp_path / "p", DIM, progress=False)
    w.add(*parts[0])
    with pytest.raises(ValueError, match="'d3' is already in the index"):
        w.add(parts[1][0], ["d3"] + parts[1][1][1:])
    with pytest.raises(ValueError, match="'x' appears twice"):
        w.add(parts[1][0], ["x", "x"] + parts[1][1][2:])
    w.close()
    w = DenseIndexWriter(tmp_path / "p", DIM, progress=False)
    w.add(*parts[0])  # skipped: already stored
    with pytest.raises(ValueError, match="'d5' is already in the index"):
        w.add(parts[1][0], ["d5"] + parts[1][1][1:])
    with pytest.raises(ValueError, match="NaN or inf"):
        w.add(np.full((2, DIM), np.nan, dtype=np.float32), ["n1", "n2"])
    for part in parts[1:]:
        w.add(*part)
    w.finish()
    assert DenseIndex.load(tmp_path / "p").ids == [f"d{i}" for i in range(100)]


@pytest.mark.parametrize("kind,name", [("flat", "vectors.bin"), ("ivf_flat", "index.faiss"), ("flat", "ids.bin")])
def test_lazy_load_checks_sizes_and_verify_checks_every_byte(tmp_path, kind, name):
    x = corpus(n=2000)
    build_dense_index(tmp_path / "s", chunks(x), dim=DIM, kind=kind, progress=False, **OPTIONS[kind])
    f = tmp_path / "s" / name
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # an id's JSON, a float's low bits, the last list's last id: still a well-formed file
    f.write_bytes(bytes(data))
    DenseIndex.load(tmp_path / "s")  # lazy: a flipped byte is not read at load
    what = "checksum does not match" if name == "index.faiss" else "the bytes of chunk .* do not match"
    with pytest.raises(IndexFormatError, match=f"{name}: {what}"):
        DenseIndex.load(tmp_path / "s", verify=True)
    f.write_bytes(bytes(data[:-1]))
    with pytest.raises(IndexFormatError, match=f"{name}: .* bytes, meta.json commits"):
        DenseIndex.load(tmp_path / "s")


def test_a_mapped_load_is_read_only_and_a_saved_index_loads_mapped(tmp_path):
    x = corpus(n=1500)
    build_dense_index(tmp_path / "s", chunks(x), dim=DIM, kind="ivf_flat", progress=False, nlist=16)
    mapped = DenseIndex.load(tmp_path / "s")
    with pytest.raises(ValueError, match="memory-mapped.*mmap=False"):
        mapped.add(x[:2], ["new1", "new2"])
    q = queries()
    expected = mapped.search(q, 10, progress=False)[1]
    # Saved again (the mapped lists read whole to be written), it is a saved index with the same results.
    mapped.save(tmp_path / "saved")
    saved = DenseIndex.load(tmp_path / "saved")
    np.testing.assert_array_equal(saved.search(q, 10, progress=False)[1], expected)
    if Path("/proc/self/maps").is_file():
        assert str(tmp_path / "saved" / "index.faiss") in Path("/proc/self/maps").read_text()
    grown = DenseIndex.load(tmp_path / "s", mmap=False).add(x[:2], ["new1", "new2"], progress=False)
    assert len(grown) == 1502 and grown.ids[-1] == "new2"
    # A flat index saved from the torch backend: vectors.npy mapped, searched in place on either backend.
    DenseIndex(DIM, backend="torch").add(x, progress=False).save(tmp_path / "npy")
    for backend in ("torch", "faiss"):
        ix = DenseIndex.load(tmp_path / "npy", backend=backend)
        np.testing.assert_array_equal(ix.search(q, 5, progress=False)[1],
                                      DenseIndex(DIM).add(x, progress=False).search(q, 5, progress=False)[1])
    if Path("/proc/self/maps").is_file():
        assert str(tmp_path / "npy" / "vectors.npy") in Path("/proc/self/maps").read_text()


def test_a_complete_index_is_replaced_only_when_the_new_one_is_complete(tmp_path):
    x = corpus(n=600)
    build_dense_index(tmp_path / "s", chunks(x), dim=DIM, kind="ivf_flat", nlist=8, progress=False)
    (tmp_path / "s" / "notes.txt").write_text("keep")
    w = DenseIndexWriter(tmp_path / "s", DIM, attach={"encoder.json": "{}"}, progress=False)
    parts = list(chunks(x, step=200, prefix="n"))
    w.add(*parts[0])
    assert DenseIndex.load(tmp_path / "s").kind == "ivf_flat"  # the old index stays searchable meanwhile
    for part in parts[1:]:
        w.add(*part)
    w.finish()
    new = DenseIndex.load(tmp_path / "s")
    assert new.kind == "flat" and new.ids[0] == "n0"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(  # the old index.faiss went with it
        ["meta.json", "notes.txt", "encoder.json", "vectors.bin", "ids.bin", "id_offsets.bin"])
    with pytest.raises(ValueError, match="nothing to index"):
        DenseIndexWriter(tmp_path / "empty", DIM, progress=False).finish()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="refusing to write into it"):
        build_dense_index(tmp_path / "mine", chunks(x), dim=DIM, progress=False)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_dense_stream import corpus, chunks, DIM
    from fastrank.index.dense_stream import build_dense_index
    x = corpus(n=4000)
    print("ready", flush=True)
    start = time.perf_counter()
    # Trained after 2048 vectors (256 per list), then every chunk PQ-coded as it comes; index.faiss at the end.
    build_dense_index(sys.argv[1], chunks(x, step=10), dim=DIM, kind="ivf_pq", nlist=8, pq_m=8, pq_bits=3,
                      progress=False)
    print(time.perf_counter() - start, flush=True)
""")


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_index(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / out)], env=env, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"  # imports done: the build starts now
        return proc

    whole = run("whole")
    build = float(whole.stdout.readline())
    assert whole.wait(timeout=300) == 0
    rng = random.Random(24)
    kills = 0
    for _ in range(4):
        proc = run("cut")
        time.sleep(rng.uniform(0.05, 0.6) * build)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        proc.stdout.close()
    assert kills >= 2, "the build finished before most kills; the test did not interrupt it"
    if json.loads((tmp_path / "cut" / "meta.json").read_text()).get("state") != "complete":
        last = run("cut")
        assert last.wait(timeout=300) == 0
        last.stdout.close()
    whole.stdout.close()
    assert index_bytes(tmp_path / "cut") == index_bytes(tmp_path / "whole")
    q = queries()
    np.testing.assert_array_equal(DenseIndex.load(tmp_path / "cut").search(q, 10, progress=False)[1],
                                  DenseIndex.load(tmp_path / "whole").search(q, 10, progress=False)[1])
    assert not [p.name for p in (tmp_path / "cut").iterdir() if ".partial-" in p.name or p.name == "lists.bin"]
