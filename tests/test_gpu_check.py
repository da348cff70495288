"""scripts/gpu_check.sh and fastrank.bench.gpu, checked on the CPU: GPU minutes are too scarce to spend on a
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
    from fastrank.bench.gpu import format_report, measure

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
    text = format_report(res)
    assert text.startswith("# fastrank GPU check") and res["machine"]["cpu"] in text and "| maxsim fwd |" in text


def test_kernel_rows_share_the_static_tables_format():
    """On a GPU, kernel_resources() reports each kernel the run compiled as a fastrank.bench.kernels row, so the
    run's registers and spills line up with benchmarks/results/kernels_sm90.md; checked here on a compiled
    kernel's metadata as Triton keeps it (source signature and constants, driver counts)."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from fastrank.bench import kernels as kernel_report
    from fastrank.bench.gpu import format_report, kernel_resources
    from fastrank.ops import maxsim_packed_triton as packed

    assert kernel_resources() == []  # nothing compiled for a GPU here: no rows rather than made-up ones
    kernel = packed._packed_fwd_kernel
    names = kernel_report.jit_of(kernel).arg_names
    constants = {(names.index(n),): v for n, v in dict(HAS_QM=True, INT8=True, STORE_ARG=False, PRECISION="ieee",
                                                         BLOCK_LQ=32, BLOCK_LD=64, BLOCK_H=64).items() if n in names}
    signature = {n: ("constexpr" if (i,) in constants else "*fp32" if n == "Q" else "*i8" if i == 1 else "i32")
                 for i, n in enumerate(names)}
    meta = SimpleNamespace(num_warps=4, num_stages=3, num_ctas=1, maxnreg=None, shared=40960,
                           target=SimpleNamespace(arch=90))
    compiled = SimpleNamespace(src=SimpleNamespace(signature=signature, constants=constants), metadata=meta,
                               n_regs=255, n_spills=1052)
    row = kernel_report.runtime_row("_packed_fwd_kernel", packed.__name__, kernel, compiled)
    assert list(row) == list(kernel_report.ROW_KEYS)
    assert (row["kernel"], row["module"], row["dtype"], row["direction"]) == (
        "_packed_fwd_kernel", "maxsim_packed_triton", "int8 (q fp32)", "forward")
    assert row["config"].endswith("w4 s3") and "QM INT8" in row["config"] and "ARG" not in row["config"]
    assert (row["registers"], row["spill_bytes"], row["shared_bytes"]) == (255, 1052, 40960)
    assert kernel_report.row_failures(row) == ["spills 1052 bytes"]
    res = dict(machine=dict(device="cuda", gpu="GPU", cpu="cpu", torch="t", commit="c"), rows=[],
               ceilings=dict(read_gbps=1.0, copy_gbps=1.0), kernels=[row])
    text = format_report(res)
    assert kernel_report.TABLE_HEAD in text and kernel_report.format_row(row) in text
