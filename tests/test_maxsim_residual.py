"""PLAID residual compression (fastrank.ops.residual) and the fused decompress + MaxSim operator
(fastrank.ops.maxsim_residual): every backend and every CPU ISA path this machine has, against
maxsim_residual_ref in float64, on fresh random corpora with empty documents, docs subsets and both code
dtypes; the codec's round trip; and the errors for bad input, each naming its argument.

Tolerance (every float32 backend against the float64 truth from the same compressed corpus): the kernels
decompress exactly as the reference does (one float32 addition per element, so the decompressed values
agree bit for bit), so the only error is float32 summation order: each dot product is within
H * eps32 * sum_k |q_lk d_rk| of the truth and the score, a sum of Lq maxima, within Lq times the largest
such bound plus Lq * eps32 * sum of |maxima|; :func:`_tolerance` states it per case.
"""
import importlib.util
import os

import pytest
import torch

from fastrank import _ext, cpu_isa, dispatch
from fastrank.ops import residual as residual_mod
from fastrank.ops.maxsim_residual import maxsim_residual, maxsim_residual_ref
from fastrank.ops.residual import compress_residuals, decompress_residuals, train_residual_codec

EXT = _ext.load()
HAS_CPP = EXT is not None and hasattr(EXT, "maxsim_residual_forward")
SUPPORT = cpu_isa.support()
PATH_PARAMS = [
    pytest.param(name, marks=pytest.mark.skipif(bool(SUPPORT[name]) or not HAS_CPP,
                                                reason=f"{name}: {SUPPORT[name] or 'extension without maxsim_residual'}"))
    for name in cpu_isa.PATHS
]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TRITON_RUNS = importlib.util.find_spec("triton") is not None and (INTERPRET or torch.cuda.is_available())
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
TRITON_BACKEND = "triton_interpret" if INTERPRET else "triton"
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs triton with TRITON_INTERPRET=1 (CPU) or CUDA")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="needs the compiled extension with maxsim_residual")

EPS32 = torch.finfo(torch.float32).eps
# Empty documents first, in the middle and last; one-row documents; exactly one 16-row tile, one row more,
# and a document of several tiles with a short last one.
LENGTHS = [0, 3, 1, 37, 0, 16, 17, 1, 5, 0]
CODE_DTYPES = [torch.int32, torch.uint16]


def _offsets(lengths) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64).cumsum(0)])


def _corpus(lengths, h, nbits, *, seed, lq=7, code_dtype=torch.int32, num_centroids=11):
    """A compressed corpus from fresh random tokens near random centroids, the codec trained on its own
    residuals (on a separate sample when the corpus is empty)."""
    g = torch.Generator().manual_seed(seed)
    offsets = _offsets(lengths)
    T = int(offsets[-1])
    centroids = torch.randn(num_centroids, h, generator=g)
    codes = torch.randint(0, num_centroids, (T,), generator=g)
    x = centroids[codes] + 0.4 * torch.randn(T, h, generator=g)
    sample = x - centroids[codes] if T else 0.4 * torch.randn(8, h, generator=g)
    cutoffs, weights = train_residual_codec(sample, nbits)
    packed = compress_residuals(x, codes.to(torch.int32), centroids, cutoffs, nbits)
    return dict(q=torch.randn(lq, h, generator=g), packed=packed, codes=codes.to(code_dtype), offsets=offsets,
                centroids=centroids, weights=weights, nbits=nbits)


def _args(case, device="cpu"):
    c = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    return (c["q"], c["packed"], c["codes"], c["offsets"], c["centroids"], c["weights"]), c["nbits"]


def _truth(case, docs=None):
    (q, *rest), nbits = _args(case)
    return maxsim_residual_ref(q.double(), *rest, nbits=nbits, docs=docs)


