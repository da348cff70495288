"""`fastrank bench all` (and `bench lite`, `bench losses`, `bench index`, `bench maxsim --out`): every op's
providers side by side, scaling sweeps with fitted exponents, one report.

Sections, each a function ``(settings, probes) -> (rows, notes)`` returning :mod:`fastrank.bench_suite` rows:

- ``maxsim``: the cases of `fastrank bench maxsim` (eager forms, torch.compile, fastrank on each CPU ISA
  path, maxsim-cpu) and three sweeps of 1-query re-ranking: documents (1x100 to 1x20,000 on CPU, to
  1x100,000 on a GPU), document length Ld 32 to 512, and width H 128 and 768;
- ``packed``: `fastrank bench packed` (DL19 top-100 with real token lengths), its rows converted;
- ``lite``, ``losses``, ``index``: :mod:`fastrank.bench_lite`, :mod:`fastrank.bench_losses`,
  :mod:`fastrank.bench_index`, the same code the pytest benchmarks in benchmarks/ run.

``bench all`` runs those five. ``rerank`` (encodes DL19 with MiniLM: minutes on a CPU) and ``kernels``
(:mod:`fastrank.kernel_report`: compiles Triton kernels for a GPU target, minutes) run only when asked with
``--include``; ``kernels`` is also included by ``--device cuda``. Their own reports print as they run.

``--quick`` keeps the smallest points of each sweep (under 3 minutes on 2 idle CPU cores); the full run
takes the issue's sizes (under 30). ``--out DIR`` writes report.md, results.json and the PNGs
(:mod:`fastrank.bench_report`); ``--json [FILE]`` writes the rows machine-readably (to stdout without FILE).
"""
from __future__ import annotations

import sys
import time
from typing import Optional

import torch

from fastrank import machine
from fastrank.bench_suite import Settings, Shape, measure, scaling_fits

SECTION_NAMES = ("maxsim", "packed", "lite", "losses", "index")
EXTRA_SECTIONS = ("rerank", "kernels")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------- MaxSim

def maxsim_sweeps(device: str, quick: bool, tiny: bool, dtype: torch.dtype) -> list:
    """1-query re-ranking cases along three axes (documents, Ld, H), each case tagged with its sweep."""
    from fastrank.bench import MaxSimCase

    def case(docs, ld, h, lq=32):
        return MaxSimCase(f"rerank 1x{docs} Ld={ld} H={h}", "rerank", 1, docs, lq=lq, ld=ld, h=h, dtype=dtype,
                          targeted=False)

    if tiny:
        return ([("docs", c.docs, c) for c in (case(3, 9, 16, 7), case(6, 9, 16, 7))]
                + [("Ld", c.ld, c) for c in (case(4, 5, 16, 7), case(4, 11, 16, 7))])
    gpu = device.startswith("cuda")
    if gpu:
        docs = (100, 1000, 10000, 100000) if quick else (100, 300, 1000, 3000, 10000, 30000, 100000)
    else:
        docs = (100, 1000, 5000) if quick else (100, 300, 1000, 3000, 10000, 20000)
    lds = (32, 128, 512) if quick else (32, 64, 128, 256, 512)
    out = [("docs", n, case(n, 200, 128)) for n in docs] + [("Ld", ld, case(1000, ld, 128)) for ld in lds]
    if not quick:  # H 128 and 768 at 1x1000 are main cases in the quick run already
        out += [("H", h, case(1000, 200, h)) for h in (128, 768)]
    return out


def _maxsim_shape(case, sweep, work, inputs, device):
    from fastrank import bench

    bf16_hw = bench.default_path(device) in bench.BF16_GEMM_PATHS and case.dtype == torch.bfloat16
    label = {"docs": f"docs (Ld={case.ld}, H={case.h})", "Ld": f"Ld (1x{case.docs}, H={case.h})",
             "H": f"H (1x{case.docs}, Ld={case.ld})"}.get(sweep)
    return Shape("maxsim", case.name + (" fwd+bwd" if case.backward and "bwd" not in case.name else ""),
                 case.dtype_name, case.pairs, unit="docs/s",
                 # forward+backward rows get no FLOP count: their target is a speedup only (fastrank.bench)
                 flops=None if case.backward else bench.case_work(case, inputs)["flops"],
                 bytes=case.bytes_read(), ceiling="bf16_gemm_gflops" if bf16_hw else "sgemm_gflops",
                 sweep=label, work=work, baselines=bench.EAGER_PROVIDERS)


