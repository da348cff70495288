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
    names = ["BM25", "dense", "MaxSim", "MaxSim (eager)", "LITE", "LITE (eager)", "cross-encoder"]
    assert [r["scorer"] for r in res["rows"]] == names
    assert [line.split(" | ")[0][2:] for line in table] == names
    assert res["queries"] == 2 and res["candidates"] == 40 and "runs" not in res and res["dtype"] == "float32"
    where = device_name("cpu")
    assert all(line.endswith(f"| {where} |") for line in table)

    queries, qrels, cands, passages = two_queries
    enc = encode_for_rerank(Encoder(bi, device="cpu"), queries, passages, cands, progress=False)
    lite_enc = encode_for_rerank(loaded.encoder(device="cpu"), queries, passages, cands, dense=False, progress=False)
    lite_batches = maxsim_batches(lite_enc, cands)
    runs = {"BM25": cands, "dense": rerank_dense(enc, cands), "MaxSim": rerank_maxsim(pack_candidates(enc, cands)),
            "MaxSim (eager)": rerank_maxsim(pack_candidates(enc, cands), backend="reference"),
            "LITE": rerank_lite(lite_batches, loaded.lite),
            "LITE (eager)": rerank_lite(lite_batches, loaded.lite, backend="reference"),
            "cross-encoder": CrossEncoder(cross, device="cpu").rerank(queries, passages, cands, progress=False)}
    for row, line in zip(res["rows"], table):
        expected = evaluate(qrels, runs[row["scorer"]], MEASURES)
        assert {m: row[m] for m in MEASURES} == pytest.approx(expected, abs=1e-9), row["scorer"]
        assert line.split(" | ")[1:3] == [f"{expected[m]:.4f}" for m in MEASURES]
        assert row["note"] is None and row["machine"] == where
        if row["scorer"] == "BM25":  # the input run: nothing of it was timed
            assert row["scoring_docs_per_s"] is None and row["end_to_end_docs_per_s"] is None
        elif row["scorer"].endswith(" (eager)"):  # scoring only, against itself
            assert row["scoring_docs_per_s"] > 0 and row["end_to_end_docs_per_s"] is None
            assert row["speedup_vs_eager"] == 1.0 and "- (scoring only)" in line and "| 1.00x |" in line
        else:
            assert row["scoring_docs_per_s"] > 0 and row["end_to_end_docs_per_s"] > 0
        if row["scorer"] in ("MaxSim", "LITE"):  # its rate over its eager row's, from the same rounds
            eager = next(r for r in res["rows"] if r["scorer"] == row["scorer"] + " (eager)")
            assert row["speedup_vs_eager"] == pytest.approx(row["scoring_docs_per_s"] / eager["scoring_docs_per_s"])
            assert f"| {row['speedup_vs_eager']:.2f}x |" in line
        elif not row["scorer"].endswith(" (eager)"):
            assert row["speedup_vs_eager"] is None and line.split(" | ")[-2] == "-"
    assert res["machine"]["cpu"] in where and res["cross"] == cross


def test_without_cross_weights_the_cross_encoder_is_timed_but_not_scored(capsys, tmp_path, tiny_models):
    table, res = _bench(capsys, tmp_path, tiny_models[0])
    assert [r["scorer"] for r in res["rows"]] == ["BM25", "dense", "MaxSim", "MaxSim (eager)", "cross-encoder"]
    row, line = res["rows"][-1], table[-1]
    assert row["nDCG@10"] is None and row["RR(rel=2)@10"] is None and row["note"] == NO_CROSS_WEIGHTS
    assert row["scoring_docs_per_s"] > 0 and res["cross"] is None
    assert line.split(" | ")[1:3] == [NO_CROSS_WEIGHTS, "n/a"]
    assert not any(ch.isdigit() for ch in "".join(line.split(" | ")[1:3]))


def test_dtype_scores_maxsim_and_lite_in_it_and_no_eager_drops_the_eager_rows(capsys, tmp_path, tiny_models,
                                                                              trained_lite, two_queries):
    from fastrank.encoders import Encoder
    from fastrank.rerank import encode_for_rerank, maxsim_batches, pack_candidates, rerank_lite, rerank_maxsim

    bi = tiny_models[0]
    lite_dir, loaded = trained_lite
    table, res = _bench(capsys, tmp_path, bi, "--lite-model", lite_dir, "--dtype", "bfloat16")
    rows = {r["scorer"]: r for r in res["rows"]}
    assert list(rows) == ["BM25", "dense", "MaxSim", "MaxSim (eager)", "MaxSim (eager, float32)", "LITE",
                          "LITE (eager)", "LITE (eager, float32)", "cross-encoder"]
    for name in ("MaxSim", "LITE"):  # over the faster eager form, whichever dtype that was
        fastest = max(rows[name + e]["scoring_docs_per_s"] for e in (" (eager)", " (eager, float32)"))
        for row in (rows[name], rows[name + " (eager)"], rows[name + " (eager, float32)"]):
            assert row["speedup_vs_eager"] == pytest.approx(row["scoring_docs_per_s"] / fastest)
    queries, qrels, cands, passages = two_queries
    lite_enc = encode_for_rerank(loaded.encoder(device="cpu"), queries, passages, cands, dense=False, progress=False)
    # the float32 rows score with the weights as loaded, not a float32 copy of the bfloat16-rounded ones
    from fastrank.bench.rerank import run_bench

    scored = run_bench(DL19, bi, lite_model=lite_dir, device="cpu", max_queries=2, rounds=1, dtype="bfloat16",
                       progress=False)["runs"]
    float32_run = rerank_lite(maxsim_batches(lite_enc, cands), loaded.lite, backend="reference")
    for qid, scores in float32_run.items():
        assert scored["LITE (eager, float32)"][qid] == pytest.approx(scores, rel=1e-6, abs=1e-6), qid
    table, res = _bench(capsys, tmp_path, bi, "--lite-model", lite_dir, "--dtype", "bfloat16", "--no-eager")
    assert [r["scorer"] for r in res["rows"]] == ["BM25", "dense", "MaxSim", "LITE", "cross-encoder"]
    assert res["dtype"] == "bfloat16" and all(r["speedup_vs_eager"] is None for r in res["rows"])
    enc = encode_for_rerank(Encoder(bi, device="cpu"), queries, passages, cands, progress=False)
    half = loaded.lite.to(torch.bfloat16)
    runs = {"MaxSim": rerank_maxsim(pack_candidates(enc, cands, token_dtype=torch.bfloat16)),
            "LITE": rerank_lite(maxsim_batches(lite_enc, cands, dtype=torch.bfloat16), half)}
    for row in res["rows"][2:4]:
        assert {m: row[m] for m in MEASURES} == pytest.approx(evaluate(qrels, runs[row["scorer"]], MEASURES),
                                                                abs=1e-9), row["scorer"]
    rc, _, err = run_cli(capsys, "bench", "rerank", "--data", DL19, "--model", bi, "--dtype", "int8")
    assert rc == 2 and "--dtype: expected one of float32,bfloat16,float16, got 'int8'" in err


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
