"""Issue 22's defects at the extension's boundary, one test each: views the kernels used to misread, index
values they used to trust, and the smaller op defects. Cases that crashed the interpreter before the fix run
in a subprocess, so that a regression fails the test instead of killing the test run."""
import subprocess
import sys
import textwrap

import pytest
import torch

from fastrank import losses, maxsim_packed, maxsim_packed_ref, quantize_tokens
from fastrank.ops.losses import REDUCTIONS, LOSS_KINDS, margin_mse_ref, mse_ref

pytestmark = pytest.mark.skipif(__import__("fastrank")._ext.load() is None, reason="needs the compiled extension")


def corpus(seed=0, h=16):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(4, h, generator=gen), torch.randn(9, h, generator=gen), torch.tensor([0, 3, 5, 9]))


def run_isolated(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter: a segmentation fault is a failed assertion here, not a dead worker."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


# ---- views the C++ kernel used to read as if contiguous -------------------------------------------------
def test_docs_view_scores_the_documents_it_names():
    q, tokens, offsets = corpus()
    docs = torch.tensor([[2, 0], [0, 1], [1, 2]])[:, 0]  # the values [2, 0, 1], stride 2
    got = maxsim_packed(q, tokens, offsets, docs=docs)
    torch.testing.assert_close(got, maxsim_packed_ref(q, tokens, offsets, docs=docs.contiguous()))


def test_docs_view_whose_hidden_elements_are_out_of_range_neither_crashes_nor_misreads():
    proc = run_isolated("""
        import torch
        from fastrank import maxsim_packed, maxsim_packed_ref
        g = torch.Generator().manual_seed(0)
        q, tokens, offsets = torch.randn(4, 16, generator=g), torch.randn(9, 16, generator=g), torch.tensor([0, 3, 5, 9])
        docs = torch.tensor([[2, 10**9], [0, 10**9]])[:, 0]
        got, want = maxsim_packed(q, tokens, offsets, docs=docs), maxsim_packed_ref(q, tokens, offsets, docs=docs.contiguous())
        print("ok" if torch.allclose(got, want, rtol=1e-5, atol=1e-5) else f"mismatch {got} {want}")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stdout, proc.stderr[-2000:])


def test_strided_offsets_and_scales_are_read_through_their_strides():
    q, tokens, offsets = corpus(1)
    strided_offsets = torch.stack([offsets, torch.full_like(offsets, 7)], 1)[:, 0]
    torch.testing.assert_close(maxsim_packed(q, tokens, strided_offsets), maxsim_packed_ref(q, tokens, offsets))
    t8, scales = quantize_tokens(tokens)
    strided_scales = torch.stack([scales, torch.full_like(scales, 1e30)], 1)[:, 0]
    got = maxsim_packed(q, t8, offsets, scales=strided_scales, exact_int8=True)
    torch.testing.assert_close(got, maxsim_packed_ref(q, t8, offsets, scales=scales), rtol=1e-5, atol=1e-5)


def test_offsets_written_behind_the_version_counter_are_refused_not_read():
    """A shared numpy array changes offsets without bumping the tensor's version: the cached Python check
    cannot see it, the extension's own check on every call must."""
    proc = run_isolated("""
        import numpy as np, torch
        from fastrank import maxsim_packed
        q, tokens = torch.randn(4, 16), torch.randn(9, 16)
        arr = np.array([0, 3, 5, 9], dtype=np.int64)
        offsets = torch.from_numpy(arr)
        maxsim_packed(q, tokens, offsets)
        arr[2] = 10**12
        try:
            maxsim_packed(q, tokens, offsets)
            print("no error")
        except ValueError as exc:
            print(exc)
    """)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "offsets must be non-decreasing" in proc.stdout and "1000000000000" in proc.stdout, proc.stdout


def test_offsets_changed_through_data_are_checked_again():
    q, tokens, offsets = corpus(2)
    maxsim_packed(q, tokens, offsets)
    offsets.data[1] = -4  # .data writes do not bump the version counter the Python cache keys on
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing|offsets\[0\]"):
        maxsim_packed(q, tokens, offsets)


# ---- expanded tokens, like maxsim's expanded inputs ----------------------------------------------------
def test_expanded_tokens_are_scored_like_their_copies():
    q, tokens, offsets = corpus(3)
    row = tokens[:1].expand(9, -1)
    torch.testing.assert_close(maxsim_packed(q, row, offsets), maxsim_packed_ref(q, row.contiguous(), offsets))
    t8, scales = quantize_tokens(tokens)
    t8e, se = t8[:1].expand(9, -1), scales[:1].expand(9)
    got = maxsim_packed(q, t8e, offsets, scales=se, exact_int8=True)
    torch.testing.assert_close(got, maxsim_packed_ref(q, t8e.contiguous(), offsets, scales=se.contiguous()),
                               rtol=1e-5, atol=1e-5)


# ---- smaller defects -------------------------------------------------------------------------------------
def test_scales_that_require_grad_are_refused_not_silently_ignored():
    q, tokens, offsets = corpus(4)
    t8, scales = quantize_tokens(tokens)
    with pytest.raises(ValueError, match="neither q nor scales may require grad"):
        maxsim_packed(q, t8, offsets, scales=scales.requires_grad_())
    with torch.no_grad():
        assert maxsim_packed(q, t8, offsets, scales=scales).shape == (3,)


def test_meta_tensors_give_shapes_as_maxsim_does():
    meta = torch.device("meta")
    q = torch.empty(4, 16, device=meta, requires_grad=True)
    scores = maxsim_packed(q, torch.empty(9, 16, device=meta), torch.empty(4, dtype=torch.int64, device=meta))
    assert scores.device == meta and scores.shape == (3,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert q.grad.shape == q.shape
    with torch.no_grad():
        sub = maxsim_packed(q, torch.empty(9, 16, device=meta), torch.empty(4, dtype=torch.int64, device=meta),
                            docs=torch.empty(5, dtype=torch.int64, device=meta))
    assert sub.shape == (5,)
    t8, scales = quantize_tokens(torch.empty(9, 16, device=meta))
    assert (t8.dtype, t8.shape, scales.dtype, scales.shape) == (torch.int8, (9, 16), torch.float32, (9,))
    s = torch.empty(4, 5, device=meta, requires_grad=True)
    for name in ("mse", "margin_mse", "m3se", "softmax_ce", "kl_div", "rankdistil_b"):
        loss = getattr(losses, name)(s, torch.empty(4, 5, device=meta), reduction="none")
        assert loss.shape == (4,) and loss.device == meta, name
    assert losses.inbatch_ce(s, torch.empty(4, dtype=torch.int64, device=meta)).shape == ()


def test_quantize_tokens_names_a_float32_overflow_not_nan():
    big = torch.full((2, 4), 1e300, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"tokens\[0\] holds a value of magnitude 1e\+300.*overflow float32"):
        quantize_tokens(big)
    # Within float32's scale range a float64 value quantizes like its float32 copy.
    x = torch.randn(3, 8, dtype=torch.float64) * 1e3
    q64, s64 = quantize_tokens(x)
    q32, s32 = quantize_tokens(x.float())
    assert torch.equal(q64, q32) and s64.dtype == torch.float32
    torch.testing.assert_close(s64, s32)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"tokens\[1\] contains NaN or inf"):
        quantize_tokens(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_margin_mse_overflows_to_inf_like_its_reference(dtype):
    big = torch.finfo(dtype).max * 0.88  # 3e38: a teacher margin of twice this is past the float range
    s = torch.tensor([[big, big], [1.0, 2.0]], dtype=dtype)
    t = torch.tensor([[big, -big], [0.5, 0.0]], dtype=dtype)
    for reduction in ("none", "mean"):
        got, want = losses.margin_mse(s, t, reduction=reduction), margin_mse_ref(s, t, reduction=reduction)
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want)), \
            (reduction, got, want)
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite])


