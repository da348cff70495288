"""`fastrank bench ...`: every benchmark subcommand, registered in this one place.

The options every subcommand shares mean the same thing everywhere (a test walks the parsers to hold this):

- ``--quick``: the smallest sizes, a look in a few minutes;
- ``--device {cpu,cuda}``: where to measure (default: cuda when torch sees one, except where a command says);
- ``--json [FILE]``: the results as JSON to FILE, or to stdout instead of the tables when FILE is left out;
- ``--out DIR``: report.md and results.json (and, for the sweeps, PNG figures) written into DIR, which may
  hold only a report an earlier `fastrank bench` wrote there.

The measuring code lives in the modules beside this one and never parses arguments: this module turns
options into their calls. Only :mod:`fastrank.cli` imports it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from fastrank.bench import machine
from fastrank.bench.report import check_report_dir, print_report

DTYPE_NAMES = ("float32", "bfloat16", "float16")
PACKED_DTYPES = (*DTYPE_NAMES, "int8")
COMMON_OPTIONS = ("--quick", "--device", "--json", "--out")
SHARED_OPTIONS = """Every subcommand takes these, with one meaning:
  --quick              the smallest sizes: a look in a few minutes
  --device DEVICE      where to measure: cpu, cuda or cuda:N (default: cuda when torch sees one,
                       unless the subcommand says)
  --json [FILE]        the results as JSON to FILE, or to stdout instead of the tables without FILE
  --out DIR            report.md and results.json (figures for the sweeps) written into DIR"""


def add_common(p: argparse.ArgumentParser, *, quick: str, device: str = "cuda when torch sees one, else cpu",
               json_what: str = "the results", out_what: str = "report.md and results.json") -> None:
    """--quick, --device, --json [FILE] and --out DIR, with one meaning in every subcommand."""
    p.add_argument("--quick", action="store_true", help=f"a quick look: {quick}")
    p.add_argument("--device", default=None, help=f"where to measure: cpu, cuda or cuda:N (default: {device})")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help=f"{json_what} as JSON: to FILE, or to stdout instead of the tables without FILE "
                        "(default: tables only)")
    p.add_argument("--out", metavar="DIR", help=f"write {out_what} into DIR (default: nothing written)")


def _device(args, default: Optional[str] = None) -> str:
    """--device checked by its flag (cpu, cuda or cuda:N that this torch can use), or the command's default."""
    from fastrank.encoders import check_device

    return str(check_device(args.device or default, "--device"))


def dtype_names(text: Optional[str], allowed=DTYPE_NAMES) -> Optional[tuple[str, ...]]:
    if not text:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"--dtype: expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return names


def command_line(args) -> str:
    """The command as parsed (the options that were set), whoever called the CLI: sys.argv is the test
    runner's under pytest and the caller's when fastrank.cli.main gets an argv."""
    parts = ["fastrank", "bench", args.op]
    for name, value in vars(args).items():
        if name in ("func", "op", "command") or value is None or value is False or value == "":
            continue
        flag = "--" + name.replace("_", "-")
        parts += [flag] if value is True or (name == "json" and value == "-") else [flag, str(value)]
    return shlex.join(parts)


def _checked_out(fn: Callable) -> Callable:
    """--out DIR is checked before any work: only a report `fastrank bench` wrote there may be replaced."""
    def run(args) -> int:
        if args.out:
            check_report_dir(args.out, "--out")
        return fn(args)
    return run


def _parser(ops, name: str, help: str) -> argparse.ArgumentParser:
    return ops.add_parser(name, help=help, description=help)


# ------------------------------------------------------------------------------------------- maxsim

