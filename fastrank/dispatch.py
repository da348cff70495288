"""The one place that chooses a backend for each call.

Backends are tried in priority order: Triton on CUDA, the compiled C++/CUDA extension, the Triton
interpreter (CPU tensors, only when ``TRITON_INTERPRET=1`` was set before fastrank was imported) and the
eager PyTorch reference. Each backend, and each op's implementation on it, reports why it cannot run a
call; the first with no reason runs it. An implementation may also say where it is *slower* than the eager
reference on this machine (a scalar CPU path, a call that would leave cores idle): automatic dispatch
then passes it over, so a fused path is never slower than eager, while a caller who forces it still gets
it. A caller forces a backend with ``backend=`` or the environment variable ``FASTRANK_BACKEND``; a forced
backend that cannot run raises an error listing the reasons. The environment variable is process-wide, so it
forces only the ops that have that backend: an op without it (LITE has no C++ path on CUDA) ignores the variable,
warns once, and dispatches automatically. :func:`explain` says what runs and why.

Ops register, per backend, one :class:`Kernels` (or one per device type of the backend) holding that
backend's forward and backward, and reach the chosen backend's through :func:`kernels` alone: no op branches
on backend names or inspects devices to pick a code path.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from fastrank import _ext

BACKENDS: tuple[str, ...] = ("triton", "cpp", "triton_interpret", "reference")
ENV_VAR = "FASTRANK_BACKEND"

Reasons = Callable[..., list[str]]


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the call; the message lists every reason."""


@dataclass(frozen=True)
class Kernels:
    """What an op runs on one backend. With ``backward``, ``forward`` and ``backward`` are the op's kernel
    entry points (taking its canonical tensors), and the op wires them into autograd and torch.library.
    Without one, ``forward`` takes the op's own arguments and returns a result that carries its own autograd
    (eager PyTorch, the reference; a fused loss's autograd.Function), so the op only calls it."""

    forward: Callable
    backward: Callable | None = None


@dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    kernels: Kernels | dict[str, Kernels]  # one, or one per device type (see :func:`kernels`)
    reasons: Reasons
    slower: Reasons
    describe: Callable[..., str]


_REGISTRY: dict[str, dict[str, Implementation]] = {}
_CONTEXT: dict[str, Callable[..., dict]] = {}


def register_context(op: str, fn: Callable[..., dict]) -> None:
    """``fn(*tensors)`` builds ``op``'s dispatch context from its inputs, so :func:`explain` needs only them."""
    _CONTEXT[op] = fn


