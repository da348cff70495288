"""Fused distillation losses for re-rankers: a student's scores ``s`` against a teacher's ``t``.

Read top to bottom: the kernels' launchers (the kernels are C++/OpenMP in ``csrc/cpu/losses.cpp`` and CUDA in
``csrc/cuda/losses.cu``; their header comments give every loss and its gradient), the ``torch.library`` custom
ops with their fake and autograd registrations, argument checks, the backend registrations, the public
functions, and the plain PyTorch references ``*_ref`` that are the spec.

Every distillation loss is a sum over the valid candidates of one query. With ``P`` the valid positives,
``N`` the valid negatives and ``j*`` the negative with the highest teacher score (ties: the first):

- ``mse``:          sum_k (t_k - s_k)^2
- ``margin_mse``:   sum_{i in P, j in N} ((t_i - t_j) - (s_i - s_j))^2
- ``m3se``:         sum_{i in P} ((t_i - t_j*) - (s_i - s_j*))^2 + sum_{j in N} max(s_j - s_j*, 0)^2
- ``softmax_ce``:   -sum_k softmax(t/tau)_k log softmax(s/tau)_k
- ``kl_div``:       softmax_ce minus the teacher's entropy (same gradient)
- ``rankdistil_b``: sum_{i in P} (t_i - s_i)^2 + sum_{j in N} max(s_j - gamma0, 0)^2

A query "has a term" when its sum is not empty: mse, softmax_ce, kl_div and rankdistil_b need one valid
candidate, margin_mse a valid positive and a valid negative, m3se a valid negative. ``reduction="mean"``
averages over the queries that have a term; the others contribute 0 loss and 0 gradient.

The kernels compute the loss and dL/ds in one pass (float32 for float32/16/bf16 inputs, float64 for float64)
and keep only dL/ds for backward, which scales it by the upstream gradient; so there is no double backward
(``create_graph=True`` raises a RuntimeError that names the ``*_ref`` to use instead).

Non-finite scores at valid candidates (masked ones are padding and may hold anything), alike in every backend
(but see "On CUDA" below for when the error is raised):

- a NaN teacher score raises ValueError naming ``t`` and the first position;
- an infinite teacher score the loss reads raises ValueError (which one, where): mse reads every teacher
  score, margin_mse those of queries with a pair, rankdistil_b the positives', m3se the positives' and
  ``t_j*`` of queries with a positive and a negative. One it never reads (rankdistil_b's negatives, m3se's
  negatives below ``j*``) may be -inf or inf. In softmax_ce and kl_div, -inf is a candidate of probability 0
  (no loss, no gradient from the teacher side); +inf, or -inf at every valid candidate of a query, raises;
- a NaN or infinite student score propagates: the queries whose loss reads it get a NaN or infinite loss
  (as in torch's own losses), while one it cannot change (-inf below a hinge, or where the teacher gives
  probability 0) leaves the loss finite.

On CUDA the fused kernels never wait for the GPU: checking the teacher scores on the host would need a stream
synchronisation on every call, which stalls the Python thread until the GPU has caught up with everything
queued before the loss (and forbids CUDA graph capture). The
kernels detect the same conditions (and inbatch_ce's target >= M) on the device instead, and give each
offending query a NaN loss and a NaN gradient at all of its valid candidates, so nothing is silently wrong:
a "sum" or "mean" loss is NaN, and so is the gradient of the rows concerned. ``set_validation(True)`` (a
function and a context manager, like ``torch.set_grad_enabled``) restores the check: each CUDA call then
synchronises once to read the kernel's error flag and, when it is set, raises the CPU's exact ValueError.
Use it while debugging data, or in tests. The CPU kernels and the reference backend always raise (their
check costs nothing extra), whatever the setting. Why not a device-side assert, PyTorch's answer for index
errors (``CUDA_KERNEL_ASSERT``, ``torch._assert_async``): it leaves the CUDA context unusable for the rest of
the process and names no argument or position.

float32 softmax_ce, kl_div and inbatch_ce form every logit difference from the raw scores before dividing by
``tau``, so scores of any magnitude and any ``tau > 0`` give the float64 answer rounded, or an infinity where
that overflows float32, never NaN.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastrank import _ext, cpu_isa, dispatch
from fastrank.ops.pairs import device_guard

# Must match the Kind and Reduction enums in csrc/cpu/losses.cpp and csrc/cuda/losses.cu.
LOSS_KINDS = {"mse": 0, "margin_mse": 1, "m3se": 2, "softmax_ce": 3, "kl_div": 4, "rankdistil_b": 5}
_KIND_NAMES = {code: name for name, code in LOSS_KINDS.items()}
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
_NEEDS_PAIR = ("margin_mse", "m3se")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _workspace_bytes(batch: int) -> int:
    # Must match csrc/cuda/losses_cuda.h: losses_workspace_bytes.
    return 16 + 12 * batch


_validation = False


class set_validation:
    """Whether the fused losses on CUDA check their inputs synchronously (default: no; see the module docstring).

    ``set_validation(True)`` turns the check on for the process; ``with set_validation(True): ...`` for a block,
    restoring the previous setting on exit. With it on, each CUDA call synchronises its stream once and raises
    the CPU's exact ValueError for a NaN teacher score at a valid candidate, an infinite one the loss reads, a
    row whose teacher is -inf everywhere (softmax_ce, kl_div) or an inbatch_ce target >= M; with it off, those
    queries get a NaN loss and gradient instead and no call waits for the GPU. CPU calls always raise.
    The setting is global (not per thread), like ``torch.backends`` flags.
    """

    def __init__(self, enabled: bool) -> None:
        global _validation
        if not isinstance(enabled, bool):
            raise TypeError(f"fastrank.losses.set_validation: enabled must be a bool, got {type(enabled).__name__}")
        self._previous = _validation
        _validation = enabled

    def __enter__(self) -> "set_validation":
        return self

    def __exit__(self, *exc) -> None:
        global _validation
        _validation = self._previous


def validation_enabled() -> bool:
    """Whether :class:`set_validation` is on."""
    return _validation


def _raise_if_flagged(workspace: Tensor, check) -> None:
    """The synchronous check: read the kernel's error flags (int32 at byte 4 of the workspace, one stream
    synchronisation) and, when one is set, let ``check`` find the first offending position and raise the
    message the CPU kernels give."""
    flags = int(workspace[4:8].view(torch.int32).item())
    if flags:
        check()
        raise RuntimeError(f"fastrank.losses: the CUDA kernel flagged invalid input (error bits {flags:#x}) that the "
                           f"host check did not find; please report this with the inputs")


# --------------------------------------------------------------------------------------------------------
# Launchers: tensors in (the extension checks each one), (loss, dL/ds) out, the reduction's 1/count already in
# dL/ds. Inputs are never written.
# --------------------------------------------------------------------------------------------------------
def _outputs(x: Tensor, reduction: int) -> tuple[Tensor, Tensor]:
    acc = _accumulator(x.dtype)
    batch = x.shape[0]
    loss = x.new_empty((batch,) if reduction == REDUCTIONS["none"] else (), dtype=acc)
    return loss, x.new_empty(tuple(x.shape), dtype=acc)


def _launch_distill_cpu(s: Tensor, t: Tensor, positives: Optional[Tensor], mask: Optional[Tensor], kind: int,
                        reduction: int, param: float) -> tuple[Tensor, Tensor]:
    loss, grad = _outputs(s, reduction)
    _ext.require().distill_forward(kind, reduction, param, s, t, positives, mask, loss, grad, cpu_isa.selected())
    return loss, grad


def _launch_distill_cuda(s: Tensor, t: Tensor, positives: Optional[Tensor], mask: Optional[Tensor], kind: int,
                         reduction: int, param: float) -> tuple[Tensor, Tensor]:
    # The extension launches on the current device; s's stream is passed in, so s's GPU must be current.
    with device_guard(s):
        loss, grad = _outputs(s, reduction)
        scale = loss.new_empty(())
        workspace = torch.zeros(_workspace_bytes(s.shape[0]), dtype=torch.uint8, device=s.device)
        _ext.require().distill_forward_cuda(kind, reduction, param, s, t, positives, mask, loss, grad, scale, workspace,
                                            _ext.cuda_stream(s))
        if _validation:
            _raise_if_flagged(workspace, lambda: _check_teacher(_KIND_NAMES[kind], t, positives, mask))
        _fold_scale(grad, scale, reduction)
    return loss, grad


def _launch_inbatch_ce_cpu(scores: Tensor, target: Tensor, reduction: int, tau: float) -> tuple[Tensor, Tensor]:
    loss, grad = _outputs(scores, reduction)
    _ext.require().inbatch_ce_forward(reduction, tau, scores, target, loss, grad, cpu_isa.selected())
    return loss, grad


def _launch_inbatch_ce_cuda(scores: Tensor, target: Tensor, reduction: int, tau: float) -> tuple[Tensor, Tensor]:
    with device_guard(scores):
        loss, grad = _outputs(scores, reduction)
        scale = loss.new_empty(())
        workspace = torch.zeros(_workspace_bytes(scores.shape[0]), dtype=torch.uint8, device=scores.device)
        _ext.require().inbatch_ce_forward_cuda(reduction, tau, scores, target, loss, grad, scale, workspace,
                                               _ext.cuda_stream(scores))
        if _validation:
            _raise_if_flagged(workspace, lambda: _check_target(scores, target))
        _fold_scale(grad, scale, reduction)
    return loss, grad


def _fold_scale(grad: Tensor, scale: Tensor, reduction: int) -> None:
    # The CUDA kernels count the queries with a term across the grid, in whichever block finishes last, so
    # they report "mean"'s 1/count in `scale` rather than apply it; one device-side multiply folds it in,
    # queued on the same stream, without reading the count back.
    if reduction == REDUCTIONS["mean"]:
        grad.mul_(scale)


# The "cpp" backend serves both devices, one launcher each. The custom ops below register them with
# torch.library per device type (torch's dispatcher picks); eager calls, which skip the custom ops, pick from
# this table. Device types other than these never get here: the "cpp" backend's reasons refuse them.
_DISTILL_LAUNCHERS = {"cpu": _launch_distill_cpu, "cuda": _launch_distill_cuda}
_INBATCH_CE_LAUNCHERS = {"cpu": _launch_inbatch_ce_cpu, "cuda": _launch_inbatch_ce_cuda}


def _launch_distill(s: Tensor, t: Tensor, positives: Optional[Tensor], mask: Optional[Tensor], kind: int,
                    reduction: int, param: float) -> tuple[Tensor, Tensor]:
    """Raw pointers and strides in, (loss, dL/ds) out; inputs are never written."""
    # Named first: tests/test_device_guard.py reads `table[key](...)` as a Triton launch `kernel[grid](...)`.
    launch = _DISTILL_LAUNCHERS[s.device.type]
    return launch(s, t, positives, mask, kind, reduction, param)


def _launch_inbatch_ce(scores: Tensor, target: Tensor, reduction: int, tau: float) -> tuple[Tensor, Tensor]:
    launch = _INBATCH_CE_LAUNCHERS[scores.device.type]
    return launch(scores, target, reduction, tau)


# --------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, with shapes from the fake kernels and gradients from the saved dL/ds.
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastrank::distill_loss", mutates_args=(), device_types="cpu")
def distill_loss_op(s: Tensor, t: Tensor, positives: Optional[Tensor], mask: Optional[Tensor], kind: int,
                    reduction: int, param: float) -> tuple[Tensor, Tensor]:
    """(loss, dL/ds): loss is (B,) for reduction "none" else (); dL/ds is (B, K), before the upstream gradient."""
    return _launch_distill_cpu(s, t, positives, mask, kind, reduction, param)


distill_loss_op.register_kernel("cuda")(_launch_distill_cuda)


@distill_loss_op.register_fake
def _(s, t, positives, mask, kind, reduction, param):
    return _outputs(s, reduction)


@torch.library.custom_op("fastrank::inbatch_ce", mutates_args=(), device_types="cpu")
def inbatch_ce_op(scores: Tensor, target: Tensor, reduction: int, tau: float) -> tuple[Tensor, Tensor]:
    """(loss, dL/dscores), as :func:`distill_loss_op`."""
    return _launch_inbatch_ce_cpu(scores, target, reduction, tau)


inbatch_ce_op.register_kernel("cuda")(_launch_inbatch_ce_cuda)


@inbatch_ce_op.register_fake
def _(scores, target, reduction, tau):
    return _outputs(scores, reduction)


def _scaled_grad(grad: Tensor, grad_loss: Tensor, per_query: bool, dtype: torch.dtype) -> Tensor:
    """Backward of every fused loss: the saved dL/dx (reduction included) times the upstream gradient."""
    # "none": one upstream value per query; otherwise one scalar. Each torch op costs microseconds of Python
    # dispatch, as much as the kernel at B=128 K=20: no cast that would be a no-op.
    weight = grad_loss.unsqueeze(-1) if per_query else grad_loss
    if weight.dtype != grad.dtype:
        weight = weight.to(grad.dtype)
    out = grad * weight
    return out if out.dtype == dtype else out.to(dtype)


def _autograd_for(reduction_index: int, n_inputs: int):
    def setup_context(ctx, inputs, output):
        _, grad = output
        ctx.save_for_backward(grad)
        ctx.per_query = inputs[reduction_index] == REDUCTIONS["none"]
        ctx.input_dtype = inputs[0].dtype
        ctx.mark_non_differentiable(grad)

    def backward(ctx, grad_loss, _grad_grad):
        (grad,) = ctx.saved_tensors
        return (_scaled_grad(grad, grad_loss, ctx.per_query, ctx.input_dtype),) + (None,) * (n_inputs - 1)

    return setup_context, backward


_setup, _backward = _autograd_for(reduction_index=5, n_inputs=7)
distill_loss_op.register_autograd(_backward, setup_context=_setup)
_setup, _backward = _autograd_for(reduction_index=2, n_inputs=4)
inbatch_ce_op.register_autograd(_backward, setup_context=_setup)


def _double_backward_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"fastrank.losses.{name}: double backward (create_graph=True) is not supported: the fused kernel keeps "
        f"dL/ds only, not the second derivative. Use fastrank.losses.{name}_ref, the eager reference, where "
        f"higher-order gradients are needed (or backend=\"reference\")")


class _EagerFusedLoss(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager calls.

    A custom op's autograd wrapper costs about 50 us per call on CPU, more than the whole fused loss at a
    training-sized batch (B=128, K=20), so eager code calls the launcher through this Function and only
    traced code (torch.compile) goes through the custom ops, which it needs for fake shapes.
    """

    @staticmethod
    def forward(ctx, x: Tensor, launch, per_query: bool, name: str) -> Tensor:
        loss, grad = launch()
        ctx.save_for_backward(grad)
        ctx.per_query, ctx.input_dtype, ctx.name = per_query, x.dtype, name
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Grad mode is on in backward only under create_graph=True: raise there, naming the way out, rather
        # than hand back a gradient whose own derivative would silently miss the Hessian term.
        if torch.is_grad_enabled():
            raise _double_backward_error(ctx.name)
        (grad,) = ctx.saved_tensors
        return _scaled_grad(grad, grad_loss, ctx.per_query, ctx.input_dtype), None, None, None


