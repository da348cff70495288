"""What a training step's scorer + loss cost with fastrank's fused ops against the eager references.

One step = head scores of B groups of K documents from encoder states (the encoder's output, so gradients
flow to it as in fine-tuning), the loss, and the backward. Time: median of interleaved rounds in one process.
Peak memory: measured in a fresh subprocess per variant as the rise of the peak resident set over the
resident set before the step (Linux VmHWM after resetting it) on CPU, or of
``torch.cuda.max_memory_allocated`` on CUDA, over the inputs already in memory, so one variant's caches
cannot hide another's.

``fastrank bench train-step [--scorer maxsim lite] [--json [FILE]] [--out DIR]`` prints the table.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import torch

from fastrank.bench.timing import time_interleaved
from fastrank.train.config import TrainConfig
from fastrank.train.loop import World, group_loss
from fastrank.train.student import MaxSimHead, make_head

BACKENDS = {"fastrank": None, "eager": "reference"}


def make_inputs(b: int = 32, k: int = 8, lq: int = 32, ld: int = 200, h: int = 384, seed: int = 0, device="cpu"):
    """Encoder states with realistic ragged lengths (queries 20-32 tokens, documents 120-200) and a teacher."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, generator=g)
    d = torch.randn(b * k, ld, h, generator=g)
    qm = torch.arange(lq)[None] < torch.randint(20, lq + 1, (b, 1), generator=g)
    dm = torch.arange(ld)[None] < torch.randint(120, ld + 1, (b * k, 1), generator=g)
    t = torch.randn(b, k, generator=g) * 3
    return [x.to(device) for x in (q, qm, d, dm, t)]


class MaxSimOnly(torch.nn.Module):
    """MaxSim over tokens already projected and normalised (ColBERT's operator without its Linear layer)."""

    def score(self, q, q_mask, d, d_mask, backend=None):
        from fastrank.ops.maxsim import maxsim

        return maxsim(q.unsqueeze(1), d, q_mask.unsqueeze(1), d_mask, backend=backend)


class EagerMaxSimHead(MaxSimHead):
    """The ColBERT head as plain PyTorch writes it, the baseline: every token projected and normalised, padding
    included (MaxSim ignores it), with no select to zero it (the reference's spec adds one: 5% slower)."""

    def tokens(self, h, mask=None, backend=None):
        return torch.nn.functional.normalize(self.projection(h), dim=-1)


def _head(scorer: str, h: int, lq: int, ld: int, device, eager: bool = False):
    if scorer == "maxsim-op":
        return MaxSimOnly()
    if scorer == "maxsim" and eager:
        return EagerMaxSimHead(h, 128).to(device)
    return make_head(scorer, h, proj_dim=128 if scorer == "maxsim" else None, lq=lq, ld=ld).to(device)


def step_fn(scorer: str, backend: str | None, loss: tuple[str, ...], inputs, device="cpu",
            amp: torch.dtype | None = None):
    """A closure running one scorer + loss forward and backward (gradients to the head and the states).
    ``maxsim-op`` is the MaxSim operator and loss alone, on 128-d normalised tokens."""
    q, qm, d, dm, t = inputs
    if scorer == "maxsim-op":
        q = torch.nn.functional.normalize(q[..., :128], dim=-1)
        d = torch.nn.functional.normalize(d[..., :128], dim=-1)
    torch.manual_seed(0)
    head = _head(scorer, q.shape[-1], q.shape[1], d.shape[1], device, eager=backend == "reference")
    cfg = TrainConfig(data=".", out=".", scorer=scorer, loss=loss, tau=1.0)
    q, d = q.clone().requires_grad_(), d.clone().requires_grad_()

    def step():
        head.zero_grad(set_to_none=True)
        q.grad = d.grad = None
        with torch.autocast(torch.device(device).type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss_value = group_loss(cfg, head, q, qm, d, dm, t, World(), backend)
        loss_value.backward()
    return step


def peak_in_this_process(scorer: str, backend: str | None, loss, b: int, k: int, device: str,
                          amp: str | None = None) -> int:
    inputs = make_inputs(b, k, device=device)
    fn = step_fn(scorer, backend, loss, inputs, device, getattr(torch, amp) if amp else None)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # Linux resets the peak-RSS mark on "5" to clear_refs, so VmHWM after the step is the step's own peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(scorer: str, variant: str, loss, b: int, k: int, device: str = "cpu",
                amp: torch.dtype | None = None) -> int:
    """Bytes the step adds at its peak, measured in a fresh process."""
    code = ("import sys, json; from fastrank.bench.train_step import peak_in_this_process as p; "
            f"print(json.dumps(p({scorer!r}, {BACKENDS[variant]!r}, {tuple(loss)!r}, {b}, {k}, {device!r}, "
            f"{str(amp).replace('torch.', '') if amp else None!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def run(scorers=("maxsim-op", "maxsim", "lite"), losses=(("ce",), ("margin_mse",)), b: int = 32, k: int = 8, device: str = "cpu",
        rounds: int = 7, amp: torch.dtype | None = None) -> list[dict]:
    from fastrank.bench.machine import machine_info

    rows = []
    inputs = make_inputs(b, k, device=device)
    for scorer in scorers:
        for loss in losses:
            fns = {v: step_fn(scorer, backend, loss, inputs, device, amp) for v, backend in BACKENDS.items()}
            for fn in fns.values():  # warm-up
                fn()
            secs = time_interleaved(fns, device, min_rounds=rounds)
            for variant in BACKENDS:
                rows.append({"scorer": scorer, "loss": "+".join(loss), "variant": variant, "B": b, "K": k,
                             "amp": str(amp).replace("torch.", "") if amp else None,
                             "ms_per_step": secs[variant] * 1e3, "speedup_vs_eager": secs["eager"] / secs[variant],
                             "peak_mem_bytes": peak_memory(scorer, variant, loss, b, k, device, amp),
                             "machine": machine_info(device)})
    return rows


