"""fastrank.losses against the references (the spec), gradients with gradcheck, errors, torch.compile.

Tolerances: float64 runs the kernels in float64, so kernel and reference agree to rounding (rtol 1e-9 of the
largest magnitude involved). float16/bfloat16 follow flash-attention's rule: the kernel's error against the
float64 truth (the reference on the same low-precision inputs, in float64) is at most twice the error of
the reference run on those inputs, plus 1e-6 of the magnitude.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

import fastrank
from fastrank import dispatch, losses
from fastrank.ops import losses as ops

DISTILL = ["mse", "margin_mse", "m3se", "softmax_ce", "kl_div", "rankdistil_b"]
REDUCTIONS = ["mean", "sum", "none"]
PAIRWISE = {"margin_mse", "m3se"}
PARAM = {"softmax_ce": "tau", "kl_div": "tau", "rankdistil_b": "gamma0"}

needs_ext = pytest.mark.skipif(fastrank._ext.load() is None, reason="fastrank._C is not built")
pytestmark = needs_ext


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    """Tests that rely on the default choice must not see a FASTRANK_BACKEND from the shell."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def make_scores(B, K, scale, gen, dtype=torch.float64):
    if scale == "normal":
        x = torch.randn(B, K, generator=gen, dtype=torch.float64)
    elif scale == "extreme":  # +-1e4 with small differences between candidates
        sign = torch.where(torch.rand(B, K, generator=gen) < 0.5, -1.0, 1.0).double()
        x = sign * 1e4 + torch.randn(B, K, generator=gen, dtype=torch.float64)
    else:  # cosine similarities times 20, as a dual encoder with a learned temperature produces
        x = (torch.rand(B, K, generator=gen, dtype=torch.float64) * 2 - 1) * 20
    return x.to(dtype)


def make_flags(B, K, positives_kind, mask_kind, gen):
    if positives_kind == "default":
        positives = None
    elif positives_kind == "several":  # about a third positive; some rows get none, some all
        positives = torch.rand(B, K, generator=gen) < 0.35
    else:
        positives = torch.zeros(B, K, dtype=torch.bool)
    if mask_kind is None:
        mask = None
    elif mask_kind == "ragged":  # a prefix of each row is valid, as when padding lists of varying length
        lengths = torch.randint(1, K + 1, (B,), generator=gen)
        mask = torch.arange(K)[None, :] < lengths[:, None]
        mask[B // 2] = False  # a fully masked row
    else:
        mask = torch.rand(B, K, generator=gen) < 0.7
    return positives, mask


# (positives, mask, scores, loss parameter): each combination appears for every loss, K and B.
PATTERNS = {
    "plain": ("default", None, "normal", None),
    "ragged-extreme": ("several", "ragged", "extreme", {"tau": 3.0, "gamma0": 0.0}),
    "no-positives-cosines": ("none", "random", "cosine20", {"tau": 1.0, "gamma0": -0.5}),
    "several-cosines-sharp": ("several", None, "cosine20", {"tau": 0.05, "gamma0": 0.3}),
}


def param_kwargs(name, values):
    key = PARAM.get(name)
    return {} if key is None or values is None else {key: values[key]}


def close(actual, expected, rtol):
    """assert_close with an absolute tolerance relative to the largest magnitude in ``expected``."""
    finite = expected[torch.isfinite(expected)]
    magnitude = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(magnitude, 1.0))


