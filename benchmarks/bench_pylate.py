"""One PyLate training step (scorer + loss, forward + backward) with PyLate's scoring and with the fastrank swap.

    python benchmarks/bench_pylate.py                        # table: B=32 queries x K=8 docs, Lq=32, Ld=180, H=128
    python benchmarks/bench_pylate.py --json out.json        # the same, saved with the machine and the command
    python benchmarks/bench_pylate.py --quick                # tiny sizes: checks that the script runs, nothing more
    pytest benchmarks/bench_pylate.py                        # pytest-benchmark: one group per loss
    pytest benchmarks/bench_pylate.py --benchmark-disable    # correctness checks only

The step runs PyLate's own loss modules (needs ``pip install "fastrank[pylate]"``): ``Distillation`` (KL
between the teacher's and the min-max-normalised ``colbert_kd_scores`` of each query's K candidates) and
``Contrastive`` (cross-entropy over ``ColBERTScores``: every query against all B x K documents of the batch).
A stand-in for the encoder hands them leaf token embeddings that require grad, so the step is exactly the
losses' work: normalisation, masks, scoring, loss, and the backward down to the embeddings. Documents have
random lengths between Ld/3 and Ld (padded to Ld, masked by attention_mask); queries are expanded to Lq
(PyLate's default, no query mask).

Providers, each checked against PyLate's loss before it is timed:

- ``pylate``: PyLate's defaults (``colbert_kd_scores``, ``ColBERTScores()``; which backend PyLate's "auto"
  takes is recorded: its PyTorch path unless flash-maxsim or late-interaction-kernels is installed);
- ``fastrank``: the swap, ``fastrank.integrations.pylate`` with its defaults (PyLate's padding semantics,
  which cost a masked copy of the documents);
- ``fastrank_exclude``: the same with ``padding="exclude"`` (fastrank's semantics, no copy);
- ``reference``: the swap on the eager reference, ``backend="torch"`` (:func:`fastrank.maxsim_ref`), with
  ``padding="exclude"``.

Time: median seconds per step over interleaved rounds (:func:`fastrank.bench.time_interleaved`: every
provider once per round, rotating order, so a shared machine's drift falls on all of them). Peak memory:
on CUDA, ``torch.cuda.max_memory_allocated`` above what the inputs hold, in process; on CPU (torch keeps no
allocator statistics there), the peak resident set above the inputs during one step, in a fresh process per
provider, with the kernel's high-water mark reset after a warm-up step (``/proc/self/clear_refs``) and
glibc's mmap threshold fixed at 64 KiB so that freed buffers leave the resident set. Both count the
gradients of the embeddings, which every provider allocates alike.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from fastrank.bench.timing import synchronize, time_interleaved
from fastrank.integrations.pylate import ColBERTScores, colbert_kd_scores

from conftest import peak_memory, time_provider

LOSSES = ("Distillation", "Contrastive")
PROVIDERS = ("pylate", "fastrank", "fastrank_exclude", "reference")
CPU_MEMORY_METHOD = ("peak RSS above the inputs during one step, fresh process per provider (VmHWM reset through "
                     "/proc/self/clear_refs after a warm-up step; MALLOC_MMAP_THRESHOLD_=65536)")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated above the inputs during one step, in process"


@dataclass(frozen=True)
class Sizes:
    batch: int = 32     # queries
    k: int = 8          # documents per query
    lq: int = 32        # query tokens
    ld: int = 180       # document tokens (padded length)
    h: int = 128


FULL = Sizes()
QUICK = Sizes(batch=4, k=3, lq=8, ld=24, h=16)


class _Encoder:
    """Stands in for pylate.models.ColBERT: returns the leaf token embeddings that the features carry."""
    skiplist: list = []
    do_query_expansion = True  # PyLate's default: queries are padded with [MASK] tokens and not masked

    def __call__(self, features):
        return {"token_embeddings": features["token_embeddings"]}


def make_loss(loss_name: str, provider: str):
    from pylate import losses

    cls = getattr(losses, loss_name)
    if provider == "pylate":
        return cls(_Encoder())
    padding = "zero" if provider == "fastrank" else "exclude"
    backend = "torch" if provider == "reference" else None
    if loss_name == "Distillation":
        metric = functools.partial(colbert_kd_scores, backend=backend, padding=padding)
    else:
        metric = functools.partial(ColBERTScores(padding=padding), backend=backend)
    return cls(_Encoder(), score_metric=metric)


def make_inputs(loss_name: str, sizes: Sizes, device: str, dtype: torch.dtype, seed: int = 0):
    """PyLate's sentence features with leaf embeddings, and the teacher scores (Distillation) or None."""
    g = torch.Generator().manual_seed(seed)

    def features(n: int, length: int, shortest: int) -> dict:
        lengths = torch.randint(shortest, length + 1, (n,), generator=g)
        lengths[0] = length
        return {
            "input_ids": torch.randint(1000, 30000, (n, length), generator=g).to(device),
            "attention_mask": (torch.arange(length) < lengths[:, None]).long().to(device),
            "token_embeddings": torch.randn(n, length, sizes.h, generator=g).to(device, dtype).requires_grad_(),
        }

    queries = features(sizes.batch, sizes.lq, sizes.lq)
    shortest = max(1, sizes.ld // 3)
    if loss_name == "Distillation":
        docs = [features(sizes.batch * sizes.k, sizes.ld, shortest)]
        labels = torch.randn(sizes.batch, sizes.k, generator=g).to(device)
    else:  # a positive and K - 1 negatives per query, one feature dict per slot
        docs = [features(sizes.batch, sizes.ld, shortest) for _ in range(sizes.k)]
        labels = None
    return [queries, *docs], labels


def make_step(loss_module, feats, labels, device: str):
    leaves = [f["token_embeddings"] for f in feats]

    def step():
        for t in leaves:
            t.grad = None
        loss = loss_module(feats, labels)
        loss.backward()
        synchronize(device)
        return loss.detach()

    return step


def check(steps: dict, dtype: torch.dtype) -> None:
    """Every provider's loss against PyLate's on the same inputs (the padding semantics and the reference
    differ from PyLate's only where a query token's every similarity to a padded document is negative)."""
    want = steps["pylate"]().double()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, step in steps.items():
        got = step().double()
        assert torch.isfinite(got), f"{name}: loss {got}"
        assert abs(got - want) <= tol * max(1.0, abs(want)), f"{name}: loss {got.item()} vs PyLate's {want.item()}"


def pylate_info() -> dict:
    import importlib.util

    import pylate

    return {"pylate": pylate.__version__, "PYLATE_SCORES_BACKEND": os.environ.get("PYLATE_SCORES_BACKEND"),
            "flash_maxsim": importlib.util.find_spec("flash_maxsim") is not None,
            "late_interaction_kernels": importlib.util.find_spec("late_interaction_kernels") is not None}


# ------------------------------------------------------------------------------------------ peak memory

def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _memory_child(loss_name: str, provider: str, sizes: Sizes, dtype: torch.dtype) -> int:
    """Runs in the fresh process: one warm-up step (one-time allocations: thread pools, kernels' buffers),
    then the resident-set high-water mark of one step above the resident set before it."""
    feats, labels = make_inputs(loss_name, sizes, "cpu", dtype)
    step = make_step(make_loss(loss_name, provider), feats, labels, "cpu")
    step()
    for f in feats:
        f["token_embeddings"].grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_bytes("VmRSS")
    step()
    return _status_bytes("VmHWM") - base


def step_peak_memory(loss_name: str, provider: str, sizes: Sizes, dtype: torch.dtype, device: str, step=None):
    """(bytes, method): the peak memory of one step above the inputs."""
    if device.startswith("cuda"):
        return peak_memory(step, device), CUDA_MEMORY_METHOD
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", loss_name, provider,
           "--dtype", str(dtype).removeprefix("torch."), "--sizes", *map(str, asdict(sizes).values()),
           "--threads", str(torch.get_num_threads())]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"], CPU_MEMORY_METHOD


