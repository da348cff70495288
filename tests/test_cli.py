import json
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("faiss")
pytest.importorskip("ir_measures")

from fastrank.cli import build_parser, main  # noqa: E402
from fastrank.data import EMBEDDED_DL19, load_beir, load_trec_dl, read_run  # noqa: E402
from tiny_bert import make_tiny_bert  # noqa: E402

DATA = Path(__file__).parent / "data"
SCIFACT = DATA / "scifact-slice"
DL19 = DATA / "dl19-slice"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    texts = list(load_beir(SCIFACT).corpus.values()) + list(load_trec_dl(DL19).passages.values())
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts))


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_evaluate_json_on_embedded_dl19_bm25(capsys):
    rc, out, _ = run_cli(capsys, "evaluate", EMBEDDED_DL19 / "qrels.txt.gz", EMBEDDED_DL19 / "candidates.tsv.gz",
                         "--json", "--measures", "nDCG@10", "RR(rel=2)@10", "R@100")
    assert rc == 0
    result = json.loads(out)
    assert list(result) == ["nDCG@10", "RR(rel=2)@10", "R@100"]
    assert result["nDCG@10"] == pytest.approx(0.5058, abs=5e-5)


def test_evaluate_table_and_errors(capsys):
    rc, out, _ = run_cli(capsys, "evaluate", DL19 / "qrels.txt", DL19 / "slice.candidates.tsv", "--rel", "2")
    assert rc == 0
    header, row = out.splitlines()
    assert header.split() == ["system", "nDCG@10", "RR(rel=2)@10", "R(rel=2)@100", "AP(rel=2)"]
    assert row.split()[0] == "slice.candidates.tsv"
    rc, _, err = run_cli(capsys, "evaluate", DL19 / "qrels.txt", DL19 / "missing.txt")
    assert rc == 2 and "no such file" in err and "missing.txt" in err
    rc, _, err = run_cli(capsys, "evaluate", DL19 / "qrels.txt", DL19 / "slice.candidates.tsv", "--measures", "P@x")
    assert rc == 2 and "cannot parse 'P@x'" in err


def test_index_and_retrieve_dense_finds_each_document_from_its_own_text(capsys, tmp_path, tiny_model):
    corpus = load_beir(SCIFACT).corpus
    rc, out, _ = run_cli(capsys, "index", SCIFACT / "corpus.jsonl", tmp_path / "ix", "--model", tiny_model,
                         "--device", "cpu")
    assert rc == 0 and "indexed 61 documents" in out
    docs = list(corpus)[:5]
    (tmp_path / "q.tsv").write_text("".join(f"q{d}\t{corpus[d]}\n" for d in docs))
    rc, _, err = run_cli(capsys, "retrieve", tmp_path / "ix", tmp_path / "q.tsv", tmp_path / "run.txt", "-k", "3",
                         "--device", "cpu")
    assert rc == 0, err
    run = read_run(tmp_path / "run.txt")
    assert {q: max(r, key=r.get) for q, r in run.items()} == {f"q{d}": d for d in docs}
    assert all(len(r) == 3 for r in run.values())
    rc, _, err = run_cli(capsys, "index", SCIFACT / "corpus.jsonl", tmp_path / "ix2", "--kind", "lsh",
                         "--model", tiny_model, "--device", "cpu")
    assert rc == 2 and "unknown index kind 'lsh'" in err
    rc, _, err = run_cli(capsys, "retrieve", tmp_path / "ix", tmp_path / "q.tsv", tmp_path / "run.txt", "--nprobe", "2",
                         "--device", "cpu")
    assert rc == 2 and "--nprobe apply to token indexes" in err


