"""``fastrank bench packed``: MaxSim re-ranking with real token lengths, packed against padded.

The workload is TREC DL 2019's BM25 top-100 (the set embedded in fastrank: 43 queries, 4,297 passages),
each query and passage at the length all-MiniLM-L6-v2's tokenizer gives it (32 and 200 tokens at most, as
the encoder truncates), with random unit token vectors of width H (384: MiniLM; 128: ColBERT), so the
shapes are real and the run needs no encoder pass. Every provider scores all 43 x 100 candidates once per
call; all are timed in interleaved rounds with the machine's sgemm in the same rounds:

- ``padded``: ``fastrank.maxsim`` on each query's candidates padded to its longest (batches built before
  timing: the best case for padding), and ``padded+pad``: the same with the padding gather timed too, as
  a re-ranker that pads per query pays it;
- ``eager``: the PyTorch a user writes (matmul, mask, max, sum) on the pre-padded batches;
- ``packed``: ``fastrank.maxsim_packed`` on each query's candidates in place (``docs=``), in float32,
  bfloat16, float16 and int8 tokens (int8: per-token scales, the query in float32).

Scores are checked against the padded path (and int8 against its dequantized reference) before timing.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastrank.bench import machine
from fastrank.bench.suite import Settings, Shape
from fastrank.bench.timing import time_interleaved

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Workload:
    """Token lengths of a re-ranking run: per query its length and its candidates' passage indices."""

    query_lengths: list[int]
    candidates: list[list[int]]
    passage_lengths: list[int]

    @property
    def num_docs(self) -> int:
        return sum(len(c) for c in self.candidates)


def dl19_workload(data: Optional[str] = None, model: Optional[str] = None) -> Workload:
    """Tokenizer lengths of the DL19 (or ``data``) queries and candidate passages."""
    from fastrank.data import load_trec_dl
    from fastrank.encoders import DOC_MAX_LENGTH, QUERY_MAX_LENGTH, default_model_path, require_transformers

    rset = load_trec_dl(data)
    tok = require_transformers().AutoTokenizer.from_pretrained(str(model or default_model_path()))
    qids = [q for q in rset.queries if rset.candidates.get(q)]
    pids = sorted({p for q in qids for p in rset.candidates[q]})
    prow = {p: i for i, p in enumerate(pids)}

    def lengths(texts, max_length):
        return [len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]]

    return Workload(lengths([rset.queries[q] for q in qids], QUERY_MAX_LENGTH),
                    [[prow[p] for p in rset.candidates[q]] for q in qids],
                    lengths([rset.passages[p] for p in pids], DOC_MAX_LENGTH))


def make_inputs(work: Workload, h: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, h, generator=g), dim=-1)  # noqa: E731
    plens = torch.tensor(work.passage_lengths, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), plens.cumsum(0)])
    tokens = unit(int(offsets[-1]))
    queries = [unit(n) for n in work.query_lengths]
    docs = [torch.tensor(c, dtype=torch.int64) for c in work.candidates]
    return tokens, offsets, queries, docs


def _padded(tokens, offsets, docs_i, dtype):
    from fastrank.encoders import TokenEmbeddings

    return TokenEmbeddings(tokens, offsets).padded(docs_i, dtype=dtype)


def providers(tokens, offsets, queries, docs) -> tuple[dict[str, Callable[[], list]], dict]:
    """name -> a call scoring every query's candidates (returns the per-query scores), and the inputs'
    byte sizes for the report."""
    from fastrank.ops.maxsim import maxsim
    from fastrank.ops.maxsim_packed import maxsim_packed, quantize_tokens
    from fastrank.ops.maxsim import maxsim_eager

    padded = [_padded(tokens, offsets, d, torch.float32) for d in docs]
    fns: dict[str, Callable[[], list]] = {
        "eager (padded)": lambda: [maxsim_eager(q, d, None, m) for q, (d, m) in zip(queries, padded)],
        "padded": lambda: [maxsim(q, d, None, m) for q, (d, m) in zip(queries, padded)],
        "padded+pad": lambda: [maxsim(q, d, None, m) for q, (d, m) in
                               ((q, _padded(tokens, offsets, i, torch.float32)) for q, i in zip(queries, docs))],
    }
    sizes = {"padded float32": sum(d.numel() * 4 for d, _ in padded)}
    for name, dtype in DTYPES.items():
        t = tokens.to(dtype)
        qs = [q.to(dtype) for q in queries]
        fns[f"packed {name}"] = (lambda t=t, qs=qs: [maxsim_packed(q, t, offsets, docs=d) for q, d in zip(qs, docs)])
        sizes[f"packed {name}"] = t.numel() * t.element_size()
    qi, scales = quantize_tokens(tokens)
    fns["packed int8"] = lambda: [maxsim_packed(q, qi, offsets, scales=scales, docs=d) for q, d in zip(queries, docs)]
    fns["packed int8 exact"] = lambda: [maxsim_packed(q, qi, offsets, scales=scales, docs=d, exact_int8=True)
                                        for q, d in zip(queries, docs)]
    sizes["packed int8"] = sizes["packed int8 exact"] = qi.numel() + scales.numel() * 4
    return fns, {"int8": (qi, scales), "bytes": sizes}


