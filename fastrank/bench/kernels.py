"""Static GPU resource checks, no GPU needed: registers, spills and shared memory of every kernel variant.

Issue 13 wants spills and register pressure caught on every CI run, not on the rare machine with a GPU. So:

- Triton. The launchers in ``fastrank.ops`` are called on small CPU tensors of representative shapes with
  every ``@triton.jit`` kernel replaced by a recorder, so the variants listed are the ones the launchers
  really launch (their block sizes, flags, num_warps and num_stages are never copied here). Triton's own
  launch-time binder turns each recorded call into the signature, constexprs and specialisation that a GPU
  launch would compile; a kernel wrapped in ``triton.autotune`` yields one variant per config. Each variant
  is compiled ahead of time for ``sm_{arch}`` (``triton.compile`` with a ``GPUTarget``; ptxas ships with
  Triton) in parallel worker processes (ptxas is single-threaded). Registers and spilled bytes come from
  ptxas ``-v``: the log of the run Triton's ``make_cubin`` makes itself, or, when Triton's cache already
  held the kernel, the bundled ptxas re-run on the PTX with make_cubin's flags. Shared memory is Triton's
  (dynamic) allocation plus ptxas's static smem.
- CUDA. Every ``csrc/cuda/*.cu`` is compiled with ``nvcc -Xptxas -v`` and each template instantiation's
  kernel becomes a row (skipped, saying so, where nvcc is absent).

``python -m fastrank.bench.kernels --arch 90`` (or ``fastrank bench kernels``) prints each row as it
compiles and the table at the end (``--out`` writes it, ``--json`` writes the rows), and exits with
LIMITS_BROKEN when a variant breaks a limit; :func:`collect` returns the rows. ``--scope quick`` compiles
one variant per kernel, dtype, pass and autotune config (what the test suite checks), the default every
variant of the representative shapes, ``full`` a few more shapes. Compiled kernels land in Triton's
on-disk cache and ptxas reports in a cache beside it, so a rerun after no kernel change is quick.
Nothing here runs a kernel: these are compiler figures for a target, not measurements on a device.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterable, Iterator

from fastrank.bench.machine import SOURCE_ROOT as ROOT  # the checkout whose csrc/ is compiled

# Per-thread registers and per-block shared memory, from the CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability" table: "Maximum number of 32-bit registers per thread" is 255 for
# 8.0 and 9.0; "Maximum amount of shared memory per thread block" is 163 KB for 8.0 and 227 KB for 9.0
# (the opt-in dynamic maximum, which is what Triton requests; 48 KB without the opt-in).
LIMITS = {
    80: {"registers": 255, "shared_bytes": 163 * 1024},
    90: {"registers": 255, "shared_bytes": 227 * 1024},
}

# The keys issue 13 names for ``--json``, first in every row, in this order.
ISSUE_KEYS = ("kernel", "dtype", "config", "registers", "spill_bytes", "shared_bytes")
ROW_KEYS = ISSUE_KEYS + ("arch", "direction", "module", "spill_stores", "spill_loads", "registers_ok",
                         "shared_ok", "spills_ok", "error")

SCOPES = ("quick", "all", "full")
LIMITS_BROKEN = 3  # the command's exit status when a variant breaks a limit (1 stays Python's for a crash)

# The modules whose launchers are called, and whose kernels are looked for.
OPS_MODULES = ("fastrank.ops.maxsim", "fastrank.ops.maxsim_packed_triton", "fastrank.ops.lite")

# An H100/H200 has 132 SMs. The backward launchers split a reduction loop over atomics when the grid alone
# cannot fill the device, and ask the device how many SMs it has; on CPU tensors they would see 4 programs
# and rarely split, so the enumeration answers as the GPU would, to list the atomic variants too.
GPU_PROGRAMS = 4 * 132


# --------------------------------------------------------------------------------------------------------
# ptxas and nvcc logs
# --------------------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(text: str) -> dict[str, dict]:
    """Entry function name -> {arch, registers, spill_stores, spill_loads, stack_bytes, smem_bytes} from the
    output of ``ptxas -v`` (also what ``nvcc -Xptxas -v`` prints). Device functions that are not entries
    (they have properties but no "Compiling entry function" line) are left out."""
    entries: dict[str, dict] = {}
    props: dict[str, tuple[int, int, int]] = {}
    current = prop_of = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
            entries[current] = {"arch": m.group(2), "registers": None, "smem_bytes": 0}
        elif m := _PROPS.search(line):
            prop_of = m.group(1)
        elif m := _SPILL.search(line):
            if prop_of is not None:
                props[prop_of] = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif (m := _USED.search(line)) and current is not None:
            entries[current]["registers"] = int(m.group(1))
            smem = _SMEM.search(line)
            entries[current]["smem_bytes"] = int(smem.group(1)) if smem else 0
    for name, entry in entries.items():
        stack, stores, loads = props.get(name, (0, 0, 0))
        entry.update(stack_bytes=stack, spill_stores=stores, spill_loads=loads)
    return entries


def _cache_dir() -> Path:
    try:
        from triton import knobs

        base = Path(knobs.cache.dir)
    except (ImportError, AttributeError):
        base = Path.home() / ".triton" / "cache"
    return base.parent / "fastrank_ptxas"


def _ptxas_flags(arch: int, enable_fp_fusion: bool) -> list[str]:
    """The flags Triton's make_cubin gives ptxas (triton/backends/nvidia/compiler.py), so the registers read
    here are those of the cubin Triton builds."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    return ["-lineinfo", *([] if enable_fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}"]


