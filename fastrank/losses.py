"""Distillation losses for training re-rankers: ``fastrank.losses.margin_mse(s, t)`` and friends.

The functions and their references come from :mod:`fastrank.ops.losses` (the math and the kernels live
there); this module adds thin ``nn.Module`` wrappers that hold the options, for training code that expects
a loss object.

On CUDA no loss waits for the GPU: an invalid teacher score (or inbatch_ce target) gives its query a NaN loss
and gradient instead of a ValueError, unless ``set_validation(True)`` is on (one synchronisation a call, the
CPU's exact error). On CPU the error is always raised. See :mod:`fastrank.ops.losses`.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from fastrank.ops.losses import (
    inbatch_ce,
    inbatch_ce_ref,
    kl_div,
    kl_div_ref,
    m3se,
    m3se_ref,
    margin_mse,
    margin_mse_ref,
    mse,
    mse_ref,
    rankdistil_b,
    rankdistil_b_ref,
    set_validation,
    softmax_ce,
    softmax_ce_ref,
    validation_enabled,
)

__all__ = [
    "mse", "margin_mse", "m3se", "softmax_ce", "kl_div", "rankdistil_b", "inbatch_ce",
    "mse_ref", "margin_mse_ref", "m3se_ref", "softmax_ce_ref", "kl_div_ref", "rankdistil_b_ref", "inbatch_ce_ref",
    "MSELoss", "MarginMSELoss", "M3SELoss", "SoftmaxCELoss", "KLDivLoss", "RankDistilBLoss", "InBatchCELoss",
    "set_validation", "validation_enabled",
]


class _DistillLoss(nn.Module):
    _fn = None

    def __init__(self, reduction: str = "mean", *, backend: Optional[str] = None, **options):
        super().__init__()
        self.reduction, self.backend, self.options = reduction, backend, options

    def forward(self, s: Tensor, t: Tensor, positives: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        return type(self)._fn(s, t, positives, mask, self.reduction, backend=self.backend, **self.options)

    def extra_repr(self) -> str:
        return ", ".join([f"reduction={self.reduction!r}"] + [f"{k}={v!r}" for k, v in self.options.items()])


class MSELoss(_DistillLoss):
    """:func:`mse` as a module: ``MSELoss()(s, t, positives=None, mask=None)``."""
    _fn = staticmethod(mse)


class MarginMSELoss(_DistillLoss):
    """:func:`margin_mse` as a module."""
    _fn = staticmethod(margin_mse)


class M3SELoss(_DistillLoss):
    """:func:`m3se` as a module."""
    _fn = staticmethod(m3se)


class SoftmaxCELoss(_DistillLoss):
    """:func:`softmax_ce` as a module: ``SoftmaxCELoss(tau=1.0)``."""
    _fn = staticmethod(softmax_ce)

    def __init__(self, tau: float = 1.0, reduction: str = "mean", *, backend: Optional[str] = None):
        super().__init__(reduction, backend=backend, tau=tau)


class KLDivLoss(SoftmaxCELoss):
    """:func:`kl_div` as a module: ``KLDivLoss(tau=1.0)``."""
    _fn = staticmethod(kl_div)


class RankDistilBLoss(_DistillLoss):
    """:func:`rankdistil_b` as a module: ``RankDistilBLoss(gamma0=0.0)``."""
    _fn = staticmethod(rankdistil_b)

    def __init__(self, gamma0: float = 0.0, reduction: str = "mean", *, backend: Optional[str] = None):
        super().__init__(reduction, backend=backend, gamma0=gamma0)


class InBatchCELoss(nn.Module):
    """:func:`inbatch_ce` as a module: ``InBatchCELoss(tau=1.0)(scores, target)``."""

    def __init__(self, tau: float = 1.0, reduction: str = "mean", *, backend: Optional[str] = None):
        super().__init__()
        self.tau, self.reduction, self.backend = tau, reduction, backend

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        return inbatch_ce(scores, target, self.tau, self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau!r}, reduction={self.reduction!r}"
