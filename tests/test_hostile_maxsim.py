"""Hostile inputs and numeric edge cases of maxsim and maxsim_packed (issue 12): long queries, subnormal
bfloat16 on the CPU's BF16 instructions, double backward, torch.compile with changing shapes, ties across
the Triton kernels' document blocks, and the flags the Triton interpreter cannot check (precision,
atomics)."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import fastrank.ops.maxsim as maxsim_ops
from fastrank import cpu_isa, dispatch, maxsim, maxsim_packed, maxsim_packed_ref, maxsim_ref

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CPU_BACKENDS = ["cpp"] + (["triton_interpret"] if HAS_TRITON and INTERPRET else [])
needs_interpreter = pytest.mark.skipif("triton_interpret" not in CPU_BACKENDS, reason="needs triton and TRITON_INTERPRET=1")


def _grads_match(out, ref, inputs, inputs64, *, rtol=1e-5, atol=1e-4):
    """Forward and gradients (a non-unit upstream gradient) of float32 kernels against the float64 reference."""
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(ref, inputs64, g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    return got


# ---------------------------------------------------------------------------------------------------------
# Item 9: queries longer than the 64-token tile run on the kernels, in chunks
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lq", [65, 100, 130])
def test_long_queries_run_on_the_kernels(backend, lq):
    g = torch.Generator().manual_seed(lq)
    q = torch.randn(2, 1, lq, 24, generator=g, requires_grad=True)
    d = torch.randn(2, 3, 37, 24, generator=g, requires_grad=True)
    qm = torch.rand(2, 1, lq, generator=g) < 0.8
    qm[..., 0] = True
    qm[0, :, 64:min(lq, 128)] = False  # a whole chunk of one query is padding
    dm = torch.rand(2, 3, 37, generator=g) < 0.7
    dm[1, 2] = False  # a fully padded document
    assert not any("Lq" in r for r in dispatch.explain("maxsim", (q, d, qm, dm))[backend])
    out = maxsim(q, d, qm, dm, backend=backend)
    q64, d64 = q.detach().double().requires_grad_(), d.detach().double().requires_grad_()
    _grads_match(out, maxsim_ref(q64, d64, qm, dm), (q, d), (q64, d64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lq", [65, 100, 130])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_query", "query_per_doc"])
def test_long_queries_packed_run_on_the_kernels(backend, lq, shared):
    g = torch.Generator().manual_seed(lq + shared)
    lengths = torch.tensor([5, 0, 40, 17])
    offsets = torch.zeros(5, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    tokens = torch.randn(int(offsets[-1]), 24, generator=g, requires_grad=True)
    lead = () if shared else (4,)
    q = torch.randn(*lead, lq, 24, generator=g, requires_grad=True)
    qm = torch.rand(*lead, lq, generator=g) < 0.8
    qm[..., 0] = True
    qm[..., 64:min(lq, 128)] = False
    assert not any("Lq" in r for r in dispatch.explain("maxsim_packed", (q, tokens, offsets, qm))[backend])
    out = maxsim_packed(q, tokens, offsets, q_mask=qm, backend=backend)
    q64, t64 = q.detach().double().requires_grad_(), tokens.detach().double().requires_grad_()
    _grads_match(out, maxsim_packed_ref(q64, t64, offsets, q_mask=qm), (q, tokens), (q64, t64))


# ---------------------------------------------------------------------------------------------------------
# Item 6: subnormal bfloat16 on the BF16 instructions (documented bound), double backward (clear error)
# ---------------------------------------------------------------------------------------------------------
FLUSHING_PATHS = ("amx", "avx512bf16")  # tdpbf16ps / vdpbf16ps: subnormal inputs read as zero
TINY = 2.0 ** -126  # the smallest normal float32 and bfloat16


def _subnormal_bound(q, d):
    """The bound maxsim's docstring states, per score: sum over query tokens of the largest per-similarity
    bound 2^-126 (||q_i||_1 + ||d_j||_1 + 2H) over the document's tokens."""
    q, d = q.double(), d.double()
    per_sim = TINY * (q.abs().sum(-1)[..., :, None] + d.abs().sum(-1)[..., None, :] + 2 * q.shape[-1])
    return per_sim.amax(-1).sum(-1)


def test_subnormal_bound_and_double_backward_are_documented():
    doc = maxsim.__doc__
    assert "subnormal" in doc.lower() and "2**-126 * (||q_i||_1 + ||d_j||_1 + 2H)" in doc
    assert "Double backward" in doc and "maxsim_ref" in doc
    assert "Double backward" in maxsim_packed.__doc__


