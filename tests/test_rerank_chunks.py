"""`fastrank rerank` in chunks: bounded memory, the same scores as one pass, and a crash resumed from the
journal with the output an uninterrupted run writes."""
import json
from pathlib import Path

import pytest

from fastrank.rerank_chunks import JOURNAL_SUFFIX, Journal, JournalError, chunk_queries, rerank_in_chunks

DATA = Path(__file__).parent / "data"
DL19 = DATA / "dl19-slice"


# -- chunking ------------------------------------------------------------------------------------------------
def test_chunks_hold_at_most_chunk_size_distinct_passages_in_run_order():
    cands = {"a": dict.fromkeys(["p1", "p2", "p3"], 0.0), "b": dict.fromkeys(["p2", "p3", "p4"], 0.0),
             "c": dict.fromkeys(["p5", "p6"], 0.0), "d": dict.fromkeys(["p7", "p8", "p9", "p10", "p11"], 0.0)}
    assert chunk_queries(list(cands), cands, 4) == [["a", "b"], ["c"], ["d"]]  # a+b share p2, p3: 4 distinct
    assert chunk_queries(list(cands), cands, 100) == [["a", "b", "c", "d"]]  # everything fits: one chunk
    assert chunk_queries(list(cands), cands, 1) == [["a"], ["b"], ["c"], ["d"]]  # too big alone: its own chunk
    assert chunk_queries(["d", "a"], cands, 8) == [["d", "a"]]
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            chunk_queries(list(cands), cands, bad)


def _scores(chunk, progress):
    return {q: {f"{q}-p{i}": float(len(q) * 10 + i) for i in range(3)} for q in chunk}


def _cands(n):
    return {f"q{i}": {f"q{i}-p{j}": 0.0 for j in range(3)} for i in range(n)}


def test_journal_records_chunks_and_a_crash_resumes_after_the_last_synced_one(tmp_path):
    cands = _cands(5)
    calls = []

    def crashing(chunk, progress):
        calls.append(list(chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while the third chunk was being scored
        return _scores(chunk, progress)

    out = tmp_path / "run.txt"
    with pytest.raises(KeyboardInterrupt):
        rerank_in_chunks(list(cands), cands, crashing, chunk_size=6, journal=Journal(out, {"a": 1}), progress=False)
    journal = Path(str(out) + JOURNAL_SUFFIX)
    assert len(journal.read_text().splitlines()) == 3  # the header and two finished chunks
    # a crash mid-write leaves a torn last line: it is dropped and that chunk runs again
    with open(journal, "a") as f:
        f.write('{"scores": {"q4": [["q4-p0", 1.')
    calls.clear()
    notes = []
    run = rerank_in_chunks(list(cands), cands, lambda c, p: calls.append(list(c)) or _scores(c, p), chunk_size=6,
                           journal=Journal(out, {"a": 1}), progress=False, on_resume=lambda d, t: notes.append((d, t)))
    assert notes == [(2, 3)] and calls == [["q4"]]
    assert run == _scores(list(cands), False)
    assert json.loads(journal.read_text().splitlines()[-1])["scores"].keys() == {"q4"}


def test_a_journal_of_another_command_or_a_foreign_file_is_refused_and_left_alone(tmp_path):
    cands = _cands(2)
    out = tmp_path / "run.txt"
    journal = Path(str(out) + JOURNAL_SUFFIX)
    # another command's journal that finished nothing holds nothing to keep: it is started afresh
    with pytest.raises(RuntimeError, match="no scores"):
        rerank_in_chunks(list(cands), cands, lambda c, p: {}, chunk_size=3, journal=Journal(out, {"depth": 5}),
                         progress=False)
    assert len(journal.read_text().splitlines()) == 1
    calls = []

    def second_crashes(chunk, progress):
        calls.append(chunk)
        return _scores(chunk, progress) if len(calls) == 1 else {}

    with pytest.raises(RuntimeError, match="no scores"):
        rerank_in_chunks(list(cands), cands, second_crashes, chunk_size=3, journal=Journal(out, {"depth": 10}),
                         progress=False)
    assert len(journal.read_text().splitlines()) == 2  # its header and one finished chunk
    before = journal.read_bytes()
    with pytest.raises(JournalError, match="another command"):
        rerank_in_chunks(list(cands), cands, _scores, chunk_size=3, journal=Journal(out, {"depth": 20}), progress=False)
    assert journal.read_bytes() == before
    journal.write_text('{"scores": {}}\n')  # a line like a chunk's is no header
    with pytest.raises(JournalError, match="not a fastrank rerank journal"):
        rerank_in_chunks(list(cands), cands, _scores, chunk_size=3, journal=Journal(out, {"depth": 10}), progress=False)
    journal.write_text("my notes, not fastrank's\n")
    with pytest.raises(JournalError, match="not a fastrank rerank journal"):
        rerank_in_chunks(list(cands), cands, _scores, chunk_size=3, journal=Journal(out, {"depth": 10}), progress=False)
    assert journal.read_text() == "my notes, not fastrank's\n"


def test_a_journal_with_more_chunks_than_the_command_is_refused(tmp_path):
    out = tmp_path / "run.txt"
    rerank_in_chunks(list(_cands(4)), _cands(4), _scores, chunk_size=3, journal=Journal(out, {}), progress=False)
    with pytest.raises(JournalError, match="records 4 chunks"):
        rerank_in_chunks(list(_cands(2)), _cands(2), _scores, chunk_size=3, journal=Journal(out, {}), progress=False)


# -- the command ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("ir_measures")
    from fastrank.data import load_trec_dl
    from tiny_bert import make_tiny_bert

    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), list(load_trec_dl(DL19).passages.values())))


