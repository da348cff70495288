"""Streamed token-index builds (fastrank.index.token_stream): bounded chunks on disk, commits that survive
SIGKILL, resumption that writes the same bytes, memory-mapped loads, lazy and full verification."""
from __future__ import annotations

import errno
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
import torch

from fastrank.encoders import TokenEmbeddings
from fastrank.index.columns import DiskFullError
from fastrank.index.storage import IndexFormatError
from fastrank.index.token_stream import TokenIndexWriter, build_token_index
from fastrank.index.tokens import TokenIndex

H = 32


def corpus(n=600, seed=0, h=H):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 40, (n,), generator=g)
    off = torch.zeros(n + 1, dtype=torch.int64)
    off[1:] = lens.cumsum(0)
    # Clustered, as real corpora are: each document's tokens sit around one of 12 topics.
    topics = torch.nn.functional.normalize(torch.randn(12, h, generator=g), dim=1)
    topic = torch.randint(0, 12, (n,), generator=g).repeat_interleave(lens)
    x = torch.nn.functional.normalize(topics[topic] + 0.6 * torch.randn(int(off[-1]), h, generator=g), dim=1)
    return x, off


def chunks(x, off, step=50, prefix="d"):
    n = off.numel() - 1
    for a in range(0, n, step):
        b = min(a + step, n)
        yield TokenEmbeddings(x[off[a]:off[b]], off[a:b + 1] - off[a]), [f"{prefix}{i}" for i in range(a, b)]


def queries(x, off):
    return TokenEmbeddings(x[off[3]:off[3] + 24], torch.tensor([0, 8, 16, 24]))


def column_bytes(path: Path) -> dict[str, bytes]:
    meta = json.loads((path / "meta.json").read_text())
    names = [*meta["columns"], *meta.get("large_files", {}), *meta["sha256"]]
    return {name: (path / name).read_bytes() for name in names}


@pytest.mark.parametrize("dtype", ["int8", "float16", "bfloat16"])
def test_streamed_index_scores_like_the_in_memory_index(tmp_path, dtype):
    x, off = corpus()
    ids = [f"d{i}" for i in range(off.numel() - 1)]
    build_token_index(tmp_path / "s", chunks(x, off), dim=H, token_dtype=dtype, ncentroids=16, progress=False)
    streamed = TokenIndex.load(tmp_path / "s")
    mem = TokenIndex(H, token_dtype=dtype, ncentroids=16).add(TokenEmbeddings(x, off), ids, progress=False)
    assert len(streamed) == len(mem) and streamed.num_tokens == mem.num_tokens and streamed.ids == ids
    q = queries(x, off)
    s1, i1 = streamed.search(q, 10, exhaustive=True, progress=False)
    s2, i2 = mem.search(q, 10, exhaustive=True, progress=False)
    # Same stored values (the same conversion per token), so the same exact scores.
    np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-5)
    assert (i1 == i2).all()
    # Candidate search from the mapped inverted lists: probing every list with room for every document finds
    # exactly the exhaustive top-10, so every list holds every document it should.
    sc, ic = streamed.search(q, 10, nprobe=16, ndocs=len(streamed), progress=False)
    assert (ic == i1).all()
    np.testing.assert_allclose(sc, s1, rtol=0, atol=1e-6)
    # The large arrays are mapped from their files, not read: the process maps tokens.bin and ivf_docs.bin.
    if Path("/proc/self/maps").is_file():
        maps = Path("/proc/self/maps").read_text()
        assert str(tmp_path / "s" / "tokens.bin") in maps and str(tmp_path / "s" / "ivf_docs.bin") in maps
    inram = TokenIndex.load(tmp_path / "s", mmap=False)
    assert (inram.search(q, 10, progress=False)[1] == streamed.search(q, 10, progress=False)[1]).all()


