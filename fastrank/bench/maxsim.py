"""Side-by-side MaxSim timing for `fastrank bench maxsim` and for the pytest-benchmark suite in
benchmarks/, which imports the shapes, providers and row arithmetic from here.

Providers (each checked against :func:`fastrank.maxsim_ref` before it is timed):

- ``eager``: the fastest plain-PyTorch form, ``matmul`` + ``amax`` in the inputs' dtype (:func:`maxsim_eager`);
- ``eager_fp32``: the same on float32 copies of bf16/fp16 inputs (made outside the timed region: a user
  who keeps float32 embeddings), because eager bf16 is slower than eager fp32 on CPUs without fast bf16;
- ``einsum``: PyLate's form (:func:`maxsim_einsum`);
- ``compile``: ``torch.compile`` of the eager form (CPU: only when asked; Inductor compiles C++ for minutes);
- ``fastrank``: ``fastrank.maxsim`` with default dispatch, what users get;
- ``fastrank:<isa>``: the C++ kernel forced onto one CPU ISA path (``fastrank.cpu_isa.use``);
- ``maxsim-cpu``: the PyPI peer, float32 re-ranking only, when it is installed.

Every figure is measured in the same process, on the same inputs, next to the machine's own ceilings
(:mod:`fastrank.bench.machine`); ratios are computed from those measurements, never stored. ``--out DIR`` runs
these cases and the scaling sweeps through :mod:`fastrank.bench.all` (the machinery of `fastrank bench all`)
and writes report.md, results.json and figures.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastrank.bench import machine
from fastrank.bench.suite import Settings, Shape, measure
from fastrank.bench.timing import time_interleaved
from fastrank.ops.maxsim import maxsim, maxsim_ref

# The eager forms; "fastest eager" in every ratio is the fastest of these measured on the case.
EAGER_PROVIDERS = ("eager", "eager_fp32", "einsum")
PROVIDERS = (*EAGER_PROVIDERS, "compile", "fastrank", "maxsim-cpu")  # plus "fastrank:<isa>" per ISA path
ISA_PREFIX = "fastrank:"

# Issue 9's targets for fastrank rows.
TARGET_VS_EAGER_FP32 = 1.5       # fp32 forward, and forward+backward
TARGET_VS_EAGER_LOWP = 3.0       # bf16 forward, against the fastest eager in fp32 or bf16
TARGET_SGEMM_FRACTION = 0.75     # fp32 forward: FLOP rate / the machine's large-sgemm rate
TARGET_FLOOR_RATIO = 1.5         # bf16 forward: time / max(compute at the GEMM rate, reading d once)


@dataclass(frozen=True)
class MaxSimCase:
    """One benchmark shape. ``form``: "rerank" (1 query x docs), "grouped" (queries x docs each, a
    training batch) or "allpairs" (queries x queries in-batch). ``backward`` times forward+backward.
    ``targeted``: issue 9 sets a target for this shape (the target column is left blank otherwise)."""

    name: str
    form: str
    queries: int
    docs: int
    lq: int = 32
    ld: int = 200
    h: int = 128
    dtype: torch.dtype = torch.float32
    backward: bool = False
    targeted: bool = True

    @property
    def pairs(self) -> int:
        return self.queries * self.docs if self.form != "allpairs" else self.queries * self.queries

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def make(self, device: str, seed: int = 0):
        """Unit-norm random embeddings (as ColBERT's), docs of random length in [ld/2, ld] behind d_mask."""
        q_shape, d_shape = pair_shapes(self.form, self.queries, self.docs, self.lq, self.ld, self.h)
        return random_tokens(q_shape, d_shape, device, self.dtype, seed)

    def bytes_read(self) -> int:
        """Bytes a fused kernel must read once: q, d and the mask (effective-bandwidth numerator)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        n_q = 1 if self.form == "rerank" else self.queries
        n_d = self.docs if self.form == "rerank" else (self.queries * self.docs if self.form == "grouped" else self.queries)
        return n_q * self.lq * self.h * size + n_d * self.ld * (self.h * size + 1)

    def similarity_bytes(self) -> int:
        """The float32 (pairs, Lq, Ld) matrix the eager reference materialises."""
        return self.pairs * self.lq * self.ld * 4


def random_tokens(q_shape: tuple, d_shape: tuple, device: str, dtype: torch.dtype, seed: int = 0):
    """(q, d, None, d_mask): unit-norm random token embeddings of these shapes; every document valid for a
    random length in [Ld/2, Ld] (Ld = d_shape[-2]), the rest behind d_mask. Shared by every benchmark that
    scores tokens (MaxSim here, LITE in fastrank.bench.lite)."""
    g = torch.Generator().manual_seed(seed)
    ld = d_shape[-2]
    q = torch.nn.functional.normalize(torch.randn(q_shape, generator=g), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(d_shape, generator=g), dim=-1)
    lengths = torch.randint(max(1, ld // 2), ld + 1, d_shape[:-2], generator=g)
    d_mask = torch.arange(ld) < lengths.unsqueeze(-1)
    return q.to(device=device, dtype=dtype), d.to(device=device, dtype=dtype), None, d_mask.to(device)


def pair_shapes(form: str, queries: int, docs: int, lq: int, ld: int, h: int) -> tuple[tuple, tuple]:
    """q and d shapes of a benchmark form: "rerank" (one query, docs documents), "grouped" (queries x docs
    candidates each) or "allpairs" (every query against every query's document)."""
    if form == "rerank":
        return (lq, h), (docs, ld, h)
    if form == "grouped":
        return (queries, 1, lq, h), (queries, docs, ld, h)
    return (queries, 1, lq, h), (1, queries, ld, h)

def cpu_cases() -> list[MaxSimCase]:
    bf16, fp16 = torch.bfloat16, torch.float16
    cases = [MaxSimCase("rerank 1x10 H=128", "rerank", 1, 10, h=128, targeted=False)]  # small-batch overhead
    for docs in (1000, 10000):
        for h in (128, 768):
            cases += [MaxSimCase(f"rerank 1x{docs} H={h}", "rerank", 1, docs, h=h, dtype=dtype)
                      for dtype in (torch.float32, bf16)]
    cases.insert(3, MaxSimCase("rerank 1x1000 H=128", "rerank", 1, 1000, h=128, dtype=fp16, targeted=False))
    return cases + [
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


def select_cases(cases: list[MaxSimCase], quick: bool = False, names: Optional[str] = None) -> list[MaxSimCase]:
    """``quick``: only the 1x1000 re-rank cases; ``names``: comma-separated substrings of case names."""
    if quick:
        cases = [c for c in cases if c.form == "rerank" and c.docs == 1000]
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    return cases


# ------------------------------------------------------------------------------------------- eager forms

def maxsim_eager(q, d, q_mask=None, d_mask=None):
    """The fastest plain-PyTorch MaxSim we know: one matmul in the inputs' dtype, padded doc tokens
    filled with -inf in place, ``amax`` over the doc axis, the sum in float32. S is laid out
    (..., Ld, Lq) so the matmul reads d row-major as stored. Unlike the reference, a document with no
    valid token scores -inf, not 0 (no benchmark input has one; `check` would catch it)."""
    s = torch.matmul(d, q.transpose(-1, -2))
    if d_mask is not None:
        s.masked_fill_(~d_mask[..., None], float("-inf"))
    best = s.amax(-2)
    if q_mask is not None:
        best = best.masked_fill(~q_mask, 0.0)
    return best.sum(-1, dtype=torch.float32)


# PyLate's einsum per form: the query axis is squeezed so in-batch scoring is one GEMM, not B copies of d.
_EINSUM = {"rerank": "sh,bth->bst", "grouped": "ash,akth->akst", "allpairs": "ash,bth->abst"}


def maxsim_einsum(q, d, q_mask=None, d_mask=None, form: str = "rerank"):
    """MaxSim as PyLate writes it (einsum, mask, ``.max(-1).values.sum(-1)``), in the inputs' dtype."""
    # The masks keep their broadcast shapes: S comes out (pair dims..., Lq, Ld) in every form.
    if form == "grouped":
        s = torch.einsum(_EINSUM[form], q[:, 0], d)
    elif form == "allpairs":
        s = torch.einsum(_EINSUM[form], q[:, 0], d[0])
    else:
        s = torch.einsum(_EINSUM[form], q, d)
    if d_mask is not None:
        s = s.masked_fill(~d_mask[..., None, :], float("-inf"))
    best = s.max(-1).values
    if q_mask is not None:
        best = best.masked_fill(~q_mask, 0.0)
    return best.sum(-1)


# ------------------------------------------------------------------------------------------- providers

def fastrank_isa_providers(isas: Optional[list[str]] = None) -> list[str]:
    """``fastrank:<isa>`` for the given ISA paths, or for every path this CPU and build can run except
    ``scalar`` (a test path). Empty without the compiled extension."""
    if isas is None:
        isas = [i for i in emulated_paths(machine.isa_paths()) if i != "scalar"]
    return [ISA_PREFIX + i for i in isas]


# maxsim-cpu 0.1.0 (the PyPI wheel) gives inf scores at H=129..160 and kills the process at H >= 192
# (checked against numpy on this repository's dev VM); a crash would end the whole benchmark run.
MAXSIM_CPU_MAX_H = 128


def maxsim_cpu_installed() -> bool:
    return importlib.util.find_spec("maxsim_cpu") is not None


def default_providers(device: str, compile: bool = False, isas: Optional[list[str]] = None) -> list[str]:
    """Every provider that can run on ``device``, eager forms first (the ratios need them)."""
    providers = list(EAGER_PROVIDERS) + (["compile"] if compile else []) + ["fastrank"]
    if device == "cpu":
        providers += fastrank_isa_providers(isas)
        if maxsim_cpu_installed():
            providers.append("maxsim-cpu")
    return providers


def skip_reason(provider: str, case: MaxSimCase, device: str) -> Optional[str]:
    """Why ``provider`` has no row for ``case`` (None: it runs)."""
    if provider == "eager_fp32" and case.dtype == torch.float32:
        return "inputs are float32 already (same as eager)"
    if provider.startswith(ISA_PREFIX) and device != "cpu":
        return "CPU ISA paths run on CPU tensors"
    if provider == "maxsim-cpu":
        if device != "cpu" or case.form != "rerank" or case.backward or case.dtype != torch.float32:
            return "maxsim-cpu scores one float32 query against docs, forward only"
        if case.h > MAXSIM_CPU_MAX_H:
            return f"maxsim-cpu 0.1.0 returns inf or segfaults for H > {MAXSIM_CPU_MAX_H}"
        if not maxsim_cpu_installed():
            return "maxsim-cpu is not installed (pip install maxsim-cpu)"
    return None


def case_providers(case: MaxSimCase, providers, device: str) -> list[str]:
    return [p for p in providers if skip_reason(p, case, device) is None]


# Paths whose bf16 compute ceiling is the measured bf16 GEMM rate (AMX tiles, GPU tensor cores); every
# other path is held to the sgemm rate (AVX2/AVX-512 kernels widen bf16 to float32 FMAs).
BF16_GEMM_PATHS = ("amx", "cuda")


def default_path(device: str) -> str:
    """The code path fastrank.maxsim takes by default on ``device``: the CPU ISA path, or "cuda"."""
    return "cuda" if device.startswith("cuda") else machine.selected_isa()


def provider_isa(provider: str, default_isa: str) -> str:
    """The path whose ceilings a row is held to: its own for ``fastrank:<isa>``, otherwise the default
    path (the fastest this machine offers users)."""
    return provider[len(ISA_PREFIX):] if provider.startswith(ISA_PREFIX) else default_isa


def _maxsim_cpu_fn(q, d, q_mask, d_mask):
    """maxsim-cpu takes numpy float32 and a list of variable-length docs (its way of honouring a mask);
    the conversion happens here, outside the timed call."""
    import maxsim_cpu

    if q_mask is not None:
        q = q[q_mask]
    qn = q.contiguous().numpy()
    docs = [(d[i] if d_mask is None else d[i][d_mask[i]]).contiguous().numpy() for i in range(d.shape[0])]
    return lambda: torch.from_numpy(maxsim_cpu.maxsim_scores_variable(qn, docs))


def provider_fn(provider: str, case: MaxSimCase, inputs, backend: Optional[str] = None) -> Callable[[], object]:
    """A no-argument callable running one forward (or forward+backward) of ``provider`` on ``inputs``.
    ``"reference"`` is :func:`fastrank.maxsim_ref` (what `check` compares against; not a timed provider)."""
    q, d, q_mask, d_mask = inputs
    context = contextlib.nullcontext
    if provider == "reference":
        score = maxsim_ref
    elif provider == "eager":
        score = maxsim_eager
    elif provider == "eager_fp32":
        q, d = q.float(), d.float()
        score = maxsim_eager
    elif provider == "einsum":
        score = lambda *a: maxsim_einsum(*a, form=case.form)  # noqa: E731
    elif provider == "compile":
        torch._dynamo.reset()  # a fresh cache per shape: no silent fallback after the recompile limit
        score = torch.compile(maxsim_eager, dynamic=False)
    elif provider == "fastrank":
        score = lambda *a: maxsim(*a, backend=backend)  # noqa: E731
    elif provider.startswith(ISA_PREFIX):
        from fastrank import cpu_isa

        isa = provider[len(ISA_PREFIX):]
        context = lambda: cpu_isa.use(isa)  # noqa: E731
        score = lambda *a: maxsim(*a, backend="cpp")  # noqa: E731
    elif provider == "maxsim-cpu":
        if case.backward:
            raise ValueError("maxsim-cpu has no backward")
        return _maxsim_cpu_fn(q, d, q_mask, d_mask)
    else:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS} or {ISA_PREFIX}<isa>")
    if not case.backward:
        def forward():
            with context():
                return score(q, d, q_mask, d_mask)

        return forward
    qg, dg = q.detach().requires_grad_(), d.detach().requires_grad_()
    weights = torch.linspace(0.5, 1.5, case.pairs, device=q.device)

    def step():
        with context():
            out = score(qg, dg, q_mask, d_mask)
            return torch.autograd.grad((out.reshape(-1) * weights).sum(), (qg, dg))

    return step


def check(provider_out, reference_out, dtype: torch.dtype) -> None:
    """Each provider must agree with the reference (:func:`fastrank.maxsim_ref`) before it is timed."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    outs = provider_out if isinstance(provider_out, tuple) else (provider_out,)
    refs = reference_out if isinstance(reference_out, tuple) else (reference_out,)
    assert len(outs) == len(refs), f"{len(outs)} outputs, the reference has {len(refs)}"
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


# Environment that makes this CPU behave, for fastrank and for eager PyTorch alike, like one whose best
# instruction set is the key: an AVX2-only EPYC, an AVX-512 Xeon without BF16, a Zen 4 with AVX512-BF16.
# MKL and oneDNN read these when torch first loads them, hence a fresh process.
EMULATE_ENV = {
    "avx2": {"FASTRANK_CPU_ISA": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2"},
    "avx512": {"FASTRANK_CPU_ISA": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "ATEN_CPU_CAPABILITY": "avx512"},
    "avx512bf16": {"FASTRANK_CPU_ISA": "avx512bf16", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
                   "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ATEN_CPU_CAPABILITY": "avx512"},
}


def emulated_paths(paths: list[str]) -> list[str]:
    """Under --emulate, only the paths the emulated CPU would have (the forced one and below)."""
    forced = os.environ.get("FASTRANK_BENCH_EMULATING")
    order = ["scalar", "avx2", "avx512", "avx512bf16", "amx"]
    if not forced or forced not in order:
        return paths
    return [p for p in paths if p in order and order.index(p) <= order.index(forced)]


# ------------------------------------------------------------------------------------------- row arithmetic

def case_work(case: MaxSimCase, inputs) -> dict:
    """What the inputs ask of any kernel: forward FLOPs over valid tokens only (2·Lq·Ld_valid·H per
    pair) and the bytes of d's valid tokens, read once."""
    q, d, q_mask, d_mask = inputs
    n_docs = d[..., 0, 0].numel()
    valid_doc_tokens = int(d_mask.sum()) if d_mask is not None else n_docs * d.shape[-2]
    lq = int(q_mask.sum()) / q[..., 0, 0].numel() if q_mask is not None else q.shape[-2]  # mean valid Lq
    return {
        "flops": 2.0 * lq * valid_doc_tokens * (case.pairs / n_docs) * case.h,
        "d_valid_bytes": valid_doc_tokens * case.h * d.element_size(),
    }


def ceiling_metrics(case: MaxSimCase, work: dict, seconds: float, isa: str, ceilings: Optional[dict]) -> dict:
    """Forward rows against the machine's ceilings measured in this run:

    - ``sgemm_fraction`` = (valid-token FLOPs / time) / large-sgemm rate;
    - ``floor_ms`` = max(FLOPs at the sgemm rate, or at the bf16 GEMM rate for bf16 on AMX or CUDA;
      d's valid tokens read once at ``read_gbps``), the time no kernel can beat;
    - ``floor_ratio`` = time / floor (issue 9: <= 1.5 for bf16).

    None for forward+backward rows (their target is a speedup only) and when no ceilings were measured.
    """
    metrics = {"GFLOP_per_s": None, "sgemm_fraction": None, "peak_fraction": None, "floor_ms": None,
               "floor_ratio": None}
    if case.backward:
        return metrics
    metrics["GFLOP_per_s"] = work["flops"] / seconds / 1e9
    if not ceilings:
        return metrics
    bf16_gemm = isa in BF16_GEMM_PATHS and case.dtype == torch.bfloat16
    rate = ceilings["bf16_gemm_gflops"] if bf16_gemm else ceilings["sgemm_gflops"]
    floor = max(work["flops"] / (rate * 1e9), work["d_valid_bytes"] / (ceilings["read_gbps"] * 1e9))
    # bfloat16 on the paths with bfloat16 products is bounded by their peak (amx: its tiles; avx512bf16:
    # vdpbf16ps), anything else by the FMA peak.
    bf16_dot = case.dtype == torch.bfloat16 and isa in ("avx512bf16", "amx")
    peak = machine.peak_for("bf16_gemm_gflops" if bf16_dot else "sgemm_gflops", ceilings, isa)
    metrics.update({
        "sgemm_fraction": metrics["GFLOP_per_s"] / ceilings["sgemm_gflops"],
        "peak_fraction": metrics["GFLOP_per_s"] / peak if peak else None,
        "floor_ms": floor * 1e3,
        "floor_ratio": seconds / floor,
    })
    return metrics


def target_verdict(case: MaxSimCase, provider: str, row: dict) -> str:
    """"met", "miss: <what>", or "" (not a fastrank row, or no target for this case)."""
    if not case.targeted or not provider.startswith("fastrank"):
        return ""
    low_precision = case.dtype != torch.float32
    need = TARGET_VS_EAGER_LOWP if (low_precision and not case.backward) else TARGET_VS_EAGER_FP32
    misses, judged = [], False
    if row.get("vs_fastest_eager") is not None:
        judged = True
        if row["vs_fastest_eager"] < need:
            misses.append(f"{row['vs_fastest_eager']:.2f}x eager < {need:g}x")
    if not case.backward and not low_precision and row.get("sgemm_fraction") is not None:
        judged = True
        if row["sgemm_fraction"] < TARGET_SGEMM_FRACTION:
            misses.append(f"sgemm {row['sgemm_fraction']:.0%} < {TARGET_SGEMM_FRACTION:.0%}")
    if not case.backward and low_precision and row.get("floor_ratio") is not None:
        judged = True
        if row["floor_ratio"] > TARGET_FLOOR_RATIO:
            misses.append(f"floor {row['floor_ratio']:.2f}x > {TARGET_FLOOR_RATIO:g}x")
    if not judged:
        return ""
    return "miss: " + "; ".join(misses) if misses else "met"


def result_row(case: MaxSimCase, work: dict, provider: str, seconds: float, eager_seconds: dict,
               ceilings: Optional[dict], default_isa: str) -> dict:
    """One table row; ``eager_seconds`` holds the eager forms measured on this case (provider -> s).
    The CLI and the pytest benchmarks both build their figures here."""
    fastest = min(eager_seconds, key=eager_seconds.get) if eager_seconds else None
    isa = provider_isa(provider, default_isa)
    row = {
        "case": case.name,
        "dtype": case.dtype_name,
        "provider": provider,
        "isa": isa if provider.startswith("fastrank") else None,
        "ms": seconds * 1e3,
        "docs_per_s": case.pairs / seconds,
        "GB_per_s": case.bytes_read() / seconds / 1e9,
        "fastest_eager": fastest,
        "vs_fastest_eager": eager_seconds[fastest] / seconds if fastest else None,
        **ceiling_metrics(case, work, seconds, isa, ceilings),
    }
    row["target"] = target_verdict(case, provider, row)
    return row


PROBE_PREFIX = "ceiling:"


def run_maxsim(cases: list[MaxSimCase], device: str, providers=None, progress: bool = True,
               ceilings: Optional[dict] = None, default_isa: Optional[str] = None,
               min_seconds: float = 0.3) -> list[dict]:
    """Check, then time every provider that applies on every case; one row per (case, provider).

    With ``ceilings`` (the run's up-front measurement, for the header), the sgemm, bf16 GEMM and read rates
    are re-measured in each case's interleaved rounds and the rows' fractions use those."""
    from fastrank.progress import progress_bar

    providers = default_providers(device) if providers is None else list(providers)
    default_isa = default_path(device) if default_isa is None else default_isa
    probes = machine.ceiling_probes(device) if ceilings else {}
    rows = []
    for case in progress_bar(cases, desc="maxsim bench", enabled=progress):
        inputs = case.make(device)
        work = case_work(case, inputs)
        reference = provider_fn("reference", case, inputs)()
        fns = {}
        for provider in case_providers(case, providers, device):
            fn = provider_fn(provider, case, inputs)
            check(fn(), reference, case.dtype)  # doubles as the warm-up (and torch.compile's compile)
            fns[provider] = fn
        for name, (fn, _) in probes.items():  # the ceilings, timed in the same rounds as the providers
            fn()
            fns[PROBE_PREFIX + name] = fn
        seconds = time_interleaved(fns, device, min_seconds=min_seconds)
        del fns  # frees eager_fp32's float32 copies
        case_ceilings = dict(ceilings) if ceilings else None
        for name, (_, units) in probes.items():
            case_ceilings[name] = units / seconds.pop(PROBE_PREFIX + name) / 1e9
        eager = {p: s for p, s in seconds.items() if p in EAGER_PROVIDERS}
        for p, sec in seconds.items():
            row = result_row(case, work, p, sec, eager, case_ceilings, default_isa)
            if case_ceilings:
                row["ceilings"] = {k: case_ceilings.get(k) for k in ("sgemm_gflops", "bf16_gemm_gflops", "read_gbps",
                                                                      "fma_peak_gflops", "bf16_dot_peak_gflops",
                                                                      "amx_tile_peak_gflops")}
            rows.append(row)
        del inputs, reference
    return rows


# ------------------------------------------------------------------------------------------- report

def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def format_header(info: dict, ceilings: Optional[dict]) -> str:
    """Where the table ran: CPU, default ISA path, threads, torch, and this run's ceilings."""
    where = info.get("gpu") or info["cpu"]
    lines = [
        f"fastrank bench maxsim on {info['device']}: {where}",
        f"  CPU {info['cpu']} ({info.get('cpu_signature') or 'no signature'}); fastrank ISA path: {info['isa']} by default "
        f"(available: {', '.join(info['isa_paths'])}; flags: {' '.join(info['isa_flags']) or 'none'})",
        f"  {info['threads']} torch threads (fastrank and eager; {info['logical_cpus']} logical CPUs); "
        f"torch {info['torch']}; Python {info['python']}; fastrank commit {info.get('commit') or 'unknown'}",
    ]
    emulating = os.environ.get("FASTRANK_BENCH_EMULATING")
    if emulating:
        limits = ", ".join(f"{k}={v}" for k, v in EMULATE_ENV[emulating].items())
        lines.append(f"  EMULATING a CPU whose best path is {emulating}: {limits} (eager's BLAS limited the same way)")
    if info.get("maxsim_cpu"):
        lines.append(f"  maxsim-cpu {info['maxsim_cpu']} (its own Rayon pool: RAYON_NUM_THREADS or every logical CPU)")
    if ceilings:
        lines.append(
            f"  ceilings measured in this run at {ceilings['threads']} threads: "
            f"sgemm {ceilings['gemm_n']}^3 {ceilings['sgemm_gflops']:.1f} GFLOP/s, "
            f"bf16 GEMM {ceilings['bf16_gemm_gflops']:.1f} GFLOP/s, "
            f"copy {ceilings['copy_gbps']:.1f} GB/s (read+write), read {ceilings['read_gbps']:.1f} GB/s"
            f"{machine.peak_text(ceilings)}"
        )
        lines.append("  each case re-measures sgemm (1024^3), bf16 GEMM and the read rate (512 MB) in its own "
                     "interleaved rounds; its rows' sgemm and floor columns use those (JSON: row['ceilings'])")
    else:
        lines.append("  ceilings not measured (sgemm/floor columns empty)")
    lines.append(
        "  vs eager: against the fastest of eager, eager_fp32, einsum on the case; sgemm: valid-token "
        "FLOP rate / sgemm rate; peak: valid-token FLOP rate / the ISA path's multiply-add peak (bf16 dot peak "
        "for bf16 on a path with one); floor: time / max(FLOPs at the GEMM rate, reading d's valid tokens once); "
        "sgemm@: the case's sgemm GFLOP/s"
    )
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    header = (f"{'case':<31} {'dtype':<8} {'provider':<19} {'ms':>9} {'docs/s':>11} {'GB/s':>6} {'GFLOP/s':>8} "
              f"{'vs eager':>8} {'sgemm':>6} {'peak':>5} {'floor':>7} {'sgemm@':>7}  target")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['case']:<31} {r['dtype']:<8} {r['provider']:<19} {r['ms']:>9.3f} {r['docs_per_s']:>11,.0f} "
            f"{r['GB_per_s']:>6.2f} {_fmt(r.get('GFLOP_per_s'), '.1f'):>8} "
            f"{_fmt(r.get('vs_fastest_eager'), '.2f', 'x'):>8} {_fmt(r.get('sgemm_fraction'), '.0%'):>6} "
            f"{_fmt(r.get('peak_fraction'), '.0%'):>5} "
            f"{_fmt(r.get('floor_ratio'), '.2f', 'x'):>7} {_fmt((r.get('ceilings') or {}).get('sgemm_gflops'), '.0f'):>7}"
            f"  {r.get('target', '')}"
        )
    return "\n".join(lines)


