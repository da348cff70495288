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


def _run(capsys, *argv):
    """(exit code, stdout, stderr) of the CLI; argparse's own refusals exit through SystemExit."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str, *names: str) -> str:
    """The single error line in ``err`` (no traceback), naming every one of ``names``."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert all(n in lines[0] for n in names), (names, err)
    return lines[0]


@pytest.fixture(scope="module")
def dense_ix(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "ix"
    assert main(["index", str(SCIFACT / "corpus.jsonl"), str(out), "--model", tiny_model, "--device", "cpu"]) == 0
    return out


# -- item 10: every option is checked before a model loads --------------------------------------------
def _lite_with_projection(path, embed_dim):
    import torch

    from fastrank import LiteScorer

    torch.save(LiteScorer(lq=8, ld=24, row_hidden=12, col_hidden=10, proj_dim=16, embed_dim=embed_dim).state_dict(), path)
    return path


@pytest.mark.parametrize("case", ["kind", "ivf_pq_size", "max_length", "batch_size", "device_name", "ncentroids",
                                  "index_out_is_file", "k", "retrieve_out_is_dir", "tag", "lite_projection",
                                  "rerank_batch_size", "demo_batch_size", "passage_without_text"])
def test_a_bad_option_fails_naming_it_before_any_model_loads(case, tmp_path, tiny_model, dense_ix, no_model_loads,
                                                             capsys):
    corpus, q = SCIFACT / "corpus.jsonl", tmp_path / "q.tsv"
    q.write_text("1\tcells\n")
    (tmp_path / "afile").write_text("keep me\n")
    model = ["--model", tiny_model, "--device", "cpu"]
    rerank = ["rerank", DL19 / "slice.candidates.tsv", DL19 / "queries.tsv", DL19 / "slice.passages.jsonl",
              tmp_path / "rr.txt", *model]
    argv, names = {
        "kind": (["index", corpus, tmp_path / "ix", "--kind", "ivf", *model], ["--kind", "ivf", "ivf_pq"]),
        "ivf_pq_size": (["index", corpus, tmp_path / "ix", "--kind", "ivf_pq", *model], ["--kind ivf_pq", "61", "256"]),
        "max_length": (["index", corpus, tmp_path / "ix", "--max-length", "0", *model], ["--max-length"]),
        "batch_size": (["index", corpus, tmp_path / "ix", "--batch-size", "0", *model], ["--batch-size"]),
        "device_name": (["index", corpus, tmp_path / "ix", "--model", tiny_model, "--device", "tpu"], ["--device", "tpu"]),
        "ncentroids": (["index", corpus, tmp_path / "ix", "--tokens", "--ncentroids", "0", *model], ["--ncentroids"]),
        "index_out_is_file": (["index", corpus, tmp_path / "afile", *model], ["afile"]),
        "k": (["retrieve", dense_ix, q, tmp_path / "run.txt", "-k", "0", "--device", "cpu"], ["-k"]),
        "retrieve_out_is_dir": (["retrieve", dense_ix, q, tmp_path, "--device", "cpu"], [str(tmp_path)]),
        "tag": ([*rerank, "--tag", "two words"], ["--tag"]),
        "lite_projection": ([*rerank, "--scorer", "lite", "--lite", _lite_with_projection(tmp_path / "l.pt", 48)],
                            ["--lite", "48", "32"]),
        "rerank_batch_size": ([*rerank, "--batch-size", "-1"], ["--batch-size"]),
        "demo_batch_size": (["demo", "--data", DL19, *model, "--batch-size", "0"], ["--batch-size"]),
        "passage_without_text": (["rerank", DL19 / "slice.candidates.tsv", DL19 / "queries.tsv", corpus,
                                  tmp_path / "rr.txt", *model], ["corpus.jsonl", "have no text"]),
    }[case]
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, (out, err)
    _one_error_line(err, *names)
    assert not (tmp_path / "ix").exists() and not (tmp_path / "rr.txt").exists() and not (tmp_path / "run.txt").exists()
    assert (tmp_path / "afile").read_text() == "keep me\n"


# -- item 13: duplicate ids -----------------------------------------------------------------------------
def _jsonl(*recs):
    return "".join(json.dumps(r) + "\n" for r in recs)


READERS = {  # reader, contradicting content, (its duplicate's line, the first one's), a harmless repeat
    "queries.tsv": ("read_queries", "1\tcells\n2\tvitamin d\n1\tgenes\n", (3, 1), "1\tcells\n1\tcells\n"),
    "queries.jsonl": ("read_queries", _jsonl({"_id": "1", "text": "a"}, {"_id": "1", "text": "b"}), (2, 1),
                      _jsonl({"_id": "1", "text": "a"}, {"_id": "1", "text": "a"})),
    "corpus.jsonl": ("read_corpus", _jsonl({"_id": "d", "text": "a"}, {"_id": "e", "text": "b"}, {"_id": "d", "text": "c"}),
                     (3, 1), _jsonl({"_id": "d", "title": "t", "text": "a"}, {"_id": "d", "title": "t", "text": "a"})),
    "run.trec": ("read_run", "1 Q0 d 1 2.0 x\n1 Q0 e 2 1.5 x\n1 Q0 d 3 1.0 x\n", (3, 1), "1 Q0 d 1 2.0 x\n1 Q0 d 1 2.0 x\n"),
    "cands.tsv": ("read_run", "qid\tpid\trank\tscore\n1\td\t1\t2.0\n1\td\t2\t1.0\n", (3, 2), "1\td\t1\t2.0\n1\td\t1\t2.0\n"),
    "qrels.trec": ("read_qrels", "1 0 d 1\n1 0 e 0\n1 0 d 2\n", (3, 1), "1 0 d 1\n1 0 d 1\n"),
    "qrels.tsv": ("read_qrels", "query-id\tcorpus-id\tscore\n1\td\t1\n1\td\t0\n", (3, 2), "1\td\t1\n1\td\t1\n"),
}


@pytest.mark.parametrize("name", list(READERS))
def test_readers_refuse_a_contradicting_duplicate_id_and_warn_once_about_repeats(name, tmp_path):
    from fastrank import data

    reader, conflict, (line, first), repeat = READERS[name]
    path = tmp_path / name.replace(".trec", ".txt")
    path.write_text(conflict)
    with pytest.raises(data.DataFormatError, match=rf"{path.name}:{line}: duplicate .* \(first at line {first}\)"):
        getattr(data, reader)(path)
    path.write_text(repeat)
    with pytest.warns(UserWarning, match=rf"{path.name}: 1 repeated") as caught:
        got = getattr(data, reader)(path)
    assert len(caught) == 1 and sum(len(v) if isinstance(v, dict) else 1 for v in got.values()) == 1


def test_indexes_refuse_duplicate_ids():
    import numpy as np
    import torch

    from fastrank.index import DenseIndex, TokenIndex

    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"ids: 'a' appears twice"):
        DenseIndex(8).add(x, ["a", "b", "a", "c"])
    ix = DenseIndex(8).add(x[:2], ["a", "b"])
    with pytest.raises(ValueError, match=r"ids: 'b' is already in the index"):
        ix.add(x[2:], ["c", "b"])
    assert len(ix) == 2
    tok = (torch.randn(6, 8), torch.tensor([0, 2, 4, 6]))
    with pytest.raises(ValueError, match=r"ids: 7 appears twice"):
        TokenIndex(8, stage1="exhaustive").add(tok, [7, 8, 7])
    tix = TokenIndex(8, stage1="exhaustive").add(tok, [1, 2, 3])
    with pytest.raises(ValueError, match=r"ids: 3 is already in the index"):
        tix.add(tok, [4, 5, 3])
    assert len(tix) == 3


