"""The MaxSim benchmark machinery (fastrank.bench, fastrank.machine) on tiny shapes: which providers this
machine has, that each agrees with maxsim_ref, the ceiling arithmetic, and that the report names the
machine. Nothing here measures speed."""
import json

import pytest
import torch

from fastrank.bench import machine, maxsim as bench
from fastrank.bench.maxsim import MaxSimCase

TINY = [
    MaxSimCase("tiny rerank", "rerank", 1, 4, lq=7, ld=9, h=16),
    MaxSimCase("tiny rerank", "rerank", 1, 4, lq=7, ld=9, h=16, dtype=torch.bfloat16),
    MaxSimCase("tiny rerank", "rerank", 1, 4, lq=7, ld=9, h=16, dtype=torch.float16),
    MaxSimCase("tiny grouped", "grouped", 3, 4, lq=7, ld=9, h=16),
    MaxSimCase("tiny train", "grouped", 3, 4, lq=7, ld=9, h=16, backward=True),
    MaxSimCase("tiny in-batch", "allpairs", 3, 3, lq=7, ld=9, h=16, backward=True),
]
TINY_CEILINGS = dict(seconds=0.02, gemm_n=64, copy_mb=1, read_mb=1)


def _all_cpu_providers():
    """Every provider the CLI can run here, scalar included (compile left out: Inductor needs minutes)."""
    return bench.default_providers("cpu", isas=machine.isa_paths())


def test_provider_list_for_this_machine():
    providers = bench.default_providers("cpu")
    assert providers[:3] == list(bench.EAGER_PROVIDERS)
    assert "fastrank" in providers and "compile" not in providers
    assert "compile" in bench.default_providers("cpu", compile=True)
    isas = [p[len(bench.ISA_PREFIX):] for p in providers if p.startswith(bench.ISA_PREFIX)]
    assert isas == [i for i in machine.isa_paths() if i != "scalar"]
    assert ("maxsim-cpu" in providers) == bench.maxsim_cpu_installed()
    assert set(machine.isa_paths()) <= {"amx", "avx512bf16", "avx512", "avx2", "scalar"}
    assert machine.selected_isa() in machine.isa_paths() + ["scalar"]


def test_skip_reasons():
    fp32, bf16, train = TINY[0], TINY[1], TINY[4]
    assert bench.skip_reason("eager_fp32", fp32, "cpu") is not None
    assert bench.skip_reason("eager_fp32", bf16, "cpu") is None
    assert bench.skip_reason("maxsim-cpu", bf16, "cpu") is not None
    assert bench.skip_reason("maxsim-cpu", train, "cpu") is not None
    assert "H > 128" in bench.skip_reason("maxsim-cpu", MaxSimCase("wide", "rerank", 1, 4, h=768), "cpu")
    assert bench.skip_reason("fastrank:avx2", fp32, "cuda") is not None
    assert "maxsim-cpu" not in bench.case_providers(train, ["eager", "maxsim-cpu"], "cpu")


@pytest.mark.parametrize("case", TINY, ids=lambda c: f"{c.name}-{c.dtype_name}".replace(" ", "_"))
def test_every_provider_agrees_with_reference(case):
    inputs = case.make("cpu", seed=1)
    reference = bench.provider_fn("reference", case, inputs)()
    providers = bench.case_providers(case, _all_cpu_providers(), "cpu")
    assert "eager" in providers and "fastrank" in providers
    for provider in providers:
        bench.check(bench.provider_fn(provider, case, inputs)(), reference, case.dtype)


def test_eager_forms_honour_query_mask():
    case = MaxSimCase("tiny grouped", "grouped", 3, 4, lq=7, ld=9, h=16)
    q, d, _, d_mask = case.make("cpu", seed=2)
    q_mask = torch.rand(q.shape[:-1], generator=torch.Generator().manual_seed(0)) > 0.3
    ref = bench.maxsim_ref(q, d, q_mask, d_mask)
    bench.check(bench.maxsim_eager(q, d, q_mask, d_mask), ref, torch.float32)
    bench.check(bench.maxsim_einsum(q, d, q_mask, d_mask, form="grouped"), ref, torch.float32)


