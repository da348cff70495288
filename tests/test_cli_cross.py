"""`fastrank rerank --scorer cross` with a tiny randomly initialised cross-encoder: the run holds the
cross-encoder's scores, --depth keeps the rest below in first-stage order, and a missing --model is an
error before anything loads."""
import pytest

from test_cli import DL19, run_cli  # skips with test_cli when transformers/faiss/ir_measures are absent
from fastrank.data import load_trec_dl, read_run
from tiny_bert import make_tiny_bert, make_tiny_cross_encoder


@pytest.fixture(scope="module")
def dl19():
    return load_trec_dl(DL19)


@pytest.fixture(scope="module")
def tiny_cross(tmp_path_factory, dl19):
    texts = list(dl19.queries.values()) + list(dl19.passages.values())
    return str(make_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-cross"), texts))


def _rerank(capsys, out, *extra):
    return run_cli(capsys, "rerank", DL19 / "slice.candidates.tsv", DL19 / "queries.tsv", DL19 / "slice.passages.jsonl",
                   out, "--scorer", "cross", *extra)


def test_rerank_cross_writes_the_cross_encoders_scores(capsys, tmp_path, tiny_cross, dl19):
    from fastrank.encoders import CrossEncoder

    rc, out, err = _rerank(capsys, tmp_path / "cross.txt", "--model", tiny_cross, "--device", "cpu", "--depth", "10")
    assert rc == 0, err
    assert "kept" in out and "beyond --depth 10" in out
    run, cand = read_run(tmp_path / "cross.txt"), read_run(DL19 / "slice.candidates.tsv")
    assert set(run) == set(cand)
    assert all(line.split()[-1] == "fastrank-cross" for line in (tmp_path / "cross.txt").read_text().splitlines())
    ce = CrossEncoder(tiny_cross, device="cpu")
    for q in run:
        by_bm25 = sorted(cand[q], key=cand[q].get, reverse=True)
        by_run = sorted(run[q], key=run[q].get, reverse=True)
        assert set(by_run[:10]) == set(by_bm25[:10]) and by_run[10:] == by_bm25[10:]
        top = by_bm25[:10]
        expected = ce.score([dl19.queries[q]] * len(top), [dl19.passages[p] for p in top], progress=False)
        assert [run[q][p] for p in top] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-5)


def test_rerank_cross_without_depth_rescores_every_candidate(capsys, tmp_path, tiny_cross):
    rc, out, err = _rerank(capsys, tmp_path / "all.txt", "--model", tiny_cross, "--device", "cpu", "--tag", "ce")
    assert rc == 0, err
    assert "re-ranked 60 candidates" in out and "kept" not in out
    assert sum(map(len, read_run(tmp_path / "all.txt").values())) == 60


def test_rerank_cross_in_chunks_scores_as_one_pass(capsys, tmp_path, tiny_cross):
    import torch

    rc, _, err = _rerank(capsys, tmp_path / "one.txt", "--model", tiny_cross, "--device", "cpu")
    assert rc == 0, err
    rc, _, err = _rerank(capsys, tmp_path / "three.txt", "--model", tiny_cross, "--device", "cpu", "--chunk-size", "25")
    assert rc == 0, err
    one, three = read_run(tmp_path / "one.txt"), read_run(tmp_path / "three.txt")
    assert one.keys() == three.keys()
    for q in one:  # pairs batched with other queries' pairs: the same scores up to float32 rounding
        torch.testing.assert_close(torch.tensor([three[q][p] for p in one[q]]), torch.tensor(list(one[q].values())),
                                   rtol=1e-5, atol=1e-5)


def test_rerank_cross_errors(capsys, tmp_path):
    # no --model: refused before the (missing) run file is even read
    rc, _, err = run_cli(capsys, "rerank", tmp_path / "missing.run", DL19 / "queries.tsv", DL19 / "slice.passages.jsonl",
                         tmp_path / "x.txt", "--scorer", "cross")
    assert rc == 2 and "--scorer cross needs --model DIR" in err
    rc, _, err = _rerank(capsys, tmp_path / "x.txt", "--model", tmp_path, "--lite", tmp_path / "lite.pt")
    assert rc == 2 and "--lite does not apply to --scorer cross" in err
    rc, _, err = _rerank(capsys, tmp_path / "x.txt", "--model", tmp_path, "--depth", "0")
    assert rc == 2 and "depth must be a positive integer" in err
    bare = make_tiny_bert(tmp_path / "bare", ["some text"])
    rc, _, err = _rerank(capsys, tmp_path / "x.txt", "--model", bare, "--device", "cpu")
    assert rc == 2 and "not a sequence-classification checkpoint" in err
    assert not (tmp_path / "x.txt").exists()