@pytest.mark.parametrize("path", cpu_isa.available() or ["none"])
@pytest.mark.parametrize("small", ["q", "d"])
def test_bf16_subnormals_stay_within_the_documented_bound(path, small):
    """Subnormal entries meeting entries near 2^100 give similarities near 2^-30 that the BF16 instructions
    drop. Whatever a path does, the error stays within the bound; the flushing paths do flush (that is
    what the bound is for), the others keep the products."""
    if path == "none":
        pytest.skip("needs the compiled extension")
    g = torch.Generator().manual_seed(6)

    def sign(*shape):
        return torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)

    sub = (sign(5, 64) * (1 + torch.rand(5, 64, generator=g)) * 2.0 ** -130).bfloat16()
    big = (sign(3, 40, 64) * (1 + torch.rand(3, 40, 64, generator=g)) * 2.0 ** 100).bfloat16()
    assert bool((sub != 0).all()) and float(sub.float().abs().max()) < TINY  # really subnormal, not zero
    q, d = (sub, big) if small == "q" else (big[0, :5], sub.reshape(1, 5, 64).expand(3, 5, 64) * 1)
    with cpu_isa.use(path):
        out = maxsim(q, d, backend="cpp").double()
    ref = maxsim_ref(q.double(), d.double())
    bound = _subnormal_bound(q, d)
    assert bool((ref.abs() > 1e-9).all())  # the dropped products are far above float32's rounding of 0
    assert bool(((out - ref).abs() <= bound + 1e-5 * ref.abs()).all()), (path, out, ref, bound)
    if path in FLUSHING_PATHS:
        assert bool(((out - ref).abs() > 0.5 * ref.abs()).all()), f"{path} kept subnormal products"
    else:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_through_maxsim_is_a_clear_error(backend):
    q = torch.randn(5, 16, requires_grad=True)
    d = torch.randn(3, 11, 16, requires_grad=True)
    gq, gd = torch.autograd.grad(maxsim(q, d, backend=backend).sum(), (q, d), create_graph=True)
    with pytest.raises(RuntimeError, match=r"(?s)fastrank\.maxsim: double backward.*not supported.*fastrank\.maxsim_ref"):
        (gq.square().sum() + gd.square().sum()).backward()
    # the reference has second derivatives
    (gq,) = torch.autograd.grad(maxsim(q, d, backend="reference").sum(), q, create_graph=True)
    gq.square().sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_through_maxsim_packed_is_a_clear_error(backend):
    q = torch.randn(5, 16, requires_grad=True)
    tokens = torch.randn(20, 16, requires_grad=True)
    offsets = torch.tensor([0, 7, 20])
    gq, gt = torch.autograd.grad(maxsim_packed(q, tokens, offsets, backend=backend).sum(), (q, tokens),
                                 create_graph=True)
    with pytest.raises(RuntimeError, match=r"(?s)fastrank\.maxsim_packed: double backward.*not supported.*maxsim_packed_ref"):
        (gq.square().sum() + gt.square().sum()).backward()


