"""The Triton pieces both MaxSim ops share: the padded kernels of :mod:`fastrank.ops.maxsim` and the packed
ones of :mod:`fastrank.ops.maxsim_packed_triton`.

- The forward kernels' autotuning space (FORWARD_CONFIGS, issue 13), what of it fits the registers
  (prune_forward_configs), and the tuning key of a size (bucket).
- The dq gather of the backward, :func:`maxsim_bwd_dq_kernel`, which serves both layouts. (The forwards'
  common last step, the NaN rule and the masked sum, stays written out in each kernel: as a shared
  ``@triton.jit`` function its inlining changed ptxas's register assignment in some sm_90 variants.)
- Launch helpers: the interpreter's single config (interpreting, INTERPRETER_CONFIG, interpreter_meta),
  CUDA's grid limits (check_grid), the H slice per architecture (h_block_cap), and when a backward reduction
  is split over programs that add with float atomics (loop_split).

The kernels are launched through the names the two op modules import (``kernel[grid](...)`` there), so
launch interception (tests, :mod:`fastrank.bench.kernels`) that replaces a module's kernel names sees them
in those modules. Importable without Triton: the kernels and configs then do not exist, the rest is plain
Python.
"""
from __future__ import annotations

import math
from typing import Optional

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the C++ and reference backends cover CPU.
    triton = None


