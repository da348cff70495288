"""Every CPU instruction-set path of the MaxSim kernel that this machine can run, against maxsim_ref
(float64), plus the path selection: FASTRANK_CPU_ISA, cpu_isa.use, refusals that name the CPU flags, and
the dispatch rules that send calls the kernel cannot win to eager.

The development and CI machines differ (AVX2-only, AVX-512, AMX): paths this CPU lacks are skipped with
the reason the extension gives, and checked to be refused instead.
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastrank import cpu_isa, dispatch, maxsim, maxsim_ref
from fastrank.ops.maxsim import dispatch_context

from test_maxsim import _case, _check

SUPPORT = cpu_isa.support()
RUNNABLE = [name for name in cpu_isa.PATHS if not SUPPORT[name]]
PATH_PARAMS = [
    pytest.param(name, marks=pytest.mark.skipif(bool(SUPPORT[name]), reason=f"{name}: {SUPPORT[name]}"))
    for name in cpu_isa.PATHS
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _untied_case(form, lq, ld, h, *, seed, dtype=torch.float32, masks=True):
    """_case, redrawn until no query token has two doc tokens within float32 rounding of its max: there the
    float64 reference may route the gradient to the other token, and either route is right."""
    for attempt in range(50):
        q, d, qm, dm = _case(form, lq, ld, h, seed=seed + 104729 * attempt, dtype=dtype, masks=masks)
        s = torch.matmul(q.double(), d.double().transpose(-1, -2))
        if dm is not None:
            s = torch.where(dm.unsqueeze(-2), s, float("-inf"))
        if s.shape[-1] < 2:
            return q, d, qm, dm
        top = s.topk(2, dim=-1).values
        margin = (top[..., 0] - top[..., 1]) / top[..., 0].abs().clamp_min(1.0)
        if not (margin[torch.isfinite(margin)] < 1e-5).any():
            return q, d, qm, dm
    raise AssertionError("no untied draw in 50 attempts")


@pytest.fixture
def isa(request):
    with cpu_isa.use(request.param) as name:
        yield name


# ---------------------------------------------------------------------------------------------------------
# Each path against the reference: forms, odd sizes, masks, all dtypes, forward and gradients
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("form", ["rerank", "grouped", "allpairs"])
@pytest.mark.parametrize("lq", [1, 17, 32, 64])  # 1-4 groups of 16 query tokens (AMX), 1-8 vectors
@pytest.mark.parametrize("ld,h", [(1, 59), (97, 59), (200, 128), (33, 96), (16, 768)])
def test_path_matches_reference(isa, dtype, form, lq, ld, h):
    _check(*_untied_case(form, lq, ld, h, seed=lq * 7919 + ld * 31 + h, dtype=dtype), "cpp")


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("lq", [16, 17, 48])
def test_path_long_docs_without_masks(isa, dtype, lq):
    # Ld = 64 and 65 cover whole 32-row AMX steps and a short last step; no mask: no block is skipped.
    for ld in (64, 65):
        _check(*_untied_case("rerank", lq, ld, 128, seed=lq + ld, dtype=dtype, masks=False), "cpp")


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_path_strided_tokens(isa, dtype):
    # Token rows further apart than H (a slice of wider embeddings): the AMX tiles load d with its stride.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 32, 160, generator=g).to(dtype)[..., :128]
    d = torch.randn(2, 3, 70, 160, generator=g).to(dtype)[..., 16:144]
    assert d.stride(-2) == 160
    _check(q, d, None, torch.rand(2, 3, 70, generator=g) < 0.8, "cpp")


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_inference_path_matches_training_path(isa, dtype):
    # Without a gradient the kernels skip the argmax bookkeeping: the scores must not change at all.
    q, d, qm, dm = _case("grouped", 31, 90, 64, seed=5, dtype=dtype)
    with torch.no_grad():
        fast = maxsim(q, d, qm, dm, backend="cpp")
    full = maxsim(q.requires_grad_(), d, qm, dm, backend="cpp")
    assert torch.equal(fast, full.detach())


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
def test_path_nan_and_ties(isa):
    q = torch.ones(1, 4, 32)
    d = torch.ones(1, 40, 32)  # every doc token ties: the first one wins, as torch.max
    qg = q.clone().requires_grad_()
    dg = d.clone().requires_grad_()
    out = maxsim(qg, dg, backend="cpp")
    out.sum().backward()
    assert dg.grad[0, 0].abs().sum() > 0 and dg.grad[0, 1:].abs().sum() == 0
    d[0, 37, 5] = float("nan")
    assert torch.isnan(maxsim(q, d, backend="cpp")).all()


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
def test_path_results_do_not_depend_on_thread_count(isa):
    q, d, qm, dm = _case("allpairs", 32, 97, 128, seed=11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = maxsim(q, d, qm, dm, backend="cpp")
        torch.set_num_threads(max(2, before))
        many = maxsim(q, d, qm, dm, backend="cpp")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


# ---------------------------------------------------------------------------------------------------------
# Selecting a path
# ---------------------------------------------------------------------------------------------------------
def test_best_path_is_selected_by_default(monkeypatch):
    monkeypatch.delenv(cpu_isa.ENV_VAR, raising=False)
    assert RUNNABLE, "the scalar path always runs"
    assert cpu_isa.selected() == RUNNABLE[0]
    assert "scalar" in RUNNABLE


def test_environment_variable_forces_a_path(monkeypatch):
    monkeypatch.setenv(cpu_isa.ENV_VAR, "scalar")
    assert cpu_isa.selected() == "scalar"
    q, d, qm, dm = _case("rerank", 7, 33, 16, seed=2)
    _check(q, d, qm, dm, "cpp")


def test_a_faster_lower_path_is_chosen_by_speed_and_explained(monkeypatch):
    """FASTER_PATHS: where a lower path measured faster for an op and dtype on a kind of CPU, that path runs
    (the others keep the best), dispatch.explain says why, and FASTRANK_CPU_ISA or use() still force a path."""
    monkeypatch.delenv(cpu_isa.ENV_VAR, raising=False)
    for entry in cpu_isa.FASTER_PATHS:
        monkeypatch.setattr(cpu_isa, "_VENDOR", entry.vendor)
        monkeypatch.setattr(cpu_isa, "_BEST", entry.best)
        monkeypatch.setattr(cpu_isa, "_SUPPORT", {name: "" for name in cpu_isa.PATHS})
        dtype = getattr(torch, entry.dtype)
        assert cpu_isa.selected_for(entry.op, dtype) == entry.path
        reason = cpu_isa.why(entry.op, dtype)
        assert entry.path in reason and entry.best in reason and "by speed" in reason
        assert cpu_isa.selected_for(entry.op, torch.float64) == entry.best and cpu_isa.why(entry.op, torch.float64) == ""
        assert cpu_isa.selected_for("an op with no entry", dtype) == entry.best
        with cpu_isa.use(entry.best):
            assert cpu_isa.selected_for(entry.op, dtype) == entry.best
        monkeypatch.setenv(cpu_isa.ENV_VAR, entry.best)
        assert cpu_isa.selected_for(entry.op, dtype) == entry.best and cpu_isa.why(entry.op, dtype) == ""
        monkeypatch.delenv(cpu_isa.ENV_VAR)
        monkeypatch.setattr(cpu_isa, "_VENDOR", "SomeOtherVendor")
        assert cpu_isa.selected_for(entry.op, dtype) == entry.best


def test_this_cpus_faster_paths_run_and_are_explained(monkeypatch):
    monkeypatch.delenv(cpu_isa.ENV_VAR, raising=False)
    q, d = torch.randn(32, 128), torch.randn(64, 200, 128)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        path, reason = cpu_isa.selected_for("maxsim", dtype), cpu_isa.why("maxsim", dtype)
        assert (path != cpu_isa.selected()) == bool(reason)
        ex = dispatch.explain("maxsim", (q.to(dtype), d.to(dtype)))
        if ex.chosen == "cpp":
            assert f"ISA path {path}" in ex.kernel and (not reason or reason in ex.kernel)
        if path == "scalar":
            continue
        got = maxsim(q.to(dtype), d[:3].to(dtype), backend="cpp")  # the path the table chose, bit for bit
        with cpu_isa.use(path):
            torch.testing.assert_close(got, maxsim(q.to(dtype), d[:3].to(dtype), backend="cpp"), rtol=0, atol=0)


def test_unknown_path_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(cpu_isa.ENV_VAR, "avx9000")
    with pytest.raises(ValueError, match="FASTRANK_CPU_ISA='avx9000' is not a CPU ISA path; expected one of amx"):
        cpu_isa.selected()
    with pytest.raises(ValueError, match="not a CPU ISA path"):
        with cpu_isa.use("sse5"):
            pass


def test_unsupported_path_names_the_cpu_flags(monkeypatch):
    # Whatever this CPU is, pretend it lacks AMX: the refusal must say why and list the flags found.
    fake = dict(SUPPORT, amx="the CPU lacks amx_tile, amx_bf16")
    monkeypatch.setattr(cpu_isa, "_SUPPORT", fake)
    monkeypatch.setenv(cpu_isa.ENV_VAR, "amx")
    with pytest.raises(ValueError) as info:
        cpu_isa.selected()
    message = str(info.value)
    assert "the CPU lacks amx_tile, amx_bf16" in message and "CPU flags found:" in message
    for flag in cpu_isa.cpu_flags():
        assert flag in message


@pytest.mark.parametrize("name", [n for n in cpu_isa.PATHS if SUPPORT[n]] or ["none"])
def test_extension_refuses_a_path_this_cpu_lacks(name):
    if name == "none":
        pytest.skip("this CPU runs every path")
    from fastrank import _ext

    q, d = torch.randn(1, 1, 4, 8), torch.randn(1, 2, 5, 8)
    out = torch.empty(1, 1, 2)
    with pytest.raises(ValueError, match="CPU flags found"):
        _ext.require().maxsim_forward(name, q, d, None, None, out, None, 1)


def test_flags_are_reported():
    flags = cpu_isa.cpu_flags()
    if "avx2" in RUNNABLE:
        assert {"avx2", "fma", "f16c"} <= set(flags)
    if "amx" in RUNNABLE:
        assert {"amx_tile", "amx_bf16", "avx512_bf16"} <= set(flags)


# ---------------------------------------------------------------------------------------------------------
# Dispatch: what runs, and the calls the kernel cannot win
# ---------------------------------------------------------------------------------------------------------
def test_explain_names_the_isa_path_and_kernel():
    q, d = torch.randn(32, 128), torch.randn(1000, 200, 128)
    e = dispatch.explain("maxsim", (q, d))
    assert e.chosen == ("reference" if cpu_isa.selected() == "scalar" else "cpp")
    if e.chosen == "cpp":
        assert f"ISA path {cpu_isa.selected()}" in e.kernel and "runs: cpp" in str(e)
    for name in RUNNABLE:
        with cpu_isa.use(name):
            kernel = dispatch.explain("maxsim", (q.bfloat16(), d.bfloat16())).kernel
        if name == "amx":
            assert "AMX-BF16 tiles" in kernel
        elif name == "avx512bf16":
            assert "vdpbf16ps" in kernel


def test_underfilled_big_calls_and_the_scalar_path_go_to_eager_unless_forced():
    q, d, dm = torch.randn(32, 768), torch.randn(1, 200, 768), torch.rand(1, 200) < 0.8
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # one pair, two threads: the kernel would leave a core idle
        e = dispatch.explain("maxsim", (q, d, None, dm))
        if cpu_isa.selected() != "scalar":
            assert e.chosen == "reference" and "fewer (query, doc) pairs than threads" in e["cpp"][0]
        assert e["cpp"][0].startswith(dispatch.SLOWER)
        torch.testing.assert_close(maxsim(q, d, d_mask=dm), maxsim_ref(q, d, None, dm), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(maxsim(q, d, d_mask=dm, backend="cpp"), maxsim_ref(q, d, None, dm),
                                   rtol=1e-5, atol=1e-4)
        # a pair below the underfilled bound is still the kernel's (2^20 multiply-adds: not a tiny call; its doc
        # mask keeps it off the unmasked one-query rule, which this test is not about)...
        small = torch.randn(1, 256, 128)
        if cpu_isa.selected() != "scalar":
            assert dispatch.explain("maxsim", (q[:, :128], small, None, torch.ones(1, 256, dtype=torch.bool))).chosen == "cpp"
        # ...and a tiny one (2^19.6) goes to eager for its per-call cost, not for idle cores
        tiny = dispatch.explain("maxsim", (q[:, :128], small[:, :200]))
        assert tiny.chosen == "reference" and not any("fewer (query, doc) pairs" in r for r in tiny["cpp"])
        torch.set_num_threads(1)
        assert dispatch.explain("maxsim", (q, d, None, dm)).chosen == ("cpp" if cpu_isa.selected() != "scalar"
                                                                        else "reference")
    finally:
        torch.set_num_threads(before)
    with cpu_isa.use("scalar"):
        big = torch.randn(500, 200, 128)
        e = dispatch.explain("maxsim", (q[:, :128], big))
        assert e.chosen == "reference" and "scalar" in e["cpp"][0]
        ctx = dispatch_context(q[:, :128], big, big.shape[:1])
        assert dispatch.choose("maxsim", (q[:, :128], big), "cpp", **ctx).backend == "cpp"


def test_eager_fallback_matches_reference_semantics():
    # The fast eager form used for small inference calls: masks, an empty doc, NaN, broadcast masks.
    from fastrank.ops.maxsim import maxsim_eager

    q, d, qm, dm = _case("allpairs", 7, 19, 16, seed=9)
    torch.testing.assert_close(maxsim_eager(q, d, qm, dm), maxsim_ref(q, d, qm, dm), rtol=1e-6, atol=1e-5)
    dm2 = torch.rand(19) < 0.5  # one mask shared by every doc
    torch.testing.assert_close(maxsim_eager(q, d, None, dm2), maxsim_ref(q, d, None, dm2), rtol=1e-6, atol=1e-5)
    d[0, 1, 3, 2] = float("nan")
    assert torch.equal(torch.isnan(maxsim_eager(q, d, qm, dm)), torch.isnan(maxsim_ref(q, d, qm, dm)))


# ---------------------------------------------------------------------------------------------------------
# The build: portable, one object per ISA, nothing an older CPU could pick up by accident
# ---------------------------------------------------------------------------------------------------------
def _isa_objects():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return sorted(glob.glob(os.path.join(root, "build", "*", "CMakeFiles", "_C.dir", "csrc", "cpu", "isa", "*.o")))


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_isa_objects_define_no_weak_code_symbols():
    # A weak (COMDAT) function compiled with -mavx512f could be the copy the linker keeps for every caller,
    # and crash an AVX2-only CPU: the ISA units must define only their own entry points (MaxSim's two, the
    # residual MaxSim's one, LITE's two, the token projection's two, the arithmetic-peak probe's two).
    objects = _isa_objects()
    if not objects:
        pytest.skip("no build tree here (the extension was installed from a wheel)")
    for obj in objects:
        out = subprocess.run(["nm", "-C", obj], capture_output=True, text=True, check=True).stdout
        weak = [line for line in out.splitlines() if line.split()[-2:-1] and line.split()[1:2] in (["W"], ["V"])
                and "DW.ref.__gxx_personality_v0" not in line]
        assert not weak, f"{obj} defines weak symbols: {weak[:5]}"
        exported = [line for line in out.splitlines() if " T " in line]
        entry_points = ("::maxsim_forward(", "::maxsim_backward(", "::maxsim_residual_forward(", "::lite_forward(",
                        "::lite_backward(", "::projection_forward(", "::projection_backward(", "::fma_peak(",
                        "::bf16_dot_peak(", "::amx_tile_peak(")
        assert all(any(name in line for name in entry_points) for line in exported), exported


def test_build_is_not_tuned_for_the_build_machine():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "CMakeLists.txt")) as f:
        text = f.read()
    assert 'option(FASTRANK_NATIVE "Tune the non-kernel sources for the build machine (-march=native)" OFF)' in text
    with open(os.path.join(root, "pyproject.toml")) as f:
        assert 'FASTRANK_NATIVE = { env = "FASTRANK_NATIVE", default = "OFF" }' in f.read()


def test_every_forced_path_in_a_fresh_process():
    # FASTRANK_CPU_ISA read by a fresh interpreter, as a user sets it; the scores agree across paths.
    code = (
        "import torch, fastrank\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, d = torch.randn(32, 64, generator=g), torch.randn(40, 50, 64, generator=g)\n"
        "print(fastrank.cpu_isa.selected(), repr(fastrank.maxsim(q, d, backend='cpp').sum().item()))\n"
    )
    sums = {}
    # Started together: each process spends its time importing torch, which overlaps on the cores.
    procs = {name: subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, FASTRANK_CPU_ISA=name),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in RUNNABLE}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        chosen, total = stdout.split()
        assert chosen == name
        sums[name] = float(total)
    ref = sums["scalar"]
    assert all(abs(v - ref) <= 1e-4 * abs(ref) + 1e-3 for v in sums.values()), sums


# ---------------------------------------------------------------------------------------------------------
# The losses' row kernels go through the same ISA paths
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
@pytest.mark.parametrize("name", ["mse", "margin_mse", "m3se", "softmax_ce", "kl_div", "rankdistil_b"])
def test_losses_on_every_path(isa, name):
    from fastrank import losses

    g = torch.Generator().manual_seed(17)
    s = torch.randn(37, 21, generator=g) * 30  # scores of a learned temperature: exp() sees a wide range
    t = torch.randn(37, 21, generator=g) * 30
    mask = torch.rand(37, 21, generator=g) < 0.8
    mask[:, :2] = True
    s.requires_grad_()
    loss = getattr(losses, name)(s, t, mask=mask, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), s)
    s64 = s.detach().double().requires_grad_()
    ref = getattr(losses, name + "_ref")(s64, t.double(), mask=mask, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
    scale = ref.abs().max().item()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item())


@pytest.mark.parametrize("isa", PATH_PARAMS, indirect=True)
def test_inbatch_ce_on_every_path(isa):
    from fastrank import losses

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(33, 257, generator=g) * 5).requires_grad_()
    target = torch.randint(0, 257, (33,), generator=g)
    loss = losses.inbatch_ce(x, target=target, tau=0.05)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_()
    ref = losses.inbatch_ce_ref(x64, target=target, tau=0.05)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
