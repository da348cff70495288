"""ColBERT's token projection (fastrank.ops.projection.project_tokens): the C++ kernel against the float64
reference, forward and gradients, on every ISA path this CPU has (forced with cpu_isa.use), with masks, bias,
odd sizes and padding that holds anything; determinism; dispatch; input errors."""
import pytest
import torch

from fastrank import BackendUnavailableError, _ext, cpu_isa, dispatch
from fastrank.ops.projection import dispatch_context, project_tokens, project_tokens_ref

pytestmark = pytest.mark.skipif(_ext.unavailable_reason() is not None, reason="needs the compiled extension")

PATHS = cpu_isa.available()
# float32 kernel against float64 truth: the outputs are unit vectors (entries below 1); the gradients are
# compared relative to their largest entry (sums over up to a few hundred rows of float32 products).
FWD_ATOL = 2e-6
GRAD_RTOL = 2e-5


def _problem(shape, hidden, out, bias=True, mask="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden, generator=g) * 3
    w = torch.randn(out, hidden, generator=g) / hidden ** 0.5
    b = torch.randn(out, generator=g) if bias else None
    if mask == "random":
        m = torch.rand(shape, generator=g) > 0.3
    elif mask == "prefix":  # real tokens first, padding after: what a tokenizer gives
        lengths = torch.randint(1, shape[-1] + 1, shape[:-1], generator=g)
        m = torch.arange(shape[-1]) < lengths.unsqueeze(-1)
    else:
        m = None
    grad = torch.randn(*shape, out, generator=g)
    return h, w, b, m, grad


def _run(fn, h, w, b, m, grad, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (h, w, b)]
    out = fn(*leaves, m, **kw)
    (out * grad.to(out.dtype)).sum().backward()
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _assert_matches_truth(h, w, b, m, grad, what=""):
    got, got_grads = _run(project_tokens, h, w, b, m, grad, torch.float32, backend="cpp")
    want, want_grads = _run(project_tokens_ref, h, w, b, m, grad, torch.float64)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=0, atol=FWD_ATOL, msg=lambda s: f"{what} out: {s}")
    for name, a, e in zip(("dh", "dw", "db"), got_grads, want_grads):
        if e is None:
            assert a is None
            continue
        scale = e.abs().amax().item() if e.numel() else 1.0
        torch.testing.assert_close(a.double(), e, rtol=0, atol=GRAD_RTOL * (1 + scale), msg=lambda s: f"{what} {name}: {s}")


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("shape,hidden,out,bias,mask", [
    ((32, 200), 384, 128, False, "prefix"),  # ColBERT's head on a batch of passages
    ((4, 3, 37), 50, 33, True, "random"),  # odd sizes, 3 token dims
    ((5,), 7, 5, True, None),  # no mask, widths below one panel
    ((2, 300), 64, 96, False, "random"),  # more rows than a backward chunk, P past a panel
    ((1, 1), 1, 1, True, "random"),
])
def test_matches_the_float64_reference_on_every_path(isa, shape, hidden, out, bias, mask):
    problem = _problem(shape, hidden, out, bias, mask, seed=hash((isa, shape)) % 1000)
    with cpu_isa.use(isa):
        _assert_matches_truth(*problem, what=f"{isa} {shape}")


@pytest.mark.parametrize("isa", PATHS)
def test_more_rows_than_a_span_and_a_broadcast_mask(isa):
    # 6,000 rows: three of the backward's spans (2,048 rows each), whose partial sums are added in order.
    h, w, b, _, grad = _problem((3, 2000), 40, 24, True, None, seed=3)
    m = torch.rand(2000, generator=torch.Generator().manual_seed(4)) > 0.5  # one mask for every sequence
    with cpu_isa.use(isa):
        _assert_matches_truth(h, w, b, m, grad, what=isa)


def test_padding_is_never_read():
    h, w, b, m, grad = _problem((6, 50), 64, 32, True, "random", seed=5)
    hostile = h.clone()
    hostile[~m] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(64)[:64]
    out, grads = _run(project_tokens, hostile, w, b, m, grad, torch.float32, backend="cpp")
    clean = torch.where(m.unsqueeze(-1), h, 0.0)
    want, want_grads = _run(project_tokens_ref, clean, w, b, m, grad, torch.float64)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out[~m] == 0).all() and (grads[0][~m] == 0).all()
    torch.testing.assert_close(out.double(), want, rtol=0, atol=FWD_ATOL)
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), e, rtol=0, atol=GRAD_RTOL * (1 + e.abs().amax().item()))


def test_nan_in_a_real_token_reaches_its_row_only():
    h, w, _, _, _ = _problem((2, 9), 16, 8, False, None, seed=6)
    h[1, 4, 3] = float("nan")
    out = project_tokens(h, w, backend="cpp")
    assert torch.isnan(out[1, 4]).all()
    finite = torch.ones(2, 9, dtype=torch.bool)
    finite[1, 4] = False
    assert torch.isfinite(out[finite]).all()


def test_zero_token_takes_the_eps_branch_like_the_reference():
    h, w, b, _, grad = _problem((3, 4), 12, 8, False, None, seed=7)
    h[0, 1] = 0.0  # a zero projection: norm 0 < eps, t = p / eps = 0, dp = g / eps
    _assert_matches_truth(h, w, b, None, grad * 1e-12, what="zero row")


