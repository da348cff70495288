"""MaxSim providers side by side per shape: the eager forms (matmul+amax, its float32 upcast for bf16/fp16,
PyLate's einsum), torch.compile, fastrank (default dispatch and each CPU ISA path) and maxsim-cpu.

    pytest benchmarks/bench_maxsim.py                                  # CPU: the issue-9 shapes
    FASTRANK_BENCH_COMPILE=1 pytest benchmarks/bench_maxsim.py         # + torch.compile (CPU: minutes)
    pytest benchmarks/bench_maxsim.py --benchmark-json out.json        # JSON names CPU, ISA path, ceilings
    pytest benchmarks/bench_maxsim.py --benchmark-disable              # correctness checks only

Each group is one shape; its rows are the providers, eager forms first. Every provider is checked
against fastrank.maxsim_ref before it is timed. extra_info holds docs/s, GB/s, the ratio to the fastest
eager form measured in this run, and the fractions of this machine's ceilings (fastrank.bench.result_row,
the same arithmetic as `fastrank bench maxsim`).
"""
import os

import pytest
import torch

from fastrank.bench.maxsim import (EAGER_PROVIDERS, case_providers, case_work, check, cpu_cases, cuda_cases,
                            default_path, default_providers, provider_fn, result_row)

from conftest import peak_memory, record, time_provider

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = cuda_cases() if DEVICE == "cuda" else cpu_cases()
# Inductor on CPU compiles C++ for minutes per shape: opt in there; on CUDA it is part of the default set.
COMPILE = os.environ.get("FASTRANK_BENCH_COMPILE", "1" if DEVICE == "cuda" else "0") == "1"
PROVIDERS = default_providers(DEVICE, compile=COMPILE)
PARAMS = [pytest.param(case, provider, id=f"{case.name}-{case.dtype_name}-{provider}".replace(" ", "_").replace("=", ""))
          for case in CASES for provider in case_providers(case, PROVIDERS, DEVICE)]  # eager forms first per shape

_prepared: dict = {}  # the current case's inputs, work and reference: one case in memory at a time


def _prepare(case, device):
    if case not in _prepared:
        _prepared.clear()
        inputs = case.make(device)
        _prepared[case] = (inputs, case_work(case, inputs), provider_fn("reference", case, inputs)())
    return _prepared[case]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_maxsim(benchmark, case, provider, device, session_timings, machine, ceilings):
    group = f"maxsim {case.name} {case.dtype_name}"
    benchmark.group = group
    inputs, work, reference = _prepare(case, device)
    fn = provider_fn(provider, case, inputs)
    check(fn(), reference, case.dtype)
    timed, median = time_provider(benchmark, fn, device)
    if median is None:  # --benchmark-disable: checked above, nothing timed
        return
    eager = {p: session_timings[(group, p)] for p in EAGER_PROVIDERS if (group, p) in session_timings}
    if provider in EAGER_PROVIDERS:
        eager[provider] = median
    row = result_row(case, work, provider, median, eager, ceilings, default_path(device))
    record(benchmark, session_timings, group, provider, {
        **{k: row[k] for k in ("docs_per_s", "GB_per_s", "GFLOP_per_s", "isa", "fastest_eager", "vs_fastest_eager",
                               "sgemm_fraction", "floor_ms", "floor_ratio", "target")},
        "threads": machine["threads"],
        "peak_mem_bytes": peak_memory(timed, device),
        "eager_similarity_bytes": case.similarity_bytes(),
    })
