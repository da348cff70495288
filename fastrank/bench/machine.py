"""What this machine is and what it can do, measured in the process that benchmarks on it.

A kernel's speed means little without the machine's own ceilings next to it: the issue-9 targets are
fractions of the large-sgemm FLOP rate and of the memory bandwidth, so :func:`measure_ceilings` measures
both in the same run, at torch's current thread count (the count the kernels use), rather than quoting a
datasheet. torch's sgemm is not always the CPU's limit (MKL runs its AVX2 code on AMD Zen 4 and Zen 5, a
half or less of what their AVX-512 units issue), so it also measures the arithmetic peak of the ISA path
fastrank runs (:func:`peak_probes`): the rate no kernel on that path can pass. :func:`machine_info` names the CPU, the thread count and the CPU ISA path fastrank dispatches to.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's marketing name ("model name" in /proc/cpuinfo), or what ``platform`` knows elsewhere."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_signature() -> str:
    """Family/model/stepping and last-level cache: VMs often report a generic model name ("Intel(R) Xeon(R)
    Processor"), and the cache size says which benchmark inputs can stay in cache between calls."""
    parts = [f"{k} {_cpuinfo_field(k)}" for k in ("cpu family", "model", "stepping") if _cpuinfo_field(k)]
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            parts.append(f"L3 {f.read().strip()}")
    except OSError:
        pass
    return ", ".join(parts)


def cpu_flags() -> set[str]:
    """The feature flags the kernel reports for the first CPU (empty where /proc/cpuinfo is absent)."""
    return set((_cpuinfo_field("flags") or "").split())


# The flags that decide which fastrank CPU kernel can run; reported so a table says why a path is missing.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def isa_paths() -> list[str]:
    """The fastrank CPU ISA paths this CPU and build can run, best first."""
    from fastrank import cpu_isa

    return cpu_isa.available()


def selected_isa() -> str:
    """The ISA path ``fastrank.maxsim`` uses by default (best available, or FASTRANK_CPU_ISA)."""
    from fastrank import cpu_isa

    return cpu_isa.selected()


# The source checkout an editable install runs from (pyproject.toml, csrc/ and fastrank/ side by side); in an
# installed wheel, site-packages, where neither git nor csrc/ is found.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def source_commit() -> str | None:
    """The git commit of the fastrank source tree this runs from (an editable install), if any."""
    import subprocess

    root = str(SOURCE_ROOT)
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short=10", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    # Changed result files (a benchmark writing its own output) do not make the source dirty.
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(exclude)benchmarks/results"], capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("+uncommitted changes" if dirty else "")


def package_version(name: str) -> str | None:
    """An installed distribution's version, read from its metadata (the package is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def maxsim_cpu_version() -> str | None:
    """Version of the PyPI peer ``maxsim-cpu`` when it is installed."""
    return package_version("maxsim-cpu")


def machine_info(device: str = "cpu") -> dict:
    """Everything a results table must name about where it ran."""
    flags = cpu_flags()
    info = {
        "device": device,
        "cpu": cpu_model(),
        "cpu_signature": cpu_signature(),
        "threads": torch.get_num_threads(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "isa": selected_isa(),
        "isa_paths": isa_paths(),
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
        "maxsim_cpu": maxsim_cpu_version(),
        "triton": package_version("triton"),
        "commit": source_commit(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def bf16_gemm_n(device: str, gemm_n: int) -> int:
    """The bfloat16 GEMM size whose call costs about what the ``gemm_n`` float32 one does. Where the CPU has
    no bfloat16 GEMM, torch emulates one (0.4 GFLOP/s on the Zen 4 VM limited to AVX2, some 400x below its
    sgemm), and a full-size probe in every timing round kept two `bench lite --quick` runs busy for 10 minutes:
    there the bfloat16 probe shrinks by the cube root of the measured speed ratio (its rate is still what
    the machine does in bfloat16, measured on a smaller problem)."""
    if not str(device).startswith("cpu") or gemm_n <= 64:
        return gemm_n
    from fastrank.bench.timing import time_call

    n = 128
    a, b = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a.bfloat16(), b.bfloat16()
    f32 = time_call(lambda: a @ b, device, min_seconds=0.01, max_reps=20)
    bf16 = time_call(lambda: a16 @ b16, device, min_seconds=0.01, max_reps=5, min_reps=1)
    ratio = f32 / bf16  # bf16 speed over float32 speed
    if ratio >= 0.25:
        return gemm_n
    return max(64, min(gemm_n, int(gemm_n * ratio ** (1 / 3)) // 64 * 64))


PEAK_SECONDS = 0.005  # one peak-probe call: long against the timer, short against a benchmark's round
_PEAK_CALLS: dict[tuple, tuple[int, float]] = {}  # (isa, kind, threads, seconds) -> (rounds, FLOP) a call


def peak_probes(device: str = "cpu", *, seconds: float = PEAK_SECONDS) -> dict:
    """The arithmetic peak of the CPU ISA path fastrank runs, as ceiling probes (name -> (callable, FLOP per
    call)): ``fma_peak_gflops``, register-only float32 multiply-adds on every torch thread, and
    ``bf16_dot_peak_gflops``, the same with vdpbf16ps where the path has it, and ``amx_tile_peak_gflops``,
    tdpbf16ps on tiles on the amx path.
    Empty off the CPU or without the extension: the peak needs the path's own instructions."""
    if not str(device).startswith("cpu"):
        return {}
    from fastrank import _ext, cpu_isa

    ext = _ext.load()
    if ext is None or not hasattr(ext, "cpu_peak_flop"):
        return {}
    from fastrank.bench.timing import time_call

    isa, threads = cpu_isa.selected(), torch.get_num_threads()
    probes = {}
    for name, kind in (("fma_peak_gflops", "fma"), ("bf16_dot_peak_gflops", "bf16_dot"),
                       ("amx_tile_peak_gflops", "amx_tile")):
        calib = 20_000
        if ext.cpu_peak_flop(isa, kind, calib, threads) == 0:
            continue  # the path has no such instruction
        key = (isa, kind, threads, seconds)
        if key not in _PEAK_CALLS:  # calibrated once a process: every case's probes reuse it
            per_call = time_call(lambda: ext.cpu_peak_flop(isa, kind, calib, threads), device, min_seconds=0.002,
                                 max_reps=20)
            iters = max(1_000, int(calib * seconds / max(per_call, 1e-9)))
            _PEAK_CALLS[key] = iters, ext.cpu_peak_flop(isa, kind, iters, threads)
        iters, flop = _PEAK_CALLS[key]
        probes[name] = ((lambda kind=kind, iters=iters: ext.cpu_peak_flop(isa, kind, iters, threads)), flop)
    return probes


def ceiling_probes(device: str = "cpu", *, gemm_n: int = 1024, read_mb: int = 512) -> dict:
    """Calls that re-measure the ceilings inside a benchmark's interleaved rounds, so each case's fractions
    use the machine's speed at the moment the case ran (a shared VM's speed drifts by tens of percent
    within minutes): name -> (callable, units per call), the ceiling being units / seconds / 1e9."""
    a = torch.randn(gemm_n, gemm_n, device=device)
    b = torch.randn(gemm_n, gemm_n, device=device)
    out = torch.empty(gemm_n, gemm_n, device=device)
    n16 = bf16_gemm_n(device, gemm_n)
    a16, b16, out16 = (t[:n16, :n16].contiguous().bfloat16() for t in (a, b, out))
    x = torch.full((read_mb * 2 ** 20 // 4,), 1.0, device=device)
    return {
        "sgemm_gflops": (lambda: torch.matmul(a, b, out=out), 2.0 * gemm_n ** 3),
        "bf16_gemm_gflops": (lambda: torch.matmul(a16, b16, out=out16), 2.0 * n16 ** 3),
        "read_gbps": (lambda: x.sum(), x.numel() * 4.0),
        **peak_probes(device),
    }


def measure_ceilings(device: str = "cpu", seconds: float = 2.5, *, gemm_n: int = 2048,
                     copy_mb: int = 512, read_mb: int = 1024) -> dict:
    """The machine's own ceilings, each the median of repeated runs within a share of ``seconds``:

    - ``sgemm_gflops``: float32 ``gemm_n``^3 matmul, 2·n³ FLOP per call (the rate MaxSim's Q·Dᵀ could reach);
    - ``bf16_gemm_gflops``: the same in bfloat16 (AMX or AVX512-BF16 through oneDNN where the CPU has
      them, a slow emulation elsewhere: reported as measured, the caller decides whether it is fast; there
      on a ``bf16_gemm_n``^3 problem, :func:`bf16_gemm_n`);
    - ``copy_gbps``: ``dst.copy_(src)`` of ``copy_mb`` MB, counting bytes read plus bytes written;
    - ``read_gbps``: ``x.sum()`` over ``read_mb`` MB of float32, bytes read (a kernel streaming d once);
    - ``fma_peak_gflops``, ``bf16_dot_peak_gflops`` and ``amx_tile_peak_gflops`` (:func:`peak_probes`; None
      where not measured), with ``peak_isa``, the path they were measured on.

    The default buffers (0.5-1 GB) exceed the last-level caches we have met (up to 300 MB on a cloud Xeon),
    so the rates are DRAM's; tests pass small sizes.
    """
    from fastrank.bench.timing import time_call

    share = seconds / 4
    a = torch.randn(gemm_n, gemm_n, device=device)
    b = torch.randn(gemm_n, gemm_n, device=device)
    out = torch.empty(gemm_n, gemm_n, device=device)
    gemm_flop = 2.0 * gemm_n ** 3
    sgemm = time_call(lambda: torch.matmul(a, b, out=out), device, min_seconds=share, max_reps=50)
    n16 = bf16_gemm_n(device, gemm_n)
    a16, b16, out16 = (t[:n16, :n16].contiguous().bfloat16() for t in (a, b, out))
    bf16 = time_call(lambda: torch.matmul(a16, b16, out=out16), device, min_seconds=share, max_reps=50)
    a = b = out = a16 = b16 = out16 = None  # frees the buffers before the copy is timed

    # torch.full touches every page, so first-touch page faults stay out of the timed calls.
    src = torch.full((copy_mb * 2 ** 20 // 4,), 1.0, device=device)
    dst = torch.full_like(src, 2.0)
    copy = time_call(lambda: dst.copy_(src), device, min_seconds=share, max_reps=50)
    copy_bytes = 2 * src.numel() * 4
    src = dst = None
    x = torch.full((read_mb * 2 ** 20 // 4,), 1.0, device=device)
    read = time_call(lambda: x.sum(), device, min_seconds=share, max_reps=50)
    read_bytes = x.numel() * 4
    x = None
    peaks = {}
    for name, (fn, flop) in peak_probes(device).items():
        peaks[name] = flop / time_call(fn, device, min_seconds=share / 4, max_reps=50) / 1e9
    return {
        "fma_peak_gflops": peaks.get("fma_peak_gflops"),
        "bf16_dot_peak_gflops": peaks.get("bf16_dot_peak_gflops"),
        "amx_tile_peak_gflops": peaks.get("amx_tile_peak_gflops"),
        "peak_isa": selected_isa() if peaks else None,
        "sgemm_gflops": gemm_flop / sgemm / 1e9,
        "bf16_gemm_gflops": 2.0 * n16 ** 3 / bf16 / 1e9,
        "copy_gbps": copy_bytes / copy / 1e9,
        "read_gbps": read_bytes / read / 1e9,
        "threads": torch.get_num_threads(),
        "gemm_n": gemm_n,
        "bf16_gemm_n": n16,
        "copy_mb": copy_mb,
        "read_mb": read_mb,
    }


def peak_for(ceiling: str | None, ceilings: dict, isa: str | None = None) -> float | None:
    """The arithmetic peak that bounds a row whose ceiling is ``ceiling``, run on path ``isa`` (default: the
    path the peaks were measured on): for bf16 GEMM rows the AMX tile peak on the amx path, else the bf16 dot
    peak where the path has one, else the float32 FMA peak; None for bandwidth rows or when not measured."""
    if ceiling not in ("sgemm_gflops", "bf16_gemm_gflops"):
        return None
    isa = isa or ceilings.get("peak_isa")
    if ceiling == "bf16_gemm_gflops":
        if isa == "amx" and ceilings.get("amx_tile_peak_gflops"):
            return ceilings["amx_tile_peak_gflops"]
        if ceilings.get("bf16_dot_peak_gflops"):
            return ceilings["bf16_dot_peak_gflops"]
    return ceilings.get("fma_peak_gflops")


def peak_text(ceilings: dict) -> str:
    """", FMA peak 541.6 GFLOP/s (avx512bf16 path), bf16 dot peak 1078.0 GFLOP/s" (and ", AMX tile peak ..."
    on the amx path), or "" when not measured."""
    if not ceilings.get("fma_peak_gflops"):
        return ""
    isa = f" ({ceilings['peak_isa']} path)" if ceilings.get("peak_isa") else ""
    text = f", FMA peak {ceilings['fma_peak_gflops']:.1f} GFLOP/s{isa}"
    if ceilings.get("bf16_dot_peak_gflops"):
        text += f", bf16 dot peak {ceilings['bf16_dot_peak_gflops']:.1f} GFLOP/s"
    if ceilings.get("amx_tile_peak_gflops"):
        text += f", AMX tile peak {ceilings['amx_tile_peak_gflops']:.1f} GFLOP/s"
    return text


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"