def upstream(loss, gen):
    """An upstream gradient that is not all ones."""
    if loss.dim() == 0:
        return torch.tensor(0.37, dtype=loss.dtype)
    return (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(loss.dtype)


def run(fn, s, t, positives, mask, reduction, weight_gen, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, t, positives, mask, reduction, **kw)
    (grad,) = torch.autograd.grad(loss, s, upstream(loss, weight_gen))
    return loss.detach(), grad


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("B", [1, 7, 128])
@pytest.mark.parametrize("K", [2, 3, 20, 129])
@pytest.mark.parametrize("name", DISTILL)
def test_matches_reference_float64(name, K, B, pattern):
    positives_kind, mask_kind, scale, params = PATTERNS[pattern]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{K}-{B}-{pattern}".encode()))
    s, t = make_scores(B, K, scale, gen), make_scores(B, K, scale, gen)
    positives, mask = make_flags(B, K, positives_kind, mask_kind, gen)
    kw = param_kwargs(name, params)
    t_before, s_before = t.clone(), s.clone()
    fn, ref = getattr(losses, name), getattr(losses, name + "_ref")
    for reduction in REDUCTIONS:
        loss, grad = run(fn, s, t, positives, mask, reduction, torch.Generator().manual_seed(1), **kw)
        loss_ref, grad_ref = run(ref, s, t, positives, mask, reduction, torch.Generator().manual_seed(1), **kw)
        assert loss.dtype == torch.float64 and loss.shape == ((B,) if reduction == "none" else ())
        close(loss, loss_ref, 1e-9)
        close(grad, grad_ref, 1e-9)
        if mask is not None:  # masked candidates never get a gradient
            assert (grad[~mask] == 0).all()
    assert torch.equal(s, s_before) and torch.equal(t, t_before)


@pytest.mark.parametrize("pattern", ["ragged-extreme", "several-cosines-sharp"])
@pytest.mark.parametrize("name", DISTILL)
def test_float32_matches_float64_reference(name, pattern):
    """The float32 path (vectorised exp, float32 accumulation) against the truth on the same inputs."""
    positives_kind, mask_kind, scale, params = PATTERNS[pattern]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{pattern}-f32".encode()))
    s, t = make_scores(128, 129, scale, gen, torch.float32), make_scores(128, 129, scale, gen, torch.float32)
    positives, mask = make_flags(128, 129, positives_kind, mask_kind, gen)
    kw = param_kwargs(name, params)
    for reduction in REDUCTIONS:
        loss, grad = run(getattr(losses, name), s, t, positives, mask, reduction, torch.Generator().manual_seed(1),
                         **kw)
        truth, grad_truth = run(getattr(losses, name + "_ref"), s.double(), t.double(), positives, mask, reduction,
                                torch.Generator().manual_seed(1), **kw)
        close(loss.double(), truth, 1e-5)
        close(grad.double(), grad_truth, 1e-5)


def test_inbatch_ce_float32_over_the_exp_range():
    """Logits from far below exp's underflow up: the float32 kernel's error against the float64 truth is at
    most twice that of the reference computed in float32 (plus 1e-7 of the magnitude)."""
    x = torch.linspace(-300, 20, 2560).reshape(2, -1).flip(-1).contiguous()
    target = torch.tensor([0, 700])
    for tau in (1.0, 0.07):
        outputs = [
            run(lambda v, *_: fn(v, target, tau, "none"), inputs, None, None, None, "none",
                torch.Generator().manual_seed(1))
            for fn, inputs in ((losses.inbatch_ce, x), (losses.inbatch_ce_ref, x), (losses.inbatch_ce_ref, x.double()))
        ]
        for got, low, exact in zip(*outputs):
            err = (got.double() - exact).abs().max().item()
            err_ref = (low.double() - exact).abs().max().item()
            assert err <= 2 * err_ref + 1e-7 * exact.abs().max().item(), (tau, err, err_ref)


def test_float32_softmax_probabilities_are_accurate_to_a_few_ulp():
    """The float32 kernels' exp: with tau=1 the logits reach exp unrounded, and one dominant logit keeps the
    normaliser's rounding near one ulp, so the gradient (the softmax probabilities) isolates exp's error."""
    gen = torch.Generator().manual_seed(18)
    x = torch.cat([torch.zeros(1), -torch.rand(3000, generator=gen) * 100 - 1]).reshape(1, -1)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(losses.inbatch_ce(x, torch.tensor([0]), 1.0, "sum"), x)
    q = torch.softmax(x.detach().double(), -1)[0, 1:]
    got = grad[0, 1:].double()
    normal = q > 1e-37
    assert ((got[normal] - q[normal]).abs() / q[normal]).max() < 1e-6  # float32 eps is 1.2e-7
    assert (got[~normal].abs() < 1e-37).all() and (~normal).any()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("K", [2, 5])
@pytest.mark.parametrize("name", DISTILL)
def test_gradcheck(name, K, reduction):
    gen = torch.Generator().manual_seed(K)
    s = torch.randn(4, K, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, K, generator=gen, dtype=torch.float64)
    positives = torch.rand(4, K, generator=gen) < 0.5
    positives[:, 0], positives[:, 1] = True, False  # at least one pair per row
    mask = torch.ones(4, K, dtype=torch.bool)
    mask[1, -1] = False
    kw = {"tau": 0.7} if name in ("softmax_ce", "kl_div") else {"gamma0": -0.3} if name == "rankdistil_b" else {}
    fn = getattr(losses, name)
    assert torch.autograd.gradcheck(lambda x: fn(x, t, positives, mask, reduction, **kw), (s,))


def test_gradcheck_inbatch_ce():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, -1, 8, 2])
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda x: losses.inbatch_ce(x, target, 0.5, reduction), (scores,))


@pytest.mark.parametrize("M", [1, 33, 2560])
@pytest.mark.parametrize("B", [1, 7, 128])
def test_inbatch_ce_matches_reference(B, M):
    gen = torch.Generator().manual_seed(B * M)
    scores = make_scores(B, M, "cosine20", gen)
    target = torch.randint(0, M, (B,), generator=gen)
    if B > 1:
        target[1] = -1  # an ignored row
    for reduction in REDUCTIONS:
        for tau in (1.0, 0.05):
            loss, grad = run(lambda x, *_: losses.inbatch_ce(x, target, tau, reduction), scores, None, None, None,
                             reduction, torch.Generator().manual_seed(2))
            loss_ref, grad_ref = run(lambda x, *_: losses.inbatch_ce_ref(x, target, tau, reduction), scores, None,
                                     None, None, reduction, torch.Generator().manual_seed(2))
            close(loss, loss_ref, 1e-9)
            close(grad, grad_ref, 1e-9)
    # int32 targets and a non-contiguous score matrix give the same answer
    wide = torch.zeros(B, 2 * M, dtype=torch.float64)
    wide[:, ::2] = scores
    close(losses.inbatch_ce(wide[:, ::2], target.int()), losses.inbatch_ce_ref(scores, target), 1e-12)


