"""The packed MaxSim Triton kernels (fastrank.ops.maxsim_packed_triton) against maxsim_packed_ref, the spec.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set in conftest.py before fastrank is
imported), or compiled on CUDA with TRITON_INTERPRET=0 on a GPU machine. The kernels are called directly
(packed_forward / packed_backward, which also pins the argmax contract the autograd relies on) and through
the public maxsim_packed with the Triton backend forced.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrank.ops.maxsim_packed import maxsim_packed, maxsim_packed_ref, quantize_tokens

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available()
RUNS = HAS_TRITON and (INTERPRET or CUDA)
DEVICE = "cpu" if INTERPRET else "cuda"
BACKEND = "triton_interpret" if INTERPRET else "triton"

pytestmark = pytest.mark.skipif(not RUNS, reason="needs triton with TRITON_INTERPRET=1 (CPU) or CUDA")
if RUNS:
    from fastrank.ops.maxsim import parallel_programs
    from fastrank.ops.maxsim_triton_shared import loop_split
    from fastrank.ops.maxsim_packed_triton import packed_backward, packed_forward

# Kernel error vs the float64 truth computed from the same (rounded) inputs: float32 accumulation only,
# plus, for gradients, the final rounding to the input dtype. int8 adds the float32 rounding of
# scale * code in the reference's dequantized copy.
FWD_TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-5, 2e-4), torch.bfloat16: (2e-5, 2e-4)}
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}
INT8_TOL = (1e-5, 2e-4)

# Empty documents first, in the middle and last; one-token documents; a document of exactly one 64-row
# tile, one a row longer, and one spanning three tiles.
LENGTHS = [0, 3, 1, 130, 0, 64, 65, 1, 7, 0]


def _offsets(lengths) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64).cumsum(0)])


def _case(lengths, lq, h, *, shared, masked, seed, dtype=torch.float32):
    """Fresh random inputs (never zeros) on DEVICE: q (Fq, Lq, H), tokens (T, H), offsets, q_mask or None
    (random, with at least one valid token per query)."""
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    offsets = _offsets(lengths)
    fq = 1 if shared else n
    q = torch.randn(fq, lq, h, generator=g).to(dtype)
    tokens = torch.randn(int(offsets[-1]), h, generator=g).to(dtype)
    q_mask = None
    if masked:
        q_mask = torch.rand(fq, lq, generator=g) < 0.7
        q_mask[:, 0] = True
    return q.to(DEVICE), tokens.to(DEVICE), offsets.to(DEVICE), None if q_mask is None else q_mask.to(DEVICE)


def _public(q, q_mask):
    """The (Fq, Lq, H) kernel form back in maxsim_packed's form: (Lq, H) for a shared query."""
    if q.shape[0] == 1:
        return q[0], (None if q_mask is None else q_mask[0])
    return q, q_mask


def _reference(q, tokens, offsets, q_mask, grad=None, scales=None):
    """float64 truth of the scores and, given an upstream grad, of (dq, dtokens) in the kernel's shapes."""
    q64 = q.detach().double().requires_grad_()
    t64 = tokens.detach() if scales is not None else tokens.detach().double().requires_grad_()
    qp, mp = _public(q64, q_mask)
    ref = maxsim_packed_ref(qp, t64, offsets, q_mask=mp, scales=scales)
    if grad is None:
        return ref.detach()
    # Unused when no document has a row (T = 0): those gradients are zeros.
    dq, dt = torch.autograd.grad(ref, (q64, t64), grad.double(), allow_unused=True, materialize_grads=True)
    return ref.detach(), dq, dt


def _reference_argmax(q, tokens, offsets, q_mask):
    """The argmax contract: the winning row relative to the document's start (first on ties), -1 for masked
    query tokens and empty documents."""
    n = offsets.numel() - 1
    out = torch.full((n, q.shape[1]), -1, dtype=torch.int32)
    for i in range(n):
        a, b = int(offsets[i]), int(offsets[i + 1])
        if a == b:
            continue
        f = 0 if q.shape[0] == 1 else i
        s = q[f].double().cpu() @ tokens[a:b].double().cpu().T
        best = s.max(dim=1).indices.to(torch.int32)
        if q_mask is not None:
            best = torch.where(q_mask[f].cpu(), best, -1)
        out[i] = best
    return out


def _upstream(n, seed=7):
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) + 0.5).to(DEVICE)