def test_index_command_refuses_a_corpus_with_conflicting_ids(tmp_path, tiny_model, capsys):
    (tmp_path / "c.jsonl").write_text(_jsonl({"_id": "1", "text": "cells"}, {"_id": "1", "text": "genes"}))
    rc, _, err = _run(capsys, "index", tmp_path / "c.jsonl", tmp_path / "ix", "--model", tiny_model, "--device", "cpu")
    assert rc == 2
    _one_error_line(err, "c.jsonl:2", "duplicate")
    assert not (tmp_path / "ix").exists()


# -- item 14: messages, not tracebacks; no partial output -----------------------------------------------
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a torch without CUDA")
def test_device_cuda_on_a_cpu_only_torch_is_one_line(tmp_path, tiny_model, capsys):
    rc, _, err = _run(capsys, "index", SCIFACT / "corpus.jsonl", tmp_path / "ix", "--model", tiny_model,
                      "--device", "cuda")
    assert rc == 2
    _one_error_line(err, "--device cuda", "CUDA")
    assert not (tmp_path / "ix").exists()
    from fastrank.encoders import Encoder

    with pytest.raises(ValueError, match="device 'cuda'"):
        Encoder(tiny_model, device="cuda")


@pytest.mark.parametrize("rec, what", [({"_id": "2", "text": None}, '"text"'), ({"_id": "2", "text": 7}, '"text"'),
                                       ({"_id": "2", "title": 3, "text": "x"}, '"title"'),
                                       ({"_id": None, "text": "x"}, '"_id"')])
