"""The CUDA kernels' index arithmetic and grid sizes (issue 13): int64 past 2^31, and a clear error, never a
silent cast, for a grid past CUDA's limit.

The kernels in csrc/cuda/*.cu compute every offset through csrc/index_math.h, which the CPU extension also
compiles and exposes as ``_C._index_*`` test hooks; so the arithmetic itself is checked here against Python
integers on any machine. A static check keeps the .cu files on those helpers. The grid checks of the CUDA
entries need a CUDA build but no GPU (they refuse before launching anything); the run past 2^31 elements
needs a GPU with room for it.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fastrank import _ext

CUDA_SOURCES = sorted((Path(__file__).resolve().parents[1] / "csrc" / "cuda").glob("*.cu"))
I32 = 2**31
GRID_X_MAX = 2**31 - 1

pytestmark = pytest.mark.skipif(_ext.load() is None, reason="fastrank._C is not built")


def ext():
    return _ext.require()


# ---------------------------------------------------------------------------------------------------------
# The arithmetic, against Python integers
# ---------------------------------------------------------------------------------------------------------
# Shapes from the kernels: (row, stride) pairs whose products pass 2^31 or 2^32 at sizes a GPU holds.
OFFSET2 = [
    (100_000, 180 * 128, 179, 128),  # d[x, token]: 100k docs x 180 tokens x 128 dims
    (2**27 + 5, 20, 19, 1),          # losses: row b of a (B, 20) matrix past 2^31 elements
    (3, 2**31 + 7, 2, 2**30),        # strides alone past int32
    (70_000_000, 64, 63, 1),         # argmax rows past 2^32
]


@pytest.mark.parametrize("i,si,j,sj", OFFSET2)
def test_offset2_is_exact_past_2_31(i, si, j, sj):
    assert i * si + j * sj >= I32
    assert ext()._index_offset2(i, si, j, sj) == i * si + j * sj


def test_offset4_is_exact_past_2_31():
    # MaxSim's mask (f, y, x, token) and dq's d read (f, x, argmax, h), with the batch strides of a
    # (F, X, Ld, H) tensor of 2^33 elements
    args = (3, 2**31, 70_000, 180 * 128, 177, 128, 127, 1)
    a, sa, b, sb, c, sc, d, sd = args
    assert ext()._index_offset4(*args) == a * sa + b * sb + c * sc + d * sd


@pytest.mark.parametrize("row,n,col", [(2**26 + 3001, 32, 31), (100_000, 180 * 768, 767), (2**31 + 1, 2, 1)])
def test_flat_is_exact_past_2_31(row, n, col):
    assert ext()._index_flat(row, n, col) == row * n + col


def test_unit_index_is_exact_for_the_largest_grid():
    # The last warp of the largest grid the losses launch: block 2^31 - 2, 4 warps a block.
    assert ext()._index_unit(GRID_X_MAX - 1, 4, 3) == (GRID_X_MAX - 1) * 4 + 3


@pytest.mark.parametrize("index,nb,nc", [(2**31 + 12345, 7, 100_003), (2**33 - 1, 2**20, 2**12), (5, 1, 1)])
def test_unflatten3_inverts_the_flat_pair_index(index, nb, nc):
    a, rest = divmod(index, nb * nc)
    b, c = divmod(rest, nc)
    assert ext()._index_unflatten3(index, nb, nc) == (a, b, c)


@pytest.mark.parametrize("n,per", [(2**33 + 1, 4), (2**31 + 3, 1), (1, 4), (8, 4)])
def test_blocks_for_rounds_up_in_int64(n, per):
    assert ext()._index_blocks_for(n, per) == -(-n // per)


def test_grid_x_accepts_the_limit_and_refuses_past_it():
    assert ext()._index_grid_x(GRID_X_MAX, "k") == GRID_X_MAX
    assert ext()._index_grid_x(1, "k") == 1
    for bad in (GRID_X_MAX + 1, 2**32 + 5, 0):
        with pytest.raises(ValueError, match=r"^fastrank: my launch needs -?\d+ thread blocks, outside CUDA's grid x "
                                             r"limit \[1, 2147483647\]; split the batch"):
            ext()._index_grid_x(bad, "my launch")


# ---------------------------------------------------------------------------------------------------------
# The .cu files use the helpers: no raw grid cast, no product formed from blockIdx outside index_math.h
# ---------------------------------------------------------------------------------------------------------
def launch_grids(source: str) -> list[str]:
    """The grid expression of every ``kernel<<<grid, ...>>>`` launch."""
    return [m.group(1).strip() for m in re.finditer(r"<<<\s*([^,]+),", source)]


def unchecked_grids(source: str) -> list[str]:
    """Grid expressions not a variable assigned from a checked helper (index_math's grid_x, or a local
    blocks_for that returns one) in the same file."""
    helpers = ["im::grid_x"]
    if re.search(r"blocks_for\([^)]*\)\s*\{\s*return im::grid_x\(", source):
        helpers.append("blocks_for")
    checked = set(re.findall(r"(\w+)\s*=\s*(?:run_\w+\s*\?\s*)?(?:" + "|".join(helpers) + r")\(", source))
    return [g for g in launch_grids(source) if g not in checked]


def raw_block_products(source: str) -> list[str]:
    """Lines using blockIdx other than as ``const int64_t x = blockIdx.x;`` or an argument of an im:: helper."""
    bad = []
    for line in source.splitlines():
        if "blockIdx" not in line:
            continue
        if re.fullmatch(r"\s*const int64_t \w+ = blockIdx\.x;\s*", line) or re.search(r"im::\w+\(blockIdx\.x,", line):
            continue
        bad.append(line.strip())
    return bad


def test_the_static_checks_find_raw_grids_and_products():
    old = """
        unsigned int blocks_for(int64_t B) { return static_cast<unsigned int>((B + 3) / 4); }
        k<<<static_cast<unsigned>(pairs), kThreads, 0, s>>>(a);
        k<<<blocks_for(B), kThreads, 0, stream>>>(a);
        const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
        const int64_t pair = blockIdx.x;
        const unsigned int blocks = im::grid_x(pairs, "x");
        k<<<blocks, kThreads>>>(a);
        """
    assert unchecked_grids(old) == ["static_cast<unsigned>(pairs)", "blocks_for(B)"]
    assert raw_block_products(old) == [
        "const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;"]


@pytest.mark.parametrize("path", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_check_every_grid_and_index_in_int64(path):
    source = path.read_text()
    assert launch_grids(source), f"{path.name}: no launch found; has the launch syntax changed?"
    assert unchecked_grids(source) == []
    assert raw_block_products(source) == []


# ---------------------------------------------------------------------------------------------------------
# The CUDA entries refuse an oversized grid before launching (a CUDA build; no GPU needed)
# ---------------------------------------------------------------------------------------------------------
needs_cuda_build = pytest.mark.skipif(_ext.load() is None or not _ext.load().has_cuda,
                                      reason="fastrank._C was built without CUDA")


@needs_cuda_build
def test_maxsim_cuda_refuses_more_pairs_than_a_grid_holds():
    # The launchers' first step, through its host-side hook (the entry points take CUDA tensors, which this
    # machine may not have). (F, Y, X) = (1, 2^16, 2^15 + 1) pairs.
    with pytest.raises(ValueError, match=r"maxsim \(cuda\) forward, one block per \(query, document\) pair, needs "
                                         r"2147549184 thread blocks, outside CUDA's grid x limit"):
        ext()._maxsim_cuda_grids(1, 2**16, 2**15 + 1, 32, 8, 64, True, False, False)
    assert ext()._maxsim_cuda_grids(1, 2**16, 2**15 - 1, 32, 8, 64, True, False, False) == (2**31 - 2**16, 0, 0)


@needs_cuda_build
def test_maxsim_cuda_backward_refuses_before_writing_either_gradient():
    # dq: F*Y*Lq = 2^32 blocks; dd: 1 block. Both grids are computed before either kernel launches.
    with pytest.raises(ValueError, match=r"maxsim \(cuda\) backward, one block per query token, needs 4294967296"):
        ext()._maxsim_cuda_grids(1, 2**26, 1, 64, 8, 64, False, True, True)
    assert ext()._maxsim_cuda_grids(1, 2**26, 1, 64, 8, 64, False, False, True) == (0, 0, 1)


@needs_cuda_build
def test_losses_cuda_refuse_more_rows_than_a_grid_holds():
    B = 4 * GRID_X_MAX + 1  # one warp per row, 4 a block
    with pytest.raises(ValueError, match=r"the distillation loss over s's rows needs 2147483648 thread blocks"):
        ext()._losses_cuda_blocks(B, "the distillation loss over s's rows")
    assert ext()._losses_cuda_blocks(B - 1, "rows") == GRID_X_MAX
    # Every launch in the loss kernels takes its grid from that helper (the static check above).
    source = (Path(__file__).parents[1] / "csrc" / "cuda" / "losses.cu").read_text()
    assert all(grid == "blocks" for grid in launch_grids(source)) and "blocks_for(B, what); }" in source


# ---------------------------------------------------------------------------------------------------------
# On a GPU: MaxSim's CUDA backend past 2^31 elements (d, dd and argmax all pass it)
# ---------------------------------------------------------------------------------------------------------
def _gpu_with(gib: int) -> bool:
    if not torch.cuda.is_available():
        return False
    free, _ = torch.cuda.mem_get_info()
    return free >= gib * 2**30


@needs_cuda_build
@pytest.mark.skipif(not _gpu_with(40), reason="needs a CUDA GPU with 40 GiB free")
def test_maxsim_cuda_past_2_31_elements():
    # X docs of Ld = 2 tokens, H = 24: d holds X*48 > 3.2e9 elements, dd as many, argmax X*32 > 2^31.
    F, Y, X, Lq, Ld, H = 1, 1, 2**26 + 3001, 32, 2, 24
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(Lq, H, device="cuda", generator=gen).half()
    d = torch.empty(X, Ld, H, device="cuda", dtype=torch.float16)
    d.normal_(generator=gen)
    out = torch.empty(X, device="cuda")
    argmax = torch.full((X, Lq), -7, device="cuda", dtype=torch.int32)
    q4, d4 = q[None, None].expand(F, Y, Lq, H), d[None]  # strides (0, 0, H, 1) and (0, Ld*H, H, 1)
    stream = torch.cuda.current_stream().cuda_stream
    ext().maxsim_forward_cuda(q4, d4, None, None, out.view(F, Y, X), argmax.view(F, Y, X, Lq), stream)
    grad = torch.rand(X, device="cuda", generator=gen) + 0.5
    dd = torch.full((X, Ld, H), float("nan"), device="cuda")
    ext().maxsim_backward_cuda(q4, d4, grad.view(F, Y, X), argmax.view(F, Y, X, Lq), None, dd.view(F, X, Ld, H), stream)
    torch.cuda.synchronize()
    # Documents whose offsets pass 2^31 in every buffer, plus the first ones.
    docs = torch.cat([torch.arange(0, 5), torch.arange(X - 2000, X, 97), torch.tensor([X - 1])]).cuda()
    assert int(docs[-1]) * Lq >= I32 and int(docs[-2]) * Ld * H >= I32
    sim = torch.einsum("ih,xjh->xij", q.float(), d[docs].float())  # (n, Lq, Ld)
    torch.testing.assert_close(out[docs], sim.amax(-1).sum(-1), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(argmax[docs].long(), sim.argmax(-1))
    onehot = torch.nn.functional.one_hot(sim.argmax(-1), Ld).float()  # (n, Lq, Ld)
    want = grad[docs, None, None] * torch.einsum("xij,ih->xjh", onehot, q.float())
    torch.testing.assert_close(dd[docs], want, rtol=1e-5, atol=1e-3)