def _check_direct(q, tokens, offsets, q_mask, *, deterministic=False):
    dtype = q.dtype
    n = offsets.numel() - 1
    out, arg = packed_forward(q, tokens, offsets, q_mask, None, True)
    grad = _upstream(n)
    ref, rq, rt = _reference(q, tokens, offsets, q_mask, grad)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert arg.dtype == torch.int32 and arg.shape == (n, q.shape[1])
    torch.testing.assert_close(out.double(), ref, rtol=FWD_TOL[dtype][0], atol=FWD_TOL[dtype][1])
    torch.testing.assert_close(arg.cpu(), _reference_argmax(q, tokens, offsets, q_mask), rtol=0, atol=0)
    dq, dt = packed_backward(q, tokens, offsets, grad, arg, True, True, deterministic)
    assert dq.dtype == dtype and dq.shape == q.shape and dt.dtype == dtype and dt.shape == tokens.shape
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(dq.double(), rq, rtol=rtol, atol=atol)
    torch.testing.assert_close(dt.double(), rt, rtol=rtol, atol=atol)
    return out, arg, dq, dt


# ---------------------------------------------------------------------------------------------------------
# Kernels vs the reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lq", [1, 7, 32])
@pytest.mark.parametrize("h", [48, 100])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_q", "per_doc_q"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "q_mask"])
def test_kernels_match_reference(lq, h, shared, masked):
    _check_direct(*_case(LENGTHS, lq, h, shared=shared, masked=masked, seed=lq * 1000 + h * 10 + 2 * shared + masked))


def _config_count() -> int:
    if not RUNS:
        return 1
    from fastrank.ops.maxsim_triton_shared import FORWARD_CONFIGS

    return len(FORWARD_CONFIGS)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter launches one config at a time; a GPU autotunes")
@pytest.mark.parametrize("config", range(_config_count()))
def test_every_forward_config_matches_reference(config, monkeypatch):
    """Each config of the autotuned packed forward (issue 13) against the reference: a shared query (held
    across a program's documents) and one query per document, H within one block and split over blocks,
    document counts that DOCS does not divide, empty documents and documents past two 128-row tiles."""
    import fastrank.ops.maxsim_triton_shared as triton_shared

    monkeypatch.setattr(triton_shared, "INTERPRETER_CONFIG", config)
    for shared, h in ((True, 48), (False, 48), (True, 80), (False, 80)):
        _check_direct(*_case([0, 3, 260, 0, 64, 129, 1], 7, h, shared=shared, masked=True, seed=config * 10 + h))


def test_grid_limit_is_a_clear_error():
    """More documents than CUDA's 2^31 - 1 programs is an error naming the limit, raised before any output is
    allocated (the offsets here are a broadcast view: nothing of that size exists)."""
    q, tokens = torch.randn(1, 3, 8, device=DEVICE), torch.randn(0, 8, device=DEVICE)
    offsets = torch.zeros(1, dtype=torch.int64, device=DEVICE).expand(2**31 + 1)
    with pytest.raises(ValueError, match=r"maxsim_packed: .*grid axis x, more than CUDA's"):
        packed_forward(q, tokens, offsets, None, None, False)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_q", "per_doc_q"])