def test_deterministic_and_independent_of_the_thread_count():
    h, w, b, m, grad = _problem((4, 3000), 48, 32, True, "prefix", seed=8)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            results.append(_run(project_tokens, h, w, b, m, grad, torch.float32, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(a, e) for a, e in zip(grads, results[0][1]))


def test_only_the_gradients_asked_for():
    h, w, b, m, grad = _problem((3, 20), 16, 8, True, "random", seed=9)
    frozen_w = w.clone()  # no grad: the weight's sum is skipped
    hh = h.clone().requires_grad_()
    (project_tokens(hh, frozen_w, b, m, backend="cpp") * grad).sum().backward()
    want_h = h.double().requires_grad_()
    (project_tokens_ref(want_h, w.double(), b.double(), m) * grad.double()).sum().backward()
    torch.testing.assert_close(hh.grad.double(), want_h.grad, rtol=0, atol=GRAD_RTOL * 10)
    ww = w.clone().requires_grad_()  # frozen states (cached hidden states): only dW
    (project_tokens(h, ww, None, m, backend="cpp") * grad).sum().backward()
    want_w = w.double().requires_grad_()
    (project_tokens_ref(h.double(), want_w, None, m) * grad.double()).sum().backward()
    torch.testing.assert_close(ww.grad.double(), want_w.grad, rtol=0, atol=GRAD_RTOL * (1 + want_w.grad.abs().max().item()))


def test_strided_and_empty_inputs():
    h, w, b, m, grad = _problem((4, 10), 24, 16, True, "random", seed=10)
    wide = torch.zeros(4, 10, 48)
    wide[..., ::2] = h  # last dim at stride 2: the op copies it for the kernel
    _assert_matches_truth(wide[..., ::2], w, b, m, grad, what="strided")
    transposed = h.transpose(0, 1).contiguous().transpose(0, 1)
    _assert_matches_truth(transposed, w, b, m, grad, what="transposed")
    one = wide[:1, :1, ::2]  # a single token whose hidden dim is strided
    _assert_matches_truth(one, w, b, m[:1, :1], grad[:1, :1], what="one strided token")
    empty = torch.randn(0, 7, 24, requires_grad=True)
    ww = w.clone().requires_grad_()
    out = project_tokens(empty, ww, None, torch.zeros(0, 7, dtype=torch.bool), backend="cpp")
    assert out.shape == (0, 7, 16)
    out.sum().backward()
    assert ww.grad is not None and (ww.grad == 0).all()


def test_dispatch_and_explain():
    h, w, b, m, _ = _problem((2, 600), 16, 8, True, "random")
    info = dispatch.explain("project_tokens", (h, w, b, m))
    if cpu_isa.selected() != "scalar":
        assert info.chosen == "cpp" and "projection" in info.kernel and cpu_isa.selected() in info.kernel
        few = dispatch.explain("project_tokens", (h[:, :10], w, b, m[:, :10]))  # the call's overhead dominates
        assert few.chosen == "reference" and "fewer tokens" in "; ".join(few["cpp"])
        trained = h.clone().requires_grad_()  # 1,200 tokens: enough for inference, not with gradients
        assert dispatch.explain("project_tokens", (trained, w, b, m)).chosen == "reference"
    assert dispatch.explain("project_tokens", (h.double(), w.double())).chosen == "reference"
    reasons = dispatch.reasons_for("project_tokens", "cpp", (h, w), **dispatch_context(h.double(), w.double()))
    assert any("float32" in r for r in reasons)
    with pytest.raises(BackendUnavailableError, match="float32"):
        project_tokens(h.double(), w.double(), backend="cpp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = dispatch_context(h, w)
        assert ctx["autocast"] and dispatch.choose("project_tokens", (h, w), **ctx).backend == "reference"
        assert project_tokens(h, w).dtype == torch.bfloat16  # what F.linear gives under autocast
    with cpu_isa.use("scalar"):
        assert dispatch.explain("project_tokens", (h, w)).chosen == "reference"  # slower than eager there


@pytest.mark.parametrize("bad,match", [
    (dict(w=torch.randn(8, 15)), "weight must have shape"),
    (dict(b=torch.randn(7)), "bias must have shape"),
    (dict(m=torch.ones(2, 5, dtype=torch.int64)), "mask must be a bool"),
    (dict(m=torch.ones(3, 5, dtype=torch.bool)), "mask must broadcast"),
    (dict(h=torch.randn(2, 5, 16, dtype=torch.float64).to(torch.int32)), "h must be float"),
    (dict(eps=-1.0), "eps must be finite"),
])
def test_bad_input_names_the_argument(bad, match):
    h, w, b, m, _ = _problem((2, 5), 16, 8, True, "random")
    args = dict(h=h, w=w, b=b, m=m, eps=1e-12)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        project_tokens(args["h"], args["w"], args["b"], args["m"], eps=args["eps"])


def test_the_maxsim_head_scores_and_trains_like_eager():
    from fastrank.train.student import make_head

    g = torch.Generator().manual_seed(11)
    q, d = torch.randn(3, 12, 40, generator=g), torch.randn(3, 4, 30, 40, generator=g)
    qm = torch.arange(12) < torch.randint(4, 13, (3, 1), generator=g)
    dm = torch.arange(30) < torch.randint(10, 31, (3, 4, 1), generator=g)
    results = []
    for backend in (None, "reference"):
        torch.manual_seed(0)
        head = make_head("maxsim", 40, proj_dim=16, lq=12, ld=30)
        qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
        s = head.score(qq, qm, dd, dm, backend=backend)
        (s * torch.arange(12.0).reshape(3, 4)).sum().backward()
        results.append((s.detach(), qq.grad, dd.grad, head.projection.weight.grad))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
