"""fastrank.dispatch: the FASTRANK_BACKEND override against ops that lack the forced backend."""
import warnings

import pytest
import torch

from fastrank import BackendUnavailableError, dispatch, losses, maxsim, maxsim_ref
from fastrank.cpu_isa import selected as selected_isa


@pytest.fixture
def fresh_warnings(monkeypatch):
    """The once-per-op warning is process state: each test starts as a fresh process would."""
    monkeypatch.setattr(dispatch, "_ENV_IGNORED_WARNED", set(), raising=False)


def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)


def test_env_backend_is_ignored_with_a_warning_where_the_op_lacks_it(monkeypatch, fresh_warnings):
    s, t = _loss_inputs()  # the distillation losses have no Triton implementation
    expected = losses.margin_mse(s, t)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.warns(RuntimeWarning, match=r"FASTRANK_BACKEND=triton ignored: 'margin_mse' has no triton implementation"):
        out = losses.margin_mse(s, t)
    torch.testing.assert_close(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per op, not once per call
        losses.margin_mse(s, t)
    ex = dispatch.explain("margin_mse", (s, t), dtype=s.dtype)
    assert "ignored" in ex.override and "ignored" in str(ex)
    assert ex.chosen is not None and ex.chosen != "triton"


def test_explicit_backend_still_raises_where_the_op_lacks_it(monkeypatch, fresh_warnings):
    s, t = _loss_inputs()
    with pytest.raises(BackendUnavailableError, match="'margin_mse' has no triton implementation"):
        losses.margin_mse(s, t, backend="triton")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError, match="'margin_mse' has no triton implementation"):
        losses.margin_mse(s, t, backend="triton")