def maxsim_section(settings: Settings, probes) -> tuple[list[dict], list[str]]:
    from fastrank import bench

    device = settings.device
    gpu = device.startswith("cuda")
    compile = settings.compile or gpu
    if settings.tiny:
        from fastrank.bench import MaxSimCase

        cases = [MaxSimCase("tiny rerank", "rerank", 1, 4, lq=7, ld=9, h=16, dtype=dt)
                 for dt in (torch.float32, torch.bfloat16)]
        cases.append(MaxSimCase("tiny train fwd+bwd", "grouped", 3, 4, lq=7, ld=9, h=16, backward=True))
    else:
        cases = bench.select_cases(bench.cuda_cases() if gpu else bench.cpu_cases(), quick=settings.quick)
    cases = [c for c in cases if settings.wants(c.dtype_name)]
    sweep_dtypes = ([torch.bfloat16] if gpu else [torch.float32]) if settings.dtypes is None else \
        [getattr(torch, n) for n in settings.dtypes]
    main_providers = bench.default_providers(device, compile=compile)
    # The sweeps show how cost grows, provider by provider: the eager forms and fastrank's default path
    # (each ISA path is in the main cases).
    sweep_providers = [p for p in main_providers if not p.startswith(bench.ISA_PREFIX)]
    points = [(None, None, c) for c in cases]
    points += [pt for dt in sweep_dtypes for pt in maxsim_sweeps(device, settings.quick, settings.tiny, dt)]
    rows = []
    for sweep, work, case in points:
        inputs = case.make(device)
        providers = bench.case_providers(case, main_providers if sweep is None else sweep_providers, device)
        fns = {p: bench.provider_fn(p, case, inputs) for p in providers}
        rows += measure(_maxsim_shape(case, sweep, work, inputs, device), fns,
                        bench.provider_fn("reference", case, inputs),
                        lambda got, want, dt=case.dtype: bench.check(got, want, dt), settings, probes)
        del inputs, fns
    return rows, []


# ------------------------------------------------------------------------------------------- packed

def packed_rows(res: dict) -> list[dict]:
    """`fastrank bench packed`'s result as bench_suite rows (packed's own check ran before its timing)."""
    from fastrank.bench_suite import base_row

    rows = []
    bf16_hw = res["machine"]["isa"] in ("avx512bf16", "amx")
    for case in res["cases"]:
        for r in case["rows"]:
            name = r["provider"]
            dtype = next((d for d in ("bfloat16", "float16", "int8") if d in name), "float32")
            ceiling = "bf16_gemm_gflops" if dtype == "bfloat16" and bf16_hw else "sgemm_gflops"
            shape = Shape("packed", f"DL19 top-100 H={case['H']}", dtype, res["workload"]["candidates"],
                          ceiling=ceiling)
            row = base_row(shape, name)
            row.update(seconds=r["ms"] / 1e3, docs_per_s=r["docs_per_s"], ratio_to_eager=r["vs_eager"],
                       eager_provider="eager (padded)", ceiling_fraction=r["gemm_fraction"],
                       GFLOP_per_s=r["GFLOP_per_s"], GB_per_s=r["GB_per_s"],
                       arithmetic_intensity=r["GFLOP_per_s"] / r["GB_per_s"] if r["GB_per_s"] else None,
                       ceilings=case["ceilings"])
            rows.append(row)
    return rows


def packed_section(settings: Settings, probes) -> tuple[list[dict], list[str]]:
    if settings.device.startswith("cuda"):
        return [], ["packed: CPU only (the DL19 packed workload is timed on CPU tensors): skipped on --device cuda"]
    if settings.tiny:
        return [], ["packed: skipped in the tiny test run (it tokenizes DL19)"]
    try:
        import transformers  # noqa: F401 -- the workload's lengths come from the MiniLM tokenizer
    except ImportError:
        return [], ["packed: transformers is not installed (pip install 'fastrank[encoders]'): section skipped"]
    from fastrank import bench_packed

    try:
        res = bench_packed.run((128,) if settings.quick else (384, 128), min_seconds=settings.min_seconds,
                               progress=settings.progress)
    except AssertionError as exc:  # a provider disagreed with the padded kernel: nothing of this section is timed
        return [], [f"packed: REFUSED before timing: {exc}"]
    return packed_rows(res), []


# ------------------------------------------------------------------------------------------- running

def sections() -> dict:
    from fastrank import bench_index, bench_lite, bench_losses

    return {"maxsim": maxsim_section, "packed": packed_section, "lite": bench_lite.section,
            "losses": bench_losses.section, "index": bench_index.section}


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


def report(res: dict, out: Optional[str], json_path: Optional[str]) -> int:
    """Print the tables (or the JSON to stdout with ``--json`` alone), write --out and --json files; exit 1
    when a provider was refused, so a wrong kernel cannot pass unnoticed in a script."""
    import json

    from fastrank import bench_report

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


# ------------------------------------------------------------------------------------------- CLI

def _dtypes(text: Optional[str]) -> Optional[tuple[str, ...]]:
    if not text:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in DTYPE_NAMES]
    if bad or not names:
        raise ValueError(f"--dtype: expected a comma-separated subset of {','.join(DTYPE_NAMES)}, got {text!r}")
    return names