def test_check_catches_an_empty_document():
    """The eager form scores a document with no valid token -inf (the reference: 0); `check` must say so."""
    case = TINY[0]
    q, d, q_mask, d_mask = case.make("cpu")
    d_mask = d_mask.clone()
    d_mask[1] = False
    inputs = (q, d, q_mask, d_mask)
    with pytest.raises(AssertionError):
        bench.check(bench.provider_fn("eager", case, inputs)(), bench.provider_fn("reference", case, inputs)(),
                    case.dtype)


def test_ceilings_are_measured_and_positive():
    ceilings = machine.measure_ceilings("cpu", **TINY_CEILINGS)
    for key in ("sgemm_gflops", "bf16_gemm_gflops", "copy_gbps", "read_gbps", "fma_peak_gflops"):
        assert ceilings[key] > 0, key
    assert ceilings["threads"] == torch.get_num_threads()
    assert ceilings["peak_isa"] == machine.selected_isa()
    # A bf16 dot peak exactly where the path has vdpbf16ps.
    assert (ceilings["bf16_dot_peak_gflops"] is not None) == (machine.selected_isa() in ("avx512bf16", "amx"))
    # A tile peak exactly on the amx path.
    assert (ceilings["amx_tile_peak_gflops"] is not None) == (machine.selected_isa() == "amx")


# Operations one round of each unit's peak loop does on one thread: accumulators x lanes x 2 (a multiply-add),
# and for vdpbf16ps x 4 (two products and their sums a lane).
PEAK_FLOP_PER_ROUND = {"scalar": 8 * 2, "avx2": 12 * 8 * 2, "avx512": 16 * 16 * 2, "avx512bf16": 16 * 16 * 2,
                       "amx": 16 * 16 * 2}


@pytest.mark.parametrize("isa", [p for p in machine.isa_paths()])
def test_peak_probe_counts_the_work_of_its_path(isa):
    ext = pytest.importorskip("fastrank._C")
    for threads in (1, 2):
        assert ext.cpu_peak_flop(isa, "fma", 1000, threads) == PEAK_FLOP_PER_ROUND[isa] * 1000 * threads
        bf16 = 16 * 16 * 4 * 1000 * threads if isa in ("avx512bf16", "amx") else 0
        assert ext.cpu_peak_flop(isa, "bf16_dot", 1000, threads) == bf16
        # six tiles of 16 x 16 x 32 multiply-adds a round
        tiles = 2 * 16 * 16 * 32 * 6 * 1000 * threads if isa == "amx" else 0
        assert ext.cpu_peak_flop(isa, "amx_tile", 1000, threads) == tiles


def test_peak_probe_rejects_bad_arguments():
    ext = pytest.importorskip("fastrank._C")
    isa = machine.selected_isa()
    for args, message in [(("avx9", "fma", 10, 1), "unknown CPU ISA path|avx9"),
                          ((isa, "fp8", 10, 1), r"kind must be 'fma', 'bf16_dot' or 'amx_tile', got 'fp8'"),
                          ((isa, "fma", 0, 1), r"iters must be in \[1, 2\^40\], got 0"),
                          ((isa, "fma", 10, 0), r"threads must be in \[1, 4096\], got 0")]:
        with pytest.raises(ValueError, match=message):
            ext.cpu_peak_flop(*args)


def test_peak_probes_follow_the_forced_path(monkeypatch):
    from fastrank import cpu_isa

    if "avx2" not in machine.isa_paths():
        pytest.skip("this CPU has no avx2 path")
    with cpu_isa.use("avx2"):
        probes = machine.peak_probes("cpu", seconds=0.001)
        assert set(probes) == {"fma_peak_gflops"}  # AVX2 has no bfloat16 dot product
        fn, flop = probes["fma_peak_gflops"]
        assert fn() == flop and flop % (PEAK_FLOP_PER_ROUND["avx2"] * torch.get_num_threads()) == 0
    assert machine.peak_probes("cuda") == {} and machine.peak_probes("meta") == {}


