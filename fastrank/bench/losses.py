"""The distillation losses' benchmark inputs and providers, shared by `fastrank bench losses` and
benchmarks/bench_losses.py.

Each call is one forward + backward of a loss over a (B, K) score matrix (student scores against teacher
scores; column 0 the positive). Providers, each checked against the float64 reference (loss and gradient)
before it is timed: ``eager`` (the loss's ``*_ref``), ``compile`` (``torch.compile`` of it; CPU: only when
asked) and ``fastrank`` (the fused loss, default dispatch: the C++ kernel on CPU, Triton on CUDA). The unit
is queries/s (rows of the batch); the losses read s and t and write the gradient once, so the ceiling they
are held to is the read rate.
"""
from __future__ import annotations

import torch

from fastrank import losses

DISTILL = ("mse", "margin_mse", "m3se", "softmax_ce", "kl_div", "rankdistil_b")
GRID = tuple((b, k) for b in (32, 128, 512) for k in (2, 20, 128))
HEADLINE = (128, 20)
INBATCH = (128, 2560)
PROVIDERS = ("eager", "compile", "fastrank")
SWEPT = ("margin_mse", "softmax_ce")


def make_inputs(batch: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-encoder cosines times a temperature of 20, student and teacher independent."""
    gen = torch.Generator().manual_seed(batch * 1000 + k)
    s = ((torch.rand(batch, k, generator=gen) * 2 - 1) * 20).to(device)
    t = ((torch.rand(batch, k, generator=gen) * 2 - 1) * 20).to(device)
    return s, t


def loss_fn(provider: str, name: str):
    ref = getattr(losses, name + "_ref")
    if provider == "compile":
        torch._dynamo.reset()  # a fresh cache per shape: no silent fallback after the recompile limit
        return torch.compile(ref, dynamic=False)
    if provider == "eager":
        return ref
    if provider == "fastrank":
        return getattr(losses, name)
    raise ValueError(f"unknown loss provider {provider!r}; expected one of {PROVIDERS}")


def step(fn, s: torch.Tensor, t: torch.Tensor):
    """Forward + backward of ``fn(s, t)``: returns (loss, dloss/ds)."""
    def run():
        x = s.detach().requires_grad_(True)
        loss = fn(x, t)
        (grad,) = torch.autograd.grad(loss, x)
        return loss, grad
    return run


def reference(name: str, s: torch.Tensor, t: torch.Tensor):
    """The float64 truth every provider is held to."""
    return step(getattr(losses, name + "_ref"), s.double(), t.double())


def check(got, want) -> None:
    (loss, grad), (loss64, grad64) = got, want
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-4 * max(1.0, grad64.abs().max().item()))


def default_providers(device: str, compile: bool) -> list[str]:
    return ["eager"] + (["compile"] if compile or device.startswith("cuda") else []) + ["fastrank"]


def section(settings, probes) -> tuple[list[dict], list[str]]:
    """`fastrank bench losses`: every loss at B=128, K=20 and the B x K sweep of margin_mse and softmax_ce."""
    from fastrank.bench.suite import Shape, measure

    if not settings.wants("float32"):
        return [], [f"losses: float32 only (the fused losses' benchmark dtype); --dtype {','.join(settings.dtypes)} "
                    "asks for none of it"]
    device = settings.device
    if settings.tiny:
        headline, grid, names = (8, 3), ((4, 3), (8, 5)), ("margin_mse", "softmax_ce", "mse")
    elif settings.quick:
        headline, grid, names = HEADLINE, ((32, 20), (128, 20), (512, 20), (512, 128)), DISTILL
    else:
        headline, grid, names = HEADLINE, GRID, DISTILL
    providers = default_providers(device, settings.compile)
    # A swept loss's headline shape is a point of its sweep (timed once); the others get the headline alone.
    points = [(n, b, k, f"B x K ({n})") for n in names if n in SWEPT for b, k in grid]
    points += [(n, *headline, None) for n in names if n not in SWEPT or headline not in grid]
    rows = []
    for name, b, k, sweep in points:
        s, t = make_inputs(b, k, device)
        shape = Shape("losses", f"{name} B={b} K={k}", "float32", b, unit="queries/s", bytes=3.0 * b * k * 4,
                      ceiling="read_gbps", sweep=sweep, work=b * k if sweep else None)
        fns = {p: step(loss_fn(p, name), s, t) for p in providers}
        rows += measure(shape, fns, reference(name, s, t), check, settings, probes)
    return rows, []
