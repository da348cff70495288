"""The fused LITE kernels on the CPU (csrc/cpu/lite_kernels.inc; fastrank/ops/lite_cpu.py), forward and
backward, against the float64 reference, on every ISA path this CPU has (forced with cpu_isa.use, as
FASTRANK_CPU_ISA does): the three broadcast forms, masks, odd sizes, the paper's sizes, float32 / bfloat16 /
float16 inputs, Small-LITE's projection, hostile padding, determinism, the packing cache and dispatch."""
import copy

import pytest
import torch

from fastrank import LiteScorer, _ext, cpu_isa, dispatch, lite_ref, lite_score
from fastrank.ops import lite_cpu
from fastrank.ops.lite import dispatch_context, scorer_params
from test_lite import _case, _check, _randomize

pytestmark = pytest.mark.skipif(_ext.load() is None, reason="needs the compiled extension")
PATHS = cpu_isa.available()
SMALL = dict(lq=8, ld=16, row_hidden=40, col_hidden=24)
ODD = dict(lq=7, ld=37, row_hidden=45, col_hidden=33)  # nothing a multiple of the 8-row blocks or 32-wide panels
PAPER = dict(lq=30, ld=200, row_hidden=2400, col_hidden=360)
# Forward error against the float64 truth, relative to the largest |truth|: float32 accumulation through two
# wide layers and four LayerNorms (the LayerNorm after the wide row layer folded into the next Linear).
FWD_TOL = dict(float32=2e-5, widened=2e-5, bf16_dot=4e-2)


def _scorer(seed=0, proj=None, **sizes) -> LiteScorer:
    """tests/test_lite.py's random (non-init) weights, frozen unless a test asks for gradients."""
    sizes = sizes or SMALL
    scorer = LiteScorer(**sizes, proj_dim=proj[1], embed_dim=proj[0]) if proj else LiteScorer(**sizes)
    return _randomize(scorer, seed).requires_grad_(False)


def _truth(q, d, q_mask, d_mask, scorer):
    return lite_ref(q.double(), d.double(), q_mask, d_mask, scorer=copy.deepcopy(scorer).double())


def _assert_close(got, want, rtol, what=""):
    assert got.dtype == torch.float32 and got.shape == want.shape, what
    err, scale = (got.double() - want).abs().max().item(), want.abs().max().item()
    assert err <= rtol * scale + 1e-6, f"{what}: max error {err:.3g}, max |truth| {scale:.3g}"


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("form", ["rerank", "grouped", "allpairs"])
@pytest.mark.parametrize("sizes,lq,ld,h", [(SMALL, 8, 16, 32), (SMALL, 5, 11, 59), (ODD, 7, 37, 13), (ODD, 3, 20, 1)])
def test_float32_matches_the_reference_on_every_path(isa, form, sizes, lq, ld, h):
    scorer = _scorer(seed=lq + ld, **sizes)
    q, d, q_mask, d_mask = _case(form, lq, ld, h, seed=lq * 10 + h)
    with cpu_isa.use(isa):
        out = lite_score(q, d, q_mask, d_mask, scorer=scorer, backend="cpp")
    _assert_close(out, _truth(q, d, q_mask, d_mask, scorer), FWD_TOL["float32"], f"{isa} {form}")


@pytest.mark.parametrize("isa", PATHS)
def test_paper_sizes_match_the_reference(isa):
    scorer = _scorer(seed=5, **PAPER)
    q, d, q_mask, d_mask = _case("rerank", 30, 200, 128, seed=11)
    with cpu_isa.use(isa):
        out = lite_score(q, d, q_mask, d_mask, scorer=scorer, backend="cpp")
        unmasked = lite_score(q[:17], d[:, :133], scorer=scorer, backend="cpp")
    _assert_close(out, _truth(q, d, q_mask, d_mask, scorer), FWD_TOL["float32"], isa)
    _assert_close(unmasked, _truth(q[:17], d[:, :133], None, None, scorer), FWD_TOL["float32"], isa)


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes,lq,ld,h", [(ODD, 7, 37, 13), (PAPER, 30, 200, 128)])
def test_16bit_inputs_match_the_reference_on_the_rounded_values(isa, dtype, sizes, lq, ld, h):
    """16-bit inputs and weights are widened to float32 (float32 accuracy on the rounded values), except
    bfloat16 on a path with AVX512-BF16, whose MLPs round S, R and each hidden chunk to bfloat16 before their
    dot products (float32 accumulation): about 2^-9 relative per rounding, the GPU kernels' bound."""
    scorer = _scorer(seed=lq, **sizes).to(dtype)
    q, d, q_mask, d_mask = _case("grouped", lq, ld, h, seed=3)
    q, d = q.to(dtype), d.to(dtype)
    with cpu_isa.use(isa):
        out = lite_score(q, d, q_mask, d_mask, scorer=scorer, backend="cpp")
    kind = "bf16_dot" if lite_cpu.uses_bf16_dot(dtype, isa) else "widened"
    _assert_close(out, _truth(q, d, q_mask, d_mask, scorer), FWD_TOL[kind], f"{isa} {dtype} ({kind})")