def test_peak_fraction_uses_the_peak_of_what_the_row_computes_in():
    ceilings = {"fma_peak_gflops": 2.0, "bf16_dot_peak_gflops": 8.0}
    assert machine.peak_for("sgemm_gflops", ceilings) == 2.0
    assert machine.peak_for("bf16_gemm_gflops", ceilings) == 8.0
    assert machine.peak_for("bf16_gemm_gflops", {"fma_peak_gflops": 2.0, "bf16_dot_peak_gflops": None}) == 2.0
    assert machine.peak_for("read_gbps", ceilings) is None and machine.peak_for("sgemm_gflops", {}) is None
    assert machine.peak_text({**ceilings, "peak_isa": "avx512bf16"}) == (
        ", FMA peak 2.0 GFLOP/s (avx512bf16 path), bf16 dot peak 8.0 GFLOP/s")
    assert machine.peak_text({"fma_peak_gflops": None}) == ""
    # On the amx path bfloat16 GEMM rows are bounded by the tiles; a row forced to avx512bf16 by vdpbf16ps.
    tiles = {**ceilings, "amx_tile_peak_gflops": 32.0, "peak_isa": "amx"}
    assert machine.peak_for("bf16_gemm_gflops", tiles) == 32.0
    assert machine.peak_for("bf16_gemm_gflops", tiles, "avx512bf16") == 8.0
    assert machine.peak_for("sgemm_gflops", tiles) == 2.0
    assert machine.peak_text(tiles) == (
        ", FMA peak 2.0 GFLOP/s (amx path), bf16 dot peak 8.0 GFLOP/s, AMX tile peak 32.0 GFLOP/s")


def test_ceiling_arithmetic():
    case = MaxSimCase("rerank", "rerank", 1, 10, lq=4, ld=8, h=16, dtype=torch.bfloat16)
    q, d, _, _ = case.make("cpu")
    d_mask = torch.zeros(10, 8, dtype=torch.bool)
    d_mask[:, :5] = True  # 50 valid doc tokens
    work = bench.case_work(case, (q, d, None, d_mask))
    assert work["flops"] == 2 * 4 * 50 * 16
    assert work["d_valid_bytes"] == 50 * 16 * 2
    ceilings = {"sgemm_gflops": 1e-6, "bf16_gemm_gflops": 4e-6, "read_gbps": 1e-6, "copy_gbps": 1.0}
    # 6,400 FLOP at 1,000 FLOP/s = 6.4 s (at the AMX rate 1.6 s); 1,600 bytes at 1,000 B/s = 1.6 s
    avx = bench.ceiling_metrics(case, work, 12.8, "avx512bf16", ceilings)
    assert avx["floor_ms"] == pytest.approx(6400.0) and avx["floor_ratio"] == pytest.approx(2.0)
    assert avx["sgemm_fraction"] == pytest.approx(0.5)
    amx = bench.ceiling_metrics(case, work, 3.2, "amx", ceilings)
    assert amx["floor_ms"] == pytest.approx(1600.0) and amx["floor_ratio"] == pytest.approx(2.0)
    assert bench.ceiling_metrics(TINY[4], work, 1.0, "amx", ceilings)["floor_ratio"] is None
    assert avx["peak_fraction"] is None  # no peak measured
    # 6,400 FLOP in 12.8 s = 500 FLOP/s: a quarter of a 2,000 FLOP/s bf16 dot peak on the avx512bf16 path,
    # half of a 1,000 FLOP/s FMA peak on the avx512 path (no vdpbf16ps there).
    peaks = {**ceilings, "fma_peak_gflops": 1e-6, "bf16_dot_peak_gflops": 2e-6}
    assert bench.ceiling_metrics(case, work, 12.8, "avx512bf16", peaks)["peak_fraction"] == pytest.approx(0.25)
    assert bench.ceiling_metrics(case, work, 12.8, "avx512", peaks)["peak_fraction"] == pytest.approx(0.5)

    allpairs = MaxSimCase("in-batch", "allpairs", 3, 3, lq=4, ld=8, h=16)
    inputs = allpairs.make("cpu")
    assert bench.case_work(allpairs, inputs)["flops"] == 2 * 4 * int(inputs[3].sum()) * 3 * 16


