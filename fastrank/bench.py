"""Side-by-side MaxSim timing (eager reference, torch.compile of it, fastrank) for `fastrank bench maxsim`
and for the pytest-benchmark suite in benchmarks/, which imports the shapes and input makers from here.

Every figure is measured in the same process, on the same inputs, after checking that each provider
agrees with the reference; ratios are computed from those measurements, never stored.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastrank.ops.maxsim import maxsim, maxsim_ref

PROVIDERS = ("eager", "compile", "fastrank")


@dataclass(frozen=True)
class MaxSimCase:
    """One benchmark shape. ``form``: "rerank" (1 query x docs), "grouped" (queries x docs each, a
    training batch) or "allpairs" (queries x queries in-batch). ``backward`` times forward+backward."""

    name: str
    form: str
    queries: int
    docs: int
    lq: int = 32
    ld: int = 200
    h: int = 128
    dtype: torch.dtype = torch.float32
    backward: bool = False

    @property
    def pairs(self) -> int:
        return self.queries * self.docs if self.form != "allpairs" else self.queries * self.queries

    def make(self, device: str, seed: int = 0):
        """Unit-norm random embeddings (as ColBERT's), docs of random length in [ld/2, ld] behind d_mask."""
        g = torch.Generator().manual_seed(seed)
        if self.form == "rerank":
            q_shape, d_shape = (self.lq, self.h), (self.docs, self.ld, self.h)
        elif self.form == "grouped":
            q_shape, d_shape = (self.queries, 1, self.lq, self.h), (self.queries, self.docs, self.ld, self.h)
        else:
            q_shape, d_shape = (self.queries, 1, self.lq, self.h), (1, self.queries, self.ld, self.h)
        q = torch.nn.functional.normalize(torch.randn(q_shape, generator=g), dim=-1)
        d = torch.nn.functional.normalize(torch.randn(d_shape, generator=g), dim=-1)
        lengths = torch.randint(self.ld // 2, self.ld + 1, d_shape[:-2], generator=g)
        d_mask = torch.arange(self.ld) < lengths.unsqueeze(-1)
        q, d = q.to(device=device, dtype=self.dtype), d.to(device=device, dtype=self.dtype)
        return q, d, None, d_mask.to(device)

    def bytes_read(self) -> int:
        """Bytes a fused kernel must read once: q, d and the mask (effective-bandwidth numerator)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        n_q = 1 if self.form == "rerank" else self.queries
        n_d = self.docs if self.form == "rerank" else (self.queries * self.docs if self.form == "grouped" else self.queries)
        return n_q * self.lq * self.h * size + n_d * self.ld * (self.h * size + 1)

    def similarity_bytes(self) -> int:
        """The float32 (pairs, Lq, Ld) matrix the eager reference materialises."""
        return self.pairs * self.lq * self.ld * 4


def cpu_cases() -> list[MaxSimCase]:
    return [
        MaxSimCase("rerank 1x1000 H=128", "rerank", 1, 1000, h=128),
        MaxSimCase("rerank 1x1000 H=128", "rerank", 1, 1000, h=128, dtype=torch.bfloat16),
        MaxSimCase("rerank 1x1000 H=768", "rerank", 1, 1000, h=768),
        MaxSimCase("rerank 1x1000 H=768", "rerank", 1, 1000, h=768, dtype=torch.bfloat16),
        MaxSimCase("throughput 1x10000 H=128", "rerank", 1, 10000, h=128, dtype=torch.bfloat16),
        MaxSimCase("train 32x20 fwd+bwd H=128", "grouped", 32, 20, h=128, backward=True),
        MaxSimCase("in-batch 128x128 fwd+bwd H=128", "allpairs", 128, 128, h=128, backward=True),
    ]


def cuda_cases() -> list[MaxSimCase]:
    bf16 = torch.bfloat16
    return [
        MaxSimCase("rerank 1x1000 H=128", "rerank", 1, 1000, h=128, dtype=bf16),
        MaxSimCase("rerank 1x1000 H=768", "rerank", 1, 1000, h=768, dtype=bf16),
        MaxSimCase("throughput 1x100000 H=128", "rerank", 1, 100000, h=128, dtype=bf16),
        MaxSimCase("throughput 1x100000 H=768", "rerank", 1, 100000, h=768, dtype=bf16),
        MaxSimCase("train 32x20 fwd+bwd H=128", "grouped", 32, 20, h=128, dtype=bf16, backward=True),
        MaxSimCase("train 32x20 fwd+bwd H=768", "grouped", 32, 20, h=768, dtype=bf16, backward=True),
        MaxSimCase("in-batch 128x128 fwd+bwd H=128", "allpairs", 128, 128, h=128, dtype=bf16, backward=True),
    ]


def provider_fn(provider: str, case: MaxSimCase, inputs, backend: Optional[str] = None) -> Callable[[], object]:
    """A no-argument callable running one forward (or forward+backward) of ``provider`` on ``inputs``."""
    q, d, q_mask, d_mask = inputs
    if provider == "eager":
        score = maxsim_ref
    elif provider == "compile":
        torch._dynamo.reset()  # a fresh cache per shape: no silent fallback after the recompile limit
        score = torch.compile(maxsim_ref, dynamic=False)
    elif provider == "fastrank":
        score = lambda *a: maxsim(*a, backend=backend)  # noqa: E731
    else:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    if not case.backward:
        return lambda: score(q, d, q_mask, d_mask)
    qg, dg = q.detach().requires_grad_(), d.detach().requires_grad_()
    weights = torch.linspace(0.5, 1.5, case.pairs, device=q.device)

    def step():
        out = score(qg, dg, q_mask, d_mask)
        return torch.autograd.grad((out.reshape(-1) * weights).sum(), (qg, dg))

    return step


def check(provider_out, reference_out, dtype: torch.dtype) -> None:
    """Each provider must agree with the eager reference before it is timed."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    outs = provider_out if isinstance(provider_out, tuple) else (provider_out,)
    refs = reference_out if isinstance(reference_out, tuple) else (reference_out,)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, min_seconds: float = 0.3, max_reps: int = 200) -> float:
    """Median seconds per call over repetitions filling ``min_seconds`` (after one warm-up call)."""
    fn()
    synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_maxsim(cases: list[MaxSimCase], device: str, providers=PROVIDERS, progress: bool = True) -> list[dict]:
    """Time every provider on every case; one row per (case, provider) with docs/s and ratios."""
    from tqdm.auto import tqdm

    rows = []
    for case in tqdm(cases, desc="maxsim bench", disable=not progress):
        inputs = case.make(device)
        reference = provider_fn("eager", case, inputs)()
        seconds = {}
        for provider in providers:
            fn = provider_fn(provider, case, inputs)
            check(fn(), reference, case.dtype)
            seconds[provider] = time_call(fn, device)
        for provider in providers:
            s = seconds[provider]
            rows.append({
                "case": case.name,
                "dtype": str(case.dtype).replace("torch.", ""),
                "provider": provider,
                "ms": s * 1e3,
                "docs_per_s": case.pairs / s,
                "GB_per_s": case.bytes_read() / s / 1e9,
                "vs_eager": seconds["eager"] / s if "eager" in seconds else float("nan"),
            })
    return rows


def format_rows(rows: list[dict]) -> str:
    header = f"{'case':<32} {'dtype':<9} {'provider':<9} {'ms':>9} {'docs/s':>12} {'GB/s':>7} {'vs eager':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['case']:<32} {r['dtype']:<9} {r['provider']:<9} {r['ms']:>9.3f} {r['docs_per_s']:>12,.0f} "
            f"{r['GB_per_s']:>7.2f} {r['vs_eager']:>7.2f}x"
        )
    return "\n".join(lines)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def add_cli(subparsers) -> None:
    """`fastrank bench maxsim`: registered by fastrank.cli."""
    bench = subparsers.add_parser("bench", help="time fused kernels against eager PyTorch and torch.compile")
    ops = bench.add_subparsers(dest="op", required=True)
    p = ops.add_parser("maxsim", help="MaxSim docs/sec: eager reference, torch.compile, fastrank")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--providers", default=None,
        help="comma-separated subset of eager,compile,fastrank (default: all on CUDA; eager,fastrank on CPU, "
        "where torch.compile spends minutes compiling C++)",
    )
    p.add_argument("--quick", action="store_true", help="only the re-rank cases")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.set_defaults(func=_cli_maxsim)


def _cli_maxsim(args) -> int:
    import json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    providers = tuple(args.providers.split(",")) if args.providers else (
        PROVIDERS if device.startswith("cuda") else ("eager", "fastrank"))
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise SystemExit(f"--providers: unknown {sorted(unknown)}; expected a subset of {','.join(PROVIDERS)}")
    cases = cuda_cases() if device.startswith("cuda") else cpu_cases()
    if args.quick:
        cases = [c for c in cases if c.name.startswith("rerank")]
    rows = run_maxsim(cases, device, providers)
    print(f"fastrank bench maxsim on {device_name(device)} (torch {torch.__version__})")
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0
