"""fastrank.integrations.pylate: PyLate's scoring functions on fastrank.maxsim.

Without PyLate: against expectations built from fastrank.maxsim_ref in float64 (PyLate's "a padded token is
a similarity-0 candidate" rebuilt independently, as one extra zero token that is real only in padded docs)
and against the hand-computed examples of PyLate's docstrings. With PyLate installed: against PyLate's own
functions and its Distillation / Contrastive losses, forward and gradients for both inputs."""
import pytest
import torch

from fastrank import maxsim_ref
from fastrank._ext import load as load_extension
from fastrank.integrations.pylate import ColBERTScores, colbert_kd_scores, colbert_scores, colbert_scores_pairwise

BACKEND = "cpp" if load_extension() is not None else "reference"  # the fused kernel wherever it is built
ODD_SIZES = [(1, 97, 59), (7, 1, 128), (31, 201, 59)]  # (Lq, Ld, H)
FWD_TOL = dict(rtol=1e-5, atol=1e-4)  # float32 against the float64 truth
GRAD_TOL = dict(rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def pylate_scores():
    return pytest.importorskip("pylate.scores", reason="PyLate is not installed (pip install 'fastrank[pylate]')")


# ---------------------------------------------------------------------------------------------------------
# Inputs and float64 expectations
# ---------------------------------------------------------------------------------------------------------
LAYOUTS = {  # function, queries (A, Lq), documents' leading dims, expected output shape
    "colbert_scores": (colbert_scores, 3, (4,), (3, 4)),
    "colbert_kd_scores": (colbert_kd_scores, 3, (3, 5), (3, 5)),
    "ColBERTScores": (ColBERTScores(), 3, (2, 3), (3, 6)),
}


def _case(layout, lq, ld, h, *, seed, dtype=torch.float32):
    """Fresh random embeddings and bool masks with heavy padding, one fully padded document, one without
    padding and one with a single real token (where PyLate's similarity-0 padding changes the score)."""
    g = torch.Generator().manual_seed(seed)
    _, a, doc_dims, _ = LAYOUTS[layout]
    q = torch.randn(a, lq, h, generator=g).to(dtype)
    d = torch.randn(*doc_dims, ld, h, generator=g).to(dtype)
    q_mask = torch.rand(a, lq, generator=g) < 0.8
    q_mask[:, 0] = True
    d_mask = torch.rand(*doc_dims, ld, generator=g) < 0.4
    flat = d_mask.view(-1, ld)
    flat[0] = False
    flat[1] = True
    flat[2] = torch.arange(ld) == ld // 2  # one real token among padding: its negative similarities lose to 0
    return q, d, q_mask, d_mask


def _pylate_ref(q, d, q_mask, d_mask, padding):
    """MaxSim of broadcast q (..., Lq, H) and d (..., Ld, H) with PyLate's semantics (``"zero"``: a padded
    document also offers a real all-zero token) or fastrank's (``"exclude"``), by maxsim_ref."""
    if padding == "zero" and d_mask is not None:
        zero = d.new_zeros(*d.shape[:-2], 1, d.shape[-1])
        d = torch.cat([d, zero], dim=-2)
        d_mask = torch.cat([d_mask, ~d_mask.all(dim=-1, keepdim=True)], dim=-1)
    return maxsim_ref(q, d, q_mask, d_mask)


def _expected(layout, q, d, q_mask, d_mask, padding):
    if layout == "ColBERTScores":  # built pair by pair, so the column order is checked too
        n = d.shape[1]
        cols = [_pylate_ref(q, d[j, k], q_mask, d_mask[j, k], padding) for j in range(d.shape[0]) for k in range(n)]
        return torch.stack(cols, dim=1)
    return _pylate_ref(q[:, None], d, q_mask[:, None], d_mask, padding)


def _grads(out, q, d, seed=7):
    # Not all ones, and exact in bf16 so that runs in every dtype get the very same upstream gradient.
    g = (torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)) + 0.5).bfloat16().double()
    return torch.autograd.grad(out, (q, d), g.to(out.dtype))


