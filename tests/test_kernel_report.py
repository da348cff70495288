"""Static GPU resource checks (issue 13): every Triton kernel the launchers launch is compiled for sm_90 and
checked against the hardware limits, with no GPU; the log parsers and the verdicts are checked on text and
rows written here; the command line's JSON keys are the issue's."""
import ast
import importlib
import inspect
import json
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastrank.bench import kernels as kr

triton = pytest.importorskip("triton")

ISSUE_KEYS = ["kernel", "dtype", "config", "registers", "spill_bytes", "shared_bytes"]

# Captured from ptxas 13 -v (Triton's bundled ptxas on a kernel's PTX) and nvcc 13 -Xptxas -v on
# csrc/cuda/maxsim.cu, cut down: an entry that spills, a device function with its own properties (not an
# entry: its spills must not be charged to anyone), an entry with static shared memory, mangled names.
MANGLED = ("_ZN8fastrank4cuda41_GLOBAL__N__ab6d5268_9_maxsim_cu_1fa47b35"
           "14forward_kernelI13__nv_bfloat16EEvNS0_10MaxSimArgsEPfPi")
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_lite_bwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _lite_bwd_kernel
    8 bytes stack frame, 1604 bytes spill stores, 1736 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 2310.518 ms
ptxas info    : Function properties for __internal_accurate_pow
    24 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function '{mangled}' for 'sm_90'
