"""LITE (fastrank.lite_score, LiteScorer, lite_ref) under hostile input: garbage in masked padding, NaN in real
tokens, double backward, scorers wider than the kernel tile, and bad arguments. Issue 12.

Small scorers only: the Triton interpreter is slow, and none of this depends on the model's widths.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

from fastrank import LiteScorer, lite_ref, lite_score
from fastrank.ops import lite as lite_ops
from test_lite import KERNEL_BACKENDS, SMALL, PlainLite, _randomize, _scorer

BACKENDS = ["reference"] + KERNEL_BACKENDS
TINY = dict(lq=6, ld=10, row_hidden=20, col_hidden=12)  # one hidden chunk each: the interpreter is slow
GARBAGE = [float("inf"), float("-inf"), float("nan")]


def _grads(q, d, q_mask, d_mask, scorer, backend):
    """Scores and the gradients of q, d and every parameter, for a non-unit upstream gradient."""
    q = q.detach().clone().requires_grad_()
    d = d.detach().clone().requires_grad_()
    out = lite_score(q, d, q_mask, d_mask, scorer=scorer, backend=backend)
    upstream = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    return [out.detach()] + list(torch.autograd.grad(out, [q, d, *scorer.parameters()], upstream))


# ---------------------------------------------------------------------------------------------------------
# Masked padding may hold anything
# ---------------------------------------------------------------------------------------------------------
def _padded_case(form, seed):
    """q, d, their masks, and where q and d may hold garbage. In "per_pair" each query-doc pair has its own
    masks (they vary along batch dims that q or d lacks), which the kernel's backward handles apart."""
    g = torch.Generator().manual_seed(seed)
    if form == "rerank":
        q, d = torch.randn(5, 16, generator=g), torch.randn(2, 9, 16, generator=g)
        q_mask, d_mask = torch.rand(5, generator=g) < 0.7, torch.rand(2, 9, generator=g) < 0.6
    else:
        q, d = torch.randn(2, 1, 5, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
        q_mask, d_mask = torch.rand(2, 2, 5, generator=g) < 0.7, torch.rand(2, 2, 9, generator=g) < 0.6
    q_mask[..., 0] = True
    d_mask[..., 0] = True
    q_mask[..., -1] = False
    d_mask[..., -1] = False
    if form == "per_pair":  # garbage only where no pair reads the token
        return q, d, q_mask, d_mask, (~q_mask.any(1, keepdim=True)).unsqueeze(-1), (~d_mask.any(0, keepdim=True)).unsqueeze(-1)
    return q, d, q_mask, d_mask, (~q_mask).unsqueeze(-1), (~d_mask).unsqueeze(-1)


def _garbage_like(t: torch.Tensor) -> torch.Tensor:
    """inf, -inf and NaN in turn, so that one call meets all three."""
    return torch.tensor(GARBAGE)[torch.arange(t.numel()) % 3].reshape(t.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form,proj", [("rerank", False), ("per_pair", False), ("rerank", True)])
def test_masked_padding_may_hold_inf_or_nan(backend, form, proj):
    """Scores and every gradient equal those of the same inputs with the masked tokens zeroed, finite, and
    the masked tokens' own gradient is 0, whatever garbage (inf, -inf, NaN) the padding holds."""
    q, d, q_mask, d_mask, q_off, d_off = _padded_case(form, seed=3)
    if proj:
        scorer = _randomize(LiteScorer(**TINY, proj_dim=12, embed_dim=16), seed=4)
    else:
        scorer = _scorer(seed=4, **TINY)
    clean = _grads(q.masked_fill(q_off, 0), d.masked_fill(d_off, 0), q_mask, d_mask, scorer, backend)
    assert all(bool(torch.isfinite(t).all()) for t in clean)
    hostile_q = torch.where(q_off, _garbage_like(q), q)
    hostile_d = torch.where(d_off, _garbage_like(d), d)
    got = _grads(hostile_q, hostile_d, q_mask, d_mask, scorer, backend)
    for what, a, b in zip(["score", "q", "d"] + [n for n, _ in scorer.named_parameters()], got, clean):
        assert bool(torch.isfinite(a).all()), f"{what} is not finite with inf/NaN in masked padding"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} with inf/NaN padding: {m}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_real_token_propagates_to_its_scores_only(backend):
    """NaN or inf in an unmasked token makes the scores of the pairs that read it NaN, as in maxsim and the
    reference (the kernel's ReLU once turned NaN into 0 and returned a finite score), and no other."""
    g = torch.Generator().manual_seed(5)
    q, d = torch.randn(7, 16, generator=g), torch.randn(4, 12, 16, generator=g)
    for doc, value in enumerate(GARBAGE):
        d[doc, 4, 2] = value
    out = lite_score(q, d, None, None, scorer=_scorer(seed=1), backend=backend)
    assert bool(torch.isnan(out[:3]).all()) and bool(torch.isfinite(out[3])), out


# ---------------------------------------------------------------------------------------------------------
# Double backward
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not KERNEL_BACKENDS, reason="needs triton and TRITON_INTERPRET=1")
def test_double_backward_is_a_clear_error_and_the_reference_supports_it():
    scorer = _scorer(seed=2)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 16, generator=g, requires_grad=True)
    d = torch.randn(2, 9, 16, generator=g)
    out = lite_score(q, d, scorer=scorer, backend="triton_interpret")
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)  # first order with a graph still works
    with pytest.raises(RuntimeError, match=r"lite_score: double backward .* is not supported.*fastrank\.lite_ref"):
        torch.autograd.grad(dq.square().sum(), q)
    ref = lite_ref(q, d, scorer=scorer)
    (rq,) = torch.autograd.grad(ref.sum(), q, create_graph=True)
    torch.testing.assert_close(dq, rq, rtol=1e-4, atol=1e-6)
    (hvp,) = torch.autograd.grad(rq.square().sum(), q)
    assert hvp.shape == q.shape and bool(torch.isfinite(hvp).all())
    assert "double backward" in lite_score.__doc__