# ---------------------------------------------------------------------------------------------------------
# Against maxsim_ref (always run)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["zero", "exclude"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("lq,ld,h", ODD_SIZES)
def test_matches_reference(layout, padding, lq, ld, h):
    q, d, q_mask, d_mask = _case(layout, lq, ld, h, seed=lq * 1000 + ld + h)
    fn, _, _, shape = LAYOUTS[layout]
    q, d = q.requires_grad_(), d.requires_grad_()
    kwargs = {} if layout == "ColBERTScores" else {"padding": padding}
    if layout == "ColBERTScores":
        fn = ColBERTScores(padding=padding)
    out = fn(q, d, q_mask, d_mask, backend=BACKEND, **kwargs)
    assert out.shape == shape and out.dtype == torch.float32
    q64, d64 = q.detach().double().requires_grad_(), d.detach().double().requires_grad_()
    ref = _expected(layout, q64, d64, q_mask, d_mask, padding)
    torch.testing.assert_close(out.double(), ref, **FWD_TOL)
    for got, want in zip(_grads(out, q, d), _grads(ref, q64, d64)):
        torch.testing.assert_close(got.double(), want, **GRAD_TOL)
    if padding == "zero" and ld > 1:  # the inputs are such that the two padding semantics disagree
        other = _expected(layout, q64, d64, q_mask, d_mask, "exclude")
        assert not torch.allclose(ref, other)


def test_pylate_docstring_examples():
    """The worked examples in PyLate 1.6.0's docstrings (float 0/1 masks, H = 1), outputs as printed there."""
    q = torch.tensor([[[1.], [0.], [0.], [0.]], [[0.], [2.], [0.], [0.]], [[0.], [0.], [3.], [0.]]])
    q_mask = torch.tensor([[1., 1., 1., 1.], [1., 1., 1., 1.], [1., 1., 0., 1.]])
    d = torch.tensor([[[10.], [0.], [1.]], [[0.], [100.], [10.]], [[1.], [0.], [1000.]]])
    d_mask = torch.tensor([[1., 1., 1.], [1., 0., 1.], [1., 1., 1.]])
    torch.testing.assert_close(colbert_scores(q, d, q_mask, d_mask),
                               torch.tensor([[10., 10., 1000.], [20., 20., 2000.], [0., 0., 0.]]))
    d_pairs = torch.tensor([[[10.], [0.], [1.]], [[0.], [100.], [1.]], [[1.], [0.], [1000.]]])
    torch.testing.assert_close(colbert_scores_pairwise(q, d_pairs), torch.tensor([10., 200., 3000.]))
    d_kd = torch.tensor([
        [[[10.], [0.], [1.]], [[20.], [0.], [1.]], [[30.], [0.], [1.]]],
        [[[0.], [100.], [1.]], [[0.], [200.], [1.]], [[0.], [300.], [1.]]],
        [[[1.], [0.], [1000.]], [[1.], [0.], [2000.]], [[10.], [0.], [3000.]]],
    ])
    d_kd_mask = torch.ones(3, 3, 3)
    d_kd_mask[0, 0, 0] = 0.
    expected_kd = torch.tensor([[1., 20., 30.], [200., 400., 600.], [0., 0., 0.]])
    torch.testing.assert_close(colbert_kd_scores(q, d_kd, q_mask, d_kd_mask), expected_kd)
    # The same groups in the contrastive layout: query i against every group's slots, query-major.
    grouped = ColBERTScores()(q, d_kd, q_mask, d_kd_mask)
    torch.testing.assert_close(grouped[torch.arange(3)[:, None], torch.arange(3) + 3 * torch.arange(3)[:, None]],
                               expected_kd)


def test_mask_dtypes_and_weights():
    """Integer and float 0/1 masks equal bool ones; a float weight scales the similarity (PyLate's product)."""
    q, d, q_mask, d_mask = _case("colbert_kd_scores", 7, 23, 16, seed=1)
    want = colbert_kd_scores(q, d, q_mask, d_mask, backend=BACKEND)
    for dtype in (torch.int64, torch.float32):
        got = colbert_kd_scores(q, d, q_mask.to(dtype), d_mask.to(dtype), backend=BACKEND)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    weights = torch.rand(d_mask.shape, generator=torch.Generator().manual_seed(2)) * d_mask
    got = colbert_kd_scores(q, d, q_mask, weights, backend=BACKEND)
    torch.testing.assert_close(got.double(), _pylate_ref(q[:, None].double(), d.double() * weights[..., None].double(),
                                                         q_mask[:, None], d_mask, "zero"), **FWD_TOL)
    excluded = colbert_kd_scores(q, d, q_mask, weights, backend=BACKEND, padding="exclude")  # weight != 0: real token
    torch.testing.assert_close(excluded.double(), _pylate_ref(q[:, None].double(), d.double(), q_mask[:, None], d_mask,
                                                              "exclude"), **FWD_TOL)