# --------------------------------------------------------------------------------------------------------
# Argument checks, shared by every backend so that errors do not depend on which one runs.
# --------------------------------------------------------------------------------------------------------
def _check_reduction(name: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"fastrank.losses.{name}: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")


def _check_scores(name: str, arg: str, x, like: Optional[Tensor] = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"fastrank.losses.{name}: {arg} must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"fastrank.losses.{name}: {arg} must be a (B, K) matrix, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"fastrank.losses.{name}: {arg} must be floating point, got {x.dtype}")
    if like is None:
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"fastrank.losses.{name}: {arg} must have at least one row and column, "
                             f"got shape {tuple(x.shape)}")
        return
    if x.shape != like.shape:
        raise ValueError(f"fastrank.losses.{name}: {arg} must have the shape of s {tuple(like.shape)}, "
                         f"got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"fastrank.losses.{name}: {arg} is on {x.device} but s is on {like.device}")
    if x.dtype != like.dtype:
        raise ValueError(f"fastrank.losses.{name}: {arg} has dtype {x.dtype} but s has {like.dtype}; "
                         f"cast one of them")


def _check_flags(name: str, arg: str, x, like: Tensor) -> None:
    if x is None:
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"fastrank.losses.{name}: {arg} must be a bool tensor or None, got {type(x).__name__}")
    if x.dtype != torch.bool:
        raise ValueError(f"fastrank.losses.{name}: {arg} must be a bool tensor, got {x.dtype}")
    if x.shape != like.shape:
        raise ValueError(f"fastrank.losses.{name}: {arg} must have the shape of s {tuple(like.shape)}, "
                         f"got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"fastrank.losses.{name}: {arg} is on {x.device} but s is on {like.device}")


def _check_distill(name, s, t, positives, mask, reduction, param_name, param) -> None:
    _check_scores(name, "s", s)
    _check_scores(name, "t", t, like=s)
    _check_flags(name, "positives", positives, s)
    _check_flags(name, "mask", mask, s)
    _check_reduction(name, reduction)
    if name in _NEEDS_PAIR and s.shape[1] < 2:
        raise ValueError(f"fastrank.losses.{name}: needs K >= 2 candidates per query (a positive and a "
                         f"negative), got s of shape {tuple(s.shape)}")
    if param_name == "tau" and not (math.isfinite(param) and param > 0):
        raise ValueError(f"fastrank.losses.{name}: tau must be a finite number > 0, got {param!r}")
    if param_name == "gamma0" and not math.isfinite(param):
        raise ValueError(f"fastrank.losses.{name}: gamma0 must be finite, got {param!r}")


def _check_teacher(name: str, t: Tensor, positives: Optional[Tensor], mask: Optional[Tensor]) -> None:
    """The teacher-score rule of the module docstring, for the reference backend; the kernels apply the same
    rule (csrc/cpu/losses.cpp: infinite_teacher_read) and raise the same messages."""
    valid = torch.ones_like(t, dtype=torch.bool) if mask is None else mask
    bad = torch.isnan(t) & valid
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"fastrank: t (teacher scores) contains NaN at a valid candidate, first at [{row}, {col}]; "
                         f"clean or mask the teacher scores")
    inf = torch.isinf(t) & valid
    if not bool(inf.any()):
        return
    _, t_, valid, pos, neg = _prepare(t, t, positives, mask)
    whole_row = torch.zeros_like(valid)
    if name == "mse":
        read = valid
    elif name == "margin_mse":
        read = valid & (pos.any(-1, keepdim=True) & neg.any(-1, keepdim=True))
    elif name == "rankdistil_b":
        read = pos
    elif name == "m3se":
        star = torch.zeros_like(valid).scatter_(-1, _m3se_star(t_, neg), True) & neg
        read = (pos | star) & pos.any(-1, keepdim=True) & neg.any(-1, keepdim=True)
    else:  # softmax_ce, kl_div: -inf is a zero probability, unless the whole row is -inf
        read = valid & (t_ > 0)
        all_neg_inf = valid.any(-1) & ~(valid & (t_ != -math.inf)).any(-1)
        first_valid = torch.zeros_like(valid).scatter_(-1, valid.byte().argmax(-1, keepdim=True), True)
        whole_row = first_valid & all_neg_inf[:, None]
    bad = (inf & read) | whole_row
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        if bool(whole_row[row, col]):
            raise ValueError(f"fastrank: t (teacher scores) is -inf at every valid candidate of row {row}, so "
                             f"softmax(t/tau) is undefined; mask the row")
        sign = "inf" if t_[row, col] > 0 else "-inf"
        raise ValueError(f"fastrank: t (teacher scores) contains {sign} at a valid candidate that {name} uses, first "
                         f"at [{row}, {col}]; mask the candidate or give it a finite score")