def test_resume_after_a_clean_stop_writes_the_same_bytes(tmp_path):
    x, off = corpus()
    build_token_index(tmp_path / "whole", chunks(x, off), dim=H, ncentroids=16, sample_tokens=3000, progress=False)
    # Stop after 5 chunks (the writer is closed without finish(), as a crash would leave it).
    w = TokenIndexWriter(tmp_path / "cut", H, ncentroids=16, sample_tokens=3000, progress=False)
    for i, (tok, ids) in enumerate(chunks(x, off)):
        if i == 5:
            break
        w.add(tok, ids)
    w.close()
    with pytest.raises(IndexFormatError, match="still in progress"):
        TokenIndex.load(tmp_path / "cut")
    w = TokenIndexWriter(tmp_path / "cut", H, ncentroids=16, sample_tokens=3000, progress=False)
    assert w.committed_documents == 250
    for tok, ids in chunks(x, off):
        w.add(tok, ids)
    w.finish()
    assert column_bytes(tmp_path / "cut") == column_bytes(tmp_path / "whole")


def test_resume_with_other_options_names_the_option(tmp_path):
    x, off = corpus()
    w = TokenIndexWriter(tmp_path / "p", H, ncentroids=16, sample_tokens=1000, progress=False)
    for i, (tok, ids) in enumerate(chunks(x, off)):
        w.add(tok, ids)
        if i == 3:
            break
    w.close()
    with pytest.raises(ValueError, match="ncentroids=16.*ncentroids=32"):
        TokenIndexWriter(tmp_path / "p", H, ncentroids=32, sample_tokens=1000, progress=False)
    with pytest.raises(ValueError, match="token_dtype='int8'.*token_dtype='float16'"):
        TokenIndexWriter(tmp_path / "p", H, token_dtype="float16", ncentroids=16, sample_tokens=1000, progress=False)


def test_duplicate_ids_are_refused_within_and_across_chunks_and_restarts(tmp_path):
    x, off = corpus(n=100)
    w = TokenIndexWriter(tmp_path / "p", H, stage1="exhaustive", progress=False)
    parts = list(chunks(x, off, step=20))
    w.add(*parts[0])
    with pytest.raises(ValueError, match="'d3' is already in the index"):
        w.add(parts[1][0], ["d3"] + parts[1][1][1:])
    with pytest.raises(ValueError, match="'x' appears twice"):
        w.add(parts[1][0], ["x", "x"] + parts[1][1][2:])
    w.close()
    w = TokenIndexWriter(tmp_path / "p", H, stage1="exhaustive", progress=False)
    w.add(*parts[0])  # skipped: already stored
    with pytest.raises(ValueError, match="'d5' is already in the index"):
        w.add(parts[1][0], ["d5"] + parts[1][1][1:])
    w.close()


def test_a_full_disk_fails_with_that_message_and_stays_resumable(tmp_path):
    x, off = corpus(n=200)
    parts = list(chunks(x, off, step=40))
    w = TokenIndexWriter(tmp_path / "p", H, stage1="exhaustive", progress=False)
    w.add(*parts[0])

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[:7])  # a torn write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    w._columns._files["tokens.bin"] = Full(w._columns._files["tokens.bin"])
    with pytest.raises(DiskFullError, match="no space left.*keeps its last committed state \\(40 documents\\).*resumes"):
        w.add(*parts[1])
    w.close()
    w = TokenIndexWriter(tmp_path / "p", H, stage1="exhaustive", progress=False)
    for part in parts:
        w.add(*part)
    w.finish()
    build_token_index(tmp_path / "whole", iter(parts), dim=H, stage1="exhaustive", progress=False)
    assert column_bytes(tmp_path / "p") == column_bytes(tmp_path / "whole")