@functools.lru_cache(maxsize=None)
def _ptxas_path(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _report_path(ptx: str, arch: int, enable_fp_fusion: bool) -> Path:
    ptxas = _ptxas_path(arch)
    flags = _ptxas_flags(arch, enable_fp_fusion)
    key = hashlib.sha256("\0".join([ptx, *flags, ptxas, str(os.path.getmtime(ptxas))]).encode()).hexdigest()
    return _cache_dir() / f"{key}.json"


def _store_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(f".{os.getpid()}.tmp")
    tmp_path.write_text(json.dumps(report))
    os.replace(tmp_path, path)


def ptxas_report(ptx: str, arch: int, enable_fp_fusion: bool = True, log: str | None = None) -> dict[str, dict]:
    """:func:`parse_ptxas_log` of Triton's bundled ptxas run on ``ptx`` with make_cubin's flags, cached by
    the PTX, flags and ptxas. ``log``: the output of that very run when Triton just made it (then ptxas is
    not run a second time)."""
    cached = _report_path(ptx, arch, enable_fp_fusion)
    if log is not None and _ENTRY.search(log):
        report = parse_ptxas_log(log)
        _store_report(cached, report)
        return report
    if cached.is_file():
        return json.loads(cached.read_text())
    ptxas, flags = _ptxas_path(arch), _ptxas_flags(arch, enable_fp_fusion)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        run = subprocess.run([ptxas, *flags, str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                             capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed (rc {run.returncode}): {run.stderr.strip()[-2000:]}")
    report = parse_ptxas_log(run.stdout + run.stderr)
    _store_report(cached, report)
    return report


# --------------------------------------------------------------------------------------------------------
# Which variants the launchers launch: record every kernel launch
# --------------------------------------------------------------------------------------------------------
def front_end_ir(kernel, args: tuple, kwargs: dict, arch: int = 90) -> str:
    """The Triton front end's IR (TTIR) of ``kernel`` (a @triton.jit function) for a CUDA target, typed from
    one launch's arguments as Triton types them (tensors by dtype, floats fp32, ints i32 when they fit and
    i64 otherwise; the keyword arguments that name kernel parameters are constexprs). Dot precision,
    tie-breaking, atomics and offset widths are fixed at this stage, so tests read them here: no GPU, and no
    ptxas run, which would cost seconds per kernel. Run with TRITON_INTERPRET unset."""
    import torch
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
             torch.int64: "i64", torch.bool: "i1", torch.int8: "i8"}
    names = kernel.arg_names
    sig = {n: ("*" + types[a.dtype] if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float)
               else "i32" if -2**31 <= a < 2**31 else "i64") for n, a in zip(names, args)}
    consts = {}
    for n, v in kwargs.items():
        if n in names:
            sig[n] = "constexpr"
            consts[(names.index(n),)] = v
    src, target = ASTSource(fn=kernel, signature=sig, constexprs=consts), GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options = backend.parse_options(src.parse_options())
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    return str(src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context))


def _triton_classes():
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction, KernelInterface

    return JITFunction, Autotuner, Heuristics, KernelInterface


def _expand(kernel, args: tuple, kwargs: dict) -> list[tuple[object, dict]]:
    """(JITFunction, launch kwargs) for every variant one launch of ``kernel`` may compile: each config of an
    autotuner (its kwargs, num_warps, num_stages ... override the call's), heuristics applied."""
    _, Autotuner, Heuristics, _ = _triton_classes()
    if isinstance(kernel, Autotuner):
        configs = kernel.configs
        # Only what the autotuner could pick on a GPU: its early pruning drops configs (those that spill, for
        # one) before any benchmark, as Autotuner.prune_configs does at launch.
        if getattr(kernel, "early_config_prune", None):
            configs = kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args)), **kwargs)
        return [v for config in configs for v in _expand(kernel.fn, args, {**kwargs, **config.all_kwargs()})]
    if isinstance(kernel, Heuristics):
        kw = dict(kwargs)
        for name, heuristic in kernel.values.items():
            kw[name] = heuristic({**dict(zip(kernel.arg_names, args)), **kw})
        return _expand(kernel.fn, args, kw)
    return [(kernel, kwargs)]


