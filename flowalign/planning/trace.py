"""Count the bytes autograd keeps for backward, to check the planner's activation formula.

:func:`saved_tensors` runs a function under ``torch.autograd.graph.saved_tensors_hooks`` and records
the distinct storages the graph saves (a tensor saved by several ops, or views of one storage, count
once). Storages of the given modules' parameters are weights, not activations, and are left out. The
sum is what a forward adds to memory until its backward, independent of any allocator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def saved_tensors(
    fn: Callable[[], Any], modules: Iterable[torch.nn.Module] = (), exclude: Iterable[torch.Tensor] = ()
) -> tuple[dict[int, tuple[tuple[int, ...], torch.dtype, int]], Any]:
    """({storage pointer: (shape, dtype, storage bytes)} saved for backward by ``fn()``, ``fn()``'s result).

    Args:
        fn: the forward to trace (its graph stays alive through the returned result).
        modules: modules whose parameters' storages are not counted.
        exclude: further tensors (e.g. the inputs) whose storages are not counted.
    """
    skip = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in exclude}
    found: dict[int, tuple[tuple[int, ...], torch.dtype, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr and ptr not in skip and ptr not in found:
            found[ptr] = (tuple(t.shape), t.dtype, s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return found, out


def saved_bytes(
    fn: Callable[[], Any], modules: Iterable[torch.nn.Module] = (), exclude: Iterable[torch.Tensor] = ()
) -> tuple[int, Any]:
    """(total bytes of the distinct storages saved for backward by ``fn()``, ``fn()``'s result)."""
    found, out = saved_tensors(fn, modules, exclude)
    return sum(v[2] for v in found.values()), out
