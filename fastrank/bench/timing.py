"""Timing on a shared machine: medians of repeated calls, and interleaved rounds that expose every provider
to the same drift. A leaf module: it imports nothing from fastrank."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, min_seconds: float = 0.3, max_reps: int = 200,
              min_reps: int = 3, warmup: bool = True) -> float:
    """Median seconds per call over at least ``min_reps`` repetitions filling ``min_seconds``, after one
    warm-up call (``warmup=False`` when the caller's correctness check already ran ``fn``)."""
    if warmup:
        fn()
        synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_seconds and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: dict, device: str, min_seconds: float = 0.3, min_rounds: int = 5,
                     sample_seconds: float = 0.01) -> dict:
    """Median seconds per call of each of ``fns`` (name -> callable, already warmed up), timed in rounds
    that visit every provider once, in a rotating order. A shared VM's speed drifts by tens of percent
    within a minute; timing providers one after the other would fold that drift into their ratios, while
    interleaving exposes every provider to the same drift. Each sample repeats a call until it lasts
    ``sample_seconds``, so microsecond calls are not timer noise."""
    names = list(fns)
    reps = {}
    for name in names:  # calls per sample, from one probe call
        t0 = time.perf_counter()
        fns[name]()
        synchronize(device)
        reps[name] = max(1, int(sample_seconds / max(time.perf_counter() - t0, 1e-7)))
    samples: dict = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - start < min_seconds * len(names):
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for name in order:
            fn, n = fns[name], reps[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - t0) / n)
        rounds += 1
        if rounds >= 200:
            break
    return {name: statistics.median(v) for name, v in samples.items()}