LONG_QUERY = (dict(lq=40, ld=50, row_hidden=70, col_hidden=20), 37, 50, 40)  # a query past one 32-row tile


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("form", ["rerank", "grouped", "allpairs"])
@pytest.mark.parametrize("sizes,lq,ld,h", [(SMALL, 8, 16, 32), (ODD, 7, 37, 13), LONG_QUERY])
def test_bfloat16_inputs_in_every_form(isa, form, sizes, lq, ld, h):
    """bfloat16 scoring as a re-ranker serves it, on each path's own bfloat16 kernel (AMX tiles on amx,
    vdpbf16ps on avx512bf16, widened FMAs below): the broadcast forms, masks with an empty document, sizes
    off every tile and panel edge, H not a multiple of 32. (H = 1 is left to the test below: S is then one
    product per entry, and rounding it to bfloat16 before LayerNorms over three real query tokens costs both
    bfloat16 paths 7% of the largest score on that problem; the rounding, not the kernels.)"""
    scorer = _scorer(seed=lq + ld, **sizes).to(torch.bfloat16)
    q, d, q_mask, d_mask = _case(form, lq, ld, h, seed=lq * 10 + h)
    q, d = q.to(torch.bfloat16), d.to(torch.bfloat16)
    with cpu_isa.use(isa):
        out = lite_score(q, d, q_mask, d_mask, scorer=scorer, backend="cpp")
    kind = "bf16_dot" if lite_cpu.uses_bf16_dot(torch.bfloat16, isa) else "widened"
    _assert_close(out, _truth(q, d, q_mask, d_mask, scorer), FWD_TOL[kind], f"{isa} {form} ({kind})")


@pytest.mark.skipif(not {"amx", "avx512bf16"} <= set(PATHS), reason="needs a CPU with AMX-BF16")
@pytest.mark.parametrize("form", ["rerank", "grouped", "allpairs"])
@pytest.mark.parametrize("sizes,lq,ld,h", [(SMALL, 8, 16, 32), (ODD, 7, 37, 13), (ODD, 3, 20, 1), LONG_QUERY,
                                           (PAPER, 30, 200, 128)])
def test_amx_rounds_where_the_vdpbf16ps_kernel_does(form, sizes, lq, ld, h):
    """The AMX tiles and the vdpbf16ps kernel round the same values (S, the hidden layers, R) to bfloat16 and
    accumulate in float32, each in its own order: their scores differ only where an accumulation lands on
    the other side of a bfloat16 rounding boundary (1.4e-4 of the largest score at most, measured on the
    Xeon), far below the 4e-2 both keep from the truth. A wrong tile, edge or mask would show here."""
    scorer = _scorer(seed=lq + ld, **sizes).to(torch.bfloat16)
    q, d, q_mask, d_mask = _case(form, lq, ld, h, seed=lq * 10 + h)
    q, d = q.to(torch.bfloat16), d.to(torch.bfloat16)
    with cpu_isa.use("amx"):
        tiles = lite_score(q, d, q_mask, d_mask, scorer=scorer, backend="cpp")
    with cpu_isa.use("avx512bf16"):
        dots = lite_score(q, d, q_mask, d_mask, scorer=scorer, backend="cpp")
    _assert_close(tiles, dots.double(), 1e-3, form)
    assert not torch.equal(tiles, lite_score(q, d, q_mask, d_mask, scorer=scorer, backend="reference").float())


