"""Every kernel launch in fastrank.ops runs with its tensors' GPU current (issue 13).

Triton and the extension's CUDA entries launch on the current device's stream; a tensor on another GPU would
be read through the wrong context. The guard is ``fastrank.ops.pairs.device_guard``. A GPU test cannot check
this on a one-GPU machine, so the check is static: every launch (``kernel[grid](...)`` or an extension entry
named ``*_cuda``) must sit lexically inside ``with device_guard(...)``."""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

OPS = Path(__file__).resolve().parents[1] / "fastrank" / "ops"


def _is_launch(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Subscript):  # kernel[grid](...)
        return True
    if isinstance(func, ast.Attribute) and func.attr.endswith("_cuda"):  # ext.maxsim_forward_cuda(...)
        return True
    if isinstance(func, ast.Call) and isinstance(func.func, ast.Name) and func.func.id == "getattr":
        name = func.args[1] if len(func.args) > 1 else None
        # getattr(ext, name + "_cuda")(...)
        return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.endswith("_cuda")
                   for n in ast.walk(name)) if name is not None else False
    return False


def _is_guard(item: ast.withitem) -> bool:
    call = item.context_expr
    return isinstance(call, ast.Call) and (
        (isinstance(call.func, ast.Name) and call.func.id == "device_guard")
        or (isinstance(call.func, ast.Attribute) and call.func.attr == "device_guard"))


def unguarded_launches(source: str, filename: str = "<src>") -> list[str]:
    """'file:line' of every launch in ``source`` outside a ``with device_guard(...)`` block."""
    found = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, (ast.With, ast.AsyncWith)):
            guarded = guarded or any(_is_guard(i) for i in node.items)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            guarded = False  # a function body runs wherever it is called from: it needs its own guard
        if isinstance(node, ast.Call) and _is_launch(node) and not guarded:
            found.append(f"{filename}:{node.lineno}")
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(source), False)
    return found


def test_the_check_finds_unguarded_launches():
    src = textwrap.dedent("""
        def f(q, ext, name):
            _kernel[(1,)](q)
            ext.losses_forward_cuda(1)
            getattr(ext, name + "_cuda")(2)
            with device_guard(q):
                _kernel[(1,)](q)
                run = lambda: _kernel[(1,)](q)
        """)
    assert unguarded_launches(src) == ["<src>:3", "<src>:4", "<src>:5", "<src>:8"]


@pytest.mark.parametrize("path", sorted(OPS.glob("*.py")), ids=lambda p: p.name)
def test_every_launch_in_ops_is_device_guarded(path):
    assert unguarded_launches(path.read_text(), path.name) == []