# ---------------------------------------------------------------------------------------------------------
# Item 7: torch.compile(fullgraph=True) with Lq changing between calls, and dynamic=True
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_torch_compile_fullgraph_with_changing_query_length(dynamic):
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, m: maxsim(a, b, None, m), backend="aot_eager", fullgraph=True, dynamic=dynamic)
    g = torch.Generator().manual_seed(0)
    for lq in (5, 7, 70):
        q = torch.randn(2, 1, lq, 16, generator=g, requires_grad=True)
        d = torch.randn(2, 3, 13, 16, generator=g, requires_grad=True)
        dm = torch.rand(2, 3, 13, generator=g) < 0.8
        out = fn(q, d, dm)
        eager = maxsim(q, d, None, dm)
        torch.testing.assert_close(out, eager)
        got = torch.autograd.grad(out.sum(), (q, d))
        want = torch.autograd.grad(eager.sum(), (q, d))
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------
# Item 19: ties across the Triton kernels' document blocks, within a block, and the flags the interpreter
# ignores (input precision) or that only matter on a GPU (atomics)
# ---------------------------------------------------------------------------------------------------------
def _tied_docs(lq=12, ld=170, h=16, n=3, seed=0):
    """Integer embeddings, so similarities are exact. Query token i's best doc token sits at p_i in the
    first 64-token block (the Triton kernels' BLOCK_LD for Lq <= 32) and is repeated at p_i + 32 (same
    block), p_i + 64 and p_i + 128 (later blocks): the max ties across blocks and within one, and the
    reference's rule (torch.max: the earliest) routes the gradient to p_i alone."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (lq, h), generator=g).float()
    q[:, 0] = 1.0  # no zero row: 2 * q_i scores 2 ||q_i||^2 > ||q_i||_1 >= any other {-1, 0, 1} row
    d = torch.randint(-1, 2, (n, ld, h), generator=g).float()
    pos = torch.randperm(32, generator=g)[:lq]
    for shift in (0, 32, 64, 128):
        d[:, pos + shift] = 2 * q
    return q, d, pos


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_across_document_blocks_route_to_the_earliest(backend):
    q, d, pos = _tied_docs()
    q.requires_grad_()
    d.requires_grad_()
    out = maxsim(q, d, backend=backend)
    q64, d64 = q.detach().double().requires_grad_(), d.detach().double().requires_grad_()
    _, dd = _grads_match(out, maxsim_ref(q64, d64), (q, d), (q64, d64))
    assert bool((dd[:, pos].abs().sum(-1) > 0).all())
    for shift in (32, 64, 128):
        assert bool((dd[:, pos + shift] == 0).all()), f"a tie went to the copy at +{shift}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_ties_across_document_blocks_route_to_the_earliest(backend):
    q, d, pos = _tied_docs()
    tokens = d.reshape(-1, d.shape[-1]).clone().requires_grad_()
    offsets = torch.arange(0, tokens.shape[0] + 1, d.shape[1])
    q.requires_grad_()
    out = maxsim_packed(q, tokens, offsets, backend=backend)
    q64, t64 = q.detach().double().requires_grad_(), tokens.detach().double().requires_grad_()
    _, dt = _grads_match(out, maxsim_packed_ref(q64, t64, offsets), (q, tokens), (q64, t64))
    dt = dt.reshape(d.shape)
    assert bool((dt[:, pos].abs().sum(-1) > 0).all())
    for shift in (32, 64, 128):
        assert bool((dt[:, pos + shift] == 0).all()), f"a tie went to the copy at +{shift}"


class _LaunchLog:
    """Stands in for a Triton kernel: records each launch's keyword flags, then launches the real one."""

    def __init__(self, kernel, log, name):
        self.kernel, self.log, self.name = kernel, log, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append((self.name, kwargs))
            return launch(*args, **kwargs)

        return run


@needs_interpreter
def test_deterministic_never_launches_atomics(monkeypatch):
    """deterministic=True must keep every backward reduction in one program (no float atomics), on shapes
    where deterministic=False does split them (the interpreter counts as a 4-program device)."""
    from fastrank.ops import maxsim_packed_triton
    from fastrank.ops.maxsim_triton_shared import loop_split

    assert loop_split(1, 10_000, True, maxsim_ops.parallel_programs(torch.device("cpu"))) == 1
    log = []
    for module, name in ((maxsim_ops, "maxsim_bwd_dq_kernel"), (maxsim_ops, "_maxsim_bwd_dd_kernel"),
                         (maxsim_packed_triton, "maxsim_bwd_dq_kernel")):
        monkeypatch.setattr(module, name, _LaunchLog(getattr(module, name), log, name))
    g = torch.Generator().manual_seed(3)
    q1, d1 = torch.randn(3, 16, generator=g), torch.randn(16, 4, 16, generator=g)  # dq sums 16 docs
    q2, d2 = torch.randn(16, 1, 3, 16, generator=g), torch.randn(1, 1, 4, 16, generator=g)  # dd sums 16 queries
    tokens, offsets = torch.randn(48, 16, generator=g), torch.arange(0, 49, 3)
    for deterministic in (True, False):
        log.clear()
        for q, d in ((q1, d1), (q2, d2)):
            q, d = q.clone().requires_grad_(), d.clone().requires_grad_()
            maxsim(q, d, backend="triton_interpret", deterministic=deterministic).sum().backward()
        q, t = q1.clone().requires_grad_(), tokens.clone().requires_grad_()
        maxsim_packed(q, t, offsets, backend="triton_interpret", deterministic=deterministic).sum().backward()
        atomic = {name for name, kwargs in log if kwargs["ATOMIC"]}
        if deterministic:
            assert not atomic and len(log) == 5
        else:
            assert len(atomic) == 2 and sum(kwargs["ATOMIC"] for _, kwargs in log) == 3  # the shapes do split


