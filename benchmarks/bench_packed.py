"""Packed against padded MaxSim re-ranking of DL19's BM25 top-100 with real token lengths (the workload
and providers of fastrank.bench.packed, the same code as `fastrank bench packed`):

    pytest benchmarks/bench_packed.py                       # H = 384 and 128, every provider
    pytest benchmarks/bench_packed.py --benchmark-disable   # correctness checks only

Each H is one group; all its providers are timed in one interleaved run next to this machine's sgemm
(fastrank.bench.time_interleaved) and recorded as extra_info: docs/s, the ratio to the padded kernel and to
eager, the fraction of the GEMM ceiling, the token bytes. Scores are checked before timing.
"""
import pytest
import torch

from fastrank.bench import packed as bench_packed

from conftest import record


@pytest.fixture(scope="module")
def workload():
    pytest.importorskip("transformers")
    return bench_packed.dl19_workload()


@pytest.mark.parametrize("h", [384, 128])
def test_packed_rerank(benchmark, workload, h, session_timings, machine):
    benchmark.group = f"packed re-rank DL19 H={h}"
    tokens, offsets, queries, docs = bench_packed.make_inputs(workload, h)
    fns, extra = bench_packed.providers(tokens, offsets, queries, docs)
    bench_packed.check(fns, tokens, offsets, queries, docs, extra)
    if benchmark.disabled:
        benchmark.pedantic(fns["packed float32"], rounds=1, iterations=1)
        return
    res = bench_packed.run([h], min_seconds=1.0, progress=False)
    rows = {r["provider"]: r for r in res["cases"][0]["rows"]}
    benchmark.pedantic(fns["packed float32"], rounds=3, iterations=1)
    record(benchmark, session_timings, benchmark.group, "packed float32", {
        "cpu": machine["cpu"], "isa": machine["isa"], "threads": torch.get_num_threads(),
        "workload": res["workload"], "ceilings": res["cases"][0]["ceilings"],
        "rows": rows, "packed_vs_padded": rows["packed float32"]["vs_padded"],
        "packed_vs_padded_with_padding": rows["packed float32"]["vs_padded"] / rows["padded+pad"]["vs_padded"],
        "int8_vs_float16": rows["packed int8"]["docs_per_s"] / rows["packed float16"]["docs_per_s"],
    })
