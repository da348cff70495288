"""The measurement half of ``scripts/gpu_check.sh``: issue 13's GPU targets, side by side in one run.

GPU time for this project comes in minutes, so everything here is prepared and checked on a CPU first:
``fastrank bench gpu --device cpu --quick`` runs the same code on tiny shapes (the test suite
does), and on a CUDA machine ``fastrank bench gpu --out DIR`` (or ``python -m fastrank.bench.gpu``) measures the target shapes:

- MaxSim forward 1x100,000 and 1x1,000 (Lq=32, Ld=200, H=128, bf16): docs/s, TB/s of d read once and that
  as a fraction of the read bandwidth measured in the same run; against eager and torch.compile.
- MaxSim forward+backward, grouped 32x20 and in-batch 128x128: time and peak memory against eager.
- LITE forward 1x1,000 and forward+backward over 128 pairs, against the eager reference.
- The fused losses forward+backward at B=128 K=20 against eager and torch.compile.
- Registers, spills and shared memory of every Triton kernel compiled during the run, in the rows of
  :mod:`fastrank.bench.kernels`, so they compare line by line with the static table
  (benchmarks/results/kernels_sm90.md, compiled for sm_90 without a GPU).

Every provider is checked against the reference before it is timed; a provider that cannot run says why in
its row instead of stopping the run. Each section prints its rows as it finishes, so a run cut short still
says what it measured. Nothing here is a claim until it has run on a GPU: the figures are what the run wrote.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

import torch

from fastrank import losses
from fastrank.bench.timing import time_call
from fastrank.bench.machine import machine_info, measure_ceilings
from fastrank.ops.lite import lite_ref, lite_score
from fastrank.ops.maxsim import maxsim_eager, maxsim, maxsim_ref

COLUMNS = ("section", "case", "provider", "us", "per_s", "tb_s", "bw_fraction", "vs_eager", "peak_mib", "error", "note")


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Seconds per call: CUDA-event medians through Triton's do_bench on a GPU, wall-clock medians elsewhere."""
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench

            return lambda fn: do_bench(fn, return_mode="median") * 1e-3
        except ImportError:
            pass
    return lambda fn: time_call(fn, device, min_seconds=0.2, max_reps=50)


def _peak_mib(device: str, fn: Callable[[], object]) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _error(got, want) -> float:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    return max(float((a.detach().double() - b.detach().double()).abs().max()) for a, b in zip(got, want))


class Run:
    def __init__(self, device: str, read_gbps: float | None, say: TextIO):
        self.device, self.read_gbps, self.rows, self.say = device, read_gbps, [], say
        self.time = _timer(device)

    def section(self, name: str, case: str, providers: dict, reference: Callable, *, items: int,
                bytes_read: float = 0.0, memory: bool = False, tol: float = 5e-2) -> None:
        """Time each provider of one case after checking it against ``reference`` (float64 or float32)."""
        want = reference()
        eager_s = None
        for provider, fn in providers.items():
            row = dict(section=name, case=case, provider=provider)
            try:
                err = _error(fn(), want)
                row["error"] = err
                if not err <= tol:
                    row["note"] = f"differs from the reference by {err:.3g} (> {tol}): not timed"
                    self._emit(row)
                    continue
                s = self.time(fn)
            except Exception as exc:  # a provider that cannot run here says why, the run goes on
                row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                self._emit(row)
                continue
            eager_s = s if provider == "eager" else eager_s
            row.update(us=s * 1e6, per_s=items / s)
            if bytes_read:
                row["tb_s"] = bytes_read / s / 1e12
                if self.read_gbps:
                    row["bw_fraction"] = bytes_read / s / 1e9 / self.read_gbps
            if eager_s is not None:
                row["vs_eager"] = eager_s / s
            if memory:
                row["peak_mib"] = _peak_mib(self.device, fn)
            self._emit(row)

    def _emit(self, row: dict) -> None:
        self.rows.append(row)
        print(" | ".join(_fmt(row.get(c)) for c in COLUMNS), file=self.say, flush=True)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _fwd_bwd(fn, *inputs):
    def run():
        out = fn()
        return torch.autograd.grad(out.float().sum(), inputs)
    return run


