"""The page `fastrank bench all --out DIR` writes: report.md (tables), results.json, and PNG figures.

The result is one dict (:func:`fastrank.bench.all.run_sections` builds it): the command, the machine
(:func:`fastrank.bench.machine.machine_info`), the ceilings measured at the start of the run, the rows of
:mod:`fastrank.bench.suite`, the scaling fits and notes (why a section or a provider is missing). Every
table and every picture starts with the machine and the command, so a figure copied out of the report
still says where it was measured.

Figures (matplotlib, the optional ``bench`` extra; without it report.md says so in one line and keeps the
tables):

- ``scaling_<op>_<i>.png``: docs/s (the op's unit) against the sweep's work size per provider on log axes,
  with the ceiling's rate as a line (the docs/s a kernel running at the ceiling would reach at that size);
- ``roofline.png``: arithmetic intensity (useful FLOPs per byte that must be read) against achieved FLOP/s for
  every row that has both, under this run's sgemm rate and read bandwidth;
- ``speedup_<op>.png``: each provider's ratio to eager per shape, as bars.
"""
from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path
from typing import Optional

from fastrank.bench import machine
from fastrank.bench.suite import CEILING_LABELS

# What `--out DIR` receives, by name: report.md, results.json and the figures.
REPORT_FILES = re.compile(r"report\.md|results\.json|roofline\.png|(scaling|speedup)_.+\.png")
NO_MATPLOTLIB = "PNG figures skipped: matplotlib is not installed (pip install 'fastrank[bench]'); tables only"
OP_ORDER = ("maxsim", "packed", "lite", "losses", "index")


def machine_lines(res: dict) -> list[str]:
    """Where and how the figures were made: CPU, ISA path, threads, GPU, versions, the command, ceilings."""
    m = res["machine"]
    lines = [
        f"Machine: {m['cpu']} ({m.get('cpu_signature') or 'no signature'}); fastrank CPU ISA path {m['isa']} "
        f"(available: {', '.join(m['isa_paths']) or 'none'}); {m['threads']} torch threads of {m['logical_cpus']} "
        f"logical CPUs; GPU: {m.get('gpu') or 'none'}",
        f"torch {m['torch']}, Triton {m.get('triton') or 'not installed'}, Python {m['python']}, "
        f"fastrank commit {m.get('commit') or 'unknown'}; device {m['device']}",
        f"Command: {res['command']}",
    ]
    c = res.get("ceilings")
    if c:
        small = c.get("bf16_gemm_n") and c.get("gemm_n") and c["bf16_gemm_n"] < c["gemm_n"]
        bf16_note = f" (no native bfloat16 GEMM: measured at n={c['bf16_gemm_n']})" if small else ""
        lines.append(f"Ceilings measured in this run: sgemm {c['sgemm_gflops']:.1f} GFLOP/s, bf16 GEMM "
                     f"{c['bf16_gemm_gflops']:.1f} GFLOP/s{bf16_note}, copy {c['copy_gbps']:.1f} GB/s, read {c['read_gbps']:.1f} GB/s"
                     f"{machine.peak_text(c)} (each shape re-measures them in its own timing rounds; its fractions use "
                     "those; \"of peak\": the GFLOP rate over the ISA path's multiply-add peak, the bound no kernel passes)")
    return lines


def _num(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def _bytes(v) -> str:
    return "-" if v is None else f"{v / 2**20:.1f} MiB"


def op_table(rows: list[dict]) -> list[str]:
    """A Markdown table of one op's rows (refused providers included, with the reason)."""
    unit = rows[0]["unit"]
    lines = [f"| shape | dtype | provider | {unit} | vs eager | of ceiling | GFLOP/s | GB/s | peak mem | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ceiling = CEILING_LABELS.get(r["ceiling"], "")
        note = f"REFUSED (wrong output, not timed): {r['refused']}" if r["refused"] else ""
        if not note and r["eager_provider"] and r["provider"] != r["eager_provider"]:
            note = f"vs {r['eager_provider']}"
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['provider']} | {_num(r['docs_per_s'], ',.0f')} | "
            f"{_num(r['ratio_to_eager'], '.2f', 'x')} | {_num(r['ceiling_fraction'], '.1%')}"
            f"{' ' + ceiling if r['ceiling_fraction'] is not None else ''}"
            f"{'; ' + format(r['peak_fraction'], '.0%') + ' of peak' if r.get('peak_fraction') else ''} | "
            f"{_num(r['GFLOP_per_s'], '.1f')} | "
            f"{_num(r['GB_per_s'], '.2f')} | {_bytes(r['peak_mem_bytes'])} | {note} |")
    return lines