# --------------------------------------------------------------------------------------------------------
# Backends: "cpp" (C++ on CPU, CUDA on GPU) is the kernel, "reference" the eager spec.
# --------------------------------------------------------------------------------------------------------
def _cpp_reasons(dtype: torch.dtype, **_) -> list[str]:
    return [] if dtype in _KERNEL_DTYPES else [f"the kernels take {[str(d) for d in _KERNEL_DTYPES]}, got {dtype}"]


def _register_distill(name: str) -> None:
    # Each backend's forward returns the loss with its autograd attached (the fused kernel's Function or
    # custom op; the reference's own graph), so a Kernels with no separate backward.
    kind = LOSS_KINDS[name]

    def _cpp(s, t, positives, mask, reduction, param):
        code, param = REDUCTIONS[reduction], float(param)
        if torch.compiler.is_compiling():
            loss = distill_loss_op(s, t.detach(), positives, mask, kind, code, param)[0]
        else:  # t is no input of the Function, so no gradient reaches it; no detach needed
            launch = lambda: _launch_distill(s, t, positives, mask, kind, code, param)  # noqa: E731
            loss = _EagerFusedLoss.apply(s, launch, code == 0, name)
        return loss if loss.dtype == s.dtype else loss.to(s.dtype)

    def _reference(s, t, positives, mask, reduction, param):
        if not _on_meta(t):
            _check_teacher(name, t, positives, mask)
        reference, param_name = _REFERENCES[name]
        extra = {param_name: param} if param_name else {}
        return reference(s, t, positives, mask, reduction, **extra)

    dispatch.register(name, "cpp", dispatch.Kernels(_cpp), reasons=_cpp_reasons)
    dispatch.register(name, "reference", dispatch.Kernels(_reference))


