"""MaxSim: eager reference, torch.compile of the reference, and fastrank, side by side per shape.

    pytest benchmarks/bench_maxsim.py                      # CPU: 10,000-doc throughput; GPU: 100,000
    pytest benchmarks/bench_maxsim.py --benchmark-json out.json

Each group is one shape; its rows are the providers. Every provider is checked against the reference
before it is timed; speedups come from medians measured in this run (see extra_info).
"""
import pytest
import torch

from fastrank.bench import PROVIDERS, check, cpu_cases, cuda_cases, provider_fn

from conftest import peak_memory, record, time_provider

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
    timed, median = time_provider(benchmark, fn, device)
    if median is None:  # --benchmark-disable: checked above, nothing timed
        return
    record(benchmark, session_timings, group, provider, {
        "docs_per_s": case.pairs / median,
        "GB_per_s": case.bytes_read() / median / 1e9,
        "peak_mem_bytes": peak_memory(timed, device),
        "eager_similarity_bytes": case.similarity_bytes(),
    })
