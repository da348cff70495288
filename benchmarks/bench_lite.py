"""LITE: eager reference, torch.compile of the reference, and fastrank, side by side per shape.

    pytest benchmarks/bench_lite.py                      # GPU: the issue's shapes (CPU: skipped, see below)
    pytest benchmarks/bench_lite.py --benchmark-json out.json

Each group is one shape; its rows are the providers. Every provider is checked against the eager
reference before it is timed. extra_info holds pairs/s, TFLOP/s (the model's matmul FLOPs, the same
numerator for every provider), speedups over eager and torch.compile from this run, and GPU peak memory.

Nothing runs on CPU: LITE has no CPU kernel, so fastrank dispatches to the eager reference there, and a
CPU fastrank row would time the reference against itself (it did, and measured nothing). The CPU path *is*
the reference, which tests/test_lite.py checks against an independent PlainLite. torch.compile of the
reference on CPU is no fastrank path either (and Inductor spends minutes compiling C++ for these shapes).
On CUDA the fastrank row forces the Triton backend, so a silent fallback to the reference (a scorer wider
than the kernel tile, an unsupported dtype) fails the row instead of timing eager under fastrank's name.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fastrank import LiteScorer, lite_ref, lite_score

from conftest import peak_memory, record, time_provider

LQ, LD, ROW_HIDDEN, COL_HIDDEN = 30, 200, 2400, 360


@dataclass(frozen=True)
class LiteCase:
    """``form`` "rerank": 1 query x ``docs``; "train": ``queries`` x 1 doc each, forward+backward."""

    name: str
    form: str
    queries: int
    docs: int
    h: int
    dtype: torch.dtype = torch.float32

    @property
    def backward(self) -> bool:
        return self.form == "train"

    @property
    def pairs(self) -> int:
        return self.queries * self.docs

    def make(self, device: str, seed: int = 0):
        """Unit-norm random tokens; full queries, docs of random length in [ld/2, ld] behind d_mask."""
        g = torch.Generator().manual_seed(seed)
        if self.form == "rerank":
            q_shape, d_shape = (LQ, self.h), (self.docs, LD, self.h)
        else:
            q_shape, d_shape = (self.queries, 1, LQ, self.h), (self.queries, self.docs, LD, self.h)
        q = torch.nn.functional.normalize(torch.randn(q_shape, generator=g), dim=-1)
        d = torch.nn.functional.normalize(torch.randn(d_shape, generator=g), dim=-1)
        lengths = torch.randint(LD // 2, LD + 1, d_shape[:-2], generator=g)
        d_mask = torch.arange(LD) < lengths.unsqueeze(-1)
        return q.to(device, self.dtype), d.to(device, self.dtype), None, d_mask.to(device)

    def flops(self) -> float:
        """Matmul FLOPs of the model per call: S, both MLPs' two Linears, the output; x3 with backward."""
        per_pair = 2 * LQ * LD * self.h + 4 * LQ * LD * ROW_HIDDEN + 4 * LD * LQ * COL_HIDDEN + 2 * LQ * LD
        return per_pair * self.pairs * (3 if self.backward else 1)


def cuda_cases() -> list[LiteCase]:
    bf16 = torch.bfloat16
    return [
        LiteCase("rerank 1x1000 H=128", "rerank", 1, 1000, 128, bf16),
        LiteCase("rerank 1x1000 H=768", "rerank", 1, 1000, 768, bf16),
        LiteCase("train 128x1 fwd+bwd H=128", "train", 128, 1, 128, bf16),
        LiteCase("train 128x1 fwd+bwd H=768", "train", 128, 1, 768, bf16),
    ]


def _scorer(device: str, dtype: torch.dtype) -> LiteScorer:
    torch.manual_seed(0)
    return LiteScorer(LQ, LD, ROW_HIDDEN, COL_HIDDEN).to(device, dtype)


def provider_fn(provider: str, case: LiteCase, inputs, scorer):
    q, d, q_mask, d_mask = inputs
    if provider == "eager":
        score = lambda *a: lite_ref(*a, scorer=scorer)  # noqa: E731
    elif provider == "compile":
        torch._dynamo.reset()  # a fresh cache per shape: no silent fallback after the recompile limit
        score = torch.compile(lambda *a: lite_ref(*a, scorer=scorer), dynamic=False)
    elif provider == "fastrank":
        score = lambda *a: lite_score(*a, scorer=scorer, backend="triton")  # noqa: E731
    else:
        raise ValueError(f"unknown provider {provider!r}")
    if not case.backward:
        return lambda: score(q, d, q_mask, d_mask)
    qg, dg = q.detach().requires_grad_(), d.detach().requires_grad_()
    weights = torch.linspace(0.5, 1.5, case.pairs, device=q.device)
    first = scorer.row_mlp[0].weight

    def step():
        out = score(qg, dg, q_mask, d_mask)
        return torch.autograd.grad((out.reshape(-1) * weights).sum(), (qg, dg, first))

    return step


def _check(got, want, dtype):
    # bf16 inputs and weights through two 2400/360-wide layers: compare at bf16's resolution.
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item())


CUDA = torch.cuda.is_available()
PROVIDERS = ("eager", "compile", "fastrank")
PARAMS = [pytest.param(case, provider, id=f"{case.name}-{str(case.dtype)[6:]}-{provider}".replace(" ", "_").replace("=", ""))
          for case in cuda_cases() for provider in PROVIDERS]  # eager first within each shape
if not CUDA:
    PARAMS = [pytest.param(None, None, id="cpu", marks=pytest.mark.skip(
        reason="LITE has no CPU kernel: fastrank runs the eager reference there, nothing to compare (module docstring)"))]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_lite(benchmark, case, provider, device, session_timings):
    group = f"lite {case.name} {str(case.dtype)[6:]}"
    benchmark.group = group
    scorer = _scorer(device, case.dtype)
    inputs = case.make(device)
    fn = provider_fn(provider, case, inputs, scorer)
    _check(fn(), provider_fn("eager", case, inputs, scorer)(), case.dtype)
    timed, median = time_provider(benchmark, fn, device, max_rounds=50)
    if median is None:  # --benchmark-disable: checked above, nothing timed
        return
    record(benchmark, session_timings, group, provider, {
        "pairs_per_s": case.pairs / median,
        "TFLOP_per_s": case.flops() / median / 1e12,
        "peak_mem_bytes": peak_memory(timed, device),
    })