def _add_maxsim(ops) -> None:
    from fastrank.bench.maxsim import EMULATE_ENV, ISA_PREFIX, PROVIDERS

    p = _parser(ops, "maxsim", "MaxSim docs/sec: eager forms, torch.compile, fastrank per ISA path, maxsim-cpu; next "
                               "to this machine's sgemm and bandwidth ceilings")
    add_common(p, quick="only the 1x1000 re-rank cases (with --out, the smallest points of each sweep)",
               json_what="machine info, ceilings and rows",
               out_what="report.md, results.json and PNG figures of the cases and the scaling sweeps (docs, Ld, H)")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated subset of {','.join(PROVIDERS)},{ISA_PREFIX}<isa> (default: all that run "
                        "on the device, except compile on CPU, where torch.compile spends minutes compiling C++)")
    p.add_argument("--isa", default=None, help="comma-separated CPU ISA paths to time as fastrank:<isa> (default: "
                                               "every path this CPU has except scalar)")
    p.add_argument("--cases", default=None, help="comma-separated substrings of case names to keep (default: all)")
    p.add_argument("--ceiling-seconds", type=float, default=2.5,
                   help="time spent measuring the sgemm/bandwidth ceilings")
    p.add_argument("--emulate", choices=sorted(EMULATE_ENV), default=None,
                   help="measure as on a CPU whose best path is this one: rerun in a fresh process with "
                        "FASTRANK_CPU_ISA and torch's BLAS (MKL, oneDNN, ATen) limited to the same instructions "
                        "(default: this CPU as it is)")
    p.add_argument("--dtype", default=None,
                   help=f"comma-separated dtypes to keep ({', '.join(DTYPE_NAMES)}; default: every case's)")
    p.add_argument("--compile", action="store_true", help="with --out: also time torch.compile on CPU")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: toy shapes, with --out
    p.set_defaults(func=_checked_out(_cli_maxsim))


def _maxsim_providers(args, device: str) -> list[str]:
    from fastrank.bench.maxsim import ISA_PREFIX, PROVIDERS, default_providers

    available_isas = machine.isa_paths()
    isas = None
    if args.isa:
        isas = [i.strip() for i in args.isa.split(",") if i.strip()]
        bad = [i for i in isas if i not in available_isas]
        if bad:
            raise ValueError(
                f"--isa: {','.join(bad)} cannot run here; this CPU and build offer {','.join(available_isas)} "
                f"(CPU flags: {' '.join(machine.machine_info()['isa_flags']) or 'none'})")
    if not args.providers:
        return default_providers(device, compile=device.startswith("cuda"), isas=isas)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    known = set(PROVIDERS) | {ISA_PREFIX + i for i in available_isas}
    unknown = [p for p in providers if p not in known]
    if unknown:
        raise ValueError(f"--providers: unknown {unknown}; expected a subset of {','.join(sorted(known))}")
    if isas is not None:
        providers = [p for p in providers if not p.startswith(ISA_PREFIX) or p[len(ISA_PREFIX):] in isas]
    return providers


def _emulate(args) -> int:
    """Rerun this command in a fresh process whose MKL, oneDNN and ATen read the emulated ISA at load."""
    import subprocess

    from fastrank.bench.maxsim import EMULATE_ENV

    if args.emulate not in machine.isa_paths():
        raise ValueError(f"--emulate {args.emulate}: this CPU cannot run that path itself "
                         f"(it offers {','.join(machine.isa_paths())})")
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--emulate":
            skip = True
        elif not a.startswith("--emulate="):
            argv.append(a)
    env = dict(os.environ, **EMULATE_ENV[args.emulate], FASTRANK_BENCH_EMULATING=args.emulate)
    return subprocess.run([sys.executable, "-m", "fastrank.cli", *argv], env=env).returncode