def _rerank(capsys, out, model, *extra):
    from fastrank.cli import main

    rc = main([str(a) for a in ("rerank", DL19 / "slice.candidates.tsv", DL19 / "queries.tsv",
                                DL19 / "slice.passages.jsonl", out, "--model", model, "--device", "cpu", *extra)])
    captured = capsys.readouterr()
    return rc, captured.err


@pytest.mark.parametrize("scorer", ["maxsim", "lite", "dense"])
def test_chunked_rerank_scores_as_one_pass_and_resumes_to_the_same_output(capsys, tmp_path, tiny_model, scorer,
                                                                         monkeypatch):
    import torch

    from fastrank import LiteScorer
    from fastrank.data import read_run

    extra = ["--scorer", scorer]
    if scorer == "lite":
        torch.manual_seed(0)
        lite = LiteScorer(lq=8, ld=24, row_hidden=12, col_hidden=10)
        with torch.no_grad():
            for p in lite.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        torch.save(lite.state_dict(), tmp_path / "lite.pt")
        extra += ["--lite", tmp_path / "lite.pt"]
    rc, err = _rerank(capsys, tmp_path / "whole.txt", tiny_model, *extra)  # 60 passages: one chunk by default
    assert rc == 0, err
    rc, err = _rerank(capsys, tmp_path / "chunked.txt", tiny_model, *extra, "--chunk-size", "25")  # 3 chunks
    assert rc == 0, err
    whole, chunked = read_run(tmp_path / "whole.txt"), read_run(tmp_path / "chunked.txt")
    assert whole.keys() == chunked.keys() and sum(map(len, chunked.values())) == 60
    for q in whole:  # encoded in other batches: the same scores up to float32 rounding
        assert whole[q].keys() == chunked[q].keys()
        torch.testing.assert_close(torch.tensor([chunked[q][p] for p in whole[q]]),
                                   torch.tensor(list(whole[q].values())), rtol=1e-5, atol=1e-5)
    assert not Path(str(tmp_path / "chunked.txt") + JOURNAL_SUFFIX).exists()  # removed once OUT is written

    # killed during the third chunk, then the same command again: the first two come from the journal
    import fastrank.rerank_chunks as chunks_module

    real = chunks_module.Journal.append
    appended = []

    def crash_on_third(self, scores):
        if len(appended) == 2:
            raise KeyboardInterrupt
        appended.append(scores)
        real(self, scores)

    monkeypatch.setattr(chunks_module.Journal, "append", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _rerank(capsys, tmp_path / "resumed.txt", tiny_model, *extra, "--chunk-size", "25")
    assert not (tmp_path / "resumed.txt").exists()
    monkeypatch.setattr(chunks_module.Journal, "append", real)
    rc, err = _rerank(capsys, tmp_path / "resumed.txt", tiny_model, *extra, "--chunk-size", "25")
    assert rc == 0 and "2 of 3 chunks were re-ranked before" in err, err
    assert (tmp_path / "resumed.txt").read_text() == (tmp_path / "chunked.txt").read_text()
    assert not Path(str(tmp_path / "resumed.txt") + JOURNAL_SUFFIX).exists()


def test_rerank_refuses_a_journal_of_other_arguments_and_a_bad_chunk_size(capsys, tmp_path, tiny_model):
    out = tmp_path / "run.txt"
    journal = Path(str(out) + JOURNAL_SUFFIX)
    other = Journal(out, {"something": "else"})
    other.open()
    other.append({"1037798": {"p": 1.0}})
    before = journal.read_bytes()
    rc, err = _rerank(capsys, out, tiny_model, "--chunk-size", "25")
    assert rc == 2 and "another command" in err and journal.read_bytes() == before and not out.exists()
    rc, err = _rerank(capsys, tmp_path / "x.txt", tiny_model, "--chunk-size", "0")
    assert rc == 2 and "--chunk-size must be a positive integer" in err


def test_a_directory_at_the_journal_path_is_refused(tmp_path):
    out = tmp_path / "run.txt"
    Path(str(out) + JOURNAL_SUFFIX).mkdir()
    with pytest.raises(JournalError, match="is not a file"):
        Journal(out, {}).open()