def _tolerance(case, docs=None) -> float:
    """The float32 summation bound of the module docstring, for this case's scored documents."""
    (q, packed, codes, offsets, centroids, weights), nbits = _args(case)
    d = decompress_residuals(packed, codes, centroids, weights, nbits).double()
    h, lq = q.shape[1], q.shape[0]
    if d.shape[0] == 0 or lq == 0:
        return 1e-6
    dot_bound = (q.double().abs() @ d.abs().T).max().item() * h * EPS32
    score_bound = _truth(case, docs).abs().max().item() * lq * EPS32
    return 2 * (lq * dot_bound + score_bound) + 1e-6


def _check(got, case, docs=None):
    want = _truth(case, docs)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=_tolerance(case, docs))


@pytest.fixture
def isa(request):
    with cpu_isa.use(request.param) as name:
        yield name


# ---------------------------------------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nbits", [1, 2, 4])
@pytest.mark.parametrize("h", [8, 64, 128])
@pytest.mark.parametrize("code_dtype", CODE_DTYPES, ids=str)
def test_round_trip_error_is_within_the_bucket_widths(nbits, h, code_dtype):
    g = torch.Generator().manual_seed(nbits * 1000 + h)
    centroids = torch.randn(13, h, generator=g)
    codes = torch.randint(0, 13, (300,), generator=g)
    x = centroids[codes] + 0.5 * torch.randn(300, h, generator=g)
    residual = x - centroids[codes]
    cutoffs, weights = train_residual_codec(residual, nbits)
    packed = compress_residuals(x, codes.to(code_dtype), centroids, cutoffs, nbits)
    assert packed.dtype == torch.uint8 and packed.shape == (300, h * nbits // 8)
    got = decompress_residuals(packed, codes.to(code_dtype), centroids, weights, nbits)
    # Bucket i spans (cutoffs[i-1], cutoffs[i]]; the outer two extend to the extreme residuals. Each
    # reconstruction weight lies inside its bucket, so the error is at most the bucket's width.
    lo = torch.cat([residual.min().reshape(1), cutoffs])
    hi = torch.cat([cutoffs, residual.max().reshape(1)])
    bucket = torch.bucketize(residual, cutoffs)
    assert bool(((weights >= lo) & (weights <= hi)).all())
    err = (got - x).abs()
    assert bool((err <= (hi - lo)[bucket] + 1e-6).all()), float((err - (hi - lo)[bucket]).max())


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_packed_layout_lowest_bits_first_and_ties_to_the_lower_bucket(nbits):
    h = 16
    k = 1 << nbits
    cutoffs = torch.arange(1, k, dtype=torch.float32) - k / 2  # integers: ties are exact
    weights = torch.arange(k, dtype=torch.float32)
    g = torch.Generator().manual_seed(nbits)
    buckets = torch.randint(0, k, (5, h), generator=g)
    # A residual equal to cutoffs[i - 1] belongs to bucket i - 1 (bucketize, right=False); midpoints to i.
    lower = torch.cat([cutoffs[:1] - 1, cutoffs])
    x = torch.where(torch.rand(5, h, generator=g) < 0.5, lower[buckets] + 0.5, lower[buckets])
    bucket_of_x = torch.where(x == lower[buckets], (buckets - 1).clamp_min(0), buckets)
    bucket_of_x[buckets == 0] = 0
    centroids = torch.zeros(1, h)
    codes = torch.zeros(5, dtype=torch.int32)
    packed = compress_residuals(x, codes, centroids, cutoffs, nbits)
    for dim in range(h):
        byte, bit = (dim * nbits) // 8, (dim * nbits) % 8
        assert torch.equal((packed[:, byte].long() >> bit) & (k - 1), bucket_of_x[:, dim]), dim
    assert torch.equal(decompress_residuals(packed, codes, centroids, weights, nbits), weights[bucket_of_x])


def test_train_codec_quantiles_and_the_seeded_sample(monkeypatch):
    g = torch.Generator().manual_seed(5)
    r = torch.randn(200, 8, generator=g)
    cutoffs, weights = train_residual_codec(r, 2, method="quantile")
    torch.testing.assert_close(cutoffs, torch.quantile(r.flatten(), torch.tensor([0.25, 0.5, 0.75])))
    torch.testing.assert_close(weights, torch.quantile(r.flatten(), torch.tensor([0.125, 0.375, 0.625, 0.875])))
    r = torch.randn(1000, 16, generator=g)
    monkeypatch.setattr(residual_mod, "SAMPLE", 4096)  # above SAMPLE values: a seeded sample, deterministic
    a, b = train_residual_codec(r, 4, method="quantile"), train_residual_codec(r, 4, method="quantile")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert bool((a[0][1:] >= a[0][:-1]).all()) and bool((a[1][1:] >= a[1][:-1]).all())
    torch.testing.assert_close(a[0], torch.quantile(r.flatten(), torch.arange(1, 16) / 16.0), atol=0.12, rtol=0)  # 4 sd


@pytest.mark.parametrize("nbits, cutoffs, weights", [
    # The Lloyd-Max quantizers of a standard normal (Max, 1960): 1 bit +-0.7979 (sqrt(2 / pi)); 2 bits
    # +-0.4528 and +-1.5104 with cutoffs 0 and +-0.9816.
    (1, [0.0], [-0.7979, 0.7979]),
    (2, [-0.9816, 0.0, 0.9816], [-1.5104, -0.4528, 0.4528, 1.5104]),
])
def test_lloyd_codec_finds_the_least_squares_quantizer_of_a_normal(nbits, cutoffs, weights):
    r = torch.randn(4096, 256, generator=torch.Generator().manual_seed(nbits))
    got_c, got_w = train_residual_codec(r, nbits, method="lloyd")
    # 20 rounds from the quantiles on 2^20 samples: within 0.02 of the optimum (measured: 0.01).
    torch.testing.assert_close(got_c, torch.tensor(cutoffs), atol=0.02, rtol=0)
    torch.testing.assert_close(got_w, torch.tensor(weights), atol=0.02, rtol=0)


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_lloyd_codec_has_less_squared_error_than_quantiles_on_peaked_residuals(nbits):
    r = torch.distributions.Laplace(0.0, 0.05).sample((2000, 128))  # residuals peak at 0, with long tails
    codes, centroids = torch.zeros(2000, dtype=torch.int32), torch.zeros(1, 128)

    def mse(method):
        c, w = train_residual_codec(r, nbits, method=method)
        back = decompress_residuals(compress_residuals(r, codes, centroids, c, nbits), codes, centroids, w, nbits)
        return float(((back - r) ** 2).mean())

    assert mse("lloyd") < mse("quantile") * (0.95 if nbits < 4 else 1.0)


def test_codec_method_defaults_to_lloyd_and_refuses_unknown_ones():
    r = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    for nbits in (1, 2, 4):
        a, b = train_residual_codec(r, nbits), train_residual_codec(r, nbits, method="lloyd")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[1], train_residual_codec(r, nbits, method="quantile")[1])
    with pytest.raises(ValueError, match=r"method must be one of \('lloyd', 'quantile'\), got 'kmeans'"):
        train_residual_codec(r, 2, method="kmeans")


