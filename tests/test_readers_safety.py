"""Readers never corrupt silently (issue 22): a byte-order mark is not part of an id, undecodable bytes name
the file and line, and a relevance grade is an integer trec_eval can hold or an error, never truncated."""
import gzip
import json
from pathlib import Path

import pytest

from fastrank import data
from fastrank.data import DataFormatError
from fastrank.train.data import read_teacher

BOM = "\ufeff".encode()

# file name, reader, content (the first id is what a BOM would stick to)
FILES = {
    "qrels.txt": (data.read_qrels, "q1 0 d1 2\nq1 0 d2 0\n"),
    "qrels.tsv": (data.read_qrels, "query-id\tcorpus-id\tscore\nq1\td1\t1\n"),
    "headerless-qrels.tsv": (data.read_qrels, "q1\td1\t1\nq1\td2\t0\n"),
    "run.txt": (data.read_run, "q1 Q0 d1 1 2.5 t\nq1 Q0 d2 2 1.5 t\n"),
    "cands.tsv": (data.read_run, "q1\td1\t1\t2.5\nq1\td2\t2\t1.5\n"),
    "queries.tsv": (data.read_queries, "q1\tcells\nq2\tgenes\n"),
    "queries.jsonl": (data.read_queries, '{"_id": "q1", "text": "cells"}\n'),
    "corpus.jsonl": (data.read_corpus, '{"_id": "d1", "title": "t", "text": "cells"}\n'),
    "teacher.tsv": (read_teacher, "3.5\t1.0\tq1\td1\td2\n"),
    "teacher.jsonl": (read_teacher, '{"qid": "q1", "pid": "d1", "score": 2.0}\n'),
}