ptxas info    : Function properties for {mangled}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 25028 bytes smem
ptxas info    : Compiling entry function '_packed_bwd_dt_kernel' for 'sm_90a'
ptxas info    : Function properties for _packed_bwd_dt_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
""".format(mangled=MANGLED)


def test_ptxas_log_parser_reads_each_entry():
    entries = kr.parse_ptxas_log(PTXAS_LOG)
    mangled = MANGLED
    assert list(entries) == ["_lite_bwd_kernel", mangled, "_packed_bwd_dt_kernel"]
    assert entries["_lite_bwd_kernel"] == dict(arch="sm_90a", registers=255, smem_bytes=16, stack_bytes=8,
                                               spill_stores=1604, spill_loads=1736)
    assert entries[mangled] == dict(arch="sm_90", registers=56, smem_bytes=25028, stack_bytes=0, spill_stores=0,
                                    spill_loads=0)
    assert entries["_packed_bwd_dt_kernel"]["registers"] == 40 and entries["_packed_bwd_dt_kernel"]["smem_bytes"] == 0
    assert kr.parse_ptxas_log("ptxas info    : 0 bytes gmem\n") == {}


def test_cuda_names_keep_one_row_per_template_instantiation():
    name = kr._cuda_kernel_name
    assert name("void fastrank::cuda::(anonymous namespace)::backward_dq_kernel<float>(fastrank::cuda::MaxSimArgs, "
                "float const*, int const*, float*)") == ("backward_dq_kernel<float>", "fp32")
    assert name("void fastrank::cuda::(anonymous namespace)::distill_kernel<__nv_bfloat16, float>(int, int, long, "
                "long, float, __nv_bfloat16 const*)") == ("distill_kernel<__nv_bfloat16, float>", "bf16")
    assert name("void forward_kernel<__half>(Args)") == ("forward_kernel<__half>", "fp16")
    demangled = kr._demangle([MANGLED])
    if demangled[0].startswith("_Z"):
        pytest.skip("no c++filt or cu++filt here")
    assert name(demangled[0]) == ("forward_kernel<__nv_bfloat16>", "bf16")


def _row(**kw):
    row = dict(kernel="k", dtype="bf16", config="w4 s3", registers=128, spill_bytes=0, shared_bytes=1024, arch=90,
               direction="forward", module="m", spill_stores=0, spill_loads=0)
    row.update(kw)
    if "spill_bytes" in kw:
        row["spill_stores"], row["spill_loads"] = kw["spill_bytes"], 0
    return kr.judge(row)


def test_verdicts_follow_the_issue():
    assert kr.row_failures(_row(registers=255, shared_bytes=232448)) == []
    assert kr.row_failures(_row(arch=80, shared_bytes=166912)) == []
    assert kr.row_failures(_row(registers=256)) == ["256 registers > 255"]
    assert kr.row_failures(_row(shared_bytes=232449)) == ["232449 shared bytes > 232448"]
    assert kr.row_failures(_row(arch=80, shared_bytes=166913)) == ["166913 shared bytes > 166912"]
    # Spills: none allowed in any kernel, forward or backward, any dtype (issue 13 asks it of the forward
    # kernels and the bf16 backward ones; every kernel meets it now, so the rule holds all of them).
    assert kr.row_failures(_row(dtype="fp32", spill_bytes=8)) == ["spills 8 bytes (8 stored, 0 loaded)"]
    assert kr.row_failures(_row(direction="backward", spill_bytes=8))
    fp32_bwd = _row(dtype="fp32", direction="backward", spill_bytes=8)
    assert kr.row_failures(fp32_bwd) and fp32_bwd["spills_ok"] is False
    assert _row(dtype="fp16", direction="backward")["spills_ok"] is True
    broken = kr.judge(dict(kernel="k", dtype="fp32", config="", arch=90, direction="forward", module="m",
                           error="does not compile: boom"))
    assert kr.row_failures(broken) == ["does not compile: boom"] and broken["registers_ok"] is False
    assert list(broken)[:6] == ISSUE_KEYS


def test_autotuned_kernel_yields_one_variant_per_config():
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"BLOCK": 32}, num_warps=4, num_stages=2),
                              triton.Config({"BLOCK": 64}, num_warps=8, num_stages=3)], key=["n"])
    @triton.jit
    def add_one(X, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(X + offs, tl.load(X + offs, mask=offs < n) + 1, mask=offs < n)

    got = kr._expand(add_one, (None, 10), {})
    assert [(kw["BLOCK"], kw["num_warps"], kw["num_stages"]) for _, kw in got] == [(32, 4, 2), (64, 8, 3)]
    assert all(fn is kr.jit_of(add_one) for fn, _ in got)


def _launched_in_ops() -> set:
    """(module, kernel) for every ``name[grid](...)`` launch of a Triton kernel in any fastrank.ops module,
    found by reading the sources, so that a kernel added without coverage in kernel_report fails below."""
    import fastrank.ops
    from triton.runtime.jit import KernelInterface

    found = set()
    for info in pkgutil.iter_modules(fastrank.ops.__path__):
        module = importlib.import_module(f"fastrank.ops.{info.name}")
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and isinstance(node.func.value, ast.Name):
                if isinstance(getattr(module, node.func.value.id, None), KernelInterface):
                    found.add((info.name, node.func.value.id))
    return found


# Launched kernels that kernel_report does not cover yet, each with the reason; an entry must go as soon as
# kernel_report records the kernel (checked below). The residual MaxSim kernel (issue 24) was added while
# fastrank/bench/ was being edited in the same checkout by other work: its scenario (float32 queries only)
# is to be added to fastrank/bench/kernels.py's OPS_MODULES and scenarios there.
NOT_YET_REPORTED = {("maxsim_residual_triton", "_residual_fwd_kernel")}


def test_variants_cover_every_launched_kernel_dtype_and_autotune_config():
    launched = _launched_in_ops()
    assert {("maxsim", "_maxsim_fwd_kernel"), ("lite", "_lite_bwd_kernel")} <= launched, launched
    listed = kr.list_variants(90)
    covered = {(v["module"], v["kernel"]) for v in listed}
    assert not NOT_YET_REPORTED & covered, f"now reported, drop from NOT_YET_REPORTED: {NOT_YET_REPORTED & covered}"
    launched -= NOT_YET_REPORTED
    assert launched <= covered, f"launched but never recorded: {sorted(launched - covered)}"
    for module, kernel in launched:
        mine = [v for v in listed if (v["module"], v["kernel"]) == (module, kernel)]
        dtypes = {v["dtype"] for v in mine}
        assert {"fp32", "bf16", "fp16"} <= dtypes, (module, kernel, dtypes)
        obj = getattr(importlib.import_module(f"fastrank.ops.{module}"), kernel)
        prune = getattr(obj, "early_config_prune", None)
        for config in getattr(obj, "configs", []):  # an autotuner: every config it may pick is a variant
            for dtype in ("fp32", "bf16", "fp16"):
                # Configs the autotuner's early pruning drops at every recorded launch are never compiled on a
                # GPU either (kernel_report applies the same pruning); every other one must be recorded.
                launches = [v for v in mine if v["dtype"] == dtype]
                if prune and not any(config in prune(obj.configs, {}, **v["values"]) for v in launches):
                    continue
                assert any(v["dtype"] == dtype and all(v["values"].get(k) == x for k, x in config.kwargs.items())
                           and v["num_warps"] == (config.num_warps or v["num_warps"])
                           and v["num_stages"] == (config.num_stages or v["num_stages"]) for v in mine), \
                    f"{module}.{kernel} {dtype}: autotune config {config} was not recorded"
    assert {v["direction"] for v in listed} == {"forward", "backward"}


def test_every_kernel_dtype_and_autotune_config_fits_sm90():
    """Issue 13's assertions, compiled for sm_90: every variant compiles, registers <= 255, shared memory within
    the per-block limit, and no spills (in every kernel: the issue asks it of the forward kernels and the bf16
    backward ones).

    The suite compiles one variant per kernel, dtype, pass and autotune config, the one with every flag on
    (masks, stored argmax, atomics: the most code), plus every CUDA kernel: every variant of the representative
    shapes (``python -m fastrank.bench.kernels``, benchmarks/results/kernels_sm90.md) is a few times as many
    compiles, more than a cold CI run should spend."""
    rows = kr.collect(90, include_cuda=True, scope="quick")
    assert {r["module"] for r in rows} >= {"maxsim", "maxsim_packed_triton", "lite"}
    if shutil.which("nvcc"):  # every CUDA source compiled, none dropped for want of a path
        sources = {f"csrc/cuda/{p.name}" for p in (kr.ROOT / "csrc" / "cuda").glob("*.cu")}
        assert sources and {r["config"] for r in rows if r["config"].startswith("csrc/cuda/")} == sources
    failures = [f"{r['module']}.{r['kernel']} {r['dtype']} {r['direction']} [{r['config']}]: {'; '.join(problems)}"
                for r in rows if (problems := kr.row_failures(r))]
    assert not failures, f"{len(failures)} of {len(rows)} variants break the sm_90 limits:\n" + "\n".join(failures)


def test_cli_json_has_the_issue_keys(tmp_path):
    """``--json`` writes a list of objects whose first keys are the issue's, filled for a compiled kernel."""
    run = subprocess.run([sys.executable, "-m", "fastrank.bench.kernels", "--arch", "90", "--kernels",
                          "_packed_bwd_dt_kernel", "--no-cuda", "--json", "--out", str(tmp_path / "t")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode in (0, kr.LIMITS_BROKEN) and run.stdout.strip(), run.stderr[-3000:]
    rows = json.loads(run.stdout)
    assert rows and {r["dtype"] for r in rows} == {"fp32", "bf16", "fp16"}
    for row in rows:
        assert list(row)[:6] == ISSUE_KEYS, list(row)
        assert row["kernel"] == "_packed_bwd_dt_kernel" and row["error"] is None
        assert isinstance(row["registers"], int) and 0 < row["registers"] <= 255
        assert isinstance(row["spill_bytes"], int) and isinstance(row["shared_bytes"], int) and row["shared_bytes"] > 0
    table = (tmp_path / "t" / "report.md").read_text()
    assert json.loads((tmp_path / "t" / "results.json").read_text())["rows"] == rows
    assert table.startswith("# Kernel resources for sm_90 (static compile, no GPU)")
    assert "--kernels _packed_bwd_dt_kernel" in table and f"Triton {triton.__version__}" in table
    assert table.count("| _packed_bwd_dt_kernel |") == len(rows)


def test_bench_kernels_takes_the_reports_options():
    from fastrank.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "kernels", "--arch", "80", "--json", "--out", "k", "--quick"])
    assert (args.op, args.arch, args.json, args.out, args.quick, args.scope) == ("kernels", 80, "-", "k", True, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "kernels", "--arch", "75"])