def test_env_backend_still_forces_ops_that_have_it(monkeypatch, fresh_warnings):
    q, d = torch.randn(70, 8), torch.randn(3, 5, 8)
    monkeypatch.setenv(dispatch.ENV_VAR, "cpp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(maxsim(q, d), maxsim_ref(q, d), rtol=1e-5, atol=1e-5)
    ex = dispatch.explain("maxsim", (q, d))
    assert "forces the cpp backend" in ex.override
    # forced, cpp runs even where automatic dispatch would call it slower (one pair, a scalar path)
    assert ex.chosen == "cpp" or selected_isa() == "scalar"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")  # the op has it, this call cannot: still an error
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        maxsim(q, d)
    assert dispatch.explain("maxsim", (q, d)).chosen is None



def test_small_cpu_maxsim_calls_take_the_eager_math_and_say_why():
    """Below about 2^20 multiply-adds the kernel path's fixed per-call cost is more than the eager math
    (measured, see _TINY_WORK_LOG2): automatic dispatch takes the reference there, explain says why, and a
    call just past the bound goes to the kernel (unless this CPU's path is scalar, slower at every size)."""
    from fastrank import _ext
    import fastrank.ops.maxsim as ms

    if _ext.load() is None:
        pytest.skip("needs the compiled extension")
    small_q, small_d = torch.randn(4, 1, 8, 32), torch.randn(4, 3, 24, 32)  # 2^16.2 multiply-adds
    ex = dispatch.explain("maxsim", (small_q, small_d))
    assert ex.chosen == "reference" and any("a small call (about 2^16" in r for r in ex["cpp"]), ex
    big_q, big_d = torch.randn(8, 1, 32, 64), torch.randn(8, 4, 64, 64)  # 2^22 multiply-adds, 8 pairs
    assert 2 ** ms._TINY_WORK_LOG2 <= 8 * 4 * 32 * 64 * 64
    assert dispatch.explain("maxsim", (big_q, big_d)).chosen == "cpp" or selected_isa() == "scalar"
    # the small call still gives the kernels' answer, gradients included
    q, d = small_q.clone().requires_grad_(), small_d.clone().requires_grad_()
    maxsim(q, d).sum().backward()
    q2, d2 = small_q.clone().requires_grad_(), small_d.clone().requires_grad_()
    maxsim_ref(q2, d2).sum().backward()
    torch.testing.assert_close((q.grad, d.grad), (q2.grad, d2.grad))


def test_float32_inference_of_one_query_over_unmasked_documents_takes_eager():
    """There eager is one sgemm (d as (N * Ld, H) times q^T) with S in cache, which the CPU kernel does not beat
    while S is small (measured 0.67-1.01x up to 8.8 MiB of S, see _maxsim_cpu_slower): automatic dispatch takes
    the eager math and says why. A document mask, a second query, a gradient, bfloat16 inputs, or an S past
    _ONE_GEMM_MAX_S_BYTES (the kernel 1.1-2x there) send the call to the kernel."""
    import fastrank.ops.maxsim as ms

    from fastrank import _ext

    if _ext.load() is None or selected_isa() == "scalar":
        pytest.skip("needs the compiled extension on a vector ISA path")
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(32, 64, generator=g), torch.randn(8, 180, 64, generator=g)  # 2^21.5 multiply-adds
    ex = dispatch.explain("maxsim", (q, d))
    assert ex.chosen == "reference" and any("one query over unmasked documents" in r for r in ex["cpp"]), ex
    dm = torch.rand(8, 180, generator=g) < 0.8
    assert dispatch.explain("maxsim", (q, d, None, dm)).chosen == "cpp"
    assert dispatch.explain("maxsim", (torch.randn(2, 1, 32, 64, generator=g), d)).chosen == "cpp"
    assert dispatch.explain("maxsim", (q.bfloat16(), d.bfloat16())).chosen == "cpp"
    assert dispatch.explain("maxsim", (q.clone().requires_grad_(), d)).chosen == "cpp"
    docs = ms._ONE_GEMM_MAX_S_BYTES // (4 * 32 * 180) + 1  # S just past the bound
    assert dispatch.explain("maxsim", (q, torch.empty(docs, 180, 64))).chosen == "cpp"
    assert dispatch.explain("maxsim", (q, torch.empty(docs - 2, 180, 64))).chosen == "reference"
    torch.testing.assert_close(maxsim(q, d), maxsim_ref(q, d))


def test_eager_backward_computes_only_the_gradients_asked_for(monkeypatch):
    """Eager training calls run the kernels through an autograd.Function (not the custom op's per-call
    wrapper) whose backward skips dq or dd when q or d needs no gradient."""
    from fastrank import _ext
    import fastrank.ops.maxsim as ms

    if _ext.load() is None:
        pytest.skip("needs the compiled extension")
    seen = []
    kernels = ms._CPP["cpu"]
    original = kernels.backward

    def spy(q, d, grad, argmax, need_dq, need_dd, deterministic):
        seen.append((need_dq, need_dd))
        return original(q, d, grad, argmax, need_dq, need_dd, deterministic)

    # The op looks its kernels up through dispatch.kernels on every call, so replacing the registered entry
    # is enough.
    monkeypatch.setitem(ms._CPP, "cpu", dispatch.Kernels(kernels.forward, spy))
    assert dispatch.kernels("maxsim", "cpp", torch.empty(0)).backward is spy
    q, d = torch.randn(2, 1, 5, 16), torch.randn(2, 3, 7, 16)
    for q_grad, d_grad in ((True, False), (False, True), (True, True)):
        qq, dd = q.clone().requires_grad_(q_grad), d.clone().requires_grad_(d_grad)
        maxsim(qq, dd, backend="cpp").sum().backward()
        rq, rd = q.clone().requires_grad_(q_grad), d.clone().requires_grad_(d_grad)
        maxsim_ref(rq, rd).sum().backward()
        for got, want in ((qq.grad, rq.grad), (dd.grad, rd.grad)):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want)
    assert seen == [(True, False), (False, True), (True, True)]