# ------------------------------------------------------------------------------------------ pytest-benchmark

@pytest.mark.parametrize("loss_name,provider", [(loss, p) for loss in LOSSES for p in PROVIDERS])
def test_pylate_step(benchmark, loss_name, provider, device, session_timings):
    pytest.importorskip("pylate.losses", reason="PyLate is not installed (pip install 'fastrank[pylate]')")
    sizes, dtype = FULL, torch.float32
    benchmark.group = f"pylate {loss_name} step B={sizes.batch} K={sizes.k} Lq={sizes.lq} Ld={sizes.ld} H={sizes.h}"
    feats, labels = make_inputs(loss_name, sizes, device, dtype)
    steps = {p: make_step(make_loss(loss_name, p), feats, labels, device) for p in dict.fromkeys(("pylate", provider))}
    check(steps, dtype)
    _, median = time_provider(benchmark, steps[provider], device)
    if median is None:  # --benchmark-disable: checked above, nothing timed
        return
    session_timings[(benchmark.group, provider)] = median
    peak, method = step_peak_memory(loss_name, provider, sizes, dtype, device, steps[provider])
    benchmark.extra_info.update({"median_ms": median * 1e3, "peak_mem_bytes": peak, "memory_method": method,
                                 "threads": torch.get_num_threads(), **pylate_info()})
    if provider != "pylate":  # the ratio from rounds that interleave the two, not from two separate runs
        medians = time_interleaved({"pylate": steps["pylate"], provider: steps[provider]}, device)
        benchmark.extra_info["speedup_vs_pylate_interleaved"] = medians["pylate"] / medians[provider]


