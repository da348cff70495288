#!/usr/bin/env python3
"""The import rules of the fastrank package, checked from its sources: `python scripts/check_imports.py`.

Every module belongs to one layer; a module may import its own layer and those below it, never above:

    core      _version, _ext (and the compiled _C), cpu_isa, progress, bench.timing, bench.machine
    kernels   dispatch, ops/*
    facade    the package root (__init__), nn, losses
    app       data, encoders, evaluate, index, rerank, rerank_chunks, trained, integrations, train, demo
    tools     bench (the measurement tools)
    cli       cli, bench.cli, train.cli (command lines)

and four more rules hold everywhere:

- nothing inside the package imports the package root (``from fastrank import maxsim``): the root is the
  facade users import, and a module that reaches through it imports everything the root does;
- nothing imports a command-line module but the entry point (fastrank.cli);
- no module imports another module's ``_private`` name, nor reads one off an imported module
  (``ops.maxsim._kernel``): what two modules share gets a public name;
- the graph of imports has no cycle.

Every import statement counts, the ones inside functions included (the lazy imports that keep start-up fast
are still dependencies); only the block under ``if __name__ == "__main__":`` is exempt, being an entry point
itself. A module that no layer claims is a violation too, so a new file has to be placed.

Exit status 0 with zero violations, 1 otherwise. ``check(root)`` is what tests/test_import_layers.py calls.
"""
from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "fastrank"
ENTRY_POINT = "fastrank.cli"

# (layer, module prefixes it claims); a module takes the layer of its longest matching prefix. The package root
# claims itself alone: a new top-level module has to be placed.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("fastrank._version", "fastrank._ext", "fastrank._C", "fastrank.cpu_isa", "fastrank.progress", "fastrank.bench.timing",
              "fastrank.bench.machine")),
    ("kernels", ("fastrank.dispatch", "fastrank.ops")),
    ("facade", ("fastrank", "fastrank.nn", "fastrank.losses")),
    ("app", ("fastrank.data", "fastrank.encoders", "fastrank.evaluate", "fastrank.index", "fastrank.rerank",
             "fastrank.rerank_chunks", "fastrank.trained", "fastrank.integrations", "fastrank.train", "fastrank.demo")),
    ("tools", ("fastrank.bench",)),
    ("cli", ("fastrank.cli", "fastrank.bench.cli", "fastrank.train.cli")),
)
LAYER_NAMES = [name for name, _ in LAYERS]


@dataclass
class Import:
    importer: str
    target: str          # the module imported (a package's module, not an attribute of it)
    line: int
    names: tuple = ()    # names taken from ``target`` that are not modules themselves


@dataclass
class Report:
    modules: dict[str, str] = field(default_factory=dict)       # module -> layer (None when unclaimed)
    imports: list[Import] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


def layer_of(module: str) -> str | None:
    best, layer = -1, None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            below = prefix != PACKAGE and module.startswith(prefix + ".")
            if (module == prefix or below) and len(prefix) > best:
                best, layer = len(prefix), name
    return layer


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_main_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                   for c in test.comparators))


def _walk(tree: ast.AST):
    """Every node but those under ``if __name__ == "__main__":``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not _is_main_block(child))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _read(root: Path, module: str, path: Path, known: set[str]) -> tuple[list[Import], list[str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    imports, problems, aliases = [], [], {}
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    imports.append(Import(module, alias.name, node.lineno))
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            plain = []
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in known:  # `from fastrank.bench import machine`: the module itself
                    imports.append(Import(module, sub, node.lineno))
                    aliases[alias.asname or alias.name] = sub
                else:
                    plain.append(alias.name)
                    if _is_private(alias.name) and source != module:
                        problems.append(f"{module}:{node.lineno}: imports the private name {alias.name} from {source}")
            if plain:
                imports.append(Import(module, source, node.lineno, tuple(plain)))
    for node in _walk(tree):
        # ``ops_module._name``: a private name read off another module.
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and _is_private(node.attr) and aliases[node.value.id] != module):
            problems.append(f"{module}:{node.lineno}: reads the private name {node.attr} of {aliases[node.value.id]}")
    return imports, problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check(root: str | Path = Path(__file__).resolve().parent.parent) -> Report:
    """The layers of every module under ``root``/fastrank and every rule broken, with file and line."""
    root = Path(root)
    paths = {(_module_name(p, root)): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    known = set(paths) | {f"{PACKAGE}._C"}
    report = Report()
    for module, path in paths.items():
        report.modules[module] = layer_of(module)
        if report.modules[module] is None:
            report.violations.append(f"{module}: no layer claims this module (add it to LAYERS in "
                                     "scripts/check_imports.py)")
        imports, problems = _read(root, module, path, known)
        report.imports += imports
        report.violations += problems
    graph: dict[str, set[str]] = {}
    for imp in report.imports:
        if imp.target == imp.importer:
            continue
        graph.setdefault(imp.importer, set()).add(imp.target)
        here, there = layer_of(imp.importer), layer_of(imp.target)
        where = f"{imp.importer}:{imp.line}"
        if imp.target == PACKAGE and imp.importer != PACKAGE:
            report.violations.append(f"{where}: imports the package root ({', '.join(imp.names) or PACKAGE}); "
                                     "import the module that defines it")
        elif here and there and LAYER_NAMES.index(there) > LAYER_NAMES.index(here):
            report.violations.append(f"{where}: {here} imports {imp.target}, which is {there}: an upward import")
        elif there == "cli" and imp.importer != ENTRY_POINT:
            report.violations.append(f"{where}: imports the command-line module {imp.target}; only {ENTRY_POINT} "
                                     "may")
    for comp in _cycles(graph):
        report.violations.append(f"import cycle: {' -> '.join(comp)} (counting imports inside functions)")
    return report


def format_layers(report: Report) -> str:
    lines = []
    for name in LAYER_NAMES:
        members = sorted(m for m, layer in report.modules.items() if layer == name)
        lines.append(f"{name:<8} {len(members):>3} modules: {', '.join(m[len(PACKAGE) + 1:] or '(root)' for m in members)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parent.parent),
                   help="the directory holding the fastrank package (default: this checkout)")
    args = p.parse_args(argv)
    report = check(args.root)
    print("layers, lowest first (a module imports its own layer and those below):")
    print(format_layers(report))
    print(f"{len(report.imports)} imports of fastrank modules read, function-local ones included")
    for v in report.violations:
        print(f"VIOLATION {v}")
    print(f"{len(report.violations)} violations")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