def _inbatch_ce_cpp(scores, target, reduction, tau):
    code, tau = REDUCTIONS[reduction], float(tau)
    if torch.compiler.is_compiling():
        loss = inbatch_ce_op(scores, target, code, tau)[0]
    else:
        loss = _EagerFusedLoss.apply(scores, lambda: _launch_inbatch_ce(scores, target, code, tau), code == 0,
                                     "inbatch_ce")
    return loss if loss.dtype == scores.dtype else loss.to(scores.dtype)


def _on_meta(x: Tensor) -> bool:
    """Meta tensors have shapes and no values: the reference's math gives the loss's shape and dtype (as
    maxsim does on meta), and there is no value to check."""
    return x.device.type == "meta"


def _check_target(scores: Tensor, target: Tensor) -> None:
    """inbatch_ce's target rule, with the CPU kernel's message (csrc/cpu/losses.cpp)."""
    if _on_meta(target):
        return
    bad = target >= scores.shape[1]
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"fastrank: target[{row}] = {int(target[row])} is out of range for scores with M = "
                         f"{scores.shape[1]} columns (expected 0 <= target < M, or a negative value to ignore the row)")


def _inbatch_ce_reference(scores, target, reduction, tau):
    _check_target(scores, target)
    return inbatch_ce_ref(scores, target, tau=tau, reduction=reduction)