def add_common(p, *, json_flag: bool = True) -> None:
    """The options every section's subcommand shares."""
    p.add_argument("--quick", action="store_true", help="the smallest sizes of each sweep (under 3 minutes on 2 cores)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help=f"comma-separated subset of {','.join(DTYPE_NAMES)} (default: "
                   "float32 on CPU, bfloat16 on CUDA, plus the cases' own)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile on CPU (on CUDA it always runs; on CPU Inductor compiles C++ for minutes)")
    p.add_argument("--out", metavar="DIR", help="write report.md, results.json and PNG figures (matplotlib) there")
    if json_flag:
        p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                       help="the rows as JSON: to FILE, or instead of the tables on stdout without FILE")
    # Tests only: toy shapes and probes so the whole machinery runs in seconds (its figures mean nothing).
    p.add_argument("--tiny", action="store_true", help=__import__("argparse").SUPPRESS)


def settings_from(args) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here")
    return Settings(device=device, quick=args.quick, tiny=args.tiny, dtypes=_dtypes(args.dtype),
                    compile=args.compile, min_seconds=0.0 if args.tiny else (0.2 if args.quick else 0.3))


def command_line(args) -> str:
    """The command as parsed (the options that were set), whoever called the CLI: sys.argv is the test
    runner's under pytest and the caller's when fastrank.cli.main gets an argv."""
    import shlex

    parts = ["fastrank", "bench", args.op]
    for name, value in vars(args).items():
        if name in ("func", "op", "command") or value is None or value is False or value == "":
            continue
        flag = "--" + name.replace("_", "-")
        parts += [flag] if value is True or (name == "json" and value == "-") else [flag, str(value)]
    return shlex.join(parts)


def add_cli(ops) -> None:
    """`bench all`, `bench lite`, `bench losses`, `bench index` (registered by fastrank.bench.add_cli)."""
    p = ops.add_parser("all", help="every op side by side with scaling sweeps, ceilings, one report (--out DIR)")
    add_common(p)
    p.add_argument("--include", default="", help=f"comma-separated extra sections: {','.join(EXTRA_SECTIONS)} "
                   "(kernels is included with --device cuda)")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of {','.join(SECTION_NAMES)} (default: all of them)")
    p.set_defaults(func=_cli_all)
    helps = {"lite": "LITE pairs/s: eager reference, torch.compile, fastrank (CUDA), with the batch-size sweep",
             "losses": "distillation losses fwd+bwd queries/s: eager, torch.compile, fastrank, with the B x K sweep",
             "index": "DenseIndex queries/s against raw FAISS on the same index, with the corpus-size sweep"}
    for name, text in helps.items():
        q = ops.add_parser(name, help=text)
        add_common(q)
        q.set_defaults(func=lambda args, name=name: _cli_sections(args, [name]))


def _cli_sections(args, names) -> int:
    settings = settings_from(args)
    return report(run_sections(names, settings, command_line(args)), args.out, args.json)


def _cli_all(args) -> int:
    names = list(SECTION_NAMES)
    if args.sections:
        names = [n.strip() for n in args.sections.split(",") if n.strip()]
        bad = [n for n in names if n not in SECTION_NAMES]
        if bad or not names:
            raise ValueError(f"--sections: expected a comma-separated subset of {','.join(SECTION_NAMES)}, "
                             f"got {args.sections!r}")
    extra = [n.strip() for n in args.include.split(",") if n.strip()]
    bad = [n for n in extra if n not in EXTRA_SECTIONS]
    if bad:
        raise ValueError(f"--include: expected a comma-separated subset of {','.join(EXTRA_SECTIONS)}, got {args.include!r}")
    settings = settings_from(args)
    if settings.device.startswith("cuda") and "kernels" not in extra:
        extra.append("kernels")
    rc, notes = _run_extra(extra, args)
    res = run_sections(names, settings, command_line(args))
    res["notes"] += notes
    return report(res, args.out, args.json) or rc


def _run_extra(extra: list[str], args) -> tuple[int, list[str]]:
    """rerank and kernels keep their own reports: run them through the CLI as a user would."""
    from fastrank.cli import build_parser

    import os

    rc, notes = 0, []
    for name in extra:
        argv = ["bench", name]
        if name == "rerank" and args.quick:
            argv += ["--max-queries", "10", "--rounds", "1"]
        if name == "rerank" and args.device:
            argv += ["--device", args.device]
        if name == "kernels" and args.quick:
            argv += ["--scope", "quick"]
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            argv += ["--out" if name == "kernels" else "--json",
                     os.path.join(args.out, "kernels.md" if name == "kernels" else "rerank.json")]
        print(f"bench {name}: fastrank {' '.join(argv)}", file=sys.stderr)
        sub = build_parser().parse_args(argv)
        code = sub.func(sub)
        rc = code or rc
        notes.append(f"{name}: `fastrank {' '.join(argv)}` ran first (exit status {code or 0}); its report is its own"
                     + (f" ({os.path.basename(argv[-1])} beside this one)" if args.out else ""))
    return rc, notes