def test_rerank_dense_keeps_candidates_and_orders_by_the_encoder(capsys, tmp_path, tiny_model):
    rc, _, err = run_cli(capsys, "rerank", DL19 / "slice.candidates.tsv", DL19 / "queries.tsv",
                         DL19 / "slice.passages.jsonl", tmp_path / "dense.txt", "--scorer", "dense",
                         "--model", tiny_model, "--device", "cpu", "--depth", "10")
    assert rc == 0, err
    run, cand = read_run(tmp_path / "dense.txt"), read_run(DL19 / "slice.candidates.tsv")
    assert set(run) == set(cand)
    for q in run:
        # the top 10 are re-ranked; the rest follow them in BM25's order (none is dropped)
        by_bm25 = sorted(cand[q], key=cand[q].get, reverse=True)
        by_run = sorted(run[q], key=run[q].get, reverse=True)
        assert set(by_run[:10]) == set(by_bm25[:10]) and by_run[10:] == by_bm25[10:]
    from fastrank.encoders import Encoder

    s = load_trec_dl(DL19)
    q = next(iter(run))
    enc = Encoder(tiny_model, device="cpu")
    qv = enc.encode_dense([s.queries[q]], max_length=32, progress=False)[0]
    pids = sorted(cand[q], key=cand[q].get, reverse=True)[:10]
    expected = enc.encode_dense([s.passages[p] for p in pids], max_length=200, progress=False) @ qv
    assert [run[q][p] for p in pids] == pytest.approx(expected.tolist(), abs=1e-5)