def jit_of(kernel):
    """The @triton.jit function under any autotune/heuristics wrappers."""
    _, Autotuner, Heuristics, _ = _triton_classes()
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


class _Recorder:
    """Stands in for a kernel object in its module: ``recorder[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, module: str, name: str, sink: Callable):
        self.kernel, self.module, self.name, self.sink = kernel, module, name, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink(self, args, kwargs)


class _Enumerator:
    """Collects the distinct variants launched while :meth:`patched` is active, specialised for ``arch``
    by Triton's own launch-time binder."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        self.arch = arch
        self.backend = make_backend(GPUTarget("cuda", arch, 32))
        self.variants: dict[tuple, dict] = {}
        self.label = ("?", "?")
        self._binders: dict[int, Callable] = {}

    def _binder(self, jit):
        from triton.runtime.jit import create_function_from_signature

        if id(jit) not in self._binders:
            self._binders[id(jit)] = create_function_from_signature(jit.signature, jit.params, self.backend)
        return self._binders[id(jit)]

    def record(self, recorder: _Recorder, args: tuple, kwargs: dict) -> None:
        dtype, direction = self.label
        for jit, kw in _expand(recorder.kernel, args, kwargs):
            bound, specialization, options = self._binder(jit)(*args, **kw)
            options, signature, constexprs, attrs = jit._pack_args(self.backend, kw, bound, specialization, options)
            launch_options = {k: v for k, v in kw.items() if k not in jit.arg_names}
            names = jit.arg_names
            by_name = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
            declared = _declared_constexprs(jit)
            key = (recorder.module, recorder.name, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), repr(sorted(launch_options.items())))
            if key in self.variants:
                continue
            self.variants[key] = dict(
                module=recorder.module, name=recorder.name, dtype=dtype, direction=direction,
                config=_config_string(by_name, declared, options), signature=signature, constexprs=constexprs, attrs=attrs,
                launch_options=launch_options, values={k: _plain(v) for k, v in by_name.items()},
                num_warps=options.num_warps, num_stages=options.num_stages, declared=sorted(declared),
            )

    @contextlib.contextmanager
    def patched(self, modules: Iterable) -> Iterator[None]:
        _, _, _, KernelInterface = _triton_classes()
        saved = []
        try:
            for module in modules:
                for name, value in list(vars(module).items()):
                    if isinstance(value, KernelInterface):
                        saved.append((module, name, value))
                        setattr(module, name, _Recorder(value, module.__name__, name, self.record))
            maxsim = importlib.import_module("fastrank.ops.maxsim")
            saved.append((maxsim, "parallel_programs", maxsim.parallel_programs))
            maxsim.parallel_programs = lambda device: GPU_PROGRAMS
            # Launchers that choose blocks per architecture (LITE's chunks; the MaxSim H split) ask
            # pairs.cuda_arch, None for the CPU tensors the recording runs on: stand in this arch.
            for module in modules:
                if hasattr(module, "cuda_arch"):
                    saved.append((module, "cuda_arch", module.cuda_arch))
                    module.cuda_arch = lambda t: self.arch
            yield
        finally:
            for module, name, value in reversed(saved):
                setattr(module, name, value)


def _plain(value):
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def _config_string(constexprs: dict, declared: set, options) -> str:
    """A short name for a variant: block sizes, the flags that are on, other constexprs, warps and stages,
    then the integer arguments Triton specialised to a constant at this launch (1 becomes a constexpr),
    e.g. "LQ32 LD64 H128 QM DM ARG tf32 w4 s3 Y=1"."""
    parts, specialised = [], []
    for name, value in constexprs.items():
        if name not in declared:
            specialised.append(f"{name}={value}")
            continue
        short = name[len("BLOCK_"):] if name.startswith("BLOCK_") else name
        if isinstance(value, bool):
            parts += [_FLAG_NAMES.get(name, name)] if value else []
        elif name == "PRECISION":
            parts.append(str(value))
        else:
            parts.append(f"{short}{value}")
    parts.append(f"w{options.num_warps}")
    parts.append(f"s{options.num_stages}")
    if getattr(options, "num_ctas", 1) != 1:
        parts.append(f"c{options.num_ctas}")
    if getattr(options, "maxnreg", None):
        parts.append(f"r{options.maxnreg}")
    return " ".join(parts + specialised)


_FLAG_NAMES = {"HAS_QM": "QM", "HAS_DM": "DM", "STORE_ARG": "ARG"}


def _dtype_name(dtype) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8"}[str(dtype).replace("torch.", "")]