def whole_step(scorer: str, variant: str, loss=("ce",), b: int = 32, k: int = 8, rounds: int = 2,
               device: str = "cpu") -> dict:
    """Seconds of one full fine-tuning step with the packaged all-MiniLM-L6-v2 (encoder forward and backward,
    scorer, loss, AdamW), and of its scorer + loss alone on the same states: the share the scorer takes."""
    from transformers import AutoModel

    from fastrank.encoders import default_model_path

    torch.manual_seed(0)
    encoder = AutoModel.from_pretrained(str(default_model_path()), local_files_only=True).to(device).train()
    head = _head(scorer, encoder.config.hidden_size, 32, 200, device, eager=variant == "eager")
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=1e-5)
    cfg = TrainConfig(data=".", out=".", scorer=scorer, loss=tuple(loss), tau=1.0)
    q_ids = torch.randint(1000, 20000, (b, 32), device=device)
    d_ids = torch.randint(1000, 20000, (b * k, 200), device=device)
    _, qm, _, dm, t = make_inputs(b, k, device=device)
    backend = BACKENDS[variant]
    parts = {"whole": [], "scorer_loss": []}
    for _ in range(rounds + 1):  # the first round warms up
        t0 = time.perf_counter()
        q = encoder(input_ids=q_ids, attention_mask=qm.long()).last_hidden_state
        d = encoder(input_ids=d_ids, attention_mask=dm.long()).last_hidden_state
        qd, dd = q.detach().requires_grad_(), d.detach().requires_grad_()
        t1 = time.perf_counter()
        group_loss(cfg, head, qd, qm, dd, dm, t, World(), backend).backward()
        t2 = time.perf_counter()
        torch.autograd.backward([q, d], [qd.grad, dd.grad])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        parts["whole"].append(time.perf_counter() - t0)
        parts["scorer_loss"].append(t2 - t1)
    whole, sl = statistics.median(parts["whole"][1:]), statistics.median(parts["scorer_loss"][1:])
    return {"scorer": scorer, "variant": variant, "loss": "+".join(loss), "B": b, "K": k, "whole_s": whole,
            "scorer_loss_s": sl, "share": sl / whole}


def measure(scorers=("maxsim-op", "maxsim", "lite"), *, b: int = 32, k: int = 8, device: str = "cpu",
            rounds: int = 7, amp: torch.dtype | None = None, whole: bool = False) -> dict:
    """The steps of :func:`run`, and with ``whole`` the whole fine-tuning steps of every scorer but the bare
    operator: the result `fastrank bench train-step` prints and writes."""
    from fastrank.bench.machine import machine_info

    steps = run(tuple(scorers), b=b, k=k, device=device, rounds=rounds, amp=amp)
    wholes = [whole_step(scorer, variant, b=b, k=k, device=device)
              for scorer in scorers if whole and scorer != "maxsim-op" for variant in BACKENDS]
    return {"machine": machine_info(device), "steps": steps, "whole_steps": wholes}


def format_report(res: dict) -> str:
    text = format_rows(res["steps"])
    if res["whole_steps"]:
        text += "\n\n| scorer | variant | whole step s | scorer+loss s | share |\n|---|---|---:|---:|---:|\n"
        text += "\n".join(f"| {w['scorer']} | {w['variant']} | {w['whole_s']:.2f} | {w['scorer_loss_s']:.3f} | "
                          f"{w['share']:.1%} |" for w in res["whole_steps"])
    return text


def format_rows(rows: list[dict]) -> str:
    m = rows[0]["machine"]
    lines = [f"training step, scorer + loss forward and backward, B={rows[0]['B']} x K={rows[0]['K']}, "
             f"queries 20-32 / documents 120-200 tokens, H=384; {m['cpu']}, {m['cpu_signature']}, "
             f"ISA path {m['isa']} ({m['threads']} threads); peak = the step's rise of peak RSS (VmHWM) in a fresh "
             "process" + (f"; under torch.autocast({rows[0]['amp']})" if rows[0].get("amp") else ""), "",
             "| scorer | loss | variant | ms/step | vs eager | peak MB |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scorer']} | {r['loss']} | {r['variant']} | {r['ms_per_step']:.1f} | "
                     f"{r['speedup_vs_eager']:.2f}x | {r['peak_mem_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # the entry point: the same as `fastrank bench train-step`
    from fastrank.cli import main

    sys.exit(main(["bench", "train-step", *sys.argv[1:]]))
