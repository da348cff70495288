"""`fastrank bench all` and its sections (maxsim sweeps, lite, losses, index) on tiny shapes (the hidden
--tiny knob): the JSON keys, the exponent fit, report.md and its PNGs (and the one line that replaces them
without matplotlib), and that a provider whose output is wrong is refused before it is timed. Nothing here
measures speed: figures from --tiny mean nothing, and no test asserts a timing or a ratio."""
import json
import sys

import pytest
import torch

from fastrank.bench import all as bench_all, losses as bench_losses, machine, report as bench_report, suite as bench_suite
from fastrank.bench.suite import Settings, Shape, fit_exponent, scaling_fits
from fastrank.cli import main

ROW_KEYS = {"op", "provider", "shape", "dtype", "docs_per_s", "ratio_to_eager", "peak_mem_bytes", "ceiling_fraction",
            "machine"}
TINY = Settings(device="cpu", tiny=True, min_seconds=0.0, progress=False)


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    """One tiny `bench all` through the CLI, shared by the tests that read its output."""
    path = tmp_path_factory.mktemp("bench") / "all.json"
    # index runs in its own subcommand's test (faiss): left out here to keep the suite short
    assert main(["bench", "all", "--tiny", "--device", "cpu", "--sections", "maxsim,lite,losses", "--json", str(path)]) == 0
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- scaling fit

def test_fit_exponent_recovers_power_laws():
    work = [100, 300, 1000, 3000, 20000]
    for b in (0.5, 1.0, 1.7):
        assert fit_exponent(work, [2e-5 * w ** b for w in work]) == pytest.approx(b, abs=1e-9)
    # a fixed cost plus a linear one: the fit sits between 0 and 1 (cost amortised at small sizes)
    mixed = fit_exponent(work, [1e-3 + 1e-6 * w for w in work])
    assert 0.0 < mixed < 1.0


