"""fastrank.maxsim against maxsim_ref (the spec), in float64, on every backend this machine can run."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrank import BackendUnavailableError, dispatch, maxsim, maxsim_ref

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
CPU_BACKENDS = ["cpp"] + (["triton_interpret"] if HAS_TRITON and INTERPRET else [])

# Kernel error vs the float64 truth. Inputs are rounded to the dtype first, so the only error left is
# float32 accumulation (and, for gradients, the final rounding to the input dtype).
FWD_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-5, 2e-4), torch.float16: (2e-5, 2e-4)}
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def _case(form, lq, ld, h, *, seed, dtype=torch.float32, device="cpu", masks=True):
    """Fresh random inputs (never zeros) in one of the three broadcast forms, with random masks, one fully
    padded document and at least one valid query token."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "rerank": ((lq, h), (5, ld, h), (lq,), (5, ld)),
        "grouped": ((2, 1, lq, h), (2, 3, ld, h), (2, 1, lq), (2, 3, ld)),
        "allpairs": ((3, 1, lq, h), (1, 3, ld, h), (3, 1, lq), (1, 3, ld)),
    }[form]
    q = torch.randn(shapes[0], generator=g).to(dtype)
    d = torch.randn(shapes[1], generator=g).to(dtype)
    q_mask = d_mask = None
    if masks:
        q_mask = torch.rand(shapes[2], generator=g) < 0.8
        q_mask[..., 0] = True
        d_mask = torch.rand(shapes[3], generator=g) < 0.7
        d_mask.view(-1, ld)[1] = False  # a fully padded document

    def move(t):
        return None if t is None else t.to(device)

    return move(q), move(d), move(q_mask), move(d_mask)


def _check(q, d, q_mask, d_mask, backend, *, deterministic=False):
    """Forward and gradients (with a non-unit upstream gradient) against the float64 reference."""
    dtype = q.dtype
    q = q.detach().requires_grad_()
    d = d.detach().requires_grad_()
    out = maxsim(q, d, q_mask, d_mask, backend=backend, deterministic=deterministic)
    q64 = q.detach().double().requires_grad_()
    d64 = d.detach().double().requires_grad_()
    ref = maxsim_ref(q64, d64, q_mask, d_mask)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rtol, atol = FWD_TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(out.device) + 0.5
    dq, dd = torch.autograd.grad(out, (q, d), grad)
    rq, rd = torch.autograd.grad(ref, (q64, d64), grad.double())
    assert dq.dtype == dtype and dd.dtype == dtype
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(dq.double(), rq, rtol=rtol, atol=atol)
    torch.testing.assert_close(dd.double(), rd, rtol=rtol, atol=atol)
    return out, dq, dd