def _scenarios(full: bool) -> Iterator[tuple[str, str, Callable[[], object]]]:
    """(dtype label, "forward" or "backward", a call of one launcher) for representative shapes: queries of
    32 tokens, documents of 180 and 200, H 128 and 768, with and without masks, each dtype the op runs.
    ``full`` adds the one-mask combinations and 64-token queries (the other query tile)."""
    import torch

    from fastrank.nn import LiteScorer
    from fastrank.ops import lite, maxsim, maxsim_packed_triton as packed
    from fastrank.ops.lite import scorer_params

    g = torch.Generator().manual_seed(0)
    masks = [(False, False), (True, True)] + ([(True, False), (False, True)] if full else [])
    lqs = (32, 64) if full else (32,)

    def rand(*shape, dtype):
        return torch.randn(*shape, generator=g).to(dtype)

    def mask(*shape):
        m = torch.rand(*shape, generator=g) < 0.9
        m[..., 0] = True
        return m

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = _dtype_name(dtype)
        for lq in lqs:
            for h in (128, 768):
                for qm_on, dm_on in masks:
                    # MaxSim, padded: re-ranking (1, 1, N) forward; in-batch (1, B, B) and grouped (B, 1, K)
                    # backward, deterministic or not (the split loops and their atomics).
                    q, d = rand(1, 1, lq, h, dtype=dtype), rand(1, 3, 200, h, dtype=dtype)
                    qm = mask(1, 1, 3, lq) if qm_on else None
                    dm = mask(1, 1, 3, 200) if dm_on else None
                    for save in (True, False):
                        yield name, "forward", functools.partial(maxsim.triton_forward, q, d, qm, dm, save)
                    # Packed: documents of 180 and 200 tokens in one (T, H) tensor.
                    tokens, offsets = rand(380, h, dtype=dtype), torch.tensor([0, 180, 380])
                    pqm = mask(1, lq) if qm_on else None
                    for save in (True, False):
                        yield name, "forward", functools.partial(packed.packed_forward, q[0], tokens, offsets, pqm, None, save)
                    scales = torch.rand(380, generator=g) + 0.5
                    yield f"int8 (q {name})", "forward", functools.partial(
                        packed.packed_forward, q[0], tokens.float().clamp(-127, 127).to(torch.int8), offsets, pqm,
                        scales, True)
                for det in (True, False):
                    for qs, ds in (((1, 32, lq, h), (1, 32, 180, h)), ((4, 1, lq, h), (4, 8, 180, h))):
                        q, d = rand(*qs, dtype=dtype), rand(*ds, dtype=dtype)
                        f, y, x = q.shape[0], q.shape[1], d.shape[1]
                        grad = torch.rand(f, y, x, generator=g)
                        argmax = torch.randint(0, d.shape[2], (f, y, x, lq), generator=g, dtype=torch.int32)
                        yield name, "backward", functools.partial(maxsim.triton_backward, q, d, grad, argmax, True, True, det)
                    tokens, offsets = rand(380, h, dtype=dtype), torch.tensor([0, 180, 380])
                    for fq in (1, 2):
                        q = rand(fq, lq, h, dtype=dtype)
                        grad = torch.rand(2, generator=g)
                        argmax = torch.randint(0, 180, (2, lq), generator=g, dtype=torch.int32)
                        yield name, "backward", functools.partial(packed.packed_backward, q, tokens, offsets, grad, argmax,
                                                                  True, True, det)
        # LITE with LiteScorer's default geometry (lq 30, ld 200, hidden 2400 and 360), in the scorer's dtype.
        params, s_lq, s_ld, eps = scorer_params(LiteScorer().to(dtype))
        for h in (128, 768):
            for qm_on, dm_on in masks:
                q, d = rand(1, 1, s_lq, h, dtype=dtype), rand(1, 2, s_ld, h, dtype=dtype)
                qm = mask(1, 1, 2, s_lq) if qm_on else None
                dm = mask(1, 1, 2, s_ld) if dm_on else None
                yield name, "forward", functools.partial(lite.triton_forward, q, d, qm, dm, params, s_lq, s_ld, eps)
                grad = torch.rand(1, 1, 2, generator=g)
                yield name, "backward", functools.partial(lite.triton_backward, grad, q, d, qm, dm, params, s_lq, s_ld, eps)


def _require_compiling_process() -> None:
    JITFunction, *_, KernelInterface = _triton_classes()
    kernels = [value for name in OPS_MODULES for value in vars(importlib.import_module(name)).values()
               if isinstance(value, KernelInterface)]
    if not all(isinstance(jit_of(k), JITFunction) for k in kernels):
        raise RuntimeError("kernel_report: the kernels were imported under TRITON_INTERPRET=1; the variants must be "
                           "recorded in a process without it (collect() starts one)")


