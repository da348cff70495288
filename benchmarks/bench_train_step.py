"""One training step's scorer + loss (forward and backward) at B=32 queries x K=8: fastrank vs the eager
references, the code `fastrank bench train-step` runs (``fastrank/bench/train_step.py``).

    pytest benchmarks/bench_train_step.py

Before timing, fastrank's loss and gradients are checked against the eager step's. The eager step is timed
in the same run, interleaved, and the ratio goes into ``extra_info``.
"""
from __future__ import annotations

import pytest
import torch

from fastrank.bench.timing import time_interleaved
from fastrank.bench.train_step import BACKENDS, make_inputs, step_fn
from fastrank.train.config import TrainConfig
from fastrank.train.loop import World, group_loss
from fastrank.train.student import make_head

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [("maxsim", ("ce",)), ("maxsim", ("margin_mse",)), ("lite", ("ce",)), ("lite", ("kl_div", "ce"))]


def _check(scorer, loss, inputs):
    q, qm, d, dm, t = inputs
    results = []
    for backend in BACKENDS.values():
        torch.manual_seed(0)
        head = make_head(scorer, q.shape[-1], proj_dim=128 if scorer == "maxsim" else None, lq=q.shape[1],
                         ld=d.shape[1]).to(DEVICE)
        qg, dg = q.clone().requires_grad_(), d.clone().requires_grad_()
        cfg = TrainConfig(data=".", out=".", scorer=scorer, loss=loss, tau=1.0)
        value = group_loss(cfg, head, qg, qm, dg, dm, t, World(), backend)
        value.backward()
        results.append((value.detach(), qg.grad, dg.grad))
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("scorer, loss", CASES, ids=[f"{s}-{'+'.join(loss)}" for s, loss in CASES])
def test_train_step(benchmark, scorer, loss):
    inputs = make_inputs(32, 8, device=DEVICE)
    _check(scorer, loss, inputs)
    fns = {v: step_fn(scorer, backend, loss, inputs, DEVICE) for v, backend in BACKENDS.items()}
    for fn in fns.values():
        fn()
    secs = time_interleaved(fns, DEVICE, min_rounds=5)
    benchmark.extra_info.update({"eager_ms": secs["eager"] * 1e3, "fastrank_ms": secs["fastrank"] * 1e3,
                                 "speedup_vs_eager": secs["eager"] / secs["fastrank"]})
    benchmark.group = f"train step {scorer} {'+'.join(loss)} B=32 K=8"
    benchmark(fns["fastrank"])