# ---------------------------------------------------------------------------------------------------------
# A scorer wider than the kernel tile
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_size_warnings(monkeypatch):
    monkeypatch.setattr(lite_ops, "_SIZE_FALLBACK_WARNED", set(), raising=False)


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="needs triton and TRITON_INTERPRET=1")
def test_wider_than_the_tile_warns_once_per_limit(fresh_size_warnings):
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(3, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    tall = _scorer(seed=2, lq=70, ld=5, row_hidden=6, col_hidden=4)
    with pytest.warns(RuntimeWarning, match=r"lq=70 exceeds the kernel's 64-row tile.*eager reference.*3\.5x slower"):
        lite_score(q, d, scorer=tall)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lite_score(q, d, scorer=tall)  # once per process
        lite_score(q, d, scorer=_scorer(seed=2, lq=90, ld=5, row_hidden=6, col_hidden=4))  # same limit
    wide = _scorer(seed=2, lq=4, ld=300, row_hidden=6, col_hidden=4)
    with pytest.warns(RuntimeWarning, match=r"ld=300 exceeds the kernel's 256-column tile"):
        lite_score(q[:4], d, scorer=wide)


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="needs triton and TRITON_INTERPRET=1")
def test_no_size_warning_where_the_kernel_could_not_run_anyway(fresh_size_warnings, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(3, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    tall = _scorer(seed=2, lq=70, ld=5, row_hidden=6, col_hidden=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lite_score(q.double(), d.double(), scorer=copy.deepcopy(tall).double())  # float64: reference only
        lite_score(q, d, scorer=tall, backend="reference")  # asked for
        monkeypatch.setenv("FASTRANK_BACKEND", "reference")
        lite_score(q, d, scorer=tall)
        assert not lite_ops._SIZE_FALLBACK_WARNED


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ---------------------------------------------------------------------------------------------------------
def _bad_calls():
    q, d = torch.randn(4, 8), torch.randn(3, 5, 8)
    byte_mask, short_mask = torch.ones(3, 5, dtype=torch.uint8), torch.ones(2, 5, dtype=torch.bool)
    return [
        (dict(q=[[1.0]], d=d), TypeError, r"q must be a torch\.Tensor, got list"),
        (dict(q=q, d=d.numpy()), TypeError, r"d must be a torch\.Tensor, got ndarray"),
        (dict(q=q.bool(), d=d.bool()), TypeError, r"q must be float32, float16, bfloat16 or float64, got torch\.bool"),
        (dict(q=q.cfloat(), d=d.cfloat()), TypeError, r"q must be float32, float16, bfloat16 or float64, got torch\.complex64"),
        (dict(q=q, d=torch.randn(5)), ValueError, r"d must have shape \(\.\.\., Ld, H\), got \(5,\)"),
        (dict(q=q, d=d, q_mask=[True] * 4), TypeError, r"q_mask must be a bool tensor or None, got list"),
        (dict(q=q, d=d, d_mask=byte_mask), TypeError, r"d_mask must be a bool tensor, got torch\.uint8"),
        (dict(q=q, d=d, q_mask=torch.tensor(True)), ValueError, r"q_mask must have shape \(\.\.\., 4\).*got \(\)"),
        (dict(q=q, d=d, d_mask=short_mask), ValueError, r"do not broadcast: q \(\), d \(3,\), d_mask \(2,\)"),
        (dict(q=q, d=d, q_mask=torch.ones(4, dtype=torch.bool, device="meta")), ValueError, r"q_mask on meta"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_argument_is_named(backend, case):
    kwargs, exc, pattern = _bad_calls()[case]
    with pytest.raises(exc, match=pattern):
        lite_score(**kwargs, scorer=_scorer(), backend=backend)
    with pytest.raises(exc, match=pattern):
        lite_ref(**kwargs, scorer=_scorer())


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
def test_bad_backend_and_scorer():
    q, d = torch.randn(4, 8), torch.randn(3, 5, 8)
    with pytest.raises(ValueError, match=r"backend='gpu' is not a backend"):
        lite_score(q, d, scorer=_scorer(), backend="gpu")
    with pytest.raises(TypeError, match="LiteScorer layout"):
        lite_score(q, d, scorer=None)
    mixed = _scorer()
    mixed.out.double()
    with pytest.raises(TypeError, match="parameters must share one device and one dtype"):
        lite_score(q, d, scorer=mixed)
    hollow = _scorer()
    hollow.row_mlp[0], hollow.row_mlp[3] = nn.Linear(16, 0), nn.Linear(0, 16)
    hollow.row_mlp[2] = nn.LayerNorm(0)
    with pytest.raises(ValueError, match=r"row hidden width \(row_mlp\[0\]\.out_features\) is 0"):
        lite_score(q, d, scorer=hollow)


@pytest.mark.parametrize("name,value", [("lq", 0), ("ld", -3), ("row_hidden", 0), ("col_hidden", 2.5),
                                        ("proj_dim", 0), ("embed_dim", True)])
def test_lite_scorer_sizes_must_be_positive_ints(name, value):
    sizes = dict(SMALL, proj_dim=4, embed_dim=8)
    sizes[name] = value
    with pytest.raises(ValueError, match=rf"LiteScorer: {name} must be a positive int, got {value!r}"):
        LiteScorer(**sizes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs_score_as_padding(backend):
    """No pairs gives an empty result; no query tokens, no doc tokens or H = 0 score as an all-padding S
    (LITE sees the padded grid): the same as every token masked, checked against the independent PlainLite."""
    scorer = _scorer(seed=6)
    plain = PlainLite(**SMALL)
    plain.load_state_dict(scorer.state_dict())
    g = torch.Generator().manual_seed(2)
    q, d = torch.randn(4, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    assert lite_score(q, d[:0], scorer=scorer, backend=backend).shape == (0,)
    assert lite_score(q.expand(0, 1, 4, 8), d, scorer=scorer, backend=backend).shape == (0, 3)
    with torch.no_grad():
        padding = plain(q, d[0], torch.zeros(4, dtype=torch.bool), torch.zeros(5, dtype=torch.bool))
    for a, b in [(q[:0], d), (q, d[:, :0]), (q[:, :0], d[..., :0])]:
        out = lite_score(a, b, scorer=scorer, backend=backend)
        torch.testing.assert_close(out, padding.expand(3), rtol=1e-5, atol=1e-6)

