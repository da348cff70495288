"""The package's import rules (scripts/check_imports.py): layers that import downward only, no circle, no
reach into another module's private names or through the package root, command lines imported by the entry
point alone. Checked on this checkout, and shown to catch each kind of break on a copy with one added."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_imports.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check_imports = _checker()


def test_this_checkout_keeps_every_rule():
    report = check_imports.check(ROOT)
    assert report.violations == []
    # The rules read the function-local imports too (the lazy ones are most of them).
    assert len(report.imports) > 150
    assert all(layer is not None for layer in report.modules.values())


def test_the_command_prints_the_layers_and_zero_violations():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:7]] == ["core", "kernels", "facade", "app", "tools", "cli"]
    assert lines[-1] == "0 violations"


def test_every_layer_named_in_the_issue_is_where_it_belongs():
    layer = check_imports.layer_of
    assert {m: layer(m) for m in ("fastrank._ext", "fastrank.cpu_isa", "fastrank.progress", "fastrank.bench.timing",
                                  "fastrank.bench.machine")} == dict.fromkeys(
        ("fastrank._ext", "fastrank.cpu_isa", "fastrank.progress", "fastrank.bench.timing", "fastrank.bench.machine"),
        "core")
    assert layer("fastrank.dispatch") == layer("fastrank.ops.maxsim") == "kernels"
    assert layer("fastrank") == layer("fastrank.nn") == layer("fastrank.losses") == "facade"
    assert layer("fastrank.index.tokens") == layer("fastrank.train.loop") == layer("fastrank.demo") == "app"
    assert layer("fastrank.bench") == layer("fastrank.bench.maxsim") == layer("fastrank.bench.kernels") == "tools"
    assert layer("fastrank.cli") == layer("fastrank.bench.cli") == layer("fastrank.train.cli") == "cli"


@pytest.fixture
def copy(tmp_path):
    """The package's Python sources, to break one rule at a time."""
    shutil.copytree(ROOT / "fastrank", tmp_path / "fastrank", ignore=shutil.ignore_patterns("*.so", "__pycache__", "data"))
    return tmp_path


def _add(root: Path, module: str, code: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + "\n\n" + code + "\n")


def _violations(root: Path) -> list[str]:
    return check_imports.check(root).violations


def test_an_upward_import_inside_a_function_is_caught(copy):
    _add(copy, "fastrank.ops.pairs", "def describe_report():\n    from fastrank.bench import report\n    return report")
    found = _violations(copy)
    assert len(found) == 1 and "fastrank.ops.pairs:" in found[0] and "upward" in found[0]
    assert "kernels imports fastrank.bench.report, which is tools" in found[0]


def test_a_cycle_within_one_layer_is_caught(copy):
    # fastrank.trained already imports fastrank.index.storage; the reverse closes a circle (app -> app).
    _add(copy, "fastrank.index.storage", "def _owner():\n    import fastrank.trained\n    return fastrank.trained")
    found = _violations(copy)
    assert len(found) == 1 and found[0].startswith("import cycle:"), found
    assert "fastrank.index.storage" in found[0] and "fastrank.trained" in found[0]


def test_private_names_package_root_and_command_lines_are_caught(copy):
    _add(copy, "fastrank.index.dense", "def _a():\n    from fastrank.encoders import _model_dir\n    return _model_dir")
    _add(copy, "fastrank.rerank", "def _b():\n    from fastrank import maxsim\n    return maxsim")
    _add(copy, "fastrank.train.cli", "def _c():\n    from fastrank.bench.cli import add_cli\n    return add_cli")
    _add(copy, "fastrank.bench.suite", "def _d():\n    from fastrank.bench import machine\n    return machine._cpuinfo_field")
    found = _violations(copy)
    assert len(found) == 4, found
    assert any("imports the private name _model_dir from fastrank.encoders" in v for v in found)
    assert any("fastrank.rerank:" in v and "imports the package root (maxsim)" in v for v in found)
    assert any("fastrank.train.cli:" in v and "command-line module fastrank.bench.cli" in v for v in found)
    assert any("reads the private name _cpuinfo_field of fastrank.bench.machine" in v for v in found)


def test_a_new_module_must_be_placed_and_main_blocks_are_entry_points(copy):
    (copy / "fastrank" / "newthing.py").write_text("X = 1\n")
    _add(copy, "fastrank.bench.gpu", 'if __name__ == "__main__":\n    from fastrank.cli import main\n    main()')
    found = _violations(copy)
    assert found == ["fastrank.newthing: no layer claims this module (add it to LAYERS in scripts/check_imports.py)"]