# ------------------------------------------------------------------------------------------ command line

def run(sizes: Sizes, device: str, dtype: torch.dtype, losses, providers, min_seconds: float) -> dict:
    rows = []
    for loss_name in losses:
        feats, labels = make_inputs(loss_name, sizes, device, dtype)
        steps = {p: make_step(make_loss(loss_name, p), feats, labels, device) for p in dict.fromkeys(("pylate", *providers))}
        check(steps, dtype)  # also the warm-up
        medians = time_interleaved(steps, device, min_seconds=min_seconds)
        for p in steps:
            peak, method = step_peak_memory(loss_name, p, sizes, dtype, device, steps[p])
            rows.append({"loss": loss_name, "provider": p, "median_ms": medians[p] * 1e3, "peak_bytes": peak,
                         "speedup_vs_pylate": medians["pylate"] / medians[p], "memory_method": method})
        base = next(r["peak_bytes"] for r in rows if r["loss"] == loss_name and r["provider"] == "pylate")
        for r in rows:
            if r["loss"] == loss_name:
                r["memory_vs_pylate"] = r["peak_bytes"] / base if base else None
    return {"rows": rows}


def print_table(result: dict) -> None:
    s = result["sizes"]
    print(f"PyLate training step, scorer + loss, forward + backward: B={s['batch']} queries x K={s['k']} documents, "
          f"Lq={s['lq']}, Ld={s['ld']} (lengths {max(1, s['ld'] // 3)}-{s['ld']}), H={s['h']}, {result['dtype']}, "
          f"{result['machine'].get('gpu', result['machine']['cpu'])}, {result['machine']['threads']} threads, "
          f"PyLate {result['pylate']['pylate']}")
    print(f"{'loss':<13} {'provider':<17} {'ms/step':>9} {'vs pylate':>10} {'peak MiB':>9} {'of pylate':>10}")
    for r in result["rows"]:
        mem = r["memory_vs_pylate"]
        print(f"{r['loss']:<13} {r['provider']:<17} {r['median_ms']:9.2f} {r['speedup_vs_pylate']:9.2f}x "
              f"{r['peak_bytes'] / 2 ** 20:9.1f} {'' if mem is None else f'{mem:9.2f}x':>10}")
    print(f"time: median of interleaved rounds ({result['min_seconds']} s per provider at least)")
    print(f"memory: {result['rows'][0]['memory_method']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="A PyLate training step's time and peak memory, PyLate's scoring vs "
                                            "the fastrank swap.")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes {QUICK} (checks the script; timings are noise)")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--min-seconds", type=float, default=None, help="time per provider (default 2, 0.05 with --quick)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's), also in the memory processes")
    p.add_argument("--sizes", nargs=5, type=int, metavar=("B", "K", "LQ", "LD", "H"), help=argparse.SUPPRESS)
    p.add_argument("--memory-child", nargs=2, metavar=("LOSS", "PROVIDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = Sizes(*args.sizes) if args.sizes else (QUICK if args.quick else FULL)
    if args.memory_child:
        print(json.dumps({"peak_bytes": _memory_child(*args.memory_child, sizes, dtype)}))
        return 0
    from fastrank.bench.machine import machine_info

    min_seconds = args.min_seconds if args.min_seconds is not None else (0.05 if args.quick else 2.0)
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "sizes": asdict(sizes),
              "dtype": args.dtype, "min_seconds": min_seconds, "machine": machine_info(args.device),
              "pylate": pylate_info()}
    result.update(run(sizes, args.device, dtype, args.losses, args.providers, min_seconds))
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