def test_dtypes_follow_pylate():
    """Scores come back in the dtype of PyLate's ``einsum * masks``; float64 and integer embeddings, which
    the kernels do not take, are scored on maxsim_ref instead of failing."""
    q, d, q_mask, d_mask = _case("colbert_scores", 7, 30, 16, seed=3)
    assert colbert_scores(q.bfloat16(), d.bfloat16(), q_mask, d_mask).dtype == torch.bfloat16
    assert colbert_scores(q.bfloat16(), d.bfloat16(), q_mask.float(), d_mask).dtype == torch.float32
    assert colbert_scores(q, d, q_mask, d_mask.double()).dtype == torch.float64
    q64, d64 = q.double().requires_grad_(), d.double().requires_grad_()
    out = colbert_scores(q64, d64, q_mask, d_mask)
    ref = _pylate_ref(q64[:, None], d64, q_mask[:, None], d_mask, "zero")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-10)
    for got, want in zip(_grads(out, q64, d64), _grads(ref, q64, d64)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
    qi, di = (q * 4).round().long(), (d * 4).round().long()
    out = colbert_scores(qi, di, q_mask, d_mask)
    assert out.dtype == torch.int64
    assert torch.equal(out, _pylate_ref(qi[:, None].double(), di.double(), q_mask[:, None], d_mask, "zero").long())


def test_lists_and_numpy_like_pylate():
    """PyLate's convert_to_tensor: a list of tensors is stacked, numpy arrays and nested lists are taken."""
    q, d, q_mask, d_mask = _case("colbert_scores", 7, 30, 16, seed=4)
    want = colbert_scores(q, d, q_mask, d_mask)
    torch.testing.assert_close(colbert_scores(list(q), list(d), q_mask, d_mask), want)
    torch.testing.assert_close(colbert_scores(q.numpy(), [x.numpy() for x in d], q_mask.numpy(), d_mask.tolist()), want)
    qs = [x.clone().requires_grad_() for x in q]  # gradients reach tensors given in a list
    colbert_scores(qs, d, q_mask, d_mask).sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in qs)


@pytest.mark.parametrize("docs_as", ["list", "tensor"])
@pytest.mark.parametrize("queries_as", ["list", "tensor"])
def test_pairwise(queries_as, docs_as):
    """Pairs of different lengths (lists) and padded batches (tensors), forward and gradients, against
    maxsim_ref on each pair alone."""
    g = torch.Generator().manual_seed(5)
    lq = [1, 7, 31, 7] if queries_as == "list" else [7] * 4
    ld = [97, 1, 201, 13] if docs_as == "list" else [97] * 4
    qs = [torch.randn(n, 59, generator=g).requires_grad_() for n in lq]
    ds = [torch.randn(n, 59, generator=g).requires_grad_() for n in ld]
    q_in = qs if queries_as == "list" else torch.stack(qs)
    d_in = ds if docs_as == "list" else torch.stack(ds)
    out = colbert_scores_pairwise(q_in, d_in, backend=BACKEND)
    leaves64 = [t.detach().double().requires_grad_() for t in qs + ds]
    ref = torch.stack([maxsim_ref(x, y) for x, y in zip(leaves64[:4], leaves64[4:])])
    assert out.shape == (4,) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, **FWD_TOL)
    w = torch.randn(4, generator=g) + 0.5
    got = torch.autograd.grad(out, qs + ds, w)
    want = torch.autograd.grad(ref, leaves64, w.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **GRAD_TOL)


def test_pairwise_numpy_and_empty():
    g = torch.Generator().manual_seed(6)
    qs = [torch.randn(n, 8, generator=g) for n in (3, 5)]
    ds = [torch.randn(n, 8, generator=g) for n in (4, 2)]
    want = colbert_scores_pairwise(qs, ds)
    torch.testing.assert_close(colbert_scores_pairwise([x.numpy() for x in qs], [x.numpy() for x in ds]), want)
    assert colbert_scores_pairwise([], []).shape == (0,)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backends(layout):
    """``"torch"`` is eager PyTorch (maxsim_ref) with the same results; PyLate's own kernels are refused."""
    q, d, q_mask, d_mask = _case(layout, 7, 30, 16, seed=8)
    fn = LAYOUTS[layout][0]
    want = fn(q, d, q_mask, d_mask)
    for backend in ("torch", "TORCH", "auto", "reference", BACKEND):
        torch.testing.assert_close(fn(q, d, q_mask, d_mask, backend=backend), want, rtol=1e-6, atol=1e-5)
    for backend, match in (("flash", "PyLate's own"), ("lik", "PyLate's own"), ("cuda", "backend must be")):
        with pytest.raises(ValueError, match=match):
            fn(q, d, q_mask, d_mask, backend=backend)