def test_arch_specific_blocks_are_listed_per_arch():
    """Launchers that choose blocks per architecture ask pairs.cuda_arch, which the listing stands in for its
    arch: float32 MaxSim takes 32-wide H slices on sm_80 where sm_90 takes 64 (h_block_cap), and LITE's
    bf16 forward takes row and column blocks on sm_80 where sm_90 takes whole tiles."""
    listed = {arch: kr.list_variants(arch, kernels=["_maxsim_fwd_kernel", "_lite_fwd_kernel"]) for arch in (90, 80)}

    def blocks(arch, kernel, dtype, key):
        return {v["values"][key] for v in listed[arch] if v["kernel"] == kernel and v["dtype"] == dtype
                and v["values"].get("SPLIT_H", True)}

    assert blocks(90, "_maxsim_fwd_kernel", "fp32", "BLOCK_H") == {64}
    assert blocks(80, "_maxsim_fwd_kernel", "fp32", "BLOCK_H") == {32}
    assert blocks(80, "_maxsim_fwd_kernel", "bf16", "BLOCK_H") == {64}
    assert blocks(90, "_lite_fwd_kernel", "bf16", "BLOCK_ROWS") == {32}
    assert blocks(80, "_lite_fwd_kernel", "bf16", "BLOCK_ROWS") == {16}


def test_float32_backward_with_64_token_queries_fits_sm80():
    """On sm_80 ptxas kept the float32 dd and dtokens backward at 32 registers and spilled 8-9 KB with 64-token
    queries and 64-wide H slices; with 32-wide slices (h_block_cap) and, for dtokens, 32-row tiles they
    compile without spills."""
    rows = kr.collect(80, include_cuda=False, scope="full", kernels=["_maxsim_bwd_dd_kernel", "_packed_bwd_dt_kernel"])
    fp32_lq64 = [r for r in rows if r["dtype"] == "fp32" and "LQ64" in r["config"]]
    assert len(fp32_lq64) >= 2, [r["config"] for r in rows]
    bad = [f"{r['kernel']} [{r['config']}]: {kr.row_failures(r)}" for r in fp32_lq64 if kr.row_failures(r)]
    assert not bad, "\n".join(bad)


def test_the_report_compiles_this_checkouts_sources():
    """The module moved into fastrank/bench/: the checkout it compiles csrc/ from must still be the repository
    root (a path one level short found no .cu file and dropped every CUDA row without a failure)."""
    from fastrank.bench import machine

    root = Path(__file__).resolve().parent.parent
    assert kr.ROOT == machine.SOURCE_ROOT == root
    assert sorted((kr.ROOT / "csrc" / "cuda").glob("*.cu")) and (root / "pyproject.toml").is_file()