def variants(arch: int, scope: str = "all", kernels: Iterable[str] | None = None) -> list[dict]:
    """The distinct kernel variants the launchers launch on the scenarios, specialised for ``sm_{arch}``:
    all of them (``scope="all"``), with the scenarios' extra shapes (``"full"``), or one per kernel, dtype,
    pass and autotune config (``"quick"``, :func:`representatives`); only those of the kernels named in
    ``kernels`` when given. Must run where TRITON_INTERPRET is unset."""
    if scope not in SCOPES:
        raise ValueError(f"kernel_report: scope must be one of {SCOPES}, got {scope!r}")
    _quiet_triton()
    _require_compiling_process()
    modules = [importlib.import_module(m) for m in OPS_MODULES]
    enumerator = _Enumerator(arch)
    with enumerator.patched(modules):
        for dtype, direction, call in _scenarios(scope == "full"):
            enumerator.label = (dtype, direction)
            try:
                call()
            except Exception as exc:  # a launcher whose arguments changed: name it rather than list less
                raise RuntimeError(f"kernel_report: calling {getattr(call.func, '__qualname__', call)} "
                                   f"({dtype} {direction}) failed: {type(exc).__name__}: {exc}") from exc
    found = list(enumerator.variants.values())
    if kernels is not None:
        wanted = set(kernels)
        unknown = wanted - {v["name"] for v in found}
        if unknown:
            raise ValueError(f"kernel_report: no launched kernel is named {', '.join(sorted(unknown))}; the kernels are "
                             f"{', '.join(sorted({v['name'] for v in found}))}")
        found = [v for v in found if v["name"] in wanted]
    return representatives(found) if scope == "quick" else found


def representatives(found: list[dict]) -> list[dict]:
    """One variant per kernel, launching module, dtype, pass and autotune config (warps, stages, block sizes):
    the one with the most flags on (masks, stored argmax, atomics: the most code), the first recorded on a tie.
    The test suite compiles these, the CLI all of them (see the module docstring of tests/test_kernel_report)."""
    best: dict[tuple, dict] = {}
    for v in found:
        declared = {k: x for k, x in v["values"].items() if k in v["declared"]}
        key = (v["module"], v["name"], v["dtype"], v["direction"], v["num_warps"], v["num_stages"],
               tuple(sorted((k, x) for k, x in declared.items() if not isinstance(x, bool))))
        flags = sum(x is True for x in declared.values())
        if key not in best or flags > best[key][0]:
            best[key] = (flags, v)
    return [v for _, v in best.values()]


def describe(variant: dict) -> dict:
    """A variant as plain JSON: where it is launched, its dtype and pass, config, constexprs, warps, stages."""
    return dict(kernel=variant["name"], module=variant["module"].rsplit(".", 1)[-1], dtype=variant["dtype"],
                direction=variant["direction"], config=variant["config"], values=variant["values"],
                num_warps=variant["num_warps"], num_stages=variant["num_stages"])


def launched_kernels() -> set[tuple[str, str]]:
    """(module, name) of every Triton kernel launched (``name[grid](...)``) in the source of OPS_MODULES."""
    _, _, _, KernelInterface = _triton_classes()
    found = set()
    for module_name in OPS_MODULES:
        module = importlib.import_module(module_name)
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name)
                    and isinstance(getattr(module, node.func.value.id, None), KernelInterface)):
                found.add((module_name, node.func.value.id))
    return found