if triton is not None:

    # Tuning (issue 13). A (query, document) pair at the seeds' sizes (Lq 32, Ld 200, H 128) is three or
    # four doc tiles: a program per pair spends much of its time starting up and reloading q. So a program
    # scores DOCS documents of one query (q is read once and, when H fits one BLOCK_H, held across them),
    # the doc-tile loop is software-pipelined (num_stages), and the autotuner picks the tile, DOCS and
    # stages per bucket of (Lq, Ld, H, dtype, pair count): DOCS trades parallelism for reuse, so the
    # 1 x 1,000 re-rank wants fewer docs per program than the 1 x 100,000 scan.
    FORWARD_CONFIGS = [
        triton.Config({"BLOCK_LD": 64, "DOCS": 4}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_LD": 64, "DOCS": 1}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_LD": 64, "DOCS": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_LD": 32, "DOCS": 4}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_LD": 32, "DOCS": 1}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_LD": 32, "DOCS": 8}, num_warps=4, num_stages=3),
    ]

    def prune_forward_configs(configs, named_args, **kwargs):
        # The S tile (BLOCK_LQ x BLOCK_LD float32, with its argmax and NaN bookkeeping) must stay in the
        # registers: ptxas (sm_90) spills past 32 x 64 at 4 warps (a 128-token doc tile spilled, 8 warps
        # too), so a full 64-token query tile takes 32-token doc tiles, and so does the H-split path,
        # whose q and doc slices live beside S. On that path ptxas's choices are not monotone in DOCS
        # (fastrank.kernel_report, every dtype and int8 tokens): with a 32-token query tile only one
        # document per program is spill-free (bf16, fp16 and int8 spilled 8-40 bytes at DOCS 4 and 8),
        # with a 64-token tile only several are (DOCS 1 spilled ~160 bytes). The interpreter ignores this.
        if kwargs["SPLIT_H"] and kwargs["BLOCK_LQ"] >= 32:
            several = kwargs["BLOCK_LQ"] > 32
            return [c for c in configs if c.kwargs["BLOCK_LD"] == 32 and (c.kwargs["DOCS"] > 1) == several]
        limit = 1024 if kwargs["SPLIT_H"] else 2048
        return [c for c in configs if kwargs["BLOCK_LQ"] * c.kwargs["BLOCK_LD"] <= limit]

    @triton.jit
    def maxsim_bwd_dq_kernel(
        D, G, ARG, DQ, OFFS,
        Y, X, Lq, H, x_chunk,
        sd_f, sd_x, sd_t,
        PACKED: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_LQ: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # dq[f,y,i,h] = sum_x g[f,y,x] * d[f,x,argmax[f,y,x,i],h]; program (item, h block, x chunk).
        # PACKED (maxsim_packed, Y = 1): pair f * X + x is a document whose rows start at OFFS[pair] and
        # whose argmax is relative to that row; sd_f and sd_x are unused.
        # Offsets from program ids and loop counters are int64: x * sd_x passes 2^31 beyond ~14k documents
        # per query at H = 768 (the rest are int64 so that one rule covers every kernel; a test checks it).
        item = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
        x_start = tl.program_id(2).to(tl.int64) * x_chunk
        f = item // Y
        offs_i = tl.arange(0, BLOCK_LQ)
        row_in = offs_i < Lq
        acc = tl.zeros([BLOCK_LQ, BLOCK_H], tl.float32)
        # Pipelined (num_stages): the gathers of the next documents are in flight while this one adds up.
        for x in tl.range(x_start, tl.minimum(x_start + x_chunk, X)):
            pair = item * X + x
            j = tl.load(ARG + pair * Lq + offs_i, mask=row_in, other=-1)
            g = tl.load(G + pair)
            if PACKED:
                row0 = D + tl.load(OFFS + pair) * sd_t
            else:
                row0 = D + f * sd_f + x * sd_x
            rows = tl.load(
                row0 + j[:, None].to(tl.int64) * sd_t + h[None, :],
                mask=(j[:, None] >= 0) & (h[None, :] < H), other=0.0,
            )
            acc += g * rows.to(tl.float32)
        ptrs = DQ + (item * Lq + offs_i[:, None]) * H + h[None, :]
        mask = row_in[:, None] & (h[None, :] < H)
        if ATOMIC:
            tl.atomic_add(ptrs, acc, mask=mask)
        else:
            tl.store(ptrs, acc, mask=mask)

    # Read once, from a kernel as built: launch interception (tests, reports) may replace the modules' names.
    _INTERPRETED = type(maxsim_bwd_dq_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


def interpreting() -> bool:
    """Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET set when they were defined)."""
    return _INTERPRETED


# Which entry of an autotuned kernel's configs the interpreter launches. The interpreter runs one program
# after another on the CPU and would run every config on every new key: it launches this one alone (tests
# set it to walk every config).
INTERPRETER_CONFIG = 0


def interpreter_meta(kernel) -> dict:
    """The meta-parameters of config INTERPRETER_CONFIG of an autotuned ``kernel``, to launch its ``.fn``."""
    config = kernel.configs[INTERPRETER_CONFIG]
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def bucket(n: int) -> int:
    """An autotuning key for a size: its power of two, so calls of similar size share a tuned config."""
    return 1 << max(0, int(n) - 1).bit_length()


# CUDA caps a grid at 2^31 - 1 programs along x and 65535 along y and z: launchers put the dimension that
# grows with the batch on x and check the others, so a huge call is a clear error, not a failed launch.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(grid: tuple[int, ...], what: str) -> tuple[int, ...]:
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if size > limit:
            raise ValueError(f"{what}: the launch needs {size} programs along grid axis {'xyz'[axis]}, more than "
                             f"CUDA's {limit}; split the call into smaller batches")
    return grid


def h_block_cap(float32_math: bool, arch: Optional[int]) -> int:
    """The widest H slice of the forward's H-split path and of the dd / dtokens backward. float32 dots run
    on FMA units, whose operands each thread holds whole along H: on sm_80, 64-wide float32 slices spilled
    (forward up to 344 B at a 64-token query tile; dd and dtokens 8-9 KB, ptxas keeping 32 registers) and
    32-wide ones fit, while on sm_90 the 64-wide ones are spill-free and 32-wide ones spilled 8-24 B in the
    forward (fastrank.kernel_report, both archs). 16-bit slices are 64 wide everywhere."""
    return 32 if float32_math and arch is not None and arch < 90 else 64


def loop_split(programs: int, loop_len: int, deterministic: bool, parallel_programs: int) -> int:
    """How many chunks a backward reduction loop of ``loop_len`` steps is split into, for a grid of
    ``programs`` on a device that ``parallel_programs`` programs keep busy (>1 means float atomics: run-to-run
    differences in the last bits). Split only when the grid alone cannot fill the device."""
    if deterministic:
        return 1
    if programs >= parallel_programs:
        return 1
    return max(1, min(math.ceil(parallel_programs / programs), loop_len // 8))
