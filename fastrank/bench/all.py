"""`fastrank bench all` (and `bench lite`, `bench losses`, `bench index`, `bench maxsim --out`): every op's
providers side by side, scaling sweeps with fitted exponents, one report.

Sections, each a function ``(settings, probes) -> (rows, notes)`` returning :mod:`fastrank.bench.suite` rows:

- ``maxsim``: the cases of `fastrank bench maxsim` (eager forms, torch.compile, fastrank on each CPU ISA
  path, maxsim-cpu) and three sweeps of 1-query re-ranking: documents (1x100 to 1x20,000 on CPU, to
  1x100,000 on a GPU), document length Ld 32 to 512, and width H 128 and 768;
- ``packed``: `fastrank bench packed` (DL19 top-100 with real token lengths), its rows converted;
- ``lite``, ``losses``, ``index``: :mod:`fastrank.bench.lite`, :mod:`fastrank.bench.losses`,
  :mod:`fastrank.bench.index`, the same code the pytest benchmarks in benchmarks/ run.

``bench all`` runs those five. ``rerank`` (encodes DL19 with MiniLM: minutes on a CPU) and ``kernels``
(:mod:`fastrank.bench.kernels`: compiles Triton kernels for a GPU target, minutes) run only when asked with
``--include``; ``kernels`` is also included by ``--device cuda``. Their own reports print as they run.

``--quick`` keeps the smallest points of each sweep (under 3 minutes on 2 idle CPU cores); the full run
takes the issue's sizes (under 30). ``--out DIR`` writes report.md, results.json and the PNGs
(:mod:`fastrank.bench.report`); ``--json [FILE]`` writes the rows machine-readably (to stdout without FILE).
"""
from __future__ import annotations

import sys
import time
from typing import Optional

from fastrank.bench import machine
from fastrank.bench.suite import Settings, scaling_fits

SECTION_NAMES = ("maxsim", "packed", "lite", "losses", "index")
EXTRA_SECTIONS = ("rerank", "kernels")


# ------------------------------------------------------------------------------------------- running

def sections() -> dict:
    """Each section by name: a function ``(settings, probes) -> (rows, notes)`` of the op's own module."""
    from fastrank.bench import index, lite, losses, maxsim, packed

    return {"maxsim": maxsim.section, "packed": packed.section, "lite": lite.section, "losses": losses.section,
            "index": index.section}


def run_sections(names, settings: Settings, command: str, ceiling_seconds: float = 2.5) -> dict:
    """Measure the ceilings, run each named section, fit the sweeps: the dict bench_report writes."""
    table = sections()
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown benchmark section(s) {unknown}; expected some of {list(table)}")
    info = machine.machine_info(settings.device)
    if settings.tiny:
        ceilings = machine.measure_ceilings(settings.device, seconds=0.02, gemm_n=64, copy_mb=1, read_mb=1)
    else:
        ceilings = machine.measure_ceilings(settings.device, seconds=ceiling_seconds)
    probes = settings.probes()
    rows, notes = [], []
    for name in names:
        start = time.perf_counter()
        got, said = table[name](settings, probes)
        rows += got
        notes += said
        if settings.progress:
            print(f"bench {name}: {len(got)} rows in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    refused = [f"{r['op']} {r['shape']} {r['dtype']}: {r['provider']}" for r in rows if r["refused"]]
    return {"command": command, "machine": info, "ceilings": ceilings, "rows": rows, "fits": scaling_fits(rows),
            "notes": notes, "refused": refused}


def emit(res: dict, out: Optional[str], json_path: Optional[str]) -> int:
    """Print the tables (or the JSON to stdout with ``--json`` alone), write --out and --json files; exit 1
    when a provider was refused, so a wrong kernel cannot pass unnoticed in a script."""
    import json

    from fastrank.bench import report as bench_report

    if json_path == "-":
        print(json.dumps(bench_report.json_ready(res), indent=1))
    else:
        print(bench_report.markdown(res))
    if json_path and json_path != "-":
        with open(json_path, "w") as f:
            json.dump(bench_report.json_ready(res), f, indent=1)
    if out:
        path, notice = bench_report.write(res, out)
        if notice:
            print(notice, file=sys.stderr)
        print(f"wrote {path}", file=sys.stderr)
    if res["refused"]:
        print(f"{len(res['refused'])} provider(s) REFUSED (output disagrees with the reference; not timed): "
              + "; ".join(res["refused"]), file=sys.stderr)
        return 1
    return 0


