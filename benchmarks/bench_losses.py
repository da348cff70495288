"""Forward + backward of the distillation losses: eager reference vs torch.compile(reference) vs fastrank.

    pytest benchmarks/bench_losses.py                    # CPU, or the GPU when there is one
    FASTRANK_BENCH_DEVICE=cpu pytest benchmarks/bench_losses.py

One benchmark group per loss and shape, providers side by side; the inputs, providers and check are
fastrank.bench.losses's (the code `fastrank bench losses` runs). Before timing, every provider's loss and
gradient are checked against the float64 reference. The fastrank benchmark also times the eager reference
itself, interleaved with fastrank in the same process, and stores the ratio in ``extra_info`` (with the ratio
to torch.compile when that provider ran earlier in the session), so figures are never typed in by hand.

On CPU the grid is cut down to what runs in a few minutes (torch.compile builds C++ for each shape): every
loss at B=128, K=20, margin_mse and softmax_ce over the whole grid, torch.compile at B=128, K=20 only.
The rest is marked GPU-only and skipped on CPU.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from fastrank import losses
from fastrank.bench.losses import DISTILL, GRID, HEADLINE, INBATCH, check, loss_fn, make_inputs, reference, step

CPU_FULL_GRID = {"margin_mse", "softmax_ce"}

_medians: dict[tuple[str, str], float] = {}  # (group, provider) -> median seconds, filled as the session runs


def _device() -> torch.device:
    choice = os.environ.get("FASTRANK_BENCH_DEVICE")
    if choice:
        return torch.device(choice)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEVICE = _device()
ON_CPU = DEVICE.type == "cpu"


def _cases(provider: str):
    for name in DISTILL:
        for b, k in GRID:
            gpu_only = (b, k) != HEADLINE and name not in CPU_FULL_GRID
            if provider == "compile":
                gpu_only = (b, k) != HEADLINE or name not in CPU_FULL_GRID
            marks = [pytest.mark.skipif(ON_CPU, reason="GPU-only shape (keeps the CPU run short)")] if gpu_only else []
            yield pytest.param(name, b, k, id=f"{name}-B{b}-K{k}", marks=marks)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _step(fn, s, t):
    """fastrank.bench.losses.step, synchronised so that a timed GPU call includes its kernels."""
    run = step(fn, s, t)

    def synced():
        out = run()
        _sync()
        return out

    return synced


def _median_seconds(fn, seconds: float = 0.15, blocks: int = 7) -> list[float]:
    """Per-call times of ``blocks`` back-to-back blocks, each about ``seconds`` long."""
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 4:
        fn()
        calls += 1
    per_block = max(1, calls * 4 // blocks)
    out = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(per_block):
            fn()
        out.append((time.perf_counter() - t0) / per_block)
    return out


def _paired_ratio(slow, fast, rounds: int = 3) -> float:
    """median(slow) / median(fast), the two timed in alternating blocks so that load from other processes
    falls on both."""
    slow_t, fast_t = [], []
    for _ in range(rounds):
        slow_t += _median_seconds(slow, blocks=3)
        fast_t += _median_seconds(fast, blocks=3)
    return statistics.median(slow_t) / statistics.median(fast_t)


def _peak_memory_mib(step):
    if DEVICE.type != "cuda":
        return None  # torch tracks allocator peaks on CUDA only
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _record(benchmark, group, provider, step, batch, extra):
    benchmark.group = group
    benchmark.extra_info.update({"provider": provider, "device": str(DEVICE), "threads": torch.get_num_threads(),
                                 "peak_memory_MiB": _peak_memory_mib(step), **extra})
    benchmark(step)
    if benchmark.stats is None:  # --benchmark-disable: checked above, nothing timed
        return
    median = benchmark.stats.stats.median
    _medians[(group, provider)] = median
    benchmark.extra_info["queries_per_s"] = batch / median
    return median


def _run_distill(benchmark, provider, name, batch, k):
    s, t = make_inputs(batch, k, DEVICE)
    run = _step(loss_fn(provider, name), s, t)
    check(run(), reference(name, s, t)())  # also compiles, outside the timed region
    group = f"{name} B={batch} K={k}"
    extra = {"loss": name, "B": batch, "K": k}
    median = _record(benchmark, group, provider, run, batch, extra)
    if provider == "fastrank":
        eager = _step(loss_fn("eager", name), s, t)
        benchmark.extra_info["speedup_vs_eager"] = _paired_ratio(eager, run)
        if (group, "compile") in _medians:
            benchmark.extra_info["speedup_vs_compile"] = _medians[(group, "compile")] / median


@pytest.mark.benchmark(max_time=0.3)
@pytest.mark.parametrize("name,batch,k", list(_cases("eager")))
def test_eager(benchmark, name, batch, k):
    _run_distill(benchmark, "eager", name, batch, k)


@pytest.mark.benchmark(max_time=0.3)
@pytest.mark.parametrize("name,batch,k", list(_cases("compile")))
def test_compile(benchmark, name, batch, k):
    _run_distill(benchmark, "compile", name, batch, k)


@pytest.mark.benchmark(max_time=0.3)
@pytest.mark.parametrize("name,batch,k", list(_cases("fastrank")))
def test_fastrank(benchmark, name, batch, k):
    _run_distill(benchmark, "fastrank", name, batch, k)


def _inbatch_inputs():
    batch, m = INBATCH
    gen = torch.Generator().manual_seed(0)
    scores = ((torch.rand(batch, m, generator=gen) * 2 - 1)).to(DEVICE)
    target = torch.randint(0, m, (batch,), generator=gen).to(DEVICE)
    return scores, target


def _inbatch_step(fn, scores, target):
    def run():
        x = scores.requires_grad_(True)
        loss = fn(x, target, 0.05)
        (grad,) = torch.autograd.grad(loss, x)
        _sync()
        return loss, grad

    return run


@pytest.mark.benchmark(max_time=0.3)
@pytest.mark.parametrize("provider", [
    "eager",
    pytest.param("compile", marks=pytest.mark.skipif(ON_CPU, reason="GPU-only (keeps the CPU run short)")),
    "fastrank",
])
def test_inbatch_ce(benchmark, provider):
    scores, target = _inbatch_inputs()
    fn = {"eager": losses.inbatch_ce_ref, "fastrank": losses.inbatch_ce}.get(provider)
    if provider == "compile":
        torch._dynamo.reset()
        fn = torch.compile(losses.inbatch_ce_ref, dynamic=False)
    step = _inbatch_step(fn, scores, target)
    loss, grad = step()
    x = scores.detach().double().requires_grad_(True)
    loss64 = losses.inbatch_ce_ref(x, target, 0.05)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), torch.autograd.grad(loss64, x)[0], rtol=1e-4, atol=1e-6)
    batch, m = INBATCH
    group = f"inbatch_ce B={batch} M={m}"
    median = _record(benchmark, group, provider, step, batch, {"loss": "inbatch_ce", "B": batch, "M": m})
    if provider == "fastrank":
        benchmark.extra_info["speedup_vs_eager"] = _paired_ratio(_inbatch_step(losses.inbatch_ce_ref, scores, target), step)
        if (group, "compile") in _medians:
            benchmark.extra_info["speedup_vs_compile"] = _medians[(group, "compile")] / median
