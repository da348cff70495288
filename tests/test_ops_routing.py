"""One routing style in fastrank.ops (issue 23): each op registers, per backend, one dispatch.Kernels (or one
per device type) and reaches the chosen backend's through dispatch.kernels; no op compares backend names.
And the device program count the MaxSim backward launchers read is one attribute, looked up at call time."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fastrank import dispatch
from fastrank.ops import maxsim as maxsim_ops
from fastrank.ops.maxsim_triton_shared import loop_split

OPS = Path(__file__).resolve().parents[1] / "fastrank" / "ops"


def backend_name_branches(source: str) -> list[str]:
    """Comparisons of anything with a backend's name (``backend == "cpp"``, ``impl.backend in (...)``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = {c.value for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)}
            if names & set(dispatch.BACKENDS):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_check_finds_a_branch_on_a_backend_name():
    assert backend_name_branches("if backend == 'cpp':\n    pass\n") == ["line 1: backend == 'cpp'"]
    assert backend_name_branches("x = impl.backend in ('triton', 'triton_interpret')\n")
    assert backend_name_branches("if kind == 'mse':\n    pass\n") == []


def test_no_op_branches_on_backend_names():
    found = {p.name: backend_name_branches(p.read_text()) for p in sorted(OPS.glob("*.py"))}
    assert not {k: v for k, v in found.items() if v}, found


def test_every_registration_is_kernels():
    ops = {"maxsim", "maxsim_packed", "lite", "mse", "margin_mse", "m3se", "softmax_ce", "kl_div", "rankdistil_b",
           "inbatch_ce"}
    assert ops <= set(dispatch._REGISTRY)
    for op in ops:
        for backend, impl in dispatch._REGISTRY[op].items():
            entries = impl.kernels.values() if isinstance(impl.kernels, dict) else [impl.kernels]
            assert entries and all(isinstance(k, dispatch.Kernels) for k in entries), (op, backend)
            if backend == "reference":  # eager PyTorch: autograd differentiates its forward
                assert impl.kernels.backward is None, op
    # The kernel ops' kernel backends bring their own backward; a fused loss's forward carries its autograd,
    # and so does LITE's C++ kernel (its training forward hands the backward the activations it saved).
    carries_autograd = {("lite", "cpp")}
    for op in ("maxsim", "maxsim_packed", "lite"):
        for backend in set(dispatch._REGISTRY[op]) - {"reference"}:
            has_backward = dispatch.kernels(op, backend, torch.empty(0)).backward is not None
            assert has_backward != ((op, backend) in carries_autograd), (op, backend)


def test_register_refuses_anything_but_kernels():
    with pytest.raises(TypeError, match="must be a Kernels"):
        dispatch.register("no_such_op", "cpp", lambda *a: None)
    assert "no_such_op" not in dispatch._REGISTRY


def test_parallel_programs_is_one_attribute_read_at_call_time(monkeypatch):
    """fastrank.bench.kernels stands in a GPU's program count for the CPU tensors it records launches on, by
    assigning the module attribute: both MaxSim ops' backward launchers must read that attribute when they
    run, not a copy taken at import."""
    import inspect

    from fastrank.ops import maxsim_packed_triton

    cpu = torch.device("cpu")
    monkeypatch.setattr(maxsim_ops, "parallel_programs", lambda device: 1000)
    assert maxsim_ops.parallel_programs(cpu) == 1000
    assert "parallel_programs" not in vars(maxsim_packed_triton)  # no name bound at import
    assert "padded.parallel_programs(q.device)" in inspect.getsource(maxsim_packed_triton)
    assert loop_split(1, 10_000, False, 1000) == 1000 and loop_split(1, 10_000, True, 1000) == 1


def test_both_backward_launchers_read_it(monkeypatch):
    """The padded and the packed dq launch split their reduction (float atomics) by the count they read."""
    from fastrank import maxsim, maxsim_packed
    from fastrank.ops import maxsim_triton_shared

    pytest.importorskip("triton")
    if not maxsim_triton_shared.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest) to launch the kernels on CPU")
    from fastrank.ops import maxsim_packed_triton

    seen = []

    class Log:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                seen.append(kwargs["ATOMIC"])
                return launch(*args, **kwargs)

            return run

    for module in (maxsim_ops, maxsim_packed_triton):
        monkeypatch.setattr(module, "maxsim_bwd_dq_kernel", Log(module.maxsim_bwd_dq_kernel))
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(3, 16, generator=g), torch.randn(16, 4, 16, generator=g)  # dq sums 16 documents
    tokens, offsets = torch.randn(48, 16, generator=g), torch.arange(0, 49, 3)
    for programs, atomic in ((1, False), (4, True)):  # one program fills a 1-program device; not a 4-program one
        monkeypatch.setattr(maxsim_ops, "parallel_programs", lambda device, n=programs: n)
        seen.clear()
        maxsim(q.clone().requires_grad_(), d, backend="triton_interpret").sum().backward()
        maxsim_packed(q.clone().requires_grad_(), tokens, offsets, backend="triton_interpret").sum().backward()
        assert seen == [atomic, atomic], (programs, seen)
