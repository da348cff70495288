"""Re-ranking with packed candidates: the same scores as the padded path, in place (no padded copy), in
every token dtype."""
import pytest
import torch

from fastrank.encoders import Encoded, TokenEmbeddings
from fastrank.rerank import EncodedSet, maxsim_batches, pack_candidates, rerank_maxsim, rerank_maxsim_padded


def _encoded(seed=0, h=48):
    g = torch.Generator().manual_seed(seed)
    plens = torch.randint(1, 60, (30,), generator=g)
    plens[4] = 130  # one passage much longer than the rest: the padded path pays for it in every batch
    qlens = torch.randint(3, 12, (4,), generator=g)

    def tokens(lengths):
        off = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        return TokenEmbeddings(torch.randn(int(off[-1]), h, generator=g), off)

    pids = [f"p{i}" for i in range(30)]
    qids = [f"q{i}" for i in range(4)]
    enc = EncodedSet(Encoded(None, tokens(qlens)), Encoded(None, tokens(plens)),
                     {q: i for i, q in enumerate(qids)}, {p: i for i, p in enumerate(pids)})
    cands = {q: {pids[j]: 1.0 for j in torch.randperm(30, generator=g)[:12].tolist()} for q in qids}
    cands["q1"]["p4"] = 0.5
    return enc, cands


def test_packed_rerank_equals_the_padded_path():
    enc, cands = _encoded()
    packed = rerank_maxsim(pack_candidates(enc, cands))
    padded = rerank_maxsim_padded(maxsim_batches(enc, cands))
    assert packed.keys() == padded.keys()
    for qid in packed:
        assert packed[qid].keys() == padded[qid].keys()
        for pid in packed[qid]:
            assert packed[qid][pid] == pytest.approx(padded[qid][pid], rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("token_dtype,tol", [("float16", 2e-2), ("bfloat16", 2e-1), ("int8", 2e-1)])
def test_packed_rerank_in_compact_token_dtypes_stays_close(token_dtype, tol):
    enc, cands = _encoded(1)
    exact = rerank_maxsim(pack_candidates(enc, cands))
    packed = pack_candidates(enc, cands, token_dtype=token_dtype)
    assert packed.tokens.dtype == {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}[token_dtype]
    assert (packed.scales is not None) == (token_dtype == "int8")
    approx = rerank_maxsim(packed)
    for qid in exact:
        for pid in exact[qid]:
            assert approx[qid][pid] == pytest.approx(exact[qid][pid], abs=tol * max(1.0, abs(exact[qid][pid]) / 10))
            assert approx[qid][pid] != exact[qid][pid] or token_dtype == "float16"


def test_packing_copies_no_candidate_list():
    enc, cands = _encoded(2)
    packed = pack_candidates(enc, cands)
    # one copy of the passages' rows (the input, in the scoring dtype), whatever the number of queries
    assert packed.tokens.shape == enc.passages.tokens.vectors.shape
    assert packed.num_docs == sum(len(c) for c in cands.values())


def test_bad_token_dtype_is_a_clear_error():
    enc, cands = _encoded(3)
    with pytest.raises(ValueError, match="token_dtype must be one of float32, float16, bfloat16, int8"):
        pack_candidates(enc, cands, token_dtype="float64")


def test_cli_rerank_in_int8_keeps_the_candidates_and_nearly_the_order(capsys, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("ir_measures")
    from pathlib import Path

    from fastrank.cli import main
    from fastrank.data import load_beir, load_trec_dl, read_run
    from tiny_bert import make_tiny_bert

    data = Path(__file__).parent / "data"
    dl19 = data / "dl19-slice"
    model = str(make_tiny_bert(tmp_path / "tiny", list(load_beir(data / "scifact-slice").corpus.values())
                               + list(load_trec_dl(dl19).passages.values())))
    runs = {}
    for dt in ("float32", "int8"):
        argv = ["rerank", dl19 / "slice.candidates.tsv", dl19 / "queries.tsv", dl19 / "slice.passages.jsonl",
                tmp_path / f"{dt}.txt", "--model", model, "--device", "cpu", "--token-dtype", dt]
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
        runs[dt] = read_run(tmp_path / f"{dt}.txt")
    assert runs["int8"].keys() == runs["float32"].keys()
    for qid, scores in runs["float32"].items():
        assert runs["int8"][qid].keys() == scores.keys()
        for pid, s in scores.items():
            assert runs["int8"][qid][pid] == pytest.approx(s, rel=2e-2, abs=5e-2)


def test_depth_keeps_the_candidates_beyond_it_below_the_reranked_ones():
    from fastrank.rerank import append_below, split_depth

    cands = {"q1": {"a": 9.0, "b": 8.0, "c": 7.0, "d": 6.0, "e": 5.0}, "q2": {"x": 1.0}}
    head, tail = split_depth(cands, 2)
    assert head == {"q1": {"a": 9.0, "b": 8.0}, "q2": {"x": 1.0}}
    assert tail == {"q1": {"c": 7.0, "d": 6.0, "e": 5.0}, "q2": {}}
    run = append_below({"q1": {"a": -3.0, "b": 0.5}, "q2": {"x": 2.0}}, tail)
    order = sorted(run["q1"], key=lambda p: -run["q1"][p])
    assert order == ["b", "a", "c", "d", "e"]  # re-ranked first, then the tail in first-stage order
    assert run["q2"] == {"x": 2.0}
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="depth must be a positive integer"):
            split_depth(cands, bad)


def test_cli_rerank_depth_keeps_every_candidate_and_refuses_a_bad_depth(capsys, tmp_path):
    pytest.importorskip("transformers")
    from pathlib import Path

    from fastrank.cli import main
    from fastrank.data import load_beir, load_trec_dl, read_run
    from tiny_bert import make_tiny_bert

    data = Path(__file__).parent / "data"
    dl19 = data / "dl19-slice"
    model = str(make_tiny_bert(tmp_path / "tiny", list(load_beir(data / "scifact-slice").corpus.values())
                               + list(load_trec_dl(dl19).passages.values())))
    base = [dl19 / "slice.candidates.tsv", dl19 / "queries.tsv", dl19 / "slice.passages.jsonl"]
    out = tmp_path / "depth2.txt"
    assert main([str(a) for a in ["rerank", *base, out, "--model", model, "--device", "cpu", "--depth", "2"]]) == 0
    first = read_run(dl19 / "slice.candidates.tsv")
    run = read_run(out)
    assert run.keys() == first.keys()
    for q, c in first.items():
        assert run[q].keys() == c.keys()  # nothing dropped
        by_first = sorted(c, key=lambda p: -c[p])
        by_run = sorted(run[q], key=lambda p: -run[q][p])
        assert set(by_run[:2]) == set(by_first[:2]) and by_run[2:] == by_first[2:]
    for bad in ("0", "-3"):
        bad_out = tmp_path / f"bad{bad}.txt"
        assert main([str(a) for a in ["rerank", *base, bad_out, "--model", model, "--depth", bad]]) == 2
        assert "depth must be a positive integer" in capsys.readouterr().err
        assert not bad_out.exists()