def test_uint16_codes_above_32767_index_correctly():
    h, nbits = 8, 2
    centroids = torch.randn(40000, h)
    codes = torch.tensor([0, 32767, 32768, 39999], dtype=torch.int64)
    x = centroids[codes] + 0.1
    cutoffs, weights = torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([-1.5, -0.5, 0.5, 1.5])
    packed = compress_residuals(x, codes.to(torch.uint16), centroids, cutoffs, nbits)
    got = decompress_residuals(packed, codes.to(torch.uint16), centroids, weights, nbits)
    torch.testing.assert_close(got, centroids[codes] + 0.5)


# ---------------------------------------------------------------------------------------------------------
# The operator: each CPU ISA path, Triton, the reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
@pytest.mark.parametrize("nbits", [1, 2, 4])
@pytest.mark.parametrize("h", [8, 64, 128])
@pytest.mark.parametrize("code_dtype", CODE_DTYPES, ids=str)
def test_cpp_path_matches_reference(isa, nbits, h, code_dtype):
    for lq in (1, 7, 31):
        case = _corpus(LENGTHS, h, nbits, seed=nbits * 97 + h + lq, lq=lq, code_dtype=code_dtype)
        args, nb = _args(case)
        _check(maxsim_residual(*args, nbits=nb, backend="cpp"), case)
    docs = torch.tensor([3, 0, 3, 9, 6, 1, 3])  # repeats, empty documents, out of order
    _check(maxsim_residual(*args, nbits=nb, docs=docs, backend="cpp"), case, docs)
    empty = torch.empty(0, dtype=torch.int64)
    assert maxsim_residual(*args, nbits=nb, docs=empty, backend="cpp").shape == (0,)


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
@pytest.mark.parametrize("lq", [16, 17, 70])  # whole vectors, a partial one, several passes (> 64 on AVX-512)
def test_cpp_path_query_lengths_and_odd_h(isa, lq):
    for h, nbits in ((24, 1), (40, 2), (136, 4)):  # H not a multiple of the vector width: scalar tails
        case = _corpus([5, 0, 33, 16], h, nbits, seed=lq + h, lq=lq)
        args, nb = _args(case)
        _check(maxsim_residual(*args, nbits=nb, backend="cpp"), case)