def test_fit_exponent_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="two distinct"):
        fit_exponent([100, 100], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        fit_exponent([100, 0], [1.0, 2.0])
    with pytest.raises(ValueError, match="length"):
        fit_exponent([100, 200], [1.0])


def test_scaling_fits_one_per_provider_and_sweep():
    def row(provider, work, seconds, sweep="docs"):
        return {"op": "maxsim", "sweep": sweep, "dtype": "float32", "provider": provider, "work": work, "seconds": seconds}

    rows = [row("eager", w, 1e-6 * w ** 1.2) for w in (10, 100, 1000)]
    rows += [row("fastrank", w, 1e-6 * w ** 0.9) for w in (10, 100, 1000)]
    rows += [row("eager", 8, 1.0, sweep="Ld")]  # one point: nothing to fit
    rows += [{**row("fastrank", 5, 1.0), "sweep": None}]  # not part of a sweep
    fits = {(f["sweep"], f["provider"]): f for f in scaling_fits(rows)}
    assert set(fits) == {("docs", "eager"), ("docs", "fastrank")}
    assert fits[("docs", "eager")]["exponent"] == pytest.approx(1.2)
    assert fits[("docs", "fastrank")]["exponent"] == pytest.approx(0.9)
    assert (fits[("docs", "eager")]["work_min"], fits[("docs", "eager")]["work_max"], fits[("docs", "eager")]["points"]) \
        == (10, 1000, 3)


# ------------------------------------------------------------------------------------------- refusing

def test_wrong_provider_is_refused_before_timing():
    x = torch.randn(50, generator=torch.Generator().manual_seed(3))
    calls = {"eager": 0, "wrong": 0, "raises": 0}

    def counted(name, fn):
        def call():
            calls[name] += 1
            return fn()
        return call

    fns = {"eager": counted("eager", lambda: x * 2), "wrong": counted("wrong", lambda: x * 2 + 1e-2),
           "raises": counted("raises", lambda: 1 / 0)}
    shape = Shape("toy", "x2", "float32", items=50, flops=50.0, bytes=200.0, ceiling="sgemm_gflops")
    rows = {r["provider"]: r for r in bench_suite.measure(shape, fns, lambda: x * 2, torch.testing.assert_close,
                                                           TINY, TINY.probes())}
    assert calls["wrong"] == 1 and calls["raises"] == 1  # the check, and never again
    assert calls["eager"] > 1  # checked, then timed
    assert "Mismatched elements" in rows["wrong"]["refused"] or "not close" in rows["wrong"]["refused"]
    assert rows["raises"]["refused"].startswith("ZeroDivisionError")
    for name in ("wrong", "raises"):
        assert rows[name]["docs_per_s"] is None and rows[name]["ratio_to_eager"] is None
    assert rows["eager"]["refused"] is None and rows["eager"]["docs_per_s"] > 0
    assert rows["eager"]["ratio_to_eager"] == 1.0 and rows["eager"]["ceiling_fraction"] > 0


def test_cli_refuses_a_wrong_fastrank_loss_and_exits_1(monkeypatch, capsys, tmp_path):
    real = bench_losses.loss_fn

    def injected(provider, name):
        fn = real(provider, name)
        if provider != "fastrank":
            return fn
        return lambda s, t: fn(s, t) * 1.01  # 1% off: a bug a timing table would otherwise hide

    monkeypatch.setattr(bench_losses, "loss_fn", injected)
    out = tmp_path / "losses.json"
    assert main(["bench", "losses", "--tiny", "--device", "cpu", "--json", str(out)]) == 1
    assert "REFUSED" in capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    fastrank = [r for r in rows if r["provider"] == "fastrank"]
    assert fastrank and all(r["refused"] and r["docs_per_s"] is None for r in fastrank)
    assert all(r["refused"] is None and r["docs_per_s"] > 0 for r in rows if r["provider"] == "eager")


# ------------------------------------------------------------------------------------------- JSON and sections

def test_every_row_has_the_issue_keys_and_the_machine(tiny_result):
    rows = tiny_result["rows"]
    assert {r["op"] for r in rows} >= {"maxsim", "lite", "losses"}
    for r in rows:
        assert ROW_KEYS <= set(r), set(ROW_KEYS) - set(r)
        assert r["machine"]["cpu"] == machine.cpu_model() and r["machine"]["isa"] == machine.selected_isa()
        assert r["refused"] is None and r["docs_per_s"] > 0 and r["ratio_to_eager"] > 0
        assert r["peak_mem_bytes"] is None  # CPU: torch keeps no allocator statistics
    assert tiny_result["machine"]["triton"] == machine.package_version("triton")
    assert tiny_result["command"].startswith("fastrank bench all --device cpu --json ")
    assert "--sections maxsim,lite,losses" in tiny_result["command"]
    assert " --tiny" in tiny_result["command"]
    units = {r["op"]: r["unit"] for r in rows}
    assert units["maxsim"] == "docs/s" and units["lite"] == "pairs/s" and units["losses"] == "queries/s"


def test_sections_cover_their_providers_and_sweeps(tiny_result):
    rows = tiny_result["rows"]
    maxsim = {r["provider"] for r in rows if r["op"] == "maxsim" and r["sweep"] is None}
    assert {"eager", "einsum", "fastrank"} <= maxsim
    assert {f"fastrank:{i}" for i in machine.isa_paths() if i != "scalar"} <= maxsim
    assert {r["provider"] for r in rows if r["op"] == "losses"} == {"eager", "fastrank"}
    lite = {r["provider"] for r in rows if r["op"] == "lite"}
    assert lite == {"eager", "fastrank"}  # the C++ kernels, forced
    assert any("C++ LITE kernels" in n for n in tiny_result["notes"])
    fits = {(f["op"], f["sweep"].split(" ")[0], f["provider"]) for f in tiny_result["fits"]}
    assert {("maxsim", "docs", "fastrank"), ("maxsim", "Ld", "eager"), ("lite", "batch", "eager"),
            ("losses", "B", "fastrank")} <= fits
    # forward rows are held to a ceiling; the forward+backward row is not
    fwd = [r for r in rows if r["op"] == "maxsim" and "bwd" not in r["shape"]]
    assert all(r["ceiling_fraction"] is not None for r in fwd)
    assert all(r["ceiling_fraction"] is None for r in rows if "bwd" in r["shape"])


@pytest.mark.parametrize("op", ["lite", "losses", "index"])
def test_each_subcommand_prints_json_to_stdout(op, capsys):
    if op == "index":
        pytest.importorskip("faiss")
    assert main(["bench", op, "--tiny", "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {r["op"] for r in res["rows"]} == {op}
    assert all(ROW_KEYS <= set(r) and r["refused"] is None and r["docs_per_s"] > 0 for r in res["rows"])
    if op == "index":  # fastrank against raw FAISS on the same index, the flat corpus swept
        assert {r["provider"] for r in res["rows"]} == {"faiss", "fastrank"}
        assert all(r["eager_provider"] == "faiss" for r in res["rows"])
        assert {(f["sweep"].split(" ")[0], f["provider"]) for f in res["fits"]} == {("corpus", "faiss"), ("corpus", "fastrank")}


def test_maxsim_out_runs_the_sweeps_and_writes_the_report(tmp_path, monkeypatch, capsys):
    from fastrank.bench import maxsim as bench

    monkeypatch.setattr(bench, "default_providers", lambda device, compile=False, isas=None: ["eager", "fastrank"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # figures are test_report_md_and_pngs's; tables here
    out = tmp_path / "maxsim"
    assert main(["bench", "maxsim", "--tiny", "--device", "cpu", "--dtype", "float32", "--out", str(out),
                 "--ceiling-seconds", "0.01"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {r["op"] for r in res["rows"]} == {"maxsim"} and {r["dtype"] for r in res["rows"]} == {"float32"}
    assert {r["provider"] for r in res["rows"]} == {"eager", "fastrank"}
    assert {f["sweep"].split(" ")[0] for f in res["fits"]} == {"docs", "Ld"}
    assert "## maxsim" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["bench", "maxsim", "--tiny", "--out", str(out), "--providers", "eager"]) == 2
    assert "fastrank bench: error: --out runs every provider" in capsys.readouterr().err


def test_bad_options_name_the_option(capsys):
    """One line with the command's error prefix and argparse's exit status 2, as every other command gives."""
    cases = [(["losses", "--device", "cpu", "--dtype", "float8"], "--dtype"),
             (["all", "--device", "cpu", "--sections", "maxsim,nope"], "--sections"),
             (["all", "--device", "cpu", "--include", "everything"], "--include")]
    if not torch.cuda.is_available():
        cases.append((["lite", "--device", "cuda"], "--device cuda"))
    for argv, name in cases:
        assert main(["bench", *argv, "--tiny"]) == 2
        assert capsys.readouterr().err.startswith(f"fastrank bench: error: {name}")


def test_dtype_that_a_section_lacks_is_a_note_not_a_silent_gap(capsys):
    assert main(["bench", "losses", "--tiny", "--device", "cpu", "--dtype", "bfloat16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["rows"] == [] and "float32 only" in res["notes"][0]


def test_kernels_subcommand_is_kernel_reports_or_says_why_not(monkeypatch, capsys):
    import fastrank.bench
    from fastrank.cli import build_parser

    args = build_parser().parse_args(["bench", "kernels", "--scope", "quick"])  # the report's own options
    assert args.scope == "quick" and args.arch is None and not args.quick
    monkeypatch.delattr(fastrank.bench, "kernels", raising=False)
    monkeypatch.setitem(sys.modules, "fastrank.bench.kernels", None)  # a build without it
    assert main(["bench", "kernels"]) == 2
    assert "fastrank.bench.kernels" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- report

def test_report_md_and_pngs(tiny_result, tmp_path):
    pytest.importorskip("matplotlib")
    # one op keeps the drawing short: maxsim's two sweeps, its speedups and the roofline
    tiny_result = {**tiny_result, "rows": [r for r in tiny_result["rows"] if r["op"] == "maxsim"]}
    report, notice = bench_report.write(tiny_result, tmp_path)
    assert notice is None
    text = report.read_text()
    for line in bench_report.machine_lines(tiny_result)[:3]:
        assert line in text  # machine and command head the report
    assert "## maxsim" in text and "![maxsim](speedup_maxsim.png)" in text
    assert "## Scaling" in text and "![roofline](roofline.png)" in text
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "roofline.png" in pngs and any(p.startswith("scaling_maxsim_") for p in pngs)
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in text  # every picture is linked from the report
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(tiny_result["rows"])


def test_without_matplotlib_tables_only_and_one_line(tiny_result, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    report, notice = bench_report.write(tiny_result, tmp_path)
    assert notice == bench_report.NO_MATPLOTLIB
    text = report.read_text()
    assert text.count(bench_report.NO_MATPLOTLIB) == 1 and "![" not in text and "## maxsim" in text
    assert not list(tmp_path.glob("*.png"))
    # through the CLI the notice is one line on stderr
    res = bench_all.run_sections(["losses"], TINY, "fastrank bench losses --tiny")
    assert bench_all.emit(res, str(tmp_path / "cli"), None) == 0
    err = capsys.readouterr().err
    assert err.count(bench_report.NO_MATPLOTLIB) == 1


def test_packed_and_rerank_take_the_shared_options(monkeypatch, capsys, tmp_path):
    """`bench packed` and `bench rerank` take --quick and --out like the other subcommands (packed also
    --dtype and --device), with their own real-data workloads: checked here with the workloads stubbed."""
    from fastrank.bench import packed as bench_packed, rerank as bench_rerank

    for argv, pattern in ((["bench", "packed", "--device", "cuda"], "--device cuda: bench packed times"),
                          (["bench", "packed", "--dtype", "int4"], "--dtype: expected a comma-separated subset"),
                          (["bench", "packed", "--dims", "x"], "--dims: expected positive integers")):
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith(f"fastrank bench: error: {pattern}")
    calls = []

    def fake_packed(dims, **kwargs):
        calls.append((tuple(dims), kwargs["min_seconds"]))
        rows = [{"provider": p} for p in ("eager (padded)", "padded", "packed float32", "packed int8", "packed int8 exact")]
        return {"cases": [{"H": dims[0], "rows": rows}]}

    monkeypatch.setattr(bench_packed, "run", fake_packed)
    monkeypatch.setattr(bench_packed, "format_report",
                        lambda res: "providers: " + ",".join(r["provider"] for r in res["cases"][0]["rows"]))
    assert main(["bench", "packed", "--quick", "--dtype", "int8", "--out", str(tmp_path / "p")]) == 0
    assert calls == [((128,), 0.3)]
    report = (tmp_path / "p" / "report.md").read_text()
    assert "providers: eager (padded),padded,packed int8,packed int8 exact" in report and "--quick" in report
    assert json.loads((tmp_path / "p" / "results.json").read_text())["cases"][0]["H"] == 128

    seen = {}

    def fake_rerank(data, model, **kwargs):
        seen.update(kwargs)
        return {"runs": {}, "rows": []}

    monkeypatch.setattr(bench_rerank, "run_bench", fake_rerank)
    monkeypatch.setattr(bench_rerank, "format_report", lambda res: "rerank table")
    assert main(["bench", "rerank", "--quick", "--out", str(tmp_path / "r")]) == 0
    assert (seen["max_queries"], seen["rounds"]) == (10, 1)
    assert "rerank table" in (tmp_path / "r" / "report.md").read_text()