def check(fns, tokens, offsets, queries, docs, extra) -> None:
    """Every provider's scores against the padded kernel's (float32 inputs); int8 against the reference on
    the dequantized tokens (exactly, or within the query's rounding bound where the kernel quantizes the
    query too: sum over query tokens of max|q_l| / 254 times the largest L1 norm of a document's rows);
    bfloat16/float16 within their input rounding."""
    from fastrank.ops.maxsim_packed import dequantize_tokens, maxsim_packed_ref

    base = fns["padded"]()
    qi, scales = extra["int8"]
    int8_ref = [maxsim_packed_ref(q, qi, offsets, scales=scales, docs=d) for q, d in zip(queries, docs)]
    l1 = dequantize_tokens(qi, scales).abs().sum(-1)
    doc_l1 = torch.stack([l1[offsets[i]:offsets[i + 1]].max() for i in range(offsets.numel() - 1)])
    for name, fn in fns.items():
        out = fn()
        for k, (a, b) in enumerate(zip(out, int8_ref if name.startswith("packed int8") else base)):
            tol = {"packed bfloat16": 5e-2, "packed float16": 5e-3}.get(name, 1e-4)
            if name == "packed int8":
                tol = tol + float((queries[k].abs().amax(-1) / 254).sum()) * doc_l1[docs[k]]
            assert ((a.float() - b.float()).abs() <= tol + 1e-4 * b.float().abs()).all(), \
                f"{name}: query {k} off by {float((a.float() - b.float()).abs().max()):.3g}"


def run(h_values=(384, 128), *, data=None, model=None, min_seconds: float = 1.0, progress: bool = True) -> dict:
    work = dl19_workload(data, model)
    pairs = work.num_docs
    real_tokens = sum(work.passage_lengths[i] for c in work.candidates for i in c)
    padded_tokens = sum(len(c) * max(work.passage_lengths[i] for i in c) for c in work.candidates)
    info = machine.machine_info("cpu")
    out = {"machine": info, "workload": {
        "queries": len(work.query_lengths), "candidates": pairs,
        "mean_query_tokens": sum(work.query_lengths) / len(work.query_lengths),
        "mean_doc_tokens": real_tokens / pairs, "padded_doc_tokens": padded_tokens / pairs}, "cases": []}
    probes = machine.ceiling_probes("cpu")
    for h in h_values:
        tokens, offsets, queries, docs = make_inputs(work, h)
        fns, extra = providers(tokens, offsets, queries, docs)
        check(fns, tokens, offsets, queries, docs, extra)
        timed = {**fns, **{f"~{k}": fn for k, (fn, _) in probes.items()}}
        secs = time_interleaved(timed, "cpu", min_seconds=min_seconds)
        flop = 2.0 * h * sum(work.query_lengths[k] * sum(work.passage_lengths[i] for i in c)
                             for k, c in enumerate(work.candidates))
        rows_read = sum(work.passage_lengths[i] for c in work.candidates for i in c)
        ceil = {k: units / secs[f"~{k}"] / 1e9 for k, (_, units) in probes.items()}
        rows = []
        for name in fns:
            s = secs[name]
            gflops = flop / s / 1e9
            # bf16 rows run on bf16 hardware only on the avx512bf16 / amx paths; elsewhere they are widened.
            bf16_hw = info["isa"] in ("avx512bf16", "amx")
            bound = ceil["bf16_gemm_gflops"] if ("bfloat16" in name and bf16_hw) else ceil["sgemm_gflops"]
            # The least any provider must read: the candidates' real rows in its dtype (+ int8 scales). Against
            # the DRAM read rate this says how far from the memory floor a provider is (the rows of 43 x 100
            # candidates are scattered over a store larger than most caches).
            elem = {"bfloat16": 2, "float16": 2, "int8": 1}.get(name.split()[1] if name.startswith("packed") else "", 4)
            moved = rows_read * (h * elem + (4 if elem == 1 else 0))
            rows.append({"provider": name, "docs_per_s": pairs / s, "ms": s * 1e3,
                         "GB_per_s": moved / s / 1e9, "read_fraction": moved / s / 1e9 / ceil["read_gbps"],
                         "vs_padded": secs["padded"] / s, "vs_eager": secs["eager (padded)"] / s,
                         "GFLOP_per_s": gflops, "gemm_fraction": gflops / bound,
                         "bytes": extra["bytes"].get(name if name.startswith("packed") else "padded float32")})
        out["cases"].append({"H": h, "useful_GFLOP": flop / 1e9, "ceilings": ceil, "rows": rows})
        if progress:
            print(f"H={h}: done", file=sys.stderr)
    return out