@needs_cpp
def test_cpp_results_do_not_depend_on_thread_count():
    case = _corpus(LENGTHS * 3, 64, 2, seed=3)
    args, nb = _args(case)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = maxsim_residual(*args, nbits=nb, backend="cpp")
        torch.set_num_threads(2)
        two = maxsim_residual(*args, nbits=nb, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_triton
@pytest.mark.parametrize("nbits", [1, 2, 4])
@pytest.mark.parametrize("h", [8, 64, 128])
def test_triton_matches_reference(nbits, h):
    code_dtype = CODE_DTYPES[(nbits + h) % 2]
    case = _corpus([0, 3, 1, 20, 0, 16, 2], h, nbits, seed=nbits * 31 + h, lq=7, code_dtype=code_dtype)
    args, nb = _args(case, TRITON_DEVICE)
    _check(maxsim_residual(*args, nbits=nb, backend=TRITON_BACKEND), case)
    docs = torch.tensor([3, 0, 3, 6, 4])
    _check(maxsim_residual(*args, nbits=nb, docs=docs.to(TRITON_DEVICE), backend=TRITON_BACKEND), case, docs)


@needs_triton
@pytest.mark.parametrize("code_dtype", CODE_DTYPES, ids=str)
def test_triton_long_query_runs_in_chunks(code_dtype):
    case = _corpus([4, 0, 18], 16, 4, seed=11, lq=70, code_dtype=code_dtype)
    args, nb = _args(case, TRITON_DEVICE)
    _check(maxsim_residual(*args, nbits=nb, backend=TRITON_BACKEND), case)
    empty = torch.empty(0, dtype=torch.int64, device=TRITON_DEVICE)
    assert maxsim_residual(*args, nbits=nb, docs=empty, backend=TRITON_BACKEND).shape == (0,)


@pytest.mark.parametrize("code_dtype", CODE_DTYPES, ids=str)
def test_reference_backend_and_float64(code_dtype):
    case = _corpus(LENGTHS, 64, 2, seed=2, code_dtype=code_dtype)
    args, nb = _args(case)
    docs = torch.tensor([1, 1, 4, 3])
    _check(maxsim_residual(*args, nbits=nb, docs=docs, backend="reference"), case, docs)
    got = maxsim_residual(args[0].double(), *args[1:], nbits=nb)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _truth(case))