def test_errors_name_the_argument():
    q, d, q_mask, d_mask = _case("colbert_kd_scores", 7, 30, 16, seed=9)
    cases = [
        (lambda: colbert_scores(q[0], d[0]), ValueError, "colbert_scores: queries_embeddings must be"),
        (lambda: colbert_scores(q, d), ValueError, "colbert_scores: documents_embeddings must be"),
        (lambda: colbert_kd_scores(q, d[..., :8]), ValueError, "embedding dim"),
        (lambda: colbert_kd_scores(q, d.double()), TypeError, "one dtype"),
        (lambda: colbert_kd_scores(q, d[:2]), ValueError, "candidates for each of the 3 queries"),
        (lambda: colbert_kd_scores(q, d, q_mask[:, :3]), ValueError, "queries_mask must have shape"),
        (lambda: colbert_kd_scores(q, d, None, d_mask[0]), ValueError, "documents_mask must have shape"),
        (lambda: colbert_kd_scores(q, d, padding="zeros"), ValueError, "padding must be one of"),
        (lambda: ColBERTScores(padding="none"), ValueError, "padding must be one of"),
        (lambda: ColBERTScores()(q, d[0]), ValueError, "ColBERTScores: documents_embeddings must be"),
        (lambda: colbert_scores([q[0], q[1, :3]], d[0]), ValueError, "queries_embeddings is a list of tensors of different"),
        (lambda: colbert_scores(q, {"a": 1}), TypeError, "documents_embeddings must be a tensor"),
        (lambda: colbert_scores_pairwise(list(q[0]), list(d[0])), ValueError, r"queries_embeddings\[0\] must be"),
        (lambda: colbert_scores_pairwise(q, d[:2, 0]), ValueError, "holds 3 items but documents_embeddings holds 2"),
        (lambda: colbert_scores_pairwise([q[0], q[1].double()], list(d[0, :2])), ValueError, r"queries_embeddings\[1\]"),
        (lambda: colbert_scores(q, d[:, 0], backend=3), TypeError, "backend must be a string"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


# ---------------------------------------------------------------------------------------------------------
# Against PyLate itself (skipped without it)
# ---------------------------------------------------------------------------------------------------------
def _pylate_fn(pylate_scores, layout):
    return pylate_scores.ColBERTScores() if layout == "ColBERTScores" else getattr(pylate_scores, layout)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("lq,ld,h", ODD_SIZES)
def test_matches_pylate_float32(pylate_scores, layout, mask_dtype, lq, ld, h):
    q, d, q_mask, d_mask = _case(layout, lq, ld, h, seed=lq + ld * 10 + h)
    q_mask, d_mask = q_mask.to(mask_dtype), d_mask.to(mask_dtype)
    fn = LAYOUTS[layout][0]
    q1, d1 = q.clone().requires_grad_(), d.clone().requires_grad_()
    q2, d2 = q.clone().requires_grad_(), d.clone().requires_grad_()
    out = fn(q1, d1, q_mask, d_mask, backend=BACKEND)
    want = _pylate_fn(pylate_scores, layout)(q2, d2, q_mask, d_mask, backend="torch")
    assert out.shape == want.shape and out.dtype == want.dtype
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
    for got, ref in zip(_grads(out, q1, d1), _grads(want, q2, d2)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_pylate_bfloat16(pylate_scores, layout):
    """bf16: fastrank's error against the float64 truth (PyLate's own function in float64 on the same
    bf16-rounded inputs) is at most twice PyLate's own bf16 error, for the scores and both gradients
    (flash-attention's rule; fastrank accumulates in float32, PyLate rounds every similarity to bf16 and can
    route a gradient through a different token after that rounding ties two similarities)."""
    q, d, q_mask, d_mask = _case(layout, 31, 201, 128, seed=10, dtype=torch.bfloat16)
    pylate_fn = _pylate_fn(pylate_scores, layout)
    results = {}
    for name, fn, dtype in (("fastrank", LAYOUTS[layout][0], None), ("pylate", pylate_fn, None),
                            ("truth", pylate_fn, torch.float64)):
        qq = (q if dtype is None else q.to(dtype)).clone().requires_grad_()
        dd = (d if dtype is None else d.to(dtype)).clone().requires_grad_()
        kwargs = {"backend": BACKEND} if name == "fastrank" else {"backend": "torch"}
        out = fn(qq, dd, q_mask, d_mask, **kwargs)
        results[name] = (out, *_grads(out, qq, dd))
    assert results["fastrank"][0].dtype == results["pylate"][0].dtype == torch.bfloat16
    for i, what in enumerate(("scores", "grad q", "grad d")):
        truth = results["truth"][i]
        err = {k: (results[k][i].double() - truth).abs().max().item() for k in ("fastrank", "pylate")}
        assert err["fastrank"] <= 2 * err["pylate"] + 1e-6, (what, err)


def test_mask_weights_match_pylate(pylate_scores):
    """Mask values other than 0/1 scale the similarities, on either side."""
    q, d, q_mask, d_mask = _case("colbert_scores", 7, 30, 16, seed=11)
    g = torch.Generator().manual_seed(12)
    qw, dw = torch.rand(q_mask.shape, generator=g) * 2 - 0.5, torch.rand(d_mask.shape, generator=g) * d_mask
    torch.testing.assert_close(colbert_scores(q, d, qw, dw, backend=BACKEND),
                               pylate_scores.colbert_scores(q, d, qw, dw, backend="torch"), rtol=1e-5, atol=1e-4)


def test_pairwise_matches_pylate(pylate_scores):
    g = torch.Generator().manual_seed(13)
    qs = [torch.randn(n, 59, generator=g) for n in (1, 7, 31)]
    ds = [torch.randn(n, 59, generator=g) for n in (97, 1, 201)]
    want = pylate_scores.colbert_scores_pairwise(qs, ds, backend="torch")
    torch.testing.assert_close(colbert_scores_pairwise(qs, ds, backend=BACKEND), want, rtol=1e-5, atol=1e-4)
    q = torch.randn(3, 7, 59, generator=g, dtype=torch.float32).bfloat16()
    d = torch.randn(3, 97, 59, generator=g, dtype=torch.float32).bfloat16()
    assert colbert_scores_pairwise(q, d, backend=BACKEND).dtype == pylate_scores.colbert_scores_pairwise(q, d).dtype


class _Encoder:
    """Stands in for pylate.models.ColBERT in PyLate's losses: the features carry the token embeddings."""
    skiplist: list = []
    do_query_expansion = False

    def __call__(self, features):
        return {"token_embeddings": features["token_embeddings"]}


def _features(n, length, h, g):
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    attention = (torch.arange(length) < lengths[:, None]).long()
    return {"input_ids": torch.randint(5, 1000, (n, length), generator=g), "attention_mask": attention,
            "token_embeddings": torch.randn(n, length, h, generator=g).requires_grad_()}


@pytest.mark.parametrize("loss_name", ["Distillation", "Contrastive"])
def test_pylate_losses_take_the_swap(pylate_scores, loss_name):
    """PyLate's Distillation (score_metric=colbert_kd_scores) and Contrastive (score_metric=ColBERTScores()),
    given fastrank's functions, give PyLate's loss and gradients."""
    losses = pytest.importorskip("pylate.losses")
    g = torch.Generator().manual_seed(14)
    b, k, h = 4, 3, 32
    if loss_name == "Distillation":
        features = [_features(b, 9, h, g), _features(b * k, 23, h, g)]
        labels = torch.randn(b, k, generator=g)
        ours, theirs = losses.Distillation(_Encoder(), score_metric=colbert_kd_scores), losses.Distillation(_Encoder())
    else:
        features = [_features(b, 9, h, g)] + [_features(b, 23, h, g) for _ in range(k)]
        labels = None
        ours, theirs = losses.Contrastive(_Encoder(), score_metric=ColBERTScores()), losses.Contrastive(_Encoder())
    leaves = [f["token_embeddings"] for f in features]
    got = ours(features, labels)
    got_grads = torch.autograd.grad(got, leaves)
    want = theirs(features, labels)
    want_grads = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b_ in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-6)