def _cli_maxsim(args) -> int:
    from fastrank.bench import maxsim

    if args.emulate:
        return _emulate(args)
    if args.out:
        if args.providers or args.isa or args.cases:
            raise ValueError("--out runs every provider on the cases and the sweeps; it takes none of --providers, "
                             "--isa, --cases")
        return _report_sections(["maxsim"], args, ceiling_seconds=args.ceiling_seconds)
    if args.compile:
        raise ValueError("--compile goes with --out (the sweeps); without --out, time torch.compile with "
                         "--providers compile")
    device = _device(args)
    providers = _maxsim_providers(args, device)
    cases = maxsim.select_cases(maxsim.cuda_cases() if device.startswith("cuda") else maxsim.cpu_cases(),
                                args.quick, args.cases)
    if args.dtype:
        keep = dtype_names(args.dtype)
        cases = [c for c in cases if c.dtype_name in keep]
    if not cases:
        chosen = [f"{flag} {value}" for flag, value in (("--cases", args.cases), ("--dtype", args.dtype)) if value]
        raise ValueError(f"{' with '.join(chosen + ['--quick'] * args.quick)}: no case matches")
    info = machine.machine_info(device)
    ceilings = machine.measure_ceilings(device, seconds=args.ceiling_seconds)
    rows = maxsim.run_maxsim(cases, device, providers, ceilings=ceilings, default_isa=maxsim.default_path(device))
    res = {"machine": info, "ceilings": ceilings, "rows": rows}
    return print_report(res, lambda r: maxsim.format_report(r["machine"], r["ceilings"], r["rows"]), args.json,
                        None, command_line(args))


# ------------------------------------------------------------------------------------------- the sweeps

def _settings(args):
    from fastrank.bench.suite import Settings

    return Settings(device=_device(args), quick=args.quick, tiny=args.tiny, dtypes=dtype_names(args.dtype),
                    compile=args.compile, min_seconds=0.0 if args.tiny else (0.2 if args.quick else 0.3))


def _report_sections(names, args, ceiling_seconds: float = 2.5, notes=()) -> int:
    """Run sections by name through fastrank.bench.all and write the one report; exit status 1 when a provider
    was refused, so a wrong kernel cannot pass unnoticed in a script."""
    from fastrank.bench.all import emit, run_sections

    res = run_sections(names, _settings(args), command_line(args), ceiling_seconds=ceiling_seconds)
    res["notes"] += list(notes)
    return emit(res, args.out, args.json)


def _add_sweep_options(p) -> None:
    p.add_argument("--dtype", default=None, help=f"comma-separated subset of {','.join(DTYPE_NAMES)} (default: "
                   "float32 on CPU, bfloat16 on CUDA, plus the cases' own)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile on CPU (on CUDA it always runs; on CPU Inductor compiles C++ for "
                        "minutes)")
    # Tests only: toy shapes and probes so the whole machinery runs in seconds (its figures mean nothing).
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


SWEEP_HELP = {
    "lite": "LITE pairs/s: eager reference, torch.compile, fastrank (the Triton kernels on CUDA, the C++ kernel on CPU), with the batch-size sweep",
    "losses": "distillation losses fwd+bwd queries/s: eager, torch.compile, fastrank, with the B x K sweep",
    "index": "DenseIndex queries/s against raw FAISS on the same index, with the corpus-size sweep",
}
SWEEP_QUICK = "the smallest sizes of each sweep (under 3 minutes on 2 cores)"
SWEEP_OUT = "report.md, results.json and PNG figures (matplotlib)"


def _add_sweeps(ops) -> None:
    from fastrank.bench.all import EXTRA_SECTIONS, SECTION_NAMES

    p = _parser(ops, "all", "every op side by side with scaling sweeps, ceilings, one report")
    add_common(p, quick=SWEEP_QUICK, json_what="the rows", out_what=SWEEP_OUT + " (kernels/ and rerank/ beside them)")
    _add_sweep_options(p)
    p.add_argument("--include", default="", help=f"comma-separated extra sections: {','.join(EXTRA_SECTIONS)} "
                   "(default: none; kernels is included with --device cuda)")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of {','.join(SECTION_NAMES)} (default: all of them)")
    p.set_defaults(func=_checked_out(_cli_all))
    for name, text in SWEEP_HELP.items():
        q = _parser(ops, name, text)
        add_common(q, quick=SWEEP_QUICK, json_what="the rows", out_what=SWEEP_OUT)
        _add_sweep_options(q)
        q.set_defaults(func=_checked_out(lambda args, name=name: _report_sections([name], args)))
        if name == "index":
            _add_index_scale(q)