def format_report(res: dict) -> str:
    info, w = res["machine"], res["workload"]
    lines = [f"Packed vs padded MaxSim re-ranking on {info['cpu']} ({info['threads']} threads, ISA path {info['isa']}), "
             f"torch {info['torch']}, fastrank commit {info.get('commit') or 'unknown'}",
             f"DL19 BM25 top-100: {w['queries']} queries, {w['candidates']} candidates; real tokens: query "
             f"{w['mean_query_tokens']:.1f}, passage {w['mean_doc_tokens']:.1f} on average; padded per query to "
             f"{w['padded_doc_tokens']:.1f} ({w['padded_doc_tokens'] / w['mean_doc_tokens']:.2f}x the real tokens)"]
    for case in res["cases"]:
        c = case["ceilings"]
        lines += ["", f"H = {case['H']} ({case['useful_GFLOP']:.2f} GFLOP of real similarities; this run's sgemm "
                      f"{c['sgemm_gflops']:.0f} GFLOP/s, bf16 GEMM {c['bf16_gemm_gflops']:.0f} GFLOP/s, DRAM read "
                      f"{c['read_gbps']:.1f} GB/s)", "",
                  "| provider | docs/s | ms per run | vs padded | vs eager | GFLOP/s | of GEMM peak | real rows GB/s "
                  "| of DRAM read | token bytes |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in case["rows"]:
            lines.append(f"| {r['provider']} | {r['docs_per_s']:,.0f} | {r['ms']:.1f} | {r['vs_padded']:.2f}x | "
                         f"{r['vs_eager']:.2f}x | {r['GFLOP_per_s']:.0f} | {r['gemm_fraction']:.0%} | "
                         f"{r['GB_per_s']:.1f} | {r['read_fraction']:.0%} | {r['bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- bench all's section

def suite_rows(res: dict) -> list[dict]:
    """`fastrank bench packed`'s result as bench_suite rows (packed's own check ran before its timing)."""
    from fastrank.bench.suite import base_row

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


def section(settings: Settings, probes) -> tuple[list[dict], list[str]]:
    if settings.device.startswith("cuda"):
        return [], ["packed: CPU only (the DL19 packed workload is timed on CPU tensors): skipped on --device cuda"]
    if settings.tiny:
        return [], ["packed: skipped in the tiny test run (it tokenizes DL19)"]
    try:
        import transformers  # noqa: F401 -- the workload's lengths come from the MiniLM tokenizer
    except ImportError:
        return [], ["packed: transformers is not installed (pip install 'fastrank[encoders]'): section skipped"]
    try:
        res = run((128,) if settings.quick else (384, 128), min_seconds=settings.min_seconds,
                               progress=settings.progress)
    except AssertionError as exc:  # a provider disagreed with the padded kernel: nothing of this section is timed
        return [], [f"packed: REFUSED before timing: {exc}"]
    return suite_rows(res), []

