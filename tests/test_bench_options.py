"""`fastrank bench packed` and `bench rerank` check their options the way every other command does: a bad
value is one line `fastrank bench: error: <option> ...` with exit 2, found before the data is read or any
model loads, and no option the user typed is silently dropped (by --quick or anything else). A bench
`--out DIR` overwrites only a report fastrank bench wrote. The workloads are stubbed: nothing here
tokenizes, encodes or times anything."""
import pytest

from fastrank.bench import packed as bench_packed, rerank as bench_rerank
from fastrank.cli import main


@pytest.fixture
def packed_calls(monkeypatch):
    """Replaces bench packed's workload: records (dims, min_seconds) of each run that gets that far."""
    calls = []

    def fake_run(dims, **kwargs):
        calls.append((tuple(dims), kwargs["min_seconds"]))
        return {"cases": []}

    monkeypatch.setattr(bench_packed, "run", fake_run)
    monkeypatch.setattr(bench_packed, "format_report", lambda res: "packed table")
    return calls


@pytest.fixture
def rerank_calls(monkeypatch):
    """Replaces bench rerank's workload (which reads the data and loads every model first)."""
    calls = []

    def fake_run_bench(data, model, **kwargs):
        calls.append(kwargs)
        return {"runs": {}, "rows": []}

    monkeypatch.setattr(bench_rerank, "run_bench", fake_run_bench)
    monkeypatch.setattr(bench_rerank, "format_report", lambda res: "rerank table")
    return calls


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "int4"], "--dtype: expected a comma-separated subset of float32,bfloat16,float16,int8, got 'int4'"),
    (["--dims", "x"], "--dims: expected positive integers, got 'x'"),
    (["--dims", "128,0"], "--dims: expected positive integers, got '128,0'"),
    (["--device", "cuda"], "--device cuda: bench packed times the DL19 workload on CPU tensors only"),
    (["--seconds", "-1"], "--seconds: expected a finite number of seconds >= 0, got -1.0"),
    (["--seconds", "nan"], "--seconds: expected a finite number of seconds >= 0, got nan"),
    (["--quick", "--seconds", "inf"], "--seconds: expected a finite number of seconds >= 0, got inf"),
])
def test_packed_bad_option_is_a_bench_error_with_exit_2(capsys, packed_calls, argv, message):
    # Before: SystemExit with the bare message (exit 1, no `fastrank bench: error:`); --seconds was not checked.
    assert main(["bench", "packed", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastrank bench: error: {message}") and err.count("\n") == 1
    assert packed_calls == []


@pytest.mark.parametrize("argv, expected", [
    ([], ((384, 128), 1.0)),
    (["--quick"], ((128,), 0.3)),
    (["--quick", "--seconds", "2"], ((128,), 2.0)),  # before: 0.3, the 2 dropped without a word
    (["--quick", "--dims", "64"], ((64,), 0.3)),
    (["--seconds", "0"], ((384, 128), 0.0)),
])
def test_packed_quick_fills_in_only_what_was_not_given(capsys, packed_calls, argv, expected):
    assert main(["bench", "packed", *argv]) == 0
    assert packed_calls == [expected]
    assert "packed table" in capsys.readouterr().out


def test_packed_help_says_explicit_options_win_over_quick(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "packed", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(--dims and --seconds, when given, win)" in text and "0.3 with --quick" in text


@pytest.mark.parametrize("argv, expected", [
    (["--quick"], (10, 1)),
    (["--quick", "--rounds", "3"], (10, 3)),  # before: 1 round, because 3 was also the default
    (["--quick", "--rounds", "5", "--max-queries", "4"], (4, 5)),
    ([], (None, 3)),
])
def test_rerank_quick_fills_in_only_what_was_not_given(capsys, rerank_calls, argv, expected):
    assert main(["bench", "rerank", *argv]) == 0
    assert [(c["max_queries"], c["rounds"]) for c in rerank_calls] == [expected]


def test_rerank_options_are_checked_by_flag_before_any_model_loads(capsys, tmp_path, rerank_calls):
    plain = tmp_path / "plain"
    plain.mkdir()
    cases = [
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["--rounds", "0"], "--rounds must be a positive integer, got 0"),
        (["--max-queries", "-2"], "--max-queries must be a positive integer, got -2"),
        (["--device", "tpu"], "--device tpu: expected cpu, cuda or cuda:N"),
        (["--model", str(plain)], f"--model {plain}: not a local transformers model directory (no config.json)"),
        (["--cross", str(plain)], f"--cross {plain}: not a local transformers model directory (no config.json)"),
        (["--lite-model", str(plain)], f"--lite-model {plain}: not a directory written by `fastrank train`"),
        (["--lite-model", str(tmp_path / "nope")], f"--lite-model {tmp_path / 'nope'}: no such directory"),
    ]
    for argv, message in cases:
        # Before: each reached run_bench, which named its Python argument after loading the bi-encoder (or
        # passed --batch-size, --device and the directories on to the models themselves).
        assert main(["bench", "rerank", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"fastrank bench: error: {message}"), (argv, err)
    assert rerank_calls == []


def test_rerank_lite_model_of_another_scorer_is_refused_from_its_manifest(capsys, tmp_path, rerank_calls):
    """The scorer is read from fastrank_model.json alone: no weights load to find it out."""
    import json

    from fastrank.trained import FORMAT, MANIFEST, VERSION

    trained = tmp_path / "maxsim-run"
    trained.mkdir()
    (trained / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": VERSION, "scorer": "maxsim",
                                                "pooling": "mean", "query_max_length": 32, "doc_max_length": 200,
                                                "head_sha256": "0" * 64}))
    assert main(["bench", "rerank", "--lite-model", str(trained)]) == 2
    assert capsys.readouterr().err.startswith(
        f"fastrank bench: error: --lite-model {trained}: holds a trained maxsim model, not a LITE one")
    assert rerank_calls == []


@pytest.mark.parametrize("own", ["report.md", "results.json", "roofline.png", "scaling_maxsim_0.png"])
def test_out_never_overwrites_a_report_fastrank_bench_did_not_write(capsys, tmp_path, packed_calls, own):
    out = tmp_path / "mine"
    out.mkdir()
    (out / own).write_text("my own")
    (out / "notes.txt").write_text("mine too")
    # before: the run went ahead and report.md / results.json were overwritten
    assert main(["bench", "packed", "--quick", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(
        f"fastrank bench: error: --out {out}: {own} there is not from a fastrank bench report")
    assert packed_calls == [] and (out / own).read_text() == "my own"
    assert sorted(p.name for p in out.iterdir()) == sorted([own, "notes.txt"])


def test_out_replaces_a_report_fastrank_bench_wrote(capsys, tmp_path, packed_calls, rerank_calls):
    out = tmp_path / "report"
    (tmp_path / "notes.txt").write_text("a file")
    assert main(["bench", "packed", "--quick", "--out", str(tmp_path / "notes.txt")]) == 2
    assert capsys.readouterr().err.startswith(f"fastrank bench: error: --out {tmp_path / 'notes.txt'}: is a file")
    assert main(["bench", "packed", "--quick", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["bench", "rerank", "--quick", "--out", str(out)]) == 0
    assert "rerank table" in (out / "report.md").read_text() and (out / "notes.txt").read_text() == "mine"
    assert len(packed_calls) == 1 and len(rerank_calls) == 1


def test_pytest_benchmarks_without_the_plugin_names_the_extra_in_one_line():
    """`pytest benchmarks/` without pytest-benchmark (here: disabled) stops with a usage error naming the
    extra, not an INTERNALERROR about an unknown hook."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:benchmark", "-p", "no:xdist", "-q",
                          "benchmarks/bench_losses.py"], cwd=root, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 4 and "INTERNALERROR" not in out, out[-2000:]
    assert "pip install -e '.[bench]'" in out and "pytest-benchmark" in out
