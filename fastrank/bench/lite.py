"""LITE's benchmark shapes and providers, shared by `fastrank bench lite` and benchmarks/bench_lite.py.

Providers, each checked against :func:`fastrank.lite_ref` before it is timed:

- ``eager``: the reference itself;
- ``compile``: ``torch.compile`` of the reference (CPU: only when asked; Inductor compiles C++ for minutes);
- ``fastrank``: :func:`fastrank.lite_score` forced onto its kernel (Triton on CUDA, the C++ kernel on CPU), so
  that a silent fallback to the reference (a scorer wider than the kernel tile, an unsupported dtype) fails
  the row instead of timing eager under fastrank's name.

The unit is pairs/s (query-document pairs scored). The batch sweep re-ranks 1 query against N documents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fastrank.nn import LiteScorer
from fastrank.ops.lite import lite_ref, lite_score

LQ, LD, ROW_HIDDEN, COL_HIDDEN = 30, 200, 2400, 360
PROVIDERS = ("eager", "compile", "fastrank")
CPU_NOTE = ("CPU: the fastrank rows run the C++ LITE kernels (forward; training: forward saving the row MLP's "
            "hidden layer, then the fused backward); inference rows run under torch.no_grad() for every provider")


@dataclass(frozen=True)
class LiteCase:
    """``form`` "rerank": 1 query x ``docs``; "train": ``queries`` x 1 doc each, forward+backward. The scorer's
    sizes default to the paper's LITE (lq 30, ld 200, hidden 2400 and 360)."""

    name: str
    form: str
    queries: int
    docs: int
    h: int
    dtype: torch.dtype = torch.float32
    lq: int = LQ
    ld: int = LD
    row_hidden: int = ROW_HIDDEN
    col_hidden: int = COL_HIDDEN

    @property
    def backward(self) -> bool:
        return self.form == "train"

    @property
    def pairs(self) -> int:
        return self.queries * self.docs

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def make(self, device: str, seed: int = 0):
        """Unit-norm random tokens; full queries, docs of random length in [ld/2, ld] behind d_mask."""
        from fastrank.bench.maxsim import pair_shapes, random_tokens

        form = "rerank" if self.form == "rerank" else "grouped"  # LITE's "train" form is grouped pairs
        q_shape, d_shape = pair_shapes(form, self.queries, self.docs, self.lq, self.ld, self.h)
        return random_tokens(q_shape, d_shape, device, self.dtype, seed)

    def scorer(self, device: str) -> LiteScorer:
        torch.manual_seed(0)
        return LiteScorer(self.lq, self.ld, self.row_hidden, self.col_hidden).to(device, self.dtype)

    def flops(self, d_mask: Optional[Tensor] = None) -> float:
        """Matmul FLOPs of the model per call: S, both MLPs' two Linears, the output; x3 with backward.

        With ``d_mask``, S and the row MLP's first Linear count a document's real tokens only: over its
        padding they multiply zeros, which the fused kernel skips, and counting them would put it above the
        machine's ceiling (109% of sgemm on the Zen 4 VM) while it does less work, not faster work."""
        lq, ld = self.lq, self.ld
        tokens = self.pairs * ld if d_mask is None else int(d_mask.sum())
        by_token = 2 * lq * (self.h + self.row_hidden) * tokens
        by_pair = self.pairs * (2 * lq * self.row_hidden * ld + 4 * ld * lq * self.col_hidden + 2 * lq * ld)
        return (by_token + by_pair) * (3 if self.backward else 1)

    def bytes_read(self) -> int:
        """Tokens and weights read once: the least any implementation must move."""
        size = torch.empty((), dtype=self.dtype).element_size()
        tokens = (self.lq * (1 if self.form == "rerank" else self.queries) + self.ld * self.pairs) * self.h
        weights = 2 * self.ld * self.row_hidden + 2 * self.lq * self.col_hidden + self.lq * self.ld
        return (tokens + weights) * size


def cuda_cases() -> list[LiteCase]:
    bf16 = torch.bfloat16
    return [
        LiteCase("rerank 1x1000 H=128", "rerank", 1, 1000, 128, bf16),
        LiteCase("rerank 1x1000 H=768", "rerank", 1, 1000, 768, bf16),
        LiteCase("train 128x1 fwd+bwd H=128", "train", 128, 1, 128, bf16),
        LiteCase("train 128x1 fwd+bwd H=768", "train", 128, 1, 768, bf16),
    ]


def cpu_cases() -> list[LiteCase]:
    """The issue's CPU shapes: re-ranking 1 x 1,000 in float32 and bfloat16, and a training step."""
    return [
        LiteCase("rerank 1x1000 H=128", "rerank", 1, 1000, 128),
        LiteCase("rerank 1x1000 H=128", "rerank", 1, 1000, 128, torch.bfloat16),
        LiteCase("train 32x8 fwd+bwd H=128", "train", 32, 8, 128),
    ]


