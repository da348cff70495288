"""MaxSim: eager reference, torch.compile of the reference, and fastrank, side by side per shape.

    pytest benchmarks/bench_maxsim.py                      # CPU: 10,000-doc throughput; GPU: 100,000
    pytest benchmarks/bench_maxsim.py --benchmark-json out.json

Each group is one shape; its rows are the providers. Every provider is checked against the reference
before it is timed; speedups come from medians measured in this run (see extra_info).
"""
import pytest
import torch

from fastrank.bench import PROVIDERS, check, cpu_cases, cuda_cases, provider_fn, synchronize, time_call

from conftest import peak_memory, record

CASES = cuda_cases() if torch.cuda.is_available() else cpu_cases()
PARAMS = [pytest.param(case, provider, id=f"{case.name}-{str(case.dtype)[6:]}-{provider}".replace(" ", "_").replace("=", ""))
          for case in CASES for provider in PROVIDERS]  # eager first within each shape


@pytest.mark.parametrize("case,provider", PARAMS)
def test_maxsim(benchmark, case, provider, device, session_timings):
    group = f"maxsim {case.name} {str(case.dtype)[6:]}"
    benchmark.group = group
    inputs = case.make(device)
    fn = provider_fn(provider, case, inputs)
    check(fn(), provider_fn("eager", case, inputs)(), case.dtype)

    def timed():
        fn()
        synchronize(device)

    per_call = time_call(timed, device, min_seconds=0.0, max_reps=3)
    rounds = max(3, min(100, int(1.0 / max(per_call, 1e-6))))
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: checked above, nothing timed
        return
    median = benchmark.stats.stats.median
    record(benchmark, session_timings, group, provider, {
        "docs_per_s": case.pairs / median,
        "GB_per_s": case.bytes_read() / median / 1e9,
        "peak_mem_bytes": peak_memory(timed, device),
        "eager_similarity_bytes": case.similarity_bytes(),
    })
