"""Which instruction-set path the CPU kernels run: the best this CPU, its OS and this build support,
unless ``FASTRANK_CPU_ISA`` or :func:`use` forces a lower one, or :data:`FASTER_PATHS` records that a lower
path measured faster on this kind of CPU for that op and dtype (:func:`selected_for`, :func:`why`).

The compiled extension carries every path (``scalar``, ``avx2``, ``avx512``, ``avx512bf16``, ``amx``), each
compiled with its own target flags, and checks cpuid (and, for AMX, the Linux tile permission) once per
process. A path the machine cannot run is refused with the CPU flags that were found, never attempted.

    >>> from fastrank import cpu_isa
    >>> cpu_isa.available()          # e.g. ['amx', 'avx512bf16', 'avx512', 'avx2', 'scalar']
    >>> with cpu_isa.use("avx2"):    # every CPU kernel call inside runs the AVX2 path
    ...     fastrank.maxsim(q, d)
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from fastrank import _ext

PATHS: tuple[str, ...] = ("amx", "avx512bf16", "avx512", "avx2", "scalar")  # best first
ENV_VAR = "FASTRANK_CPU_ISA"

_forced = threading.local()


_SUPPORT: dict[str, str] | None = None


def support() -> dict[str, str]:
    """Every path, with "" when it can run here and otherwise why not (the CPU, the OS or the build)."""
    global _SUPPORT
    if _SUPPORT is None:  # fixed for the life of the process, like the extension's own cpuid check
        ext = _ext.load()
        if ext is None:
            return {name: "the compiled extension is not available" for name in PATHS}
        table = {name: reason for name, ok, reason in ext.cpu_isa_support()}
        _SUPPORT = {name: table.get(name, "unknown to this build") for name in PATHS}
    return dict(_SUPPORT)


def available() -> list[str]:
    """The paths this machine can run, best first (empty without the compiled extension)."""
    return [name for name, reason in support().items() if not reason]


def cpu_flags() -> list[str]:
    """The CPU features cpuid reports that matter to the kernels, in /proc/cpuinfo spelling."""
    ext = _ext.load()
    return list(ext.cpu_flags()) if ext is not None else []


def _validate(name: str, source: str) -> str:
    if name not in PATHS:
        raise ValueError(f"{source}{name!r} is not a CPU ISA path; expected one of {', '.join(PATHS)}")
    reason = support()[name]
    if reason:
        flags = " ".join(cpu_flags()) or "none"
        raise ValueError(
            f"{source}{name!r} cannot run on this machine: {reason}. CPU flags found: {flags}. "
            f"Available paths: {', '.join(available()) or 'none'}"
        )
    return name


@torch.compiler.assume_constant_result
def selected() -> str:
    """The path CPU kernels run now: :func:`use`'s, else ``FASTRANK_CPU_ISA``'s, else the best available.

    Raises ValueError, naming the CPU flags found, when a forced path cannot run here.
    """
    forced = getattr(_forced, "name", None)
    if forced is not None:
        return forced
    env = os.environ.get(ENV_VAR) or None
    if env is not None:
        return _validate(env.strip().lower(), f"{ENV_VAR}=")
    return _best()


_BEST: str | None = None


def _best() -> str:
    # Cached: the kernels ask on every call, and what the machine and build support does not change.
    global _BEST
    if _BEST is not None:
        return _BEST
    paths = available()
    best = paths[0] if paths else "scalar"
    if _SUPPORT is not None:  # the extension answered; without it, ask again next time
        _BEST = best
    return best


# Where a lower path measured faster than the best one the CPU supports, for one op and input dtype: chosen by
# speed, not by what the CPU has. A table keyed by CPU vendor and best path (not a timing at first use: the
# choice, and so the summation order of every score, must not change between two runs on one machine), each
# entry with its measurement. FASTRANK_CPU_ISA and use() still force any path.
@dataclass(frozen=True)
class FasterPath:
    vendor: str      # cpuid's vendor string
    best: str        # the path the CPU's flags make best, which this entry replaces
    op: str          # "maxsim": the padded and packed MaxSim kernels (one kernel source); "lite": the LITE forward
    dtype: str       # torch dtype name
    path: str
    evidence: str


# (An AMD Zen 4 entry, float16 MaxSim on avx2 rather than avx512bf16, was retired once the MaxSim kernels
# spread their prefetch over the k loop: the native path then ran 3.48x eager to avx2's 3.18x, 1 x 1,000
# H=128 on the 2-core EPYC VM, benchmarks/results/maxsim_prefetch_epyc_zen4.md.)
FASTER_PATHS: tuple[FasterPath, ...] = (
    FasterPath("GenuineIntel", "avx512bf16", "maxsim", "bfloat16", "avx512",
               "bfloat16 MaxSim on Intel without usable AMX (the 2-core Xeon VM's avx512bf16 path, 1 x 1,000 H=128): "
               "vdpbf16ps issues at half the FMA rate there, and the avx512 path's widening FMAs ran 168,991 "
               "docs/s against 114,588 (benchmarks/results/maxsim_cpu_xeon_amx.md)"),
    FasterPath("GenuineIntel", "avx512bf16", "lite", "bfloat16", "avx512",
               "bfloat16 LITE on Intel without usable AMX (the 2-core Xeon VM forced to its avx512bf16 path, "
               "1 x 1,000, the paper's sizes): vdpbf16ps issues at half the FMA rate there, and the avx512 path's "
               "widening FMAs ran 4,400 pairs/s against 2,975 (benchmarks/results/lite_cpu_xeon_amx.md)"),
)

_VENDOR: str | None = None


def vendor() -> str:
    """cpuid's vendor string as Linux reports it (``vendor_id`` in /proc/cpuinfo), "" when unknown."""
    global _VENDOR
    if _VENDOR is None:
        _VENDOR = ""
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("vendor_id"):
                        _VENDOR = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return _VENDOR


def _faster(op: str, dtype: torch.dtype) -> FasterPath | None:
    if getattr(_forced, "name", None) is not None or (os.environ.get(ENV_VAR) or None) is not None:
        return None
    best, name = _best(), str(dtype).replace("torch.", "")
    for entry in FASTER_PATHS:
        if (entry.op, entry.dtype, entry.best, entry.vendor) == (op, name, best, vendor()) and not support()[entry.path]:
            return entry
    return None


@torch.compiler.assume_constant_result
def selected_for(op: str, dtype: torch.dtype) -> str:
    """The path ``op``'s CPU kernels run on ``dtype`` inputs: :func:`selected`, unless nothing forces a path
    and :data:`FASTER_PATHS` has a faster lower one for this CPU (:func:`why` says which and why)."""
    entry = _faster(op, dtype)
    return entry.path if entry is not None else selected()


def why(op: str, dtype: torch.dtype) -> str:
    """Why :func:`selected_for` picks a lower path than :func:`selected` for ``op`` on ``dtype`` ("" when not)."""
    entry = _faster(op, dtype)
    if entry is None:
        return ""
    return f"{entry.path} rather than {entry.best}, chosen by speed on this CPU ({entry.vendor}): {entry.evidence}"


@contextlib.contextmanager
def use(name: str) -> Iterator[str]:
    """Run the CPU kernels called inside the block (in this thread) on path ``name``."""
    name = _validate(name, "cpu_isa.use: ")
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield name
    finally:
        _forced.name = previous