# ---------------------------------------------------------------------------------------------------------
# Kernels vs the reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", ["rerank", "grouped", "allpairs"])
@pytest.mark.parametrize("lq", [1, 7, 32])
@pytest.mark.parametrize("ld", [1, 97, 200])
@pytest.mark.parametrize("h", [59, 128, 768])
def test_matches_reference(backend, form, lq, ld, h):
    _check(*_case(form, lq, ld, h, seed=lq * 1000 + ld * 10 + h), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", ["rerank", "grouped", "allpairs"])
def test_without_masks(backend, form):
    _check(*_case(form, 31, 201, 128, seed=3, masks=False), backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["rerank", "grouped", "allpairs"])
@pytest.mark.parametrize("lq,ld,h", [(7, 97, 59), (32, 200, 128), (31, 201, 768), (64, 13, 33)])
def test_cpp_low_precision(dtype, form, lq, ld, h):
    _check(*_case(form, lq, ld, h, seed=lq + ld + h, dtype=dtype), "cpp")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lq_at_tile_limit(backend):
    _check(*_case("grouped", 64, 50, 40, seed=11), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_long_reduction_loops(backend):
    """Many docs per query and many queries per doc: the backward reductions over X and Y (split into
    chunks with atomics when deterministic=False) must still sum every contribution."""
    q, d, qm, dm = _case("rerank", 8, 24, 32, seed=5)
    d = torch.randn(40, 24, 32)
    dm = torch.rand(40, 24) < 0.6
    for deterministic in (False, True):
        _check(q, d, qm, dm, backend, deterministic=deterministic)
    q = torch.randn(40, 1, 8, 32)
    d = torch.randn(1, 3, 24, 32)
    for deterministic in (False, True):
        _check(q, d, None, None, backend, deterministic=deterministic)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic_backward_is_bitwise_reproducible(backend, request):
    """Gradients are bitwise equal run to run and, on the C++ path, for 1, 2 and 4 threads: a reduction
    whose order depended on the threads (a split sum, atomics) would differ, because the data make every
    reduction order-sensitive (magnitudes over six decades; checked below on the dq sums)."""
    g = torch.Generator().manual_seed(2)

    def decades(*shape):
        return 10.0 ** torch.randint(-3, 4, shape, generator=g).float()

    q = torch.randn(6, 1, 7, 59, generator=g) * decades(6, 1, 7, 1)
    d = torch.randn(1, 6, 97, 59, generator=g) * decades(1, 6, 97, 1)
    dm = torch.rand(1, 6, 97, generator=g) < 0.7
    upstream = torch.randn(6, 6, generator=g) * decades(6, 6)
    # dq[y, i] = sum over the 6 docs x of upstream[y, x] * d[x, argmax]: summed in float32 forward and
    # backward, the orders disagree somewhere, so a reordered reduction could not pass unnoticed.
    s = torch.matmul(q.double(), d.double().transpose(-1, -2)).masked_fill(~dm[:, :, None, :], float("-inf"))
    rows = d[0][torch.arange(6)[None, :, None], s.argmax(-1)]  # (Y, X, Lq, H)
    terms = upstream[:, :, None, None] * rows
    forward, backward = torch.zeros_like(terms[:, 0]), torch.zeros_like(terms[:, 0])
    for x in range(6):
        forward, backward = forward + terms[:, x], backward + terms[:, 5 - x]
    assert not torch.equal(forward, backward)

    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    grads = []
    for n in ([1, 2, 4] if backend == "cpp" else [threads]):
        torch.set_num_threads(n)
        for _ in range(2):
            qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
            out = maxsim(qq, dd, None, dm, backend=backend, deterministic=True)
            grads.append(torch.autograd.grad(out, (qq, dd), upstream))
    for dq, dd in grads[1:]:
        assert torch.equal(dq, grads[0][0]) and torch.equal(dd, grads[0][1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_route_to_first_doc_token(backend):
    """Integer-valued embeddings make similarities exact, so ties are real: the max and its gradient go to
    the earliest doc token, as torch.max does in the reference."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-2, 3, (6, 16), generator=g).float()
    d = torch.randint(-2, 3, (4, 30, 16), generator=g).float()
    d[:, 20:] = d[:, :10]  # guaranteed duplicates
    _check(q, d, None, None, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_inputs(backend):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(40, 7, generator=g).t()  # (7, 40) with stride (1, 7): last dim not contiguous
    d = torch.randn(6, 40, 97, generator=g).transpose(1, 2)
    dm = (torch.rand(97, 6, generator=g) < 0.7).t()
    _check(q, d, None, dm, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extra_batch_dims_and_mask_only_broadcast(backend):
    """Three batch dims, a size-1 dim, and a dim where only the masks vary (q and d are shared)."""
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 1, 1, 5, 24, generator=g)
    d = torch.randn(1, 3, 1, 17, 24, generator=g)
    qm = torch.rand(2, 1, 4, 5, generator=g) < 0.8
    dm = torch.rand(1, 3, 4, 17, generator=g) < 0.8
    out, _, _ = _check(q, d, qm, dm, backend)
    assert out.shape == (2, 3, 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates(backend):
    q, d, qm, dm = _case("rerank", 7, 97, 59, seed=1)
    q[0, 3] = float("nan")  # query token 0 is always valid: every doc with a valid token gets NaN
    d[2, 5, 0] = float("nan")
    out = maxsim(q, d, qm, dm, backend=backend)
    ref = maxsim_ref(q.double(), d.double(), qm, dm)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out.isnan().any() and not out[1].isnan()  # doc 1 is fully padded: 0, not NaN
    assert out[1] == 0


def test_fully_padded_document_scores_zero_with_zero_grad():
    q = torch.randn(4, 8, requires_grad=True)
    d = torch.randn(3, 5, 8, requires_grad=True)
    dm = torch.ones(3, 5, dtype=torch.bool)
    dm[1] = False
    for backend in CPU_BACKENDS + ["reference"]:
        out = maxsim(q, d, None, dm, backend=backend)
        assert out[1] == 0
        (gd,) = torch.autograd.grad(out.sum(), d)
        assert torch.all(gd[1] == 0) and torch.any(gd[0] != 0)


def test_padded_doc_tokens_never_win_the_max():
    """A padded token with a huge similarity must be ignored, not treated as similarity 0 either: all
    valid similarities are negative here, so a 0 from padding would change the score."""
    q = torch.ones(2, 4)
    d = -torch.rand(1, 6, 4) - 0.1
    d[0, 5] = 100.0
    dm = torch.tensor([[True] * 5 + [False]])
    expected = 2 * (d[0, :5] @ torch.ones(4)).max()
    for backend in CPU_BACKENDS + ["reference"]:
        torch.testing.assert_close(maxsim(q, d, None, dm, backend=backend)[0], expected)


def test_default_backend_on_cpu_is_cpp():
    q, d, _, _ = _case("rerank", 7, 9, 16, seed=0)
    assert dispatch.choose("maxsim", (q, d), None, dtype=q.dtype, lq=7).backend == "cpp"


def test_empty_inputs():
    for backend in CPU_BACKENDS + ["reference", None]:
        assert maxsim(torch.randn(4, 8), torch.randn(0, 5, 8), backend=backend).shape == (0,)
        out = maxsim(torch.randn(4, 8), torch.randn(3, 0, 8), backend=backend)
        assert out.shape == (3,) and torch.all(out == 0)
        out = maxsim(torch.randn(0, 8), torch.randn(3, 5, 8), backend=backend)
        assert out.shape == (3,) and torch.all(out == 0)


def test_float64_runs_on_reference_and_gradchecks():
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    d = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert maxsim(q, d).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: maxsim(a, b), (q, d))
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64 not supported"):
        maxsim(q, d, backend="cpp")


# ---------------------------------------------------------------------------------------------------------
# Property tests over random shapes
# ---------------------------------------------------------------------------------------------------------
@st.composite
def _problems(draw):
    lq = draw(st.integers(1, 40))
    ld = draw(st.integers(1, 70))
    h = draw(st.integers(1, 80))
    rank = draw(st.integers(0, 3))
    batch = [draw(st.integers(1, 3)) for _ in range(rank)]
    q_batch = [b if draw(st.booleans()) else 1 for b in batch]
    d_batch = [b if draw(st.booleans()) else 1 for b in batch]
    q_rank = draw(st.integers(0, rank))  # q may have fewer leading dims: matmul-style broadcasting
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*q_batch[rank - q_rank:], lq, h, generator=g)
    d = torch.randn(*d_batch, ld, h, generator=g)
    qm = (torch.rand(*q_batch, lq, generator=g) < 0.8) if draw(st.booleans()) else None
    dm = (torch.rand(*d_batch, ld, generator=g) < 0.7) if draw(st.booleans()) else None
    return q, d, qm, dm


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_property_cpp(problem):
    _check(*problem, "cpp")


@pytest.mark.skipif("triton_interpret" not in CPU_BACKENDS, reason="needs triton and TRITON_INTERPRET=1")
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_property_triton_interpret(problem):
    _check(*problem, "triton_interpret")


# ---------------------------------------------------------------------------------------------------------
# torch.compile and torch.library registration
# ---------------------------------------------------------------------------------------------------------
def test_opcheck_custom_ops():
    q, d, qm, dm = _case("grouped", 7, 13, 16, seed=1)
    from fastrank.ops.maxsim import _maxsim_forward_op
    from fastrank.ops.pairs import canonicalize as _canonicalize

    c = _canonicalize(q, d, qm, dm, torch.Size([2, 3]))
    args = (c.q.requires_grad_(), c.d.requires_grad_(), c.q_mask, c.d_mask, "cpp", True, True)
    torch.library.opcheck(_maxsim_forward_op, args)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_under_torch_compile(compile_backend):
    q, d, qm, dm = _case("grouped", 7, 13, 16, seed=1)
    q.requires_grad_()
    d.requires_grad_()
    fn = torch.compile(lambda a, b: maxsim(a, b, qm, dm, backend="cpp"), backend=compile_backend, fullgraph=True)
    out = fn(q, d)
    ref = maxsim_ref(q, d, qm, dm)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    dq, dd = torch.autograd.grad(out.sum(), (q, d))
    rq, rd = torch.autograd.grad(ref.sum(), (q, d))
    torch.testing.assert_close(dq, rq)
    torch.testing.assert_close(dd, rd)


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ---------------------------------------------------------------------------------------------------------
def _bad_inputs():
    q, d = torch.randn(4, 8), torch.randn(3, 5, 8)
    return [
        (dict(q=q, d=torch.randn(3, 5, 7)), ValueError, r"share the embedding dim H.*H=8.*H=7"),
        (dict(q=torch.randn(2, 4, 8), d=torch.randn(3, 5, 8)), ValueError, r"batch\) dims do not broadcast: q \(2,\), d \(3,\)"),
        (dict(q=torch.randn(8), d=d), ValueError, r"q must have shape \(\.\.\., Lq, H\)"),
        (dict(q=q, d=torch.randn(8)), ValueError, r"d must have shape \(\.\.\., Ld, H\)"),
        (dict(q=q.long(), d=d.long()), TypeError, r"q must be float32, float16, bfloat16 or float64, got torch.int64"),
        (dict(q=q, d=d.bfloat16()), TypeError, r"same dtype, got q torch.float32 and d torch.bfloat16"),
        (dict(q=q, d=d, q_mask=torch.ones(4)), TypeError, r"q_mask must be a bool tensor, got torch.float32"),
        (dict(q=q, d=d, d_mask=torch.ones(3, 5, dtype=torch.int8)), TypeError, r"d_mask must be a bool tensor"),
        (dict(q=q, d=d, q_mask=torch.ones(5, dtype=torch.bool)), ValueError, r"q_mask must have shape \(\.\.\., 4\)"),
        (dict(q=q, d=d, d_mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, r"d_mask must have shape \(\.\.\., 5\)"),
        (dict(q=q, d=d, d_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"do not broadcast.*d_mask \(2,\)"),
        (dict(q=q, d=d, q_mask=[True] * 4), TypeError, r"q_mask must be a bool tensor or None"),
        (dict(q=q.numpy(), d=d), TypeError, r"q must be a torch.Tensor"),
        (dict(q=q, d=d.to("meta")), ValueError, r"one device, got q on cpu, d on meta"),
    ]


@pytest.mark.parametrize("kwargs,exc,match", _bad_inputs())
def test_bad_input_is_a_clear_error(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        maxsim(**kwargs)


def test_forced_backend_that_cannot_run_lists_reasons(monkeypatch):
    q, d = torch.randn(4, 8), torch.randn(3, 5, 8)
    with pytest.raises(BackendUnavailableError, match=r"(?s)backend 'triton' cannot run.*needs CUDA tensors"):
        maxsim(q, d, backend="triton")
    with pytest.raises(ValueError, match=r"backend='gpu' is not a backend"):
        maxsim(q, d, backend="gpu")
    monkeypatch.setenv("FASTRANK_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        maxsim(q, d)
    monkeypatch.setenv("FASTRANK_BACKEND", "reference")
    torch.testing.assert_close(maxsim(q, d), maxsim_ref(q, d))
    # longer queries than the 64-token tile run on the kernels, in chunks (tests/test_hostile_maxsim.py)
    monkeypatch.delenv("FASTRANK_BACKEND")
    q65 = torch.randn(65, 8)
    torch.testing.assert_close(maxsim(q65, d, backend="cpp"), maxsim_ref(q65, d))
    torch.testing.assert_close(maxsim(q65, d), maxsim_ref(q65, d))


def test_missing_extension_says_how_to_rebuild(monkeypatch, request):
    from fastrank import _ext

    request.addfinalizer(dispatch.reset)

    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", "the compiled extension fastrank._C could not be imported (test)")
    dispatch.reset()  # availability is cached per process; this test simulates another installation
    reasons = dispatch.explain("maxsim", (torch.randn(2, 2),), dtype=torch.float32, lq=2)
    assert any("pip install --no-build-isolation -e ." in r for r in reasons["cpp"])
    with pytest.raises(BackendUnavailableError, match="could not be imported"):
        maxsim(torch.randn(4, 8), torch.randn(3, 5, 8), backend="cpp")
    q, d = torch.randn(4, 8), torch.randn(3, 5, 8)  # the default still works, on another backend
    torch.testing.assert_close(maxsim(q, d), maxsim_ref(q, d), rtol=1e-5, atol=1e-5)


def test_import_touches_no_cuda_and_needs_no_triton_or_extension():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['fastrank._C'] = None\n"
        "import torch, fastrank\n"
        "assert not torch.cuda.is_initialized()\n"
        "q, d = torch.randn(4, 8), torch.randn(3, 5, 8)\n"
        "torch.testing.assert_close(fastrank.maxsim(q, d), fastrank.maxsim_ref(q, d))\n"
        "r = fastrank.dispatch.explain('maxsim', (q, d), dtype=q.dtype, lq=4)\n"
        "assert 'triton is not importable' in ' '.join(r['triton']), r\n"
        "assert 'could not be imported' in ' '.join(r['cpp']), r\n"
    )
    # FASTRANK_CPU_ISA (a forced path, as in CI's AVX2 step) names a path the blocked extension cannot run.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRANK_CPU_ISA")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ---------------------------------------------------------------------------------------------------------
# Issue 13: every autotuning config of the forward, the valid-length bound, grid limits
# ---------------------------------------------------------------------------------------------------------
def _config_count() -> int:
    import fastrank.ops.maxsim_triton_shared as shared

    return len(shared.FORWARD_CONFIGS) if HAS_TRITON else 1


@pytest.mark.skipif("triton_interpret" not in CPU_BACKENDS, reason="needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("config", range(_config_count()))
def test_every_forward_config_matches_reference(config, monkeypatch):
    """The interpreter launches one config of the autotuned forward (INTERPRETER_CONFIG); each config the
    autotuner may pick on a GPU runs here against the reference: document counts that DOCS does not divide,
    documents longer than two tiles of the largest BLOCK_LD, H within one block (q held) and split over
    blocks, and doc masks whose last valid token sits on either side of a tile boundary (the loop stops at
    the last valid token), with holes and a fully padded document."""
    import fastrank.ops.maxsim_triton_shared as shared

    monkeypatch.setattr(shared, "INTERPRETER_CONFIG", config)
    g = torch.Generator().manual_seed(config)
    for lead_q, lead_d, h in (((), (7,), 48), ((2, 1), (2, 3), 80)):
        q = torch.randn(*lead_q, 7, h, generator=g)
        d = torch.randn(*lead_d, 300, h, generator=g)
        qm = torch.rand(*lead_q, 7, generator=g) < 0.8
        qm[..., 0] = True
        dm = torch.rand(*lead_d, 300, generator=g) < 0.7
        rows = dm.view(-1, 300)
        rows[1] = False  # fully padded
        for k, last in zip(range(2, rows.shape[0]), (0, 63, 64, 127, 128)):
            rows[k, last + 1:] = False  # trailing padding ending at a tile boundary or just past one
            rows[k, last] = True
        _check(q, d, qm, dm, "triton_interpret")


def test_autotuning_keeps_only_configs_that_compiled_without_spills():
    """The configs the autotuner may pick per query tile and H path: the ones whose sm_90 build ptxas
    reported without spills (issue 13; the interpreter runs every config regardless)."""
    pytest.importorskip("triton")
    import fastrank.ops.maxsim_triton_shared as shared

    configs = shared.FORWARD_CONFIGS

    def kept(block_lq, split_h):
        return [(c.kwargs["BLOCK_LD"], c.kwargs["DOCS"])
                for c in shared.prune_forward_configs(configs, {}, BLOCK_LQ=block_lq, SPLIT_H=split_h)]

    everything = [(c.kwargs["BLOCK_LD"], c.kwargs["DOCS"]) for c in configs]
    assert kept(16, False) == kept(32, False) == kept(16, True) == everything
    assert kept(64, False) == [(32, 4), (32, 1), (32, 8)]
    assert kept(32, True) == [(32, 1)]
    assert kept(64, True) == [(32, 4), (32, 8)]


def test_grid_limits_are_clear_errors():
    """CUDA caps grids at 2^31 - 1 programs along x and 65535 along y and z: past that the launchers raise
    naming the axis and the way out, instead of a launch failure."""
    pytest.importorskip("triton")
    import fastrank.ops.maxsim as maxsim_ops

    assert maxsim_ops.check_grid((2**31 - 1, 65535, 65535), "maxsim") == (2**31 - 1, 65535, 65535)
    for grid, axis in (((2**31,), "x"), ((1, 65536), "y"), ((1, 1, 65536), "z")):
        with pytest.raises(ValueError, match=rf"maxsim: .* grid axis {axis}, more than CUDA's .*smaller batches"):
            maxsim_ops.check_grid(grid, "maxsim")
    # through the launcher, before any output is allocated: 2^31 documents as a broadcast view of one
    q, d = torch.randn(3, 8), torch.randn(1, 1, 5, 8).expand(2**31, 1, 5, 8)
    with pytest.raises(ValueError, match="grid axis x"):
        maxsim_ops.triton_forward(q[None, None], d.reshape(1, 2**31, 5, 8), None, None, False)


# ---------------------------------------------------------------------------------------------------------
# GPU (runs where CUDA is present)
# ---------------------------------------------------------------------------------------------------------
def _gpu_backends():
    from fastrank import _ext

    backends = ["triton"] if HAS_TRITON and not INTERPRET else []
    ext = _ext.load()
    if ext is not None and ext.has_cuda:
        backends.append("cpp")
    return backends


GPU_BACKENDS = _gpu_backends() if CUDA else []


@pytest.mark.skipif(not GPU_BACKENDS, reason="needs CUDA with compiled Triton or the extension's CUDA kernels")
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["rerank", "grouped", "allpairs"])
@pytest.mark.parametrize("lq,ld,h", [(1, 1, 59), (7, 97, 128), (32, 200, 768), (64, 512, 1024), (31, 201, 128)])
def test_gpu_matches_reference(backend, dtype, form, lq, ld, h):
    _check(*_case(form, lq, ld, h, seed=lq + ld + h, dtype=dtype, device="cuda"), backend)


@pytest.mark.skipif(not GPU_BACKENDS, reason="needs CUDA")
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
def test_gpu_long_reduction_loops_and_determinism(backend):
    q, d = torch.randn(8, 64, device="cuda"), torch.randn(3000, 40, 64, device="cuda")
    _check(q, d, None, None, backend, deterministic=False)
    grads = []
    for _ in range(2):
        qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
        grads.append(torch.autograd.grad(maxsim(qq, dd, backend=backend, deterministic=True).sum(), (qq, dd)))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_default_backend_on_cuda_is_a_kernel():
    q, d = torch.randn(4, 8, device="cuda"), torch.randn(3, 5, 8, device="cuda")
    assert dispatch.choose("maxsim", (q, d), None, dtype=q.dtype, lq=4).backend in ("triton", "cpp")


@pytest.mark.skipif(not CUDA or not HAS_TRITON or INTERPRET, reason="needs CUDA and compiled Triton")
def test_gpu_offsets_past_2_31_elements():
    """Issue 13: 14,000 documents of 200 tokens at H = 768 (bf16) hold 2.15e9 > 2^31 elements, so the last
    documents sit past every int32 offset. Their scores and gradients must match the reference run on them
    alone (the upstream gradient is zero elsewhere, so dq comes from them alone too)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GiB")
    g = torch.Generator(device="cuda").manual_seed(0)
    n, ld, h = 14_000, 200, 768
    assert n * ld * h > 2**31
    q = torch.randn(32, h, device="cuda", generator=g, dtype=torch.bfloat16)
    d = torch.randn(n, ld, h, device="cuda", generator=g, dtype=torch.bfloat16)
    dm = torch.rand(n, ld, device="cuda", generator=g) < 0.9
    q.requires_grad_()
    d.requires_grad_()
    out = maxsim(q, d, None, dm, backend="triton")
    tail = slice(n - 3, n)
    upstream = torch.zeros(n, device="cuda")
    upstream[tail] = torch.randn(3, device="cuda", generator=g) + 0.5
    dq, dd = torch.autograd.grad(out, (q, d), upstream)
    q64 = q.detach().double().requires_grad_()
    d64 = d.detach()[tail].double().requires_grad_()
    ref = maxsim_ref(q64, d64, None, dm[tail])
    torch.testing.assert_close(out[tail].double(), ref, rtol=FWD_TOL[torch.bfloat16][0], atol=FWD_TOL[torch.bfloat16][1])
    rq, rd = torch.autograd.grad(ref, (q64, d64), upstream[tail].double())
    rtol, atol = GRAD_TOL[torch.bfloat16]
    torch.testing.assert_close(dq.double(), rq, rtol=rtol, atol=atol)
    torch.testing.assert_close(dd[tail].double(), rd, rtol=rtol, atol=atol)
    assert not dd[: n - 3].any()
    # the packed kernels on the same rows
    from fastrank import maxsim_packed, maxsim_packed_ref

    tokens = d.detach().reshape(n * ld, h).requires_grad_()
    offsets = torch.arange(0, n * ld + 1, ld, device="cuda")
    out = maxsim_packed(q, tokens, offsets, backend="triton")
    dq, dt = torch.autograd.grad(out, (q, tokens), upstream)
    t64 = tokens.detach()[(n - 3) * ld:].double().requires_grad_()
    ref = maxsim_packed_ref(q64, t64, torch.arange(0, 3 * ld + 1, ld, device="cuda"))
    torch.testing.assert_close(out[tail].double(), ref, rtol=FWD_TOL[torch.bfloat16][0], atol=FWD_TOL[torch.bfloat16][1])
    rq, rt = torch.autograd.grad(ref, (q64, t64), upstream[tail].double())
    torch.testing.assert_close(dq.double(), rq, rtol=rtol, atol=atol)
    torch.testing.assert_close(dt[(n - 3) * ld:].double(), rt, rtol=rtol, atol=atol)