# Run outside the interpreter: Triton's front end builds fastrank's kernels for an sm_90 target (no GPU
# needed) from the arguments the launchers pass (every config of an autotuned kernel), each tt.dot's input
# precision is read from the IR, and the IR itself is returned for the offset check below.
_COMPILE_FOR_SM90 = r"""
import json, torch, triton
from fastrank.bench.kernels import front_end_ir as ttir
import triton.language as tl
from triton.runtime.autotuner import Autotuner
import fastrank.ops.maxsim as ms
import fastrank.ops.maxsim_packed_triton as mpt

found, loops, irs = {}, {}, {}

class Compile:
    def __init__(self, kernel, key):
        self.kernel, self.key = kernel, key
    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if isinstance(self.kernel, Autotuner):  # every config the autotuner may pick
                variants = [(self.kernel.fn, dict(kwargs, **c.kwargs), f"{self.key} config {i}")
                            for i, c in enumerate(self.kernel.configs)]
            else:
                variants = [(self.kernel, kwargs, self.key)]
            for fn, kw, key in variants:
                ir = ttir(fn, args, kw)
                irs[key] = ir
                loops[key] = [l.strip() for l in ir.splitlines() if "scf.for " in l]
                if self.key != "maxsim_bwd_dq_kernel":  # no dot in the gather
                    dots = [l for l in ir.splitlines() if "tt.dot " in l]
                    found[key] = [len(dots), sum("inputPrecision = tf32" in l for l in dots),
                                  "_argmax_combine_tie_break_left" in ir, "_argmax_combine_tie_break_fast" in ir]
        return run

# Controls for the offset check: one kernel indexing with int32 products of the program id and of a
# loop counter, and the same kernel in int64.
@triton.jit
def narrow(X, stride, n):
    pid = tl.program_id(0)
    for i in range(0, n):
        tl.store(X + pid * stride + i * stride, 1.0)

@triton.jit
def wide(X, stride, n):
    pid = tl.program_id(0).to(tl.int64)
    for i in range(pid * 0, n):
        tl.store(X + pid * stride + i * stride, 1.0)

q, d = torch.randn(1, 1, 7, 32), torch.randn(1, 2, 9, 32)
Compile(narrow, "control_int32")[(1,)](q, 1, 1)
Compile(wide, "control_int64")[(1,)](q, 1, 1)
# positive control: the text this test looks for appears when the kernel is asked for TF32
Compile(ms._maxsim_fwd_kernel.fn, "control_tf32")[(1,)](*[q, d, q, q, q, q] + [1] * 22, HAS_QM=False, HAS_DM=False,
    STORE_ARG=True, PRECISION="tf32", BLOCK_LQ=16, BLOCK_H=32, SPLIT_H=False, MASK_BLOCK=16, BLOCK_LD=64, DOCS=2)
for name in ("_maxsim_fwd_kernel", "maxsim_bwd_dq_kernel", "_maxsim_bwd_dd_kernel"):
    setattr(ms, name, Compile(getattr(ms, name), name))
for name in ("_packed_fwd_kernel", "_packed_bwd_dt_kernel", "maxsim_bwd_dq_kernel"):
    setattr(mpt, name, Compile(getattr(mpt, name), name))
ms.triton_forward(q, d, None, torch.ones(1, 1, 2, 9, dtype=torch.bool), True)
ms.triton_backward(q, d, torch.ones(1, 1, 2), torch.zeros(1, 1, 2, 7, dtype=torch.int32), True, True, True)
tokens, offsets = torch.randn(20, 32), torch.tensor([0, 9, 20])
mpt.packed_backward(q[0], tokens, offsets, torch.ones(2), torch.zeros(2, 7, dtype=torch.int32), True, True, True)
for qs, key in ((q[0], "_packed_fwd_kernel"), (q[0].expand(2, 7, 32), "_packed_fwd_kernel_per_doc")):
    mpt._packed_fwd_kernel.key = key
    mpt.packed_forward(qs, tokens, offsets, None, None, True)
mpt._packed_fwd_kernel.key = "_packed_fwd_kernel_int8"
mpt.packed_forward(q[0], tokens.to(torch.int8), offsets, None, torch.rand(20), False)
# H wider than one block: the H-split paths
qw, dw, tw = torch.randn(1, 1, 7, 200), torch.randn(1, 2, 9, 200), torch.randn(20, 200)
ms._maxsim_fwd_kernel.key = "_maxsim_fwd_kernel_split_h"
ms.triton_forward(qw, dw, None, None, True)
mpt._packed_fwd_kernel.key = "_packed_fwd_kernel_split_h"
mpt.packed_forward(qw[0], tw, offsets, None, None, True)
print(json.dumps(irs))
print(json.dumps(loops))
print(json.dumps(found))
"""


def _ssa_names(text: str) -> set[str]:
    return {n.split("#")[0] for n in re.findall(r"%[\w.#]+", text)}