dispatch.register("inbatch_ce", "cpp", dispatch.Kernels(_inbatch_ce_cpp), reasons=_cpp_reasons)
dispatch.register("inbatch_ce", "reference", dispatch.Kernels(_inbatch_ce_reference))


def _distill(name: str, s, t, positives, mask, reduction: str, param_name: str, param: float, backend):
    _check_distill(name, s, t, positives, mask, reduction, param_name, param)
    impl = dispatch.choose(name, (s, t, positives, mask), backend=backend, dtype=s.dtype)
    return dispatch.kernels(name, impl.backend, s).forward(s, t, positives, mask, reduction, param)


# --------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------
_ARGS_DOC = """
    Args:
        s: (B, K) student scores, float32/float16/bfloat16/float64; the gradient flows to it.
        t: (B, K) teacher scores, same dtype and device as ``s``; no gradient flows to it. A NaN at a valid
            candidate, or an infinity the loss reads, raises ValueError (on CUDA only under
            ``set_validation(True)``; otherwise that query's loss and gradient are NaN); a NaN or infinity in
            ``s`` propagates to the loss instead (see :mod:`fastrank.ops.losses`).
        positives: (B, K) bool, which candidates are positives; default: column 0 positive, the rest negative.
        mask: (B, K) bool, which candidates are valid (ragged K); default: all.
        reduction: "mean" (over queries that have a term), "sum", or "none" for a (B,) tensor.
        backend: force a backend ("cpp", "reference"); default: :mod:`fastrank.dispatch` decides.

    Returns:
        The loss in ``s.dtype``: a scalar, or (B,) for ``reduction="none"``. Differentiable once: double
        backward (``create_graph=True``) raises RuntimeError; use the ``*_ref`` function for that.
"""