def test_inbatch_ce_matches_torch_cross_entropy():
    """A second, independent spec: torch's own cross-entropy."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(16, 40, generator=gen)
    target = torch.randint(0, 40, (16,), generator=gen)
    expected = torch.nn.functional.cross_entropy(scores / 0.1, target)
    torch.testing.assert_close(losses.inbatch_ce(scores, target, tau=0.1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", DISTILL)
def test_fully_masked_and_termless_rows_give_zero_and_are_not_averaged(name):
    gen = torch.Generator().manual_seed(5)
    s, t = make_scores(4, 6, "normal", gen), make_scores(4, 6, "normal", gen)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    s[2], t[2] = math.inf, math.nan  # padding garbage under the mask must not leak
    s = s.requires_grad_(True)
    per_query = getattr(losses, name)(s, t, None, mask, "none")
    assert per_query[2] == 0 and torch.isfinite(per_query).all()
    mean = getattr(losses, name)(s, t, None, mask, "mean")
    torch.testing.assert_close(mean, per_query.sum() / 3)
    (grad,) = torch.autograd.grad(mean, s)
    assert (grad[2] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", DISTILL)
def test_non_contiguous_inputs(name):
    gen = torch.Generator().manual_seed(6)
    B, K = 9, 13
    s, t = make_scores(B, K, "normal", gen), make_scores(B, K, "normal", gen)
    positives, mask = make_flags(B, K, "several", "random", gen)
    s_t = s.t().contiguous().t()  # column-major
    t_wide = torch.zeros(B, 3 * K, dtype=t.dtype)
    t_wide[:, ::3] = t  # stride 3 along K
    pos_t, mask_t = positives.t().contiguous().t(), mask.t().contiguous().t()
    assert not (s_t.is_contiguous() or t_wide[:, ::3].is_contiguous() or mask_t.is_contiguous())
    fn = getattr(losses, name)
    for reduction in REDUCTIONS:
        loss, grad = run(fn, s_t, t_wide[:, ::3], pos_t, mask_t, reduction, torch.Generator().manual_seed(1))
        loss_c, grad_c = run(fn, s, t, positives, mask, reduction, torch.Generator().manual_seed(1))
        torch.testing.assert_close(loss, loss_c, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, grad_c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", DISTILL)
def test_low_precision(name, dtype):
    gen = torch.Generator().manual_seed(7)
    B, K = 64, 20
    s, t = make_scores(B, K, "cosine20", gen, dtype), make_scores(B, K, "cosine20", gen, dtype)
    positives, mask = make_flags(B, K, "several", "ragged", gen)
    fn, ref = getattr(losses, name), getattr(losses, name + "_ref")
    for reduction in REDUCTIONS:
        loss, grad = run(fn, s, t, positives, mask, reduction, torch.Generator().manual_seed(1))
        assert loss.dtype == dtype and grad.dtype == dtype
        loss_ref, grad_ref = run(ref, s, t, positives, mask, reduction, torch.Generator().manual_seed(1))
        truth, grad_truth = run(ref, s.double(), t.double(), positives, mask, reduction,
                                torch.Generator().manual_seed(1))
        for got, low, exact in ((loss, loss_ref, truth), (grad, grad_ref, grad_truth)):
            err = (got.double() - exact).abs().max().item()
            err_ref = (low.double() - exact).abs().max().item()
            assert err <= 2 * err_ref + 1e-6 * max(exact.abs().max().item(), 1.0), (err, err_ref)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("name", DISTILL)
def test_nan_teacher_raises_nan_student_propagates(name, backend):
    gen = torch.Generator().manual_seed(8)
    s, t = make_scores(5, 7, "normal", gen), make_scores(5, 7, "normal", gen)
    fn = getattr(losses, name)
    bad_t = t.clone()
    bad_t[3, 4] = math.nan
    with pytest.raises(ValueError, match=r"t \(teacher scores\) contains NaN.*\[3, 4\]"):
        fn(s, bad_t, backend=backend)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[3, 4] = False
    assert torch.isfinite(fn(s, bad_t, None, mask, "none", backend=backend)).all()  # masked NaN is padding
    bad_s = s.clone()
    bad_s[2, 1] = math.nan  # a negative (column 0 is the positive), used by every loss
    per_query = fn(bad_s, t, None, None, "none", backend=backend)
    assert math.isnan(per_query[2]) and torch.isfinite(per_query[[0, 1, 3, 4]]).all()
    assert math.isnan(fn(bad_s, t, backend=backend))


def test_default_positive_is_column_zero():
    gen = torch.Generator().manual_seed(9)
    s, t = make_scores(6, 8, "normal", gen), make_scores(6, 8, "normal", gen)
    explicit = torch.zeros(6, 8, dtype=torch.bool)
    explicit[:, 0] = True
    for name in DISTILL:
        fn = getattr(losses, name)
        torch.testing.assert_close(fn(s, t), fn(s, t, explicit))


def test_two_candidates_margin_mse_is_hofstatter_margin_mse():
    gen = torch.Generator().manual_seed(10)
    s, t = make_scores(32, 2, "normal", gen), make_scores(32, 2, "normal", gen)
    expected = torch.nn.functional.mse_loss(s[:, 0] - s[:, 1], t[:, 0] - t[:, 1])
    torch.testing.assert_close(losses.margin_mse(s, t), expected)


def test_m3se_picks_first_hardest_negative_on_ties():
    s = torch.tensor([[1.0, 0.2, 0.9, 0.5]], dtype=torch.float64)
    t = torch.tensor([[2.0, 1.0, 1.0, 0.0]], dtype=torch.float64)  # negatives 1 and 2 tie for j*
    # j* = 1: ((2 - 1) - (1 - 0.2))^2 + max(0.9 - 0.2, 0)^2 + max(0.5 - 0.2, 0)^2
    expected = (1 - 0.8) ** 2 + 0.7 ** 2 + 0.3 ** 2
    for backend in ("cpp", "reference"):
        torch.testing.assert_close(losses.m3se(s, t, backend=backend).item(), expected)


def test_kl_div_is_softmax_ce_minus_teacher_entropy():
    gen = torch.Generator().manual_seed(11)
    s, t = make_scores(10, 12, "normal", gen), make_scores(10, 12, "normal", gen)
    p = torch.softmax(t / 2.0, -1)
    entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(losses.kl_div(s, t, reduction="none", tau=2.0),
                               losses.softmax_ce(s, t, reduction="none", tau=2.0) - entropy)


def test_cpp_runs_by_default_on_cpu(monkeypatch):
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    for name in DISTILL:
        assert dispatch.choose(name, (s, t, None, None), dtype=s.dtype).backend == "cpp"
    assert dispatch.choose("inbatch_ce", (s, t[:, 0].long()), dtype=s.dtype).backend == "cpp"
    calls = []
    real = ops._launch_distill
    monkeypatch.setattr(ops, "_launch_distill", lambda *a: calls.append(a) or real(*a))
    losses.margin_mse(s, t)
    assert len(calls) == 1


def test_without_the_extension_the_reference_runs(monkeypatch, request):
    """``import fastrank`` works without fastrank._C; dispatch then falls back to the eager reference."""
    request.addfinalizer(dispatch.reset)
    monkeypatch.setattr(fastrank._ext, "_module", None)
    monkeypatch.setattr(fastrank._ext, "_error", "simulated: not built")
    dispatch.reset()  # availability is cached per process; this test simulates another installation
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    assert dispatch.choose("margin_mse", (s, t, None, None), dtype=s.dtype).backend == "reference"
    torch.testing.assert_close(losses.margin_mse(s, t), losses.margin_mse_ref(s, t))
    with pytest.raises(dispatch.BackendUnavailableError, match="simulated: not built"):
        losses.margin_mse(s, t, backend="cpp")


def test_reference_backend_can_be_forced_and_matches():
    gen = torch.Generator().manual_seed(12)
    s, t = make_scores(8, 6, "normal", gen, torch.float32), make_scores(8, 6, "normal", gen, torch.float32)
    for name in DISTILL:
        fn = getattr(losses, name)
        torch.testing.assert_close(fn(s, t, backend="cpp"), fn(s, t, backend="reference"), rtol=1e-5, atol=1e-5)


def _bad_calls():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    yield "s", lambda fn: fn(torch.randn(20), t), "s must be a \\(B, K\\) matrix"
    yield "t", lambda fn: fn(s, torch.randn(4, 6)), "t must have the shape of s"
    yield "t", lambda fn: fn(s, t.double()), "t has dtype torch.float64 but s has torch.float32"
    yield "t", lambda fn: fn(s, t.to("meta")), "t is on meta but s is on cpu"
    yield "s", lambda fn: fn(s.long(), t.long()), "s must be floating point"
    yield "s", lambda fn: fn(torch.randn(0, 5), torch.randn(0, 5)), "s must have at least one row"
    yield "mask", lambda fn: fn(s, t, None, torch.ones(4, 5, dtype=torch.uint8)), "mask must be a bool tensor"
    yield "mask", lambda fn: fn(s, t, None, torch.ones(4, 4, dtype=torch.bool)), "mask must have the shape of s"
    yield "positives", lambda fn: fn(s, t, torch.ones(4, 5)), "positives must be a bool tensor"
    yield "reduction", lambda fn: fn(s, t, reduction="avg"), "reduction must be one of"


@pytest.mark.parametrize("name", DISTILL)
def test_bad_arguments_name_the_argument(name):
    fn = getattr(losses, name)
    for arg, call, message in _bad_calls():
        with pytest.raises(ValueError, match=f"fastrank.losses.{name}: {message}"):
            call(fn)
    one = torch.randn(3, 1)
    if name in PAIRWISE:
        with pytest.raises(ValueError, match="needs K >= 2 candidates"):
            fn(one, one)
    else:
        assert torch.isfinite(fn(one, one))  # a single candidate is a valid (if trivial) query
    if name in PARAM:
        key = PARAM[name]
        with pytest.raises(ValueError, match=key):
            fn(one.expand(3, 2), one.expand(3, 2), **{key: math.nan})
    with pytest.raises(TypeError, match="t must be a tensor"):
        fn(one, [1.0, 2.0])


def test_inbatch_ce_bad_arguments():
    scores = torch.randn(4, 6)
    for target, message in (
        (torch.zeros(4), "target must be int64 or int32"),
        (torch.zeros(3, dtype=torch.long), "target must have shape \\(B,\\)"),
        (torch.zeros(4, dtype=torch.long).to("meta"), "target is on meta"),
    ):
        with pytest.raises(ValueError, match=message):
            losses.inbatch_ce(scores, target)
    for backend in ("cpp", "reference"):
        with pytest.raises(ValueError, match=r"target\[2\] = 6 is out of range"):
            losses.inbatch_ce(scores, torch.tensor([0, 1, 6, 2]), backend=backend)
    with pytest.raises(ValueError, match="tau must be"):
        losses.inbatch_ce(scores, torch.zeros(4, dtype=torch.long), tau=0.0)


def test_gradient_does_not_flow_to_teacher():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    losses.margin_mse(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_modules_are_thin_wrappers():
    gen = torch.Generator().manual_seed(13)
    s, t = make_scores(6, 5, "normal", gen), make_scores(6, 5, "normal", gen)
    positives, mask = make_flags(6, 5, "several", "random", gen)
    pairs = [
        (losses.MSELoss(), losses.mse(s, t, positives, mask)),
        (losses.MarginMSELoss(reduction="sum"), losses.margin_mse(s, t, positives, mask, "sum")),
        (losses.M3SELoss(), losses.m3se(s, t, positives, mask)),
        (losses.SoftmaxCELoss(tau=0.5), losses.softmax_ce(s, t, positives, mask, tau=0.5)),
        (losses.KLDivLoss(tau=2.0, reduction="none"), losses.kl_div(s, t, positives, mask, "none", tau=2.0)),
        (losses.RankDistilBLoss(gamma0=0.1), losses.rankdistil_b(s, t, positives, mask, gamma0=0.1)),
    ]
    for module, expected in pairs:
        torch.testing.assert_close(module(s, t, positives, mask), expected)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(losses.InBatchCELoss(tau=0.5)(s, target), losses.inbatch_ce(s, target, 0.5))
    assert "tau=0.5" in repr(losses.SoftmaxCELoss(tau=0.5))


# --------------------------------------------------------------------------------------------------------
# torch.library: the custom ops themselves and torch.compile
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["margin_mse", "softmax_ce"])
def test_opcheck_distill_loss(kind):
    gen = torch.Generator().manual_seed(14)
    s = torch.randn(6, 5, generator=gen, requires_grad=True)
    t = torch.randn(6, 5, generator=gen)
    positives, mask = make_flags(6, 5, "several", "random", gen)
    for reduction in (0, 2):
        torch.library.opcheck(ops.distill_loss_op, (s, t, positives, mask, ops.LOSS_KINDS[kind], reduction, 0.5))
    torch.library.opcheck(ops.distill_loss_op, (s, t, None, None, ops.LOSS_KINDS[kind], 1, 1.0))


def test_opcheck_inbatch_ce():
    scores = torch.randn(6, 9, requires_grad=True)
    torch.library.opcheck(ops.inbatch_ce_op, (scores, torch.tensor([0, 1, 8, -1, 4, 2]), 2, 0.5))


def test_custom_op_autograd_matches_reference():
    """The op's own autograd registration (what torch.compile uses) against the reference."""
    gen = torch.Generator().manual_seed(15)
    s, t = make_scores(7, 9, "normal", gen), make_scores(7, 9, "normal", gen)
    positives, mask = make_flags(7, 9, "several", "ragged", gen)
    for name in DISTILL:
        kw = param_kwargs(name, {"tau": 0.5, "gamma0": 0.2})
        param = next(iter(kw.values()), 0.0)
        for reduction in REDUCTIONS:
            op = lambda x, *_, **__: ops.distill_loss_op(  # noqa: E731
                x, t, positives, mask, ops.LOSS_KINDS[name], ops.REDUCTIONS[reduction], param)[0]
            loss, grad = run(op, s, t, positives, mask, reduction, torch.Generator().manual_seed(1))
            loss_ref, grad_ref = run(getattr(losses, name + "_ref"), s, t, positives, mask, reduction,
                                     torch.Generator().manual_seed(1), **kw)
            close(loss, loss_ref, 1e-9)
            close(grad, grad_ref, 1e-9)