def _add_index_scale(q) -> None:
    from fastrank.bench.index_scale import DEFAULT_DTYPES, DTYPES

    g = q.add_argument_group("token indexes at scale (--scale)")
    g.add_argument("--scale", action="store_true",
                   help="instead: stream synthetic token corpora (H=128) at 1M, 10M and 100M tokens into TokenIndexes "
                        "and record build time, peak memory, bytes per token, load time, queries/s and recall@10, "
                        "with fitted exponents and MS MARCO projected")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="the largest corpus (default 100000000; 1000000 with --quick); below 10M, two sizes: N/10 and N")
    g.add_argument("--token-dtypes", default=None,
                   help=f"comma-separated subset of {','.join(DTYPES)} (default {','.join(DEFAULT_DTYPES)})")
    g.add_argument("--workdir", default=None,
                   help="where the indexes are built (default: the system's temporary directory; each is removed "
                        "after its row)")
    q.set_defaults(func=_checked_out(_cli_index))


def _cli_index(args) -> int:
    scale_only = [f for f, v in (("--max-tokens", args.max_tokens), ("--token-dtypes", args.token_dtypes),
                                 ("--workdir", args.workdir)) if v is not None]
    if not args.scale:
        if scale_only:
            raise ValueError(f"{', '.join(scale_only)} apply to --scale only")
        return _report_sections(["index"], args)
    from fastrank.bench import index_scale
    from fastrank.bench.report import print_report

    if args.device not in (None, "cpu"):
        raise ValueError(f"--device {args.device}: bench index --scale builds and searches on the CPU")
    max_tokens = args.max_tokens or (1_000_000 if args.quick else 100_000_000)
    if max_tokens < 10_000:
        raise ValueError(f"--max-tokens {max_tokens}: expected at least 10000")
    dtypes = tuple(d.strip() for d in (args.token_dtypes or ",".join(index_scale.DEFAULT_DTYPES)).split(",")
                   if d.strip())
    bad = [d for d in dtypes if d not in index_scale.DTYPES]
    if bad or not dtypes:
        raise ValueError(f"--token-dtypes: expected a comma-separated subset of {','.join(index_scale.DTYPES)}, "
                         f"got {args.token_dtypes!r}")
    res = index_scale.run(max_tokens, dtypes, workdir=args.workdir, quick=args.quick)
    rc = print_report(res, index_scale.markdown, args.json, args.out, command_line(args))
    if args.out:
        try:
            index_scale.draw(res, Path(args.out))
        except ImportError:
            print("bench index --scale: matplotlib is not installed: no figure", file=sys.stderr)
    return rc


def _cli_all(args) -> int:
    from fastrank.bench.all import EXTRA_SECTIONS, SECTION_NAMES

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
        raise ValueError(f"--include: expected a comma-separated subset of {','.join(EXTRA_SECTIONS)}, "
                         f"got {args.include!r}")
    if _device(args).startswith("cuda") and "kernels" not in extra:
        extra.append("kernels")
    rc, notes = _run_extra(extra, args)
    return _report_sections(names, args, notes=notes) or rc


def _run_extra(extra: list[str], args) -> tuple[int, list[str]]:
    """rerank and kernels keep their own reports: run as their own subcommands would, into DIR/<name>/."""
    rc, notes = 0, []
    for name in extra:
        argv = ["bench", name]
        if args.quick:
            argv.append("--quick")
        if args.device:
            argv += ["--device", args.device]
        if args.out:
            argv += ["--out", os.path.join(args.out, name)]
        print(f"bench {name}: fastrank {' '.join(argv)}", file=sys.stderr)
        sub = build_parser().parse_args(argv)
        code = sub.func(sub)
        rc = code or rc
        notes.append(f"{name}: `fastrank {' '.join(argv)}` ran first (exit status {code or 0}); its report is its own"
                     + (f" ({name}/report.md beside this one)" if args.out else ""))
    return rc, notes


