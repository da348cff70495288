"""Why a MaxSim kernel cannot, or should not, run a call: the reasons that the padded op
(:mod:`fastrank.ops.maxsim`) and the packed op (:mod:`fastrank.ops.maxsim_packed`) both give
:mod:`fastrank.dispatch`. Each op adds its own on top (maxsim: small calls and one-GEMM inference).
"""
from __future__ import annotations

import torch

from fastrank.ops.pairs import dtype_reasons


def kernel_reasons(*, dtype: torch.dtype, interpreter: bool = False, **_) -> list[str]:
    """What the kernels (Triton, or with ``interpreter`` its interpreter; the C++ extension) cannot take.
    No limit on Lq: queries longer than the tile run in chunks (pairs.forward_by_query_chunks)."""
    return dtype_reasons(dtype, interpreter)


# Where the CPU kernel loses to eager PyTorch, measured through maxsim() on the CPUs we ran
# (benchmarks/results/maxsim_cpu_xeon_amx.md, including the AVX2 and AVX-512 classes emulated there): the
# scalar path (no AVX2) loses to torch's vectorised BLAS, and a call with fewer (query, doc) pairs than
# threads leaves cores idle (the kernel parallelises over pairs), which loses to eager's multi-threaded
# GEMM once the one pair is big (from about 2^22 multiply-adds: one 200-token doc at H = 768).
UNDERFILLED_WORK_LOG2 = 22


def cpu_slower(*, device_types, work: int = 64, isa: str = "", underfilled: bool = False, **_) -> list[str]:
    """Where the C++ CPU kernel would be slower than eager (``work``: log2 of the multiply-adds;
    ``underfilled``: fewer pairs than threads); nothing off the CPU."""
    if device_types != {"cpu"}:
        return []
    if isa == "scalar":
        return ["the CPU ISA path is scalar (no AVX2): torch's vectorised BLAS is faster"]
    if underfilled and work >= UNDERFILLED_WORK_LOG2:
        return [f"fewer (query, doc) pairs than threads at about 2^{work} multiply-adds: the kernel would leave "
                "cores idle, eager's GEMM uses them all"]
    return []