def register(op: str, backend: str, kernels: Kernels | dict[str, Kernels], *, reasons: Reasons | None = None,
             slower: Reasons | None = None, describe: Callable[..., str] | None = None) -> None:
    """``kernels`` implement ``op`` on ``backend`` (a dict: one per device type, as the C++ extension's CPU and
    CUDA entry points); ``reasons(**ctx)`` lists what it cannot handle, ``slower(**ctx)`` where it would lose
    to the eager reference (skipped unless forced), and ``describe(**ctx)`` names the kernel that would run
    (for :func:`explain`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    entries = kernels.values() if isinstance(kernels, dict) else (kernels,)
    if not all(isinstance(k, Kernels) for k in entries):
        raise TypeError(f"dispatch.register({op!r}, {backend!r}): kernels must be a Kernels or a dict of them "
                        f"per device type, got {type(kernels).__name__}")
    _REGISTRY.setdefault(op, {})[backend] = Implementation(
        op, backend, kernels, reasons or (lambda **_: []), slower or (lambda **_: []),
        describe or (lambda **_: backend),
    )


_TRITON_STATE: tuple[bool, bool, str] | None = None


def _triton_state() -> tuple[bool, bool, str]:
    """(importable, interpreting, import error). Decided once: Triton reads TRITON_INTERPRET when a kernel
    is defined, so the mode fastrank's kernels were defined in is the mode they run in. (A plain global
    rather than lru_cache: Dynamo traces through this under torch.compile.)"""
    global _TRITON_STATE
    if _TRITON_STATE is None:
        try:
            import triton  # noqa: F401

            interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
            _TRITON_STATE = (True, interpreting, "")
        except Exception as exc:  # ImportError, or a broken install raising something else
            _TRITON_STATE = (False, False, f"triton is not importable ({exc.__class__.__name__}: {exc}); pip install triton")
    return _TRITON_STATE


def _devices(tensors: Iterable[torch.Tensor | None]) -> set[str]:
    return {t.device.type for t in tensors if t is not None}


def environment_reasons(backend: str, devices: Iterable[str]) -> list[str]:
    """Why ``backend`` cannot run on tensors of these device types, independent of the op."""
    devices = set(devices)
    reasons: list[str] = []
    if backend == "triton":
        ok, interpreting, err = _triton_state()
        if not ok:
            reasons.append(err)
        elif interpreting:
            reasons.append("TRITON_INTERPRET=1 was set when fastrank was imported: kernels run interpreted")
        if devices != {"cuda"}:
            reasons.append(f"needs CUDA tensors, got device type(s) {sorted(devices)}")
    elif backend == "triton_interpret":
        ok, interpreting, err = _triton_state()
        if not ok:
            reasons.append(err)
        elif not interpreting:
            reasons.append("TRITON_INTERPRET=1 was not set before fastrank was imported")
        if devices != {"cpu"}:
            reasons.append(f"the interpreter runs on CPU tensors, got device type(s) {sorted(devices)}")
    elif backend == "cpp":
        err = _ext.unavailable_reason()
        if err is not None:
            reasons.append(err)
        elif "cuda" in devices and not _ext.load().has_cuda:
            reasons.append("fastrank._C was built without CUDA sources (no CUDA compiler at build time)")
        if not devices <= {"cpu", "cuda"}:
            reasons.append(f"supports CPU and CUDA tensors, got device type(s) {sorted(devices)}")
    return reasons


def requested_backend(backend: str | None, op: str | None = None) -> str | None:
    """The caller's choice, else the environment's, validated. With ``op``, the environment's choice counts
    only when ``op`` has an implementation on that backend (see :func:`env_override`)."""
    choice = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if choice is not None and choice not in BACKENDS:
        source = "backend=" if backend is not None else f"${ENV_VAR}="
        raise ValueError(f"{source}{choice!r} is not a backend; expected one of {BACKENDS}")
    if backend is None and choice is not None and op is not None and choice not in _REGISTRY.get(op, {}):
        return None
    return choice


_ENV_IGNORED_WARNED: set[str] = set()


def env_override(op: str) -> str:
    """What ``FASTRANK_BACKEND`` does to ``op``: "" when unset, else a sentence saying whether it forces
    the backend or is ignored because ``op`` has no implementation there."""
    choice = os.environ.get(ENV_VAR) or None
    if choice is None:
        return ""
    if choice in _REGISTRY.get(op, {}):
        return f"${ENV_VAR}={choice} forces the {choice} backend"
    return (f"${ENV_VAR}={choice} ignored: {op!r} has no {choice} implementation (it has "
            f"{', '.join(_REGISTRY.get(op, {})) or 'none'}), so it dispatches automatically")


def _warn_env_ignored(op: str) -> None:
    # The variable is set for a whole process (a benchmark, a CI job): an op it cannot apply to still
    # runs, and says so once rather than on every call.
    if op in _ENV_IGNORED_WARNED or torch.compiler.is_compiling():
        return
    _ENV_IGNORED_WARNED.add(op)
    warnings.warn(f"fastrank.{op}: {env_override(op)}", RuntimeWarning, stacklevel=3)


SLOWER = "slower than eager here: "


def reasons_for(op: str, backend: str, tensors: Sequence[torch.Tensor | None], **ctx) -> list[str]:
    """Why automatic dispatch would not run this call on ``backend``: what it cannot do, and where it would
    be slower than eager (those prefixed with :data:`SLOWER`)."""
    return _reasons(op, backend, frozenset(_devices(tensors)), tuple((name, ctx[name]) for name in sorted(ctx)))


@functools.lru_cache(maxsize=4096)
def _reasons(op: str, backend: str, devices: frozenset, ctx: tuple, with_slower: bool = True) -> list[str]:
    # Cached: availability is a property of the installation, fixed for the life of the process, and
    # this runs on every call of every op. `reset()` clears it (and so does switching the CPU ISA path,
    # which is part of ctx).
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return [f"{op!r} has no {backend} implementation"]
    kwargs = dict(ctx)
    reasons = environment_reasons(backend, devices) + impl.reasons(device_types=set(devices), **kwargs)
    if with_slower and not reasons:
        reasons = [SLOWER + r for r in impl.slower(device_types=set(devices), **kwargs)]
    return reasons


def reset() -> None:
    """Forget cached availability (after installing Triton or rebuilding the extension in-process)."""
    global _TRITON_STATE
    _reasons.cache_clear()
    _choose_cached.cache_clear()
    _TRITON_STATE = None


def choose(op: str, tensors: Sequence[torch.Tensor | None], backend: str | None = None, **ctx) -> Implementation:
    """The implementation of ``op`` to run on ``tensors``.

    ``ctx`` (hashable values) is passed to each implementation's ``reasons`` along with ``device_types``:
    the shapes, dtypes and flags the op cares about.
    """
    env = os.environ.get(ENV_VAR) or None
    devices = frozenset(t.device.type for t in tensors if t is not None)
    # Sorted by name only: under torch.compile with dynamic shapes a value may be a SymInt, which Dynamo
    # cannot order (and names are unique, so values never need comparing).
    key = tuple((name, ctx[name]) for name in sorted(ctx))
    if torch.compiler.is_compiling():
        # The choice is made once, at trace time, uncached: Dynamo does not trace through lru_cache
        # wrappers (it warns and bypasses them).
        return _choose(op, backend, env, devices, key, _reasons.__wrapped__)
    # Cached per call signature: a fused loss at a training-sized batch takes a few microseconds, so the
    # walk over backends (and its string building) must not run on every call.
    return _choose_cached(op, backend, env, devices, key)


def _choose(op: str, backend: str | None, env: str | None, devices: frozenset, key: tuple,
            lookup: Callable[..., list[str]]) -> Implementation:
    forced = requested_backend(backend, op)
    if forced is None and backend is None and env:
        _warn_env_ignored(op)
    if forced is not None:
        reasons = lookup(op, forced, devices, key, False)
        if reasons:
            raise BackendUnavailableError(
                f"fastrank.{op}: backend {forced!r} cannot run this call:\n  - " + "\n  - ".join(reasons)
            )
        return _REGISTRY[op][forced]
    collected = []
    for name in BACKENDS:
        reasons = lookup(op, name, devices, key)
        if not reasons:
            return _REGISTRY[op][name]
        collected.append(f"{name}: " + "; ".join(reasons))
    raise BackendUnavailableError(f"fastrank.{op}: no backend can run this call:\n  - " + "\n  - ".join(collected))


@functools.lru_cache(maxsize=4096)
def _choose_cached(op: str, backend: str | None, env: str | None, devices: frozenset, key: tuple) -> Implementation:
    # `env` is part of the key so that changing FASTRANK_BACKEND mid-process takes effect; errors are raised,
    # never cached.
    return _choose(op, backend, env, devices, key, _reasons)


def kernels(op: str, backend: str, tensor: torch.Tensor) -> Kernels:
    """The :class:`Kernels` ``op`` registered for ``backend`` (the one :func:`choose` picked), for ``tensor``'s
    device type where it registered one per device type, so ops need not branch on backends or devices."""
    registered = _REGISTRY[op][backend].kernels
    if isinstance(registered, dict):
        if tensor.device.type not in registered:
            raise BackendUnavailableError(f"fastrank.{op}: backend {backend!r} has no kernel for {tensor.device.type} tensors")
        return registered[tensor.device.type]
    return registered


class Explanation(dict):
    """backend -> reasons it would not run the call (empty: it can), plus what runs: ``chosen`` (the
    backend a call without ``backend=`` runs: the one ``FASTRANK_BACKEND`` forces, else the one automatic
    dispatch picks; None when nothing can run it), ``kernel`` (the kernel or CPU ISA path it runs),
    ``override`` (what ``FASTRANK_BACKEND`` does to this op, "" when unset) and ``str()`` of it as a
    readable summary."""

    chosen: str | None
    kernel: str
    override: str = ""

    def __str__(self) -> str:
        lines = [f"runs: {self.chosen or 'nothing'}" + (f" ({self.kernel})" if self.kernel else "")]
        if self.override:
            lines.append(f"  {self.override}")
        for name, reasons in self.items():
            lines.append(f"  {name}: " + ("can run" if not reasons else "; ".join(reasons)))
        return "\n".join(lines)


def explain(op: str, tensors: Sequence[torch.Tensor | None], **ctx) -> Explanation:
    """For each backend, why automatic dispatch would not run this call on it (an empty list: it can),
    including where it would be slower than eager; ``.chosen`` and ``.kernel`` say what does run.

    ``tensors`` are the op's inputs in order (``(q, d, q_mask, d_mask)`` for maxsim); without ``ctx`` the
    context is built from them as the op itself does: ``print(fastrank.dispatch.explain("maxsim", (q, d)))``.
    """
    if not ctx and op in _CONTEXT:
        ctx = _CONTEXT[op](*tensors)
    out = Explanation({name: reasons_for(op, name, tensors, **ctx) for name in BACKENDS})
    out.override = env_override(op)
    forced = requested_backend(None, op)
    if forced is not None:
        # A forced backend runs even where it is slower than eager; one that cannot run makes the call raise.
        key = tuple((name, ctx[name]) for name in sorted(ctx))
        can_run = not _reasons(op, forced, frozenset(_devices(tensors)), key, False)
        out.chosen = forced if can_run else None
    else:
        out.chosen = next((name for name, reasons in out.items() if not reasons), None)
    impl = _REGISTRY.get(op, {}).get(out.chosen) if out.chosen else None
    out.kernel = impl.describe(device_types=_devices(tensors), **ctx) if impl is not None else ""
    return out