def test_rerank_maxsim_and_demo(capsys, tmp_path, tiny_model):
    rc, _, err = run_cli(capsys, "rerank", DL19 / "slice.candidates.tsv", DL19 / "queries.tsv",
                         DL19 / "slice.passages.jsonl", tmp_path / "maxsim.txt", "--model", tiny_model,
                         "--device", "cpu")
    assert rc == 0, err
    assert sum(map(len, read_run(tmp_path / "maxsim.txt").values())) == 60
    rc, out, err = run_cli(capsys, "demo", "--data", DL19, "--model", tiny_model, "--device", "cpu", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert set(result["metrics"]) == {"BM25", "dense", "MaxSim"}
    assert result["metrics"]["BM25"]["nDCG@10"] == pytest.approx(
        json.loads(run_cli(capsys, "evaluate", DL19 / "qrels.txt", DL19 / "slice.candidates.tsv", "--json",
                           "--measures", "nDCG@10")[1])["nDCG@10"])
    assert result["speed"]["fused_docs_per_s"] > 0 and result["speed"]["eager_docs_per_s"] > 0


def test_rerank_lite_scores_with_the_checkpoint(capsys, tmp_path, tiny_model):
    import torch

    from fastrank import LiteScorer, lite_ref
    from fastrank.encoders import Encoder
    from fastrank.rerank import encode_for_rerank, maxsim_batches

    torch.manual_seed(0)
    scorer = LiteScorer(lq=8, ld=24, row_hidden=12, col_hidden=10)
    with torch.no_grad():
        for p in scorer.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # random weights, not the init
    torch.save(scorer.state_dict(), tmp_path / "lite.pt")
    rc, _, err = run_cli(capsys, "rerank", DL19 / "slice.candidates.tsv", DL19 / "queries.tsv",
                         DL19 / "slice.passages.jsonl", tmp_path / "lite.txt", "--scorer", "lite",
                         "--lite", tmp_path / "lite.pt", "--model", tiny_model, "--device", "cpu")
    assert rc == 0, err
    run = read_run(tmp_path / "lite.txt")
    assert sum(map(len, run.values())) == 60
    # the same scores from the reference on the same (truncated) token embeddings
    data = load_trec_dl(DL19)
    cands = read_run(DL19 / "slice.candidates.tsv")
    enc = encode_for_rerank(Encoder(tiny_model, device="cpu"), data.queries, data.passages, cands, dense=False,
                            progress=False)
    for qid, pids, q, d, d_mask in maxsim_batches(enc, cands):
        expected = lite_ref(q[:8], d[:, :24], None, d_mask[:, :24], scorer=scorer)
        torch.testing.assert_close(torch.tensor([run[qid][p] for p in pids]), expected, rtol=1e-4, atol=1e-4)
    # --token-dtype bfloat16: the scorer's weights and the tokens in bfloat16, scored as the API scores them
    rc, _, err = run_cli(capsys, "rerank", DL19 / "slice.candidates.tsv", DL19 / "queries.tsv",
                         DL19 / "slice.passages.jsonl", tmp_path / "bf16.txt", "--scorer", "lite",
                         "--lite", tmp_path / "lite.pt", "--model", tiny_model, "--device", "cpu",
                         "--token-dtype", "bfloat16")
    assert rc == 0, err
    run16, half = read_run(tmp_path / "bf16.txt"), scorer.to(torch.bfloat16)
    with torch.no_grad():
        for qid, pids, q, d, d_mask in maxsim_batches(enc, cands, dtype=torch.bfloat16):
            expected = half(q[:8], d[:, :24], None, d_mask[:, :24])
            torch.testing.assert_close(torch.tensor([run16[qid][p] for p in pids]), expected, rtol=1e-5, atol=1e-5)
    rc, _, err = run_cli(capsys, "rerank", DL19 / "slice.candidates.tsv", DL19 / "queries.tsv",
                         DL19 / "slice.passages.jsonl", tmp_path / "x.txt", "--scorer", "lite")
    assert rc == 2 and "--lite CHECKPOINT" in err


def test_index_tokens_and_retrieve(capsys, tmp_path, tiny_model):
    corpus = load_beir(SCIFACT).corpus
    docs = list(corpus)[:3]
    (tmp_path / "q.tsv").write_text("".join(f"q{d}\t{corpus[d][:100]}\n" for d in docs))
    for name, build_args, search_args in [
        ("tix", ["--token-dtype", "int8"], [[], ["--exhaustive"], ["--nprobe", "1", "--ndocs", "5"]]),
        ("exh", ["--token-dtype", "bfloat16", "--exhaustive"], [[]]),
    ]:
        rc, out, err = run_cli(capsys, "index", SCIFACT / "corpus.jsonl", tmp_path / name, "--tokens", *build_args,
                               "--model", tiny_model, "--device", "cpu")
        assert rc == 0, err
        # encoding and building are timed apart
        assert re.search(r"encoded 61 documents in \d+\.\d s; built the index in \d+\.\d s", out), out
        assert build_args[1] in out and ("exhaustive" if "--exhaustive" in build_args else "centroids") in out
        runs = {}
        for extra in search_args:
            rc, _, err = run_cli(capsys, "retrieve", tmp_path / name, tmp_path / "q.tsv", tmp_path / "run.txt",
                                 "-k", "5", "--device", "cpu", *extra)
            assert rc == 0, err
            runs[" ".join(extra)] = run = read_run(tmp_path / "run.txt")
            assert all(len(r) == 5 for r in run.values())
        for extra, run in runs.items():
            if "--nprobe 1" in extra:  # one centroid per token and 5 candidates: exact scores, maybe not the best
                assert all(max(run[q].values()) <= max(runs[""][q].values()) + 1e-4 for q in run)
            else:
                assert {q: max(r, key=r.get) for q, r in run.items()} == {f"q{d}": d for d in docs}, extra


def test_token_index_cli_errors(capsys, tmp_path):
    corpus, q = SCIFACT / "corpus.jsonl", tmp_path / "q.tsv"
    rc, _, err = run_cli(capsys, "index", corpus, tmp_path / "x", "--tokens", "--kind", "hnsw")
    assert rc == 2 and "--kind hnsw applies to dense indexes" in err
    rc, _, err = run_cli(capsys, "index", corpus, tmp_path / "x", "--tokens", "--metric", "l2")
    assert rc == 2 and "--metric l2 applies to dense indexes" in err
    rc, _, err = run_cli(capsys, "index", corpus, tmp_path / "x", "--ncentroids", "64", "--token-dtype", "int8")
    assert rc == 2 and "--token-dtype, --ncentroids apply to token indexes only: add --tokens" in err
    rc, _, err = run_cli(capsys, "index", corpus, tmp_path / "x", "--tokens", "--exhaustive", "--ncentroids", "8")
    assert rc == 2 and "an exhaustive token index builds no centroids" in err
    q.write_text("q1\tsome text\n")
    rc, _, err = run_cli(capsys, "retrieve", tmp_path / "x", q, tmp_path / "run.txt", "--token-k", "32")
    assert rc == 2 and "--token-k is gone" in err and "--nprobe" in err
    # An index saved by an older fastrank (format version 1) says how to rebuild it.
    old = tmp_path / "old"
    old.mkdir()
    (old / "encoder.json").write_text(json.dumps({"model": "unused", "tokens": True, "max_length": 200}))
    (old / "meta.json").write_text(json.dumps({"format": "fastrank.TokenIndex", "version": 1, "dim": 32,
                                               "ndocs": 1, "ntokens": 1, "sha256": {}}))
    from fastrank.index import IndexFormatError, TokenIndex

    with pytest.raises(IndexFormatError, match="rebuild with `fastrank index --tokens"):
        TokenIndex.load(old)


def test_parser_has_the_subcommands_and_room_for_more():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"index", "retrieve", "rerank", "evaluate", "demo"} <= set(sub.choices)