def test_torch_compile():
    from torch._dynamo.backends.debugging import aot_eager

    gen = torch.Generator().manual_seed(16)
    s, t = make_scores(8, 6, "normal", gen, torch.float32), make_scores(8, 6, "normal", gen, torch.float32)
    positives, mask = make_flags(8, 6, "several", "ragged", gen)
    target = torch.randint(0, 6, (8,), generator=gen)

    def step(x):
        return (losses.margin_mse(x, t, positives, mask) + losses.softmax_ce(x, t, None, mask, tau=0.5)
                + losses.inbatch_ce(x, target, 0.1))

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=recording_backend, fullgraph=True)
    x = s.clone().requires_grad_(True)
    loss = compiled(x)
    loss.backward()
    x_eager = s.clone().requires_grad_(True)
    loss_eager = step(x_eager)
    loss_eager.backward()
    torch.testing.assert_close(loss, loss_eager)
    torch.testing.assert_close(x.grad, x_eager.grad)
    # traced code must reach the kernels through the custom ops, not the eager-only autograd.Function
    assert len(graphs) == 1 and "fastrank.distill_loss" in graphs[0] and "fastrank.inbatch_ce" in graphs[0]


# --------------------------------------------------------------------------------------------------------
# Properties, and the CUDA path where there is a GPU
# --------------------------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), K=st.integers(2, 12), seed=st.integers(0, 2**31 - 1),
       shift=st.floats(-50, 50), name=st.sampled_from(DISTILL))
