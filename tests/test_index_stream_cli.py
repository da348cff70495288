"""`fastrank index --tokens` streams the corpus: chunks encoded and committed as they come, resumed after an
interruption, bad lines and duplicate ids named by file and line, `--verify` reading every byte."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from fastrank.cli import main  # noqa: E402
from fastrank.data import load_beir  # noqa: E402
from fastrank.index import TokenIndex  # noqa: E402
from fastrank.index import token_stream  # noqa: E402
from tiny_bert import make_tiny_bert  # noqa: E402

SCIFACT = Path(__file__).parent / "data" / "scifact-slice"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), list(load_beir(SCIFACT).corpus.values())))


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_an_interrupted_build_resumes_from_its_last_chunk(capsys, tmp_path, tiny_model, monkeypatch):
    # Exhaustive, so that every chunk is committed as it comes (a centroid index holds its first chunks until
    # stage 1 is trained on them: tests/test_index_stream.py kills those builds at random points).
    args = ["--tokens", "--exhaustive", "--chunk-docs", "10", "--model", tiny_model, "--device", "cpu"]
    assert run(capsys, "index", SCIFACT / "corpus.jsonl", tmp_path / "whole", *args)[0] == 0
    real_add, calls = token_stream.TokenIndexWriter.add, []

    def add_then_die(self, tokens, ids=None):
        calls.append(len(ids))
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C, or any crash, between two commits
        return real_add(self, tokens, ids)

    monkeypatch.setattr(token_stream.TokenIndexWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        main([str(a) for a in ["index", SCIFACT / "corpus.jsonl", tmp_path / "cut", *args]])
    monkeypatch.setattr(token_stream.TokenIndexWriter, "add", real_add)
    capsys.readouterr()
    rc, out, err = run(capsys, "index", SCIFACT / "corpus.jsonl", tmp_path / "cut", *args)
    assert rc == 0, err
    # The first three chunks (30 documents) were committed before the interruption and are not encoded again.
    assert "resuming" in out and "30 documents already indexed" in out
    assert "encoded 31 documents" in out
    assert files(tmp_path / "cut") == files(tmp_path / "whole")
    # Different options on the partial build of another run are refused by name.
    monkeypatch.setattr(token_stream.TokenIndexWriter, "add", add_then_die)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        main([str(a) for a in ["index", SCIFACT / "corpus.jsonl", tmp_path / "p", *args]])
    monkeypatch.setattr(token_stream.TokenIndexWriter, "add", real_add)
    capsys.readouterr()
    rc, _, err = run(capsys, "index", SCIFACT / "corpus.jsonl", tmp_path / "p", *args, "--token-dtype", "float16")
    assert rc == 2 and "token_dtype='int8'" in err and "token_dtype='float16'" in err and "same options" in err


def test_bad_lines_and_duplicate_ids_name_the_file_and_line(capsys, tmp_path, tiny_model):
    lines = (SCIFACT / "corpus.jsonl").read_text().splitlines()[:30]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:17] + ['{"_id": "x", "text": 5}'] + lines[17:]) + "\n")
    rc, _, err = run(capsys, "index", bad, tmp_path / "a", "--tokens", "--chunk-docs", "8", "--model", tiny_model)
    assert rc == 2 and f"{bad}:18:" in err and '"text" must be a string' in err
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join(lines[:25] + [lines[3]]) + "\n")
    rc, _, err = run(capsys, "index", dup, tmp_path / "b", "--tokens", "--chunk-docs", "8", "--model", tiny_model)
    first_id = json.loads(lines[3])["_id"]
    assert rc == 2 and f"{dup}:26:" in err and f"duplicate document id {first_id!r} (an earlier document has it)" in err
    assert not (tmp_path / "b").exists()  # a fresh build given bad input leaves nothing behind


def test_a_trec_tsv_collection_indexes_like_its_jsonl(capsys, tmp_path, tiny_model):
    corpus = load_beir(SCIFACT).corpus
    tsv = tmp_path / "collection.tsv"
    tsv.write_text("".join(f"{d}\t{t}\n" for d, t in corpus.items()))
    jsonl = tmp_path / "plain.jsonl"
    jsonl.write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in corpus.items()))
    args = ["--tokens", "--exhaustive", "--model", tiny_model, "--device", "cpu"]
    assert run(capsys, "index", tsv, tmp_path / "t", *args)[0] == 0
    assert run(capsys, "index", jsonl, tmp_path / "j", *args)[0] == 0
    t, j = files(tmp_path / "t"), files(tmp_path / "j")
    assert {k: v for k, v in t.items() if k != "meta.json"} == {k: v for k, v in j.items() if k != "meta.json"}
    assert TokenIndex.load(tmp_path / "t").ids == list(corpus)


def test_verify_reads_every_byte(capsys, tmp_path, tiny_model):
    out = tmp_path / "ix"
    assert run(capsys, "index", SCIFACT / "corpus.jsonl", out, "--tokens", "--model", tiny_model)[0] == 0
    rc, text, _ = run(capsys, "index", "--verify", out)
    assert rc == 0 and "every byte matches its checksum" in text
    codes = out / "codes.bin"
    data = bytearray(codes.read_bytes())
    data[3] ^= 1
    codes.write_bytes(bytes(data))
    rc, _, err = run(capsys, "index", "--verify", out)
    assert rc == 2 and "codes.bin: the bytes of chunk" in err
    rc, _, err = run(capsys, "index", "--verify", out, SCIFACT / "corpus.jsonl")
    assert rc == 2 and "drop CORPUS and OUT" in err
    rc, _, err = run(capsys, "index", SCIFACT / "corpus.jsonl")
    assert rc == 2 and "CORPUS and OUT are required" in err


def test_a_dense_build_streams_resumes_and_verifies(capsys, tmp_path, tiny_model, monkeypatch):
    from fastrank.index import DenseIndex
    from fastrank.index import dense_stream

    args = ["--chunk-docs", "10", "--model", tiny_model, "--device", "cpu"]
    assert run(capsys, "index", SCIFACT / "corpus.jsonl", tmp_path / "whole", *args)[0] == 0
    real_add, calls = dense_stream.DenseIndexWriter.add, []

    def add_then_die(self, vectors, ids=None):
        calls.append(len(ids))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_add(self, vectors, ids)

    monkeypatch.setattr(dense_stream.DenseIndexWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        main([str(a) for a in ["index", SCIFACT / "corpus.jsonl", tmp_path / "cut", *args]])
    monkeypatch.setattr(dense_stream.DenseIndexWriter, "add", real_add)
    capsys.readouterr()
    rc, out, err = run(capsys, "index", SCIFACT / "corpus.jsonl", tmp_path / "cut", *args)
    assert rc == 0 and "20 documents already indexed" in out and "encoded 41 documents" in out, (out, err)
    assert files(tmp_path / "cut") == files(tmp_path / "whole")
    assert len(DenseIndex.load(tmp_path / "cut")) == 61
    rc, text, _ = run(capsys, "index", "--verify", tmp_path / "cut")
    assert rc == 0 and "61 documents (flat, dense); every byte matches" in text