# --------------------------------------------------------------------------------------------------------
# Compiling: one variant per task, in worker processes
# --------------------------------------------------------------------------------------------------------
def compile_asm(variant: dict, arch: int, log: io.StringIO | None = None):
    """One variant compiled for ``sm_{arch}`` by Triton (its ``.asm`` holds the TTGIR, PTX and cubin) and the
    options it was compiled with; ptxas's -v log goes to ``log`` when given (on a cold compile)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    jit = jit_of(getattr(importlib.import_module(variant["module"]), variant["name"]))
    target = GPUTarget("cuda", arch, 32)
    options = make_backend(target).parse_options(dict(variant["launch_options"]))
    src = ASTSource(jit, variant["signature"], variant["constexprs"], variant["attrs"])
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log or io.StringIO()):
        knobs.nvidia.dump_ptxas_log = log is not None
        return triton.compile(src, target=target, options=options.__dict__), options


def compile_variant(variant: dict, arch: int) -> dict:
    """Compile one variant for ``sm_{arch}`` and read its resources; the row (see :data:`ROW_KEYS`)."""
    row = dict(kernel=variant["name"], dtype=variant["dtype"], config=variant["config"], registers=None,
               spill_bytes=None, shared_bytes=None, arch=arch, direction=variant["direction"],
               module=variant["module"].rsplit(".", 1)[-1], spill_stores=None, spill_loads=None)
    try:
        # make_cubin prints ptxas's -v log when asked: on a cold compile that is the report, for free.
        log = io.StringIO()
        compiled, options = compile_asm(variant, arch, log)
        report = ptxas_report(compiled.asm["ptx"], arch, options.enable_fp_fusion, log=log.getvalue())
        entry = report.get(compiled.metadata.name) or next(iter(report.values()))
        row.update(registers=entry["registers"], spill_stores=entry["spill_stores"], spill_loads=entry["spill_loads"],
                   spill_bytes=entry["spill_stores"] + entry["spill_loads"],
                   shared_bytes=int(compiled.metadata.shared) + entry["smem_bytes"])
    except Exception as exc:  # a variant that does not compile is a row with the reason, not a stopped run
        row["error"] = f"does not compile: {type(exc).__name__}: {_short(str(exc))}"
    return judge(row)


def _short(message: str, keep: int = 400) -> str:
    """One line; a long message keeps its start (where) and end (what: Triton puts the error after the source)."""
    flat = " ".join(message.split())
    return flat if len(flat) <= keep else f"{flat[:80]} ... {flat[-(keep - 85):]}"


def judge(row: dict) -> dict:
    """Adds the verdicts: registers <= 255, shared memory within the arch's per-block limit, and zero spills.
    Issue 13 asks for no spills in every forward kernel and every bf16 backward kernel; on sm_90 every kernel
    in every dtype now has none, so the rule holds all of them to it (sm_80 still has a few: its table)."""
    limits = LIMITS.get(row["arch"])  # another GPU (a run's own kernels): its figures, no verdict on limits
    compiled = row.get("registers") is not None
    row["registers_ok"] = (compiled and row["registers"] <= limits["registers"]) if limits else None
    row["shared_ok"] = (compiled and row["shared_bytes"] is not None and row["shared_bytes"] <= limits["shared_bytes"]
                        ) if limits else None
    row["spills_ok"] = compiled and row["spill_bytes"] == 0
    row.setdefault("error", None)
    return {k: row.get(k) for k in ROW_KEYS}


def row_failures(row: dict) -> list[str]:
    """What a row breaks, in words naming the limit ([] when it passes)."""
    limits = LIMITS.get(row["arch"], {})
    if row.get("error"):
        return [row["error"]]
    out = []
    if row["registers_ok"] is False:
        out.append(f"{row['registers']} registers > {limits['registers']}")
    if row["shared_ok"] is False:
        out.append(f"{row['shared_bytes']} shared bytes > {limits['shared_bytes']}")
    if row["spills_ok"] is False:
        split = f" ({row['spill_stores']} stored, {row['spill_loads']} loaded)" if row.get("spill_loads") is not None else ""
        out.append(f"spills {row['spill_bytes']} bytes{split}")
    return out


def _quiet_triton() -> None:
    # Triton 3.9 warns once per process that its fp-fusion default will change; the compile here follows
    # whatever default a real launch in this environment would get, so the warning says nothing new.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


_POINTER_TYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "i8": "int8"}


def _declared_constexprs(jit) -> set[str]:
    """The parameters a kernel declares ``tl.constexpr`` (the annotation may be a string under
    ``from __future__ import annotations``)."""
    return {name for name, p in inspect.signature(jit.fn).parameters.items() if "constexpr" in str(p.annotation)}


def runtime_row(name: str, module: str, kernel, compiled) -> dict:
    """The row, in this module's format, of a kernel that a real launch compiled and loaded on a GPU
    (fastrank.bench.gpu): registers and spilled bytes from the driver (``n_regs``, ``n_spills``, which does
    not tell stores from loads), shared memory from Triton's metadata, dtype and config from the compiled
    source, so that it lines up with the static table's row for the same variant."""
    jit = jit_of(kernel)
    names = list(jit.arg_names)
    values = {names[path[0]]: value for path, value in compiled.src.constants.items() if len(path) == 1}
    pointers = [t[1:] for t in compiled.src.signature.values() if isinstance(t, str) and t.startswith("*")]
    q = _POINTER_TYPES.get(pointers[0], pointers[0]) if pointers else "-"
    meta = compiled.metadata
    if getattr(compiled, "n_regs", None) is None and hasattr(compiled, "_init_handles"):
        try:  # compiled but never launched: loading it is what asks the driver for its figures
            compiled._init_handles()
        except Exception:  # a kernel that cannot load says so in its row (below)
            pass
    row = dict(kernel=name, dtype=f"int8 (q {q})" if "i8" in pointers[1:] else q,
               config=_config_string(values, _declared_constexprs(jit), meta),
               registers=getattr(compiled, "n_regs", None), spill_bytes=getattr(compiled, "n_spills", None),
               shared_bytes=getattr(meta, "shared", None), arch=meta.target.arch,
               direction="backward" if "bwd" in name else "forward", module=module.rsplit(".", 1)[-1])
    if row["registers"] is None:
        row["error"] = "not loaded on the device: the driver gave no registers or spills"
    return judge(row)


def _worker_init() -> None:
    # Workers compile for a GPU target: the interpreter must be off before triton and fastrank are imported.
    os.environ.pop("TRITON_INTERPRET", None)
    _quiet_triton()