def test_property_matches_reference_and_shift_invariance(B, K, seed, shift, name):
    gen = torch.Generator().manual_seed(seed)
    s, t = make_scores(B, K, "normal", gen), make_scores(B, K, "normal", gen)
    positives = torch.rand(B, K, generator=gen) < 0.4
    mask = torch.rand(B, K, generator=gen) < 0.8
    fn = getattr(losses, name)
    per_query = fn(s, t, positives, mask, "none")
    close(per_query, getattr(losses, name + "_ref")(s, t, positives, mask, "none"), 1e-9)
    assert (per_query >= -1e-9).all()
    if name in ("margin_mse", "m3se", "softmax_ce", "kl_div"):
        # these compare candidates of a query with each other, so moving a whole query changes nothing
        close(fn(s + shift, t + shift, positives, mask, "none"), per_query, 1e-9)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("K", [2, 20, 129])
@pytest.mark.parametrize("name", DISTILL)
def test_cuda_matches_reference(name, K, dtype):
    gen = torch.Generator().manual_seed(K)
    s, t = make_scores(128, K, "cosine20", gen, dtype), make_scores(128, K, "cosine20", gen, dtype)
    positives, mask = make_flags(128, K, "several", "ragged", gen)
    assert dispatch.choose(name, (s.cuda(), t.cuda(), None, None), dtype=dtype).backend == "cpp"
    fn, ref = getattr(losses, name), getattr(losses, name + "_ref")
    rtol = 1e-9 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
    for reduction in REDUCTIONS:
        loss, grad = run(fn, s.cuda(), t.cuda(), positives.cuda(), mask.cuda(), reduction,
                         torch.Generator().manual_seed(1))
        loss_ref, grad_ref = run(ref, s.double(), t.double(), positives, mask, reduction,
                                 torch.Generator().manual_seed(1))
        close(loss.cpu().double(), loss_ref, rtol)
        close(grad.cpu().double(), grad_ref, rtol)
    # Invalid teacher scores: the NaN-row contract and set_validation are tested below
    # (test_cuda_invalid_teacher_gives_a_nan_row_or_the_cpu_error).


