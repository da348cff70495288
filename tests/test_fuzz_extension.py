"""Fuzzing every entry point of the compiled extension (issue 22): tensors with random strides, gaps,
transposed storage and expanded rows, and hostile index values (negative, huge, decreasing). Each case must
either match the reference computed on clean contiguous copies, or raise a ValueError that names the
argument at fault. Run under scripts/sanitize.sh, this is also the AddressSanitizer's workload."""
import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrank
from fastrank import LiteScorer, _ext, cpu_isa, lite_ref, losses, maxsim_packed, maxsim_packed_ref, maxsim_ref, quantize_tokens
from fastrank.ops import lite_cpu
from fastrank.ops import losses as loss_ops
from fastrank.ops.lite import scorer_params

pytestmark = pytest.mark.skipif(_ext.load() is None, reason="needs the compiled extension")
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

LAYOUTS = ("contiguous", "row_gaps", "column_stride", "transposed", "expanded")


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in another memory layout (a view over a larger or reordered buffer)."""
    if t.dim() == 0 or layout == "contiguous":
        return t.clone()
    if layout == "row_gaps":  # every row followed by unused elements
        big = torch.full((*t.shape[:-1], t.shape[-1] + 3), 99, dtype=t.dtype)
        big[..., : t.shape[-1]] = t
        return big[..., : t.shape[-1]]
    if layout == "column_stride":  # the last dim at stride 2: only a copy can give the kernels stride 1
        big = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "transposed":  # same values, storage in reversed dim order
        return t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))
    if layout == "expanded":  # rows repeated through stride 0: only for tensors whose rows are all equal
        return t[:1].expand(t.shape) if t.shape[0] else t.clone()
    raise AssertionError(layout)


def maybe_expanded(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values the reference should see for ``layout``: an expanded tensor repeats its first row."""
    return t[:1].expand(t.shape).contiguous() if layout == "expanded" and t.shape[0] else t


@st.composite
def packed_problems(draw, int8: bool = False):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n = draw(st.integers(0, 5))
    lengths = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    h, lq = draw(st.integers(1, 20)), draw(st.integers(1, 8))
    offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)
    tokens = torch.randn(int(offsets[-1]), h, generator=gen)
    q = torch.randn(lq, h, generator=gen)
    return dict(q=q, tokens=tokens, offsets=offsets, n=n,
                docs=draw(st.none() | st.lists(st.integers(0, max(n - 1, 0)), min_size=0, max_size=6)) if n else None,
                layouts={name: draw(st.sampled_from(LAYOUTS)) for name in ("q", "tokens", "offsets", "docs", "scales")},
                hostile=draw(st.sampled_from([None, "first", "decreasing", "last", "huge", "negative_doc",
                                              "doc_past_end", "huge_doc"])))


def hostile_indices(offsets: torch.Tensor, docs, hostile, n: int):
    """Applies one hostile change; returns (offsets, docs, the argument that is now invalid or None)."""
    offsets = offsets.clone()
    docs = None if docs is None else torch.tensor(docs, dtype=torch.int64)
    if hostile == "first":
        offsets[0] = 1
        return offsets, docs, "offsets"
    if hostile == "decreasing" and n >= 2:
        offsets[1] = int(offsets[2]) + 1
        return offsets, docs, "offsets"
    if hostile == "last":
        offsets[-1] += 1
        return offsets, docs, "offsets"
    if hostile == "huge" and n >= 2:
        offsets[1] = 10**12
        return offsets, docs, "offsets"
    if docs is not None and docs.numel():
        bad = {"negative_doc": -1, "doc_past_end": n, "huge_doc": 10**12}.get(hostile)
        if bad is not None:
            docs[0] = bad
            return offsets, docs, "docs"
    return offsets, docs, None