# ------------------------------------------------------------------------------------------- packed

def _add_packed(ops) -> None:
    p = _parser(ops, "packed", "MaxSim re-ranking of DL19 top-100 with real token lengths: packed (float32, bfloat16, "
                               "float16, int8) against padded and eager")
    add_common(p, quick="H = 128 only, 0.3 s per provider (--dims and --seconds, when given, win)",
               device="cpu; the workload is timed on CPU tensors, `fastrank bench maxsim --device cuda` covers the "
                      "GPU kernels")
    p.add_argument("--dims", default=None, help="comma-separated embedding widths H (default 384,128; 128 with --quick)")
    p.add_argument("--data", help="a TREC DL folder (default: the embedded DL 2019 set)")
    p.add_argument("--model", help="tokenizer directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--seconds", type=float, default=None,
                   help="minimum timed seconds per provider (default 1; 0.3 with --quick)")
    p.add_argument("--dtype", default=None, help=f"comma-separated subset of {','.join(PACKED_DTYPES)} to keep in the "
                                                 "report (default: all; eager and padded rows always stay)")
    p.set_defaults(func=_checked_out(_cli_packed))


def _cli_packed(args) -> int:
    from fastrank.bench import packed

    # ValueError, not SystemExit: main prints it as `fastrank bench: error: ...` and exits 2, as every other
    # command does, and all of it runs before the workload's tokenizer pass.
    if args.device not in (None, "cpu"):
        raise ValueError(f"--device {args.device}: bench packed times the DL19 workload on CPU tensors only; "
                         "`fastrank bench maxsim --device cuda` times the GPU kernels")
    dims_text = args.dims or ("128" if args.quick else "384,128")
    try:
        dims = [int(x) for x in dims_text.split(",") if x.strip()]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise ValueError(f"--dims: expected positive integers, got {dims_text!r}")
    keep = dtype_names(args.dtype, PACKED_DTYPES)
    # --quick sets defaults that explicit options override: a value the user typed is never dropped.
    seconds = args.seconds if args.seconds is not None else (0.3 if args.quick else 1.0)
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"--seconds: expected a finite number of seconds >= 0, got {args.seconds!r}")
    res = packed.run(dims, data=args.data, model=args.model, min_seconds=seconds)
    if keep:
        for case in res["cases"]:
            # the baselines (eager, padded) are what every ratio is to: they stay
            case["rows"] = [r for r in case["rows"] if not r["provider"].startswith("packed")
                            or any(r["provider"].split()[1] == d for d in keep)]
    return print_report(res, packed.format_report, args.json, args.out, command_line(args))


# ------------------------------------------------------------------------------------------- rerank

