"""Shared benchmark fixtures. Timings of every provider are kept for the session so that the fastrank
and torch.compile rows report their speedup over eager measured in the same run; the machine's ceilings
(sgemm, bf16 GEMM, copy and read bandwidth) are measured once per session, in the same process."""
import pytest
import torch

from fastrank.bench.suite import peak_memory  # noqa: F401 -- the benchmark files import it from here

_SESSION: dict = {}  # what pytest_benchmark_update_machine_info adds to the saved JSON


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_report_header(config):
    from fastrank.bench.machine import machine_info

    info = machine_info(_device())
    where = f"{info['gpu']} (host CPU {info['cpu']})" if "gpu" in info else info["cpu"]
    return [
        f"fastrank benchmarks on {where}: CPU ISA path {info['isa']} (available: {', '.join(info['isa_paths'])}), "
        f"{info['threads']} threads, torch {info['torch']}"
        + (f", maxsim-cpu {info['maxsim_cpu']}" if info["maxsim_cpu"] else ", maxsim-cpu not installed")
    ]


def _benchmarks_disabled(config) -> bool:
    return bool(config.getoption("benchmark_disable", False)) and not config.getoption("benchmark_enable", False)


@pytest.fixture(scope="session")
def device() -> str:
    return _device()


@pytest.fixture(scope="session")
def machine(device) -> dict:
    """CPU model, threads, torch and the CPU ISA path fastrank dispatches to (fastrank.bench.machine)."""
    from fastrank.bench.machine import machine_info

    _SESSION["fastrank_machine"] = info = machine_info(device)
    return info


@pytest.fixture(scope="session")
def ceilings(request, device):
    """The machine's ceilings, measured once before the first benchmark that asks; None under
    --benchmark-disable, where nothing is timed."""
    if _benchmarks_disabled(request.config):
        return None
    from fastrank.bench.machine import measure_ceilings

    _SESSION["fastrank_ceilings"] = measured = measure_ceilings(device)
    return measured


NO_PLUGIN = ("benchmarks/ needs pytest-benchmark, which is not installed (or was disabled with -p no:benchmark): "
             "pip install -e '.[bench]'; `fastrank bench all --quick` needs no plugin")


class _SavedMachineInfo:
    """Registered only beside pytest-benchmark, whose hook this is: without the plugin pytest would call the
    hook's name unknown and stop with an INTERNALERROR instead of saying what is missing."""

    @staticmethod
    def pytest_benchmark_update_machine_info(config, machine_info):
        """Saved benchmark JSON names the CPU, ISA path, threads and the ceilings measured in the run."""
        machine_info.update(_SESSION)


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError(NO_PLUGIN)
    config.pluginmanager.register(_SavedMachineInfo(), "fastrank-benchmark-machine-info")


def pytest_terminal_summary(terminalreporter):
    measured = _SESSION.get("fastrank_ceilings")
    if measured:
        terminalreporter.write_line(
            f"fastrank ceilings measured in this run ({measured['threads']} threads): sgemm {measured['sgemm_gflops']:.1f} "
            f"GFLOP/s, bf16 GEMM {measured['bf16_gemm_gflops']:.1f} GFLOP/s, copy {measured['copy_gbps']:.1f} GB/s, "
            f"read {measured['read_gbps']:.1f} GB/s"
        )


@pytest.fixture(scope="session")
def session_timings() -> dict:
    """(group, provider) -> median seconds, filled as benchmarks run (eager first in each group)."""
    return {}


def time_provider(benchmark, fn, device: str, max_rounds: int = 100):
    """Time ``fn`` (synchronised inside on CUDA) over about a second of rounds, sized from a one-call probe.
    The caller's correctness check has already run ``fn`` once (the warm-up). Returns the timed callable
    and the median seconds, or None under --benchmark-disable."""
    from fastrank.bench.timing import synchronize, time_call

    def timed():
        fn()
        synchronize(device)

    if benchmark.disabled:  # --benchmark-disable: pedantic runs ``timed`` once and records nothing
        benchmark.pedantic(timed, rounds=1, iterations=1)
        return timed, None
    per_call = time_call(timed, device, min_seconds=0.0, min_reps=1, warmup=False)
    rounds = max(3, min(max_rounds, int(1.0 / max(per_call, 1e-6))))
    # A call of half a second or more is warm after the check and the probe: no extra warm-up round.
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0 if per_call >= 0.5 else 1, iterations=1)
    return timed, (None if benchmark.stats is None else benchmark.stats.stats.median)


def record(benchmark, session_timings, group: str, provider: str, extra: dict) -> None:
    """Store this provider's median and put ratios against the providers already measured into extra_info."""
    median = benchmark.stats.stats.median
    session_timings[(group, provider)] = median
    benchmark.extra_info.update(extra)
    benchmark.extra_info["median_ms"] = median * 1e3
    for other in ("eager", "compile"):
        if other != provider and (group, other) in session_timings:
            benchmark.extra_info[f"speedup_vs_{other}"] = session_timings[(group, other)] / median
