"""Which instruction-set path the CPU kernels run: the best this CPU, its OS and this build support,
unless ``FASTRANK_CPU_ISA`` or :func:`use` forces a lower one.

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