def test_a_null_or_non_string_field_names_the_file_and_line(rec, what, tmp_path, tiny_model, capsys):
    (tmp_path / "c.jsonl").write_text(_jsonl({"_id": "1", "text": "cells"}, rec))
    rc, _, err = _run(capsys, "index", tmp_path / "c.jsonl", tmp_path / "ix", "--model", tiny_model, "--device", "cpu")
    assert rc == 2
    _one_error_line(err, "c.jsonl:2", what)
    assert not (tmp_path / "ix").exists()


def test_encoder_json_is_checksummed_portable_and_a_broken_one_is_one_line(tmp_path, tiny_model, capsys):
    import shutil

    project = tmp_path / "project"
    shutil.copytree(tiny_model, project / "model")
    assert main(["index", str(SCIFACT / "corpus.jsonl"), str(project / "ix"), "--model", str(project / "model"),
                 "--device", "cpu"]) == 0
    info = json.loads((project / "ix" / "encoder.json").read_text())
    assert not Path(info["model"]).is_absolute()
    moved = tmp_path / "moved"
    project.rename(moved)  # the index and its model travel together
    q = tmp_path / "q.tsv"
    q.write_text("1\tcells and proteins\n")
    capsys.readouterr()
    rc, _, err = _run(capsys, "retrieve", moved / "ix", q, tmp_path / "run.txt", "-k", "3", "--device", "cpu")
    assert rc == 0, err
    (moved / "ix" / "encoder.json").write_text(json.dumps(info | {"max_length": 8}))
    rc, _, err = _run(capsys, "retrieve", moved / "ix", q, tmp_path / "run2.txt", "--device", "cpu")
    assert rc == 2 and not (tmp_path / "run2.txt").exists()
    _one_error_line(err, "encoder.json", "checksum")
    for broken in ("{not json", json.dumps({"tokens": False})):
        (moved / "ix" / "encoder.json").write_text(broken)
        rc, _, err = _run(capsys, "retrieve", moved / "ix", q, tmp_path / "run2.txt", "--device", "cpu")
        assert rc == 2
        _one_error_line(err, "encoder.json")


