"""What every section of `fastrank bench all` shares: one row schema, the check-then-time step, the scaling fit.

A section (MaxSim, LITE, losses, index, packed) describes each shape it times as a :class:`Shape` (the work
one call does: items, FLOPs, bytes, which ceiling bounds it, the sweep it belongs to) and hands
:func:`measure` its providers as no-argument callables. :func:`measure` runs the reference once, checks each
provider's output against it and *refuses* a provider that disagrees or raises (it gets a row saying why,
and is never timed: a fast wrong answer must not reach a table), then times the rest in interleaved rounds
(:func:`fastrank.bench.timing.time_interleaved`) together with the machine's ceilings, so a shared machine's drift
falls on providers and ceilings alike. Every ratio is computed from those measurements; nothing is typed in.

Rows carry the keys the issue asks for (op, provider, shape, dtype, docs_per_s, ratio_to_eager,
peak_mem_bytes, ceiling_fraction) plus what the report and the plots need. ``docs_per_s`` is items per
second in the section's unit (docs/s for MaxSim, pairs/s for LITE, queries/s for losses and index), named
by ``unit``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastrank.bench import machine
from fastrank.bench.timing import time_interleaved

PROBE_PREFIX = "ceiling:"
CEILING_LABELS = {"sgemm_gflops": "sgemm", "bf16_gemm_gflops": "bf16 GEMM", "read_gbps": "DRAM read"}


@dataclass
class Settings:
    """How a run is sized. ``tiny`` (tests only): toy shapes, no minimum timing, 64^3 GEMM and 1 MB read
    probes, so the machinery runs in seconds; its figures mean nothing."""

    device: str = "cpu"
    quick: bool = False
    tiny: bool = False
    dtypes: Optional[tuple[str, ...]] = None
    compile: bool = False
    min_seconds: float = 0.3
    progress: bool = True

    def probes(self) -> dict:
        if self.tiny:
            return machine.ceiling_probes(self.device, gemm_n=64, read_mb=1)
        return machine.ceiling_probes(self.device)

    def wants(self, dtype: str) -> bool:
        return self.dtypes is None or dtype in self.dtypes


@dataclass
class Shape:
    """The work of one call. ``items``: docs (pairs, queries) it scores; ``flops`` and ``bytes``: the useful
    FLOPs and the least bytes any implementation must read (None where they mean nothing, e.g. a graph
    search); ``ceiling``: the ceiling that bounds it (a key of :data:`CEILING_LABELS`: FLOP-bound shapes
    against a GEMM rate, byte-bound ones against the read rate); ``sweep``/``work``: the scaling sweep this
    shape is a point of and its x value; ``baselines``: the eager providers ``ratio_to_eager`` divides by
    (the fastest of those measured)."""

    op: str
    name: str
    dtype: str
    items: int
    unit: str = "docs/s"
    flops: Optional[float] = None
    bytes: Optional[float] = None
    ceiling: Optional[str] = None
    sweep: Optional[str] = None
    work: Optional[float] = None
    baselines: tuple[str, ...] = ("eager",)
    extra: dict = field(default_factory=dict)


def peak_memory(fn: Callable[[], object], device: str) -> Optional[int]:
    """Peak bytes allocated on the GPU while ``fn`` runs, above what was allocated before (None on CPU:
    torch's CPU allocator keeps no statistics, and a process-wide high-water mark cannot tell providers
    apart)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _why(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def base_row(shape: Shape, provider: str) -> dict:
    return {"op": shape.op, "provider": provider, "shape": shape.name, "dtype": shape.dtype, "unit": shape.unit,
            "docs_per_s": None, "seconds": None, "ratio_to_eager": None, "eager_provider": None,
            "peak_mem_bytes": None, "ceiling_fraction": None, "peak_fraction": None, "ceiling": shape.ceiling, "GFLOP_per_s": None,
            "GB_per_s": None, "arithmetic_intensity": (shape.flops / shape.bytes if shape.flops and shape.bytes
                                                       else None),
            "sweep": shape.sweep, "work": shape.work, "refused": None, **shape.extra}


def measure(shape: Shape, fns: dict[str, Callable[[], object]], reference: Callable[[], object],
            check: Callable[[object, object], None], settings: Settings, probes: Optional[dict] = None) -> list[dict]:
    """Check every provider of ``shape`` against ``reference``'s output, refuse those that disagree (or raise),
    and time the rest with the ceiling probes in the same interleaved rounds. One row per provider, in the
    order given; a refused provider's row has ``refused`` set and no figures."""
    expected = reference()
    rows: dict[str, dict] = {}
    kept: dict[str, Callable[[], object]] = {}
    for name, fn in fns.items():
        rows[name] = base_row(shape, name)
        try:
            check(fn(), expected)  # doubles as the warm-up (and torch.compile's compilation)
        except Exception as exc:  # noqa: BLE001 -- any failure refuses the provider; the row says which
            rows[name]["refused"] = _why(exc)
            continue
        kept[name] = fn
    if not kept:
        return list(rows.values())
    timed = dict(kept)
    for name, (fn, _) in (probes or {}).items():
        fn()
        timed[PROBE_PREFIX + name] = fn
    seconds = time_interleaved(timed, settings.device, min_seconds=settings.min_seconds,
                               min_rounds=2 if settings.tiny else 5, sample_seconds=0.0 if settings.tiny else 0.01)
    ceilings = {name: units / seconds.pop(PROBE_PREFIX + name) / 1e9 for name, (_, units) in (probes or {}).items()}
    eager = {b: seconds[b] for b in shape.baselines if b in seconds}
    fastest = min(eager, key=eager.get) if eager else None
    for name, sec in seconds.items():
        row = rows[name]
        row.update(seconds=sec, docs_per_s=shape.items / sec, eager_provider=fastest,
                   ratio_to_eager=eager[fastest] / sec if fastest else None,
                   peak_mem_bytes=peak_memory(kept[name], settings.device))
        if shape.flops:
            row["GFLOP_per_s"] = shape.flops / sec / 1e9
        if shape.bytes:
            row["GB_per_s"] = shape.bytes / sec / 1e9
        if shape.ceiling and shape.ceiling in ceilings:
            achieved = row["GB_per_s"] if shape.ceiling == "read_gbps" else row["GFLOP_per_s"]
            if achieved is not None:
                row["ceiling_fraction"] = achieved / ceilings[shape.ceiling]
        # The bound no provider passes: the peak of the best path this run's kernels take (on the amx path,
        # its tiles, which eager's oneDNN uses too).
        peak = machine.peak_for(shape.ceiling, ceilings, machine.selected_isa())
        if peak and row.get("GFLOP_per_s") is not None:
            row["peak_fraction"] = row["GFLOP_per_s"] / peak
        row["ceilings"] = ceilings
    return list(rows.values())


# ------------------------------------------------------------------------------------------- scaling

def fit_exponent(work: list[float], seconds: list[float]) -> float:
    """The b of ``seconds ~ c * work**b``, least squares on log-log axes: 1 is linear growth, below 1 a
    fixed cost amortised, above 1 worse than linear (a cache falling out, a quadratic step)."""
    if len(work) != len(seconds):
        raise ValueError(f"work and seconds differ in length ({len(work)} vs {len(seconds)})")
    if any(w <= 0 for w in work) or any(s <= 0 for s in seconds):
        raise ValueError("work and seconds must be positive to fit a power law")
    pts = [(math.log(w), math.log(s)) for w, s in zip(work, seconds)]
    if len({x for x, _ in pts}) < 2:
        raise ValueError(f"need at least two distinct work sizes to fit an exponent, got {sorted(set(work))}")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def scaling_fits(rows: list[dict]) -> list[dict]:
    """One fit per (op, sweep, dtype, provider) with two or more timed points: the exponent of time against
    the sweep's work size, and the range it covers."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("sweep") and r.get("seconds"):
            groups.setdefault((r["op"], r["sweep"], r["dtype"], r["provider"]), []).append(r)
    fits = []
    for (op, sweep, dtype, provider), group in groups.items():
        work = [r["work"] for r in group]
        if len(set(work)) < 2:
            continue
        fits.append({"op": op, "sweep": sweep, "dtype": dtype, "provider": provider,
                     "exponent": fit_exponent(work, [r["seconds"] for r in group]),
                     "points": len(group), "work_min": min(work), "work_max": max(work)})
    return fits