@cuda
def test_cuda_inbatch_ce():
    gen = torch.Generator().manual_seed(17)
    scores = make_scores(128, 2560, "cosine20", gen, torch.float32)
    target = torch.randint(0, 2560, (128,), generator=gen)
    loss, grad = run(lambda x, *_: losses.inbatch_ce(x, target.cuda(), 0.05), scores.cuda(), None, None, None,
                     "mean", torch.Generator().manual_seed(1))
    loss_ref, grad_ref = run(lambda x, *_: losses.inbatch_ce_ref(x, target, 0.05), scores.double(), None, None,
                             None, "mean", torch.Generator().manual_seed(1))
    close(loss.cpu().double(), loss_ref, 1e-5)
    close(grad.cpu().double(), grad_ref, 1e-5)


# --------------------------------------------------------------------------------------------------------
# Issue 13: no stream synchronisation on CUDA; invalid values give NaN rows, set_validation the CPU's error
# --------------------------------------------------------------------------------------------------------
def test_set_validation_is_a_function_and_a_context_manager():
    assert losses.validation_enabled() is False  # the default: no call waits for the GPU
    with losses.set_validation(True):
        assert losses.validation_enabled() is True
        with losses.set_validation(False):
            assert losses.validation_enabled() is False
        assert losses.validation_enabled() is True
    assert losses.validation_enabled() is False
    try:
        losses.set_validation(True)
        assert losses.validation_enabled() is True
    finally:
        losses.set_validation(False)
    with pytest.raises(TypeError, match=r"set_validation: enabled must be a bool, got int"):
        losses.set_validation(1)
    assert losses.validation_enabled() is False


@pytest.mark.parametrize("validate", [False, True])
def test_cpu_raises_whatever_the_validation_setting(validate):
    gen = torch.Generator().manual_seed(21)
    s, t = make_scores(4, 6, "normal", gen), make_scores(4, 6, "normal", gen)
    t[2, 3] = math.nan
    with losses.set_validation(validate):
        with pytest.raises(ValueError, match=r"^fastrank: t \(teacher scores\) contains NaN at a valid candidate, "
                                             r"first at \[2, 3\]"):
            losses.mse(s, t)
        with pytest.raises(ValueError, match=r"^fastrank: target\[1\] = 6 is out of range for scores with M = 6"):
            losses.inbatch_ce(s, torch.tensor([0, 6, 1, -1]))