def _add_rerank(ops) -> None:
    p = _parser(ops, "rerank", "TREC DL re-ranking, one row per scorer (BM25, dense, MaxSim, LITE, cross-encoder): "
                               "nDCG@10, RR@10 and docs/s, same machine, same run")
    add_common(p, quick="the first 10 queries, one timed round (unless --max-queries or --rounds say otherwise)",
               json_what="the rows, machine and command")
    p.add_argument("--data", help="a TREC DL folder (default: the embedded DL 2019 set)")
    p.add_argument("--model", help="bi-encoder directory for dense and MaxSim (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--cross", metavar="DIR",
                   help="a local cross-encoder (sequence-classification checkpoint); without it an untrained one of "
                        "the bi-encoder's architecture is timed and given no quality figure (default: none)")
    p.add_argument("--lite-model", metavar="DIR", help="a directory written by `fastrank train --scorer lite`: adds "
                                                      "the LITE row (default: no LITE row)")
    p.add_argument("--batch-size", type=int, default=64, help="texts or pairs per forward pass")
    p.add_argument("--max-queries", type=int, help="only the first N queries (default: all; 10 with --quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds after a warm-up; each row's docs/s is its median round (default 3; 1 with "
                        "--quick)")
    p.add_argument("--dtype", default=None,
                   help="what MaxSim's packed tokens and LITE's weights and inputs are held and scored in (default "
                        "float32 on CPU, float16 on CUDA; bfloat16 is the fast one on CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--no-eager", action="store_true",
                   help="leave out the eager-reference rows of MaxSim and LITE (default: timed beside the fused ones)")
    p.set_defaults(func=_checked_out(_cli_rerank))