def format_report(info: dict, ceilings: Optional[dict], rows: list[dict]) -> str:
    return format_header(info, ceilings) + "\n\n" + format_rows(rows)


# ------------------------------------------------------------------------------------------- bench all's section

def maxsim_sweeps(device: str, quick: bool, tiny: bool, dtype: torch.dtype) -> list:
    """1-query re-ranking cases along three axes (documents, Ld, H), each case tagged with its sweep."""
    def case(docs, ld, h, lq=32):
        return MaxSimCase(f"rerank 1x{docs} Ld={ld} H={h}", "rerank", 1, docs, lq=lq, ld=ld, h=h, dtype=dtype,
                          targeted=False)

    if tiny:
        return ([("docs", c.docs, c) for c in (case(3, 9, 16, 7), case(6, 9, 16, 7))]
                + [("Ld", c.ld, c) for c in (case(4, 5, 16, 7), case(4, 11, 16, 7))])
    gpu = device.startswith("cuda")
    if gpu:
        docs = (100, 1000, 10000, 100000) if quick else (100, 300, 1000, 3000, 10000, 30000, 100000)
    else:
        docs = (100, 1000, 5000) if quick else (100, 300, 1000, 3000, 10000, 20000)
    lds = (32, 128, 512) if quick else (32, 64, 128, 256, 512)
    out = [("docs", n, case(n, 200, 128)) for n in docs] + [("Ld", ld, case(1000, ld, 128)) for ld in lds]
    if not quick:  # H 128 and 768 at 1x1000 are main cases in the quick run already
        out += [("H", h, case(1000, 200, h)) for h in (128, 768)]
    return out