def test_full_query_tile(shared):
    # Lq = 64 fills the query tile, which halves the forward's doc tile to 32 rows.
    _check_direct(*_case(LENGTHS, 64, 128, shared=shared, masked=True, seed=64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the interpreter's tl.dot multiplies bfloat16's raw uint16 storage; bf16 is checked on a GPU")
    _check_direct(*_case(LENGTHS, 7, 100, shared=True, masked=True, seed=16, dtype=dtype))
    _check_direct(*_case(LENGTHS, 7, 100, shared=False, masked=False, seed=17, dtype=dtype))


def test_strided_inputs():
    # Only the embedding dim must be unit-stride: q strided on its other dims, tokens with a row pitch > H,
    # and a q whose embedding dim is not unit-stride (the launcher copies that one).
    q, tokens, offsets, q_mask = _case(LENGTHS, 7, 48, shared=False, masked=True, seed=3)
    wide = torch.randn(tokens.shape[0], 80, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    wide[:, 16:64] = tokens
    q_strided = torch.randn(q.shape[1], q.shape[0], 60, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    q_strided[..., 5:53] = q.transpose(0, 1)
    _check_direct(q_strided.transpose(0, 1)[..., 5:53], wide[:, 16:64], offsets, q_mask)
    _check_direct(q.transpose(1, 2).contiguous().transpose(1, 2), tokens, offsets, q_mask)


def test_no_argmax_without_backward():
    q, tokens, offsets, q_mask = _case(LENGTHS, 7, 48, shared=True, masked=False, seed=5)
    out, arg = packed_forward(q, tokens, offsets, q_mask, None, False)
    assert arg.shape == (0,) and arg.dtype == torch.int32
    torch.testing.assert_close(out.double(), _reference(q, tokens, offsets, q_mask), rtol=1e-5, atol=1e-4)


def test_ties_keep_the_earliest_row():
    # Doc 1 repeats its row 2 at rows 40 and 100 (other tiles) and row 5 at row 6 (same tile), so whichever
    # of those rows wins, the earliest copy must be reported, within a tile and across tiles.
    q, tokens, offsets, _ = _case([3, 130, 2], 7, 48, shared=True, masked=False, seed=11)
    start = int(offsets[1])
    for dup, orig in ((40, 2), (100, 2), (6, 5)):
        tokens[start + dup] = tokens[start + orig]
    q[0, :3] = tokens[start + 2]  # these query tokens are most similar to the duplicated row
    q[0, 3:5] = tokens[start + 5]
    _, arg = packed_forward(q, tokens, offsets, None, None, True)
    assert arg[1, :3].tolist() == [2, 2, 2] and arg[1, 3:5].tolist() == [5, 5]
    torch.testing.assert_close(arg.cpu(), _reference_argmax(q, tokens, offsets, None), rtol=0, atol=0)


def test_nan_propagates():
    q, tokens, offsets, q_mask = _case(LENGTHS, 7, 48, shared=True, masked=True, seed=12)
    q_mask[0, 1:] = True
    q_mask[0, 3] = False
    doc = 3
    t_nan = tokens.clone()
    t_nan[int(offsets[doc]) + 70] = float("nan")  # in the second tile of a three-tile document
    out, _ = packed_forward(q, t_nan, offsets, q_mask, None, True)
    ref = _reference(q, t_nan, offsets, q_mask)
    assert torch.isnan(out[doc]) and torch.isnan(ref[doc])
    keep = torch.arange(len(LENGTHS), device=DEVICE) != doc
    torch.testing.assert_close(out[keep].double(), ref[keep], rtol=1e-5, atol=1e-4)
    # NaN in a valid query token reaches every non-empty document; in a masked one it reaches none.
    empty = torch.tensor(LENGTHS, device=DEVICE) == 0
    for row, expect_nan in ((1, True), (3, False)):
        q_nan = q.clone()
        q_nan[0, row, 10] = float("nan")
        out, _ = packed_forward(q_nan, tokens, offsets, q_mask, None, False)
        ref = _reference(q_nan, tokens, offsets, q_mask)
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
        assert torch.equal(torch.isnan(out), ~empty if expect_nan else torch.zeros_like(empty))
        assert (out[empty] == 0).all()


def test_all_empty_documents():
    # N > 0 documents and no token rows at all: every score 0, every argmax -1, zero gradients.
    q = torch.randn(1, 7, 48, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    tokens = torch.empty(0, 48, device=DEVICE)
    offsets = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    out, arg = packed_forward(q, tokens, offsets, None, None, True)
    assert torch.equal(out, torch.zeros(3, device=DEVICE)) and (arg == -1).all()
    dq, dt = packed_backward(q, tokens, offsets, _upstream(3), arg, True, True, False)
    assert torch.equal(dq, torch.zeros_like(q)) and dt.shape == (0, 48)


# ---------------------------------------------------------------------------------------------------------
# The shared query's dq: a reduction over documents, split with atomics unless deterministic
# ---------------------------------------------------------------------------------------------------------
def _many_docs(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 13, (40,), generator=g).tolist()
    lengths[5] = 0
    lengths[6] = 70
    return lengths


@pytest.mark.parametrize("deterministic", [False, True])
def test_shared_query_reduction(deterministic):
    lengths = _many_docs(20)
    q, tokens, offsets, q_mask = _case(lengths, 7, 48, shared=True, masked=True, seed=21)
    split = loop_split(1, len(lengths), deterministic, parallel_programs(q.device))  # 48 fits one H block: one program
    assert (split > 1) == (not deterministic)  # the atomic path is the one under test
    _, arg, dq, dt = _check_direct(q, tokens, offsets, q_mask, deterministic=deterministic)
    dq2, dt2 = packed_backward(q, tokens, offsets, _upstream(len(lengths)), arg, True, True, deterministic)
    if deterministic:
        assert torch.equal(dq, dq2) and torch.equal(dt, dt2)
    only_dq, none_dt = packed_backward(q, tokens, offsets, _upstream(len(lengths)), arg, True, False, deterministic)
    assert none_dt is None
    torch.testing.assert_close(only_dq, dq, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# int8 tokens with per-token scales (forward only)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_q", "per_doc_q"])
def test_int8_tokens(q_dtype, shared):
    q, tokens, offsets, q_mask = _case(LENGTHS, 7, 100, shared=shared, masked=True, seed=30 + shared)
    q = q.to(q_dtype)
    codes, scales = quantize_tokens(tokens)
    out, arg = packed_forward(q, codes, offsets, q_mask, scales, True)
    ref = _reference(q, codes, offsets, q_mask, scales=scales)  # float64 q against the dequantized rows
    torch.testing.assert_close(out.double(), ref, rtol=INT8_TOL[0], atol=INT8_TOL[1])
    dequantized = codes.float() * scales[:, None]
    torch.testing.assert_close(arg.cpu(), _reference_argmax(q, dequantized, offsets, q_mask), rtol=0, atol=0)
    with pytest.raises(TypeError, match="forward only"):
        packed_backward(q, codes, offsets, _upstream(len(LENGTHS)), arg, True, False, False)


# ---------------------------------------------------------------------------------------------------------
# Through the public function
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False], ids=["shared_q", "per_doc_q"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_public_function(shared, deterministic):
    q, tokens, offsets, q_mask = _case(LENGTHS, 7, 100, shared=shared, masked=True, seed=40 + shared)
    qp, mp = _public(q, q_mask)
    qp = qp.detach().requires_grad_()
    t = tokens.detach().requires_grad_()
    out = maxsim_packed(qp, t, offsets, q_mask=mp, backend=BACKEND, deterministic=deterministic)
    grad = _upstream(len(LENGTHS))
    q64 = qp.detach().double().requires_grad_()
    t64 = tokens.double().requires_grad_()
    ref = maxsim_packed_ref(q64, t64, offsets, q_mask=mp)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    dq, dt = torch.autograd.grad(out, (qp, t), grad)
    rq, rt = torch.autograd.grad(ref, (q64, t64), grad.double())
    torch.testing.assert_close(dq.double(), rq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dt.double(), rt, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the inference path skips the custom op
        torch.testing.assert_close(maxsim_packed(qp, t, offsets, q_mask=mp, backend=BACKEND), out.detach())


def test_public_function_int8():
    q, tokens, offsets, q_mask = _case(LENGTHS, 32, 48, shared=True, masked=True, seed=50)
    codes, scales = quantize_tokens(tokens)
    out = maxsim_packed(q[0], codes, offsets, q_mask=q_mask[0], scales=scales, backend=BACKEND)
    ref = maxsim_packed_ref(q[0].double(), codes, offsets, q_mask=q_mask[0], scales=scales)
    torch.testing.assert_close(out.double(), ref, rtol=INT8_TOL[0], atol=INT8_TOL[1])


@st.composite
def _problems(draw):
    lengths = draw(st.lists(st.integers(0, 80), min_size=1, max_size=10))
    lq = draw(st.integers(1, 40))
    h = draw(st.integers(1, 96))
    return _case(lengths, lq, h, shared=draw(st.booleans()), masked=draw(st.booleans()),
                 seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_property(problem):
    _check_direct(*problem, deterministic=True)


# ---------------------------------------------------------------------------------------------------------
# Without Triton
# ---------------------------------------------------------------------------------------------------------
def test_imports_without_triton_and_says_why_it_cannot_run():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from fastrank.ops import maxsim_packed_triton as m\n"
        "off = torch.tensor([0, 2]); q = torch.randn(1, 3, 8); t = torch.randn(2, 8)\n"
        "for call in (lambda: m.packed_forward(q, t, off, None, None, True),\n"
        "             lambda: m.packed_backward(q, t, off, torch.ones(1), torch.zeros(1, 3, dtype=torch.int32),\n"
        "                                       True, True, False)):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as e:\n"
        "        assert 'triton is not importable' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('no error without triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
