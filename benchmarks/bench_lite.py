"""LITE: eager reference, torch.compile of the reference, and fastrank, side by side per shape.

    pytest benchmarks/bench_lite.py                      # GPU: the issue's shapes; CPU: the CPU shapes
    pytest benchmarks/bench_lite.py --benchmark-json out.json

The shapes, providers and check are fastrank.bench.lite's (the code `fastrank bench lite` runs). Each group
is one shape; its rows are the providers. Every provider is checked against the eager
reference before it is timed. extra_info holds pairs/s, TFLOP/s (the model's matmul FLOPs, the same
numerator for every provider), speedups over eager and torch.compile from this run, and GPU peak memory.

The fastrank row forces the kernel (Triton on CUDA, the C++ kernel on CPU), so a silent fallback to the
reference (a scorer wider than the kernel tile, an unsupported dtype) fails the row instead of timing eager
under fastrank's name. torch.compile of the reference is left out on CPU (Inductor spends minutes compiling C++ for these shapes).
"""
from __future__ import annotations

import pytest
import torch

from fastrank.bench.lite import PROVIDERS, check, cpu_cases, cuda_cases, default_providers, provider_fn

from conftest import peak_memory, record, time_provider

CUDA = torch.cuda.is_available()
CASES = cuda_cases() if CUDA else cpu_cases()
PARAMS = [pytest.param(case, provider, id=f"{case.name}-{str(case.dtype)[6:]}-{provider}".replace(" ", "_").replace("=", ""))
          for case in CASES  # eager first within each shape
          for provider in (PROVIDERS if CUDA else default_providers("cpu", False))]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_lite(benchmark, case, provider, device, session_timings):
    group = f"lite {case.name} {str(case.dtype)[6:]}"
    benchmark.group = group
    scorer = case.scorer(device)
    inputs = case.make(device)
    fn = provider_fn(provider, case, inputs, scorer)
    check(fn(), provider_fn("eager", case, inputs, scorer)(), case.dtype)
    timed, median = time_provider(benchmark, fn, device, max_rounds=50)
    if median is None:  # --benchmark-disable: checked above, nothing timed
        return
    record(benchmark, session_timings, group, provider, {
        "pairs_per_s": case.pairs / median,
        "TFLOP_per_s": case.flops(inputs[3]) / median / 1e12,
        "peak_mem_bytes": peak_memory(timed, device),
    })
