"""The element (dtype) codes have one source: the FASTRANK_ELEMENTS list of csrc/element_codes.h.

The boundary (csrc/tensor_arg.h) reads a tensor's code off its torch.dtype and the kernels switch on it; the
extension exports the list as ``_C.ELEMENT_CODES`` and Python reads it through ``fastrank._ext.element_codes()``.
These tests parse the header, check the export against it, and check that no other C++ file (nor the Python
that talks to the extension) writes a numbering of its own: a second copy could drift silently, and a kernel
switching on a raw number would read one dtype's bytes as another's.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fastrank import _ext

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HEADER = CSRC / "element_codes.h"
ELEMENT = re.compile(r"X\((\w+),\s*(\d+),\s*(\w+)\)")
ENUMERATORS = ("Float32", "Float16", "BFloat16", "Float64", "Int8", "Int32", "Int64", "Bool", "UInt8", "UInt16")


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def header_elements() -> list[tuple[str, int, str]]:
    """(enumerator, code, torch dtype name) of each FASTRANK_ELEMENTS entry, in order."""
    text = _strip_comments(HEADER.read_text())
    body = text.split("#define FASTRANK_ELEMENTS(X)", 1)[1].split("namespace fastrank", 1)[0]
    return [(name, int(code), dtype) for name, code, dtype in ELEMENT.findall(body)]


def test_the_header_lists_each_dtype_once_with_codes_from_zero():
    elements = header_elements()
    assert [name for name, _, _ in elements] == list(ENUMERATORS)
    assert [code for _, code, _ in elements] == list(range(len(elements)))
    names = [dtype for _, _, dtype in elements]
    assert len(set(names)) == len(names)
    for dtype in names:  # tensor_arg.h looks each name up as torch.<name>
        assert isinstance(getattr(torch, dtype), torch.dtype), dtype
    # The compile-time half of the rule: the header asserts the same, so a build with a gap fails.
    assert "static_assert(element_codes_detail::consecutive()" in HEADER.read_text()


def test_the_extension_exports_the_header_numbering():
    if _ext.load() is None:
        pytest.skip("needs the compiled extension")
    assert _ext.element_codes() == {dtype: code for _, code, dtype in header_elements()}
    assert _ext.load().ELEMENT_CODES == _ext.element_codes()


def test_element_codes_are_empty_without_the_extension(monkeypatch):
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", "the compiled extension fastrank._C could not be imported (blocked)")
    assert _ext.element_codes() == {}


def _sources() -> list[Path]:
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".inc", ".cuh"))


def numbered_elsewhere(text: str) -> list[str]:
    """What in a C++ source numbers dtypes by hand: an element name given an integer (an enum or constant
    such as ``Float32 = 0`` or ``kFloat32 = 0``), or a switch on a dtype or element code with integer cases."""
    text = _strip_comments(text)
    names = "|".join(ENUMERATORS)
    found = [m.group(0) for m in re.finditer(rf"\bk?(?:{names})\s*=\s*\d+", text)]
    for m in re.finditer(r"switch\s*\(([^)]*)\)\s*\{", text):
        if not re.search(r"dtype|elem", m.group(1), re.I):
            continue
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        found += [f"switch ({m.group(1)}): {c}" for c in re.findall(r"case\s+-?\d+\s*:", text[m.end():i])]
    return found


def test_the_check_finds_a_second_numbering():
    assert numbered_elsewhere("enum class DType : int { Float32 = 0, Float16 = 1 };") == ["Float32 = 0", "Float16 = 1"]
    assert numbered_elsewhere("constexpr int kFloat32 = 0, kBFloat16 = 2;") == ["kFloat32 = 0", "kBFloat16 = 2"]
    assert numbered_elsewhere("switch (dtype) { case 0: f(); return; case 1: g(); }") == [
        "switch (dtype): case 0:", "switch (dtype): case 1:"]
    assert numbered_elsewhere("switch (kind) { case 0: f(); }") == []  # not a dtype
    assert numbered_elsewhere("switch (static_cast<Elem>(dtype)) { case Elem::Float32: f(); }") == []


def test_no_other_source_numbers_dtypes():
    offenders = {str(p.relative_to(ROOT)): numbered_elsewhere(p.read_text())
                 for p in _sources() if p != HEADER}
    assert not {k: v for k, v in offenders.items() if v}, offenders
    assert HEADER in _sources()


def test_python_passes_and_repeats_no_codes():
    """The Python that talks to the extension holds no copy of the numbering (a dict from dtype to code)."""
    names = "|".join(dtype for _, _, dtype in header_elements())
    pattern = re.compile(rf"""(?:["']|torch\.)(?:{names})["']?\s*:\s*\d+\s*[,}}]""")
    files = [ROOT / "fastrank" / "_ext.py", ROOT / "fastrank" / "dispatch.py", ROOT / "fastrank" / "cpu_isa.py",
             *sorted((ROOT / "fastrank" / "ops").glob("*.py"))]
    hits = {str(p.relative_to(ROOT)): pattern.findall(p.read_text()) for p in files}
    assert not {k: v for k, v in hits.items() if v}, hits
