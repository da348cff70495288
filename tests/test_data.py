import gzip
import json
from pathlib import Path

import pytest

from fastrank.data import (DataFormatError, load_beir, load_trec_dl, read_corpus, read_qrels, read_queries, read_run,
                           write_run)

DATA = Path(__file__).parent / "data"


def test_trec_qrels_and_candidates_tsv():
    qrels = read_qrels(DATA / "dl19-slice" / "qrels.txt")
    assert set(qrels) == {"1037798", "104861", "1063750"}
    assert all(isinstance(g, int) for docs in qrels.values() for g in docs.values())
    assert max(g for docs in qrels.values() for g in docs.values()) == 3
    run = read_run(DATA / "dl19-slice" / "slice.candidates.tsv")  # header line skipped
    assert set(run) == set(qrels) and all(len(c) == 20 for c in run.values())


def test_beir_folder_keeps_judged_queries_and_prepends_titles():
    s = load_beir(DATA / "scifact-slice")
    assert len(s.queries) == 6 and set(s.queries) == set(s.qrels)
    assert len(s.corpus) == 61
    rec = json.loads((DATA / "scifact-slice" / "corpus.jsonl").read_text().splitlines()[0])
    assert s.corpus[rec["_id"]].startswith(rec["title"] + " ")
    with pytest.raises(FileNotFoundError, match="missing qrels"):
        load_beir(DATA / "scifact-slice", split="dev")


def test_embedded_dl19_is_complete():
    s = load_trec_dl()
    assert len(s.queries) == 43 and len(s.passages) == 4297
    assert sum(len(c) for c in s.candidates.values()) == 4300


def test_run_roundtrip_sorted_and_gz(tmp_path):
    run = {"2": {"a": 0.5, "b": 1.5, "c": 1.5}, "10": {"x": -1.0}}
    for name in ("run.txt", "run.txt.gz"):
        write_run(run, tmp_path / name, tag="t", depth=2)
        assert read_run(tmp_path / name) == {"2": {"b": 1.5, "c": 1.5}, "10": {"x": -1.0}}
    lines = (tmp_path / "run.txt").read_text().splitlines()
    assert lines[0] == "2 Q0 c 1 1.500000 t"  # ties broken by docid descending, as trec_eval does
    assert lines[-1].startswith("10 Q0 x 1 ")
    with gzip.open(tmp_path / "run.txt.gz", "rt") as f:
        assert f.read().splitlines() == lines
    with pytest.raises(ValueError, match="tag"):
        write_run(run, tmp_path / "r", tag="two words")


@pytest.mark.parametrize("content, match", [
    ("1 Q0 d1 1 0.5 tag\n1 Q0 d2 2\n", r"run.txt:2: expected a TREC run line"),
    ("1 Q0 d1 1 high tag\n", r"run.txt:1: score 'high' is not a number"),
])
def test_malformed_run_names_file_and_line(tmp_path, content, match):
    (tmp_path / "run.txt").write_text(content)
    with pytest.raises(DataFormatError, match=match):
        read_run(tmp_path / "run.txt")


def test_malformed_qrels_queries_corpus(tmp_path):
    (tmp_path / "q.txt").write_text("1 0 d1 2\n1 0 d2\n")
    with pytest.raises(DataFormatError, match=r"q.txt:2: expected 'qid iter docid grade'"):
        read_qrels(tmp_path / "q.txt")
    (tmp_path / "q.tsv").write_text("1\tfirst\n2 no tab\n")
    with pytest.raises(DataFormatError, match=r"q.tsv:2: expected 'qid<TAB>query text'"):
        read_queries(tmp_path / "q.tsv")
    (tmp_path / "c.jsonl").write_text('{"_id": "a", "text": "t"}\n{"_id": "b"}\n')
    with pytest.raises(DataFormatError, match=r'c.jsonl:2: expected an object with "_id" and "text"'):
        read_corpus(tmp_path / "c.jsonl")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataFormatError, match="no judgments"):
        read_qrels(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_run(tmp_path / "missing.txt")


def test_trec_dl_folder_with_missing_passage_text(tmp_path):
    src = DATA / "dl19-slice"
    for f in src.iterdir():
        (tmp_path / f.name).write_text(f.read_text())
    lines = (tmp_path / "slice.passages.jsonl").read_text().splitlines()
    (tmp_path / "slice.passages.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DataFormatError, match="1 candidate passages have no text"):
        load_trec_dl(tmp_path)
