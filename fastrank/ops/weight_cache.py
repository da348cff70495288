"""Packed copies of parameters, kept while the parameters are unchanged.

The CPU kernels read weights in their micro-kernels' layouts (lite_cpu.h, projection_cpu.h). Repacking on
every call would cost a copy of the weights per call, so each op keeps a few packings, keyed by the
parameters' identities, storages and version counters: an optimiser step, ``load_state_dict`` or any
in-place edit bumps a version and so repacks. An entry holds weak references and is used only while they
still point at these very tensors, so a new module allocated where a freed one was never inherits its
packing. A write through ``param.data`` bypasses the version counters: call :meth:`WeightCache.clear` (or
the op's ``clear_cache``) after one.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Hashable, Sequence, TypeVar

from torch import Tensor

T = TypeVar("T")


class WeightCache:
    """At most ``size`` packings, the oldest dropped first; safe to share between threads."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"WeightCache: size must be at least 1, got {size}")
        self._size = size
        self._lock = threading.Lock()
        self._entries: dict[tuple, tuple[tuple, object]] = {}

    def get(self, kind: Hashable, params: Sequence[Tensor], build: Callable[[], T]) -> T:
        """The packing ``kind`` of ``params``: the cached one while they are unchanged, else ``build()``."""
        key = (kind,) + tuple((id(p), p.data_ptr(), p._version) for p in params)
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None and all(ref() is p for ref, p in zip(hit[0], params)):
            return hit[1]
        value = build()
        with self._lock:
            self._entries.pop(key, None)
            while len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (tuple(weakref.ref(p) for p in params), value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