def test_reference_matches_decompress_then_maxsim_packed():
    from fastrank.ops.maxsim_packed import maxsim_packed_ref

    case = _corpus(LENGTHS, 64, 4, seed=9)
    (q, packed, codes, offsets, centroids, weights), nb = _args(case)
    tokens = decompress_residuals(packed, codes, centroids, weights, nb)
    torch.testing.assert_close(maxsim_residual_ref(q, packed, codes, offsets, centroids, weights, nbits=nb),
                               maxsim_packed_ref(q, tokens, offsets))
    # An empty document scores 0, as maxsim_packed's convention.
    assert float(maxsim_packed_ref(q, tokens, offsets)[0]) == 0.0


def test_no_documents_no_query_tokens_and_no_grad():
    case = _corpus([0, 4, 2], 16, 2, seed=1)
    args, nb = _args(case)
    q = args[0].clone().requires_grad_()
    got = maxsim_residual(q, *args[1:], nbits=nb)
    assert not got.requires_grad and got.shape == (3,) and float(got[0]) == 0.0
    assert torch.equal(maxsim_residual(args[0][:0], *args[1:], nbits=nb), torch.zeros(3))
    assert maxsim_residual(*args, nbits=nb, docs=torch.empty(0, dtype=torch.int64)).shape == (0,)


@needs_cpp
def test_dispatch_picks_cpp_and_explain_names_the_isa_path():
    case = _corpus(LENGTHS, 64, 2, seed=4)
    args, _ = _args(case)
    ex = dispatch.explain("maxsim_residual", args)
    isa = cpu_isa.selected()
    if isa != "scalar":
        assert ex.chosen == "cpp", str(ex)
        assert f"ISA path {isa}" in ex.kernel and "nbits=2" in ex.kernel, ex.kernel
    assert ex["reference"] == [] and ex["triton"], str(ex)
    from fastrank.ops.maxsim_residual import CPU_KERNELS, _cpp_describe

    assert "avx512bf16" in _cpp_describe(isa="amx", nbits=2)  # amx runs the avx512bf16 unit, and says so
    assert set(CPU_KERNELS) == set(cpu_isa.PATHS)


@needs_cpp
def test_forced_unavailable_isa_path_is_refused_with_the_reason():
    missing = [name for name in cpu_isa.PATHS if SUPPORT[name]]
    if not missing:
        pytest.skip("this CPU runs every path")
    case = _corpus([3], 8, 1, seed=0)
    (q, packed, codes, offsets, centroids, weights), nb = _args(case)
    out = torch.empty(1)
    with pytest.raises(ValueError, match=f"'{missing[0]}' cannot run here"):
        EXT.maxsim_residual_forward(missing[0], q, packed, codes, offsets, None, centroids, weights, nb, out, 1)


# ---------------------------------------------------------------------------------------------------------
# Bad input: each error names its argument
# ---------------------------------------------------------------------------------------------------------
def _bad_cases():
    def edit(**changes):
        return changes

    return [
        ("q 3-D", edit(q=lambda c: c["q"][None]), ValueError, "q must have shape"),
        ("q int", edit(q=lambda c: c["q"].int()), TypeError, "q must be float32"),
        ("nbits 3", edit(nbits=lambda c: 3), ValueError, "nbits must be one of"),
        ("H * nbits", edit(q=lambda c: c["q"][:, :12], nbits=lambda c: 1), ValueError, r"H \* nbits"),
        ("centroids H", edit(centroids=lambda c: c["centroids"][:, :8]), ValueError, "centroids must be float32"),
        ("packed dtype", edit(packed=lambda c: c["packed"].to(torch.int8)), ValueError, "packed must be uint8"),
        ("packed width", edit(packed=lambda c: c["packed"][:, :2]), ValueError, "packed must be uint8"),
        ("codes float", edit(codes=lambda c: c["codes"].float()), TypeError, "codes must be int32 or uint16"),
        ("codes length", edit(codes=lambda c: c["codes"][:-1]), ValueError, "codes must have shape"),
        ("weights", edit(weights=lambda c: c["weights"][:3]), ValueError, "weights must have shape"),
        ("offsets last", edit(offsets=lambda c: c["offsets"] + torch.tensor([0] * 3 + [1])), ValueError, "offsets"),
        ("offsets dtype", edit(offsets=lambda c: c["offsets"].int()), TypeError, "offsets must be int64"),
        ("docs range", edit(docs=lambda c: torch.tensor([0, 3])), ValueError, "docs must index"),
    ]