def mse(s: Tensor, t: Tensor, positives: Optional[Tensor] = None, mask: Optional[Tensor] = None,
        reduction: str = "mean", *, backend: Optional[str] = None) -> Tensor:
    """Per query ``sum_k (t_k - s_k)^2`` over valid candidates (``positives`` is accepted and unused)."""
    return _distill("mse", s, t, positives, mask, reduction, None, 0.0, backend)


def margin_mse(s: Tensor, t: Tensor, positives: Optional[Tensor] = None, mask: Optional[Tensor] = None,
               reduction: str = "mean", *, backend: Optional[str] = None) -> Tensor:
    """Per query ``sum_{i in P, j in N} ((t_i - t_j) - (s_i - s_j))^2``; K=2 is Hofstatter et al.'s Margin-MSE.
    Needs K >= 2."""
    return _distill("margin_mse", s, t, positives, mask, reduction, None, 0.0, backend)


def m3se(s: Tensor, t: Tensor, positives: Optional[Tensor] = None, mask: Optional[Tensor] = None,
         reduction: str = "mean", *, backend: Optional[str] = None) -> Tensor:
    """Per query ``sum_{i in P} ((t_i - t_j*) - (s_i - s_j*))^2 + sum_{j in N} max(s_j - s_j*, 0)^2`` with ``j*``
    the negative of highest teacher score (ties: the first). Needs K >= 2."""
    return _distill("m3se", s, t, positives, mask, reduction, None, 0.0, backend)


def softmax_ce(s: Tensor, t: Tensor, positives: Optional[Tensor] = None, mask: Optional[Tensor] = None,
               reduction: str = "mean", *, tau: float = 1.0, backend: Optional[str] = None) -> Tensor:
    """Per query ``-sum_k softmax(t/tau)_k log softmax(s/tau)_k`` over valid candidates (``positives`` unused)."""
    return _distill("softmax_ce", s, t, positives, mask, reduction, "tau", tau, backend)