def test_targets():
    fp32 = MaxSimCase("rerank", "rerank", 1, 1000)
    row = {"vs_fastest_eager": 2.0, "sgemm_fraction": 0.8}
    assert bench.target_verdict(fp32, "fastrank:avx512", row) == "met"
    assert bench.target_verdict(fp32, "eager", row) == ""
    assert "sgemm" in bench.target_verdict(fp32, "fastrank", {"vs_fastest_eager": 2.0, "sgemm_fraction": 0.5})
    bf16 = MaxSimCase("rerank", "rerank", 1, 1000, dtype=torch.bfloat16)
    assert "3x" in bench.target_verdict(bf16, "fastrank", {"vs_fastest_eager": 2.0, "floor_ratio": 1.2})
    assert "floor" in bench.target_verdict(bf16, "fastrank", {"vs_fastest_eager": 4.0, "floor_ratio": 1.6})
    assert bench.target_verdict(MaxSimCase("t", "rerank", 1, 10, targeted=False), "fastrank", row) == ""


def test_cases_and_quick():
    cases = bench.cpu_cases()
    names = {(c.name, c.dtype_name) for c in cases}
    for docs in (1000, 10000):
        for h in (128, 768):
            assert {(f"rerank 1x{docs} H={h}", "float32"), (f"rerank 1x{docs} H={h}", "bfloat16")} <= names
    assert ("rerank 1x1000 H=128", "float16") in names
    assert any(c.backward and c.form == "grouped" for c in cases) and any(c.form == "allpairs" for c in cases)
    assert all(c.docs == 1000 and c.form == "rerank" for c in bench.select_cases(cases, quick=True))
    assert [c.name for c in bench.select_cases(cases, names="1x10 H")] == ["rerank 1x10 H=128"]


def test_report_names_machine_and_isa():
    info = machine.machine_info("cpu")
    ceilings = machine.measure_ceilings("cpu", **TINY_CEILINGS)
    rows = bench.run_maxsim([TINY[0], TINY[4]], "cpu", ["eager", "einsum", "fastrank"], progress=False,
                            ceilings=ceilings, min_seconds=0.0)
    assert {r["provider"] for r in rows} == {"eager", "einsum", "fastrank"}
    assert all(r["vs_fastest_eager"] is not None and r["ms"] > 0 for r in rows)
    assert rows[0]["sgemm_fraction"] is not None and rows[-1]["floor_ratio"] is None  # fwd+bwd: no ceiling
    report = bench.format_report(info, ceilings, rows)
    assert machine.cpu_model() in report
    assert f"ISA path: {machine.selected_isa()}" in report
    assert f"{torch.get_num_threads()} torch threads" in report and "sgemm" in report


