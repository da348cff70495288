"""The packed-weight cache the CPU kernels share: a packing is reused only for the very same, unchanged
parameters."""
import gc

import pytest
import torch

from fastrank.ops.weight_cache import WeightCache


def _counting_builder(calls: list, value):
    def build():
        calls.append(value)
        return value
    return build


def test_reuses_a_packing_while_the_parameters_are_unchanged():
    cache, calls = WeightCache(4), []
    w = torch.randn(3, 5)
    a = cache.get("k", [w], _counting_builder(calls, "first"))
    b = cache.get("k", [w], _counting_builder(calls, "second"))
    assert (a, b, calls) == ("first", "first", ["first"])


def test_an_in_place_update_repacks():
    cache, calls = WeightCache(4), []
    w = torch.randn(3, 5)
    cache.get("k", [w], _counting_builder(calls, 1))
    with torch.no_grad():
        w.add_(1.0)  # what an optimiser step does: bumps the version counter
    assert cache.get("k", [w], _counting_builder(calls, 2)) == 2


def test_kinds_and_parameter_lists_are_kept_apart():
    cache = WeightCache(4)
    w, v = torch.randn(2, 2), torch.randn(2, 2)
    assert cache.get("forward", [w], lambda: "fw") == "fw"
    assert cache.get("backward", [w], lambda: "bw") == "bw"
    assert cache.get("forward", [w, v], lambda: "fwv") == "fwv"
    assert cache.get("forward", [w], lambda: "rebuilt") == "fw"


def test_a_new_tensor_at_a_freed_ones_address_does_not_inherit_its_packing():
    cache = WeightCache(4)
    w = torch.randn(64, 64)
    key_id, ptr = id(w), w.data_ptr()
    cache.get("k", [w], lambda: "old")
    del w
    gc.collect()
    # Whether or not the allocator hands back the same address and id, the weak reference is dead.
    fresh = torch.randn(64, 64)
    got = cache.get("k", [fresh], lambda: "new")
    assert got == "new", (key_id == id(fresh), ptr == fresh.data_ptr())


def test_the_oldest_packing_goes_first_and_the_size_is_bounded():
    cache = WeightCache(2)
    ws = [torch.randn(2) for _ in range(3)]
    for i, w in enumerate(ws):
        cache.get("k", [w], lambda i=i: i)
    assert len(cache) == 2
    assert cache.get("k", [ws[0]], lambda: "rebuilt") == "rebuilt"
    assert cache.get("k", [ws[2]], lambda: "rebuilt") == 2


def test_clear_forgets_everything():
    cache = WeightCache(2)
    w = torch.randn(2)
    cache.get("k", [w], lambda: 1)
    cache.clear()
    assert len(cache) == 0 and cache.get("k", [w], lambda: 2) == 2


def test_size_must_be_positive():
    with pytest.raises(ValueError, match="size must be at least 1, got 0"):
        WeightCache(0)
