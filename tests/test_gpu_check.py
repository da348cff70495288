"""scripts/gpu_check.sh and fastrank.gpu_check, checked on the CPU: GPU minutes are too scarce to spend on a
typo, so the measurement code runs here on tiny shapes and the script's syntax and test list are checked."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_script_parses_and_names_only_existing_tests():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    named = re.findall(r"tests/\w+\.py", SCRIPT.read_text())
    assert named and all((ROOT / t).is_file() for t in named), named


def test_measurement_runs_every_section_on_tiny_shapes(tmp_path):
    pytest.importorskip("fastrank._C")
    from fastrank.gpu_check import measure, write_markdown

    res = measure("cpu", quick=True, compile=False)
    sections = {r["section"] for r in res["rows"]}
    assert sections == {"maxsim fwd", "maxsim fwd+bwd", "lite fwd", "lite fwd+bwd", "loss fwd+bwd"}
    for row in res["rows"]:
        # Timed after matching the reference, or not timed with the reason why: never a number unchecked.
        assert ("us" in row and row["error"] <= 0.5) or row.get("note"), row
    # On a CPU only the Triton backend (CUDA tensors) cannot run; every other provider matched and was timed.
    untimed = {(r["section"], r["provider"], r.get("note")) for r in res["rows"] if "us" not in r}
    assert untimed and all(provider == "triton" for _, provider, _ in untimed), untimed
    assert all(r["vs_eager"] > 0 for r in res["rows"] if "vs_eager" in r)
    out = tmp_path / "gpu.md"
    write_markdown(res, out)
    text = out.read_text()
    assert text.startswith("# fastrank GPU check") and res["machine"]["cpu"] in text and "| maxsim fwd |" in text
