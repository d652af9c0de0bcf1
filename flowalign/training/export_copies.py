"""Plain (unsharded) copies of sharded trainable modules, for the main process's final export.

Built on the meta device before sharding (no memory), filled with the gathered full weights, and
swapped in for the originals wherever the method holds them while it exports (see
``flowalign.training.distributed``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ExportCopies"]


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters are on the meta device (no memory); buffers are copied."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(module, memo)


def _replace_references(root: Any, old: nn.Module, new: nn.Module, depth: int = 5) -> list[tuple]:
    """Point every attribute, child module or dict entry reachable from ``root`` (``depth`` levels)
    that is ``old`` at ``new``; returns (container, key, kind) to undo it."""
    done: list[tuple] = []
    seen: set[int] = set()
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for obj in frontier:
            if id(obj) in seen or obj is old:
                continue
            seen.add(id(obj))
            slots: list[tuple[Any, Any, str]] = []
            if isinstance(obj, nn.Module):
                slots += [(obj._modules, k, "dict") for k in obj._modules]
            if isinstance(obj, dict):
                slots += [(obj, k, "dict") for k in obj]
            elif hasattr(obj, "__dict__") and not isinstance(obj, type | Tensor):
                slots += [(obj, k, "attr") for k in vars(obj) if not k.startswith("__")]
            for container, key, kind in slots:
                value = container[key] if kind == "dict" else vars(container)[key]
                if value is old:
                    if kind == "dict":
                        container[key] = new
                    else:
                        object.__setattr__(container, key, new)
                    done.append((container, key, kind))
                elif isinstance(value, nn.Module | dict) or hasattr(value, "__dict__"):
                    nxt.append(value)
        frontier = nxt
    return done


class ExportCopies:
    """Plain (unsharded) copies of sharded trainable modules for the main process's export.

    Built before sharding (parameters on the meta device); :meth:`fill` loads gathered full
    weights; :meth:`swapped` points the method's references at the copies while it exports.
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, build: bool) -> None:
        self.originals = dict(modules)
        self.copies = {n: _meta_copy(m) for n, m in modules.items()} if build else {}

    def fill(self, states: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Load full state dicts (``{module name: state dict}``) into the copies."""
        for name, state in states.items():
            copy_ = self.copies[name]
            missing, unexpected = copy_.load_state_dict(dict(state), strict=False, assign=True)
            left = [n for n, p in copy_.named_parameters() if p.is_meta]
            if left or unexpected:
                raise ValueError(
                    f"export of {name!r}: gathered weights do not match the module "
                    f"(missing {left[:5]}, unexpected {unexpected[:5]})"
                )

    def load_trainable(self, flat: Mapping[str, Tensor], names: Iterable[str]) -> None:
        """Overwrite the trainable parameters of the copies ``names`` from ``{"<module>.<param>": tensor}``
        (the EMA shadow)."""
        with torch.no_grad():
            for name in names:
                module = self.copies[name]
                for pname, p in module.named_parameters():
                    if p.requires_grad:
                        p.copy_(flat[f"{name}.{pname}"].to(p.dtype))

    @contextlib.contextmanager
    def swapped(self, root: Any) -> Iterator[None]:
        undo: list[tuple] = []
        try:
            for name, original in self.originals.items():
                for container, key, kind in _replace_references(root, original, self.copies[name]):
                    undo.append((container, key, kind, original))
            yield
        finally:
            for container, key, kind, original in undo:
                if kind == "dict":
                    container[key] = original
                else:
                    object.__setattr__(container, key, original)