@FUZZ
@given(packed_problems(), st.booleans())
def test_packed_public_api_matches_the_reference_or_names_the_bad_argument(case, int8):
    offsets, docs, bad = hostile_indices(case["offsets"], case["docs"], case["hostile"], case["n"])
    lay = case["layouts"]
    tokens = maybe_expanded(case["tokens"], lay["tokens"])
    scales = None
    if int8:
        tokens, scales = quantize_tokens(tokens)
    q_values = maybe_expanded(case["q"], lay["q"])
    args = dict(q=laid_out(q_values, lay["q"]), tokens=laid_out(tokens, lay["tokens"]),
                offsets=laid_out(offsets, "contiguous" if lay["offsets"] == "expanded" else lay["offsets"]),
                docs=None if docs is None else laid_out(docs, "contiguous" if lay["docs"] == "expanded" else lay["docs"]),
                scales=None if scales is None else laid_out(scales, "contiguous" if lay["scales"] == "expanded" else lay["scales"]))
    with torch.no_grad():
        if bad is not None:
            with pytest.raises(ValueError, match=bad):
                maxsim_packed(args["q"], args["tokens"], args["offsets"], docs=args["docs"], scales=args["scales"],
                              exact_int8=True)
            return
        got = maxsim_packed(args["q"], args["tokens"], args["offsets"], docs=args["docs"], scales=args["scales"],
                            exact_int8=True)
        want = maxsim_packed_ref(q_values, tokens, offsets, docs=docs, scales=scales)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _needs_copy(t: torch.Tensor, whole: bool) -> bool:
    """Whether the extension must refuse ``t`` as laid out: a strided last dim, or (``whole``) any gap."""
    if t.numel() == 0:
        return False
    return not t.is_contiguous() if whole else (t.shape[-1] > 1 and t.stride(-1) != 1)


@FUZZ
@given(packed_problems())
def test_packed_extension_reads_any_layout_it_accepts_and_refuses_the_rest(case):
    """Direct calls to ``_C.maxsim_packed_forward`` with the raw views: the C++ boundary alone decides."""
    ext, isa = _ext.require(), cpu_isa.selected()
    lay = case["layouts"]
    tokens_values = maybe_expanded(case["tokens"], lay["tokens"])
    docs = None if case["docs"] is None else torch.tensor(case["docs"], dtype=torch.int64)
    q = laid_out(case["q"][None], lay["q"])
    tokens = laid_out(tokens_values, lay["tokens"])
    offsets = laid_out(case["offsets"], "contiguous" if lay["offsets"] == "expanded" else lay["offsets"])
    docs_in = None if docs is None else laid_out(docs, "contiguous" if lay["docs"] == "expanded" else lay["docs"])
    scored = case["n"] if docs is None else docs.numel()
    out = torch.full((scored,), math.nan)
    refusals = [("q", _needs_copy(q, False)), ("tokens", _needs_copy(tokens, False)),
                ("offsets", _needs_copy(offsets, True)), ("docs", docs_in is not None and _needs_copy(docs_in, True))]
    expected = [name for name, refused in refusals if refused]
    if expected:
        with pytest.raises(ValueError, match="|".join(expected)):
            ext.maxsim_packed_forward(isa, q, tokens, offsets, docs_in, None, None, out, None, 1)
        return
    ext.maxsim_packed_forward(isa, q, tokens, offsets, docs_in, None, None, out, None, 1)
    torch.testing.assert_close(out, maxsim_packed_ref(case["q"], tokens_values, case["offsets"], docs=docs),
                               rtol=1e-4, atol=1e-4)