def test_workspace_layout_matches_the_cuda_source():
    # The synchronous check reads the kernel's error flags as the int32 at byte 4 of the workspace.
    from pathlib import Path
    csrc = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    assert "w.error = reinterpret_cast<int*>(p + 4);" in (csrc / "losses.cu").read_text()
    assert "return 16 + 12 * B;" in (csrc / "losses_cuda.h").read_text()
    assert [ops._workspace_bytes(b) for b in (1, 128)] == [28, 1552]


class _FakeCudaExt:
    """Stands in for the CUDA entries on CPU tensors: records the call and sets the workspace's error flag
    (byte 4) when ``flag`` is nonzero, as the kernel does for an invalid value."""

    def __init__(self, flag):
        self.flag, self.calls = flag, 0

    def _launch(self, workspace):
        self.calls += 1
        if self.flag:
            workspace[4] = self.flag

    def distill_forward_cuda(self, kind, reduction, param, s, t, positives, mask, loss, grad, scale, workspace, stream):
        self._launch(workspace)

    def inbatch_ce_forward_cuda(self, reduction, tau, scores, target, loss, grad, scale, workspace, stream):
        self._launch(workspace)


@pytest.mark.parametrize("flag", [0, 1])
def test_cuda_launchers_read_the_flag_only_when_validating(monkeypatch, flag):
    """The CUDA launchers' host logic, on CPU tensors with a stand-in extension: without validation they never
    read the flag back (no synchronisation) even when it is set; with it they raise the CPU's exact message
    when the flag is set, and nothing when it is not."""
    gen = torch.Generator().manual_seed(22)
    s, t = make_scores(3, 5, "normal", gen, torch.float32), make_scores(3, 5, "normal", gen, torch.float32)
    t[1, 2] = math.nan
    scores, target = s.clone(), torch.tensor([0, 9, 1])
    fake = _FakeCudaExt(flag)
    monkeypatch.setattr(fastrank._ext, "require", lambda: fake)
    ops._launch_distill_cuda(s, t, None, None, ops.LOSS_KINDS["m3se"], ops.REDUCTIONS["none"], 0.0)
    ops._launch_inbatch_ce_cuda(scores, target, ops.REDUCTIONS["mean"], 1.0)
    assert fake.calls == 2
    with losses.set_validation(True):
        if flag:
            with pytest.raises(ValueError, match=r"^fastrank: t \(teacher scores\) contains NaN at a valid "
                                                 r"candidate, first at \[1, 2\]; clean or mask"):
                ops._launch_distill_cuda(s, t, None, None, ops.LOSS_KINDS["m3se"], ops.REDUCTIONS["none"], 0.0)
            with pytest.raises(ValueError, match=r"^fastrank: target\[1\] = 9 is out of range for scores with M = 5"):
                ops._launch_inbatch_ce_cuda(scores, target, ops.REDUCTIONS["mean"], 1.0)
            # A flag the host check cannot explain is reported, never ignored.
            with pytest.raises(RuntimeError, match=r"flagged invalid input \(error bits 0x1\) that the host check "
                                                   r"did not find"):
                ops._launch_inbatch_ce_cuda(scores, torch.tensor([0, 1, 2]), ops.REDUCTIONS["mean"], 1.0)
        else:
            ops._launch_distill_cuda(s, t, None, None, ops.LOSS_KINDS["m3se"], ops.REDUCTIONS["none"], 0.0)
            ops._launch_inbatch_ce_cuda(scores, target, ops.REDUCTIONS["mean"], 1.0)
    assert fake.calls == (5 if flag else 4)


def _cuda_case(name, gen):
    s, t = make_scores(6, 9, "cosine20", gen, torch.float32), make_scores(6, 9, "cosine20", gen, torch.float32)
    positives, _ = make_flags(6, 9, "several", None, gen)
    positives[:, 0], positives[:, 1] = True, False  # every row has a positive and a negative
    return s, t, positives


@cuda
@pytest.mark.parametrize("name", DISTILL + ["inbatch_ce"])
def test_cuda_losses_do_not_synchronise(name):
    """Forward and backward queue their work and return: a GPU busy for about a second ahead of them is still
    busy afterwards (a cudaStreamSynchronize inside the extension would have waited for it), and torch's sync
    debug mode sees no synchronising torch call."""
    s, t, positives = (x.cuda() for x in _cuda_case(name, torch.Generator().manual_seed(31)))
    target = torch.tensor([0, 3, -1, 8, 2, 5], device="cuda")

    def step():
        x = s.detach().clone().requires_grad_(True)
        if name == "inbatch_ce":
            loss = losses.inbatch_ce(x, target, 0.5)
        else:
            loss = getattr(losses, name)(x, t, positives)
        loss.backward()
        return x.grad

    step()  # first call: dispatch decisions, allocator warm-up
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU cycles queued ahead of the loss
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grad = step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert not torch.cuda.current_stream().query(), "the loss waited for the GPU"
    torch.cuda.synchronize()
    assert torch.isfinite(grad).all()


@cuda
@pytest.mark.parametrize("name", DISTILL)
def test_cuda_validation_synchronises_once_and_changes_no_result(name):
    s, t, positives = (x.cuda() for x in _cuda_case(name, torch.Generator().manual_seed(32)))
    loss, grad = run(getattr(losses, name), s, t, positives, None, "none", torch.Generator().manual_seed(1))
    with losses.set_validation(True):
        loss_v, grad_v = run(getattr(losses, name), s, t, positives, None, "none", torch.Generator().manual_seed(1))
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with pytest.raises(RuntimeError, match="synchroniz"):  # the flag's read-back is a sync
                getattr(losses, name)(s, t, positives)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    assert torch.equal(loss, loss_v) and torch.equal(grad, grad_v)