def kl_div(s: Tensor, t: Tensor, positives: Optional[Tensor] = None, mask: Optional[Tensor] = None,
           reduction: str = "mean", *, tau: float = 1.0, backend: Optional[str] = None) -> Tensor:
    """Per query ``KL(softmax(t/tau) || softmax(s/tau))``: :func:`softmax_ce` minus the teacher's entropy."""
    return _distill("kl_div", s, t, positives, mask, reduction, "tau", tau, backend)


def rankdistil_b(s: Tensor, t: Tensor, positives: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                 reduction: str = "mean", *, gamma0: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """Per query ``sum_{i in P} (t_i - s_i)^2 + sum_{j in N} max(s_j - gamma0, 0)^2``."""
    return _distill("rankdistil_b", s, t, positives, mask, reduction, "gamma0", gamma0, backend)


for _fn in (mse, margin_mse, m3se, softmax_ce, kl_div, rankdistil_b):
    _fn.__doc__ += _ARGS_DOC
    _register_distill(_fn.__name__)


def inbatch_ce(scores: Tensor, target: Tensor, tau: float = 1.0, reduction: str = "mean", *,
               backend: Optional[str] = None) -> Tensor:
    """One-hot softmax cross-entropy over in-batch candidates: per row ``-log softmax(scores/tau)[target]``.

    Args:
        scores: (B, M) float32/float16/bfloat16/float64, e.g. each query against every document in the batch.
        target: (B,) int64 or int32 column of the positive; a negative value ignores the row (0 loss, 0
            gradient, not counted by "mean"); a value >= M raises ValueError (on CUDA only under
            ``set_validation(True)``; otherwise that row's loss and gradient are NaN).
        tau: temperature > 0.
        reduction: "mean" (over rows not ignored), "sum" or "none" for a (B,) tensor.
        backend: force a backend ("cpp", "reference").

    Differentiable once: double backward (``create_graph=True``) raises RuntimeError; use
    :func:`inbatch_ce_ref` for that.
    """
    name = "inbatch_ce"
    _check_scores(name, "scores", scores)
    if not isinstance(target, Tensor):
        raise TypeError(f"fastrank.losses.{name}: target must be a tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fastrank.losses.{name}: target must be int64 or int32, got {target.dtype}")
    if target.shape != scores.shape[:1]:
        raise ValueError(f"fastrank.losses.{name}: target must have shape (B,) = {tuple(scores.shape[:1])}, "
                         f"got {tuple(target.shape)}")
    if target.device != scores.device:
        raise ValueError(f"fastrank.losses.{name}: target is on {target.device} but scores is on {scores.device}")
    _check_reduction(name, reduction)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"fastrank.losses.{name}: tau must be a finite number > 0, got {tau!r}")
    impl = dispatch.choose(name, (scores, target), backend=backend, dtype=scores.dtype)
    return dispatch.kernels(name, impl.backend, scores).forward(scores, target, reduction, tau)


# --------------------------------------------------------------------------------------------------------
# References: the equations in plain PyTorch. They upcast to float32 (float64 stays) and cast back.
# Masked entries are replaced before any arithmetic, and every term is selected (torch.where) before it is
# squared or exponentiated, never after: an unselected term's infinite derivative would otherwise meet the
# select's zero as 0 * inf = NaN in backward, so padding and unused scores (even inf) never reach a gradient.
# --------------------------------------------------------------------------------------------------------
def _prepare(s: Tensor, t: Tensor, positives: Optional[Tensor], mask: Optional[Tensor]):
    acc = _accumulator(s.dtype)
    valid = torch.ones_like(s, dtype=torch.bool) if mask is None else mask
    if positives is None:
        positives = torch.zeros_like(valid)
        positives[:, 0] = True
    pos, neg = valid & positives, valid & ~positives
    s = torch.where(valid, s.to(acc), 0.0)
    t = torch.where(valid, t.detach().to(acc), 0.0)
    return s, t, valid, pos, neg


