"""Shared benchmark fixtures. Timings of every provider are kept for the session so that the fastrank
and torch.compile rows report their speedup over eager measured in the same run."""
import pytest
import torch


def pytest_report_header(config):
    from fastrank.bench import device_name

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [f"fastrank benchmarks on {device_name(device)}, torch {torch.__version__}"]


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def session_timings() -> dict:
    """(group, provider) -> median seconds, filled as benchmarks run (eager first in each group)."""
    return {}


def time_provider(benchmark, fn, device: str, max_rounds: int = 100):
    """Time ``fn`` (synchronised inside on CUDA) over about a second of rounds, sized from a short probe.
    Returns the timed callable and the median seconds, or None under --benchmark-disable."""
    from fastrank.bench import synchronize, time_call

    def timed():
        fn()
        synchronize(device)

    per_call = time_call(timed, device, min_seconds=0.0, max_reps=3)
    rounds = max(3, min(max_rounds, int(1.0 / max(per_call, 1e-6))))
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    return timed, (None if benchmark.stats is None else benchmark.stats.stats.median)


def peak_memory(fn, device: str):
    """Peak bytes allocated on the GPU while ``fn`` runs, above what was allocated before (None on CPU:
    torch's CPU allocator keeps no statistics)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def record(benchmark, session_timings, group: str, provider: str, extra: dict) -> None:
    """Store this provider's median and put ratios against the providers already measured into extra_info."""
    median = benchmark.stats.stats.median
    session_timings[(group, provider)] = median
    benchmark.extra_info.update(extra)
    benchmark.extra_info["median_ms"] = median * 1e3
    for other in ("eager", "compile"):
        if other != provider and (group, other) in session_timings:
            benchmark.extra_info[f"speedup_vs_{other}"] = session_timings[(group, other)] / median
