"""The fused losses under hostile inputs (issue 12): huge scores and tiny temperatures, infinite and NaN scores,
double backward, and exp_fast's accuracy (so that a cheaper polynomial in csrc/cpu/losses_rows.inc fails).

The rules under test are those in the docstring of fastrank/ops/losses.py: a NaN teacher score at a valid
candidate, or an infinite one where the loss reads it, is a ValueError naming ``t`` and the first position,
from every backend alike (on CUDA under set_validation(True); without it, a NaN loss and gradient row); a -inf
teacher score the loss never reads (and -inf in softmax_ce / kl_div, a zero probability) is allowed; a
non-finite student score propagates to its query's loss alike in every backend.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastrank
from fastrank import cpu_isa, losses

DISTILL = ["mse", "margin_mse", "m3se", "softmax_ce", "kl_div", "rankdistil_b"]
BACKENDS = ["cpp", "reference"]
FLT_MAX = torch.finfo(torch.float32).max

pytestmark = pytest.mark.skipif(fastrank._ext.load() is None, reason="fastrank._C is not built")


def isa_paths():
    # Every distinct row-kernel build the machine runs (the AVX-512 family shares one).
    return [p for p in ("avx512", "avx2", "scalar") if p in cpu_isa.available()]


def loss_and_grad(fn, s, *args, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, *args, **kw)
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, s, weight)
    return loss.detach(), grad


def assert_float32_matches_truth(got, truth, rtol):
    """float32 ``got`` against the float64 ``truth`` of the same inputs: no NaN anywhere; where the truth
    overflows float32 an infinity of its sign; elsewhere within rtol of the largest finite magnitude."""
    got = got.double()
    assert not torch.isnan(got).any()
    over = truth.abs() > FLT_MAX
    assert torch.equal(got[over], truth[over].sign() * math.inf)
    rest = truth[~over]
    magnitude = max(rest.abs().max().item() if rest.numel() else 1.0, 1e-30)
    torch.testing.assert_close(got[~over], rest, rtol=rtol, atol=rtol * magnitude)


# ---------------------------------------------------------------------------------------------------------
# Item 1: huge scores over tiny temperatures in float32, on every CPU ISA path
# ---------------------------------------------------------------------------------------------------------
def huge_scores(gen):
    """Rows of +-2^30..2^100 scores, some spread over several binades, some clustered within 2^-20 of a
    common value; the scores themselves are float32 numbers, so the float64 truth sees the same inputs."""
    rows = []
    for e in (30, 45, 60, 80, 100):
        sign = torch.where(torch.rand(9, generator=gen) < 0.5, -1.0, 1.0).double()
        rows.append(sign * 2.0 ** e * (1 + torch.rand(9, generator=gen, dtype=torch.float64)))
        rows.append(2.0 ** e * (1 + torch.randn(9, generator=gen, dtype=torch.float64) * 2.0 ** -20))
    return torch.stack(rows).float()


@pytest.mark.parametrize("tau", [1.0, 2.0 ** -20, 2.0 ** -100, 2.0 ** -133])  # the last is subnormal in float32
@pytest.mark.parametrize("name", ["softmax_ce", "kl_div"])
def test_float32_softmax_losses_with_huge_scores_and_tiny_tau(name, tau):
    gen = torch.Generator().manual_seed(101)
    s, t = huge_scores(gen), huge_scores(gen)
    mask = torch.rand(s.shape, generator=gen) < 0.8
    mask[:, 0] = True
    fn, ref = getattr(losses, name), getattr(losses, name + "_ref")
    truth, grad_truth = loss_and_grad(ref, s.double(), t.double(), None, mask, "none", tau=tau)
    for isa in isa_paths():
        with cpu_isa.use(isa):
            loss, grad = loss_and_grad(fn, s, t, None, mask, "none", tau=tau)
        assert_float32_matches_truth(loss, truth, 1e-5)
        assert_float32_matches_truth(grad, grad_truth, 1e-5)
        assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("tau", [1.0, 2.0 ** -20, 2.0 ** -133])
def test_float32_inbatch_ce_with_huge_scores_and_tiny_tau(tau):
    gen = torch.Generator().manual_seed(102)
    scores = huge_scores(gen)
    target = torch.arange(scores.shape[0]) % scores.shape[1]
    truth, grad_truth = loss_and_grad(losses.inbatch_ce_ref, scores.double(), target, tau, "none")
    for isa in isa_paths():
        with cpu_isa.use(isa):
            loss, grad = loss_and_grad(losses.inbatch_ce, scores, target, tau, "none")
        assert_float32_matches_truth(loss, truth, 1e-5)
        assert_float32_matches_truth(grad, grad_truth, 1e-5)


# ---------------------------------------------------------------------------------------------------------
# Item 19: exp_fast is accurate to its stated bound over the whole reduced range
# ---------------------------------------------------------------------------------------------------------
def test_float32_exp_has_no_truncation_bias_over_the_reduced_range():
    """exp_fast(x) = 2^n p(r) with |r| <= ln(2)/2 and p the degree-7 Taylor polynomial: its truncation error
    r^8/8! is below 5.2e-9 relative, far under float32's half ulp (6e-8), so the kernel's exp is unbiased and
    within 2 ulp. A degree-6 polynomial misses r^7/7!, about -1e-7 relative at r = +-0.34, always of the sign
    of -r: a bias rounding cannot explain.

    With t one-hot (every other teacher score 2^10 below) and s = (0, x_1, ...), x_k <= -40 ln 2, the
    student's normaliser is exactly 1 in float32, so softmax_ce's gradient at k >= 1 is exp_fast(x_k) itself,
    and tau = 1 passes x_k to exp unrounded."""
    gen = torch.Generator().manual_seed(103)
    n = torch.randint(40, 120, (4000,), generator=gen).double()
    r = (0.30 + 0.0466 * torch.rand(4000, generator=gen, dtype=torch.float64)) * torch.where(
        torch.arange(4000) % 2 == 0, 1.0, -1.0).double()
    x = (-n * math.log(2) + r).float()
    s = torch.cat([torch.zeros(1), x]).reshape(1, -1)
    t = torch.full_like(s, -1024.0)
    t[0, 0] = 0.0
    exact = x.double().exp()
    upper = r > 0
    for isa in isa_paths():
        with cpu_isa.use(isa):
            _, grad = loss_and_grad(losses.softmax_ce, s, t, None, None, "sum")
        rel = (grad[0, 1:].double() / 0.5 - exact) / exact  # 0.5: loss_and_grad's upstream weight
        assert rel.abs().max() < 2.5e-7, (isa, rel.abs().max().item())  # 2 ulp
        for side in (upper, ~upper):
            assert abs(rel[side].mean().item()) < 2e-8, (isa, rel[side].mean().item())


# ---------------------------------------------------------------------------------------------------------
# Items 2 and 3: the references under -inf teacher scores the loss does not read
# ---------------------------------------------------------------------------------------------------------
def unused_teacher_case():
    """Rows with -inf teacher scores at candidates whose teacher score the loss never reads: masked slots
    (every loss), negatives of rankdistil_b, negatives other than j* of m3se, zero-probability candidates of
    softmax_ce / kl_div."""
    gen = torch.Generator().manual_seed(104)
    s = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    t = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    positives = torch.zeros(4, 6, dtype=torch.bool)
    positives[:, 0] = True
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 3], mask[2, 5] = False, False
    t[0, 3] = t[2, 5] = -math.inf  # masked
    t[1, 2] = t[1, 4] = -math.inf  # valid negatives, not j* (row 1 has finite negatives)
    t[3, 5] = -math.inf
    return s, t, positives, mask


@pytest.mark.parametrize("name", ["mse", "m3se", "softmax_ce", "kl_div", "rankdistil_b"])
def test_references_have_finite_gradients_with_unused_minus_inf_teacher(name):
    s, t, positives, mask = unused_teacher_case()
    if name == "mse":  # mse reads every valid teacher score: only the masked ones may be -inf
        t = torch.where(mask, t.nan_to_num(neginf=0.0), t)
    ref = getattr(losses, name + "_ref")
    loss_ref, grad_ref = loss_and_grad(ref, s, t, positives, mask, "none")
    assert torch.isfinite(loss_ref).all() and torch.isfinite(grad_ref).all(), (loss_ref, grad_ref)
    loss, grad = loss_and_grad(getattr(losses, name), s, t, positives, mask, "none", backend="cpp")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)


def test_m3se_ref_picks_a_negative_when_every_negative_teacher_is_minus_inf():
    s = torch.tensor([[0.3, 0.9, -0.2, 0.4], [0.5, 0.1, 0.7, -0.6]], dtype=torch.float64)
    t = torch.tensor([[2.0, -math.inf, -math.inf, -math.inf], [-math.inf, -math.inf, -math.inf, 0.0]],
                     dtype=torch.float64)
    positives = torch.zeros(2, 4, dtype=torch.bool)  # no positives: only the student's s_j* is read
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    # row 0: j* = 1, the first valid negative, and no other student score is above s_1 = 0.9: no hinge;
    # row 1: j* = 3, the only finite negative
    expected = torch.tensor([0.0, (0.5 + 0.6) ** 2 + (0.1 + 0.6) ** 2 + (0.7 + 0.6) ** 2], dtype=torch.float64)
    for fn in (losses.m3se_ref, lambda *a: losses.m3se(*a, backend="cpp")):
        loss, grad = loss_and_grad(fn, s, t, positives, mask, "none")
        torch.testing.assert_close(loss, expected)
        assert torch.isfinite(grad).all()
    # with a positive, t_j* = -inf is read: the reference gives the infinite loss the kernel refuses
    positives[1, 0] = True
    t[1, 0], t[1, 3] = 1.0, -math.inf
    assert losses.m3se_ref(s, t, positives, mask, "none")[1] == math.inf


# ---------------------------------------------------------------------------------------------------------
# Item 4: infinite and NaN scores in valid slots: one rule for every backend
# ---------------------------------------------------------------------------------------------------------
def base_case():
    gen = torch.Generator().manual_seed(105)
    s = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    t = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    positives = torch.zeros(3, 5, dtype=torch.bool)
    positives[:, 0] = positives[:, 1] = True
    return s, t, positives


# (loss, row, column, value) -> the error message, or None when the loss does not read that teacher score
READ_TEACHER = [
    ("mse", 1, 3, -math.inf, "-inf at a valid candidate that mse uses, first at \\[1, 3\\]"),
    ("mse", 2, 0, math.inf, "inf at a valid candidate that mse uses, first at \\[2, 0\\]"),
    ("margin_mse", 1, 3, -math.inf, "-inf at a valid candidate that margin_mse uses, first at \\[1, 3\\]"),
    ("margin_mse", 0, 1, math.inf, "inf at a valid candidate that margin_mse uses, first at \\[0, 1\\]"),
    ("m3se", 1, 0, -math.inf, "-inf at a valid candidate that m3se uses, first at \\[1, 0\\]"),
    ("m3se", 2, 4, math.inf, "inf at a valid candidate that m3se uses, first at \\[2, 4\\]"),  # becomes j*
    ("rankdistil_b", 1, 1, math.inf, "inf at a valid candidate that rankdistil_b uses, first at \\[1, 1\\]"),
    ("softmax_ce", 2, 2, math.inf, "inf at a valid candidate that softmax_ce uses, first at \\[2, 2\\]"),
    ("kl_div", 0, 4, math.inf, "inf at a valid candidate that kl_div uses, first at \\[0, 4\\]"),
    ("m3se", 1, 3, -math.inf, None),
    ("rankdistil_b", 1, 3, -math.inf, None),
    ("rankdistil_b", 1, 4, math.inf, None),
    ("softmax_ce", 1, 0, -math.inf, None),
    ("kl_div", 2, 3, -math.inf, None),
]


@pytest.mark.parametrize("case", READ_TEACHER, ids=lambda c: f"{c[0]}-{c[1]}{c[2]}-{c[3]}")
def test_infinite_teacher_is_an_error_where_read_and_harmless_elsewhere(case):
    name, row, col, value, message = case
    s, t, positives = base_case()
    t[row, col] = value
    fn = getattr(losses, name)
    if message is not None:
        for backend in BACKENDS:
            with pytest.raises(ValueError, match=r"^fastrank: t \(teacher scores\) contains " + message):
                fn(s, t, positives, None, "none", backend=backend)
        return
    results = [loss_and_grad(fn, s, t, positives, None, "none", backend=backend) for backend in BACKENDS]
    for loss, grad in results:
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", READ_TEACHER, ids=lambda c: f"{c[0]}-{c[1]}{c[2]}-{c[3]}")
def test_cuda_infinite_teacher_nan_row_where_read_cpu_error_when_validating(case):
    """On CUDA (no synchronisation by default) an infinite teacher score the loss reads gives its query a NaN
    loss and gradient row, the other queries exact; with set_validation(True) the CPU's message. One the
    loss never reads changes nothing: finite, and equal to the CPU."""
    name, row, col, value, message = case
    s, t, positives = base_case()
    t[row, col] = value
    fn = getattr(losses, name)
    loss, grad = loss_and_grad(fn, s.cuda(), t.cuda(), positives.cuda(), None, "none")
    loss, grad = loss.cpu(), grad.cpu()
    if message is None:
        want = loss_and_grad(fn, s, t, positives, None, "none")
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close((loss, grad), want, rtol=1e-12, atol=1e-12)
        with losses.set_validation(True):
            fn(s.cuda(), t.cuda(), positives.cuda())
        return
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[row] = False
    want_loss, want_grad = loss_and_grad(fn, s, t, positives, keep, "none")
    assert math.isnan(loss[row]) and torch.isnan(grad[row]).all()
    torch.testing.assert_close(loss[keep.any(-1)], want_loss[keep.any(-1)], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad[keep.any(-1)], want_grad[keep.any(-1)], rtol=1e-12, atol=1e-12)
    with losses.set_validation(True):
        with pytest.raises(ValueError, match=r"^fastrank: t \(teacher scores\) contains " + message):
            fn(s.cuda(), t.cuda(), positives.cuda(), None, "none")


@pytest.mark.parametrize("name", ["softmax_ce", "kl_div"])
def test_teacher_minus_inf_at_every_valid_candidate_of_a_row_is_an_error(name):
    s, t, positives = base_case()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 0] = False
    t[1, 1:] = -math.inf
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"^fastrank: t \(teacher scores\) is -inf at every valid candidate "
                                             r"of row 1"):
            getattr(losses, name)(s, t, positives, mask, backend=backend)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", DISTILL)
def test_non_finite_student_propagates_alike_in_every_backend(name, value):
    """A non-finite student score makes exactly the queries whose loss reads it non-finite, in every backend;
    the other queries (and the queries where it is harmless, like a -inf below a hinge) keep finite losses
    and gradients that agree."""
    s, t, positives = base_case()
    s[0, 0] = value  # a positive
    s[1, 3] = value  # a negative
    results = [loss_and_grad(getattr(losses, name), s, t, positives, None, "none", backend=backend)
               for backend in BACKENDS]
    (loss, grad), (loss_ref, grad_ref) = results
    assert torch.equal(torch.isfinite(loss), torch.isfinite(loss_ref)), (loss, loss_ref)
    assert torch.isfinite(loss[2])
    finite = torch.isfinite(loss)
    torch.testing.assert_close(loss[finite], loss_ref[finite], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad[finite], grad_ref[finite], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(grad[finite]).all()


# ---------------------------------------------------------------------------------------------------------
# Item 6: double backward
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DISTILL + ["inbatch_ce"])
def test_double_backward_is_a_clear_error_and_the_reference_supports_it(name):
    s, t, positives = base_case()
    s.requires_grad_(True)
    if name == "inbatch_ce":
        call = lambda fn, x: fn(x, torch.tensor([0, 4, 2]), 0.5)  # noqa: E731
    else:
        call = lambda fn, x: fn(x, t, positives)  # noqa: E731
    with pytest.raises(RuntimeError, match=f"fastrank.losses.{name}: double backward .*is not supported.*"
                                           f"fastrank.losses.{name}_ref"):
        (grad,) = torch.autograd.grad(call(getattr(losses, name), s), s, create_graph=True)
        torch.autograd.grad(grad.pow(2).sum(), s)
    (grad,) = torch.autograd.grad(call(getattr(losses, name + "_ref"), s), s, create_graph=True)
    (hvp,) = torch.autograd.grad(grad.pow(2).sum(), s)
    assert torch.isfinite(hvp).all()
    # a first-order backward is unaffected
    (first,) = torch.autograd.grad(call(getattr(losses, name), s), s)
    torch.testing.assert_close(first, grad.detach())


# -- item 16: per-call overhead ----------------------------------------------------------------------------
# At B=128 K=20 a fused loss's kernel takes tens of microseconds, about what each torch op costs in Python
# dispatch, so the op count per call *is* the overhead. Counted, not timed: a count is the same on every machine.
class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_loss_issues_no_op_beyond_its_outputs_and_the_gradient_product(reduction):
    s = torch.randn(128, 20, requires_grad=True)
    t = torch.randn(128, 20)
    losses.softmax_ce(s, t, reduction=reduction)  # warm the dispatch cache
    upstream = torch.ones(128) if reduction == "none" else torch.ones(())
    with _CountOps() as fwd:
        loss = losses.softmax_ce(s, t, reduction=reduction)
    with _CountOps() as bwd:
        loss.backward(upstream)
    # Forward: the two outputs the kernel writes (loss, and dL/ds with the reduction's 1/count folded in) and
    # nothing else: no copy, cast or detach of the inputs, no scale tensor. Backward: one multiply of dL/ds by
    # the upstream gradient, then autograd accumulating into s.grad.
    assert sorted(fwd.ops) == ["aten.empty.memory_format"] * 2 or sorted(fwd.ops) == ["aten.new_empty.default"] * 2, fwd.ops
    ours = [op for op in bwd.ops if not op.startswith("aten.detach")]
    assert len([op for op in ours if "mul" in op]) == 1, bwd.ops
    assert not [op for op in ours if "copy" in op or "_to_copy" in op], bwd.ops


def test_dispatch_decides_once_per_call_signature(monkeypatch):
    from fastrank import dispatch

    s, t = torch.randn(8, 5), torch.randn(8, 5)
    dispatch.reset()
    losses.margin_mse(s, t)
    calls = []
    real = dispatch._choose
    monkeypatch.setattr(dispatch, "_choose", lambda *a: calls.append(a) or real(*a))
    for _ in range(3):
        losses.margin_mse(s, t)
    assert not calls  # answered from the cache: no walk over the backends, no reasons built
    losses.margin_mse(s.double(), t.double())  # a new signature is decided once
    assert len(calls) == 1