def measure(device: str = "cuda", quick: bool = False, compile: bool = True, say: TextIO = sys.stdout) -> dict:
    """Every section's rows, printed to ``say`` as each is measured (a run cut short still says what it measured)."""
    dt = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    ceilings = measure_ceilings(device, seconds=1.0 if quick else 2.5, gemm_n=256 if quick else 2048,
                                copy_mb=8 if quick else 512, read_mb=8 if quick else 1024)
    run = Run(device, ceilings["read_gbps"], say)
    print(" | ".join(COLUMNS), file=say, flush=True)
    lq, ld, h = (8, 24, 32) if quick else (32, 200, 128)

    def rand(*shape, dtype=dt, grad=False):
        return torch.randn(*shape, generator=g, device=device).to(dtype).requires_grad_(grad)

    # MaxSim forward: the serving case, d streamed once.
    for n in ((64, 500) if quick else (100_000, 1_000)):
        q, d = rand(lq, h), rand(n, ld, h)
        providers = {"eager": lambda: maxsim_eager(q, d), "fastrank": lambda: maxsim(q, d),
                     "triton": lambda: maxsim(q, d, backend="triton"), "cpp": lambda: maxsim(q, d, backend="cpp")}
        if compile:
            compiled = torch.compile(maxsim_eager)
            providers["compile"] = lambda: compiled(q, d)
        run.section("maxsim fwd", f"1x{n} Lq={lq} Ld={ld} H={h} bf16", providers, lambda: maxsim_ref(q, d),
                    items=n, bytes_read=d.numel() * d.element_size())

    # MaxSim forward+backward: training, grouped and in-batch.
    for case, (qs, ds) in {"grouped 32x20": ((32, 1, lq, h), (32, 20, ld, h)),
                           "in-batch 128x128": ((128, 1, lq, h), (1, 128, ld, h))}.items():
        if quick:
            qs, ds = (4, 1, lq, h), (4, 3, ld, h) if "grouped" in case else (1, 4, ld, h)
        q, d = rand(*qs, grad=True), rand(*ds, grad=True)
        pairs = q.shape[0] * d.shape[1]
        case = f"{case.split()[0]} {q.shape[0]}x{d.shape[1]}"
        run.section("maxsim fwd+bwd", case, {
            "eager": _fwd_bwd(lambda: maxsim_eager(q, d), q, d),
            "fastrank": _fwd_bwd(lambda: maxsim(q, d), q, d),
        }, _fwd_bwd(lambda: maxsim_ref(q, d), q, d), items=pairs, memory=True, tol=0.5)

    # LITE: serving (1x1,000) and training (128 pairs).
    from fastrank.nn import LiteScorer

    scorer = LiteScorer(lq=lq, ld=ld, **({"row_hidden": 64, "col_hidden": 16} if quick else {})).to(device, dt)
    n = 50 if quick else 1_000
    q, d = rand(lq, h), rand(n, ld, h)
    run.section("lite fwd", f"1x{n}", {"eager": lambda: lite_score(q, d, scorer=scorer, backend="reference"),
                                        "fastrank": lambda: lite_score(q, d, scorer=scorer)},
                lambda: lite_ref(q, d, scorer=scorer), items=n)
    b = 4 if quick else 16
    q, d = rand(b, 1, lq, h, grad=True), rand(b, 8, ld, h, grad=True)
    run.section("lite fwd+bwd", f"{b}x8 pairs", {
        "eager": _fwd_bwd(lambda: lite_score(q, d, scorer=scorer, backend="reference"), q, d),
        "fastrank": _fwd_bwd(lambda: lite_score(q, d, scorer=scorer), q, d),
    }, _fwd_bwd(lambda: lite_ref(q, d, scorer=scorer), q, d), items=b * 8, memory=True, tol=0.5)

    # The fused losses, B=128 K=20.
    s, t = rand(128, 20, dtype=torch.float32, grad=True), rand(128, 20, dtype=torch.float32)
    for name in ("softmax_ce", "margin_mse"):
        fused, ref = getattr(losses, name), getattr(losses, name + "_ref")
        providers = {"eager": _fwd_bwd(lambda: ref(s, t), s), "fastrank": _fwd_bwd(lambda: fused(s, t), s)}
        if compile:
            compiled_ref = torch.compile(ref)
            providers["compile"] = _fwd_bwd(lambda: compiled_ref(s, t), s)
        run.section("loss fwd+bwd", f"{name} B=128 K=20", providers, _fwd_bwd(lambda: ref(s, t), s), items=128,
                    tol=1e-3)

    return {"machine": machine_info(device), "ceilings": ceilings, "rows": run.rows, "kernels": kernel_resources()}


def kernel_resources() -> list[dict]:
    """Every Triton kernel compiled and loaded in this process, as rows of :mod:`fastrank.bench.kernels` (the
    static sm_80/sm_90 table's format, read here from the driver: n_regs, n_spills), so that the run's
    kernels and the static table compare row by row. Empty where nothing was compiled (CPU, interpreter)."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:
        return []

    from fastrank.bench import kernels as kernel_report
    from fastrank.ops import lite as lite_ops, maxsim as maxsim_ops, maxsim_packed_triton as packed_ops

    out, seen = [], set()
    for module in (maxsim_ops, packed_ops, lite_ops):
        for name, kernel in vars(module).items():
            if not isinstance(kernel, KernelInterface):
                continue
            for cache in getattr(kernel_report.jit_of(kernel), "device_caches", {}).values():
                for compiled in cache[0].values():
                    if id(compiled) not in seen and hasattr(compiled, "src"):
                        seen.add(id(compiled))
                        out.append(kernel_report.runtime_row(name, module.__name__, kernel, compiled))
    return out


def format_report(res: dict) -> str:
    m = res["machine"]
    lines = [f"# fastrank GPU check: {m.get('gpu', m['device'])}", "",
             f"Measured by `scripts/gpu_check.sh` (fastrank.bench.gpu) on {time.strftime('%Y-%m-%d')}: "
             f"{m.get('gpu', 'no GPU')}, host CPU {m['cpu']}, torch {m['torch']}, commit {m['commit']}. "
             f"Read bandwidth measured in the same run: {res['ceilings']['read_gbps']:.1f} GB/s; copy "
             f"{res['ceilings']['copy_gbps']:.1f} GB/s (read+write).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in res["rows"]]
    if res["kernels"]:
        from fastrank.bench.kernels import TABLE_HEAD, format_row

        # The static table's columns (benchmarks/results/kernels_sm90.md), row for row.
        lines += ["", "Kernels this run compiled (registers and spilled bytes from the driver):", "", TABLE_HEAD]
        lines += [format_row(k) for k in res["kernels"]]
    return "\n".join(lines)


if __name__ == "__main__":  # the entry point: the same as `fastrank bench gpu`
    from fastrank.cli import main

    raise SystemExit(main(["bench", "gpu", *sys.argv[1:]]))