def fits_table(fits: list[dict]) -> list[str]:
    lines = ["| op | sweep | dtype | provider | exponent | points | work range |", "|---|---|---|---|---:|---:|---|"]
    for f in fits:
        lines.append(f"| {f['op']} | {f['sweep']} | {f['dtype']} | {f['provider']} | {f['exponent']:.2f} | "
                     f"{f['points']} | {f['work_min']:,.0f} to {f['work_max']:,.0f} |")
    return lines


def by_op(rows: list[dict]) -> dict[str, list[dict]]:
    ops: dict[str, list[dict]] = {}
    for r in rows:
        ops.setdefault(r["op"], []).append(r)
    return dict(sorted(ops.items(), key=lambda kv: OP_ORDER.index(kv[0]) if kv[0] in OP_ORDER else len(OP_ORDER)))


def markdown(res: dict, figures: Optional[dict] = None, figure_note: Optional[str] = None) -> str:
    """report.md: the machine, then per op its table and figures, then the scaling fits."""
    figures = figures or {}
    out = ["# fastrank benchmark report", "", *[f"- {line}" for line in machine_lines(res)], "",
           "Every provider was checked against the op's reference before it was timed; a provider whose output "
           "disagreed is listed as REFUSED and has no figures. Ratios are to the fastest eager provider of the same "
           "shape in the same run. Peak memory is measured on CUDA only (torch's CPU allocator keeps no statistics).",
           ""]
    if figure_note:
        out += [figure_note, ""]
    for note in res.get("notes", []):
        out.append(f"> {note}")
    if res.get("notes"):
        out.append("")
    for op, rows in by_op(res["rows"]).items():
        out += [f"## {op}", "", *op_table(rows), ""]
        for path in figures.get(op, []):
            out += [f"![{op}]({path})", ""]
    if res.get("fits"):
        out += ["## Scaling", "", "Time per call ~ work^exponent, fitted per provider on log-log axes "
                "(1: linear; below 1: a fixed cost amortised; above 1: worse than linear).", "",
                *fits_table(res["fits"]), ""]
    for path in figures.get("roofline", []):
        out += ["## Roofline", "", f"![roofline]({path})", ""]
    return "\n".join(out)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def draw_figures(res: dict, out_dir: Path) -> dict[str, list[str]]:
    """Write the PNGs; returns {op or "roofline": [file names]}. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = "\n".join(textwrap.fill(line, 170) for line in machine_lines(res)[:3])
    figures: dict[str, list[str]] = {}

    def save(fig, name: str, key: str, bottom: float = 0.1) -> None:
        fig.suptitle(title, fontsize=6, x=0.01, ha="left")
        # fixed margins: tight_layout measures every tick label of log axes, seconds per figure
        fig.subplots_adjust(left=0.1, right=0.97, top=0.84, bottom=bottom)
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        figures.setdefault(key, []).append(name)

    for op, rows in by_op(res["rows"]).items():
        sweeps: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["sweep"] and r["seconds"]:
                sweeps.setdefault((r["sweep"], r["dtype"]), []).append(r)
        for i, ((sweep, dtype), group) in enumerate(sweeps.items()):
            fig, ax = plt.subplots(figsize=(8, 5.2))
            for provider in dict.fromkeys(r["provider"] for r in group):
                pts = sorted((r["work"], r["docs_per_s"]) for r in group if r["provider"] == provider)
                ax.plot(*zip(*pts), marker="o", label=provider)
            bound = {}
            for r in group:  # the docs/s a call running at the ceiling would reach at this size
                if r["ceiling_fraction"]:
                    bound[r["work"]] = r["docs_per_s"] / r["ceiling_fraction"]
            if bound:
                label = CEILING_LABELS.get(group[0]["ceiling"], group[0]["ceiling"])
                ax.plot(*zip(*sorted(bound.items())), "k--", label=f"{label} ceiling (this run)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(sweep)
            ax.set_ylabel(group[0]["unit"])
            ax.set_title(f"{op} {dtype}: {group[0]['unit']} vs work size", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(True, alpha=0.3)
            save(fig, f"scaling_{op}_{i}_{_slug(sweep)}_{dtype}.png", op)

        timed = [r for r in rows if r["ratio_to_eager"] is not None]
        if any(r["sweep"] is None for r in timed):  # the op's named cases; its sweeps have their own figures
            timed = [r for r in timed if r["sweep"] is None]
        if timed:
            shapes = list(dict.fromkeys(f"{r['shape']} {r['dtype']}" for r in timed))
            providers = list(dict.fromkeys(r["provider"] for r in timed))
            fig, ax = plt.subplots(figsize=(min(16, max(8, 0.12 * len(shapes) * len(providers) + 3)), 6.5))
            width = 0.8 / len(providers)
            for j, provider in enumerate(providers):
                ratio = {f"{r['shape']} {r['dtype']}": r["ratio_to_eager"] for r in timed if r["provider"] == provider}
                xs = [i + j * width for i, s in enumerate(shapes) if s in ratio]
                ax.bar(xs, [ratio[s] for s in shapes if s in ratio], width, label=provider)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
            ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=7)
            ax.set_ylabel("speed vs fastest eager (x)")
            ax.set_title(f"{op}: speedup over eager per shape", fontsize=9)
            ax.legend(fontsize=7)
            save(fig, f"speedup_{op}.png", op, bottom=0.4)

    roof = [r for r in res["rows"] if r["arithmetic_intensity"] and r["GFLOP_per_s"]]
    c = res.get("ceilings")
    if roof and c:
        fig, ax = plt.subplots(figsize=(8, 5.4))
        ais = [r["arithmetic_intensity"] for r in roof]
        lo, hi = min(ais) / 4, max(ais) * 4
        xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        for rate, label, style in ((c["sgemm_gflops"], "sgemm", "k-"), (c["bf16_gemm_gflops"], "bf16 GEMM", "k:")):
            ax.plot(xs, [min(rate, c["read_gbps"] * x) for x in xs], style, lw=1, label=f"roof: {label} / read BW")
        markers = dict(zip(OP_ORDER, "os^Dv"))
        for op in dict.fromkeys(r["op"] for r in roof):
            for provider in dict.fromkeys(r["provider"] for r in roof if r["op"] == op):
                pts = [(r["arithmetic_intensity"], r["GFLOP_per_s"]) for r in roof if r["op"] == op and r["provider"] == provider]
                ax.scatter(*zip(*pts), marker=markers.get(op, "x"), s=18, label=f"{op} {provider}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (useful FLOP / byte that must be read)")
        ax.set_ylabel("achieved GFLOP/s")
        ax.set_title("roofline: every timed shape under this run's ceilings", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        ax.grid(True, alpha=0.3)
        save(fig, "roofline.png", "roofline")
    return figures


def json_ready(res: dict) -> dict:
    """The result with the machine inside every row (each row stands alone when the list is filtered)."""
    return {**res, "rows": [{**r, "machine": res["machine"]} for r in res["rows"]]}


def check_report_dir(path: str | os.PathLike, label: str = "--out") -> None:
    """Refuse ``--out`` DIR when a file there that a report would overwrite (report.md, results.json, a figure)
    is not from a fastrank bench report: a report's results.json names the `fastrank bench` command that
    made it, and vouches for the files beside it. Anything else in DIR is never touched."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{label} {path}: is a file; expected a directory for report.md and results.json")
    clashes = sorted(p.name for p in out.iterdir() if REPORT_FILES.fullmatch(p.name)) if out.is_dir() else []
    if not clashes:
        return
    try:
        previous = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if isinstance(previous, dict) and str(previous.get("command", "")).startswith("fastrank bench"):
        return
    raise ValueError(f"{label} {path}: {clashes[0]} there is not from a fastrank bench report (no results.json "
                     "naming a `fastrank bench` command); refusing to overwrite it (pick a new or empty directory)")