def _maxsim_shape(case, sweep, work, inputs, device):
    bf16_hw = default_path(device) in BF16_GEMM_PATHS and case.dtype == torch.bfloat16
    label = {"docs": f"docs (Ld={case.ld}, H={case.h})", "Ld": f"Ld (1x{case.docs}, H={case.h})",
             "H": f"H (1x{case.docs}, Ld={case.ld})"}.get(sweep)
    return Shape("maxsim", case.name + (" fwd+bwd" if case.backward and "bwd" not in case.name else ""),
                 case.dtype_name, case.pairs, unit="docs/s",
                 # forward+backward rows get no FLOP count: their target is a speedup only (TARGET_* above)
                 flops=None if case.backward else case_work(case, inputs)["flops"],
                 bytes=case.bytes_read(), ceiling="bf16_gemm_gflops" if bf16_hw else "sgemm_gflops",
                 sweep=label, work=work, baselines=EAGER_PROVIDERS)


def section(settings: Settings, probes) -> tuple[list[dict], list[str]]:
    """`fastrank bench all`'s MaxSim: the cases of `bench maxsim`, then the sweeps, as suite rows."""
    device = settings.device
    gpu = device.startswith("cuda")
    compile = settings.compile or gpu
    if settings.tiny:
        cases = [MaxSimCase("tiny rerank", "rerank", 1, 4, lq=7, ld=9, h=16, dtype=dt)
                 for dt in (torch.float32, torch.bfloat16)]
        cases.append(MaxSimCase("tiny train fwd+bwd", "grouped", 3, 4, lq=7, ld=9, h=16, backward=True))
    else:
        cases = select_cases(cuda_cases() if gpu else cpu_cases(), quick=settings.quick)
    cases = [c for c in cases if settings.wants(c.dtype_name)]
    sweep_dtypes = ([torch.bfloat16] if gpu else [torch.float32]) if settings.dtypes is None else \
        [getattr(torch, n) for n in settings.dtypes]
    main_providers = default_providers(device, compile=compile)
    # The sweeps show how cost grows, provider by provider: the eager forms and fastrank's default path
    # (each ISA path is in the main cases).
    sweep_providers = [p for p in main_providers if not p.startswith(ISA_PREFIX)]
    points = [(None, None, c) for c in cases]
    points += [pt for dt in sweep_dtypes for pt in maxsim_sweeps(device, settings.quick, settings.tiny, dt)]
    rows = []
    for sweep, work, case in points:
        inputs = case.make(device)
        providers = case_providers(case, main_providers if sweep is None else sweep_providers, device)
        fns = {p: provider_fn(p, case, inputs) for p in providers}
        rows += measure(_maxsim_shape(case, sweep, work, inputs, device), fns,
                        provider_fn("reference", case, inputs),
                        lambda got, want, dt=case.dtype: check(got, want, dt), settings, probes)
        del inputs, fns
    return rows, []