def _write(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", list(FILES))
def test_a_byte_order_mark_is_not_part_of_the_first_id(name, gz, tmp_path):
    reader, content = FILES[name]
    suffix = ".gz" if gz else ""
    plain = reader(_write(tmp_path / f"plain-{name}{suffix}", content.encode()))
    with_bom = reader(_write(tmp_path / f"bom-{name}{suffix}", BOM + content.encode()))
    assert with_bom == plain


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", list(FILES))
def test_undecodable_bytes_name_the_file_and_line(name, gz, tmp_path):
    reader, content = FILES[name]
    lines = content.encode().splitlines(keepends=True)
    # The bad byte sits past the decoder's first read-ahead block, on the last line: the line number must be
    # the file's, not the position in a buffer.
    raw = BOM + b"".join(lines) + lines[-1] * 3000 + lines[-1][:3] + b"\x88" + lines[-1][3:]
    bad_line = raw.count(b"\n")
    path = _write(tmp_path / (name + (".gz" if gz else "")), raw)
    with pytest.raises(DataFormatError, match=rf"{path.name}:{bad_line}: not valid UTF-8 \(byte 0x88 at column 4\)"):
        reader(path)


def test_undecodable_first_line_after_a_bom_counts_the_bom_bytes(tmp_path):
    path = _write(tmp_path / "q.tsv", BOM + b"q\x881\tcells\n")
    with pytest.raises(DataFormatError, match=r"q.tsv:1: not valid UTF-8 \(byte 0x88 at column 5\)"):
        data.read_queries(path)


@pytest.mark.parametrize("grade, why", [("1.7", "is not an integer"), ("0.5", "is not an integer"),
                                        ("inf", "is not an integer"), ("-inf", "is not an integer"),
                                        ("nan", "is not an integer"),
                                        ("99999999999999999999", "is out of range"),
                                        ("2147483648", "is out of range"), ("-2147483649", "is out of range"),
                                        ("1e30", "is out of range"), ("high", "is not a number")])
@pytest.mark.parametrize("layout", ["trec", "beir"])
def test_a_grade_that_is_not_a_c_int_names_the_file_and_line(grade, why, layout, tmp_path):
    if layout == "trec":
        path = _write(tmp_path / "qrels.txt", f"q1 0 d1 1\nq1 0 d2 {grade}\n".encode())
        line = 2
    else:
        path = _write(tmp_path / "qrels.tsv", f"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t{grade}\n".encode())
        line = 3
    with pytest.raises(DataFormatError, match=rf"qrels\.(txt|tsv):{line}: relevance grade '{grade}' {why}"):
        data.read_qrels(path)


def test_integer_grades_keep_their_value_negative_and_extreme_included(tmp_path):
    path = _write(tmp_path / "qrels.txt", b"q1 0 a -2\nq1 0 b -1\nq1 0 c 2.0\nq1 0 d 2147483647\nq1 0 e -2147483648\n")
    assert data.read_qrels(path) == {"q1": {"a": -2, "b": -1, "c": 2, "d": 2147483647, "e": -2147483648}}


# -- evaluate: the Python API gets the same rule, the CLI one line ------------------------------------------
ir_measures = pytest.importorskip("ir_measures")


@pytest.mark.parametrize("grade", [1.7, float("inf"), float("nan"), 10**20, -(2**31) - 1, "2"])
def test_evaluate_refuses_a_grade_that_is_not_a_c_int(grade):
    from fastrank.evaluate import evaluate, evaluate_per_query

    qrels, run = {"1": {"a": grade, "b": 1}}, {"1": {"a": 2.0, "b": 1.0}}
    for fn in (evaluate, evaluate_per_query):
        with pytest.raises(ValueError, match=r"qrels\['1'\]\['a'\]: relevance grade .* is not an integer from "
                                             r"-2147483648 to 2147483647"):
            fn(qrels, run, ["nDCG@10"])


def test_evaluate_keeps_integral_grades_of_any_integer_type():
    import numpy as np

    from fastrank.evaluate import evaluate

    run = {"1": {"a": 1.0, "b": 2.0}}
    want = evaluate({"1": {"a": 2, "b": 0}}, run, ["nDCG@10"])
    assert evaluate({"1": {"a": 2.0, "b": np.int64(0)}}, run, ["nDCG@10"]) == want


def test_evaluate_refuses_rel_that_measures_would_ignore():
    from fastrank.evaluate import evaluate

    qrels, run = {"1": {"a": 2}}, {"1": {"a": 1.0}}
    with pytest.raises(ValueError, match=r"rel=2 .* 'RR\(rel=2\)@10'"):
        evaluate(qrels, run, ["RR@10"], rel=2)
    assert evaluate(qrels, run, ["RR(rel=2)@10"]) == {"RR(rel=2)@10": 1.0}


def _evaluate_cli(capsys, *argv):
    from fastrank.cli import main

    rc = main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("bom_in", ["none", "qrels", "run", "both"])
def test_evaluate_command_gives_the_same_figure_with_a_bom(bom_in, tmp_path, capsys):
    q = _write(tmp_path / "qrels.txt", BOM * (bom_in in ("qrels", "both")) + b"q1 0 d1 1\nq2 0 d2 1\n")
    r = _write(tmp_path / "run.txt", BOM * (bom_in in ("run", "both")) + b"q1 Q0 d1 1 1.0 t\nq2 Q0 d2 1 1.0 t\n")
    rc, out, err = _evaluate_cli(capsys, q, r, "--json", "--measures", "nDCG@10")
    assert rc == 0, err
    assert json.loads(out) == {"nDCG@10": 1.0}


@pytest.mark.parametrize("grade", ["inf", "99999999999999999999", "1.7"])
def test_evaluate_command_refuses_a_bad_grade_in_one_line(grade, tmp_path, capsys):
    q = _write(tmp_path / "qrels.txt", f"q1 0 d1 {grade}\n".encode())
    r = _write(tmp_path / "run.txt", b"q1 Q0 d1 1 1.0 t\n")
    rc, _, err = _evaluate_cli(capsys, q, r)
    assert rc == 2 and "Traceback" not in err
    assert err.startswith(f"fastrank evaluate: error: {q}:1: relevance grade '{grade}'")


def test_evaluate_command_names_the_undecodable_file_and_line(tmp_path, capsys):
    q = _write(tmp_path / "qrels.txt", b"q1 0 d1 1\n")
    r = _write(tmp_path / "run.txt", b"q1 Q0 d1 1 1.0 t\nq1 Q0 d\x882 2 0.5 t\n")
    rc, _, err = _evaluate_cli(capsys, q, r)
    assert rc == 2 and err.startswith(f"fastrank evaluate: error: {r}:2: not valid UTF-8 (byte 0x88 at column 8)")