def narrow_offsets(ttir: str) -> list[str]:
    """The tt.addptr ops of ``ttir`` whose offset derives from tt.get_program_id or a loop counter and is not
    int64. Derivation is followed through every op of a function (loads included: an index read through
    such a pointer is data-dependent, and is held to the same rule); a scf.for taints its induction
    variable, and conservatively its loop-carried values and results."""
    found = []
    for func in re.split(r"\btt\.func\b", ttir)[1:]:
        lines = [line.split(" loc(")[0] for line in func.splitlines()]
        tainted: set[str] = set()
        changed = True
        while changed:
            changed = False
            for code in lines:
                if "=" not in code:
                    continue
                lhs, rhs = code.split("=", 1)
                if "scf.for " in code:
                    new = set(re.findall(r"scf\.for (%[\w.]+) = ", code))
                    if "iter_args" in code:
                        new |= set(re.findall(r"(%[\w.]+) = %", code.split("iter_args", 1)[1]))
                    if lhs.strip().startswith("%"):
                        new |= _ssa_names(lhs)
                elif lhs.strip().startswith("%") and ("tt.get_program_id" in rhs or _ssa_names(rhs) & tainted):
                    new = _ssa_names(lhs)
                else:
                    continue
                if not new <= tainted:
                    tainted |= new
                    changed = True
        for code in lines:
            m = re.search(r"tt\.addptr (%[\w.#]+), (%[\w.#]+) : (.*)$", code)
            if m and m.group(2).split("#")[0] in tainted and not re.search(r"\bi64\b|xi64>", m.group(3).rsplit(",", 1)[1]):
                found.append(code.strip())
    return found


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_float32_kernels_compile_to_ieee_dots_for_sm90(tmp_path):
    """The interpreter ignores input_precision and tie_break_left (its argmax always takes the leftmost), so
    those mutants survive every value test on CPU: read the flags where they matter, in the Triton IR for a
    Hopper GPU. float32 (and int8 widened to float32) inputs must keep IEEE float32 products in every dot,
    and the forward kernels' in-block argmax must break ties to the left, as torch.max does. Every config
    of the autotuned kernels is compiled.

    Issue 13, the offset arithmetic: in every MaxSim and packed kernel, each pointer offset built from a
    program id or a loop counter is int64 (x * sd_x passes 2^31 at H = 768 beyond ~14k documents per
    query; int32 would wrap silently). Checked on the IR, with an int32 control the check must catch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "compile_sm90.py"  # a file: triton.jit reads the control kernels' source
    script.write_text(_COMPILE_FOR_SM90)
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "GPUTarget" in run.stderr and "ImportError" in run.stderr:
        pytest.skip("this Triton cannot compile for a CUDA target here")
    assert run.returncode == 0, run.stderr[-3000:]
    irs, loops, found = (json.loads(line) for line in run.stdout.strip().splitlines()[-3:])
    # the offset check: it catches the int32 control, passes its int64 twin, then every kernel passes
    assert len(narrow_offsets(irs.pop("control_int32"))) == 2
    assert narrow_offsets(irs.pop("control_int64")) == []
    irs.pop("control_tf32")
    kernels = {key.split(" config")[0] for key in irs}
    assert kernels == {"_maxsim_fwd_kernel", "_maxsim_fwd_kernel_split_h", "maxsim_bwd_dq_kernel", "_maxsim_bwd_dd_kernel",
                       "_packed_fwd_kernel", "_packed_fwd_kernel_per_doc", "_packed_fwd_kernel_int8",
                       "_packed_fwd_kernel_split_h", "_packed_bwd_dt_kernel"}, kernels
    for key, text in irs.items():
        assert narrow_offsets(text) == [], (key, narrow_offsets(text))
    # The backward kernels' document (dq) and query (dd) loop counters themselves are 64-bit.
    for name in ("maxsim_bwd_dq_kernel", "_maxsim_bwd_dd_kernel"):
        assert loops[name] and all(line.endswith(": i64 {") for line in loops[name]), (name, loops[name])
    assert found.pop("control_tf32")[1] >= 1
    found.pop("control_int32"), found.pop("control_int64")
    assert {key.split(" config")[0] for key in found} == kernels - {"maxsim_bwd_dq_kernel"}
    for name, (dots, tf32, left, fast) in found.items():
        assert dots >= 1 and tf32 == 0, f"{name}: {tf32} of {dots} dots use TF32 on float32 inputs"
        if "fwd" in name:
            assert left and not fast, f"{name}: argmax does not break ties to the left"
