"""Hostile inputs and silent losses (issue 12): each case is an error naming the input, or a warning with
counts, never a run that quietly holds less than it should."""
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("faiss")
pytest.importorskip("ir_measures")

from fastrank.cli import main  # noqa: E402
from fastrank.data import load_beir, load_trec_dl, read_run  # noqa: E402
from tiny_bert import make_tiny_bert  # noqa: E402

DATA = Path(__file__).parent / "data"
SCIFACT, DL19 = DATA / "scifact-slice", DATA / "dl19-slice"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    texts = list(load_beir(SCIFACT).corpus.values()) + list(load_trec_dl(DL19).passages.values())
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts))


# -- item 12: silent drops --------------------------------------------------------------------------
def test_retrieve_with_qrels_matching_no_query_is_an_error(tmp_path, tiny_model, capsys):
    assert main(["index", str(SCIFACT / "corpus.jsonl"), str(tmp_path / "ix"), "--model", tiny_model,
                 "--device", "cpu"]) == 0
    (tmp_path / "q.tsv").write_text("x1\tcells and proteins\nx2\tvitamin d\n")
    capsys.readouterr()
    rc = main(["retrieve", str(tmp_path / "ix"), str(tmp_path / "q.tsv"), str(tmp_path / "run.txt"),
               "--qrels", str(SCIFACT / "qrels" / "test.tsv")])
    err = capsys.readouterr().err
    assert rc == 2 and "none of the 2 queries" in err and "judged" in err
    assert not (tmp_path / "run.txt").exists()


def test_rerank_warns_with_counts_for_queries_without_text_and_refuses_when_none_has_one(tmp_path, tiny_model, capsys):
    corpus = load_beir(SCIFACT).corpus
    docs = list(corpus)[:4]
    (tmp_path / "cands.tsv").write_text("".join(f"{q}\t{d}\t{i + 1}\t{9 - i}\n" for q in ("a", "b", "c")
                                                for i, d in enumerate(docs)))
    (tmp_path / "q.tsv").write_text("a\tcells\n")
    out = tmp_path / "rr.txt"
    args = ["rerank", str(tmp_path / "cands.tsv"), str(tmp_path / "q.tsv"), str(SCIFACT / "corpus.jsonl"), str(out),
            "--model", tiny_model, "--device", "cpu"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "2 of 3 queries" in err and "their 8 candidates are left out" in err
    assert set(read_run(out)) == {"a"}
    (tmp_path / "q.tsv").write_text("zz\tnothing\n")
    assert main(args) == 2
    assert "none of the 3 queries" in capsys.readouterr().err


def test_demo_max_queries_averages_over_those_queries_only(tiny_model):
    from fastrank.demo import run_demo
    from fastrank.evaluate import evaluate

    res = run_demo(DL19, tiny_model, device="cpu", max_queries=2, speed=False, progress=False)
    rset = load_trec_dl(DL19)
    keep = list(rset.queries)[:2]
    bm25 = evaluate({q: rset.qrels[q] for q in keep}, {q: rset.candidates[q] for q in keep}, list(res["metrics"]["BM25"]))
    assert res["queries"] == 2 and res["metrics"]["BM25"] == pytest.approx(bm25)
    with pytest.raises(ValueError, match="max_queries must be a positive integer"):
        run_demo(DL19, tiny_model, device="cpu", max_queries=0, speed=False, progress=False)
    assert json.dumps(res["metrics"])  # plain floats
