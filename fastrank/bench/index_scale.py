"""`fastrank bench index --scale`: token indexes streamed at 1M, 10M and 100M tokens, in bounded memory.

Each size and token dtype runs three child processes, so that each peak resident memory is measured from
outside (``os.wait4``'s ``ru_maxrss`` of that child alone) and no run inherits another's memory:

1. **build**: a synthetic corpus is streamed through :class:`~fastrank.index.token_stream.TokenIndexWriter`
   (encoding excluded: the tokens are generated); build time, peak memory, bytes per token on disk.
2. **search**: ``TokenIndex.load`` (memory-mapped; its time is the load time) and the queries' top-10 with the
   index's defaults; queries/s and the search's peak memory.
3. **exhaustive**: the same queries scored against every document, for recall@10 of the centroid search.

**The corpus** is built the way real token embeddings are: a vocabulary of word vectors clustered in
semantic fields, topics that each use a few hundred words (Zipf-like: a topic's first words are its most
frequent), about 50 documents of 30-120 tokens per topic, and each token its word's vector plus context noise
(cosine about 0.86 to the word).
Queries are 32 tokens drawn from one topic's words. Everything is generated per chunk from a seed, so a
build can be repeated and resumed.

From the rows the report fits cost exponents (log-log slopes of build time and queries/s against tokens)
and projects MS MARCO passage (600M tokens) on paper: build time, disk, peak memory and queries/s.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIZES = (1_000_000, 10_000_000, 100_000_000)
MSMARCO_TOKENS = 600_000_000
DIM = 128
DTYPES = ("int8", "float16", "bfloat16", "residual1", "residual2", "residual4")
DEFAULT_DTYPES = ("int8", "residual2", "residual4")
# The resume check kills the build at these shares of its uninterrupted time: at 10M tokens the first falls
# in stage 1's training (k-means), the second in the chunks written after it.
KILL_AT = (0.25, 0.5)
VOCAB, WORDS_PER_TOPIC = 32768, 256
# Word vectors sit around semantic fields, as a real model's token embeddings do. The spread is calibrated on
# the centroid router (fastrank.index.centroid_router): at 4,096 centroids it agrees with the exact nearest
# centroid for 97.7% of these tokens, and for 97.6% (2,048) to 98.3% (4,096) of SciFact's MiniLM tokens;
# isotropic random words (no fields) would give 65%, a structure no trained encoder produces.
FIELDS, FIELD_SPREAD = 1024, 0.6
DOC_LEN = (30, 120)
QUERY_LEN = 32
# Queries timed for queries/s at every size; recall is taken over the first queries_for(tokens) of them.
SEARCH_QUERIES = 200
CHUNK_DOCS = 4096
NOISE = 0.05  # per dimension: a noise vector of norm ~0.57 at H = 128


class SyntheticCorpus:
    """Topic-structured token embeddings, generated chunk by chunk (see the module docstring)."""

    def __init__(self, tokens: int, dim: int = DIM, seed: int = 0):
        self.tokens, self.dim, self.seed = int(tokens), int(dim), int(seed)
        g = torch.Generator().manual_seed(seed)
        unit = torch.nn.functional.normalize
        fields = unit(torch.randn(FIELDS, dim, generator=g), dim=1)
        field = torch.randint(0, FIELDS, (VOCAB,), generator=g)
        self.words = unit(fields[field] + FIELD_SPREAD * unit(torch.randn(VOCAB, dim, generator=g), dim=1), dim=1)
        # About 50 documents a topic at every size (capped at 8,192 topics): each query's topic has documents.
        self.topics = int(min(max(64, tokens / (sum(DOC_LEN) / 2) / 50), 8192))
        self.topic_words = torch.randint(0, VOCAB, (self.topics, WORDS_PER_TOPIC), generator=g)

    def _tokens_of(self, topic: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        rank = (WORDS_PER_TOPIC * torch.rand(topic.numel(), generator=g) ** 3).long()  # Zipf-like
        word = self.topic_words[topic, rank]
        x = self.words[word] + NOISE * torch.randn(topic.numel(), self.dim, generator=g)
        return torch.nn.functional.normalize(x, dim=1)

    def chunks(self, skip_documents: int = 0):
        """``(vectors, offsets)`` per chunk of :data:`CHUNK_DOCS` documents until ``tokens`` tokens. Chunks
        within the first ``skip_documents`` are passed over without generating their tokens (a resumed build
        skips what it stored, as the CLI skips documents without encoding them); they must be whole chunks."""
        done, i, skipped = 0, 0, 0
        while done < self.tokens:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
            lens = torch.randint(DOC_LEN[0], DOC_LEN[1] + 1, (CHUNK_DOCS,), generator=g)
            ends = torch.cumsum(lens, 0)
            keep = int(torch.searchsorted(ends, torch.tensor(self.tokens - done), right=True))
            lens = lens[:max(keep, 1)]
            lens[-1] = min(int(lens[-1]), self.tokens - done - int(lens[:-1].sum()))
            offsets = torch.zeros(lens.numel() + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(lens, 0)
            topic = torch.randint(0, self.topics, (lens.numel(),), generator=g).repeat_interleave(lens)
            done += int(offsets[-1])
            i += 1
            if skipped + lens.numel() <= skip_documents:
                skipped += lens.numel()
                continue
            yield self._tokens_of(topic, g), offsets

    def queries(self, n: int):
        """``(vectors, offsets)`` of ``n`` queries of :data:`QUERY_LEN` tokens, each from one topic."""
        g = torch.Generator().manual_seed(self.seed * 7919 + 17)
        topic = torch.randint(0, self.topics, (n,), generator=g).repeat_interleave(QUERY_LEN)
        return self._tokens_of(topic, g), torch.arange(n + 1, dtype=torch.int64) * QUERY_LEN


# -- the child processes ------------------------------------------------------------------------------
def _child_build(out: str, tokens: int, dtype: str, result: str) -> None:
    from fastrank.index.token_stream import TokenIndexWriter

    corpus = SyntheticCorpus(tokens)
    t0 = time.perf_counter()
    with TokenIndexWriter(out, DIM, token_dtype=dtype, expected_tokens=tokens, progress=True, replay=False) as w:
        for vectors, offsets in corpus.chunks(skip_documents=w.committed_documents):
            w.add((vectors, offsets))
        w.finish()
    build_s = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in Path(out).iterdir() if p.is_file())
    meta = json.loads((Path(out) / "meta.json").read_text())
    Path(result).write_text(json.dumps({"build_s": build_s, "disk_bytes": disk, "documents": meta["documents"],
                                        "ncentroids": meta["ncentroids"]}))


def _page_in(out: str) -> float:
    """Read every file of the index once, sequentially, so that the OS page cache holds it: the state of a
    server that has run a while (the index fits in RAM here). Read with read(), not mapped, so none of it
    counts in this process's resident memory. Without it the search would time whatever the build left in
    the cache: at 100M tokens on a cold cache (after drop_caches) a first pass ran 20 queries/s against 75
    warm, the difference being random 4 KiB reads of lists and candidates from disk."""
    t0 = time.perf_counter()
    for f in sorted(Path(out).iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.read(1 << 22):
                    pass
    return time.perf_counter() - t0


def _child_search(out: str, tokens: int, nq: int, exhaustive: bool, result: str) -> None:
    """Time the first ``nq`` of the :data:`SEARCH_QUERIES` queries (all of them for the centroid search, the
    recall prefix for the exhaustive reference)."""
    from fastrank.index import TokenIndex

    t0 = time.perf_counter()
    index = TokenIndex.load(out)
    load_s = time.perf_counter() - t0
    page_in_s = _page_in(out)
    vectors, offsets = SyntheticCorpus(tokens).queries(SEARCH_QUERIES)
    vectors, offsets = vectors[:nq * QUERY_LEN], offsets[:nq + 1]
    index.search((vectors[:QUERY_LEN], offsets[:2]), 10, exhaustive=exhaustive, progress=False)  # warm-up
    t0 = time.perf_counter()
    _, ids = index.search((vectors, offsets), 10, exhaustive=exhaustive, progress=False)
    search_s = time.perf_counter() - t0
    np.save(result + ".ids.npy", ids.astype(np.int64))
    found = {"load_s": load_s, "search_s": search_s, "qps": nq / search_s, "page_in_s": page_in_s}
    if not exhaustive:
        found["stage_ms"] = _stage_times(index, vectors, offsets)
    Path(result).write_text(json.dumps(found))


def _stage_times(index, vectors: torch.Tensor, offsets: torch.Tensor, batch: int = 64) -> dict:
    """Milliseconds a query in each stage of the centroid search, timed apart on the same queries right after
    the timed search (``TokenIndex`` internals, as ``search`` calls them): the query tokens' best centroids,
    the candidates from their lists, exact MaxSim of the candidates."""
    from fastrank.ops.centroid_candidates import centroid_candidates

    nprobe, ndocs, nq = index.nprobe, index.ndocs_for(10), offsets.numel() - 1
    x = vectors.float()
    spent = {"centroids": 0.0, "candidates": 0.0, "exact": 0.0}
    for b0 in range(0, nq, batch):
        o = offsets[b0:min(b0 + batch, nq) + 1]
        qv = x[int(o[0]):int(o[-1])]
        t0 = time.perf_counter()
        top_s, top_c = index._top_centroids(qv, nprobe + 1, None)
        gain = (top_s[:, :nprobe] - top_s[:, -1:]).clamp_(min=0)
        t1 = time.perf_counter()
        docs, _, counts = centroid_candidates(top_c[:, :nprobe].contiguous(), gain.contiguous(), o - o[0],
                                              index._ivf_offsets, index._ivf_docs, n=len(index), ndocs=ndocs)
        t2 = time.perf_counter()
        for i, c in enumerate(counts.tolist()):
            index._score(x[int(o[i]):int(o[i + 1])], docs[i, :c])
        t3 = time.perf_counter()
        spent["centroids"] += t1 - t0
        spent["candidates"] += t2 - t1
        spent["exact"] += t3 - t2
    return {k: v / nq * 1e3 for k, v in spent.items()}


def _run_child(args: list[str], result: Path) -> tuple[dict, int]:
    """Run ``python -m fastrank.bench.index_scale ARGS`` and return its result and its own peak RSS (bytes),
    as the kernel accounted it when the child was reaped."""
    proc = subprocess.Popen([sys.executable, "-m", "fastrank.bench.index_scale", *args, str(result)])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"bench index --scale: the child `{' '.join(args)}` failed (exit {proc.returncode})")
    return json.loads(result.read_text()), usage.ru_maxrss * 1024  # Linux reports kilobytes


def sizes_for(max_tokens: int) -> list[int]:
    sizes = [s for s in SIZES if s <= max_tokens]
    return sizes if len(sizes) >= 2 else sorted({max(1000, max_tokens // 10), max_tokens})


def queries_for(tokens: int, quick: bool) -> int:
    """Queries scored exhaustively for recall: fewer where that costs the most (12 s a query at 100M tokens)."""
    n = SEARCH_QUERIES if tokens <= 2_000_000 else 100 if tokens <= 20_000_000 else 40
    return max(10, n // 4) if quick else n


def run(max_tokens: int, dtypes: tuple[str, ...], workdir: str | None = None, quick: bool = False,
        keep: bool = False) -> dict:
    from fastrank.bench.machine import machine_info

    rows, resume = [], None
    # The resume check runs at the second size (10M tokens in a full run): large enough that a process's
    # start-up, which a resumed build pays twice, is a small part of it.
    sizes = sizes_for(max_tokens)
    resume_size = sizes[1] if len(sizes) > 1 else sizes[0]
    root = Path(tempfile.mkdtemp(prefix="fastrank-scale-", dir=workdir))
    try:
        for tokens in sizes:
            for dtype in dtypes:
                out = root / f"{dtype}-{tokens}"
                print(f"bench index --scale: {tokens:,} tokens, {dtype}", file=sys.stderr)
                start = time.perf_counter()
                built, build_rss = _run_child(["build", str(out), str(tokens), dtype], root / "build.json")
                build_wall = time.perf_counter() - start
                nq = queries_for(tokens, quick)
                nsearch = max(10, SEARCH_QUERIES // 4) if quick else SEARCH_QUERIES
                found, search_rss = _run_child(["search", str(out), str(tokens), str(nsearch), "0"], root / "s.json")
                exact, _ = _run_child(["search", str(out), str(tokens), str(nq), "1"], root / "e.json")
                if resume is None and tokens == resume_size and dtype == dtypes[0]:
                    resume = [_resume_check(out, tokens, dtype, build_wall, root, at) for at in KILL_AT]
                a, b = np.load(root / "s.json.ids.npy")[:nq], np.load(root / "e.json.ids.npy")
                recall = float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b)]))
                rows.append({"tokens": tokens, "dtype": dtype, "documents": built["documents"],
                             "ncentroids": built["ncentroids"], "build_s": built["build_s"],
                             "peak_rss_bytes": build_rss, "search_peak_rss_bytes": search_rss,
                             "bytes_per_token": built["disk_bytes"] / tokens, "load_s": found["load_s"],
                             "page_in_s": found["page_in_s"],
                             "qps": found["qps"], "search_queries": nsearch, "stage_ms": found["stage_ms"],
                             "recall_at_10": recall, "queries": nq, "exhaustive_qps": exact["qps"]})
                if not keep:
                    shutil.rmtree(out)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    machine = machine_info("cpu")
    for r in rows:
        r["machine"] = machine
    return {"rows": rows, "fits": fits(rows), "resume": resume, "machine": machine,
            "workdir": str(root) if keep else None}


def _resume_check(whole: Path, tokens: int, dtype: str, build_s: float, root: Path, at: float) -> dict:
    """The same build killed (SIGKILL) at share ``at`` of its uninterrupted time and run again: the two runs'
    wall time (process start included, as for ``build_s``, the uninterrupted build child's wall time) against
    the uninterrupted one's, where the build was when killed, and whether the resumed index holds the same
    bytes."""
    out = root / "resumed"
    result = root / "resume.json"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fastrank.bench.index_scale", "build", str(out), str(tokens),
                             dtype, str(result)], stderr=subprocess.DEVNULL)
    time.sleep(at * build_s)
    killed = proc.poll() is None
    proc.kill()
    proc.wait()
    first = time.perf_counter() - start
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    committed = sum(c.get("documents", 0) for c in meta.get("chunks", []))
    stage = _stage_at_kill(out, meta)
    start = time.perf_counter()
    _run_child(["build", str(out), str(tokens), dtype], result)
    second = time.perf_counter() - start

    def files(path: Path) -> dict:
        m = json.loads((path / "meta.json").read_text())
        return {n: (path / n).read_bytes() for n in [*m["columns"], *m.get("large_files", {}), *m["sha256"]]}

    same = files(out) == files(whole)
    shutil.rmtree(out)
    return {"tokens": tokens, "dtype": dtype, "kill_at": at, "killed": killed, "killed_after_s": first,
            "stage_at_kill": stage, "committed_documents_at_kill": committed, "resumed_s": second, "uninterrupted_s": build_s,
            "ratio": (first + second) / build_s, "identical": same}


def _stage_at_kill(out: Path, meta: dict) -> str:
    """Where a killed build was, from what it had committed: before its manifest, training stage 1 (with the
    k-means iterations its checkpoint held), or writing chunks."""
    from fastrank.index.token_stream import CHECKPOINT

    if not meta:
        return "before its first commit"
    if "ncentroids" in meta.get("extra", {}):
        return "writing chunks" if meta.get("state") == "building" else "complete"
    if CHECKPOINT in meta.get("sha256", {}):
        try:
            with np.load(out / CHECKPOINT) as z:
                return f"training stage 1 ({int(z['iteration'])} k-means iterations checkpointed)"
        except (OSError, ValueError, KeyError):
            return "training stage 1 (its checkpoint unreadable)"
    return "training stage 1 (no iteration checkpointed yet)"


def _slope(xs, ys) -> float | None:
    if len(xs) < 2:
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def fits(rows: list[dict]) -> list[dict]:
    """Per dtype: log-log slopes of build time and queries/s against tokens, and MS MARCO (600M tokens)
    projected from the largest size along them (disk and peak memory per token as measured there)."""
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        rs = sorted((r for r in rows if r["dtype"] == dtype), key=lambda r: r["tokens"])
        t = [r["tokens"] for r in rs]
        b, q = _slope(t, [r["build_s"] for r in rs]), _slope(t, [r["qps"] for r in rs])
        big = rs[-1]
        scale = MSMARCO_TOKENS / big["tokens"]
        out.append({"dtype": dtype, "build_exponent": b, "qps_exponent": q,
                    "qps_fall": rs[0]["qps"] / big["qps"],
                    "msmarco_build_s": big["build_s"] * scale ** (b if b is not None else 1.0),
                    "msmarco_disk_bytes": big["bytes_per_token"] * MSMARCO_TOKENS,
                    "msmarco_qps": big["qps"] * scale ** (q if q is not None else 0.0),
                    "largest_peak_rss_bytes": max(big["peak_rss_bytes"], big["search_peak_rss_bytes"])})
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['cpu']} ({m['cpu_signature']}), {m['threads']} threads, ISA path {m['isa']}, "
             f"torch {m['torch']}, commit {m['commit']}", "",
             "| tokens | dtype | docs | centroids | build s | build peak RSS | search peak RSS | B/token | load s | "
             "queries/s | recall@10 vs exhaustive | exhaustive q/s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines[0] += ("\n\nQueries/s are timed with the index's files in the OS page cache (read once, sequentially, "
                 "after the load and before the search: a server that has run a while); load times are taken "
                 "before that read.")
    for r in res["rows"]:
        lines.append(f"| {r['tokens']:,} | {r['dtype']} | {r['documents']:,} | {r['ncentroids']} | {r['build_s']:.1f} | "
                     f"{_gib(r['peak_rss_bytes'])} | {_gib(r['search_peak_rss_bytes'])} | {r['bytes_per_token']:.1f} "
                     f"| {r['load_s']:.3f} | {r['qps']:.1f} | {r['recall_at_10']:.3f} | {r['exhaustive_qps']:.2f} |")
    staged = [r for r in res["rows"] if r.get("stage_ms")]
    if staged:
        lines += ["", "Where a query's time goes (ms, the stages timed apart on the same queries after the timed search): "
                  "its tokens' best centroids (through the centroid router from 8,192 centroids up), the candidates "
                  "from their lists, exact MaxSim of the candidates.", "",
                  "| tokens | dtype | centroids ms | candidates ms | exact ms | sum | 1000 / queries/s |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for r in staged:
            st = r["stage_ms"]
            lines.append(f"| {r['tokens']:,} | {r['dtype']} | {st['centroids']:.2f} | {st['candidates']:.2f} | "
                         f"{st['exact']:.2f} | {sum(st.values()):.2f} | {1000 / r['qps']:.2f} |")
    for r in res.get("resume") or []:
        lines += ["", f"Resume: the {r['tokens']:,}-token {r['dtype']} build killed (SIGKILL) after {r['killed_after_s']:.1f} s "
                  f"({r['kill_at']:.2f} of its uninterrupted time; {r['stage_at_kill']}, "
                  f"{r['committed_documents_at_kill']:,} documents committed), then run again ({r['resumed_s']:.1f} s): "
                  f"{r['ratio']:.2f}x the uninterrupted build ({r['uninterrupted_s']:.1f} s); the resumed index is "
                  + ("byte for byte the uninterrupted one." if r["identical"] else "NOT identical to the uninterrupted one.")]
    lines += ["", "Fits (log-log slope against tokens) and MS MARCO passage (600M tokens) projected from the largest "
              "size:", "", "| dtype | build exponent | queries/s exponent | queries/s fall | MS MARCO build | "
              "MS MARCO disk | MS MARCO queries/s | peak RSS at the largest size |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for f in res["fits"]:
        be = "n/a" if f["build_exponent"] is None else f"{f['build_exponent']:.2f}"
        qe = "n/a" if f["qps_exponent"] is None else f"{f['qps_exponent']:.2f}"
        lines.append(f"| {f['dtype']} | {be} | {qe} | {f['qps_fall']:.2f}x | {f['msmarco_build_s'] / 60:.0f} min | "
                     f"{_gib(f['msmarco_disk_bytes'])} | {f['msmarco_qps']:.1f} | {_gib(f['largest_peak_rss_bytes'])} |")
    return "\n".join(lines)


def draw(res: dict, out_dir: Path) -> list[str]:
    """build time and queries/s against tokens, one line per dtype (PNG; needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for dtype in dict.fromkeys(r["dtype"] for r in res["rows"]):
        rs = sorted((r for r in res["rows"] if r["dtype"] == dtype), key=lambda r: r["tokens"])
        axes[0].loglog([r["tokens"] for r in rs], [r["build_s"] for r in rs], "o-", label=dtype)
        axes[1].loglog([r["tokens"] for r in rs], [r["qps"] for r in rs], "o-", label=dtype)
    axes[0].set(xlabel="tokens", ylabel="build seconds", title="build time")
    axes[1].set(xlabel="tokens", ylabel="queries/s", title="search")
    for ax in axes:
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "scale.png", dpi=120)
    plt.close(fig)
    return ["scale.png"]


def main(argv: list[str]) -> None:
    kind, out, tokens = argv[0], argv[1], int(argv[2])
    torch.set_num_threads(int(os.environ.get("FASTRANK_BENCH_THREADS", torch.get_num_threads())))
    if kind == "build":
        _child_build(out, tokens, argv[3], argv[4])
    else:
        _child_search(out, tokens, int(argv[3]), argv[4] == "1", argv[5])


if __name__ == "__main__":
    main(sys.argv[1:])
