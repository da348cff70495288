"""Issue 13, the MaxSim forward kernels' sm_90 spills: the variants that used to spill compile spill-free.

The full-scope static table (``python -m fastrank.bench.kernels --arch 90 --scope full``) showed two families
of forward variants spilling although far from 255 registers: ptxas kept a long-lived per-thread value off
the registers to stay under an occupancy step, and reloaded it around the H-split loop.

- ``_maxsim_fwd_kernel``, bf16, one-mask calls (only QM or only DM), H split, one document per program:
  8 bytes (the output pair's address, x and fy, held across the doc-tile loop).
- ``_packed_fwd_kernel``, int8 tokens with a bf16 query, QM, 64-token query tile, H split (DOCS 4 and 8):
  32 bytes (the 64-bit per-thread query and scale pointers, held across the H loop).

These variants are listed by the launchers as kernel_report records them (its ``variants``: the full scope
holds the one-mask calls and 64-token queries) and compiled by its ``compile_variant``, in a process
without TRITON_INTERPRET (kernels defined under the interpreter cannot be compiled for a GPU); the rows'
``spill_bytes`` must be 0. The quick scope of tests/test_kernel_report.py compiles one variant per config,
with every flag on, so it never reaches these.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_COMPILE = r"""
import json, sys
from fastrank.bench import kernels as kr

try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    kr._ptxas_path(90)
except Exception as exc:  # no CUDA backend or no bundled ptxas in this Triton
    print("SKIP " + f"{type(exc).__name__}: {exc}"[:300])
    sys.exit(0)

def used_to_spill(v):
    x = v["values"]
    if v["name"] == "_maxsim_fwd_kernel":
        return v["dtype"] == "bf16" and x["SPLIT_H"] and x["DOCS"] == 1 and x["HAS_QM"] != x["HAS_DM"]
    return (v["name"] == "_packed_fwd_kernel" and v["dtype"] == "int8 (q bf16)" and x["SPLIT_H"]
            and x["BLOCK_LQ"] == 64 and x["HAS_QM"])

todo = [v for v in kr.variants(90, "full", ["_maxsim_fwd_kernel", "_packed_fwd_kernel"]) if used_to_spill(v)]
print(json.dumps([kr.compile_variant(v, 90) for v in todo]))
"""


def test_forward_variants_that_spilled_on_sm90_do_not():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    if last.startswith("SKIP "):
        pytest.skip(f"cannot compile for sm_90 here: {last[5:]}")
    rows = json.loads(last)
    names = sorted((r["kernel"], r["config"]) for r in rows)
    # two one-mask MaxSim variants (QM or DM), each with and without the stored argmax; two packed (DOCS 4, 8)
    assert [k for k, _ in names].count("_maxsim_fwd_kernel") == 4, names
    assert [k for k, _ in names].count("_packed_fwd_kernel") == 2, names
    for r in rows:
        assert r["error"] is None, r
        assert r["spill_bytes"] == 0 and r["spills_ok"], (
            f"{r['kernel']} {r['dtype']} [{r['config']}]: spills {r['spill_bytes']} bytes "
            f"({r['spill_stores']} stored, {r['spill_loads']} loaded) at {r['registers']} registers")
        assert r["registers_ok"] and r["registers"] <= 255, r
