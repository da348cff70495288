"""Every CLI check before any work (issue 22): one rule for the parent of every output, --max-length against
the model's positions, --tag, and option combinations that would be silently ignored, all refused before a
model loads; bench's option errors in the same one-line form as every other command's."""
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("faiss")
pytest.importorskip("ir_measures")

from fastrank.cli import build_parser, main  # noqa: E402
from fastrank.data import load_beir, load_trec_dl, read_run  # noqa: E402
from tiny_bert import make_tiny_bert  # noqa: E402

DATA = Path(__file__).parent / "data"
SCIFACT, DL19 = DATA / "scifact-slice", DATA / "dl19-slice"
TINY_POSITIONS = 256  # tiny_bert's max_position_embeddings


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    texts = list(load_beir(SCIFACT).corpus.values()) + list(load_trec_dl(DL19).passages.values())
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts))


@pytest.fixture(scope="module")
def dense_ix(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("checks") / "ix"
    assert main(["index", str(SCIFACT / "corpus.jsonl"), str(out), "--model", tiny_model, "--device", "cpu"]) == 0
    return out


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str, command: str, *names: str) -> str:
    """The single line of ``err``: the command's error prefix, no traceback, naming every one of ``names``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastrank {command}: error: "), err
    assert all(n in lines[0] for n in names), (names, err)
    return lines[0]


# -- the parent of every output: created, or refused up front when the path runs into a file ---------------
def test_index_creates_the_missing_parents_of_out(tmp_path, tiny_model, capsys):
    out = tmp_path / "no" / "such" / "dir" / "ix"
    rc, _, err = _run(capsys, "index", SCIFACT / "corpus.jsonl", out, "--model", tiny_model, "--device", "cpu")
    assert rc == 0, err
    assert (out / "meta.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["ix"]  # no temporary left beside it


def test_retrieve_creates_parents_and_a_bom_in_qrels_drops_no_query(tmp_path, dense_ix, capsys):
    (tmp_path / "q.tsv").write_text("1\tcells and proteins\n2\tvitamin d\n")
    (tmp_path / "qrels.txt").write_bytes("\ufeff1 0 x 1\n2 0 y 1\n".encode())
    out = tmp_path / "runs" / "new" / "run.txt"
    rc, _, err = _run(capsys, "retrieve", dense_ix, tmp_path / "q.tsv", out, "-k", "2", "--qrels",
                      tmp_path / "qrels.txt", "--device", "cpu")
    assert rc == 0, err
    assert sorted(read_run(out)) == ["1", "2"]


def test_bench_json_creates_its_parents(tmp_path, capsys):
    out = tmp_path / "new" / "dir" / "losses.json"
    rc, _, err = _run(capsys, "bench", "losses", "--tiny", "--device", "cpu", "--json", out)
    assert rc == 0, err
    assert json.loads(out.read_text())["rows"]


@pytest.mark.parametrize("case", ["index", "retrieve", "rerank", "train", "train_cache", "bench_json", "bench_out"])
def test_an_output_under_a_file_is_refused_before_any_work(case, tmp_path, tiny_model, no_model_loads, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    (tmp_path / "q.tsv").write_text("1\tcells\n")
    model = ["--model", tiny_model, "--device", "cpu"]
    # bench cases carry an option error of their own: their output check must come first, and they never
    # start timing.
    argv, command, name = {
        "index": (["index", SCIFACT / "corpus.jsonl", afile / "sub" / "ix", *model], "index", "OUT"),
        "retrieve": (["retrieve", tmp_path / "noindex", tmp_path / "q.tsv", afile / "run.txt", "--device", "cpu"],
                     "retrieve", "OUT"),
        "rerank": (["rerank", DL19 / "slice.candidates.tsv", DL19 / "queries.tsv", DL19 / "slice.passages.jsonl",
                    afile / "rr.txt", *model], "rerank", "OUT"),
        "train": (["train", SCIFACT, afile / "model", *model], "train", "OUT"),
        "train_cache": (["train", SCIFACT, tmp_path / "model", "--cache-dir", afile / "cache", *model], "train",
                        "--cache-dir"),
        "bench_json": (["bench", "maxsim", "--device", "cpu", "--cases", "nothing", "--json", afile / "x.json"],
                       "bench", "--json"),
        "bench_out": (["bench", "all", "--tiny", "--device", "cpu", "--sections", "nothing", "--out", afile / "rep"],
                      "bench", "--out"),
    }[case]
    rc, _, err = _run(capsys, *argv)
    assert rc == 2
    _one_error_line(err, command, name, f"{afile} is a file, not a directory")
    assert afile.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "q.tsv"]


def test_the_rule_is_in_the_help():
    assert "creates the missing parent directories" in " ".join(build_parser().format_help().split())


# -- --max-length against the model's positions ----------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--tokens"]], ids=["dense", "tokens"])
def test_index_max_length_beyond_the_models_positions_is_refused_before_it_loads(extra, tmp_path, tiny_model,
                                                                                 no_model_loads, capsys):
    rc, _, err = _run(capsys, "index", SCIFACT / "corpus.jsonl", tmp_path / "ix", "--max-length", "100000", *extra,
                      "--model", tiny_model, "--device", "cpu")
    assert rc == 2
    _one_error_line(err, "index", "--max-length 100000", f"at most {TINY_POSITIONS} tokens")
    assert not (tmp_path / "ix").exists()


def test_index_max_length_at_the_models_positions_is_accepted(tmp_path, tiny_model, capsys):
    rc, _, err = _run(capsys, "index", SCIFACT / "corpus.jsonl", tmp_path / "ix", "--max-length",
                      str(TINY_POSITIONS), "--model", tiny_model, "--device", "cpu")
    assert rc == 0, err


def _with_positions(model: str, where: Path, positions: int, tokenizer_limit: int | None = None) -> Path:
    """A copy of ``model`` whose config claims ``positions`` (weights untouched: nothing may load them)."""
    copy = Path(shutil.copytree(model, where))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"max_position_embeddings": positions}))
    if tokenizer_limit is not None:
        tok = json.loads((copy / "tokenizer_config.json").read_text())
        (copy / "tokenizer_config.json").write_text(json.dumps(tok | {"model_max_length": tokenizer_limit}))
    return copy


def test_retrieve_refuses_a_model_shorter_than_the_index_before_it_loads(tmp_path, tiny_model, dense_ix,
                                                                         no_model_loads, capsys):
    short = _with_positions(tiny_model, tmp_path / "short", 128)
    (tmp_path / "q.tsv").write_text("1\tcells\n")
    rc, _, err = _run(capsys, "retrieve", dense_ix, tmp_path / "q.tsv", tmp_path / "run.txt", "--model", short,
                      "--device", "cpu")
    assert rc == 2
    _one_error_line(err, "retrieve", "max_length 256", "at most 128 tokens")


def test_model_max_positions_reads_config_and_tokenizer_without_weights(tmp_path, tiny_model):
    from fastrank.encoders import model_max_positions

    assert model_max_positions() == 512  # the packaged all-MiniLM-L6-v2
    assert model_max_positions(tiny_model) == TINY_POSITIONS  # its tokenizer says no limit of its own
    assert model_max_positions(_with_positions(tiny_model, tmp_path / "tok", 514, tokenizer_limit=512)) == 512


# -- --tag and option combinations that would be ignored --------------------------------------------------
@pytest.mark.parametrize("case", ["retrieve_tag", "retrieve_exhaustive_nprobe", "retrieve_exhaustive_ndocs",
                                  "index_exhaustive_nprobe", "index_exhaustive_ndocs", "rerank_dense_token_dtype",
                                  "rerank_lite_token_dtype", "evaluate_rel_measures", "bench_compile_without_out"])
def test_a_bad_or_ignored_option_is_refused_naming_it_before_any_work(case, tmp_path, tiny_model, no_model_loads,
                                                                      capsys):
    (tmp_path / "q.tsv").write_text("1\tcells\n")
    model = ["--model", tiny_model, "--device", "cpu"]
    # retrieve's checks must come before it reads the index, so a missing one shows they did
    retrieve = ["retrieve", tmp_path / "noindex", tmp_path / "q.tsv", tmp_path / "run.txt", *model]
    index = ["index", SCIFACT / "corpus.jsonl", tmp_path / "ix", "--tokens", "--exhaustive", *model]
    rerank = ["rerank", DL19 / "slice.candidates.tsv", DL19 / "queries.tsv", DL19 / "slice.passages.jsonl",
              tmp_path / "rr.txt", "--token-dtype", "int8", *model]
    argv, names = {
        "retrieve_tag": ([*retrieve, "--tag", "two words"], ["--tag", "one non-empty word"]),
        "retrieve_exhaustive_nprobe": ([*retrieve, "--exhaustive", "--nprobe", "3"], ["--nprobe", "--exhaustive"]),
        "retrieve_exhaustive_ndocs": ([*retrieve, "--exhaustive", "--ndocs", "5"], ["--ndocs", "--exhaustive"]),
        "index_exhaustive_nprobe": ([*index, "--nprobe", "3"], ["--nprobe", "--exhaustive"]),
        "index_exhaustive_ndocs": ([*index, "--ndocs", "5"], ["--ndocs", "--exhaustive"]),
        "rerank_dense_token_dtype": ([*rerank, "--scorer", "dense"], ["--token-dtype", "--scorer dense"]),
        "rerank_lite_token_dtype": ([*rerank, "--scorer", "lite"], ["--token-dtype", "--scorer lite"]),
        "evaluate_rel_measures": (["evaluate", DL19 / "qrels.txt", DL19 / "slice.candidates.tsv", "--rel", "2",
                                   "--measures", "nDCG@10"], ["--rel 2", "--measures", "RR(rel=2)@10"]),
        "bench_compile_without_out": (["bench", "maxsim", "--device", "cpu", "--compile", "--cases", "nothing"],
                                      ["--compile", "--out"]),
    }[case]
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, (out, err)
    _one_error_line(err, argv[0], *names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.tsv"]


@pytest.mark.parametrize("extra, names", [([], ["--seed", "--kind flat"]),
                                          (["--kind", "hnsw"], ["--seed", "--kind hnsw"]),
                                          (["--tokens", "--exhaustive"], ["--seed", "--exhaustive"])])
def test_index_seed_that_seeds_nothing_is_refused(extra, names, tmp_path, tiny_model, no_model_loads, capsys):
    rc, _, err = _run(capsys, "index", SCIFACT / "corpus.jsonl", tmp_path / "ix", "--seed", "3", *extra,
                      "--model", tiny_model, "--device", "cpu")
    assert rc == 2
    _one_error_line(err, "index", *names)


def test_index_seed_of_a_centroid_token_index_passes_the_checks(tmp_path, tiny_model, no_model_loads):
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(["index", str(SCIFACT / "corpus.jsonl"), str(tmp_path / "ix"), "--tokens", "--seed", "3",
              "--model", tiny_model, "--device", "cpu"])


@pytest.fixture(scope="module")
def exhaustive_ix(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("checks") / "exh"
    assert main(["index", str(SCIFACT / "corpus.jsonl"), str(out), "--tokens", "--exhaustive", "--model", tiny_model,
                 "--device", "cpu"]) == 0
    return out


@pytest.mark.parametrize("flag", ["--nprobe", "--ndocs"])
def test_retrieve_centroid_options_on_an_exhaustive_index_are_refused(flag, tmp_path, exhaustive_ix, no_model_loads,
                                                                      capsys):
    (tmp_path / "q.tsv").write_text("1\tcells\n")
    rc, _, err = _run(capsys, "retrieve", exhaustive_ix, tmp_path / "q.tsv", tmp_path / "run.txt", flag, "4",
                      "--device", "cpu")
    assert rc == 2
    _one_error_line(err, "retrieve", flag, "built --exhaustive")


def test_rel_alone_still_sets_the_default_measures(capsys):
    rc, out, err = _run(capsys, "evaluate", DL19 / "qrels.txt", DL19 / "slice.candidates.tsv", "--rel", "2", "--json")
    assert rc == 0, err
    assert list(json.loads(out)) == ["nDCG@10", "RR(rel=2)@10", "R(rel=2)@100", "AP(rel=2)"]


# -- bench: option errors read like every other command's ------------------------------------------------
@pytest.mark.parametrize("argv, name", [(["maxsim", "--dtype", "int4"], "--dtype"),
                                        (["maxsim", "--cases", "nothing"], "--cases nothing: no case matches"),
                                        (["all", "--dtype", "int4"], "--dtype")])
def test_bench_option_errors_have_the_prefix_and_exit_2(argv, name, capsys):
    rc, _, err = _run(capsys, "bench", argv[0], "--device", "cpu", *argv[1:])
    assert rc == 2
    _one_error_line(err, "bench", name)