def _reduce(per_query: Tensor, has_term: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    per_query = torch.where(has_term, per_query, 0.0)
    if reduction == "none":
        out = per_query
    elif reduction == "sum":
        out = per_query.sum()
    else:
        out = per_query.sum() / has_term.sum().clamp(min=1)
    return out.to(dtype)


def mse_ref(s, t, positives=None, mask=None, reduction="mean"):
    s_, t_, valid, _, _ = _prepare(s, t, positives, mask)
    per_query = torch.where(valid, (t_ - s_) ** 2, 0.0).sum(-1)
    return _reduce(per_query, valid.any(-1), reduction, s.dtype)


def margin_mse_ref(s, t, positives=None, mask=None, reduction="mean"):
    s_, t_, _, pos, neg = _prepare(s, t, positives, mask)
    d_pos, d_neg = torch.where(pos, t_ - s_, 0.0), torch.where(neg, t_ - s_, 0.0)
    pairs = pos[:, :, None] & neg[:, None, :]
    per_query = torch.where(pairs, d_pos[:, :, None] - d_neg[:, None, :], 0.0).pow(2).sum((1, 2))  # [b, i, j]
    return _reduce(per_query, pairs.any(-1).any(-1), reduction, s.dtype)


def _m3se_star(t_: Tensor, neg: Tensor) -> Tensor:
    """(B, 1) index of j*: the first negative of highest teacher score, a negative even when all are -inf."""
    best = torch.where(neg, t_, -math.inf).amax(-1, keepdim=True)
    return (neg & (t_ == best)).byte().argmax(-1, keepdim=True)  # argmax returns the first maximum


def m3se_ref(s, t, positives=None, mask=None, reduction="mean"):
    s_, t_, _, pos, neg = _prepare(s, t, positives, mask)
    star = _m3se_star(t_, neg)
    s_star, t_star = s_.gather(-1, star), t_.gather(-1, star)
    margin = torch.where(pos, (t_ - t_star) - (s_ - s_star), 0.0).pow(2).sum(-1)
    hinge = torch.where(neg, torch.clamp(s_ - s_star, min=0), 0.0).pow(2).sum(-1)
    return _reduce(margin + hinge, neg.any(-1), reduction, s.dtype)


def _softmax_ce_parts(s, t, positives, mask, tau):
    s_, t_, valid, _, _ = _prepare(s, t, positives, mask)
    has_term = valid.any(-1, keepdim=True)
    # A row with no valid candidate keeps its zeros so that log_softmax stays finite; _reduce drops it.
    live = valid | ~has_term
    log_p = torch.log_softmax(torch.where(live, t_ / tau, -math.inf), -1)
    log_q = torch.log_softmax(torch.where(live, s_ / tau, -math.inf), -1)
    p = log_p.exp()
    # Only candidates with p > 0 enter the sum: a -inf student score where the teacher gives 0 is no loss.
    cross = -(p * torch.where(valid & (p > 0), log_q, 0.0)).sum(-1)
    entropy = -torch.where(valid & (p > 0), p * torch.where(valid, log_p, 0.0), 0.0).sum(-1)
    return cross, entropy, has_term.squeeze(-1)


def softmax_ce_ref(s, t, positives=None, mask=None, reduction="mean", tau=1.0):
    cross, _, has_term = _softmax_ce_parts(s, t, positives, mask, tau)
    return _reduce(cross, has_term, reduction, s.dtype)


def kl_div_ref(s, t, positives=None, mask=None, reduction="mean", tau=1.0):
    cross, entropy, has_term = _softmax_ce_parts(s, t, positives, mask, tau)
    return _reduce(cross - entropy, has_term, reduction, s.dtype)


def rankdistil_b_ref(s, t, positives=None, mask=None, reduction="mean", gamma0=0.0):
    s_, t_, valid, pos, neg = _prepare(s, t, positives, mask)
    per_query = torch.where(pos, t_ - s_, 0.0).pow(2) + torch.where(neg, torch.clamp(s_ - gamma0, min=0), 0.0).pow(2)
    return _reduce(per_query.sum(-1), valid.any(-1), reduction, s.dtype)


def inbatch_ce_ref(scores, target, tau=1.0, reduction="mean"):
    x = scores.to(_accumulator(scores.dtype))
    keep = target >= 0
    log_q = torch.log_softmax(x / tau, -1)
    per_row = -log_q.gather(-1, torch.where(keep, target, 0).long()[:, None]).squeeze(-1)
    return _reduce(per_row, keep, reduction, scores.dtype)


# name -> (reference, the name of its scalar parameter or None)
_REFERENCES = {
    "mse": (mse_ref, None), "margin_mse": (margin_mse_ref, None), "m3se": (m3se_ref, None),
    "softmax_ce": (softmax_ce_ref, "tau"), "kl_div": (kl_div_ref, "tau"), "rankdistil_b": (rankdistil_b_ref, "gamma0"),
}
