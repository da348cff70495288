"""fastrank.maxsim_packed (documents back to back, no padding) against maxsim_packed_ref, in float64, on
every CPU instruction-set path this machine can run; int8 tokens against their dequantized reference and
within the quantization bound of the float scores; the documents subset (`docs`); and clear errors for bad
offsets and arguments. The Triton kernels' tests are in test_maxsim_packed_triton.py."""
import pytest
import torch

from fastrank import cpu_isa, dispatch
from fastrank.ops.maxsim_packed import (
    dequantize_tokens,
    maxsim_packed,
    maxsim_packed_ref,
    quantize_tokens,
)

from test_maxsim import FWD_TOL, GRAD_TOL

SUPPORT = cpu_isa.support()
PATH_PARAMS = [
    pytest.param(name, marks=pytest.mark.skipif(bool(SUPPORT[name]), reason=f"{name}: {SUPPORT[name]}"))
    for name in cpu_isa.PATHS
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Empty documents (first, middle, last), one-token documents, documents longer than every kernel tile
# (AMX blocks are 32 rows, FMA blocks 6-8) and odd lengths.
LENGTHS = [0, 1, 5, 70, 3, 0, 200, 17, 1, 33, 0]


@pytest.fixture
def isa(request):
    with cpu_isa.use(request.param) as name:
        yield name


def _offsets(lengths) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])


def _case(lq, h, *, seed, dtype=torch.float32, per_doc=False, mask=True, lengths=LENGTHS):
    """Fresh random inputs (never zeros), redrawn until no query token has two doc tokens within float32
    rounding of its max (there the float64 reference may route the gradient to either: both are right)."""
    offsets = _offsets(lengths)
    n, t = len(lengths), int(offsets[-1])
    for attempt in range(50):
        g = torch.Generator().manual_seed(seed + 7919 * attempt)
        q = torch.randn((n, lq, h) if per_doc else (lq, h), generator=g).to(dtype)
        tokens = torch.randn(t, h, generator=g).to(dtype)
        q_mask = None
        if mask:
            q_mask = torch.rand(q.shape[:-1], generator=g) < 0.8
            q_mask[..., 0] = True
        if _untied(q, tokens, offsets):
            return q, tokens, offsets, q_mask
    raise AssertionError("no untied draw in 50 attempts")


def _untied(q, tokens, offsets) -> bool:
    for i in range(offsets.numel() - 1):
        rows = tokens[offsets[i]:offsets[i + 1]].double()
        if rows.shape[0] < 2:
            continue
        qi = q[i] if q.dim() == 3 else q
        top = (qi.double() @ rows.T).topk(2, dim=-1).values
        if ((top[:, 0] - top[:, 1]) / top[:, 0].abs().clamp_min(1.0) < 1e-5).any():
            return False
    return True


def _check(q, tokens, offsets, q_mask, backend="cpp", docs=None):
    """Forward and both gradients (non-unit upstream gradient) against the float64 reference."""
    dtype = q.dtype
    q = q.detach().requires_grad_()
    tokens = tokens.detach().requires_grad_()
    out = maxsim_packed(q, tokens, offsets, q_mask=q_mask, docs=docs, backend=backend)
    q64 = q.detach().double().requires_grad_()
    t64 = tokens.detach().double().requires_grad_()
    ref = maxsim_packed_ref(q64, t64, offsets, q_mask=q_mask, docs=docs)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rtol, atol = FWD_TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    dq, dt = torch.autograd.grad(out, (q, tokens), grad)
    rq, rt = torch.autograd.grad(ref, (q64, t64), grad.double())
    assert dq.dtype == dtype and dt.dtype == dtype
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(dq.double(), rq, rtol=rtol, atol=atol)
    torch.testing.assert_close(dt.double(), rt, rtol=rtol, atol=atol)
    return out