def batch_sweep(device: str, quick: bool, tiny: bool, dtype: torch.dtype) -> list[LiteCase]:
    """1 query x N documents for growing N (the re-ranking batch size)."""
    if tiny:
        return [LiteCase(f"rerank 1x{n} H=16", "rerank", 1, n, 16, dtype, lq=7, ld=9, row_hidden=12, col_hidden=5)
                for n in (2, 6)]
    if device.startswith("cuda"):
        sizes = (100, 1000, 10000) if quick else (100, 300, 1000, 3000, 10000, 30000)
    else:  # ~70 MFLOP a pair at the paper's sizes: a 2-core CPU scores a few hundred pairs a second
        sizes = (4, 16, 64) if quick else (4, 16, 64, 256, 1000)
    return [LiteCase(f"rerank 1x{n} H=128", "rerank", 1, n, 128, dtype) for n in sizes]


def provider_fn(provider: str, case: LiteCase, inputs, scorer):
    """A no-argument callable running one forward (or forward+backward) of ``provider``."""
    q, d, q_mask, d_mask = inputs
    if provider == "eager":
        score = lambda *a: lite_ref(*a, scorer=scorer)  # noqa: E731
    elif provider == "compile":
        torch._dynamo.reset()  # a fresh cache per shape: no silent fallback after the recompile limit
        score = torch.compile(lambda *a: lite_ref(*a, scorer=scorer), dynamic=False)
    elif provider == "fastrank":
        kernel = "triton" if q.device.type == "cuda" else "cpp"
        score = lambda *a: lite_score(*a, scorer=scorer, backend=kernel)  # noqa: E731
    else:
        raise ValueError(f"unknown LITE provider {provider!r}; expected one of {PROVIDERS}")
    if not case.backward:  # inference, as a re-ranker serves: no autograd graph for any provider

        def infer():
            with torch.no_grad():
                return score(q, d, q_mask, d_mask)

        return infer
    qg, dg = q.detach().requires_grad_(), d.detach().requires_grad_()
    weights = torch.linspace(0.5, 1.5, case.pairs, device=q.device)
    # A training step needs every parameter's gradient (the optimiser updates them all): asking autograd for
    # a few would let eager skip most of its backward while a fused kernel computes them all anyway.
    wanted = (qg, dg, *(p for p in scorer.parameters() if p.requires_grad))

    def step():
        out = score(qg, dg, q_mask, d_mask)
        return torch.autograd.grad((out.reshape(-1) * weights).sum(), wanted)

    return step


def check(got, want, dtype: torch.dtype) -> None:
    # bf16 inputs and weights through two 2400/360-wide layers: compare at bf16's resolution. Gradients in
    # float32: the training case is ill-conditioned (float32 eager itself is up to 7e-3 off float64 in dd,
    # at the default init), so two float32 computations of it are held to 3e-2, still far below a wrong one.
    tol = 5e-2 if dtype != torch.float32 else 3e-2 if isinstance(got, tuple) else 1e-3
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item())


def default_providers(device: str, compile: bool) -> list[str]:
    if not device.startswith("cuda"):
        return ["eager"] + (["compile"] if compile else []) + ["fastrank"]
    return list(PROVIDERS)


def section(settings, probes) -> tuple[list[dict], list[str]]:
    """`fastrank bench lite`: the CUDA cases (GPU) and the batch sweep, as :mod:`fastrank.bench.suite` rows."""
    from fastrank.bench.suite import Shape, measure

    device = settings.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtypes = [dtype] if settings.dtypes is None else [getattr(torch, n) for n in settings.dtypes]
    fixed = cuda_cases() if device.startswith("cuda") else cpu_cases()
    cases = [c for c in fixed if not settings.tiny and settings.wants(c.dtype_name)]
    sweeps = [c for dt in dtypes for c in batch_sweep(device, settings.quick, settings.tiny, dt)]
    notes = [] if device.startswith("cuda") else [CPU_NOTE]
    rows = []
    for case in cases + sweeps:
        providers = default_providers(device, settings.compile)
        swept = case in sweeps
        scorer = case.scorer(device)
        inputs = case.make(device)
        shape = Shape("lite", case.name, case.dtype_name, case.pairs, unit="pairs/s", flops=case.flops(inputs[3]),
                      bytes=case.bytes_read(), ceiling=_ceiling(case, device),
                      sweep=f"batch (1 query, Ld={case.ld}, H={case.h})" if swept else None,
                      work=case.pairs if swept else None)
        fns = {p: provider_fn(p, case, inputs, scorer) for p in providers}
        rows += measure(shape, fns, provider_fn("eager", case, inputs, scorer),
                        lambda got, want, dt=case.dtype: check(got, want, dt), settings, probes)
    return rows, notes


def _ceiling(case: LiteCase, device: str) -> str:
    """bfloat16 rows against the bf16 GEMM rate where the kernel computes in bfloat16 (CUDA, a CPU path with
    AVX512-BF16); elsewhere the CPU kernel widens bfloat16 to float32, and sgemm bounds it (torch's bf16 GEMM
    there is an emulation, hundreds of times slower: no ceiling)."""
    if case.dtype != torch.bfloat16:
        return "sgemm_gflops"
    if device.startswith("cuda"):
        return "bf16_gemm_gflops"
    from fastrank import cpu_isa
    from fastrank.ops import lite_cpu

    return "bf16_gemm_gflops" if lite_cpu.uses_bf16_dot(torch.bfloat16, cpu_isa.selected()) else "sgemm_gflops"
