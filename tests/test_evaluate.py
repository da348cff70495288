from pathlib import Path

import pytest

pytest.importorskip("ir_measures")  # every test here computes a measure through it

from fastrank.data import load_trec_dl, read_qrels  # noqa: E402
from fastrank.evaluate import default_measures, evaluate, evaluate_per_query, format_table  # noqa: E402

DATA = Path(__file__).parent / "data"


def test_dl19_bm25_matches_trec_eval():
    # Published trec_eval figures for BM25 (k1=0.9, b=0.4) top-100 on TREC DL 2019 passage.
    s = load_trec_dl()
    m = evaluate(s.qrels, s.candidates, rel=2)
    assert list(m) == ["nDCG@10", "RR(rel=2)@10", "R(rel=2)@100", "AP(rel=2)"]
    assert m["nDCG@10"] == pytest.approx(0.5058, abs=5e-5)
    assert m["RR(rel=2)@10"] == pytest.approx(0.7024, abs=5e-5)
    # Grade 1 counts as relevant at rel=1, so RR can only rise.
    assert evaluate(s.qrels, s.candidates, ["RR@10"])["RR@10"] > m["RR(rel=2)@10"]


def test_ideal_and_reversed_runs():
    qrels = read_qrels(DATA / "dl19-slice" / "qrels.txt")
    ideal = {q: {d: float(g) for d, g in docs.items()} for q, docs in qrels.items()}
    m = evaluate(qrels, ideal, ["nDCG@10", "RR(rel=2)@10"])
    assert m == {"nDCG@10": pytest.approx(1.0), "RR(rel=2)@10": pytest.approx(1.0)}
    worst = {q: {d: -float(g) for d, g in docs.items()} for q, docs in qrels.items()}
    assert evaluate(qrels, worst, ["nDCG@10"])["nDCG@10"] < 0.2


def test_unretrieved_queries_count_zero_and_unjudged_are_ignored():
    qrels = {"1": {"a": 2, "b": 0}, "2": {"c": 1}}
    run = {"1": {"b": 2.0, "a": 1.0}, "3": {"z": 1.0}}
    per_q = evaluate_per_query(qrels, run, ["RR@10"])
    assert per_q == {"1": {"RR@10": 0.5}, "2": {"RR@10": 0.0}}
    assert evaluate(qrels, run, ["RR@10"]) == {"RR@10": 0.25}


def test_bad_input():
    qrels = {"1": {"a": 1}}
    with pytest.raises(ValueError, match="share no query id"):
        evaluate(qrels, {"9": {"a": 1.0}})
    with pytest.raises(ValueError, match="cannot parse 'nDCG@ten'"):
        evaluate(qrels, {"1": {"a": 1.0}}, ["nDCG@ten"])
    with pytest.raises(ValueError, match="rel must be >= 1"):
        default_measures(0)
    with pytest.raises(ValueError, match="run is empty"):
        evaluate(qrels, {})


def test_format_table():
    table = format_table({"bm25": {"nDCG@10": 0.5}, "dense": {"nDCG@10": 0.61234, "RR@10": 0.7}})
    rows = table.splitlines()
    assert rows[0].split() == ["system", "nDCG@10", "RR@10"]
    assert rows[1].split() == ["bm25", "0.5000", "-"]
    assert rows[2].split() == ["dense", "0.6123", "0.7000"]
