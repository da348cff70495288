"""`fastrank bench rerank` on the DL19 slice with tiny models and two queries: one row per scorer, quality
figures that are fastrank.evaluate's on each scorer's own run, and no quality figure for an untrained
cross-encoder. Nothing here measures speed."""
import json

import pytest
import torch

from test_cli import DL19, run_cli  # skips with test_cli when transformers/faiss/ir_measures are absent
from fastrank.bench.machine import device_name
from fastrank.bench.rerank import NO_CROSS_WEIGHTS
from fastrank.data import load_trec_dl
from fastrank.evaluate import evaluate
from tiny_bert import make_tiny_bert, make_tiny_cross_encoder

MEASURES = ("nDCG@10", "RR(rel=2)@10")


@pytest.fixture(scope="module")
def two_queries():
    """The slice cut to the two queries `--max-queries 2` keeps (its first two), with their qrels."""
    data = load_trec_dl(DL19)
    keep = list(data.queries)[:2]
    return ({q: data.queries[q] for q in keep}, {q: data.qrels[q] for q in keep},
            {q: data.candidates[q] for q in keep}, data.passages)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    data = load_trec_dl(DL19)
    texts = list(data.queries.values()) + list(data.passages.values())
    root = tmp_path_factory.mktemp("tiny-models")
    return str(make_tiny_bert(root / "bi", texts)), str(make_tiny_cross_encoder(root / "cross", texts))


@pytest.fixture
def trained_lite(monkeypatch, tmp_path, tiny_models):
    """A `fastrank train --scorer lite` directory: the tiny encoder and random LITE weights, written with
    fastrank.trained.save_trained; returns it and what load_trained reads back."""
    from transformers import AutoModel, AutoTokenizer

    from fastrank import LiteScorer
    from fastrank.trained import load_trained, save_trained

    torch.manual_seed(0)
    lite = LiteScorer(lq=8, ld=24, row_hidden=12, col_hidden=10)
    with torch.no_grad():
        for p in lite.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    bi = tiny_models[0]
    out = save_trained(tmp_path / "lite-run", scorer="lite", model=AutoModel.from_pretrained(bi),
                       tokenizer=AutoTokenizer.from_pretrained(bi), head_state=lite.state_dict(), pooling="mean",
                       query_max_length=32, doc_max_length=200, base_model=bi, training={})
    # Under TRITON_INTERPRET=1 every LITE call interprets the Triton kernel (seconds each, five calls here);
    # this test is about the table, and test_lite checks the kernels against the reference.
    monkeypatch.setenv("FASTRANK_BACKEND", "reference")
    return out, load_trained(out)


def _bench(capsys, tmp_path, bi, *extra):
    out = tmp_path / "bench.json"
    rc, printed, err = run_cli(capsys, "bench", "rerank", "--data", DL19, "--model", bi, "--device", "cpu",
                               "--max-queries", "2", "--rounds", "1", "--json", out, *extra)
    assert rc == 0, err
    table = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| scorer")]
    return table, json.loads(out.read_text())


def test_every_scorer_is_a_row_scored_by_fastrank_evaluate(capsys, tmp_path, tiny_models, trained_lite, two_queries):
    from fastrank.encoders import CrossEncoder, Encoder
    from fastrank.rerank import (encode_for_rerank, maxsim_batches, pack_candidates, rerank_dense, rerank_lite,
                                 rerank_maxsim)

    bi, cross = tiny_models
    lite_dir, loaded = trained_lite
    table, res = _bench(capsys, tmp_path, bi, "--cross", cross, "--lite-model", lite_dir)
    names = ["BM25", "dense", "MaxSim", "LITE", "cross-encoder"]
    assert [r["scorer"] for r in res["rows"]] == names
    assert [line.split(" | ")[0][2:] for line in table] == names
    assert res["queries"] == 2 and res["candidates"] == 40 and "runs" not in res
    where = device_name("cpu")
    assert all(line.endswith(f"| {where} |") for line in table)

    queries, qrels, cands, passages = two_queries
    enc = encode_for_rerank(Encoder(bi, device="cpu"), queries, passages, cands, progress=False)
    lite_enc = encode_for_rerank(loaded.encoder(device="cpu"), queries, passages, cands, dense=False, progress=False)
    runs = {"BM25": cands, "dense": rerank_dense(enc, cands), "MaxSim": rerank_maxsim(pack_candidates(enc, cands)),
            "LITE": rerank_lite(maxsim_batches(lite_enc, cands), loaded.lite),
            "cross-encoder": CrossEncoder(cross, device="cpu").rerank(queries, passages, cands, progress=False)}
    for row, line in zip(res["rows"], table):
        expected = evaluate(qrels, runs[row["scorer"]], MEASURES)
        assert {m: row[m] for m in MEASURES} == pytest.approx(expected, abs=1e-9), row["scorer"]
        assert line.split(" | ")[1:3] == [f"{expected[m]:.4f}" for m in MEASURES]
        assert row["note"] is None and row["machine"] == where
        if row["scorer"] == "BM25":  # the input run: nothing of it was timed
            assert row["scoring_docs_per_s"] is None and row["end_to_end_docs_per_s"] is None
        else:
            assert row["scoring_docs_per_s"] > 0 and row["end_to_end_docs_per_s"] > 0
    assert res["machine"]["cpu"] in where and res["cross"] == cross


def test_without_cross_weights_the_cross_encoder_is_timed_but_not_scored(capsys, tmp_path, tiny_models):
    table, res = _bench(capsys, tmp_path, tiny_models[0])
    assert [r["scorer"] for r in res["rows"]] == ["BM25", "dense", "MaxSim", "cross-encoder"]
    row, line = res["rows"][-1], table[-1]
    assert row["nDCG@10"] is None and row["RR(rel=2)@10"] is None and row["note"] == NO_CROSS_WEIGHTS
    assert row["scoring_docs_per_s"] > 0 and res["cross"] is None
    assert line.split(" | ")[1:3] == [NO_CROSS_WEIGHTS, "n/a"]
    assert not any(ch.isdigit() for ch in "".join(line.split(" | ")[1:3]))


def test_bad_options_fail_before_any_encoding(capsys, tmp_path, tiny_models):
    from transformers import AutoModel, AutoTokenizer

    from fastrank.trained import save_trained

    bi = tiny_models[0]
    dense = save_trained(tmp_path / "dense-run", scorer="dense", model=AutoModel.from_pretrained(bi),
                         tokenizer=AutoTokenizer.from_pretrained(bi), head_state={}, pooling="mean",
                         query_max_length=32, doc_max_length=200, base_model=bi, training={})
    rc, _, err = run_cli(capsys, "bench", "rerank", "--data", DL19, "--model", bi, "--lite-model", dense)
    assert rc == 2 and "holds a trained dense model, not a LITE one" in err
    rc, _, err = run_cli(capsys, "bench", "rerank", "--data", DL19, "--max-queries", "0")
    assert rc == 2 and "--max-queries must be a positive integer" in err
    rc, _, err = run_cli(capsys, "bench", "rerank", "--data", DL19, "--lite-model", tmp_path / "nope")
    assert rc == 2 and "--lite-model " + str(tmp_path / "nope") + ": no such directory" in err
    rc, _, err = run_cli(capsys, "bench", "rerank", "--data", DL19, "--cross", tmp_path)
    assert rc == 2 and "no config.json" in err