@st.composite
def padded_problems(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    f, y, x = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    lq, ld, h = draw(st.integers(1, 9)), draw(st.integers(1, 12)), draw(st.integers(1, 20))
    return dict(q=torch.randn(f, y, lq, h, generator=gen), d=torch.randn(f, x, ld, h, generator=gen),
                q_mask=torch.rand(f, y, x, lq, generator=gen) > 0.3 if draw(st.booleans()) else None,
                d_mask=torch.rand(f, y, x, ld, generator=gen) > 0.3 if draw(st.booleans()) else None,
                layouts={k: draw(st.sampled_from(LAYOUTS[:4])) for k in ("q", "d", "q_mask", "d_mask")},
                broadcast_q=draw(st.booleans()))


@FUZZ
@given(padded_problems())
def test_padded_extension_forward_and_backward_on_any_accepted_layout(case):
    ext, isa = _ext.require(), cpu_isa.selected()
    lay = case["layouts"]
    q_values = case["q"][:, :1].expand(case["q"].shape) if case["broadcast_q"] else case["q"]
    q = q_values if case["broadcast_q"] else laid_out(q_values, lay["q"])  # stride 0 over Y when broadcast
    d = laid_out(case["d"], lay["d"])
    qm = None if case["q_mask"] is None else laid_out(case["q_mask"], lay["q_mask"])
    dm = None if case["d_mask"] is None else laid_out(case["d_mask"], lay["d_mask"])
    F, Y, Lq, H = q.shape
    X = d.shape[1]
    out, arg = torch.empty(F, Y, X), torch.empty(F, Y, X, Lq, dtype=torch.int32)
    expected = [name for name, t in (("q", q), ("d", d)) if _needs_copy(t, False)]
    if expected:
        with pytest.raises(ValueError, match="|".join(expected)):
            ext.maxsim_forward(isa, q, d, qm, dm, out, arg, 1)
        return
    ext.maxsim_forward(isa, q, d, qm, dm, out, arg, 1)
    want = maxsim_ref(q_values[:, :, None], case["d"][:, None], case["q_mask"], case["d_mask"])
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    grad = torch.randn(F, Y, X)
    dq, dd = torch.empty(F, Y, Lq, H), torch.empty(F, X, case["d"].shape[2], H)
    ext.maxsim_backward(isa, q, d, grad, arg, dq, dd, 1)
    qr = q_values.detach().clone().requires_grad_()
    dr = case["d"].clone().requires_grad_()
    # The kernels' gradient is the argmax's: masks select the same winners, so compare on unmasked problems.
    if case["q_mask"] is None and case["d_mask"] is None:
        (maxsim_ref(qr[:, :, None], dr[:, None]) * grad).sum().backward()
        torch.testing.assert_close(dq, qr.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dd, dr.grad, rtol=1e-4, atol=1e-4)


@st.composite
def loss_problems(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    b, k = draw(st.integers(1, 6)), draw(st.integers(2, 9))
    mask = torch.rand(b, k, generator=gen) > 0.2
    positives = torch.zeros(b, k, dtype=torch.bool)
    positives[:, 0] = True
    return dict(s=torch.randn(b, k, generator=gen), t=torch.randn(b, k, generator=gen), mask=mask, positives=positives,
                name=draw(st.sampled_from(sorted(loss_ops.LOSS_KINDS))), reduction=draw(st.sampled_from(["none", "sum", "mean"])),
                layouts={key: draw(st.sampled_from(LAYOUTS[:4])) for key in ("s", "t", "mask", "positives")},
                hostile=draw(st.sampled_from([None, None, "nan_teacher", "inf_student"])))


@FUZZ
@given(loss_problems())
def test_loss_entry_points_on_any_layout_match_the_reference(case):
    s, t, mask, pos = case["s"], case["t"].clone(), case["mask"], case["positives"]
    mask[:, 0] = True
    if case["hostile"] == "nan_teacher":
        t[0, 0] = math.nan
    if case["hostile"] == "inf_student":
        s = s.clone()
        s[0, 1] = math.inf
    lay = case["layouts"]
    args = [laid_out(s, lay["s"]).requires_grad_(), laid_out(t, lay["t"]), laid_out(pos, lay["positives"]),
            laid_out(mask, lay["mask"])]
    fn, ref = getattr(losses, case["name"]), getattr(loss_ops, case["name"] + "_ref")
    if case["hostile"] == "nan_teacher":
        with pytest.raises(ValueError, match=r"t \(teacher scores\) contains NaN"):
            fn(*args, reduction=case["reduction"], backend="cpp")
        return
    got = fn(*args, reduction=case["reduction"], backend="cpp")
    sr = s.clone().requires_grad_()
    want = ref(sr, t, pos, mask, case["reduction"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)
    if torch.isfinite(want).all():
        seed = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
        (got * seed).sum().backward()
        (want * seed).sum().backward()
        torch.testing.assert_close(args[0].grad, sr.grad, rtol=1e-4, atol=1e-4)


@FUZZ
@given(st.integers(1, 6), st.integers(1, 9), st.sampled_from(LAYOUTS[:4]), st.sampled_from(["int64", "int32"]),
       st.sampled_from([None, "negative", "past_end", "huge"]))
def test_inbatch_ce_targets_are_bounds_checked(b, m, layout, target_dtype, hostile):
    gen = torch.Generator().manual_seed(b * 31 + m)
    scores = laid_out(torch.randn(b, m, generator=gen), layout)
    target = torch.randint(0, m, (b,), generator=gen, dtype=getattr(torch, target_dtype))
    if hostile == "negative":
        target[0] = -1  # ignores the row
    elif hostile in ("past_end", "huge"):
        target[0] = m if hostile == "past_end" else 2**31 - 1
        with pytest.raises(ValueError, match=r"target\[0\] = \d+ is out of range"):
            losses.inbatch_ce(scores, target, backend="cpp")
        return
    torch.testing.assert_close(losses.inbatch_ce(scores, target, backend="cpp"),
                               loss_ops.inbatch_ce_ref(scores.contiguous(), target), rtol=1e-4, atol=1e-4)


def test_every_entry_point_is_fuzzed():
    """A new extension function must join this file: the list of those fuzzed above is checked against the
    module's own."""
    fuzzed = {"maxsim_forward", "maxsim_backward", "maxsim_packed_forward", "maxsim_packed_backward",
              "distill_forward", "inbatch_ce_forward", "maxsim_residual_forward", "centroid_candidates_cpu", "lite_forward",
              "lite_backward", "projection_forward", "projection_backward"}
    # Not kernels: cpuid queries, the thread count, the element codes (tests/test_element_codes.py), the
    # host-side index-math self-test of the CUDA code, and the arithmetic-peak probe (numbers in, no tensors;
    # its argument checks are in tests/test_bench.py).
    informational = {"cpu_isa_support", "cpu_flags", "num_threads", "has_cuda", "has_openmp", "ELEMENT_CODES",
                     "cpu_peak_flop"}
    exported = {name for name in dir(_ext.require()) if not name.startswith("_")}
    cuda_twins = {name for name in exported if name.endswith("_cuda")}
    index_math = {name for name in exported if name.startswith("index_math") or name.startswith("im_")}
    assert exported - fuzzed - informational - cuda_twins - index_math == set(), sorted(exported)
    assert fastrank.maxsim_packed is maxsim_packed


@FUZZ
@given(packed_problems())
def test_packed_backward_through_any_layout_matches_the_reference(case):
    if case["n"] == 0 or case["tokens"].shape[0] == 0:
        return
    lay = case["layouts"]
    # Repeated rows would tie: the kernels give a tie's gradient to one row, autograd's amax splits it, so
    # expanded layouts are left to the forward tests.
    tokens_values, q_values = case["tokens"], case["q"]
    q = laid_out(q_values, "contiguous" if lay["q"] == "expanded" else lay["q"]).requires_grad_()
    tokens = laid_out(tokens_values, "contiguous" if lay["tokens"] == "expanded" else lay["tokens"]).requires_grad_()
    seed = torch.randn(case["n"], generator=torch.Generator().manual_seed(2))
    (maxsim_packed(q, tokens, case["offsets"]) * seed).sum().backward()
    qr, tr = q_values.clone().requires_grad_(), tokens_values.clone().requires_grad_()
    (maxsim_packed_ref(qr, tr, case["offsets"]) * seed).sum().backward()
    torch.testing.assert_close(q.grad, qr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tokens.grad, tr.grad, rtol=1e-4, atol=1e-4)


@st.composite
def residual_problems(draw):
    """A residual-compressed corpus (fastrank.ops.residual) with packed_problems' documents and hostile
    indices, plus a hostile code: negative, one past the centroids, or huge."""
    case = draw(packed_problems())
    nbits = draw(st.sampled_from([1, 2, 4]))
    h = draw(st.integers(1, 5)) * (8 // nbits)  # whole bytes per row
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    num_centroids, T = draw(st.integers(1, 5)), case["tokens"].shape[0]
    code_dtype = draw(st.sampled_from([torch.int32, torch.uint16, torch.int64]))
    case.update(
        nbits=nbits, q=torch.randn(case["q"].shape[0], h, generator=gen),
        packed=torch.randint(0, 256, (T, h * nbits // 8), generator=gen, dtype=torch.uint8),
        codes=torch.randint(0, num_centroids, (T,), generator=gen).to(code_dtype),
        centroids=torch.randn(num_centroids, h, generator=gen), weights=torch.randn(1 << nbits, generator=gen),
        bad_code=draw(st.sampled_from([None, None, -1, num_centroids, 2**15 + 7])),
        codes_layout=draw(st.sampled_from(["contiguous", "row_gaps_1d"])))
    return case


@FUZZ
@given(residual_problems())
def test_residual_extension_reads_any_layout_it_accepts_and_names_the_bad_argument(case):
    """Direct calls to ``_C.maxsim_residual_forward`` with raw views, hostile offsets, docs and codes: the C++
    boundary alone decides, and what it accepts matches the reference."""
    from fastrank.ops.maxsim_residual import maxsim_residual_ref

    ext, isa = _ext.require(), cpu_isa.selected()
    lay = case["layouts"]
    offsets_values, docs_values, bad = hostile_indices(case["offsets"], case["docs"], case["hostile"], case["n"])
    codes_values = case["codes"].clone()
    if case["bad_code"] is not None and codes_values.numel() and bad is None:
        value = case["bad_code"]
        if not (value < 0 and codes_values.dtype == torch.uint16):
            codes_values[-1] = value
            # only a scored row's code is read, and checked
            scored_rows = set(range(codes_values.numel())) if docs_values is None else {
                r for d in docs_values.tolist() for r in range(int(case["offsets"][d]), int(case["offsets"][d + 1]))}
            if codes_values.numel() - 1 in scored_rows:
                bad = "codes"
    q = laid_out(case["q"], lay["q"] if lay["q"] != "expanded" else "contiguous")
    packed = laid_out(case["packed"], lay["tokens"] if lay["tokens"] != "expanded" else "contiguous")
    codes = codes_values.clone()
    if case["codes_layout"] == "row_gaps_1d":  # a 1-D view at stride 2: read through its stride
        big = torch.zeros(2 * codes.numel(), dtype=codes.dtype)
        big[::2] = codes
        codes = big[::2]
    offsets = laid_out(offsets_values, "contiguous" if lay["offsets"] == "expanded" else lay["offsets"])
    docs = None if docs_values is None else laid_out(docs_values, "contiguous" if lay["docs"] == "expanded" else lay["docs"])
    scored = case["n"] if docs is None else docs.numel()
    out = torch.full((scored,), math.nan)
    refusals = [("q", _needs_copy(q, False)), ("packed", _needs_copy(packed, False)),
                ("offsets", _needs_copy(offsets, True)), ("docs", docs is not None and _needs_copy(docs, True))]
    expected = [name for name, refused in refusals if refused] + ([bad] if bad else [])
    args = (isa, q, packed, codes, offsets, docs, case["centroids"], case["weights"], case["nbits"], out, 1)
    if expected:
        with pytest.raises(ValueError, match="|".join(expected)):
            ext.maxsim_residual_forward(*args)
        return
    ext.maxsim_residual_forward(*args)
    want = maxsim_residual_ref(case["q"], case["packed"], codes_values, offsets_values, case["centroids"],
                               case["weights"], nbits=case["nbits"], docs=docs_values)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


@st.composite
def candidate_problems(draw):
    """Stage-1 inputs (fastrank.ops.centroid_candidates) in random layouts, with at most one hostile value the
    kernel reads: a probe past the lists, a NaN, negative or rising gain, a list entry past the documents,
    negative, or below its list's previous one, a bad query offset."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n, c, p, b = draw(st.integers(1, 300)), draw(st.integers(1, 12)), draw(st.integers(1, 4)), draw(st.integers(0, 4))
    lists = [torch.randint(0, n, (int(k),), generator=gen).sort().values
             for k in torch.randint(0, 20, (c,), generator=gen)]
    ivf_offsets = torch.zeros(c + 1, dtype=torch.int64)
    ivf_offsets[1:] = torch.tensor([len(x) for x in lists]).cumsum(0)
    q_offsets = torch.zeros(b + 1, dtype=torch.int64)
    q_offsets[1:] = torch.randint(1, 5, (b,), generator=gen).cumsum(0)
    tq = int(q_offsets[-1])
    return {"n": n, "ndocs": draw(st.integers(1, 40)), "ivf_offsets": ivf_offsets,
            "ivf_docs": torch.cat(lists).to(torch.int32), "q_offsets": q_offsets,
            "probe_c": torch.randint(0, c, (tq, p), generator=gen),
            "gain": torch.rand(tq, p, generator=gen).sort(1, descending=True).values,
            "hostile": draw(st.sampled_from([None, None, "probe", "gain_nan", "gain_negative", "gain_rising",
                                             "doc_past", "doc_negative", "doc_descending", "q_offsets"])),
            "layouts": {k: draw(st.sampled_from(["contiguous", "row_gaps", "column_stride", "transposed"]))
                        for k in ("probe_c", "gain", "q_offsets", "ivf_docs")}}


@FUZZ
@given(candidate_problems())
def test_candidate_extension_reads_any_layout_it_accepts_and_names_the_bad_argument(case):
    """Direct calls to ``_C.centroid_candidates_cpu``: the C++ boundary alone decides, and what it accepts
    equals the reference."""
    from fastrank.ops.centroid_candidates import centroid_candidates_ref

    ext = _ext.require()
    probe, gain, q_off, docs = (case[k].clone() for k in ("probe_c", "gain", "q_offsets", "ivf_docs"))
    tq, p = probe.shape
    bad, h = None, case["hostile"]
    first_list = int(probe[0, 0]) if tq else None
    start = int(case["ivf_offsets"][first_list]) if tq else 0
    length = int(case["ivf_offsets"][first_list + 1]) - start if tq else 0
    if h == "probe" and tq:
        probe[0, 0], bad = case["ivf_offsets"].numel() - 1, "probe_c"
    elif h in ("gain_nan", "gain_negative") and tq:
        gain[0, -1], bad = (math.nan if h == "gain_nan" else -0.5), "gain"
    elif h == "gain_rising" and tq and p > 1:
        gain[0, -1], bad = float(gain[0, 0]) + 1.0, "gain"
    elif h in ("doc_past", "doc_negative") and length:
        docs[start + length - 1], bad = (case["n"] if h == "doc_past" else -1), "ivf_docs"
    elif h == "doc_descending" and length > 1 and int(docs[start]) > 0:
        docs[start + 1], bad = int(docs[start]) - 1, "ivf_docs"
    elif h == "q_offsets" and q_off.numel() > 1:
        q_off[-1], bad = tq + 1, "offsets"
    lay = case["layouts"]
    args = [laid_out(probe, lay["probe_c"]), laid_out(gain, lay["gain"]), laid_out(q_off, lay["q_offsets"]),
            case["ivf_offsets"], laid_out(docs, lay["ivf_docs"])]
    b, ndocs = q_off.numel() - 1, case["ndocs"]
    outs = (torch.zeros(b, ndocs, dtype=torch.int64), torch.zeros(b, ndocs), torch.zeros(b, dtype=torch.int64))
    refusals = [("probe_c", _needs_copy(args[0], False)), ("gain", _needs_copy(args[1], False)),
                ("q_offsets", _needs_copy(args[2], True)), ("ivf_docs", _needs_copy(args[4], True))]
    expected = [name for name, refused in refusals if refused] + ([bad] if bad else [])
    if expected:
        with pytest.raises(ValueError, match="|".join(expected)):
            ext.centroid_candidates_cpu(*args, case["n"], ndocs, *outs, 1)
        return
    ext.centroid_candidates_cpu(*args, case["n"], ndocs, *outs, 1)
    want = centroid_candidates_ref(probe, gain, q_off, case["ivf_offsets"], docs, case["n"], ndocs)
    assert torch.equal(outs[0], want[0]) and torch.equal(outs[2], want[2])
    assert torch.equal(outs[1].nan_to_num(-1.0), want[1].nan_to_num(-1.0))


@st.composite
def lite_problems(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    f, y, x = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    lq, ld, h = draw(st.integers(1, 9)), draw(st.integers(1, 40)), draw(st.integers(1, 20))
    sizes = dict(lq=lq + draw(st.integers(0, 3)), ld=ld + draw(st.integers(0, 3)), row_hidden=draw(st.integers(1, 70)),
                 col_hidden=draw(st.integers(1, 40)))
    return dict(q=torch.randn(f, y, lq, h, generator=gen), d=torch.randn(f, x, ld, h, generator=gen),
                q_mask=torch.rand(f, y, x, lq, generator=gen) > 0.3 if draw(st.booleans()) else None,
                d_mask=torch.rand(f, y, x, ld, generator=gen) > 0.3 if draw(st.booleans()) else None,
                layouts={k: draw(st.sampled_from(LAYOUTS[:4])) for k in ("q", "d", "q_mask", "d_mask")},
                sizes=sizes, seed=draw(st.integers(0, 1000)),
                hostile=draw(st.sampled_from([None, None, "weight_shape", "weight_layout", "long_query"])))


@FUZZ
@given(lite_problems())
def test_lite_extension_reads_any_layout_it_accepts_and_names_the_bad_argument(case):
    ext, isa = _ext.require(), cpu_isa.selected()
    torch.manual_seed(case["seed"])
    scorer = LiteScorer(**case["sizes"]).requires_grad_(False)
    params, lq, ld, eps = scorer_params(scorer)
    weights, bo = lite_cpu.pack(params)
    lay = case["layouts"]
    q, d = laid_out(case["q"], lay["q"]), laid_out(case["d"], lay["d"])
    qm = None if case["q_mask"] is None else laid_out(case["q_mask"], lay["q_mask"])
    dm = None if case["d_mask"] is None else laid_out(case["d_mask"], lay["d_mask"])
    out = torch.empty(q.shape[0], q.shape[1], d.shape[1])
    r1, c = params[0].shape[0], params[8].shape[0]
    expected = [name for name, t in (("q", q), ("d", d)) if _needs_copy(t, False)]
    if case["hostile"] == "weight_shape":
        weights[4] = weights[4][:-1]
        expected = expected + ["c2"]
    elif case["hostile"] == "weight_layout":
        wide = torch.zeros(*weights[7].shape, 2)  # the same values at stride 2 along the last dim (8 wide)
        wide[..., 0] = weights[7]
        weights[7] = wide[..., 0]
        expected = expected + ["v1p"]
    elif case["hostile"] == "long_query":  # more query tokens than the scorer's lq
        q, qm = torch.randn(q.shape[0], q.shape[1], lq + 1, q.shape[3]), None
        expected = expected + ["lq"]
    if expected:
        with pytest.raises(ValueError, match="|".join(expected)):
            ext.lite_forward(isa, q, d, qm, dm, weights, None, lq, ld, r1, c, eps, bo, out, None, 1)
        return
    saved = lite_cpu.saved_buffers(out.numel(), params)
    ext.lite_forward(isa, q, d, qm, dm, weights, None, lq, ld, r1, c, eps, bo, out, saved, 1)
    scorer64 = copy.deepcopy(scorer).double().requires_grad_(True)
    q64, d64 = case["q"].double().requires_grad_(), case["d"].double().requires_grad_()
    want = lite_ref(q64[:, :, None], d64[:, None], case["q_mask"], case["d_mask"], scorer=scorer64)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    # The backward through the same layouts, against float64 autograd; a saved buffer of the wrong shape is
    # refused by name.
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"]))
    bad = [saved[0], saved[1], saved[2][:, :, :-1]] if case["seed"] % 5 == 0 else saved
    if bad is not saved:
        with pytest.raises(ValueError, match="a2"):
            lite_cpu.backward_from(grad, q, d, qm, dm, params, lq, ld, eps, bad)
        return
    got = lite_cpu.backward_from(grad, q, d, qm, dm, params, lq, ld, eps, saved)
    truth = torch.autograd.grad(want, [q64, d64, *scorer64.parameters()], grad.double())
    for a, b in zip(got, truth):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * (1 + b.abs().max().item()))


@st.composite
def projection_problems(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n, h, p = draw(st.integers(0, 40)), draw(st.integers(1, 50)), draw(st.integers(1, 70))
    return dict(h=torch.randn(n, h, generator=gen), w=torch.randn(p, h, generator=gen),
                bias=torch.randn(p, generator=gen) if draw(st.booleans()) else None,
                mask=torch.rand(n, generator=gen) > 0.3 if draw(st.booleans()) else None,
                layout=draw(st.sampled_from(LAYOUTS[:4])), seed=draw(st.integers(0, 1000)),
                hostile=draw(st.sampled_from([None, None, None, "wt_shape", "wt_layout", "mask_shape", "h_dtype",
                                              "norms_shape", "wr_shape"])))


@FUZZ
@given(projection_problems())
def test_projection_extension_reads_any_layout_it_accepts_and_names_the_bad_argument(case):
    """Direct calls to ``_C.projection_forward`` / ``projection_backward`` with raw views and packed weights:
    the C++ boundary alone decides what it reads, and the results are the float64 reference's."""
    from fastrank.ops import projection

    ext, isa = _ext.require(), cpu_isa.selected()
    h, w, bias, mask = laid_out(case["h"], case["layout"]), case["w"], case["bias"], case["mask"]
    n, p, hd = h.shape[0], w.shape[0], w.shape[1]
    pp, hp = -(-p // 32) * 32, -(-hd // 32) * 32
    wt = lite_cpu.b_panels(w, hd)
    bp = None if bias is None else torch.nn.functional.pad(bias, (0, pp - p))
    wr = torch.nn.functional.pad(w, (0, hp - hd, 0, pp - p))
    out, norms = torch.empty(n, p), torch.empty(n)
    expected = ["h"] if _needs_copy(h, False) else []
    if case["hostile"] == "wt_shape":
        wt, expected = wt[:, :-1], expected + ["wt"]
    elif case["hostile"] == "wt_layout":
        wide = torch.zeros(*wt.shape, 2)
        wide[..., 0] = wt
        wt, expected = wide[..., 0], expected + ["wt"]
    elif case["hostile"] == "mask_shape":
        mask, expected = torch.ones(n + 1, dtype=torch.bool), expected + ["mask"]
    elif case["hostile"] == "h_dtype":
        h, expected = h.double(), expected + ["h"]
    elif case["hostile"] == "norms_shape":
        norms, expected = torch.empty(n + 1), expected + ["norms"]
    if expected:
        with pytest.raises(ValueError, match="|".join(expected)):
            ext.projection_forward(isa, h, mask, wt, bp, p, 1e-12, out, norms, 1)
        return
    ext.projection_forward(isa, h, mask, wt, bp, p, 1e-12, out, norms, 2)
    h64, w64 = case["h"].double().requires_grad_(), w.double().requires_grad_()
    b64 = None if bias is None else bias.double().requires_grad_()
    want = projection.project_tokens_ref(h64, w64, b64, mask)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    grad = torch.randn(n, p, generator=torch.Generator().manual_seed(case["seed"]))
    dh, dw = torch.empty(n, hd), torch.empty(pp, hp)
    db = None if bias is None else torch.empty(pp)
    if case["hostile"] == "wr_shape":
        with pytest.raises(ValueError, match="wr"):
            ext.projection_backward(isa, h, mask, wt, bp, p, 1e-12, out, norms, grad, wr[:-1], dh, dw, db, 1)
        return
    ext.projection_backward(isa, h, mask, wt, bp, p, 1e-12, out, norms, grad, wr, dh, dw, db, 2)
    truth = torch.autograd.grad(want, [h64, w64] + ([b64] if bias is not None else []), grad.double())
    got = [dh, dw[:p, :hd]] + ([db[:p]] if bias is not None else [])
    for a, b in zip(got, truth):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * (1 + b.abs().amax().item() if b.numel() else 1))