def test_cli_writes_machine_ceilings_and_rows(tmp_path, monkeypatch, capsys):
    from fastrank.cli import main

    measure = machine.measure_ceilings
    monkeypatch.setattr(machine, "measure_ceilings", lambda device, seconds: measure(device, **TINY_CEILINGS))
    monkeypatch.setattr(bench, "time_interleaved", lambda fns, device, **kw: dict.fromkeys(fns, 1e-3))  # plumbing, not timing
    out = tmp_path / "maxsim.json"
    assert main(["bench", "maxsim", "--device", "cpu", "--cases", "1x10 H", "--providers", "eager,fastrank",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert machine.cpu_model() in printed and "rerank 1x10 H=128" in printed
    saved = json.loads(out.read_text())
    assert saved["machine"]["isa"] == machine.selected_isa()
    assert saved["ceilings"]["sgemm_gflops"] > 0
    assert [r["provider"] for r in saved["rows"]] == ["eager", "fastrank"]


def test_cli_rejects_unknown_isa_and_provider(capsys):
    from fastrank.cli import main

    assert main(["bench", "maxsim", "--device", "cpu", "--isa", "sve2"]) == 2
    assert capsys.readouterr().err.startswith("fastrank bench: error: --isa")
    assert main(["bench", "maxsim", "--device", "cpu", "--providers", "eager,nope"]) == 2
    assert capsys.readouterr().err.startswith("fastrank bench: error: --providers")


def test_lite_bf16_rows_are_held_to_the_rate_of_what_the_path_computes_in():
    """bfloat16 LITE rows are measured against the bf16 GEMM rate only where the CPU kernel computes in
    bfloat16 (AVX512-BF16); a path that widens to float32 is bounded by sgemm (torch's emulated bf16 GEMM
    there ran at 0.4 GFLOP/s and made a 4,480% "of ceiling")."""
    from fastrank import cpu_isa
    from fastrank.bench.lite import LiteCase, _ceiling
    from fastrank.ops import lite_cpu

    bf16, fp32 = (LiteCase("r", "rerank", 1, 4, 16, dt) for dt in (torch.bfloat16, torch.float32))
    assert _ceiling(fp32, "cpu") == "sgemm_gflops" and _ceiling(bf16, "cuda") == "bf16_gemm_gflops"
    for isa in cpu_isa.available():
        with cpu_isa.use(isa):
            native = lite_cpu.uses_bf16_dot(torch.bfloat16, isa)
            assert _ceiling(bf16, "cpu") == ("bf16_gemm_gflops" if native else "sgemm_gflops"), isa


def _fake_timings(monkeypatch, f32_seconds: float, bf16_seconds: float) -> None:
    from fastrank.bench import timing

    calls = iter([f32_seconds, bf16_seconds])
    monkeypatch.setattr(timing, "time_call", lambda *a, **k: next(calls))


def test_bf16_probe_shrinks_where_bfloat16_gemm_is_emulated(monkeypatch):
    # 400x slower than float32 (torch's emulation on a CPU without a bfloat16 GEMM): the cube root is ~7.4,
    # so a 1024 probe becomes 128, a call that costs about what the float32 one does.
    _fake_timings(monkeypatch, 1.0, 400.0)
    assert machine.bf16_gemm_n("cpu", 1024) == 128
    _fake_timings(monkeypatch, 1.0, 1e9)
    assert machine.bf16_gemm_n("cpu", 1024) == 64  # never below 64


def test_bf16_probe_keeps_its_size_where_bfloat16_gemm_is_native(monkeypatch):
    _fake_timings(monkeypatch, 1.0, 0.5)
    assert machine.bf16_gemm_n("cpu", 1024) == 1024
    assert machine.bf16_gemm_n("cuda", 1024) == 1024
    assert machine.bf16_gemm_n("cpu", 64) == 64


def test_report_names_a_shrunk_bf16_probe():
    from fastrank.bench import report

    c = {"sgemm_gflops": 150.0, "bf16_gemm_gflops": 2.5, "copy_gbps": 30.0, "read_gbps": 30.0, "gemm_n": 2048,
         "bf16_gemm_n": 512}
    m = {"cpu": "x", "isa": "avx2", "isa_paths": ["avx2"], "threads": 2, "logical_cpus": 2, "torch": "t",
         "python": "p", "device": "cpu"}
    lines = "\n".join(report.machine_lines({"machine": m, "command": "c", "ceilings": c}))
    assert "bf16 GEMM 2.5 GFLOP/s (no native bfloat16 GEMM: measured at n=512)" in lines