# ---- the extension checks what it is handed (called directly) --------------------------------------------
def _ext():
    from fastrank import _ext, cpu_isa

    return _ext.require(), cpu_isa.selected()


def test_extension_refuses_mismatched_tensors_naming_the_argument():
    ext, isa = _ext()
    q, tokens, offsets = corpus(5)
    q3, out = q[None], torch.empty(3)
    ext.maxsim_packed_forward(isa, q3, tokens, offsets, None, None, None, out, None, 1)
    torch.testing.assert_close(out, maxsim_packed_ref(q, tokens, offsets))
    bad = [
        (dict(tokens=tokens.double()), r"tokens must be float32, got torch.float64"),
        (dict(tokens=tokens[:, :8]), r"tokens must have shape \(\*, 16\)"),
        (dict(tokens=tokens.t().contiguous().t()), r"tokens must have stride 1 in its last dim"),
        (dict(offsets=offsets.int()), r"offsets must be int64"),
        (dict(offsets=torch.tensor([0, 3, 5, 8])), r"offsets\[-1\] must equal the number of token rows \(9\)"),
        (dict(offsets=torch.tensor([1, 3, 5, 9])), r"offsets\[0\] must be 0"),
        (dict(offsets=offsets[::2]), r"offsets must be contiguous"),
        (dict(docs=torch.tensor([0, 3, 1])), r"docs\[1\] = 3 does not index the 3 documents"),
        (dict(docs=torch.tensor([-1, 0, 1])), r"docs\[0\] = -1"),
        (dict(out=torch.empty(4)), r"out must have shape \(3,\)"),
        (dict(out=torch.empty(6)[::2]), r"out must be contiguous"),
        (dict(out=torch.empty(3, dtype=torch.float64)), r"out must be float32"),
        (dict(q_mask=torch.ones(1, 3, dtype=torch.bool)), r"q_mask must have shape \(1, 4\)"),
        (dict(q=torch.empty(1, 4, 16, device="meta")), r"q is on the meta device"),
        (dict(scales=torch.ones(9)), r"tokens must be int8"),
        (dict(q=[1.0]), r"q must be a torch.Tensor, got list"),
    ]
    base = dict(q=q3, tokens=tokens, offsets=offsets, docs=None, scales=None, q_mask=None, out=out)
    for change, message in bad:
        args = {**base, **change}
        with pytest.raises(ValueError, match=message):
            ext.maxsim_packed_forward(isa, args["q"], args["tokens"], args["offsets"], args["docs"], args["scales"],
                                      args["q_mask"], args["out"], None, 1)