def test_lazy_load_checks_sizes_and_verify_checks_every_byte(tmp_path):
    x, off = corpus()
    build_token_index(tmp_path / "s", chunks(x, off), dim=H, ncentroids=16, progress=False)
    tokens = tmp_path / "s" / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    data[len(data) // 2] ^= 0x5A
    tokens.write_bytes(bytes(data))
    TokenIndex.load(tmp_path / "s")  # lazy: a flipped byte is not read at load
    with pytest.raises(IndexFormatError, match="tokens.bin: the bytes of chunk .* do not match"):
        TokenIndex.load(tmp_path / "s", verify=True)
    tokens.write_bytes(bytes(data[:-1]))
    with pytest.raises(IndexFormatError, match="tokens.bin: .* bytes, meta.json commits"):
        TokenIndex.load(tmp_path / "s")


def test_a_complete_index_is_replaced_only_when_the_new_one_is_complete(tmp_path):
    x, off = corpus(n=60)
    build_token_index(tmp_path / "s", chunks(x, off), dim=H, stage1="exhaustive", progress=False)
    (tmp_path / "s" / "notes.txt").write_text("keep")
    # A second build into the same directory stages itself inside it; the old index stays loadable until
    # the new one is complete, then the new one takes its place.
    w = TokenIndexWriter(tmp_path / "s", H, stage1="exhaustive", token_dtype="float16", progress=False)
    parts = list(chunks(x, off, step=20, prefix="n"))
    w.add(*parts[0])
    assert TokenIndex.load(tmp_path / "s").token_dtype == "int8"
    for part in parts[1:]:
        w.add(*part)
    w.finish()
    new = TokenIndex.load(tmp_path / "s")
    assert new.token_dtype == "float16" and new.ids[0] == "n0"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        ["meta.json", "notes.txt", "tokens.bin", "offsets.bin", "ids.bin", "id_offsets.bin"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="refusing to write into it"):
        build_token_index(tmp_path / "mine", chunks(x, off), dim=H, stage1="exhaustive", progress=False)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    assert (tmp_path / "s" / "notes.txt").read_text() == "keep"


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_index_stream import corpus, chunks, H
    from fastrank.index.token_stream import build_token_index
    x, off = corpus(n=1500)
    build_token_index(sys.argv[1], chunks(x, off, step=10), dim=H, ncentroids=16, sample_tokens=4000,
                      progress=False)
""")


def _committed(path: Path) -> int:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(c.get("documents", 0) for c in meta.get("chunks", []))


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_index(tmp_path):
    """Killed at random points of its progress (not of the clock, so that a busy machine cannot make the
    build finish before the kills): each kill lands once the manifest shows a random share of the documents
    committed, at whatever instant of writing the next chunk the process then is."""
    script = tmp_path / "build.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "whole")], check=True, env=env, timeout=300)
    total = 1500
    rng = random.Random(24)
    cut = tmp_path / "cut"
    # Kills before stage 1 is committed (the first ~200 documents are held until it is), between chunks,
    # and one once every chunk is committed: during the inverted lists and the final publish.
    targets = sorted(rng.uniform(0.0, 0.9) * total for _ in range(4)) + [total]
    kills = 0
    for target in targets:
        proc = subprocess.Popen([sys.executable, str(script), str(cut)], env=env)
        deadline = time.monotonic() + 240
        while proc.poll() is None and _committed(cut) < target and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.0, 0.02))
        if target == total:
            time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3, "the build finished before the kills; the test did not interrupt it"
    if json.loads((cut / "meta.json").read_text()).get("state") != "complete":
        subprocess.run([sys.executable, str(script), str(cut)], check=True, env=env, timeout=300)
    assert column_bytes(cut) == column_bytes(tmp_path / "whole")
    whole, resumed = TokenIndex.load(tmp_path / "whole"), TokenIndex.load(cut)
    x, off = corpus(n=1500)
    q = queries(x, off)
    assert (whole.search(q, 10, progress=False)[1] == resumed.search(q, 10, progress=False)[1]).all()
    assert not [p.name for p in cut.iterdir() if ".partial-" in p.name or p.name == "pairs.bin"]


@pytest.mark.parametrize("dtype", ["residual1", "residual2", "residual4"])
def test_residual_tokens_score_their_decompressed_values_and_shrink_with_the_bits(tmp_path, dtype):
    from fastrank.ops.maxsim_packed import maxsim_packed_ref

    x, off = corpus()
    build_token_index(tmp_path / "r", chunks(x, off), dim=H, token_dtype=dtype, ncentroids=16, progress=False)
    index = TokenIndex.load(tmp_path / "r")
    bits = int(dtype[-1])
    assert index._tokens.shape == (index.num_tokens, H * bits // 8) and index._tokens.dtype == torch.uint8
    q = queries(x, off)
    scores, ids = index.search(q, 10, exhaustive=True, progress=False)
    # The spec: MaxSim over the decompressed tokens (centroid + bucket weight per dimension).
    docs = index.documents
    for i in range(len(q)):
        qi = q.vectors[q.offsets[i]:q.offsets[i + 1]]
        ref = maxsim_packed_ref(qi, docs.vectors, docs.offsets)
        top = torch.topk(ref, 10)
        np.testing.assert_allclose(scores[i], top.values.numpy(), rtol=0, atol=1e-4)
    # Compression error falls with the bits: the decompressed tokens approach the originals (measured mean
    # distance here, 16 centroids over noisy unit tokens: 0.71, 0.44, 0.17; the centroids alone: 1.14).
    err = (docs.vectors - x).norm(dim=1).mean().item()
    assert err < {"residual1": 0.8, "residual2": 0.5, "residual4": 0.2}[dtype], err
    # Centroid search on residual storage, every list probed, every document kept: the exhaustive top-10.
    _, ic = index.search(q, 10, nprobe=16, ndocs=len(index), progress=False)
    assert (ic == ids).all()
    with pytest.raises(ValueError, match="residual tokens are coded against centroids"):
        TokenIndex(H, token_dtype=dtype)


def test_a_kill_between_staging_a_stage1_file_and_its_commit_is_resumed(tmp_path, monkeypatch):
    """The window between renaming centroids.npy into place and the commit that lists it: the rerun must
    take the directory as its own partial build, not refuse centroids.npy as a stranger's file."""
    from fastrank.index import columns

    x, off = corpus()
    real_commit, seen = columns.ColumnWriter.commit, []

    def die_at_stage1_commit(self, chunk=None, extra=None):
        if extra and "ncentroids" in extra:
            seen.append(sorted(p.name for p in self.path.iterdir()))
            raise KeyboardInterrupt  # killed after write_file renamed the stage-1 files, before this commit
        return real_commit(self, chunk, extra)

    monkeypatch.setattr(columns.ColumnWriter, "commit", die_at_stage1_commit)
    with pytest.raises(KeyboardInterrupt):
        build_token_index(tmp_path / "p", chunks(x, off), dim=H, ncentroids=16, sample_tokens=2000, progress=False)
    assert "centroids.npy" in seen[0]
    monkeypatch.setattr(columns.ColumnWriter, "commit", real_commit)
    build_token_index(tmp_path / "p", chunks(x, off), dim=H, ncentroids=16, sample_tokens=2000, progress=False)
    build_token_index(tmp_path / "w", chunks(x, off), dim=H, ncentroids=16, sample_tokens=2000, progress=False)
    assert column_bytes(tmp_path / "p") == column_bytes(tmp_path / "w")


KMEANS_KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_index_stream import corpus, chunks, H
    from fastrank.index import kmeans
    from fastrank.ops import residual
    from fastrank.index.token_stream import build_token_index
    out, kill_at, log = sys.argv[1], sys.argv[2], sys.argv[3]
    calls = []
    real_nearest, real_codec = kmeans.nearest_centroid, residual.train_residual_codec

    def nearest(x, c):  # one call per k-means iteration
        calls.append("kmeans")
        if kill_at == f"kmeans{{len(calls)}}":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_nearest(x, c)

    def codec(r, bits):  # after the codec's assignment of the sample is checkpointed
        if kill_at == "codec":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_codec(r, bits)

    kmeans.nearest_centroid, residual.train_residual_codec = nearest, codec
    x, off = corpus(n=400)
    build_token_index(out, chunks(x, off), dim=H, token_dtype="residual2", ncentroids=16, sample_tokens=3000,
                      progress=False)
    open(log, "w").write(json.dumps(calls))
""")


@pytest.mark.parametrize("kill_at, resumed_iterations", [("kmeans1", 4), ("kmeans3", 2), ("kmeans4", 1),
                                                          ("codec", 0)])
def test_a_kill_during_kmeans_resumes_from_the_last_iteration(tmp_path, kill_at, resumed_iterations):
    """SIGKILL during stage 1's training (k-means iteration n, or the codec's step after the last one): the
    rerun starts from the last checkpointed iteration, and writes the index an uninterrupted build writes."""
    from fastrank.index.tokens import KMEANS_ITERS

    assert KMEANS_ITERS == 4  # the cases above count iterations of 4
    script = tmp_path / "build.py"
    script.write_text(KMEANS_KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, str(script)]
    subprocess.run([*run, str(tmp_path / "whole"), "-", str(tmp_path / "w.json")], check=True, env=env, timeout=300)
    assert json.loads((tmp_path / "w.json").read_text()) == ["kmeans"] * 4
    killed = subprocess.run([*run, str(tmp_path / "cut"), kill_at, str(tmp_path / "k.json")], env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    meta = json.loads((tmp_path / "cut" / "meta.json").read_text())
    assert "ncentroids" not in meta["extra"]  # killed before stage 1 was committed
    assert ("stage1_checkpoint.npz" in meta["sha256"]) == (kill_at != "kmeans1")
    subprocess.run([*run, str(tmp_path / "cut"), "-", str(tmp_path / "r.json")], check=True, env=env, timeout=300)
    assert json.loads((tmp_path / "r.json").read_text()) == ["kmeans"] * resumed_iterations
    assert column_bytes(tmp_path / "cut") == column_bytes(tmp_path / "whole")
    meta = json.loads((tmp_path / "cut" / "meta.json").read_text())
    assert "stage1_checkpoint.npz" not in meta["sha256"] and not (tmp_path / "cut" / "stage1_checkpoint.npz").exists()


def test_a_checkpoint_of_another_sample_is_not_used(tmp_path):
    """A partial build killed during k-means whose checkpoint belongs to other sampled tokens (the stream
    changed before the rerun) trains from the start, not from centroids of other data; and a rerun with
    other options is refused at once, naming the option, before the sample is taken again."""
    from fastrank.index import token_stream

    x, off = corpus()
    w = TokenIndexWriter(tmp_path / "p", H, ncentroids=16, sample_tokens=3000, progress=False)
    w._open_columns(16)  # what _train_and_flush does before training
    other = token_stream.Stage1Checkpoint(w._columns)
    other.bind(torch.nn.functional.normalize(torch.randn(3000, H), dim=1), 16)
    other.save({"iteration": np.array(3), "centroids": np.full((16, H), 0.25, np.float32),
                "generator": torch.Generator().manual_seed(0).get_state().numpy()})
    assert other.load() is not None
    w.close()
    with pytest.raises(ValueError, match="ncentroids=16.*ncentroids=32"):
        TokenIndexWriter(tmp_path / "p", H, ncentroids=32, sample_tokens=3000, progress=False)
    build_token_index(tmp_path / "p", chunks(x, off), dim=H, ncentroids=16, sample_tokens=3000, progress=False)
    build_token_index(tmp_path / "w", chunks(x, off), dim=H, ncentroids=16, sample_tokens=3000, progress=False)
    assert column_bytes(tmp_path / "p") == column_bytes(tmp_path / "w")
    assert not (tmp_path / "p" / "stage1_checkpoint.npz").exists()