def test_an_index_from_before_the_checksum_still_reads(tmp_path, tiny_model, dense_ix, capsys):
    import shutil

    from fastrank.index import DenseIndex

    # `fastrank index` now streams (fastrank.index.dense_stream); an index from before the checksum had the
    # layout DenseIndex.save still writes, so the old index is made from that layout.
    old = tmp_path / "old"
    DenseIndex.load(dense_ix, mmap=False).save(old, attach={"encoder.json": (dense_ix / "encoder.json").read_text()})
    meta = json.loads((old / "meta.json").read_text())
    meta["sha256"].pop("encoder.json")
    # Before the checksum meant before manifests too: format version 1, no written_by or meta_sha256.
    for key in ("written_by", "meta_sha256"):
        meta.pop(key)
    (old / "meta.json").write_text(json.dumps(meta | {"version": 1}))
    (old / "encoder.json").write_text(json.dumps({"model": str(Path(tiny_model).resolve()), "tokens": False,
                                                  "max_length": 256, "pooling": "mean"}))
    (tmp_path / "q.tsv").write_text("1\tcells\n")
    rc, _, err = _run(capsys, "retrieve", old, tmp_path / "q.tsv", tmp_path / "run.txt", "-k", "2", "--device", "cpu")
    assert rc == 0, err and len(read_run(tmp_path / "run.txt")["1"]) == 2


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "dict"])
def test_a_garbage_lite_checkpoint_is_one_line(content, tmp_path, tiny_model, no_model_loads, capsys):
    import torch

    ckpt = tmp_path / "lite.pt"
    if content == "dict":
        torch.save({"weight": torch.zeros(2)}, ckpt)
    else:
        ckpt.write_bytes(content)
    rc, _, err = _run(capsys, "rerank", DL19 / "slice.candidates.tsv", DL19 / "queries.tsv",
                      DL19 / "slice.passages.jsonl", tmp_path / "rr.txt", "--scorer", "lite", "--lite", ckpt,
                      "--model", tiny_model, "--device", "cpu")
    assert rc == 2 and not (tmp_path / "rr.txt").exists()
    _one_error_line(err, "--lite", "lite.pt")


@pytest.mark.parametrize("name", ["run.txt", "run.txt.gz"])
def test_a_failed_write_leaves_no_partial_run_and_keeps_the_old_one(name, tmp_path):
    from fastrank.data import write_run

    path = tmp_path / name
    write_run({"1": {"a": 1.0}}, path)
    before = path.read_bytes()
    with pytest.raises((TypeError, ValueError)):
        write_run({"1": {"a": 2.0, "b": 1.0}, "2": {"c": "high"}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# -- item 15: the newcomer's path -----------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


def test_version(capsys):
    import fastrank

    rc, out, _ = _run(capsys, "--version")
    assert rc == 0 and out.strip() == f"fastrank {fastrank.__version__}"


def test_progress_is_quiet_off_a_tty_and_sparse_lines_when_long(tiny_model, capsys, monkeypatch):
    from fastrank import progress
    from fastrank.encoders import Encoder

    enc = Encoder(tiny_model, device="cpu", batch_size=2)
    capsys.readouterr()
    enc.encode(["cells", "genes", "proteins"])  # stderr is captured: not a terminal
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    enc.encode(["cells", "genes", "proteins"], progress="corpus")
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n") and "corpus" in err.splitlines()[-1]
    assert "3/3" in err.splitlines()[-1]


def test_an_ivf_pq_build_on_few_points_warns_once_not_per_codebook(capfd):
    import numpy as np

    from fastrank.index import DenseIndex

    x = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    with pytest.warns(UserWarning, match="ivf_pq") as caught:
        DenseIndex(32, "ivf_pq").add(x)
    assert len([w for w in caught if "training" in str(w.message)]) == 1
    assert "WARNING clustering" not in capfd.readouterr().err


def test_ci_stops_when_the_readme_command_fails(tmp_path):
    """A failed install must end CI red: under `set -e` a failure before the last command of an && list does
    not stop a script, and the AVX2 step after it would have run on whatever build was installed before."""
    import shutil
    import subprocess

    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, rc in (("pip", 1), ("python", 0)):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} >> '{tmp_path}/calls'\nexit {rc}\n")
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(["/bin/bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert (tmp_path / "calls").read_text().split() == ["pip"]  # neither the suite nor the AVX2 step ran


def test_readme_test_command_is_what_ci_runs_and_the_test_extra_is_small():
    import re
    import tomllib

    readme = (ROOT / "README.md").read_text()
    readme_cmd = re.search(r"# the tests\n(.*)\n", readme).group(1).strip()
    ci_cmd = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pip install")]
    assert ci_cmd == [readme_cmd + " || exit 1"]  # see the test below
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    name = re.search(r'-e "\.\[(\w+)\]"', readme_cmd).group(1)
    full = " ".join(extras[name])
    assert all(dep in full for dep in ("triton", "pytest", "faiss-cpu", "transformers", "ir-measures"))
    assert not any("triton" in dep for dep in extras["test"])