@pytest.mark.parametrize("name,changes,error,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_input_is_a_clear_error(name, changes, error, match, backend):
    case = _corpus([2, 0, 5], 16, 2, seed=8)
    case["docs"] = None
    for key, fn in changes.items():
        case[key] = fn(case)
    with pytest.raises(error, match=match):
        maxsim_residual(case["q"], case["packed"], case["codes"], case["offsets"], case["centroids"], case["weights"],
                        nbits=case["nbits"], docs=case["docs"], backend=backend)


BACKENDS = [pytest.param("cpp", marks=needs_cpp), "reference",
            pytest.param(TRITON_BACKEND, marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_code", [11, 40000, -1])
def test_codes_outside_the_centroids_are_refused_by_every_backend(backend, bad_code):
    code_dtype = torch.uint16 if bad_code == 40000 else torch.int32
    case = _corpus([2, 0, 5], 16, 2, seed=8, code_dtype=code_dtype)
    if bad_code < 0 and code_dtype == torch.uint16:
        pytest.skip("uint16 has no negative code")
    device = TRITON_DEVICE if backend == TRITON_BACKEND else "cpu"
    (q, packed, codes, offsets, centroids, weights), nb = _args(case, device)
    codes = codes.clone()
    codes[4] = bad_code  # a row of document 2
    with pytest.raises(ValueError, match=rf"codes\[\d+\] = {bad_code}.*centroids"):
        maxsim_residual(q, packed, codes, offsets, centroids, weights, nbits=nb, backend=backend)
    with pytest.raises(ValueError, match="codes"):
        maxsim_residual(q, packed, codes, offsets, centroids, weights, nbits=nb,
                        docs=torch.tensor([2, 0], device=device), backend=backend)
    # Rows outside the scored documents are not read, so their codes are not checked.
    got = maxsim_residual(q, packed, codes, offsets, centroids, weights, nbits=nb,
                          docs=torch.tensor([0, 1], device=device), backend=backend)
    assert got.shape == (2,)


@needs_cpp
def test_extension_checks_its_tensors_naming_the_argument():
    case = _corpus([2, 0, 5], 16, 2, seed=8)
    (q, packed, codes, offsets, centroids, weights), nb = _args(case)
    isa = cpu_isa.selected()
    out = torch.empty(3)

    def call(**kw):
        a = dict(q=q, packed=packed, codes=codes, offsets=offsets, docs=None, centroids=centroids, weights=weights,
                 nbits=nb, out=out, threads=1)
        a.update(kw)
        EXT.maxsim_residual_forward(isa, a["q"], a["packed"], a["codes"], a["offsets"], a["docs"], a["centroids"],
                                    a["weights"], a["nbits"], a["out"], a["threads"])

    call()
    torch.testing.assert_close(out, maxsim_residual_ref(q, packed, codes, offsets, centroids, weights, nbits=nb))
    bad = [
        (dict(nbits=3), "nbits must be 1, 2 or 4"),
        (dict(nbits=4), "packed must have shape"),
        (dict(q=q.double()), "q must be float32"),
        (dict(q=torch.randn(4, 3)), "H \\* nbits must be a positive multiple of 8"),
        (dict(q=torch.randn(4)), "q must have shape \\(Lq, H\\)"),
        (dict(packed=packed.to(torch.int8)), "packed must be uint8"),
        (dict(codes=codes.float()), "codes must be int32, uint16 or int64"),
        (dict(codes=codes[:-1]), "codes must have shape"),
        (dict(centroids=centroids[:, :8]), "centroids must have shape"),
        (dict(weights=weights[:2]), "weights must have shape"),
        (dict(weights=torch.stack([weights, weights], 1)[:, 0]), "weights must be contiguous"),
        (dict(offsets=torch.tensor([0, 2, 1, 7])), "offsets must be non-decreasing"),
        (dict(offsets=torch.tensor([0, 2, 2, 8])), "offsets\\[-1\\] must equal"),
        (dict(docs=torch.tensor([0, 5, 1])), "docs\\[1\\] = 5 does not index"),
        (dict(out=torch.empty(2)), "out must have shape"),
        (dict(threads=0), "threads must be >= 1"),
        (dict(codes=torch.tensor([0, 1, 2, 3, 99, 5, 6], dtype=torch.int32)), "codes\\[4\\] = 99 does not index"),
        (dict(q=q[:, :8].contiguous()), "packed must have shape|centroids must have shape"),
        (dict(q=torch.randn(16, 32)[:, ::2]), "q must have stride 1"),
        (dict(packed=torch.zeros(7, 8, dtype=torch.uint8)[:, ::2]), "packed must have stride 1"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            call(**kw)


# ---------------------------------------------------------------------------------------------------------
# normalize=True: each decompressed row scaled to unit length before scoring (ColBERTv2's decompression)
def _normalized_truth(case, docs=None):
    (q, packed, codes, offsets, centroids, weights), nbits = _args(case)
    return maxsim_residual_ref(q.double(), packed, codes, offsets, centroids, weights, nbits=nbits, docs=docs,
                               normalize=True)


def _normalized_tolerance(case) -> float:
    # Unit rows: each dot is at most |q_l|, its float32 error within (H + the norm's own H terms + a few
    # roundings) * eps32 * |q_l|; a score adds Lq of them.
    q = case["q"].double()
    h = q.shape[1]
    return 2 * q.shape[0] * q.norm(dim=1).max().item() * (2 * h + 8) * EPS32 + 1e-6


def _check_normalized(got, case, docs=None):
    want = _normalized_truth(case, docs)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=_normalized_tolerance(case))


def test_normalize_reference_is_maxsim_over_unit_rows():
    from fastrank.ops.maxsim_packed import maxsim_packed_ref

    case = _corpus(LENGTHS, 32, 2, seed=41)
    (q, packed, codes, offsets, centroids, weights), nbits = _args(case)
    rows = torch.nn.functional.normalize(decompress_residuals(packed, codes, centroids, weights, nbits), dim=1)
    want = maxsim_packed_ref(q, rows, offsets)
    got = maxsim_residual_ref(q, packed, codes, offsets, centroids, weights, nbits=nbits, normalize=True)
    torch.testing.assert_close(got, want)
    raw = maxsim_residual_ref(q, packed, codes, offsets, centroids, weights, nbits=nbits)
    assert (got - raw).abs().max() > 1e-3  # these rows are far from unit length: the flag changes the scores


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_cpp_path_normalize_matches_reference(isa, nbits):
    for h in (8, 64, 136):
        case = _corpus(LENGTHS, h, nbits, seed=nbits * 13 + h, lq=9)
        args, nb = _args(case)
        _check_normalized(maxsim_residual(*args, nbits=nb, normalize=True, backend="cpp"), case)
    docs = torch.tensor([3, 0, 3, 9, 6])
    _check_normalized(maxsim_residual(*args, nbits=nb, docs=docs, normalize=True, backend="cpp"), case, docs)


@needs_triton
@pytest.mark.parametrize("nbits", [2, 4])
def test_triton_normalize_matches_reference(nbits):
    case = _corpus([0, 3, 1, 20, 0, 16, 2], 64, nbits, seed=nbits * 7, lq=5)
    args, nb = _args(case, TRITON_DEVICE)
    _check_normalized(maxsim_residual(*args, nbits=nb, normalize=True, backend=TRITON_BACKEND), case)