def write(res: dict, out_dir: str | os.PathLike) -> tuple[Path, Optional[str]]:
    """Write report.md, results.json and the figures under ``out_dir``; returns report.md's path and the
    one-line notice when the figures were skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notice = None
    try:
        figures = draw_figures(res, out)
    except ImportError:
        figures, notice = {}, NO_MATPLOTLIB
    (out / "results.json").write_text(json.dumps(json_ready(res), indent=1))
    report = out / "report.md"
    report.write_text(markdown(res, figures, notice))
    return report, notice


def print_report(res: dict, format_report, json_path: str | None, out: str | None = None,
                 command: str | None = None) -> int:
    """The ending every ``fastrank bench`` subcommand shares: stamp ``res`` with the command that made it;
    print it as ``format_report`` lays it out, or as JSON instead when ``json_path`` is "-" (``--json``
    without FILE); write the JSON to ``json_path`` otherwise, and ``out``/report.md plus ``out``/results.json
    when ``out`` is given."""
    import shlex
    import sys

    res["command"] = command or shlex.join(["fastrank", *sys.argv[1:]])
    text = format_report(res)
    as_json = json.dumps(res, indent=1, default=str)
    print(as_json if json_path == "-" else text)
    if json_path and json_path != "-":
        Path(json_path).write_text(as_json + "\n")
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(f"Command: `{res['command']}`\n\n{text}\n")
        (folder / "results.json").write_text(as_json + "\n")
        print(f"wrote {folder / 'report.md'}", file=sys.stderr)
    return 0