@pytest.mark.parametrize("isa", PATHS)
def test_small_lite_projection_runs_fused(isa):
    scorer = _scorer(seed=2, proj=(48, 16), **SMALL)
    q, d, q_mask, d_mask = _case("rerank", 8, 16, 48, seed=4)
    with cpu_isa.use(isa):
        out = lite_score(q, d, q_mask, d_mask, scorer=scorer, backend="cpp")
    _assert_close(out, _truth(q, d, q_mask, d_mask, scorer), 1e-4, isa)


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_masked_tokens_are_never_read(isa, dtype, poison):
    """Padding may hold anything: a masked token full of inf or NaN scores as the same token zeroed."""
    scorer = _scorer(seed=1).to(dtype)
    q, d, q_mask, d_mask = _case("rerank", 8, 16, 24, seed=8)
    q, d = q.to(dtype), d.to(dtype)
    q_bad, d_bad = q.clone(), d.clone()
    q_bad[~q_mask] = poison
    d_bad[~d_mask] = poison
    with cpu_isa.use(isa):
        out = lite_score(q_bad, d_bad, q_mask, d_mask, scorer=scorer, backend="cpp")
        clean = lite_score(q, d, q_mask, d_mask, scorer=scorer, backend="cpp")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean, rtol=0, atol=0)


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_a_real_token_reaches_only_its_score(isa, dtype):
    scorer = _scorer(seed=1).to(dtype)
    q, d, _, _ = _case("rerank", 8, 16, 24, seed=9, masks=False)
    q, d = q.to(dtype), d.to(dtype)
    d[1, 3, 5] = float("nan")
    with cpu_isa.use(isa):
        out = lite_score(q, d, scorer=scorer, backend="cpp")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_and_independent_of_the_thread_count(isa, dtype):
    """Each pair is scored by one thread in a fixed order of operations, and the row MLP's grouping of pairs
    (which follows the thread count) does not change any element's sum: bitwise the same scores."""
    scorer = _scorer(seed=6, **ODD).to(dtype)
    q, d, q_mask, d_mask = _case("allpairs", 7, 37, 13, seed=12)
    q, d = q.to(dtype), d.to(dtype)
    threads = torch.get_num_threads()
    try:
        with cpu_isa.use(isa):
            runs = []
            for n in (1, 2, 3, 1):
                torch.set_num_threads(n)
                runs.append(lite_score(q, d, q_mask, d_mask, scorer=scorer, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=0, atol=0)


def test_an_updated_scorer_is_repacked():
    """The packing is cached per scorer state: an in-place update (an optimiser step) must not score with
    stale weights, and neither must a new scorer."""
    scorer = _scorer(seed=3)
    q, d, _, _ = _case("rerank", 8, 16, 24, seed=1, masks=False)
    before = lite_score(q, d, scorer=scorer, backend="cpp")
    with torch.no_grad():
        scorer.row_mlp[0].weight.mul_(1.5)
    after = lite_score(q, d, scorer=scorer, backend="cpp")
    assert not torch.equal(before, after)
    _assert_close(after, _truth(q, d, None, None, scorer), FWD_TOL["float32"])
    for seed in (4, 5, 6):  # fresh scorers, possibly where a freed one lived
        fresh = _scorer(seed=seed)
        _assert_close(lite_score(q, d, scorer=fresh, backend="cpp"), _truth(q, d, None, None, fresh), FWD_TOL["float32"])


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("form", ["rerank", "grouped", "allpairs"])
@pytest.mark.parametrize("sizes,lq,ld,h", [(SMALL, 8, 16, 32), (ODD, 7, 37, 13), (ODD, 3, 20, 1)])
def test_gradients_match_the_reference_on_every_path(isa, form, sizes, lq, ld, h):
    """Forward and the gradients of q, d and every parameter against float64 lite_ref, held to the float32
    reference's own error on the same problem (tests/test_lite.py's rule)."""
    scorer = _scorer(seed=lq + ld, **sizes).requires_grad_(True)
    with cpu_isa.use(isa):
        _check(*_case(form, lq, ld, h, seed=lq * 10 + h), scorer, "cpp", perturbed_runs=2)


@pytest.mark.parametrize("isa", PATHS)
def test_paper_sizes_gradients_with_a_frozen_encoder(isa):
    """The default training recipe: token embeddings without gradients (dS is then never formed), the head's
    parameters with them; gradients as the float64 reference's, within float32's error of that problem."""
    scorer = _scorer(seed=9, **PAPER).requires_grad_(True)
    q, d, q_mask, d_mask = _case("grouped", 30, 200, 64, seed=5)
    with cpu_isa.use(isa):
        out = lite_score(q, d, q_mask, d_mask, scorer=scorer, backend="cpp")
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    got = torch.autograd.grad(out, list(scorer.parameters()), upstream)
    ref32 = lite_ref(q, d, q_mask, d_mask, scorer=scorer)
    eager = torch.autograd.grad(ref32, list(scorer.parameters()), upstream)
    scorer64 = copy.deepcopy(scorer).double()
    ref = lite_ref(q.double(), d.double(), q_mask, d_mask, scorer=scorer64)
    want = torch.autograd.grad(ref, list(scorer64.parameters()), upstream.double())
    for (name, _), a, e, b in zip(scorer.named_parameters(), got, eager, want):
        err, float32_err, scale = ((a.double() - b).abs().max().item(), (e.double() - b).abs().max().item(),
                                   b.abs().max().item())
        assert err <= max(1e-4 * scale + 1e-7, 4 * float32_err), f"{name}: {err:.3g} (float32 eager {float32_err:.3g})"


@pytest.mark.parametrize("isa", PATHS)
def test_gradients_are_deterministic(isa):
    scorer = _scorer(seed=6, **ODD).requires_grad_(True)
    q, d, q_mask, d_mask = _case("grouped", 7, 37, 13, seed=12)
    runs = []
    with cpu_isa.use(isa):
        for _ in range(2):
            qg, dg = q.clone().requires_grad_(), d.clone().requires_grad_()
            out = lite_score(qg, dg, q_mask, d_mask, scorer=scorer, backend="cpp")
            runs.append(torch.autograd.grad(out.sum(), [qg, dg, *scorer.parameters()]))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("vendor,best", [("GenuineIntel", "avx512bf16"), (None, None)])
def test_the_path_chosen_by_speed_runs_and_is_explained(monkeypatch, vendor, best):
    """cpu_isa.FASTER_PATHS for LITE: bfloat16 on an Intel CPU whose best path is avx512bf16 (no usable AMX)
    runs the avx512 path's widening FMAs, measured faster there, and dispatch.explain says so; (None, None):
    whatever this CPU's own table says. The scores are the chosen path's, bit for bit."""
    monkeypatch.delenv(cpu_isa.ENV_VAR, raising=False)
    if vendor is not None:
        if best not in PATHS or "avx512" not in PATHS:
            pytest.skip(f"needs a CPU that runs {best} and avx512")
        monkeypatch.setattr(cpu_isa, "_VENDOR", vendor)
        monkeypatch.setattr(cpu_isa, "_BEST", best)
    scorer = _scorer(seed=4, **ODD).to(torch.bfloat16)
    params, lq, ld, _ = scorer_params(scorer)
    q, d, q_mask, d_mask = _case("grouped", 7, 37, 13, seed=7)
    q, d = q.to(torch.bfloat16), d.to(torch.bfloat16)
    path, reason = cpu_isa.selected_for("lite", torch.bfloat16), cpu_isa.why("lite", torch.bfloat16)
    if vendor is not None:
        assert path == "avx512" and "avx512 rather than avx512bf16" in reason and "by speed" in reason
    assert (path != cpu_isa.selected()) == bool(reason)
    ex = dispatch.explain("lite", (q, d, q_mask, d_mask), **dispatch_context(q, params, lq, ld, pairs=4))
    if ex.chosen == "cpp":
        assert f"ISA path {path}" in ex.kernel and (not reason or reason in ex.kernel)
        assert ("AMX tiles" in ex.kernel) == (path == "amx"), ex.kernel
    if path == "scalar":
        return
    got = lite_score(q, d, q_mask, d_mask, scorer=scorer, backend="cpp")
    with cpu_isa.use(path):
        torch.testing.assert_close(got, lite_score(q, d, q_mask, d_mask, scorer=scorer, backend="cpp"), rtol=0, atol=0)


def test_dispatch_runs_the_kernel_for_inference_and_training():
    scorer = _scorer(seed=7)
    q, d, q_mask, d_mask = _case("rerank", 8, 16, 24, seed=2)
    params, lq, ld, _ = scorer_params(scorer)
    isa = cpu_isa.selected()
    for needs_grad in (False, True):
        ex = dispatch.explain("lite", (q, d, q_mask, d_mask), **dispatch_context(q, params, lq, ld, needs_grad, pairs=5))
        if isa == "scalar":
            assert ex.chosen == "reference" and "scalar" in "; ".join(ex["cpp"])
        else:
            assert ex.chosen == "cpp" and f"ISA path {isa}" in ex.kernel and "LITE" in ex.kernel
    one = dispatch.explain("lite", (q[:1], d[:1]), **dispatch_context(q, params, lq, ld, pairs=1))
    if torch.get_num_threads() > 1:
        assert one.chosen == "reference" and "fewer (query, doc) pairs than threads" in "; ".join(one["cpp"])
    # Training through lite_score reaches every parameter.
    trainable = copy.deepcopy(scorer).requires_grad_(True)
    lite_score(q, d, q_mask, d_mask, scorer=trainable).sum().backward()
    assert all(p.grad is not None for p in trainable.parameters())


def test_the_extension_checks_the_packed_weights():
    """The kernel reads the packed weights by the scorer's sizes: a tensor of the wrong shape, dtype or layout
    is refused with its name, never read out of bounds."""
    ext = _ext.require()
    scorer = _scorer(seed=8)
    params, lq, ld, eps = scorer_params(scorer)
    weights, bo = lite_cpu.pack(params)
    q, d = torch.randn(1, 1, lq, 24), torch.randn(1, 2, ld, 24)
    out = torch.empty(1, 1, 2)
    args = lambda w, bf=None, r1=params[0].shape[0]: (cpu_isa.selected(), q, d, None, None, w, bf, lq, ld, r1,  # noqa: E731
                                                       params[8].shape[0], eps, bo, out, None, 1)
    ext.lite_forward(*args(weights))
    _assert_close(out.reshape(-1), _truth(q[0, 0], d[0], None, None, scorer), FWD_TOL["float32"])
    bad_shape = list(weights)
    bad_shape[2] = bad_shape[2][:, :-1]
    with pytest.raises(ValueError, match="w2p"):
        ext.lite_forward(*args(bad_shape))
    bad_dtype = list(weights)
    bad_dtype[0] = bad_dtype[0].double()
    with pytest.raises(ValueError, match="w1p"):
        ext.lite_forward(*args(bad_dtype))
    strided = list(weights)
    strided[15] = torch.stack([strided[15], strided[15]], 1)[:, 0]
    with pytest.raises(ValueError, match="wo"):
        ext.lite_forward(*args(strided))
    with pytest.raises(ValueError, match="w1p"):  # sizes that disagree with the tensors
        ext.lite_forward(*args(weights, r1=params[0].shape[0] + 40))
    # The bfloat16 weights: vdpbf16ps pairs on every path but amx, whole AMX tiles on amx (checked by shape
    # whether or not this CPU can run the path that reads them).
    for isa in {"avx2", "amx"}:
        pack16, names = ((lite_cpu.pack_amx, ("w1t", "w2t", "u2b", "v1t", "v2t")) if isa == "amx"
                         else (lite_cpu.pack_bf16, ("w1b", "w2b", "u2b", "v1b", "v2b")))
        w1, w2, u2, v1, v2 = pack16(params)
        for bad, name in (([w1, w2, u2[:-1], v1, v2], "u2b"), ([w1, w2, u2, v1[:, :-1], v2], names[3]),
                          ([w1, w2, u2, v1, v2.double()], names[4]), ([w1[:1], w2, u2, v1, v2], names[0]),
                          ([w1, w2.transpose(1, 2), u2, v1, v2], names[1]), ([w1, w2, u2], "5 bfloat16 weight tensors")):
            with pytest.raises(ValueError, match=name):
                ext.lite_forward(isa, *args(weights, bad)[1:])
        if isa == "amx":  # the other layout is refused, not misread
            with pytest.raises(ValueError, match="w1t"):
                ext.lite_forward(isa, *args(weights, lite_cpu.pack_bf16(params))[1:])
    with pytest.raises(ValueError, match="lq"):
        ext.lite_forward(cpu_isa.selected(), torch.randn(1, 1, lq + 1, 24), d, None, None, weights, None, lq, ld,
                         params[0].shape[0], params[8].shape[0], eps, bo, out, None, 1)