def _jobs(jobs: int | None) -> int:
    if jobs:
        return jobs
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compile_triton(arch: int, scope: str = "all", jobs: int | None = None, kernels: Iterable[str] | None = None,
                   progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Rows for every Triton variant (:func:`variants`), compiled in ``jobs`` processes (default: one per CPU
    this process may use; ptxas is single-threaded), in the order of :func:`variants`."""
    import multiprocessing

    todo = variants(arch, scope, kernels)
    rows: list[dict | None] = [None] * len(todo)
    with ProcessPoolExecutor(max_workers=min(_jobs(jobs), len(todo)) or 1, initializer=_worker_init,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(compile_variant, v, arch): i for i, v in enumerate(todo)}
        for future in as_completed(futures):
            rows[futures[future]] = future.result()
            if progress:
                progress(rows[futures[future]])
    return rows


# --------------------------------------------------------------------------------------------------------
# CUDA sources
# --------------------------------------------------------------------------------------------------------
def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return names
    run = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = run.stdout.splitlines()
    return out if run.returncode == 0 and len(out) == len(names) else names


def _cuda_kernel_name(demangled: str) -> tuple[str, str]:
    """("backward_dq_kernel<float>", "fp32") from "void fastrank::cuda::(anonymous namespace)::backward_dq_kernel
    <float>(fastrank::cuda::MaxSimArgs, ...)": the name without namespaces and arguments, and its first
    template argument as a dtype."""
    head = demangled.split("(", 1)[0] if "(anonymous namespace)" not in demangled else \
        demangled.replace("(anonymous namespace)", "anon").split("(", 1)[0]
    head = head.removeprefix("void ").strip()
    depth, cut = 0, 0
    for i, ch in enumerate(head):  # the last "::" outside template brackets starts the kernel's own name
        depth += ch == "<"
        depth -= ch == ">"
        if depth == 0 and head.startswith("::", i):
            cut = i + 2
    name = head[cut:]
    args = name[name.find("<") + 1:name.rfind(">")] if "<" in name else ""
    first = args.split(",")[0].strip()
    dtype = {"float": "fp32", "__nv_bfloat16": "bf16", "__half": "fp16", "double": "fp64"}.get(first, first or "-")
    return name, dtype


def nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def compile_cuda(arch: int, progress: Callable[[dict], None] | None = None) -> tuple[list[dict], str | None]:
    """(rows, None) for every kernel instantiation in csrc/cuda/*.cu compiled by ``nvcc -Xptxas -v`` with the
    CMakeLists flags (-O3 -lineinfo, C++17, -I csrc), or ([], why not)."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return [], "nvcc is not on PATH: the CUDA sources' rows are skipped"
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        return [], f"no .cu files under {ROOT / 'csrc' / 'cuda'} (fastrank not run from a source checkout)"
    rows = []
    for src in sources:
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run([nvcc, "-O3", "-lineinfo", "-std=c++17", "-Xptxas", "-v", f"-arch=sm_{arch}",
                                  "-I", str(ROOT / "csrc"), "-c", str(src), "-o", str(Path(tmp) / "k.o")],
                                 capture_output=True, text=True)
        rel = src.relative_to(ROOT).as_posix()
        if run.returncode != 0:
            row = dict(kernel=src.name, dtype="-", config=rel, arch=arch, direction="forward", module=src.stem,
                       error=f"does not compile: nvcc rc {run.returncode}: {_short(run.stderr)}")
            rows.append(judge(row))
            continue
        report = parse_ptxas_log(run.stdout + run.stderr)
        for mangled, pretty in zip(report, _demangle(list(report))):
            entry = report[mangled]
            name, dtype = _cuda_kernel_name(pretty)
            row = dict(kernel=name, dtype=dtype, config=rel, registers=entry["registers"],
                       spill_bytes=entry["spill_stores"] + entry["spill_loads"], shared_bytes=entry["smem_bytes"],
                       arch=arch, direction="backward" if "backward" in name else "forward", module=src.stem,
                       spill_stores=entry["spill_stores"], spill_loads=entry["spill_loads"])
            rows.append(judge(row))
            if progress:
                progress(rows[-1])
    return rows, None


# --------------------------------------------------------------------------------------------------------
# Collecting, formatting, the command line
# --------------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no")


def _without_interpreter(args: list[str]):
    """The JSON that ``python -m fastrank.bench.kernels *args --json FILE`` writes, run in a fresh process
    without TRITON_INTERPRET (kernels defined under the interpreter cannot be compiled for a GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        run = subprocess.run([sys.executable, "-m", "fastrank.bench.kernels", *args, "--json", str(out), "--quiet"],
                             env=env, capture_output=True, text=True, cwd=str(ROOT))
        if not out.is_file():
            raise RuntimeError(f"kernel_report subprocess failed (rc {run.returncode}): {run.stderr[-3000:]}")
        return json.loads(out.read_text())


def _check_arch(arch: int) -> None:
    if arch not in LIMITS:
        raise ValueError(f"kernel_report: arch must be one of {sorted(LIMITS)}, got {arch!r}")


def list_variants(arch: int, scope: str = "all", kernels: Iterable[str] | None = None) -> list[dict]:
    """:func:`describe` of every variant, without compiling (seconds: only the launchers run)."""
    _check_arch(arch)
    if _interpreting():
        return _without_interpreter(_argv(arch, scope=scope, kernels=kernels) + ["--list"])
    return [describe(v) for v in variants(arch, scope, kernels)]


def _argv(arch: int, scope: str = "all", kernels: Iterable[str] | None = None, include_cuda: bool = True,
          jobs: int | None = None) -> list[str]:
    argv = ["--arch", str(arch), "--scope", scope] + ([] if include_cuda else ["--no-cuda"])
    argv += ["--kernels", ",".join(kernels)] if kernels is not None else []
    return argv + (["--jobs", str(jobs)] if jobs else [])


def collect(arch: int, include_cuda: bool = True, scope: str = "all", jobs: int | None = None,
            kernels: Iterable[str] | None = None, progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Every Triton variant and (with ``include_cuda``, where nvcc exists) every CUDA kernel compiled for
    ``sm_{arch}``, as rows with the keys of :data:`ROW_KEYS`; only the kernels named in ``kernels`` (Triton
    kernel names, CUDA kernel names without template arguments) when given. Under TRITON_INTERPRET=1 (the
    test suite) the work runs in a fresh process without it, whose rows are returned."""
    _check_arch(arch)
    kernels = None if kernels is None else list(kernels)
    if _interpreting():
        return _without_interpreter(_argv(arch, scope, kernels, include_cuda, jobs))
    names = None
    if kernels is not None:
        names = set(kernels)
        triton_names = names & {name for _, name in launched_kernels()}
    rows = compile_triton(arch, scope=scope, jobs=jobs, progress=progress,
                          kernels=None if names is None else triton_names) if names is None or triton_names else []
    if include_cuda:
        cuda_rows, skipped = compile_cuda(arch, progress=progress)
        if skipped:
            print(f"kernel_report: {skipped}", file=sys.stderr)
        rows += [r for r in cuda_rows if names is None or r["kernel"].split("<")[0] in names]
    return rows


def _ptxas_version(arch: int) -> str:
    try:
        out = subprocess.run([_ptxas_path(arch), "--version"], capture_output=True, text=True).stdout
    except (ImportError, OSError):
        return "unknown"
    m = re.search(r"V([\d.]+)", out)
    return m.group(1) if m else "unknown"


def header_info(arch: int, command: str) -> dict:
    """What the table must name about how it was made: the command and the compilers' versions."""
    import triton

    return {"command": command, "arch": arch, "triton": triton.__version__, "ptxas": _ptxas_version(arch),
            "nvcc": nvcc_version() or "absent", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _cell(v) -> str:
    return "" if v is None else str(v)


def format_row(row: dict) -> str:
    fails = row_failures(row)
    verdict = "ok" if not fails else "FAIL: " + "; ".join(fails)
    return (f"| {row['kernel']} | {row['module']} | {row['dtype']} | {row['direction'][:3]} | {row['config']} | "
            f"{_cell(row['registers'])} | {_cell(row['spill_bytes'])} | {_cell(row['shared_bytes'])} | {verdict} |")


TABLE_HEAD = ("| kernel | module | dtype | pass | config | registers | spill bytes | shared bytes | verdict |\n"
              "|---|---|---|---|---|---:|---:|---:|---|")


def format_table(rows: list[dict], machine: dict) -> str:
    """The markdown report: how it was made, the limits, one row per compiled variant, and a summary."""
    arch = machine["arch"]
    limits = LIMITS[arch]
    failing = [r for r in rows if row_failures(r)]
    lines = [
        f"# Kernel resources for sm_{arch} (static compile, no GPU)", "",
        f"Generated by `{machine['command']}` on {machine['date']}: Triton {machine['triton']}, ptxas "
        f"{machine['ptxas']}, nvcc {machine['nvcc']}. Every kernel variant the launchers launch was compiled "
        f"ahead of time for sm_{arch} and read from ptxas -v; nothing ran on a GPU, so these are compiler "
        "figures, not measurements.", "",
        f"Limits (CUDA C++ Programming Guide, compute capability {arch // 10}.{arch % 10}): {limits['registers']} "
        f"registers per thread, {limits['shared_bytes']} bytes of shared memory per block. Spills must be zero "
        "in every kernel (issue 13 asks it of the forward kernels and the bf16 backward ones).", "",
        TABLE_HEAD,
    ]
    lines += [format_row(r) for r in rows]
    lines += ["", f"{len(rows)} variants, {len(failing)} failing."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # the entry point: the same as `fastrank bench kernels`
    from fastrank.cli import main

    raise SystemExit(main(["bench", "kernels", *sys.argv[1:]]))