# (loss, what to break): a value at [row, col] of t
CUDA_INVALID = [("mse", math.nan), ("margin_mse", math.inf), ("m3se", -math.inf), ("softmax_ce", math.inf),
                ("kl_div", math.nan), ("rankdistil_b", -math.inf)]


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name,value", CUDA_INVALID)
def test_cuda_invalid_teacher_gives_a_nan_row_or_the_cpu_error(name, value, dtype):
    s, t, positives = _cuda_case(name, torch.Generator().manual_seed(33))
    s, t = s.to(dtype), t.to(dtype)
    row, col = 4, 0  # column 0 is a positive: every loss reads it
    t[row, col] = value
    fn = getattr(losses, name)
    with pytest.raises(ValueError) as cpu_error:
        fn(s, t, positives)
    sc, tc, pc = s.cuda(), t.cuda(), positives.cuda()
    # Default: no error; that query's loss and its whole gradient row are NaN, the others are exact.
    loss, grad = run(fn, sc, tc, pc, None, "none", torch.Generator().manual_seed(1))
    keep = torch.ones(6, 9, dtype=torch.bool)
    keep[row] = False
    loss_ok, grad_ok = run(fn, s, t, positives, keep, "none", torch.Generator().manual_seed(1))
    others = [r for r in range(6) if r != row]
    assert math.isnan(loss[row]) and torch.isnan(grad[row]).all()
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    close(loss[others].cpu().double(), loss_ok[others].double(), rtol)
    close(grad[others].cpu().double(), grad_ok[others].double(), rtol)
    for reduction in ("mean", "sum"):
        assert math.isnan(fn(sc, tc, pc, None, reduction))
    # Validating: the CPU's exact error.
    with losses.set_validation(True):
        with pytest.raises(ValueError) as cuda_error:
            fn(sc, tc, pc)
    assert str(cuda_error.value) == str(cpu_error.value)


@cuda
def test_cuda_whole_row_minus_inf_teacher_gives_a_nan_row_or_the_cpu_error():
    s, t, positives = _cuda_case("softmax_ce", torch.Generator().manual_seed(34))
    t[2] = -math.inf
    with pytest.raises(ValueError) as cpu_error:
        losses.softmax_ce(s, t)
    loss = losses.softmax_ce(s.cuda(), t.cuda(), None, None, "none")
    assert math.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()
    with losses.set_validation(True), pytest.raises(ValueError) as cuda_error:
        losses.softmax_ce(s.cuda(), t.cuda())
    assert str(cuda_error.value) == str(cpu_error.value)
    assert "is -inf at every valid candidate of row 2" in str(cuda_error.value)


@cuda
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32])
def test_cuda_inbatch_target_out_of_range_gives_a_nan_row_or_the_cpu_error(target_dtype):
    gen = torch.Generator().manual_seed(35)
    scores = make_scores(5, 7, "cosine20", gen, torch.float32)
    target = torch.tensor([0, 2**31 - 1 if target_dtype == torch.int32 else 2**40, 6, -1, 7], dtype=target_dtype)
    with pytest.raises(ValueError) as cpu_error:
        losses.inbatch_ce(scores, target)
    x = scores.cuda().requires_grad_(True)
    loss = losses.inbatch_ce(x, target.cuda(), reduction="none")
    loss.backward(torch.ones_like(loss))
    assert math.isnan(loss[1]) and math.isnan(loss[4]) and torch.isnan(x.grad[[1, 4]]).all()
    assert loss[3] == 0 and (x.grad[3] == 0).all()  # an ignored row
    good = torch.tensor([0, 2])
    close(loss[good].cpu().double(), losses.inbatch_ce_ref(scores[good].double(), target[good], reduction="none"), 1e-5)
    with losses.set_validation(True), pytest.raises(ValueError) as cuda_error:
        losses.inbatch_ce(scores.cuda(), target.cuda())
    assert str(cuda_error.value) == str(cpu_error.value)  # the first bad row and its full target value


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("name", ["margin_mse", "inbatch_ce"])
def test_cuda_loss_on_a_gpu_that_is_not_current(name):
    s, t, positives = _cuda_case(name, torch.Generator().manual_seed(36))
    target = torch.tensor([0, 3, -1, 8, 2, 5])

    def call(device):
        x = s.to(device).requires_grad_(True)
        if name == "inbatch_ce":
            loss = losses.inbatch_ce(x, target.to(device), 0.5, "none")
        else:
            loss = losses.margin_mse(x, t.to(device), positives.to(device), None, "none")
        loss.backward(torch.linspace(0.5, 1.5, 6, device=device))
        return loss.detach().cpu(), x.grad.cpu()

    with torch.cuda.device(0):
        got = call("cuda:1")
        torch.cuda.synchronize(1)
    want = call("cpu")
    close(got[0].double(), want[0].double(), 1e-5)
    close(got[1].double(), want[1].double(), 1e-5)
