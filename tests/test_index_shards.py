"""Sharded token-index builds: `torchrun --nproc_per_node 2 -m fastrank.cli index ... --tokens` on gloo (two CPU
processes) writes one shard per rank over one shared stage 1, and `retrieve` over the shards returns what a
single-process build of the same corpus returns."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from fastrank.cli import main  # noqa: E402
from fastrank.data import load_beir, read_run  # noqa: E402
from fastrank.index import IndexFormatError  # noqa: E402
from fastrank.index.shards import ShardedTokenIndex, load_token_index  # noqa: E402
from tiny_bert import make_tiny_bert  # noqa: E402

SCIFACT = Path(__file__).parent / "data" / "scifact-slice"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), list(load_beir(SCIFACT).corpus.values())))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_index(out: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "fastrank.cli", "index", str(SCIFACT / "corpus.jsonl"), str(out),
                           *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("build", [["--exhaustive"], ["--token-dtype", "float16"]], ids=["exhaustive", "centroids"])
def test_two_ranks_on_gloo_retrieve_what_one_process_retrieves(build, tmp_path, tiny_model, capsys):
    common = ["--tokens", "--chunk-docs", "7", "--model", tiny_model, "--device", "cpu", *build]
    proc = torchrun_index(tmp_path / "sharded", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "as 2 shards" in proc.stdout
    assert main([str(a) for a in ["index", SCIFACT / "corpus.jsonl", tmp_path / "one", *common]]) == 0
    sharded, one = load_token_index(tmp_path / "sharded"), load_token_index(tmp_path / "one")
    assert isinstance(sharded, ShardedTokenIndex) and len(sharded.shards) == 2
    assert sorted(sharded.ids) == sorted(one.ids) and sharded.num_tokens == one.num_tokens
    if "--exhaustive" not in build:  # one stage 1, trained once on the sample a single process takes
        assert (sharded.shards[0]._centroids == one._centroids).all()
        assert (sharded.shards[1]._centroids == one._centroids).all()
    corpus = load_beir(SCIFACT).corpus
    (tmp_path / "q.tsv").write_text("".join(f"q{d}\t{corpus[d][:120]}\n" for d in list(corpus)[:6]))
    # Every candidate kept (--ndocs covers the corpus), so the centroid search is exact on both sides.
    search = [] if "--exhaustive" in build else ["--ndocs", "61", "--nprobe", "4"]
    runs = {}
    for name in ("sharded", "one"):
        assert main([str(a) for a in ["retrieve", tmp_path / name, tmp_path / "q.tsv", tmp_path / f"{name}.txt",
                                      "-k", "10", "--device", "cpu", *search]]) == 0
        runs[name] = read_run(tmp_path / f"{name}.txt")
    for q in runs["one"]:
        assert list(runs["sharded"][q]) == list(runs["one"][q])
        assert runs["sharded"][q] == pytest.approx(runs["one"][q], abs=1e-5)
    capsys.readouterr()
    assert main(["index", "--verify", str(tmp_path / "sharded")]) == 0


def test_a_shard_of_another_index_and_a_single_process_run_over_shards_are_refused(tmp_path, tiny_model, capsys):
    common = ["--tokens", "--exhaustive", "--chunk-docs", "10", "--model", tiny_model, "--device", "cpu"]
    for name in ("a", "b"):
        proc = torchrun_index(tmp_path / name, *common)
        assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(tmp_path / "a" / "shard-00001")
    shutil.copytree(tmp_path / "b" / "shard-00001", tmp_path / "a" / "shard-00001")
    with pytest.raises(IndexFormatError, match="shard-00001: shard 1 belongs to another index"):
        load_token_index(tmp_path / "a")
    # A single process pointed at a sharded build does not write its own index over it.
    before = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert main([str(a) for a in ["index", SCIFACT / "corpus.jsonl", tmp_path / "b", *common]]) == 2
    assert "holds a sharded index (complete), written by several processes" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == before