def test_extension_checks_every_saved_argmax_against_its_document():
    ext, isa = _ext()
    q, tokens, offsets = corpus(6)
    q3 = q[None].expand(3, -1, -1).contiguous()
    out, arg = torch.empty(3), torch.empty(3, 4, dtype=torch.int32)
    ext.maxsim_packed_forward(isa, q3, tokens, offsets, None, None, None, out, arg, 1)
    grad, dq = torch.ones(3), torch.empty(3, 4, 16)
    ext.maxsim_packed_backward(isa, q3, tokens, offsets, grad, arg, dq, None, 1)
    corrupt = arg.clone()
    corrupt[1, 2] = 2  # document 1 has rows 0 and 1 only
    with pytest.raises(ValueError, match=r"argmax\[1, 2\] = 2 is not a row of its document \(2 rows\)"):
        ext.maxsim_packed_backward(isa, q3, tokens, offsets, grad, corrupt, dq, None, 1)
    d = torch.randn(1, 3, 5, 16)
    out4, arg4 = torch.empty(1, 1, 3), torch.empty(1, 1, 3, 4, dtype=torch.int32)
    ext.maxsim_forward(isa, q[None, None], d, None, None, out4, arg4, 1)
    arg4[0, 0, 2, 0] = 5
    with pytest.raises(ValueError, match=r"argmax\[2, 0\] = 5 is not a row of its document \(5 rows\)"):
        ext.maxsim_backward(isa, q[None, None], d, torch.ones(1, 1, 3), arg4, torch.empty(1, 1, 4, 16), None, 1)


def test_loss_entry_points_check_their_tensors():
    ext, isa = _ext()
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    loss, grad = torch.empty(()), torch.empty(4, 5)
    mse, mean = LOSS_KINDS["mse"], REDUCTIONS["mean"]
    # Row 2 fully masked: "mean" divides by 3 queries, and dL/ds comes back with that 1/3 in it.
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2] = False
    ext.distill_forward(mse, mean, 0.0, s, t, None, mask, loss, grad, isa)
    s_ = s.clone().requires_grad_(True)
    want = mse_ref(s_, t, mask=mask)
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(grad, torch.autograd.grad(want, s_)[0])
    cases = [
        (dict(t=t.double()), r"t must be float32"),
        (dict(t=t[:, :4]), r"t must have shape \(4, 5\)"),
        (dict(grad=torch.empty(5, 4).t()), r"grad must be contiguous"),
        (dict(loss=torch.empty(4)), r"loss must have shape \(\)"),
        (dict(mask=torch.ones(4, 4, dtype=torch.bool)), r"mask must have shape \(4, 5\)"),
        (dict(positives=torch.ones(4, 5)), r"positives must be bool"),
    ]
    base = dict(s=s, t=t, positives=None, mask=None, loss=loss, grad=grad)
    for change, message in cases:
        a = {**base, **change}
        with pytest.raises(ValueError, match=message):
            ext.distill_forward(mse, mean, 0.0, a["s"], a["t"], a["positives"], a["mask"], a["loss"], a["grad"], isa)
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        ext.inbatch_ce_forward(mean, 1.0, s, torch.zeros(3, dtype=torch.int64), loss, grad, isa)
    with pytest.raises(ValueError, match=r"target must be int64 or int32, got torch.float32"):
        ext.inbatch_ce_forward(mean, 1.0, s, torch.zeros(4), loss, grad, isa)
