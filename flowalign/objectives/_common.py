"""Shared input checks and dtype handling for the pure objectives (private).

Every objective upcasts half-precision inputs to fp32 (fp64 is kept, which the equivalence tests
use for tight tolerances) and validates shapes at its boundary with one message that names the
function, the argument, and the expected and actual shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """Return ``x`` in fp32 if it is a floating type narrower than 32 bits (fp16, bf16, fp8), else as is."""
    if x.is_floating_point() and torch.finfo(x.dtype).bits < 32:
        return x.float()
    return x


def check_tensor(fn: str, name: str, x: object) -> None:
    """Raise ``TypeError`` unless ``x`` is a tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")


def check_floating(fn: str, name: str, x: Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating-point tensor."""
    check_tensor(fn, name, x)
    if not x.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a floating-point tensor, got dtype {x.dtype}")


def check_vector(fn: str, name: str, x: Tensor, size: int | None = None, what: str = "[B]") -> None:
    """Raise ``ValueError`` unless ``x`` is 1-D (and has ``size`` entries when given)."""
    check_tensor(fn, name, x)
    if x.ndim != 1 or (size is not None and x.shape[0] != size):
        expected = what if size is None else f"{what} = [{size}]"
        raise ValueError(f"{fn}: {name} must have shape {expected}, got {list(x.shape)}")


def check_batched(fn: str, name: str, x: Tensor, min_ndim: int = 1) -> None:
    """Raise ``ValueError`` unless ``x`` has a batch axis (at least ``min_ndim`` dims)."""
    check_tensor(fn, name, x)
    if x.ndim < min_ndim:
        raise ValueError(f"{fn}: {name} must have shape [B, ...] (>= {min_ndim} dims), got {list(x.shape)}")


def check_same_shape(fn: str, tensors: Sequence[tuple[str, Tensor]]) -> None:
    """Raise ``ValueError`` unless every named tensor has the shape of the first one."""
    (name0, x0), *rest = tensors
    check_tensor(fn, name0, x0)
    for name, x in rest:
        check_tensor(fn, name, x)
        if x.shape != x0.shape:
            raise ValueError(
                f"{fn}: {name} must have the shape of {name0} {list(x0.shape)}, got {list(x.shape)}"
            )


def check_choice(fn: str, name: str, value: str, choices: Iterable[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_positive(fn: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is > 0 (or >= 0 with ``allow_zero``)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{fn}: {name} must be {bound}, got {value}")


def per_sample_weights(fn: str, weights: Tensor | None, batch: int, like: Tensor) -> Tensor | None:
    """Validate optional per-sample weights [B]; return them in the dtype of ``like`` (grad kept as given)."""
    if weights is None:
        return None
    check_floating(fn, "weights", weights)
    check_vector(fn, "weights", weights, batch)
    return upcast(weights).to(like.dtype)