# ---------------------------------------------------------------------------------------------------------
# Every ISA path against the reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("per_doc", [False, True], ids=["shared_q", "per_doc_q"])
@pytest.mark.parametrize("lq", [1, 17, 64])
@pytest.mark.parametrize("h", [59, 128])
def test_path_matches_reference(isa, dtype, per_doc, lq, h):
    _check(*_case(lq, h, seed=lq * 100 + h, dtype=dtype, per_doc=per_doc))


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
def test_path_wide_embeddings_without_mask(isa):
    # H = 384 (MiniLM) and a query that is not a multiple of any vector width
    for dtype in DTYPES:
        _check(*_case(31, 384, seed=11, dtype=dtype, mask=False))


def _query_rounding_bound(q, qi, scales, offsets, q_mask):
    """How far the VNNI kernel (query quantized per token too) may be from the dequantized reference: per
    query token scale_q / 2 times the largest L1 norm of the document's dequantized rows, summed."""
    q = q.double()
    sq = q.abs().amax(-1) / 127
    l1 = dequantize_tokens(qi, scales).double().abs().sum(-1)
    n = offsets.numel() - 1
    worst = torch.tensor([float(l1[offsets[i]:offsets[i + 1]].max()) if offsets[i + 1] > offsets[i] else 0.0
                          for i in range(n)], dtype=torch.float64)
    return (sq / 2 * q_mask).sum(-1) * worst


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
@pytest.mark.parametrize("h", [128, 99])  # 99: a partial quad of k on the VNNI path
def test_path_int8_fast_is_within_the_query_rounding_bound(isa, h):
    q, tokens, offsets, q_mask = _case(32, h, seed=15)
    qi, scales = quantize_tokens(tokens)
    out = maxsim_packed(q, qi, offsets, q_mask=q_mask, scales=scales)
    ref = maxsim_packed_ref(q.double(), qi, offsets, q_mask=q_mask, scales=scales)
    bound = _query_rounding_bound(q, qi, scales, offsets, q_mask) + 1e-4
    assert ((out.double() - ref).abs() <= bound).all()
    kernel = dispatch.explain("maxsim_packed", (q, qi, offsets, q_mask, scales)).kernel
    assert ("vpdpbusd" in kernel) == (isa in ("avx512bf16", "amx"))
    if isa in ("avx512bf16", "amx"):
        assert (out.double() - ref).abs().max() > 1e-6  # the query really was quantized
    exact = maxsim_packed(q, qi, offsets, q_mask=q_mask, scales=scales, exact_int8=True)
    torch.testing.assert_close(exact.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_path_int8_matches_dequantized_reference_and_float_within_the_bound(isa, dtype):
    q, tokens, offsets, q_mask = _case(32, 128, seed=5, dtype=dtype)
    qi, scales = quantize_tokens(tokens)
    out = maxsim_packed(q, qi, offsets, q_mask=q_mask, scales=scales, exact_int8=True)
    ref = maxsim_packed_ref(q.double(), qi, offsets, q_mask=q_mask, scales=scales)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    # Each element is off by at most scale/2, so a similarity by at most ||q_l||_1 * scale_j / 2, and the
    # score by the sum of that over valid query tokens (with the largest scale of each document).
    exact = maxsim_packed_ref(q.double(), tokens.double(), offsets, q_mask=q_mask)
    l1 = q.double().abs().sum(-1) * q_mask
    n = offsets.numel() - 1
    worst = torch.tensor([float(scales[offsets[i]:offsets[i + 1]].max()) if offsets[i + 1] > offsets[i] else 0.0
                          for i in range(n)], dtype=torch.float64)
    bound = l1.sum() * worst / 2 + 1e-4
    assert ((out.double() - exact).abs() <= bound).all()
    assert (out.double() - exact).abs().max() > 0  # int8 really was scored, not the float rows


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
def test_path_scores_a_subset_in_place(isa):
    q, tokens, offsets, q_mask = _case(17, 96, seed=9)
    docs = torch.tensor([6, 3, 3, 0, 10, 7, 1], dtype=torch.int64)  # repeats and empty documents
    with torch.no_grad():
        out = maxsim_packed(q, tokens, offsets, q_mask=q_mask, docs=docs)
    full = maxsim_packed(q, tokens, offsets, q_mask=q_mask)
    torch.testing.assert_close(out, full[docs], rtol=0, atol=0)
    _check(q, tokens, offsets, q_mask, docs=docs)
    qi, scales = quantize_tokens(tokens)
    for exact in (False, True):
        torch.testing.assert_close(maxsim_packed(q, qi, offsets, q_mask=q_mask, scales=scales, docs=docs, exact_int8=exact),
                                   maxsim_packed(q, qi, offsets, q_mask=q_mask, scales=scales, exact_int8=exact)[docs],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
def test_path_nan_propagates_to_its_document_only(isa):
    q, tokens, offsets, _ = _case(8, 64, seed=1)
    tokens = tokens.clone()
    tokens[int(offsets[3]) + 4, 7] = float("nan")  # in document 3 only
    out = maxsim_packed(q, tokens, offsets)
    assert torch.isnan(out[3]) and torch.isfinite(torch.cat([out[:3], out[4:]])).all()


def test_results_do_not_depend_on_thread_count():
    q, tokens, offsets, q_mask = _case(32, 128, seed=2, per_doc=True)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(_check(q, tokens, offsets, q_mask))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_empty_documents_score_zero_with_zero_grad():
    q = torch.randn(4, 16, requires_grad=True)
    tokens = torch.randn(0, 16, requires_grad=True)
    out = maxsim_packed(q, tokens, torch.zeros(4, dtype=torch.int64))
    assert out.shape == (3,) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()
    q2, tokens2, offsets2, _ = _case(4, 16, seed=4, lengths=[0, 3, 0])
    t = tokens2.clone().requires_grad_()
    qq = q2.clone().requires_grad_()
    s = maxsim_packed(qq, t, offsets2)
    assert s[0] == 0 and s[2] == 0 and s[1] != 0
    s.sum().backward()
    assert qq.grad.abs().sum() > 0


def test_no_documents():
    out = maxsim_packed(torch.randn(4, 16), torch.randn(0, 16), torch.zeros(1, dtype=torch.int64))
    assert out.shape == (0,) and out.dtype == torch.float32


def test_default_backend_on_cpu_is_cpp_and_explain_names_the_kernel():
    q, tokens, offsets, _ = _case(8, 64, seed=6)
    ex = dispatch.explain("maxsim_packed", (q, tokens, offsets))
    assert ex.chosen == "cpp" or cpu_isa.selected() == "scalar"
    qi, scales = quantize_tokens(tokens)
    ex = dispatch.explain("maxsim_packed", (q, qi, offsets, None, scales))
    assert "int8" in ex.kernel or ex.chosen != "cpp"


def test_float64_runs_on_the_reference_and_gradchecks():
    q, tokens, offsets, q_mask = _case(3, 5, seed=8, lengths=[2, 0, 4])
    q, tokens = q.double().requires_grad_(), tokens.double().requires_grad_()
    assert maxsim_packed(q, tokens, offsets, q_mask=q_mask).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: maxsim_packed(a, b, offsets, q_mask=q_mask), (q, tokens))


def test_opcheck_custom_ops():
    from fastrank.ops import maxsim_packed as mod

    q, tokens, offsets, q_mask = _case(8, 32, seed=10, lengths=[3, 0, 9])
    torch.library.opcheck(mod._forward_op, (q.unsqueeze(0), tokens, offsets, q_mask.unsqueeze(0), None, "cpp", True, False,
                                            False))


# ---------------------------------------------------------------------------------------------------------
# quantize_tokens
# ---------------------------------------------------------------------------------------------------------
def test_quantize_tokens_error_is_at_most_half_a_step():
    tokens = torch.randn(300, 128) * torch.rand(300, 1) * 5
    tokens[7] = 0.0
    qi, scales = quantize_tokens(tokens)
    assert qi.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (300,)
    assert scales[7] == 0 and (qi[7] == 0).all()
    err = (dequantize_tokens(qi, scales) - tokens).abs()
    assert (err <= scales[:, None] / 2 + 1e-6).all()
    assert qi.abs().max() == 127
    # (H + 4) bytes a token against 2H for float16: >= 1.9x smaller from H = 76 up (MiniLM: 384)
    assert qi.numel() * 1 + scales.numel() * 4 < tokens.half().numel() * 2 / 1.9


def test_quantize_tokens_refuses_non_finite_and_bad_shapes():
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_tokens(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\(T, H\)"):
        quantize_tokens(torch.randn(3))
    with pytest.raises(ValueError, match="floating-point"):
        quantize_tokens(torch.ones(3, 4, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, never a crash or an out-of-bounds read
# ---------------------------------------------------------------------------------------------------------
def _bad_inputs():
    q, tokens = torch.randn(4, 8), torch.randn(10, 8)
    off = torch.tensor([0, 3, 10])
    qi, scales = quantize_tokens(tokens)
    return [
        (dict(offsets=torch.tensor([0, 5, 3, 10])), ValueError,
         r"offsets must be non-decreasing, got offsets\[1\] = 5 > offsets\[2\] = 3"),
        (dict(offsets=torch.tensor([0, 3, 11])), ValueError, r"offsets\[-1\] must equal the number of token rows \(10\), got 11"),
        (dict(offsets=torch.tensor([0, 3, 9])), ValueError, r"offsets\[-1\] must equal the number of token rows \(10\), got 9"),
        (dict(offsets=torch.tensor([1, 3, 10])), ValueError, r"offsets\[0\] must be 0, got 1"),
        (dict(offsets=torch.tensor([-2, 3, 10])), ValueError, r"offsets\[0\] must be 0"),
        (dict(offsets=torch.tensor([0, 3, 10], dtype=torch.int32)), TypeError, r"offsets must be int64, got torch.int32"),
        (dict(offsets=torch.tensor([0.0, 3.0, 10.0])), TypeError, r"offsets must be int64"),
        (dict(offsets=torch.tensor([[0, 3, 10]])), ValueError, r"offsets must have shape \(N \+ 1,\)"),
        (dict(offsets=torch.zeros(0, dtype=torch.int64)), ValueError, r"offsets must have shape \(N \+ 1,\)"),
        (dict(offsets=[0, 3, 10]), TypeError, r"offsets must be an int64 torch.Tensor"),
        (dict(q=torch.randn(3, 4, 8)), ValueError, r"one query per scored document: 2 documents \(offsets\), q has 3"),
        (dict(q=torch.randn(8)), ValueError, r"q must have shape \(Lq, H\) or \(N, Lq, H\)"),
        (dict(tokens=torch.randn(10, 7)), ValueError, r"share the embedding dim H"),
        (dict(tokens=torch.randn(10, 8).half()), TypeError, r"same dtype, got q torch.float32 and tokens torch.float16"),
        (dict(tokens=qi), ValueError, r"int8 tokens need their per-token scales"),
        (dict(tokens=qi, scales=scales[:5]), ValueError, r"scales must be float32 of shape \(10,\)"),
        (dict(tokens=qi, scales=scales.double()), ValueError, r"scales must be float32"),
        (dict(scales=scales), TypeError, r"scales go with int8 tokens"),
        (dict(q_mask=torch.ones(5, dtype=torch.bool)), ValueError, r"q_mask must have shape \(4,\)"),
        (dict(q_mask=torch.ones(4)), TypeError, r"q_mask must be a bool tensor"),
        (dict(docs=torch.tensor([0, 2])), ValueError, r"docs must index the 2 documents of offsets \(0 \.\. 1\), got 2"),
        (dict(docs=torch.tensor([-1])), ValueError, r"docs must index"),
        (dict(docs=torch.tensor([0.0])), TypeError, r"docs must be a 1-D int64 tensor"),
        (dict(offsets=off.to("meta")), ValueError, r"one device, got .*offsets on meta"),
    ], (q, tokens, off)


@pytest.mark.parametrize("case", range(len(_bad_inputs()[0])))
def test_bad_input_is_a_clear_error(case):
    cases, (q, tokens, off) = _bad_inputs()
    kwargs, exc, match = cases[case]
    args = dict(q=q, tokens=tokens, offsets=off)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        maxsim_packed(args.pop("q"), args.pop("tokens"), args.pop("offsets"), backend="cpp", **args)


def test_int8_is_forward_only():
    tokens = torch.randn(10, 8)
    qi, scales = quantize_tokens(tokens)
    with pytest.raises(ValueError, match="forward only"):
        maxsim_packed(torch.randn(4, 8, requires_grad=True), qi, torch.tensor([0, 3, 10]), scales=scales)


def test_offsets_changed_in_place_are_checked_again():
    tokens = torch.randn(10, 8)
    offsets = torch.tensor([0, 3, 10])
    maxsim_packed(torch.randn(4, 8), tokens, offsets)  # valid: remembered
    offsets[1] = 12  # now out of range and decreasing
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        maxsim_packed(torch.randn(4, 8), tokens, offsets)
    offsets[1] = 3
    with pytest.raises(ValueError, match=r"offsets\[-1\] must equal the number of token rows \(9\)"):
        maxsim_packed(torch.randn(4, 8), tokens[:9], offsets)  # the same offsets against fewer rows


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
def test_path_int8_nan_in_the_query_propagates(isa):
    q, tokens, offsets, _ = _case(8, 64, seed=12)
    qi, scales = quantize_tokens(tokens)
    q = q.clone()
    q[2, 5] = float("nan")
    for exact in (False, True):
        out = maxsim_packed(q, qi, offsets, scales=scales, exact_int8=exact)
        nonempty = offsets[1:] > offsets[:-1]
        assert torch.isnan(out[nonempty]).all() and (out[~nonempty] == 0).all()
        masked = torch.ones(8, dtype=torch.bool)
        masked[2] = False
        assert torch.isfinite(maxsim_packed(q, qi, offsets, scales=scales, q_mask=masked, exact_int8=exact)).all()


def test_only_the_gradients_asked_for_are_computed(monkeypatch):
    from fastrank.ops import maxsim_packed as mod

    calls = []
    real = mod._CPP["cpu"]
    monkeypatch.setitem(mod._CPP, "cpu", dispatch.Kernels(real.forward, lambda *a: calls.append(a[5:7]) or real.backward(*a)))
    q, tokens, offsets, _ = _case(8, 32, seed=13, lengths=[4, 0, 7])
    for q_grad, t_grad in ((True, False), (False, True), (True, True)):
        qq, tt = q.clone().requires_grad_(q_grad), tokens.clone().requires_grad_(t_grad)
        # Forced: on the scalar path automatic dispatch takes the eager reference, which has no C++ backward.
        maxsim_packed(qq, tt, offsets, backend="cpp").sum().backward()
        assert (qq.grad is not None) == q_grad and (tt.grad is not None) == t_grad
        assert calls[-1] == (q_grad, t_grad)


def test_inference_mode_tensors():
    with torch.inference_mode():
        q, tokens, offsets, q_mask = _case(8, 32, seed=14, lengths=[4, 0, 7])
        out = maxsim_packed(q, tokens, offsets, q_mask=q_mask)
        again = maxsim_packed(q, tokens, offsets, q_mask=q_mask)
    torch.testing.assert_close(out, maxsim_packed_ref(q, tokens, offsets, q_mask=q_mask), rtol=1e-5, atol=1e-4)
    assert torch.equal(out, again)