def _check_rerank_options(args) -> None:
    """Each option by its flag, before the data is read or any model loads (run_bench's own checks come after
    the bi-encoder has loaded and name its Python arguments)."""
    from fastrank.bench import rerank
    from fastrank.encoders import check_device
    from fastrank.trained import MANIFEST, is_trained, read_manifest

    check_device(args.device, "--device")
    if args.dtype is not None and args.dtype not in rerank.SCORE_DTYPES:
        raise ValueError(f"--dtype: expected one of {','.join(rerank.SCORE_DTYPES)}, got {args.dtype!r}")
    for flag, value in (("--batch-size", args.batch_size), ("--max-queries", args.max_queries),
                        ("--rounds", args.rounds)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    for flag, value in (("--model", args.model), ("--cross", args.cross)):
        if value is not None and not (Path(value) / "config.json").is_file():
            raise FileNotFoundError(f"{flag} {value}: not a local transformers model directory (no config.json)")
    if args.lite_model is not None:
        if not Path(args.lite_model).is_dir():
            raise FileNotFoundError(f"--lite-model {args.lite_model}: no such directory")
        if not is_trained(args.lite_model):
            raise FileNotFoundError(f"--lite-model {args.lite_model}: not a directory written by `fastrank train` "
                                    f"(no {MANIFEST})")
        scorer = read_manifest(args.lite_model)["scorer"]
        if scorer != "lite":
            raise ValueError(f"--lite-model {args.lite_model}: holds a trained {scorer} model, not a LITE one; "
                             "expected a directory of `fastrank train --scorer lite`")


def _cli_rerank(args) -> int:
    from fastrank.bench import rerank

    _check_rerank_options(args)
    # --quick only fills in what was not given: an explicit --rounds 3 stays 3 rounds.
    max_queries = args.max_queries if args.max_queries is not None else (10 if args.quick else None)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    res = rerank.run_bench(args.data, args.model, cross=args.cross, lite_model=args.lite_model, device=args.device,
                           batch_size=args.batch_size, max_queries=max_queries, rounds=rounds, dtype=args.dtype,
                           eager=not args.no_eager)
    res.pop("runs")
    return print_report(res, rerank.format_report, args.json, args.out, command_line(args))


# ------------------------------------------------------------------------------------------- kernels

KERNELS_MISSING = ("fastrank bench kernels needs fastrank.bench.kernels (the compiled-kernel report for a GPU "
                   "target), which could not be imported here")


def _add_kernels(ops) -> None:
    """Without an importable kernels module the subcommand still exists and says why it cannot run, rather
    than argparse calling it an unknown choice."""
    help = ("static GPU check: registers, spills and shared memory of every Triton and CUDA kernel variant "
            "compiled for sm_80/sm_90 (no GPU needed)")
    p = _parser(ops, "kernels", help)
    try:
        from fastrank.bench.kernels import LIMITS, SCOPES
    except ImportError as exc:
        p.set_defaults(func=lambda args, exc=exc: _kernels_missing(exc))
        return
    add_kernels_arguments(p, LIMITS, SCOPES)
    p.set_defaults(func=_checked_out(cli_kernels))


def _kernels_missing(exc: ImportError) -> int:
    raise ImportError(f"{KERNELS_MISSING} ({exc})")


def add_kernels_arguments(p: argparse.ArgumentParser, limits, scopes) -> None:
    add_common(p, quick="--scope quick: one variant per kernel, dtype, pass and autotune config",
               device="cpu: a static compile for --arch, no GPU needed; cuda: --arch defaults to that GPU's",
               json_what="the rows", out_what="report.md (the table with its header) and results.json (the rows)")
    p.add_argument("--arch", type=int, choices=sorted(limits), default=None,
                   help="compute capability (default: 90, or the GPU's with --device cuda)")
    p.add_argument("--scope", choices=scopes, default=None,
                   help="all: every variant of the representative shapes; full: also one-mask calls and 64-token "
                        "queries; quick: one variant per kernel, dtype, pass and autotune config, the one with every "
                        "flag on (what the test suite compiles) (default: all; quick with --quick)")
    p.add_argument("--no-cuda", action="store_true", help="skip the nvcc compile of csrc/cuda/*.cu")
    p.add_argument("--jobs", type=int, default=None, help="compiling processes (default: one per CPU)")
    p.add_argument("--kernels", default=None,
                   help="comma-separated kernel names to compile, Triton kernels or CUDA kernels without <...> "
                        "(default: all)")
    p.add_argument("--list", action="store_true",
                   help="list the variants the launchers launch, compile nothing")
    p.add_argument("--quiet", action="store_true", help="no per-row progress")


def cli_kernels(args) -> int:
    """Prints each row as it compiles, then the table; writes --json/--out. Exit status 0 when every variant
    passes, LIMITS_BROKEN when one breaks a limit (the outputs are written all the same)."""
    from fastrank.bench import kernels as report

    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs: expected a positive integer, got {args.jobs}")
    names = None if args.kernels is None else [k.strip() for k in args.kernels.split(",") if k.strip()]
    if names is not None and not names:
        raise ValueError(f"--kernels: expected comma-separated kernel names, got {args.kernels!r}")
    arch = args.arch
    if arch is None:
        if _device(args, "cpu").startswith("cuda"):
            major, minor = torch.cuda.get_device_capability()
            arch = 10 * major + minor
            if arch not in report.LIMITS:
                raise ValueError(f"--device cuda: this GPU is sm_{arch}; the kernel report knows "
                                 f"{', '.join(f'sm_{a}' for a in sorted(report.LIMITS))} (pass --arch)")
        else:
            arch = 90
    scope = args.scope or ("quick" if args.quick else "all")
    to_stdout = args.json == "-"
    if args.list:
        text = json.dumps(report.list_variants(arch, scope=scope, kernels=names), indent=1)
        if args.json and not to_stdout:
            Path(args.json).write_text(text + "\n")
        else:
            print(text)
        return 0
    command = f"fastrank bench kernels --arch {arch}" + (f" --scope {scope}" if scope != "all" else "")
    command += " --no-cuda" if args.no_cuda else ""
    command += (f" --kernels {','.join(names)}" if names else "") + (f" --out {args.out}" if args.out else "")
    say = sys.stderr if to_stdout else sys.stdout
    progress = None
    if not args.quiet:
        print(report.TABLE_HEAD, file=say, flush=True)
        progress = lambda row: print(report.format_row(row), file=say, flush=True)  # noqa: E731
    rows = report.collect(arch, include_cuda=not args.no_cuda, scope=scope, jobs=args.jobs, kernels=names,
                          progress=progress)
    if names is not None and not rows:
        raise ValueError(f"--kernels: no kernel variant is named {', '.join(names)}")
    table = report.format_table(rows, report.header_info(arch, command))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(table)
        (out / "results.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
        print(f"wrote {out / 'report.md'}", file=sys.stderr)
    if args.json:
        text = json.dumps(rows, indent=1)
        if to_stdout:
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if not args.quiet:
        print("\n" + table, file=say)
    return report.LIMITS_BROKEN if any(report.row_failures(r) for r in rows) else 0


# ------------------------------------------------------------------------------------------- gpu

def _add_gpu(ops) -> None:
    p = _parser(ops, "gpu", "the GPU targets side by side (MaxSim, LITE, losses) and the registers of every kernel "
                            "the run compiled: the measuring half of scripts/gpu_check.sh")
    add_common(p, quick="tiny shapes: checks the command itself (the test suite runs it on CPU)",
               json_what="the rows, machine and kernels",
               out_what="report.md (the rows and the kernels' registers) and results.json")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    p.set_defaults(func=_checked_out(_cli_gpu))


def _cli_gpu(args) -> int:
    from fastrank.bench import gpu

    res = gpu.measure(_device(args), quick=args.quick, compile=not args.no_compile,
                      say=sys.stderr if args.json == "-" else sys.stdout)
    return print_report(res, gpu.format_report, args.json, args.out, command_line(args))


# ------------------------------------------------------------------------------------------- train-step

def _add_train_step(ops) -> None:
    from fastrank.bench.train_step import BACKENDS

    p = _parser(ops, "train-step", "one distillation training step (scorer + loss, forward and backward) with "
                                   f"fastrank's kernels against eager ({', '.join(BACKENDS)}), and its peak memory")
    add_common(p, quick="the MaxSim operator alone, 3 rounds (--scorer and --rounds, when given, win)",
               device="cpu", json_what="the steps")
    p.add_argument("--scorer", nargs="+", default=None, choices=("maxsim-op", "maxsim", "lite"),
                   help="maxsim-op: the MaxSim operator and loss on projected tokens; maxsim: with ColBERT's "
                        "Linear(384 -> 128) head; lite: LiteScorer (default: all three; maxsim-op with --quick)")
    p.add_argument("--batch", type=int, default=32, help="queries per step")
    p.add_argument("--k", type=int, default=8, help="candidates per query")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7; 3 with --quick)")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="time the steps under torch.autocast in this dtype (default: no autocast)")
    p.add_argument("--whole", action="store_true",
                   help="also time whole fine-tuning steps with all-MiniLM-L6-v2 (slow on a CPU: minutes)")
    p.set_defaults(func=_checked_out(_cli_train_step))


def _cli_train_step(args) -> int:
    from fastrank.bench import train_step

    for flag, value in (("--batch", args.batch), ("--k", args.k), ("--rounds", args.rounds)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    scorers = tuple(args.scorer or (("maxsim-op",) if args.quick else ("maxsim-op", "maxsim", "lite")))
    rounds = args.rounds or (3 if args.quick else 7)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    device = _device(args, "cpu")
    res = train_step.measure(scorers, b=args.batch, k=args.k, device=device, rounds=rounds, amp=amp,
                             whole=args.whole)
    return print_report(res, train_step.format_report, args.json, args.out, command_line(args))


# ------------------------------------------------------------------------------------------- registration

SUBCOMMANDS = (_add_maxsim, _add_packed, _add_rerank, _add_sweeps, _add_kernels, _add_gpu, _add_train_step)


def add_cli(subparsers) -> None:
    """`fastrank bench`: registered by fastrank.cli."""
    bench = subparsers.add_parser("bench", help="time fused kernels against eager PyTorch and torch.compile",
                                  description=SHARED_OPTIONS, formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = bench.add_subparsers(dest="op", required=True, metavar="OP")
    for add in SUBCOMMANDS:
        add(ops)


def build_parser() -> argparse.ArgumentParser:
    """`fastrank bench` alone (what `bench all --include` runs its extra sections through)."""
    parser = argparse.ArgumentParser(prog="fastrank")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    return parser

